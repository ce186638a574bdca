"""The one stream connection core: an ``asyncio.Protocol`` that owns what
every handler style needs.

:class:`StreamCore` keeps the connection's state machine (``_core.State``),
its byte counts and log lines (through the group), flow control in both
directions, half-close, close and abort, shutdown, the idle rule's
bookkeeping, and what a handler's exception costs. The sans-I/O driver
(:class:`~sockworks._drivers.protocol.ProtocolConnection`) and the async
:class:`~sockworks._drivers.async_handler.Stream` are thin layers on it:
they say what starting, data, EOF, idleness and shutdown mean for their
style through the ``on_*`` hooks, and act through :meth:`send`,
:meth:`half_close`, :meth:`close` and :meth:`abort_with`.

Connections are attached to transports by the listener (``loop.create_server``
on the listening socket: the accept path runs in the loop's C code, with no
task and no coroutine per connection), or by
:func:`sockworks.testing.memory_connection` in tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import struct
import termios
import time
from typing import TYPE_CHECKING, cast

from .._core import (
    CAN_RECEIVE,
    CLOSE_TIMEOUT,
    FIRST_DATA_WAIT,
    LINGER_QUIET,
    LINGER_TIME,
    SHUTDOWN_POLL,
    ConnectionStats,
    Event,
    State,
    check_can_send,
    closed_error,
    describe,
    next_state,
)
from .._protocol import Peer
from .._sockets import apply_options
from .._tls import peer_subject

if TYPE_CHECKING:
    from .._core import ConnectionGroup

log = logging.getLogger("sockworks.driver")

_OPEN = State.OPEN
_CLOSED = State.CLOSED
_CLOSING = State.CLOSING


class StreamCore(asyncio.Protocol):
    """One stream connection of any asyncio-based style (see module docs)."""

    __slots__ = (
        "_close_timer",
        "_drain_waiters",
        "_held",
        "_linger_seen",
        "_linger_started",
        "_lingering",
        "_preset",
        "_shutdown_at",
        "_shutdown_by",
        "_wait_epoch",
        "_waits",
        "_wrote_eof",
        "group",
        "idle_seen",
        "idle_since",
        "input_left",
        "peer_eof",
        "read_paused",
        "started",
        "state",
        "stats",
        "transport",
        "write_paused",
    )

    # Whether the handler is waiting on its peer whenever it is not told
    # otherwise (sans-I/O: yes; async: only inside a read or a drain).
    ALWAYS_WAITING = True

    def __init__(self, group: ConnectionGroup) -> None:
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.state = _OPEN
        self.stats: ConnectionStats = _NO_STATS
        self.write_paused = False
        self.read_paused = False
        # Reading held off by the layer (a file or offloaded work in
        # progress): flow control must not resume it.
        self._held = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._waits = 0
        self._wait_epoch = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self.peer_eof = False  # the peer sent EOF (it will send no more)
        # The layer closes with the peer's input not all read (a line too
        # long, a request cut short): the peer is likely still sending.
        self.input_left = False
        self._wrote_eof = False  # our FIN is queued
        self._lingering = False
        self._linger_seen = 0
        self._linger_started = 0.0
        self._shutdown_at: int | None = None
        self._shutdown_by = 0.0
        self._preset: Peer | None = None
        self.started = False
        self.idle_seen: object = None
        self.idle_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: no isinstance check.
        self.transport = t = cast(asyncio.Transport, transport)
        group = self.group
        preset = self._preset
        if preset is not None:
            # Admitted already by a listener with layers (PROXY, TLS): the
            # client's real address, and who its certificate says it is.
            peer = preset
            if t.get_extra_info("sslcontext") is not None:
                subject = peer_subject(t.get_extra_info("peercert"))
                if subject is not None:
                    peer = dataclasses.replace(peer, tls_subject=subject)
        else:
            peer = Peer.from_address(t.get_extra_info("peername"))
        self.stats = ConnectionStats(peer)
        if group.options_on_accept:
            sock = t.get_extra_info("socket")
            if sock is not None:
                try:
                    apply_options(sock, group.options, stream=True, inet=bool(peer.host))
                except OSError as exc:  # the peer already reset
                    log.debug("cannot set options on accepted socket: %s", exc)
        if preset is None and not group.admit(peer):
            self.state = _CLOSED
            t.close()
            return
        t.set_write_buffer_limits(high=group.limits.max_output_buffer)
        if group.full and not group.shutting_down:
            # Accepted in the same batch as the connection that filled the
            # service (the loop accepts a burst at once): held, unread, and
            # started in turn when a slot frees, as the backlog would.
            self._pause_reading()
            group.hold(self)
            return
        self.start()

    def preset(self, peer: Peer) -> None:
        """Set by a listener with layers before the protocol: ``peer`` is
        the client (from its PROXY header) and has been admitted."""
        self._preset = peer

    def start(self) -> None:
        """Begin serving: counted, logged, then the style's own start."""
        self.started = True
        self.group.opened(self)
        self._resume_reading()
        if self.transport is not None and self.state is _OPEN:
            if self.group.shutting_down:
                self.on_start_during_shutdown()
            else:
                self.on_start()

    def eof_received(self) -> bool:
        self._on_eof()
        # True keeps our write side open: a half-closed peer may still read.
        # A TLS transport cannot half-close (it shuts TLS down whatever we
        # say, and warns at a True).
        return self._preset is None or self.transport is None or (
            self.transport.get_extra_info("sslcontext") is None
        )

    def _on_eof(self) -> None:
        self.peer_eof = True
        state = self.state
        if state is _CLOSED:
            return
        if state is _CLOSING:
            if self._lingering:
                # The peer has taken our FIN and closed too: nothing unread
                # can make the kernel reset the connection now.
                self._end_linger()
            return
        if state is State.LOCAL_DONE:
            # We had half-closed already: nothing is left to do either way,
            # but the layer still hears of the EOF (a protocol's on_eof, a
            # reader's b""), as a handler of any other style does; it may
            # not send. It may close or abort meanwhile.
            self.on_peer_eof()
            if self.state is not State.LOCAL_DONE:
                return
        self.state = next_state(state, Event.PEER_EOF)
        if self.state is _CLOSING:
            self._close_transport()
            return
        self.on_peer_eof()

    def pause_writing(self) -> None:
        self.write_paused = True
        # A peer that does not read stops being read from: memory stays
        # bounded by the write buffer limit plus one chunk.
        if self.transport is not None and self.state is not _CLOSED:
            self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters = self._drain_waiters
        if waiters:
            # Every waiting writer wakes, not only the last to ask.
            self._drain_waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if not self._held:
            self._resume_reading()
        if self.state is not _CLOSED and self.state is not _CLOSING:
            self.on_drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if exc is not None:
            self.stats.set_reason(self.gone_reason(exc))
            log.debug("%s: %r", self.stats.peer, exc)
        if self._drain_waiters:
            self.fail_writers(closed_error(self.stats))
        self.on_lost(exc)
        if self.started:
            self.finished()
        else:
            self.group.unhold(self)

    def finished(self) -> None:
        """The connection is over for the core: release it and log it.
        (The async layer waits for its handler too.)"""
        self.group.closed(self)

    # -- actions, for the layers ---------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the peer (the state must allow sending)."""
        if self.state is not _OPEN:
            check_can_send(self.state)
        self.stats.bytes_out += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def half_close(self) -> None:
        """``shutdown(SHUT_WR)`` once what is queued is sent: the peer sees EOF."""
        self.state = next_state(self.state, Event.HALF_CLOSE)
        t = self.transport
        if self.state is _CLOSING or t is None or not t.can_write_eof():
            self._close_transport()
        else:
            self._wrote_eof = True
            t.write_eof()

    def close_soon(self, reason: str | None = None) -> None:
        """Close once what is queued is flushed; ``reason`` goes in the log."""
        self.stats.set_reason(reason)
        if self.state is _CLOSED or self.state is _CLOSING:
            return
        self.state = next_state(self.state, Event.CLOSE)
        self._close_transport()

    def abort_with(self, reason: str) -> None:
        """Drop the connection now, queued output and all."""
        self.stats.set_reason(reason)
        if self.state is not _CLOSED:
            self.state = _CLOSING
            if self.transport is not None:
                self.transport.abort()

    async def drained(self) -> None:
        """Wait until the peer has taken enough of what was sent
        (immediately when it has); raises when the connection is lost."""
        if not self.write_paused:
            return
        if self.state is _CLOSED:
            raise closed_error(self.stats)
        waiter: asyncio.Future[None] = self.group.loop.create_future()
        if self._drain_waiters is None:
            self._drain_waiters = [waiter]
        else:
            self._drain_waiters.append(waiter)
        self.begin_wait()
        try:
            await waiter
        finally:
            self.end_wait()

    def fail_writers(self, error: BaseException) -> None:
        """Every writer waiting for the peer to drain gets ``error``."""
        waiters = self._drain_waiters
        self._drain_waiters = None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: its writer may be gone

    def hold_reading(self, hold: bool) -> None:
        """Stop reading while the layer works (a file, offloaded work)."""
        self._held = hold
        if hold:
            self._pause_reading()
        elif not self.write_paused:
            self._resume_reading()

    def begin_wait(self) -> None:
        self._waits += 1
        self._wait_epoch += 1

    def end_wait(self) -> None:
        self._waits -= 1
        self._wait_epoch += 1

    # -- the core's Connection interface -------------------------------------

    def activity(self) -> object:
        t = self.transport
        if t is None:
            return None
        if self.state is _CLOSING:
            size = t.get_write_buffer_size()
            if self._lingering and not size:
                return None  # all sent; the linger timer decides the rest
            # Flushing before close: waiting on the peer to take our output.
            return (self.stats.bytes_out, size)
        if not self.ALWAYS_WAITING and self._waits == 0:
            return None  # the handler is busy, not waiting on the peer
        stats = self.stats
        return (stats.bytes_in, stats.bytes_out, t.get_write_buffer_size(), self._wait_epoch)

    def idle_expired(self) -> None:
        if self.state is _CLOSING:
            self.abort_with("peer stopped reading")
            return
        if self.state is _CLOSED:
            return
        self.on_idle()

    def begin_shutdown(self, *, awaiting_first: bool = False) -> None:
        if self.state is _CLOSED or self.state is _CLOSING:
            return
        # Work in flight finishes: what the peer sent before the signal (in
        # the kernel's receive queue now) is still read and handled, then
        # the style's shutdown applies. What comes after is not waited for,
        # except by a connection that has sent nothing yet and was accepted
        # from the backlog as the server stopped (``awaiting_first``), or a
        # moment before: its request is on its way (a balancer forwards it
        # right after connecting), so it gets FIRST_DATA_WAIT for its first
        # bytes. An older silent connection is idle: it ends at once.
        pending = self._unread_in_kernel() if self.state in CAN_RECEIVE else 0
        stats = self.stats
        if not awaiting_first and not stats.bytes_in:
            # Accepted a moment before the signal: its request may still be
            # on its way (behind a PROXY header), as for one from the backlog.
            awaiting_first = time.monotonic() - stats.started < FIRST_DATA_WAIT
        if pending or (awaiting_first and not stats.bytes_in and not self.peer_eof):
            self._shutdown_at = self.stats.bytes_in + max(pending, 1)
            # Only a connection with nothing sent yet waits for its first bytes.
            self._shutdown_by = 0.0 if pending else self.group.loop.time() + FIRST_DATA_WAIT
            self._resume_reading()
            self.group.loop.call_later(SHUTDOWN_POLL, self._shutdown_when_read)
            return
        self.on_shutdown()

    def _shutdown_when_read(self) -> None:
        target = self._shutdown_at
        if target is None or self.state is _CLOSED or self.state is _CLOSING:
            return
        waited_enough = 0.0 < self._shutdown_by <= self.group.loop.time()
        if self.stats.bytes_in >= target or self.state not in CAN_RECEIVE or self.peer_eof or (
            waited_enough
        ):
            self._shutdown_at = None
            self.on_shutdown()
        else:
            self.group.loop.call_later(SHUTDOWN_POLL, self._shutdown_when_read)

    def _unread_in_kernel(self) -> int:
        """Bytes received by the kernel that we have not read (FIONREAD)."""
        t = self.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if sock is None:
            return 0
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int(struct.unpack("i", raw)[0])

    def abort(self) -> None:
        self.abort_with("aborted at the end of the grace period")

    # -- hooks for the layers ------------------------------------------------

    def on_start(self) -> None:
        """The connection is admitted and counted."""

    def on_start_during_shutdown(self) -> None:
        """Started while the server is stopping (it was waiting in the
        backlog): served like any other, then told of the shutdown at once,
        so what it had already sent is answered first."""
        self.on_start()
        if self.state is _OPEN:
            self.begin_shutdown(awaiting_first=True)

    def on_peer_eof(self) -> None:
        """The peer will send no more; we may still send."""

    def on_drained(self) -> None:
        """Output that was over the limit has drained below it."""

    def on_idle(self) -> None:
        """The idle rule fired; default: close."""
        self.close_soon("idle timeout")

    def on_shutdown(self) -> None:
        """The server is stopping; default: close once output is flushed."""
        self.close_soon("server shutting down")

    def on_lost(self, exc: Exception | None) -> None:
        """The transport is gone."""

    def gone_reason(self, exc: Exception) -> str:
        return describe(exc)

    # -- internals -------------------------------------------------------------

    def _close_transport(self) -> None:
        t = self.transport
        if t is None:
            return
        if self.peer_eof or not t.can_write_eof() or not self._peer_may_send(t):
            self._final_close()
            return
        # A lingering close (nginx's): send what is queued and our FIN, then
        # read and discard until the peer closes too, or goes quiet. Closing
        # a socket with unread input, or input arriving after the close,
        # makes the kernel reset the connection and destroy output still on
        # its way to the peer: no close may do that.
        if not self._wrote_eof:
            self._wrote_eof = True
            t.write_eof()
        self._lingering = True
        self._held = False
        self._resume_reading()
        if self.read_paused:  # a closing state refuses the usual resume
            self.read_paused = False
            try:
                t.resume_reading()
            except (RuntimeError, AttributeError):
                pass
        self._linger_seen = self.stats.bytes_in
        self._linger_started = self.group.loop.time()
        self._close_timer = self.group.loop.call_later(LINGER_QUIET, self._linger_tick)

    def _peer_may_send(self, t: asyncio.Transport) -> bool:
        """Whether input may reach a closed socket and reset it: input is
        waiting now or was left unread, or our output is still going out
        (anything arriving meanwhile would destroy it). A quiet peer whose
        answer is sent is closed at once, as before."""
        return (
            self.input_left
            or t.get_write_buffer_size() > 0
            or self._unread_in_kernel() > 0
        )

    def _linger_tick(self) -> None:
        self._close_timer = None
        t = self.transport
        if t is None or self.state is _CLOSED:
            return
        quiet = self.stats.bytes_in == self._linger_seen
        flushed = t.get_write_buffer_size() == 0
        over = self.group.loop.time() - self._linger_started >= LINGER_TIME
        if (quiet and flushed) or over:
            self._end_linger()
            return
        self._linger_seen = self.stats.bytes_in
        self._close_timer = self.group.loop.call_later(LINGER_QUIET, self._linger_tick)

    def _end_linger(self) -> None:
        self._lingering = False
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._final_close()

    def _final_close(self) -> None:
        t = self.transport
        assert t is not None
        t.close()  # flushes what is queued, then closes
        if self.group.limits.idle_timeout is None and self._close_timer is None:
            # No idle rule to catch a peer that never takes the rest.
            self._close_timer = self.group.loop.call_later(
                CLOSE_TIMEOUT, self.abort_with, "peer stopped reading"
            )

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):  # closing transports refuse
                pass

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and self.state in CAN_RECEIVE:
            self.read_paused = False
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def crashed(self, where: str) -> None:
        """A bug in the handler: logged once with its traceback; the
        connection is closed, what was already queued still delivered."""
        group = self.group
        group.count_handler_error()
        group.log.exception(
            "%s: handler error in %s; closing", self.stats.peer, where,
            extra={"event": "error", "peer": self.stats.peer},
        )
        self.close_soon("internal error")


class _NoStats(ConnectionStats):
    """Stands in before ``connection_made``: never logged."""


_NO_STATS = _NoStats(Peer())
