"""`sockworks connect --tls` and `listen --tls` with a test CA (trustme):
a good certificate, a wrong host name, an expired certificate, an unknown
CA, the system store, --insecure, --servername, client certificates. Every
failure is one line on stderr and status 1, on both sides.

Then the attacks on a ``listen --tls -k`` (issue 9, item 8): a plaintext
peer that holds its connection open, a flood of ClientHellos that never
finish, a handshake that never ends; in each, a well-behaved client on
another loopback address (127.0.0.3) must still be served at once."""

from __future__ import annotations

import datetime
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _netcat_helpers import (
    PARTIAL_CLIENT_HELLO,
    Procs,
    digest,
    payload,
    tcp_address,
    tls_bystander,
)

from sockworks.netcat import NetcatOptions, describe_tls_error

MIB = 1 << 20


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.cleanup()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    other_ca.cert_pem.write_to_path(str(files["other_ca"]))
    certs = {
        "good": ca.issue_cert("localhost", "127.0.0.1"),
        "wrong_host": ca.issue_cert("elsewhere.test"),
        "expired": ca.issue_cert("localhost", "127.0.0.1",
                                 not_after=datetime.datetime(2020, 1, 1)),
        "unknown_ca": other_ca.issue_cert("localhost", "127.0.0.1"),
        "client": ca.issue_cert("client.test"),
    }
    for name, cert in certs.items():
        files[name] = d / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(files[name]))
    return {k: str(v) for k, v in files.items()}


def test_tls_good_certificate(procs: Procs, pki: dict[str, str]) -> None:
    data = payload(MIB)
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], "tcp:127.0.0.1:0",
                               name="listen", stdin=b"from server\n")
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], listener.endpoint(),
                             name="connect", stdin=data)
    assert client.wait() == 0, client.err
    assert listener.wait() == 0, listener.err
    assert client.out == b"from server\n"
    assert digest(listener.out) == digest(data)


@pytest.mark.parametrize(("cert", "args", "message"), [
    ("wrong_host", [], "certificate is not valid for host '127.0.0.1'"),
    ("expired", [], "certificate has expired"),
    ("unknown_ca", [], "unknown CA"),
    ("good", ["--no-cafile"], "unknown CA"),  # the system store does not know the test CA
])
def test_tls_failures_are_one_line(procs: Procs, pki: dict[str, str], cert: str,
                                   args: list[str], message: str) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki[cert], "tcp:127.0.0.1:0",
                               name="listen")
    cafile = [] if args == ["--no-cafile"] else ["--cafile", pki["ca"]]
    client = procs.sockworks("connect", "--tls", *cafile, listener.endpoint(), name="connect",
                             stdin=b"secret")
    assert client.wait() == 1
    lines = client.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "TLS" in lines[0], client.err
    assert "Traceback" not in client.err + listener.err
    assert listener.wait() == 1  # the listener says why too, in one line
    assert listener.out == b""


def test_tls_insecure_skips_verification(procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki["unknown_ca"],
                               "tcp:127.0.0.1:0", name="listen", stdin=b"pong\n")
    client = procs.sockworks("connect", "--tls", "--insecure", listener.endpoint(),
                             name="connect", stdin=b"ping\n")
    assert client.wait() == 0, client.err
    assert client.out == b"pong\n"
    assert listener.wait() == 0
    assert listener.out == b"ping\n"


def test_tls_servername(procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki["wrong_host"],
                               "tcp:127.0.0.1:0", name="listen", stdin=b"ok\n")
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], "--servername",
                             "elsewhere.test", listener.endpoint(), name="connect")
    assert client.wait() == 0, client.err
    assert client.out == b"ok\n"


def test_tls_client_certificate(procs: Procs, pki: dict[str, str]) -> None:
    need = ["--require-client-cert", "--cafile", pki["ca"]]
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], *need,
                               "tcp:127.0.0.1:0", name="listen")
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], listener.endpoint(),
                             name="anonymous", stdin=b"hi")
    assert client.wait() == 1
    assert "client certificate is required" in client.err, client.err
    assert listener.wait() == 1
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], *need,
                               "tcp:127.0.0.1:0", name="listen2", stdin=b"welcome\n")
    client = procs.sockworks("connect", "--tls", "--cafile", pki["ca"], "--cert",
                             pki["client"], listener.endpoint(), name="known", stdin=b"hi")
    assert client.wait() == 0, client.err
    assert client.out == b"welcome\n"
    assert listener.wait() == 0 and listener.out == b"hi"




# How long the well-behaved client may wait for its handshake while an
# attack is on. Served normally it takes a few milliseconds; each defect
# cost about a second (the blocking read after the alert) or forever (the
# ClientHello flood), so 0.5 s separates them even on a loaded 2-core
# machine. The figures are in the test's output (-s) and the report.
BYSTANDER_BOUND = 0.5

# Where an OpenSSL source location would show: "(_ssl.c:1006)", "ssl/record/…".
OPENSSL_NOISE = re.compile(r"\.c:\d+|\[SSL|ssl/")


def _tls_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "TLS" in line]


def test_tls_plaintext_peer_does_not_stall_others(procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], "-k",
                               "tcp:127.0.0.1:0", name="listen")
    address = tcp_address(listener.endpoint())
    with socket.create_connection(address, timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        # The listener's FIN says it has given up on us (a plaintext
        # request gets no alert). We hold the connection open: before the
        # fix the listener now sat in a blocking read of it for a second.
        assert plain.recv(100) == b""
        elapsed = tls_bystander(address, pki["ca"])
        print(f"bystander handshake with a plaintext peer holding on: {elapsed * 1000:.1f} ms")
        assert elapsed < BYSTANDER_BOUND
    assert listener.wait_out(6) == b"hello\n"
    assert listener.stop() == 0
    # One line at the default level (no -v), with the peer and a plain reason.
    lines = _tls_lines(listener.err)
    assert len(lines) == 1, listener.err
    assert re.search(r"TLS handshake with 127\.0\.0\.1:\d+ failed: not TLS", lines[0]), lines
    assert not OPENSSL_NOISE.search(listener.err), listener.err


def test_tls_unfinished_handshakes_do_not_lock_out(procs: Procs, pki: dict[str, str]) -> None:
    # 50 peers send the start of a ClientHello and stop, against room for 4
    # connections: before the fix 4 of them held every slot forever and the
    # rest (and everyone after) waited in the backlog. No --handshake-timeout
    # here: a newcomer must not have to wait for it.
    max_conns = 4
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], "-k",
                               "--max-conns", str(max_conns), "tcp:127.0.0.1:0", name="listen")
    address = tcp_address(listener.endpoint())
    stallers = []
    try:
        for _ in range(50):
            s = socket.create_connection(address, timeout=5)
            s.sendall(PARTIAL_CLIENT_HELLO)
            stallers.append(s)
        elapsed = tls_bystander(address, pki["ca"])
        print(f"bystander handshake behind 50 stalled ClientHellos: {elapsed * 1000:.1f} ms")
        assert elapsed < BYSTANDER_BOUND
        assert listener.wait_out(6) == b"hello\n"
        # --max-conns still bounds what the listener holds open: unfinished
        # handshakes make room for newcomers instead of adding to it.
        sockets = [fd for fd in os.listdir(f"/proc/{listener.proc.pid}/fd")
                   if os.readlink(f"/proc/{listener.proc.pid}/fd/{fd}").startswith("socket:")]
        assert len(sockets) <= 2 * max_conns + 1, sockets
    finally:
        for s in stallers:
            s.close()
    assert listener.stop() == 0
    assert "Traceback" not in listener.err
    assert not OPENSSL_NOISE.search(listener.err), listener.err


def test_tls_listen_handshake_timeout(procs: Procs, pki: dict[str, str]) -> None:
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"], "-k",
                               "--handshake-timeout", "0.5", "tcp:127.0.0.1:0", name="listen")
    address = tcp_address(listener.endpoint())
    with socket.create_connection(address, timeout=10) as staller:
        staller.sendall(PARTIAL_CLIENT_HELLO)
        start = time.monotonic()
        assert staller.recv(100) == b""  # closed by the listener, not by us
        assert time.monotonic() - start >= 0.4  # by the timeout, not at once
        assert tls_bystander(address, pki["ca"]) < BYSTANDER_BOUND
    assert listener.stop() == 0
    lines = _tls_lines(listener.err)
    assert len(lines) == 1, listener.err
    assert re.search(r"TLS handshake with 127\.0\.0\.1:\d+ failed: .*timed out", lines[0]), lines


def test_tls_plain_listen_handshake_timeout(procs: Procs, pki: dict[str, str]) -> None:
    # Without -k the one connection was the exchange: its timeout ends it, status 1.
    listener = procs.sockworks("listen", "--tls", "--cert", pki["good"],
                               "--handshake-timeout", "0.3", "tcp:127.0.0.1:0", name="listen")
    with socket.create_connection(tcp_address(listener.endpoint()), timeout=10) as staller:
        staller.sendall(PARTIAL_CLIENT_HELLO)
        assert listener.wait() == 1
    lines = listener.err.strip().splitlines()
    assert len(lines) == 2 and "timed out after 0.3 s (--handshake-timeout)" in lines[1], lines


def test_tls_failure_reasons_are_plain_words() -> None:
    # Real errors from a server-side TLS object fed what peers send.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("localhost").configure_cert(context)
    cases = [(b"GET / HTTP/1.0\r\n\r\n", "not TLS (plaintext HTTP?)"),
             (b"SSH-2.0-OpenSSH_9.2\r\n", "not TLS (plaintext?)"),
             (b"\0" * 32, "not TLS (plaintext?)"),
             (PARTIAL_CLIENT_HELLO, "closed the connection")]
    for data, words in cases:
        incoming = ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
        incoming.write(data)
        incoming.write_eof()
        with pytest.raises(ssl.SSLError) as caught:
            tls.do_handshake()
        line = describe_tls_error(caught.value, "127.0.0.1:4000")
        assert "127.0.0.1:4000" in line and words in line, (data, line)
        assert not OPENSSL_NOISE.search(line), line


def test_tls_connect_handshake_timeout(procs: Procs) -> None:
    # A server that accepts (the kernel does, into the backlog) and never answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = procs.sockworks("connect", "--tls", "--insecure", "--handshake-timeout", "0.5",
                                 f"tcp:127.0.0.1:{port}", name="connect", stdin=b"hi")
        assert client.wait() == 1
    lines = client.err.strip().splitlines()
    assert len(lines) == 1 and "TLS handshake with tcp:127.0.0.1" in lines[0], client.err
    assert "timed out" in lines[0]


def test_tls_handshake_timeout_defaults() -> None:
    assert NetcatOptions().handshake_timeout == 10.0
