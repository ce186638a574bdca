"""``sockworks serve exec`` against ``tcpserver`` (ucspi-tcp), same run.

Two measurements, each in paired rounds (sockworks then tcpserver, then
the other order), servers pinned to one core (their programs inherit it),
the load to the other:

* connections per second running a tiny C program that writes a line and
  exits (``connload`` from shared/bench: connect, read to EOF, close);
  target >= 0.8 x tcpserver;
* throughput of ``exec cat`` for one stream of SIZE bytes each way (a C
  client writes SIZE bytes and reads them back at once); target >= 0.9 x.

Both servers log nothing per connection (sockworks -q; tcpserver without
-v). Run: ``python benchmarks/exec_bench.py [--seconds 4] [--size 1G]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import (
    HOST,
    HarnessError,
    RunningServer,
    build_tools,
    choose_cpus,
    find_bench_sources,
    free_port,
    median,
    pinned,
)

HELLO_C = r"""
#include <unistd.h>
int main(void) { return write(1, "hello\n", 6) == 6 ? 0 : 1; }
"""

# One connection: a writer process sends SIZE bytes then shuts down its
# side; the reader counts what comes back until EOF. Prints seconds.
STREAM_C = r"""
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9;
}
int main(int c, char **v) {
  int port = atoi(v[2]); long long size = atoll(v[3]);
  struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_port = htons(port);
  inet_pton(AF_INET, v[1], &a.sin_addr);
  int s = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(s, (void *)&a, sizeof a) < 0) { perror("connect"); return 1; }
  static char buf[1 << 17];
  double t0 = now();
  pid_t w = fork();
  if (w == 0) {
    memset(buf, 'x', sizeof buf);
    long long left = size;
    while (left > 0) { ssize_t n = write(s, buf, left < (long long)sizeof buf ? left : sizeof buf);
      if (n <= 0) { perror("write"); _exit(1); } left -= n; }
    shutdown(s, SHUT_WR); _exit(0);
  }
  long long got = 0; ssize_t n;
  while ((n = read(s, buf, sizeof buf)) > 0) got += n;
  waitpid(w, 0, 0);
  printf("seconds=%.6f bytes=%lld\n", now() - t0, got);
  return got == size ? 0 : 2;
}
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def compile_c(source: str, into: Path, name: str) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise HarnessError("gcc is not installed")
    path = into / f"{name}.c"
    path.write_text(source)
    subprocess.run([gcc, "-O2", "-o", str(into / name), str(path)], check=True)
    return into / name


def start_sockworks(program: list[str], cpu: int | None, logdir: Path) -> RunningServer:
    server = RunningServer(
        "sockworks",
        [sys.executable, "-m", "sockworks", "serve", "exec", "-l", f"tcp:{HOST}:0", "-q",
         "--instances", "1000", "--per-source", "0", "--", *program],
        cpu, logdir,
    )
    server.wait_ready()
    return server


def start_tcpserver(program: list[str], cpu: int | None, logdir: Path) -> RunningServer:
    tcpserver = shutil.which("tcpserver")
    if tcpserver is None:
        raise HarnessError("tcpserver is not installed (apt-get install ucspi-tcp)")
    port = free_port()
    server = RunningServer(
        "tcpserver", [tcpserver, "-HRl0", "-c", "1000", HOST, str(port), *program],
        cpu, logdir, port=port,
    )
    server.wait_ready()
    return server


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each cps run")
    ap.add_argument("--procs", type=int, default=4, help="connload processes")
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="stream size (1G)")
    ap.add_argument("--rounds", type=int, default=2, help="paired rounds (each order once)")
    ap.add_argument("--bench-src", help="directory with connload.c (shared/bench)")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    server_cpu, load_cpu = choose_cpus(args.no_pin, 0, 1)
    src = find_bench_sources(args.bench_src, ("connload.c",))
    with tempfile.TemporaryDirectory(prefix="exec-bench-") as tmp:
        work = Path(tmp)
        build_tools(src, work, ["connload"])
        hello = compile_c(HELLO_C, work, "hello")
        stream = compile_c(STREAM_C, work, "stream")
        cat = shutil.which("cat") or "/bin/cat"
        starts = {"sockworks": start_sockworks, "tcpserver": start_tcpserver}
        cps: dict[str, list[float]] = {k: [] for k in starts}
        secs: dict[str, list[float]] = {k: [] for k in starts}
        cps_ratio: list[float] = []
        tput_ratio: list[float] = []
        for rnd in range(args.rounds):
            order = list(starts) if rnd % 2 == 0 else list(reversed(starts))
            got: dict[str, float] = {}
            for name in order:
                server = starts[name]([str(hello)], server_cpu, work)
                try:
                    out = run(pinned(load_cpu, [str(work / "connload"), HOST, str(server.port),
                                                str(args.procs), str(args.seconds)]))
                finally:
                    server.stop()
                got[name] = float(out.split("cps=")[1].split()[0])
                cps[name].append(got[name])
            cps_ratio.append(got["sockworks"] / got["tcpserver"])
            took: dict[str, float] = {}
            for name in order:
                server = starts[name]([cat], server_cpu, work)
                try:
                    out = run(pinned(load_cpu, [str(stream), HOST, str(server.port),
                                                str(args.size)]))
                finally:
                    server.stop()
                took[name] = float(out.split("seconds=")[1].split()[0])
                secs[name].append(took[name])
            tput_ratio.append(took["tcpserver"] / took["sockworks"])
            print(f"round {rnd + 1}: cps sockworks {got['sockworks']:.0f}, tcpserver "
                  f"{got['tcpserver']:.0f}; cat {args.size >> 20} MiB sockworks "
                  f"{took['sockworks']:.2f} s, tcpserver {took['tcpserver']:.2f} s", flush=True)
    mib = args.size / (1 << 20)
    print()
    print(f"connections/s running a C program that writes a line ({args.procs} clients):")
    print(f"  sockworks {median(cps['sockworks']):8.0f}   tcpserver "
          f"{median(cps['tcpserver']):8.0f}   ratio {median(cps_ratio):.2f} x (target >= 0.8)")
    print(f"exec cat, {mib:.0f} MiB each way in one connection:")
    print(f"  sockworks {mib / median(secs['sockworks']):7.0f} MiB/s   tcpserver "
          f"{mib / median(secs['tcpserver']):7.0f} MiB/s   ratio {median(tput_ratio):.2f} x "
          "(target >= 0.9)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HarnessError as exc:
        print(f"exec_bench: {exc}", file=sys.stderr)
        sys.exit(1)
