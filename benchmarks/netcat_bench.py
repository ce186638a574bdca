"""Throughput of `sockworks connect` → `sockworks listen` against socat.

Pipes SIZE bytes (default 1 GiB) from `head -c SIZE /dev/zero` through a
client into a listener writing to /dev/null over loopback TCP, once with
socat at both ends and once with sockworks at both ends, in the same run,
and prints both throughputs, the ratio and each process's peak RSS
(from wait4, so memory growing with the transfer would show). Not a test:

    .venv/bin/python benchmarks/netcat_bench.py [--size MiB] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

SOCKWORKS = [sys.executable, "-m", "sockworks"]


@dataclass
class Result:
    seconds: float
    client_rss_mib: float
    listener_rss_mib: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait4(proc: subprocess.Popen[bytes], timeout: float = 600.0) -> tuple[int, float]:
    """Exit status and peak RSS (MiB) of one child."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{proc.args} did not finish")
        time.sleep(0.005)


def run_pair(listener_cmd: list[str], client_cmd: list[str], size: int,
             port_from_stderr: bool) -> Result:
    null = subprocess.DEVNULL
    listener = subprocess.Popen(listener_cmd, stdin=null, stdout=null, stderr=subprocess.PIPE)
    try:
        if port_from_stderr:
            assert listener.stderr is not None
            line = listener.stderr.readline().decode()
            match = re.search(r"listening on (\S+)", line)
            if not match:
                raise SystemExit(f"listener said: {line!r}")
            endpoint = match.group(1)
            client_cmd = [a.replace("ENDPOINT", endpoint) for a in client_cmd]
        else:
            time.sleep(0.3)  # socat has no readiness signal
        source = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        start = time.perf_counter()
        client = subprocess.Popen(client_cmd, stdin=source.stdout, stdout=null)
        assert source.stdout is not None
        source.stdout.close()
        code, client_rss = wait4(client)
        lcode, listener_rss = wait4(listener)
        elapsed = time.perf_counter() - start
        source.wait()
        if code or lcode:
            raise SystemExit(f"failed: client {code}, listener {lcode}: {client_cmd}")
        return Result(elapsed, client_rss, listener_rss)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()


def socat_pair(size: int) -> Result:
    port = free_port()
    return run_pair(
        ["socat", "-u", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", "STDOUT"],
        ["socat", "-u", "STDIN", f"TCP:127.0.0.1:{port}"],
        size, port_from_stderr=False,
    )


def sockworks_pair(size: int) -> Result:
    return run_pair(
        [*SOCKWORKS, "listen", "tcp:127.0.0.1:0"],
        [*SOCKWORKS, "connect", "ENDPOINT"],
        size, port_from_stderr=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB to transfer (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="best of N (default 3)")
    args = parser.parse_args()
    if shutil.which("socat") is None:
        raise SystemExit("socat is not installed (apt-get install socat)")
    size = args.size << 20
    best: dict[str, Result] = {}
    for _ in range(args.rounds):
        for name, pair in (("socat", socat_pair), ("sockworks", sockworks_pair)):
            result = pair(size)
            if name not in best or result.seconds < best[name].seconds:
                best[name] = result
    rates = {}
    for name, r in best.items():
        rates[name] = size / r.seconds / 2**20
        print(f"{name:<10} {rates[name]:8.0f} MiB/s  ({args.size} MiB in {r.seconds:.2f} s, "
              f"peak RSS client {r.client_rss_mib:.1f} MiB, listener {r.listener_rss_mib:.1f} MiB)")
    print(f"ratio sockworks/socat: {rates['sockworks'] / rates['socat']:.2f} "
          f"(best of {args.rounds})")
    small = sockworks_pair(16 << 20)
    print(f"flat memory: sockworks peak RSS for 16 MiB: client {small.client_rss_mib:.1f} MiB, "
          f"listener {small.listener_rss_mib:.1f} MiB; for {args.size} MiB: "
          f"{best['sockworks'].client_rss_mib:.1f} / {best['sockworks'].listener_rss_mib:.1f} MiB")


if __name__ == "__main__":
    main()
