"""``sockworks demo``: one busy port skips its service, the rest run
(issue 13, item 13), and ``--port-offset`` moves every port."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator

import pytest
from conftest import CLIProcess, connect, recv_all, run_cli

from sockworks import Endpoint, parse_endpoint
from sockworks.cli.serve import demo_listen, demo_try_it
from sockworks.services import SERVICES

# The service whose port the test takes: TCP only, so one socket blocks it.
VICTIM = "thanks"


def demo_endpoints() -> list[tuple[str, Endpoint]]:
    return [
        (spec.name, parse_endpoint(text))
        for spec in SERVICES.values()
        for text in spec.default_listen
    ]


def is_free(endpoint: Endpoint) -> bool:
    """Whether the demo could bind ``endpoint`` now (with SO_REUSEADDR, as
    the server does, so a TIME_WAIT left by another test does not count)."""
    kind = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((endpoint.host, endpoint.port))
        except OSError:
            return False
    return True


@pytest.fixture
def occupied() -> Iterator[Endpoint]:
    """The victim's port, held by a listener of ours for the test."""
    busy = [f"{e} ({name})" for name, e in demo_endpoints() if name != VICTIM and not is_free(e)]
    if busy:
        pytest.skip("demo ports already in use on this machine: " + ", ".join(busy))
    (endpoint,) = [parse_endpoint(e) for e in SERVICES[VICTIM].default_listen]
    with socket.socket() as holder:
        try:
            holder.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            pytest.skip(f"cannot take {endpoint} for the test: {exc.strerror}")
        holder.listen(1)
        yield endpoint


def test_demo_skips_a_service_whose_port_is_taken(occupied: Endpoint) -> None:
    demo = CLIProcess(["demo"])
    try:
        warning = demo.wait_for(r"warning: .*", timeout=15)
        print(warning.group(0))
        line = warning.string
        assert VICTIM in line and str(occupied) in line
        assert "--port-offset" in line  # how to move the ports
        expected = [e for name, e in demo_endpoints() if name != VICTIM]
        endpoints = demo.wait_listening(len(expected), timeout=15)
        assert sorted(map(str, endpoints)) == sorted(map(str, expected))
        assert not any(f"{VICTIM} listening" in x for x in demo.lines)
        assert sum("warning" in x for x in demo.lines) == 1  # one line, nothing else skipped

        daytime = parse_endpoint(SERVICES["daytime"].default_listen[0])
        with connect(daytime) as sock:
            answer = recv_all(sock)
        print("daytime:", answer)
        assert answer.endswith(b"\r\n") and b"," in answer
    finally:
        status = demo.stop(signal.SIGINT)
        print("\n".join(demo.lines[:3]), "...", f"exit status {status}", sep="\n")
    assert status == 0, demo.log


def test_port_offset_moves_listeners_and_commands() -> None:
    # Pure functions: nothing binds the real ports here.
    assert demo_listen(SERVICES["echo"], 10000) == ["tcp:127.0.0.1:17007", "udp:127.0.0.1:17007"]
    assert demo_try_it(SERVICES["greeting"], 10000) == "echo 1 | nc 127.0.0.1 18001"
    assert demo_try_it(SERVICES["time"], 1) == "nc 127.0.0.1 7038 | od -An -tu1"
    assert demo_try_it(SERVICES["echo"], 0) == SERVICES["echo"].try_it


def test_port_offset_out_of_range_is_one_usage_line() -> None:
    result = run_cli("demo", "--port-offset", "60000")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and "--port-offset 60000" in err and "65535" in err, err


def test_demo_help_says_how_to_move_the_ports() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    assert b"--port-offset" in result.stdout
