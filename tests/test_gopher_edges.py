"""Issue 13, items 5-9: the Gopher server and client at their edges.

Unreadable files and roots, the default root of an installed package, the
selector in the access log, a client that streams with a size cap, and
Ctrl-C during a download. Each test failed before its fix.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, recv_all, wait_until

from sockworks import Endpoint
from sockworks.gopher.fsroot import FileSystemRoot
from sockworks.gopher.root import Node, RootError

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


class Served(CLIProcess):
    """``python -m sockworks ARGS`` with a chosen working directory, user
    and environment (CLIProcess always runs as us, in the checkout)."""

    def __init__(self, args: Sequence[str], *, cwd: Path = ROOT,
                 prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "sockworks", *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env or ENV,
        )
        self.lines = []
        self._queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()


@pytest.fixture
def served() -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(args: Sequence[str], **kw: object) -> Served:
        proc = Served(args, **kw)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def gopher_request(ep: Endpoint, line: bytes) -> bytes:
    with connect(ep) as sock:
        sock.sendall(line)
        return recv_all(sock)


# -- item 5: what the server cannot read -------------------------------------


def bound_by_modes() -> list[str]:
    """A command prefix under which mode 000 means unreadable. Root reads
    everything (CAP_DAC_OVERRIDE): as root, the server runs without the
    two capabilities that bypass file modes (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, "--bounding-set", caps, "--inh-caps", caps]


def test_unreadable_files_are_type3_errors_and_logged_warnings(
        tmp_path: Path, served: Callable[..., Served]) -> None:
    (tmp_path / "ok.txt").write_bytes(b"fine\n")
    (tmp_path / "secret.txt").write_bytes(b"small text\n")
    (tmp_path / "big.txt").write_bytes(b"a line of text\n" * 150_000)  # 2 MiB: streamed
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))  # 1 MiB: by sendfile
    for name in ("secret.txt", "big.txt", "big.bin"):
        (tmp_path / name).chmod(0)
    proc = served(["serve", "gopher", "--root", str(tmp_path), "-l", "tcp:127.0.0.1:0"],
                  prefix=bound_by_modes())
    (ep,) = proc.wait_listening(1)
    assert gopher_request(ep, b"/ok.txt\r\n") == b"fine\r\n.\r\n"
    for name in ("secret.txt", "big.txt", "big.bin"):
        answer = gopher_request(ep, f"/{name}\r\n".encode())
        assert answer.startswith(b"3Not readable\t"), (name, answer[:60])
        proc.wait_for(rf"WARNING sockworks\.gopher: cannot read \S*{re.escape(name)}: ")
    assert proc.stop() == 0
    assert "Traceback" not in proc.log
    print("\n".join(line for line in proc.lines if "WARNING" in line))


def test_a_root_the_server_cannot_read_is_an_error_at_start(tmp_path: Path) -> None:
    root = tmp_path / "closed"
    root.mkdir()
    root.chmod(0)
    res = subprocess.run(
        [*bound_by_modes(), sys.executable, "-m", "sockworks", "serve", "gopher",
         "--root", str(root), "-l", "tcp:127.0.0.1:0"],
        capture_output=True, timeout=30, cwd=ROOT, env=ENV,
    )
    err = res.stderr.decode()
    print(err)
    assert res.returncode != 0
    assert err.count("\n") == 1 and "Permission denied" in err and str(root) in err
    assert "listening on" not in err


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_a_read_error_is_not_empty_data(tmp_path: Path) -> None:
    # /proc/self/mem is a regular file whose read at offset 0 fails (EIO),
    # for root too: an OS error while reading, as a failing disk gives.
    root = FileSystemRoot(str(tmp_path))
    node = Node(("mem",), "file", "/proc/self/mem", 100)
    with pytest.raises(RootError, match="not readable"):
        root.read(node, 100)
    assert root.head(node, 100) == b""  # a type guess only: never an error


# -- item 6: the default root ---------------------------------------------------


def test_default_root_is_the_shipped_hole_never_the_current_directory(
        tmp_path: Path, served: Callable[..., Served]) -> None:
    # The package as an install has it (the hole's symlink followed, as in
    # a wheel), away from any source tree, run from a directory that must
    # not be published.
    site = tmp_path / "site"
    shutil.copytree(ROOT / "src" / "sockworks", site / "sockworks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    here = tmp_path / "home"
    here.mkdir()
    (here / "private.txt").write_bytes(b"my secrets\n")
    env = dict(ENV, PYTHONPATH=str(site))
    proc = served(["serve", "gopher", "-l", "tcp:127.0.0.1:0"], cwd=here, env=env)
    (ep,) = proc.wait_listening(1)
    line = proc.wait_for(r"sockworks\.gopher: serving (\S+)").string
    print(line)
    assert str(site / "sockworks" / "hole") in line
    menu = gopher_request(ep, b"\r\n")
    assert b"private.txt" not in menu
    assert b"the documentation, as a Gopher hole" in menu
    assert proc.stop() == 0


# -- item 7: the selector on the closing log line -------------------------------


def test_closing_log_line_names_the_selector_sanitised(
        tmp_path: Path, served: Callable[..., Served]) -> None:
    (tmp_path / "a.txt").write_bytes(b"a\n")
    proc = served(["serve", "gopher", "--root", str(tmp_path), "-l", "tcp:127.0.0.1:0"])
    (ep,) = proc.wait_listening(1)
    gopher_request(ep, b"/a.txt\r\n")
    proc.wait_for(r"closed after .*, asked '/a\.txt'$")
    gopher_request(ep, b"/x\x1b[31m\xff\tred\r\n")  # a terminal escape, bad UTF-8, a query
    hostile = proc.wait_for(r"closed after .*, asked '/x").string
    assert "\x1b" not in hostile
    assert hostile.endswith(r"asked '/x\x1b[31m\\xff\tred'")
    gopher_request(ep, b"/" + b"y" * 5000 + b"\r\n")
    long = proc.wait_for(r"closed after .*, asked '/yyy").string
    assert long.endswith("'...") and len(long) < 300
    assert proc.stop() == 0
    print("\n".join(line for line in proc.lines if "asked" in line))


# -- item 8: the client streams, with a size cap --------------------------------


def client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sockworks", "gopher", *args]


def wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """Wait for ``proc``; its own peak RSS in KiB, the high-water mark of
    its memory after it started (``VmHWM``), sampled until it exits.
    (wait4's ``ru_maxrss`` would not do: Linux keeps the peak of the
    process image replaced by exec in it, and a child forked from a large
    test run starts with that run's size.)"""
    deadline = time.monotonic() + timeout
    peak = 0
    status_file = f"/proc/{proc.pid}/status"
    while True:
        try:
            with open(status_file) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            pass  # gone (a zombie has no VmHWM line either)
        pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return peak
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the client did not stop")
        time.sleep(0.02)  # sampling, not ordering: the peak is read as it grows


@pytest.fixture
def chargen(served: Callable[..., Served]) -> Endpoint:
    """A server that never stops sending: a hostile Gopher server."""
    proc = served(["serve", "chargen", "-l", "tcp:127.0.0.1:0", "-q", "--timeout", "0"])
    (ep,) = proc.wait_listening(1)
    return ep


def test_client_stops_at_max_size(chargen: Endpoint) -> None:
    proc = subprocess.Popen(
        client_cmd(f"127.0.0.1:{chargen.port}", "/", "--raw", "--max-size", "100k"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out, err = proc.communicate(timeout=60)
    print(err.decode())
    assert proc.returncode == 1
    assert len(out) == 100 * 1024
    assert err.decode().count("\n") == 1 and "--max-size 100.0 KiB" in err.decode()


def test_client_memory_stays_bounded_far_past_its_buffers(chargen: Endpoint) -> None:
    # 256 MiB of text through the client: it used to hold all of it (and a
    # copy); streamed, its peak stays what Python and one chunk need.
    cap = 256 << 20
    proc = subprocess.Popen(
        client_cmd(f"127.0.0.1:{chargen.port}", "/", "--type", "0", "--max-size", str(cap)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    assert proc.stderr is not None
    peak_kib = wait_with_rusage(proc, timeout=120)
    err = proc.stderr.read().decode()
    print(f"client peak RSS {peak_kib / 1024:.1f} MiB after {cap >> 20} MiB; {err.strip()}")
    assert proc.returncode == 1 and f"stopped after {cap} bytes" in err
    assert peak_kib < 96 * 1024  # MiB: well under the stream, a handful of chunks at most


class OneShotServer:
    """A Gopher server on 127.0.0.1:0 that sends ``first``, waits until the
    test says the client showed it (or 20 s), then sends ``rest`` and closes."""

    def __init__(self, first: bytes, rest: bytes) -> None:
        self.first, self.rest = first, rest
        self.shown = threading.Event()
        self.sent_first = threading.Event()
        self.released_in_time: bool | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(self.first)
            self.sent_first.set()
            self.released_in_time = self.shown.wait(20)
            try:
                conn.sendall(self.rest)
            except OSError:
                pass

    def close(self) -> None:
        self.shown.set()
        self.thread.join(30)
        self.listener.close()


@pytest.mark.parametrize(("selector", "first", "rest", "shown"), [
    ("/big.txt", b"the first line\r\n", b"the second\r\n.\r\n", b"the first line\n"),
    ("/", b"iWelcome\t\tnull.host\t1\r\n", b"0A file\t/a.txt\th\t70\r\n.\r\n", b"Welcome\n"),
])
def test_client_shows_the_first_line_before_the_item_ends(
        selector: str, first: bytes, rest: bytes, shown: bytes) -> None:
    server = OneShotServer(first, rest)
    try:
        proc = subprocess.Popen(client_cmd(f"127.0.0.1:{server.port}", selector),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # before the server sends the rest
        server.shown.set()
        out, err = proc.communicate(timeout=30)
    finally:
        server.close()
    print(repr(line), repr(out))
    assert line.strip() == shown.strip()
    assert server.released_in_time is True, "the client showed nothing until the item ended"
    assert proc.returncode == 0, err


# -- item 9: Ctrl-C during a download --------------------------------------------


def test_ctrl_c_during_a_download_says_so_removes_the_part_and_exits_130(
        tmp_path: Path) -> None:
    server = OneShotServer(os.urandom(300_000), b"never sent")
    try:
        proc = subprocess.Popen(
            client_cmd(f"127.0.0.1:{server.port}", "/image.iso", "--type", "9", "-o", "image.iso"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=ENV)

        def partial() -> bool:
            return any(p.stat().st_size > 0 for p in tmp_path.glob(".sockworks-*.part"))

        wait_until(partial, what="the partial file to fill")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        server.close()
    print(err.decode())
    assert proc.returncode == 130
    assert err.decode().count("\n") == 1 and "interrupted" in err.decode()
    assert list(tmp_path.iterdir()) == []  # no partial file, nothing under the name

