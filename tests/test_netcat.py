"""`sockworks connect` and `sockworks listen` against each other and small
in-test servers: every transport, binary data, half-close, errors and their
exit codes, --zero. Options and interactive mode are in
test_netcat_options.py, TLS in test_netcat_tls.py, real peers in
test_netcat_interop.py."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from _netcat_helpers import Procs, digest, free_port, in_process, one_line, payload
from conftest import run_cli

MIB = 1 << 20


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()
    for leftover in Path("/tmp").glob(Path(short(tmp_path, "*")).name):
        leftover.unlink(missing_ok=True)


def short(path: Path, name: str) -> str:
    """Unix socket paths must be short; tmp_path can be long."""
    target = Path("/tmp") / f"sw-nc-{os.getpid()}-{path.name[-12:]}-{name}"
    return str(target)


# -- data over every transport -------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_stream_binary_both_directions(procs: Procs, tmp_path: Path, transport: str) -> None:
    to_listener, to_client = payload(3 * MIB, 1), payload(2 * MIB, 2)
    where = "tcp:127.0.0.1:0" if transport == "tcp" else "unix:" + short(tmp_path, "s.sock")
    listener = procs.sockworks("listen", where, name="listen", stdin=to_client)
    client = procs.sockworks("connect", listener.endpoint(), name="connect", stdin=to_listener)
    assert client.wait() == 0, client.err
    assert listener.wait() == 0, listener.err
    assert digest(listener.out) == digest(to_listener)
    assert digest(client.out) == digest(to_client)


@pytest.mark.parametrize("transport", ["udp", "unixgram"])
def test_datagrams_both_directions(procs: Procs, tmp_path: Path, transport: str) -> None:
    where = "udp:127.0.0.1:0" if transport == "udp" else "unixgram:" + short(tmp_path, "d.sock")
    reply = bytes(range(256))[::-1]
    listener = procs.sockworks("listen", where, name="listen", stdin=reply)
    client = procs.sockworks("connect", "--wait", "1", listener.endpoint(), name="connect",
                             stdin=bytes(range(256)))
    assert client.wait() == 0, client.err
    assert client.out == reply
    assert listener.wait_out(256) == bytes(range(256))
    assert listener.stop() == 0


class HalfCloseServer:
    """Reads until EOF, then answers with the SHA-256 of what it read."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            h = hashlib.sha256()
            while data := conn.recv(65536):
                h.update(data)
            conn.sendall(h.hexdigest().encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def test_half_close_connect(procs: Procs) -> None:
    server = HalfCloseServer()
    data = payload(MIB)
    client = procs.sockworks("connect", f"127.0.0.1:{server.port}", stdin=data)
    assert client.wait() == 0, client.err
    assert client.out == digest(data).encode() + b"\n"
    server.close()


def test_half_close_listen(procs: Procs) -> None:
    data = payload(MIB, 3)
    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", stdin=data)
    port = int(listener.endpoint().rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        h = hashlib.sha256()
        while chunk := sock.recv(65536):
            h.update(chunk)
        sock.sendall(b"sha256 " + h.hexdigest().encode())
    assert listener.wait() == 0, listener.err
    assert listener.out == b"sha256 " + digest(data).encode()


def test_no_shutdown_keeps_write_side_open(procs: Procs) -> None:
    server = HalfCloseServer()  # answers only after EOF, which never comes
    client = procs.sockworks("connect", "--no-shutdown", "--idle-timeout", "0.5",
                             f"127.0.0.1:{server.port}", stdin=b"data")
    assert client.wait() == 1
    assert client.out == b""
    assert "idle" in client.err
    server.close()


# -- errors and exit codes ------------------------------------------------------


def one_error_line(result: object, status: int, fragment: str) -> None:
    code, err = result.returncode, result.stderr.decode()  # type: ignore[attr-defined]
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_refused() -> None:
    one_error_line(run_cli("connect", f"tcp:127.0.0.1:{free_port()}", input=b"x"), 1,
                   "connection refused")


def test_udp_refused() -> None:
    port = free_port(socket.SOCK_DGRAM)
    one_error_line(run_cli("connect", "--wait", "5", f"udp:127.0.0.1:{port}", input=b"x"), 1,
                   "connection refused")


def test_host_not_found(capsys: pytest.CaptureFixture[str]) -> None:
    one_line(capsys, 1, "host not found", "connect", "no-such-host.invalid:80")


def test_no_unix_socket(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one_line(capsys, 1, "no socket at", "connect", f"unix:{tmp_path}/none.sock")


def test_connect_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    # A listener whose accept queue is full drops new SYNs: the connect hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        try:
            one_line(capsys, 1, "timed out", "connect", "--timeout", "0.3", f"127.0.0.1:{port}")
        finally:
            for s in fillers:
                s.close()


def test_idle_timeout(procs: Procs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = procs.sockworks("connect", "--idle-timeout", "0.3", f"127.0.0.1:{port}",
                                 stdin="pipe")
        conn, _ = server.accept()
        assert client.wait() == 1
        conn.close()
    assert "idle for 0.3 s" in client.err and len(client.err.splitlines()) == 1


def test_reset() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def reset() -> None:
            conn, _ = server.accept()
            conn.recv(10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

        t = threading.Thread(target=reset, daemon=True)
        t.start()
        one_error_line(run_cli("connect", f"127.0.0.1:{port}", input=b"hello"), 1,
                       "connection reset")


def test_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        one_line(capsys, 1, "already in use", "listen", f"tcp:127.0.0.1:{port}")


@pytest.mark.parametrize("args", [
    ["connect", "nonsense"],
    ["connect", "tcp:127.0.0.1:0"],
    ["connect", "--send-only", "--recv-only", "127.0.0.1:1"],
    ["connect", "--tls", "udp:127.0.0.1:1"],
    ["connect", "--zero", "127.0.0.1:80-20"],
    ["connect", "--bogus", "127.0.0.1:1"],
    ["connect", "--broadcast", "tcp:127.0.0.1:1"],
    ["connect", "--tls", "--cafile", "/nonexistent.pem", "127.0.0.1:1"],
    ["listen", "--tls", "tcp:127.0.0.1:0"],
    ["listen", "--allow", "not-a-network", "tcp:127.0.0.1:0"],
    ["listen", "sctp:127.0.0.1:1"],
    ["connect"],
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, err = in_process(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_usage_error_as_a_user_sees_it() -> None:
    result = run_cli("connect", "--send-only", "--recv-only", "127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("sockworks: error: --send-only and --recv-only")


# -- --zero --------------------------------------------------------------------


def test_zero_reports_open_ports_without_sending(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as a, socket.create_server(("127.0.0.1", 0)) as b:
        open_ports = sorted([a.getsockname()[1], b.getsockname()[1]])
        closed = free_port()
        spec = ",".join(str(p) for p in [*open_ports, closed])
        result = run_cli("connect", "--zero", "--timeout", "2", f"127.0.0.1:{spec}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == [
            f"tcp:127.0.0.1:{p} open" for p in open_ports]
        for server in (a, b):
            conn, _ = server.accept()
            conn.settimeout(5)
            assert conn.recv(10) == b""  # connected, sent nothing, closed
            conn.close()
    one_line(capsys, 1, "no open TCP port", "connect", "-z", f"127.0.0.1:{closed}")
