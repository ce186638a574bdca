"""Behind real load balancers: HAProxy and nginx in front of sockworks.

HAProxy (PROXY v2, health checks) in front of three instances and nginx
(its stream module, PROXY v1) in front of one: every instance sees the test
client's own address (clients bind 127.0.0.2, 127.0.0.3 ...), ``--deny``
refuses exactly the denied client and ``--per-source`` counts real clients,
not the balancer. Then a rolling restart under load (echo with payload
checks, Gopher fetches compared by hash): every instance is stopped with
SIGTERM and started again on its port, and no client request fails.

The balancers' configurations and the instances' command lines are taken
from docs/scale-out.md, where users read them: the doc's addresses
(192.0.2.10 for the balancer, 10.0.0.5 its inside address, 10.0.0.11-13
the instances) are replaced by loopback ones and nothing else changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REQUIRE_PEERS, ROOT, CLIProcess, require_peer

from sockworks.proxy import ProxyHeaderParser

DOC = ROOT / "docs" / "scale-out.md"
NGINX_STREAM = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
# Linux: let connect() pick the source port for a bound address, so many
# short connections from one address do not run out of ports at bind().
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LOCAL = "127.0.0.1"
# HAProxy's srv_op_state for a server that is up (SRV_ST_RUNNING).
SRV_RUNNING = "2"


# -- the doc's configurations -------------------------------------------------

_BLOCK = re.compile(r"<!-- tested: (\S+) -->\n```[^\n]*\n(.*?)```", re.S)
_DOC_ADDRESS = re.compile(r"\b(?:192\.0\.2|10\.0\.0)\.\d+\b|/run/haproxy/\S+|/srv/gopher")


def doc_blocks() -> dict[str, str]:
    blocks = dict(_BLOCK.findall(DOC.read_text()))
    assert blocks, f"no <!-- tested: NAME --> blocks in {DOC}"
    return blocks


def from_doc(name: str, subs: dict[str, str]) -> str:
    """The doc's block ``name`` with its addresses and paths replaced:
    ``subs`` maps each (``HOST:PORT``, ``HOST`` or path) to its test value.
    Every doc address must be replaced: nothing else differs."""
    text = doc_blocks()[name]
    for old in sorted(subs, key=len, reverse=True):
        text = re.sub(re.escape(old) + r"(?![\d.])", subs[old], text)
    left = _DOC_ADDRESS.findall(text)
    assert not left, f"{name}: doc addresses the test did not replace: {left}"
    return text


def doc_command(name: str, subs: dict[str, str]) -> list[str]:
    """A ``sockworks ...`` command line from the doc, as CLI arguments."""
    argv = shlex.split(from_doc(name, subs))
    assert argv[0] == "sockworks", argv
    return argv[1:]


# -- processes and sockets ---------------------------------------------------


def free_port() -> int:
    """A port free now (a balancer's frontend cannot bind port 0 and say
    which it got); the caller retries if someone takes it meanwhile."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def stream_module() -> None:
    """nginx's stream module is a package of its own on Debian."""
    require_peer("nginx")
    if not NGINX_STREAM.exists():
        message = f"nginx's stream module ({NGINX_STREAM}) is not installed: libnginx-mod-stream"
        if REQUIRE_PEERS:
            pytest.fail(message + "; SOCKWORKS_REQUIRE_PEERS=1 makes this a failure")
        pytest.skip(message)


class Balancer:
    """HAProxy or nginx in the foreground, its output in a file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_balancer(
    argv_for: Callable[[int], list[str]], log: Path, ready: Callable[[Balancer, int], bool]
) -> tuple[Balancer, int]:
    """Start a balancer on a free port; another try on another port if that
    one was taken meanwhile. ``ready(balancer, port)`` is polled (bounded)."""
    for _attempt in range(5):
        port = free_port()
        balancer = Balancer(argv_for(port), log)
        deadline = time.monotonic() + 10
        try:
            while balancer.proc.poll() is None and time.monotonic() < deadline:
                if ready(balancer, port):
                    return balancer, port
                time.sleep(0.02)
        except BaseException:
            balancer.stop()
            raise
        balancer.stop()
        if "in use" not in balancer.log:  # not a port race: a real failure
            raise AssertionError(f"{argv_for(port)[0]} did not start:\n{balancer.log}")
    raise AssertionError("no free port for the balancer after 5 tries")


def haproxy_command(cfg: Path) -> list[str]:
    # -db: in the foreground, not a daemon; no log lines configured, so only
    # its warnings and alerts reach the file.
    return [require_peer("haproxy"), "-f", str(cfg), "-db"]


def haproxy_api(sock_path: Path, command: str) -> str:
    """One command on HAProxy's runtime API (the stats socket)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(command.encode() + b"\n")
        return recv_until_eof(s).decode()


def server_states(sock_path: Path, backend: str) -> dict[str, str]:
    """``{server: srv_op_state}`` from ``show servers state``."""
    states = {}
    for line in haproxy_api(sock_path, f"show servers state {backend}").splitlines():
        fields = line.split()
        if len(fields) > 5 and not line.startswith("#") and fields[1] == backend:
            states[fields[3]] = fields[5]
    return states


def wait_up(sock_path: Path, backend: str, servers: list[str], timeout: float = 10) -> None:
    """Until HAProxy's health checks mark ``servers`` up (a bounded poll:
    HAProxy announces it nowhere else)."""
    deadline = time.monotonic() + timeout
    while True:
        states = server_states(sock_path, backend)
        if all(states.get(s) == SRV_RUNNING for s in servers):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"HAProxy: {backend} {servers} not up: {states}")
        time.sleep(0.05)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 24, *, reset_ends: bool = False) -> bytes:
    """Everything until the peer closes (or, with ``reset_ends``, resets)."""
    chunks, total = [], 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            if not reset_ends:
                raise
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def client(source: str, port: int, timeout: float = 10) -> socket.socket:
    """A connection to the balancer from the loopback address ``source``."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((LOCAL, port))
    except BaseException:
        s.close()
        raise
    return s


def exchange(
    source: str, port: int, payload: bytes, *, half_close: bool = True
) -> tuple[int, bytes]:
    """One request on its own connection: (our source port, the answer
    read until the server closed)."""
    with client(source, port) as s:
        s.sendall(payload)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return s.getsockname()[1], recv_until_eof(s)


def served(s: socket.socket) -> bool:
    """Echo a line on a held connection: True if answered, False if the
    server closed it unserved (EOF, or a reset: our line was unread)."""
    try:
        s.sendall(b"ping\n")
        return s.recv(100) == b"ping\n"
    except (ConnectionResetError, BrokenPipeError):
        return False


def start_instance(
    cli: type[CLIProcess], args: list[str], count: int = 1
) -> tuple[CLIProcess, list[int]]:
    proc = cli(args)
    return proc, [ep.port for ep in proc.wait_listening(count)]


def served_lines(log: str, source: str) -> list[int]:
    """The source ports of ``source``'s connections in an instance's log."""
    return [int(p) for p in re.findall(rf"{re.escape(source)}:(\d+) connected", log)]


def assert_clean(log: str) -> None:
    """Nothing in an instance's log that a balancer should not cause."""
    for bad in ("PROXY header", "not a trusted proxy", "timed out", "Traceback",
                "ERROR", "WARNING", "aborting"):
        assert bad not in log, f"{bad!r} in the log:\n{log}"


# -- the doc -----------------------------------------------------------------


def test_the_doc_has_every_configuration_the_tests_run() -> None:
    blocks = doc_blocks()
    assert set(blocks) >= {
        "haproxy-instance", "haproxy.cfg", "haproxy-gopher.cfg", "instance.toml",
        "nginx-instance", "nginx.conf",
    }
    haproxy = blocks["haproxy.cfg"]
    for directive in ("mode tcp", "balance roundrobin", "send-proxy-v2 check",
                      "option redispatch", "retries 3"):
        assert directive in haproxy
    assert "on-marked-down shutdown-sessions" not in haproxy
    assert "proxy_protocol on;" in blocks["nginx.conf"]
    assert "proxy_half_close on;" in blocks["nginx.conf"]
    assert "--proxy-protocol v1" in blocks["nginx-instance"]
    assert "--proxy-protocol v2" in blocks["haproxy-instance"]
    assert "docs/scale-out.md" in (ROOT / "README.md").read_text()


# -- HAProxy -----------------------------------------------------------------


@contextlib.contextmanager
def haproxy(tmp_path: Path, blocks: list[str], subs: dict[str, str],
            backends: dict[str, list[str]]) -> Iterator[tuple[Balancer, dict[str, int], Path]]:
    """HAProxy running the doc's ``blocks``; the frontends (doc addresses
    192.0.2.10:7 and :70) on free ports; yields (balancer, {frontend
    address: port}, stats socket) once every server in ``backends`` is up."""
    api = tmp_path / "haproxy.sock"
    assert len(str(api)) < 100, api
    cfg = tmp_path / "haproxy.cfg"
    frontends: dict[str, int] = {}

    def argv_for(port: int) -> list[str]:
        frontends.clear()
        frontends["192.0.2.10:7"] = port
        if len(blocks) > 1:
            frontends["192.0.2.10:70"] = free_port()
        text = "\n".join(
            from_doc(b, subs | {"/run/haproxy/sockworks.sock": str(api)}
                     | {k: f"{LOCAL}:{v}" for k, v in frontends.items()})
            for b in blocks
        )
        cfg.write_text(text)
        return haproxy_command(cfg)

    def ready(_b: Balancer, _port: int) -> bool:
        # The runtime API answers once every listener is bound.
        try:
            return "Uptime" in haproxy_api(api, "show info")
        except OSError:
            return False

    balancer, _ = start_balancer(argv_for, tmp_path / "haproxy.log", ready)
    try:
        for backend, servers in backends.items():
            wait_up(api, backend, servers)
        yield balancer, dict(frontends), api
    finally:
        balancer.stop()


def test_haproxy_health_checks_send_a_local_header(tmp_path: Path) -> None:
    """What HAProxy's ``check`` sends to a ``send-proxy-v2`` server: a v2
    LOCAL header and nothing else (so sockworks uses the real address)."""
    require_peer("haproxy")
    listeners = [socket.create_server((LOCAL, 0)) for _ in range(3)]
    try:
        subs = {f"10.0.0.1{i + 1}:7007": f"{LOCAL}:{s.getsockname()[1]}"
                for i, s in enumerate(listeners)}
        with haproxy(tmp_path, ["haproxy.cfg"], subs, {}):
            listeners[0].settimeout(10)
            conn, _ = listeners[0].accept()
            with conn:
                conn.settimeout(5)
                # HAProxy ends a check with a reset (SO_LINGER 0): what it
                # sent before is still read.
                sent = recv_until_eof(conn, reset_ends=True)
    finally:
        for s in listeners:
            s.close()
    parser = ProxyHeaderParser("v2")
    info = parser.feed(sent)
    assert info is not None and info.command == "LOCAL", (sent, info)
    assert parser.rest == b"", sent


def test_haproxy_v2_real_addresses_deny_and_per_source(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    require_peer("haproxy")
    instances: list[CLIProcess] = []
    subs = {"10.0.0.5": LOCAL}
    for _ in range(3):
        args = doc_command("haproxy-instance", subs | {"10.0.0.11:7007": f"{LOCAL}:0"})
        proc, _ports = start_instance(cli, [*args, "--deny", "127.0.0.3", "--per-source", "2"])
        instances.append(proc)
    for i, proc in enumerate(instances):
        subs[f"10.0.0.1{i + 1}:7007"] = f"{LOCAL}:{proc.wait_listening(1)[0].port}"

    with haproxy(tmp_path, ["haproxy.cfg"], subs, {"echo": ["s1", "s2", "s3"]}) as (
        balancer, frontends, _api
    ):
        # HAProxy starts with its servers up; a check has been made once
        # each instance logs one (HAProxy's own address: a LOCAL header).
        for proc in instances:
            proc.wait_for(rf"{re.escape(LOCAL)}:\d+ closed after")
        port = frontends["192.0.2.10:7"]
        # 1. Three requests from each of three clients; 127.0.0.3 is denied.
        asked: dict[str, list[int]] = {}
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            for n in range(3):
                payload = f"{source} #{n}\n".encode()
                try:
                    src_port, answer = exchange(source, port, payload)
                except ConnectionResetError:
                    src_port, answer = -1, b""
                asked.setdefault(source, []).append(src_port)
                expected = b"" if source == "127.0.0.3" else payload
                assert answer == expected, (source, answer)

        # 2. --per-source 2 counts clients: nine held connections from
        # 127.0.0.2, three per instance (round robin): each refuses its
        # third; 127.0.0.4 is still served meanwhile.
        held: list[socket.socket] = []
        try:
            outcome = []
            for _ in range(9):
                s = client("127.0.0.2", port)
                held.append(s)
                outcome.append(served(s))
            others = []
            for _ in range(3):
                s = client("127.0.0.4", port)
                held.append(s)
                others.append(served(s))
        finally:
            for s in held:
                s.close()
    for p in instances:
        assert p.stop() == 0
    logs = [p.log for p in instances]
    print(f"HAProxy per-source: 127.0.0.2 served {outcome}, 127.0.0.4 served {others}")
    assert outcome.count(False) == 3 and others == [True] * 3, (outcome, others)
    for i, log in enumerate(logs):
        refusals = re.findall(r"127\.0\.0\.2:\d+ refused: per-source limit \(2\) reached", log)
        assert len(refusals) == 1, f"instance {i + 1}:\n{log}"

    # Each served request is in exactly one instance's log, with the
    # client's own address and port; every instance got some.
    for source in ("127.0.0.2", "127.0.0.4"):
        for src_port in asked[source]:
            where = [i for i, log in enumerate(logs) if src_port in served_lines(log, source)]
            assert len(where) == 1, (source, src_port, where)
    for i, log in enumerate(logs):
        assert served_lines(log, "127.0.0.2") or served_lines(log, "127.0.0.4"), log
        assert not served_lines(log, "127.0.0.3"), log
        # Health checks: LOCAL headers, so HAProxy's own address, no error.
        assert served_lines(log, LOCAL), f"no health check seen by instance {i + 1}:\n{log}"
        assert_clean(log)
    denied = [line for log in logs for line in log.splitlines()
              if re.search(r"127\.0\.0\.3:\d+ refused: denied by", line)]
    assert denied, "\n\n".join(logs)
    print("HAProxy: instance log lines:", *[
        next(line for line in log.splitlines() if "127.0.0.2:" in line) for log in logs
    ], *denied, sep="\n  ")
    assert "ALERT" not in balancer.log, balancer.log


# -- nginx -------------------------------------------------------------------


def test_nginx_v1_real_addresses_deny_and_per_source(
    cli: type[CLIProcess], tmp_path: Path
) -> None:
    stream_module()
    nginx = require_peer("nginx")
    subs = {"10.0.0.5": LOCAL}
    args = doc_command("nginx-instance", subs | {"10.0.0.11:7007": f"{LOCAL}:0"})
    instance, (instance_port,) = start_instance(
        cli, [*args, "--deny", "127.0.0.3", "--per-source", "2"]
    )
    subs["10.0.0.11:7007"] = f"{LOCAL}:{instance_port}"
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cfg = prefix / "nginx.conf"

    def argv_for(port: int) -> list[str]:
        cfg.write_text(from_doc("nginx.conf", subs | {"192.0.2.10:7": f"{LOCAL}:{port}"}))
        # A prefix of its own, in the foreground, one process: no root
        # needed, nothing outside the temporary directory touched.
        return [nginx, "-p", str(prefix), "-c", str(cfg), "-g",
                f"daemon off; master_process off; pid {prefix}/nginx.pid;"
                f" error_log {prefix}/error.log info;"]

    def ready(_b: Balancer, port: int) -> bool:
        # nginx says nothing once it listens: a request through it is the signal.
        try:
            return exchange("127.0.0.9", port, b"ready?\n")[1] == b"ready?\n"
        except OSError:
            return False

    balancer, port = start_balancer(argv_for, prefix / "out.log", ready)
    try:
        asked: dict[str, list[int]] = {}
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            for n in range(2):
                payload = f"{source} #{n}\n".encode()
                try:
                    src_port, answer = exchange(source, port, payload)
                except ConnectionResetError:
                    src_port, answer = -1, b""
                asked.setdefault(source, []).append(src_port)
                expected = b"" if source == "127.0.0.3" else payload
                assert answer == expected, (source, answer)
        held: list[socket.socket] = []
        try:
            outcome = []
            for _ in range(3):
                s = client("127.0.0.2", port)
                held.append(s)
                outcome.append(served(s))
            s = client("127.0.0.4", port)
            held.append(s)
            other = served(s)
        finally:
            for s in held:
                s.close()
    finally:
        balancer.stop()
    assert instance.stop() == 0
    log = instance.log
    print(f"nginx per-source: 127.0.0.2 served {outcome}, 127.0.0.4 served {other}")
    assert outcome == [True, True, False] and other, (outcome, other, log)
    assert re.search(r"127\.0\.0\.2:\d+ refused: per-source limit \(2\) reached", log), log
    for source in ("127.0.0.2", "127.0.0.4"):
        assert sorted(asked[source]) == sorted(
            p for p in served_lines(log, source) if p in asked[source]
        ), (source, asked[source], log)
    assert not served_lines(log, "127.0.0.3")
    denied = re.findall(r".*127\.0\.0\.3:\d+ refused: denied by.*", log)
    assert denied, log
    assert not served_lines(log, LOCAL), "a connection seemed to come from nginx itself:\n" + log
    assert_clean(log)
    print("nginx: instance log lines:", *[
        line for line in log.splitlines() if "127.0.0.2:" in line][:2], *denied, sep="\n  ")


# -- rolling restart -----------------------------------------------------------

LOAD_SECONDS = 10.0
ECHO_CLIENTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
GOPHER_CLIENTS = ("127.0.0.5", "127.0.0.6")
_PORTS = re.compile(r"(echo|gopher) listening on tcp:127\.0\.0\.1:(\d+)")


@dataclass
class Load:
    """Clients that keep asking until told to stop, and what they saw."""

    t0: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: dict[str, int] = field(default_factory=lambda: {"echo": 0, "gopher": 0})
    failures: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        with self.lock:
            self.events.append(f"{time.monotonic() - self.t0:6.3f} s {what}")

    def run(self, kind: str, source: str, ask: Callable[[random.Random], str | None]) -> None:
        rng = random.Random(source)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                problem = ask(rng)
            except OSError as exc:
                problem = repr(exc)
            with self.lock:
                if problem is None:
                    self.ok[kind] += 1
                else:
                    self.failures.append(
                        f"{started - self.t0:6.3f} s {kind} from {source}: {problem}"
                        f" (after {time.monotonic() - started:.3f} s)"
                    )

    def total(self) -> int:
        with self.lock:
            return sum(self.ok.values())


def wait_served(load: Load, more: int, timeout: float = 10) -> None:
    """Until the clients have completed ``more`` requests from now (bounded)."""
    target = load.total() + more
    deadline = time.monotonic() + timeout
    while load.total() < target:
        assert time.monotonic() < deadline, f"the load stalled:\n{load.failures}"
        time.sleep(0.01)


def sessions(sock_path: Path, backend: str, server: str) -> int:
    """HAProxy's current sessions on ``server`` (``show stat``: scur)."""
    for line in haproxy_api(sock_path, "show stat").splitlines():
        fields = line.split(",")
        if fields[:2] == [backend, server]:
            return int(fields[4])
    raise AssertionError(f"no {backend}/{server} in show stat")


def drain(sock_path: Path, n: int) -> None:
    """The operator's way: no new sessions to instance ``n``, then wait
    (bounded) until HAProxy has none left on it."""
    for backend, server in (("echo", f"s{n}"), ("gopher", f"g{n}")):
        haproxy_api(sock_path, f"set server {backend}/{server} state drain")
    deadline = time.monotonic() + 10
    while sessions(sock_path, "echo", f"s{n}") or sessions(sock_path, "gopher", f"g{n}"):
        assert time.monotonic() < deadline, "HAProxy's sessions on a drained server never ended"
        time.sleep(0.01)


@pytest.mark.parametrize("how", [
    "drain-then-sigterm",
    "sigterm",
])
def test_rolling_restart_behind_haproxy_drops_nothing(
    how: str, cli: type[CLIProcess], tmp_path: Path
) -> None:
    """Three instances, each serving echo and Gopher (the doc's instance
    file), behind HAProxy (the doc's configuration); ten seconds of load
    while each instance in turn gets SIGTERM, exits, and starts again on
    the same ports. Every request must be answered, and answered right.
    ``drain-then-sigterm``: first set to drain on HAProxy's runtime API
    until its sessions there end, and back to ready once it is up again."""
    require_peer("haproxy")
    root = tmp_path / "gopher"
    root.mkdir()
    blob = random.Random(7).randbytes(256 * 1024)
    (root / "blob.bin").write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()

    def instance_file(n: int, echo: int, gopher: int) -> Path:
        path = tmp_path / f"instance{n}.toml"
        path.write_text(from_doc("instance.toml", {
            "10.0.0.5": LOCAL, "10.0.0.11:7007": f"{LOCAL}:{echo}",
            "10.0.0.11:7070": f"{LOCAL}:{gopher}", "/srv/gopher": str(root),
        }))
        return path

    def start(path: Path) -> tuple[CLIProcess, dict[str, int]]:
        proc = cli(["serve", "--config", str(path)])
        proc.wait_listening(2)
        return proc, {m[1]: int(m[2]) for line in proc.lines if (m := _PORTS.search(line))}

    procs: list[CLIProcess] = []
    files: list[Path] = []
    subs: dict[str, str] = {}
    for n in (1, 2, 3):
        proc, ports = start(instance_file(n, 0, 0))
        procs.append(proc)
        # Started again on the same ports: the file names them now.
        files.append(instance_file(n, ports["echo"], ports["gopher"]))
        subs[f"10.0.0.1{n}:7007"] = f"{LOCAL}:{ports['echo']}"
        subs[f"10.0.0.1{n}:7070"] = f"{LOCAL}:{ports['gopher']}"
    old_logs: list[str] = []

    backends = {"echo": ["s1", "s2", "s3"], "gopher": ["g1", "g2", "g3"]}
    with haproxy(tmp_path, ["haproxy.cfg", "haproxy-gopher.cfg"], subs, backends) as (
        balancer, frontends, api
    ):
        echo_port, gopher_port = frontends["192.0.2.10:7"], frontends["192.0.2.10:70"]

        def ask_echo(source: str) -> Callable[[random.Random], str | None]:
            def ask(rng: random.Random) -> str | None:
                payload = rng.randbytes(rng.randint(1, 16384))
                _, answer = exchange(source, echo_port, payload)
                if answer != payload:
                    return f"sent {len(payload)} B, got {len(answer)} B back" + (
                        " (different bytes)" if len(answer) == len(payload) else "")
                return None
            return ask

        def ask_gopher(source: str) -> Callable[[random.Random], str | None]:
            def ask(_rng: random.Random) -> str | None:
                _, answer = exchange(source, gopher_port, b"blob.bin\r\n", half_close=False)
                if hashlib.sha256(answer).hexdigest() != digest:
                    return f"blob.bin: got {len(answer)} B of {len(blob)}, hash differs"
                return None
            return ask

        for proc in procs:  # every instance has answered a health check
            proc.wait_for(rf"{re.escape(LOCAL)}:\d+ closed after")
        load = Load()
        threads = [
            threading.Thread(target=load.run, args=("echo", s, ask_echo(s)), daemon=True)
            for s in ECHO_CLIENTS
        ] + [
            threading.Thread(target=load.run, args=("gopher", s, ask_gopher(s)), daemon=True)
            for s in GOPHER_CLIENTS
        ]
        for t in threads:
            t.start()
        restarts = 0
        try:
            for n in (1, 2, 3):
                # The restarts spread over the load: at 1.5, 4.5 and 7.5 s.
                load.stop.wait(max(0.0, load.t0 + 3 * n - 1.5 - time.monotonic()))
                old = procs[n - 1]
                if how == "drain-then-sigterm":
                    drain(api, n)
                    load.note(f"instance {n}: drained in HAProxy")
                load.note(f"instance {n}: SIGTERM")
                code = old.stop(signal.SIGTERM)
                load.note(f"instance {n}: exited with {code}")
                assert code == 0, old.log
                old_logs.append(old.log)
                new, ports = start(files[n - 1])
                procs[n - 1] = new
                assert ports == {"echo": int(subs[f"10.0.0.1{n}:7007"].rsplit(":", 1)[1]),
                                 "gopher": int(subs[f"10.0.0.1{n}:7070"].rsplit(":", 1)[1])}
                load.note(f"instance {n}: listening again")
                new.wait_for(rf"{re.escape(LOCAL)}:\d+ closed after")  # a health check
                if how == "drain-then-sigterm":
                    for backend, server in (("echo", f"s{n}"), ("gopher", f"g{n}")):
                        haproxy_api(api, f"set server {backend}/{server} state ready")
                wait_up(api, "echo", [f"s{n}"])
                wait_up(api, "gopher", [f"g{n}"])
                load.note(f"instance {n}: up in HAProxy")
                # Clients reach it again before the next one stops.
                new.wait_for(r"127\.0\.0\.[2-6]:\d+ connected")
                load.note(f"instance {n}: serving clients again")
                restarts += 1
            left = LOAD_SECONDS - (time.monotonic() - load.t0)
            if left > 0:
                load.stop.wait(left)
        finally:
            load.stop.set()
            for t in threads:
                t.join(30)
        haproxy_log = balancer.log
    for proc in procs:
        assert proc.stop() == 0
    elapsed = time.monotonic() - load.t0
    report = (
        f"rolling restart: {load.ok['echo']} echo + {load.ok['gopher']} gopher requests"
        f" answered in {elapsed:.1f} s, {len(load.failures)} failed, {restarts} restarts\n"
        + "\n".join(load.events) + "\nfailures:\n" + "\n".join(load.failures[:40])
    )
    if load.failures:  # what the stopping instances said about their last connections
        report += "\nstopping instances:\n" + "\n".join(
            line for log in old_logs for line in log.splitlines()
            if re.search(r"shutting down|[^\d]0 B (in|out)|refused|reset|aborted", line)
            and f" {LOCAL}:" not in line  # not a health check
        )
        for n, log in enumerate(old_logs, 1):
            (tmp_path / f"stopped{n}.log").write_text(log)
    print(report)
    assert restarts == 3, report
    assert not load.failures, report + "\nHAProxy:\n" + haproxy_log
    assert load.ok["echo"] > 50 and load.ok["gopher"] > 20, report
    for log in old_logs + [p.log for p in procs]:
        assert_clean(log)
