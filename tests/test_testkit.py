"""The virtual clock loop and the in-memory transport (sockworks._testkit).

No test sleeps in real time and none needs a socket: events are ordered by
signals (futures, ``peer.wait_closed()``, ``loop.wait_idle()``), and every
wait on time is a wait on the virtual clock.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import threading
import time
from typing import Any

import pytest

from sockworks._testkit import (
    MemoryPeer,
    MemoryTransport,
    VirtualClockLoop,
    memory_connection,
    new_virtual_loop,
    run_virtual,
)


def vloop() -> VirtualClockLoop:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    return loop


# ---------------------------------------------------------------------------
# The virtual clock


def test_long_sleep_jumps_the_clock() -> None:
    async def main() -> tuple[float, float]:
        loop = vloop()
        t0 = loop.time()
        await asyncio.sleep(300)
        return t0, loop.time()

    real0 = time.monotonic()
    t0, t1 = run_virtual(main(), start=1000.0)
    assert (t0, t1) == (1000.0, 1300.0)
    # A guard, not a timing: a real 300 s wait would hit the test timeout.
    assert time.monotonic() - real0 < 30


def test_timers_fire_in_order_at_their_virtual_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = vloop()
        fired: list[tuple[str, float]] = []
        done = loop.create_future()

        def fire(name: str) -> None:
            fired.append((name, loop.time()))
            if name == "last":
                done.set_result(None)

        loop.call_later(5, fire, "five")
        loop.call_later(1, fire, "one-a")
        loop.call_at(loop.time() + 3, fire, "three")
        loop.call_later(1, fire, "one-b")  # same deadline: scheduling order
        cancelled = loop.call_later(2, fire, "cancelled")
        loop.call_later(86400 * 3, fire, "last")  # beyond asyncio's 24 h select cap
        cancelled.cancel()
        await done
        return fired

    assert run_virtual(main()) == [
        ("one-a", 1.0),
        ("one-b", 1.0),
        ("three", 3.0),
        ("five", 5.0),
        ("last", 259200.0),
    ]


def test_wait_for_times_out_on_the_virtual_clock() -> None:
    async def main() -> None:
        loop = vloop()
        never = asyncio.Event()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(never.wait(), 30)
        assert loop.time() == 30

        async def slow() -> str:
            await asyncio.sleep(10)
            return "done"

        assert await asyncio.wait_for(slow(), 60) == "done"
        assert loop.time() == 40

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(5):
                await never.wait()
        assert loop.time() == 45

    run_virtual(main())


class _ReleasingSelector(selectors.DefaultSelector):
    """Sets ``release`` the first time the loop waits after being armed:
    a thread released then finishes while the loop is deciding whether to
    jump, the moment a naive autojump would skip over it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.release = threading.Event()

    def select(self, timeout: float | None = None) -> Any:
        if self.armed:
            self.armed = False
            self.release.set()
        return super().select(timeout)


def test_executor_work_is_not_jumped_over() -> None:
    selector = _ReleasingSelector()
    loop = VirtualClockLoop(selector)

    async def main() -> list[str]:
        order: list[str] = []
        timer_fired = loop.create_future()

        def on_timer() -> None:
            order.append("timer")
            timer_fired.set_result(None)

        def work() -> str:
            assert selector.release.wait(30)
            return "thread"

        loop.call_later(3600, on_timer)
        fut = loop.run_in_executor(None, work)
        selector.armed = True
        order.append(await fut)
        # Virtual time followed real time while the thread ran: far from 3600.
        assert loop.time() < 60
        # With no work outstanding, the loop jumps again.
        await timer_fired
        assert loop.time() == 3600
        # asyncio.to_thread goes through run_in_executor too.
        order.append(await asyncio.to_thread(lambda: "to_thread"))
        # Joining the executor's threads happens in another thread: it is
        # real work too (asyncio.Runner puts a 300 s timeout on it).
        late = loop.call_later(300, order.append, "late")
        await loop.shutdown_default_executor()
        late.cancel()
        return order

    try:
        assert loop.run_until_complete(main()) == ["thread", "timer", "to_thread"]
    finally:
        loop.close()


def test_real_time_block_covers_threads_the_loop_does_not_know() -> None:
    selector = _ReleasingSelector()
    loop = VirtualClockLoop(selector)

    async def main() -> list[str]:
        order: list[str] = []
        loop.call_later(3600, order.append, "timer")
        done: asyncio.Future[str] = loop.create_future()

        def outside() -> None:
            assert selector.release.wait(30)
            loop.call_soon_threadsafe(done.set_result, "thread")

        thread = threading.Thread(target=outside)
        thread.start()
        try:
            with loop.real_time():
                selector.armed = True
                order.append(await done)
        finally:
            thread.join()
        assert loop.time() < 60
        await asyncio.sleep(3600)
        return order

    try:
        assert loop.run_until_complete(main()) == ["thread", "timer"]
    finally:
        loop.close()


def test_nothing_scheduled_blocks_on_the_real_selector_without_moving_time() -> None:
    async def main() -> float:
        loop = vloop()
        assert await loop.run_in_executor(None, sum, [1, 2, 3]) == 6
        return loop.time()

    assert run_virtual(main()) == 0.0


def test_ready_descriptor_is_served_before_jumping() -> None:
    async def main() -> None:
        loop = vloop()
        r, w = os.pipe()
        try:
            later = loop.call_later(3600, lambda: None)
            got = loop.create_future()
            loop.add_reader(r, lambda: got.set_result(os.read(r, 10)))
            os.write(w, b"x")
            assert await got == b"x"
            loop.remove_reader(r)
            assert loop.time() == 0.0  # the pending timer was not jumped to
            later.cancel()
        finally:
            os.close(r)
            os.close(w)

    run_virtual(main())


def test_manual_advance_with_autojump_off() -> None:
    async def main() -> None:
        loop = vloop()
        assert not loop.autojump
        fired: list[float] = []
        five = loop.create_future()
        ten = loop.create_future()

        def fire(fut: asyncio.Future[None]) -> None:
            fired.append(loop.time())
            fut.set_result(None)

        loop.call_later(5, fire, five)
        loop.call_later(10, fire, ten)
        loop.advance(5)
        await five
        assert fired == [5.0] and not ten.done()
        with pytest.raises(ValueError):
            loop.advance(-1)
        # advance() from another thread is handed to the loop.
        await loop.run_in_executor(None, loop.advance, 5)
        await ten
        assert fired == [5.0, 10.0]
        # Autojump back on: the next timer is jumped to.
        loop.autojump = True
        await asyncio.sleep(100)
        assert loop.time() == 110.0

    run_virtual(main(), autojump=False)


def test_wait_idle_returns_before_the_clock_moves() -> None:
    async def main() -> None:
        loop = vloop()
        steps: list[int] = []

        async def worker() -> None:
            for i in range(5):
                steps.append(i)
                await asyncio.sleep(0)
            await asyncio.sleep(50)
            steps.append(99)

        task = asyncio.create_task(worker())
        await loop.wait_idle()
        assert steps == [0, 1, 2, 3, 4]
        assert loop.time() == 0.0
        await task
        assert steps[-1] == 99 and loop.time() == 50.0

    run_virtual(main())


def test_new_virtual_loop_runs_asyncio_code() -> None:
    loop = new_virtual_loop(start=5.0)
    try:
        assert loop.time() == 5.0
        assert loop.run_until_complete(asyncio.sleep(7, result="ok")) == "ok"
        assert loop.time() == 12.0
    finally:
        loop.close()


# ---------------------------------------------------------------------------
# The in-memory transport


class Recorder(asyncio.Protocol):
    """Records every callback; echoes what it receives unless told not to."""

    def __init__(self, *, echo: bool = True, keep_open: bool = False) -> None:
        self.echo = echo
        self.keep_open = keep_open
        self.events: list[Any] = []
        self.received = bytearray()
        self.transport: MemoryTransport | None = None
        self.made = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, MemoryTransport)
        self.transport = transport
        self.events.append("made")
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received += data
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return self.keep_open

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


def connect(proto: asyncio.Protocol, **kw: Any) -> tuple[MemoryTransport, MemoryPeer]:
    return memory_connection(proto, **kw)


def test_echo_round_trip_and_close_on_eof() -> None:
    async def main() -> None:
        proto = Recorder()
        transport, peer = connect(proto, peer=("10.0.0.1", 4242))
        assert proto.events == []  # connection_made comes through the loop
        peer.send(b"hello")
        assert proto.events == []  # so does data_received
        assert await peer.receive_exactly(5) == b"hello"
        assert proto.events == ["made", ("data", b"hello")]
        assert transport.get_extra_info("peername") == ("10.0.0.1", 4242)
        assert transport.get_extra_info("sockname") == ("127.0.0.1", 7)
        assert transport.get_extra_info("socket") is None
        assert transport.get_extra_info("nope", "dflt") == "dflt"
        assert transport.get_protocol() is proto
        peer.send_eof()
        # eof_received returned False: the transport closes itself.
        assert await peer.receive() == b""
        await peer.wait_closed()
        assert proto.events[-2:] == ["eof", ("lost", None)]
        assert peer.received_eof and peer.closed and not peer.aborted
        assert transport.is_closing()

    run_virtual(main())


def test_receive_max_and_chunks_keep_their_order() -> None:
    async def main() -> None:
        proto = Recorder()
        transport, peer = connect(proto)
        for part in (b"ab", b"cde", b"f"):
            peer.send(part)
        assert await peer.receive_exactly(6) == b"abcdef"
        # Each send() is one data_received, as one socket read.
        assert [e for e in proto.events if e != "made"] == [
            ("data", b"ab"),
            ("data", b"cde"),
            ("data", b"f"),
        ]
        transport.write(b"0123456789")
        assert await peer.receive(3) == b"012"
        assert await peer.receive() == b"3456789"
        with pytest.raises(ValueError):
            await peer.receive(0)
        transport.close()
        assert await peer.receive_all() == b""
        with pytest.raises(asyncio.IncompleteReadError):
            await peer.receive_exactly(1)

    run_virtual(main())


def test_peer_half_close_server_answers_then_closes() -> None:
    class Reverser(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buf = bytearray()

        def data_received(self, data: bytes) -> None:
            self.buf += data

        def eof_received(self) -> bool:
            self.transport.write(bytes(reversed(self.buf)))
            self.transport.close()
            return True  # keep open: we close ourselves once flushed

    async def main() -> None:
        _, peer = connect(Reverser(), receive_window=0)
        peer.send(b"abc")
        peer.send(b"def")
        peer.send_eof()
        with pytest.raises(RuntimeError):
            peer.send(b"more")
        assert await peer.receive_all() == b"fedcba"
        await peer.wait_closed()
        assert peer.received_eof and not peer.aborted

    run_virtual(main())


def test_server_half_close_peer_still_sends() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto)
        await proto.made
        assert transport.can_write_eof()
        transport.write(b"banner\n")
        transport.write_eof()
        transport.write_eof()  # twice is harmless, as in asyncio
        with pytest.raises(RuntimeError):
            transport.write(b"late")
        assert await peer.receive_all() == b"banner\n"
        assert peer.received_eof and not peer.closed
        peer.send(b"still talking")
        peer.send_eof()
        await peer.wait_closed()
        assert proto.received == b"still talking"
        assert proto.events[-2:] == ["eof", ("lost", None)]

    run_virtual(main())


def test_close_delivers_buffered_output_abort_drops_it() -> None:
    async def main(kind: str) -> tuple[bytes, MemoryPeer, Recorder]:
        proto = Recorder(echo=False)
        transport, peer = connect(proto, receive_window=0)
        await proto.made
        transport.write(b"x" * 100)
        assert transport.get_write_buffer_size() == 100
        getattr(transport, kind)()
        assert transport.is_closing() and not transport.is_reading()
        await vloop().wait_idle()
        if kind == "close":
            # Nothing lost yet: the output waits for the peer to read it.
            assert proto.events == ["made"] and not peer.closed
        data = await peer.receive_all()
        await peer.wait_closed()
        assert proto.events == ["made", ("lost", None)]
        return data, peer, proto

    data, peer, _ = run_virtual(main("close"))
    assert data == b"x" * 100 and peer.received_eof and not peer.aborted

    data, peer, _ = run_virtual(main("abort"))
    assert data == b"" and peer.aborted and not peer.received_eof


def test_abort_during_a_pending_close_ends_at_once() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto, receive_window=0)
        await proto.made
        transport.write(b"y" * 10)
        transport.close()
        transport.abort()
        await peer.wait_closed()
        assert peer.aborted and await peer.receive() == b""
        assert proto.events == ["made", ("lost", None)]
        transport.write(b"ignored")  # after the loss: dropped, no error
        assert transport.get_write_buffer_size() == 0

    run_virtual(main())


def test_peer_reset() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto, receive_window=0)
        await proto.made
        transport.write(b"unsent")
        peer.reset()
        await peer.wait_closed()
        kind, exc = proto.events[-1]
        assert kind == "lost" and isinstance(exc, ConnectionResetError)
        assert await peer.receive() == b""
        assert not peer.aborted and not peer.received_eof
        with pytest.raises(RuntimeError):
            peer.send(b"after reset")

    run_virtual(main())


class Writer(asyncio.Protocol):
    """Writes ``total`` bytes in ``chunk``-sized writes as fast as flow
    control lets it, then closes: a chargen-style producer."""

    def __init__(self, total: int, chunk: int, high: int, low: int) -> None:
        self.total, self.chunk, self.high, self.low = total, chunk, high, low
        self.sent = 0
        self.paused = False
        self.log: list[tuple[str, int]] = []
        self.resumed = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.high, low=self.low)
        self._produce()

    def _produce(self) -> None:
        assert self.transport is not None
        while not self.paused and self.sent < self.total:
            n = min(self.chunk, self.total - self.sent)
            self.transport.write(bytes((self.sent + i) % 251 for i in range(n)))
            self.sent += n
            self.log.append(("write", self.transport.get_write_buffer_size()))
        if self.sent >= self.total:
            self.transport.close()

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.paused = True
        self.log.append(("pause", self.transport.get_write_buffer_size()))

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.paused = False
        self.log.append(("resume", self.transport.get_write_buffer_size()))
        self.resumed.set()
        self._produce()


def _pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def test_flow_control_pauses_at_high_resumes_at_low() -> None:
    async def main() -> None:
        w = Writer(total=3000, chunk=300, high=1000, low=100)
        transport, peer = connect(w, receive_window=0)
        assert transport.get_write_buffer_limits() == (16384, 65536)  # asyncio's defaults
        await vloop().wait_idle()
        assert transport.get_write_buffer_limits() == (100, 1000)
        # pause_writing came from inside the 4th write (1200 > 1000), so the
        # producer stopped right there, as with asyncio's own transports.
        assert w.log == [("write", 300), ("write", 600), ("write", 900), ("pause", 1200),
                         ("write", 1200)]
        assert await peer.receive(1000) == _pattern(1000)
        await vloop().wait_idle()
        assert w.paused and transport.get_write_buffer_size() == 200  # above low: no resume
        data = await peer.receive(150)
        assert transport.get_write_buffer_size() == 50
        assert not w.resumed.is_set()  # never re-entrantly from inside receive()
        await w.resumed.wait()
        assert w.log[5] == ("resume", 50)
        data = _pattern(1000) + data + await peer.receive_all()
        assert data == _pattern(3000)
        await peer.wait_closed()
        assert peer.received_eof
        # Every pause above the high mark, every resume at or below the low.
        assert all(n > 1000 for kind, n in w.log if kind == "pause")
        assert all(n <= 100 for kind, n in w.log if kind == "resume")

    run_virtual(main())


def test_receive_window_takes_bytes_off_the_transport_buffer() -> None:
    async def main() -> None:
        w = Writer(total=1200, chunk=1200, high=1000, low=100)
        transport, peer = connect(w, receive_window=500)
        await vloop().wait_idle()
        # 500 bytes sit in the peer's window, 700 in the transport: no pause.
        assert transport.get_write_buffer_size() == 700
        assert ("pause", 700) not in w.log and not w.paused
        assert transport.is_closing() and not peer.closed
        peer.receive_window = None  # the peer starts reading fast
        assert transport.get_write_buffer_size() == 0
        await peer.wait_closed()
        assert await peer.receive_all() == _pattern(1200)

    run_virtual(main())


def test_set_write_buffer_limits_rules() -> None:
    async def main() -> None:
        transport, _ = connect(Recorder())
        transport.set_write_buffer_limits(low=100)
        assert transport.get_write_buffer_limits() == (100, 400)
        transport.set_write_buffer_limits(high=80)
        assert transport.get_write_buffer_limits() == (20, 80)
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=10, low=20)

    run_virtual(main())


def test_lowering_the_limit_pauses_at_once() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto, receive_window=0)
        await proto.made
        transport.write(b"z" * 50)
        transport.set_write_buffer_limits(high=10)
        assert proto.events == ["made", "pause"]
        assert await peer.receive() == b"z" * 50
        await vloop().wait_idle()
        assert proto.events == ["made", "pause", "resume"]

    run_virtual(main())


def test_paused_reading_queues_data_and_eof() -> None:
    class Pauser(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.pause_reading()

    async def main() -> None:
        proto = Pauser(echo=False)
        transport, peer = connect(proto)
        peer.send(b"one")
        peer.send(b"two")
        peer.send(b"three")
        peer.send_eof()
        await vloop().wait_idle()
        assert proto.events == ["made", ("data", b"one")]
        assert not transport.is_reading()
        transport.pause_reading()  # already paused: harmless
        for expected in (b"two", b"three"):
            transport.resume_reading()
            assert transport.is_reading()
            await vloop().wait_idle()
            assert proto.events[-1] == ("data", expected)
        transport.resume_reading()
        await peer.wait_closed()
        assert proto.events[-2:] == ["eof", ("lost", None)]
        transport.resume_reading()  # closed: harmless

    run_virtual(main())


def test_pause_reading_holds_back_data_already_on_its_way() -> None:
    class PausedFromStart(Recorder):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()

    async def main() -> None:
        proto = PausedFromStart(echo=False)
        transport, peer = connect(proto)
        peer.send(b"early")  # its delivery is queued behind connection_made
        await vloop().wait_idle()
        assert proto.events == ["made"]
        transport.resume_reading()
        await vloop().wait_idle()
        assert proto.events == ["made", ("data", b"early")]

    run_virtual(main())


def test_data_sent_after_the_server_closed_is_discarded() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto)
        await proto.made
        transport.close()
        peer.send(b"too late")
        await peer.wait_closed()
        assert proto.received == b""

    run_virtual(main())


def test_write_arguments() -> None:
    async def main() -> None:
        proto = Recorder(echo=False)
        transport, peer = connect(proto)
        await proto.made
        with pytest.raises(TypeError):
            transport.write("text")  # type: ignore[arg-type]
        transport.write(b"")
        transport.writelines([b"a", bytearray(b"b"), memoryview(b"c")])
        transport.write(memoryview(b"d"))
        transport.close()
        assert await peer.receive_all() == b"abcd"

    run_virtual(main())


def test_protocol_error_is_reported_and_tears_down() -> None:
    class Broken(Recorder):
        def data_received(self, data: bytes) -> None:
            raise ValueError("bug")

    async def main() -> None:
        loop = vloop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        proto = Broken()
        _, peer = connect(proto)
        peer.send(b"x")
        await peer.wait_closed()
        kind, exc = proto.events[-1]
        assert kind == "lost" and isinstance(exc, ValueError)
        assert len(reported) == 1 and reported[0]["exception"] is exc

    run_virtual(main())


def test_two_receivers_at_once_is_an_error() -> None:
    async def main() -> None:
        _, peer = connect(Recorder())
        first = asyncio.create_task(peer.receive())
        await vloop().wait_idle()
        with pytest.raises(RuntimeError):
            await peer.receive()
        peer.send(b"ok")
        assert await first == b"ok"

    run_virtual(main())


def test_idle_timeout_of_300_seconds() -> None:
    """What the kit is for: a service's idle timeout, tested in no time."""

    class Idle(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.loop = asyncio.get_running_loop()
            self.timer = self.loop.call_later(300, self.expire)

        def data_received(self, data: bytes) -> None:
            self.timer.cancel()
            self.timer = self.loop.call_later(300, self.expire)
            self.transport.write(data)

        def expire(self) -> None:
            self.transport.write(b"idle timeout\r\n")
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.timer.cancel()

    async def main() -> None:
        loop = vloop()
        _, peer = connect(Idle())
        await loop.wait_idle()
        loop.advance(299)
        peer.send(b"ping")  # activity at t=299 restarts the timer
        assert await peer.receive_exactly(4) == b"ping"
        assert await peer.receive_all() == b"idle timeout\r\n"
        assert loop.time() == 599.0
        await peer.wait_closed()

    run_virtual(main())


def test_asyncio_streams_run_on_the_memory_transport() -> None:
    async def main() -> None:
        handled = asyncio.get_running_loop().create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            writer.write(line.upper() * 4)  # 4 x 40 bytes > high mark of 64
            await writer.drain()  # waits for the peer's reads, by flow control
            writer.close()
            await writer.wait_closed()
            handled.set_result(writer.get_extra_info("peername"))

        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader, handler)
        transport, peer = connect(proto, receive_window=0)
        await vloop().wait_idle()
        transport.set_write_buffer_limits(high=64)
        peer.send(b"hello stream, from an in-memory peer!\r\n")
        data = await peer.receive_all()
        assert data == b"HELLO STREAM, FROM AN IN-MEMORY PEER!\r\n" * 4
        assert await handled == ("127.0.0.1", 50000)

    run_virtual(main())
