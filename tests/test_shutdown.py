"""Graceful shutdown: stop accepting, let work in flight finish within the
grace period, abort what is left, exit 0. Never hang on idle clients."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, recv_all

import sockworks
from sockworks import Limits
from sockworks.testing import running


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_idle_clients_exits_at_once(
    cli: type[CLIProcess], signum: int, tmp_path: Path
) -> None:
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "-l", f"unix:{tmp_path}/e.sock",
                "--grace", "30"])
    endpoints = proc.wait_listening(2)
    idle = [connect(e) for e in endpoints for _ in range(5)]
    for sock in idle:  # make sure every connection was accepted
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    started = time.monotonic()
    assert proc.stop(signum) == 0
    # Idle clients do not hold the server for the 30 s grace period.
    assert time.monotonic() - started < 15
    for sock in idle:
        sock.settimeout(5)
        assert recv_all(sock) == b""  # each was closed cleanly
        sock.close()
    assert not (tmp_path / "e.sock").exists()
    assert any("SIGTERM" in line or "SIGINT" in line for line in proc.lines)


@pytest.mark.parametrize("service", ["greeting", "charcount"])
def test_signal_while_clients_sit_at_a_prompt(cli: type[CLIProcess], service: str) -> None:
    proc = cli(["serve", service, "-l", "tcp:127.0.0.1:0", "--grace", "30", "--timeout", "60"])
    (endpoint,) = proc.wait_listening()
    clients = [connect(endpoint) for _ in range(3)]
    time.sleep(0.2)
    assert proc.stop() == 0
    for sock in clients:
        sock.settimeout(5)
        recv_all(sock)  # closed, not left hanging
        sock.close()


def test_signal_with_busy_clients_ends_within_grace(cli: type[CLIProcess]) -> None:
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--grace", "2"])
    (endpoint,) = proc.wait_listening()
    stop = threading.Event()

    def pump(sock: socket.socket) -> None:
        try:
            while not stop.is_set():
                sock.sendall(b"y" * 65536)
                sock.recv(65536)
        except OSError:
            pass

    socks = [connect(endpoint) for _ in range(4)]
    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 10
    stop.set()
    for s in socks:
        s.close()


def test_new_connections_are_refused_once_shutdown_starts() -> None:
    release = threading.Event()

    def slow(conn: sockworks.BlockingConnection) -> None:
        conn.recv(10)
        release.wait(5)
        conn.sendall(b"done")

    srv = running(slow, grace=5).__enter__()
    endpoint = srv.endpoint()
    busy = connect(endpoint)
    busy.sendall(b"go")
    time.sleep(0.1)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((endpoint.host, endpoint.port), timeout=2)
    release.set()
    assert recv_all(busy) == b"done"  # the work in flight finished
    stopper.join(10)
    assert srv.finished_in_grace is True


def test_blocking_work_in_flight_finishes() -> None:
    def compute(conn: sockworks.BlockingConnection) -> None:
        request = conn.recv(100)
        time.sleep(0.5)  # busy, not reading, when the shutdown starts
        conn.sendall(b"result for " + request)

    with running(compute, grace=5) as srv:
        sock = connect(srv.endpoint())
        sock.sendall(b"job")
        time.sleep(0.1)
    # Leaving the block stopped the server: the answer still came.
    assert recv_all(sock) == b"result for job"
    assert srv.finished_in_grace is True


def test_async_work_in_flight_finishes_and_idle_reads_see_eof() -> None:
    import asyncio

    saw_eof = threading.Event()

    async def handler(stream: sockworks.Stream) -> None:
        request = await stream.read()
        if request == b"idle":
            assert await stream.read() == b""  # the shutdown looks like EOF
            saw_eof.set()
            return
        await asyncio.sleep(0.5)
        await stream.write(b"result for " + request)

    with running(handler, grace=5) as srv:
        busy, idle = connect(srv.endpoint()), connect(srv.endpoint())
        busy.sendall(b"job")
        idle.sendall(b"idle")
        time.sleep(0.1)
    assert recv_all(busy) == b"result for job"
    assert saw_eof.is_set()
    assert srv.finished_in_grace is True


@pytest.mark.parametrize("style", ["blocking", "async"])
def test_stuck_handlers_are_aborted_after_grace(style: str) -> None:
    import asyncio

    def stuck_blocking(conn: sockworks.BlockingConnection) -> None:
        conn.recv(10)
        time.sleep(30)

    async def stuck_async(stream: sockworks.Stream) -> None:
        await stream.read()
        await asyncio.sleep(30)

    handler = stuck_blocking if style == "blocking" else stuck_async
    srv = running(handler, grace=0.5).__enter__()
    sock = connect(srv.endpoint())
    sock.sendall(b"x")
    time.sleep(0.1)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 10
    assert srv.finished_in_grace is False
    sock.settimeout(5)
    try:
        assert recv_all(sock) == b""
    except ConnectionResetError:
        pass  # an abort may reset
    sock.close()


def test_protocol_file_transfer_in_flight_finishes(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 40_000)  # 10 MB

    class Sender(sockworks.StreamProtocol):
        def on_data(self, data: bytes) -> sockworks.Output:
            return sockworks.Reply(file=sockworks.FileSpan(str(big)), close=True)

    received: list[bytes] = []
    with running(Sender, grace=10, limits=Limits(max_output_buffer=65536)) as srv:
        sock = connect(srv.endpoint())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"go")
        received.append(sock.recv(65536))  # the transfer has started
        reader = threading.Thread(target=lambda: received.append(recv_all(sock)))
        reader.start()
    # Leaving the block shut the server down while the file was in flight.
    reader.join(10)
    assert b"".join(received) == big.read_bytes()
    assert srv.finished_in_grace is True
