"""inetd mode (issue 10): ``sockworks serve SERVICE --inetd`` serves the
connection on standard input, started by the real systemd-socket-activate
(``-a --inetd``, systemd's Accept=yes), by xinetd (the socket as 0, 1 and
2), or with a socket of the test's own there; datagram services serve the
socket until idle. Every handler style, every built-in service, the
service's limits, and nothing but the protocol on the connection."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _activation import SOCKWORKS, Started, activate, tcp_listener, udp_socket
from conftest import ROOT, recv_all, require_peer, wait_until


def _doc() -> Path:
    """The deployment docs, with the inetd and xinetd examples."""
    return ROOT / "docs" / "deploy.md"


def inetd(
    service: str, *args: str, same_stderr: bool = False
) -> tuple[socket.socket, Started]:
    """``sockworks serve SERVICE --inetd`` with one end of a socketpair as
    standard input and output, as inetd starts it (standard error: a pipe,
    read as log lines, or with ``same_stderr`` the socket too, as xinetd
    does). Returns the other end."""
    ours, theirs = socket.socketpair()
    proc = Started(
        [*SOCKWORKS, "serve", service, *args[: _cut(args)], "--inetd", *args[_cut(args):]],
        stdin=theirs, stdout=theirs, stderr=theirs if same_stderr else subprocess.PIPE,
    )
    theirs.close()
    ours.settimeout(10)
    return ours, proc


def _cut(args: tuple[str, ...]) -> int:
    return args.index("--") if "--" in args else len(args)


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes."""
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def write_app(directory: Path, source: str) -> Path:
    (directory / "app.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return directory


# -- through systemd-socket-activate (Accept=yes) -------------------------------


def test_accept_yes_echo_peer_is_the_clients_and_stdout_stays_empty() -> None:
    listener = tcp_listener()
    with listener:
        proc = Started(activate([listener], [], [*SOCKWORKS, "serve", "echo", "--inetd"],
                                "-a", "--inetd"))
        try:
            for payload in (b"one\n", b"two\ntwo\n"):  # a process per connection
                with socket.create_connection(listener.getsockname(), timeout=10) as client:
                    port = client.getsockname()[1]
                    assert exchange(client, payload) == payload
                proc.wait_for(rf"sockworks\.echo: 127\.0\.0\.1:{port} closed after .*"
                              rf"{len(payload)} B in, {len(payload)} B out")
                assert f"127.0.0.1:{port} connected" in proc.log
        finally:
            proc.send_signal(signal.SIGTERM)
            _, out = proc.finish()
            proc.kill()
    # systemd-socket-activate --inetd leaves the children's stdout as its own
    # (this pipe): sockworks wrote nothing to it.
    assert out == b""


def test_accept_yes_unix_socket_async_handler(tmp_path: Path) -> None:
    app = write_app(tmp_path, """\
        async def handle(stream):
            while line := await stream.read_line():
                await stream.write(line.upper() + b"\\n")
        """)
    path = tmp_path / "upper.sock"
    program = require_peer("systemd-socket-activate")
    proc = Started([program, "-a", "--inetd", "-l", str(path),
                    *SOCKWORKS, "serve", "app:handle", "--app-dir", str(app), "--inetd"])
    try:
        # Bound by systemd-socket-activate.
        wait_until(lambda: path.exists() or proc.proc.poll() is not None, 10, "the socket")
        assert path.exists(), proc.log
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            assert exchange(client, b"abc\nxyz\n") == b"ABC\nXYZ\n", proc.log
        proc.wait_for(r"sockworks\.app:handle: .* closed after")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.finish()
        proc.kill()


def test_access_rules_see_the_connections_address() -> None:
    listener = tcp_listener()
    with listener:
        proc = Started(activate([listener], [],
                                [*SOCKWORKS, "serve", "echo", "--inetd", "--deny", "127.0.0.1"],
                                "-a", "--inetd"))
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as client:
                port = client.getsockname()[1]
                try:
                    reply = exchange(client, b"x\n")
                except ConnectionResetError:  # closed unread: a reset
                    reply = b""
                assert reply == b""
            proc.wait_for(rf"127\.0\.0\.1:{port} refused")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.finish()
            proc.kill()


def test_datagram_socket_served_until_idle() -> None:
    """systemd-socket-activate --inetd with a UDP socket (inetd's dgram
    wait): started by the first datagram, it answers every one, then exits 0
    once none has come for the idle timeout."""
    sock = udp_socket()
    with sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        proc = Started(activate([sock], [], [*SOCKWORKS, "serve", "echo", "--inetd",
                                             "--timeout", "0.5"], "--inetd"))
        try:
            client.settimeout(10)
            for payload in (b"ping", b"pong", b""):
                client.sendto(payload, sock.getsockname())
                assert client.recvfrom(100) == (payload, sock.getsockname())
            last = time.monotonic()
            code, out = proc.finish()
            assert time.monotonic() - last >= 0.45  # not before the idle timeout
            assert (code, out) == (0, b""), proc.log
        finally:
            proc.kill()


# -- xinetd: the docs' line, the socket as 0, 1 and 2 ---------------------------


def _doc_block(heading: str) -> str:
    """The first fenced block under ``heading`` in the deployment docs."""
    doc = _doc()
    text = doc.read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(heading)}\n.*?```\w*\n(.*?)```", text, re.S | re.M)
    assert match, f"{doc.name} has no block under {heading!r}"
    return match.group(1)


def test_xinetd_line_from_the_docs(tmp_path: Path) -> None:
    xinetd = require_peer("xinetd")
    block = _doc_block("### xinetd")
    script = Path(sys.executable).parent / "sockworks"
    # xinetd binds a fixed port: a free one, found by binding port 0.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = (block.replace("/opt/sockworks/bin/sockworks", str(script))
            .replace("= 7007", f"= {port}")
            # The tests' interpreter is root's: run as the user running them.
            .replace("= nobody", f"= {_user()}"))
    assert str(port) in conf and str(script) in conf
    (tmp_path / "xinetd.conf").write_text("defaults\n{\n}\n" + conf)
    log = tmp_path / "xinetd.log"
    proc = Started([xinetd, "-dontfork", "-stayalive", "-f", str(tmp_path / "xinetd.conf"),
                    "-pidfile", str(tmp_path / "pid"), "-filelog", str(log)])
    try:
        def started() -> bool:
            return "Started working" in (log.read_text() if log.exists() else "")

        wait_until(lambda: started() or proc.proc.poll() is not None, 10, "xinetd")
        assert started(), proc.log
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            # Standard error is the connection too: only the protocol's
            # bytes reach the client, never a log line.
            assert exchange(client, b"hello\n") == b"hello\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.finish()
        proc.kill()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def test_stderr_that_is_the_connection_gets_no_log_line() -> None:
    client, proc = inetd("charcount", same_stderr=True)
    try:
        reply = exchange(client, b"hello\n")
        code, _ = proc.finish()
    finally:
        proc.kill()
    assert code == 0
    # Exactly the protocol (the seed's greeting has the peer's address:
    # a socketpair's is empty).
    assert reply == b"welcome, ''\nPlease enter a string:You entered 5 characters.\n"
    # With standard error of its own, the same run does log.
    client, proc = inetd("charcount")
    try:
        assert exchange(client, b"hello\n").endswith(b"You entered 5 characters.\n")
        assert proc.finish()[0] == 0
    finally:
        proc.kill()
    assert "closed after" in proc.log


def test_syslog_handler_when_there_is_a_syslog(tmp_path: Path) -> None:
    import logging

    from sockworks._inetd import log_to_syslog

    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(path))
        syslog.settimeout(5)
        handler = log_to_syslog(str(path))
        try:
            logging.getLogger("sockworks.test").warning("to syslog")
            message = syslog.recv(1000)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    assert re.match(rb"<28>sockworks\[\d+\]: sockworks\.test: to syslog", message), message
    nowhere = log_to_syslog(str(tmp_path / "missing"))
    logging.getLogger().removeHandler(nowhere)
    assert isinstance(nowhere, logging.NullHandler)


# -- every style and service, with its limits ------------------------------------


def test_blocking_handler(tmp_path: Path) -> None:
    app = write_app(tmp_path, """\
        import sys

        def handle(conn):
            line = conn.read_line()
            # Standard output is the connection under inetd: a stray print
            # must not reach the peer.
            print("debugging", line, flush=True)
            sys.stdout.buffer.write(b"raw\\n")
            sys.stdout.flush()
            conn.sendall(b"got " + line + b"\\n")
        """)
    client, proc = inetd("app:handle", "--app-dir", str(app))
    try:
        assert exchange(client, b"seed\n") == b"got seed\n"
        assert proc.finish()[0] == 0
        assert "closed after" in proc.log
    finally:
        proc.kill()


def test_exec_service() -> None:
    client, proc = inetd("exec", "--", "/bin/sh", "-c", "echo $PROTO; cat")
    try:
        assert exchange(client, b"through\n") == b"UNIX\nthrough\n"
        assert proc.finish()[0] == 0
    finally:
        proc.kill()


SERVICES: list[tuple[str, list[str], bytes, str]] = [
    # service, options, what the client sends, what the reply must match
    ("echo", [], b"abc\n", r"abc\n"),
    ("discard", [], b"abc\n", r""),
    ("daytime", [], b"", r"\w+, \w+ \d+, \d{4} \d\d:\d\d:\d\d-\w+\r\n"),
    ("time", [], b"", r"(?s).{4}"),
    ("qotd", [], b"", r"(?s).+"),
    ("timestamp", [], b"hi\n", r"\[.+\] hi\n?"),
    ("greeting", ["--token", "s3cret"], b"s3cret\n", r"welcome to server!"),
    ("thanks", [], b"", r"thank you for connecting"),
    ("charcount", [], b"four\n", r"(?s).*You entered 4 characters\.\n"),
    ("gopher", [], b"\r\n", r"(?s).*\r\n\.\r\n"),
]


@pytest.mark.parametrize(("service", "options", "request_", "pattern"), SERVICES,
                         ids=[s[0] for s in SERVICES])
def test_every_builtin_stream_service(
    service: str, options: list[str], request_: bytes, pattern: str
) -> None:
    client, proc = inetd(service, *options)
    try:
        reply = exchange(client, request_)
        assert re.fullmatch(pattern.encode(), reply, re.S), reply[:200]
        assert proc.finish()[0] == 0, proc.log
    finally:
        proc.kill()


def test_chargen_until_the_client_leaves() -> None:
    client, proc = inetd("chargen")
    try:
        with client:
            data = b""
            while len(data) < 10000:
                data += client.recv(65536)
            assert data[:10] == b" !\"#$%&'()"
        assert proc.finish()[0] == 0
    finally:
        proc.kill()


def test_idle_timeout_and_max_line_hold() -> None:
    client, proc = inetd("echo", "--timeout", "0.3")
    try:
        with client:
            start = time.monotonic()
            assert recv_all(client) == b""  # closed by the server
            assert time.monotonic() - start >= 0.29
        assert proc.finish()[0] == 0
        assert "idle timeout" in proc.log
    finally:
        proc.kill()
    client, proc = inetd("charcount", "--max-line", "16")
    try:
        with client:
            client.sendall(b"x" * 100)
            recv_all(client)
        assert proc.finish()[0] == 0
        assert "line longer than 16 bytes" in proc.log
    finally:
        proc.kill()


def test_sigterm_ends_the_connection_and_exits_zero() -> None:
    client, proc = inetd("echo")
    try:
        with client:
            client.sendall(b"up\n")
            assert client.recv(10) == b"up\n"
            proc.wait_for(r"connected")
            proc.send_signal(signal.SIGTERM)
            assert recv_all(client) == b""
        assert proc.finish()[0] == 0
    finally:
        proc.kill()


# -- what is not a connection ----------------------------------------------------


def test_a_terminal_on_stdin_is_one_line() -> None:
    primary, secondary = os.openpty()
    try:
        result = subprocess.run([*SOCKWORKS, "serve", "echo", "--inetd"], stdin=secondary,
                                capture_output=True, timeout=20, cwd=ROOT)
    finally:
        os.close(primary)
        os.close(secondary)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("sockworks: error: --inetd serves the connection on standard "
                               "input, and standard input is a terminal")
    assert result.stdout == b""


def test_a_listening_socket_or_other_options_are_one_line() -> None:
    listener = tcp_listener()
    with listener:
        result = subprocess.run([*SOCKWORKS, "serve", "echo", "--inetd"], stdin=listener,
                                capture_output=True, timeout=20, cwd=ROOT)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "serve it with --listen fd:0 instead of --inetd" in lines[0]
    a, b = socket.socketpair()
    with a, b:
        result = subprocess.run(
            [*SOCKWORKS, "serve", "echo", "--inetd", "-l", "tcp:127.0.0.1:0", "--workers", "2"],
            stdin=b, capture_output=True, timeout=20, cwd=ROOT)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "--listen, --workers does not apply" in lines[0]


def test_blocking_handler_on_a_datagram_socket(tmp_path: Path) -> None:
    """inetd's ``dgram ... wait``: the UDP socket itself on standard input,
    served by a blocking handler until idle."""
    app = write_app(tmp_path, """\
        def handle(conn):
            conn.sendall(conn.recv().upper())
        """)
    server = udp_socket()
    with server, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        proc = Started([*SOCKWORKS, "serve", "app:handle", "--app-dir", str(app), "--inetd",
                        "--timeout", "0.5"], stdin=server)
        try:
            client.settimeout(10)
            client.sendto(b"quiet", server.getsockname())
            assert client.recvfrom(100) == (b"QUIET", server.getsockname())
            code, out = proc.finish()
            assert (code, out) == (0, b""), proc.log
        finally:
            proc.kill()
