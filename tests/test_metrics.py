"""``--metrics ENDPOINT``: Prometheus metrics over HTTP, scraped with the
real curl and read with prometheus_client's own parser; the numbers must be
the traffic the test sent. Every wait is on a log line or a reply."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ROOT, require_peer, run_cli
from prometheus_client.parser import text_string_to_metric_families

from sockworks import Endpoint
from sockworks._metrics import (
    CLOSE_REASONS,
    DROP_REASONS,
    METRICS,
    PREFIX,
    REFUSE_REASONS,
    MetricsEndpoint,
    ServiceCounts,
    WorkerMetrics,
    close_reason,
    drop_reason,
    refuse_reason,
)

METRICS_ON = r"metrics on (http://\S+)"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, *curl_args: str) -> Samples:
    """GET the metrics with curl; every sample by name and labels."""
    curl = require_peer("curl")
    out = subprocess.run(
        [curl, "-sS", "--fail", "--max-time", "10", *curl_args, url],
        capture_output=True, check=True, timeout=20,
    ).stdout.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(out):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def echo_once(tcp: Endpoint, payload: bytes) -> bytes:
    with socket.create_connection((tcp.host, tcp.port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def udp_exchange(udp: Endpoint, payload: bytes, source: str = "127.0.0.1") -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(0.5)
        s.sendto(payload, (udp.host, udp.port))
        try:
            return s.recv(65536)
        except TimeoutError:
            return None


def test_the_numbers_are_the_traffic(cli: Any) -> None:
    server = cli([
        "serve", "echo", "-l", "tcp:127.0.0.1:0", "-l", "udp:127.0.0.1:0",
        "--metrics", "127.0.0.1:0", "--deny", "127.0.0.2", "--per-source", "2",
        "--max-datagram", "100",
    ])
    tcp, udp = server.wait_listening(2)
    url = server.wait_for(METRICS_ON).group(1)

    # One connection stays open; three echo known bytes and close.
    held = socket.create_connection((tcp.host, tcp.port), timeout=5)
    server.wait_count(r" connected$", 1)
    sizes = [5, 100, 3000]
    for size in sizes:
        assert echo_once(tcp, b"x" * size) == b"x" * size
    server.wait_count(r"closed after", len(sizes))
    # Refused: a denied address, then a third connection from one source.
    with socket.create_connection((tcp.host, tcp.port), source_address=("127.0.0.2", 0)):
        server.wait_for(r"refused: denied by 127\.0\.0\.2/32")
    second = socket.create_connection((tcp.host, tcp.port), timeout=5)
    server.wait_count(r" connected$", 5)
    with socket.create_connection((tcp.host, tcp.port)):
        server.wait_for(r"refused: per-source limit \(2\) reached")
    second.close()
    server.wait_count(r"closed after", len(sizes) + 1)
    # Datagrams: four answered, one too large, one from a denied source.
    for _ in range(4):
        assert udp_exchange(udp, b"d" * 50) == b"d" * 50
    assert udp_exchange(udp, b"o" * 200) is None
    server.wait_for(r"datagram dropped: oversize datagram")
    udp_exchange(udp, b"q", source="127.0.0.2")
    server.wait_for(r"datagram dropped: denied by 127\.0\.0\.2/32")

    m = scrape(url)
    svc = {"service": "echo"}
    assert value(m, "sockworks_connections_opened_total", **svc) == 5
    assert value(m, "sockworks_connections_open", **svc) == 1
    closed = {r: value(m, "sockworks_connections_closed_total", reason=r, **svc)
              for r in CLOSE_REASONS}
    assert closed == {**dict.fromkeys(CLOSE_REASONS, 0.0), "normal": 4.0}
    refused = {r: value(m, "sockworks_connections_refused_total", reason=r, **svc)
               for r in REFUSE_REASONS}
    assert refused == {**dict.fromkeys(REFUSE_REASONS, 0.0), "denied": 1.0, "per_source": 1.0}
    assert value(m, "sockworks_bytes_received_total", **svc) == sum(sizes) + 4 * 50
    assert value(m, "sockworks_bytes_sent_total", **svc) == sum(sizes) + 4 * 50
    assert value(m, "sockworks_datagrams_answered_total", **svc) == 4
    dropped = {r: value(m, "sockworks_datagrams_dropped_total", reason=r, **svc)
               for r in DROP_REASONS}
    assert dropped == {**dict.fromkeys(DROP_REASONS, 0.0), "oversize": 1.0, "denied": 1.0}
    assert value(m, "sockworks_handler_errors_total", **svc) == 0
    assert value(m, "sockworks_idle_timeouts_total", **svc) == 0

    held.sendall(b"last")
    assert held.recv(16) == b"last"
    held.close()
    server.wait_count(r"closed after", len(sizes) + 2)
    m = scrape(url)
    assert value(m, "sockworks_connections_open", **svc) == 0
    assert value(m, "sockworks_connections_closed_total", reason="normal", **svc) == 5
    assert value(m, "sockworks_bytes_received_total", **svc) == sum(sizes) + 4 * 50 + 4
    assert server.stop() == 0


def test_only_get_metrics_is_served(cli: Any) -> None:
    curl = require_peer("curl")
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    url = server.wait_for(METRICS_ON).group(1)
    base = url.removesuffix("/metrics")

    def status(*args: str) -> str:
        return subprocess.run(
            [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args],
            capture_output=True, timeout=20,
        ).stdout.decode()

    assert status(url) == "200"
    assert status(url + "?name[]=sockworks_connections_open") == "200"
    assert status(base + "/") == "404"
    assert status(base + "/metricsx") == "404"
    assert status(base + "/favicon.ico") == "404"
    assert status("-X", "POST", url) == "405"
    assert status("-X", "POST", base + "/other") == "404"
    # OpenMetrics when asked for it (Prometheus asks), plain text otherwise.
    head = subprocess.run(
        [curl, "-s", "-D", "-", "-o", "/dev/null", "-H",
         "Accept: application/openmetrics-text; version=1.0.0", url],
        capture_output=True, timeout=20,
    ).stdout.decode()
    assert "application/openmetrics-text" in head
    assert server.stop() == 0


def test_metrics_on_a_unix_socket(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "metrics.sock"
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--metrics", f"unix:{path}"])
    (tcp,) = server.wait_listening(1)
    server.wait_for(rf"metrics on unix:{re.escape(str(path))} \(curl --unix-socket")
    assert echo_once(tcp, b"hello") == b"hello"
    server.wait_for("closed after")
    m = scrape("http://localhost/metrics", "--unix-socket", str(path))
    assert value(m, "sockworks_connections_opened_total", service="echo") == 1
    assert value(m, "sockworks_bytes_sent_total", service="echo") == 5
    assert server.stop() == 0
    assert not path.exists()


def test_a_metrics_endpoint_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listener = tmp_path / "echo.sock"
        result = run_cli(
            "serve", "echo", "-l", f"unix:{listener}", "--metrics", f"127.0.0.1:{port}"
        )
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1, lines
    assert lines == [
        f"sockworks: error: metrics: cannot bind tcp:127.0.0.1:{port}: address already in use"
    ]
    assert not listener.exists()  # nothing else was bound, or it was undone


def test_a_listener_in_use_leaves_no_metrics_endpoint(tmp_path: Path) -> None:
    with socket.socket() as taken, socket.socket() as probe:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        metrics = tmp_path / "metrics.sock"
        result = run_cli("serve", "echo", "-l", f"127.0.0.1:{port}", "--metrics", f"unix:{metrics}")
        assert result.returncode == 1
        assert b"address already in use" in result.stderr
        assert len(result.stderr.decode().splitlines()) == 1
        assert not metrics.exists()
        del probe


def test_timeouts_and_several_services_from_a_config_file(cli: Any, tmp_path: Path) -> None:
    config = tmp_path / "sockworks.toml"
    config.write_text(
        '[server]\nmetrics = "127.0.0.1:0"\n\n'
        '[services.idle]\nservice = "greeting"\nlisten = ["tcp:127.0.0.1:0"]\n'
        "timeout = 0.3\nrequest_timeout = 0\n\n"
        '[services.slow]\nservice = "gopher"\nlisten = ["tcp:127.0.0.1:0"]\n'
        "timeout = 30\nrequest_timeout = 0.3\n"
    )
    server = cli(["serve", "--config", str(config)])
    idle, slow = server.wait_listening(2)
    url = server.wait_for(METRICS_ON).group(1)
    with socket.create_connection((idle.host, idle.port), timeout=5) as quiet, \
            socket.create_connection((slow.host, slow.port), timeout=5) as dripping:
        dripping.sendall(b"/do")  # half a selector, then nothing
        server.wait_for(r"closed after .*\(timed out\)")
        server.wait_for(r"closed after .*\(request timed out\)")
        del quiet
    m = scrape(url)
    assert value(m, "sockworks_connections_closed_total", service="idle",
                 reason="idle_timeout") == 1
    assert value(m, "sockworks_idle_timeouts_total", service="idle") == 1
    assert value(m, "sockworks_request_timeouts_total", service="idle") == 0
    assert value(m, "sockworks_connections_closed_total", service="slow",
                 reason="request_timeout") == 1
    assert value(m, "sockworks_request_timeouts_total", service="slow") == 1
    assert value(m, "sockworks_connections_opened_total", service="slow") == 1
    assert value(m, "sockworks_bytes_received_total", service="slow") == 3
    assert server.stop() == 0


CRASHING = '''
from sockworks import StreamProtocol, DatagramProtocol

class Crash(StreamProtocol):
    def on_data(self, data):
        if data.startswith(b"boom"):
            raise ValueError("a bug in the handler")
        return data

class CrashDatagram(DatagramProtocol):
    def on_datagram(self, data, peer):
        raise ValueError("a bug in the datagram handler")
'''


def test_handler_errors_are_counted(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "crashing.py").write_text(CRASHING)
    server = cli(["serve", "crashing:Crash", "--app-dir", str(tmp_path),
                  "-l", "tcp:127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    (tcp,) = server.wait_listening(1)
    url = server.wait_for(METRICS_ON).group(1)
    assert echo_once(tcp, b"fine") == b"fine"
    echo_once(tcp, b"boom")
    server.wait_count(r"closed after", 2)
    m = scrape(url)
    svc = {"service": "crashing:Crash"}
    assert value(m, "sockworks_handler_errors_total", **svc) == 1
    assert value(m, "sockworks_connections_closed_total", reason="handler_error", **svc) == 1
    assert value(m, "sockworks_connections_closed_total", reason="normal", **svc) == 1
    assert server.stop() == 0


def test_reasons_fall_into_the_fixed_label_sets() -> None:
    # What the engine and the built-in services record, as they word it.
    assert close_reason(None) == "normal"
    for reason, bucket in [
        ("idle timeout", "idle_timeout"),
        ("timed out", "idle_timeout"),
        ("request timed out", "request_timeout"),
        ("internal error", "handler_error"),
        ("reset by peer", "reset"),
        ("broken pipe", "reset"),
        ("[Errno 110] Connection timed out", "reset"),
        ("peer stopped reading", "slow_reader"),
        ("server shutting down", "shutdown"),
        ("aborted at the end of the grace period", "shutdown_aborted"),
        ("line longer than 8192 bytes", "protocol_error"),
        ("request too long", "protocol_error"),
        ("token too long", "protocol_error"),
        ("session timeout (5 s), exited with status 0; byte counts unknown", "idle_timeout"),
        ("server stopping, exited with status 0; byte counts unknown", "shutdown"),
        ("server stopping, then SIGKILL; byte counts unknown", "shutdown_aborted"),
        ("aborted, then SIGKILL; byte counts unknown", "shutdown_aborted"),
        ("cannot start /bin/nope: no such file", "handler_error"),
        ("quote sent", "normal"),
        ("client went away (normal for chargen)", "normal"),
        ("not found: /some\udcffselector", "normal"),
    ]:
        assert close_reason(reason) == bucket, reason
    for reason, bucket in [
        ("denied by 127.0.0.2/32", "denied"),
        ("not in the allow list", "denied"),
        ("per-source limit (2) reached", "per_source"),
        ("instance limit (8) reached", "instances"),
        ("rate limit (10 connections/s) exceeded", "cps"),
        ("not a trusted proxy (--proxy-from); no header accepted", "untrusted_proxy"),
        ("anything else", "other"),
    ]:
        assert refuse_reason(reason) == bucket, reason
    for reason, bucket in [
        ("oversize datagram (200 B > 100 B)", "oversize"),
        ("source port 7 is a service port (loop prevention)", "loop_port"),
        ("broadcast/multicast/unspecified source", "forged_source"),
        ("source over 50 datagrams/s", "rate"),
        ("denied by 10.0.0.0/8", "denied"),
        ("reply of 500 B to a 1 B request exceeds the amplification limit (1 B)",
         "amplification"),
        ("a 1 B request is too short for any quote under the amplification limit",
         "amplification"),
        ("malformed", "protocol_error"),
    ]:
        assert drop_reason(reason) == bucket, reason
    buckets = set(CLOSE_REASONS) | set(REFUSE_REASONS) | set(DROP_REASONS)
    assert all(re.fullmatch(r"[a-z_]+", b) for b in buckets)


# -- workers: prometheus_client's multiprocess mode, two plain processes -------


def _fake_worker(counts: ServiceCounts, live: int) -> SimpleNamespace:
    group = SimpleNamespace(name="echo", counts=counts, live=[object()] * live)
    return SimpleNamespace(server=SimpleNamespace(groups=[group]))


@pytest.fixture
def worker_metrics() -> Iterator[WorkerMetrics]:
    endpoint = MetricsEndpoint.bind("127.0.0.1:0")
    hooks = WorkerMetrics(endpoint, interval=0.05)
    try:
        yield hooks
    finally:
        hooks.close()


def _fork_worker(hooks: WorkerMetrics, opened: int, live: int, bytes_in: int,
                 go: tuple[int, int], done: tuple[int, int]) -> int:
    """A worker: counts, flushes, says so on ``done``, exits when ``go`` closes."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        os.close(go[1])  # the parent's end: closing it tells every worker to go
        os.close(done[0])
        counts = ServiceCounts()
        generation = _fake_worker(counts, live)
        hooks.in_worker(generation, 0)
        counts.opened = opened
        counts.closed["normal"] = opened - live
        counts.closed["idle_timeout"] = 1
        counts.bytes_in = bytes_in
        counts.refused["denied"] = 2
        hooks.worker_exiting(generation, 0)  # the last flush, written now
        os.write(done[1], b"F")
        os.read(go[0], 1)  # until the parent has scraped
        status = 0
    finally:
        os._exit(status)


def test_workers_counts_add_up_and_outlive_their_worker(worker_metrics: WorkerMetrics) -> None:
    hooks = worker_metrics
    hooks.before_fork(None)
    url = hooks.endpoint.where
    go = os.pipe()
    done = os.pipe()
    pids = [
        _fork_worker(hooks, opened=3, live=1, bytes_in=100, go=go, done=done),
        _fork_worker(hooks, opened=5, live=2, bytes_in=1000, go=go, done=done),
    ]
    go_r, go_w = go
    done_r, done_w = done
    os.close(go_r)
    os.close(done_w)
    assert os.read(done_r, 1) + os.read(done_r, 1) == b"FF"
    # The parent's copy of the socket is the one served; the workers hold none.
    m = scrape(url)
    svc = {"service": "echo"}
    assert value(m, "sockworks_connections_opened_total", **svc) == 8
    assert value(m, "sockworks_connections_open", **svc) == 3
    assert value(m, "sockworks_connections_closed_total", reason="normal", **svc) == 5
    assert value(m, "sockworks_idle_timeouts_total", **svc) == 2
    assert value(m, "sockworks_bytes_received_total", **svc) == 1100
    assert value(m, "sockworks_connections_refused_total", reason="denied", **svc) == 4
    # The workers exit: their connections leave the gauge, their counts stay
    # (folded into one file: counters never go back).
    os.close(go_w)
    for pid in pids:
        os.waitpid(pid, 0)
        hooks.worker_exited(None, 0, pid)
    m = scrape(url)
    assert value(m, "sockworks_connections_opened_total", **svc) == 8
    assert value(m, "sockworks_connections_open", **svc) == 0
    assert value(m, "sockworks_bytes_received_total", **svc) == 1100
    assert hooks.directory is not None
    assert sorted(os.listdir(hooks.directory)) == ["counter_archive.db", "lock"]
    os.close(done_r)


def test_workers_end_to_end(cli: Any) -> None:
    """--workers 2: the supervisor's hooks; counts reach the scrape within
    the flush interval, whichever worker served."""
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2",
                  "--metrics", "127.0.0.1:0"])
    (tcp,) = server.wait_listening(1)
    url = server.wait_for(METRICS_ON).group(1)
    for size in (10, 20, 30):
        assert echo_once(tcp, b"w" * size) == b"w" * size
    server.wait_count(r"closed after", 3)
    deadline = time.monotonic() + 10
    while True:  # each worker writes its counts every half second
        m = scrape(url)
        key = ("sockworks_connections_opened_total", frozenset({("service", "echo")}))
        if m.get(key) == 3:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)  # polling the scrape itself, for at most 10 s
    assert value(m, "sockworks_bytes_received_total", service="echo") == 60
    assert value(m, "sockworks_connections_open", service="echo") == 0
    assert server.stop() == 0


def test_metrics_are_not_imported_without_metrics() -> None:
    # prometheus_client costs 60 ms at start: only --metrics pays for it.
    code = "import sys, sockworks.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT,
                         timeout=30).stdout
    assert out.strip() == b"False"


# -- the documentation's examples, run as written (fixed ports become 0) ----------

DOC = ROOT / "docs" / "deploy.md"


def doc_block(contains: str, lang: str = "sh") -> str:
    text = DOC.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S) if contains in b]
    assert len(blocks) == 1, f"{DOC.name} has {len(blocks)} {lang} blocks with {contains!r}"
    return blocks[0].strip()


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_docs_metrics_examples(cli: Any) -> None:
    curl = require_peer("curl")
    command = doc_block("--metrics 127.0.0.1:9100")
    args = [a.replace(":7007", ":0").replace(":9100", ":0") for a in command.split()[1:]]
    server = cli(args)
    tcp, _udp = server.wait_listening(2)
    url = server.wait_for(METRICS_ON).group(1)
    for _ in range(3):
        assert echo_once(tcp, b"doc") == b"doc"
    server.wait_count(r"closed after", 3)

    shown = subprocess.run(
        ["sh", "-c", doc_block("curl -s").replace("http://127.0.0.1:9100/metrics", url)],
        capture_output=True, timeout=20, check=True,
    ).stdout.decode()
    assert shown == 'sockworks_connections_opened_total{service="echo"} 3.0\n'

    # The scrape job's target is the endpoint of the command above, and a
    # scrape as Prometheus asks for it (OpenMetrics) is answered in kind.
    targets = re.findall(r'targets: \["([^"]+)"\]', doc_block("scrape_configs", "yaml"))
    assert targets == [command.split("--metrics ")[1].split()[0]]
    reply = subprocess.run(
        [curl, "-sS", "--fail", "-H", f"Accept: {PROMETHEUS_ACCEPT}", "-D", "/dev/stderr", url],
        capture_output=True, timeout=20, check=True,
    )
    assert b"application/openmetrics-text" in reply.stderr
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om

    families = {f.name: f for f in om(reply.stdout.decode())}
    opened = families["sockworks_connections_opened"]
    assert [(s.labels, s.value) for s in opened.samples if s.name.endswith("_total")] == [
        ({"service": "echo"}, 3.0)
    ]
    assert server.stop() == 0


def test_docs_list_every_metric() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n### What is counted\n", 1)[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `(sockworks_[a-z_]+)", section, re.M))
    expected = {PREFIX + name + ("_total" if kind == "counter" else "")
                for name, (kind, _, _) in METRICS.items()}
    assert listed == expected
    for reason in (*CLOSE_REASONS, *REFUSE_REASONS, *DROP_REASONS):
        assert f"`{reason}`" in section, reason
