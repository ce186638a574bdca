"""Runs sans-I/O protocols from asyncio ``data_received`` callbacks.

This is the fast path: no task and no future per connection, one call into
the protocol per chunk, and a ``bytes`` result written straight to the
transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .._config import Limits
from .._endpoint import Endpoint
from .._errors import RemoteProtocolError
from .._protocol import DatagramProtocol, Output, Peer, Reply, StreamProtocol
from .._sockets import BoundSocket
from ._common import (
    PEER_GONE,
    ConnectionStats,
    DatagramSocket,
    describe,
    report_failed_start,
    send_datagram,
)

if TYPE_CHECKING:
    from .._server import ConnectionGroup

StreamFactory = Callable[[], StreamProtocol]
DatagramFactory = Callable[[], DatagramProtocol]

log = logging.getLogger("sockworks.driver")

# File data read per step: large enough that a 100 MiB file is a few hundred
# writes, small enough to stay within a few L2-sized copies.
_FILE_CHUNK = 256 * 1024
# Files above this size go by os.sendfile (no copy through Python); small
# ones are one pread and a write, which costs less than the extra calls.
_SENDFILE_MIN = 64 * 1024
_HAVE_SENDFILE = hasattr(os, "sendfile")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
# How long a closing connection may take to flush when no idle timeout is set.
_CLOSE_TIMEOUT = 60.0


class ProtocolDriver:
    """Serves a :class:`StreamProtocol` factory and/or a :class:`DatagramProtocol` factory."""

    name = "protocol"

    def __init__(
        self, stream: StreamFactory | None = None, datagram: DatagramFactory | None = None
    ) -> None:
        self.stream_factory = stream
        self.datagram_factory = datagram

    def supports(self, endpoint: Endpoint) -> bool:
        return (self.stream_factory if endpoint.is_stream else self.datagram_factory) is not None

    def max_connections(self, limits: Limits) -> int:
        return limits.max_connections

    def start_stream(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
        assert self.stream_factory is not None
        conn = StreamConnection(self.stream_factory(), peer, group)
        task = group.loop.create_task(group.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(report_failed_start)

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> DatagramEndpoint:
        assert self.datagram_factory is not None
        endpoint = DatagramEndpoint(self.datagram_factory(), group, bound.sock)
        task = group.loop.create_task(
            group.loop.create_datagram_endpoint(lambda: endpoint, sock=bound.sock)
        )
        task.add_done_callback(report_failed_start)
        return endpoint

    def close(self) -> None:
        pass


class StreamConnection(asyncio.Protocol):
    """One connection: feeds the protocol and carries out its replies."""

    def __init__(self, proto: StreamProtocol, peer: Peer, group: ConnectionGroup) -> None:
        self.proto = proto
        self.group = group
        self.stats = ConnectionStats(peer)
        self.transport: asyncio.Transport | None = None
        self.closing = False  # no more protocol callbacks once set
        self.write_paused = False
        self.want_writable = False
        self.sending_file = False
        self.pending: list[Reply] = []  # replies queued behind a file transfer
        self.idle_timeout = group.limits.idle_timeout
        self._time = group.loop.time
        self.last_active = 0.0
        # The data path reads no clock (that costs as much as the rest of
        # data_received): the idle timer looks every ``_idle_step`` at
        # whether bytes came in since its last look (``_idle_seen``).
        self._idle_step = (self.idle_timeout or 0.0) / 20
        self._idle_seen = 0
        self.timer: asyncio.TimerHandle | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self.group.limits.max_output_buffer)
        self.stats.opened(self.group, self)
        if self.idle_timeout is not None:
            self.last_active = self._time()
            self.timer = self.group.loop.call_at(
                self.last_active + self._idle_step, self._check_idle
            )
        if self.group.shutting_down:
            self._run(self.proto.on_shutdown)
        else:
            self._run(self.proto.on_connect, self.stats.peer)

    def data_received(self, data: bytes) -> None:
        # The hot path: no clock read, no allocation (see _check_idle).
        if self.closing:
            return
        stats = self.stats
        stats.bytes_in += len(data)
        try:
            out = self.proto.on_data(data)
        except RemoteProtocolError as exc:
            self._close(Reply(close=True, reason=exc.reason))
            return
        except Exception:
            self._crashed("on_data")
            return
        if out.__class__ is bytes:
            if out:
                stats.bytes_out += len(out)
                self.transport.write(out)  # type: ignore[union-attr]
        elif out is not None:
            self._apply(out)

    def eof_received(self) -> bool:
        self._run(self.proto.on_eof)
        # True keeps our write side open: a half-closed peer may still read.
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        # A peer that does not read stops being read from: memory stays
        # bounded by the write buffer limit plus one chunk.
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = self._time()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.transport is not None and not self.closing and not self.sending_file:
            self.transport.resume_reading()
        if self.want_writable:
            self.group.loop.call_soon(self._writable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
        if self.timer is not None:
            self.timer.cancel()
        if exc is not None:
            # Some protocols end normally this way (chargen): they say so.
            gone = getattr(self.proto, "peer_gone_reason", None)
            self.stats.set_reason(gone if gone and isinstance(exc, PEER_GONE) else describe(exc))
            log.debug("%s: %r", self.stats.peer, exc)
        self.stats.closed(self.group, self)

    # -- the core's Connection interface ---------------------------------

    def begin_shutdown(self) -> None:
        self._run(self.proto.on_shutdown)

    def abort(self) -> None:
        self.stats.set_reason("aborted at the end of the grace period")
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- carrying out replies ------------------------------------------------

    def _run(self, callback: Callable[..., Output], *args: object) -> None:
        if self.closing:
            return
        try:
            out = callback(*args)
        except RemoteProtocolError as exc:
            out = Reply(close=True, reason=exc.reason)
        except Exception:
            self._crashed(getattr(callback, "__name__", "callback"))
            return
        if out is not None:
            self._apply(out)

    def _apply(self, out: Output) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if out.__class__ is bytes:
            out = Reply(data=out)
        assert isinstance(out, Reply)
        if self.sending_file:
            self.pending.append(out)
            return
        if out.data:
            self.stats.bytes_out += len(out.data)
            transport.write(out.data)
        if out.file is not None:
            self.sending_file = True
            transport.pause_reading()
            self.group.loop.create_task(self._send_file(out))
            return
        self._finish(out)

    def _finish(self, out: Reply) -> None:
        transport = self.transport
        assert transport is not None
        if out.close:
            self._close(out)
            return
        if out.half_close and transport.can_write_eof():
            transport.write_eof()
        if out.more:
            self.want_writable = True
            if not self.write_paused:
                self.group.loop.call_soon(self._writable)
        else:
            self.want_writable = False

    def _close(self, out: Reply) -> None:
        self.stats.set_reason(out.reason)
        self.closing = True
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered, then closes
            # A peer that stops reading would hold a closing connection
            # forever: give the flush one idle timeout, then abort.
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.group.loop.call_later(
                self.idle_timeout or _CLOSE_TIMEOUT, self._abort_unflushed
            )

    def _abort_unflushed(self) -> None:
        self.stats.set_reason("peer stopped reading")
        if self.transport is not None:
            self.transport.abort()

    def _writable(self) -> None:
        if self.closing or not self.want_writable or self.write_paused:
            return
        self.want_writable = False
        self.last_active = self._time()
        self._run(self.proto.on_writable)

    async def _send_file(self, out: Reply) -> None:
        """Send a file region: by ``os.sendfile`` when the transport allows
        it (uvloop has no ``loop.sendfile``), else in ``pread`` chunks paced
        by the transport's flow control, so that at most the write buffer
        limit plus one chunk is in memory."""
        assert out.file is not None and self.transport is not None
        span = out.file
        transport = self.transport
        try:
            with open(span.path, "rb") as f:
                fd = f.fileno()
                size = os.fstat(fd).st_size
                offset = span.offset
                remaining = size - offset if span.count is None else span.count
                if remaining > _SENDFILE_MIN and self._can_sendfile():
                    sent = await self._sendfile(fd, offset, remaining)
                    offset += sent
                    remaining -= sent
                    if self.closing:
                        return
                while remaining > 0:
                    if self.closing:
                        return
                    if self.write_paused:
                        self._drain_waiter = self.group.loop.create_future()
                        await self._drain_waiter
                        continue
                    chunk = os.pread(fd, min(_FILE_CHUNK, remaining), offset)
                    if not chunk:
                        break  # the file shrank under us: send what there was
                    transport.write(chunk)
                    self.last_active = self._time()
                    offset += len(chunk)
                    remaining -= len(chunk)
                    self.stats.bytes_out += len(chunk)
        except ConnectionError:  # lost while waiting for the peer to drain
            return
        except OSError as exc:
            self.group.log.warning("%s: cannot send %s: %s", self.stats.peer, span.path, exc)
            self._close(Reply(close=True, reason="file error"))
            return
        finally:
            self._drain_waiter = None
        self.sending_file = False
        if self.closing:
            return
        if not self.write_paused:
            transport.resume_reading()
        self._finish(out)
        pending, self.pending = self.pending, []
        for reply in pending:
            self._apply(reply)

    def _can_sendfile(self) -> bool:
        """Zero-copy is possible: a plain (not TLS) socket transport with
        nothing queued before the file, and os.sendfile on this platform."""
        transport = self.transport
        return (
            _HAVE_SENDFILE
            and transport is not None
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
            and transport.get_write_buffer_size() == 0
        )

    async def _sendfile(self, fd: int, offset: int, count: int) -> int:
        """``os.sendfile`` straight to the socket, waiting for writability
        on a duplicate of its descriptor (the loop refuses watchers on a
        transport's own). The transport is idle meanwhile: reading paused,
        its write buffer empty, further replies queued. Returns the bytes
        sent; on a peer that went away the connection is aborted."""
        assert self.transport is not None
        sock_fd = self.transport.get_extra_info("socket").fileno()
        loop = self.group.loop
        watch = os.dup(sock_fd)
        sent = 0
        try:
            while sent < count and not self.closing:
                try:
                    n = os.sendfile(sock_fd, fd, offset + sent, min(count - sent, 1 << 24))
                except (BlockingIOError, InterruptedError):
                    # connection_lost fails this waiter: an abort (shutdown,
                    # idle timeout) ends the wait, and the duplicate is closed.
                    ready = self._drain_waiter = loop.create_future()
                    loop.add_writer(watch, _wake, ready)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(watch)
                        self._drain_waiter = None
                    continue
                except PEER_GONE as exc:
                    self.stats.set_reason(describe(exc))
                    self.closing = True
                    self.transport.abort()
                    break
                if n == 0:
                    break  # the file shrank under us
                sent += n
                self.stats.bytes_out += n
                self.last_active = self._time()
        finally:
            os.close(watch)
        return sent

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        if self.closing:
            return
        now = self._time()
        if self.stats.bytes_in != self._idle_seen:
            # Data came in since the last look, at most one step ago: count
            # from now. Never early, at most one step (timeout / 20) late.
            self._idle_seen = self.stats.bytes_in
            self.last_active = now
        deadline = self.last_active + self.idle_timeout
        if now < deadline:
            self.timer = self.group.loop.call_at(
                max(min(deadline, now + self._idle_step), now + 0.01), self._check_idle
            )
            return
        self.timer = None
        if self.sending_file:
            # Sending a file makes progress every time the peer takes some:
            # a whole idle period without any means it stopped reading.
            # (The protocol's answer would only queue behind the file.)
            self._abort_unflushed()
            self.closing = True
            return
        self._run(self.proto.on_timeout)
        if not self.closing:  # the protocol chose to go on: re-arm
            self.last_active = self._time()
            self.timer = self.group.loop.call_at(
                self.last_active + self._idle_step, self._check_idle
            )

    def _crashed(self, where: str) -> None:
        self.group.log.exception("%s: protocol error in %s; closing", self.stats.peer, where)
        self.stats.set_reason("internal error")
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


class DatagramEndpoint(DatagramSocket):
    """One datagram socket: each datagram to the protocol, the reply back."""

    def __init__(
        self, proto: DatagramProtocol, group: ConnectionGroup, sock: socket.socket
    ) -> None:
        super().__init__(group, sock)
        self.proto = proto

    def datagram_received(self, data: bytes, addr: Any) -> None:
        peer = self.admit(data, addr)
        if peer is None:
            return
        access = self.group.access
        try:
            reply = self.proto.on_datagram(data, peer)
        except RemoteProtocolError as exc:
            self.group.refused(peer, exc.reason, datagram=True)
            return
        except Exception:
            self.group.log.exception("%s: protocol error on a datagram", peer)
            return
        self.group.log.debug("%s: %d B in, %d B out", peer, len(data), len(reply or b""))
        if reply is not None and access is not None:
            refused = access.check_reply(len(data), len(reply))
            if refused is not None:
                self.group.refused(peer, refused, datagram=True)
                return
        if reply is not None and self.transport is not None:
            if not addr:  # an unbound Unix datagram client has no address
                self.group.log.debug("cannot reply to an unbound unixgram peer")
                return
            send_datagram(self.transport, self.sock, reply, addr)
