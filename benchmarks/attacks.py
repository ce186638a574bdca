"""Issue 9's attack list, run as one script against the real CLI.

Every attack runs ``python -m sockworks serve ...`` (or ``listen --tls
-k``) on a port the kernel picks, from attacker addresses 127.0.0.2,
127.0.0.3 ... (each client socket is bound to its source before it
connects), while a well-behaved client on 127.0.0.9 - the bystander -
makes one normal request now and then and is timed from ``connect()`` to
its complete answer. One table comes out: what was measured (connections
held, bytes lost, the bystander's worst wait, RSS growth from
/proc/PID/status, log bytes, exit status for config errors), the defence,
and PASS or FAIL against the bounds:

* a bystander is served within 100 ms in every attack (the issue's
  "bystanders first");
* no traceback in any server log, no byte the server accepted lost;
* memory and descriptors bounded, every held connection cut off on time.

The servers run with short timeouts (``--timeout 2 --request-timeout 1``,
``--handshake-timeout 1``) so the run takes about a minute and a half;
the output says which settings each attack used. Loopback only; every loop
is bounded in count and in time; the run stops by itself.

Run: ``.venv/bin/python benchmarks/attacks.py`` (``--quick`` for a
reduced set in a few seconds, ``--only NAME,...`` for some attacks,
``--json FILE`` for the figures, ``--strict`` to exit 1 when a bound
fails). The table is what docs/reliability.md shows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import re
import resource
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1 << 20

BYSTANDER = "127.0.0.9"
# Attackers: 127.0.0.2 ... 127.0.0.40, never the bystander's address.
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 41) if i != 9]
BYSTANDER_BOUND_MS = 100.0  # the issue's "bystanders first"
SEARCH_BOUND_MS = 50.0  # issue 9, item 2: a small file beside ten searches

# Short server-side timeouts, so that every cut-off happens within the run.
IDLE = "2"  # --timeout
REQUEST = "1"  # --request-timeout
HANDSHAKE = "1"  # --handshake-timeout (listen --tls)

LISTENING = re.compile(r"(?:(\S+) )?listening on (?:tcp|udp):(\[[^\]]*\]|[^:\s]+):(\d+)")
Address = tuple[str, int]


# -- the server under attack ---------------------------------------------------------


class Server:
    """``python -m sockworks ARGS``; stderr collected by a thread (lines and
    bytes), so an attack can look at what it alone made the server log."""

    def __init__(self, name: str, args: Sequence[str], *, nofile: int | None = None,
                 stdout: Any = subprocess.DEVNULL) -> None:
        self.name = name
        self.args = list(args)

        def limit() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockworks", *args],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=ROOT,
            preexec_fn=limit if nofile is not None else None,
        )
        self.lines: list[str] = []
        self.nbytes: list[int] = [0]  # cumulative stderr bytes after each line
        self._new: queue.Queue[None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.exit_code: int | None = None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self.nbytes.append(self.nbytes[-1] + len(raw))
            self._new.put(None)

    def listening(self, count: int = 1, timeout: float = 20.0) -> dict[str, Address]:
        """``{name or index: (host, port)}`` from the first ``count``
        ``listening on`` lines."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for line in self.lines if (m := LISTENING.search(line))]
            if len(found) >= count:
                return {(m.group(1) or str(i)): (m.group(2).strip("[]"), int(m.group(3)))
                        for i, m in enumerate(found[:count])}
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} is not listening:\n" + "\n".join(self.lines))
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.05)

    def address(self) -> Address:
        return next(iter(self.listening(1).values()))

    def mark(self) -> int:
        return len(self.lines)

    def log_since(self, mark: int) -> str:
        return "\n".join(self.lines[mark:])

    def bytes_since(self, mark: int) -> int:
        return self.nbytes[-1] - self.nbytes[mark]

    def wait_line(self, pattern: str, since: int = 0, timeout: float = 5.0) -> bool:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for line in self.lines[seen:]:
                seen += 1
                if regex.search(line):
                    return True
            if time.monotonic() > deadline:
                return False
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.05)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def connections(self) -> int:
        """TCP connections the server holds open: its socket descriptors
        found in /proc/net/tcp{,6} in any state but LISTEN (Unix socket
        pairs and listeners are not counted)."""
        fd_dir = f"/proc/{self.proc.pid}/fd"
        inodes = set()
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                link = os.readlink(f"{fd_dir}/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        found = set()  # (a set: the kernel's table may show a line twice as it changes)
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] != "0A" and fields[9] in inodes:
                        found.add(fields[9])
        return len(found)

    def settle(self, timeout: float = 5.0) -> int:
        """Wait (bounded) until the server holds no connection; how many are left."""
        deadline = time.monotonic() + timeout
        while (n := self.connections()) > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        return n

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = -9
        self._reader.join(2)
        return self.exit_code


# -- clients ---------------------------------------------------------------------------


def tcp(source: str, address: Address, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_all(sock: socket.socket, limit: int = 64 * MiB) -> bytes:
    parts, total = [], 0
    while total < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def rst_close(sock: socket.socket) -> None:
    """Close with a reset, as a crashed peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def peer_closed(sock: socket.socket) -> bool:
    """Without waiting: has the server closed (EOF or reset) this socket?
    Data that arrived (a banner, an error) is read and dropped."""
    poller = select.poll()  # not select(): descriptors above 1024
    poller.register(sock, select.POLLIN)
    try:
        while True:
            if not poller.poll(0):
                return False
            if not sock.recv(65536):
                return True
    except OSError:
        return True


def close_all(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


# -- the bystander ---------------------------------------------------------------------

Bystander = Callable[[], bool]


def echo_bystander(address: Address) -> Bystander:
    def run() -> bool:
        with tcp(BYSTANDER, address) as s:
            s.sendall(b"ping\n")
            got = b""
            while len(got) < 5 and (chunk := s.recv(16)):
                got += chunk
            return got == b"ping\n"
    return run


def gopher_bystander(address: Address) -> Bystander:
    def run() -> bool:
        with tcp(BYSTANDER, address) as s:
            s.sendall(b"/small.txt\r\n")
            return recv_all(s).startswith(b"hello, gopher")
    return run


def charcount_bystander(address: Address) -> Bystander:
    def run() -> bool:
        with tcp(BYSTANDER, address) as s:
            s.sendall(b"hello\n")
            return b"You entered 5 characters" in recv_all(s)
    return run


def greeting_bystander(address: Address, token: bytes) -> Bystander:
    def run() -> bool:
        with tcp(BYSTANDER, address) as s:
            s.sendall(token + b"\n")
            return b"welcome to server!" in recv_all(s)
    return run


def tls_bystander(address: Address, cafile: str) -> Bystander:
    context = ssl.create_default_context(cafile=cafile)

    def run() -> bool:
        with tcp(BYSTANDER, address) as raw, \
                context.wrap_socket(raw, server_hostname=address[0]) as s:
            s.sendall(b"hello\n")
            while s.recv(4096):  # the listener's stdin is empty: EOF
                pass
            return True
    return run


def udp_bystander(address: Address) -> Bystander:
    def run() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.bind((BYSTANDER, 0))
            s.sendto(b"ping", address)
            return s.recvfrom(64)[0] == b"ping"
    return run


def sample(bystander: Bystander, count: int = 3, gap: float = 0.05,
           errors: list[str] | None = None) -> list[float | None]:
    """``count`` timed requests (ms from connect to the complete answer);
    None for one that failed or was not served within 5 s (why, in
    ``errors``)."""
    out: list[float | None] = []
    for i in range(count):
        if i:
            time.sleep(gap)
        started = time.perf_counter()
        why = "wrong answer"
        try:
            ok = bystander()
        except (OSError, ssl.SSLError) as exc:
            ok, why = False, type(exc).__name__
        elapsed = (time.perf_counter() - started) * 1000
        out.append(elapsed if ok else None)
        if not ok and errors is not None:
            errors.append(f"{why} after {elapsed:.0f} ms")
    return out


@contextlib.contextmanager
def in_background(fn: Callable[[], Any]) -> Iterator[threading.Thread]:
    """Run ``fn`` in a thread for the ``with`` block; join it (bounded) after."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(60)
    if errors:
        raise errors[0]


# -- results ---------------------------------------------------------------------------


@dataclass
class Result:
    key: str
    attack: str
    defence: str
    measured: list[str] = field(default_factory=list)
    bystander: list[float | None] | None = None
    bystander_bound: float | None = BYSTANDER_BOUND_MS
    rss_kib: int | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: str = ""

    def check(self, name: str, ok: bool) -> None:
        self.checks[name] = bool(ok)

    def no_traceback(self, *logs: str) -> None:
        text = "\n".join(logs)
        self.check("no traceback", "Traceback" not in text)
        if "Traceback" in text:
            tail = text[text.index("Traceback"):].splitlines()
            self.notes.append("log: " + " | ".join(tail[:2] + tail[-1:]))

    def finish(self) -> None:
        if self.bystander is not None and self.bystander_bound is not None:
            served = [v for v in self.bystander if v is not None]
            worst = max(served) if served else None
            self.figures["bystander_ms"] = [None if v is None else round(v, 1)
                                            for v in self.bystander]
            self.check(f"bystander <= {self.bystander_bound:g} ms",
                       len(served) == len(self.bystander) and worst is not None
                       and worst <= self.bystander_bound)
        if self.rss_kib is not None:
            self.figures["rss_growth_kib"] = self.rss_kib

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def bystander_text(self) -> str:
        if self.bystander is None:
            return "n/a"
        served = sorted(v for v in self.bystander if v is not None)
        if len(served) < len(self.bystander):
            return f"not served ({len(self.bystander) - len(served)}/{len(self.bystander)})"
        return f"{served[-1]:.1f} ({served[len(served) // 2]:.1f})"

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "attack": self.attack, "defence": self.defence,
                "settings": self.settings, "measured": self.measured,
                "figures": self.figures, "checks": self.checks, "passed": self.passed,
                "notes": self.notes}


def kib(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024:+.1f} MiB" if abs(n) >= 1024 else f"{n:+d} KiB"


# -- the attacks -----------------------------------------------------------------------

FILE_SIZE = 256 * KiB
WORDS = [f"zq{i:04d}x" for i in range(1000)]  # 7,000 bytes: an 8 KiB request line
SMALL = b"hello, gopher\n"
GREETING_TOKEN = b"a" * 64  # a dripped "a" is always still a prefix of it


def heavy_text() -> bytes:
    """256 KiB of text ending in all of WORDS: each word is found, only
    after the whole file is scanned (the matcher's worst case)."""
    tail = (" ".join(WORDS) + "\n").encode()
    filler = b"lorem ipsum dolor sit amet, consectetur adipiscing elit\n"
    body = filler * ((FILE_SIZE - len(tail)) // len(filler) + 1)
    return body[: FILE_SIZE - len(tail)] + tail


@dataclass
class Scale:
    quick: bool
    refusals: int = 1000
    one_source: int = 1024
    idle: int = 1000
    garbage: int = 2000
    searches: int = 10
    drippers: int = 10
    tls_stallers: int = 200
    datagrams: int = 200
    resets: int = 50
    bystanders: int = 5


class Run:
    """The attacks, in order; shared servers are started once."""

    def __init__(self, scale: Scale, work: Path, only: set[str] | None) -> None:
        self.scale = scale
        self.work = work
        self.only = only
        self.results: list[Result] = []
        self.servers: list[Server] = []
        self._gopher: Server | None = None
        self._charcount: Server | None = None
        self._echo: Server | None = None

    # servers

    def start(self, name: str, args: Sequence[str], **kw: Any) -> Server:
        server = Server(name, args, **kw)
        self.servers.append(server)
        return server

    def gopher(self) -> Server:
        if self._gopher is None:
            root = self.work / "gopher"
            root.mkdir()
            (root / "small.txt").write_bytes(SMALL)
            text = heavy_text()
            for i in range(20):
                (root / f"t{i:02}.txt").write_bytes(text)
            (root / "big.bin").write_bytes(random.Random(9).randbytes(8 * MiB))
            self._gopher = self.start("gopher", [
                "serve", "gopher", "--root", str(root), "-l", "tcp:127.0.0.1:0",
                "--timeout", IDLE, "--request-timeout", REQUEST])
            self._gopher.listening()
            warm_up(self._gopher, gopher_bystander)
        return self._gopher

    def charcount(self) -> Server:
        if self._charcount is None:
            self._charcount = self.start("charcount", [
                "serve", "charcount", "-l", "tcp:127.0.0.1:0",
                "--timeout", IDLE, "--request-timeout", REQUEST])
            self._charcount.listening()
            warm_up(self._charcount, charcount_bystander)
        return self._charcount

    def echo(self) -> Server:
        """Echo with the defaults (max-conns 1024, per-source 64) and an
        idle timeout long enough to hold 1,000 idle connections a while."""
        if self._echo is None:
            self._echo = self.start("echo", [
                "serve", "echo", "-l", "tcp:127.0.0.1:0", "--timeout", "30"])
            self._echo.listening()
            warm_up(self._echo, echo_bystander)
        return self._echo

    def run(self, key: str, attack: Callable[[], Result]) -> None:
        if self.only is not None and key not in self.only:
            return
        started = time.monotonic()
        try:
            result = attack()
        except Exception as exc:  # the harness itself failed: say so, go on
            result = Result(key, key, "?")
            result.check("harness ran", False)
            result.notes.append(f"harness error: {exc!r}"[:300])
        result.finish()
        result.figures["seconds"] = round(time.monotonic() - started, 2)
        self.results.append(result)
        print(f"  {result.key:<14} {'PASS' if result.passed else 'FAIL'}  "
              f"{'; '.join(result.measured)}  [{time.monotonic() - started:.1f} s]",
              file=sys.stderr, flush=True)

    # 1. Gopher selectors that are not UTF-8

    def gopher_utf8(self) -> Result:
        g = self.gopher()
        r = Result("gopher-utf8", "1. Gopher selectors not UTF-8 (URL:\\xff, /\\xff%41 ...)",
                   "selectors decoded as bytes; answer or type-3 error, never a traceback",
                   settings=f"gopher --request-timeout {REQUEST}")
        selectors = [b"URL:\xff\r\n", b"/\xff%41\r\n", b"URL:\xff", b"/\xff%41",
                     b"/.search/\xff%41\tq\r\n", b"/.search\t\xff\xfe\r\n", b"\xff\xfe\r\n",
                     b"/%ff%fe\r\n", b"\xc3\x28\r\n", b"URL:http://\xc3\x28/\r\n"]
        answers = {"type-3": 0, "answer": 0, "silent close": 0}
        mark, before = g.mark(), g.rss_kib()
        rounds = 3 if self.scale.quick else 20

        def attack() -> None:
            for n in range(rounds):
                for i, sel in enumerate(selectors):
                    with tcp(ATTACKERS[(n + i) % 8], g.address()) as s:
                        s.sendall(sel)
                        s.shutdown(socket.SHUT_WR)
                        got = recv_all(s)
                    kind = ("type-3" if got.startswith(b"3") else
                            "answer" if got else "silent close")
                    answers[kind] += 1

        with in_background(attack):
            r.bystander = sample(gopher_bystander(g.address()), self.scale.bystanders, 0.02)
        total = sum(answers.values())
        r.rss_kib = g.rss_kib() - before
        r.measured.append(f"{total} requests: {answers['type-3']} type-3, "
                          f"{answers['answer']} answers, {answers['silent close']} silent")
        r.figures.update(answers)
        r.check("every request answered", answers["silent close"] == 0)
        r.no_traceback(g.log_since(mark))
        return r

    # 2. One Gopher search freezing the server

    def gopher_search(self) -> Result:
        g = self.gopher()
        n = self.scale.searches
        r = Result("gopher-search", f"2. {n} searches of 1,000 words over 20 x 256 KiB files",
                   "search off the loop on one worker thread, work budget words x bytes",
                   bystander_bound=SEARCH_BOUND_MS, settings="gopher, defaults")
        query = b"/.search\t" + " ".join(WORDS).encode() + b"\r\n"
        taken = threading.Semaphore(0)
        finished: list[float] = []
        answers: list[bytes] = []
        lock = threading.Lock()
        mark, before = g.mark(), g.rss_kib()

        def search(i: int) -> None:
            try:
                with tcp(ATTACKERS[i % len(ATTACKERS)], g.address(), timeout=60) as s:
                    s.sendall(query)
                    first = s.recv(1)
                    taken.release()
                    rest = recv_all(s)
                with lock:
                    finished.append(time.perf_counter())
                    answers.append(first + rest)
            except OSError:
                taken.release()

        started = time.perf_counter()
        threads = [threading.Thread(target=search, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for _ in threads:
            taken.acquire(timeout=30)
        r.bystander = sample(gopher_bystander(g.address()), self.scale.bystanders, 0.01)
        with lock:
            running = n - len(finished)
        r.rss_kib = g.rss_kib() - before
        for t in threads:
            t.join(60)
        took = (max(finished) - started) if finished else None
        complete = sum(1 for a in answers if a.endswith(b".\r\n"))
        r.measured.append(f"{running}/{n} searches still running while the bystander was "
                          f"served; all {n} done in {took or 0:.2f} s")
        r.figures.update(searches=n, running_at_bystander=running, searches_seconds=took,
                         complete_answers=complete)
        r.check("every search answered", complete == n)
        r.check("searches were running", running > 0)
        r.no_traceback(g.log_since(mark))
        return r

    # 3. SIGTERM throwing away data the client already sent

    def sigterm(self) -> Result:
        clients = 3
        r = Result("sigterm", f"3. SIGTERM with {clients} x 1 MiB in flight to echo",
                   "stop accepting, read and answer what was sent, drain, FIN; --grace",
                   settings="echo --grace 5 --sndbuf 32768, client SO_RCVBUF 32 KiB")
        s = self.start("echo-sigterm", ["serve", "echo", "-l", "tcp:127.0.0.1:0",
                                        "--grace", "5", "--sndbuf", "32768"])
        address = s.address()
        payload = b"".join(i.to_bytes(4, "big") for i in range(MiB // 4))
        socks: list[socket.socket] = []
        writers = []
        for i in range(clients):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KiB)
            sock.settimeout(20)
            sock.bind((ATTACKERS[i], 0))
            sock.connect(address)
            socks.append(sock)
            w = threading.Thread(target=lambda so=sock: _send_quietly(so, payload), daemon=True)
            w.start()
            writers.append(w)
        for w in writers:
            w.join(10)
        all_sent = not any(w.is_alive() for w in writers)
        r.bystander = sample(echo_bystander(address), self.scale.bystanders, 0.02)
        got = [bytearray() for _ in socks]
        resets = [False] * clients

        def read(i: int) -> None:
            try:
                while chunk := socks[i].recv(65536):
                    got[i].extend(chunk)
            except OSError:
                resets[i] = True

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(clients)]
        signalled = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for t in readers:
            t.start()
        for t in readers:
            t.join(20)
        try:  # on its own, within the grace period (a second signal would be another test)
            s.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        stopped = time.monotonic() - signalled
        code = s.stop()
        close_all(socks)
        lost = sum(len(payload) - len(g) for g in got)
        intact = all(bytes(g) == payload[: len(g)] for g in got)
        r.measured.append(f"{lost} B lost of {clients} MiB, {sum(resets)} resets, "
                          f"exit {code} after {stopped:.2f} s")
        r.figures.update(bytes_lost=lost, resets=sum(resets), exit_status=code,
                         all_sent_before_signal=all_sent, stop_seconds=round(stopped, 2))
        r.check("all sent before the signal", all_sent)
        r.check("0 bytes lost", lost == 0 and intact)
        r.check("no reset", not any(resets))
        r.check("exit 0", code == 0)
        r.no_traceback(s.log_since(0))
        return r

    # 4. Slow drip

    def slow_drip(self) -> Result:
        n = self.scale.drippers
        services: list[tuple[str, Server, Bystander]] = []
        g = self.gopher()
        services.append(("gopher", g, gopher_bystander(g.address())))
        c = self.charcount()
        services.append(("charcount", c, charcount_bystander(c.address())))
        if not self.scale.quick:
            gr = self.start("greeting", [
                "serve", "greeting", "-l", "tcp:127.0.0.1:0", "--token",
                GREETING_TOKEN.decode(), "--timeout", IDLE, "--request-timeout", REQUEST])
            services.append(("greeting", gr, greeting_bystander(gr.address(), GREETING_TOKEN)))
        names = "/".join(name for name, _, _ in services)
        r = Result("slow-drip", f"4. slow drip, 1 byte / 0.25 s: {n} each to {names}",
                   "--request-timeout: a whole request line within the deadline",
                   settings=f"--timeout {IDLE} --request-timeout {REQUEST}")
        marks = [srv.mark() for _, srv, _ in services]
        drippers: list[tuple[socket.socket, float]] = []
        for _, srv, _ in services:
            for i in range(n):
                drippers.append((tcp(ATTACKERS[i % 4], srv.address()), time.monotonic()))
        held: list[float | None] = [None] * len(drippers)
        limit = float(REQUEST) + 4.0

        def drip() -> None:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline and any(h is None for h in held):
                for i, (sock, since) in enumerate(drippers):
                    if held[i] is not None:
                        continue
                    if peer_closed(sock):
                        held[i] = time.monotonic() - since
                        continue
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
                time.sleep(0.25)

        with in_background(drip):
            time.sleep(0.3)
            r.bystander = []
            for _, _, bystander in services:
                r.bystander += sample(bystander, max(1, self.scale.bystanders // 2), 0.02)
        close_all([sock for sock, _ in drippers])
        cut = [h for h in held if h is not None]
        still = len(held) - len(cut)

        def timed_out() -> int:  # (the close is logged just after the FIN we saw)
            return sum(srv.log_since(m).count("(request timed out)")
                       for (_, srv, _), m in zip(services, marks, strict=True))

        deadline = time.monotonic() + 2
        while timed_out() < len(cut) and time.monotonic() < deadline:
            time.sleep(0.05)
        worst = max(cut) if cut else 0.0
        r.measured.append(f"{len(drippers)} drips cut off after {min(cut or [0]):.2f}-"
                          f"{worst:.2f} s, {still} still held at {limit:.0f} s")
        r.figures.update(drippers=len(drippers), held_max_s=round(worst, 2), still_held=still,
                         request_timed_out_lines=timed_out())
        r.check("none held", still == 0)
        r.check(f"cut off within {float(REQUEST) + 1.5:g} s", worst <= float(REQUEST) + 1.5)
        r.check("logged as request timed out", timed_out() >= len(cut))
        r.no_traceback(*(srv.log_since(m) for (_, srv, _), m in zip(services, marks,
                                                                      strict=True)))
        return r

    # 5. One source taking every slot

    def one_source(self) -> Result:
        e = self.echo()
        n = self.scale.one_source
        r = Result("one-source", f"5. {n} idle connections from one address",
                   "--per-source: 1/4 of --max-conns, at most 64; refused at once",
                   settings="echo, defaults (--max-conns 1024, --per-source 64)")
        before, mark = e.rss_kib(), e.mark()
        socks: list[socket.socket] = []
        failed = 0
        started = time.monotonic()
        for _ in range(n):
            try:
                socks.append(tcp(ATTACKERS[0], e.address(), timeout=2))
            except OSError:
                failed += 1
        connected = time.monotonic()
        time.sleep(0.3)
        server_held = e.connections()
        refused = sum(1 for s in socks if peer_closed(s))
        held = len(socks) - refused
        r.bystander = sample(echo_bystander(e.address()), self.scale.bystanders, 0.02)
        r.rss_kib = e.rss_kib() - before
        close_all(socks)
        e.settle()
        r.measured.append(f"{held} held, {refused} refused at once"
                          + (f", {failed} connects failed" if failed else "")
                          + f", log {e.bytes_since(mark)} B")
        r.figures.update(attempted=n, held=held, held_server_side=server_held,
                         refused=refused, connect_failed=failed, log_bytes=e.bytes_since(mark),
                         connect_seconds=round(connected - started, 2))
        r.check("held <= 64", held <= 64 and server_held <= 64)
        r.no_traceback(e.log_since(mark))
        return r

    # 6. Refusals logged one line each

    def refusals(self) -> Result:
        n = self.scale.refusals
        r = Result("refusals", f"6. {n} refused connections (--deny 127.0.0.2)",
                   "refusal log throttled: 1 line per source and reason a second + summary",
                   settings="echo --deny 127.0.0.2")
        s = self.start("echo-deny", ["serve", "echo", "-l", "tcp:127.0.0.1:0",
                                     "--deny", ATTACKERS[0]])
        address = s.address()
        mark, before = s.mark(), s.rss_kib()

        def flood() -> None:
            for _ in range(n):
                with contextlib.suppress(OSError), tcp(ATTACKERS[0], address, timeout=2):
                    pass

        with in_background(flood):
            time.sleep(0.05)
            r.bystander = sample(echo_bystander(address), self.scale.bystanders, 0.05)
        r.rss_kib = s.rss_kib() - before
        one = re.compile(r"127\.0\.0\.2:\d+ refused")
        summary = re.compile(r"127\.0\.0\.2 refused: .*\(and (\d+) more like it")
        other = re.compile(r"(\d+) more refused connections")

        def accounted() -> tuple[int, int, int]:
            lines = total = nbytes = 0
            for line in s.lines[mark:]:
                if m := summary.search(line):
                    total += int(m.group(1))
                elif one.search(line):
                    total += 1
                    if m := re.search(r"\(and (\d+) more like it", line):
                        total += int(m.group(1))
                elif m := other.search(line):
                    total += int(m.group(1))
                else:
                    continue
                lines += 1
                nbytes += len(line) + 1
            return lines, total, nbytes

        deadline = time.monotonic() + 4
        while accounted()[1] < n and time.monotonic() < deadline:
            s.wait_line(r"more", since=s.mark(), timeout=0.2)
        lines, total, nbytes = accounted()
        r.measured.append(f"{lines} log lines, {nbytes} B for {n} refusals "
                          f"({total} accounted for)")
        r.figures.update(refusals=n, log_lines=lines, log_bytes=nbytes, accounted=total)
        r.check("<= 12 lines", lines <= 12)
        r.check("<= 4 KiB of log", nbytes <= 4 * KiB)
        r.check("every refusal counted", total == n)
        r.no_traceback(s.log_since(mark))
        return r

    # 7. Config files that end in a traceback

    def config_errors(self) -> Result:
        r = Result("config", "7. config: arrays 100,000 deep, inline tables 5,000 deep, "
                   "more listeners than descriptors", "checked in full before binding; "
                   "one line, non-zero status", settings="serve --config; RLIMIT_NOFILE 64 for the "
                   "listeners case")
        r.bystander = None
        cases: list[tuple[str, str, int | None]] = [
            ("arrays-100000", "x = " + "[" * 100_000 + "]" * 100_000 + "\n", None),
            ("tables-5000", "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n", None),
        ]
        if not self.scale.quick:
            services = "".join(f'[services.e{i}]\nservice = "echo"\nlisten = '
                               f'["tcp:127.0.0.1:0"]\n' for i in range(200))
            cases.append(("200-listeners", services, 64))
        for name, text, nofile in cases:
            path = self.work / f"{name}.toml"
            path.write_text(text)

            def limit(nofile: int | None = nofile) -> None:
                if nofile is not None:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

            started = time.monotonic()
            try:
                done = subprocess.run([sys.executable, "-m", "sockworks", "serve", "--config",
                                       str(path)], capture_output=True, timeout=30, cwd=ROOT,
                                      preexec_fn=limit)
                code, err = done.returncode, done.stderr.decode(errors="replace")
            except subprocess.TimeoutExpired as exc:
                code, err = None, (exc.stderr or b"").decode(errors="replace")
            took = time.monotonic() - started
            lines = err.strip().splitlines()
            traceback = "Traceback" in err
            r.measured.append(f"{name}: exit {code}, {len(lines)} line"
                              f"{'s' if len(lines) != 1 else ''}"
                              + (" (traceback)" if traceback else ""))
            r.figures[name] = {"exit_status": code, "stderr_lines": len(lines),
                               "stderr_bytes": len(err), "traceback": traceback,
                               "seconds": round(took, 2),
                               "last_line": lines[-1][:200] if lines else ""}
            r.check(f"{name}: one line, non-zero status", code not in (0, None) and len(lines) == 1)
            r.check(f"{name}: no traceback", not traceback)
            if traceback or code in (0, None) or len(lines) != 1:
                r.notes.append(f"{name}: exit {code}; last line: "
                               + (lines[-1][:160] if lines else "(none)"))
        return r

    # 8. listen --tls -k

    def tls(self) -> Result:
        try:
            import trustme
        except ImportError:
            r = Result("tls", "8. listen --tls -k", "?")
            r.measured.append("not available (trustme is not installed)")
            r.check("available", False)
            return r
        ca = trustme.CA()
        cafile, certfile = self.work / "ca.pem", self.work / "cert.pem"
        ca.cert_pem.write_to_path(str(cafile))
        ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
            str(certfile))
        has_timeout = "--handshake-timeout" in subprocess.run(
            [sys.executable, "-m", "sockworks", "listen", "--help"], capture_output=True,
            cwd=ROOT, timeout=30).stdout.decode()
        n = self.scale.tls_stallers
        r = Result("tls", f"8. listen --tls -k: a plaintext peer holding on, then {n} "
                   "ClientHellos that stop",
                   "handshakes off the accept path; --handshake-timeout (default 10 s); "
                   "unfinished handshakes give way at --max-conns",
                   settings=(f"listen --tls -k --handshake-timeout {HANDSHAKE}" if has_timeout
                             else "listen --tls -k (--handshake-timeout: not available)"))
        args = ["listen", "--tls", "--cert", str(certfile), "-k"]
        if has_timeout:
            args += ["--handshake-timeout", HANDSHAKE]
        out = (self.work / "listen.out").open("wb")
        s = self.start("listen-tls", [*args, "tcp:127.0.0.1:0"], stdout=out)
        address = s.address()
        bystander = tls_bystander(address, str(cafile))
        r.bystander = []
        # a: a plaintext request, then the peer holds the connection open.
        with tcp(ATTACKERS[0], address) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            t0 = time.monotonic()
            try:
                plain_closed = plain.recv(100) == b""
            except OSError:
                plain_closed = True
            plain_s = time.monotonic() - t0
            r.bystander += sample(bystander, max(1, self.scale.bystanders // 2), 0.02)
        # b: n peers send the start of a ClientHello and stop.
        hello = bytes.fromhex("160301020001") + bytes.fromhex("0001fc0303") + b"\0" * 8
        stallers: list[tuple[socket.socket, float]] = []
        failed = 0
        for i in range(n):
            try:
                sock = tcp(ATTACKERS[i % 8], address, timeout=2)
                sock.sendall(hello)
                stallers.append((sock, time.monotonic()))
            except OSError:
                failed += 1
        r.bystander += sample(bystander, self.scale.bystanders, 0.02)
        closed_after: list[float] = []
        open_ = list(stallers)
        deadline = time.monotonic() + 8
        while open_ and time.monotonic() < deadline:
            still = []
            for sock, since in open_:
                if peer_closed(sock):
                    closed_after.append(time.monotonic() - since)
                else:
                    still.append((sock, since))
            open_ = still
            time.sleep(0.05)
        close_all([sock for sock, _ in stallers])
        r.figures.update(plaintext_closed=plain_closed, plaintext_closed_after_s=round(
            plain_s, 3), stallers=n, stallers_connect_failed=failed,
            stallers_open_after_8s=len(open_),
            stallers_closed_max_s=round(max(closed_after), 2) if closed_after else None,
            handshake_timeout_option=has_timeout)
        r.measured.append(f"plaintext peer closed after {plain_s * 1000:.0f} ms; "
                          f"{len(closed_after)}/{n} stalled handshakes closed within "
                          f"{max(closed_after or [0]):.1f} s, {len(open_)} still open")
        if not has_timeout:
            r.measured.append("--handshake-timeout: not available")
        r.check("plaintext peer let go", plain_closed)
        r.check("no stalled handshake held", not open_ and failed == 0)
        code = s.stop()
        out.close()
        r.check("listener exit 0", code == 0)
        r.no_traceback(s.log_since(0))
        return r

    # Earlier findings

    def idle_thousand(self) -> Result:
        e = self.echo()
        n = self.scale.idle
        sources = ATTACKERS[:16]
        r = Result("idle-1000", f"{n} idle connections from {len(sources)} addresses",
                   "one StreamCore per connection, no task, no buffer until data; "
                   "--timeout", settings="echo, defaults, --timeout 30")
        before, mark = e.rss_kib(), e.mark()
        socks, failed = [], 0
        started = time.monotonic()
        for i in range(n):
            try:
                sock = tcp(sources[i % len(sources)], e.address(), timeout=3)
                sock.sendall(b".")
                if sock.recv(1) != b".":
                    failed += 1
                socks.append(sock)
            except OSError:
                failed += 1
        connected = time.monotonic() - started
        r.bystander = sample(echo_bystander(e.address()), self.scale.bystanders, 0.02)
        held = e.connections()
        r.rss_kib = e.rss_kib() - before
        per = r.rss_kib / max(1, held)
        close_all(socks)
        e.settle()
        r.measured.append(f"{held} held, {per:.1f} KiB RSS each, {failed} not served")
        r.figures.update(held=held, kib_per_connection=round(per, 2), not_served=failed,
                         connect_seconds=round(connected, 2))
        r.check(f"all {n} served", held >= n and failed == 0)
        r.check("<= 16 KiB per connection", per <= 16)
        r.no_traceback(e.log_since(mark))
        return r

    def fd_limit(self, max_conns: int | None) -> Result:
        n = 80
        extra = ["--max-conns", str(max_conns)] if max_conns else []
        key = "fd-64" + ("-tuned" if max_conns else "")
        r = Result(key, f"descriptor limit 64, {n} connections from 2 addresses"
                   + (f", --max-conns {max_conns}" if max_conns else ""),
                   "--max-conns fitted under the descriptor limit at start (and the "
                   "per-source share with it): accepting stops before descriptors run out, "
                   "the excess waits in the backlog" + (
                       "; --max-conns 40 given, fitted likewise" if max_conns else ""),
                   settings=f"echo --timeout {IDLE} {' '.join(extra)}, RLIMIT_NOFILE 64")
        s = self.start(key, ["serve", "echo", "-l", "tcp:127.0.0.1:0", "--timeout", IDLE,
                             *extra], nofile=64)
        address = s.address()
        before = s.rss_kib()
        socks, failed = [], 0
        for i in range(n):
            try:
                socks.append(tcp(ATTACKERS[i % 2], address, timeout=1))
            except OSError:
                failed += 1
        time.sleep(0.3)
        cpu0, t0 = s.cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        cpu = (s.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        held = s.connections()
        r.rss_kib = s.rss_kib() - before
        bystander = echo_bystander(address)
        errors: list[str] = []
        during = sample(bystander, 3, 0.02, errors)
        cut = sum(1 for sock in socks if peer_closed(sock))
        close_all(socks)
        time.sleep(0.3)
        after = sample(bystander, 3, 0.02, errors)
        r.bystander = during + after
        if errors:
            r.notes.append("bystander not served: " + ", ".join(errors))
        served = [v for v in during if v is not None]
        r.measured.append(f"CPU {cpu * 100:.1f} % under attack, {held} connections open, "
                          f"{cut} attackers cut; bystander during: "
                          + (f"{len(during) - len(served)}/{len(during)} not served"
                             if len(served) < len(during) else f"{max(served):.0f} ms")
                          + ", after: " + ("served" if None not in after else "not served"))
        r.figures.update(cpu_percent=round(cpu * 100, 1), connections_open=held,
                         connect_failed=failed, attackers_cut=cut,
                         bystander_during_ms=[None if v is None else round(v, 1)
                                              for v in during])
        r.check("no spin (CPU <= 10 %)", cpu <= 0.10)
        code = s.stop()
        r.check("exit 0", code == 0)
        r.no_traceback(s.log_since(0))
        return r

    def endless_lines(self) -> Result:
        c = self.charcount()
        n = 4
        r = Result("endless-line", f"{n} endless lines to charcount",
                   "--max-line (8192): the line buffer refuses a line once it is too long",
                   settings="charcount, --max-line 8192")
        mark, before = c.mark(), c.rss_kib()
        sent = [0] * n
        closed = [False] * n
        peak = [before]

        def endless(i: int) -> None:
            chunk = b"x" * 65536
            with tcp(ATTACKERS[i], c.address(), timeout=3) as sock:
                deadline = time.monotonic() + 5
                while sent[i] < 64 * MiB and time.monotonic() < deadline:
                    if peer_closed(sock):
                        closed[i] = True
                        return
                    try:
                        sent[i] += sock.send(chunk)
                    except OSError:
                        closed[i] = True
                        return
                    peak[0] = max(peak[0], c.rss_kib())

        threads = [threading.Thread(target=endless, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        r.bystander = sample(charcount_bystander(c.address()), self.scale.bystanders, 0.02)
        for t in threads:
            t.join(10)
        r.rss_kib = max(peak[0], c.rss_kib()) - before
        reason = c.log_since(mark).count("line longer than")
        r.measured.append(f"{sum(closed)}/{n} cut off after {max(sent) // KiB} KiB at most "
                          f"({reason} logged 'line longer')")
        r.figures.update(cut_off=sum(closed), max_sent_kib=max(sent) // KiB)
        r.check("all cut off", all(closed))
        r.check("RSS growth <= 8 MiB", r.rss_kib <= 8 * KiB)
        r.no_traceback(c.log_since(mark))
        return r

    def slow_readers(self) -> Result:
        e = self.echo()
        n = 4
        r = Result("slow-readers", f"{n} clients sending to echo, never reading",
                   "--max-output (256 KiB): reading stops when the peer does not read",
                   settings="echo, --max-output 262144")
        mark, before = e.mark(), e.rss_kib()
        socks = [tcp(ATTACKERS[i], e.address()) for i in range(n)]
        for s in socks:
            s.setblocking(False)
        sent = [0] * n
        stalled_since: list[float | None] = [None] * n
        chunk = b"x" * 65536
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            progress = False
            for i, s in enumerate(socks):
                if sent[i] >= 64 * MiB:
                    continue
                try:
                    sent[i] += s.send(chunk)
                    stalled_since[i] = None
                    progress = True
                except BlockingIOError:
                    stalled_since[i] = stalled_since[i] or time.monotonic()
                except OSError:
                    stalled_since[i] = stalled_since[i] or time.monotonic()
            if all(t is not None and time.monotonic() - t > 0.5 for t in stalled_since):
                break
            if not progress:
                time.sleep(0.01)
        r.bystander = sample(echo_bystander(e.address()), self.scale.bystanders, 0.02)
        r.rss_kib = e.rss_kib() - before
        for s in socks:
            rst_close(s)
        e.settle()
        r.measured.append(f"server stopped reading after {max(sent) / MiB:.1f} MiB "
                          f"(kernel buffers included)")
        r.figures.update(max_sent_mib=round(max(sent) / MiB, 2))
        r.check("reading stopped (< 64 MiB)", max(sent) < 64 * MiB)
        r.check("RSS growth <= 16 MiB", r.rss_kib <= 16 * KiB)
        r.no_traceback(e.log_since(mark))
        return r

    def sendfile_resets(self) -> Result:
        g = self.gopher()
        n = self.scale.resets
        r = Result("sendfile-reset", f"{n} resets in the middle of an 8 MiB sendfile",
                   "a reset peer costs one debug line; descriptors closed",
                   settings="gopher, defaults")
        mark, before = g.mark(), g.rss_kib()

        def attack() -> None:
            for i in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
                sock.settimeout(5)
                try:
                    sock.bind((ATTACKERS[i % 8], 0))
                    sock.connect(g.address())
                    sock.sendall(b"/big.bin\r\n")
                    got = 0
                    while got < 64 * KiB and (chunk := sock.recv(16 * KiB)):
                        got += len(chunk)
                finally:
                    rst_close(sock)

        with in_background(attack):
            r.bystander = sample(gopher_bystander(g.address()), self.scale.bystanders, 0.02)
        left = g.settle()
        r.rss_kib = g.rss_kib() - before
        r.measured.append(f"{left} connections left open 5 s after {n} resets")
        r.figures.update(resets=n, connections_left=left)
        r.check("no descriptor leaked", left == 0)
        r.no_traceback(g.log_since(mark))
        return r

    def garbage(self) -> Result:
        n = self.scale.garbage
        names = ["echo", "timestamp", "greeting", "charcount", "thanks", "gopher"]
        r = Result("garbage", f"{n} garbage inputs to each of {len(names)} services",
                   "bounded line buffer, peer errors closed without a traceback",
                   settings=f"serve --config, timeout {IDLE}, request_timeout {REQUEST}, "
                   "max_line 1024")
        root = self.work / "gopher"
        if not root.exists():
            self.gopher()
        conf = self.work / "garbage.toml"
        conf.write_text(f"[defaults]\ntimeout = {IDLE}\nrequest_timeout = {REQUEST}\n"
                        "max_line = 1024\n" + "".join(
                            f'[services.{name}]\nlisten = ["tcp:127.0.0.1:0"]\n'
                            + (f'root = "{root}"\n' if name == "gopher" else "")
                            for name in names))
        s = self.start("garbage", ["serve", "--config", str(conf), "-q"])
        where = s.listening(len(names))
        rng = random.Random(4)
        tasks = [(name, i) for i in range(n) for name in names]
        done = [0]
        hung = [0]
        outcome = {"answered": 0, "closed silently": 0, "reset": 0, "connect failed": 0}
        lock = threading.Lock()
        warm: list[int] = []
        deadline = time.monotonic() + (20 if self.scale.quick else 75)

        def junk(seed: int) -> bytes:
            g = random.Random(seed)
            size = g.choice([0, 1, 7, 100, 1000, 3000])
            data = bytearray(g.randbytes(size))
            for _ in range(g.randrange(3)):
                data[g.randrange(len(data) + 1):0] = g.choice([b"\r\n", b"\n", b"\0", b"\xff"])
            return bytes(data)

        seeds = [rng.getrandbits(32) for _ in tasks]

        def worker(k: int) -> None:
            for j in range(k, len(tasks), 4):
                if time.monotonic() > deadline:
                    return
                name, _ = tasks[j]
                kind = "connect failed"
                try:
                    with tcp(ATTACKERS[j % len(ATTACKERS)], where[name], timeout=3) as sock:
                        kind = "reset"
                        with contextlib.suppress(OSError):
                            sock.sendall(junk(seeds[j]))
                            sock.shutdown(socket.SHUT_WR)
                        got = recv_all(sock, 256 * KiB)
                        kind = "answered" if got else "closed silently"
                except TimeoutError:
                    with lock:
                        hung[0] += 1
                except OSError:
                    pass
                with lock:
                    done[0] += 1
                    outcome[kind] += 1
                    if done[0] == len(tasks) // 10:
                        warm.append(s.rss_kib())

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
        start_rss = s.rss_kib()
        for t in threads:
            t.start()
        time.sleep(0.2)
        r.bystander = []
        while any(t.is_alive() for t in threads) and len(r.bystander) < self.scale.bystanders:
            r.bystander += sample(echo_bystander(where["echo"]), 1)
            time.sleep(0.3)
        for t in threads:
            t.join(90)
        left = s.settle()
        end_rss = s.rss_kib()
        growth = end_rss - (warm[0] if warm else start_rss)
        r.rss_kib = growth
        r.measured.append(f"{done[0]} connections ({outcome['answered']} answered, "
                          f"{outcome['closed silently']} closed, {outcome['reset']} reset), "
                          f"{hung[0]} hung, RSS "
                          f"{kib(end_rss - start_rss)} in all, {kib(growth)} after the first "
                          f"10 %, {left} connections left open")
        r.figures.update(connections=done[0], planned=len(tasks), hung=hung[0], **outcome,
                         connections_left=left, rss_total_growth_kib=end_rss - start_rss)
        r.check("every planned input sent", done[0] == len(tasks))
        r.check("none hung", hung[0] == 0 and outcome["connect failed"] == 0)
        r.check("memory flat (<= 4 MiB after warm-up)", growth <= 4 * KiB)
        r.check("no descriptor leaked", left == 0)
        code = s.stop()
        r.check("exit 0", code == 0)
        r.no_traceback(s.log_since(0))
        return r

    def udp(self) -> Result:
        n = self.scale.datagrams
        slack = {"echo": 0, "chargen": 0, "qotd": 0, "daytime": 64, "time": 4, "timestamp": 27}
        r = Result("udp-amplification", f"{n} garbage datagrams to each of {len(slack)} UDP "
                   "services", "--max-amplification 1.0 (+ fixed answer size), --udp-rate 50/s",
                   settings="serve --config, UDP defaults")
        conf = self.work / "udp.toml"
        conf.write_text("".join(f'[services.{name}]\nlisten = ["udp:127.0.0.1:0"]\n'
                                for name in slack))
        s = self.start("udp", ["serve", "--config", str(conf), "-q"])
        where = s.listening(len(slack))
        before = s.rss_kib()
        rng = random.Random(7)
        pending: list[tuple[str, int, socket.socket]] = []
        for name in slack:
            for i in range(n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((ATTACKERS[i % 16], 0))
                size = rng.choice([0, 1, 8, 60, 300, 600, 1400])
                sock.sendto(rng.randbytes(size), where[name])
                pending.append((name, size, sock))
        r.bystander = sample(udp_bystander(where["echo"]), self.scale.bystanders, 0.02)
        worst = {name: -(10**9) for name in slack}
        replies = 0
        waiting = {sock.fileno(): (name, size, sock) for name, size, sock in pending}
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 3
        while waiting and time.monotonic() < deadline:
            readable = poller.poll(300)
            if not readable:
                break
            for fd, _ in readable:
                poller.unregister(fd)
                name, size, sock = waiting.pop(fd)
                with contextlib.suppress(OSError):
                    reply = sock.recv(65536)
                    replies += 1
                    worst[name] = max(worst[name], len(reply) - size - slack[name])
        r.rss_kib = s.rss_kib() - before
        close_all([sock for _, _, sock in pending])
        over = max(worst.values())
        r.measured.append(f"{replies} replies to {len(pending)} datagrams; largest excess over "
                          f"request + fixed size: {max(over, 0)} B")
        r.figures.update(datagrams=len(pending), replies=replies,
                         excess_bytes={k: (v if v > -(10**9) else None)
                                       for k, v in worst.items()})
        r.check("no reply larger than allowed", over <= 0)
        code = s.stop()
        r.check("exit 0", code == 0)
        r.no_traceback(s.log_since(0))
        return r

    # all of them

    def all(self) -> None:
        quick = self.scale.quick
        self.run("gopher-utf8", self.gopher_utf8)
        if not quick:
            self.run("gopher-search", self.gopher_search)
            self.run("sigterm", self.sigterm)
        self.run("slow-drip", self.slow_drip)
        self.run("one-source", self.one_source)
        self.run("refusals", self.refusals)
        self.run("config", self.config_errors)
        if not quick:
            self.run("tls", self.tls)
            self.run("idle-1000", self.idle_thousand)
            self.run("fd-64", lambda: self.fd_limit(None))
            self.run("fd-64-tuned", lambda: self.fd_limit(40))
            self.run("endless-line", self.endless_lines)
            self.run("slow-readers", self.slow_readers)
            self.run("sendfile-reset", self.sendfile_resets)
            self.run("garbage", self.garbage)
            self.run("udp-amplification", self.udp)

    def stop(self) -> list[tuple[str, int]]:
        codes = []
        for server in self.servers:
            if server.exit_code is None:
                codes.append((server.name, server.stop()))
        return codes


def warm_up(server: Server, bystander: Callable[[Address], Bystander]) -> None:
    """One normal request first: what a server creates on its first
    connection (a wake-up socket pair, a thread) is not counted against
    an attack."""
    sample(bystander(server.address()), 1)
    time.sleep(0.1)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


# -- output ----------------------------------------------------------------------------


def table(results: Sequence[Result]) -> str:
    rows = ["| attack | measured | bystander ms, worst (median) | RSS growth | defence | result |",
            "|---|---|---|---|---|---|"]
    for r in results:
        failed = [name for name, ok in r.checks.items() if not ok]
        verdict = "PASS" if not failed else "FAIL: " + ", ".join(failed)
        rows.append(f"| {r.attack} | {'; '.join(r.measured)} | {r.bystander_text()} | "
                    f"{kib(r.rss_kib)} | {r.defence} | {verdict} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced set, a few seconds")
    parser.add_argument("--only", help="comma-separated attack keys (see the table)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a bound failed")
    args = parser.parse_args(argv)
    sys.setswitchinterval(0.001)  # attacker threads must not delay the bystander's timing
    scale = Scale(quick=args.quick)
    if args.quick:
        scale = Scale(quick=True, refusals=200, one_source=100, idle=100, garbage=50,
                      searches=10, drippers=3, tls_stallers=20, datagrams=20, resets=5,
                      bystanders=3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:  # 1,200 UDP sockets and 1,024 connections at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    print(f"sockworks attacks ({'quick' if args.quick else 'full'} run): attackers "
          f"127.0.0.2-{ATTACKERS[-1].rsplit('.', 1)[1]}, bystander {BYSTANDER}; server "
          f"settings --timeout {IDLE} --request-timeout {REQUEST} --handshake-timeout "
          f"{HANDSHAKE} unless the attack says otherwise; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="sockworks-attacks-") as tmp:
        run = Run(scale, Path(tmp), only)
        try:
            run.all()
        finally:
            codes = run.stop()
    elapsed = time.monotonic() - started
    results = run.results
    print()
    print(table(results))
    print()
    print("Settings per attack:")
    for r in results:
        print(f"- {r.key}: {r.settings}")
    notes = [(r.key, n) for r in results for n in r.notes]
    if notes:
        print()
        print("Notes:")
        for key, note in notes:
            print(f"- {key}: {note}")
    bad_stops = [(name, code) for name, code in codes if code != 0]
    failed = [r.key for r in results if not r.passed]
    print()
    print(f"{len(results) - len(failed)}/{len(results)} attacks within their bounds"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; servers stopped with status 0: {len(codes) - len(bad_stops)}/{len(codes)}"
          + (f" (not: {bad_stops})" if bad_stops else "")
          + f"; run took {elapsed:.0f} s (bound: 180 s); load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mode": "quick" if args.quick else "full", "seconds": round(elapsed, 1),
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
            "bystander_bound_ms": BYSTANDER_BOUND_MS,
            "server_settings": {"timeout": IDLE, "request_timeout": REQUEST,
                                "handshake_timeout": HANDSHAKE},
            "attacks": [r.as_json() for r in results],
            "server_exit_status": dict(codes)}, indent=2) + "\n")
    return 1 if args.strict and (failed or bad_stops) else 0


if __name__ == "__main__":
    sys.exit(main())
