"""Runs ``async def handle(stream)`` handlers, one task per connection.

:class:`Stream` is built directly on an ``asyncio.Protocol`` (no
StreamReader/StreamWriter pair underneath): one buffer, one waiter, and
flow control in both directions.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from .._config import Limits
from .._endpoint import Endpoint
from .._errors import ConnectionClosed, LineTooLong, RemoteProtocolError
from .._protocol import Peer
from .._sockets import BoundSocket
from ._common import PEER_GONE, ConnectionStats, describe, report_failed_start

if TYPE_CHECKING:
    from .._server import Connection, ConnectionGroup

AsyncHandler = Callable[["Stream"], Awaitable[object]]


class IncompleteRead(ConnectionClosed):
    """EOF arrived before ``read_exactly`` had its bytes; ``partial`` has them."""

    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"connection closed after {len(partial)} of {expected} bytes")
        self.partial = partial
        self.expected = expected


class Stream(asyncio.Protocol):
    """The connection an async handler gets.

    ``read()`` returns ``b""`` at EOF, and also once the server starts
    shutting down, so that a handler waiting for input ends as if the client
    had finished. ``write()`` waits while the peer is not reading.
    """

    def __init__(self, group: ConnectionGroup, peer: Peer, handler: AsyncHandler) -> None:
        self.group = group
        self.peer = peer
        self.limits = group.limits
        self.stats = ConnectionStats(peer)
        self._handler = handler
        self._buf = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._time = group.loop.time
        self._last_active = 0.0
        # data_received reads no clock: the idle timer looks every
        # ``_idle_step`` at whether bytes came in since its last look.
        self._idle_step = (self.limits.idle_timeout or 0.0) / 20
        self._idle_seen = 0
        self._timer: asyncio.TimerHandle | None = None
        self._lost = self._handler_done = self._logged = False

    # -- the handler's API ---------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at EOF."""
        if not self._buf:
            await self._wait_data()
            if not self._buf:
                return b""
        if len(self._buf) <= max_bytes:
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
        self._maybe_resume_reading()
        return data

    async def read_line(self, *, keep_end: bool = False) -> bytes:
        """One line (LF or CRLF ended), without its end unless ``keep_end``.

        Returns ``b""`` at EOF, or the unterminated rest of the data. Raises
        :class:`LineTooLong` past ``Limits.max_line`` without buffering more.
        """
        limit = self.limits.max_line
        scanned = 0
        while True:
            nl = self._buf.find(b"\n", scanned)
            if nl >= 0:
                break
            scanned = len(self._buf)
            if scanned > limit + 1:
                raise LineTooLong(limit)
            if self._eof or self._error is not None:
                if self._error is not None and not self._buf:
                    raise self._error
                rest = bytes(self._buf)
                self._buf.clear()
                return rest
            await self._wait_data(force=True)
        line = bytes(self._buf[: nl + 1])
        del self._buf[: nl + 1]
        self._maybe_resume_reading()
        if not keep_end:
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if len(line) > limit + (2 if keep_end else 0):
            raise LineTooLong(limit)
        return line

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`IncompleteRead` at EOF."""
        while len(self._buf) < n:
            if self._eof or self._error is not None:
                partial = bytes(self._buf)
                self._buf.clear()
                raise IncompleteRead(partial, n)
            await self._wait_data(force=True)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._maybe_resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the peer's buffer is over the limit."""
        if self._closed or self._transport is None or self._transport.is_closing():
            raise ConnectionClosed(self.stats.reason or "connection closed")
        self.stats.bytes_out += len(data)
        self._transport.write(data)
        if self._write_paused:
            await self._wait_drain()

    def write_eof(self) -> None:
        """Half-close: the peer sees EOF, and may still send to us."""
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()

    async def close(self) -> None:
        """Flush and close."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    @property
    def shutting_down(self) -> bool:
        return self.group.shutting_down

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=self.limits.max_output_buffer)
        self.stats.opened(self.group, self)
        if self.limits.idle_timeout is not None:
            self._last_active = self._time()
            self._timer = self.group.loop.call_at(
                self._last_active + self._idle_step, self._check_idle
            )
        if self.group.shutting_down:
            self._eof = True
        self._task = self.group.loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_in += len(data)  # also what the idle timer watches
        self._buf += data
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        # Bound the read buffer like the write buffer: stop reading from a
        # peer that sends faster than the handler consumes.
        if len(self._buf) > self.limits.max_output_buffer and not self._read_paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._read_paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_active = self._time()
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None:
            self.stats.set_reason(describe(exc))
        self._error = self._error or ConnectionClosed(self.stats.reason or "connection closed")
        self._eof = True
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionClosed(self.stats.reason or "connection closed"))
        self._drain = None
        self._lost = True
        self._maybe_log_closed()

    # -- the core's Connection interface ---------------------------------

    def begin_shutdown(self) -> None:
        self._eof = True
        self._wake()

    def abort(self) -> None:
        self.stats.set_reason("aborted at the end of the grace period")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    # -- internals -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._handler(self)
        except asyncio.CancelledError:
            pass
        except RemoteProtocolError as exc:
            self.stats.set_reason(exc.reason)
        except (ConnectionClosed, *PEER_GONE) as exc:
            self.stats.set_reason(describe(exc))
            self.group.log.debug("%s: %s", self.peer, exc)
        except Exception:
            self.group.log.exception("%s: handler failed", self.peer)
            self.stats.set_reason("internal error")
        finally:
            self._handler_done = True
            if self._transport is not None and not self._transport.is_closing():
                self._transport.close()
            self._maybe_log_closed()

    def _maybe_log_closed(self) -> None:
        # The close is logged once both the handler and the transport are done.
        if self._lost and self._handler_done and not self._logged:
            self._logged = True
            self.stats.closed(self.group, self)

    async def _wait_data(self, force: bool = False) -> None:
        if self._error is not None and not self._buf:
            raise self._error
        if self._eof:
            return
        self._maybe_resume_reading(force)
        self._waiter = self.group.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._buf and not isinstance(
            self._error, ConnectionClosed
        ):
            raise self._error

    async def _wait_drain(self) -> None:
        self._drain = self.group.loop.create_future()
        await self._drain

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _maybe_resume_reading(self, force: bool = False) -> None:
        if self._read_paused and (force or len(self._buf) <= self.limits.max_output_buffer // 2):
            self._read_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def _check_idle(self) -> None:
        timeout = self.limits.idle_timeout
        assert timeout is not None
        now = self._time()
        if self.stats.bytes_in != self._idle_seen:
            # Data came in since the last look, at most one step ago: count
            # from now. Never early, at most one step (timeout / 20) late.
            self._idle_seen = self.stats.bytes_in
            self._last_active = now
        deadline = self._last_active + timeout
        if now < deadline:
            self._timer = self.group.loop.call_at(
                max(min(deadline, now + self._idle_step), now + 0.01), self._check_idle
            )
            return
        self._timer = None
        self.stats.set_reason("idle timeout")
        self._error = ConnectionClosed("idle timeout")
        self._wake()
        if self._transport is not None:
            self._transport.close()


class AsyncHandlerDriver:
    """Serves an ``async def handle(stream)`` on stream endpoints."""

    name = "async"

    def __init__(self, handler: AsyncHandler) -> None:
        self.handler = handler

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint.is_stream

    def max_connections(self, limits: Limits) -> int:
        return limits.max_connections

    def start_stream(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
        stream = Stream(group, peer, self.handler)
        task = group.loop.create_task(group.loop.connect_accepted_socket(lambda: stream, sock))
        task.add_done_callback(report_failed_start)

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> Connection:
        raise NotImplementedError("async handlers serve stream endpoints only")

    def close(self) -> None:
        pass
