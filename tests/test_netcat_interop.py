"""`sockworks connect`/`listen` with real peers nobody here wrote: socat,
ncat and OpenBSD nc, as listeners and as clients, over TCP, UDP and Unix
sockets; binary data and multi-MiB transfers compared by hash in both
directions; half-close; TLS against ncat."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from _netcat_helpers import Proc, Procs, digest, free_port, payload, wait_bound

MIB = 1 << 20
Where = str  # "127.0.0.1:PORT" or a Unix path

# How each peer listens and connects: (transport, where, ...) -> argv.
LISTENERS: dict[str, Callable[[str, str, int], list[str]]] = {
    "socat": lambda t, path, port: ["socat", "-t", "10", {
        "tcp": f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
        "udp": f"UDP-LISTEN:{port},bind=127.0.0.1",
        "unix": f"UNIX-LISTEN:{path}"}[t], "STDIO"],
    "ncat": lambda t, path, port: {
        "tcp": ["ncat", "-l", "127.0.0.1", str(port)],
        "udp": ["ncat", "-l", "-u", "127.0.0.1", str(port)],
        "unix": ["ncat", "-l", "-U", path]}[t],
    "nc": lambda t, path, port: {
        "tcp": ["nc", "-N", "-l", "127.0.0.1", str(port)],
        "udp": ["nc", "-u", "-l", "127.0.0.1", str(port)],
        "unix": ["nc", "-N", "-l", "-U", path]}[t],
}
CLIENTS: dict[str, Callable[[str, str, int], list[str]]] = {
    "socat": lambda t, path, port: ["socat", "-t", "10", "STDIO", {
        "tcp": f"TCP:127.0.0.1:{port}",
        "udp": f"UDP:127.0.0.1:{port}",
        "unix": f"UNIX-CONNECT:{path}"}[t]],
    "ncat": lambda t, path, port: {
        "tcp": ["ncat", "127.0.0.1", str(port)],
        "udp": ["ncat", "-u", "127.0.0.1", str(port)],
        "unix": ["ncat", "-U", path]}[t],
    "nc": lambda t, path, port: {
        "tcp": ["nc", "-N", "127.0.0.1", str(port)],
        "udp": ["nc", "-u", "127.0.0.1", str(port)],
        "unix": ["nc", "-N", "-U", path]}[t],
}
PROGRAM = {"socat": "socat", "ncat": "ncat", "nc": "nc"}


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()
    for leftover in Path("/tmp").glob(Path(sock_path(tmp_path, "*")).name):
        leftover.unlink(missing_ok=True)  # peers do not all remove their sockets


def sock_path(tmp_path: Path, name: str) -> str:
    return f"/tmp/sw-nci-{os.getpid()}-{tmp_path.name[-10:]}-{name}"


def require(peer: str) -> None:
    from conftest import require_peer

    require_peer(PROGRAM[peer])


def finish(peer: Proc, expected: int) -> bytes:
    """The peer's output once it has all of it; the peer is stopped after."""
    data = peer.wait_out(expected)
    peer.kill()
    return data


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("peer", ["socat", "ncat", "nc"])
def test_connect_to_peer_listener(procs: Procs, tmp_path: Path, peer: str,
                                  transport: str) -> None:
    require(peer)
    to_peer, to_us = payload(3 * MIB, 1), payload(2 * MIB, 2)
    if peer == "nc" and transport == "unix":
        # OpenBSD nc over Unix sockets stops sending its stdin once it reads
        # our EOF (socat -b 262144 as the client truncates the same way), so
        # with nc each direction goes in its own connection.
        rounds = [(b"", to_us, ["--recv-only"]), (to_peer, b"", [])]
    else:
        rounds = [(to_peer, to_us, [])]
    for i, (ours, theirs, flags) in enumerate(rounds):
        port, path = free_port(), sock_path(tmp_path, f"{peer}{i}.sock")
        listener = procs.run(LISTENERS[peer](transport, path, port), f"peer{i}", stdin=theirs)
        wait_bound(transport, path if transport == "unix" else port)
        endpoint = f"unix:{path}" if transport == "unix" else f"tcp:127.0.0.1:{port}"
        client = procs.sockworks("connect", *flags, endpoint, name=f"connect{i}", stdin=ours)
        assert client.wait() == 0, client.err
        assert digest(client.out) == digest(theirs)
        assert digest(finish(listener, len(ours))) == digest(ours)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("peer", ["socat", "ncat", "nc"])
def test_peer_client_to_listen(procs: Procs, tmp_path: Path, peer: str, transport: str) -> None:
    require(peer)
    to_us, to_peer = payload(3 * MIB, 3), payload(2 * MIB, 4)
    if peer == "nc" and transport == "unix":  # see test_connect_to_peer_listener
        rounds = [(b"", to_us, ["--recv-only"]), (to_peer, b"", [])]
    else:
        rounds = [(to_peer, to_us, [])]
    for i, (ours, theirs, flags) in enumerate(rounds):
        where = ("tcp:127.0.0.1:0" if transport == "tcp"
                 else "unix:" + sock_path(tmp_path, f"l{i}.sock"))
        listener = procs.sockworks("listen", *flags, where, name=f"listen{i}", stdin=ours)
        endpoint = listener.endpoint()
        port = int(endpoint.rsplit(":", 1)[1]) if transport == "tcp" else 0
        client = procs.run(CLIENTS[peer](transport, endpoint.partition(":")[2], port),
                           f"peer{i}", stdin=theirs)
        assert listener.wait() == 0, listener.err
        assert digest(listener.out) == digest(theirs)
        assert digest(finish(client, len(ours))) == digest(ours)


@pytest.mark.parametrize("peer", ["socat", "ncat", "nc"])
def test_udp_connect_to_peer_listener(procs: Procs, peer: str) -> None:
    require(peer)
    to_peer, to_us = bytes(range(256)), bytes(range(256))[::-1]
    port = free_port()
    listener = procs.run(LISTENERS[peer]("udp", "", port), "peer", stdin=to_us)
    wait_bound("udp", port)
    client = procs.sockworks("connect", "--wait", "1", f"udp:127.0.0.1:{port}",
                             name="connect", stdin=to_peer)
    assert client.wait() == 0, client.err
    assert client.out == to_us
    assert finish(listener, 256) == to_peer


@pytest.mark.parametrize("peer", ["socat", "ncat", "nc"])
def test_udp_peer_client_to_listen(procs: Procs, peer: str) -> None:
    require(peer)
    to_us, to_peer = bytes(range(256)), bytes(range(256))[::-1]
    listener = procs.sockworks("listen", "udp:127.0.0.1:0", name="listen", stdin=to_peer)
    port = int(listener.endpoint().rsplit(":", 1)[1])
    # stdin stays open: ncat -u and nc -u would otherwise quit before the reply.
    client = procs.run(CLIENTS[peer]("udp", "", port), "peer", stdin="pipe")
    assert client.proc.stdin is not None
    client.proc.stdin.write(to_us)
    client.proc.stdin.flush()
    assert listener.wait_out(256) == to_us
    assert finish(client, 256) == to_peer
    assert listener.stop() == 0


def test_half_close_with_socat(procs: Procs, tmp_path: Path) -> None:
    """The peer answers only after it has seen our EOF, both ways round."""
    require("socat")
    data = payload(MIB, 5)
    port = free_port()
    procs.run(["socat", "-t", "10", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
               "EXEC:sha256sum"], "sha-listener")
    wait_bound("tcp", port)
    client = procs.sockworks("connect", f"tcp:127.0.0.1:{port}", name="connect", stdin=data)
    assert client.wait() == 0, client.err
    assert client.out.split()[0] == digest(data).encode()

    listener = procs.sockworks("listen", "tcp:127.0.0.1:0", name="listen", stdin=data)
    port = int(listener.endpoint().rsplit(":", 1)[1])
    procs.run(["socat", "-t", "10", f"TCP:127.0.0.1:{port}", "EXEC:sha256sum"], "sha-client")
    assert listener.wait() == 0, listener.err
    assert listener.out.split()[0] == digest(data).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    files = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem",
             "both": d / "both.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(files["both"]))
    return {k: str(v) for k, v in files.items()}


def test_tls_connect_to_ncat(procs: Procs, pki: dict[str, str]) -> None:
    require("ncat")
    port = free_port()
    listener = procs.run(["ncat", "-l", "--ssl", "--ssl-cert", pki["cert"], "--ssl-key",
                          pki["key"], "127.0.0.1", str(port)], "ncat", stdin=b"over tls\n")
    wait_bound("tcp", port)
    data = payload(MIB, 6)
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"],
                             f"tcp:127.0.0.1:{port}", name="connect", stdin=data)
    assert client.wait() == 0, client.err
    assert client.out == b"over tls\n"
    assert digest(finish(listener, len(data))) == digest(data)


def test_ncat_tls_client_to_listen(procs: Procs, pki: dict[str, str]) -> None:
    require("ncat")
    listener = procs.sockworks("listen", "--tls", "--cert", pki["cert"], "--key", pki["key"],
                               "tcp:127.0.0.1:0", name="listen", stdin=b"hello ncat\n")
    port = int(listener.endpoint().rsplit(":", 1)[1])
    data = payload(MIB, 7)
    # ncat checks the name against DNS names only, not IP addresses.
    client = procs.run(["ncat", "--ssl", "--ssl-verify", "--ssl-trustfile", pki["ca"],
                        "localhost", str(port)], "ncat", stdin=data)
    assert digest(listener.wait_out(len(data))) == digest(data)
    assert finish(client, 11) == b"hello ncat\n"
    listener.stop()


def test_curl_https_to_listen(procs: Procs, pki: dict[str, str]) -> None:
    """curl checks the certificate like a browser would."""
    require_curl = __import__("conftest").require_peer
    curl = require_curl("curl")
    response = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nhi\n"
    listener = procs.sockworks("listen", "--tls", "--cert", pki["both"], "tcp:127.0.0.1:0",
                               name="listen", stdin=response)
    port = int(listener.endpoint().rsplit(":", 1)[1])
    client = procs.run([curl, "-sS", "--cacert", pki["ca"], f"https://127.0.0.1:{port}/x"],
                       "curl")
    assert client.wait() == 0, client.err
    assert client.out == b"hi\n"
    assert listener.wait_out(10).startswith(b"GET /x HTTP/1.1\r\n")
    listener.stop()


def test_unixgram_with_socat(procs: Procs, tmp_path: Path) -> None:
    """Unix datagrams both ways round: socat's UNIX-SENDTO client against
    `listen unixgram:`, and `connect unixgram:` against UNIX-RECVFROM."""
    require("socat")
    to_us, to_peer = bytes(range(256)), bytes(range(256))[::-1]
    listener = procs.sockworks("listen", "unixgram:" + sock_path(tmp_path, "g.sock"),
                               name="listen", stdin=to_peer)
    path = listener.endpoint().partition(":")[2]
    client = procs.run(["socat", "-t", "2", "STDIO",
                        f"UNIX-SENDTO:{path},bind={sock_path(tmp_path, 'gc.sock')}"],
                       "socat-client", stdin=to_us)
    assert listener.wait_out(256) == to_us
    assert finish(client, 256) == to_peer
    assert listener.stop() == 0

    server_path = sock_path(tmp_path, "g2.sock")
    server = procs.run(["socat", "-t", "2", f"UNIX-RECVFROM:{server_path}", "STDIO"],
                       "socat-server", stdin=to_us)
    wait_bound("unixgram", server_path)
    connect = procs.sockworks("connect", "--wait", "1", f"unixgram:{server_path}",
                              name="connect", stdin=to_peer)
    assert connect.wait() == 0, connect.err
    assert connect.out == to_us
    assert finish(server, 256) == to_peer
