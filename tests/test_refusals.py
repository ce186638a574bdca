"""Refused connections are logged like dropped datagrams: one line per
source and reason a second, a few lines a second in all, and a summary of
what was not logged one by one - never one line per refusal."""

from __future__ import annotations

import queue
import re
import socket
import time

import pytest
from test_access_loopback import client, served

REFUSALS = 1000
SUMMARY = re.compile(r"127\.0\.0\.2 refused: denied by 127\.0\.0\.2/32 \(and (\d+) more like it")
ONE_BY_ONE = re.compile(r"127\.0\.0\.2:\d+ refused: denied by 127\.0\.0\.2/32")


def accounted(lines: list[str]) -> tuple[int, int]:
    """(refusal log lines, refusals they account for)."""
    count = total = 0
    for line in lines:
        if m := SUMMARY.search(line):
            count += 1
            total += int(m.group(1))
        elif ONE_BY_ONE.search(line):
            count += 1
            total += 1
            if m := re.search(r"\(and (\d+) more like it\)", line):
                total += int(m.group(1))
    return count, total


def test_a_thousand_refusals_cost_a_few_log_lines(cli) -> None:  # type: ignore[no-untyped-def]
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--deny", "127.0.0.2"])
    (tcp,) = server.wait_listening(1)
    for _ in range(REFUSALS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.2", 0))
            s.connect((tcp.host, tcp.port))
    # A bystander on another address is served at once, flood or not.
    started = time.monotonic()
    with client("127.0.0.3", tcp) as ok:
        assert served(ok)
    latency = time.monotonic() - started
    # Every refusal is accounted for: logged, or counted in a summary line
    # (written within a second of the last one it counts).
    deadline = time.monotonic() + 10
    while accounted(server.lines)[1] < REFUSALS and time.monotonic() < deadline:
        try:  # wait for the next stderr line
            server._queue.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
    lines, total = accounted(server.lines)
    assert total == REFUSALS, server.log[-2000:]
    # One line for the first, then at most a summary a second.
    assert lines <= 12, (lines, server.log[-2000:])
    assert any(SUMMARY.search(line) for line in server.lines)
    assert latency < 1.0, latency  # generous: the machine is shared
    assert "Traceback" not in server.log
    assert server.stop() == 0


def test_refusals_held_back_are_summed_up_when_the_service_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood that ends with the server: the summary is written at stop,
    not lost with the pending timer."""
    import asyncio

    from sockworks._core import ConnectionGroup, Driver
    from sockworks._protocol import Peer

    async def main() -> None:
        group = ConnectionGroup("flood", Driver(), asyncio.get_running_loop())
        for port in range(100):
            group.refused(Peer("127.0.0.2", 40000 + port), "denied by 127.0.0.2/32")
        group.stop()

    with caplog.at_level("INFO", logger="sockworks.flood"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "sockworks.flood"]
    assert len(lines) == 2, lines
    assert "and 99 more like it" in lines[-1]
