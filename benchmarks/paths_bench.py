"""Every path of the connection engine against its peer, in one run.

Paths (``--only PATH,…``), each with its targets (same-run ratios):

- ``connect``: new connections per second, ``sockworks serve thanks -q``
  against a raw uvloop Protocol that writes the same bytes and closes
  (>= 0.8); sockworks with its default logging is an extra, informational
  row. Load: ``connload`` with ``--procs`` processes.
- ``udp``: datagram echo, ``sockworks serve echo -l udp:… --udp-rate off``
  (the amplification guard stays on) against a raw uvloop datagram endpoint
  (>= 0.8). Load: ``udpload``.
- ``gopher``: a 2 KB text file per connection, ``sockworks serve gopher``
  against nginx serving the same file over HTTP/1.0 (one worker, access log
  off; >= 0.5) and against Gophernicus run per connection by ``tcpserver``
  (>= 10). Load: ``connload`` with the request line.
- ``echo``: TCP echo at 100 B, 1 KiB and 64 KiB (10 connections), the
  sans-I/O style against a raw uvloop Protocol (>= 1.0) and the blocking
  style against ``socketserver.ThreadingTCPServer`` (>= 1.0); the
  contenders are echo_bench's. Load: ``echoload``.
- ``idle``: server memory (VmRSS) per idle connection with ``--idle-conns``
  (10,000) open, ``sockworks serve echo`` against a raw uvloop Protocol
  echo (<= 1.5 x). Fresh servers every round.

Servers run under ``taskset -c 0``, loads under ``taskset -c 1``. For every
load, each path's contenders are measured one after the other, in reverse
order every other round, over ``--rounds`` rounds; a target ratio is the
median over rounds of the ratio within one round. The server's CPU time
per operation (from /proc; with tcpserver, its children's too) is printed
as a cross-check: other work on a shared machine disturbs it far less than
the rates. A peer that is not installed is skipped with a note: this is a
benchmark, not a test.

    python benchmarks/paths_bench.py                    # every path, ~3 minutes
    python benchmarks/paths_bench.py --quick            # a smoke run, seconds per path
    python benchmarks/paths_bench.py --only connect,udp --rounds 9 --json out.json

Exits 0 whether targets are met or missed (``--strict``: 1 on a MISS).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import echo_bench
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

TOOLS = ("echoload", "connload", "udpload")
CPS = re.compile(r"cps=(?P<rate>\d+) errors=(?P<errors>\d+)")
DPS = re.compile(r"dps=(?P<rate>\d+) lost=(?P<errors>\d+)")
THANKS = b"thank you for connecting"
GOPHER_FILE = "f.txt"
GOPHER_LINE = "line {:04d} of a two kilobyte text file for the benchmark\n"
ECHO_SIZES = (100, 1024, 65536)
ECHO_CONNS = 10
# Loopback source addresses for the idle connections: each gives its own
# range of ephemeral ports (about 28,000 by default).
IDLE_SOURCES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclasses.dataclass
class Sample:
    """One measurement: operations per second (``idle``: server bytes per
    connection), errors or lost datagrams, server CPU µs per operation."""

    rate: float
    errors: int = 0
    cpu_us: float = 0.0
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


# contender -> load label -> round -> sample
Samples = dict[str, dict[str, dict[int, Sample]]]


@dataclasses.dataclass
class Context:
    tools: Path
    work: Path
    args: argparse.Namespace
    server_cpu: int | None
    load_cpu: int | None


@dataclasses.dataclass(frozen=True)
class Peer:
    """A contender on one path: how to start it, how to load it."""

    name: str
    what: str
    # argv, given the context and the port it must use (None: it reports
    # the port it bound on stderr, ``listening on …:PORT``).
    argv: Callable[[Context, int | None], list[str]]
    own_port: bool = False  # True: the harness picks a port and polls it
    request: str | None = None  # connload's request line (connload adds CRLF)
    expect: bytes | None = None  # a probe before measuring must see this
    missing: Callable[[], str | None] = lambda: None
    children_cpu: bool = False  # count the CPU time of its reaped children
    informational: bool = False  # a row in the tables, in no target
    echo_size: int | None = None  # echo path: the contender from echo_bench


@dataclasses.dataclass(frozen=True)
class Target:
    path: str
    contender: str
    baseline: str
    bound: float
    at_most: bool = False  # idle: contender / baseline <= bound

    def text(self) -> str:
        return f"{self.contender} / {self.baseline} {'<=' if self.at_most else '>='} " \
               f"{self.bound:g}"


@dataclasses.dataclass
class Outcome:
    samples: Samples = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


# -- contenders ------------------------------------------------------------------


def _sockworks(*args: str) -> Callable[[Context, int | None], list[str]]:
    return lambda ctx, port: [sys.executable, "-m", "sockworks", "serve", *args]


def _script(script: str, *args: str) -> Callable[[Context, int | None], list[str]]:
    return lambda ctx, port: [sys.executable, str(SERVERS / script), *args, "--port", "0"]


def _modules(*names: str) -> Callable[[], str | None]:
    def check() -> str | None:
        for name in names:
            if importlib.util.find_spec(name) is None:
                return f"{name} not installed"
        return None

    return check


def program(name: str, *also: str) -> str | None:
    """The path of an installed program (PATH, then the sbin directories
    that a non-root PATH leaves out)."""
    for candidate in (name, *also):
        found = shutil.which(candidate)
        if found:
            return found
        for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
            if os.access(f"{d}/{candidate}", os.X_OK):
                return f"{d}/{candidate}"
    return None


def _programs(*names: str) -> Callable[[], str | None]:
    def check() -> str | None:
        absent = [n for n in names if program(n) is None]
        return f"{', '.join(absent)} not installed" if absent else None

    return check


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log error;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port};
        root {root};
    }}
}}
"""


def nginx_argv(ctx: Context, port: int | None) -> list[str]:
    """nginx in the foreground, one process (no master: one worker that is
    the process measured), access log off, its files in a temp prefix."""
    prefix = ctx.work / "nginx"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, host=HOST, port=port,
                                      root=ctx.work / "gopher"))
    return [program("nginx") or "nginx", "-c", str(conf), "-p", str(prefix)]


def gophernicus_argv(ctx: Context, port: int | None) -> list[str]:
    """Gophernicus as inetd would run it: one process per connection, here
    from ``tcpserver`` (no DNS or ident lookups: -H -R -l).

    - ``-ns``: no syslog, as sockworks runs with ``-q`` and nginx with no
      access log.
    - ``-i 0 -k 0``: no per-client throttling. Past 4096 requests from one
      address it would sleep a second or more per request: right for an
      abuser, wrong for a load generator.
    - As root, ``-nr`` and no change of user: Gophernicus caches what it
      learns once (the platform, found by running ``lsb_release``, about
      20 ms) in a System V shared-memory segment with a fixed key; an
      unprivileged user cannot attach one that root created (mode 0600) and
      would pay those 20 ms on every connection. Root can always attach."""
    options = ["-h", "localhost", "-r", str(ctx.work / "gopher"), "-ns", "-i", "0", "-k", "0"]
    if os.geteuid() == 0:
        options.append("-nr")
    gophernicus = program("gophernicus", "in.gophernicus") or "gophernicus"
    return [program("tcpserver") or "tcpserver", "-HRl", "localhost", HOST, str(port),
            gophernicus, *options]


CONNECT = (
    Peer("sockworks-thanks", "sockworks serve thanks -q",
         _sockworks("thanks", "-q", "-l", f"tcp:{HOST}:0"), expect=THANKS,
         missing=_modules("sockworks", "uvloop")),
    Peer("uvloop-thanks", "raw uvloop asyncio.Protocol: write, close",
         _script("uvloop_raw.py", "thanks"), expect=THANKS, missing=_modules("uvloop")),
    Peer("sockworks-thanks-logging", "sockworks serve thanks, default logging (to a file)",
         _sockworks("thanks", "-l", f"tcp:{HOST}:0"), expect=THANKS,
         missing=_modules("sockworks", "uvloop"), informational=True),
)
UDP = (
    # No -q: the UDP path logs nothing per datagram at the default level.
    Peer("sockworks-udp-echo", "sockworks serve echo -l udp:… --udp-rate off",
         _sockworks("echo", "-l", f"udp:{HOST}:0", "--udp-rate", "off"),
         missing=_modules("sockworks", "uvloop")),
    Peer("uvloop-udp-echo", "raw uvloop datagram endpoint echo",
         _script("uvloop_raw.py", "udp-echo"), missing=_modules("uvloop")),
)
# In every server's answer: the file's first line.
GOPHER_EXPECT = GOPHER_LINE.format(0).encode().rstrip()
GOPHER = (
    Peer("sockworks-gopher", "sockworks serve gopher --root DIR -q",
         lambda ctx, port: [sys.executable, "-m", "sockworks", "serve", "gopher", "-q",
                            "--root", str(ctx.work / "gopher"), "-l", f"tcp:{HOST}:0"],
         request=f"/{GOPHER_FILE}", expect=GOPHER_EXPECT,
         missing=_modules("sockworks", "uvloop")),
    Peer("nginx-http", "nginx, 1 worker, access log off, HTTP/1.0 GET", nginx_argv,
         own_port=True, request=f"GET /{GOPHER_FILE} HTTP/1.0\r\n", expect=GOPHER_EXPECT,
         missing=_programs("nginx")),
    Peer("gophernicus-tcpserver", "Gophernicus per connection under tcpserver",
         gophernicus_argv, own_port=True, request=f"/{GOPHER_FILE}", expect=GOPHER_EXPECT,
         children_cpu=True,
         missing=_programs("gophernicus", "tcpserver")),
)


def _echo_peer(name: str) -> Peer:
    c = next(c for c in echo_bench.CONTENDERS if c.name == name)
    return Peer(name, c.what, lambda ctx, port: [*c.command(ctx.tools), "--port", "0"],
                missing=c.missing)


ECHO = tuple(_echo_peer(n) for n in (
    "sockworks-protocol", "uvloop-protocol", "sockworks-blocking", "socketserver"))
IDLE = (
    # Thousands of connections from four addresses: the connection limit is
    # raised and the per-source limit (64 by default) turned off.
    Peer("sockworks-echo-idle",
         "sockworks serve echo -q (sans-I/O), --max-conns raised, --per-source 0",
         lambda ctx, port: [sys.executable, "-m", "sockworks", "serve", "echo", "-q",
                            "-l", f"tcp:{HOST}:0",
                            "--max-conns", str(ctx.args.idle_conns + 64),
                            "--per-source", "0"],
         missing=_modules("sockworks", "uvloop")),
    Peer("uvloop-echo-idle", "raw uvloop asyncio.Protocol echo",
         _script("asyncio_echo.py", "uvloop-protocol"), missing=_modules("uvloop")),
)

PATHS: dict[str, tuple[str, tuple[Peer, ...]]] = {
    "connect": ("new connections per second (thanks)", CONNECT),
    "udp": ("UDP echo, rate limit off, amplification guard on", UDP),
    "gopher": ("a 2 KB text file per connection", GOPHER),
    "echo": ("TCP echo, 10 connections", ECHO),
    "idle": ("server memory per idle connection", IDLE),
}

TARGETS = (
    Target("connect", "sockworks-thanks", "uvloop-thanks", 0.8),
    Target("udp", "sockworks-udp-echo", "uvloop-udp-echo", 0.8),
    Target("gopher", "sockworks-gopher", "nginx-http", 0.5),
    Target("gopher", "sockworks-gopher", "gophernicus-tcpserver", 10.0),
    Target("echo", "sockworks-protocol", "uvloop-protocol", 1.0),
    Target("echo", "sockworks-blocking", "socketserver", 1.0),
    Target("idle", "sockworks-echo-idle", "uvloop-echo-idle", 1.5, at_most=True),
)


def loads(path: str, args: argparse.Namespace) -> list[str]:
    if path == "connect":
        return [f"{args.procs} procs"]
    if path == "udp":
        return [f"{size_label(args.udp_size)} x{args.udp_sockets}"]
    if path == "gopher":
        return [f"2 KB file, {args.procs} procs"]
    if path == "echo":
        return [f"{size_label(s)} x{ECHO_CONNS}" for s in ECHO_SIZES]
    return [f"{args.idle_conns} conns"]


# -- loads -----------------------------------------------------------------------


def run_tool(
    ctx: Context, argv: list[str], pattern: re.Pattern[str], seconds: float,
    server: RunningServer, children: bool,
) -> Sample:
    """Run a C load generator pinned to the load CPU; the rate it prints
    and the server's CPU time per operation meanwhile."""
    before = cpu_seconds(server.pid, children)
    proc = subprocess.run(pinned(ctx.load_cpu, argv), capture_output=True, text=True,
                          timeout=seconds + 30)
    after = cpu_seconds(server.pid, children)
    match = pattern.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise HarnessError(f"{Path(argv[0]).name} failed ({proc.returncode}): "
                           f"{proc.stdout}{proc.stderr}".strip())
    sample = Sample(float(match.group("rate")), int(match.group("errors")))
    if before is not None and after is not None and sample.rate:
        sample.cpu_us = (after - before) / (sample.rate * seconds) * 1e6
    return sample


def measure(ctx: Context, path: str, peer: Peer, server: RunningServer, load: int,
            seconds: float) -> Sample:
    """One measurement of one contender; ``load`` indexes ``loads(path)``."""
    args, tools, port = ctx.args, ctx.tools, str(server.port)
    if path in ("connect", "gopher"):
        argv = [str(tools / "connload"), HOST, port, str(args.procs), f"{seconds:g}"]
        if peer.request is not None:
            argv.append(peer.request)
        return run_tool(ctx, argv, CPS, seconds, server, peer.children_cpu)
    if path == "udp":
        argv = [str(tools / "udpload"), HOST, port, str(args.udp_sockets),
                str(args.udp_size), f"{seconds:g}"]
        return run_tool(ctx, argv, DPS, seconds, server, peer.children_cpu)
    r = echo_bench.run_load(tools, server.port, (ECHO_SIZES[load], ECHO_CONNS), seconds,
                            ctx.load_cpu, server.pid)
    return Sample(r.rps, r.errors, r.cpu_us, {"p50_us": r.p50_us, "p99_us": r.p99_us})


def probe(path: str, peer: Peer, port: int) -> None:
    """One request as the load sends it; the response must hold what the
    peer is expected to serve (a misconfigured peer is not measured)."""
    if path == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.connect((HOST, port))
            for _ in range(5):
                s.send(b"probe")
                try:
                    if s.recv(65536) == b"probe":
                        return
                except (TimeoutError, ConnectionRefusedError):
                    pass
        raise HarnessError(f"{peer.name} did not echo a datagram in 5 tries")
    if peer.expect is None:
        return
    with socket.create_connection((HOST, port), timeout=10) as s:
        if peer.request is not None:
            s.sendall(peer.request.encode() + b"\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    if peer.expect not in got:
        raise HarnessError(f"{peer.name} answered {len(got)} bytes without the expected "
                           f"content: {got[:120]!r}")


# -- running a path ----------------------------------------------------------------


def start(ctx: Context, peer: Peer, preexec: Callable[[], None] | None = None) -> RunningServer:
    port = free_port() if peer.own_port else None
    server = RunningServer(peer.name, peer.argv(ctx, port), ctx.server_cpu, ctx.work,
                           port=port, preexec_fn=preexec)
    server.wait_ready()
    return server


def first_line(exc: BaseException) -> str:
    """An error in one line: its first, and its last (a server that did not
    start: the exception it ended with)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"


def not_measured(out: Outcome, peer: Peer, exc: BaseException) -> None:
    """Record why a contender was not measured; print its whole story now."""
    out.failed[peer.name] = first_line(exc)
    print(f"  {peer.name}: not measured:", flush=True)
    for line in str(exc).strip().splitlines()[-12:]:
        print(f"    | {line}", flush=True)


def run_rate_path(ctx: Context, path: str, peers: Sequence[Peer], out: Outcome) -> None:
    args, labels = ctx.args, loads(path, ctx.args)
    servers: dict[str, tuple[Peer, RunningServer]] = {}
    try:
        for peer in peers:
            server = None
            try:
                server = start(ctx, peer)
                probe(path, peer, server.port)
            except (HarnessError, OSError) as exc:
                if server is not None:
                    server.stop()
                not_measured(out, peer, exc)
                continue
            servers[peer.name] = (peer, server)
            if args.warmup > 0:
                try:
                    measure(ctx, path, peer, server, 0, args.warmup)
                except (HarnessError, subprocess.TimeoutExpired):
                    pass  # the measurement proper reports it
        for round_no in range(args.rounds):
            for i, label in enumerate(labels):
                order = list(servers.values())
                # Every other round in reverse order: a drift in the
                # machine's load favours no one.
                for peer, server in order if round_no % 2 == 0 else reversed(order):
                    if peer.name in out.failed:
                        continue
                    if not server.alive():
                        out.failed[peer.name] = "the server exited: " + " / ".join(
                            server.lines[-3:])
                        continue
                    try:
                        s = measure(ctx, path, peer, server, i, args.duration)
                    except (HarnessError, subprocess.TimeoutExpired) as exc:
                        not_measured(out, peer, exc)
                        continue
                    out.samples.setdefault(peer.name, {}).setdefault(label, {})[round_no] = s
                    print(f"  {peer.name:24} {label:16} {rps_label(s.rate):>8}/s "
                          f"cpu={s.cpu_us:.1f}us/op errors={s.errors}", flush=True)
    finally:
        for _, server in servers.values():
            server.stop()


def raise_nofile(want: int) -> int:
    """Raise this process's open-file limit to ``want`` (the hard limit too
    when we may); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    for new in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
        except (ValueError, OSError):
            continue
    return soft


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise HarnessError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connected sockets that send nothing, spread over the
    loopback source addresses (ports chosen at connect time, per address)."""
    no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
    conns = []
    try:
        for i in range(count):
            s = socket.socket()
            conns.append(s)
            s.setsockopt(socket.IPPROTO_IP, no_port, 1)
            s.bind((IDLE_SOURCES[i % len(IDLE_SOURCES)], 0))
            s.connect((HOST, port))
    except OSError:
        close_all(conns)
        raise
    return conns


def close_all(conns: list[socket.socket]) -> None:
    for s in conns:
        # Reset, not FIN: no TIME_WAIT left to hold ports for the next round.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()


def measure_idle(ctx: Context, peer: Peer, count: int) -> Sample:
    """A fresh server; its VmRSS once warm, then with ``count`` idle
    connections accepted (its open descriptors tell when)."""
    def preexec() -> None:
        raise_nofile(count + 1024)

    server = start(ctx, peer, preexec=preexec)
    try:
        for _ in range(16):  # warm: whatever a first connection allocates once
            with socket.create_connection((HOST, server.port), timeout=5) as s:
                s.sendall(b"x")
                s.recv(16)
        time.sleep(0.3)
        rss0, fds0 = vm_rss(server.pid), open_fds(server.pid)
        started = time.monotonic()
        conns = idle_connections(server.port, count)
        try:
            deadline = time.monotonic() + 30 + count / 1000
            while (accepted := open_fds(server.pid) - fds0) < count:
                if time.monotonic() > deadline or not server.alive():
                    raise HarnessError(f"{peer.name} accepted {accepted} of {count} "
                                       "connections: " + " / ".join(server.lines[-3:]))
                time.sleep(0.05)
            opened = time.monotonic() - started
            time.sleep(0.5)
            rss1 = vm_rss(server.pid)
        finally:
            close_all(conns)
    finally:
        server.stop()
    return Sample((rss1 - rss0) / count, extra={
        "rss_before_kib": rss0 / 1024, "rss_after_kib": rss1 / 1024, "open_seconds": opened})


def run_idle_path(ctx: Context, peers: Sequence[Peer], out: Outcome) -> None:
    count = ctx.args.idle_conns
    have = raise_nofile(count + 256)
    if have < count + 256:
        for peer in peers:
            out.failed[peer.name] = (f"the open-file limit is {have}: too low for {count} "
                                     "connections (run as root, or lower --idle-conns)")
        return
    label = loads("idle", ctx.args)[0]
    for round_no in range(ctx.args.rounds):
        order = list(peers) if round_no % 2 == 0 else list(reversed(peers))
        for peer in order:
            if peer.name in out.failed:
                continue
            try:
                s = measure_idle(ctx, peer, count)
            except (HarnessError, OSError) as exc:
                not_measured(out, peer, exc)
                continue
            out.samples.setdefault(peer.name, {}).setdefault(label, {})[round_no] = s
            print(f"  {peer.name:24} {label:16} {s.rate:8.0f} B/conn "
                  f"(VmRSS {s.extra['rss_before_kib']:.0f} -> {s.extra['rss_after_kib']:.0f}"
                  f" KiB; open in {s.extra['open_seconds']:.1f} s)", flush=True)


def make_gopher_root(work: Path) -> None:
    """The 2 KB text file every gopher-path server serves."""
    root = work / "gopher"
    root.mkdir(exist_ok=True)
    text = "".join(GOPHER_LINE.format(i) for i in range(40))
    (root / GOPHER_FILE).write_text(text[:2047] + "\n")


# -- reporting -------------------------------------------------------------------


def summarise(samples: Samples) -> dict[str, dict[str, Sample]]:
    """Per contender and load: the median rate and the median CPU time."""
    out: dict[str, dict[str, Sample]] = {}
    for name, by_load in samples.items():
        for label, by_round in by_load.items():
            runs = list(by_round.values())
            cpus = [r.cpu_us for r in runs if r.cpu_us]
            out.setdefault(name, {})[label] = Sample(
                median([r.rate for r in runs]), sum(r.errors for r in runs),
                median(cpus) if cpus else 0.0)
    return out


def path_report(path: str, args: argparse.Namespace, peers: Sequence[Peer],
                out: Outcome) -> str:
    labels, results = loads(path, args), summarise(out.samples)
    shown = [p for p in peers if results.get(p.name)]
    lines = [f"== {path}: {PATHS[path][0]} =="]
    if shown and path == "idle":
        lines += ["", f"Server memory per idle connection, bytes (VmRSS growth / connections;"
                  f" median of {args.rounds} round(s)):", "",
                  table(["contender", *labels], [
                      [p.name, *(f"{results[p.name][x].rate:.0f}" if x in results[p.name]
                                 else "-" for x in labels)] for p in shown])]
    elif shown:
        unit = {"connect": "connections/s", "udp": "datagrams/s", "gopher": "files/s",
                "echo": "round trips/s"}[path]
        lines += ["", f"Rate, {unit} (median of {args.rounds} round(s)), and server CPU time "
                  "per operation, µs:", "",
                  table(["contender", *(f"{x}" for x in labels),
                         *(f"cpu µs {x}" if len(labels) > 1 else "cpu µs/op" for x in labels),
                         "lost" if path == "udp" else "errors"],
                        [[p.name + (" (info)" if p.informational else ""),
                          *(rps_label(results[p.name][x].rate) if x in results[p.name]
                            else "-" for x in labels),
                          *(f"{results[p.name][x].cpu_us:.1f}"
                            if x in results[p.name] and results[p.name][x].cpu_us else "-"
                            for x in labels),
                          str(sum(r.errors for r in results[p.name].values()))]
                         for p in shown])]
    for name, why in out.skipped.items():
        lines.append(f"{name}: skipped: {why}")
    for name, why in out.failed.items():
        lines.append(f"{name}: not measured: {why}")
    return "\n".join(lines) + "\n"


def rate_ratio(a: Sample, b: Sample) -> float | None:
    return a.rate / b.rate if b.rate else None


def cpu_ratio(a: Sample, b: Sample) -> float | None:
    return b.cpu_us / a.cpu_us if a.cpu_us and b.cpu_us else None


def target_rows(
    args: argparse.Namespace, outcomes: dict[str, Outcome]
) -> tuple[list[list[str]], list[dict[str, object]], bool]:
    rows: list[list[str]] = []
    records: list[dict[str, object]] = []
    all_pass = True
    for t in TARGETS:
        if t.path not in outcomes:
            continue
        out = outcomes[t.path]
        for label in loads(t.path, args):
            ratio = paired(out.samples, t.contender, t.baseline, label, rate_ratio)
            cpu = (None if t.at_most
                   else paired(out.samples, t.contender, t.baseline, label, cpu_ratio))
            if ratio is None:
                absent = [n for n in (t.contender, t.baseline) if n not in out.samples]
                why = "; ".join(f"{n} {'skipped' if n in out.skipped else 'not measured'}"
                                for n in absent)
                verdict = f"n/a ({why})" if why else "n/a"
            elif ratio <= t.bound if t.at_most else ratio >= t.bound:
                verdict = "PASS"
            else:
                verdict, all_pass = "MISS", False
            rows.append([t.path, t.text(), label, "-" if ratio is None else f"{ratio:.2f}",
                         "-" if cpu is None else f"{cpu:.2f}", verdict])
            records.append({"path": t.path, "contender": t.contender, "baseline": t.baseline,
                            "load": label, "bound": t.bound,
                            "kind": "at most" if t.at_most else "at least",
                            "ratio": ratio, "cpu_ratio": cpu, "result": verdict})
    return rows, records, all_pass


# -- main --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Every path of the connection engine against its peer, pinned, in one run.")
    p.add_argument("--only", help=f"comma-separated paths to run (of: {', '.join(PATHS)})")
    p.add_argument("--skip", help="comma-separated contenders to leave out (see --list)")
    p.add_argument("--rounds", type=int,
                   help="measure every contender this many times, interleaved (default 5)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 1.0)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server (default 0.3)")
    p.add_argument("--procs", type=int, default=4,
                   help="connload processes for connect and gopher (default 4)")
    p.add_argument("--udp-sockets", type=int, default=10, help="udpload sockets (default 10)")
    p.add_argument("--udp-size", type=int, default=100, help="datagram size (default 100)")
    p.add_argument("--idle-conns", type=int,
                   help="idle connections for the memory path (default 10000)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 0.3 s, no warm-up, 500 idle connections"
                   " (options given explicitly still apply)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--nice", type=int, default=0,
                   help="run servers and load at this nice value (negative needs root)")
    p.add_argument("--bench-src", help="directory with echoload.c, connload.c, udpload.c")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--list", action="store_true", help="list paths and contenders, and exit")
    args = p.parse_args(argv)
    defaults = {"rounds": 5, "duration": 1.0, "warmup": 0.3, "idle_conns": 10_000}
    if args.quick:
        defaults = {"rounds": 1, "duration": 0.3, "warmup": 0.0, "idle_conns": 500}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    known = set(PATHS)
    args.paths = [n.strip() for n in args.only.split(",")] if args.only else list(PATHS)
    if unknown := set(args.paths) - known:
        p.error(f"unknown path(s): {', '.join(sorted(unknown))} (of: {', '.join(PATHS)})")
    names = {peer.name for _, peers in PATHS.values() for peer in peers}
    args.skip_names = {n.strip() for n in args.skip.split(",")} if args.skip else set()
    if unknown := args.skip_names - names:
        p.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for path, (what, peers) in PATHS.items():
            print(f"{path}: {what}")
            for peer in peers:
                why = peer.missing()
                print(f"  {peer.name:24} {peer.what}" + (f"  [skipped: {why}]" if why else ""))
        return 0
    try:
        return run(args)
    except HarnessError as exc:
        print(f"paths_bench: {exc}", file=sys.stderr)
        return 2


def estimate(args: argparse.Namespace) -> float:
    total = 0.0
    for path in args.paths:
        peers = len(PATHS[path][1])
        if path == "idle":
            total += peers * args.rounds * (2.0 + args.idle_conns / 5000)
        else:
            total += peers * (1.0 + args.warmup
                              + len(loads(path, args)) * args.rounds * (args.duration + 0.2))
    return total


def run(args: argparse.Namespace) -> int:
    server_cpu, load_cpu = choose_cpus(args.no_pin, args.server_cpu, args.load_cpu)
    set_priority(args.nice)
    print(f"machine: {machine_summary()}")
    print(f"paths: {', '.join(args.paths)}; {args.rounds} round(s) of {args.duration:g} s; "
          f"about {estimate(args):.0f} s. Servers on CPU {server_cpu}, load on CPU "
          f"{load_cpu}; nice {args.nice}.", flush=True)
    outcomes: dict[str, Outcome] = {}
    reports: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sockworks-paths-") as tmp:
        work = Path(tmp)
        tools = work / "tools"
        tools.mkdir()
        build_tools(find_bench_sources(args.bench_src, [f"{t}.c" for t in TOOLS]), tools, TOOLS)
        make_gopher_root(work)
        ctx = Context(tools, work, args, server_cpu, load_cpu)
        for path in args.paths:
            _, peers = PATHS[path]
            out = outcomes[path] = Outcome()
            runnable = []
            for peer in peers:
                why = "left out (--skip)" if peer.name in args.skip_names else peer.missing()
                if why:
                    out.skipped[peer.name] = why
                    print(f"  {peer.name}: skipped: {why}", flush=True)
                else:
                    runnable.append(peer)
            print(f"{path}: {PATHS[path][0]}", flush=True)
            if path == "idle":
                run_idle_path(ctx, runnable, out)
            else:
                run_rate_path(ctx, path, runnable, out)
            reports.append(path_report(path, args, peers, out))

    rows, records, all_pass = target_rows(args, outcomes)
    print()
    print("\n".join(reports))
    print("Targets (same-run ratios: the median over rounds of the ratio within each round;"
          " idle: memory, lower is better). CPU ratio: the baseline's server CPU per operation"
          " / the contender's, a cross-check, not the target.")
    print()
    print(table(["path", "target", "load", "ratio", "cpu ratio", "result"], rows, left=3))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_summary(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rounds": args.rounds,
            "duration": args.duration,
            "options": {"procs": args.procs, "udp_sockets": args.udp_sockets,
                        "udp_size": args.udp_size, "idle_conns": args.idle_conns,
                        "server_cpu": server_cpu, "load_cpu": load_cpu, "nice": args.nice},
            "paths": {
                path: {
                    "results": {name: {label: dataclasses.asdict(s) for label, s in got.items()}
                                for name, got in summarise(out.samples).items()},
                    "rounds_detail": {
                        name: {label: [dataclasses.asdict(by_round[k]) for k in sorted(by_round)]
                               for label, by_round in got.items()}
                        for name, got in out.samples.items()},
                    "failed": out.failed,
                    "skipped": out.skipped,
                }
                for path, out in outcomes.items()
            },
            "targets": records,
        }, indent=2))
    return 1 if args.strict and not all_pass else 0


if __name__ == "__main__":
    sys.exit(main())
