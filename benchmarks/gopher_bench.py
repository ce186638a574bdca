"""Gopher benchmark: sockworks against pygopherd and nginx, same machine, same run.

1. One 100 MiB file to 10 concurrent downloaders (threads that discard
   what they receive in the kernel, the same client for every server):
   aggregate throughput of sockworks (gopher), pygopherd (gopher) and
   nginx (the same file over HTTP/1.1, sendfile on, one worker).
2. The root menu of a 10,000-file directory: requests per second of
   sockworks and pygopherd, from client threads on keep-nothing
   connections (one request per connection, as Gopher is).

Run: ``.venv/bin/python benchmarks/gopher_bench.py`` (``--quick`` for a
smaller run). Needs nginx for the HTTP baseline (skipped with a
note when missing; run as root so nginx can write its temp files).
Everything listens on 127.0.0.1 ports picked by the kernel.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MiB = 1 << 20

PYGOPHERD_CONF = """\
[pygopherd]
detach = no
port = {port}
interface = 127.0.0.1
servertype = ForkingTCPServer
tracebacks = no
mimetypes = /etc/mime.types
encoding = [['.Z', 'compress'], ['.gz', 'gzip'], ['.bz2', 'bzip2']]
usechroot = no
root = {root}
timeout = 60
abstract_headers = no
abstract_entries = never

[logger]
logmethod = none
priority = LOG_NOTICE
facility = LOG_DAEMON

[GopherEntry]
defaultmimetype = text/plain
mapping = [['text/html', 'h'], ['text/.+', '0'], ['image/gif', 'g'], ['image/.+', 'I'],
           ['audio/.+', 's'], ['application/.+', '9'], ['.*', '0']]
eaexts = {{'.abstract': 'abstract'}}

[handlers.HandlerMultiplexer]
handlers = [dir.DirHandler, file.FileHandler]

[handlers.dir.DirHandler]
cachetime = 0
cachefile = .cache.pygopherd.dir
ignorepatt = /\\.|~$|/gophermap$

[protocols.ProtocolMultiplexer]
protocols = [rfc1436.GopherProtocol]
"""

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
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.05)


@contextmanager
def sockworks_server(root: Path) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockworks", "serve", "gopher", "--root", str(root),
         "-l", "tcp:127.0.0.1:0", "-q", "--max-conns", "4096"],
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    match = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"sockworks did not start: {line}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    try:
        yield int(match.group(1))
    finally:
        proc.terminate()
        proc.wait(20)


@contextmanager
def pygopherd_server(root: Path, work: Path) -> Iterator[int | None]:
    exe = shutil.which("pygopherd", path=os.path.dirname(sys.executable)) or shutil.which(
        "pygopherd")
    if exe is None:
        print("  (pygopherd is not installed: pip install pygopherd)")
        yield None
        return
    port = free_port()
    conf = work / "pygopherd.conf"
    conf.write_text(PYGOPHERD_CONF.format(port=port, root=root))
    proc = subprocess.Popen([exe, str(conf)], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_port(port, proc, "pygopherd")
    try:
        yield port
    finally:
        # ForkingTCPServer: stop the children too (its own process group).
        os.killpg(proc.pid, 15)
        proc.wait(20)


@contextmanager
def nginx_server(root: Path, work: Path) -> Iterator[int | None]:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                    else None)
    if exe is None:
        print("  (nginx is not installed: apt-get install nginx)")
        yield None
        return
    prefix = work / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root))
    proc = subprocess.Popen([exe, "-c", str(conf), "-p", str(prefix)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_port(port, proc, "nginx")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


def download(port: int, request: bytes, http: bool) -> int:
    """One download; returns the body's size. The bytes are discarded in
    the kernel (``MSG_TRUNC`` on a TCP socket: no copy to user space), so
    the client costs little and the server is what is measured."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(request)
        total = 0
        if http:  # read up to the end of the headers, then count the body
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(65536)
                if not chunk:
                    return 0
                head += chunk
            total = len(head) - head.index(b"\r\n\r\n") - 4
        while n := s.recv_into(DISCARD, len(DISCARD), socket.MSG_TRUNC):
            total += n
        return total


DISCARD = bytearray(1 << 20)


def parallel_download(port: int, request: bytes, clients: int, size: int,
                      http: bool = False) -> float:
    """Aggregate bytes/s of ``clients`` downloads at once (one thread each);
    every download is checked for its full size."""
    sizes = [0] * clients

    def worker(i: int) -> None:
        sizes[i] = download(port, request, http)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if any(s != size for s in sizes):
        raise SystemExit(f"incomplete downloads: {sizes}")
    return size * clients / elapsed


def menu_rate(port: int, seconds: float, threads: int) -> tuple[float, int]:
    """Root menus per second, each on its own connection, for ``seconds``."""
    counts = [0] * threads
    sizes = [0] * threads
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        buf = bytearray(1 << 20)
        while time.perf_counter() < stop:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"\r\n")
                total = 0
                while n := s.recv_into(buf):
                    total += n
            counts[i] += 1
            sizes[i] = total

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - start), max(sizes)


def uncached_menu_rate(directory: Path, seconds: float) -> float:
    """Root menus per second built from scratch every time (cache off)."""
    from sockworks import Reply
    from sockworks.gopher.fsroot import FileSystemRoot
    from sockworks.protocols.gopher import GopherProtocol, GopherSite

    site = GopherSite(FileSystemRoot(str(directory)), cache_bytes=0)
    count = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        reply = GopherProtocol(site, "127.0.0.1", 70).on_data(b"\r\n")
        # Uncached menus are built off the event loop: run that work here.
        if isinstance(reply, Reply) and reply.offload is not None:
            reply.offload()
        count += 1
    return count / (time.perf_counter() - start)


def best(runs: int, fn: Callable[[], float]) -> float:
    return max(fn() for _ in range(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 MiB file, 1 s of menus")
    parser.add_argument("--runs", type=int, default=3, help="best of N (default 3)")
    args = parser.parse_args()
    size = (10 if args.quick else 100) * MiB
    menu_seconds = 1.0 if args.quick else 3.0
    clients = 10

    with tempfile.TemporaryDirectory(prefix="gopher-bench-") as tmp:
        work = Path(tmp)
        files = work / "files"
        files.mkdir()
        with open(files / "big.bin", "wb") as f:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
        many = work / "many"
        many.mkdir()
        for i in range(10_000):
            (many / f"file{i:05d}.txt").write_bytes(b"x\n")

        print(f"1. one {size // MiB} MiB file to {clients} concurrent downloaders "
              f"(best of {args.runs})")
        results: dict[str, float] = {}
        with sockworks_server(files) as port:
            results["sockworks"] = best(
                args.runs, lambda: parallel_download(port, b"/big.bin\r\n", clients, size))
        with pygopherd_server(files, work) as pport:
            if pport is not None:
                results["pygopherd"] = best(
                    args.runs, lambda: parallel_download(pport, b"/big.bin\r\n", clients, size))
        with nginx_server(files, work) as nport:
            if nport is not None:
                get = b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                results["nginx (HTTP)"] = best(
                    args.runs, lambda: parallel_download(nport, get, clients, size, http=True))
        for name, rate in results.items():
            print(f"   {name:<20} {rate / MiB:10.0f} MiB/s")
        ours = results["sockworks"]
        if "pygopherd" in results:
            print(f"   sockworks / pygopherd = {ours / results['pygopherd']:.1f}x (target >= 5)")
        if "nginx (HTTP)" in results:
            print(f"   sockworks / nginx     = {ours / results['nginx (HTTP)']:.2f}x "
                  "(target >= 0.5)")

        print(f"\n2. root menu of a 10,000-file directory, 4 client threads, "
              f"{menu_seconds:g} s each (best of {args.runs})")
        rates: dict[str, float] = {}
        with sockworks_server(many) as port:
            menu_rate(port, 0.3, 4)  # warm the page cache
            rates["sockworks"] = best(args.runs, lambda: menu_rate(port, menu_seconds, 4)[0])
            menu_size = menu_rate(port, 0.2, 1)[1]
        with pygopherd_server(many, work) as pport:
            if pport is not None:
                menu_rate(pport, 0.3, 4)
                rates["pygopherd"] = best(args.runs,
                                          lambda: menu_rate(pport, menu_seconds, 4)[0])
        rates["sockworks, no cache"] = uncached_menu_rate(many, menu_seconds)
        for name, rate in rates.items():
            print(f"   {name:<20} {rate:10.1f} menus/s")
        print("   (no cache: the protocol in this process, its menu cache off, no network)")
        print(f"   (a menu is {menu_size / 1024:.0f} KiB)")
        if "pygopherd" in rates:
            print(f"   sockworks / pygopherd = {rates['sockworks'] / rates['pygopherd']:.1f}x "
                  "(target >= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
