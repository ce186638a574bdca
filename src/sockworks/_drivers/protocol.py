"""Runs sans-I/O protocols from asyncio ``data_received`` callbacks.

This is the fast path: no task and no future per connection, one call into
the protocol per chunk, and a ``bytes`` result written straight to the
transport. :class:`ProtocolConnection` is a thin layer on the one
connection core (:class:`~sockworks._drivers.stream.StreamCore`): it turns
the core's events into protocol callbacks and carries out the
:data:`Output` they return.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import CAN_RECEIVE, CAN_SEND, PEER_GONE, Driver, State, check_output_type, describe
from .._endpoint import Endpoint
from .._errors import LocalProtocolError, RemoteProtocolError
from .._protocol import DatagramProtocol, Output, Peer, Reply, StreamProtocol
from .._sockets import BoundSocket
from ._common import DatagramSocket, report_failed_start, send_datagram
from .stream import StreamCore

if TYPE_CHECKING:
    from .._core import ConnectionGroup

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

_OPEN = State.OPEN
_CLOSED = State.CLOSED


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# How a protocol class wants on_connect called, found once per class:
# 0 not overridden (skipped), 1 with the peer, 2 with the peer and the local
# address (protocols written before the local address was passed take one).
_CONNECT_ARITY: dict[type, int] = {}


def connect_arity(proto: StreamProtocol) -> int:
    cls = type(proto)
    arity = _CONNECT_ARITY.get(cls)
    if arity is None:
        method = cls.on_connect
        if method is StreamProtocol.on_connect:
            arity = 0
        else:
            params = list(inspect.signature(method).parameters.values())[1:]
            positional = [
                p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
            varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
            arity = 2 if varargs or len(positional) >= 2 else 1
        _CONNECT_ARITY[cls] = arity
    return arity


class ProtocolDriver(Driver):
    """Serves a :class:`StreamProtocol` factory and/or a :class:`DatagramProtocol` factory."""

    name = "protocol"

    def __init__(
        self, stream: StreamFactory | None = None, datagram: DatagramFactory | None = None
    ) -> None:
        self.stream_factory = stream
        self.datagram_factory = datagram

    def supports(self, endpoint: Endpoint) -> bool:
        return (self.stream_factory if endpoint.is_stream else self.datagram_factory) is not None

    def connection_factory(self, group: ConnectionGroup) -> Callable[[], asyncio.Protocol] | None:
        factory = self.stream_factory
        if factory is None:
            return None  # datagrams only: supports() keeps stream endpoints out
        return lambda: ProtocolConnection(factory(), group)

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> DatagramEndpoint:
        assert self.datagram_factory is not None
        endpoint = DatagramEndpoint(self.datagram_factory(), group, bound.sock)
        task = group.loop.create_task(
            group.loop.create_datagram_endpoint(lambda: endpoint, sock=bound.sock)
        )
        task.add_done_callback(report_failed_start)
        return endpoint


class ProtocolConnection(StreamCore):
    """One connection: feeds the protocol and carries out its replies."""

    __slots__ = (
        "_sendfile_wait",
        "offloading",
        "pending",
        "proto",
        "request_since",
        "sending_file",
        "want_writable",
    )

    def __init__(self, proto: StreamProtocol, group: ConnectionGroup) -> None:
        super().__init__(group)
        self.proto = proto
        proto.limits = group.limits
        self.want_writable = False
        self.sending_file = False
        self.offloading = False
        self.pending: list[Reply] = []  # replies queued behind a file or offloaded work
        self._sendfile_wait: asyncio.Future[None] | None = None
        self.request_since: float | None = None

    # -- the core's events, as protocol callbacks ----------------------------

    def on_start(self) -> None:
        if type(self.proto).awaiting_request is not StreamProtocol.awaiting_request:
            self.group.watch_requests(self)
        arity = connect_arity(self.proto)
        if arity == 1:
            self._run(self.proto.on_connect, self.stats.peer)
        elif arity == 2:
            t = self.transport
            assert t is not None
            local = self.stats.local = Peer.from_address(t.get_extra_info("sockname"))
            self._run(self.proto.on_connect, self.stats.peer, local)

    def finished(self) -> None:
        self.group.unwatch_requests(self)
        if self.started:
            try:
                self.stats.note = self.proto.request_summary()
            except Exception:
                self.group.count_handler_error()
                self.group.log.exception(
                    "%s: error in request_summary", self.stats.peer,
                    extra={"event": "error", "peer": self.stats.peer},
                )
        super().finished()

    # -- the request deadline (see _core.ConnectionGroup._sweep) -------------

    def request_pending(self) -> bool:
        if self.state not in CAN_RECEIVE or self.offloading:
            return False
        try:
            return self.proto.awaiting_request()
        except Exception:
            self.crashed("awaiting_request")
            return False

    def request_expired(self) -> None:
        self._run(self.proto.on_request_timeout)

    def data_received(self, data: bytes) -> None:
        # The hot path: no clock read, no allocation.
        state = self.state
        if state is not _OPEN and state is not State.LOCAL_DONE:
            # Closing (a lingering close reads on): the input is discarded.
            self.stats.bytes_in += len(data)
            return
        stats = self.stats
        stats.bytes_in += len(data)
        try:
            out = self.proto.on_data(data)
            if out.__class__ is bytes and state is _OPEN:
                if out:
                    stats.bytes_out += len(out)
                    self.transport.write(out)  # type: ignore[union-attr]
            elif out is not None:
                self._apply(out, "on_data")
        except RemoteProtocolError as exc:
            self.input_left = True  # e.g. the rest of a line too long
            self.close_soon(exc.reason)
        except Exception:
            self.crashed("on_data")

    def on_peer_eof(self) -> None:
        self._run(self.proto.on_eof)

    def on_drained(self) -> None:
        if self.want_writable:
            self.group.loop.call_soon(self._writable)

    def on_idle(self) -> None:
        if self.sending_file:
            # Sending a file makes progress every time the peer takes some:
            # a whole idle period without any means it stopped reading.
            self.abort_with("peer stopped reading")
            return
        self._run(self.proto.on_timeout)

    def on_shutdown(self) -> None:
        self._run(self.proto.on_shutdown)

    def gone_reason(self, exc: Exception) -> str:
        # Some protocols end normally this way (chargen): they say so.
        gone = self.proto.peer_gone_reason
        return gone if gone and isinstance(exc, PEER_GONE) else describe(exc)

    def activity(self) -> object:
        if self.offloading:
            return None  # our own work, not the peer, is what we wait for
        return super().activity()

    # -- carrying out replies ------------------------------------------------

    def _run(self, callback: Callable[..., Output], *args: object) -> None:
        state = self.state
        if state is _CLOSED or state is State.CLOSING:
            return
        try:
            self._apply(callback(*args), callback.__name__)
        except RemoteProtocolError as exc:
            self.close_soon(exc.reason)
        except Exception:
            self.crashed(callback.__name__)

    def _apply(self, out: Output, where: str) -> None:
        """Carry out ``out``; a wrong type or output the state forbids is a
        LocalProtocolError (the caller logs it as the protocol's bug)."""
        if out is None or self.state is _CLOSED:
            return
        if out.__class__ is bytes:
            if out:
                self.send(out)
            return
        if not isinstance(out, Reply):
            check_output_type(out, f"{type(self.proto).__name__}.{where}")
            if out:
                self.send(bytes(out))
            return
        if self.sending_file or self.offloading:
            self.pending.append(out)
            return
        if out.offload is not None and (out.file or out.close or out.half_close or out.more):
            raise LocalProtocolError("Reply(offload=...) may only come with data")
        if out.data:
            check_output_type(out.data, f"{type(self.proto).__name__}.{where}")
            self.send(bytes(out.data))
        if out.file is not None:
            self.sending_file = True
            self.hold_reading(True)
            self.group.loop.create_task(self._send_file(out))
            return
        if out.offload is not None:
            self._start_offload(out.offload, out.offload_waits)
            return
        self._finish(out)

    def _finish(self, out: Reply) -> None:
        if out.close:
            self.close_soon(out.reason)
            return
        if out.half_close:
            self.half_close()
        if out.more:
            self.want_writable = True
            if not self.write_paused:
                self.group.loop.call_soon(self._writable)
        else:
            self.want_writable = False

    def _after_work(self) -> None:
        """A file or offloaded work is done: read again, then the replies
        that queued behind it."""
        if self.state is _CLOSED:
            return
        self.hold_reading(False)
        pending, self.pending = self.pending, []
        for reply in pending:
            try:
                self._apply(reply, "a queued reply")
            except Exception:
                self.crashed("a queued reply")
                return

    def _start_offload(self, work: Callable[[], Output], waits: bool = False) -> None:
        self.offloading = True
        self.hold_reading(True)
        self.group.offload(work, waits=waits).add_done_callback(self._offload_done)

    def _offload_done(self, future: asyncio.Future[Output]) -> None:
        self.offloading = False
        if self.state is _CLOSED or future.cancelled():
            return
        try:
            self._apply(future.result(), "offloaded work")
        except RemoteProtocolError as exc:
            self.close_soon(exc.reason)
        except Exception:
            self.crashed("offloaded work")
        if not self.offloading and not self.sending_file:
            self._after_work()

    def _writable(self) -> None:
        if self.state is _CLOSED or not self.want_writable or self.write_paused:
            return
        self.want_writable = False
        self._run(self.proto.on_writable)

    async def _send_file(self, out: Reply) -> None:
        """Send a file region: by ``os.sendfile`` when the transport allows
        it (uvloop has no ``loop.sendfile``), else in ``pread`` chunks paced
        by the transport's flow control, so that at most the write buffer
        limit plus one chunk is in memory. Reading is held meanwhile."""
        assert out.file is not None and self.transport is not None
        span = out.file
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
                while remaining > 0 and self.state in CAN_SEND:
                    if self.write_paused:
                        await self.drained()
                        continue
                    chunk = os.pread(fd, min(_FILE_CHUNK, remaining), offset)
                    if not chunk:
                        break  # the file shrank under us: send what there was
                    self.send(chunk)
                    offset += len(chunk)
                    remaining -= len(chunk)
        except ConnectionError:  # lost while waiting for the peer to drain
            return
        except OSError as exc:
            self.group.log.warning("%s: cannot send %s: %s", self.stats.peer, span.path, exc)
            self.sending_file = False
            self.close_soon("file error")
            return
        finally:
            self.sending_file = False
        if self.state not in CAN_SEND:
            return  # aborted meanwhile (the peer left, an idle abort, shutdown)
        try:
            self._finish(out)
        except Exception:
            self.crashed("a file reply")
            return
        if not self.offloading:
            self._after_work()

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
        transport's own). The transport is idle meanwhile: reading held,
        its write buffer empty, further replies queued. Returns the bytes
        sent; on a peer that went away the connection is aborted."""
        assert self.transport is not None
        sock_fd = self.transport.get_extra_info("socket").fileno()
        loop = self.group.loop
        watch = os.dup(sock_fd)
        sent = 0
        stats = self.stats
        try:
            while sent < count and self.state in CAN_SEND:
                try:
                    n = os.sendfile(sock_fd, fd, offset + sent, min(count - sent, 1 << 24))
                except (BlockingIOError, InterruptedError):
                    # Waiting for room counts as waiting on the peer; a lost
                    # connection (shutdown, idle abort) fails the wait.
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(watch, _wake, ready)
                    self._sendfile_wait = ready
                    try:
                        await ready
                    finally:
                        loop.remove_writer(watch)
                        self._sendfile_wait = None
                    continue
                except PEER_GONE as exc:
                    self.abort_with(describe(exc))
                    break
                if n == 0:
                    break  # the file shrank under us
                sent += n
                stats.bytes_out += n
        finally:
            os.close(watch)
        return sent

    def on_lost(self, exc: Exception | None) -> None:
        waiter = self._sendfile_wait
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("connection lost"))
            waiter.exception()


class DatagramEndpoint(DatagramSocket):
    """One datagram socket: each datagram to the protocol, the reply back."""

    def __init__(
        self, proto: DatagramProtocol, group: ConnectionGroup, sock: socket.socket
    ) -> None:
        super().__init__(group, sock)
        self.proto = proto
        proto.limits = group.limits

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The hot path: a known sender costs dict lookups, no allocation
        # beyond what the protocol makes (see DatagramSocket.admit).
        peer = self.admit(data, addr)
        if peer is None:
            return
        group = self.group
        try:
            reply = self.proto.on_datagram(data, peer)
        except RemoteProtocolError as exc:
            group.refused(peer, exc.reason, datagram=True)
            return
        except Exception:
            group.count_handler_error()
            group.count_dropped("handler_error")
            group.log.exception(
                "%s: protocol error on a datagram", peer, extra={"event": "error", "peer": peer}
            )
            return
        if reply is None:
            return
        if self.debug:
            group.log.debug("%s: %d B in, %d B out", peer, len(data), len(reply))
        access = group.access
        if access is not None and access.reply_limited:
            refused = access.check_reply(len(data), len(reply))
            if refused is not None:
                group.refused(peer, refused, datagram=True)
                return
        transport = self.transport
        if transport is not None:
            if not addr:  # an unbound Unix datagram client has no address
                group.count_dropped("no_address")
                group.log.debug("cannot reply to an unbound unixgram peer")
                return
            # Counted before it goes: who has the reply finds it counted.
            counts = group.counts
            counts.answered += 1
            counts.bytes_in += len(data)
            counts.bytes_out += len(reply)
            if reply:
                transport.sendto(reply, addr)
            else:
                send_datagram(transport, self.sock, reply, addr)
