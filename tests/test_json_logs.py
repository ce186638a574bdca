"""``--log-format json``: every stderr line one JSON object, with the
connection's fields; ``text`` stays the default, unchanged."""

from __future__ import annotations

import json
import logging
import queue
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, CLIProcess, require_peer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockworks import parse_endpoint
from sockworks._logformat import FIELDS, JsonFormatter, event_line

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
COMMON = {"time", "level", "logger", "message", "pid"}


def records(proc: CLIProcess) -> list[dict[str, Any]]:
    out = []
    for line in proc.lines:
        assert line.isascii(), line
        record = json.loads(line)
        assert isinstance(record, dict), line
        out.append(record)
    return out


def wait_records(
    proc: CLIProcess, count: int, timeout: float = 10.0, **match: Any
) -> list[dict[str, Any]]:
    """Until ``count`` records have these fields (seen or to come)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in records(proc) if all(r.get(k) == v for k, v in match.items())]
        if len(found) >= count:
            return found
        left = deadline - time.monotonic()
        if left <= 0 or proc.proc.poll() is not None:
            raise AssertionError(f"{count} records with {match} expected:\n{proc.log}")
        try:
            proc._queue.get(timeout=min(left, 0.2))
        except queue.Empty:
            pass


def listening(proc: CLIProcess, count: int) -> list[Any]:
    return [parse_endpoint(r["endpoint"])
            for r in wait_records(proc, count, event="listening")[:count]]


def test_every_line_is_a_json_object(cli: Any) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "-l", "udp:127.0.0.1:0",
                  "--log-format", "json", "--deny", "127.0.0.2", "--max-datagram", "10"])
    tcp, udp = listening(server, 2)
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
        s.sendall(b"hello")
        assert s.recv(16) == b"hello"
    (closed,) = wait_records(server, 1, event="closed")
    with socket.create_connection((tcp.host, tcp.port), source_address=("127.0.0.2", 0)):
        (refused,) = wait_records(server, 1, event="refused")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
        d.sendto(b"x" * 20, (udp.host, udp.port))
        (dropped,) = wait_records(server, 1, event="dropped")
    assert server.stop() == 0

    every = records(server)
    assert len(every) == len(server.lines) >= 7
    for record in every:
        assert record.keys() >= COMMON, record
        assert TIME.fullmatch(record["time"]), record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    (connected,) = [r for r in every if r.get("event") == "connected"]
    assert connected["service"] == "echo"
    assert connected["logger"] == "sockworks.echo"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", connected["peer"])
    assert connected["message"] == f"{connected['peer']} connected"
    assert closed["peer"] == connected["peer"]
    assert closed["bytes_in"] == closed["bytes_out"] == 5
    assert isinstance(closed["duration"], float) and 0 <= closed["duration"] < 10
    assert closed["reason"] is None  # a normal close
    assert closed["service"] == "echo"
    assert refused["peer"].startswith("127.0.0.2:")
    assert refused["reason"] == "denied by 127.0.0.2/32"
    assert dropped["reason"].startswith("oversize datagram")
    assert {r["endpoint"] for r in every if r.get("event") == "listening"} == {str(tcp), str(udp)}
    assert any(r["message"] == "SIGTERM received: shutting down" for r in every)


def test_text_stays_the_default(cli: Any) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0"])
    (tcp,) = server.wait_listening(1)
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
        s.sendall(b"abc")
        assert s.recv(16) == b"abc"
    server.wait_for("closed after")
    assert server.stop() == 0
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"
    assert server.lines[0] == f"sockworks: echo listening on {tcp}"
    assert re.fullmatch(rf"{stamp} INFO sockworks\.echo: 127\.0\.0\.1:\d+ connected",
                        server.lines[1]), server.log
    assert re.fullmatch(
        rf"{stamp} INFO sockworks\.echo: 127\.0\.0\.1:\d+ closed after \d+\.\d{{3}} s, "
        r"3 B in, 3 B out", server.lines[2]), server.log
    assert not any(line.startswith("{") for line in server.lines)


def test_config_file_log_format_and_a_traceback(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "crashy.py").write_text(
        "from sockworks import StreamProtocol\n"
        "class Crashy(StreamProtocol):\n"
        "    def on_data(self, data):\n"
        "        raise ValueError('bad\\nline')\n"
    )
    config = tmp_path / "s.toml"
    config.write_text(
        '[server]\nlog_format = "json"\n\n'
        f'[services.crashy]\nservice = "crashy:Crashy"\napp_dir = "{tmp_path}"\n'
        'listen = ["tcp:127.0.0.1:0"]\n'
    )
    server = cli(["serve", "--config", str(config)])
    (tcp,) = listening(server, 1)
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
        s.sendall(b"x")
        assert s.recv(16) == b""
    (error,) = wait_records(server, 1, event="error")
    (closed,) = wait_records(server, 1, event="closed")
    assert server.stop() == 0
    records(server)  # every line
    assert error["level"] == "ERROR"
    assert error["service"] == "crashy"
    assert "Traceback (most recent call last)" in error["exc"]
    assert "ValueError: bad\nline" in error["exc"]
    assert closed["reason"] == "internal error"


def test_gopher_selectors_of_any_bytes_give_valid_json(cli: Any) -> None:
    server = cli(["serve", "gopher", "-l", "tcp:127.0.0.1:0", "--log-format", "json"])
    (tcp,) = listening(server, 1)
    sent = 0

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=200))
    def one(selector: bytes) -> None:
        nonlocal sent
        with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
            s.sendall(selector + b"\r\n")
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        sent += 1
        (*_, last) = wait_records(server, sent, event="closed")
        assert isinstance(last["message"], str)
        if "request" in last:
            assert isinstance(last["request"], str)

    one()
    assert server.stop() == 0
    assert len(records(server)) == len(server.lines)  # every line, after shutdown too


def test_the_formatter_never_writes_invalid_json() -> None:
    formatter = JsonFormatter()
    try:
        raise RuntimeError("boom \udcff")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("sockworks.x", logging.ERROR, "", 0, "%s asked %s", (
        "peer", "'\udcff\x00é\U0001f600'"), exc_info)
    record.__dict__.update(event="closed", peer="[::1]:5", request="\ud800x", duration=0.5)
    line = formatter.format(record)
    assert line.isascii() and "\n" not in line
    out = json.loads(line)
    assert out["request"] == "\ufffdx"
    assert out["message"] == "peer asked '\ufffd\x00é\U0001f600'"
    assert "RuntimeError: boom \ufffd" in out["exc"]
    assert out["duration"] == 0.5
    # Strictly valid for any parser: no escaped lone surrogate is left.
    assert not any("\ud800" <= c <= "\udfff" for v in out.values() if isinstance(v, str)
                   for c in v)
    assert json.loads(event_line("listening on tcp:1.2.3.4:5", event="listening"))["event"] == \
        "listening"


# -- the documentation's examples ---------------------------------------------

DOC = ROOT / "docs" / "deploy.md"


def doc_block(contains: str, lang: str = "sh") -> str:
    text = DOC.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if contains in b]
    assert len(blocks) == 1, f"{DOC.name} has {len(blocks)} {lang} blocks with {contains!r}"
    return blocks[0].strip()


def jq(command: str, lines: list[str]) -> list[dict[str, Any]]:
    """The ``| jq ...`` part of ``command``, on ``lines``."""
    program = shlex.split(command.split("| jq ", 1)[1])
    out = subprocess.run(
        [require_peer("jq"), *program], input="\n".join(lines).encode(),
        capture_output=True, timeout=20, check=True,
    ).stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def test_docs_json_examples(cli: Any) -> None:
    command = doc_block("--log-format json 2>&1 | jq")
    server_part = command.split(" 2>&1 ")[0]
    args = [a.replace(":7007", ":0") for a in server_part.split()[1:]]
    server = cli([*args, "--deny", "127.0.0.2"])  # and a refusal, for the journald one
    (tcp,) = listening(server, 1)
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
        s.sendall(b"hello")
        assert s.recv(16) == b"hello"
    wait_records(server, 1, event="closed")
    with socket.create_connection((tcp.host, tcp.port), source_address=("127.0.0.2", 0)):
        wait_records(server, 1, event="refused")
    assert server.stop() == 0

    (closed,) = jq(command, server.lines)
    assert list(closed) == ["peer", "duration", "bytes_in", "bytes_out", "reason"]
    assert closed["bytes_in"] == closed["bytes_out"] == 5 and closed["reason"] is None
    (refused,) = jq(doc_block("journalctl"), server.lines)
    assert refused["peer"].startswith("127.0.0.2:")
    assert refused["reason"] == "denied by 127.0.0.2/32"

    # The example line has the fields a real closing line has (and a request).
    example = json.loads(doc_block('"event": "closed"', "json"))
    real = next(r for r in records(server) if r.get("event") == "closed")
    assert set(example) - {"request"} == set(real)
    # Every field the table names is one the formatter writes.
    section = DOC.read_text(encoding="utf-8").split("\n## JSON logs\n", 1)[1].split("\n## ")[0]
    table = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", section, re.M)
    named = {name for pair in table for name in pair if name}
    assert named == COMMON | set(FIELDS) | {"service", "worker", "exc"}
