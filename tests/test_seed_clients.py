"""The seeds' own client programs, ported to Python 3 in syntax only, run
unchanged against the sockworks servers on the seeds' ports."""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLIProcess

CLIENTS = Path(__file__).parent / "seed_clients"
STAMP = r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]"


def run_client(name: str, stdin: bytes = b"", timeout: float = 20) -> str:
    done = subprocess.run(
        [sys.executable, str(CLIENTS / name)],
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def start(cli: type[CLIProcess], service: str, count: int) -> CLIProcess:
    """The service on its default (the seed's) ports."""
    proc = cli(["serve", service])
    try:
        proc.wait_listening(count)
    except AssertionError as exc:
        if "address already in use" in str(exc):
            pytest.fail(f"{service}'s seed port is taken on this machine: {exc}")
        raise
    return proc


def test_timestamp_tcp_client(cli: type[CLIProcess]) -> None:
    proc = start(cli, "timestamp", 2)
    out = run_client("timestamp_tcp_client.py", b"hello\nsecond line\n\n")
    assert re.fullmatch(rf"> {STAMP} hello\n> {STAMP} second line\n> ", out), out
    assert proc.stop() == 0


def test_timestamp_udp_client(cli: type[CLIProcess]) -> None:
    proc = start(cli, "timestamp", 2)
    out = run_client("timestamp_udp_client.py", b"hello\n\n")
    assert re.fullmatch(rf"> b'{STAMP} hello'\n> ", out), out
    assert proc.stop() == 0


def test_greeting_client(cli: type[CLIProcess]) -> None:
    proc = start(cli, "greeting", 1)
    assert run_client("greeting_client.py") == "welcome to server!\n"
    assert proc.stop() == 0


def test_greeting_client_too_slow(cli: type[CLIProcess]) -> None:
    """The seed's experiment: with the server's timeout below the client's
    2-second sleep, the server times out and the client gets nothing."""
    proc = cli(["serve", "greeting", "--timeout", "1"])
    proc.wait_listening(1)
    done = subprocess.run(
        [sys.executable, str(CLIENTS / "greeting_client.py")], capture_output=True, timeout=20
    )
    # The client reads EOF (prints an empty line), or, if the server's RST
    # for its late '1' wins the race, a reset: never a greeting.
    assert done.stdout == b"\n" or b"ConnectionResetError" in done.stderr, done
    proc.wait_for("timed out waiting for the token")
    assert proc.stop() == 0


def test_thanks_client(cli: type[CLIProcess]) -> None:
    # The seed connects to socket.gethostname(); our default listener is
    # 127.0.0.1, which is where that name points on a usual machine.
    host = socket.gethostbyname(socket.gethostname())
    if not ipaddress.ip_address(host).is_loopback:
        pytest.skip(f"this machine's name resolves to {host}, not a loopback address")
    proc = start(cli, "thanks", 1)
    assert run_client("thanks_client.py") == "b'thank you for connecting'\n"
    proc.wait_for(r"got connection from 127\.0\.0\.1:\d+")
    assert proc.stop() == 0
