"""What the systemd and inetd tests share: sockets passed the way systemd
passes them (through the real systemd-socket-activate), a process whose
stderr is read line by line, and a NOTIFY_SOCKET of the test's own."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from conftest import ROOT, CLIProcess, require_peer

SOCKWORKS = [sys.executable, "-m", "sockworks"]

# Puts the given descriptors at 3, 4, ... (where sd_listen_fds looks),
# sets LISTEN_FDS and LISTEN_PID to this process (which exec keeps), then
# execs the rest of the command line: what systemd does before ExecStart.
_PASS = """\
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
for fd in set(fds + high) - set(range(3, 3 + len(fds))):
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class Command(list[str]):
    """A command line, and the descriptors it must be started with."""

    def __init__(self, argv: Sequence[str], fds: Sequence[int] = ()) -> None:
        super().__init__(argv)
        self.fds = tuple(fds)


def passing(sockets: Sequence[socket.socket], argv: Sequence[str]) -> Command:
    """``argv`` run with ``sockets`` passed as LISTEN_FDS (3, 4, ...)."""
    fds = [s.fileno() for s in sockets]
    return Command([sys.executable, "-c", _PASS, ",".join(map(str, fds)), *argv], fds)


def activate(
    sockets: Sequence[socket.socket], names: Sequence[str], argv: Sequence[str],
    *flags: str,
) -> Command:
    """``argv`` started by the real systemd-socket-activate, which gets
    ``sockets`` the way systemd would give them (and passes them on, with
    ``names`` as LISTEN_FDNAMES)."""
    program = require_peer("systemd-socket-activate")
    named = [f"--fdname={':'.join(names)}"] if names else []
    return passing(sockets, [program, *named, *flags, *argv])


class Started(CLIProcess):
    """Any command (not only ``python -m sockworks``), its stderr read by
    a thread like the cli fixture's; stdout is kept (it must stay empty)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        stdin: object = subprocess.DEVNULL,
        stdout: object = subprocess.PIPE,
        stderr: object = subprocess.PIPE,
    ) -> None:
        self.proc = subprocess.Popen(
            list(argv), stdin=stdin, stdout=stdout, stderr=stderr,  # type: ignore[arg-type]
            env=dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1"),
            cwd=ROOT, pass_fds=(*pass_fds, *getattr(argv, "fds", ())),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        if self.proc.stderr is not None:
            self._reader.start()

    def finish(self, timeout: float = 15.0) -> tuple[int, bytes]:
        """Wait for the exit; the status and everything written to stdout."""
        out = self.proc.stdout.read() if self.proc.stdout is not None else b""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.log}") from None
        if self._reader.is_alive():
            self._reader.join(2)
        return code, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


def unixgram_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    return s


class NotifySocket:
    """A NOTIFY_SOCKET of the test's own: what sockworks tells systemd."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # "@name": an abstract socket, bound with a leading NUL.
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address
        self.messages: list[dict[str, str]] = []

    def next(self, timeout: float = 10.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """The next message with ``key`` (others before it are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification; got {self.messages}")
            try:
                fields = self.next(left)
            except TimeoutError:
                raise AssertionError(f"no {key} notification; got {self.messages}") from None
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()
