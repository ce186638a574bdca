"""Echo benchmark: sockworks in its three styles against its peers, in one run.

Every contender is an echo server started as a subprocess pinned to one core
(``taskset -c 0``); the C load generator ``echoload`` (compiled on the fly
from ``shared/bench``) runs pinned to the other core (``taskset -c 1``).
All servers are started first; then for each load (message size x
connections) every contender is measured one after the other (in reverse
order every other round), so that the contenders compared with each other
are measured a second apart on the same machine. This is repeated for
``--rounds``; the tables give medians, and each target ratio is the median
over rounds of the ratio measured within one round. Only ratios mean
anything: these machines are shared and noisy. The server's CPU time per
round trip (from /proc) is printed too: it is far less disturbed by other
processes than requests/s, and serves as a cross-check.

    python benchmarks/echo_bench.py                  # the full run, a few minutes
    python benchmarks/echo_bench.py --quick          # a smoke run
    python benchmarks/echo_bench.py --only sockworks-protocol,uvloop-protocol \\
        --sizes 100 --conns 10 --duration 3 --rounds 3

Timings never decide a test: this script reports PASS or MISS for the
performance targets and exits 0 either way (unless ``--strict``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    HOST,
    SERVERS,
    HarnessError,
    RunningServer,
    build_tools,
    choose_cpus,
    cpu_seconds,
    find_bench_sources,
    free_port,
    machine_summary,
    median,
    paired,
    pinned,
    rps_label,
    set_priority,
    size_label,
    table,
)

RESULT = re.compile(
    r"rps=(?P<rps>\d+) p50_us=(?P<p50>\d+) p99_us=(?P<p99>\d+) errors=(?P<errors>\d+)"
)


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    what: str
    command: Callable[[Path], list[str]]  # given the tools dir: argv taking --port
    needs: tuple[str, ...] = ()  # importable modules it requires
    native: bool = False  # takes the port as its only argument (the C server)

    def missing(self) -> str | None:
        for module in self.needs:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install -e '.[bench]')"
        return None


def _py(script: str, *args: str) -> Callable[[Path], list[str]]:
    return lambda tools: [sys.executable, str(SERVERS / script), *args]


CONTENDERS: tuple[Contender, ...] = (
    Contender("c-epoll", "C epoll echo (calibration ceiling)",
              lambda tools: [str(tools / "epoll_echo")], native=True),
    Contender("sockworks-protocol", "sockworks sans-I/O StreamProtocol",
              _py("sockworks_echo.py", "protocol"), ("sockworks", "uvloop")),
    Contender("uvloop-protocol", "raw uvloop asyncio.Protocol",
              _py("asyncio_echo.py", "uvloop-protocol"), ("uvloop",)),
    Contender("sockworks-async", "sockworks async def handle(stream)",
              _py("sockworks_echo.py", "async"), ("sockworks", "uvloop")),
    Contender("uvloop-streams", "uvloop + asyncio streams",
              _py("asyncio_echo.py", "uvloop-streams"), ("uvloop",)),
    Contender("asyncio-protocol", "asyncio.Protocol, default loop",
              _py("asyncio_echo.py", "asyncio-protocol")),
    Contender("asyncio-streams", "asyncio streams, default loop",
              _py("asyncio_echo.py", "asyncio-streams")),
    Contender("sockworks-blocking", "sockworks blocking def handle(conn)",
              _py("sockworks_echo.py", "blocking"), ("sockworks", "uvloop")),
    Contender("socketserver", "socketserver.ThreadingTCPServer",
              _py("socketserver_echo.py")),
    Contender("twisted", "Twisted Protocol, default reactor",
              _py("twisted_echo.py"), ("twisted",)),
    Contender("gevent", "gevent StreamServer",
              _py("gevent_echo.py"), ("gevent",)),
)


@dataclasses.dataclass(frozen=True)
class Target:
    contender: str
    baseline: str
    minimum: float


TARGETS = (
    Target("sockworks-protocol", "uvloop-protocol", 0.90),
    Target("sockworks-async", "uvloop-streams", 1.0),
    Target("sockworks-blocking", "socketserver", 1.0),
)

Cell = tuple[int, int]  # (message size, connections)


@dataclasses.dataclass
class Result:
    rps: int
    p50_us: int
    p99_us: int
    errors: int
    # Server CPU time (all its threads) per round trip: far less disturbed
    # than requests/s when other processes share the machine. 0: unknown.
    cpu_us: float = 0.0


# Every measurement: contender -> load -> round -> result.
Samples = dict[str, dict[Cell, dict[int, Result]]]


def summarise(samples: Samples) -> dict[str, dict[Cell, Result]]:
    """Per contender and load: the round with the median requests/s (so its
    p99 comes from the same run), with the median CPU time of the rounds."""
    out: dict[str, dict[Cell, Result]] = {}
    for name, cells in samples.items():
        for cell, by_round in cells.items():
            runs = sorted(by_round.values(), key=lambda r: r.rps)
            chosen = dataclasses.replace(runs[(len(runs) - 1) // 2])
            cpus = [r.cpu_us for r in runs if r.cpu_us]
            chosen.cpu_us = median(cpus) if cpus else 0.0
            out.setdefault(name, {})[cell] = chosen
    return out


def rps_ratio(a: Result, b: Result) -> float | None:
    return a.rps / b.rps if b.rps else None


def cpu_ratio(a: Result, b: Result) -> float | None:
    return b.cpu_us / a.cpu_us if a.cpu_us and b.cpu_us else None


# -- tools -------------------------------------------------------------------


def start_server(c: Contender, tools: Path, cpu: int | None) -> RunningServer:
    """A contender's server: the C server on a free port it is given, the
    others on port 0 (``--port 0``), reporting theirs on stderr."""
    if c.native:
        port = free_port()
        return RunningServer(c.name, [*c.command(tools), str(port)], cpu, tools, port=port)
    return RunningServer(c.name, [*c.command(tools), "--port", "0"], cpu, tools)


# -- load ----------------------------------------------------------------------


def run_load(
    tools: Path,
    port: int,
    cell: Cell,
    seconds: float,
    cpu: int | None,
    server_pid: int | None = None,
) -> Result:
    size, conns = cell
    argv = [str(tools / "echoload"), HOST, str(port), str(conns), str(size), f"{seconds:g}"]
    before = cpu_seconds(server_pid)
    proc = subprocess.run(
        pinned(cpu, argv), capture_output=True, text=True, timeout=seconds + 30
    )
    after = cpu_seconds(server_pid)
    match = RESULT.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise HarnessError(f"echoload failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    result = Result(*(int(match.group(k)) for k in ("rps", "p50", "p99", "errors")))
    if before is not None and after is not None and result.rps:
        result.cpu_us = (after - before) / (result.rps * seconds) * 1e6
    return result


# -- reporting -------------------------------------------------------------------


def cell_label(cell: Cell) -> str:
    return f"{size_label(cell[0])} x{cell[1]}"


def report(
    contenders: Sequence[Contender],
    cells: Sequence[Cell],
    samples: Samples,
    failed: dict[str, str],
) -> tuple[str, bool]:
    results = summarise(samples)
    header = ["contender", *(cell_label(c) for c in cells)]
    rps_rows, p99_rows = [], []
    for c in contenders:
        got = results.get(c.name, {})
        if not got and c.name in failed:
            continue
        rps_rows.append([c.name, *(rps_label(got[x].rps) if x in got else "-" for x in cells)])
        p99_rows.append([c.name, *(str(got[x].p99_us) if x in got else "-" for x in cells)])
    cpu_rows = [
        [c.name, *(f"{got[x].cpu_us:.1f}" if x in got and got[x].cpu_us else "-" for x in cells)]
        for c in contenders
        if (got := results.get(c.name, {}))
    ]
    out = ["Requests/s (round trips per second; median of the rounds):", "",
           table(header, rps_rows), "",
           "p99 latency, microseconds (from the same run as the requests/s):", "",
           table(header, p99_rows), "",
           "Server CPU time per round trip, microseconds (median of the rounds; lower is"
           " better):", "",
           table(header, cpu_rows), ""]
    errors = [
        f"{name} {cell_label(cell)}: {r.errors} connection error(s)"
        for name, got in results.items() for cell, r in got.items() if r.errors
    ]
    if errors:
        out += ["Load errors (a connection closed under load):", *errors, ""]
    if failed:
        out += ["Not measured:", *(f"  {n}: {why}" for n, why in failed.items()), ""]

    ratio_rows = []
    all_pass = True
    for t in TARGETS:
        ratios = [paired(samples, t.contender, t.baseline, x, rps_ratio) for x in cells]
        measured = [r for r in ratios if r is not None]
        if not measured:
            verdict = "n/a"
        elif min(measured) >= t.minimum:
            verdict = "PASS"
        else:
            verdict = "MISS"
            all_pass = False
        ratio_rows.append([
            f"{t.contender} / {t.baseline} >= {t.minimum:.2f}",
            *("-" if r is None else f"{r:.2f}" for r in ratios),
            verdict,
        ])
    out += ["Targets (ratios of requests/s at every load: the median over rounds of the"
            " ratio within each round):", "",
            table(["target", *(cell_label(c) for c in cells), "result"], ratio_rows), ""]
    cpu_ratio_rows = []
    for t in TARGETS:
        ratios = [paired(samples, t.contender, t.baseline, x, cpu_ratio) for x in cells]
        if any(r is not None for r in ratios):
            cpu_ratio_rows.append([
                f"{t.contender} vs {t.baseline}",
                *("-" if r is None else f"{r:.2f}" for r in ratios),
            ])
    if cpu_ratio_rows:
        out += ["The same pairs by CPU efficiency (baseline's CPU per round trip / the"
                " contender's; a cross-check, not the target):", "",
                table(["pair", *(cell_label(c) for c in cells)], cpu_ratio_rows), ""]
    if results.get("c-epoll"):
        rows = []
        for c in contenders:
            if c.name == "c-epoll" or not results.get(c.name):
                continue
            fractions = [paired(samples, c.name, "c-epoll", x, rps_ratio) for x in cells]
            rows.append([c.name, *("-" if f is None else f"{f:.2f}" for f in fractions)])
        out += ["Fraction of the C epoll ceiling:", "", table(header, rows), ""]
    return "\n".join(out), all_pass


# -- main ----------------------------------------------------------------------


def parse_ints(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1
        if part.endswith("k"):
            part, scale = part[:-1], 1024
        values.append(int(part) * scale)
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Echo benchmark: sockworks against its peers, pinned, in one run.",
    )
    names = ", ".join(c.name for c in CONTENDERS)
    p.add_argument("--only", help=f"comma-separated contenders to run (of: {names})")
    p.add_argument("--skip", help="comma-separated contenders to leave out")
    p.add_argument("--sizes", default="100,1k,64k", help="message sizes (default 100,1k,64k)")
    p.add_argument("--conns", default="10,100", help="connection counts (default 10,100)")
    p.add_argument("--duration", type=float, default=0.6, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=5,
                   help="measure every contender this many times, interleaved; report medians")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per contender")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 100 B, 10 connections, 0.3 s, no warm-up")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--nice", type=int, default=0,
                   help="run servers and load at this nice value (negative needs root):"
                   " shields the measurement from other work on a shared machine")
    p.add_argument("--bench-src", help="directory with echoload.c and epoll_echo.c")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--list", action="store_true", help="list the contenders and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.conns, args.duration, args.rounds, args.warmup = "100", "10", 0.3, 1, 0
    return args


def select(args: argparse.Namespace) -> list[Contender]:
    known = {c.name for c in CONTENDERS}
    only = {n.strip() for n in args.only.split(",")} if args.only else known
    skip = {n.strip() for n in args.skip.split(",")} if args.skip else set()
    unknown = (only | skip) - known
    if unknown:
        raise HarnessError(f"unknown contender(s): {', '.join(sorted(unknown))}")
    return [c for c in CONTENDERS if c.name in only - skip]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in CONTENDERS:
            why = c.missing()
            print(f"{c.name:20} {c.what}" + (f"  [unavailable: {why}]" if why else ""))
        return 0
    try:
        return run(args)
    except HarnessError as exc:
        print(f"echo_bench: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    contenders = select(args)
    cells: list[Cell] = [(s, n) for s in parse_ints(args.sizes) for n in parse_ints(args.conns)]
    server_cpu, load_cpu = choose_cpus(args.no_pin, args.server_cpu, args.load_cpu)
    set_priority(args.nice)
    failed: dict[str, str] = {}
    for c in contenders:
        why = c.missing()
        if why:
            failed[c.name] = why
    runnable = [c for c in contenders if c.name not in failed]
    per_contender = len(cells) * args.rounds * (args.duration + 0.2) + args.warmup + 0.5
    estimate = len(runnable) * per_contender
    print(f"machine: {machine_summary()}")
    print(f"{len(runnable)} contenders x {len(cells)} loads x {args.rounds} round(s) of "
          f"{args.duration:g} s; about {estimate:.0f} s. Server on CPU {server_cpu}, "
          f"load on CPU {load_cpu}; nice {args.nice}.", flush=True)

    samples: Samples = {}
    servers: dict[str, RunningServer] = {}
    with tempfile.TemporaryDirectory(prefix="sockworks-bench-") as tmp:
        tools = Path(tmp)
        need_epoll = any(c.native for c in runnable)
        build_tools(find_bench_sources(args.bench_src), tools,
                    ("echoload", "epoll_echo") if need_epoll else ("echoload",))
        try:
            for c in runnable:
                server = start_server(c, tools, server_cpu)
                try:
                    server.wait_ready()
                except HarnessError as exc:
                    failed[c.name] = str(exc).splitlines()[-1]
                    continue
                servers[c.name] = server
                if args.warmup > 0:
                    run_load(tools, server.port, (100, 10), args.warmup, load_cpu)
            for round_no in range(args.rounds):
                for cell in cells:
                    # Every other round in reverse order: a drift in the
                    # machine's load favours no one.
                    order = list(servers.items())
                    for name, server in order if round_no % 2 == 0 else reversed(order):
                        if name in failed:
                            continue
                        if not server.alive():
                            failed[name] = "the server exited: " + " / ".join(server.lines[-3:])
                            continue
                        try:
                            r = run_load(
                                tools, server.port, cell, args.duration, load_cpu, server.proc.pid
                            )
                        except (HarnessError, subprocess.TimeoutExpired) as exc:
                            failed[name] = str(exc).strip().splitlines()[0]
                            continue
                        samples.setdefault(name, {}).setdefault(cell, {})[round_no] = r
                        print(f"  {name:20} {cell_label(cell):12} rps={r.rps:<8} "
                              f"p99={r.p99_us}us cpu={r.cpu_us:.1f}us/req errors={r.errors}",
                              flush=True)
        finally:
            for server in servers.values():
                server.stop()

    text, all_pass = report(contenders, cells, samples, failed)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_summary(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "duration": args.duration,
            "rounds": args.rounds,
            "results": {
                name: {cell_label(cell): dataclasses.asdict(r) for cell, r in got.items()}
                for name, got in summarise(samples).items()
            },
            "rounds_detail": {
                name: {
                    cell_label(cell): [dataclasses.asdict(by_round[k]) for k in sorted(by_round)]
                    for cell, by_round in got.items()
                }
                for name, got in samples.items()
            },
            "failed": failed,
        }, indent=2))
    return 1 if args.strict and not all_pass else 0


if __name__ == "__main__":
    sys.exit(main())
