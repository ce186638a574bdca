"""`sockworks connect` and `sockworks listen` against each other and small
in-test servers: every transport, binary data, half-close, errors and their
exit codes, --zero, interactive mode on a pty, and the options. TLS is in
test_netcat_tls.py, real peers in test_netcat_interop.py."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _netcat_helpers import SOCKWORKS, Procs, digest, free_port, payload
from conftest import has_ipv6, run_cli

from sockworks.cli import main

MIB = 1 << 20


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


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


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``sockworks ARGS`` run in this process (fast: no interpreter start),
    for errors raised before any stdin is read."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, capsys.readouterr().err


def one_line(capsys: pytest.CaptureFixture[str], status: int, fragment: str, *args: str) -> None:
    code, err = in_process(capsys, *args)
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


# -- interactive mode on a terminal ----------------------------------------------


def pty_session(argv: list[str], steps: Callable[[Callable[[bytes], None],
                                                   Callable[[bytes], bytes]], None]) -> int:
    import subprocess

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = bytearray()

    def send(data: bytes) -> None:
        os.write(master, data)

    def expect(fragment: bytes) -> bytes:
        deadline = time.monotonic() + 10
        while fragment not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([master], [], [], left)[0]:
                proc.kill()
                raise AssertionError(f"no {fragment!r} on the terminal; saw {bytes(seen)!r}")
            try:
                seen.extend(os.read(master, 4096))
            except OSError:
                break
        if fragment not in seen:
            raise AssertionError(f"no {fragment!r}; saw {bytes(seen)!r}")
        return bytes(seen)

    try:
        steps(send, expect)
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_interactive_tcp() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def upper() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data.upper())

        threading.Thread(target=upper, daemon=True).start()

        def steps(send: Callable[[bytes], None], expect: Callable[[bytes], bytes]) -> None:
            expect(b"> ")
            send(b"hello\n")
            expect(b"HELLO\r\n> ")
            send(b"again\n")
            expect(b"AGAIN")
            send(b"\x04")  # Ctrl-D: EOF, the server closes, we end

        assert pty_session([*SOCKWORKS, "connect", f"127.0.0.1:{port}"], steps) == 0


def test_interactive_udp_shows_sender() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def stamp() -> None:
            for _ in range(2):
                data, addr = server.recvfrom(1024)
                server.sendto(b"[stamp] " + data, addr)

        threading.Thread(target=stamp, daemon=True).start()

        def steps(send: Callable[[bytes], None], expect: Callable[[bytes], bytes]) -> None:
            expect(b"> ")
            send(b"one\n")
            expect(f"127.0.0.1:{port}: [stamp] one\r\n> ".encode())  # one datagram, no LF
            send(b"two\n")
            expect(b"[stamp] two")
            send(b"\x04")

        argv = [*SOCKWORKS, "connect", "--wait", "0.2", f"udp:127.0.0.1:{port}"]
        assert pty_session(argv, steps) == 0


# -- listen options ----------------------------------------------------------------


def test_keep_open_many_clients_stdin_to_all(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "-v", "tcp:127.0.0.1:0", stdin="pipe")
    port = int(listener.endpoint().rsplit(":", 1)[1])
    a = socket.create_connection(("127.0.0.1", port), timeout=10)
    b = socket.create_connection(("127.0.0.1", port), timeout=10)
    with a, b:
        a.sendall(b"from a\n")
        b.sendall(b"from b\n")
        listener.wait_out(14)
        assert sorted(listener.out.splitlines()) == [b"from a", b"from b"]
        assert len(listener.wait_err(r"(?s)(connection from.*){2}").group(0)) > 0
        assert listener.proc.stdin is not None
        listener.proc.stdin.write(b"to all\n")
        listener.proc.stdin.flush()
        assert a.recv(100) == b"to all\n"
        assert b.recv(100) == b"to all\n"
    assert listener.proc.poll() is None  # still serving after both left
    listener.wait_err(r"(?s)(closed the connection.*){2}")
    assert listener.stop() == 0


def test_max_conns_queues_the_rest(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "-v", "--max-conns", "1", "tcp:127.0.0.1:0")
    port = int(listener.endpoint().rsplit(":", 1)[1])
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    listener.wait_err("connection from")
    second = socket.create_connection(("127.0.0.1", port), timeout=10)  # in the backlog
    second.sendall(b"second\n")
    first.sendall(b"first\n")
    listener.wait_out(6)
    first.close()  # frees the one slot: now the second is accepted
    listener.wait_out(13)
    assert listener.out == b"first\nsecond\n"
    second.close()
    assert listener.stop() == 0


def test_allow_deny(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-v", "--deny", "127.0.0.0/8", "--allow", "::1",
                               "tcp:127.0.0.1:0", stdin=b"secret\n")
    port = int(listener.endpoint().rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as refused:
        assert refused.recv(100) == b""
    listener.wait_err("refused a connection from 127.0.0.1")
    listener.stop()
    allowed = procs.sockworks("listen", "--allow", "127.0.0.1/32", "tcp:127.0.0.1:0",
                              name="allowed", stdin=b"welcome\n")
    client = procs.sockworks("connect", allowed.endpoint(), name="client", stdin=b"hi\n")
    assert client.wait() == 0 and client.out == b"welcome\n"


# -- data options ------------------------------------------------------------------


def test_crlf_and_hex(procs: Procs) -> None:
    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", name="listen", stdin=b"ok\n")
    client = procs.sockworks("connect", "--crlf", "--hex", listener.endpoint(), name="connect",
                             stdin=b"a\nb\r\n")
    assert client.wait() == 0, client.err
    assert listener.wait() == 0
    assert listener.out == b"a\r\nb\r\n"
    assert "> 00000000  61 0d 0a 62 0d 0a" in client.err
    assert "< 00000000  6f 6b 0a" in client.err


def test_send_only_and_recv_only(procs: Procs) -> None:
    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", name="l1", stdin=b"unseen\n")
    client = procs.sockworks("connect", "--send-only", listener.endpoint(), name="c1",
                             stdin=b"sent\n")
    assert client.wait() == 0 and client.out == b""
    assert listener.wait() == 0 and listener.out == b"sent\n"
    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", name="l2", stdin=b"shown\n")
    client = procs.sockworks("connect", "--recv-only", listener.endpoint(), name="c2",
                             stdin=b"never sent\n")
    assert client.wait() == 0 and client.out == b"shown\n"
    assert listener.wait() == 0 and listener.out == b""


def test_source_family_and_socket_options(procs: Procs,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    listener = procs.sockworks("listen", "-v", "-4", "tcp:localhost:0", name="l", stdin=b"x")
    source_port = free_port()
    client = procs.sockworks(
        "connect", "-4", "--source", f"127.0.0.1:{source_port}", "--nodelay", "--keepalive",
        "--sndbuf", "65536", "--rcvbuf", "65536", listener.endpoint(), name="c", stdin=b"y")
    assert client.wait() == 0, client.err
    assert client.out == b"x"
    assert listener.wait() == 0 and listener.out == b"y"
    assert f"connection from 127.0.0.1:{source_port}" in listener.err
    one_line(capsys, 1, "no IPv4 address", "connect", "-4", "tcp:[::1]:9")


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 on this machine")
def test_ipv6(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-6", "tcp:[::1]:0", name="l", stdin=b"six")
    assert listener.endpoint().startswith("tcp:[::1]:")
    client = procs.sockworks("connect", "-6", listener.endpoint(), name="c")
    assert client.wait() == 0 and client.out == b"six"


def test_udp_broadcast_option(procs: Procs) -> None:
    listener = procs.sockworks("listen", "udp:127.0.0.1:0", name="l")
    client = procs.sockworks("connect", "--broadcast", "--wait", "0.2", listener.endpoint(),
                             name="c", stdin=b"dgram")
    assert client.wait() == 0, client.err
    assert listener.wait_out(5) == b"dgram"
    listener.stop()


def test_stdout_closed_early_is_not_an_error(procs: Procs, tmp_path: Path) -> None:
    import subprocess

    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", stdin=payload(4 * MIB))
    pipeline = subprocess.run(
        f"{' '.join(SOCKWORKS)} connect {listener.endpoint()} </dev/null | head -c 10 >/dev/null;"
        " echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True,
        timeout=20)
    assert pipeline.stdout.strip() == b"0", pipeline.stderr
    assert b"Traceback" not in pipeline.stderr


def test_listen_timeout_waiting_for_a_peer(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = in_process(capsys, "listen", "--timeout", "0.2", "tcp:127.0.0.1:0")
    assert code == 1
    assert err.splitlines()[-1] == "sockworks: error: no peer within 0.2 s (--timeout)", err


def test_closed_stdin_and_stdout_are_not_mistaken_for_the_socket(procs: Procs) -> None:
    import subprocess

    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", stdin=b"to a closed stdout")
    command = " ".join([*SOCKWORKS, "connect", listener.endpoint()])
    result = subprocess.run(f"{command} <&- >&-", shell=True, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    assert listener.wait() == 0 and listener.out == b""


def test_interactive_udp_a_datagram_per_line_even_from_a_pipe() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]

        def bracket() -> None:
            for _ in range(3):
                data, addr = server.recvfrom(1024)
                server.sendto(b"[" + data + b"]", addr)

        threading.Thread(target=bracket, daemon=True).start()
        result = run_cli("connect", "--interactive", "--wait", "0.5", f"udp:127.0.0.1:{port}",
                         input=b"a\nbb\r\nccc\n")
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == [
            f"127.0.0.1:{port}: [{w}]" for w in ("a", "bb", "ccc")]
