"""Shared test helpers: real peer programs, and the CLI as a user runs it."""

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

from sockworks import Endpoint, parse_endpoint

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_PEERS = os.environ.get("SOCKWORKS_REQUIRE_PEERS") == "1"
LISTENING = re.compile(r"listening on (\S+)")


def require_peer(program: str) -> str:
    """The path of a real peer program; skip (or fail under
    SOCKWORKS_REQUIRE_PEERS=1, as in CI) when it is not installed."""
    path = shutil.which(program)
    if path is None:
        message = f"peer program {program!r} is not installed (apt-get install it)"
        if REQUIRE_PEERS:
            pytest.fail(message + "; SOCKWORKS_REQUIRE_PEERS=1 makes this a failure")
        pytest.skip(message)
    return path


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait for a state the test can observe (a file, a process gone, a
    count) where nothing signals it, not for a length of time."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.01)


class CLIProcess:
    """``python -m sockworks ARGS`` in a subprocess, its stderr collected
    by a thread so that the test can wait for lines without blocking."""

    def __init__(self, args: Sequence[str], *, stdin: int | None = subprocess.DEVNULL) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockworks", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first stderr line (seen or still to come) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                seen += 1
                match = regex.search(line)
                if match:
                    return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no stderr line matched {pattern!r}; got:\n" + self.log)
            try:
                if self._queue.get(timeout=min(left, 0.2)) is None and self.proc.poll() is not None:
                    # The process ended: check what is left, then give up.
                    for line in self.lines[seen:]:
                        match = regex.search(line)
                        if match:
                            return match
                    raise AssertionError(
                        f"sockworks exited ({self.proc.returncode}) before {pattern!r}:\n"
                        + self.log
                    )
            except queue.Empty:
                pass

    def wait_count(self, pattern: str, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` stderr lines match ``pattern`` (seen or to come),
        woken by each new line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while sum(1 for line in list(self.lines) if regex.search(line)) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(
                    f"{count} lines matching {pattern!r} expected:\n{self.log}"
                )
            try:
                self._queue.get(timeout=min(left, 0.2))
            except queue.Empty:
                pass

    def wait_listening(self, count: int = 1, timeout: float = 10.0) -> list[Endpoint]:
        """Wait for ``count`` ``listening on`` lines; return their endpoints."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                parse_endpoint(m.group(1)) for line in self.lines if (m := LISTENING.search(line))
            ]
            if len(found) >= count:
                return found[:count]
            if self.proc.poll() is not None:
                self._reader.join(1)
                raise AssertionError(f"sockworks exited ({self.proc.returncode}):\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not listening after {timeout} s:\n{self.log}")
            time.sleep(0.02)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"sockworks did not stop within {timeout} s:\n{self.log}"
            ) from None
        self._reader.join(2)
        return code


@pytest.fixture
def cli() -> Iterator[type[CLIProcess]]:
    """Start ``sockworks`` subprocesses; all are stopped after the test."""
    started: list[CLIProcess] = []

    class Tracked(CLIProcess):
        def __init__(self, args: Sequence[str], **kw: object) -> None:
            super().__init__(args, **kw)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def run_cli(
    *args: str, timeout: float = 20.0, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``sockworks ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "sockworks", *args],
        capture_output=True,
        timeout=timeout,
        input=input,
        cwd=ROOT,
    )


def connect(endpoint: Endpoint, timeout: float = 5.0) -> socket.socket:
    """A connected client socket for a stream endpoint."""
    if endpoint.transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(endpoint.path)
        return sock
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    return sock


def recv_all(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    """Everything until the peer closes."""
    chunks = []
    total = 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def datagram_exchange(endpoint: Endpoint, payload: bytes, tmp_path: Path | None = None,
                      timeout: float = 5.0) -> tuple[bytes, object]:
    """Send one datagram and return (reply, sender)."""
    if endpoint.transport == "unixgram":
        assert tmp_path is not None, "a unixgram client needs a path to be answered on"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        client_path = str(tmp_path / f"client-{os.getpid()}-{time.monotonic_ns()}.sock")
        sock.bind(client_path)
        target: object = endpoint.path
    else:
        family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        target = (endpoint.host, endpoint.port)
    with sock:
        sock.settimeout(timeout)
        sock.sendto(payload, target)  # type: ignore[arg-type]
        return sock.recvfrom(65536)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
