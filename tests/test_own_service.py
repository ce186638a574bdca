"""Your own service run like a built-in one (issue 13, items 1-3): the
README's ``MODULE:NAME`` example exactly as written, every handler style,
config files, one-line errors; limits reaching a hand-written protocol;
``sockworks.serve()`` logging like the CLI."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, recv_all, run_cli

import sockworks

README = (ROOT / "README.md").read_text(encoding="utf-8")
# The console script beside this interpreter (as a user runs it, without
# python -m, which would put the current directory on sys.path by itself).
SCRIPT = Path(sys.executable).parent / "sockworks"


def readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


class InDir(CLIProcess):
    """A command started in ``cwd`` (conftest's CLIProcess runs
    ``python -m sockworks`` in ROOT), read the same way."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        # Nothing on PYTHONPATH: the module must be found through the
        # default --app-dir, the current directory.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=dict(env, PYTHONUNBUFFERED="1"),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()


def write(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


def test_readme_example_runs_exactly_as_written(tmp_path: Path) -> None:
    section = readme_section("Running your own service")
    module = re.search(r"```python\n(.*?)```", section, re.S)
    command = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert module and command
    assert len(module.group(1).splitlines()) == 5, "the README promises a five-line module"
    assert command.group(1) == "sockworks serve mymod:Upper -l tcp:127.0.0.1:9000"
    (tmp_path / "mymod.py").write_text(module.group(1), encoding="utf-8")
    # The very command, run from the module's directory, on port 0 instead of 9000.
    args = command.group(1).replace(":9000", ":0").split()
    assert SCRIPT.exists(), "the sockworks console script is not installed beside python"
    server = InDir([str(SCRIPT), *args[1:]], cwd=tmp_path)
    try:
        (endpoint,) = server.wait_listening()
        assert server.lines[0] == f"sockworks: mymod:Upper listening on {endpoint}"
        with connect(endpoint) as sock:
            sock.sendall(b"hello, world\n")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"HELLO, WORLD\n"
        server.wait_for(r"sockworks\.mymod:Upper: 127\.0\.0\.1:\d+ closed after .* 13 B in")
    finally:
        assert server.stop() == 0


STYLES = {
    "protocol": """
        import sockworks

        class Upper(sockworks.StreamProtocol):
            def on_data(self, data):
                return data.upper()
    """,
    "async": """
        async def upper(stream):
            while data := await stream.read(4096):
                await stream.write(data.upper())
    """,
    "blocking": """
        def upper(conn):
            while data := conn.recv(4096):
                conn.sendall(data.upper())
    """,
    "factory": """
        import sockworks

        def make_upper():
            class Upper(sockworks.StreamProtocol):
                def on_data(self, data):
                    return data.upper()
            return Upper
    """,
}
NAMES = {"protocol": "Upper", "async": "upper", "blocking": "upper", "factory": "make_upper"}


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_with_app_dir(cli: type[CLIProcess], tmp_path: Path, style: str) -> None:
    write(tmp_path, "shouting.py", STYLES[style])
    server = cli(["serve", f"shouting:{NAMES[style]}", "--app-dir", str(tmp_path),
                  "-l", "tcp:127.0.0.1:0", "--max-conns", "8"])
    (endpoint,) = server.wait_listening()
    with connect(endpoint) as sock:
        sock.sendall(b"abc")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"ABC"
    server.wait_for(r"closed after .* 3 B in, 3 B out")
    assert server.stop() == 0


def test_access_control_applies(cli: type[CLIProcess], tmp_path: Path) -> None:
    write(tmp_path, "shouting.py", STYLES["protocol"])
    server = cli(["serve", "shouting:Upper", "--app-dir", str(tmp_path),
                  "-l", "tcp:127.0.0.1:0", "--deny", "127.0.0.0/8"])
    (endpoint,) = server.wait_listening()
    with connect(endpoint) as sock:
        try:
            assert sock.recv(10) == b""  # closed at once, unheard
        except ConnectionResetError:
            pass
    server.wait_for(r"refused.*denied by 127\.0\.0\.0/8")
    assert server.stop() == 0


def test_config_file_service_by_reference(cli: type[CLIProcess], tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    write(tmp_path / "app", "shouting.py", STYLES["blocking"])
    config = write(tmp_path, "inetd.toml", """
        [services.upper]
        service = "shouting:upper"
        app_dir = "app"
        listen = ["tcp:127.0.0.1:0"]

        [services.echo]
        listen = ["tcp:127.0.0.1:0"]
    """)
    server = cli(["serve", "--config", str(config)])
    upper, _ = server.wait_listening(2)
    assert f"sockworks: upper listening on {upper}" in server.log
    with connect(upper) as sock:
        sock.sendall(b"xyz")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"XYZ"
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("source", "reference", "message"),
    [
        (None, "nosuchmod:Upper", r"nosuchmod:Upper: no module named 'nosuchmod' in .*"),
        ("X = 1\n", "mod:Upper", r"mod:Upper: .*mod\.py has no 'Upper'"),
        ("X = 1\n", "mod:X", r"mod:X: not a handler \(an object of type int\); expected a "
         r"StreamProtocol"),
        ("class Upper:\n    pass\n", "mod:Upper", r"mod:Upper: the class Upper is not a handler"),
        ("raise RuntimeError('no database')\n", "mod:X",
         r"mod:X: importing mod failed: RuntimeError: no database"),
        ("def f(:\n", "mod:f", r"mod:f: importing mod failed: SyntaxError: .*\(mod\.py, line 1\)"),
        ("import nosuchdependency\n", "mod:X",
         r"mod:X: importing mod failed: ModuleNotFoundError: No module named 'nosuchdependency'"),
        ("def make():\n    raise ValueError('bad')\n", "mod:make",
         r"mod:make: the factory make\(\) failed: ValueError: bad"),
    ],
)
def test_mistakes_are_one_line(tmp_path: Path, source: str | None, reference: str,
                               message: str) -> None:
    if source is not None:
        write(tmp_path, "mod.py", source)
    done = run_cli("serve", reference, "--app-dir", str(tmp_path), "-l", "tcp:127.0.0.1:0")
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(f"sockworks: error: {message}", err), err


def test_no_listener_and_builtin_options(tmp_path: Path) -> None:
    write(tmp_path, "mod.py", STYLES["protocol"])
    done = run_cli("serve", "mod:Upper", "--app-dir", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.decode() == (
        "sockworks: error: mod:Upper has no default listener: give one with -l, "
        "e.g. sockworks serve mod:Upper -l tcp:127.0.0.1:9000\n"
    )
    done = run_cli("serve", "mod:Upper", "--app-dir", str(tmp_path), "-l", "tcp:127.0.0.1:0",
                   "--token", "x")
    assert done.returncode == 2
    assert done.stderr.decode().startswith(
        "sockworks: error: --token does not apply to the mod:Upper service"
    )


# -- item 3: the limits reach a hand-written protocol ------------------------

LINES = """
    import sockworks

    class Lines(sockworks.StreamProtocol):
        def on_connect(self, peer):
            self.buffer = sockworks.LineBuffer(self.limits.max_line)

        def on_data(self, data):
            self.buffer.feed(data)
            out = b""
            while (line := self.buffer.next_line()) is not None:
                out += b"%d\\n" % len(line)
            return out
"""


def test_max_line_reaches_a_hand_written_protocol(cli: type[CLIProcess], tmp_path: Path) -> None:
    # The README's "Writing a service" example, word for word.
    assert textwrap.dedent(LINES).split("\n", 2)[2] in readme_section("Writing a service")
    write(tmp_path, "lines.py", LINES)
    server = cli(["serve", "lines:Lines", "--app-dir", str(tmp_path), "-l", "tcp:127.0.0.1:0",
                  "--max-line", "10"])
    (endpoint,) = server.wait_listening()
    with connect(endpoint) as sock:
        sock.sendall(b"0123456789\nshort\n")  # 10 bytes: at the limit, taken
        got = b""
        while got != b"10\n5\n":
            data = sock.recv(100)
            assert data, got
            got += data
        sock.sendall(b"x" * 11 + b"\n")  # one over: the connection is closed
        assert recv_all(sock) == b""
    server.wait_for(r"closed after .*line longer than 10 bytes")
    assert server.stop() == 0


# -- item 2: sockworks.serve() logs like the CLI -----------------------------

SERVE_SCRIPT = """
import logging, sys
import sockworks

class Upper(sockworks.StreamProtocol):
    def on_data(self, data):
        return data.upper()

mode = sys.argv[1]
if mode == "configured":
    logging.basicConfig(level=logging.INFO, format="APP %(name)s %(message)s")

def ready(server):
    print("ready", server.endpoints[0][1], flush=True)

sockworks.serve(Upper, "tcp:127.0.0.1:0", on_ready=ready, log=mode != "off",
                access=sockworks.AccessPolicy(per_source=4))
"""


def run_serve_script(tmp_path: Path, mode: str) -> tuple[str, bytes]:
    script = write(tmp_path, "app.py", SERVE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("ready "), proc.stderr.read() if proc.stderr else line
        endpoint = sockworks.parse_endpoint(line.split()[1])
        with connect(endpoint) as sock:
            sock.sendall(b"hi")
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    return err.decode(), reply


def test_python_serve_logs_by_default(tmp_path: Path) -> None:
    err, reply = run_serve_script(tmp_path, "default")
    assert reply == b"HI"
    assert re.search(r"^\S+ INFO sockworks\.Upper: listening on tcp:127\.0\.0\.1:\d+$", err, re.M)
    assert re.search(r"INFO sockworks\.Upper: 127\.0\.0\.1:\d+ connected", err), err
    assert re.search(r"closed after .* 2 B in, 2 B out", err), err


def test_python_serve_uses_the_applications_logging(tmp_path: Path) -> None:
    err, _ = run_serve_script(tmp_path, "configured")
    lines = err.splitlines()
    assert [line for line in lines if "listening on" in line] == [
        next(line for line in lines if line.startswith("APP sockworks.Upper listening on"))
    ], err  # once, in the application's format: no second handler of ours
    assert any(re.match(r"APP sockworks\.Upper .* connected", line) for line in lines), err


def test_python_serve_log_off(tmp_path: Path) -> None:
    err, reply = run_serve_script(tmp_path, "off")
    assert reply == b"HI"
    assert "listening" not in err and "connected" not in err, err


def test_access_types_are_public() -> None:
    from sockworks._access import AccessPolicy

    assert sockworks.AccessPolicy is AccessPolicy
    assert "AccessPolicy" in sockworks.__all__
