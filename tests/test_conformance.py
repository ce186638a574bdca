"""The conformance suite: one set of scenarios, each run against the three
handler styles (sans-I/O protocol, async ``handle(stream)``, blocking
``handle(conn)``) implementing the same behaviour.

Models: Trio's ``check_two_way_stream`` / ``check_half_closeable_stream``
and its ``MockClock``. The sans-I/O and async styles run on
:class:`~sockworks.testing.MemoryService` connections inside
:func:`~sockworks.testing.run_virtual` (a virtual clock: a 300 s idle
timeout takes no real time; events are ordered by ``loop.wait_idle()`` and
the peer's own receive calls, never by sleeping). The blocking style needs
a real socket for its thread: its scenarios use
``MemoryService.connect_socket()`` (a socketpair) inside
``loop.real_time()``, with short timeouts. No test binds a port.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockworks import (
    ConnectionClosed,
    IdleTimeout,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    StreamProtocol,
)
from sockworks.testing import MemoryPeer, MemoryService, ProtocolTester, run_virtual

STYLES = ["sansio", "async", "blocking"]
MEMORY_STYLES = ["sansio", "async"]
LOGGER = "sockworks.memory"

# Idle timeouts: on the virtual clock the real default (it costs nothing);
# the blocking style runs in real time, so a short one.
VIRTUAL_T = 300.0
REAL_T = 0.3
# A guard on every scenario: virtual seconds, or real seconds (blocking).
VIRTUAL_GUARD = 100_000.0
REAL_GUARD = 10.0


def idle_t(style: str) -> float:
    return REAL_T if style == "blocking" else VIRTUAL_T


# -- one client interface for both transports ----------------------------------


class Client:
    """The test's end of a connection: a MemoryPeer, or a socketpair end."""

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        raise NotImplementedError

    async def receive(self, max: int = 65536) -> bytes:
        raise NotImplementedError

    async def receive_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.receive(n - len(buf))
            assert chunk, f"EOF after {len(buf)} of {n} bytes"
            buf += chunk
        return bytes(buf)

    async def receive_all(self) -> bytes:
        buf = bytearray()
        while chunk := await self.receive():
            buf += chunk
        return bytes(buf)


class MemClient(Client):
    def __init__(self, peer: MemoryPeer) -> None:
        self.peer = peer

    async def send(self, data: bytes) -> None:
        self.peer.send(data)
        await asyncio.sleep(0)  # let the server run between sends

    async def send_eof(self) -> None:
        self.peer.send_eof()

    async def receive(self, max: int = 65536) -> bytes:
        return await self.peer.receive(max)


class SockClient(Client):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def send_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    async def receive(self, max: int = 65536) -> bytes:
        try:
            return await self.loop.sock_recv(self.sock, max)
        except ConnectionResetError:
            return b""


class Harness:
    """One service of one style, and the clients connected to it."""

    def __init__(self, style: str, handler: Any, limits: Limits | None) -> None:
        self.style = style
        self.loop = asyncio.get_running_loop()
        self.service = MemoryService(handler, limits=limits)
        self.sockets: list[socket.socket] = []

    def connect(self, receive_window: int | None = None) -> Client:
        if self.style == "blocking":
            sock = self.service.connect_socket()
            self.sockets.append(sock)
            return SockClient(sock)
        return MemClient(self.service.connect(receive_window=receive_window))

    @property
    def memory(self) -> bool:
        return self.style != "blocking"

    async def settle(self) -> None:
        """Memory styles: until the service has done all it will do for now."""
        assert self.memory
        await self.loop.wait_idle()  # type: ignore[attr-defined]

    async def ended(self) -> None:
        """Until every connection of the service has ended."""
        if self.memory:
            # A memory connection starts on the loop's next iteration:
            # until then the service has nothing live to wait for.
            await self.settle()
        await self.service.wait_idle()

    def now(self) -> float:
        return self.loop.time()

    @property
    def conn(self) -> Any:
        (conn,) = self.service.group.live
        return conn


Scenario = Callable[[Harness], Awaitable[None]]


def run(style: str, handler: Any, scenario: Scenario, *, limits: Limits | None = None) -> None:
    """Run ``scenario`` against ``handler`` served in ``style``; at the end
    every connection must have ended."""

    async def main() -> None:
        h = Harness(style, handler, limits)
        loop = h.loop
        try:
            if style == "blocking":
                with loop.real_time():  # type: ignore[attr-defined]
                    async with asyncio.timeout(REAL_GUARD):
                        await scenario(h)
                        await h.ended()
            else:
                async with asyncio.timeout(VIRTUAL_GUARD):
                    await scenario(h)
                    await h.ended()
            assert h.service.live == 0
        finally:
            for sock in h.sockets:
                sock.close()
            h.service.group.stop()
            h.service.driver.close()

    run_virtual(main())


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " closed after " in r.getMessage()]


# -- the same behaviours, in three styles ---------------------------------------


def echo(style: str, events: list[Any] | None = None) -> Any:
    """Echo until EOF; an idle timeout is recorded in ``events``."""
    record = events if events is not None else []
    if style == "sansio":

        class Echo(StreamProtocol):
            def on_data(self, data: bytes) -> bytes:
                return data

            def on_timeout(self) -> Reply:
                record.append("timeout")
                return super().on_timeout()  # type: ignore[return-value]

        return Echo
    if style == "async":

        async def handle(stream: Any) -> None:
            try:
                while data := await stream.read():
                    await stream.write(data)
            except IdleTimeout:
                record.append("timeout")
                raise

        return handle

    def handle_blocking(conn: Any) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except IdleTimeout:
            record.append("timeout")
            raise

    return handle_blocking


def producer(style: str, chunks: list[bytes], events: list[Any] | None = None) -> Any:
    """Write ``chunks`` one by one (paced by flow control), then close."""
    record = events if events is not None else []
    if style == "sansio":

        class Producer(StreamProtocol):
            i = 0

            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return self._next()

            def on_writable(self) -> Reply:
                return self._next()

            def _next(self) -> Reply:
                i = self.i
                self.i += 1
                last = i == len(chunks) - 1
                return Reply(data=chunks[i], more=not last, close=last)

            def on_timeout(self) -> Reply:
                record.append("timeout")
                return super().on_timeout()  # type: ignore[return-value]

        return Producer
    if style == "async":

        async def handle(stream: Any) -> None:
            try:
                for chunk in chunks:
                    await stream.write(chunk)
            except IdleTimeout:
                record.append("timeout")
                raise

        return handle

    def handle_blocking(conn: Any) -> None:
        try:
            for chunk in chunks:
                conn.sendall(chunk)
        except IdleTimeout:
            record.append("timeout")
            raise

    return handle_blocking


def respond_after_eof(style: str) -> Any:
    """Read the whole request (to the peer's EOF), then answer: the peer's
    half-close reaches the handler, which can still send afterwards."""

    def answer(request: bytes) -> bytes:
        return b"%d:" % len(request) + request[::-1]

    if style == "sansio":

        class Responder(StreamProtocol):
            def __init__(self) -> None:
                self.request = bytearray()

            def on_data(self, data: bytes) -> None:
                self.request += data

            def on_eof(self) -> Reply:
                return Reply(data=answer(bytes(self.request)), close=True)

        return Responder
    if style == "async":

        async def handle(stream: Any) -> None:
            request = bytearray()
            while data := await stream.read():
                request += data
            await stream.write(answer(bytes(request)))

        return handle

    def handle_blocking(conn: Any) -> None:
        request = bytearray()
        while data := conn.recv(65536):
            request += data
        conn.sendall(answer(bytes(request)))

    return handle_blocking


def greet_half_close_then_read(style: str, received: list[bytes]) -> Any:
    """Send a greeting and half-close at once; then read all the peer sends
    (recorded in ``received``, EOF as ``b""``)."""
    if style == "sansio":

        class Greeter(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return Reply(data=b"hello\n", half_close=True)

            def on_data(self, data: bytes) -> None:
                received.append(data)

            def on_eof(self) -> Reply:
                received.append(b"")
                return Reply(close=True)

        return Greeter
    if style == "async":

        async def handle(stream: Any) -> None:
            await stream.write(b"hello\n")
            stream.write_eof()
            while True:
                data = await stream.read()
                received.append(data)
                if not data:
                    return

        return handle

    def handle_blocking(conn: Any) -> None:
        conn.sendall(b"hello\n")
        conn.shutdown_write()
        while True:
            data = conn.recv(65536)
            received.append(data)
            if not data:
                return

    return handle_blocking


# -- ordering ---------------------------------------------------------------------


def random_chunks(seed: int, count: int, max_size: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, max_size)) for _ in range(count)]


async def echo_both_ways(h: Harness, chunks: list[bytes], window: int | None) -> None:
    """Send ``chunks`` while reading the echo at the same time; the echo
    must be the input, in order, then EOF after ours."""
    client = h.connect(receive_window=window)
    expected = b"".join(chunks)
    got = bytearray()

    async def reader() -> None:
        while len(got) < len(expected):
            data = await client.receive(4096)
            assert data, f"EOF after {len(got)} of {len(expected)} bytes"
            got.extend(data)

    task = asyncio.create_task(reader())
    for chunk in chunks:
        await client.send(chunk)
    await task
    assert bytes(got) == expected
    await client.send_eof()
    assert await client.receive_all() == b""


@pytest.mark.parametrize("style", STYLES)
def test_ordering_echo_many_random_chunks_both_directions(style: str) -> None:
    chunks = random_chunks(seed=8, count=300, max_size=3000)
    # A small output buffer and a small window: both directions fill up and
    # flow control is exercised while bytes move both ways.
    limits = Limits(max_output_buffer=2048)
    run(style, echo(style), lambda h: echo_both_ways(h, chunks, window=1000), limits=limits)


@pytest.mark.parametrize("style", STYLES)
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=30))
def test_ordering_echo_hypothesis_chunks(style: str, chunks: list[bytes]) -> None:
    run(style, echo(style), lambda h: echo_both_ways(h, chunks, window=None),
        limits=Limits(max_output_buffer=4096))


@pytest.mark.parametrize("style", STYLES)
def test_ordering_producer_chunks_arrive_in_order_and_complete(style: str) -> None:
    chunks = [b"%05d:" % i + bytes(random.Random(i).randbytes(i % 977)) for i in range(400)]

    async def scenario(h: Harness) -> None:
        client = h.connect()
        assert await client.receive_all() == b"".join(chunks)

    run(style, producer(style, chunks), scenario)


# -- half-close, both ways ----------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_peer_half_close_reaches_handler_which_still_sends(style: str) -> None:
    request = random.Random(1).randbytes(50_000)

    async def scenario(h: Harness) -> None:
        client = h.connect()
        for i in range(0, len(request), 7000):
            await client.send(request[i : i + 7000])
        await client.send_eof()
        assert await client.receive_all() == b"50000:" + request[::-1]

    run(style, respond_after_eof(style), scenario)


@pytest.mark.parametrize("style", STYLES)
def test_handler_half_close_reaches_peer_which_still_sends(style: str) -> None:
    received: list[bytes] = []
    payload = [b"one\n", b"two\n", b"x" * 20_000]

    async def scenario(h: Harness) -> None:
        client = h.connect()
        # The greeting, then EOF, while the connection is still open.
        assert await client.receive_all() == b"hello\n"
        assert h.service.live == 1
        for part in payload:
            await client.send(part)
        await client.send_eof()
        await h.ended()

    run(style, greet_half_close_then_read(style, received), scenario)
    assert b"".join(received) == b"".join(payload)
    assert received[-1] == b"", "the handler never saw the peer's EOF"


# -- concurrent writers under flow control (bug 1) -----------------------------------


def tagged(writer: str, n: int, size: int) -> list[bytes]:
    return [(b"<%s%04d" % (writer.encode(), i)).ljust(size - 1, b".") + b">" for i in range(n)]


def check_tagged(data: bytes, writers: dict[str, list[bytes]]) -> None:
    """Every writer's chunks arrived whole, in its own order."""
    chunks = [c + b">" for c in data.split(b">") if c]
    for name, sent in writers.items():
        mine = [c for c in chunks if c.startswith(b"<" + name.encode())]
        assert mine == sent, f"writer {name}: {len(mine)} of {len(sent)} chunks, in order?"
    assert len(chunks) == sum(len(s) for s in writers.values())


def test_async_two_writers_small_buffer_slow_reader_both_finish() -> None:
    """Bug 1: two tasks writing to one Stream with a small ``max_output``
    buffer; the peer reads slowly. Both writers must wake and finish."""
    a, b = tagged("a", 60, 100), tagged("b", 60, 100)
    finished: list[str] = []

    async def handle(stream: Any) -> None:
        async def writer(name: str, chunks: list[bytes]) -> None:
            for chunk in chunks:
                await stream.write(chunk)
            finished.append(name)

        await asyncio.gather(writer("a", a), writer("b", b))

    async def scenario(h: Harness) -> None:
        client = h.connect(receive_window=0)
        assert isinstance(client, MemClient)
        start = h.now()
        got = bytearray()
        while chunk := await client.peer.receive(150):
            got += chunk
            await h.settle()
            # Never more than the limit plus one write per writer waits.
            assert client.peer.transport.get_write_buffer_size() <= 256 + 2 * 100
        assert sorted(finished) == ["a", "b"]
        check_tagged(bytes(got), {"a": a, "b": b})
        assert not client.peer.aborted
        assert h.now() - start < VIRTUAL_T, "ended by the idle timeout"

    run("async", handle, scenario, limits=Limits(max_output_buffer=256))


def test_sansio_paced_output_never_buffers_more_than_the_limit() -> None:
    """chargen-like ``Reply(more=True)`` pacing to a slow reader: at most
    the limit plus one chunk is ever queued, and everything arrives."""
    chunks = tagged("c", 200, 300)
    limit = 1024

    async def scenario(h: Harness) -> None:
        client = h.connect(receive_window=0)
        assert isinstance(client, MemClient)
        got = bytearray()
        high = 0
        while True:
            await h.settle()
            size = client.peer.transport.get_write_buffer_size()
            high = max(high, size)
            assert size <= limit + 300
            chunk = await client.peer.receive(200)
            if not chunk:
                break
            got += chunk
        assert high > limit  # the limit was reached: flow control was at work
        assert bytes(got) == b"".join(chunks)

    run("sansio", producer("sansio", chunks), scenario,
        limits=Limits(max_output_buffer=limit))


def test_blocking_two_threads_sendall_at_once() -> None:
    """Two threads ``sendall`` on one connection at once, past the socket
    buffers: both finish and every byte arrives."""
    size = 1 << 20
    finished: list[str] = []

    def handle(conn: Any) -> None:
        def writer(letter: bytes) -> None:
            for _ in range(size // 4096):
                conn.sendall(letter * 4096)
            finished.append(letter.decode())

        other = threading.Thread(target=writer, args=(b"b",))
        other.start()
        writer(b"a")
        other.join()

    async def scenario(h: Harness) -> None:
        client = h.connect()
        got = bytearray()
        while chunk := await client.receive(8192):
            got += chunk
        assert sorted(finished) == ["a", "b"]
        assert len(got) == 2 * size
        assert got.count(b"a") == size and got.count(b"b") == size

    run("blocking", handle, scenario, limits=Limits(idle_timeout=REAL_T))


# -- idle, in both directions (bug 2) -------------------------------------------------


def dripper(style: str, count: int, every: float, events: list[Any]) -> Any:
    """Write one byte every ``every`` seconds, ``count`` times, to a peer
    that sends nothing; then close."""
    if style == "sansio":

        class Dripper(StreamProtocol):
            # A sans-I/O protocol has no clock: its own slow work between
            # bytes is offloaded (busy with its own work, not the peer).
            sent = 0

            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return Reply(offload=self.work)

            def work(self) -> Reply:
                time.sleep(every)
                self.sent += 1
                if self.sent == count:
                    return Reply(data=b".", close=True)
                return Reply(data=b".", offload=self.work)

            def on_timeout(self) -> Reply:
                events.append("timeout")
                return super().on_timeout()  # type: ignore[return-value]

        return Dripper
    if style == "async":

        async def handle(stream: Any) -> None:
            for _ in range(count):
                await asyncio.sleep(every)
                await stream.write(b".")

        return handle

    def handle_blocking(conn: Any) -> None:
        for _ in range(count):
            time.sleep(every)
            conn.sendall(b".")

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_idle_handler_dripping_to_silent_peer_is_not_cut_off(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug 2: a handler writing a byte every 0.1 s to a peer that sends
    nothing, for several idle timeouts, delivers everything."""
    caplog.set_level(logging.INFO, LOGGER)
    events: list[Any] = []
    # The sans-I/O dripper works on a thread (real time): a short timeout.
    timeout = 1.0 if style == "async" else REAL_T
    count = int(3 * timeout / 0.1)

    async def scenario(h: Harness) -> None:
        client = h.connect()
        # The virtual clock, or a real one for the styles that drip on a
        # thread (the virtual clock follows real time only while waiting).
        clock = h.now if style == "async" else time.monotonic
        start = clock()
        assert await client.receive_all() == b"." * count
        assert clock() - start >= count * 0.1 * 0.99

    run(style, dripper(style, count, 0.1, events), scenario,
        limits=Limits(idle_timeout=timeout))
    assert events == []
    assert not any("idle timeout" in line for line in closed_lines(caplog))


def read_while_dripping(style: str, count: int, every: float, events: list[Any]) -> Any:
    """A reader waits on the silent peer while another task (thread) writes
    a byte every ``every`` s: the connection is waiting on its peer all the
    time, but bytes move outward, so it is not idle."""
    if style == "async":

        async def handle(stream: Any) -> None:
            async def drip() -> None:
                for _ in range(count):
                    await asyncio.sleep(every)
                    await stream.write(b".")

            task = asyncio.create_task(drip())
            try:
                events.append(await stream.read())
            except IdleTimeout:
                events.append("timeout")
                task.cancel()
                raise
            await task

        return handle

    def handle_blocking(conn: Any) -> None:
        def drip() -> None:
            for _ in range(count):
                time.sleep(every)
                conn.sendall(b".")

        thread = threading.Thread(target=drip)
        thread.start()
        try:
            events.append(conn.recv(1))
        except IdleTimeout:
            events.append("timeout")
            raise
        finally:
            thread.join()

    return handle_blocking


@pytest.mark.parametrize("style", ["async", "blocking"])
def test_idle_waiting_reader_while_output_drips_is_not_cut_off(style: str) -> None:
    events: list[Any] = []
    timeout = 1.0 if style == "async" else REAL_T
    count = int(3 * timeout / 0.1)

    async def scenario(h: Harness) -> None:
        client = h.connect()
        assert await client.receive_exactly(count) == b"." * count
        await client.send(b"!")
        assert await client.receive_all() == b""

    run(style, read_while_dripping(style, count, 0.1, events), scenario,
        limits=Limits(idle_timeout=timeout))
    assert events == [b"!"]


def busy_then_write(style: str, busy: float) -> Any:
    """Work ``busy`` seconds on its own (longer than the idle timeout),
    then answer: busy is not waiting on the peer."""
    if style == "sansio":

        class Busy(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return Reply(offload=self.work)

            def work(self) -> Reply:
                time.sleep(busy)
                return Reply(data=b"done", close=True)

        return Busy
    if style == "async":

        async def handle(stream: Any) -> None:
            await asyncio.sleep(busy)
            await stream.write(b"done")

        return handle

    def handle_blocking(conn: Any) -> None:
        time.sleep(busy)
        conn.sendall(b"done")

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_idle_handler_busy_longer_than_timeout_is_not_cut_off(style: str) -> None:
    timeout = 0.15 if style != "async" else VIRTUAL_T
    busy = 3 * timeout

    async def scenario(h: Harness) -> None:
        client = h.connect()
        assert await client.receive_all() == b"done"

    run(style, busy_then_write(style, busy), scenario, limits=Limits(idle_timeout=timeout))


@pytest.mark.parametrize("style", STYLES)
def test_idle_silent_peer_with_waiting_reader_is_cut_off_on_time(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    events: list[Any] = []
    timeout = idle_t(style)
    step = timeout / 20
    slack = 0.05 if style == "blocking" else 1e-6

    async def scenario(h: Harness) -> None:
        client = h.connect()
        start = h.now()
        await client.send(b"ping")
        assert await client.receive_exactly(4) == b"ping"
        assert await client.receive_all() == b""
        elapsed = h.now() - start
        assert timeout <= elapsed <= timeout * 1.05 + step + slack, elapsed

    run(style, echo(style, events), scenario, limits=Limits(idle_timeout=timeout))
    assert events == ["timeout"]
    assert [line.endswith("(idle timeout)") for line in closed_lines(caplog)] == [True]


def endless(style: str, events: list[Any]) -> Any:
    """Write forever (paced by flow control) and never read."""
    chunk = b"z" * 4096
    if style == "sansio":

        class Endless(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return Reply(data=chunk, more=True)

            def on_writable(self) -> Reply:
                return Reply(data=chunk, more=True)

            def on_timeout(self) -> Reply:
                events.append("timeout")
                return super().on_timeout()  # type: ignore[return-value]

        return Endless
    if style == "async":

        async def handle(stream: Any) -> None:
            try:
                while True:
                    await stream.write(chunk)
            except IdleTimeout:
                events.append("timeout")
                raise

        return handle

    def handle_blocking(conn: Any) -> None:
        try:
            while True:
                conn.sendall(chunk)
        except IdleTimeout:
            events.append("timeout")
            raise

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_idle_peer_that_stops_reading_is_cut_off(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    events: list[Any] = []
    timeout = idle_t(style)
    step = timeout / 20

    async def scenario(h: Harness) -> None:
        client = h.connect(receive_window=0)
        start = h.now()
        await h.ended()  # the test never reads
        elapsed = h.now() - start
        assert elapsed >= timeout
        if style == "blocking":
            assert elapsed <= timeout * 1.05 + step + 0.05, elapsed
        else:
            # Idle once (the handler is told), then a closing connection
            # whose peer takes nothing for another timeout is aborted.
            assert elapsed <= 2 * (timeout * 1.05 + step), elapsed
            assert isinstance(client, MemClient) and client.peer.aborted

    run(style, endless(style, events), scenario, limits=Limits(idle_timeout=timeout))
    assert events == ["timeout"]
    assert len(closed_lines(caplog)) == 1
    assert error_records(caplog) == []


def test_idle_paced_output_to_slow_reader_is_not_idle() -> None:
    """Output taken by the peer is activity, also for a sans-I/O protocol
    that is always 'waiting': a reader taking a chunk every T/2 keeps a
    paced producer alive for many timeouts."""
    chunks = tagged("p", 40, 1000)

    async def scenario(h: Harness) -> None:
        client = h.connect(receive_window=0)
        assert isinstance(client, MemClient)
        got = bytearray()
        while True:
            await asyncio.sleep(VIRTUAL_T / 2)
            chunk = await client.peer.receive(1000)
            if not chunk:
                break
            got += chunk
        assert bytes(got) == b"".join(chunks)

    for style in MEMORY_STYLES:
        run(style, producer(style, chunks), scenario, limits=Limits(max_output_buffer=2000))


# -- shutdown with data in flight ---------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_shutdown_while_writing_delivers_what_was_written(style: str) -> None:
    chunks = tagged("s", 300, 4096)  # 1.2 MB: past the socketpair's buffers
    expected = b"".join(chunks)

    async def scenario(h: Harness) -> None:
        client = h.connect(receive_window=0)
        first = await client.receive_exactly(10_000)
        if h.memory:
            await h.settle()
        written = h.conn.stats.bytes_out
        shutdown = asyncio.create_task(h.service.shutdown(REAL_GUARD / 2 if not h.memory
                                                          else 60.0))
        rest = await client.receive_all()
        assert await shutdown is True
        got = first + rest
        assert len(got) >= written
        if h.memory:
            # (A blocking thread counts a sendall only once it returns.)
            assert written > 10_000, "the shutdown came before data was in flight"
        assert got == expected[: len(got)], "output corrupted"
        if style != "sansio":
            # The handler kept writing through the shutdown: all of it.
            assert got == expected
        if isinstance(client, MemClient):
            assert not client.peer.aborted

    run(style, producer(style, chunks), scenario, limits=Limits(max_output_buffer=8192))


@pytest.mark.parametrize("style", STYLES)
def test_shutdown_ends_idle_reader_at_once(style: str) -> None:
    async def scenario(h: Harness) -> None:
        client = h.connect()
        await client.send(b"hi")
        assert await client.receive_exactly(2) == b"hi"
        start = h.now()
        assert await h.service.shutdown(60.0) is True
        assert h.now() - start < (0.2 if style == "blocking" else 1e-6)
        assert await client.receive_all() == b""
        if isinstance(client, MemClient):
            assert not client.peer.aborted

    run(style, echo(style), scenario)


def stuck(style: str, release: threading.Event) -> Any:
    """Ignores shutdown and waits on something other than the peer."""
    if style == "sansio":

        class Stuck(StreamProtocol):
            def on_shutdown(self) -> None:
                return None  # carries on regardless

        return Stuck
    if style == "async":

        async def handle(stream: Any) -> None:
            await stream.write(b"working")
            await asyncio.Event().wait()

        return handle

    def handle_blocking(conn: Any) -> None:
        conn.sendall(b"working")
        release.wait(REAL_GUARD)

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_shutdown_aborts_stuck_handler_after_grace(style: str) -> None:
    release = threading.Event()
    grace = REAL_T if style == "blocking" else 30.0

    async def scenario(h: Harness) -> None:
        client = h.connect()
        if style != "sansio":
            assert await client.receive_exactly(7) == b"working"
        else:
            await h.settle()
        start = h.now()
        try:
            assert await h.service.shutdown(grace) is False
        finally:
            release.set()
        elapsed = h.now() - start
        assert grace <= elapsed <= grace + (0.1 if style == "blocking" else 1e-6)
        assert await client.receive_all() == b""
        if isinstance(client, MemClient):
            assert client.peer.aborted

    run(style, stuck(style, release), scenario)


# -- handler errors ----------------------------------------------------------------------


def failing(style: str, error: Exception, before: bytes) -> Any:
    """Send ``before``, wait for one byte from the peer, then raise ``error``."""
    if style == "sansio":

        class Failing(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> bytes:
                return before

            def on_data(self, data: bytes) -> None:
                raise error

        return Failing
    if style == "async":

        async def handle(stream: Any) -> None:
            await stream.write(before)
            await stream.read(1)
            raise error

        return handle

    def handle_blocking(conn: Any) -> None:
        conn.sendall(before)
        conn.recv(1)
        raise error

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_handler_exception_logged_once_output_delivered(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    before = random.Random(5).randbytes(30_000)

    async def scenario(h: Harness) -> None:
        # A peer that has read nothing yet: the output is still in flight
        # when the handler fails.
        client = h.connect(receive_window=0)
        await client.send(b"!")
        if h.memory:
            await h.settle()
        assert await client.receive_all() == before

    run(style, failing(style, ValueError("boom"), before), scenario,
        limits=Limits(max_output_buffer=64 * 1024))
    errors = error_records(caplog)
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError
    assert [line.endswith("(internal error)") for line in closed_lines(caplog)] == [True]


@pytest.mark.parametrize("style", STYLES)
def test_remote_protocol_error_closes_with_reason_and_no_traceback(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)

    async def scenario(h: Harness) -> None:
        client = h.connect()
        await client.send(b"?")
        assert await client.receive_all() == b"before"

    run(style, failing(style, RemoteProtocolError("bad request"), b"before"), scenario)
    assert error_records(caplog) == []
    assert not any(r.exc_info for r in caplog.records)
    assert [line.endswith("(bad request)") for line in closed_lines(caplog)] == [True]


# -- local errors: wrong output type, output after close --------------------------------


def str_writer(style: str, events: list[Any]) -> Any:
    """Send b"before", then (on the peer's byte) output a ``str``."""
    if style == "sansio":

        class StrWriter(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> bytes:
                return b"before"

            def on_data(self, data: bytes) -> Any:
                return "text"

        return StrWriter
    if style == "async":

        async def handle(stream: Any) -> None:
            await stream.write(b"before")
            await stream.read(1)
            try:
                await stream.write("text")
            except LocalProtocolError as exc:
                events.append(exc)
                raise

        return handle

    def handle_blocking(conn: Any) -> None:
        conn.sendall(b"before")
        conn.recv(1)
        try:
            conn.sendall("text")
        except LocalProtocolError as exc:
            events.append(exc)
            raise

    return handle_blocking


@pytest.mark.parametrize("style", STYLES)
def test_str_output_is_a_local_protocol_error(
    style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    events: list[Any] = []

    async def scenario(h: Harness) -> None:
        client = h.connect()
        assert await client.receive_exactly(6) == b"before"
        await client.send(b"!")
        assert await client.receive_all() == b""

    run(style, str_writer(style, events), scenario)
    errors = error_records(caplog)
    assert len(errors) == 1
    exc_info = errors[0].exc_info
    assert exc_info is not None and exc_info[0] is LocalProtocolError
    assert "expected bytes, got str" in str(exc_info[1])
    if style != "sansio":
        # Raised where the handler wrote it.
        assert [type(e) for e in events] == [LocalProtocolError]


def test_protocol_tester_str_output_is_a_local_protocol_error() -> None:
    tester = ProtocolTester(str_writer("sansio", [])())
    assert tester.connect() == b"before"
    with pytest.raises(LocalProtocolError, match="expected bytes, got str"):
        tester.feed(b"!")


def write_after(style: str, how: str, events: list[Any]) -> Any:
    """Close (``how="close"``) or half-close (``"half"``), then write."""
    if style == "sansio":
        assert how == "half"  # a closed protocol is never called again

        class Late(StreamProtocol):
            def on_connect(self, peer: Any, local: Any = None) -> Reply:
                return Reply(data=b"bye", half_close=True)

            def on_data(self, data: bytes) -> bytes:
                return b"late"

        return Late
    if style == "async":

        async def handle(stream: Any) -> None:
            await stream.write(b"bye")
            if how == "close":
                await stream.close()
            else:
                stream.write_eof()
                await stream.read(1)
            try:
                await stream.write(b"late")
            except Exception as exc:
                events.append(exc)
                raise

        return handle

    def handle_blocking(conn: Any) -> None:
        conn.sendall(b"bye")
        if how == "close":
            conn.close()
        else:
            conn.shutdown_write()
            conn.recv(1)
        try:
            conn.sendall(b"late")
        except Exception as exc:
            events.append(exc)
            raise

    return handle_blocking


@pytest.mark.parametrize(
    ("style", "how"),
    [("sansio", "half"), ("async", "half"), ("async", "close"),
     ("blocking", "half"), ("blocking", "close")],
)
def test_output_after_close_is_a_local_protocol_error(
    style: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    events: list[Any] = []

    async def scenario(h: Harness) -> None:
        client = h.connect()
        assert await client.receive_all() == b"bye"
        if how == "half":
            await client.send(b"!")
        await h.ended()

    run(style, write_after(style, how, events), scenario)
    errors = error_records(caplog)
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    exc_info = errors[0].exc_info
    assert exc_info is not None and exc_info[0] is LocalProtocolError, exc_info
    if style != "sansio":
        assert [type(e) for e in events] == [LocalProtocolError], events


def test_protocol_tester_output_after_half_close_is_a_local_protocol_error() -> None:
    tester = ProtocolTester(write_after("sansio", "half", [])())
    assert tester.connect() == b"bye"
    assert tester.half_closed
    with pytest.raises(LocalProtocolError):
        tester.feed(b"!")


def test_idle_timeout_is_a_closed_connection_and_a_timeout() -> None:
    assert issubclass(IdleTimeout, ConnectionClosed)
    assert issubclass(IdleTimeout, TimeoutError)
