"""Helpers for the netcat tests: processes with files for stdin/stdout/stderr
(so multi-MiB transfers never block on a pipe), free ports, and waiting for
a peer program to be bound (peers print no readiness line; the kernel's
socket tables say when they are)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from sockworks.cli import main

SOCKWORKS = [sys.executable, "-m", "sockworks"]
ROOT = Path(__file__).resolve().parent.parent


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 1) -> bytes:
    """All 256 byte values, then ``size`` pseudo-random bytes."""
    return bytes(range(256)) + random.Random(seed).randbytes(size)


class Proc:
    def __init__(self, argv: Sequence[str], tmp: Path, name: str,
                 stdin: bytes | str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        stdin_arg: int | object
        self._stdin_file = None
        if stdin == "pipe":
            stdin_arg = subprocess.PIPE
        elif isinstance(stdin, bytes):
            in_path = tmp / f"{name}.in"
            in_path.write_bytes(stdin)
            self._stdin_file = in_path.open("rb")
            stdin_arg = self._stdin_file
        else:
            stdin_arg = subprocess.DEVNULL
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                list(argv), stdin=stdin_arg, stdout=out, stderr=err, cwd=ROOT,  # type: ignore[arg-type]
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )

    @property
    def out(self) -> bytes:
        return self.out_path.read_bytes()

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish; stderr:\n{self.err}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._stdin_file is not None:
            self._stdin_file.close()

    def wait_err(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.err)
            if match:
                return match
            if self.proc.poll() is not None and not re.search(pattern, self.err):
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} in stderr:\n{self.err}")
            time.sleep(0.02)

    def endpoint(self) -> str:
        return self.wait_err(r"listening on (\S+)").group(1)

    def wait_out(self, size: int, timeout: float = 15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            data = self.out
            if len(data) >= size:
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {len(data)} of {size} bytes; "
                                     f"stderr:\n{self.err}")
            time.sleep(0.02)


class Procs:
    """Starts processes for one test and kills whatever is left after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Proc] = []

    def run(self, argv: Sequence[str], name: str, stdin: bytes | str | None = None,
            env: Mapping[str, str] | None = None) -> Proc:
        proc = Proc(argv, self.tmp, name, stdin, env)
        self.started.append(proc)
        return proc

    def sockworks(self, *args: str, name: str = "sockworks",
                  stdin: bytes | str | None = None,
                  env: Mapping[str, str] | None = None) -> Proc:
        return self.run([*SOCKWORKS, *args], name, stdin, env)

    def cleanup(self) -> None:
        for proc in self.started:
            proc.kill()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_bound(transport: str, where: int | str, timeout: float = 10.0) -> None:
    """Until something is listening (tcp, unix) or bound (udp, unixgram) there."""
    deadline = time.monotonic() + timeout
    while not _bound(transport, where):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing bound on {transport} {where} after {timeout} s")
        time.sleep(0.02)


def _bound(transport: str, where: int | str) -> bool:
    if transport in ("unix", "unixgram"):
        kind = "0001" if transport == "unix" else "0002"
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == where and fields[4] == kind and (
                transport == "unixgram" or fields[3] == "00010000"
            ):
                return True
        return False
    table, state = ("tcp", "0A") if transport == "tcp" else ("udp", "07")
    suffix = f":{int(where):04X}"
    for name in (table, table + "6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == state:
                return True
    return False


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``sockworks ARGS`` run in this process (fast: no interpreter start),
    for errors raised before any stdin is read."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, capsys.readouterr().err


def one_line(capsys: pytest.CaptureFixture[str], status: int, fragment: str, *args: str) -> None:
    code, err = in_process(capsys, *args)
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def tcp_address(endpoint: str) -> tuple[str, int]:
    """``tcp:127.0.0.1:PORT`` (as ``listening on`` reports it) as a socket address."""
    host, port = endpoint.removeprefix("tcp:").rsplit(":", 1)
    return host.strip("[]"), int(port)


def tls_bystander(address: tuple[str, int], cafile: str, *, source: str = "127.0.0.3",
                  timeout: float = 5.0) -> float:
    """A well-behaved TLS client from another loopback address: connects,
    shakes hands, says hello and reads to EOF. Returns the seconds from
    ``connect()`` to the finished handshake; fails the test if the
    handshake does not finish within ``timeout``."""
    context = ssl.create_default_context(cafile=cafile)
    start = time.monotonic()
    try:
        with socket.create_connection(address, timeout=timeout,
                                      source_address=(source, 0)) as raw, \
                context.wrap_socket(raw, server_hostname=address[0]) as tls:
            elapsed = time.monotonic() - start
            tls.sendall(b"hello\n")
            while tls.recv(4096):
                pass
    except TimeoutError:
        raise AssertionError(f"the well-behaved client from {source} was not served "
                             f"within {timeout} s") from None
    return elapsed


# The start of a TLS ClientHello: a handshake record that announces 512
# bytes, of which only the first few ever come.
PARTIAL_CLIENT_HELLO = bytes.fromhex("160301020001") + bytes.fromhex("0001fc0303") + b"\0" * 8


def read_all(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything ``sock`` receives until the peer's EOF (a reset fails the test)."""
    sock.settimeout(timeout)
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def read_line(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """One line, read a byte at a time so that nothing after it is consumed."""
    sock.settimeout(timeout)
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"EOF after {line!r}, before a whole line")
        line += byte
    return line


def children(pid: int) -> list[int]:
    """The live (or zombie) child processes of ``pid``."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def wait_no_children(pid: int, timeout: float = 10.0) -> None:
    """Until every child of ``pid`` has been reaped (a zombie still counts)."""
    deadline = time.monotonic() + timeout
    while left := children(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"children of {pid} not reaped: {left}")
        time.sleep(0.02)
