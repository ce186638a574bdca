"""Endpoint strings: ``tcp:HOST:PORT``, ``udp:HOST:PORT``, ``unix:PATH``…

``tls:HOST:PORT`` is TCP with TLS on top, and ``unix+tls:PATH`` a Unix
stream socket with TLS on top: the transport stays ``tcp`` or ``unix`` and
:attr:`Endpoint.tls` says that TLS runs over it.

``systemd:NAME`` (a socket systemd passed, by its name or 0-based index)
and ``fd:N`` (descriptor N) are sockets this process inherited: they parse
to the concrete endpoint the socket is (its transport and address read from
the socket itself), with :attr:`Endpoint.fd` set, so that it is adopted
rather than bound.

The same strings are accepted by the CLI and the Python API, and an
:class:`Endpoint` prints back as the string that would parse to it, so the
``listening on ENDPOINT`` line can be pasted into another command.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Literal

from ._errors import EndpointError
from ._systemd import PassedSocket, check_listening, inspect, lookup, passed_sockets

Transport = Literal["tcp", "udp", "unix", "unixgram"]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp", "unix", "unixgram")
STREAM_TRANSPORTS = frozenset({"tcp", "unix"})
# Endpoint prefixes that mean TLS over a stream transport.
_TLS_FORMS: dict[str, Transport] = {"tls": "tcp", "unix+tls": "unix"}
INET_TRANSPORTS = frozenset({"tcp", "udp"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a socket listens or connects.

    ``host`` and ``port`` are set for tcp/udp, ``path`` for unix/unixgram.
    ``host`` is kept as written (a name, an IPv4 or an IPv6 literal without
    brackets); an empty host means "all addresses".
    """

    transport: Transport
    host: str = ""
    port: int = 0
    path: str = ""
    tls: bool = False  # TLS over this stream transport (tls:, unix+tls:)
    # An inherited socket (systemd:NAME, fd:N): this descriptor is adopted,
    # never bound, and ``source`` is how it was named.
    fd: int | None = None
    source: str = ""

    @property
    def is_stream(self) -> bool:
        return self.transport in STREAM_TRANSPORTS

    @property
    def is_inet(self) -> bool:
        return self.transport in INET_TRANSPORTS

    @property
    def inherited(self) -> bool:
        """A socket this process was given (systemd:NAME, fd:N): adopted,
        never bound; its Unix path and its listen state are not ours."""
        return self.fd is not None

    def __str__(self) -> str:
        if not self.is_inet:
            return f"{self.transport}{'+tls' if self.tls else ''}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.tls else self.transport}:{host}:{self.port}"

    def with_port(self, port: int) -> Endpoint:
        return replace(self, port=port)


def parse_endpoint(text: str, default_transport: Transport = "tcp") -> Endpoint:
    """Parse an endpoint string; raise :class:`EndpointError` naming the problem.

    ``HOST:PORT`` alone means ``default_transport`` (TCP unless told).
    """
    if not isinstance(text, str) or not text:
        raise EndpointError("empty endpoint")
    reject_url(text)
    transport: str = default_transport
    rest = text
    tls = False
    head, sep, tail = text.partition(":")
    if sep and head in ("systemd", "fd"):
        return _inherited(head, tail, text)
    if sep and head in _TLS_FORMS:
        transport, rest, tls = _TLS_FORMS[head], tail, True
    elif sep and head in TRANSPORTS:
        transport, rest = head, tail
    elif sep and head.isalpha() and ":" in tail:
        # "sctp:host:1" looks like a transport we do not know, not HOST:PORT.
        raise EndpointError(
            f"unknown transport {head!r} in endpoint {text!r}"
            " (use tcp, udp, unix, unixgram, tls or unix+tls)"
        )
    if transport in ("unix", "unixgram"):
        if not rest:
            raise EndpointError(f"endpoint {text!r} has no socket path")
        if "\0" in rest:
            raise EndpointError(f"endpoint {text!r}: a socket path cannot contain NUL")
        return Endpoint(transport, path=rest, tls=tls)  # type: ignore[arg-type]
    host, port = split_host_port(rest, zero_ok=True, subject=f"endpoint {text!r}")
    return Endpoint(transport, host=host, port=port, tls=tls)  # type: ignore[arg-type]


def _inherited(kind: str, key: str, text: str) -> Endpoint:
    """``systemd:NAME``/``systemd:N`` or ``fd:N``: the inherited socket, as
    the endpoint it really is."""
    if kind == "fd":
        if not key.isascii() or not key.isdigit():
            raise EndpointError(f"endpoint {text!r}: descriptor {key!r} is not a number")
        passed = inspect(int(key), subject=text)
    else:
        passed = lookup(key, text)
    check_listening(passed, text)
    return inherited_endpoint(passed, text)


def inherited_endpoint(passed: PassedSocket, source: str) -> Endpoint:
    """The endpoint an inherited socket is, named ``source``."""
    transport: Transport = passed.transport  # type: ignore[assignment]
    address = passed.address
    if transport in ("unix", "unixgram"):
        if isinstance(address, bytes):  # abstract (a leading NUL): shown as @name
            path = "@" + address[1:].decode(errors="replace")
        else:
            path = str(address)
        return Endpoint(transport, path=path, fd=passed.fd, source=source)
    return Endpoint(
        transport, host=str(address[0]), port=int(address[1]), fd=passed.fd, source=source
    )


def inherited_endpoints() -> list[Endpoint]:
    """Every socket systemd passed (LISTEN_FDS), as endpoints named
    ``systemd:NAME`` (or ``systemd:N`` where names repeat); empty when none
    were passed. A :class:`BindError` when they were, but not to us."""
    sockets = passed_sockets()
    names = [s.name for s in sockets]
    out = []
    for index, passed in enumerate(sockets):
        unique = names.count(passed.name) == 1 and not passed.name.isdigit()
        key = passed.name if unique else str(index)
        source = f"systemd:{key}"
        check_listening(passed, source)
        out.append(inherited_endpoint(passed, source))
    return out


def reject_url(text: str, subject: str = "endpoint") -> None:
    """A URL-like endpoint (``tcp://127.0.0.1:7007``) would be looked up as
    a host named ``//127.0.0.1``: refuse it, showing the right spelling."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return
    rest = rest.rstrip("/") if scheme not in ("unix", "unixgram") else rest
    if scheme in ("unix", "unixgram"):
        right = f"{scheme}:{rest or 'PATH'}"
    elif scheme in ("tcp", "udp"):
        right = f"{scheme}:{rest or 'HOST:PORT'}"
    else:
        right = f"tcp:{rest if ':' in rest else (rest or 'HOST') + ':PORT'}"
    raise EndpointError(f"{subject} {text!r} is written as a URL: write {right}")


# The one host:port parser and port validator: endpoints, Gopher URLs and
# targets, netcat's --zero and --source, --advertise and --drop-source-port
# all come through here, so they accept the same forms and say the same
# things about the same mistakes.

PORT_MAX = 65535


def parse_port(text: str, *, zero_ok: bool = False, subject: str = "") -> int:
    """A port written in ASCII digits, 1-65535; 0-65535 when ``zero_ok``
    (port 0 is meaningful only when binding: the kernel picks a free port).

    Raise :class:`EndpointError` (a :class:`UsageError`) starting with
    ``subject`` when one is given: ``endpoint 'h:x': port 'x' is not a number``.
    """
    prefix = f"{subject}: " if subject else ""
    if not text:
        raise EndpointError(f"{prefix}no port number")
    # isdigit() alone accepts "٣" and "²", which int() rejects or misreads.
    if not text.isascii() or not text.isdigit():
        raise EndpointError(f"{prefix}port {text!r} is not a number")
    digits = text.lstrip("0") or "0"
    # Length first: int() of thousands of digits is slow, and refused past 4300.
    value = int(digits) if len(digits) <= 5 else PORT_MAX + 1
    low = 0 if zero_ok else 1
    if not low <= value <= PORT_MAX:
        raise EndpointError(f"{prefix}port {digits} is out of range ({low}-{PORT_MAX})")
    return value


def partition_host_port(
    text: str,
    *,
    port_optional: bool = False,
    subject: str | None = None,
    port_name: str = "PORT",
) -> tuple[str, str | None]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT`` into the host and the port's
    text, checking the host but not the port (netcat's ``--zero`` has a port
    list there). With ``port_optional``, ``HOST``, ``[IPV6]`` and a bare
    IPv6 literal are accepted too, with ``None`` for the port.

    The host comes back without brackets; it may be empty ("all addresses"
    when binding: callers that need a host say so themselves).
    """
    subject = subject if subject is not None else repr(text)
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise EndpointError(f"{subject}: missing ']' (expected [IPV6]:{port_name})")
        host, after = text[1:close], text[close + 1 :]
        if after.startswith(":"):
            port_text: str | None = after[1:]
        elif not after and port_optional:
            port_text = None
        else:
            raise EndpointError(f"{subject}: expected [IPV6]:{port_name}")
        if not _is_ipv6(host):
            raise EndpointError(f"{subject}: {host!r} is not an IPv6 address")
    elif ":" not in text:
        if not port_optional:
            raise EndpointError(f"{subject} has no port (expected HOST:{port_name})")
        host, port_text = text, None
    else:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            # Several colons: an IPv6 literal, whose last group would be
            # indistinguishable from a port; only a bare one (no port) is taken.
            if port_optional and _is_ipv6(text):
                return text, None
            raise EndpointError(
                f"{subject}: write IPv6 addresses in brackets, [::1]:{port_name}"
            )
    if any(c.isspace() for c in host):
        raise EndpointError(f"{subject}: host contains white space")
    # A NUL or a surrogate would make getaddrinfo raise ValueError, not a
    # socket error: refuse them here, where the message can be clear.
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in host):
        raise EndpointError(f"{subject}: host contains a character no host name has")
    return host, port_text


def split_host_port(
    text: str,
    *,
    default_port: int | None = None,
    zero_ok: bool = False,
    subject: str | None = None,
) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` → ``(host, port)``, the host without
    brackets. When ``default_port`` is given the port may be left out:
    ``HOST``, ``[IPV6]`` and a bare IPv6 literal (``::1``) take it.

    Ports are 1-65535, or 0-65535 with ``zero_ok``. Every error is an
    :class:`EndpointError` (a :class:`UsageError`) that starts with
    ``subject`` (default: the text, quoted) and names the problem.
    """
    subject = subject if subject is not None else repr(text)
    host, port_text = partition_host_port(
        text, port_optional=default_port is not None, subject=subject
    )
    if port_text is None and default_port is not None:
        return host, default_port
    # (port_text is None only when default_port was given.)
    return host, parse_port(port_text or "", zero_ok=zero_ok, subject=subject)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host.split("%", 1)[0])  # a zone (%eth0) is allowed
    except ValueError:
        return False
    return True
