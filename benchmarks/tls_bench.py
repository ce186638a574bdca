"""TLS on a sockworks listener against a raw uvloop Protocol with the same
``ssl.SSLContext`` settings, in one run.

Loads (``--only echo,handshake``):

- ``echo``: requests per second over a few long-lived TLS connections,
  ping-pong (each connection sends a request, reads the whole echo, sends
  the next), at 100 B and 16 KiB: ``--procs`` load processes with
  ``--conns`` connections each (default 2 x 2).
- ``handshake``: TLS handshakes per second: each load process in a loop
  opens a new connection, does a full handshake (no session resumption),
  sends 100 B, reads them back and closes (default 4 processes).

Contenders: ``sockworks serve echo -q -l tls:…`` and
``servers/uvloop_tls.py`` (uvloop ``loop.create_server(..., ssl=ctx)``, the
context built as ``sockworks._tls.server_context`` builds it: the same
certificate and key, TLS 1.2+, the same ciphers). Before measuring, a probe
checks that both negotiate the same version and cipher. The certificate is
a trustme ECDSA P-256 chain. The load is ``tlsload.c`` (C and OpenSSL,
compiled on the fly; ``--load python``: the same loop in Python) in
processes that set up, report ready, and start together; certificates are
not verified, the client's work is not what is measured, and a C client
leaves the server, not the one load CPU, the bottleneck.

Servers run under ``taskset -c 0``, load processes under ``taskset -c 1``.
Each round measures every contender on every load, in reverse order every
other round; a target is the median over rounds of the ratio within one
round (both >= 0.9). The server's CPU time per operation (from /proc) is a
cross-check: when the one load CPU is the bottleneck, rates converge and
the CPU ratio still tells the servers apart.

    python benchmarks/tls_bench.py                 # ~1 minute
    python benchmarks/tls_bench.py --quick         # a smoke run, seconds
    python benchmarks/tls_bench.py --only handshake --rounds 9 --json out.json

Exits 0 whether targets are met or missed (``--strict``: 1 on a MISS).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    HERE,
    HOST,
    SERVERS,
    HarnessError,
    RunningServer,
    choose_cpus,
    cpu_seconds,
    machine_summary,
    median,
    paired,
    pinned,
    rps_label,
    set_priority,
    size_label,
    table,
)

READY = re.compile(r"listening on tls:(?:\[[^\]]*\]|[^:\s]+):(\d+)")
ECHO_SIZES = (100, 16384)
HANDSHAKE_PAYLOAD = 100
RESULT = re.compile(r"ops=(?P<ops>\d+) errors=(?P<errors>\d+) seconds=(?P<seconds>[\d.]+)")


class TLSServer(RunningServer):
    """A server whose ready line names a ``tls:`` endpoint."""

    def _ready_line(self) -> int | None:
        try:
            with open(self.log_path, "rb") as f:
                head = f.read(65536).decode(errors="replace")
        except OSError:
            return None
        match = READY.search(head)
        return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    what: str
    argv: Callable[[Path], list[str]]  # given the certificate chain


def _missing(*modules: str) -> str | None:
    for name in modules:
        if importlib.util.find_spec(name) is None:
            return f"{name} not installed"
    return None


CONTENDERS = (
    Contender("sockworks-tls", "sockworks serve echo -q -l tls:… --cert CHAIN",
              lambda chain: [sys.executable, "-m", "sockworks", "serve", "echo", "-q",
                             "-l", f"tls:{HOST}:0", "--cert", str(chain)]),
    Contender("uvloop-tls", "raw uvloop asyncio.Protocol echo, create_server(ssl=ctx)",
              lambda chain: [sys.executable, str(SERVERS / "uvloop_tls.py"),
                             "--cert", str(chain)]),
)
TARGETS = (("sockworks-tls", "uvloop-tls", 0.9),)


@dataclasses.dataclass
class Sample:
    rate: float
    errors: int = 0
    cpu_us: float = 0.0


# contender -> load label -> round -> sample
Samples = dict[str, dict[str, dict[int, Sample]]]


def loads(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(label, kind, size) for every load to run."""
    out = []
    if "echo" in args.loads:
        n = args.procs * args.conns
        out += [(f"echo {size_label(s)} x{n}", "echo", s) for s in ECHO_SIZES]
    if "handshake" in args.loads:
        out.append((f"handshake x{args.hs_procs}", "handshake", HANDSHAKE_PAYLOAD))
    return out


# -- the load: worker processes ------------------------------------------------------


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    # The server is measured, not the client: no chain or name to verify.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def recv_exactly(sock: ssl.SSLSocket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("closed mid-answer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def worker(kind: str, port: int, size: int, conns: int, seconds: float) -> int:
    """One load process: set up, say ``ready``, wait for ``go`` on stdin,
    run for ``seconds``, print ``ops=… errors=… seconds=…``."""
    context = client_context()
    payload = bytes(i % 251 for i in range(size))
    socks: list[ssl.SSLSocket] = []
    if kind == "echo":
        for _ in range(conns):
            raw = socket.create_connection((HOST, port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(context.wrap_socket(raw))
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    ops = errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    if kind == "echo":
        while time.perf_counter() < deadline:
            for s in socks:  # every connection has one request in flight
                s.sendall(payload)
            for s in socks:
                if recv_exactly(s, size) == payload:
                    ops += 1
                else:
                    errors += 1
    else:
        while time.perf_counter() < deadline:
            try:
                raw = socket.create_connection((HOST, port))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with context.wrap_socket(raw) as s:
                    s.sendall(payload)
                    if recv_exactly(s, size) == payload:
                        ops += 1
                    else:
                        errors += 1
            except OSError:
                errors += 1
    elapsed = time.perf_counter() - start
    for s in socks:
        s.close()
    print(f"ops={ops} errors={errors} seconds={elapsed:.4f}", flush=True)
    return 0


def build_load(work: Path) -> Path | None:
    """``tlsload.c`` compiled into ``work``; None (with a note) when it
    cannot be: the Python load is used then."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        print("note: no C compiler: the Python load is used", file=sys.stderr)
        return None
    binary = work / "tlsload"
    proc = subprocess.run([gcc, "-O2", "-o", str(binary), str(HERE / "tlsload.c"),
                           "-lssl", "-lcrypto"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"note: cannot build tlsload.c (libssl-dev?): the Python load is used\n"
              f"{proc.stderr.strip()}", file=sys.stderr)
        return None
    return binary


def run_load(args: argparse.Namespace, load_cpu: int | None, server: RunningServer,
             kind: str, size: int, seconds: float) -> Sample:
    procs = args.procs if kind == "echo" else args.hs_procs
    if args.tool is not None:
        argv = [str(args.tool), kind, HOST, str(server.port), str(size), str(args.conns),
                f"{seconds:g}"]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                str(server.port), str(size), str(args.conns), f"{seconds:g}"]
    workers = [subprocess.Popen(pinned(load_cpu, argv), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(procs)]
    try:
        for w in workers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "ready":
                w.wait(10)
                raise HarnessError(f"a load process did not start: {w.stderr.read()}"  # type: ignore[union-attr]
                                   .strip())
        before = cpu_seconds(server.pid)
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        ops = errors = 0
        elapsed = []
        for w in workers:
            out, err = w.communicate(timeout=seconds + 30)
            match = RESULT.search(out)
            if w.returncode != 0 or match is None:
                raise HarnessError(f"a load process failed ({w.returncode}): {out}{err}".strip())
            ops += int(match.group("ops"))
            errors += int(match.group("errors"))
            elapsed.append(float(match.group("seconds")))
        after = cpu_seconds(server.pid)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    span = max(elapsed)
    sample = Sample(ops / span if span else 0.0, errors)
    if before is not None and after is not None and ops:
        sample.cpu_us = (after - before) / ops * 1e6
    return sample


# -- servers ---------------------------------------------------------------------------


def probe(port: int) -> tuple[str, str]:
    """One echo over TLS; the version and cipher negotiated."""
    context = client_context()
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            context.wrap_socket(raw) as sock:
        sock.sendall(b"probe")
        if recv_exactly(sock, 5) != b"probe":
            raise HarnessError("the probe was not echoed")
        version, cipher = sock.version(), sock.cipher()
    return str(version), str(cipher[0] if cipher else "?")


def make_certificate(work: Path) -> Path:
    try:
        import trustme
    except ImportError:
        raise HarnessError("trustme is not installed (pip install trustme): it makes the "
                           "benchmark's certificate") from None
    chain = work / "server.pem"
    trustme.CA().issue_cert(HOST, "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(chain))
    return chain


def run(args: argparse.Namespace) -> int:
    server_cpu, load_cpu = choose_cpus(args.no_pin, args.server_cpu, args.load_cpu)
    set_priority(args.nice)
    labels = loads(args)
    print(f"machine: {machine_summary()}; {ssl.OPENSSL_VERSION}")
    print(f"loads: {', '.join(label for label, _, _ in labels)}; {args.rounds} round(s) of "
          f"{args.duration:g} s. Servers on CPU {server_cpu}, load on CPU {load_cpu}.",
          flush=True)
    samples: Samples = {}
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    negotiated: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="sockworks-tls-") as tmp:
        work = Path(tmp)
        chain = make_certificate(work)
        args.tool = build_load(work) if args.load == "c" else None
        print(f"load: {'tlsload (C, OpenSSL)' if args.tool else 'Python ssl'}", flush=True)
        servers: dict[str, TLSServer] = {}
        try:
            for c in CONTENDERS:
                why = _missing("sockworks", "uvloop")
                if why or c.name in args.skip_names:
                    skipped[c.name] = why or "left out (--skip)"
                    continue
                server = TLSServer(c.name, c.argv(chain), server_cpu, work)
                servers[c.name] = server
                try:
                    server.wait_ready()
                    negotiated[c.name] = probe(server.port)
                except (HarnessError, OSError) as exc:
                    failed[c.name] = str(exc).strip().splitlines()[0]
                    print(f"  {c.name}: not measured: {exc}", flush=True)
                    server.stop()
                    del servers[c.name]
            if len(set(negotiated.values())) > 1:
                raise HarnessError(f"the servers negotiate differently: {negotiated}")
            for name, (version, cipher) in negotiated.items():
                print(f"  {name}: {version} {cipher}", flush=True)
            if args.warmup > 0:
                for server in servers.values():
                    for _, kind, size in labels:
                        run_load(args, load_cpu, server, kind, size, args.warmup)
            for round_no in range(args.rounds):
                for label, kind, size in labels:
                    order = list(servers.items())
                    for name, server in order if round_no % 2 == 0 else reversed(order):
                        if name in failed:
                            continue
                        if not server.alive():
                            failed[name] = "the server exited: " + " / ".join(server.lines[-3:])
                            continue
                        try:
                            s = run_load(args, load_cpu, server, kind, size, args.duration)
                        except (HarnessError, subprocess.TimeoutExpired) as exc:
                            failed[name] = str(exc).strip().splitlines()[0]
                            print(f"  {name}: not measured: {exc}", flush=True)
                            continue
                        samples.setdefault(name, {}).setdefault(label, {})[round_no] = s
                        print(f"  {name:14} {label:22} {rps_label(s.rate):>8}/s "
                              f"cpu={s.cpu_us:.1f}us/op errors={s.errors}", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    names = [c.name for c in CONTENDERS if c.name in samples]
    results = {n: {label: Sample(median([r.rate for r in by.values()]),
                                 sum(r.errors for r in by.values()),
                                 median([r.cpu_us for r in by.values()]))
                   for label, by in samples[n].items()} for n in names}
    print()
    print(f"Rate, operations/s (median of {args.rounds} round(s)), and server CPU time per "
          "operation, µs (echo: a request and its answer; handshake: a whole connection):")
    print()
    label_names = [label for label, _, _ in labels]
    print(table(["contender", *label_names, *(f"cpu µs {x}" for x in label_names), "errors"],
                [[n, *(rps_label(results[n][x].rate) if x in results[n] else "-"
                       for x in label_names),
                  *(f"{results[n][x].cpu_us:.1f}" if x in results[n] else "-"
                    for x in label_names),
                  str(sum(s.errors for s in results[n].values()))] for n in names]))
    rows, records, all_pass = [], [], True
    for contender, baseline, bound in TARGETS:
        for label in label_names:
            ratio = paired(samples, contender, baseline, label,
                           lambda a, b: a.rate / b.rate if b.rate else None)
            cpu = paired(samples, contender, baseline, label,
                         lambda a, b: b.cpu_us / a.cpu_us if a.cpu_us and b.cpu_us else None)
            if ratio is None:
                verdict = "n/a"
            elif ratio >= bound:
                verdict = "PASS"
            else:
                verdict, all_pass = "MISS", False
            rows.append([f"{contender} / {baseline} >= {bound:g}", label,
                         "-" if ratio is None else f"{ratio:.2f}",
                         "-" if cpu is None else f"{cpu:.2f}", verdict])
            records.append({"contender": contender, "baseline": baseline, "load": label,
                            "bound": bound, "ratio": ratio, "cpu_ratio": cpu,
                            "result": verdict})
    print()
    print("Targets (same-run ratios: the median over rounds of the ratio within each round). "
          "CPU ratio: the baseline's server CPU per operation / the contender's, a "
          "cross-check, not the target.")
    print()
    print(table(["target", "load", "ratio", "cpu ratio", "result"], rows, left=2))
    for name, why in {**skipped, **failed}.items():
        print(f"{name}: {'skipped' if name in skipped else 'not measured'}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_summary(),
            "openssl": ssl.OPENSSL_VERSION,
            "negotiated": {n: list(v) for n, v in negotiated.items()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rounds": args.rounds,
            "duration": args.duration,
            "load": "c" if args.tool else "python",
            "options": {"procs": args.procs, "conns": args.conns, "hs_procs": args.hs_procs,
                        "server_cpu": server_cpu, "load_cpu": load_cpu},
            "results": {n: {x: dataclasses.asdict(s) for x, s in r.items()}
                        for n, r in results.items()},
            "rounds_detail": {n: {x: [dataclasses.asdict(by[k]) for k in sorted(by)]
                                  for x, by in samples[n].items()} for n in names},
            "failed": failed,
            "skipped": skipped,
            "targets": records,
        }, indent=2))
    return 1 if args.strict and not all_pass else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="TLS echo and handshakes: sockworks against a raw uvloop Protocol with "
                    "the same SSLContext, pinned, in one run.")
    p.add_argument("--only", help="comma-separated loads: echo, handshake (default both)")
    p.add_argument("--skip", help="a contender to leave out (sockworks-tls, uvloop-tls)")
    p.add_argument("--rounds", type=int, help="rounds, interleaved (default 7)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 1.0)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per server and load "
                   "(default 0.3)")
    p.add_argument("--procs", type=int, default=2, help="echo: load processes (default 2)")
    p.add_argument("--conns", type=int, default=2,
                   help="echo: connections per load process (default 2)")
    p.add_argument("--hs-procs", type=int, default=4,
                   help="handshake: load processes (default 4)")
    p.add_argument("--load", choices=("c", "python"), default="c",
                   help="the load generator: tlsload.c (default) or Python ssl sockets")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 0.3 s, no warm-up")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--nice", type=int, default=0, help="run servers and load at this nice value")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    defaults = {"rounds": 7, "duration": 1.0, "warmup": 0.3}
    if args.quick:
        defaults = {"rounds": 1, "duration": 0.3, "warmup": 0.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.loads = [x.strip() for x in args.only.split(",")] if args.only else ["echo", "handshake"]
    if unknown := set(args.loads) - {"echo", "handshake"}:
        p.error(f"unknown load(s): {', '.join(sorted(unknown))} (of: echo, handshake)")
    args.skip_names = {x.strip() for x in args.skip.split(",")} if args.skip else set()
    if unknown := args.skip_names - {c.name for c in CONTENDERS}:
        p.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        kind, port, size, conns, seconds = argv[1:6]
        return worker(kind, int(port), int(size), int(conns), float(seconds))
    args = parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"tls_bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
