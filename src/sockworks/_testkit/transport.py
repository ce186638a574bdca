"""An in-memory stream transport, and the test-side peer that talks to it.

:func:`memory_connection` connects an :class:`asyncio.Protocol` (the server
side of a connection) to a :class:`MemoryTransport`, and gives the test a
:class:`MemoryPeer` to play the client: send bytes and EOF, reset, and read
what the server wrote, at the pace the test chooses.

The model of a TCP connection, server to peer::

    protocol --write()--> transport buffer --(window)--> peer inbox --receive()--> test

The transport buffer is asyncio's own user-space write buffer: its size is
``get_write_buffer_size()`` and drives ``pause_writing``/``resume_writing``.
The peer inbox stands for the kernel's socket buffers plus what the client
has received but not yet read; it takes at most ``receive_window`` bytes
(``None``: no limit, a fast reader; ``0``: everything stays in the transport
buffer until the test reads it). ``receive()`` reads the inbox, then the
transport buffer, so a reader is never stuck behind a full window.

Callbacks behave as asyncio's selector transports deliver them:
``connection_made``, ``data_received``, ``eof_received``, ``resume_writing``
and ``connection_lost`` through ``loop.call_soon``, never from inside a call
the protocol or the test made. The one exception is ``pause_writing``, which
asyncio (and uvloop) call synchronously from inside ``write()`` when the
buffer passes the high-water mark: drivers rely on that (a handler checks
whether it is paused right after writing), so this transport does the same.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from typing import Any

__all__ = ["MemoryPeer", "MemoryTransport", "memory_connection"]

# asyncio's defaults for a socket transport's write buffer.
_DEFAULT_HIGH = 64 * 1024

_EOF = object()  # marks the peer's EOF in the incoming queue


class MemoryTransport(asyncio.Transport):
    """The server side of an in-memory connection (see the module notes)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        extra: dict[str, Any],
        receive_window: int | None,
    ) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol = protocol
        self._out = bytearray()  # written by the protocol, not yet taken by the peer
        self._high = _DEFAULT_HIGH
        self._low = _DEFAULT_HIGH // 4
        self._write_paused = False  # pause_writing() called, resume_writing() not yet
        self._resume_scheduled = False
        self._eof_written = False  # write_eof() called
        self._closing = False  # close() or abort(): no more reading
        self._lost = False  # connection_lost scheduled: the connection is over
        self._forced = False  # abort(), reset or a protocol error: no orderly end
        self._reading_paused = False
        self._incoming: deque[object] = deque()  # bytes from the peer, then maybe _EOF
        self._deliver_scheduled = False
        self.peer = MemoryPeer(self, receive_window)

    # -- asyncio.BaseTransport ----------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; deliver what is buffered, then ``connection_lost(None)``."""
        if self._closing:
            return
        self._closing = True
        self._incoming.clear()  # asyncio stops reading at close()
        self._pump()  # schedules connection_lost at once if nothing is buffered

    # -- asyncio.ReadTransport ----------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._closing or not self._reading_paused:
            return
        self._reading_paused = False
        self._schedule_delivery()

    # -- asyncio.WriteTransport ---------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        # asyncio's rules: high defaults to 64 KiB (or 4 x low), low to high / 4.
        if high is None:
            high = _DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data or self._lost:
            return  # asyncio drops writes to a lost connection (it only logs them)
        self._out += data
        self._pump()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        self._pump()

    def can_write_eof(self) -> bool:
        return True

    def abort(self) -> None:
        """Drop what is buffered and end at once: ``connection_lost(None)``."""
        self.peer.aborted = True
        self._force_close(None)

    # -- internals ------------------------------------------------------------------

    def _pump(self) -> None:
        """Move buffered output into the peer's window; finish a close or
        half-close once the buffer is empty; wake a waiting reader."""
        peer = self.peer
        if self._out:
            room = (
                len(self._out)
                if peer._window is None
                else max(0, peer._window - len(peer._inbox))
            )
            if room:
                chunk = self._out[:room]
                del self._out[:room]
                peer._inbox += chunk
        if not self._out:
            if (self._eof_written or self._closing) and not self._forced:
                peer.received_eof = True
            if self._closing and not self._lost:
                self._lose(None)
        if self._write_paused and len(self._out) <= self._low and not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_protocol)
        peer._wake()

    def _maybe_pause_protocol(self) -> None:
        if len(self._out) <= self._high or self._write_paused:
            return
        self._write_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": "protocol.pause_writing() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _resume_protocol(self) -> None:
        # Checked again here: the protocol may have written more since the
        # peer read, and must not be told to resume above the low mark.
        self._resume_scheduled = False
        if self._lost or not self._write_paused or len(self._out) > self._low:
            return
        self._write_paused = False
        self._protocol.resume_writing()

    def _schedule_delivery(self) -> None:
        if self._incoming and not self._deliver_scheduled and self.is_reading():
            self._deliver_scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """One chunk (or the EOF) per loop iteration, as a socket read would."""
        self._deliver_scheduled = False
        if not self._incoming or not self.is_reading():
            return  # paused (resume_reading reschedules) or closed (dropped)
        item = self._incoming.popleft()
        try:
            if item is _EOF:
                if not self._protocol.eof_received():
                    self.close()  # as asyncio does when eof_received is falsy
                return
            assert isinstance(item, bytes)
            self._protocol.data_received(item)
        except Exception as exc:
            # asyncio reports a failing data_received/eof_received and
            # tears the connection down with that exception.
            self._loop.call_exception_handler(
                {
                    "message": "Fatal error: protocol callback failed.",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
            self._force_close(exc)
            return
        self._schedule_delivery()

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._forced = True
        self._out.clear()
        self._closing = True
        self._incoming.clear()
        self._lose(exc)
        self.peer._wake()

    def _lose(self, exc: Exception | None) -> None:
        self._lost = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self.peer._set_closed()


class MemoryPeer:
    """The test's end of an in-memory connection: the client.

    Flags: ``received_eof`` (the server half-closed or closed and all it
    wrote has reached the peer), ``aborted`` (the server called
    ``abort()``: unsent output was dropped), ``closed`` (the protocol's
    ``connection_lost`` has run: the connection is over).
    """

    def __init__(self, transport: MemoryTransport, receive_window: int | None) -> None:
        if receive_window is not None and receive_window < 0:
            raise ValueError("receive_window must be None or >= 0")
        self.transport = transport
        self._window = receive_window
        self._inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self.received_eof = False
        self.aborted = False
        self.closed = False
        self.eof_sent = False  # send_eof() or reset() called
        self.was_reset = False

    # -- the window -----------------------------------------------------------------

    @property
    def receive_window(self) -> int | None:
        """Bytes the peer takes from the transport before the test reads
        them: ``None`` no limit, ``0`` a peer that never reads on its own."""
        return self._window

    @receive_window.setter
    def receive_window(self, value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError("receive_window must be None or >= 0")
        self._window = value
        self.transport._pump()

    # -- client to server -----------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Deliver ``data`` to the protocol's ``data_received`` (one call per
        ``send``, queued while the transport's reading is paused). Once the
        server closed, the bytes are discarded, as its kernel would."""
        if self.eof_sent:
            raise RuntimeError("send() after send_eof() or reset()")
        data = bytes(data)
        t = self.transport
        if not data or t._closing:
            return
        t._incoming.append(data)
        t._schedule_delivery()

    def send_eof(self) -> None:
        """Half-close: the protocol's ``eof_received`` runs after the data
        sent before; if it returns a falsy value the transport closes."""
        if self.eof_sent:
            return
        self.eof_sent = True
        t = self.transport
        if t._closing:
            return
        t._incoming.append(_EOF)
        t._schedule_delivery()

    def reset(self) -> None:
        """The client resets the connection: unread input and unsent output
        are dropped and the protocol gets ``connection_lost(ConnectionResetError)``."""
        self.eof_sent = True
        self.was_reset = True
        self.transport._force_close(ConnectionResetError("connection reset by peer"))

    # -- server to client -----------------------------------------------------------

    def _at_end(self) -> bool:
        t = self.transport
        return not self._inbox and not t._out and (t._eof_written or t._closing or self.was_reset)

    def _take(self, limit: int | None) -> bytes:
        t = self.transport
        buffered = len(self._inbox) + len(t._out)
        n = buffered if limit is None else min(limit, buffered)
        if n <= len(self._inbox):
            data = bytes(self._inbox[:n])
            del self._inbox[:n]
        else:
            rest = n - len(self._inbox)
            data = bytes(self._inbox) + bytes(t._out[:rest])
            self._inbox.clear()
            del t._out[:rest]
        t._pump()  # room in the window / a drained buffer: resume, finish a close
        return data

    async def receive(self, max: int | None = None) -> bytes:
        """Wait for what the server wrote and return it (at most ``max``
        bytes); ``b""`` once the server half-closed, closed or aborted and
        everything before that was read."""
        if max is not None and max < 1:
            raise ValueError("max must be >= 1")
        if self._waiter is not None:
            raise RuntimeError("another task is already receiving from this peer")
        while not self._inbox and not self.transport._out and not self._at_end():
            self._waiter = self.transport._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take(max)

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` if the
        stream ends first."""
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.receive(n - len(buf))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), n)
            buf += chunk
        return bytes(buf)

    async def receive_all(self) -> bytes:
        """Everything up to the end of the stream."""
        buf = bytearray()
        while chunk := await self.receive():
            buf += chunk
        return bytes(buf)

    async def wait_closed(self) -> None:
        """Return once the protocol's ``connection_lost`` has run."""
        if self.closed:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self.transport._loop.create_future()
        await asyncio.shield(self._closed_waiter)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _set_closed(self) -> None:
        self.closed = True
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self._wake()


def memory_connection(
    protocol: asyncio.Protocol,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    peer: Any = ("127.0.0.1", 50000),
    sock: Any = ("127.0.0.1", 7),
    receive_window: int | None = None,
) -> tuple[MemoryTransport, MemoryPeer]:
    """Connect ``protocol`` to a new in-memory transport; its
    ``connection_made`` runs on the loop's next iteration. ``peer`` and
    ``sock`` are what ``get_extra_info("peername"/"sockname")`` return;
    ``get_extra_info("socket")`` is ``None`` (there is no socket)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    transport = MemoryTransport(
        loop, protocol, {"peername": peer, "sockname": sock, "socket": None}, receive_window
    )
    loop.call_soon(protocol.connection_made, transport)
    return transport, transport.peer
