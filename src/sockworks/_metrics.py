"""Prometheus metrics: counted for free on the data path, turned into
samples only when scraped.

Counting. Each service's :class:`~sockworks._core.ConnectionGroup` holds a
:class:`ServiceCounts`: plain ints and fixed dicts that the engine bumps
where it already is (a connection opened, closed, refused; a datagram
answered or dropped; a handler error). Bytes are taken from each
connection's :class:`~sockworks._core.ConnectionStats` when it closes, not
per read. Reasons are free text in the log ("denied by 10.0.0.0/8", "line
longer than 8192 bytes"); here they are bucketed into the fixed label
values of :data:`CLOSE_REASONS`, :data:`REFUSE_REASONS` and
:data:`DROP_REASONS`, so that a peer can never mint a label value.

Exposing. One process (no ``--workers``): :class:`ServiceCollector` reads
the groups' counts at scrape time, in the HTTP thread of
:class:`MetricsEndpoint` (exact; the event loop is not involved).
With workers: see :class:`WorkerMetrics`, the supervisor's hook. Each
worker flushes the deltas of its counts into prometheus_client's
multiprocess files every :data:`FLUSH_INTERVAL` seconds and once more as
it exits; a separate small process serves ``/metrics`` from those files
(the supervising parent itself runs no thread, so that it can fork safely).

prometheus_client is imported only when metrics are served: it costs
60 ms at start, and most runs have no ``--metrics``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.server
import importlib
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ._config import SocketOptions
from ._endpoint import Endpoint, parse_endpoint
from ._errors import BindError, ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("sockworks.metrics")

# -- the label values: fixed sets, whatever peers send ---------------------------

# Why a connection closed (label ``reason`` of sockworks_connections_closed_total).
CLOSE_REASONS = (
    "normal",  # the peer or the service ended it (any reason not below)
    "idle_timeout",  # nothing moved for the idle timeout (exec: its session limit)
    "request_timeout",  # no whole request within the request timeout
    "protocol_error",  # the peer broke the protocol (a line too long)
    "handler_error",  # a bug in the handler (logged with its traceback)
    "reset",  # the connection broke: reset by the peer, broken pipe, a network error
    "slow_reader",  # the peer stopped reading what we sent
    "shutdown",  # closed because the server was stopping
    "shutdown_aborted",  # still open at the end of the grace period
)
# Why a connection was refused before it started (sockworks_connections_refused_total).
REFUSE_REASONS = (
    "denied",  # --allow/--deny
    "per_source",  # --per-source
    "instances",  # --instances
    "cps",  # --cps
    "untrusted_proxy",  # not in --proxy-from on a PROXY listener
    "bad_proxy_header",
    "proxy_timeout",  # no whole PROXY header in time
    "tls_failed",  # the TLS handshake failed
    "tls_timeout",  # the TLS handshake took too long
    "left_early",  # the peer left before the connection started (PROXY/TLS stage)
    "other",
)
# Why a datagram was dropped unanswered (sockworks_datagrams_dropped_total).
DROP_REASONS = (
    "oversize",  # over --max-datagram
    "loop_port",  # from a service port (loop prevention)
    "forged_source",  # from a broadcast, multicast or unspecified address
    "denied",  # --allow/--deny
    "rate",  # over --udp-rate
    "amplification",  # the reply would exceed --max-amplification
    "handler_busy",  # every handler thread busy (blocking style)
    "no_address",  # an unbound unixgram sender cannot be answered
    "protocol_error",  # the service refused it (a malformed request)
    "handler_error",  # a bug in the handler
)

_CLOSE_EXACT = {
    "idle timeout": "idle_timeout",
    "timed out": "idle_timeout",  # a protocol's own on_timeout, an OS TimeoutError
    "request timed out": "request_timeout",
    "internal error": "handler_error",
    "file error": "handler_error",
    "reset by peer": "reset",
    "broken pipe": "reset",
    "connection closed": "reset",
    "peer stopped reading": "slow_reader",
    "server shutting down": "shutdown",
    "aborted at the end of the grace period": "shutdown_aborted",
}
_CLOSE_PREFIXES = (
    ("line longer than ", "protocol_error"),  # LineTooLong, any style
    ("session timeout", "idle_timeout"),  # exec: the program's time is up
    ("server stopping", "shutdown"),  # exec
    ("aborted", "shutdown_aborted"),  # exec: "aborted, then SIGKILL"
    ("cannot start ", "handler_error"),  # exec: the program did not start
    ("[Errno ", "reset"),  # an OSError on the connection
)
_REFUSE_PREFIXES = (
    ("denied by ", "denied"),
    ("not in the allow list", "denied"),
    ("per-source limit", "per_source"),
    ("instance limit", "instances"),
    ("rate limit", "cps"),
    ("not a trusted proxy", "untrusted_proxy"),
)
_DROP_PREFIXES = (
    ("oversize datagram", "oversize"),
    ("source port ", "loop_port"),
    ("broadcast/multicast", "forged_source"),
    ("source over ", "rate"),
    ("denied by ", "denied"),
    ("not in the allow list", "denied"),
)


def _by_prefix(reason: str, table: tuple[tuple[str, str], ...]) -> str | None:
    """The label of the first ``(prefix, label)`` in ``table`` that
    ``reason`` starts with."""
    for prefix, bucket in table:
        if reason.startswith(prefix):
            return bucket
    return None


def close_reason(reason: str | None) -> str:
    """The :data:`CLOSE_REASONS` value for a closing line's reason."""
    if reason is None:
        return "normal"
    bucket = _CLOSE_EXACT.get(reason) or _by_prefix(reason, _CLOSE_PREFIXES)
    if bucket == "shutdown" and "SIGKILL" in reason:
        return "shutdown_aborted"  # exec: killed at the end of the grace period
    if bucket is not None:
        return bucket
    if reason.endswith("too long"):  # "request too long", "token too long"
        return "protocol_error"
    return "normal"


def refuse_reason(reason: str) -> str:
    """The :data:`REFUSE_REASONS` value for a refusal's reason."""
    return _by_prefix(reason, _REFUSE_PREFIXES) or "other"


def drop_reason(reason: str) -> str:
    """The :data:`DROP_REASONS` value for a dropped datagram's reason."""
    bucket = _by_prefix(reason, _DROP_PREFIXES)
    if bucket is not None:
        return bucket
    if "amplification limit" in reason:
        return "amplification"
    return "protocol_error"


class ServiceCounts:
    """One service's counters: plain ints and fixed dicts, bumped on the
    event loop's thread (the blocking style's threads go through
    ``loop.call_soon_threadsafe``), read by any thread at scrape time. Each
    value only grows, and a dict copy is atomic in CPython, so a reader
    never sees a counter go back."""

    __slots__ = (
        "answered",
        "bytes_in",
        "bytes_out",
        "closed",
        "dropped",
        "handler_errors",
        "opened",
        "refused",
    )

    def __init__(self) -> None:
        self.opened = 0
        self.closed: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.refused: dict[str, int] = dict.fromkeys(REFUSE_REASONS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        # Stream bytes when each connection closes; datagram bytes as answered.
        self.bytes_in = 0
        self.bytes_out = 0
        self.answered = 0
        self.handler_errors = 0

    def snapshot(self, open_now: int) -> Snapshot:
        return Snapshot(
            opened=self.opened,
            open_now=open_now,
            closed=self.closed.copy(),
            refused=self.refused.copy(),
            dropped=self.dropped.copy(),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            answered=self.answered,
            handler_errors=self.handler_errors,
        )


class Group(Protocol):
    """What metrics read of a ``_core.ConnectionGroup`` (which imports this
    module: no import back)."""

    name: str
    counts: ServiceCounts

    @property
    def live(self) -> Sized: ...


class Snapshot:
    """A service's counts at one moment (several groups of one name add up)."""

    __slots__ = (
        "answered",
        "bytes_in",
        "bytes_out",
        "closed",
        "dropped",
        "handler_errors",
        "open_now",
        "opened",
        "refused",
    )

    def __init__(
        self,
        *,
        opened: int = 0,
        open_now: int = 0,
        closed: dict[str, int] | None = None,
        refused: dict[str, int] | None = None,
        dropped: dict[str, int] | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        answered: int = 0,
        handler_errors: int = 0,
    ) -> None:
        self.opened = opened
        self.open_now = open_now
        self.closed = closed if closed is not None else dict.fromkeys(CLOSE_REASONS, 0)
        self.refused = refused if refused is not None else dict.fromkeys(REFUSE_REASONS, 0)
        self.dropped = dropped if dropped is not None else dict.fromkeys(DROP_REASONS, 0)
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.answered = answered
        self.handler_errors = handler_errors

    def add(self, other: Snapshot) -> None:
        self.opened += other.opened
        self.open_now += other.open_now
        for mine, theirs in (
            (self.closed, other.closed),
            (self.refused, other.refused),
            (self.dropped, other.dropped),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.answered += other.answered
        self.handler_errors += other.handler_errors

    def series(self) -> Iterator[tuple[str, tuple[str, ...], float]]:
        """``(metric, extra label values, value)`` for every series, the
        service label left out; gauges and counters alike (see :data:`METRICS`)."""
        yield "connections_opened", (), self.opened
        yield "connections_open", (), self.open_now
        for reason, value in self.closed.items():
            yield "connections_closed", (reason,), value
        for reason, value in self.refused.items():
            yield "connections_refused", (reason,), value
        yield "bytes_received", (), self.bytes_in
        yield "bytes_sent", (), self.bytes_out
        yield "datagrams_answered", (), self.answered
        for reason, value in self.dropped.items():
            yield "datagrams_dropped", (reason,), value
        yield "idle_timeouts", (), self.closed.get("idle_timeout", 0)
        yield "request_timeouts", (), self.closed.get("request_timeout", 0)
        yield "handler_errors", (), self.handler_errors


# Every metric: name (without sockworks_ and _total), kind, extra labels, help.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "connections_opened": ("counter", (), "Connections admitted and started."),
    "connections_open": ("gauge", (), "Connections open now."),
    "connections_closed": (
        "counter", ("reason",), "Connections closed, by why (" + ", ".join(CLOSE_REASONS) + ")."
    ),
    "connections_refused": (
        "counter", ("reason",),
        "Connections refused before they started, by why (" + ", ".join(REFUSE_REASONS) + ").",
    ),
    "bytes_received": (
        "counter", (), "Bytes received: a connection's when it closes, a datagram's when answered."
    ),
    "bytes_sent": (
        "counter", (), "Bytes sent: a connection's when it closes, each datagram reply's."
    ),
    "datagrams_answered": ("counter", (), "Datagram replies sent."),
    "datagrams_dropped": (
        "counter", ("reason",),
        "Datagrams dropped unanswered, by why (" + ", ".join(DROP_REASONS) + ").",
    ),
    "idle_timeouts": (
        "counter", (), "Connections closed by the idle timeout (closed_total{reason=idle_timeout})."
    ),
    "request_timeouts": (
        "counter", (),
        "Connections closed by the request timeout (closed_total{reason=request_timeout}).",
    ),
    "handler_errors": (
        "counter", (), "Exceptions raised by a handler or protocol (each logged with a traceback)."
    ),
}
PREFIX = "sockworks_"


def service_snapshots(groups: Iterable[Group]) -> dict[str, Snapshot]:
    """Each service's counts now, by name."""
    out: dict[str, Snapshot] = {}
    for group in list(groups):
        snap = group.counts.snapshot(len(group.live))
        mine = out.get(group.name)
        if mine is None:
            out[group.name] = snap
        else:
            mine.add(snap)
    return out


class ServiceCollector:
    """A prometheus_client collector over live groups (one process): every
    sample read at scrape time from the groups ``groups()`` returns."""

    def __init__(self, groups: Callable[[], Iterable[Group]]) -> None:
        self.groups = groups

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snapshots = service_snapshots(self.groups())
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name, (kind, labels, doc) in METRICS.items():
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            families[name] = cls(PREFIX + name, doc, labels=["service", *labels])
        for service, snap in sorted(snapshots.items()):
            for name, extra, value in snap.series():
                families[name].add_metric([service, *extra], value)
        yield from families.values()


def service_registry(groups: Callable[[], Iterable[Group]]) -> CollectorRegistry:
    """A registry with only sockworks' own metrics (no process or GC
    collectors: with workers they would describe the wrong process)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(groups))
    return registry


# -- the HTTP endpoint -----------------------------------------------------------

# Scrapes handled at once; more wait in the backlog. Prometheus scrapes one
# at a time; a few more leave room for a person's curl.
MAX_SCRAPES = 4
# A scrape's request must arrive, and its response be taken, within this.
SCRAPE_TIMEOUT = 10.0


def check_endpoint(text: str) -> Endpoint:
    """The endpoint metrics are served on: ``tcp:`` (``HOST:PORT``) or ``unix:``."""
    endpoint = parse_endpoint(text)
    if endpoint.transport not in ("tcp", "unix") or endpoint.tls:
        raise ConfigError(f"metrics are served over HTTP on tcp: or unix:, not {endpoint}")
    return endpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /metrics; any other path is 404, any other method 405."""

    server: Any  # our _HTTPServing, not a socketserver
    protocol_version = "HTTP/1.0"  # one request per connection
    server_version = "sockworks-metrics"
    timeout = SCRAPE_TIMEOUT

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"not found: metrics are at /metrics\n")
            return
        from prometheus_client.exposition import choose_encoder

        try:
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = encode(self.server.registry)
        except Exception:
            log.exception("metrics: collecting failed")
            self._reply(500, b"collecting the metrics failed; see the server's log\n")
            return
        self._reply(200, body, content_type)

    def _not_get(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"not found: metrics are at /metrics\n")
        else:
            self._reply(405, b"only GET\n", extra={"Allow": "GET"})

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_get

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def version_string(self) -> str:
        return self.server_version  # not Python's version: nobody's business

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class _HTTPServing:
    """An accept loop in a thread over a socket we bound, a thread per
    scrape (at most MAX_SCRAPES); stopped at once through a wake-up socket
    (socketserver's shutdown() polls every half second)."""

    def __init__(self, sock: socket.socket, registry: Any) -> None:
        self.sock = sock
        self.registry = registry
        self._wake_r, self._wake_w = socket.socketpair()
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self._thread = threading.Thread(target=self._run, name="sockworks-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                if not self._slots.acquire(blocking=False):
                    # Every slot busy: the backlog holds the rest. Look
                    # again shortly, or at once when woken to stop.
                    if self._woken(selector, 0.05):
                        return
                    continue
                try:
                    conn, addr = self.sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    self._slots.release()
                    continue
                except OSError as exc:  # out of descriptors: pause, then try again
                    self._slots.release()
                    log.warning("metrics: accept failed: %s", exc.strerror or exc)
                    if self._woken(selector, 0.5):
                        return
                    continue
                threading.Thread(
                    target=self._handle, args=(conn, addr), name="sockworks-scrape", daemon=True
                ).start()

    def _woken(self, selector: selectors.BaseSelector, timeout: float) -> bool:
        return any(key.fileobj is self._wake_r for key, _ in selector.select(timeout))

    def _handle(self, conn: socket.socket, addr: Any) -> None:
        try:
            conn.setblocking(True)
            _Handler(conn, addr if isinstance(addr, tuple) else ("unix", 0), self)  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:  # a peer that left or timed out
            log.debug("metrics: scrape failed: %s", exc)
        finally:
            conn.close()
            self._slots.release()

    def stop(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self._wake_r.close()
        self._wake_w.close()


class MetricsEndpoint:
    """The socket ``/metrics`` is served on, bound before anything serves.

    :meth:`bind` raises :class:`BindError` (one line) when the endpoint is
    in use; :attr:`where` says where it is (the real port for port 0).
    :meth:`serve` serves a registry from a thread of this process (one
    process); a forked child closes its copy of the socket by itself
    (``os.register_at_fork``), so a worker never holds the port.
    """

    def __init__(self, sock: socket.socket, endpoint: Endpoint) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self._serving: _HTTPServing | None = None
        self._owner = os.getpid()
        _FORKED_CLOSE.append(self)

    @classmethod
    def bind(cls, text: str) -> MetricsEndpoint:
        from ._sockets import bind

        endpoint = check_endpoint(text)
        try:
            bound = bind(endpoint, SocketOptions(backlog=64))
        except BindError as exc:
            raise BindError(f"metrics: {exc}") from None
        return cls(bound.sock, bound.endpoint)

    @property
    def where(self) -> str:
        """Where to scrape, for the ``metrics on`` line: the URL, with the
        real port for port 0; for a Unix socket, its path and curl's way in."""
        e = self.endpoint
        if e.transport == "unix":
            return f"unix:{e.path} (curl --unix-socket {e.path} http://localhost/metrics)"
        host = f"[{e.host}]" if ":" in e.host else e.host or "0.0.0.0"
        return f"http://{host}:{e.port}/metrics"

    def serve(self, registry: Any) -> None:
        """Serve ``registry`` (a CollectorRegistry) from a thread, at once."""
        if self._serving is None:
            self._serving = _HTTPServing(self.sock, registry)

    def close(self) -> None:
        """Stop serving and close the socket (a Unix path is removed)."""
        if self._serving is not None:
            self._serving.stop()
            self._serving = None
        if self.sock.fileno() >= 0:
            self.sock.close()
            if self.endpoint.transport == "unix" and os.getpid() == self._owner:
                with contextlib.suppress(OSError):
                    os.unlink(self.endpoint.path)
        with contextlib.suppress(ValueError):
            _FORKED_CLOSE.remove(self)

    def forget(self) -> None:
        """In a forked child: close this process's copy of the socket only
        (never shutdown(), which would stop the parent's too)."""
        self._serving = None  # its thread was not copied by fork
        if self.sock.fileno() >= 0:
            self.sock.close()


# Endpoints whose socket a forked child closes: a worker must not hold it.
_FORKED_CLOSE: list[MetricsEndpoint] = []


def _after_fork_in_child() -> None:
    for endpoint in _FORKED_CLOSE:
        endpoint.forget()
    _FORKED_CLOSE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- with workers: prometheus_client's multiprocess mode ---------------------------

# How often a worker writes its counts to the shared files: the lag of a
# scrape with workers is at most this.
FLUSH_INTERVAL = 0.5
# prometheus_client's multiprocess files of workers that have exited are
# folded into this one (its counter_*.db name keeps it in every scrape).
_ARCHIVE = "counter_archive.db"
_LOCK = "lock"


def _untyped(name: str) -> Any:
    """A prometheus_client module whose functions carry no annotations."""
    return importlib.import_module(name)


def _counter_file(directory: str, pid: int) -> str:
    return os.path.join(directory, f"counter_{pid}.db")


@contextlib.contextmanager
def _locked(directory: str, how: int) -> Iterator[bool]:
    """flock on the directory's lock file: shared for a scrape, exclusive
    to fold a dead worker's file. Yields False when ``how`` has LOCK_NB
    and the lock is busy."""
    fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, how)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield False
                return
            raise
        yield True
    finally:
        os.close(fd)


class _FilesCollector:
    """prometheus_client's MultiProcessCollector, under the shared lock (a
    dead worker's file is never folded into the archive mid-scrape)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        multiprocess = _untyped("prometheus_client.multiprocess")
        with _locked(self.directory, fcntl.LOCK_SH):
            metrics: list[Metric] = list(
                multiprocess.MultiProcessCollector(None, self.directory).collect()
            )
        # A service no live worker serves (between worker generations, or
        # all of them gone) still has its open gauge, at 0, as in one process.
        services = {
            s.labels["service"] for m in metrics for s in m.samples if "service" in s.labels
        }
        gauge = PREFIX + "connections_open"
        found = next((m for m in metrics if m.name == gauge), None)
        if found is None:
            found = GaugeMetricFamily(gauge, METRICS["connections_open"][2], labels=["service"])
            metrics.append(found)
        for service in sorted(services - {s.labels.get("service") for s in found.samples}):
            found.add_sample(gauge, {"service": service}, 0.0)
        return metrics


def files_registry(directory: str) -> CollectorRegistry:
    """A registry that reads the workers' files in ``directory``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FilesCollector(directory))
    return registry


class _Flusher:
    """In a worker: a thread that writes the deltas of the groups' counts
    into multiprocess Counters (and the open gauge) every interval. It
    reads plain ints from another thread, as a scrape does in one process;
    the event loop is never involved."""

    def __init__(
        self,
        groups: Callable[[], Sequence[Group]],
        directory: str,
        interval: float,
    ) -> None:
        self.groups = groups
        self.directory = directory
        self.interval = interval
        self._metrics: dict[str, Any] = {}
        self._services: set[str] = set()
        self._value_class: Any = None
        self._last: dict[tuple[str, str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="sockworks-metrics-flush", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # never take the worker down for its metrics
                log.exception("metrics: writing the counts failed")

    @contextlib.contextmanager
    def _multiprocess(self) -> Iterator[None]:
        """prometheus_client picks a value class (in-memory or a file of
        this process) whenever a metric or a labelled child is made; ours
        is set only meanwhile, so that a handler's own prometheus_client
        metrics in this worker are left as they are. One MultiProcessValue
        class for the worker's life: each opens the files anew."""
        from prometheus_client import values

        if self._value_class is None:
            self._value_class = _untyped("prometheus_client.values").MultiProcessValue()
        saved_class, saved_dir = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        values.ValueClass = self._value_class
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory  # where its files go
        try:
            yield
        finally:
            values.ValueClass = saved_class
            if saved_dir is None:
                os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            else:
                os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_dir

    def _add_services(self, services: Iterable[str]) -> None:
        """Metrics for services not seen before, every series made at 0 at
        once (so that a rate() has a start)."""
        from prometheus_client import Counter, Gauge

        with self._multiprocess():
            if not self._metrics:
                for name, (kind, labels, doc) in METRICS.items():
                    if kind == "counter":
                        metric: Any = Counter(
                            PREFIX + name, doc, ["service", *labels], registry=None
                        )
                    else:
                        metric = Gauge(
                            PREFIX + name, doc, ["service", *labels], registry=None,
                            multiprocess_mode="livesum",
                        )
                    self._metrics[name] = metric
            for service in services:
                for name, extra, _ in Snapshot().series():
                    self._metrics[name].labels(service, *extra)
                self._services.add(service)

    def flush(self) -> None:
        with self._lock:
            snapshots = service_snapshots(self.groups())
            new = [s for s in snapshots if s not in self._services]
            if new:
                self._add_services(new)
            last = self._last
            for service, snap in snapshots.items():
                for name, extra, value in snap.series():
                    key = (service, name, extra)
                    before = last.get(key, 0)
                    if value == before:
                        continue
                    child = self._metrics[name].labels(service, *extra)
                    if METRICS[name][0] == "gauge":
                        child.set(value)
                    elif value > before:
                        child.inc(value - before)
                    last[key] = value

    def stop(self) -> None:
        """A last flush: what was counted up to now is in the files."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)
        try:
            self.flush()
        except Exception:
            log.exception("metrics: writing the last counts failed")


class WorkerMetrics:
    """Metrics with worker processes: the supervisor's hook (its
    ``WorkerHooks``). The contract:

    In the parent:

    - ``MetricsEndpoint.bind(text)`` together with the listeners, before
      anything serves (a port in use is a :class:`BindError`); then
      ``WorkerMetrics(endpoint)``; ``endpoint.where`` for the ``metrics on``
      line.
    - :meth:`before_fork` before each generation forks (after privileges
      are dropped: the directory is made then, by the user the workers
      run as). The first call makes the directory and starts the metrics
      server: a separate process (``python -c``, given only the metrics
      socket and the directory) that answers scrapes from prometheus_client's
      multiprocess files. The parent itself runs no thread.
    - :meth:`worker_exited` with the pid of every worker that exited (its
      open-connections gauge goes; its counts are kept, folded into one
      archive file, so counters never go back).
    - :meth:`close` once every worker has exited: stops the metrics server,
      closes the socket, removes the directory.

    In each worker, after fork:

    - :meth:`in_worker`: the worker's copy of the metrics socket is closed,
      and a thread starts writing the deltas of the worker's counts
      (``generation.server.groups``) to its own files every
      :data:`FLUSH_INTERVAL` seconds. A scrape therefore lags by at most
      that; it reads files, never the worker, and never blocks its loop.
    - :meth:`worker_exiting` as the worker ends (after its server shut
      down, before ``os._exit``): the last counts are written. Without it,
      up to the last interval's counts of that worker are lost.

    A worker killed outright (SIGKILL) loses what it counted since its last
    flush. Label values are the fixed sets above, whatever the load.
    """

    def __init__(self, endpoint: MetricsEndpoint, *, interval: float = FLUSH_INTERVAL) -> None:
        self.endpoint = endpoint
        self.interval = interval
        self.directory: str | None = None
        self._server: _Child | None = None
        self._flusher: _Flusher | None = None
        self._unfolded: list[int] = []
        self._closed = False

    # -- the parent ------------------------------------------------------------

    def before_fork(self, generation: Any = None) -> None:
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="sockworks-metrics-")
        self._ensure_server()

    def _ensure_server(self) -> None:
        """Start the metrics server, or another if it died. It is known by
        a pidfd: the supervisor reaps every child it has, and a pid alone
        could name another process by the time we look."""
        if self._closed or self.directory is None:
            return
        if self._server is not None:
            if self._server.running():
                return
            log.error("metrics: the metrics server (pid %d) exited; starting another",
                      self._server.pid)
            self._server.close()
        self._server = _Child.spawn(self.endpoint.sock.fileno(), self.directory)

    def worker_exited(self, generation: Any = None, slot: int = 0, pid: int = 0) -> None:
        if self.directory is None or not pid:
            return
        _untyped("prometheus_client.multiprocess").mark_process_dead(pid, self.directory)
        self._unfolded.append(pid)
        self._fold()
        self._ensure_server()

    def generation_ended(self, generation: Any = None) -> None:
        self._fold()

    def child_exited(self, pid: int) -> None:
        """A child of the supervisor exited: if it was the metrics server,
        another starts now (logged), not at the next worker's exit."""
        if self._server is not None and self._server.pid == pid:
            self._ensure_server()

    def _fold(self) -> None:
        """Dead workers' counter files into the archive, under the
        exclusive lock; if a scrape holds it, at the next call."""
        if not self._unfolded or self.directory is None:
            return
        # The file format's own reader and writer (what MultiProcessCollector reads).
        mmaped_dict = _untyped("prometheus_client.mmap_dict").MmapedDict
        directory = self.directory
        with _locked(directory, fcntl.LOCK_EX | fcntl.LOCK_NB) as got:
            if not got:
                return
            archive = mmaped_dict(os.path.join(directory, _ARCHIVE))
            try:
                for pid in self._unfolded:
                    path = _counter_file(directory, pid)
                    if not os.path.exists(path):
                        continue
                    for key, value, _, _ in mmaped_dict.read_all_values_from_file(path):
                        old, _ = archive.read_value(key)
                        archive.write_value(key, old + value, 0.0)
                    os.remove(path)
            finally:
                archive.close()
            self._unfolded.clear()

    def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.endpoint.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    # -- a worker ----------------------------------------------------------

    def in_worker(self, generation: Any, slot: int = 0) -> None:
        self.endpoint.forget()
        if self._server is not None:  # the parent's child, not ours
            self._server.forget()
            self._server = None
        assert self.directory is not None, "before_fork() first, in the parent"
        server = generation.server
        self._flusher = _Flusher(lambda: server.groups, self.directory, self.interval)

    def worker_exiting(self, generation: Any = None, slot: int = 0) -> None:
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None


_PR_SET_PDEATHSIG = 1
# How long the metrics server gets to stop on SIGTERM before SIGKILL.
_STOP_WAIT = 2.0


class _Child:
    """The metrics server process, by its pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    @classmethod
    def spawn(cls, fd: int, directory: str) -> _Child:
        code = "from sockworks._metrics import _files_server_main; _files_server_main()"
        # subprocess forks and execs in C: safe in any process, and only the
        # metrics socket (pass_fds) and stdio reach the new program.
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(fd), directory, str(os.getpid())],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
        # Our child, not reaped before we reap it: the pid is its own here.
        return cls(proc.pid, os.pidfd_open(proc.pid))

    def running(self) -> bool:
        if self.pidfd < 0:
            return False
        with selectors.DefaultSelector() as selector:
            selector.register(self.pidfd, selectors.EVENT_READ)
            return not selector.select(0)  # readable: it exited

    def stop(self) -> None:
        """SIGTERM, a moment, then SIGKILL; reaped unless the supervisor was first."""
        if self.pidfd < 0:
            return
        for sig, wait in ((signal.SIGTERM, _STOP_WAIT), (signal.SIGKILL, _STOP_WAIT)):
            if not self.running():
                break
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)
            with selectors.DefaultSelector() as selector:
                selector.register(self.pidfd, selectors.EVENT_READ)
                selector.select(wait)
        self.close()

    def close(self) -> None:
        if self.pidfd < 0:
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        os.close(self.pidfd)
        self.pidfd = -1

    def forget(self) -> None:
        """In a forked worker: its copy of the pidfd only."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _files_server_main() -> None:
    """The metrics server of a supervisor (see :class:`WorkerMetrics`):
    ``FD DIRECTORY PARENT_PID``. Serves until SIGTERM, or until its
    parent dies (Linux's parent-death signal)."""
    fd, directory, parent = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to act on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGTERM is taken by sigwait below, in this thread only: blocked
    # before any thread starts (they inherit the mask).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        return  # the parent died before the parent-death signal was set
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    serving = _HTTPServing(sock, files_registry(directory))
    signal.sigwait({signal.SIGTERM})
    serving.stop()
    sock.close()
