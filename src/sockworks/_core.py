"""The connection engine's interfaces and the rules every handler style shares.

This module is what the server (``_server.py``) and every driver
(``_drivers/``) import; it imports neither, so there is no cycle. It holds:

* :class:`State` and its transition table: the life of a stream connection
  as an explicit state machine (h11's ``_state.py`` is the model);
* :class:`ConnectionStats`: peer, local address, byte counts, close reason;
* :class:`Connection` and :class:`Driver`: what the core needs from a live
  connection and from a handler style;
* :class:`ConnectionGroup`: one service's live connections, its limits, its
  log lines, and the idle rule, written once for every style.

The idle rule: a connection is idle when it has been *waiting on its peer*
(for input, or for room to send) for the idle timeout and no byte moved in
either direction meanwhile. A handler busy with its own work is not waiting
on the peer. One timer per service looks at every connection every
timeout / 20, so a silent peer is cut off never early and at most 5 % late,
and the data path reads no clock.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from ._access import AccessControl, LogThrottle
from ._config import Limits, SocketOptions
from ._endpoint import Endpoint
from ._errors import ConnectionClosed, IdleTimeout, LocalProtocolError
from ._logformat import service_logger
from ._metrics import ServiceCounts, close_reason, drop_reason, refuse_reason
from ._protocol import Peer
from ._sockets import BoundSocket

# Errors that mean "the peer went away": one debug line, never a traceback.
PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)

T = TypeVar("T")

# How long a closing connection may take to flush when no idle timeout is set.
CLOSE_TIMEOUT = 60.0
# Threads for offloaded work that waits (Reply(offload_waits=True)).
WAIT_THREADS = 32
# A lingering close (nginx's lingering_timeout and lingering_time): after
# our FIN, input is read and discarded until the peer closes, has been quiet
# this long, or this much time in all has passed.
LINGER_QUIET = 2.0
LINGER_TIME = 10.0
# While a stopping server reads what peers sent before the signal: how
# often it looks whether that is done.
SHUTDOWN_POLL = 0.02
# A connection accepted from the backlog as the server stops, with nothing
# sent yet, waits this long for its first bytes: a balancer forwards the
# client's request right after connecting (its PROXY header may come first).
FIRST_DATA_WAIT = 1.0


def describe(exc: BaseException) -> str:
    """A short reason for the close log line."""
    if isinstance(exc, IdleTimeout):
        return "idle timeout"
    if isinstance(exc, ConnectionResetError):
        return "reset by peer"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# -- the state machine ---------------------------------------------------------


class State(enum.Enum):
    """Where a stream connection is in its life."""

    OPEN = "open"  # bytes may move both ways
    PEER_DONE = "peer done"  # the peer sent EOF; we may still send
    LOCAL_DONE = "local done"  # we half-closed; the peer may still send
    CLOSING = "closing"  # close asked for: flushing output, input discarded
    CLOSED = "closed"  # the transport is gone (closed, aborted or lost)


class Event(enum.Enum):
    PEER_EOF = "peer EOF"
    HALF_CLOSE = "half-close"
    CLOSE = "close"
    LOST = "lost"


_S, _E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    (_S.OPEN, _E.PEER_EOF): _S.PEER_DONE,
    (_S.OPEN, _E.HALF_CLOSE): _S.LOCAL_DONE,
    (_S.OPEN, _E.CLOSE): _S.CLOSING,
    (_S.PEER_DONE, _E.HALF_CLOSE): _S.CLOSING,  # nothing left either way
    (_S.PEER_DONE, _E.CLOSE): _S.CLOSING,
    (_S.LOCAL_DONE, _E.PEER_EOF): _S.CLOSING,
    (_S.LOCAL_DONE, _E.CLOSE): _S.CLOSING,
    # A peer's EOF or our own close once closing changes nothing.
    (_S.CLOSING, _E.PEER_EOF): _S.CLOSING,
    (_S.CLOSING, _E.CLOSE): _S.CLOSING,
    (_S.CLOSED, _E.PEER_EOF): _S.CLOSED,
    (_S.CLOSED, _E.CLOSE): _S.CLOSED,
}
for _state in State:
    TRANSITIONS[_state, _E.LOST] = _S.CLOSED

# States in which our side may still send, and the peer's bytes are wanted.
CAN_SEND = frozenset({State.OPEN, State.PEER_DONE})
CAN_RECEIVE = frozenset({State.OPEN, State.LOCAL_DONE})


def next_state(state: State, event: Event) -> State:
    """The state after ``event``; a local action the state forbids (sending
    a half-close twice, half-closing a closed connection) is a
    :class:`LocalProtocolError`."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise LocalProtocolError(
            f"cannot {event.value} a connection that is {state.value}"
        ) from None


def check_can_send(state: State, what: str = "send") -> None:
    if state not in CAN_SEND:
        raise LocalProtocolError(f"cannot {what}: the connection is {state.value}")


def check_output_type(data: object, where: str) -> None:
    """Output must be bytes-like: a str is the classic mistake."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(
            f"{where}: expected bytes, got {type(data).__name__}"
            + (" (encode it first)" if isinstance(data, str) else "")
        )


# -- what every connection has -------------------------------------------------


class ConnectionStats:
    """Peer, local address, start time, byte counters and the close reason."""

    __slots__ = ("bytes_in", "bytes_out", "local", "note", "peer", "reason", "started")

    def __init__(self, peer: Peer, local: Peer | None = None) -> None:
        self.peer = peer
        self.local = local
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason: str | None = None
        # What the peer asked for (a Gopher selector): on the closing line.
        self.note: str | None = None

    def set_reason(self, reason: str | None) -> None:
        """Keep the first reason given: it is the cause, later ones follow it."""
        if reason and self.reason is None:
            self.reason = reason


class Connection(Protocol):
    """What the core needs from a live connection of any style."""

    stats: ConnectionStats
    # The idle rule's bookkeeping, kept on the connection (no dict per
    # connection in the group): what ``activity()`` said at the last look,
    # and when that changed.
    idle_seen: object
    idle_since: float

    def activity(self) -> object:
        """Anything that changes whenever a byte moves or a wait on the peer
        begins or ends; ``None`` while the handler is not waiting on the peer
        (busy with its own work), which is never idle."""
        ...

    def idle_expired(self) -> None:
        """The idle rule says this connection is idle: end it."""
        ...

    def begin_shutdown(self) -> None:
        """The server is stopping: finish what is in flight, then close."""
        ...

    def abort(self) -> None:
        """The grace period is over: drop the connection now."""
        ...


class RequestWatched(Protocol):
    """A connection whose handler waits for requests (the request deadline)."""

    # When the sweep first saw it waiting for a request; None: not waiting.
    request_since: float | None

    def request_pending(self) -> bool: ...

    def request_expired(self) -> None: ...


class Stoppable(Protocol):
    """A datagram endpoint: told when the server stops, aborted at the end."""

    def begin_shutdown(self) -> None: ...

    def abort(self) -> None: ...


class Startable(Protocol):
    """A connection accepted while the service was full, started later."""

    def start(self) -> None: ...


class Pausable(Protocol):
    """A listener the group stops and restarts around ``max_connections``."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Driver:
    """Runs one handler style on the event loop (see ``_drivers``): the
    interface every driver declares by subclassing.

    A driver whose connections are asyncio protocols returns a factory from
    :meth:`connection_factory`, and the listener attaches each one to a
    transport (the fast accept path: the loop's own C code accepts, with no
    task and no coroutine per connection); a driver that needs the socket
    itself (the blocking style) returns ``None`` there and gets each
    accepted socket through :meth:`start_socket`.
    """

    name = "driver"
    # Whether start_socket can take a TLS socket (ssl.SSLSocket): a driver
    # that hands the descriptor to another program cannot.
    tls_sockets = True

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint.is_stream

    def max_connections(self, limits: Limits) -> int:
        return limits.max_connections

    def connection_factory(self, group: ConnectionGroup) -> Callable[[], asyncio.Protocol] | None:
        return None

    def start_socket(
        self,
        sock: socket.socket,
        peer: Peer,
        group: ConnectionGroup,
        *,
        original: socket.socket | None = None,
    ) -> None:
        """Serve ``sock``. ``original``: the client's own socket, when
        ``sock`` is one end of a relay (TLS for a driver without
        ``tls_sockets``): its addresses describe the connection."""
        raise NotImplementedError(f"the {self.name} driver takes transports, not sockets")

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> Stoppable:
        raise NotImplementedError(f"the {self.name} driver serves stream endpoints only")

    def close(self) -> None:
        """The server is done with this driver."""


# -- one service's connections -------------------------------------------------


class ConnectionGroup:
    """The live connections of one service, its limits, and its logger.

    Connections call :meth:`opened` when they start and :meth:`closed` when
    they end; the group logs both, pauses and resumes accepting around
    ``max_connections``, releases access-control counts, and runs the idle
    rule for all of them.
    """

    def __init__(
        self,
        name: str,
        driver: Driver,
        loop: asyncio.AbstractEventLoop,
        *,
        limits: Limits | None = None,
        options: SocketOptions | None = None,
        access: AccessControl | None = None,
    ) -> None:
        self.name = name
        self.driver = driver
        self.loop = loop
        self.limits = limits or Limits()
        self.options = options or SocketOptions()
        self.access = access
        self.log = service_logger(name)
        # What metrics report (see _metrics.py): plain counters, bumped here.
        self.counts = ServiceCounts()
        self.live: set[Connection] = set()
        self.max_connections = driver.max_connections(self.limits)
        self.shutting_down = False
        # Accepted, not started yet: reading a PROXY header or in a TLS
        # handshake. They count against max_connections like live ones.
        self.starting = 0
        self.listeners: list[Pausable] = []
        # Options the accepted socket does not inherit from the listener, or
        # that the loop resets (uvloop turns TCP_NODELAY on): set per accept.
        o = self.options
        self.options_on_accept = not o.nodelay or bool(
            o.keepalive or o.linger is not None or o.rcvbuf or o.sndbuf
        )
        self._held: deque[Startable] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._wait_executor: ThreadPoolExecutor | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Refusals and drops: a line per source and reason a second, 20 a
        # second in all, and a summary of the rest (a flood cannot fill the disk).
        self._refusals = LogThrottle(loop.time, later=loop.call_later, emit=self.log.info)
        self._sweeper: asyncio.TimerHandle | None = None
        self._watched: set[RequestWatched] = set()
        # The sweep runs every twentieth of the shorter timeout: each is
        # enforced never early and at most 5 % (one step) late.
        timeouts = [t for t in (self.limits.idle_timeout, self.limits.request_timeout) if t]
        self._idle_step = min(timeouts) / 20 if timeouts else 0.0

    # -- admission and logging --------------------------------------------

    def admit(self, peer: Peer) -> bool:
        """Ask the access policy; a refused peer is logged. True: go on."""
        access = self.access
        if access is None:
            return True
        refused = access.admit_connection(peer.host)
        if refused is None:
            return True
        self.refused(peer, refused)
        return False

    def refused(self, peer: Peer, reason: str, *, datagram: bool = False) -> None:
        """Count and log a refused connection or a dropped datagram: at most
        one line a second per source and reason, a few a second in all, and
        what was not logged summed up within a second ("(and N more like it)")."""
        if datagram:
            self.counts.dropped[drop_reason(reason)] += 1
        else:
            self.counts.refused[refuse_reason(reason)] += 1
        event = "datagram dropped" if datagram else "refused"
        # A Unix peer has no host: its path (or "unix-peer") is its source.
        suppressed = self._refusals.check((peer.host or str(peer), event, reason))
        if suppressed is not None:
            more = f" (and {suppressed} more like it)" if suppressed else ""
            self.log.info(
                "%s %s: %s%s", peer, event, reason, more,
                extra={"event": "dropped" if datagram else "refused", "peer": peer,
                       "reason": reason},
            )

    def count_refused(self, bucket: str) -> None:
        """A connection that failed before it started (a bad PROXY header, a
        TLS handshake), logged by the listener: ``bucket`` of REFUSE_REASONS."""
        self.counts.refused[bucket] += 1

    def count_dropped(self, bucket: str) -> None:
        """A datagram dropped without a refusal line: ``bucket`` of DROP_REASONS."""
        self.counts.dropped[bucket] += 1

    def count_handler_error(self) -> None:
        self.counts.handler_errors += 1

    def opened(self, conn: Connection) -> None:
        """``conn`` was admitted and starts now."""
        self.live.add(conn)
        self._idle.clear()
        self.counts.opened += 1
        log = self.log
        if log.isEnabledFor(logging.INFO):
            peer = conn.stats.peer
            log.info("%s connected", peer, extra={"event": "connected", "peer": peer})
        if len(self.live) >= self.max_connections:
            for listener in self.listeners:
                listener.pause()
        conn.idle_seen = None
        conn.idle_since = self.loop.time()
        if self._sweeper is None and self._idle_step:
            self._sweeper = self.loop.call_later(self._idle_step, self._sweep)

    def closed(self, conn: Connection) -> None:
        """``conn`` ended: release it and write its closing log line."""
        if conn not in self.live:
            return
        self.live.discard(conn)
        stats = conn.stats
        # Counted before the closing line: who reads that line finds it counted.
        counts = self.counts
        reason = stats.reason
        counts.closed["normal" if reason is None else close_reason(reason)] += 1
        counts.bytes_in += stats.bytes_in
        counts.bytes_out += stats.bytes_out
        if self.access is not None:
            self.access.release_connection(stats.peer.host)
        log = self.log
        if log.isEnabledFor(logging.INFO):
            why = f" ({reason})" if reason else ""
            if stats.note is not None:
                why += f", asked {stats.note}"
            duration = time.monotonic() - stats.started
            log.info(
                "%s closed after %.3f s, %d B in, %d B out%s",
                stats.peer,
                duration,
                stats.bytes_in,
                stats.bytes_out,
                why,
                extra={
                    "event": "closed", "peer": stats.peer, "duration": round(duration, 3),
                    "bytes_in": stats.bytes_in, "bytes_out": stats.bytes_out,
                    "reason": reason, "request": stats.note,
                },
            )
        held = self._held
        while held and len(self.live) < self.max_connections:
            held.popleft().start()
        if not self.live:
            self._idle.set()
        if len(self.live) < self.max_connections and not self.shutting_down and not held:
            for listener in self.listeners:
                listener.resume()

    def abort_all(self) -> None:
        """Every live connection ends now, unsent output dropped (a second
        signal, or the grace period over)."""
        for conn in list(self.live):
            conn.abort()

    def hold(self, conn: Startable) -> None:
        """Keep ``conn`` (accepted over the limit) until a slot frees."""
        self._held.append(conn)
        self._idle.clear()
        for listener in self.listeners:
            listener.pause()

    def unhold(self, conn: Startable) -> None:
        """A held connection went away before it started."""
        try:
            self._held.remove(conn)
        except ValueError:
            return
        if not self.live and not self._held:
            self._idle.set()

    def start_held_for_shutdown(self) -> None:
        """Shutting down: held connections start, to be told at once."""
        while self._held:
            self._held.popleft().start()

    def offload(self, work: Callable[[], T], *, waits: bool = False) -> asyncio.Future[T]:
        """Run ``work`` on the service's worker threads (created on first
        use): searches and listings too slow for the event loop. ``waits``:
        work that mostly waits (a child process) rather than computes, on
        threads of its own, so it never queues behind the CPU work."""
        if waits:
            if self._wait_executor is None:
                # Waiting threads hold no GIL; bounded all the same.
                self._wait_executor = ThreadPoolExecutor(
                    WAIT_THREADS, thread_name_prefix=f"sockworks-{self.name}-wait"
                )
            return self.loop.run_in_executor(self._wait_executor, work)
        if self._executor is None:
            # One thread: the work is CPU bound Python, so a second thread
            # would only fight the event loop for the GIL (measured: a small
            # file took up to 166 ms to serve beside four busy workers, at
            # most 10 ms beside one). Each job is bounded by its request's
            # budget; jobs queue behind each other, never in front of I/O.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sockworks-{self.name}")
        return self.loop.run_in_executor(self._executor, work)

    @property
    def full(self) -> bool:
        return len(self.live) + self.starting >= self.max_connections

    def starting_ended(self) -> None:
        """A connection that was starting failed to (a bad header, a failed
        handshake): its slot is free again."""
        if not self.full and not self.shutting_down and not self._held:
            for listener in self.listeners:
                listener.resume()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- the idle rule, once for every style -------------------------------

    def watch_requests(self, conn: RequestWatched) -> None:
        """Apply the request deadline to ``conn`` while it is live."""
        if self.limits.request_timeout is not None:
            conn.request_since = None
            self._watched.add(conn)

    def unwatch_requests(self, conn: RequestWatched) -> None:
        self._watched.discard(conn)

    def _sweep(self) -> None:
        now = self.loop.time()
        request_timeout = self.limits.request_timeout
        if request_timeout is not None and self._watched:
            late: list[RequestWatched] = []
            for watched in self._watched:
                if not watched.request_pending():
                    watched.request_since = None
                elif watched.request_since is None:
                    # First seen waiting (at most one step after it began):
                    # counting from here is never early.
                    watched.request_since = now
                elif now - watched.request_since >= request_timeout:
                    watched.request_since = None
                    late.append(watched)
            for watched in late:
                watched.request_expired()
        timeout = self.limits.idle_timeout
        if timeout is not None:
            expired: list[Connection] = []
            for conn in self.live:
                seen = conn.activity()
                if seen is None or seen != conn.idle_seen:
                    # Something moved, or a wait began or ended, since the
                    # last look (at most one step ago): count from now.
                    # Never early, at most one step (timeout / 20) late.
                    conn.idle_seen = seen
                    conn.idle_since = now
                elif now - conn.idle_since >= timeout:
                    conn.idle_since = now  # once per timeout, if it goes on
                    expired.append(conn)
            for conn in expired:
                conn.idle_expired()
        self._sweeper = (
            self.loop.call_later(self._idle_step, self._sweep) if self.live else None
        )

    def stop(self) -> None:
        """The server is done with this group."""
        self._refusals.flush(everything=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for executor in (self._executor, self._wait_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._wait_executor = None


def closed_error(stats: ConnectionStats) -> ConnectionClosed:
    """The error a handler's I/O raises on a connection that is gone."""
    if stats.reason == "idle timeout":
        return IdleTimeout("idle timeout")
    return ConnectionClosed(stats.reason or "connection closed")
