"""`sockworks connect`/`listen` options: interactive mode on a pty (TCP
and UDP), --keep-open, --max-conns, --allow/--deny, --crlf, --hex,
--send-only/--recv-only, --source, -4/-6, socket options, --timeout on
listen, and closed stdin/stdout."""

from __future__ import annotations

import os
import pty
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _netcat_helpers import SOCKWORKS, Procs, free_port, in_process, one_line, payload
from conftest import has_ipv6, run_cli

MIB = 1 << 20


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


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
