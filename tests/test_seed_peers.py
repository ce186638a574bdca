"""The seed services used through real peer programs nobody here wrote:
telnet (as seed 004 does), OpenBSD nc, ncat and socat."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pexpect
from conftest import CLIProcess, require_peer

STAMP = r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]"


def serve(cli: type[CLIProcess], service: str, *listen: str) -> list[str]:
    args = ["serve", service]
    for e in listen:
        args += ["-l", e]
    proc = cli(args)
    return [str(e) for e in proc.wait_listening(len(listen))]


def port_of(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[1]


def run(cmd: list[str], stdin: bytes = b"", timeout: float = 15) -> bytes:
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    assert done.returncode == 0, (cmd, done.stderr)
    return done.stdout


def test_charcount_by_hand_with_telnet(cli: type[CLIProcess]) -> None:
    telnet = require_peer("telnet")
    (endpoint,) = serve(cli, "charcount", "tcp:127.0.0.1:0")
    session = pexpect.spawn(telnet, ["127.0.0.1", port_of(endpoint)], timeout=10)
    try:
        session.expect(r"welcome, \('127\.0\.0\.1', \d+\)\r?\n")
        session.expect("Please enter a string:")
        session.sendline("hello, telnet")
        session.expect(r"You entered 13 characters\.")
        session.expect("Connection closed by foreign host")
    finally:
        session.close(force=True)


def test_charcount_with_openbsd_nc(cli: type[CLIProcess]) -> None:
    nc = require_peer("nc")
    (endpoint,) = serve(cli, "charcount", "tcp:127.0.0.1:0")
    out = run([nc, "-N", "127.0.0.1", port_of(endpoint)], b"four\r\n").decode()
    assert re.fullmatch(
        r"welcome, \('127\.0\.0\.1', \d+\)\nPlease enter a string:You entered 4 characters\.\n",
        out,
    ), out


def test_greeting_with_ncat(cli: type[CLIProcess]) -> None:
    ncat = require_peer("ncat")
    (endpoint,) = serve(cli, "greeting", "tcp:127.0.0.1:0")
    assert run([ncat, "127.0.0.1", port_of(endpoint)], b"1") == b"welcome to server!"
    assert run([ncat, "127.0.0.1", port_of(endpoint)], b"x\n") == b"please go out!"


def test_timestamp_with_socat_tcp_and_udp(cli: type[CLIProcess]) -> None:
    socat = require_peer("socat")
    tcp, udp = serve(cli, "timestamp", "tcp:127.0.0.1:0", "udp:127.0.0.1:0")
    out = run([socat, "-t", "1", "-", f"TCP:127.0.0.1:{port_of(tcp)}"], b"via socat").decode()
    assert re.fullmatch(rf"{STAMP} via socat", out), out
    out = run([socat, "-t", "1", "-", f"UDP:127.0.0.1:{port_of(udp)}"], b"datagram").decode()
    assert re.fullmatch(rf"{STAMP} datagram", out), out


def test_thanks_with_openbsd_nc(cli: type[CLIProcess]) -> None:
    nc = require_peer("nc")
    (endpoint,) = serve(cli, "thanks", "tcp:127.0.0.1:0")
    assert run([nc, "127.0.0.1", port_of(endpoint)]) == b"thank you for connecting"


def test_echo_over_unix_sockets_with_socat(cli: type[CLIProcess], tmp_path: Path) -> None:
    socat = require_peer("socat")
    stream, dgram = tmp_path / "echo.sock", tmp_path / "echo.dgram"
    serve(cli, "echo", f"unix:{stream}", f"unixgram:{dgram}")
    payload = bytes(range(256)) * 100
    assert run([socat, "-t", "2", "-", f"UNIX-CONNECT:{stream}"], payload) == payload
    client = tmp_path / "client.dgram"
    out = run(
        [socat, "-t", "1", "-", f"UNIX-SENDTO:{dgram},bind={client}"], b"dgram over unix"
    )
    assert out == b"dgram over unix"


def test_echo_ipv6_with_ncat(cli: type[CLIProcess]) -> None:
    from conftest import has_ipv6

    if not has_ipv6():
        import pytest

        pytest.skip("no IPv6 loopback on this machine")
    ncat = require_peer("ncat")
    (endpoint,) = serve(cli, "echo", "tcp:[::1]:0")
    assert run([ncat, "::1", port_of(endpoint)], b"six\n") == b"six\n"
