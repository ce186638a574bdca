"""The benchmark harnesses work end to end: echo_bench and paths_bench in
their quickest modes, on one contender or one path. Timings are not
checked: they never decide a test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "echo_bench.py"
REQUIRE_PEERS = os.environ.get("SOCKWORKS_REQUIRE_PEERS") == "1"


def _require(ok: bool, message: str) -> None:
    if not ok:
        if REQUIRE_PEERS:
            pytest.fail(message + "; SOCKWORKS_REQUIRE_PEERS=1 makes this a failure")
        pytest.skip(message)


@pytest.mark.timeout(30)
def test_quick_run_measures_one_contender(tmp_path: Path) -> None:
    _require(
        shutil.which("gcc") is not None or shutil.which("cc") is not None,
        "gcc is not installed (apt-get install gcc): the benchmark compiles its C load generator",
    )
    sources = [ROOT.parent / "shared" / "bench", Path(os.environ.get("SOCKWORKS_BENCH_SRC", "-"))]
    _require(
        any((s / "echoload.c").is_file() for s in sources),
        "shared/bench/echoload.c is not beside the repository",
    )
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--duration", "0.2",
         "--only", "sockworks-protocol", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=25,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| sockworks-protocol" in proc.stdout
    assert "sockworks-protocol / uvloop-protocol >= 0.90" in proc.stdout  # the target row, n/a
    results = json.loads(out.read_text())
    measured = results["results"]["sockworks-protocol"]["100 B x10"]
    assert measured["rps"] > 0
    assert measured["errors"] == 0
    assert not results["failed"]


def test_list_names_every_contender() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--list"], capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("sockworks-protocol", "sockworks-async", "sockworks-blocking",
                 "uvloop-protocol", "uvloop-streams", "socketserver", "c-epoll"):
        assert name in proc.stdout


PATHS_BENCH = ROOT / "benchmarks" / "paths_bench.py"


@pytest.mark.timeout(60)
def test_paths_quick_run_measures_connect(tmp_path: Path) -> None:
    """paths_bench --quick, the ``connect`` path only: sockworks ``thanks``
    and the raw uvloop Protocol, one short round, the target row present."""
    _require(
        shutil.which("gcc") is not None or shutil.which("cc") is not None,
        "gcc is not installed (apt-get install gcc): the benchmark compiles its C load generators",
    )
    sources = [ROOT.parent / "shared" / "bench", Path(os.environ.get("SOCKWORKS_BENCH_SRC", "-"))]
    _require(
        any((s / "connload.c").is_file() for s in sources),
        "shared/bench/connload.c is not beside the repository",
    )
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(PATHS_BENCH), "--quick", "--duration", "0.2", "--only", "connect",
         "--skip", "sockworks-thanks-logging", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| sockworks-thanks " in proc.stdout
    assert "| uvloop-thanks " in proc.stdout
    assert "sockworks-thanks / uvloop-thanks >= 0.8" in proc.stdout  # the target row
    results = json.loads(out.read_text())
    connect = results["paths"]["connect"]
    assert not connect["failed"], connect["failed"]
    assert connect["skipped"] == {"sockworks-thanks-logging": "left out (--skip)"}
    for name in ("sockworks-thanks", "uvloop-thanks"):
        (measured,) = connect["results"][name].values()
        assert measured["rate"] > 0
        assert measured["errors"] == 0
    (target,) = results["targets"]
    assert target["ratio"] is not None
    assert target["result"] in ("PASS", "MISS")


def test_paths_list_names_every_path() -> None:
    proc = subprocess.run(
        [sys.executable, str(PATHS_BENCH), "--list"], capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("connect:", "udp:", "gopher:", "echo:", "idle:", "sockworks-thanks",
                 "uvloop-thanks", "sockworks-udp-echo", "uvloop-udp-echo", "sockworks-gopher",
                 "nginx-http", "gophernicus-tcpserver", "sockworks-echo-idle"):
        assert name in proc.stdout


TLS_BENCH = ROOT / "benchmarks" / "tls_bench.py"


@pytest.mark.timeout(60)
def test_tls_quick_run_measures_echo_and_handshakes(tmp_path: Path) -> None:
    """tls_bench --quick: sockworks' TLS listener and the raw uvloop server
    with the same SSLContext settings negotiate alike, and both are
    measured on every load (the C load when it builds, else Python's)."""
    pytest.importorskip("trustme")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(TLS_BENCH), "--quick", "--duration", "0.2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sockworks-tls / uvloop-tls >= 0.9" in proc.stdout
    results = json.loads(out.read_text())
    assert not results["failed"] and not results["skipped"], results
    negotiated = results["negotiated"]
    assert negotiated["sockworks-tls"] == negotiated["uvloop-tls"], negotiated
    assert negotiated["sockworks-tls"][0] in ("TLSv1.2", "TLSv1.3")
    loads = {"echo 100 B x4", "echo 16 KiB x4", "handshake x4"}
    for name in ("sockworks-tls", "uvloop-tls"):
        assert set(results["results"][name]) == loads
        for measured in results["results"][name].values():
            assert measured["rate"] > 0
            assert measured["errors"] == 0
    assert {t["load"] for t in results["targets"]} == loads
    assert all(t["result"] in ("PASS", "MISS") for t in results["targets"])


def test_tls_python_load_worker_runs(tmp_path: Path) -> None:
    """The Python load (the fallback without a C compiler) against the raw
    server, one short echo measurement."""
    pytest.importorskip("trustme")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(TLS_BENCH), "--quick", "--duration", "0.2", "--only", "echo",
         "--load", "python", "--skip", "sockworks-tls", "--json", str(out)],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["load"] == "python"
    assert results["results"]["uvloop-tls"]["echo 100 B x4"]["rate"] > 0


WORKERS_BENCH = ROOT / "benchmarks" / "workers_bench.py"


@pytest.mark.timeout(60)
def test_workers_quick_run_measures_workers_balance_and_resets(tmp_path: Path) -> None:
    """workers_bench --quick on 1 and 2 workers (pinned as the CPU target
    wants), the plain shared-socket and SO_REUSEPORT servers, and the reset
    check: everything measured, the target rows and tables printed."""
    _require(
        shutil.which("gcc") is not None or shutil.which("cc") is not None,
        "gcc is not installed (apt-get install gcc): the benchmark compiles its C load generators",
    )
    sources = [ROOT.parent / "shared" / "bench", Path(os.environ.get("SOCKWORKS_BENCH_SRC", "-"))]
    _require(
        any((s / "connload.c").is_file() and (s / "echoload.c").is_file() for s in sources),
        "shared/bench/connload.c and echoload.c are not beside the repository",
    )
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(WORKERS_BENCH), "--quick", "--duration", "0.1", "--workers", "2",
         "--only", "core,balance,reset", "--json", str(out)],
        capture_output=True, text=True, timeout=50, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("| workers-1 ", "| workers-2 ", "| shared-2-pinned ", "| reuseport-2-pinned ",
                "| reuseport, parent keeps a copy "):
        assert row in proc.stdout, proc.stdout
    results = json.loads(out.read_text())
    assert not results["failed"], results["failed"]
    for name in ("single", "workers-1", "workers-2", "plain-1-pinned", "shared-2-pinned",
                 "reuseport-2-pinned"):
        for load in ("connect", "echo"):
            (measured,) = results["samples"][name][load].values()
            assert measured["rate"] > 0 and measured["errors"] == 0, (name, load, measured)
    # Two serving processes: a CPU share (sockworks) or counts (plain) for each.
    (two,) = results["samples"]["workers-2"]["connect"].values()
    assert len(two["worker_cpu"]) == 2
    (plain,) = results["samples"]["reuseport-2-pinned"]["connect"].values()
    assert len(plain["conns"]) == 2 and sum(plain["conns"]) > 0
    assert [row[1] for row in results["targets"]] == ["connect", "echo"]
    assert all(row[-1] in ("PASS", "MISS", "n/a") for row in results["targets"])
    # Every queued connection is accounted for: served, reset, or waiting.
    assert len(results["resets"]) == 3
    for r in results["resets"]:
        assert r["served"] + r["reset"] + r["waiting"] == r["connections"], r
