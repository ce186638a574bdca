"""Worker processes (issue 10): the parent binds once, forks workers that
accept on the shared sockets, replaces the ones that die, stops them all
on SIGTERM and reloads on SIGHUP without refusing a connection."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, recv_all, require_peer, run_cli, wait_until

from sockworks import Endpoint, parse_endpoint

# An async handler that answers with the pid of the worker serving it,
# and the text of ANSWER (to tell configurations apart).
PID_APP = """
import os
ANSWER = "one"

async def handle(stream):
    await stream.write(f"{os.getpid()} {ANSWER}\\n".encode())
"""
# The same in the seeds' blocking style, on a worker's threads.
PID_APP_BLOCKING = """
import os

def handle(conn):
    conn.sendall(f"{os.getpid()} blocking\\n".encode())
"""


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until the kernel shows it stopped: kill()
    returns before the process has stopped, and meanwhile it may still
    accept the next connection."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T",
               what=f"pid {pid} to stop")


def ask(endpoint: Endpoint, data: bytes = b"") -> bytes:
    with connect(endpoint) as sock:
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def served_by(endpoint: Endpoint) -> int:
    return int(ask(endpoint).split()[0])


def start_pid_app(
    cli: type[CLIProcess], tmp_path: Path, *extra: str, source: str = PID_APP
) -> CLIProcess:
    (tmp_path / "pidapp.py").write_text(textwrap.dedent(source), encoding="utf-8")
    # No limits shared between the workers: these tests SIGSTOP a worker
    # that may be closing a connection, and one stopped while it holds the
    # shared limits' lock stops every other worker's admissions with it
    # (a known gap, in the closing note of issue 10; the limits have tests
    # of their own below).
    return cli(["serve", "pidapp:handle", "--app-dir", str(tmp_path),
                "-l", "tcp:127.0.0.1:0", "--per-source", "0", *extra])


@pytest.mark.parametrize("source", [PID_APP, PID_APP_BLOCKING], ids=["async", "blocking"])
def test_two_workers_share_the_listener_and_each_accepts(
    cli: type[CLIProcess], tmp_path: Path, source: str
) -> None:
    server = start_pid_app(cli, tmp_path, "--workers", "2", source=source)
    [endpoint] = server.wait_listening(1)
    workers = children(server.proc.pid)
    assert len(workers) == 2, workers
    # The parent prints each listening line once.
    assert sum("listening on" in line for line in server.lines) == 1
    # Each worker accepts on the shared socket: with the other one stopped,
    # it serves every connection.
    for stopped in workers:
        stop_process(stopped)
        try:
            pids = {served_by(endpoint) for _ in range(5)}
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert pids == workers - {stopped}
    assert server.stop() == 0


def test_a_dead_worker_is_logged_and_replaced(cli: type[CLIProcess], tmp_path: Path) -> None:
    server = start_pid_app(cli, tmp_path, "--workers", "2")
    [endpoint] = server.wait_listening(1)
    first = children(server.proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    server.wait_for(rf"worker \d \(pid {victim}\) was killed by SIGKILL; starting another")
    # The replacement is up when a connection is served with the survivor stopped.
    survivor = max(first)
    server.wait_for(r"worker \d \(pid \d+\) ready|starting another")
    stop_process(survivor)
    try:
        replacement = served_by(endpoint)
    finally:
        os.kill(survivor, signal.SIGCONT)
    assert replacement not in first
    assert children(server.proc.pid) == {survivor, replacement}
    os.kill(replacement, signal.SIGTERM)  # any exit, not only a crash
    server.wait_for(rf"worker \d \(pid {replacement}\) exited with status 0; starting another")
    assert server.stop() == 0


BAD_DRIVER = """
from sockworks import ProtocolDriver, StreamProtocol

class Failing(ProtocolDriver):
    def connection_factory(self, group):
        raise RuntimeError("cannot start: the database is down")

driver = Failing(StreamProtocol)
"""


def test_a_worker_failing_at_start_fails_the_start(tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text(textwrap.dedent(BAD_DRIVER), encoding="utf-8")
    result = run_cli("serve", "badapp:driver", "--app-dir", str(tmp_path),
                     "-l", "tcp:127.0.0.1:0", "--workers", "3")
    err = result.stderr.decode()
    assert result.returncode == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sockworks: error: worker "), err
    assert "before it was ready; not starting" in lines[-1]
    assert "the database is down" in lines[-1]
    assert "Traceback" not in err
    assert "listening on" not in err


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_bad_worker_counts_are_one_line(value: str) -> None:
    result = run_cli("serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", value)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "--workers" in err, err


def test_auto_is_one_worker_per_cpu(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "auto"])
    server.wait_listening(1)
    assert len(children(server.proc.pid)) == len(os.sched_getaffinity(0))
    assert server.stop() == 0


def test_sigterm_drains_every_worker_then_exits_zero(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2", "--grace", "5"])
    [endpoint] = server.wait_listening(1)
    workers = children(server.proc.pid)
    # A connection in the middle of its work when the signal comes: what
    # it sent before the signal is all answered, then a clean EOF.
    busy = connect(endpoint, timeout=10)
    payload = os.urandom(1 << 20)
    answer: list[bytes] = []
    reader = threading.Thread(target=lambda: answer.append(recv_all(busy)))
    reader.start()
    busy.sendall(payload)
    server.send_signal(signal.SIGTERM)
    server.wait_for("SIGTERM received: shutting down 2 worker")
    reader.join(15)
    busy.close()
    assert answer and answer[0] == payload, len(answer[0]) if answer else None
    assert server.proc.wait(15) == 0  # the one signal was enough
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()


def config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_workers_from_a_config_file_and_reload(cli: type[CLIProcess], tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("the first quote\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("the second quote\n", encoding="utf-8")
    conf = config(tmp_path / "s.toml", """
        [server]
        workers = 2
        [services.qotd]
        listen = ["tcp:127.0.0.1:0"]
        quotes = "one.txt"
    """)
    server = cli(["serve", "--config", str(conf)])
    [endpoint] = server.wait_listening(1)
    old = children(server.proc.pid)
    assert len(old) == 2
    assert b"the first quote" in ask(endpoint)
    # The same listener (port 0 in the file: the socket is kept), new quotes,
    # and a new listener.
    conf.write_text(textwrap.dedent("""
        [server]
        workers = 2
        [services.qotd]
        listen = ["tcp:127.0.0.1:0"]
        quotes = "two.txt"
        [services.echo]
        listen = ["tcp:127.0.0.1:0"]
    """), encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    server.wait_for("reloaded: 2 new worker")
    # Said once every old worker has stopped accepting: only the new
    # configuration answers from here on.
    assert b"the second quote" in ask(endpoint)
    [echo] = server.wait_listening(2)[1:]
    assert ask(echo, b"new") == b"new"
    new = children(server.proc.pid)
    server.wait_for("echo listening on")
    assert len(new - old) == 2
    # A broken file: one line, and the running configuration stays.
    conf.write_text("[services.qotd]\nlisten = 7\n", encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    failed = server.wait_for(r"reload failed: .*; still serving the configuration loaded before")
    assert "services.qotd.listen" in failed.string
    assert b"the second quote" in ask(endpoint)
    assert ask(echo, b"still") == b"still"
    # The listener removed: closed once its workers are gone.
    conf.write_text(textwrap.dedent("""
        [server]
        workers = 2
        [services.qotd]
        listen = ["tcp:127.0.0.1:0"]
        quotes = "two.txt"
    """), encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    server.wait_count("reloaded: 2 new worker", 2, timeout=20)
    assert b"the second quote" in ask(endpoint)  # old and new say the same
    assert server.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        connect(echo).close()


@pytest.mark.parametrize(
    "workers,reloaded",
    [(["--workers", "2"], "reloaded: 2 new worker"), ([], "reloaded: now serving")],
    ids=["workers", "one-process"],
)
def test_reload_under_load_refuses_and_resets_nothing(
    cli: type[CLIProcess], workers: list[str], reloaded: str
) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", *workers])
    [endpoint] = server.wait_listening(1)
    done = threading.Event()
    ok = [0]
    errors: list[str] = []

    def load() -> None:
        while not done.is_set():
            try:
                with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as s:
                    s.sendall(b"ping")
                    s.shutdown(socket.SHUT_WR)
                    answer = recv_all(s)
                if answer != b"ping":
                    errors.append(f"answer {answer!r}")
                else:
                    ok[0] += 1
            except OSError as exc:
                errors.append(f"{errno.errorcode.get(exc.errno or 0, exc)}: {exc}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 4):
            before = ok[0]
            server.send_signal(signal.SIGHUP)
            server.wait_count(reloaded, n, timeout=20)
            # The old configuration drains and ends while the load goes on.
            if workers:
                wait_until(lambda: len(children(server.proc.pid)) == 2)
            wait_until(lambda before=before: ok[0] > before + 20)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors[:5]
    assert server.stop() == 0


# One exchange per built-in service: what to send, and what the answer holds.
EXCHANGES: dict[str, tuple[bytes, bytes]] = {
    "echo": (b"hello", b"hello"),
    "discard": (b"gone", b""),
    "daytime": (b"", b"\r\n"),
    "time": (b"", b""),
    "qotd": (b"", b"\n"),
    "chargen": (b"", b"!\"#$%"),
    "timestamp": (b"stamp", b"] stamp"),
    "greeting": (b"1", b"welcome to server!"),
    "thanks": (b"", b"thank"),
    "charcount": (b"four\r\n", b"4"),
    "gopher": (b"\r\n", b"\r\n."),
    "exec": (b"through cat", b"through cat"),
}


def test_every_builtin_service_and_style_under_workers(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    tables = []
    for name in EXCHANGES:
        extra = 'exec = ["cat"]\n' if name == "exec" else ""
        tables.append(f'[services.{name}]\nlisten = ["tcp:127.0.0.1:0"]\n{extra}')
    conf = config(tmp_path / "all.toml", "[server]\nworkers = 2\n\n" + "\n".join(tables))
    server = cli(["serve", "--config", str(conf)])
    server.wait_listening(len(EXCHANGES))
    where = {
        m.group(1): parse_endpoint(m.group(2))
        for line in server.lines
        if (m := re.search(r"sockworks: (\S+) listening on (\S+)", line))
    }
    for name, (send, expect) in EXCHANGES.items():
        with connect(where[name]) as sock:
            if send:
                sock.sendall(send)
            if name not in ("chargen",):
                sock.shutdown(socket.SHUT_WR)
                answer = recv_all(sock)
            else:
                answer = sock.recv(100)
        assert expect in answer, (name, answer)
        if name == "time":
            assert len(answer) == 4
    assert server.stop() == 0


@pytest.mark.parametrize("workers", [["--workers", "2"], []], ids=["workers", "one-process"])
def test_tls_and_proxy_listeners_under_workers_and_a_renewed_certificate(
    cli: type[CLIProcess], tmp_path: Path, workers: list[str]
) -> None:
    import ssl

    import trustme

    from sockworks import Peer
    from sockworks.proxy import encode_v1

    ca = trustme.CA()
    cert = tmp_path / "cert.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    server = cli(["serve", "echo", "-l", "tls:127.0.0.1:0", "-l", "tcp:127.0.0.1:0",
                  "--cert", str(cert), "--proxy-protocol", "v1", "--proxy-from", "127.0.0.1",
                  *workers])
    tls_ep, plain = server.wait_listening(2)
    client = ssl.create_default_context()
    ca.configure_trust(client)

    def tls_serial() -> int:
        raw = connect(tls_ep)
        raw.sendall(encode_v1(Peer("203.0.113.9", 4000), Peer("127.0.0.1", tls_ep.port)))
        with client.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"secret")
            assert s.recv(100) == b"secret"
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return hash(der)

    first = tls_serial()
    server.wait_for(r"203\.0\.113\.9:4000 closed")  # the header's address, in a worker
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    server.send_signal(signal.SIGHUP)
    # "reloaded" once the old configuration has stopped accepting.
    server.wait_for("reloaded: (2 new worker|now serving)")
    assert tls_serial() != first  # the new configuration read the new certificate
    with connect(plain) as s:
        s.sendall(encode_v1(Peer("198.51.100.1", 5), Peer("127.0.0.1", plain.port)) + b"plain")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"plain"
    assert server.stop() == 0


def test_readiness_reload_and_stop_are_told_to_the_service_manager(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "notify")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)
    manager.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockworks", "serve", "echo", "-l", "tcp:127.0.0.1:0",
         "--workers", "2"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    try:
        def next_message(skip_watchdog: bool = True) -> str:
            while True:
                text = manager.recv(4096).decode()
                if not (skip_watchdog and text == "WATCHDOG=1"):
                    return text

        ready = next_message()
        assert ready.startswith("READY=1\nSTATUS=2 worker(s) serving echo on tcp:127.0.0.1:")
        port = int(ready.rsplit(":", 1)[1])
        # Ready means accepting, in every worker.
        assert len(children(proc.pid)) == 2
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        assert next_message(skip_watchdog=False) == "WATCHDOG=1"  # every 0.2 s, from the parent
        proc.send_signal(signal.SIGHUP)
        reloading = next_message()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading), reloading
        assert next_message().startswith("READY=1\nSTATUS=2 worker(s) serving echo")
        proc.send_signal(signal.SIGTERM)
        assert next_message() == "STOPPING=1"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        manager.close()


# -- without workers: one process reloads in place --------------------------


def test_one_process_reloads_its_config_file_in_place(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    (tmp_path / "one.txt").write_text("the first quote\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("the second quote\n", encoding="utf-8")
    conf = config(tmp_path / "s.toml", """
        [services.qotd]
        listen = ["tcp:127.0.0.1:0"]
        quotes = "one.txt"
        [services.echo]
        listen = ["tcp:127.0.0.1:0"]
    """)
    server = cli(["serve", "--config", str(conf)])
    qotd, echo = server.wait_listening(2)
    assert b"the first quote" in ask(qotd)
    # A connection open across the reload: the old configuration's.
    held = connect(echo)
    held.sendall(b"before ")
    assert held.recv(100) == b"before "
    conf.write_text(textwrap.dedent("""
        [services.qotd]
        listen = ["tcp:127.0.0.1:0"]
        quotes = "two.txt"
        [services.daytime]
        listen = ["tcp:127.0.0.1:0"]
    """), encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    server.wait_for("reloaded: now serving")
    assert children(server.proc.pid) == set()  # still one process
    assert b"the second quote" in ask(qotd)
    daytime = server.wait_listening(3)[2]
    assert ask(daytime).endswith(b"\r\n")
    # The old configuration drained: the idle connection ended with a clean
    # EOF (a reset would raise here).
    assert recv_all(held) == b""
    held.close()
    # echo is gone from the file: its listener closes once its last
    # connection is done.
    wait_until(lambda: refused(echo))
    conf.write_text("[services.qotd]\nlisten = 7\n", encoding="utf-8")
    server.send_signal(signal.SIGHUP)
    server.wait_for(r"reload failed: .*services\.qotd\.listen.*; still serving the configuration")
    assert b"the second quote" in ask(qotd)
    assert server.stop() == 0


def refused(endpoint: Endpoint) -> bool:
    try:
        connect(endpoint, timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # a dropped attempt (the filter): not closed yet
    return False


# -- limits for the service as a whole ------------------------------------


def echoes(sock: socket.socket, data: bytes = b"x") -> bool:
    """Whether ``sock`` is served (an echo), not refused (closed at once)."""
    sock.sendall(data)
    try:
        return sock.recv(100) == data
    except ConnectionResetError:
        return False


def test_per_source_holds_across_workers_and_a_dead_workers_share_is_freed(
    cli: type[CLIProcess],
) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2",
                  "--per-source", "3"])
    [endpoint] = server.wait_listening(1)
    a, b = sorted(children(server.proc.pid))
    # Three connections, all to worker a (b is stopped).
    stop_process(b)
    try:
        held = [connect(endpoint) for _ in range(3)]
        assert all(echoes(s) for s in held)
    finally:
        os.kill(b, signal.SIGCONT)
    # A fourth goes to worker b, which holds none itself: refused all the same.
    stop_process(a)
    try:
        with connect(endpoint) as fourth:
            assert not echoes(fourth)
        server.wait_for(r"refused: per-source limit \(3\) reached")
    finally:
        os.kill(a, signal.SIGCONT)
    # Worker a dies with its three: they are no longer counted.
    os.kill(a, signal.SIGKILL)
    server.wait_for(rf"worker \d \(pid {a}\) was killed by SIGKILL")
    for s in held:
        s.close()
    again = [connect(endpoint) for _ in range(3)]
    assert all(echoes(s) for s in again)
    for s in again:
        s.close()
    assert server.stop() == 0


def test_instances_hold_across_workers(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2",
                  "--instances", "2", "--per-source", "0"])
    [endpoint] = server.wait_listening(1)
    a, b = sorted(children(server.proc.pid))
    stop_process(b)
    try:
        held = [connect(endpoint) for _ in range(2)]
        assert all(echoes(s) for s in held)
    finally:
        os.kill(b, signal.SIGCONT)
    stop_process(a)
    try:
        with connect(endpoint) as third:
            assert not echoes(third)
    finally:
        os.kill(a, signal.SIGCONT)
    server.wait_for(r"refused: instance limit \(2\) reached")
    for s in held:
        s.close()
    assert server.stop() == 0


def test_the_metrics_server_of_workers_is_replaced_when_it_dies(cli: type[CLIProcess]) -> None:
    curl = require_peer("curl")
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2",
                  "--metrics", "127.0.0.1:0"])
    server.wait_listening(1)
    url = server.wait_for(r"metrics on (http://\S+)").group(1)
    found = subprocess.run(["pgrep", "-P", str(server.proc.pid), "-f", "_files_server_main"],
                           capture_output=True, text=True).stdout.split()
    assert len(found) == 1
    os.kill(int(found[0]), signal.SIGKILL)
    server.wait_for(rf"metrics server \(pid {found[0]}\) exited; starting another")
    scraped = subprocess.run([curl, "-sS", url], capture_output=True, text=True, timeout=10)
    assert "# TYPE sockworks_connections_open gauge" in scraped.stdout, scraped  # served again
    assert server.stop() == 0


def test_workers_stop_when_their_parent_is_killed_outright(cli: type[CLIProcess]) -> None:
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--workers", "2"])
    [endpoint] = server.wait_listening(1)
    workers = children(server.proc.pid)
    assert len(workers) == 2
    server.proc.kill()  # SIGKILL: the parent says nothing to anyone
    server.proc.wait()
    # The kernel's parent-death signal: each worker drains and exits.
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers))
    with pytest.raises(ConnectionRefusedError):
        connect(endpoint).close()
