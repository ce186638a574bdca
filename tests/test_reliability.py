"""No byte already accepted is lost, and a slow drip is not a request.

Issue 9's defects 3 and 4, on real sockets through the CLI: SIGTERM used
to reset connections with data in flight (a client that had sent 1 MiB to
echo got part of it back, then a reset), and a client sending one byte
every 29 s held a Gopher, charcount or greeting connection for days.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

from conftest import CLIProcess, connect

MiB = 1 << 20


def _pattern(size: int) -> bytes:
    # Not repetitive at any short period: a lost or repeated chunk shows.
    return b"".join(i.to_bytes(4, "big") for i in range(size // 4))


def test_sigterm_finishes_work_in_flight_and_never_resets(cli: type[CLIProcess]) -> None:
    """Echo: a client sends 1 MiB, then the server gets SIGTERM, then the
    client reads. All of it comes back byte for byte, then a clean EOF: no
    reset, nothing the server had received lost (issue 9: 128-417 KB came
    back, then a reset)."""
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--grace", "5", "--sndbuf", "32768"])
    (ep,) = proc.wait_listening(1)
    payload = _pattern(MiB)
    # A small receive window: the echo backs up, so at the signal the
    # server holds written output and unread input at once.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(20)
        sock.connect((ep.host, ep.port))
        writer = threading.Thread(target=lambda: _send_quietly(sock, payload))
        writer.start()
        writer.join(10)  # all sent before the signal (the kernel buffers hold it)
        sent_before_signal = not writer.is_alive()
        proc.send_signal()
        got = bytearray()
        try:
            while chunk := sock.recv(65536):
                got.extend(chunk)
        except ConnectionResetError:
            raise AssertionError(f"reset after {len(got)} of {len(payload)} bytes") from None
        writer.join(10)
    assert proc.proc.wait(15) == 0  # on its own, within the grace period
    proc.stop()  # (already exited: collects the log)
    assert bytes(got) == payload[: len(got)]
    if sent_before_signal:
        assert len(got) == len(payload), f"{len(got)} of {len(payload)} bytes came back"
    closed = re.search(r"closed after [\d.]+ s, (\d+) B in, (\d+) B out", proc.log)
    assert closed is not None, proc.log
    assert int(closed.group(2)) == len(got)


def test_line_too_long_keeps_the_answer_already_sent(cli: type[CLIProcess]) -> None:
    """charcount closes on a line too long while the client is still
    sending it: the prompt it had sent must still arrive, then EOF, not a
    reset (the unread rest of the line used to make the kernel reset it)."""
    proc = cli(["serve", "charcount", "-l", "tcp:127.0.0.1:0", "--max-line", "100"])
    (ep,) = proc.wait_listening(1)
    with connect(ep, timeout=20) as sock:
        sent = threading.Thread(target=lambda: _send_quietly(sock, b"x" * (4 * MiB)))
        sent.start()
        data = bytearray()
        try:
            while chunk := sock.recv(65536):
                data.extend(chunk)
        except ConnectionResetError:
            raise AssertionError(f"reset after {bytes(data)!r}") from None
        sent.join(20)
    assert b"Please enter a string:" in data, data
    assert data.endswith(b"Line too long: the limit is 100 bytes.\n"), data
    proc.stop()
    assert "line longer than 100 bytes" in proc.log


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def _drip(sock: socket.socket, stop: threading.Event, every: float) -> None:
    """One byte now and then, never a whole line."""
    while not stop.wait(every):
        try:
            sock.send(b"a")
        except OSError:
            return


def test_slow_drip_is_cut_off_by_the_request_deadline(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    """A byte every 0.2 s keeps the idle timer (1 s) happy forever; the
    request deadline (0.8 s for the whole request line) ends it, in each
    service that waits for a request line."""
    (tmp_path / "f.txt").write_text("hello\n")
    for service, extra in (
        ("gopher", ["--root", str(tmp_path)]),
        ("charcount", []),
        ("greeting", ["--token", "a" * 64]),  # each dripped "a" could still be it
    ):
        proc = cli(["serve", service, "-l", "tcp:127.0.0.1:0", "--timeout", "1",
                    "--request-timeout", "0.8", *extra])
        (ep,) = proc.wait_listening(1)
        stop = threading.Event()
        with connect(ep, timeout=10) as sock:
            started = time.monotonic()
            dripper = threading.Thread(target=_drip, args=(sock, stop, 0.2))
            dripper.start()
            try:
                while sock.recv(65536):
                    pass
            except ConnectionResetError:
                pass
            held = time.monotonic() - started
            stop.set()
            dripper.join(5)
        proc.stop()
        assert "request timed out" in proc.log, (service, proc.log)
        # Never early; generous above for a loaded machine.
        assert 0.8 <= held < 5, (service, held)


def test_out_of_descriptors_the_server_keeps_serving(tmp_path: Path) -> None:
    """At a descriptor limit of 64, 150 connections at once: the excess
    waits, never a traceback, and once they are gone a new client is served
    (the accept path must not stop for good)."""
    import subprocess
    import sys

    code = (
        "import resource, runpy, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "sys.argv = ['sockworks'] + sys.argv[1:]\n"
        "runpy.run_module('sockworks', run_name='__main__')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "echo", "-l", "tcp:127.0.0.1:0",
         "--per-source", "0", "--grace", "1"],
        stderr=subprocess.PIPE, text=True,
    )
    early: list[str] = []
    try:
        assert proc.stderr is not None
        listening = re.compile(r"listening on tcp:127\.0\.0\.1:(\d+)")
        while not (found := listening.search(line := proc.stderr.readline())):
            assert line, "exited before listening: " + "".join(early)
            early.append(line)
        port = int(found.group(1))
        flood = []
        for _ in range(150):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            flood.append(s)
        # Make sure the server has seen the flood: one of them echoes.
        probe = flood[0]
        probe.setblocking(True)
        probe.settimeout(10)
        probe.sendall(b"x")
        assert probe.recv(1) == b"x"
        for s in flood:
            s.close()
        # A fresh client is served once descriptors are free again.
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    c.sendall(b"ping")
                    if c.recv(4) == b"ping":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server stopped accepting"
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=15)
    err = "".join(early) + rest
    assert proc.returncode == 0
    assert "Traceback" not in err, err
    # It stops accepting below the limit, so the excess waits in the backlog
    # instead of being closed by the loop's out-of-descriptors handling.
    assert "max connections lowered from 1024" in err, err


def test_shutdown_serves_what_waits_in_the_backlog() -> None:
    """A rolling restart behind a balancer: connections queued in the
    backlog when SIGTERM comes are served, not reset (closing a listening
    socket resets them, and the balancer cannot retry: the request went)."""
    import sockworks
    from sockworks.testing import running

    class Answer(sockworks.StreamProtocol):
        def on_connect(self, peer: sockworks.Peer, local: sockworks.Peer | None = None) -> bytes:
            return b"hi\n"

        def on_data(self, data: bytes) -> sockworks.Output:
            return sockworks.close(b"got " + data)

    with running(Answer, limits=sockworks.Limits(max_connections=1), grace=5) as srv:
        ep = srv.endpoint()
        holder = connect(ep, timeout=10)
        assert holder.recv(3) == b"hi\n"  # the one slot is taken
        queued = [connect(ep, timeout=10) for _ in range(3)]  # wait in the backlog
        for i, sock in enumerate(queued):
            sock.sendall(b"request %d\n" % i)
        srv.stop()
        for i, sock in enumerate(queued):
            data = b""
            try:
                while chunk := sock.recv(100):
                    data += chunk
            except ConnectionResetError:
                raise AssertionError(f"queued client {i} was reset") from None
            assert data == b"hi\ngot request %d\n" % i
            sock.close()
        holder.close()
    assert srv.finished_in_grace
