"""Helpers for testing services, shipped to users the way Trio ships
``trio.testing``.

* :class:`ProtocolTester` drives a sans-I/O :class:`StreamProtocol` in
  memory, with no socket and no event loop: feed bytes, read what it sent.
* :func:`running` starts any handler on real sockets (port 0) in a
  background thread and gives you the bound endpoints.
* :func:`chunkings` splits a byte string every possible way, for feeding a
  protocol the same input in every chunk size.
* :class:`MemoryService` runs any handler (sans-I/O, async or blocking) on
  the real connection core with in-memory connections
  (:class:`MemoryPeer`), and :class:`VirtualClockLoop` gives it a virtual
  clock that jumps to the next timer when nothing else can run (Trio's
  ``MockClock``): a five-minute idle timeout is tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any, cast

from ._access import AccessControl, AccessPolicy
from ._config import Limits, SocketOptions
from ._core import ConnectionGroup, check_output_type
from ._drivers import make_driver
from ._drivers.protocol import connect_arity
from ._endpoint import Endpoint
from ._errors import LocalProtocolError, RemoteProtocolError
from ._protocol import Output, Peer, Reply, StreamProtocol
from ._run import new_event_loop
from ._server import Server, ServiceConfig
from ._testkit import (
    MemoryPeer,
    MemoryTransport,
    VirtualClockLoop,
    memory_connection,
    new_virtual_loop,
    run_virtual,
)

__all__ = [
    "MemoryPeer",
    "MemoryService",
    "MemoryTransport",
    "ProtocolTester",
    "ServerThread",
    "VirtualClockLoop",
    "chunkings",
    "memory_connection",
    "new_virtual_loop",
    "run_virtual",
    "running",
]


class ProtocolTester:
    """An in-memory connection to a :class:`StreamProtocol`.

    Every call returns the bytes the protocol sent in response; ``sent``
    has all of them, ``closed``/``half_closed``/``reason`` its decisions.
    ``Reply(more=True)`` is honoured by calling ``on_writable`` up to
    ``pump`` times, as a peer that reads everything at once would cause;
    ``Reply(offload=fn)`` runs ``fn`` at once and carries out its output.
    Output the driver would refuse (a ``str``, bytes after a close or a
    half-close) raises :class:`~sockworks.LocalProtocolError` here too.
    """

    def __init__(self, proto: StreamProtocol, *, pump: int = 16) -> None:
        self.proto = proto
        self.pump = pump
        self.sent = bytearray()
        self.files: list[Any] = []
        self.closed = False
        self.half_closed = False
        self.reason: str | None = None
        self.wants_writable = False

    def connect(self, peer: Peer | None = None, local: Peer | None = None) -> bytes:
        peer = peer or Peer("127.0.0.1", 50000)
        local = local or Peer("127.0.0.1", 7)
        if connect_arity(self.proto) == 1:  # written before the local address was passed
            return self._do(self.proto.on_connect, peer)
        return self._do(self.proto.on_connect, peer, local)

    def feed(self, data: bytes) -> bytes:
        return self._do(self.proto.on_data, data)

    def feed_chunks(self, chunks: Iterator[bytes] | list[bytes]) -> bytes:
        out = bytearray()
        for chunk in chunks:
            if self.closed:
                break
            out += self.feed(chunk)
        return bytes(out)

    def eof(self) -> bytes:
        return self._do(self.proto.on_eof)

    def timeout(self) -> bytes:
        return self._do(self.proto.on_timeout)

    def shutdown(self) -> bytes:
        return self._do(self.proto.on_shutdown)

    def writable(self) -> bytes:
        return self._do(self.proto.on_writable)

    def _do(self, callback: Any, *args: Any) -> bytes:
        if self.closed:
            raise LocalProtocolError("the protocol already closed the connection")
        start = len(self.sent)
        try:
            self._apply(callback(*args))
        except RemoteProtocolError as exc:
            self.closed, self.reason = True, exc.reason
        rounds = 0
        while self.wants_writable and not self.closed and rounds < self.pump:
            rounds += 1
            self.wants_writable = False
            self._apply(self.proto.on_writable())
        return bytes(self.sent[start:])

    def _send(self, data: object, where: str) -> None:
        check_output_type(data, where)
        if not data:
            return
        if self.closed or self.half_closed:
            state = "closed" if self.closed else "half-closed"
            raise LocalProtocolError(f"cannot send: the connection is {state}")
        self.sent += cast(bytes, data)

    def _apply(self, out: Output) -> None:
        where = type(self.proto).__name__
        if out is None:
            return
        if not isinstance(out, Reply):
            self._send(out, where)
            return
        if out.offload is not None and (out.file or out.close or out.half_close or out.more):
            raise LocalProtocolError("Reply(offload=...) may only come with data")
        self._send(out.data, where)
        if out.file is not None:
            self.files.append(out.file)
        if out.offload is not None:
            self._apply(out.offload())
            return
        if out.half_close:
            if self.half_closed:
                raise LocalProtocolError("cannot half-close twice")
            self.half_closed = True
        if out.close:
            self.closed = True
            self.reason = out.reason
        self.wants_writable = out.more


def chunkings(data: bytes, max_sizes: int | None = None) -> Iterator[list[bytes]]:
    """``data`` whole, then split into chunks of every size 1..len-1."""
    yield [data]
    sizes = range(1, max(len(data), 1))
    if max_sizes is not None:
        sizes = range(1, min(len(data), max_sizes + 1))
    for size in sizes:
        yield [data[i : i + size] for i in range(0, len(data), size)]


class ServerThread:
    """A :class:`Server` running in a background thread with its own loop.

    Binding happens in ``__enter__``, in the caller's thread, so bind errors
    raise there. ``endpoints`` has the real bound endpoints.
    """

    def __init__(self, *services: ServiceConfig, grace: float = 2.0) -> None:
        self.server = Server(list(services), grace=grace)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.finished_in_grace: bool | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return [e for _, e in self.server.endpoints]

    def endpoint(self, transport: str | None = None) -> Endpoint:
        """The first bound endpoint, or the first of ``transport``."""
        for e in self.endpoints:
            if transport is None or e.transport == transport:
                return e
        raise LookupError(f"no {transport} endpoint")

    def __enter__(self) -> ServerThread:
        self.server.bind()
        self._thread = threading.Thread(target=self._run, name="sockworks-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("server did not start within 10 s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the caller
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        await self.server.start()
        self._ready.set()
        await self.server.wait_stopped()
        self.finished_in_grace = await self.server.shutdown()

    def call(self, func: Any, *args: Any) -> None:
        """Run ``func(*args)`` on the server's loop thread."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(func, *args)

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.stop)
            self._thread.join(timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def running(
    handler: Any,
    *listen: str | Endpoint,
    limits: Limits | None = None,
    options: SocketOptions | None = None,
    grace: float = 2.0,
    name: str | None = None,
) -> ServerThread:
    """``with running(handler, "tcp:127.0.0.1:0") as srv: srv.endpoint()``."""
    config = ServiceConfig.create(
        handler, listen or ("tcp:127.0.0.1:0",), name=name, limits=limits, options=options
    )
    return ServerThread(config, grace=grace)


class MemoryService:
    """A service on the real connection core, reached through in-memory
    connections: what ``running()`` is for real sockets, with no socket,
    no port and (on a :class:`VirtualClockLoop`) no waiting.

    Create it inside a running loop; ``connect()`` opens a connection to
    ``handler`` (any style). Sans-I/O and async handlers get a
    :class:`MemoryPeer`; a blocking handler, which needs a real socket for
    its thread, gets the client end of a ``socketpair``.
    """

    def __init__(
        self,
        handler: Any,
        *,
        limits: Limits | None = None,
        name: str = "memory",
        access: AccessPolicy | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.driver = make_driver(handler)
        control = AccessControl(access, self.loop.time) if access is not None else None
        self.group = ConnectionGroup(
            name, self.driver, self.loop, limits=limits or Limits(), access=control
        )
        self._factory = self.driver.connection_factory(self.group)

    def connect(
        self,
        *,
        peer: tuple[str, int] = ("127.0.0.1", 50000),
        receive_window: int | None = None,
    ) -> MemoryPeer:
        """A new connection from ``peer``; the test plays the client."""
        if self._factory is None:
            raise TypeError("a blocking handler needs a socket: use connect_socket()")
        _transport, client = memory_connection(
            self._factory(), loop=self.loop, peer=peer, receive_window=receive_window
        )
        return client

    def connect_socket(self, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> socket.socket:
        """For a blocking handler: the client end of a socketpair whose other
        end the handler's thread serves."""
        client, server = socket.socketpair()
        self.driver.start_socket(server, Peer(*peer), self.group)
        return client

    @property
    def live(self) -> int:
        """Connections being served now."""
        return len(self.group.live)

    async def wait_idle(self) -> None:
        """Until every connection has ended."""
        await self.group.wait_idle()

    async def shutdown(self, grace: float = 5.0) -> bool:
        """What the server does on SIGTERM: every connection is told, has
        ``grace`` seconds to finish, then is aborted. True: all finished."""
        group = self.group
        group.shutting_down = True
        group.start_held_for_shutdown()
        for conn in list(group.live):
            conn.begin_shutdown()
        try:
            await asyncio.wait_for(group.wait_idle(), grace)
            done = True
        except TimeoutError:
            done = False
            for conn in list(group.live):
                conn.abort()
            await asyncio.sleep(0)
        group.stop()
        self.driver.close()
        return done
