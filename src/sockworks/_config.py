"""Configuration as data: limits and socket options.

Every default is on and explains itself, so that a service started with no
options is already safe to expose to strangers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from ._errors import ConfigError


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-listener limits. ``None`` turns a limit off."""

    # A peer silent this long is disconnected: five minutes is longer than
    # any person pauses at a prompt, short enough that abandoned connections
    # do not pile up.
    idle_timeout: float | None = 300.0
    # Longest line (or request) a line-oriented service accepts. 8 KiB is
    # what most servers allow for a request line; the buffer never grows
    # beyond it, whatever the peer sends.
    max_line: int = 8192
    # Connections served at once per listener group. Beyond it new
    # connections wait in the kernel's listen backlog (we stop accepting),
    # they are not torn down.
    max_connections: int = 1024
    # Bytes queued for a peer that does not read before we stop reading from
    # it: output memory per connection is bounded by this.
    max_output_buffer: int = 256 * 1024
    # Threads that run blocking-style handlers; a blocking handler holds its
    # thread for the whole connection, so this also caps its connections.
    handler_threads: int = 64
    # Largest datagram read; 65535 is the UDP maximum.
    max_datagram: int = 65535
    # A service that waits for a request line (Gopher, charcount, greeting)
    # must get the whole line within this: the idle timeout restarts on
    # every byte, so without it one byte every 29 s holds a connection for
    # days. 30 s is generous for a person typing a line into telnet.
    request_timeout: float | None = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("idle_timeout", "request_timeout"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"limit {f.name} must be a positive number, not {value!r}")

    def updated(self, **changes: Any) -> Limits:
        """A copy with ``changes`` applied, ignoring those that are ``None``
        except the timeouts (where ``0`` turns one off)."""
        clean = {k: v for k, v in changes.items() if v is not None}
        for key in ("idle_timeout", "request_timeout"):
            if clean.get(key) == 0:
                clean[key] = None
        return replace(self, **clean)


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """The seeds' socket options. ``None`` leaves the kernel default."""

    # Disable Nagle: request/response services answer in one write, and
    # Nagle plus delayed ACK would add up to 40 ms to each reply.
    nodelay: bool = True
    # TCP keepalive finds peers that vanished without a FIN (pulled cable);
    # off by default like the kernel, because the idle timeout already does.
    keepalive: bool = False
    # SO_LINGER seconds; 0 makes close() send RST and drop unsent data.
    linger: int | None = None
    rcvbuf: int | None = None
    sndbuf: int | None = None
    # Listen backlog: connections the kernel holds while we are at
    # max_connections or busy; the kernel caps it at net.core.somaxconn.
    backlog: int = 511
    # SO_BROADCAST, UDP only: allow sending to broadcast addresses.
    broadcast: bool = False
    # SO_REUSEPORT: several processes may bind the same port (workers).
    reuse_port: bool = False

    def updated(self, **changes: Any) -> SocketOptions:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """TLS for a service's ``tls:`` and ``unix+tls:`` listeners.

    ``cert`` holds the certificate chain (PEM; ``key`` the private key,
    unless ``cert`` has it too). ``client_ca``: clients must present a
    certificate that this CA signed. ``alpn``: protocols offered, in order
    of preference. TLS 1.2 is the least accepted (``min_version``), what
    current guidance (RFC 9325) asks for.
    """

    cert: str
    key: str | None = None
    client_ca: str | None = None
    alpn: tuple[str, ...] = ()
    # A handshake not done in this time is dropped, so that stalled
    # handshakes never hold a slot for long: 10 s covers a slow mobile link.
    handshake_timeout: float = 10.0
    min_version: str = "TLSv1_2"

    def __post_init__(self) -> None:
        if not isinstance(self.cert, str) or not self.cert:
            raise ConfigError("TLS needs a certificate file (cert)")
        if not isinstance(self.handshake_timeout, (int, float)) or self.handshake_timeout <= 0:
            raise ConfigError(
                f"handshake_timeout must be a positive number, not {self.handshake_timeout!r}"
            )
        if self.min_version not in ("TLSv1_2", "TLSv1_3"):
            raise ConfigError(f"min_version must be TLSv1_2 or TLSv1_3, not {self.min_version!r}")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The PROXY protocol on a service's stream listeners (HAProxy's
    ``doc/proxy-protocol.txt``): a peer inside ``trusted`` must start with a
    header (``accept``: ``v1``, ``v2`` or ``any``), and its address is the
    client's from then on; a peer outside is refused. Never guessed: a
    header from anyone would let anyone claim any address.
    """

    trusted: tuple[str, ...]
    accept: str = "any"
    # The whole header within this: a balancer sends it at once.
    timeout: float = 3.0

    def __post_init__(self) -> None:
        if self.accept not in ("v1", "v2", "any"):
            raise ConfigError(f"proxy_protocol must be v1, v2 or any, not {self.accept!r}")
        if not self.trusted:
            raise ConfigError(
                "the PROXY protocol needs the balancers' addresses (proxy_from): "
                "a header from anyone would let anyone claim any address"
            )
        if not isinstance(self.timeout, (int, float)) or self.timeout <= 0:
            raise ConfigError(f"proxy timeout must be a positive number, not {self.timeout!r}")


# How many worker processes "auto" means: one per CPU this process may run on.
def cpu_count() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ProcessSettings:
    """How the server runs as a process (``[server]`` in a config file):
    worker processes, the user it drops to, metrics and the log format.

    ``workers`` None: one process, serving by itself (the default). A
    number, even 1: a supervising parent that binds every listener and
    forks that many workers accepting on the shared sockets, replaces the
    ones that die, and reloads on SIGHUP (seed 002's prefork model).
    """

    workers: int | None = None
    user: str | None = None
    group: str | None = None
    # Where Prometheus metrics are served over HTTP (at /metrics), as an
    # endpoint string such as "127.0.0.1:9100"; None: no metrics.
    metrics: str | None = None
    log_format: str = "text"

    def __post_init__(self) -> None:
        w = self.workers
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ConfigError(f"workers must be a positive whole number or auto, not {w!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")

    def updated(self, **changes: Any) -> ProcessSettings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_workers(value: object) -> int:
    """``--workers``/``workers =``: a positive whole number, or ``auto``
    (one per CPU). Raises ConfigError naming what was wrong."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return cpu_count()
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(
                f"{value!r} is not a number of workers (a whole number or auto)"
            ) from None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{value!r} is not a number of workers (a whole number >= 1, or auto)")
    return value
