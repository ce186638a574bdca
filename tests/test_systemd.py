"""systemd (issue 10): sockets passed by socket activation (``--listen
systemd:NAME``, ``fd:N``, every passed socket by default) through the real
systemd-socket-activate, readiness and the watchdog through a
NOTIFY_SOCKET of the test's own, and the example units in
examples/systemd/ checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _activation import (
    SOCKWORKS,
    NotifySocket,
    Started,
    activate,
    passing,
    tcp_listener,
    udp_socket,
    unix_listener,
    unixgram_socket,
)
from conftest import (
    LISTENING,
    ROOT,
    connect,
    datagram_exchange,
    recv_all,
    require_peer,
    wait_until,
)

from sockworks import _systemd, parse_endpoint

EXAMPLES = ROOT / "examples" / "systemd"


def echo_once(sock: socket.socket, payload: bytes = b"hello\n") -> bytes:
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def listening(proc: Started, count: int) -> list[tuple[str, str]]:
    """(endpoint, what follows it) of ``count`` ``listening on`` lines."""
    proc.wait_listening(count)
    out = []
    for line in proc.lines:
        match = re.search(r"listening on (\S+)(.*)$", line)
        if match:
            out.append((match.group(1), match.group(2).strip()))
    return out[:count]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(str(tmp_path / "notify"))
    yield sock
    sock.close()


# -- socket activation ----------------------------------------------------------


def test_systemd_name_and_index_through_systemd_socket_activate() -> None:
    web, admin = tcp_listener(), tcp_listener()
    with web, admin:
        proc = Started(activate(
            [web, admin], ["web", "admin"],
            [*SOCKWORKS, "serve", "echo", "-l", "systemd:admin", "-l", "systemd:0"],
        ))
        try:
            # systemd-socket-activate starts the service on the first
            # connection (socket activation): this one waits in the backlog.
            first = socket.create_connection(admin.getsockname(), timeout=10)
            lines = listening(proc, 2)
            host, port = admin.getsockname()
            assert lines[0] == (f"tcp:{host}:{port}", "(systemd:admin)")
            host, port = web.getsockname()
            assert lines[1] == (f"tcp:{host}:{port}", "(systemd:0)")
            assert echo_once(first) == b"hello\n"
            assert echo_once(socket.create_connection(web.getsockname(), timeout=10)) == b"hello\n"
            assert proc.stop() == 0
        finally:
            proc.kill()


def test_fd_n_takes_that_descriptor_and_leaves_it_usable(tmp_path: Path) -> None:
    listener = tcp_listener()
    with listener:
        fd = listener.fileno()
        proc = Started([*SOCKWORKS, "serve", "echo", "-l", f"fd:{fd}"], pass_fds=[fd])
        try:
            ((endpoint, source),) = listening(proc, 1)
            host, port = listener.getsockname()
            assert (endpoint, source) == (f"tcp:{host}:{port}", f"(fd:{fd})")
            assert echo_once(connect(parse_endpoint(endpoint))) == b"hello\n"
            assert proc.stop() == 0
        finally:
            proc.kill()
        # The socket outlives the process (systemd keeps its copy for the
        # next start): no drop filter was left on it, so a connection
        # attempt now is queued, not dropped, and is accepted here.
        with socket.create_connection(listener.getsockname(), timeout=2) as late:
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                late.sendall(b"x")
                assert conn.recv(1) == b"x"


def test_no_listen_serves_every_passed_socket_as_what_it_is(tmp_path: Path) -> None:
    """A TCP, a UDP, a Unix stream and a Unix datagram socket, passed with
    no --listen: each is served as its own transport, read from the socket."""
    unix_path, gram_path = tmp_path / "echo.sock", tmp_path / "echo.dgram"
    sockets = [tcp_listener(), udp_socket(), unix_listener(unix_path), unixgram_socket(gram_path)]
    try:
        proc = Started(activate(sockets, ["t", "u", "s", "g"], [*SOCKWORKS, "serve", "echo"]))
        try:
            first = socket.create_connection(sockets[0].getsockname(), timeout=10)
            lines = listening(proc, 4)
            tcp_host, tcp_port = sockets[0].getsockname()
            udp_host, udp_port = sockets[1].getsockname()
            assert lines == [
                (f"tcp:{tcp_host}:{tcp_port}", "(systemd:t)"),
                (f"udp:{udp_host}:{udp_port}", "(systemd:u)"),
                (f"unix:{unix_path}", "(systemd:s)"),
                (f"unixgram:{gram_path}", "(systemd:g)"),
            ]
            assert echo_once(first) == b"hello\n"
            assert datagram_exchange(parse_endpoint(lines[1][0]), b"ping")[0] == b"ping"
            assert echo_once(connect(parse_endpoint(lines[2][0]))) == b"hello\n"
            assert datagram_exchange(parse_endpoint(lines[3][0]), b"ping", tmp_path)[0] == b"ping"
            assert proc.stop() == 0
        finally:
            proc.kill()
        # The Unix sockets' files are systemd's: never removed by sockworks.
        assert unix_path.exists() and gram_path.exists()
    finally:
        for s in sockets:
            s.close()


def test_unix_socket_bound_by_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd-socket-activate binds the socket itself (-l PATH)."""
    path = tmp_path / "web.sock"
    program = require_peer("systemd-socket-activate")
    proc = Started([program, "-l", str(path), "--fdname=web",
                    *SOCKWORKS, "serve", "charcount", "-l", "systemd:web"])
    try:
        # systemd-socket-activate binds it.
        wait_until(lambda: path.exists() or proc.proc.poll() is not None, 10, "the socket")
        assert path.exists(), proc.log
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            ((endpoint, source),) = listening(proc, 1)
            assert (endpoint, source) == (f"unix:{path}", "(systemd:web)")
            client.sendall(b"hello\n")
            assert b"You entered 5 characters." in recv_all(client)
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_listen_pid_not_ours_is_one_line(tmp_path: Path) -> None:
    listener = tcp_listener()
    with listener:
        fd = listener.fileno()
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1")
        for args in (["-l", "systemd:web"], []):
            result = subprocess.run(
                [*SOCKWORKS, "serve", "echo", *args], env=env, pass_fds=[fd],
                capture_output=True, timeout=20, cwd=ROOT,
            )
            err = result.stderr.decode()
            assert result.returncode == 1, err
            assert err.count("\n") == 1 and err.startswith("sockworks: error: "), err
            assert "passed to process 1, not to this one" in err


@pytest.mark.parametrize(
    ("listen", "status", "message"),
    [
        ("systemd:nope", 1, "no socket named 'nope' was passed: systemd passed web (index 0, tcp)"),
        ("systemd:1", 1, "there is no socket 1: systemd passed web (index 0, tcp)"),
        ("systemd:", 2, "has no socket name"),
        ("fd:x", 2, "descriptor 'x' is not a number"),
        ("fd:999", 1, "descriptor 999 is not open"),
    ],
)
def test_bad_inherited_endpoints_are_one_line(listen: str, status: int, message: str) -> None:
    listener = tcp_listener()
    with listener:
        proc = Started(activate([listener], ["web"], [*SOCKWORKS, "serve", "echo", "-l", listen]))
        try:
            socket.create_connection(listener.getsockname(), timeout=10).close()
            code, out = proc.finish()
        finally:
            proc.kill()
    errors = [line for line in proc.lines if line.startswith("sockworks")]
    assert code == status, proc.log
    assert len(errors) == 1 and errors[0].startswith("sockworks: error: "), proc.log
    assert message in errors[0]
    assert out == b""


def test_no_sockets_passed_and_descriptors_that_are_not_listeners(tmp_path: Path) -> None:
    result = subprocess.run([*SOCKWORKS, "serve", "echo", "-l", "systemd:web"],
                            capture_output=True, timeout=20, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN")})
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "sockworks: error: systemd:web: no sockets were passed by systemd (LISTEN_FDS is not "
        "set): start sockworks from a .socket unit or with systemd-socket-activate"
    ]
    # A file, and a connected (not listening) socket, as fd:N.
    server = tcp_listener()
    client = socket.create_connection(server.getsockname())
    with open(tmp_path / "file", "w") as file, server, client:
        for fd, message in (
            (file.fileno(), "is not a socket"),
            (client.fileno(), "is a connected tcp socket, not a listening one (for a connection "
             "passed by inetd or Accept=yes, use --inetd)"),
        ):
            result = subprocess.run([*SOCKWORKS, "serve", "echo", "-l", f"fd:{fd}"],
                                    pass_fds=[fd], capture_output=True, timeout=20, cwd=ROOT)
            lines = result.stderr.decode().splitlines()
            assert result.returncode == 1 and len(lines) == 1, lines
            assert message in lines[0]


def test_systemd_variables_and_sockets_never_reach_a_program(tmp_path: Path) -> None:
    """exec's --pass-env would pass a variable the server has: systemd's
    are gone from its environment once read, and the passed socket is not
    inherited by the program (only its connection is, as 0 and 1)."""
    listener = tcp_listener()
    notify = NotifySocket(str(tmp_path / "notify"))
    inode = os.fstat(listener.fileno()).st_ino
    passed = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC",
              "CANARY"]
    with listener:
        argv = activate(
            [listener], ["web"],
            [*SOCKWORKS, "serve", "exec", "-l", "systemd:web",
             *(f"--pass-env={name}" for name in passed),
             "--", "/bin/sh", "-c", "env; ls -l /proc/$$/fd"],
            "-E", f"NOTIFY_SOCKET={notify.address}", "-E", "WATCHDOG_USEC=60000000",
            "-E", "CANARY=1",
        )
        proc = Started(argv)
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as client:
                client.shutdown(socket.SHUT_WR)
                output = recv_all(client).decode()
            assert notify.wait_for("READY")  # it did have NOTIFY_SOCKET
            assert proc.stop() == 0
        finally:
            proc.kill()
            notify.close()
    names = {line.split("=", 1)[0] for line in output.splitlines() if "=" in line}
    assert "CANARY" in names, output  # --pass-env does pass what the server has
    assert "TCPREMOTEIP" in names, output
    assert not names & {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                        "WATCHDOG_USEC"}, output
    assert f"socket:[{inode}]" not in output, output


# -- readiness: NOTIFY_SOCKET ---------------------------------------------------


def test_ready_once_accepting_then_stopping(notify: NotifySocket) -> None:
    proc = Started([*SOCKWORKS, "serve", "echo", "-l", "tcp:127.0.0.1:0"],
                   env=dict(os.environ, NOTIFY_SOCKET=notify.address))
    try:
        ready = notify.wait_for("READY")
        assert ready["READY"] == "1"
        match = re.fullmatch(r"serving echo on tcp:127\.0\.0\.1:(\d+)", ready["STATUS"])
        assert match, ready
        # At READY=1 the port accepts: connected and answered at once.
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=5) as sock:
            assert echo_once(sock) == b"hello\n"
        assert notify.messages == [ready]  # nothing before it
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.finish()[0] == 0  # no second signal: it is stopping
    finally:
        proc.kill()


def test_reload_is_reloading_with_monotonic_usec_then_ready(notify: NotifySocket) -> None:
    proc = Started([*SOCKWORKS, "serve", "daytime", "-l", "tcp:127.0.0.1:0"],
                   env=dict(os.environ, NOTIFY_SOCKET=notify.address))
    try:
        notify.wait_for("READY")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        again = notify.next()
        assert again["READY"] == "1" and again["STATUS"].startswith("serving daytime on tcp:")
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_watchdog_at_half_the_interval(notify: NotifySocket) -> None:
    proc = Started([*SOCKWORKS, "serve", "echo", "-l", "tcp:127.0.0.1:0"],
                   env=dict(os.environ, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000",
                            WATCHDOG_PID="1"))
    try:
        notify.wait_for("READY")
        proc.stop()
        # WATCHDOG_PID names another process: no keep-alive from this one.
        assert not [m for m in notify.messages if "WATCHDOG" in m]
    finally:
        proc.kill()
    proc = Started([*SOCKWORKS, "serve", "echo", "-l", "tcp:127.0.0.1:0"],
                   env=dict(os.environ, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="200000"))
    try:
        notify.wait_for("READY")
        notify.wait_for("WATCHDOG")
        first = time.monotonic()
        notify.wait_for("WATCHDOG")
        second = time.monotonic()
        # Every 0.1 s; a loaded machine may be late, never much early.
        assert second - first >= 0.05
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_abstract_notify_socket_and_socket_activation_together(tmp_path: Path) -> None:
    notify = NotifySocket(f"@sockworks-test-{os.getpid()}-{time.monotonic_ns()}")
    listener = tcp_listener()
    with listener:
        proc = Started(activate([listener], ["echo"],
                                [*SOCKWORKS, "serve", "echo", "--listen", "systemd:echo"],
                                "-E", f"NOTIFY_SOCKET={notify.address}"))
        try:
            first = socket.create_connection(listener.getsockname(), timeout=10)
            host, port = listener.getsockname()
            assert notify.wait_for("READY")["STATUS"] == f"serving echo on tcp:{host}:{port}"
            assert echo_once(first) == b"hello\n"
            assert proc.stop() == 0
        finally:
            proc.kill()
            notify.close()


# -- the pieces, in-process ----------------------------------------------------


def test_notifier_reads_and_unsets_its_variables(tmp_path: Path) -> None:
    receiver = NotifySocket(str(tmp_path / "n"))
    environ = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "3000000",
               "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    notifier = _systemd.Notifier.from_environment(environ)
    assert environ == {"OTHER": "x"}
    assert notifier.watchdog_interval == 1.5
    notifier.status("two\nlines")
    assert receiver.next() == {"STATUS": "two lines"}
    notifier.reloading()
    assert set(receiver.next()) == {"RELOADING", "MONOTONIC_USEC"}
    notifier.close()
    receiver.close()
    silent = _systemd.Notifier.from_environment({})
    assert not silent.enabled and silent.watchdog_interval is None
    assert silent.notify("READY=1") is False


def test_notifier_is_silent_in_a_forked_child(tmp_path: Path) -> None:
    receiver = NotifySocket(str(tmp_path / "n"))
    notifier = _systemd.Notifier(receiver.address)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        notifier.ready("from the child")
        os._exit(0 if not notifier.enabled else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    notifier.ready("from the parent")
    assert receiver.next() == {"READY": "1", "STATUS": "from the parent"}
    receiver.close()


_READ = """\
import json, os
from sockworks import _systemd, parse_endpoint
from sockworks._endpoint import inherited_endpoints
os.environ["LISTEN_FDNAMES"] = "a:a"
out = {"sockets": [[p.fd, p.name, p.transport, p.listening, os.get_inheritable(p.fd)]
                   for p in _systemd.passed_sockets()],
       "left": sorted(k for k in os.environ if k.startswith("LISTEN"))}
try:
    parse_endpoint("systemd:a")
except Exception as exc:
    out["ambiguous"] = str(exc)
out["second"] = str(parse_endpoint("systemd:1"))
out["sources"] = [e.source for e in inherited_endpoints()]
print(json.dumps(out))
"""


def test_read_passed_sockets() -> None:
    import json

    listener, dgram = tcp_listener(), udp_socket()
    with listener, dgram:
        command = passing([listener, dgram], [sys.executable, "-c", _READ])
        result = subprocess.run(command, pass_fds=command.fds, capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
        host, port = dgram.getsockname()
    # Read from the sockets themselves; close-on-exec; the variables gone.
    assert out["sockets"] == [[3, "a", "tcp", True, False], [4, "a", "udp", False, False]]
    assert out["left"] == []
    assert "2 sockets are named 'a'" in out["ambiguous"]
    assert "(systemd:0, systemd:1)" in out["ambiguous"]
    assert out["second"] == f"udp:{host}:{port}"
    assert out["sources"] == ["systemd:0", "systemd:1"]


def test_malformed_variables_are_problems_not_crashes() -> None:
    for bad, problem in (
        ({"LISTEN_FDS": "1"}, "LISTEN_PID is not"),
        ({"LISTEN_FDS": "x", "LISTEN_PID": "1"}, "not a number"),
        ({"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid()), "LISTEN_FDNAMES": "a"},
         "1 names for LISTEN_FDS=2"),
    ):
        result = _systemd._read_passed(dict(bad))
        assert result.given and result.problem is not None and problem in result.problem
    assert not _systemd._read_passed({}).given


# -- the example units ----------------------------------------------------------


def _units(tmp_path: Path) -> Path:
    """examples/systemd with ExecStart pointing at this installation's
    sockworks (verify checks that the program exists)."""
    script = Path(sys.executable).parent / "sockworks"
    assert script.exists(), "the sockworks console script is not installed beside python"
    out = tmp_path / "units"
    out.mkdir()
    for unit in EXAMPLES.iterdir():
        text = unit.read_text(encoding="utf-8")
        assert "/opt/sockworks/bin/sockworks" in text or unit.suffix == ".socket", unit
        (out / unit.name).write_text(text.replace("/opt/sockworks/bin/sockworks", str(script)))
    return out


@pytest.mark.parametrize(
    "units",
    [
        ("sockworks-echo.socket", "sockworks-echo.service"),
        ("sockworks-gopher.service",),
        ("sockworks-daytime.socket", "sockworks-daytime@.service"),
    ],
)
def test_example_units_verify(tmp_path: Path, units: tuple[str, ...]) -> None:
    analyze = require_peer("systemd-analyze")
    directory = _units(tmp_path)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(f"./{u}" for u in units)],
        cwd=directory, capture_output=True, timeout=60,
    )
    # verify warns about unknown keys and bad values on stderr but exits 0:
    # a clean unit says nothing at all.
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode()
    for unit in units:
        if unit.endswith(".service"):
            # Hardened as systemd rates it: exposure 2.0 or less ("OK").
            check = subprocess.run(
                [analyze, "security", "--offline=true", "--threshold=20", f"./{unit}"],
                cwd=directory, capture_output=True, timeout=60,
            )
            assert check.returncode == 0, check.stdout.decode()[-400:]


def test_example_units_say_what_the_tests_run() -> None:
    echo = (EXAMPLES / "sockworks-echo.socket").read_text()
    assert "FileDescriptorName=echo" in echo
    service = (EXAMPLES / "sockworks-echo.service").read_text()
    assert "serve echo --listen systemd:echo" in service
    gopher = (EXAMPLES / "sockworks-gopher.service").read_text()
    assert "Type=notify" in gopher and "NotifyAccess=main" in gopher
    daytime = (EXAMPLES / "sockworks-daytime.socket").read_text()
    assert "Accept=yes" in daytime
    assert "--inetd" in (EXAMPLES / "sockworks-daytime@.service").read_text()


def test_listening_regex_still_reads_the_line() -> None:
    line = "sockworks: echo listening on tcp:127.0.0.1:7007 (systemd:echo)"
    match = LISTENING.search(line)
    assert match and match.group(1) == "tcp:127.0.0.1:7007"


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_stopping_leaves_the_passed_sockets_as_systemd_gave_them(
    tmp_path: Path, workers: list[str]
) -> None:
    """After SIGTERM the passed sockets are still systemd's to serve from
    at the next start: no drop filter left on the TCP one (a connection
    attempt now queues), the Unix one's file still there."""
    listener, path = tcp_listener(), tmp_path / "s.sock"
    unix = unix_listener(path)
    with listener, unix:
        proc = Started(passing([listener, unix], [*SOCKWORKS, "serve", "echo", *workers]))
        try:
            listening(proc, 2)
            assert echo_once(socket.create_connection(listener.getsockname(), timeout=5)) \
                == b"hello\n"
            assert proc.stop() == 0
        finally:
            proc.kill()
        problems = []
        if not path.exists():
            problems.append("the Unix socket's file was removed")
        try:
            with socket.create_connection(listener.getsockname(), timeout=2):
                listener.settimeout(5)
                listener.accept()[0].close()
        except TimeoutError:
            problems.append("connection attempts to the TCP socket are dropped")
        assert not problems, problems


def test_config_file_takes_passed_sockets_by_name(tmp_path: Path) -> None:
    """``listen = ["systemd:NAME"]`` in a config file: two services, each on
    its own passed socket; a name that was not passed is one line."""
    echo, daytime = tcp_listener(), tcp_listener()
    config = tmp_path / "units.toml"
    config.write_text(
        '[services.echo]\nlisten = ["systemd:echo"]\n'
        '[services.daytime]\nlisten = ["systemd:daytime"]\n'
    )
    with echo, daytime:
        proc = Started(activate([echo, daytime], ["echo", "daytime"],
                                [*SOCKWORKS, "serve", "--config", str(config)]))
        try:
            first = socket.create_connection(echo.getsockname(), timeout=10)
            lines = listening(proc, 2)
            assert [source for _, source in lines] == ["(systemd:echo)", "(systemd:daytime)"]
            assert echo_once(first) == b"hello\n"
            with socket.create_connection(daytime.getsockname(), timeout=5) as sock:
                assert recv_all(sock).endswith(b"\r\n")
            assert proc.stop() == 0
        finally:
            proc.kill()
        config.write_text('[services.echo]\nlisten = ["systemd:nope"]\n')
        proc = Started(activate([echo], ["echo"], [*SOCKWORKS, "serve", "--config", str(config)]))
        try:
            socket.create_connection(echo.getsockname(), timeout=10).close()
            code, _ = proc.finish()
        finally:
            proc.kill()
    errors = [line for line in proc.lines if line.startswith("sockworks")]
    assert code != 0 and len(errors) == 1, proc.log
    assert "no socket named 'nope' was passed" in errors[0]
