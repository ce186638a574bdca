"""Helpers for testing services, shipped to users the way Trio ships
``trio.testing``.

* :class:`ProtocolTester` drives a sans-I/O :class:`StreamProtocol` in
  memory, with no socket and no event loop: feed bytes, read what it sent.
* :func:`running` starts any handler on real sockets (port 0) in a
  background thread and gives you the bound endpoints.
* :func:`chunkings` splits a byte string every possible way, for feeding a
  protocol the same input in every chunk size.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ._config import Limits, SocketOptions
from ._endpoint import Endpoint
from ._errors import RemoteProtocolError
from ._protocol import Output, Peer, Reply, StreamProtocol
from ._run import new_event_loop
from ._server import Server, ServiceConfig

__all__ = ["ProtocolTester", "ServerThread", "chunkings", "running"]


class ProtocolTester:
    """An in-memory connection to a :class:`StreamProtocol`.

    Every call returns the bytes the protocol sent in response; ``sent``
    has all of them, ``closed``/``half_closed``/``reason`` its decisions.
    ``Reply(more=True)`` is honoured by calling ``on_writable`` up to
    ``pump`` times, as a peer that reads everything at once would cause.
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

    def connect(self, peer: Peer | None = None) -> bytes:
        return self._do(self.proto.on_connect, peer or Peer("127.0.0.1", 50000))

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
            raise AssertionError("the protocol already closed the connection")
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

    def _apply(self, out: Output) -> None:
        if out is None:
            return
        if isinstance(out, bytes):
            self.sent += out
            return
        assert isinstance(out, Reply), f"protocol returned {out!r}"
        self.sent += out.data
        if out.file is not None:
            self.files.append(out.file)
        if out.half_close:
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
