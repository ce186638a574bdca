"""docs/deploy.md's examples, run as written (only a fixed port becomes
port 0, and a config file path is the test's own)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

from conftest import ROOT, CLIProcess, connect, recv_all

DEPLOY = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")


def example(contains: str) -> str:
    """The one ```sh block of deploy.md holding ``contains``."""
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", DEPLOY, re.S) if contains in b]
    assert len(blocks) == 1, f"deploy.md has {len(blocks)} examples with {contains!r}"
    return blocks[0].strip()


def test_workers_example(cli: type[CLIProcess]) -> None:
    command = example("--workers 2")
    args = command.split()[1:]  # "sockworks" is python -m sockworks here
    args = [a.replace("127.0.0.1:7007", "127.0.0.1:0") for a in args]
    server = cli(args)
    [endpoint] = server.wait_listening(1)
    with connect(endpoint) as s:
        s.sendall(b"deployed")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"deployed"
    assert server.stop() == 0


def test_reload_example(cli: type[CLIProcess], tmp_path: Path) -> None:
    conf = tmp_path / "deploy.toml"
    conf.write_text(textwrap.dedent("""
        [services.echo]
        listen = ["tcp:127.0.0.1:0"]
    """), encoding="utf-8")
    start, reload = example("pkill -HUP").splitlines()
    # The example's commands, with this test's file for /etc/sockworks/services.toml.
    start = start.replace("/etc/sockworks/services.toml", str(conf)).removesuffix(" &")
    reload = reload.replace("/etc/sockworks/services.toml", str(conf))
    server = cli(start.split()[1:])  # "sockworks" is python -m sockworks here
    server.wait_listening(1)
    subprocess.run(["sh", "-c", reload], check=True, timeout=10)
    server.wait_for("SIGHUP received: reloading the configuration")
    server.wait_for("reloaded: 4 new worker")
    assert server.stop(signal.SIGTERM) == 0
