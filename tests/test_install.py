"""A plain (not editable) ``pip install`` into a new virtual environment,
run from an empty directory: the Gopher server serves the documentation
hole that ships with the package, and ``sockworks serve MODULE:NAME`` runs
a user's own protocol class (issue 13, "What must be shown").

The install needs PyPI (setuptools to build, uvloop to run): without it the
tests skip, unless SOCKWORKS_REQUIRE_PEERS=1 (CI) makes that a failure.
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REQUIRE_PEERS, ROOT, recv_all

# The documentation hole's title line (docs/gophermap), as a menu shows it.
HOLE_TITLE = "sockworks: the documentation, as a Gopher hole"
LISTENING = re.compile(r"listening on tcp:([\d.]+):(\d+)")
# What is not part of the package, and would only slow the copy down.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
)

MYMOD = '''\
import sockworks

class Upper(sockworks.StreamProtocol):
    def on_data(self, data):
        return data.upper()
'''


def clean_env() -> dict[str, str]:
    """The environment without anything that would reach the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cannot(message: str) -> None:
    if REQUIRE_PEERS:
        pytest.fail(message + "; SOCKWORKS_REQUIRE_PEERS=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment with sockworks installed from a copy of
    this tree (so the build leaves nothing in the checkout)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    # symlinks=True: the package's hole/ is a link to docs/, as in git.
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    try:
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", str(source)],
            capture_output=True, text=True, timeout=180, env=clean_env(),
        )
    except subprocess.TimeoutExpired:
        cannot("pip install of sockworks took over 180 s (no network to PyPI?)")
    if result.returncode != 0:
        cannot("pip cannot install sockworks here (no network to PyPI?): "
               + (result.stderr.strip().splitlines() or ["no output"])[-1])
    where = subprocess.run(
        [str(python), "-c", "import sockworks; print(sockworks.__file__)"],
        capture_output=True, text=True, cwd=base, env=clean_env(), check=True,
    ).stdout.strip()
    assert where.startswith(str(env_dir)), f"sockworks imported from {where}, not the new venv"
    return env_dir


class Served:
    """``<venv>/bin/sockworks ARGS`` run in ``cwd``, stderr read by a thread."""

    def __init__(self, venv: Path, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "sockworks"), *args],
            cwd=cwd, env=clean_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def address(self, timeout: float = 20.0) -> tuple[str, int]:
        """The host and port of the first ``listening on`` line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("not listening:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(
                    f"sockworks exited ({self.proc.wait()}):\n" + "\n".join(self.lines)
                )
            if match := LISTENING.search(line):
                return match.group(1), int(match.group(2))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def served(venv: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_installed_gopher_serves_the_documentation_hole(
    venv: Path, tmp_path: Path, served: list[Served]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = Served(venv, empty, "serve", "gopher", "-l", "tcp:127.0.0.1:0")
    served.append(server)
    address = server.address()
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"\r\n")
        menu = recv_all(sock).decode(errors="replace")
    print("\n".join(server.lines))
    print(menu.splitlines()[0])
    assert HOLE_TITLE in menu, f"the root menu from an empty directory:\n{menu}"
    assert server.stop() == 0, "\n".join(server.lines)


def test_installed_serve_module_name(venv: Path, tmp_path: Path, served: list[Served]) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "mymod.py").write_text(MYMOD)
    server = Served(venv, app, "serve", "mymod:Upper", "-l", "tcp:127.0.0.1:0")
    served.append(server)
    address = server.address()
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"hello, world\n")
        sock.shutdown(socket.SHUT_WR)
        answer = recv_all(sock)
    print("\n".join(server.lines))
    assert answer == b"HELLO, WORLD\n"
    assert server.stop() == 0, "\n".join(server.lines)
