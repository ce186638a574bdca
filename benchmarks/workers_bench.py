"""Worker processes (issue 10): how ``sockworks serve --workers N`` scales,
what a worker costs per request, and whether SO_REUSEPORT (a listening
socket per worker) would balance better than the one shared socket.

Sections (``--only SECTION,…``; every one by default):

- ``core``: the CPU-time target. Every server process (the supervisor and
  all its workers: ``taskset`` is inherited across fork) on CPU 0, the load
  on the other CPUs. On one core N workers cannot go faster than one, but
  the server's CPU time per request says what the workers cost: the shared
  socket waking every worker, switches between them, the supervisor.
  Contenders: ``--workers N`` for each N of ``--workers``, and the plain
  single process (no ``--workers``) as an informational row.
- ``scale``: the throughput target, only where the machine has the cores:
  N workers on CPUs 0..N-1 and N CPUs more for the load (N ``echoload``
  processes, ``--procs`` x N ``connload`` processes); the target is
  ``rate(N) >= 0.9 x N x rate(1)``, with ``rate(1)`` measured on one
  server CPU and one load CPU. Skipped with a note for an N the machine
  cannot hold (on 2 CPUs: every N >= 2).
- ``free``: no pinning at all (informational): what N workers do when the
  load shares the cores, as on a small machine in production.
- ``limits``: new connections/s with ``--per-source 0`` (no limit) and with
  ``--limits-args`` (``--per-source``, ``--cps``, ``--instances``, set high
  enough never to refuse), pinned as ``core``, without ``--workers`` (the
  limits counted in the process) and with each N (counted in memory the
  workers share); plus a probe that says
  whether the limits hold across workers: ``--workers 2 --instances 1``,
  one connection held open on each worker (the other one stopped by
  SIGSTOP meanwhile): is the second served?
- ``balance``: no sockworks: plain uvloop accept servers (this script's
  ``plain-server`` mode) forked in two models, one shared listening socket
  or an SO_REUSEPORT socket per process, against one process; per-process
  connection and request counts (from a shared counters file), rate, CPU
  per operation, and max/mean over the processes; pinned as ``core``
  (``balance``) and unpinned (``balance-free``).
- ``reset``: a fact, not a target: with SO_REUSEPORT, a process's socket
  closed while connections are queued on it resets them; with a shared
  socket (or a socket the parent keeps a copy of) none is.

Loads: ``connect`` is ``connload`` (``--procs`` processes: connect, read
to EOF, close) against ``serve thanks -q``; ``echo`` is ``echoload``
(``--conns`` connections, ``--size`` bytes, ping-pong) against
``serve echo -q``. Each section's servers are measured one after the
other, in reverse order every other round; a ratio is the median over
rounds of the ratio within a round. Server CPU time is that of the whole
process tree (the supervisor, every live worker, and the workers it
reaped), from /proc.

    python benchmarks/workers_bench.py                  # everything, ~2.5 minutes
    python benchmarks/workers_bench.py --quick          # a smoke run, ~15 s
    python benchmarks/workers_bench.py --only balance,reset   # no sockworks needed

Exits 0 whether targets are met or missed (``--strict``: 1 on a MISS).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    HOST,
    PRIORITY,
    HarnessError,
    RunningServer,
    build_tools,
    find_bench_sources,
    machine_summary,
    median,
    rps_label,
    set_priority,
    table,
)

TOOLS = ("connload", "echoload")
CPS = re.compile(r"cps=(?P<rate>\d+) errors=(?P<errors>\d+)")
RPS = re.compile(r"rps=(?P<rate>\d+) p50_us=\d+ p99_us=\d+ errors=(?P<errors>\d+)")
LOADS = ("connect", "echo")
SECTIONS = ("core", "scale", "free", "limits", "balance", "balance-free", "reset")
THANKS = b"thank you for connecting"
# High enough that connload from one address is never refused.
LIMITS_ARGS = "--per-source 100000 --cps 1000000000 --instances 100000"
RATE_TARGET, CPU_TARGET = 0.9, 1.10
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU time of a process tree ----------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """Every process: its parent and its CPU seconds (user + system of all
    its threads, plus the children it has reaped). /proc/PID/task/*/children
    is not in every kernel (this one's lacks it): the parent links come
    from each /proc/PID/stat."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks = sum(int(x) for x in fields[11:15])
        out[int(entry.name)] = (int(fields[1]), ticks / CLK_TCK)
    return out


@dataclasses.dataclass
class TreeCpu:
    root: float  # the root alone (with the workers it reaped)
    workers: dict[int, float]  # the root's children by pid (none: the root serves)

    @property
    def total(self) -> float:
        return self.root + sum(self.workers.values())


def tree_cpu(root: int) -> TreeCpu:
    """CPU seconds of ``root`` and of its children (the workers; their own
    descendants counted in them). A ``cpu_seconds(pid, children=True)``
    counts only children already reaped, not live workers."""
    procs = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)

    def subtree(pid: int) -> float:
        return procs[pid][1] + sum(subtree(k) for k in kids.get(pid, ()))

    if root not in procs:
        return TreeCpu(0.0, {})
    return TreeCpu(procs[root][1], {k: subtree(k) for k in kids.get(root, ())})


# -- plain uvloop servers (the balance section; no sockworks) ---------------------------


def plain_server(argv: Sequence[str]) -> int:
    """``workers_bench.py plain-server``: ``--procs`` forked uvloop accept
    servers on one shared listening socket or on an SO_REUSEPORT socket
    each (all bound by the parent, as a supervisor would), counting
    connections and bytes per process in ``--counts`` (a file of
    ``procs`` x 2 native uint64, mapped shared). Prints ``listening on
    tcp:HOST:PORT`` once every process is ready; SIGTERM to the process
    group stops them all."""
    p = argparse.ArgumentParser(prog="workers_bench.py plain-server")
    p.add_argument("--model", choices=("shared", "reuseport"), required=True)
    p.add_argument("--procs", type=int, required=True)
    p.add_argument("--mode", choices=LOADS, required=True)
    p.add_argument("--counts", required=True)
    p.add_argument("--backlog", type=int, default=4096)
    args = p.parse_args(argv)
    Path(args.counts).write_bytes(bytes(16 * args.procs))
    socks: list[socket.socket] = []
    port = 0
    for _ in range(1 if args.model == "shared" else args.procs):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if args.model == "reuseport":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((HOST, port))
        s.listen(args.backlog)
        port = s.getsockname()[1]
        socks.append(s)
    ready_r, ready_w = os.pipe()
    for slot in range(args.procs):
        if os.fork() == 0:
            status = 1
            try:
                os.close(ready_r)
                mine = socks[0] if args.model == "shared" else socks[slot]
                for s in socks:
                    if s is not mine:
                        s.close()
                _plain_worker(slot, mine, args.mode, args.counts, args.backlog, ready_w)
                status = 0
            finally:
                os._exit(status)
    os.close(ready_w)
    ready = 0
    while ready < args.procs:
        got = os.read(ready_r, 64)
        if not got:
            print("plain-server: a worker died before it was ready", file=sys.stderr)
            return 1
        ready += len(got)
    sys.stderr.write(f"listening on tcp:{HOST}:{port}\n")
    sys.stderr.flush()
    while True:  # the process group's SIGTERM ends us and the workers
        signal.pause()


def _plain_worker(slot: int, sock: socket.socket, mode: str, counts_path: str,
                  backlog: int, ready_w: int) -> None:
    import asyncio
    import ctypes
    import mmap

    import uvloop

    # Never outlive the parent (it is what the harness stops).
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    with open(counts_path, "r+b") as f:
        counts = memoryview(mmap.mmap(f.fileno(), 0)).cast("Q")
    conns, nbytes = 2 * slot, 2 * slot + 1

    class Thanks(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            counts[conns] += 1
            transport.write(THANKS)  # type: ignore[attr-defined]
            transport.close()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            counts[conns] += 1
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            counts[nbytes] += len(data)
            self.transport.write(data)

    loop = uvloop.new_event_loop()
    factory: type[asyncio.Protocol] = Thanks if mode == "connect" else Echo
    loop.run_until_complete(loop.create_server(factory, sock=sock, backlog=backlog))
    os.write(ready_w, b"R")
    loop.run_forever()


def read_counts(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    values = struct.unpack(f"={len(data) // 8}Q", data)
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


# -- contenders, placements ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a server and its load run: CPU lists for taskset (None: not
    pinned), and how many load processes (``echoload`` instances;
    ``connload`` gets ``--procs`` x this many processes)."""

    name: str
    server_cpus: str | None
    load_cpus: str | None
    width: int = 1


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    what: str
    section: str
    workers: int  # processes that serve (0: sockworks without --workers)
    placement: Placement
    argv: Callable[[Context, str], list[str]]  # given the load
    counts: bool = False  # a plain server with a counters file
    loads: tuple[str, ...] = LOADS


@dataclasses.dataclass
class Context:
    tools: Path
    work: Path
    args: argparse.Namespace


def sockworks(*extra: str, workers: int = 0) -> Callable[[Context, str], list[str]]:
    def argv(ctx: Context, load: str) -> list[str]:
        service = "thanks" if load == "connect" else "echo"
        more = ["--workers", str(workers)] if workers else []
        if load == "echo" and ctx.args.conns > 64 and "--per-source" not in extra:
            # One address, more connections than the default per-source limit.
            more += ["--per-source", "0"]
        return [sys.executable, "-m", "sockworks", "serve", service, "-q",
                "-l", f"tcp:{HOST}:0", *more, *extra]
    return argv


def plain(model: str, procs: int) -> Callable[[Context, str], list[str]]:
    def argv(ctx: Context, load: str) -> list[str]:
        counts = ctx.work / f"counts-{model}-{procs}-{load}-{time.monotonic_ns()}"
        return [sys.executable, str(Path(__file__).resolve()), "plain-server",
                "--model", model, "--procs", str(procs), "--mode", load,
                "--counts", str(counts)]
    return argv


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def cpu_list(ids: Sequence[int]) -> str:
    return ",".join(str(i) for i in ids)


def placements(args: argparse.Namespace) -> dict[str, Placement]:
    have = cpus()
    if args.no_pin or len(have) < 2 or shutil.which("taskset") is None:
        core = Placement("unpinned", None, None)
    else:
        core = Placement(f"server CPU {have[0]}, load CPU {cpu_list(have[1:])}",
                         str(have[0]), cpu_list(have[1:]))
    return {"core": core, "free": Placement("unpinned", None, None)}


def scale_placement(n: int) -> Placement | None:
    """N workers on N CPUs and N CPUs for the load; None when the machine
    has fewer than 2N."""
    have = cpus()
    if len(have) < 2 * n:
        return None
    return Placement(f"server CPUs {cpu_list(have[:n])}, load CPUs {cpu_list(have[n:2 * n])}",
                     cpu_list(have[:n]), cpu_list(have[n:2 * n]), width=n)


def contenders(args: argparse.Namespace) -> tuple[list[Contender], list[str]]:
    """Every contender of the sections asked for, and notes on what the
    machine cannot measure."""
    place = placements(args)
    core, free = place["core"], place["free"]
    out: list[Contender] = []
    notes: list[str] = []
    ns = args.worker_counts
    if "core" in args.sections:
        out.append(Contender("single", "sockworks serve SERVICE -q (no --workers)", "core", 0,
                             core, sockworks()))
        out += [Contender(f"workers-{n}", f"sockworks serve SERVICE -q --workers {n}", "core",
                          n, core, sockworks(workers=n)) for n in ns]
    if "scale" in args.sections and core.server_cpus is None:
        notes.append("scale: needs pinning (taskset, 2 CPUs or more, no --no-pin)")
    elif "scale" in args.sections:
        fits = [n for n in ns if scale_placement(n) is not None]
        for n in ns:
            if n not in fits:
                notes.append(f"scale: --workers {n} needs {2 * n} CPUs ({n} for the workers, "
                             f"{n} for the load); this machine has {len(cpus())}")
        if len(fits) > 1:  # 1 worker is only the baseline of the others
            for n in fits:
                out.append(Contender(f"scale-{n}", f"--workers {n} on {n} CPU(s)", "scale", n,
                                     scale_placement(n) or core, sockworks(workers=n)))
    if "free" in args.sections:
        out += [Contender(f"free-{n}", f"--workers {n}, nothing pinned", "free", n, free,
                          sockworks(workers=n)) for n in ns]
    if "limits" in args.sections:
        limits = shlex.split(args.limits_args)
        # No --workers: the same limits counted in the process, the
        # baseline of what sharing them between workers adds.
        for n in [0, *ns]:
            tag, how = (f"-{n}", f"--workers {n} ") if n else ("-single", "")
            out.append(Contender(f"nolimits{tag}", f"{how}--per-source 0", "limits", n,
                                 core, sockworks("--per-source", "0", workers=n),
                                 loads=("connect",)))
            out.append(Contender(f"limits{tag}", f"{how}{args.limits_args}", "limits",
                                 n, core, sockworks(*limits, workers=n), loads=("connect",)))
    top = max(ns)
    for where, group, tag in ((core, "balance", "pinned"), (free, "balance-free", "free")):
        if group in args.sections and not (group == "balance-free" and core.server_cpus is None):
            if where is core:
                out.append(Contender(f"plain-1-{tag}", "uvloop, 1 process", group, 1, where,
                                     plain("shared", 1), counts=True))
            out.append(Contender(f"shared-{top}-{tag}", f"uvloop, {top} processes, one shared "
                                 "socket", group, top, where, plain("shared", top), counts=True))
            out.append(Contender(f"reuseport-{top}-{tag}", f"uvloop, {top} processes, "
                                 "SO_REUSEPORT socket each", group, top, where,
                                 plain("reuseport", top), counts=True))
    return out, notes


# -- measuring ----------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One measurement: operations/s, errors, server CPU µs per operation
    (the whole tree), and per serving process: CPU seconds, and (plain
    servers) connections and bytes received."""

    rate: float
    errors: int = 0
    cpu_us: float = 0.0
    worker_cpu: list[float] = dataclasses.field(default_factory=list)
    conns: list[int] = dataclasses.field(default_factory=list)
    nbytes: list[int] = dataclasses.field(default_factory=list)


# contender -> load -> round -> sample
Samples = dict[str, dict[str, dict[int, Sample]]]


def pin(cpu_ids: str | None, argv: list[str]) -> list[str]:
    return [*PRIORITY, *(argv if cpu_ids is None else ["taskset", "-c", cpu_ids, *argv])]


def run_load(ctx: Context, load: str, port: int, seconds: float,
             where: Placement) -> tuple[float, int]:
    args = ctx.args
    if load == "connect":
        argvs = [[str(ctx.tools / "connload"), HOST, str(port), str(args.procs * where.width),
                  f"{seconds:g}"]]
        pattern = CPS
    else:
        argvs = [[str(ctx.tools / "echoload"), HOST, str(port), str(args.conns), str(args.size),
                  f"{seconds:g}"]] * where.width
        pattern = RPS
    procs = [subprocess.Popen(pin(where.load_cpus, a), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in argvs]
    rate, errors = 0.0, 0
    for proc, argv in zip(procs, argvs, strict=True):
        out, err = proc.communicate(timeout=seconds + 30)
        match = pattern.search(out)
        if proc.returncode != 0 or match is None:
            raise HarnessError(f"{Path(argv[0]).name} failed ({proc.returncode}): "
                               f"{out}{err}".strip())
        rate += float(match.group("rate"))
        errors += int(match.group("errors"))
    return rate, errors


@dataclasses.dataclass
class Running:
    contender: Contender
    load: str
    server: RunningServer
    counts: Path | None


def start(ctx: Context, c: Contender, load: str) -> Running:
    argv = c.argv(ctx, load)
    counts = Path(argv[argv.index("--counts") + 1]) if c.counts else None
    server = RunningServer(f"{c.name}-{load}", pin(c.placement.server_cpus, argv), None,
                           ctx.work)
    server.wait_ready()
    probe(load, server.port)
    return Running(c, load, server, counts)


def probe(load: str, port: int) -> None:
    """One connection as the load makes it: the server must answer it."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        if load == "connect":
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            if THANKS not in got:
                raise HarnessError(f"port {port} answered {got[:80]!r}, not the thanks line")
        else:
            s.sendall(b"probe")
            got = b""
            while len(got) < 5 and (chunk := s.recv(4096)):
                got += chunk
            if got != b"probe":
                raise HarnessError(f"port {port} echoed {got[:80]!r}")


def measure(ctx: Context, r: Running, seconds: float) -> Sample:
    pid = r.server.pid
    before = tree_cpu(pid)
    counts0 = read_counts(r.counts) if r.counts else []
    rate, errors = run_load(ctx, r.load, r.server.port, seconds, r.contender.placement)
    after = tree_cpu(pid)
    counts1 = read_counts(r.counts) if r.counts else []
    sample = Sample(rate, errors)
    if rate:
        sample.cpu_us = (after.total - before.total) / (rate * seconds) * 1e6
    if after.workers:
        sample.worker_cpu = [after.workers[p] - before.workers.get(p, 0.0)
                             for p in sorted(after.workers)]
    else:
        sample.worker_cpu = [after.root - before.root]
    if counts1:
        sample.conns = [b[0] - a[0] for a, b in zip(counts0, counts1, strict=True)]
        sample.nbytes = [b[1] - a[1] for a, b in zip(counts0, counts1, strict=True)]
    return sample


def max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0
    return max(values) / mean if mean else None


def run_section(ctx: Context, group: Sequence[Contender], load: str, samples: Samples,
                failed: dict[str, str]) -> None:
    args = ctx.args
    running: list[Running] = []
    try:
        for c in group:
            try:
                r = start(ctx, c, load)
            except (HarnessError, OSError) as exc:
                failed[f"{c.name} {load}"] = first_line(exc)
                print(f"  {c.name} {load}: not measured: {exc}", flush=True)
                continue
            running.append(r)
            if args.warmup > 0:
                try:
                    measure(ctx, r, args.warmup)
                except (HarnessError, subprocess.TimeoutExpired):
                    pass  # the measurement proper reports it
        for round_no in range(args.rounds):
            # Every other round in reverse: a drift in the machine's load
            # favours no one.
            for r in running if round_no % 2 == 0 else reversed(running):
                key = f"{r.contender.name} {load}"
                if key in failed:
                    continue
                if not r.server.alive():
                    failed[key] = "the server exited: " + " / ".join(r.server.lines[-3:])
                    continue
                try:
                    s = measure(ctx, r, args.duration)
                except (HarnessError, subprocess.TimeoutExpired) as exc:
                    failed[key] = first_line(exc)
                    print(f"  {key}: not measured: {exc}", flush=True)
                    continue
                samples.setdefault(r.contender.name, {}).setdefault(load, {})[round_no] = s
                spread = max_over_mean(s.conns if s.conns and load == "connect"
                                       else s.nbytes if s.nbytes else s.worker_cpu)
                print(f"  {r.contender.name:20} {load:8} {rps_label(s.rate):>8}/s "
                      f"cpu={s.cpu_us:.1f}us/op errors={s.errors} "
                      f"max/mean={'-' if spread is None else f'{spread:.2f}'}", flush=True)
    finally:
        for r in running:
            r.server.stop()


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


# -- do the limits hold across workers? ------------------------------------------------------


def limits_probe(ctx: Context) -> dict[str, object]:
    """Do ``--instances`` (and so the other limits) hold across workers?
    ``serve echo --workers 2 --instances 1``: each worker in turn is the
    only one running (the other stopped with SIGSTOP), so each gets one
    connection, held open. Both served: the limit is counted per worker;
    the second refused: for the service."""
    where = placements(ctx.args)["core"]
    argv = [sys.executable, "-m", "sockworks", "serve", "echo", "-q", "-l", f"tcp:{HOST}:0",
            "--workers", "2", "--instances", "1", "--per-source", "0"]
    server = RunningServer("limits-probe", pin(where.server_cpus, argv), None, ctx.work)
    held: list[socket.socket] = []
    served = 0
    stopped: int | None = None
    try:
        server.wait_ready()
        workers = sorted(tree_cpu(server.pid).workers)
        if len(workers) != 2:
            raise HarnessError(f"expected 2 workers under pid {server.pid}, found {workers}")
        for other in (workers[1], workers[0]):  # stopped while the other accepts
            if stopped is not None:
                os.kill(stopped, signal.SIGCONT)
            os.kill(other, signal.SIGSTOP)
            stopped = other
            s = socket.create_connection((HOST, server.port), timeout=5)
            held.append(s)
            s.settimeout(5)
            try:
                s.sendall(b"x")
                served += s.recv(1) == b"x"
            except OSError:
                pass  # refused: reset or closed
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        for s in held:
            s.close()
        server.stop()
    verdict = {2: "per worker (each worker admitted one)",
               1: "for the service (the second worker refused)"}.get(served, "nothing served")
    return {"served_of_2": served, "verdict": verdict}


# -- the reset on close --------------------------------------------------------------------


@dataclasses.dataclass
class ResetOutcome:
    model: str
    connections: int
    served: int  # by the other process, at once
    reset: int
    waiting: int  # neither, until someone accepts from the socket left open
    served_later: int = 0


def _listener(reuseport: bool, port: int, backlog: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((HOST, port))
    s.listen(backlog)
    return s


def _hold_until_told(sock: socket.socket) -> tuple[int, int]:
    """A child process holding ``sock`` (a 'worker' that accepts nothing)
    until the write end of the returned pipe is written; returns (pid, fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)  # its descriptors close: the socket, if it was the last
    os.close(r)
    return pid, w


def _answer_queued(listener: socket.socket) -> int:
    """Accept everything queued, answer each with b"ok"; how many."""
    listener.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return n
        conn.setblocking(True)
        conn.sendall(b"ok")
        conn.close()
        n += 1


def _client_states(clients: list[socket.socket], wait: float) -> tuple[int, int, list[int]]:
    """Served (read b"ok"), reset, and the indexes of those with neither
    within ``wait`` seconds."""
    served, reset, pending = 0, 0, list(range(len(clients)))
    deadline = time.monotonic() + wait
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([clients[i] for i in pending], [], [], left)
        for s in ready:
            i = clients.index(s)
            pending.remove(i)
            try:
                got = s.recv(16)
            except ConnectionResetError:
                reset += 1
                continue
            served += got == b"ok"
    return served, reset, pending


def reset_check(count: int) -> list[ResetOutcome]:
    """Two listening 'workers', ``count`` connections queued (the kernel
    completes the handshakes), then one worker exits without accepting."""
    out: list[ResetOutcome] = []
    for model in ("reuseport", "reuseport, parent keeps a copy", "shared socket"):
        reuse = model.startswith("reuseport")
        first = _listener(reuse, 0, 4 * count)
        port = first.getsockname()[1]
        second = _listener(True, port, 4 * count) if reuse else first
        pid, tell = _hold_until_told(first)
        kept = first if model != "reuseport" else None
        if kept is None:
            first.close()  # the child's is the last descriptor of this socket
        clients = [socket.create_connection((HOST, port), timeout=5) for _ in range(count)]
        try:
            os.write(tell, b"x")
            os.close(tell)
            os.waitpid(pid, 0)
            _answer_queued(second)
            served, reset, pending = _client_states(clients, 0.5)
            result = ResetOutcome(model, count, served, reset, len(pending))
            if pending and kept is not None:  # a replacement worker takes the socket over
                _answer_queued(kept)
                result.served_later, _, _ = _client_states([clients[i] for i in pending], 2.0)
            out.append(result)
        finally:
            for s in clients:
                s.close()
            for s in {first, second}:
                s.close()
    return out


def migrate_req() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    except OSError:
        return "absent (Linux < 5.14)"


# -- reporting ------------------------------------------------------------------------------


def med(samples: Samples, name: str, load: str, pick: Callable[[Sample], float | None]
        ) -> float | None:
    values = [v for s in samples.get(name, {}).get(load, {}).values()
              if (v := pick(s)) is not None]
    return median(values) if values else None


def paired(samples: Samples, a: str, b: str, load: str,
           ratio: Callable[[Sample, Sample], float | None]) -> float | None:
    """The median over rounds of ratio(a's sample, b's sample) from the same round."""
    ra, rb = samples.get(a, {}).get(load, {}), samples.get(b, {}).get(load, {})
    values = [v for k in ra.keys() & rb.keys() if (v := ratio(ra[k], rb[k])) is not None]
    return median(values) if values else None


def rate_ratio(a: Sample, b: Sample) -> float | None:
    return a.rate / b.rate if b.rate else None


def cpu_ratio(a: Sample, b: Sample) -> float | None:
    """a's CPU per operation over b's: above 1, a costs more."""
    return a.cpu_us / b.cpu_us if a.cpu_us and b.cpu_us else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def spread(s: Sample, load: str) -> float | None:
    """Max/mean over the serving processes: connections (plain, connect),
    bytes (plain, echo), else CPU time."""
    if s.conns and load == "connect":
        return max_over_mean(s.conns)
    if s.nbytes and load == "echo":
        return max_over_mean(s.nbytes)
    return max_over_mean(s.worker_cpu) if len(s.worker_cpu) > 1 else None


def sockworks_table(cs: Sequence[Contender], samples: Samples) -> str:
    rows = []
    for c in cs:
        if c.counts or c.name not in samples:
            continue
        row = [c.name, c.what, c.placement.name]
        for load in LOADS:
            rate = med(samples, c.name, load, lambda s: s.rate)
            row += [rps_label(rate) if rate else "-",
                    # µs per operation x 10,000 operations = CPU seconds per 10k
                    fmt(med(samples, c.name, load, lambda s: s.cpu_us / 100), ".3f"),
                    fmt(med(samples, c.name, load, functools.partial(spread, load=load)))]
        errors = sum(s.errors for by in samples[c.name].values() for s in by.values())
        rows.append([*row, str(errors)])
    return table(["contender", "what", "placement", "conn/s", "CPU s/10k conn",
                  "max/mean CPU", "echo req/s", "CPU s/10k req", "max/mean CPU", "errors"],
                 rows, left=3)


def target_rows(args: argparse.Namespace, samples: Samples) -> tuple[list[list[str]], bool]:
    rows, all_pass = [], True
    ncpu = len(cpus())
    for n in args.worker_counts:
        if n < 2:
            continue
        for load in LOADS:
            scaled = f"scale-{n}" in samples and "scale-1" in samples
            if scaled:
                ratio = paired(samples, f"scale-{n}", "scale-1", load, rate_ratio)
                cpu = paired(samples, f"scale-{n}", "scale-1", load, cpu_ratio)
                rate_ok = None if ratio is None else ratio >= RATE_TARGET * n
                where = f"{n} server + {n} load CPUs vs 1 + 1"
            else:
                ratio = None
                cpu = paired(samples, f"workers-{n}", "workers-1", load, cpu_ratio)
                rate_ok = None
                where = f"all on 1 server CPU ({ncpu} CPUs: no room for {n} + load)"
            if ratio is None and cpu is None:
                continue  # not measured (that section not run)
            cpu_ok = None if cpu is None else cpu <= CPU_TARGET
            verdicts = [v for v in (rate_ok, cpu_ok) if v is not None]
            verdict = "n/a" if not verdicts else "PASS" if all(verdicts) else "MISS"
            all_pass &= verdict != "MISS"
            rows.append([f"{n} workers", load, where,
                         f"{fmt(ratio)} (>= {RATE_TARGET * n:.1f})" if scaled else "n/a",
                         f"{fmt(cpu)} (<= {CPU_TARGET:.2f})", verdict])
    return rows, all_pass


def info_rows(args: argparse.Namespace, samples: Samples) -> list[list[str]]:
    rows = []
    for load in LOADS:
        if "single" in samples and "workers-1" in samples:
            rows.append(["--workers 1 vs no --workers (pinned)", load,
                         fmt(paired(samples, "workers-1", "single", load, rate_ratio)),
                         fmt(paired(samples, "workers-1", "single", load, cpu_ratio))])
        for n in args.worker_counts:
            if n > 1 and f"free-{n}" in samples:
                rows.append([f"unpinned: --workers {n} vs 1", load,
                             fmt(paired(samples, f"free-{n}", "free-1", load, rate_ratio)),
                             fmt(paired(samples, f"free-{n}", "free-1", load, cpu_ratio))])
    for n in [0, *args.worker_counts]:
        tag, how = (f"-{n}", f"--workers {n}") if n else ("-single", "no --workers")
        if f"limits{tag}" in samples:
            rows.append([f"{how}: limits on vs --per-source 0", "connect",
                         fmt(paired(samples, f"limits{tag}", f"nolimits{tag}", "connect",
                                    rate_ratio)),
                         fmt(paired(samples, f"limits{tag}", f"nolimits{tag}", "connect",
                                    cpu_ratio))])
    return rows


def balance_table(cs: Sequence[Contender], samples: Samples, size: int) -> str:
    rows = []
    for c in cs:
        if not c.counts or c.name not in samples:
            continue
        base = "plain-1-pinned"
        for load in LOADS:
            by_round = samples[c.name].get(load, {})
            if not by_round:
                continue
            conns = [sum(x) for x in zip(*(s.conns for s in by_round.values()), strict=True)]
            reqs = [sum(x) // size for x in
                    zip(*(s.nbytes for s in by_round.values()), strict=True)]
            rate = med(samples, c.name, load, lambda s: s.rate)
            same = c.placement.name == samples_placement(cs, base)
            rows.append([
                c.name, c.placement.name, load, rps_label(rate) if rate else "-",
                fmt(med(samples, c.name, load, lambda s: s.cpu_us), ".1f"),
                "/".join(str(x) for x in conns) + ("" if load == "connect" else
                                                   " (reqs " + "/".join(map(str, reqs)) + ")"),
                fmt(med(samples, c.name, load, functools.partial(spread, load=load))),
                fmt(paired(samples, c.name, base, load, rate_ratio)) if same else "-",
                fmt(paired(samples, c.name, base, load, cpu_ratio)) if same else "-",
            ])
    return table(["server", "placement", "load", "rate", "CPU µs/op",
                  "per process, all rounds", "max/mean", "rate vs 1 proc", "CPU vs 1 proc"],
                 rows, left=3)


def samples_placement(cs: Sequence[Contender], name: str) -> str | None:
    return next((c.placement.name for c in cs if c.name == name), None)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Worker processes: scaling, CPU per request, shared socket vs SO_REUSEPORT.")
    p.add_argument("--only", help=f"comma-separated sections (of: {', '.join(SECTIONS)})")
    p.add_argument("--workers", help="comma-separated worker counts (default 1,2 and the "
                   "number of CPUs)")
    p.add_argument("--rounds", type=int, help="rounds per section (default 5)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 1.0)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server (default 0.3)")
    p.add_argument("--procs", type=int, default=4,
                   help="connload processes per load CPU (default 4)")
    p.add_argument("--conns", type=int, default=10,
                   help="echoload connections (default 10; above 64, sockworks gets "
                   "--per-source 0)")
    p.add_argument("--size", type=int, default=100, help="echo message bytes (default 100)")
    p.add_argument("--limits-args", default=LIMITS_ARGS,
                   help=f"the limits section's options (default: {LIMITS_ARGS!r})")
    p.add_argument("--reset-conns", type=int, default=64,
                   help="connections queued in the reset check (default 64)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 0.3 s, no warm-up (options given still apply)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--nice", type=int, default=0,
                   help="run servers and load at this nice value (negative needs root)")
    p.add_argument("--bench-src", help="directory with connload.c and echoload.c")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    defaults = {"rounds": 5, "duration": 1.0, "warmup": 0.3}
    if args.quick:
        defaults = {"rounds": 1, "duration": 0.3, "warmup": 0.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.sections = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s): {', '.join(sorted(unknown))} (of: {', '.join(SECTIONS)})")
    try:
        counts = ({int(x) for x in args.workers.split(",")} if args.workers
                  else {1, 2, len(cpus())})
    except ValueError:
        p.error(f"--workers takes numbers separated by commas, not {args.workers!r}")
    if min(counts) < 1:
        p.error("--workers: every count must be 1 or more")
    args.worker_counts = sorted(counts | {1})  # 1 worker is every ratio's baseline
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plain-server"]:
        return plain_server(argv[1:])
    args = parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"workers_bench: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    set_priority(args.nice)
    started = time.time()
    cs, notes = contenders(args)
    print(f"machine: {machine_summary()}")
    print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"sections: {', '.join(args.sections)}; workers {args.worker_counts}; "
          f"{args.rounds} round(s) of {args.duration:g} s; nice {args.nice}", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    samples: Samples = {}
    failed: dict[str, str] = {}
    probe_result: dict[str, object] | None = None
    resets: list[ResetOutcome] = []
    with tempfile.TemporaryDirectory(prefix="sockworks-workers-") as tmp:
        work = Path(tmp)
        if cs:
            tools = work / "tools"
            tools.mkdir()
            build_tools(find_bench_sources(args.bench_src, [f"{t}.c" for t in TOOLS]), tools,
                        TOOLS)
        else:
            tools = work
        ctx = Context(tools, work, args)
        sections: dict[str, list[Contender]] = {}
        for c in cs:
            sections.setdefault(c.section, []).append(c)
        for section, group in sections.items():
            for load in LOADS:
                members = [c for c in group if load in c.loads]
                if members:
                    print(f"{section}, {load}: {', '.join(c.name for c in members)}", flush=True)
                    run_section(ctx, members, load, samples, failed)
        if "limits" in args.sections:
            try:
                probe_result = limits_probe(ctx)
            except (HarnessError, OSError) as exc:
                failed["limits probe"] = first_line(exc)
        if "reset" in args.sections:
            resets = reset_check(args.reset_conns)

    print()
    print(f"machine: {machine_summary()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} to "
          f"{time.strftime('%H:%M UTC', time.gmtime())}; load average at the end: "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    all_pass = True
    if any(not c.counts for c in cs):
        print()
        print(f"sockworks servers (median of {args.rounds} round(s) of {args.duration:g} s; "
              f"connect: connload {args.procs} procs per load CPU, thanks; echo: echoload "
              f"{args.conns} conns x {args.size} B). CPU: the whole process tree; max/mean "
              "CPU: over the workers:")
        print()
        print(sockworks_table(cs, samples))
        rows, all_pass = target_rows(args, samples)
        if rows:
            print()
            print("Targets (same-run ratios vs 1 worker: median over rounds of the ratio "
                  "within a round; CPU: per request, N workers / 1 worker):")
            print()
            print(table(["workers", "load", "placement", "rate ratio", "CPU ratio", "result"],
                        rows, left=3))
        info = info_rows(args, samples)
        if info:
            print()
            print("Informational ratios (rate: a/b; CPU per operation: a/b, above 1 costs "
                  "more):")
            print()
            print(table(["comparison", "load", "rate", "CPU"], info, left=2))
    if probe_result is not None:
        print()
        print(f"limits across workers: --workers 2 --instances 1 served "
              f"{probe_result['served_of_2']} of 2 connections held at once, one per worker: "
              f"counted {probe_result['verdict']}")
    if any(c.counts for c in cs):
        print()
        print("Shared socket vs SO_REUSEPORT (plain uvloop servers; per process: connections,"
              " and for echo requests; max/mean: of those, median over rounds):")
        print()
        print(balance_table(cs, samples, args.size))
    if resets:
        print()
        print(f"Reset on close ({args.reset_conns} connections queued on two listening "
              f"processes; one exits without accepting; net.ipv4.tcp_migrate_req = "
              f"{migrate_req()}):")
        print()
        print(table(["model", "connections", "served by the other", "reset",
                     "waiting", "served by a replacement"],
                    [[r.model, str(r.connections), str(r.served), str(r.reset), str(r.waiting),
                      str(r.served_later) if r.waiting else "-"] for r in resets], left=1))
    for key, why in failed.items():
        print(f"{key}: not measured: {why}")
    print(f"\n(ran {time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_summary(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "samples": {name: {load: {str(k): dataclasses.asdict(s) for k, s in by.items()}
                               for load, by in got.items()} for name, got in samples.items()},
            "targets": target_rows(args, samples)[0],
            "limits_probe": probe_result,
            "resets": [dataclasses.asdict(r) for r in resets],
            "failed": failed,
            "notes": notes,
        }, indent=2))
    return 1 if args.strict and not all_pass else 0


if __name__ == "__main__":
    sys.exit(main())
