"""Each seed service started as a user starts it (``sockworks serve`` in a
subprocess on port 0), over every transport it supports."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, datagram_exchange, has_ipv6, recv_all

from sockworks import Endpoint

STAMP = re.compile(rb"^\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ")


def stream_listeners(tmp_path: Path, name: str) -> list[str]:
    listen = ["tcp:127.0.0.1:0", f"unix:{tmp_path / name}.sock"]
    if has_ipv6():
        listen.append("tcp:[::1]:0")
    return listen


def datagram_listeners(tmp_path: Path, name: str) -> list[str]:
    listen = ["udp:127.0.0.1:0", f"unixgram:{tmp_path / name}.dgram"]
    if has_ipv6():
        listen.append("udp:[::1]:0")
    return listen


def serve(
    cli: type[CLIProcess], service: str, listen: list[str], *extra: str
) -> tuple[CLIProcess, list[Endpoint]]:
    """Start ``sockworks serve SERVICE`` on ``listen``; wait until it listens."""
    args = ["serve", service, *extra]
    for e in listen:
        args += ["--listen", e]
    proc = cli(args)
    return proc, proc.wait_listening(len(listen))


def test_timestamp_over_every_transport(cli: type[CLIProcess], tmp_path: Path) -> None:
    listen = stream_listeners(tmp_path, "ts") + datagram_listeners(tmp_path, "ts")
    proc, endpoints = serve(cli, "timestamp", listen)
    for endpoint in endpoints:
        if endpoint.is_stream:
            with connect(endpoint) as sock:
                sock.sendall(b"hello")
                reply = sock.recv(1024)
                assert STAMP.match(reply) and reply.endswith(b"] hello"), (endpoint, reply)
        else:
            reply, _ = datagram_exchange(endpoint, b"dgram", tmp_path)
            assert STAMP.match(reply) and reply.endswith(b"] dgram"), (endpoint, reply)
    assert proc.stop() == 0


def test_greeting_token_and_timeout(cli: type[CLIProcess], tmp_path: Path) -> None:
    proc, endpoints = serve(cli, "greeting", stream_listeners(tmp_path, "gr"), "--timeout", "1")
    for endpoint in endpoints:
        with connect(endpoint) as sock:
            sock.sendall(b"1")
            assert recv_all(sock) == b"welcome to server!"
        with connect(endpoint) as sock:
            sock.sendall(b"2")
            assert recv_all(sock) == b"please go out!"
    # A silent client is disconnected after the timeout, and that is logged.
    with connect(endpoints[0]) as sock:
        sock.settimeout(10)
        assert recv_all(sock) == b""
    proc.wait_for(r"timed out waiting for the token")
    proc.wait_for(r"closed after .*\(timed out\)")
    assert proc.stop() == 0


def test_greeting_custom_token(cli: type[CLIProcess]) -> None:
    _, (endpoint,) = serve(cli, "greeting", ["tcp:127.0.0.1:0"], "--token", "s3cret")
    with connect(endpoint) as sock:
        sock.sendall(b"s3cret\r\n")
        assert recv_all(sock) == b"welcome to server!"
    with connect(endpoint) as sock:
        sock.sendall(b"1")
        assert recv_all(sock) == b"please go out!"


def test_thanks(cli: type[CLIProcess], tmp_path: Path) -> None:
    proc, endpoints = serve(cli, "thanks", stream_listeners(tmp_path, "th"))
    for endpoint in endpoints:
        with connect(endpoint) as sock:
            assert recv_all(sock) == b"thank you for connecting"
    proc.wait_for(r"got connection from 127\.0\.0\.1:\d+")


def test_charcount(cli: type[CLIProcess], tmp_path: Path) -> None:
    _, endpoints = serve(cli, "charcount", stream_listeners(tmp_path, "cc"))
    for endpoint in endpoints:
        with connect(endpoint) as sock:
            greeting = b""
            while not greeting.endswith(b"Please enter a string:"):
                greeting += sock.recv(1024)
            if endpoint.transport == "tcp":
                host, port = sock.getsockname()[:2]
                assert greeting.startswith(f"welcome, ('{host}', {port})\n".encode())
            sock.sendall("naïve text\r\n".encode())
            assert recv_all(sock) == b"You entered 10 characters.\n"


def test_charcount_line_too_long_closes_with_a_reason(cli: type[CLIProcess]) -> None:
    proc, (endpoint,) = serve(cli, "charcount", ["tcp:127.0.0.1:0"], "--max-line", "100")
    with connect(endpoint) as sock:
        sock.recv(1024)
        try:
            sock.sendall(b"x" * 100_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            data = recv_all(sock)
        except ConnectionResetError:
            pass
    assert b"You entered" not in data
    proc.wait_for(r"closed after .*\(line longer than 100 bytes\)")


def test_echo_over_every_transport(cli: type[CLIProcess], tmp_path: Path) -> None:
    listen = stream_listeners(tmp_path, "echo") + datagram_listeners(tmp_path, "echo")
    _, endpoints = serve(cli, "echo", listen)
    payload = bytes(range(256)) * 4
    for endpoint in endpoints:
        if endpoint.is_stream:
            with connect(endpoint) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == payload
        else:
            assert datagram_exchange(endpoint, payload, tmp_path)[0] == payload


def test_connection_log_lines(cli: type[CLIProcess]) -> None:
    proc, (endpoint,) = serve(cli, "echo", ["tcp:127.0.0.1:0"])
    with connect(endpoint) as sock:
        sock.sendall(b"12345")
        assert sock.recv(10) == b"12345"
    proc.wait_for(r"INFO sockworks\.echo: 127\.0\.0\.1:\d+ connected")
    proc.wait_for(
        r"INFO sockworks\.echo: 127\.0\.0\.1:\d+ closed after \d+\.\d+ s, 5 B in, 5 B out"
    )


def test_quiet_hides_connection_lines(cli: type[CLIProcess]) -> None:
    proc, (endpoint,) = serve(cli, "echo", ["tcp:127.0.0.1:0"], "-q")
    with connect(endpoint) as sock:
        sock.sendall(b"x")
        sock.recv(10)
    assert proc.stop() == 0
    assert not any("connected" in line for line in proc.lines)
    assert any("listening on" in line for line in proc.lines)


def test_debug_logging(cli: type[CLIProcess]) -> None:
    proc, (endpoint,) = serve(cli, "echo", ["udp:127.0.0.1:0"], "-v")
    datagram_exchange(endpoint, b"x")
    proc.wait_for(r"DEBUG sockworks\.echo: 127\.0\.0\.1:\d+: 1 B in, 1 B out")


def test_stream_only_service_refuses_datagram_endpoint(tmp_path: Path) -> None:
    from conftest import run_cli

    done = run_cli("serve", "thanks", "--listen", "udp:127.0.0.1:0")
    assert done.returncode != 0
    assert done.stderr.decode().strip().splitlines() == [
        "sockworks: error: thanks: a protocol handler cannot serve udp endpoints (udp:127.0.0.1:0)"
    ]


@pytest.mark.parametrize("service", ["echo", "timestamp", "greeting", "thanks", "charcount"])
def test_python_dash_m_is_the_same_command(service: str) -> None:
    from conftest import run_cli

    done = run_cli("serve", service, "--help")
    assert done.returncode == 0
    assert b"--listen" in done.stdout
