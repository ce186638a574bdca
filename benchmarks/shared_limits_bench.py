"""What it costs to hold --instances, --per-source and --cps for a service
as a whole across worker processes (sockworks._shared_limits).

    python benchmarks/shared_limits_bench.py [--seconds 2] [--rounds 3]
        [--workers 2] [--load-procs 4] [--log] [--bench-src DIR] [--micro-only]

1. Micro: microseconds per connection (admit + release) through
   ``AccessControl`` with its own counters (one process) and with the shared
   counts, each op a new connection from one of 64 sources while 256 are
   held (so entries are inserted, counted up and down, and deleted).
2. Connections per second: the parent binds one TCP socket and forks
   ``--workers`` processes that each run a sockworks ``Server`` on it (the
   prefork model, no supervisor) with a one-line-then-close protocol;
   ``shared/bench/connload`` connects, reads to EOF and closes, in a loop.
   ``local``: every worker counts for itself (the limits would be per
   worker); ``shared``: one ``SharedLimits``, each worker in its slot.
   Two policies: ``per-source`` alone (what the CLI sets by default) and
   ``all`` three limits; each set high enough never to refuse, so the
   numbers are the bookkeeping alone. Every round runs each pair back to
   back (in alternating order); the ratios are medians of the rounds'
   ratios, which cancels most of a shared machine's drift.

Per-connection logging is off unless ``--log`` (then as the CLI logs: two
lines per connection, written to /dev/null): without it the ratio is the
worst case, with it the one a user of the CLI sees.
On a 2-core machine the load and the workers share the cores: the CPU time
per connection says more than the connections per second.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import HarnessError, build_tools, cpu_seconds, find_bench_sources, machine_summary

import sockworks
from sockworks._access import AccessControl, AccessPolicy
from sockworks._run import new_event_loop
from sockworks._shared_limits import SharedLimits

# Limits that are on but never reached: the cost of counting, not of refusing.
POLICIES = {
    "per-source": AccessPolicy(per_source=100_000),
    "all": AccessPolicy(per_source=100_000, instances=100_000, cps=1e9),
}
CAPACITY = 1024


# -- 1. micro ------------------------------------------------------------------


def micro(shared: SharedLimits | None, ops: int) -> float:
    """Microseconds per admit + release, 256 connections held from 64 sources."""
    control = AccessControl(POLICIES["all"], time.monotonic, shared=shared)
    hosts = [f"10.0.{i // 256}.{i % 256}" for i in range(64)]
    held: list[str] = []
    for i in range(256):
        control.admit_connection(hosts[i % 64])
        held.append(hosts[i % 64])
    start = time.perf_counter()
    for i in range(ops):
        host = hosts[(i * 7) % 64]
        if control.admit_connection(host) is not None:
            raise HarnessError("a connection was refused: the benchmark's limits are too low")
        held.append(host)
        control.release_connection(held.pop(0))
    elapsed = time.perf_counter() - start
    for host in held:
        control.release_connection(host)
    return elapsed / ops * 1e6


def run_micro(rounds: int) -> None:
    shared = SharedLimits.create(capacity=CAPACITY, slots=4)
    shared.attach(0)
    results: dict[str, list[float]] = {"local": [], "shared": []}
    for _ in range(rounds):
        results["local"].append(micro(None, 50_000))
        results["shared"].append(micro(shared, 50_000))
    shared.close()
    local, mine = statistics.median(results["local"]), statistics.median(results["shared"])
    print(f"admit + release, µs per connection (median of {rounds}):")
    print(f"  local (one process)   {local:6.2f}")
    print(f"  shared (SharedLimits) {mine:6.2f}   (+{mine - local:.2f} µs)")


# -- 2. connections per second -------------------------------------------------------


class Line(sockworks.StreamProtocol):
    """One short line, then close (daytime's shape, without the clock)."""

    def on_connect(
        self, peer: sockworks.Peer, local: sockworks.Peer | None = None
    ) -> sockworks.Output:
        return sockworks.close(b"hello\r\n", reason="sent")


def worker(
    server: sockworks.Server, shared: SharedLimits | None, slot: int, ready: int, log: bool
) -> None:
    """A forked worker: the ordinary Server on the parent's socket."""
    if log:  # as the CLI does (cli/_common.py), into /dev/null
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
            stream=open(os.devnull, "w"),  # noqa: SIM115 - the worker's whole life
        )
    if shared is not None:
        # What the supervisor does (_supervisor.SharedConnectionLimits).
        shared.attach(slot)
        server.shared_limits["line"] = shared
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        await server.start()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(server.shutdown()))
        # Which counts the server really uses: the parent checks the mode.
        access = server.groups[0].access
        os.write(ready, b"s" if access is not None and access.shared is not None else b"l")
        await server.wait_stopped()

    loop.run_until_complete(main())
    os._exit(0)


def serve_and_load(
    mode: str,
    policy: AccessPolicy,
    workers: int,
    connload: Path,
    load_procs: int,
    seconds: float,
    log: bool,
) -> tuple[float, float]:
    """(connections/s, worker CPU µs per connection) for one run."""
    config = sockworks.ServiceConfig.create(
        Line,
        ["tcp:127.0.0.1:0"],
        name="line",
        access=policy,
        limits=sockworks.Limits(max_connections=CAPACITY),
    )
    server = sockworks.Server([config], grace=0.5)
    server.bind()
    port = server.endpoints[0][1].port
    shared = SharedLimits.create(capacity=CAPACITY, slots=2 * workers) if mode == "shared" else None
    r, w = os.pipe()
    pids = []
    for slot in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                worker(server, shared, slot, w, log)
            finally:
                os._exit(1)
        pids.append(pid)
    os.close(w)
    try:
        for _ in range(workers):
            said = os.read(r, 1)
            if not said:
                raise HarnessError("a worker died before it was ready")
            if said != mode[:1].encode():
                raise HarnessError(f"a worker is not counting as {mode!r} says")
        before = sum(cpu_seconds(pid) or 0.0 for pid in pids)
        out = subprocess.run(
            [str(connload), "127.0.0.1", str(port), str(load_procs), str(seconds)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        after = sum(cpu_seconds(pid) or 0.0 for pid in pids)
    finally:
        os.close(r)
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
        for _, _, bound in server._plan:
            for b in bound:
                b.sock.close()
        if shared is not None:
            held = shared.held()
            shared.close()
            if held[0]:
                raise HarnessError(f"shared counts not back to zero after the run: {held}")
    match = re.search(r"cps=(\d+) errors=(\d+)", out)
    if match is None:
        raise HarnessError(f"connload said: {out!r}")
    cps = float(match.group(1))
    return cps, (after - before) / max(1.0, cps * seconds) * 1e6


def run_cps(args: argparse.Namespace) -> None:
    src = find_bench_sources(args.bench_src, ("connload.c",))
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_tools(src, Path(tmp), ["connload"])
        connload = Path(tmp) / "connload"
        for round_ in range(args.rounds):
            for name, policy in POLICIES.items():
                modes = ("local", "shared") if round_ % 2 == 0 else ("shared", "local")
                for mode in modes:
                    runs.setdefault((name, mode), []).append(
                        serve_and_load(
                            mode, policy, args.workers, connload, args.load_procs, args.seconds,
                            args.log,
                        )
                    )
    print(
        f"\n{args.workers} workers on one socket, connload with {args.load_procs} processes,"
        f" {args.seconds:g} s x {args.rounds} rounds, logging {'on' if args.log else 'off'}"
        " (medians; ratio: shared / local,"
        " the median of the rounds' ratios):"
    )
    print(f"  {'limits':10} {'mode':6} {'conn/s':>8} {'ratio':>6} {'CPU µs/conn':>12} {'ratio':>6}")
    for name in POLICIES:
        local, mine = runs[(name, "local")], runs[(name, "shared")]
        cps_ratio = statistics.median(s[0] / lo[0] for s, lo in zip(mine, local, strict=True))
        cpu_ratio = statistics.median(s[1] / lo[1] for s, lo in zip(mine, local, strict=True))
        rows = (
            ("local", local, "", ""),
            ("shared", mine, f"{cps_ratio:.2f}", f"{cpu_ratio:.2f}"),
        )
        for mode, samples, r_cps, r_cpu in rows:
            cps = statistics.median(c for c, _ in samples)
            cpu = statistics.median(u for _, u in samples)
            print(f"  {name:10} {mode:6} {cps:8.0f} {r_cps:>6} {cpu:12.1f} {r_cpu:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--load-procs", type=int, default=4)
    parser.add_argument("--log", action="store_true", help="log every connection, as the CLI")
    parser.add_argument("--bench-src", default=None)
    parser.add_argument("--micro-only", action="store_true")
    args = parser.parse_args()
    print(machine_summary())
    try:
        run_micro(5)
        if not args.micro_only:
            run_cps(args)
    except HarnessError as exc:
        print(f"shared_limits_bench: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
