"""What the benchmarks share: the C tools, pinned server processes, CPU time
from /proc, medians of paired rounds, and tables.

Used by ``echo_bench.py`` and ``paths_bench.py``. Servers are subprocesses
pinned to one core (``taskset -c 0``), loads are the C programs from
``shared/bench`` compiled on the fly and pinned to the other core; only
same-run ratios mean anything on these shared machines.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVERS = HERE / "servers"
HOST = "127.0.0.1"
# The ready line every server writes to stderr once bound (sockworks' own,
# and benchmarks/servers/*): ``listening on tcp:127.0.0.1:PORT``.
LISTENING = re.compile(r"listening on (?:tcp|udp):(?:\[[^\]]*\]|[^:\s]+):(\d+)")

R = TypeVar("R")
K = TypeVar("K")


class HarnessError(Exception):
    """Something the person running the benchmark must fix."""


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def paired(
    samples: Mapping[str, Mapping[K, Mapping[int, R]]],
    a: str,
    b: str,
    cell: K,
    ratio: Callable[[R, R], float | None],
) -> float | None:
    """The median over rounds of ``ratio(a's run, b's run)``, each pair
    measured in the same round, seconds apart: noise that comes and goes
    (another process waking up) cancels out far better than in a ratio of
    two separate medians."""
    ra, rb = samples.get(a, {}).get(cell, {}), samples.get(b, {}).get(cell, {})
    values = [v for r in ra.keys() & rb.keys() if (v := ratio(ra[r], rb[r])) is not None]
    return median(values) if values else None


# -- tools -------------------------------------------------------------------


def find_bench_sources(
    given: str | None, needed: Sequence[str] = ("echoload.c", "epoll_echo.c")
) -> Path:
    candidates = [Path(p) for p in (given, os.environ.get("SOCKWORKS_BENCH_SRC")) if p]
    candidates += [ROOT.parent / "shared" / "bench", ROOT / "shared" / "bench"]
    for path in candidates:
        if all((path / name).is_file() for name in needed):
            return path
    raise HarnessError(
        f"cannot find {' and '.join(needed)} (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); pass --bench-src DIR"
    )


def build_tools(src: Path, into: Path, names: Sequence[str]) -> None:
    """Compile ``src/NAME.c`` to ``into/NAME`` for each name, with gcc -O2."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise HarnessError("gcc is not installed: it is needed to build the C load generator")
    for name in names:
        proc = subprocess.run(
            [gcc, "-O2", "-o", str(into / name), str(src / f"{name}.c")],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise HarnessError(f"cannot compile {name}.c:\n{proc.stderr}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ``nice -n N`` before every server and load process (--nice); empty: none.
PRIORITY: list[str] = []


def set_priority(nice: int) -> None:
    PRIORITY[:] = ["nice", "-n", str(nice)] if nice else []


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return [*PRIORITY, *(argv if cpu is None else ["taskset", "-c", str(cpu), *argv])]


def choose_cpus(no_pin: bool, server_cpu: int, load_cpu: int) -> tuple[int | None, int | None]:
    """The server's and the load's CPU, or (None, None) when not pinning."""
    pin = not no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    if not pin:
        print("note: not pinning (no taskset, one CPU, or --no-pin)", file=sys.stderr)
        return None, None
    return server_cpu, load_cpu


# -- servers -----------------------------------------------------------------


class RunningServer:
    """A server process, its port, and its stderr (kept in a file in
    ``logdir``, so that a server that logs every connection is not slowed
    by a pipe the harness must drain).

    With ``port=None`` the server is told nothing and ready when its stderr
    says ``listening on …:PORT``; with a port it is ready once that port
    accepts a TCP connection (nginx, tcpserver, the C server)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        cpu: int | None,
        logdir: Path,
        port: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.known_port = port
        self.port = port or 0
        self.log_path = logdir / f"{name}.{time.monotonic_ns()}.stderr"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                pinned(cpu, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                cwd=cwd,
                preexec_fn=preexec_fn,
                start_new_session=True,  # a ^C to the harness is ours to pass on
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []

    def _ready_line(self) -> int | None:
        try:
            with open(self.log_path, "rb") as f:
                head = f.read(65536).decode(errors="replace")
        except OSError:
            return None
        match = LISTENING.search(head)
        return int(match.group(1)) if match else None

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.known_port is not None:
                try:
                    socket.create_connection((HOST, self.known_port), timeout=1).close()
                    return
                except OSError:
                    pass
            else:
                port = self._ready_line()
                if port is not None:
                    self.port = port
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        status = self.proc.poll()
        self.stop()
        tail = "\n".join(self.lines[-15:]) or "(nothing on stderr)"
        how = f"not ready in {timeout:g} s" if status is None else f"exited with status {status}"
        raise HarnessError(f"{self.name} did not start ({how}):\n{tail}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server and what it started (tcpserver's children:
        its own process group), SIGKILL after 5 s. The group is signalled
        only while its leader is not yet reaped, so its id is still ours."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except OSError:
            self.proc.send_signal(sig)


def cpu_seconds(pid: int | None, children: bool = False) -> float | None:
    """User + system CPU time of a process and all its threads; with
    ``children``, plus that of the children it has waited for (tcpserver's
    per-connection programs)."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- reporting -------------------------------------------------------------------


def size_label(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def rps_label(rps: float) -> str:
    return f"{rps / 1000:.1f}k" if rps >= 10000 else f"{rps:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns aligned left, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        out = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in pairs]
        return "| " + " | ".join(out) + " |"

    dashes = ("-" * (w + 1) + ("-" if i < left else ":") for i, w in enumerate(widths))
    sep = "|" + "|".join(dashes) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def machine_summary() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for module in ("uvloop", "twisted", "gevent"):
        try:
            from importlib.metadata import version

            versions.append(f"{module} {version(module)}")
        except Exception:
            pass
    return (
        f"{os.cpu_count()} CPUs, {model}; Linux {os.uname().release}; "
        f"Python {sys.version.split()[0]}; " + ", ".join(versions)
    )
