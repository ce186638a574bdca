"""TLS listeners against real peers nobody here wrote: ``openssl s_client``,
``ncat --ssl``, ``socat OPENSSL:`` and ``curl gophers://`` (issue 11).

Every server is ``python -m sockworks serve … -l tls:127.0.0.1:0`` as a
person runs it; certificates come from trustme. Each peer is checked with
and without a client certificate when ``--client-ca`` is set, the verified
subject reaches handlers of all three styles (a MODULE:NAME service), ALPN
and the TLS 1.2 minimum are negotiated as asked, and bad input (plaintext
on a TLS port, TLS on a plain port, a client certificate from another CA,
unusable certificates at start) is one plain line in the log or at exit.

A peer that is not installed skips its tests (fails them under
``SOCKWORKS_REQUIRE_PEERS=1``). Nothing here sleeps to order events: the
tests wait for ``listening on`` lines, for the peer's output, for exits.
"""

from __future__ import annotations

import datetime
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import CLIProcess, recv_all, require_peer, run_cli

HOST = "127.0.0.1"
# The line a failed handshake leaves in the server's log (INFO).
FAILED = "TLS handshake failed"


@dataclass(frozen=True)
class PKI:
    """Files for one test module: the server's chain, the CA that signed
    everything, a client certificate for alice, and one from another CA."""

    server: str  # key and chain, PEM
    ca: str
    alice_cert: str
    alice_key: str
    other_cert: str  # signed by a CA the server does not trust
    other_key: str
    other_ca: str
    expired: str  # an expired server certificate, with its key
    wrong_key: str  # a key that is not the server certificate's
    server_cert_only: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("tls-pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert(HOST, "localhost")
    alice = ca.issue_cert("alice@example.org", common_name="alice")
    mallory = other_ca.issue_cert("mallory@example.org", common_name="mallory")
    expired = ca.issue_cert(HOST, not_after=datetime.datetime(2020, 1, 1))
    unrelated = ca.issue_cert(HOST)

    def write(name: str, blob: Any) -> str:
        blob.write_to_path(str(d / name))
        return str(d / name)

    return PKI(
        server=write("server.pem", server.private_key_and_cert_chain_pem),
        ca=write("ca.pem", ca.cert_pem),
        alice_cert=write("alice.crt", alice.cert_chain_pems[0]),
        alice_key=write("alice.key", alice.private_key_pem),
        other_cert=write("mallory.crt", mallory.cert_chain_pems[0]),
        other_key=write("mallory.key", mallory.private_key_pem),
        other_ca=write("other-ca.pem", other_ca.cert_pem),
        expired=write("expired.pem", expired.private_key_and_cert_chain_pem),
        wrong_key=write("wrong.key", unrelated.private_key_pem),
        server_cert_only=write("server.crt", server.cert_chain_pems[0]),
    )


# -- running peers ----------------------------------------------------------------


class Peer:
    """A client program in a subprocess: what it prints is collected by a
    thread, so a test sends, then waits for the answer (never for time),
    then stops the program by its own PID."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out = b""
        self.err = b""
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                         for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for r in self._readers:
            r.start()

    def _read(self, stream: Any, name: str) -> None:
        while chunk := stream.read1(65536):
            with self._changed:
                setattr(self, name, getattr(self, name) + chunk)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def send(self, data: bytes) -> None:
        """Write to the peer's stdin; a peer that already ended (its
        handshake refused) makes this a no-op, the test looks at its end."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def expect(self, *wanted: bytes, timeout: float = 15.0) -> bytes:
        """Wait until stdout holds every one of ``wanted``; return stdout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not all(w in self.out for w in wanted):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._alive_readers()):
                    raise AssertionError(f"{self.argv[0]} never printed {wanted!r}:\n"
                                         f"stdout: {self.out!r}\nstderr: {self.err!r}")
                self._changed.wait(min(left, 0.2))
            return self.out

    def _alive_readers(self) -> bool:
        return any(r.is_alive() for r in self._readers)

    def wait(self, timeout: float = 15.0) -> int:
        """Its exit status (it must end by itself); stdin is closed first."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(timeout)
        for r in self._readers:
            r.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for r in self._readers:
            r.join(5)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if s is not None:
                    s.close()
            except BrokenPipeError:
                pass


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.stop()


def _serve(cli: type[CLIProcess], pki: PKI, service: str = "echo", *more: str,
           client_ca: bool = False) -> tuple[CLIProcess, int]:
    args = ["serve", service, "-l", f"tls:{HOST}:0", "--cert", pki.server, *more]
    if client_ca:
        args += ["--client-ca", pki.ca]
    proc = cli(args)
    (ep,) = proc.wait_listening(1)
    assert str(ep).startswith("tls:")
    return proc, ep.port


def _failures(proc: CLIProcess) -> list[str]:
    return [line for line in proc.lines if FAILED in line]


def _stopped_log(proc: CLIProcess) -> str:
    assert proc.stop() == 0, proc.log
    assert "Traceback" not in proc.log, proc.log
    return proc.log


def s_client(port: int, pki: PKI, *extra: str, cert: str | None = None,
             key: str | None = None) -> list[str]:
    argv = [require_peer("openssl"), "s_client", "-connect", f"{HOST}:{port}",
            "-CAfile", pki.ca, "-verify_return_error", "-verify_ip", HOST, *extra]
    if cert is not None:
        argv += ["-cert", cert, "-key", key or cert]
    return argv


def ncat(port: int, pki: PKI, *extra: str, trust: str | None = None) -> list[str]:
    # By name: ncat 7.93 matches the server's name against DNS names only,
    # never an IP address SAN (the certificate has both); -4 because the
    # server listens on 127.0.0.1 alone.
    return [require_peer("ncat"), "-4", "--ssl", "--ssl-trustfile", trust or pki.ca, *extra,
            "localhost", str(port)]


def socat(port: int, pki: PKI, *options: str) -> list[str]:
    address = ",".join([f"OPENSSL:{HOST}:{port}", f"cafile={pki.ca}", *options])
    return [require_peer("socat"), "-t", "10", "-", address]


def _echoes(peer: Peer, line: bytes) -> bytes:
    peer.send(line)
    return peer.expect(line)


# -- openssl s_client ---------------------------------------------------------------


def test_s_client_echo_verified(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(s_client(port, pki, "-quiet")))
    _echoes(client, b"hello over TLS\n")
    _echoes(client, b"and again\n")
    client.stop()
    log = _stopped_log(proc)
    assert _failures(proc) == [], log


def test_s_client_with_and_without_a_client_certificate(cli: Any, pki: PKI,
                                                        peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki, client_ca=True)
    peers.append(good := Peer(s_client(port, pki, "-quiet", cert=pki.alice_cert,
                                       key=pki.alice_key)))
    _echoes(good, b"alice was here\n")
    # No certificate: the handshake fails. TLS 1.3 finishes the client's
    # side before the server has checked, so the client learns of it on its
    # first read: it ends, with an error status and nothing echoed.
    bare = Peer(s_client(port, pki, "-quiet"))
    peers.append(bare)
    bare.send(b"nobody\n")
    assert bare.wait() != 0
    assert b"nobody" not in bare.out
    proc.wait_for(FAILED)
    _echoes(good, b"still served\n")  # the other client did not notice
    good.stop()
    _stopped_log(proc)
    (line,) = _failures(proc)
    assert " INFO " in line and "a client certificate is required" in line, line
    assert ".c:" not in line and "SSL" not in line, line  # no OpenSSL internals


def test_s_client_certificate_from_another_ca_is_refused(cli: Any, pki: PKI,
                                                          peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki, client_ca=True)
    mallory = Peer(s_client(port, pki, "-quiet", cert=pki.other_cert, key=pki.other_key))
    peers.append(mallory)
    mallory.send(b"let me in\n")
    assert mallory.wait() != 0
    assert b"let me in" not in mallory.out
    proc.wait_for(FAILED)
    _stopped_log(proc)
    (line,) = _failures(proc)
    assert " INFO " in line and "unknown CA" in line, line


def test_s_client_alpn(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki, "echo", "--alpn", "h2,http/1.1")
    peers.append(client := Peer(s_client(port, pki, "-alpn", "http/1.1")))
    out = _echoes(client, b"ping\n").decode()
    assert "ALPN protocol: http/1.1" in out, out
    client.stop()
    # h2 is preferred when both are offered; a client offering neither
    # gets no ALPN (the server does not refuse it, as nginx does not).
    peers.append(both := Peer(s_client(port, pki, "-alpn", "h2,http/1.1")))
    assert "ALPN protocol: h2" in _echoes(both, b"ping\n").decode()
    both.stop()
    peers.append(other := Peer(s_client(port, pki, "-alpn", "imap")))
    assert "No ALPN negotiated" in _echoes(other, b"ping\n").decode()
    other.stop()
    _stopped_log(proc)


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_s_client_tls_1_2_and_1_3_succeed(version: str, cli: Any, pki: PKI,
                                          peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(s_client(port, pki, f"-{version}")))
    out = _echoes(client, b"ping\n").decode()
    name = {"tls1_2": "TLSv1.2", "tls1_3": "TLSv1.3"}[version]
    assert re.search(rf"New, {re.escape(name)}, Cipher is", out), out
    assert "Verify return code: 0 (ok)" in out, out
    client.stop()
    _stopped_log(proc)
    assert _failures(proc) == []


def test_s_client_tls_1_1_is_refused(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    # SECLEVEL=0: this OpenSSL would not offer TLS 1.1 otherwise, and the
    # server must be the one that refuses.
    old = Peer(s_client(port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"))
    peers.append(old)
    assert old.wait() != 0
    proc.wait_for(FAILED)
    _stopped_log(proc)
    (line,) = _failures(proc)
    assert " INFO " in line and "protocol version: no TLS version in common" in line, line


# -- ncat ----------------------------------------------------------------------------


def test_ncat_echo_verified(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(ncat(port, pki)))
    _echoes(client, b"from ncat\n")
    # Its end of input is a TLS close: the echo is flushed, then both end.
    assert client.wait() == 0
    _stopped_log(proc)
    assert _failures(proc) == []


def test_ncat_refuses_a_server_it_does_not_trust(cli: Any, pki: PKI,
                                                 peers: list[Peer]) -> None:
    """The check above means something: ncat verifies with the trust file."""
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(ncat(port, pki, trust=pki.other_ca)))
    assert client.wait() != 0
    proc.wait_for(FAILED)  # ncat's alert: our certificate's CA is unknown to it
    _stopped_log(proc)


def test_ncat_client_certificate(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki, client_ca=True)
    peers.append(good := Peer(ncat(port, pki, "--ssl-cert", pki.alice_cert,
                                   "--ssl-key", pki.alice_key)))
    _echoes(good, b"ncat with a certificate\n")
    assert good.wait() == 0
    # Refused; ncat's status depends on whether it wrote before it read the
    # close (no alert tells it why: see test_socat_client_certificate).
    peers.append(bare := Peer(ncat(port, pki)))
    bare.send(b"ncat without\n")
    bare.wait()
    assert b"ncat without" not in bare.out
    proc.wait_for(FAILED)
    _stopped_log(proc)
    (line,) = _failures(proc)
    assert "a client certificate is required" in line, line


# -- socat ---------------------------------------------------------------------------


def test_socat_echo_verified(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(socat(port, pki)))
    _echoes(client, b"from socat\n")
    assert client.wait() == 0
    _stopped_log(proc)
    assert _failures(proc) == []


def test_socat_client_certificate(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki, client_ca=True)
    peers.append(good := Peer(socat(port, pki, f"cert={pki.alice_cert}",
                                    f"key={pki.alice_key}")))
    _echoes(good, b"socat with a certificate\n")
    assert good.wait() == 0
    # Refused, though socat's status says nothing: under TLS 1.3 its side of
    # the handshake is done before the server's check, and the server closes
    # without an alert (the event loop's TLS never sends one), so socat
    # reads a plain end of input and exits 0, having been sent nothing.
    peers.append(bare := Peer(socat(port, pki)))
    bare.send(b"socat without\n")
    bare.wait()
    assert b"socat without" not in bare.out
    proc.wait_for(FAILED)
    peers.append(mallory := Peer(socat(port, pki, f"cert={pki.other_cert}",
                                       f"key={pki.other_key}")))
    mallory.send(b"socat from elsewhere\n")
    mallory.wait()
    assert b"socat from elsewhere" not in mallory.out
    _stopped_log(proc)
    reasons = [line.split(FAILED + ": ", 1)[1] for line in _failures(proc)]
    assert reasons == ["a client certificate is required",
                       "certificate signed by an unknown CA"], proc.log


# -- curl gophers:// with client certificates -------------------------------------------


def test_curl_gophers_with_a_client_certificate(cli: Any, pki: PKI, tmp_path: Path) -> None:
    """Menu and file without a client certificate are in
    test_listener_layers; here the server requires one."""
    curl = require_peer("curl")
    root = tmp_path / "hole"
    root.mkdir()
    (root / "f.txt").write_text("for alice only\n")
    proc, port = _serve(cli, pki, "gopher", "--root", str(root), client_ca=True)
    url = f"gophers://{HOST}:{port}"
    base = [curl, "-sS", "--max-time", "20", "--cacert", pki.ca]
    alice = ["--cert", pki.alice_cert, "--key", pki.alice_key]
    menu = subprocess.run([*base, *alice, url + "/"], capture_output=True, timeout=30)
    assert menu.returncode == 0 and b"f.txt" in menu.stdout, menu
    text = subprocess.run([*base, *alice, url + "/0/f.txt"], capture_output=True, timeout=30)
    assert text.returncode == 0 and text.stdout.startswith(b"for alice only"), text
    bare = subprocess.run([*base, url + "/0/f.txt"], capture_output=True, timeout=30)
    assert bare.returncode != 0 and b"alice" not in bare.stdout, bare
    proc.wait_for(FAILED)
    mallory = subprocess.run([*base, "--cert", pki.other_cert, "--key", pki.other_key,
                              url + "/0/f.txt"], capture_output=True, timeout=30)
    assert mallory.returncode != 0 and b"alice" not in mallory.stdout, mallory
    _stopped_log(proc)
    reasons = [line.split(FAILED + ": ", 1)[1] for line in _failures(proc)]
    assert reasons == ["a client certificate is required",
                       "certificate signed by an unknown CA"], proc.log


# -- the verified subject reaches handlers of every style --------------------------------

APP = '''\
import sockworks


class Who(sockworks.StreamProtocol):
    def on_connect(self, peer, local=None):
        return sockworks.close(f"sansio {peer.tls_subject}\\n".encode())


async def who_async(stream):
    await stream.write(f"async {stream.peer.tls_subject}\\n".encode())


def who_blocking(conn):
    conn.sendall(f"blocking {conn.peer.tls_subject}\\n".encode())
'''


@pytest.mark.parametrize("style", ["Who", "who_async", "who_blocking"])
def test_subject_reaches_every_style_through_every_peer(style: str, cli: Any, pki: PKI,
                                                        tmp_path: Path,
                                                        peers: list[Peer]) -> None:
    (tmp_path / "whoapp.py").write_text(APP)
    proc, port = _serve(cli, pki, f"whoapp:{style}", "--app-dir", str(tmp_path),
                        client_ca=True)
    expected = b"commonName=alice"
    clients = {
        "openssl": s_client(port, pki, "-quiet", cert=pki.alice_cert, key=pki.alice_key),
        "ncat": ncat(port, pki, "--ssl-cert", pki.alice_cert, "--ssl-key", pki.alice_key),
        "socat": socat(port, pki, f"cert={pki.alice_cert}", f"key={pki.alice_key}"),
    }
    for name, argv in clients.items():
        peers.append(client := Peer(argv))
        out = client.expect(expected)
        assert out.startswith(style.removeprefix("who_").replace("Who", "sansio").encode()), \
            (name, out)
        client.stop()
    _stopped_log(proc)
    assert _failures(proc) == []


# -- bad input ------------------------------------------------------------------------


def test_plaintext_on_a_tls_port_leaves_others_unaffected(cli: Any, pki: PKI,
                                                          peers: list[Peer]) -> None:
    proc, port = _serve(cli, pki)
    peers.append(client := Peer(s_client(port, pki, "-quiet")))
    _echoes(client, b"before\n")
    with socket.create_connection((HOST, port), timeout=10) as plain:
        plain.sendall(b"hello in the clear\r\n")
        try:
            assert recv_all(plain) == b""
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset, nothing lost of theirs
    proc.wait_for(FAILED)
    _echoes(client, b"after\n")  # the session open meanwhile goes on
    peers.append(late := Peer(s_client(port, pki, "-quiet")))
    _echoes(late, b"a new client\n")
    client.stop()
    late.stop()
    _stopped_log(proc)
    (line,) = _failures(proc)
    assert " INFO " in line and "not TLS (plaintext?)" in line, line


def test_tls_client_on_a_plain_port_fails_and_the_server_goes_on(cli: Any,
                                                                 peers: list[Peer]) -> None:
    openssl = require_peer("openssl")
    proc = cli(["serve", "echo", "-l", f"tcp:{HOST}:0"])
    (ep,) = proc.wait_listening(1)
    # echo sends the ClientHello back: not a ServerHello, so the client
    # gives up with an error of its own.
    tls = Peer([openssl, "s_client", "-connect", f"{HOST}:{ep.port}", "-quiet"])
    peers.append(tls)
    assert tls.wait() != 0
    assert b"error" in tls.err.lower(), tls.err
    with socket.create_connection((HOST, ep.port), timeout=10) as sock:
        sock.sendall(b"plain still works\n")
        assert sock.recv(100) == b"plain still works\n"
    log = _stopped_log(proc)
    assert "closed" in log


def test_an_expired_certificate_at_start(cli: Any, pki: PKI, peers: list[Peer]) -> None:
    """An expired certificate is one error line and status 1 at start, not
    a server every verifying client refuses."""
    proc = cli(["serve", "echo", "-l", f"tls:{HOST}:0", "--cert", pki.expired])
    started = proc.wait_for(r"listening on (\S+)|error")
    if started.group(1) is not None:
        # It runs: show what a client then meets, and fail.
        port = int(started.group(1).rsplit(":", 1)[1])
        peers.append(client := Peer(s_client(port, pki, "-quiet")))
        assert client.wait() != 0
        assert b"certificate has expired" in client.err, client.err
        proc.stop()
        pytest.fail("the server started with an expired certificate:\n" + proc.log)
    code = proc.proc.wait(10)
    err = proc.log
    assert code == 1, (code, err)
    assert err.count("\n") == 0 and "expired" in err and "Traceback" not in err, err


def test_a_key_that_is_not_the_certificates(pki: PKI) -> None:
    res = run_cli("serve", "echo", "-l", f"tls:{HOST}:0", "--cert", pki.server_cert_only,
                  "--key", pki.wrong_key)
    err = res.stderr.decode()
    assert res.returncode == 1, (res.returncode, err)
    assert err.count("\n") == 1, err
    assert err.startswith("sockworks: error: cannot load certificate"), err
    assert "key values mismatch" in err and "Traceback" not in err and ".c:" not in err, err


def test_a_certificate_without_its_key(pki: PKI) -> None:
    res = run_cli("serve", "echo", "-l", f"tls:{HOST}:0", "--cert", pki.server_cert_only)
    err = res.stderr.decode()
    assert res.returncode == 1 and err.count("\n") == 1, err
    assert "cannot load certificate" in err and "Traceback" not in err, err


def test_python_ssl_client_sees_the_same_as_the_peers(cli: Any, pki: PKI) -> None:
    """A cross-check of the certificate set-up with Python's own client."""
    proc, port = _serve(cli, pki)
    context = ssl.create_default_context(cafile=pki.ca)
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=HOST) as sock:
        sock.sendall(b"python\n")
        assert sock.recv(100) == b"python\n"
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    _stopped_log(proc)
