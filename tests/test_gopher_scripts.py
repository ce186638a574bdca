"""Gopher dynamic pages (``serve gopher --exec-scripts``): executable files
inside the root run, their output the item.

In process (the protocol with the real root and runner) for the rules, and
over real sockets through the CLI as a person runs it, with curl as a real
peer. Scripts that must overlap meet on FIFOs: events, never sleeps, decide
the order.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, recv_all, require_peer

from sockworks import Endpoint
from sockworks._protocol import Peer, Reply
from sockworks.gopher.fsroot import FileSystemRoot
from sockworks.gopher.scripts import SCRIPT_PATH, ScriptRunner
from sockworks.protocols.gopher import GopherProtocol, GopherSite, ScriptCall

SH = "/bin/sh"
# The names a script's environment holds, and no other (PATH aside, all
# from the request: nothing of the server's own environment).
ENV_NAMES = {
    "PATH", "GATEWAY_INTERFACE", "SERVER_SOFTWARE", "SERVER_PROTOCOL", "REQUEST_METHOD",
    "CONTENT_LENGTH", "SERVER_NAME", "SERVER_HOST", "SERVER_PORT", "DOCUMENT_ROOT",
    "SCRIPT_NAME", "SCRIPT_FILENAME", "SELECTOR", "REQUEST", "QUERY_STRING", "SEARCHREQUEST",
    "GOPHER_FILETYPE", "GOPHER_CHARSET", "REMOTE_ADDR", "REMOTE_HOST", "REMOTE_PORT",
}


def script(path: Path, body: str, interpreter: str = SH, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{interpreter}\n{body}")
    path.chmod(mode)
    return path


def make_tree(base: Path) -> tuple[Path, Path]:
    """The served root and a directory outside it (FIFOs, pid files, the
    outside script)."""
    root, outside = base / "root", base / "outside"
    outside.mkdir()
    script(root / "env.sh", 'echo "selector=$SELECTOR"\necho "query=$QUERY_STRING"\n'
           'echo "search=$SEARCHREQUEST"\necho "client=$REMOTE_ADDR:$REMOTE_PORT"\n'
           'echo ".dot line"\n')
    script(root / "env.py", "import os\nfor k in sorted(os.environ):\n"
           "    print(f'{k}={os.environ[k]}')\n", interpreter=sys.executable)
    script(root / "fail.sh", 'echo "half a page"\necho "database is down" >&2\nexit 3\n')
    script(root / "slow.sh", f'echo $$ > {outside}/slow.pid\nsleep 60 &\n'
           f'echo $! > {outside}/sleep.pid\nwait\n')
    script(root / "huge.sh", "exec yes 'a line of output that never ends'\n")
    script(root / "stdin.sh", 'cat\necho "stdin was empty"\n')
    script(root / "where.sh", "pwd\n")
    script(root / "menu" / "index.dcgi", 'echo "Generated at request time"\n'
           'printf "0The env page\\t/env.sh\\n"\nprintf "0Relative\\tlocal.txt\\n"\n')
    (root / "plain.sh").write_text("#!/bin/sh\necho this must not run\n")
    (root / "plain.sh").chmod(0o644)
    # Meet on FIFOs outside the root: each blocks until the other runs.
    os.mkfifo(outside / "to-a")
    os.mkfifo(outside / "to-b")
    script(root / "a.sh", f'read x < {outside}/to-a\necho "a heard $x"\n'
           f'echo from-a > {outside}/to-b\n')
    script(root / "b.sh", f'echo from-b > {outside}/to-a\nread y < {outside}/to-b\n'
           'echo "b heard $y"\n')
    # An executable outside the root, and a symlink to it inside.
    script(outside / "secret.sh", f"touch {outside}/secret-ran\necho SECRET-OUTPUT\n")
    (root / "escape.sh").symlink_to(outside / "secret.sh")
    return root, outside


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tree(tmp_path_factory.mktemp("scripts"))


# -- in process: the protocol with the real root and runner -----------------


def ask(site: GopherSite, line: bytes, peer: Peer | None = None) -> bytes:
    """The whole answer to ``line``, offloaded work run here."""
    proto = GopherProtocol(site)
    proto.on_connect(peer or Peer("192.0.2.7", 40001), Peer("127.0.0.1", 7070))
    out: Reply = proto.answer(line)
    while out.offload is not None:
        done = out.offload()
        assert isinstance(done, Reply)
        out = Reply(data=out.data + done.data, close=done.close, reason=done.reason)
    if out.file is not None:
        return Path(out.file.path).read_bytes()
    return out.data


def site_for(root: Path) -> GopherSite:
    fsroot = FileSystemRoot(str(root))
    return GopherSite(root=fsroot, scripts=ScriptRunner(fsroot.directory))


def test_off_by_default_an_executable_is_its_bytes(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    site = GopherSite(root=FileSystemRoot(str(root)))
    assert ask(site, b"/env.sh").startswith(b'#!/bin/sh\r\necho "selector=$SELECTOR"')


def test_the_environment_is_the_request_and_nothing_else(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    site = site_for(root)
    out = ask(site, b"/env.py\tzebra stripes").decode()
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    env.pop("LC_CTYPE", None)  # set by Python itself in a C locale (PEP 538)
    assert set(env) == ENV_NAMES
    assert env["PATH"] == SCRIPT_PATH == "/usr/bin:/bin"
    assert env["SELECTOR"] == env["REQUEST"] == env["SCRIPT_NAME"] == "/env.py"
    assert env["SEARCHREQUEST"] == "zebra stripes" and env["QUERY_STRING"] == ""
    assert env["REMOTE_ADDR"] == "192.0.2.7" and env["REMOTE_PORT"] == "40001"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", "7070")
    assert env["SCRIPT_FILENAME"] == str((root / "env.py").resolve())
    assert env["DOCUMENT_ROOT"] == str(root.resolve()) and env["GOPHER_FILETYPE"] == "0"


def test_a_script_is_offloaded_to_the_threads_for_waiting_work(tree: tuple[Path, Path]) -> None:
    proto = GopherProtocol(site_for(tree[0]))
    proto.on_connect(Peer("127.0.0.1", 1), None)
    reply = proto.answer(b"/env.sh")
    assert isinstance(reply, Reply) and reply.offload is not None and reply.offload_waits


def test_query_after_question_mark_and_text_dot_stuffed(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    out = ask(site_for(root), b"/env.sh?name=Ada")
    assert out == (b"selector=/env.sh?name=Ada\r\nquery=name=Ada\r\nsearch=\r\n"
                   b"client=192.0.2.7:40001\r\n..dot line\r\n.\r\n")


def test_unix_client_has_no_address(tree: tuple[Path, Path]) -> None:
    out = ask(site_for(tree[0]), b"/env.py", peer=Peer(path="unix-peer")).decode()
    assert "REMOTE_ADDR" not in out and "SELECTOR=/env.py" in out


def test_stdin_is_empty_and_cwd_is_the_scripts_directory(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    site = site_for(root)
    assert ask(site, b"/stdin.sh") == b"stdin was empty\r\n.\r\n"
    assert ask(site, b"/where.sh") == str(root.resolve()).encode() + b"\r\n.\r\n"


def test_dcgi_output_is_a_menu(tree: tuple[Path, Path]) -> None:
    root, _ = tree
    site = site_for(root)
    assert ask(site, b"/menu/index.dcgi") == (
        b"iGenerated at request time\t\tnull.host\t1\r\n"
        b"0The env page\t/env.sh\t127.0.0.1\t7070\r\n"
        b"0Relative\t/menu/local.txt\t127.0.0.1\t7070\r\n.\r\n"
    )
    # Listed as a menu item, with scripts on; sniffed as text with them off.
    assert b"1index.dcgi\t/menu/index.dcgi\t" in ask(site, b"/menu")
    off = GopherSite(root=FileSystemRoot(str(root)))
    assert b"0index.dcgi\t/menu/index.dcgi\t" in ask(off, b"/menu")


def test_non_executable_file_is_served_as_its_bytes(tree: tuple[Path, Path]) -> None:
    assert ask(site_for(tree[0]), b"/plain.sh") == (
        b"#!/bin/sh\r\necho this must not run\r\n.\r\n"
    )


def test_symlink_to_an_executable_outside_is_refused(tree: tuple[Path, Path]) -> None:
    root, outside = tree
    site = site_for(root)
    for line in (b"/escape.sh", b"/escape.sh?x", b"/escape.sh\tq"):
        out = ask(site, line)
        assert out.startswith(b"3") and b"SECRET" not in out
    assert not (outside / "secret-ran").exists()


def test_failure_is_type_3_and_a_warning(tree: tuple[Path, Path],
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="sockworks.gopher"):
        out = ask(site_for(tree[0]), b"/fail.sh")
    assert out.startswith(b"3Script failed\t") and b"half a page" not in out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.endswith("fail.sh: exit 3 (answered with an error)") for m in warnings)
    assert any("fail.sh: stderr: database is down" in m for m in warnings)


def test_output_over_the_cap_stops_the_script(tree: tuple[Path, Path]) -> None:
    """``yes`` never ends: the run ends at the cap, not at the time limit,
    so no more than the cap (plus a read) was ever held."""
    root, _ = tree
    runner = ScriptRunner(str(root.resolve()), max_output=64 << 10, timeout=30)
    started = time.monotonic()
    result = runner.run(ScriptCall(str((root / "huge.sh").resolve()), "/huge.sh", "/huge.sh",
                                   "", "", "0", "127.0.0.1", 70, "", 0))
    assert result.failure == f"output over {64 << 10} bytes" and result.output == b""
    assert result.message == "Script output too large"
    assert time.monotonic() - started < 30


def test_busy_beyond_the_bound(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    started = tmp_path / "started"
    os.mkfifo(started)
    blocker = script(root / "bound" / "block.sh", f"echo up > {started}\nread x < {gate}\n")
    runner = ScriptRunner(str(root.resolve()), max_running=1, timeout=30)
    call = ScriptCall(str(blocker.resolve()), "/bound/block.sh", "/bound/block.sh", "", "", "0",
                      "127.0.0.1", 70, "", 0)
    results = []
    first = threading.Thread(target=lambda: results.append(runner.run(call)))
    first.start()
    try:
        assert started.read_text() == "up\n"  # the first one is running
        second = runner.run(call)
        assert second.busy and second.message == "Too many scripts running; try again later"
    finally:
        gate.write_text("go\n")
        first.join(30)
    assert results[0].failure is None


# -- over real sockets, through the CLI ---------------------------------------


@pytest.fixture(scope="module")
def server(tree: tuple[Path, Path]) -> Iterator[tuple[CLIProcess, Endpoint]]:
    root, _ = tree
    proc = CLIProcess(["serve", "gopher", "--root", str(root), "--exec-scripts",
                       "--script-timeout", "2", "-l", "tcp:127.0.0.1:0"])
    try:
        (endpoint,) = proc.wait_listening(1)
        yield proc, endpoint
    finally:
        assert proc.stop() == 0


def fetch(endpoint: Endpoint, line: bytes, timeout: float = 15.0) -> bytes:
    with connect(endpoint, timeout) as sock:
        sock.sendall(line + b"\r\n")
        return recv_all(sock)


def test_cli_off_by_default(tree: tuple[Path, Path]) -> None:
    proc = CLIProcess(["serve", "gopher", "--root", str(tree[0]), "-l", "tcp:127.0.0.1:0"])
    try:
        (endpoint,) = proc.wait_listening(1)
        assert fetch(endpoint, b"/env.sh").startswith(b'#!/bin/sh\r\necho "selector=')
        assert "run as pages" not in proc.log
    finally:
        assert proc.stop() == 0


def test_cli_scripts_see_the_request(server: tuple[CLIProcess, Endpoint]) -> None:
    proc, endpoint = server
    with connect(endpoint) as sock:
        sock.sendall(b"/env.sh\tsearch words\r\n")
        me = sock.getsockname()
        out = recv_all(sock)
    assert out == (b"selector=/env.sh\r\nquery=\r\nsearch=search words\r\n"
                   + f"client={me[0]}:{me[1]}\r\n".encode() + b"..dot line\r\n.\r\n")
    env = fetch(endpoint, b"/env.py?a=1").decode()
    assert "QUERY_STRING=a=1\r\n" in env and "SELECTOR=/env.py?a=1\r\n" in env
    # The server runs with PYTHONUNBUFFERED=1 (conftest): none of it leaks in.
    assert "PYTHONUNBUFFERED" not in env and "VIRTUAL_ENV" not in env
    assert "executable files run as pages (--exec-scripts, 2 s each)" in proc.log


def test_cli_curl_gets_a_page(server: tuple[CLIProcess, Endpoint]) -> None:
    curl = require_peer("curl")
    _, endpoint = server
    out = subprocess.run(
        [curl, "-sS", "--max-time", "15", f"gopher://127.0.0.1:{endpoint.port}/0/env.sh"],
        capture_output=True, check=True, timeout=20,
    ).stdout
    assert out.startswith(b"selector=/env.sh\r\n") and b"client=127.0.0.1:" in out


def test_cli_timeout_kills_and_reaps(server: tuple[CLIProcess, Endpoint],
                                     tree: tuple[Path, Path]) -> None:
    proc, endpoint = server
    _, outside = tree
    started = time.monotonic()
    out = fetch(endpoint, b"/slow.sh")
    took = time.monotonic() - started
    assert out.startswith(b"3Script timed out\t"), out
    assert took >= 2.0  # not before the limit
    print(f"\ntimed out after {took:.2f} s (limit 2 s)")
    # The script was reaped before the answer went out: no zombie of ours.
    pid = int((outside / "slow.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()
    # Its child (sleep 60, in its process group) was killed too; whoever
    # inherited it reaps it, so wait for that (a condition, not a time).
    sleep_pid = int((outside / "sleep.pid").read_text())
    deadline = time.monotonic() + 10
    while _running(sleep_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(sleep_pid)
    proc.wait_for(r"script .*slow\.sh: timed out after 2 s \(answered with an error\)")


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cli_huge_output_is_an_error_with_bounded_memory(
    server: tuple[CLIProcess, Endpoint],
) -> None:
    proc, endpoint = server
    out = fetch(endpoint, b"/huge.sh")
    assert out.startswith(b"3Script output too large\t") and len(out) < 200, out[:200]
    proc.wait_for(r"huge\.sh: output over 4194304 bytes \(answered with an error\)")
    peak = _peak_rss(proc.proc.pid)
    print(f"\nserver peak RSS after the huge script: {peak / 1024:.1f} MiB")
    assert peak < 200 * 1024  # KiB; the cap is 4 MiB a script


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def test_cli_failure_logged(server: tuple[CLIProcess, Endpoint]) -> None:
    proc, endpoint = server
    out = fetch(endpoint, b"/fail.sh")
    assert out.startswith(b"3Script failed\t")
    proc.wait_for(r"WARNING sockworks\.gopher: script \S+/fail\.sh: exit 3 "
                  r"\(answered with an error\)")
    proc.wait_for(r"WARNING sockworks\.gopher: script \S+/fail\.sh: stderr: database is down")
    proc.wait_for(r"closed after .*script: exit 3.*asked '/fail\.sh'")


def test_cli_symlink_out_of_the_root_refused(server: tuple[CLIProcess, Endpoint],
                                             tree: tuple[Path, Path]) -> None:
    _, endpoint = server
    out = fetch(endpoint, b"/escape.sh")
    assert out.startswith(b"3") and b"SECRET" not in out
    assert not (tree[1] / "secret-ran").exists()


def test_cli_two_slow_scripts_run_at_once(server: tuple[CLIProcess, Endpoint]) -> None:
    """a.sh blocks until b.sh writes to it, and b.sh until a.sh answers:
    served one after the other, the first would time out."""
    _, endpoint = server
    answers: dict[str, bytes] = {}

    def get(name: str) -> None:
        answers[name] = fetch(endpoint, f"/{name}.sh".encode())

    threads = [threading.Thread(target=get, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == {"a": b"a heard from-b\r\n.\r\n", "b": b"b heard from-a\r\n.\r\n"}


def test_cli_stop_kills_running_scripts(tree: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGTERM while a script runs: after --grace it is killed, and the
    server exits 0 well before the script's own limit."""
    root, _ = tree
    started = tmp_path / "started"
    os.mkfifo(started)
    script(root / "stop" / "hang.sh", f"echo $$ > {started}\nexec sleep 60\n")
    proc = CLIProcess(["serve", "gopher", "--root", str(root), "--exec-scripts",
                       "--script-timeout", "60", "--grace", "0.5", "-l", "tcp:127.0.0.1:0"])
    (endpoint,) = proc.wait_listening(1)
    sock = connect(endpoint)
    try:
        sock.sendall(b"/stop/hang.sh\r\n")
        pid = int(started.read_text())  # it runs
        t0 = time.monotonic()
        assert proc.stop(timeout=20) == 0
        print(f"\nserver stopped {time.monotonic() - t0:.2f} s after SIGTERM, script running")
        assert time.monotonic() - t0 < 15
        assert not _running(pid)
    finally:
        sock.close()
        shutil.rmtree(root / "stop")


# -- configuration -------------------------------------------------------------


def test_config_keys(tree: tuple[Path, Path], tmp_path: Path) -> None:
    from sockworks._configfile import load_config
    from sockworks._errors import ConfigError
    from sockworks.services.gopher import GopherDriver

    def config(table: str) -> Path:
        path = tmp_path / "c.toml"
        path.write_text(f'[services.{table}\nlisten = ["tcp:127.0.0.1:0"]\n')
        return path

    loaded = load_config(config(f'gopher]\nroot = "{tree[0]}"\nexec_scripts = true\n'
                                "script_timeout = 3"))
    driver = loaded.services[0].handler
    assert isinstance(driver, GopherDriver) and driver.scripts is not None
    assert driver.scripts.timeout == 3
    off = load_config(config(f'gopher]\nroot = "{tree[0]}"')).services[0].handler
    assert isinstance(off, GopherDriver) and off.scripts is None
    for table, error in (
        ("echo]\nexec_scripts = true", "services.echo.exec_scripts: an option of the gopher"),
        (f'gopher]\nroot = "{tree[0]}"\nscript_timeout = 3',
         "services.gopher.script_timeout: needs exec_scripts"),
        (f'gopher]\nroot = "{tree[0]}"\nexec_scripts = true\nscript_timeout = 0',
         "services.gopher.script_timeout: expected seconds"),
        ("gopher]\nexec_scripts = 1", "services.gopher.exec_scripts: expected true or false"),
    ):
        with pytest.raises(ConfigError, match=re.escape(error)):
            load_config(config(table))


def test_cli_refuses_script_options_elsewhere() -> None:
    for args, error in (
        (["serve", "echo", "--exec-scripts"], "exec_scripts: an option of the gopher service"),
        (["serve", "gopher", "--script-timeout", "5"], "script_timeout: needs exec_scripts"),
    ):
        done = subprocess.run([sys.executable, "-m", "sockworks", *args, "-l", "tcp:127.0.0.1:0"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and error in done.stderr and "Traceback" not in done.stderr
