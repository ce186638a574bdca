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
    """Raw I/O over a :class:`BlockingConnection`, so buffered readers and
    writers are counted and watched like recv and sendall."""

    def __init__(self, conn: BlockingConnection) -> None:
        super().__init__()
        self._conn = conn

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._conn._recv_into(buffer)

    def write(self, data: Any) -> int:
        self._conn.sendall(bytes(data))
        return len(data)


class _DuplexFile(io.BufferedIOBase):
    """``makefile("rw")``: reads from the connection's one buffered reader
    (io.BufferedRWPair would stack a second buffer that blocks until full),
    writes go straight to ``sendall``."""

    def __init__(self, conn: BlockingConnection) -> None:
        super().__init__()
        self._conn = conn

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._conn.reader.read(size)

    def read1(self, size: int = -1) -> bytes:
        return self._conn.reader.read1(size)

    def readinto(self, buffer: Any) -> int:
        return self._conn.reader.readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        return self._conn.reader.readline(size)

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
    """

    def __init__(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
        self.sock = sock
        self.peer = peer
        self.limits = group.limits
        self.stats = ConnectionStats(peer)
        self._group = group
        self._reader: io.BufferedReader | None = None
        # Odd while a recv (``_reading``) or a send (``_writing``) is in
        # progress: bumped before and after each call, two counters so that
        # a reader thread and a writer thread never share one. Two integer
        # increments cost less than reading the clock (this is the hot path);
        # the idle sweep compares them, with the byte counts, between looks.
        self._reading = 0
        self._writing = 0
        self.idle_seen: object = None
        self.idle_since = 0.0
        self.timed_out = False
        self._closed = False
        self._write_shut = False  # shutdown_write() called

    # -- socket-like API -------------------------------------------------------

    def recv(self, bufsize: int = 65536) -> bytes:
        if self._reader is not None:
            return self._reader.read1(bufsize)
        self._reading += 1
        try:
            data = self.sock.recv(bufsize)
        except OSError:
            if self.timed_out:
                raise IdleTimeout("idle timeout") from None
            raise
        finally:
            self._reading += 1
        if not data and self.timed_out:
            raise IdleTimeout("idle timeout")
        self.stats.bytes_in += len(data)
        return data

    def _recv_into(self, buffer: Any) -> int:
        self._reading += 1
        try:
            n = self.sock.recv_into(buffer)
        except OSError:
            if self.timed_out:
                raise IdleTimeout("idle timeout") from None
            raise
        finally:
            self._reading += 1
        if not n and self.timed_out:
            raise IdleTimeout("idle timeout")
        self.stats.bytes_in += n
        return n

    def sendall(self, data: bytes) -> None:
        if self._closed:
            raise LocalProtocolError("sendall after close()")
        if self._write_shut:
            raise LocalProtocolError("sendall after shutdown_write()")
        check_output_type(data, "BlockingConnection.sendall")
        self._writing += 1
        try:
            self.sock.sendall(data)
        except OSError:
            if self.timed_out:
                raise IdleTimeout("idle timeout") from None
            raise
        finally:
            self._writing += 1
        self.stats.bytes_out += len(data)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    write = sendall

    def read_line(self, *, keep_end: bool = False) -> bytes:
        """One line, at most ``Limits.max_line`` bytes (else :class:`LineTooLong`);
        ``b""`` at EOF."""
        limit = self.limits.max_line
        line = self.reader.readline(limit + 2)
        if line and not line.endswith(b"\n") and len(line) > limit:
            raise LineTooLong(limit)
        if not keep_end:
            line = line.rstrip(b"\n")
            if line.endswith(b"\r"):
                line = line[:-1]
        if len(line) > limit + (2 if keep_end else 0):
            raise LineTooLong(limit)
        return line

    @property
    def reader(self) -> io.BufferedReader:
        """A buffered binary reader (readline, read…); ``recv`` shares its buffer."""
        if self._reader is None:
            self._reader = io.BufferedReader(_SocketIO(self), 65536)
        return self._reader

    def makefile(self, mode: str = "r", buffering: int | None = None, **text: Any) -> Any:
        """Like ``socket.makefile``; reads share :attr:`reader`'s buffer."""
        binary = "b" in mode
        if "w" in mode and "r" not in mode:
            raw_w: Any = _SocketIO(self)
            if binary and buffering == 0:
                return raw_w
            writer = io.BufferedWriter(raw_w) if buffering != 0 else raw_w
            return writer if binary else io.TextIOWrapper(writer, write_through=True, **text)
        if "r" in mode and "w" not in mode:
            return self.reader if binary else io.TextIOWrapper(self.reader, **text)
        duplex = _DuplexFile(self)
        if binary:
            return duplex
        return io.TextIOWrapper(duplex, write_through=True, line_buffering=True, **text)

    def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF."""
        self._write_shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
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
        if not (reading & 1 or writing & 1):
            return None  # not waiting on the peer: busy, or between calls
        stats = self.stats
        return (reading, writing, stats.bytes_in, stats.bytes_out)

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
    ) -> None:
        self.peer = format_peer(addr)
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
        self._loop.call_soon_threadsafe(
            send_datagram, self._transport, self._sock, bytes(data), self._addr
        )

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
            self.group.log.debug(
                "%s: datagram dropped, all handler threads busy", format_peer(addr)
            )
            return
        assert self.transport is not None
        if self.admit(data, addr) is None:
            return
        access = self.group.access
        budget = None if access is None else access.policy.reply_allowance(len(data))
        conn = DatagramConnection(data, addr, self.transport, self.sock, self.group.loop, budget)
        pool.submit(lambda: self.driver.run_datagram(conn, self.group))


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

    def start_socket(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
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
            group.log.exception("%s: handler error", conn.peer)
            conn.stats.set_reason("internal error")
        except OSError as exc:
            conn.stats.set_reason(describe(exc))
            group.log.debug("%s: %s", conn.peer, exc)
        except Exception:
            group.log.exception("%s: handler error", conn.peer)
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
            group.log.info("%s: datagram dropped: %s", conn.peer, exc)
        except Exception:
            group.log.exception("%s: handler error on a datagram", conn.peer)

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> _DatagramEndpoint:
        endpoint = _DatagramEndpoint(self, group, bound.sock)
        task = group.loop.create_task(
            group.loop.create_datagram_endpoint(lambda: endpoint, sock=bound.sock)
        )
        task.add_done_callback(lambda t: None if t.cancelled() else t.exception())
        return endpoint

    def close(self) -> None:
        self.pool.close()
