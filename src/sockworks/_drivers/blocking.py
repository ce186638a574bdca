"""Runs blocking ``def handle(conn)`` handlers, the seeds' style, on a
bounded pool of threads.

The event loop still accepts (so limits and shutdown are the core's), then
hands each socket, in blocking mode, to a worker thread. The rules are the
core's (``_core.py``): the service's idle sweep looks at each connection,
and one that has waited on its peer in a recv or send with no byte moved
for the idle timeout has its socket shut down, which wakes the thread with
:class:`~sockworks.IdleTimeout`. Sockets carry no timeout of their own
(that would add a poll() to every recv); a handler busy computing is not
waiting on its peer.
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._buffer import LineBuffer
from .._config import Limits
from .._core import PEER_GONE, ConnectionStats, Driver, check_output_type, describe
from .._endpoint import Endpoint
from .._errors import (
    ConnectionClosed,
    IdleTimeout,
    LineTooLong,
    LocalProtocolError,
    RemoteProtocolError,
)
from .._metrics import ServiceCounts, drop_reason
from .._protocol import Peer
from .._sockets import BoundSocket, format_peer
from ._common import DatagramSocket, send_datagram

if TYPE_CHECKING:
    from .._core import ConnectionGroup

BlockingHandler = Callable[[Any], object]

log = logging.getLogger("sockworks.driver")


class _ThreadPool:
    """Daemon worker threads, started as needed up to ``size``.

    Daemon, so that a handler stuck in a computation cannot keep the process
    alive past the grace period: shutdown is bounded in time.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1
        self._jobs.put(job)

    @property
    def backlog(self) -> int:
        return self._jobs.qsize()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # pragma: no cover - jobs catch their own
                log.exception("worker job failed")
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class _SocketIO(io.RawIOBase):
    """Raw writes over a :class:`BlockingConnection` (``makefile("w…")``),
    so buffered writers are counted and watched like ``sendall``."""

    def __init__(self, conn: BlockingConnection) -> None:
        super().__init__()
        self._conn = conn

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._conn.sendall(bytes(data))
        return len(data)


class _Reader(io.BufferedIOBase):
    """A binary file reading from the connection's one receive buffer (its
    :class:`LineBuffer`), then the socket: what ``makefile("rb")`` and
    :attr:`BlockingConnection.reader` return. It keeps no buffer of its own,
    so bytes one reader leaves are the next ``recv``'s, ``read_line``'s or
    reader's, in order."""

    def __init__(self, conn: BlockingConnection) -> None:
        super().__init__()
        self._conn = conn

    def readable(self) -> bool:
        return True

    def read1(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        conn = self._conn
        if size is None or size < 0:
            size = 65536
        if conn._buffered is not None:
            return conn._take(size)
        return conn._fill(size) if size else b""

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        conn = self._conn
        chunks: list[bytes] = []
        if size is None or size < 0:
            if conn._buffered is not None:
                chunks.append(conn._take(len(conn._buffered)))
            while data := conn._fill(65536):
                chunks.append(data)
            return b"".join(chunks)
        if conn._buffered is not None:
            chunks.append(conn._take(size))
        have = len(chunks[0]) if chunks else 0
        # Straight from the socket into the result: nothing is left over.
        while have < size and (data := conn._fill(size - have)):
            chunks.append(data)
            have += len(data)
        return b"".join(chunks)

    def readinto(self, buffer: Any) -> int:
        return self._into(buffer, self.read)

    def readinto1(self, buffer: Any) -> int:
        return self._into(buffer, self.read1)

    @staticmethod
    def _into(buffer: Any, read: Callable[[int], bytes]) -> int:
        view = memoryview(buffer).cast("B")
        data = read(len(view))
        view[: len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        """Like ``io.BufferedReader.readline``: up to and including the LF,
        at most ``size`` bytes, the rest at EOF; no line limit (that is
        :meth:`BlockingConnection.read_line`'s)."""
        self._checkClosed()
        conn = self._conn
        lines = conn._lines()
        limit = -1 if size is None else size
        while (line := lines.take_line(limit)) is None:
            data = conn._fill(65536)
            if not data:
                line = lines.take_rest()
                break
            lines.feed(data)
            conn._buffered = lines
        conn._buffered = lines if len(lines) else None
        return line

    def peek(self, size: int = 0) -> bytes:
        """What is buffered, reading from the socket once if nothing is."""
        self._checkClosed()
        conn = self._conn
        lines = conn._lines()
        if not len(lines) and (data := conn._fill(65536)):
            lines.feed(data)
            conn._buffered = lines
        return lines.peek()


class _DuplexFile(_Reader):
    """``makefile("rw")``: reads from the one receive buffer
    (io.BufferedRWPair would stack a second buffer that blocks until full),
    writes go straight to ``sendall``."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._conn.sendall(bytes(data))
        return len(data)


class BlockingConnection:
    """What a blocking handler gets for a stream connection.

    It looks like the seeds' client socket: ``recv``, ``send``,
    ``sendall``, ``makefile``, plus ``read_line`` (with the line limit),
    ``peer`` and ``close``. ``recv`` returns ``b""`` at EOF, and also once
    the server starts shutting down. A peer silent for the idle timeout
    makes ``recv`` raise :class:`TimeoutError`.

    ``recv``, ``read_line``, :attr:`reader` and every ``makefile()`` read
    from one receive buffer, so bytes one of them buffered are the next
    one's, in order.
    """

    def __init__(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
        self.sock = sock
        self.peer = peer
        self.limits = group.limits
        self.stats = ConnectionStats(peer)
        self._group = group
        # The one receive buffer, made by the first read_line or reader; and
        # the same object while it holds bytes, else None: recv's one check.
        self._line_buffer: LineBuffer | None = None
        self._buffered: LineBuffer | None = None
        self._reader: _Reader | None = None
        # 1 while a recv (``_reading``) or a send (``_writing``) waits on the
        # peer, two flags so that a reader thread and a writer thread never
        # share one; a call that ends having moved bytes changes the byte
        # counts, and one that ends without (EOF, an error) bumps
        # ``_quiet_ends``. So ``activity()`` changes whenever a wait begins
        # or ends, for two stores per call and no clock read.
        self._reading = 0
        self._writing = 0
        self._quiet_ends = 0
        self.idle_seen: object = None
        self.idle_since = 0.0
        self.timed_out = False
        self._closed = False
        # Why sendall must refuse (close() or shutdown_write()), else None.
        self._send_refused: str | None = None

    # -- socket-like API -------------------------------------------------------

    # recv, _fill and sendall are the hot path, kept to as few bytecodes as
    # their promises allow (counted with callgrind: each line costs).
    # ``self.sock.recv`` beats a bound method kept on the instance, whose
    # lookup CPython 3.11 cannot specialize.

    def recv(self, bufsize: int = 65536) -> bytes:
        if self._buffered is not None:
            return self._take(bufsize)
        self._reading = 1
        try:
            data = self.sock.recv(bufsize)
        except BaseException as exc:
            self._reading = 0
            self._quiet_ends += 1
            if self.timed_out and isinstance(exc, OSError):
                raise IdleTimeout("idle timeout") from None
            raise
        self._reading = 0
        if data:
            self.stats.bytes_in += len(data)
            return data
        return self._empty()

    def _fill(self, bufsize: int) -> bytes:
        """One counted, watched read from the socket: ``recv`` without the
        buffer check (recv keeps its own copy of this, one call fewer)."""
        self._reading = 1
        try:
            data = self.sock.recv(bufsize)
        except BaseException as exc:
            self._reading = 0
            self._quiet_ends += 1
            if self.timed_out and isinstance(exc, OSError):
                raise IdleTimeout("idle timeout") from None
            raise
        self._reading = 0
        if data:
            self.stats.bytes_in += len(data)
            return data
        return self._empty()

    def _empty(self) -> bytes:
        """A recv that returned no byte: EOF, or the idle rule's shutdown."""
        self._quiet_ends += 1
        if self.timed_out:
            raise IdleTimeout("idle timeout")
        return b""

    def sendall(self, data: bytes) -> None:
        if self._send_refused is not None:
            raise LocalProtocolError(self._send_refused)
        if type(data) is not bytes:
            check_output_type(data, "BlockingConnection.sendall")
        self._writing = 1
        try:
            self.sock.sendall(data)
        except BaseException as exc:
            self._writing = 0
            self._quiet_ends += 1
            if self.timed_out and isinstance(exc, OSError):
                raise IdleTimeout("idle timeout") from None
            raise
        self._writing = 0
        # An empty sendall moves nothing and never waits: not activity.
        self.stats.bytes_out += len(data)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    write = sendall

    def read_line(self, *, keep_end: bool = False) -> bytes:
        """One line (LF or CRLF ended), without its end unless ``keep_end``;
        at most ``Limits.max_line`` bytes, else :class:`LineTooLong`, raised
        before more than one read past the limit is buffered. ``b""`` at
        EOF, or the unterminated rest of the data."""
        lines = self._lines()
        while True:
            line = lines.next_line_with_end() if keep_end else lines.next_line()
            if line is not None:
                self._buffered = lines if len(lines) else None
                return line
            data = self._fill(65536)
            if not data:
                break
            lines.feed(data)
            # Set before the next look, which may raise LineTooLong: what is
            # buffered stays first in line for any later read.
            self._buffered = lines
        self._buffered = None
        rest = lines.take_rest()
        limit = lines.max_line
        if len(rest) > limit:
            raise LineTooLong(limit)
        if not keep_end and rest.endswith(b"\r"):
            rest = rest[:-1]
        return rest

    def _lines(self) -> LineBuffer:
        lines = self._line_buffer
        if lines is None:
            lines = self._line_buffer = LineBuffer(self.limits.max_line)
        return lines

    def _take(self, size: int) -> bytes:
        """Up to ``size`` buffered bytes (there are some)."""
        lines = self._lines()
        data = lines.take(size)
        if not len(lines):
            self._buffered = None
        return data

    @property
    def reader(self) -> io.BufferedIOBase:
        """A binary reader (readline, read, read1, peek…) over the one
        receive buffer that ``recv`` and ``read_line`` share."""
        if self._reader is None:
            self._reader = _Reader(self)
        return self._reader

    def makefile(self, mode: str = "r", buffering: int | None = None, **text: Any) -> Any:
        """Like ``socket.makefile``; reads share the one receive buffer."""
        binary = "b" in mode
        if "w" in mode and "r" not in mode:
            raw_w: Any = _SocketIO(self)
            if binary and buffering == 0:
                return raw_w
            writer = io.BufferedWriter(raw_w) if buffering != 0 else raw_w
            return writer if binary else io.TextIOWrapper(writer, write_through=True, **text)
        if "r" in mode and "w" not in mode:
            # A reader of its own (closing it leaves the others), over the
            # same buffer. Text mode decodes ahead, as socket.makefile does.
            reader = _Reader(self)
            return reader if binary else io.TextIOWrapper(reader, **text)
        duplex = _DuplexFile(self)
        if binary:
            return duplex
        return io.TextIOWrapper(duplex, write_through=True, line_buffering=True, **text)

    def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF."""
        if self._send_refused is None:
            self._send_refused = "sendall after shutdown_write()"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._send_refused = "sendall after close()"
            self.sock.close()

    # -- the core's Connection interface (called on the loop thread) ----------

    def begin_shutdown(self) -> None:
        # Waiting recvs return b"" (EOF): an idle handler ends on its own,
        # a busy one finishes its work and may still send.
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def abort(self) -> None:
        self.stats.set_reason("aborted at the end of the grace period")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def activity(self) -> object:
        reading, writing = self._reading, self._writing
        if not (reading or writing):
            return None  # not waiting on the peer: busy, or between calls
        stats = self.stats
        return (reading, writing, self._quiet_ends, stats.bytes_in, stats.bytes_out)

    def idle_expired(self) -> None:
        if self.timed_out:
            return
        self.timed_out = True
        self.stats.set_reason("idle timeout")
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class DatagramConnection:
    """What a blocking handler gets for one datagram: ``recv`` returns the
    datagram once, then ``b""``; ``sendall`` replies to its sender."""

    def __init__(
        self,
        data: bytes,
        addr: Any,
        transport: asyncio.DatagramTransport,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        budget: int | None = None,
        counts: ServiceCounts | None = None,
    ) -> None:
        self.peer = format_peer(addr)
        self._size = len(data)
        self._counts = counts
        self.answered = False
        self._data: bytes | None = data
        self._addr = addr
        self._transport = transport
        self._sock = sock
        self._loop = loop
        # Bytes the replies to this datagram may add up to (the UDP
        # amplification guard); None: no limit.
        self._budget = budget

    def recv(self, bufsize: int = 65536) -> bytes:
        data, self._data = self._data or b"", None
        return data[:bufsize]

    def sendall(self, data: bytes) -> None:
        if not self._addr:
            raise ConnectionClosed("the peer has no address to reply to (unbound unixgram)")
        if self._budget is not None:
            if len(data) > self._budget:
                raise ConnectionClosed(
                    f"reply of {len(data)} B exceeds the amplification limit"
                    f" ({self._budget} B left)"
                )
            self._budget -= len(data)
        # The request's bytes count once, with its first reply.
        size = 0 if self.answered else self._size
        self.answered = True
        self._loop.call_soon_threadsafe(self._send, bytes(data), size)

    def _send(self, data: bytes, request_size: int) -> None:
        """On the loop: counted, then sent (who has the reply finds it counted)."""
        counts = self._counts
        if counts is not None:
            counts.answered += 1
            counts.bytes_in += request_size
            counts.bytes_out += len(data)
        send_datagram(self._transport, self._sock, data, self._addr)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    write = sendall

    def read_line(self, *, keep_end: bool = False) -> bytes:
        data = self.recv()
        return data if keep_end else data.rstrip(b"\r\n")

    def close(self) -> None:
        pass


class _DatagramEndpoint(DatagramSocket):
    """One datagram socket: each datagram to a handler thread."""

    def __init__(
        self, driver: BlockingDriver, group: ConnectionGroup, sock: socket.socket
    ) -> None:
        super().__init__(group, sock)
        self.driver = driver

    def datagram_received(self, data: bytes, addr: Any) -> None:
        pool = self.driver.pool
        if pool.backlog > pool.size * 4:
            # Every thread busy and a queue behind them: drop, as a full
            # socket buffer would, rather than queue without bound.
            self.group.count_dropped("handler_busy")
            self.group.log.debug(
                "%s: datagram dropped, all handler threads busy", format_peer(addr)
            )
            return
        assert self.transport is not None
        if self.admit(data, addr) is None:
            return
        access = self.group.access
        budget = None if access is None else access.policy.reply_allowance(len(data))
        conn = DatagramConnection(
            data, addr, self.transport, self.sock, self.group.loop, budget, self.group.counts
        )
        pool.submit(lambda: self.driver.run_datagram(conn, self.group))


def _on_loop(group: ConnectionGroup, count: Callable[..., None], *args: str) -> None:
    """Count from a handler thread: the counters belong to the loop's thread."""
    try:
        group.loop.call_soon_threadsafe(count, *args)
    except RuntimeError:  # the loop is closed: the server is gone
        pass


class BlockingDriver(Driver):
    """Serves a blocking ``def handle(conn)`` on any endpoint."""

    name = "blocking"

    def __init__(self, handler: BlockingHandler) -> None:
        self.handler = handler
        self.pool = _ThreadPool(64, "sockworks-handler")

    def supports(self, endpoint: Endpoint) -> bool:
        return True

    def max_connections(self, limits: Limits) -> int:
        self.pool.size = limits.handler_threads
        return min(limits.max_connections, limits.handler_threads)

    def start_socket(
        self,
        sock: socket.socket,
        peer: Peer,
        group: ConnectionGroup,
        *,
        original: socket.socket | None = None,
    ) -> None:
        sock.setblocking(True)
        conn = BlockingConnection(sock, peer, group)
        group.opened(conn)
        if group.shutting_down:
            conn.begin_shutdown()
        self.pool.submit(lambda: self._run_stream(conn, group))

    def _run_stream(self, conn: BlockingConnection, group: ConnectionGroup) -> None:
        try:
            self.handler(conn)
        except RemoteProtocolError as exc:
            conn.stats.set_reason(exc.reason)
        except (ConnectionClosed, *PEER_GONE) as exc:
            conn.stats.set_reason(describe(exc))
            group.log.debug("%s: %s", conn.peer, exc)
        except LocalProtocolError:
            _on_loop(group, group.count_handler_error)
            group.log.exception("%s: handler error", conn.peer,
                                extra={"event": "error", "peer": conn.peer})
            conn.stats.set_reason("internal error")
        except OSError as exc:
            conn.stats.set_reason(describe(exc))
            group.log.debug("%s: %s", conn.peer, exc)
        except Exception:
            _on_loop(group, group.count_handler_error)
            group.log.exception("%s: handler error", conn.peer,
                                extra={"event": "error", "peer": conn.peer})
            conn.stats.set_reason("internal error")
        finally:
            conn.close()
            try:
                group.loop.call_soon_threadsafe(group.closed, conn)
            except RuntimeError:  # the loop is closed: the server is gone
                pass

    def run_datagram(self, conn: DatagramConnection, group: ConnectionGroup) -> None:
        try:
            self.handler(conn)
        except (RemoteProtocolError, ConnectionClosed) as exc:
            why = str(exc)
            bucket = "no_address" if "no address" in why else drop_reason(why)
            _on_loop(group, group.count_dropped, bucket)
            group.log.info("%s: datagram dropped: %s", conn.peer, exc,
                           extra={"event": "dropped", "peer": conn.peer, "reason": why})
        except Exception:
            _on_loop(group, group.count_handler_error)
            if not conn.answered:
                _on_loop(group, group.count_dropped, "handler_error")
            group.log.exception("%s: handler error on a datagram", conn.peer,
                                extra={"event": "error", "peer": conn.peer})

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> _DatagramEndpoint:
        endpoint = _DatagramEndpoint(self, group, bound.sock)
        task = group.loop.create_task(
            group.loop.create_datagram_endpoint(lambda: endpoint, sock=bound.sock)
        )
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return endpoint

    def close(self) -> None:
        self.pool.close()
