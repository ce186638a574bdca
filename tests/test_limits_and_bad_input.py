"""What a stranger on the network can send, and what a person can get
wrong on the command line: each gets a clear answer, never a crash."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, datagram_exchange, recv_all, run_cli

import sockworks
from sockworks import Limits
from sockworks.protocols.seeds import Echo
from sockworks.testing import running


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN, as a crashed peer would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- limits ---------------------------------------------------------------------------


def test_max_connections_excess_waits_in_the_backlog() -> None:
    with running(Echo, limits=Limits(max_connections=2)) as srv:
        endpoint = srv.endpoint()
        first, second = connect(endpoint), connect(endpoint)
        for sock in (first, second):
            sock.sendall(b"a")
            assert sock.recv(10) == b"a"
        third = connect(endpoint)  # the kernel completes the handshake…
        third.sendall(b"waiting")
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):  # …but we do not accept it yet
            third.recv(10)
        first.close()
        third.settimeout(5)
        assert third.recv(10) == b"waiting"  # served once a slot is free
        second.close()
        third.close()


def test_slow_reader_does_not_grow_server_memory(cli: type[CLIProcess]) -> None:
    """A client that sends but never reads: the server stops reading from
    it once its output buffer is full, so memory stays flat."""
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--max-output", "65536"])
    (endpoint,) = proc.wait_listening()
    before = rss_kib(proc.proc.pid)
    sock = connect(endpoint)
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    stalled_since = None
    while sent < 512 * 1024 * 1024:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            # Blocked: wait a little in case the server is only slow.
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break
            time.sleep(0.01)
    after = rss_kib(proc.proc.pid)
    sock.close()
    # The kernel's socket buffers on both sides hold a few MiB at most.
    assert sent < 64 * 1024 * 1024, f"the server kept reading: {sent} bytes accepted"
    assert after - before < 16 * 1024, f"server RSS grew {after - before} KiB"
    assert proc.stop() == 0


@pytest.mark.parametrize("service", ["echo", "timestamp", "greeting", "charcount", "thanks"])
def test_garbage_nul_and_invalid_utf8(cli: type[CLIProcess], service: str) -> None:
    proc = cli(["serve", service, "-l", "tcp:127.0.0.1:0", "--max-line", "1024"])
    (endpoint,) = proc.wait_listening()
    garbage = bytes(range(256)) * 64 + b"\x00" * 1000 + b"\xff\xfe\xc3\x28" * 100
    for _ in range(3):
        with connect(endpoint) as sock:
            try:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                recv_all(sock)
            except OSError:  # reset, broken pipe, or ENOTCONN from shutdown()
                pass  # the server may close on us mid-send: that is allowed
    # …and it still serves a well-behaved client.
    with connect(endpoint) as sock:
        if service != "thanks":  # thanks closes at once: writing would meet a reset
            sock.sendall(b"1\n")
            sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) != b""
    assert proc.stop() == 0
    assert "Traceback" not in proc.log


def test_reset_mid_write_costs_one_debug_line(cli: type[CLIProcess]) -> None:
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "-v"])
    (endpoint,) = proc.wait_listening()
    for _ in range(5):
        sock = connect(endpoint)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"z" * 1024 * 1024)  # the echo fills our receive buffer
        reset(sock)
    with connect(endpoint) as sock:
        sock.sendall(b"still here")
        assert sock.recv(100) == b"still here"
    proc.wait_for(r"closed after .*\((reset by peer|broken pipe)\)")
    assert proc.stop() == 0
    assert "Traceback" not in proc.log


def test_connection_flood_is_served_in_turn() -> None:
    """More clients at once than max_connections: all are served, in turn."""
    with running(Echo, limits=Limits(max_connections=8)) as srv:
        endpoint = srv.endpoint()
        socks = [connect(endpoint, timeout=10) for _ in range(64)]
        for i, sock in enumerate(socks):
            sock.sendall(b"%d" % i)
            sock.shutdown(socket.SHUT_WR)
        for i, sock in enumerate(socks):
            assert recv_all(sock) == b"%d" % i
            sock.close()


def test_datagram_garbage_and_oversize() -> None:
    with running(sockworks.ProtocolDriver(datagram=lambda: _Upper()), "udp:127.0.0.1:0") as srv:
        endpoint = srv.endpoint()
        assert datagram_exchange(endpoint, b"")[0] == b""
        big = b"q" * 60000
        assert datagram_exchange(endpoint, big)[0] == big.upper()
        assert datagram_exchange(endpoint, b"\xff\x00")[0] == b"\xff\x00"


class _Upper(sockworks.DatagramProtocol):
    def on_datagram(self, data: bytes, peer: sockworks.Peer) -> bytes | None:
        return data.upper()


# -- unix socket files -----------------------------------------------------------------------


def test_stale_unix_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: a crashed server's leftover
    with running(Echo, f"unix:{path}") as srv, connect(srv.endpoint()) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"


def test_live_unix_socket_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with running(Echo, f"unix:{path}"):
        done = run_cli("serve", "echo", "-l", f"unix:{path}")
        assert done.returncode == 1
        assert done.stderr.decode() == (
            f"sockworks: error: cannot bind unix:{path}: another process is listening on {path}\n"
        )


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    done = run_cli("serve", "echo", "-l", f"unix:{path}")
    assert done.returncode == 1
    assert b"exists and is not a socket" in done.stderr
    assert path.read_text() == "keep me"


# -- command-line errors: one line, non-zero, never a traceback ------------------------------


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["serve", "nosuch"], 2, "unknown service 'nosuch'"),
        (["serve", "echo", "-l", "tcp:127.0.0.1"], 2, "has no port"),
        (["serve", "echo", "-l", "tcp:127.0.0.1:99999"], 2, "out of range"),
        (["serve", "echo", "-l", "bogus:x:1"], 2, "unknown transport"),
        (["serve", "echo", "--bogus-option"], 2, "unrecognized arguments: --bogus-option"),
        (["serve", "echo", "--timeout", "soon"], 2, "is not a number of seconds"),
        (["serve", "echo", "--max-line", "0"], 2, "must be positive"),
        (["serve", "echo", "-l", "tcp:no-such-host.invalid:0"], 1, "cannot resolve"),
        (["serve", "echo", "-l", "tcp:192.0.2.1:0"], 1, "address not available"),
        (["serve"], 2, "name a SERVICE to run"),
        ([], 2, "required: COMMAND"),
    ],
)
def test_cli_errors(args: list[str], status: int, message: str) -> None:
    done = run_cli(*args)
    line = one_line_error(done)
    assert done.returncode == status, line
    assert message in line
    assert line.startswith(("sockworks: error:", "sockworks serve: error:"))


def test_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "echo", "-l", f"tcp:127.0.0.1:{port}")
    assert one_line_error(done) == (
        f"sockworks: error: cannot bind tcp:127.0.0.1:{port}: address already in use"
    )
    assert done.returncode == 1


def test_nothing_is_left_bound_when_one_listener_fails(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock_path = tmp_path / "first.sock"
        done = run_cli("serve", "echo", "-l", f"unix:{sock_path}", "-l", f"tcp:127.0.0.1:{port}")
    assert done.returncode == 1
    assert not sock_path.exists()


def test_permission_denied_on_a_privileged_port(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # Root may bind anything: run the command as an unprivileged user.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing")
        prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    else:
        prefix = []
    cmd = [*prefix, sys.executable, "-m", "sockworks", "serve", "echo", "-l", "tcp:127.0.0.1:7"]
    env = dict(os.environ, HOME=str(tmp_path))
    done = subprocess.run(cmd, capture_output=True, timeout=20, cwd="/", env=env)
    if b"No module named sockworks" in done.stderr:
        pytest.skip("the unprivileged user cannot read this checkout")
    assert one_line_error(done) == (
        "sockworks: error: cannot bind tcp:127.0.0.1:7: permission denied "
        "(ports below 1024 need privileges)"
    )
    assert ROOT.exists()
