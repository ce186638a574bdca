"""Layers before the protocol, on real sockets: the PROXY header, then TLS.

The core reads a PROXY header exactly (never a byte past it), admits the
client by the address the header gives, runs the TLS handshake with a
deadline, and only then starts the style's connection: the same for the
sans-I/O, async and blocking styles.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

import sockworks
from sockworks import AccessPolicy, Output, Peer, ProxySettings, ServiceConfig, TLSSettings
from sockworks.proxy import encode_v1, encode_v2
from sockworks.testing import ServerThread

SEEN: list[Peer] = []


class Who(sockworks.StreamProtocol):
    """Answers with who the server thinks the client is."""

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        SEEN.append(peer)
        subject = peer.tls_subject or "-"
        return sockworks.close(f"{peer} {subject}\n".encode())


async def who_async(stream: sockworks.Stream) -> None:
    SEEN.append(stream.peer)
    await stream.write(f"{stream.peer} {stream.peer.tls_subject or '-'}\n".encode())


def who_blocking(conn: Any) -> None:
    SEEN.append(conn.peer)
    conn.sendall(f"{conn.peer} {conn.peer.tls_subject or '-'}\n".encode())


STYLES: dict[str, Any] = {"sansio": Who, "async": who_async, "blocking": who_blocking}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> Iterator[TLSSettings]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    client_ca = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(client_ca))
    yield TLSSettings(cert=str(chain), client_ca=str(client_ca), handshake_timeout=1.0)


def _client_context(ca: trustme.CA, name: str = "alice") -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    ca.issue_cert(f"{name}@example.org", common_name=name).configure_cert(context)
    return context


def _serve(handler: Any, listen: str, **kw: Any) -> ServerThread:
    SEEN.clear()
    return ServerThread(ServiceConfig.create(handler, [listen], name="layers", **kw))


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def _tls_answer(ep: sockworks.Endpoint, ca: trustme.CA, name: str = "alice",
                before: bytes = b"") -> bytes:
    """What a TLS client with a certificate for ``name`` is answered;
    ``before`` is sent in the clear first (a PROXY header)."""
    raw = socket.create_connection((ep.host, ep.port), timeout=10)
    raw.sendall(before)
    with _client_context(ca, name).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        return _read_all(sock)


def _refused(sock: socket.socket) -> bool:
    """Closed with nothing served: EOF, or a reset (the server closed with
    our unread bytes; nothing of its own was lost)."""
    try:
        return _read_all(sock) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("style", STYLES)
def test_tls_listener_serves_every_style_with_the_client_subject(
    style: str, tls: TLSSettings, ca: trustme.CA
) -> None:
    with _serve(STYLES[style], "tls:127.0.0.1:0", tls=tls) as srv:
        ep = srv.endpoint()
        assert str(ep).startswith("tls:127.0.0.1:")
        answer = _tls_answer(ep, ca).decode()
    assert answer.startswith("127.0.0.1:")
    assert "commonName=alice" in answer, answer


def test_plaintext_on_a_tls_port_is_one_log_line_and_others_are_served(
    tls: TLSSettings, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tls:127.0.0.1:0", tls=tls
    ) as srv:
        ep = srv.endpoint()
        with socket.create_connection((ep.host, ep.port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert _refused(plain)
        assert _tls_answer(ep, ca).startswith(b"127.0.0.1:")
    failed = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(failed) == 1 and "not TLS" in failed[0], failed
    assert ".c:" not in failed[0]  # no OpenSSL source file names


def test_a_stalled_handshake_is_dropped_at_its_deadline(tls: TLSSettings, ca: trustme.CA,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    limits = sockworks.Limits(max_connections=2)
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tls:127.0.0.1:0", tls=tls, limits=limits
    ) as srv:
        ep = srv.endpoint()
        stalled = [socket.create_connection((ep.host, ep.port), timeout=10) for _ in range(2)]
        for s in stalled:
            s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        # Both slots are taken by handshakes; each is dropped at 1 s, and
        # the waiting client is served then.
        assert _tls_answer(ep, ca).startswith(b"127.0.0.1:")
        for s in stalled:
            assert _refused(s)
            s.close()
    assert sum("TLS handshake timed out" in r.getMessage() for r in caplog.records) == 2


def test_a_bad_certificate_is_an_error_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(sockworks.CertificateError, match="cannot load certificate"):
        _serve(Who, "tls:127.0.0.1:0", tls=TLSSettings(cert=str(bad))).__enter__()
    with pytest.raises(sockworks.ConfigError, match="needs a certificate"):
        _serve(Who, "tls:127.0.0.1:0").__enter__()


def _proxy_settings() -> ProxySettings:
    return ProxySettings(trusted=("127.0.0.1/32",), timeout=1.0)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_header_names_the_client_in_every_style(style: str, version: str) -> None:
    client = Peer("203.0.113.7", 40000)
    with _serve(STYLES[style], "tcp:127.0.0.1:0", proxy=_proxy_settings()) as srv:
        ep = srv.endpoint()
        header = (encode_v1 if version == "v1" else encode_v2)(client, Peer(ep.host, ep.port))
        with socket.create_connection((ep.host, ep.port), timeout=10) as sock:
            sock.sendall(header)
            assert _read_all(sock) == b"203.0.113.7:40000 -\n"
    assert SEEN[0].proxy is not None and SEEN[0].proxy.version == int(version[1])  # type: ignore[attr-defined]


def test_proxy_header_then_tls_reads_not_a_byte_too_many(tls: TLSSettings, ca: trustme.CA) -> None:
    """The header and the ClientHello arrive together: TLS must get all of
    its bytes (the header is read exactly)."""
    client = Peer("198.51.100.9", 5555)
    with _serve(Who, "tls:127.0.0.1:0", tls=tls, proxy=_proxy_settings()) as srv:
        ep = srv.endpoint()
        header = encode_v2(client, Peer(ep.host, ep.port))
        answer = _tls_answer(ep, ca, "bob", before=header).decode()
    assert answer.startswith("198.51.100.9:5555 ") and "commonName=bob" in answer


def test_the_header_address_is_the_one_access_control_sees(
    caplog: pytest.LogCaptureFixture,
) -> None:
    access = AccessPolicy(deny=("203.0.113.66",))
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tcp:127.0.0.1:0", proxy=_proxy_settings(), access=access
    ) as srv:
        ep = srv.endpoint()
        for host, expect in (("203.0.113.66", b""), ("203.0.113.67", b"203.0.113.67:1 -\n")):
            with socket.create_connection((ep.host, ep.port), timeout=10) as sock:
                sock.sendall(encode_v1(Peer(host, 1), Peer(ep.host, ep.port)))
                assert (_read_all(sock) == expect) if expect else _refused(sock)
    assert "203.0.113.66:1 refused: denied by 203.0.113.66/32" in caplog.text


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 1.2.3.4\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",
    ],
)
def test_a_bad_header_closes_with_one_log_line(garbage: bytes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tcp:127.0.0.1:0", proxy=_proxy_settings()
    ) as srv:
        ep = srv.endpoint()
        with socket.create_connection((ep.host, ep.port), timeout=10) as sock:
            sock.sendall(garbage)
            if garbage.endswith(b"\x0c"):
                sock.shutdown(socket.SHUT_WR)  # a v2 header cut short
            assert _refused(sock)
    assert sum("PROXY header" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_an_untrusted_peer_is_refused_never_guessed(caplog: pytest.LogCaptureFixture) -> None:
    settings = ProxySettings(trusted=("192.0.2.0/24",), timeout=1.0)
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tcp:127.0.0.1:0", proxy=settings
    ) as srv:
        ep = srv.endpoint()
        with socket.create_connection((ep.host, ep.port), timeout=10) as sock:
            sock.sendall(encode_v1(Peer("203.0.113.1", 1), Peer(ep.host, ep.port)))
            assert _refused(sock)
    assert "not a trusted proxy" in caplog.text
    assert SEEN == []


def test_a_header_that_never_comes_times_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="sockworks.layers"), _serve(
        Who, "tcp:127.0.0.1:0", proxy=_proxy_settings()
    ) as srv:
        ep = srv.endpoint()
        with socket.create_connection((ep.host, ep.port), timeout=10) as sock:
            sock.sendall(b"PROXY TCP4 ")  # and nothing more
            assert _read_all(sock) == b""
    assert "PROXY header timed out" in caplog.text


def test_certificates_are_read_again_on_reload_and_a_broken_one_keeps_the_old(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    chain = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", common_name="first").private_key_and_cert_chain_pem.write_to_path(
        str(chain)
    )

    def served_name(ep: sockworks.Endpoint) -> str:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        raw = socket.create_connection((ep.host, ep.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            subject = dict(x[0] for x in sock.getpeercert()["subject"])
            _read_all(sock)
        return str(subject["commonName"])

    def reload(srv: ServerThread) -> int:
        done = threading.Event()
        result: list[int] = []

        def run() -> None:
            result.append(srv.server.reload_certificates())
            done.set()

        srv.call(run)
        assert done.wait(10)
        return result[0]

    with caplog.at_level("INFO"), _serve(
        Who, "tls:127.0.0.1:0", tls=TLSSettings(cert=str(chain))
    ) as srv:
        ep = srv.endpoint()
        assert served_name(ep) == "first"
        second = ca.issue_cert("127.0.0.1", common_name="second")
        second.private_key_and_cert_chain_pem.write_to_path(str(chain))
        assert reload(srv) == 1
        assert served_name(ep) == "second"
        chain.write_text("broken\n")
        assert reload(srv) == 0
        assert served_name(ep) == "second"
    assert "keeping the certificate in use" in caplog.text


# -- the command line, with real peers -----------------------------------------


def test_cli_gopher_over_tls_with_curl(cli: Any, ca: trustme.CA, tmp_path: Path) -> None:
    from conftest import require_peer

    curl = require_peer("curl")
    chain, ca_file = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca.cert_pem.write_to_path(str(ca_file))
    (tmp_path / "hole").mkdir()
    (tmp_path / "hole" / "f.txt").write_text("over TLS\n")
    proc = cli(["serve", "gopher", "--root", str(tmp_path / "hole"),
                "-l", "tls:127.0.0.1:0", "--cert", str(chain)])
    (ep,) = proc.wait_listening(1)
    assert str(ep).startswith("tls:")
    import subprocess

    url = f"gophers://127.0.0.1:{ep.port}"
    menu = subprocess.run([curl, "-s", "--cacert", str(ca_file), url + "/"],
                          capture_output=True, timeout=30)
    assert b"f.txt" in menu.stdout, menu
    text = subprocess.run([curl, "-s", "--cacert", str(ca_file), url + "/0/f.txt"],
                          capture_output=True, timeout=30)
    assert text.stdout.startswith(b"over TLS"), text
    assert proc.stop() == 0
    assert "returning true from eof_received" not in proc.log


def test_cli_proxy_listener_with_curl_haproxy_protocol(cli: Any) -> None:
    from conftest import require_peer

    curl = require_peer("curl")
    proc = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "--proxy-protocol", "v1",
                "--proxy-from", "127.0.0.1"])
    (ep,) = proc.wait_listening(1)
    import subprocess

    # curl sends a v1 header naming its own address, then an HTTP request
    # that echo sends back (curl then reports a bad answer: it is not HTTP).
    subprocess.run([curl, "-s", "--max-time", "5", "--haproxy-protocol",
                    f"http://127.0.0.1:{ep.port}/x"], capture_output=True, timeout=30)
    assert proc.stop() == 0
    assert "127.0.0.1:" in proc.log and "GET" not in proc.log
    assert "refused" not in proc.log and "PROXY header" not in proc.log, proc.log


def test_cli_tls_options_are_checked(cli: Any, tmp_path: Path) -> None:
    from conftest import run_cli

    res = run_cli("serve", "echo", "-l", "tls:127.0.0.1:0")
    assert res.returncode == 2 and "needs a certificate" in res.stderr.decode()
    res = run_cli("serve", "echo", "-l", "tcp:127.0.0.1:0", "--cert", "x.pem")
    assert res.returncode == 2 and "no TLS listener" in res.stderr.decode()
    bad = tmp_path / "bad.pem"
    bad.write_text("nope\n")
    res = run_cli("serve", "echo", "-l", "tls:127.0.0.1:0", "--cert", str(bad))
    assert res.returncode == 1 and "cannot load certificate" in res.stderr.decode()
    assert res.stderr.decode().count("\n") == 1 and "Traceback" not in res.stderr.decode()
    res = run_cli("serve", "echo", "-l", "tcp:127.0.0.1:0", "--proxy-protocol", "v2")
    assert res.returncode == 2 and "proxy_from" in res.stderr.decode()


def test_exec_over_tls_relays_so_the_program_sees_plain_bytes(
    cli: Any, tmp_path: Path, ca: trustme.CA
) -> None:
    """An exec service on a tls: listener: the program reads and writes
    plain bytes through a relay, and its environment describes the TLS
    client's own TCP connection."""
    chain = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    script = ('read line; echo "got $line $PROTO $TCPREMOTEIP";'
              ' head -c 300000 /dev/zero | tr "\\0" x')
    proc = cli(["serve", "exec", "-l", "tls:127.0.0.1:0", "--cert", str(chain),
                "--", "sh", "-c", script])
    (ep,) = proc.wait_listening(1)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = socket.create_connection((ep.host, ep.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"hello\n")
        data = _read_all(sock)
    first, _, rest = data.partition(b"\n")
    assert first == b"got hello TCP 127.0.0.1"
    assert rest == b"x" * 300000  # all of it, then the program's exit closed TLS
    assert proc.stop() == 0
    assert "exit 0" in proc.log
