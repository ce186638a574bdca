"""The blocking driver's idle watchdog: it tracks recv/send calls in progress
by counters (no clock read per call) and must still cut off a silent peer
never early and at most about 10 % late, leave a busy handler alone, and
leave a full-duplex handler alone while one direction is active."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from sockworks import Limits
from sockworks.testing import running


def _connect(srv: Any) -> socket.socket:
    endpoint = srv.endpoint()
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_silent_peer_is_cut_off_not_early_and_not_much_late() -> None:
    outcome: list[str] = []
    timeout = 0.6

    def handle(conn: Any) -> None:
        conn.sendall(b"hello\n")
        started = time.monotonic()
        try:
            conn.recv(100)
        except TimeoutError:
            outcome.append(f"{time.monotonic() - started:.3f}")
            raise

    with running(handle, limits=Limits(idle_timeout=timeout)) as srv, _connect(srv) as sock:
        assert _read_until_closed(sock) == b"hello\n"
    waited = float(outcome[0])
    assert waited >= timeout
    # Nominally within timeout * 1.1; generous here for a loaded machine.
    assert waited < timeout * 1.1 + 0.5


def test_busy_handler_is_not_an_idle_peer() -> None:
    """Time spent computing between calls is not waiting on the peer."""

    def handle(conn: Any) -> None:
        data = conn.recv(100)
        time.sleep(0.8)  # longer than the timeout, but not in recv/send
        conn.sendall(data.upper())

    with running(handle, limits=Limits(idle_timeout=0.4)) as srv, _connect(srv) as sock:
        sock.sendall(b"abc")
        assert _read_until_closed(sock) == b"ABC"


def test_active_writer_keeps_a_waiting_reader_alive() -> None:
    """A handler that reads on one thread and writes on another is not idle
    while it keeps writing."""

    def handle(conn: Any) -> None:
        stop = threading.Event()

        def writer() -> None:
            for _ in range(12):
                conn.sendall(b".")
                time.sleep(0.1)
            stop.set()

        thread = threading.Thread(target=writer)
        thread.start()
        conn.recv(100)  # the peer never sends: blocks while the writer works
        thread.join()

    with running(handle, limits=Limits(idle_timeout=0.5)) as srv, _connect(srv) as sock:
        started = time.monotonic()
        data = _read_until_closed(sock)
        # All 12 dots arrived (1.2 s, longer than the timeout); then the reader,
        # alone and silent, is cut off.
        assert data == b"." * 12
        assert time.monotonic() - started >= 1.1
