"""Runs ``async def handle(stream)`` handlers, one task per connection.

:class:`Stream` is a thin layer on the one connection core
(:class:`~sockworks._drivers.stream.StreamCore`): a receive buffer (the
one :class:`~sockworks.LineBuffer`) with a reader's waiter, and writes that
wait on the core's flow control, which wakes every waiting writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .._buffer import LineBuffer
from .._config import Limits
from .._core import PEER_GONE, Driver, State, check_output_type, closed_error, describe
from .._errors import (
    ConnectionClosed,
    IdleTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from .._protocol import Peer
from .stream import StreamCore

if TYPE_CHECKING:
    from .._core import ConnectionGroup

AsyncHandler = Callable[["Stream"], Awaitable[object]]

_OPEN = State.OPEN
_CLOSED = State.CLOSED


class IncompleteRead(ConnectionClosed):
    """EOF arrived before ``read_exactly`` had its bytes; ``partial`` has them."""

    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"connection closed after {len(partial)} of {expected} bytes")
        self.partial = partial
        self.expected = expected


class Stream(StreamCore):
    """The connection an async handler gets.

    ``read()`` returns ``b""`` at EOF, and also once the server starts
    shutting down, so that a handler waiting for input ends as if the client
    had finished; a read or write waiting on a peer idle for the idle
    timeout raises :class:`~sockworks.IdleTimeout` (a ``TimeoutError``).
    ``write()`` waits while the peer is not reading; any number of tasks may
    write at once, and every one of them wakes when the peer catches up.
    """

    __slots__ = ("_buf", "_eof", "_error", "_handler", "_handler_done", "_high", "_loop",
                 "_lost", "_read_waiter", "_task", "_we_closed")

    # Waiting on the peer only inside a read or a drain: a handler busy with
    # its own work (a sleep, a database) is not an idle peer.
    ALWAYS_WAITING = False

    def __init__(self, group: ConnectionGroup, handler: AsyncHandler) -> None:
        super().__init__(group)
        self._handler = handler
        self._buf = LineBuffer(group.limits.max_line)
        # Looked up on every chunk and every wait: kept at hand.
        self._loop = group.loop
        self._high = group.limits.max_output_buffer
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._handler_done = False
        self._lost = False
        self._we_closed = False

    # -- the handler's API ---------------------------------------------------

    @property
    def peer(self) -> Peer:
        return self.stats.peer

    @property
    def limits(self) -> Limits:
        return self.group.limits

    @property
    def shutting_down(self) -> bool:
        return self.group.shutting_down

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at EOF."""
        buf = self._buf
        while not len(buf):
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait_data()
        data = buf.take(max_bytes)
        if self._held:
            self._check_buffer()
        return data

    async def read_line(self, *, keep_end: bool = False) -> bytes:
        """One line (LF or CRLF ended), without its end unless ``keep_end``.

        Returns ``b""`` at EOF, or the unterminated rest of the data. Raises
        :class:`LineTooLong` past ``Limits.max_line`` without buffering more.
        """
        buf = self._buf
        while True:
            line = buf.next_line_with_end() if keep_end else buf.next_line()
            if line is not None:
                self._check_buffer()
                return line
            if self._error is not None and not len(buf):
                raise self._error
            if self._eof or self._error is not None:
                return buf.take_rest()
            await self._wait_data()

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`IncompleteRead` at EOF."""
        buf = self._buf
        while len(buf) < n:
            if self._eof or self._error is not None:
                raise IncompleteRead(buf.take_rest(), n)
            await self._wait_data()
        data = buf.take(n)
        self._check_buffer()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the peer's buffer is over the limit."""
        if data.__class__ is bytes and self.state is _OPEN:
            # The usual case, checked in two comparisons.
            self.stats.bytes_out += len(data)
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            check_output_type(data, "Stream.write")
            self._check_writable("write")
            self.send(bytes(data))
        if self.write_paused:
            await self.drained()

    async def drain(self) -> None:
        """Wait until the peer has taken what was written (down to the limit)."""
        await self.drained()

    def write_eof(self) -> None:
        """Half-close: the peer sees EOF, and may still send to us."""
        self._check_writable("write_eof")
        self.half_close()

    async def close(self) -> None:
        """Flush and close."""
        self._we_closed = True
        self.close_soon()

    # -- the core's events -----------------------------------------------------

    def on_start(self) -> None:
        self._task = self.group.loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is not _OPEN and state is not State.LOCAL_DONE:
            # Closing (a lingering close reads on): the input is discarded.
            self.stats.bytes_in += len(data)
            return
        self.stats.bytes_in += len(data)
        buf = self._buf
        buf.feed(data)
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        # Bound the read buffer like the write buffer: stop reading from a
        # peer that sends faster than the handler consumes.
        if len(buf) > self._high:
            self.hold_reading(True)

    def on_peer_eof(self) -> None:
        self._eof = True
        self._wake_reader()

    def on_idle(self) -> None:
        self.stats.set_reason("idle timeout")
        self._error = IdleTimeout("idle timeout")
        self._wake_reader()
        self.fail_writers(self._error)
        self.close_soon("idle timeout")

    def on_shutdown(self) -> None:
        # Reads return EOF: an idle handler ends on its own, a busy one
        # finishes its work and may still write.
        self._eof = True
        self._wake_reader()

    def on_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and self._error is None:
            self._error = closed_error(self.stats)
        self._eof = True
        self._wake_reader()

    def finished(self) -> None:
        # Logged once both the handler and the transport are done.
        if self._handler_done:
            self.group.closed(self)

    def abort(self) -> None:
        super().abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- internals -------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._handler(self)
        except asyncio.CancelledError:
            pass
        except RemoteProtocolError as exc:
            self.input_left = True  # e.g. the rest of a line too long
            self.stats.set_reason(exc.reason)
        except (ConnectionClosed, *PEER_GONE) as exc:
            self.stats.set_reason(describe(exc))
            self.group.log.debug("%s: %s", self.peer, exc)
        except Exception:
            self.crashed("the handler")
        finally:
            self._handler_done = True
            if len(self._buf):
                self.input_left = True
            self.close_soon()
            if self._lost:
                self.group.closed(self)

    def _check_writable(self, what: str) -> None:
        state = self.state
        if state is _OPEN or state is State.PEER_DONE:
            return
        if self._we_closed:
            raise LocalProtocolError(f"{what} after close()")
        if state is State.LOCAL_DONE:
            raise LocalProtocolError(f"{what} after write_eof()")
        raise closed_error(self.stats)

    async def _wait_data(self) -> None:
        # A reader that needs more than the buffer limit must get it.
        if self._held:
            self.hold_reading(False)
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._read_waiter = waiter
        self._waits += 1  # begin_wait(), inline: this is every read's path
        self._wait_epoch += 1
        try:
            await waiter
        finally:
            self._waits -= 1
            self._wait_epoch += 1
            self._read_waiter = None

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None:
            self._read_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _check_buffer(self) -> None:
        if self._held and len(self._buf) <= self._high // 2:
            self.hold_reading(False)


class AsyncHandlerDriver(Driver):
    """Serves an ``async def handle(stream)`` on stream endpoints."""

    name = "async"

    def __init__(self, handler: AsyncHandler) -> None:
        self.handler = handler

    def connection_factory(self, group: ConnectionGroup) -> Callable[[], asyncio.Protocol]:
        handler = self.handler
        return lambda: Stream(group, handler)
