"""`sockworks connect --tls` and `listen --tls` with a test CA (trustme):
a good certificate, a wrong host name, an expired certificate, an unknown
CA, the system store, --insecure, --servername, client certificates. Every
failure is one line on stderr and status 1, on both sides."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _netcat_helpers import Procs, digest, payload

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


