"""The three ways to write a service, on every transport each supports,
with the same core: limits, timeouts, logging."""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, connect, datagram_exchange, recv_all

import sockworks
from sockworks import Limits, Reply, StreamProtocol
from sockworks.testing import running


class UpperProtocol(StreamProtocol):
    def on_data(self, data: bytes) -> sockworks.Output:
        return data.upper()


class UpperDatagram(sockworks.DatagramProtocol):
    def on_datagram(self, data: bytes, peer: sockworks.Peer) -> bytes | None:
        return data.upper()


def blocking_upper(conn: sockworks.BlockingConnection) -> None:
    while data := conn.recv(4096):
        conn.sendall(data.upper())


async def async_upper(stream: sockworks.Stream) -> None:
    while data := await stream.read():
        await stream.write(data.upper())


STREAM_HANDLERS = {
    "protocol": UpperProtocol,
    "async": async_upper,
    "blocking": blocking_upper,
}


def exchange(endpoint: sockworks.Endpoint, payload: bytes) -> bytes:
    with connect(endpoint) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


@pytest.mark.parametrize("style", STREAM_HANDLERS)
def test_stream_styles_on_tcp_and_unix(style: str, tmp_path: Path) -> None:
    handler = STREAM_HANDLERS[style]
    with running(handler, "tcp:127.0.0.1:0", f"unix:{tmp_path}/s.sock") as srv:
        for endpoint in srv.endpoints:
            payload = b"hello world " * 1000
            assert exchange(endpoint, payload) == payload.upper()
    assert not (tmp_path / "s.sock").exists(), "the socket file is removed on shutdown"


def test_blocking_style_on_datagrams(tmp_path: Path) -> None:
    with running(blocking_upper, "udp:127.0.0.1:0", f"unixgram:{tmp_path}/d.sock") as srv:
        for endpoint in srv.endpoints:
            assert datagram_exchange(endpoint, b"ping", tmp_path)[0] == b"PING"


def test_protocol_style_on_datagrams(tmp_path: Path) -> None:
    with running(UpperDatagram, "udp:127.0.0.1:0", f"unixgram:{tmp_path}/d.sock") as srv:
        for endpoint in srv.endpoints:
            assert datagram_exchange(endpoint, b"ping", tmp_path)[0] == b"PING"


def test_async_style_refuses_datagrams() -> None:
    with (
        pytest.raises(sockworks.ConfigError, match="async handler cannot serve udp"),
        running(async_upper, "udp:127.0.0.1:0"),
    ):
        pass


def test_async_stream_api() -> None:
    """read_line, read_exactly, write_eof and IncompleteRead."""
    seen: list[object] = []

    async def handler(stream: sockworks.Stream) -> None:
        seen.append(await stream.read_line())
        seen.append(await stream.read_line(keep_end=True))
        seen.append(await stream.read_exactly(5))
        await stream.write(b"half")
        stream.write_eof()
        try:
            await stream.read_exactly(100)
        except sockworks.IncompleteRead as exc:
            seen.append(exc.partial)

    with running(handler) as srv, connect(srv.endpoint()) as sock:
        sock.sendall(b"first\r\nsecond\n12345tail")
        assert recv_all(sock) == b"half"  # write_eof: we see EOF, may still send
        sock.shutdown(socket.SHUT_WR)
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while len(seen) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [b"first", b"second\n", b"12345", b"tail"]


def test_blocking_connection_api() -> None:
    """read_line with the limit, makefile, shutdown_write."""
    seen: list[object] = []

    def handler(conn: sockworks.BlockingConnection) -> None:
        seen.append(conn.read_line())
        f = conn.makefile("rwb")  # shares the reader's buffer with recv()
        seen.append(f.readline())
        text = conn.makefile("w", encoding="utf-8")
        text.write("text reply\n")
        text.flush()
        conn.shutdown_write()
        seen.append(conn.recv(100))

    with running(handler) as srv, connect(srv.endpoint()) as sock:
        sock.sendall(b"line one\r\nline two\nrest")
        assert recv_all(sock) == b"text reply\n"
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert seen == [b"line one", b"line two\n", b"rest"]


@pytest.mark.parametrize("style", STREAM_HANDLERS)
def test_idle_timeout_in_every_style(style: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sockworks")
    limits = Limits(idle_timeout=0.3)
    with running(STREAM_HANDLERS[style], limits=limits, name=f"idle-{style}") as srv:
        with connect(srv.endpoint()) as sock:
            sock.settimeout(10)
            start = time.monotonic()
            assert recv_all(sock) == b""  # closed by the server
            assert time.monotonic() - start < 8
        deadline = time.monotonic() + 5
        while "idle timeout" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert re.search(rf"sockworks\.idle-{style}.*closed after .*\(idle timeout\)", caplog.text)


def test_line_limit_in_async_and_blocking_styles() -> None:
    async def async_lines(stream: sockworks.Stream) -> None:
        while line := await stream.read_line():
            await stream.write(line + b"\n")

    def blocking_lines(conn: sockworks.BlockingConnection) -> None:
        while line := conn.read_line():
            conn.sendall(line + b"\n")

    for handler in (async_lines, blocking_lines):
        with running(handler, limits=Limits(max_line=100)) as srv, connect(srv.endpoint()) as sock:
            sock.sendall(b"short\n")
            assert sock.recv(100) == b"short\n"
            try:
                sock.sendall(b"y" * 10_000 + b"\n")
                data = recv_all(sock)
            except ConnectionResetError:
                data = b""
            assert b"y" not in data  # the long line is never echoed


def test_handler_exception_is_logged_once_and_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(conn: sockworks.BlockingConnection) -> None:
        if conn.recv(10) == b"boom":
            raise ValueError("bug in the handler")
        conn.sendall(b"fine")

    with running(broken, name="broken") as srv:
        with connect(srv.endpoint()) as sock:
            sock.sendall(b"boom")
            assert recv_all(sock) == b""
        with connect(srv.endpoint()) as sock:
            sock.sendall(b"ok")
            assert recv_all(sock) == b"fine"
    assert caplog.text.count("ValueError: bug in the handler") == 1


def test_protocol_reply_half_close() -> None:
    class Greeter(StreamProtocol):
        def on_connect(self, peer: sockworks.Peer) -> sockworks.Output:
            return Reply(data=b"hello " + str(peer).encode(), half_close=True)

        def on_eof(self) -> sockworks.Output:
            return sockworks.close(reason="client done")

    with running(Greeter) as srv, connect(srv.endpoint()) as sock:
        data = recv_all(sock)  # EOF from the half-close, connection still open
        assert data.startswith(b"hello 127.0.0.1:")
        sock.sendall(b"still open")


README = (ROOT / "README.md").read_text()
# The scripts; "Running your own service" shows a module the CLI runs
# (tests/test_own_service.py runs that one as written).
EXAMPLES = re.findall(
    r"```python\n(.*?)```", re.sub(r"\n## Running your own service\n.*?(?=\n## )", "", README,
                                   flags=re.S), re.S
)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_examples_run_as_shown(index: int, tmp_path: Path) -> None:
    """Each README example, run as a script, serves on the endpoints it names."""
    code = EXAMPLES[index]
    script = tmp_path / "example.py"
    script.write_text(code)
    named = re.findall(r'"((?:tcp|unix|udp):[^"]+)"', code)
    endpoints = [sockworks.parse_endpoint(e) for e in named]
    assert endpoints, "every example serves something"
    for e in endpoints:
        if e.path:
            Path(e.path).unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, cwd=ROOT)
    try:
        for endpoint in endpoints:
            reply = _talk_when_up(endpoint, tmp_path)
            assert reply and reply != b"hello\n", (endpoint, reply)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def _talk_when_up(endpoint: sockworks.Endpoint, tmp_path: Path) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            if endpoint.is_stream:
                return exchange(endpoint, b"hello\n")
            return datagram_exchange(endpoint, b"hello\n", tmp_path, timeout=0.5)[0]
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
