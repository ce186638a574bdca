"""``sockworks serve exec``: a program per connection (issue 12, exec services).

Real programs nobody here wrote (cat, sha256sum, wc, sh, env, tcpserver
for comparison) on real loopback sockets; events are ordered by what the
peers say (a line, EOF, a log line), never by sleeping.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, has_ipv6, recv_all, require_peer, run_cli

from sockworks import Endpoint
from sockworks._configfile import load_config
from sockworks._drivers.exec import ExecDriver, make_command
from sockworks._errors import ConfigError
from sockworks.testing import running

PYTHON = sys.executable
CLOSED = r"{peer}\S* closed after [\d.]+ s, \d+ B in, \d+ B out \((.*)\)$"


def start(cli: type[CLIProcess], *program: str, options: tuple[str, ...] = (),
          listen: str = "tcp:127.0.0.1:0") -> tuple[CLIProcess, Endpoint]:
    proc = cli(["serve", "exec", "-l", listen, *options, "--", *program])
    (endpoint,) = proc.wait_listening()
    return proc, endpoint


def exchange(endpoint: Endpoint, payload: bytes, limit: int = 1 << 28) -> bytes:
    """Send ``payload`` (from a thread, so that neither side blocks the
    other), then shut down our write side; return all that comes back."""
    sock = connect(endpoint, timeout=30)

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return recv_all(sock, limit)
    finally:
        sender.join()
        sock.close()


def client_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def closing_line(proc: CLIProcess, peer: socket.socket | str) -> str:
    """The reason on the server's closing line for the connection from ``peer``."""
    name = peer if isinstance(peer, str) else client_name(peer)
    return proc.wait_for(CLOSED.format(peer=re.escape(name))).group(1)


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` is neither running nor a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z" and os.getppid() == pid:  # pragma: no cover - never ours
            return False
        time.sleep(0.02)  # polling a condition, not ordering events
    return False


# -- real programs, real payloads ----------------------------------------------


def test_cat_returns_a_large_binary_payload_byte_for_byte(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "cat")
    payload = os.urandom(8 << 20)
    echoed = exchange(endpoint, payload)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert proc.stop() == 0


def test_sha256sum_and_wc_see_every_byte_and_answer_after_eof(cli: type[CLIProcess]) -> None:
    # Upload: the client half-closes, the program sees EOF on stdin, and its
    # answer, written after that, still reaches the client.
    payload = os.urandom(16 << 20)
    proc, endpoint = start(cli, "sha256sum")
    answer = exchange(endpoint, payload).decode()
    assert answer.split()[0] == hashlib.sha256(payload).hexdigest()
    proc.stop()
    proc, endpoint = start(cli, "wc", "-c")
    assert exchange(endpoint, payload).strip() == str(len(payload)).encode()
    assert proc.stop() == 0


def test_download_ends_with_eof_after_all_output(cli: type[CLIProcess], tmp_path: Path) -> None:
    # Download: the program writes, exits, and the client gets every byte
    # and then EOF (the kernel's FIN after the data; nothing in between).
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(12 << 20))
    proc, endpoint = start(cli, "sh", "-c", f"cat {blob}")
    with connect(endpoint, timeout=30) as sock:
        got = recv_all(sock, 1 << 28)
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob.read_bytes()).digest()
    assert proc.stop() == 0


def test_a_python_script_reads_a_line_and_answers(cli: type[CLIProcess], tmp_path: Path) -> None:
    script = tmp_path / "answer.py"
    script.write_text(
        "import sys\n"
        "line = sys.stdin.readline().strip()\n"
        "print(f'hello {line}, from {len(line)} characters', flush=True)\n"
        "print('bye')\n"
    )
    proc, endpoint = start(cli, PYTHON, str(script))
    with connect(endpoint) as sock:
        sock.sendall(b"sockworks\n")
        # The client keeps its side open: the answer comes, then EOF.
        assert recv_all(sock) == b"hello sockworks, from 9 characters\nbye\n"
        peer = client_name(sock)
    assert closing_line(proc, peer).startswith("exit 0; bytes unknown")
    assert proc.stop() == 0


def test_half_close_both_ways_in_one_session(cli: type[CLIProcess]) -> None:
    # The client shuts down its write side halfway: `cat` sees EOF, writes
    # what is left and exits; the client reads every byte, then EOF.
    proc, endpoint = start(cli, "sh", "-c", "cat; echo after-eof")
    with connect(endpoint) as sock:
        sock.sendall(b"one\ntwo\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"one\ntwo\nafter-eof\n"
    assert proc.stop() == 0


def test_arguments_after_the_first_double_dash_are_the_programs(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "sh", "-c", 'echo "$0|$1|$2"', "zero", "--", "-l")
    with connect(endpoint) as sock:
        assert recv_all(sock) == b"zero|--|-l\n"
    proc.stop()


# -- the environment -----------------------------------------------------------


def env_of(endpoint: Endpoint) -> dict[str, str]:
    with connect(endpoint) as sock:
        sock.shutdown(socket.SHUT_WR)
        text = recv_all(sock).decode()
    return dict(line.split("=", 1) for line in text.splitlines())


def test_environment_matches_tcpservers(cli: type[CLIProcess]) -> None:
    tcpserver = require_peer("tcpserver")
    env_program = shutil.which("env") or "/usr/bin/env"
    path = "/usr/local/bin:/usr/bin:/bin"
    # tcpserver passes its own environment on: start it with PATH only.
    # -HR: no DNS or ident lookups (sockworks does none); -l0: no local
    # lookup (it then sets TCPLOCALHOST=0); -1: print the port.
    ts = subprocess.Popen(
        [tcpserver, "-1", "-HRl0", "127.0.0.1", "0", env_program],
        stdout=subprocess.PIPE, env={"PATH": path},
    )
    try:
        assert ts.stdout is not None
        port = int(ts.stdout.readline())
        theirs = env_of(Endpoint("tcp", "127.0.0.1", port))
    finally:
        ts.terminate()
        ts.wait()
    # sockworks runs with a full environment of its own: none of it leaks.
    os.environ["SOCKWORKS_SECRET_TEST_VALUE"] = "must not leak"
    try:
        proc, endpoint = start(cli, "env")
    finally:
        del os.environ["SOCKWORKS_SECRET_TEST_VALUE"]
    ours = env_of(endpoint)
    proc.stop()
    # The documented differences: systemd's names are added; tcpserver's
    # TCPLOCALHOST comes from -l (sockworks does no host name lookups).
    assert set(ours) - set(theirs) == {"REMOTE_ADDR", "REMOTE_PORT"}, (ours, theirs)
    assert set(theirs) - set(ours) == {"TCPLOCALHOST"}, (ours, theirs)
    for key in ("PATH", "PROTO", "TCPLOCALIP", "TCPREMOTEIP"):
        assert ours[key] == theirs[key], key
    assert ours["PATH"] == path and ours["PROTO"] == "TCP"
    assert ours["TCPLOCALPORT"] == str(endpoint.port)
    assert ours["REMOTE_ADDR"] == ours["TCPREMOTEIP"] == "127.0.0.1"
    assert ours["REMOTE_PORT"] == ours["TCPREMOTEPORT"] and ours["TCPREMOTEPORT"].isdigit()


def test_env_pass_env_and_workdir(cli: type[CLIProcess], tmp_path: Path) -> None:
    proc, endpoint = start(
        cli, "sh", "-c", 'echo "$GREETING|$HOME|$(pwd)"',
        options=("--env", "GREETING=hi there", "--pass-env", "HOME", "--workdir", str(tmp_path)),
    )
    with connect(endpoint) as sock:
        assert recv_all(sock).decode() == f"hi there|{os.environ['HOME']}|{tmp_path}\n"
    assert proc.stop() == 0


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback")
def test_ipv6_is_tcp6(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "env", listen="tcp:[::1]:0")
    env = env_of(endpoint)
    proc.stop()
    assert env["PROTO"] == "TCP6" and env["TCPREMOTEIP"] == env["TCPLOCALIP"] == "::1"


def test_unix_socket_is_proto_unix(cli: type[CLIProcess], tmp_path: Path) -> None:
    path = tmp_path / "exec.sock"
    proc, endpoint = start(cli, "env", listen=f"unix:{path}")
    env = env_of(endpoint)
    proc.stop()
    assert env["PROTO"] == "UNIX" and env["UNIXLOCALPATH"] == str(path)
    assert env["UNIXREMOTEPID"] == str(os.getpid())
    assert not any(k.startswith("TCP") for k in env)


# -- descriptors, zombies, stderr, exit status ------------------------------------


def test_the_program_gets_the_socket_and_a_pipe_and_nothing_else(tmp_path: Path) -> None:
    # The server inherits an extra descriptor (as from a careless parent):
    # it must not reach the program either.
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    proc = subprocess.Popen(
        [PYTHON, "-m", "sockworks", "serve", "exec", "-l", "tcp:127.0.0.1:0",
         "--", "sh", "-c", "echo $$; exec cat"],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, pass_fds=(leak_r,), cwd=ROOT,
    )
    os.close(leak_r)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            pid = int(reader.readline())
            sock.sendall(b"ping\n")
            assert reader.readline() == b"ping\n"  # `exec cat` has happened
            fds = {name: os.readlink(f"/proc/{pid}/fd/{name}")
                   for name in os.listdir(f"/proc/{pid}/fd")}
            assert sorted(fds) == ["0", "1", "2"], fds
            assert fds["0"] == fds["1"] and fds["0"].startswith("socket:")
            assert fds["2"].startswith("pipe:")
            # The server's own socket for this connection is already closed:
            # the program holds the only copy.
            server_fds = {os.readlink(f"/proc/{proc.pid}/fd/{n}")
                          for n in os.listdir(f"/proc/{proc.pid}/fd")}
            assert fds["0"] not in server_fds
            sock.shutdown(socket.SHUT_WR)
            assert reader.read() == b""
        assert process_gone(pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        os.close(leak_w)


def test_child_is_reaped_and_exit_status_logged(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "sh", "-c", "echo $$; exit 3")
    with connect(endpoint) as sock:
        pid = int(recv_all(sock))
        reason = closing_line(proc, sock)
    assert reason == "exit 3; bytes unknown: the program had the socket"
    # Logged after the reap: no zombie is left behind, right then.
    assert not Path(f"/proc/{pid}").exists()
    proc.stop()


def test_stderr_goes_to_the_log_a_bounded_line_at_a_time(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(
        cli, "sh", "-c",
        "echo 'only to stderr' >&2; printf 'evil\\033[2Jescape\\n' >&2;"
        " head -c 100000 /dev/zero | tr '\\0' x >&2; echo >&2; echo last >&2; kill -TERM $$",
    )
    with connect(endpoint) as sock:
        assert recv_all(sock) == b""  # nothing on stdout
        peer = client_name(sock)
        assert closing_line(proc, peer).startswith("killed by SIGTERM; ")
    log = proc.log
    assert re.search(rf"INFO sockworks\.exec: {re.escape(peer)}: stderr: only to stderr$",
                     log, re.M), log
    assert "stderr: evil\\x1b[2Jescape" in log  # control characters escaped
    long_line = next(line for line in log.splitlines() if "stderr: xxx" in line)
    assert long_line.endswith("x...") and len(long_line) < 1200
    # The closing line comes after every stderr line of that connection.
    assert log.index("stderr: last") < log.index(f"{peer} closed after")
    proc.stop()


def test_program_that_exits_early(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "echo", "early")
    with connect(endpoint) as sock:
        assert recv_all(sock) == b"early\n"
    assert proc.stop() == 0


# -- limits and shutdown ------------------------------------------------------------


def test_session_timeout_sends_sigterm(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "sh", "-c", "echo ready; exec cat",
                           options=("--timeout", "0.5"))
    with connect(endpoint) as sock:
        assert sock.recv(100) == b"ready\n"
        assert recv_all(sock) == b""  # ended by the server, not by us
        assert closing_line(proc, sock).startswith("session timeout (0.5 s), killed by SIGTERM")
    assert proc.stop() == 0


def test_server_sigterm_gives_children_sigterm_then_sigkill(cli: type[CLIProcess]) -> None:
    stubborn = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: os.write(1, b'TERM ignored\\n'))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    polite = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 1; done"
    proc = cli(["serve", "exec", "-l", "tcp:127.0.0.1:0", "--grace", "1", "--", PYTHON, "-c",
                stubborn])
    (endpoint,) = proc.wait_listening()
    proc2, endpoint2 = start(cli, "sh", "-c", polite)
    with connect(endpoint) as sock, connect(endpoint2) as sock2:
        assert sock.recv(100) == b"ready\n" and sock2.recv(100) == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        proc2.send_signal(signal.SIGTERM)
        assert recv_all(sock) == b"TERM ignored\n"  # then SIGKILL: EOF
        assert recv_all(sock2) == b"got TERM\n"
    assert "grace period of 1.0 s over: aborting 1 connection(s)" in proc.log
    reason = closing_line(proc, "127.0.0.1")
    assert re.match(r"server stopping, (then SIGKILL|killed by SIGKILL)", reason), reason
    assert closing_line(proc2, "127.0.0.1").startswith("server stopping, exit 0")
    # Both were signalled already: they exit 0 on their own.
    assert proc.proc.wait(15) == 0 and proc2.proc.wait(15) == 0


def test_instances_refuse_beyond_and_serve_within(cli: type[CLIProcess]) -> None:
    proc, endpoint = start(cli, "sh", "-c", "echo hi; read x; echo bye",
                           options=("--instances", "50", "--per-source", "0"))
    socks = [socket.socket() for _ in range(200)]
    for sock in socks:
        sock.settimeout(30)
        sock.connect((endpoint.host, endpoint.port))
    served, refused = [], []
    for sock in socks:
        try:
            first = sock.recv(3)
        except ConnectionResetError:
            first = b""
        (served if first == b"hi\n" else refused).append(sock)
    assert len(served) == 50 and len(refused) == 150
    for sock in served:
        sock.sendall(b"done\n")
        assert recv_all(sock) == b"bye\n"
    for sock in socks:
        sock.close()
    # A slot is free again: a new connection is served.
    with connect(endpoint) as sock:
        assert sock.recv(3) == b"hi\n"
        sock.sendall(b"x\n")
        assert recv_all(sock) == b"bye\n"
    assert "refused: more than 50 connections" in proc.log or "refused" in proc.log
    assert proc.stop() == 0


def server_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_flooding_a_program_that_never_reads_costs_the_server_nothing(
    cli: type[CLIProcess],
) -> None:
    proc, endpoint = start(cli, "sh", "-c", "echo ready; exec sleep 60")
    before = server_rss(proc.proc.pid)
    with connect(endpoint) as sock:
        assert sock.recv(100) == b"ready\n"
        sock.setblocking(False)
        chunk = b"\0" * 65536
        sent = 0
        for _ in range(4096):  # 256 MiB offered; the kernel takes a few MiB
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the program's socket took 256 MiB")
    grown = server_rss(proc.proc.pid) - before
    assert sent < 64 << 20 and grown < 1 << 20, (sent, grown)
    assert proc.stop() == 0


# -- bad input -----------------------------------------------------------------------


def test_missing_or_not_executable_program_is_an_error_before_binding(tmp_path: Path) -> None:
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    for program, why in (
        ("no-such-program-sockworks", "not found in PATH"),
        (str(plain), "is not executable"),
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "gone"), "No such file or directory"),
    ):
        result = run_cli("serve", "exec", "-l", "tcp:127.0.0.1:0", "--", program)
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert err.count("\n") == 1 and why in err and "listening" not in err, err
    result = run_cli("serve", "exec", "-l", "tcp:127.0.0.1:0")
    assert result.returncode == 2 and "exec: no program to run" in result.stderr.decode()
    result = run_cli("serve", "echo", "-l", "tcp:127.0.0.1:0", "--", "cat")
    assert result.returncode == 2
    assert "exec: only the exec service runs a program" in result.stderr.decode()
    result = run_cli("serve", "exec", "--", "cat")
    assert result.returncode == 2 and "no default listener" in result.stderr.decode()


def test_datagram_listener_is_a_clear_error() -> None:
    result = run_cli("serve", "exec", "-l", "udp:127.0.0.1:0", "--", "cat")
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "exec serves stream endpoints only; inetd's wait mode is not supported" in err, err


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('exec = "cat -n"', r'services\.x\.exec: expected a list such as \["cat", "-u"\]'),
        ("exec = []", r"services\.x\.exec: empty command"),
        ("exec = [1]", r"services\.x\.exec: expected a list of strings"),
        ('exec = ["cat"]\nenv = ["A"]', r"services\.x\.env: expected a table of strings"),
        ('exec = ["cat"]\nenv = { "A B" = "1" }', r"services\.x\.env: 'A B' is not an environ"),
        ('exec = ["cat"]\nworkdir = "/nonexistent/dir"',
         r"services\.x\.workdir: working directory '/nonexistent/dir' is not a directory"),
        ('exec = ["no-such-program-sockworks"]', r"services\.x\.exec: program .* not found"),
        ("", r"services\.x\.exec: no program to run"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "exec.toml"
    path.write_text(f'[services.x]\nservice = "exec"\nlisten = ["tcp:127.0.0.1:0"]\n{table}\n')
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + message):
        load_config(path)


def test_config_file_runs_an_exec_service(tmp_path: Path, cli: type[CLIProcess]) -> None:
    path = tmp_path / "exec.toml"
    path.write_text(
        '[services.hello]\nservice = "exec"\nlisten = ["tcp:127.0.0.1:0"]\n'
        'exec = ["sh", "-c", "echo $GREETING $PROTO"]\nenv = { GREETING = "hello" }\n'
    )
    loaded = load_config(path)
    (config,) = loaded.services
    assert config.access is not None and config.access.instances == 64
    assert config.access.per_source == 16
    proc = cli(["serve", "--config", str(path)])
    (endpoint,) = proc.wait_listening()
    with connect(endpoint) as sock:
        assert recv_all(sock) == b"hello TCP\n"
    assert proc.stop() == 0


def test_spawn_failure_is_logged_and_the_server_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The process limit (fork's EAGAIN) simulated: RLIMIT_NPROC does not
    # bind root, which the CI runs as.
    real_spawn = os.posix_spawn
    failures = iter([True, False])

    def spawn(*args: object, **kw: object) -> int:
        if next(failures, False):
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_spawn(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "posix_spawn", spawn)
    driver = ExecDriver(make_command(["echo", "served"]))
    with caplog.at_level("INFO"), running(driver, "tcp:127.0.0.1:0", name="exec") as server:
        with connect(server.endpoint()) as sock:
            assert recv_all(sock) == b""  # closed at once
        with connect(server.endpoint()) as sock:
            assert recv_all(sock) == b"served\n"
    text = caplog.text
    assert "cannot start" in text and "Resource temporarily unavailable" in text
    assert "(the process limit?)" in text

