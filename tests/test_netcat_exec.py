"""`sockworks listen/connect --exec` and `--sh-exec` (issue 12): a program's
stdin and stdout are the connection. Real programs nobody here wrote (cat,
sha256sum, wc -c, sh -c, env); binary payloads compared by hash both ways;
half-close both ways; -k with several clients at once, its bound, no
zombies and no leaked descriptors; the environment; TLS; ncat and socat as
the other end; bad input."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _netcat_helpers import (
    Procs,
    children,
    digest,
    free_port,
    one_line,
    payload,
    read_all,
    read_line,
    tcp_address,
    wait_bound,
    wait_no_children,
)

MIB = 1 << 20
# One line per client that proves its program is running, then an answer.
READY_THEN_ANSWER = 'echo ready; read line; echo "got $line"'


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # Unix socket paths must be short; tmp_path can be long.
    path = f"/tmp/sw-exec-{os.getpid()}-{tmp_path.name[-12:]}.sock"
    yield path
    Path(path).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem"))
    return {"ca": str(d / "ca.pem"), "cert": str(d / "server.pem")}


def require(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


def connect_to(endpoint: str) -> socket.socket:
    if endpoint.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(endpoint.removeprefix("unix:"))
        return sock
    return socket.create_connection(tcp_address(endpoint), timeout=15)


def send_then_shutdown(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send from a thread (the program answers while we still send), then
    SHUT_WR. Errors are the peer's business: the reader asserts."""
    def run() -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- the programs of the issue ---------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_cat_large_binary_both_ways(procs: Procs, sock_path: str, transport: str) -> None:
    """sockworks connect → listen --exec cat → back: 4 MiB of every byte value,
    compared by hash; the client's half-close ends cat, cat's exit ends it all."""
    data = payload(4 * MIB)
    where = "tcp:127.0.0.1:0" if transport == "tcp" else "unix:" + sock_path
    listener = procs.sockworks("listen", "--exec", "cat", where, name="listen")
    client = procs.sockworks("connect", listener.endpoint(), name="connect", stdin=data)
    assert client.wait() == 0, client.err
    assert listener.wait() == 0, listener.err
    assert digest(client.out) == digest(data)


def test_sha256sum_answers_after_the_clients_half_close(procs: Procs) -> None:
    data = payload(3 * MIB, 2)
    listener = procs.sockworks("listen", "--exec", "sha256sum", "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        send_then_shutdown(sock, data)
        answer = read_all(sock)
    assert answer == f"{digest(data)}  -\n".encode()
    assert listener.wait() == 0, listener.err


def test_wc_counts_what_the_client_sent(procs: Procs) -> None:
    data = payload(MIB, 3)
    listener = procs.sockworks("listen", "--exec", "wc -c", "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        send_then_shutdown(sock, data)
        assert read_all(sock).strip() == str(len(data)).encode()
    assert listener.wait() == 0, listener.err


def test_connect_exec_sha256sum_the_other_way(procs: Procs) -> None:
    """connect --exec: the server's bytes are the program's stdin (its
    half-close is the program's EOF) and the program's answer goes back."""
    data = payload(3 * MIB, 4)
    server = procs.sockworks("listen", "tcp:127.0.0.1:0", name="server", stdin=data)
    client = procs.sockworks("connect", "--exec", "sha256sum", server.endpoint(), name="c")
    assert client.wait() == 0, client.err
    assert server.wait() == 0, server.err
    assert server.out == f"{digest(data)}  -\n".encode()


def test_program_that_exits_early_delivers_all_its_output_then_eof(procs: Procs) -> None:
    """The program reads one line, answers and exits while the client is
    still sending megabytes: the client reads the whole answer, then EOF,
    not a reset (what ncat gets wrong, nmap #962)."""
    listener = procs.sockworks("listen", "--sh-exec", 'read line; echo "got $line"',
                               "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        send_then_shutdown(sock, b"hello\n" + payload(8 * MIB))
        assert read_all(sock) == b"got hello\n"
    assert listener.wait() == 0, listener.err


def test_answer_without_the_client_closing(procs: Procs) -> None:
    """sh -c 'read line; echo "got $line"': the client keeps its side open
    and still gets the answer, then EOF when the program exits."""
    listener = procs.sockworks("listen", "--sh-exec", 'read line; echo "got $line"',
                               "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        sock.sendall(b"hello\n")
        assert read_all(sock) == b"got hello\n"
    assert listener.wait() == 0, listener.err


def test_connect_exit_status_is_the_programs(procs: Procs) -> None:
    server = procs.sockworks("listen", "tcp:127.0.0.1:0", name="s1", stdin=b"")
    client = procs.sockworks("connect", "--sh-exec", "cat >/dev/null; exit 7",
                             server.endpoint(), name="c1")
    assert client.wait() == 7, client.err
    assert server.wait() == 0, server.err
    server = procs.sockworks("listen", "tcp:127.0.0.1:0", name="s2", stdin=b"")
    client = procs.sockworks("connect", "--sh-exec", "kill -TERM $$", server.endpoint(),
                             name="c2")
    assert client.wait() == 128 + signal.SIGTERM, client.err  # as a shell reports it


# -- listen -k: a program per client ---------------------------------------------


def test_keep_open_runs_a_program_per_client_at_once(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "--sh-exec", READY_THEN_ANSWER,
                               "tcp:127.0.0.1:0", name="l")
    endpoint = listener.endpoint()
    clients = [connect_to(endpoint) for _ in range(6)]
    try:
        for sock in clients:  # six programs running at the same time
            assert read_line(sock) == b"ready\n"
        for i, sock in enumerate(clients):
            sock.sendall(f"client {i}\n".encode())
        for i, sock in enumerate(clients):
            assert read_all(sock) == f"got client {i}\n".encode()
    finally:
        for sock in clients:
            sock.close()
    # Each client saw EOF only after its program was reaped: no zombie left.
    assert children(listener.proc.pid) == []
    assert listener.stop() == 0, listener.err


def test_keep_open_max_conns_bounds_the_programs(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "--max-conns", "2", "--sh-exec",
                               READY_THEN_ANSWER, "tcp:127.0.0.1:0", name="l")
    endpoint = listener.endpoint()
    first, second = connect_to(endpoint), connect_to(endpoint)
    with first, second, connect_to(endpoint) as third:
        assert read_line(first) == b"ready\n" and read_line(second) == b"ready\n"
        assert len(children(listener.proc.pid)) == 2
        third.settimeout(0.5)  # a negative check: the third program must not start yet
        with pytest.raises(TimeoutError):
            third.recv(1)
        first.sendall(b"one\n")
        assert read_all(first) == b"got one\n"
        assert read_line(third) == b"ready\n"  # a slot came free: its program runs
        for sock, name in ((second, b"two"), (third, b"three")):
            sock.sendall(name + b"\n")
            assert read_all(sock) == b"got " + name + b"\n"
    assert listener.stop() == 0, listener.err


def test_no_descriptor_of_ours_leaks_into_a_program(procs: Procs) -> None:
    """With the listener and another client's socket open, a program has
    fds 0 and 1 (the socket) and 2 (our stderr), nothing else."""
    listener = procs.sockworks("listen", "-k", "--sh-exec", "echo $$; read x",
                               "tcp:127.0.0.1:0", name="l")
    endpoint = listener.endpoint()
    with connect_to(endpoint) as other, connect_to(endpoint) as sock:
        read_line(other)
        pid = int(read_line(sock))
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert sorted(fds) == [0, 1, 2], fds
        assert fds[0] == fds[1] and fds[0].startswith("socket:")
        assert fds[2] == str(listener.err_path)
        sock.sendall(b"x\n")
        other.sendall(b"x\n")
        assert read_all(sock) == b"" and read_all(other) == b""
    assert listener.stop() == 0, listener.err


def test_sigterm_stops_the_programs_too(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "--sh-exec", "echo $$; read x",
                               "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        pid = int(read_line(sock))
        assert listener.stop() == 0, listener.err
        assert not Path(f"/proc/{pid}").exists()  # terminated and reaped
        assert read_all(sock) == b""


# -- the environment -------------------------------------------------------------


def _environ(text: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.decode().splitlines() if "=" in line)


def test_environment_tcp(procs: Procs) -> None:
    listener = procs.sockworks("listen", "--exec", "env", "tcp:127.0.0.1:0", name="l",
                               env={"SW_MARK": "inherited", "TCPREMOTEHOST": "stale"})
    endpoint = listener.endpoint()
    with connect_to(endpoint) as sock:
        local = sock.getsockname()
        env = _environ(read_all(sock))
    assert listener.wait() == 0, listener.err
    port = str(tcp_address(endpoint)[1])
    assert {k: env.get(k) for k in ("PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPREMOTEIP",
                                    "TCPREMOTEPORT", "REMOTE_ADDR", "REMOTE_PORT")} == {
        "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": port,
        "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEPORT": str(local[1]),
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(local[1])}
    assert env["SW_MARK"] == "inherited"  # the user's environment, as ncat passes it
    assert "TCPREMOTEHOST" not in env  # a stale connection variable is not ours


def test_environment_tcp6_and_connect(procs: Procs) -> None:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with server:
        port = server.getsockname()[1]
        client = procs.sockworks("connect", "--exec", "env", f"tcp:[::1]:{port}", name="c")
        conn, peer = server.accept()
        with conn:
            conn.shutdown(socket.SHUT_WR)
            env = _environ(read_all(conn))
    assert client.wait() == 0, client.err
    assert env["PROTO"] == "TCP6"
    # connect: the remote end is the server.
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("::1", str(port))
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == ("::1", str(peer[1]))


def test_environment_unix(procs: Procs, sock_path: str) -> None:
    listener = procs.sockworks("listen", "--exec", "env", "unix:" + sock_path, name="l")
    with connect_to(listener.endpoint()) as sock:
        env = _environ(read_all(sock))
    assert listener.wait() == 0, listener.err
    assert env["PROTO"] == "UNIX"
    assert env["UNIXLOCALPATH"] == sock_path
    assert env["UNIXREMOTEPID"] == str(os.getpid())
    assert "TCPREMOTEIP" not in env and "REMOTE_ADDR" not in env


# -- TLS: the bytes go through sockworks ------------------------------------------


def test_tls_cat_large_binary_both_ways(procs: Procs, pki: dict[str, str]) -> None:
    data = payload(3 * MIB, 5)
    listener = procs.sockworks("listen", "--tls", "--cert", pki["cert"], "--exec", "cat",
                               "tcp:127.0.0.1:0", name="l")
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], listener.endpoint(),
                             name="c", stdin=data)
    assert client.wait() == 0, client.err
    assert listener.wait() == 0, listener.err
    assert digest(client.out) == digest(data)


def test_tls_connect_exec_sha256sum(procs: Procs, pki: dict[str, str]) -> None:
    data = payload(2 * MIB, 6)
    server = procs.sockworks("listen", "--tls", "--cert", pki["cert"], "tcp:127.0.0.1:0",
                             name="s", stdin=data)
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], "--exec", "sha256sum",
                             server.endpoint(), name="c")
    assert client.wait() == 0, client.err
    assert server.wait() == 0, server.err
    assert server.out == f"{digest(data)}  -\n".encode()


def test_tls_program_exits_early_close_notify_after_its_output(
        procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "-k", "--tls", "--cert", pki["cert"], "--sh-exec",
                               'read line; echo "got $line $PROTO $REMOTE_ADDR"',
                               "tcp:127.0.0.1:0", name="l")
    context = ssl.create_default_context(cafile=pki["ca"])
    for _ in range(2):  # -k: a program per client over TLS too
        with connect_to(listener.endpoint()) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"hello\n")  # and no close from us
            answer = b""
            while data := tls.recv(4096):  # b"" only at close_notify
                answer += data
            assert answer == b"got hello TCP 127.0.0.1\n"
    # close_notify follows the program's stdout EOF, which may come just
    # before its exit is seen: wait for the reaping.
    wait_no_children(listener.proc.pid)
    assert listener.stop() == 0, listener.err


def test_tls_program_gets_pipes_and_nothing_else(procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki["cert"], "--sh-exec",
                               "echo $$; read x", "tcp:127.0.0.1:0", name="l")
    context = ssl.create_default_context(cafile=pki["ca"])
    with connect_to(listener.endpoint()) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        pid = int(tls.recv(64))
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert sorted(fds) == [0, 1, 2], fds
        assert fds[0].startswith("pipe:") and fds[1].startswith("pipe:")
        tls.sendall(b"x\n")
    assert listener.wait() == 0, listener.err


# -- real peers at the other end ---------------------------------------------------


def test_socat_client_of_listen_exec(procs: Procs, tmp_path: Path) -> None:
    require("socat")
    data = payload(2 * MIB, 7)
    listener = procs.sockworks("listen", "--exec", "sha256sum", "tcp:127.0.0.1:0", name="l")
    host, port = tcp_address(listener.endpoint())
    client = procs.run(["socat", "-t", "10", "STDIO", f"TCP:{host}:{port}"], "socat",
                       stdin=data)
    assert client.wait() == 0, client.err
    assert client.out == f"{digest(data)}  -\n".encode()
    assert listener.wait() == 0, listener.err


def test_connect_exec_to_ncat_listener(procs: Procs) -> None:
    require("ncat")
    data = payload(2 * MIB, 8)
    port = free_port()
    server = procs.run(["ncat", "-l", "127.0.0.1", str(port)], "ncat", stdin=data)
    wait_bound("tcp", port)
    client = procs.sockworks("connect", "--exec", "sha256sum", f"127.0.0.1:{port}", name="c")
    assert client.wait() == 0, client.err
    assert server.wait() == 0, server.err
    assert server.out == f"{digest(data)}  -\n".encode()


def test_ncat_client_of_listen_sh_exec_both_ways(procs: Procs) -> None:
    require("ncat")
    data = payload(2 * MIB, 9)
    listener = procs.sockworks("listen", "--sh-exec", "cat", "tcp:127.0.0.1:0", name="l")
    host, port = tcp_address(listener.endpoint())
    client = procs.run(["ncat", host, str(port)], "ncat", stdin=data)
    assert client.wait() == 0, client.err
    assert digest(client.out) == digest(data)
    assert listener.wait() == 0, listener.err


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "fragment"), [
    (["listen", "--exec", "no-such-program-xyz", "tcp:127.0.0.1:0"],
     "no such program: no-such-program-xyz"),
    (["connect", "--exec", "no-such-program-xyz -v", "127.0.0.1:9"],
     "no such program: no-such-program-xyz"),
    (["listen", "--exec", "/etc/passwd", "tcp:127.0.0.1:0"], "not executable"),
    (["listen", "--exec", "/", "tcp:127.0.0.1:0"], "is a directory"),
    (["listen", "--exec", "cat", "udp:127.0.0.1:0"], "udp has no connection"),
    (["connect", "--sh-exec", "cat", "unixgram:/tmp/none"], "unixgram has no connection"),
    (["listen", "--exec", "cat", "--sh-exec", "cat", "tcp:127.0.0.1:0"], "not allowed with"),
    (["listen", "--exec", "cat 'unclosed", "tcp:127.0.0.1:0"], "no closing quotation"),
    (["listen", "--exec", "  ", "tcp:127.0.0.1:0"], "--exec needs a command"),
    (["listen", "--exec", "cat", "--send-only", "tcp:127.0.0.1:0"], "--send-only does not"),
    (["connect", "--exec", "cat", "--hex", "127.0.0.1:9"], "--hex does not apply"),
    (["connect", "--exec", "cat", "--zero", "127.0.0.1:9"], "--zero scans ports"),
])
def test_usage_errors_exit_2_before_binding(capsys: pytest.CaptureFixture[str],
                                            args: list[str], fragment: str) -> None:
    one_line(capsys, 2, fragment, *args)  # one line: no "listening on" came first


def test_a_program_that_cannot_start_is_status_1(procs: Procs, tmp_path: Path) -> None:
    """Found and executable, but exec fails (a missing interpreter): that
    is known only when it runs. connect: one line, status 1; listen -k: one
    line per connection, and it goes on serving."""
    script = tmp_path / "broken"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    server = procs.sockworks("listen", "tcp:127.0.0.1:0", name="s", stdin=b"")
    client = procs.sockworks("connect", "--exec", str(script), server.endpoint(), name="c")
    assert client.wait() == 1
    assert client.err.strip() == f"sockworks: error: cannot run {script}: No such file or directory"
    listener = procs.sockworks("listen", "-k", "--exec", str(script), "tcp:127.0.0.1:0",
                               name="l")
    for _ in range(2):
        with connect_to(listener.endpoint()) as sock:
            assert read_all(sock) == b""
    listener.wait_err(r"(?s)cannot run .*cannot run ")
    assert listener.proc.poll() is None
    assert listener.stop() == 0
    assert "Traceback" not in listener.err


def test_denied_peer_gets_no_program(procs: Procs) -> None:
    listener = procs.sockworks("listen", "-k", "-v", "--deny", "127.0.0.1", "--exec",
                               "echo hi", "tcp:127.0.0.1:0", name="l")
    with connect_to(listener.endpoint()) as sock:
        assert read_all(sock) == b""
    listener.wait_err("refused a connection from 127.0.0.1")
    assert children(listener.proc.pid) == []
    assert "running" not in listener.err
    assert listener.stop() == 0, listener.err
