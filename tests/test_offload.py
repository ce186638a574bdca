"""Reply(offload=...): work off the event loop, on the real core.

CPU work runs on one thread per service (more would only take the GIL
from the loop); work that waits (``offload_waits=True``: a child process)
runs on threads of its own, so two such jobs run at once and never queue
behind the CPU work.
"""

from __future__ import annotations

import threading

from sockworks import Output, Reply, StreamProtocol
from sockworks.testing import MemoryService, run_virtual


def _service_with(job: object, waits: bool) -> type[StreamProtocol]:
    class Offloading(StreamProtocol):
        def on_data(self, data: bytes) -> Output:
            return Reply(offload=job, offload_waits=waits)  # type: ignore[arg-type]

    return Offloading


def test_waiting_jobs_run_at_once() -> None:
    barrier = threading.Barrier(2, timeout=10)

    def job() -> Output:
        barrier.wait()  # only returns when the other job is running too
        return Reply(data=b"done", close=True)

    async def main() -> list[bytes]:
        service = MemoryService(_service_with(job, waits=True))
        a, b = service.connect(), service.connect(peer=("127.0.0.2", 50001))
        a.send(b"go")
        b.send(b"go")
        return [await a.receive_all(), await b.receive_all()]

    assert run_virtual(main()) == [b"done", b"done"]
    assert not barrier.broken


def test_cpu_jobs_queue_on_one_thread() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def job() -> Output:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        sum(range(20000))
        with lock:
            running -= 1
        return Reply(data=b"ok", close=True)

    async def main() -> list[bytes]:
        service = MemoryService(_service_with(job, waits=False))
        peers = [service.connect(peer=("127.0.0.1", 50000 + i)) for i in range(4)]
        for p in peers:
            p.send(b"go")
        return [await p.receive_all() for p in peers]

    assert run_virtual(main()) == [b"ok"] * 4
    assert most == 1
