"""Gopher over real sockets: the sockworks server against curl and lynx,
the sockworks client against the sockworks server and against pygopherd,
attacks over the wire, the client's errors, downloads and browser."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, CLIProcess, connect, recv_all, require_peer
from test_gopher_protocol import SECRET, attack_selectors, hole  # noqa: F401 (fixture)

from sockworks import Endpoint
from sockworks.services.gopher import default_root

BINARY = bytes(range(256)) * 1200 + b"\x00.\r\n.\r\n"  # 300 KiB, with a fake terminator


def make_tree(base: Path) -> Path:
    root = base / "hole"
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "mapped").mkdir()
    (root / "about.txt").write_bytes(b"About this hole\n.a line starting with a dot\nbye\n")
    (root / "docs" / "guide.txt").write_bytes(b"The guide mentions zebras.\n")
    (root / "docs" / "deep" / "notes.txt").write_bytes(b"Deep notes.\n")
    (root / "data.bin").write_bytes(BINARY)
    (root / ".hidden").write_bytes(b"hidden")
    (root / "mapped" / "gophermap").write_bytes(
        b"!Mapped directory\nWelcome to the mapped menu.\n0The about file\t/about.txt\n*\n"
    )
    (root / "mapped" / "one.txt").write_bytes(b"one\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("gopher"))


@pytest.fixture(scope="module")
def server(tree: Path) -> Iterator[Endpoint]:
    proc = CLIProcess(["serve", "gopher", "--root", str(tree), "-l", "tcp:127.0.0.1:0", "-q"])
    try:
        (endpoint,) = proc.wait_listening(1)
        yield endpoint
    finally:
        assert proc.stop() == 0


def url(ep: Endpoint, path: str = "") -> str:
    return f"gopher://{ep.host}:{ep.port}/{path}"


def gopher_request(ep: Endpoint, request: bytes) -> bytes:
    with connect(ep) as sock:
        sock.sendall(request)
        return recv_all(sock)


def client(*args: str, cwd: Path | None = None, input: bytes | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``sockworks gopher ARGS`` run in this process (fast): the same
    ``main()`` the command runs, with stdin/stdout/stderr swapped for pipes
    in memory and the working directory changed for the call."""
    from sockworks.cli import main

    argv = ["gopher", *args]
    out, err = io.BytesIO(), io.BytesIO()
    wrappers = (
        io.TextIOWrapper(io.BytesIO(input or b"")),
        io.TextIOWrapper(out, write_through=True),
        io.TextIOWrapper(err, write_through=True),
    )
    saved = sys.stdin, sys.stdout, sys.stderr
    here = os.getcwd()
    sys.stdin, sys.stdout, sys.stderr = wrappers
    try:
        os.chdir(cwd or ROOT)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        os.chdir(here)
        for w in wrappers:
            w.flush()
            w.detach()  # keep the BytesIO open for getvalue()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def client_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m sockworks gopher ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "sockworks", "gopher", *args],
        capture_output=True, timeout=30, cwd=cwd or ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


# -- curl and lynx against our server ------------------------------------------


def curl(target: str) -> bytes:
    exe = require_peer("curl")
    return subprocess.run([exe, "-sS", "--max-time", "20", target], capture_output=True,
                          check=True, timeout=30).stdout


def test_curl_root_and_nested_menus(server: Endpoint) -> None:
    root = curl(url(server))
    assert root.endswith(b"\r\n.\r\n")
    assert f"1docs\t/docs\t127.0.0.1\t{server.port}\r\n".encode() in root
    assert b".hidden" not in root
    nested = curl(url(server, "1/docs"))
    assert f"0guide.txt\t/docs/guide.txt\t127.0.0.1\t{server.port}".encode() in nested
    mapped = curl(url(server, "1/mapped"))
    assert mapped.startswith(b"iMapped directory\t")
    assert b"0The about file\t/about.txt\t" in mapped and b"0one.txt\t/mapped/one.txt" in mapped


def test_curl_text_and_binary_by_hash(server: Endpoint) -> None:
    text = curl(url(server, "0/about.txt"))
    assert text == b"About this hole\r\n..a line starting with a dot\r\nbye\r\n.\r\n"
    data = curl(url(server, "9/data.bin"))
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(BINARY).hexdigest()


def test_curl_search_with_percent_09(server: Endpoint) -> None:
    found = curl(url(server, "7/.search%09zebras"))
    assert b"0/docs/guide.txt\t/docs/guide.txt\t" in found
    assert b"about.txt" not in found


def test_lynx_renders_our_menus(server: Endpoint) -> None:
    exe = require_peer("lynx")
    out = subprocess.run([exe, "-dump", url(server)], capture_output=True, timeout=30,
                         env=dict(os.environ, TERM="dumb")).stdout.decode()
    assert "Gopher Menu" in out
    assert "(DIR)" in out and "docs" in out and "(FILE)" in out and "about.txt" in out
    assert url(server, "0/about.txt") in out


# -- the wire: refusals and attacks --------------------------------------------


def test_too_long_nul_and_silent_requests_refused(tree: Path, cli: type[CLIProcess]) -> None:
    proc = cli(["serve", "gopher", "--root", str(tree), "-l", "tcp:127.0.0.1:0",
                "--timeout", "0.3", "--max-line", "512"])
    (ep,) = proc.wait_listening(1)
    assert gopher_request(ep, b"/" + b"a" * 2000 + b"\r\n").startswith(b"3Request too long")
    assert gopher_request(ep, b"/about\x00.txt\r\n").startswith(b"3NUL in request")
    with connect(ep) as sock:  # says nothing: refused when the timeout fires
        assert recv_all(sock).startswith(b"3Request timed out")
    assert proc.stop() == 0


def test_attacks_over_the_wire(hole: Path, cli: type[CLIProcess]) -> None:  # noqa: F811
    proc = cli(["serve", "gopher", "--root", str(hole), "-l", "tcp:127.0.0.1:0", "-q"])
    (ep,) = proc.wait_listening(1)
    attacks = attack_selectors(hole)
    assert len(attacks) >= 50
    for selector in attacks:
        out = gopher_request(ep, selector + b"\r\n")
        assert SECRET not in out, selector
        if not selector.startswith((b"/.search", b"URL:")):
            assert out.startswith(b"3"), (selector, out[:60])
    assert proc.stop() == 0


def test_client_hanging_up_mid_file_leaves_the_server_serving(tmp_path: Path,
                                                               cli: type[CLIProcess]) -> None:
    big = os.urandom(1 << 16) * 128  # 8 MiB: sent by sendfile, more than socket buffers hold
    (tmp_path / "big.bin").write_bytes(big)
    proc = cli(["serve", "gopher", "--root", str(tmp_path), "-l", "tcp:127.0.0.1:0"])
    (ep,) = proc.wait_listening(1)
    for _ in range(3):
        with connect(ep) as sock:
            sock.sendall(b"/big.bin\r\n")
            assert sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert hashlib.sha256(gopher_request(ep, b"/big.bin\r\n")).digest() == \
        hashlib.sha256(big).digest()
    assert proc.stop() == 0
    assert "Traceback" not in proc.log


def test_stalled_reader_mid_sendfile_is_cut_off_and_shutdown_ends(
        tmp_path: Path, cli: type[CLIProcess]) -> None:
    (tmp_path / "big.bin").write_bytes(b"\x00" * (32 << 20))
    proc = cli(["serve", "gopher", "--root", str(tmp_path), "-l", "tcp:127.0.0.1:0",
                "--timeout", "0.3", "--grace", "0.3"])
    (ep,) = proc.wait_listening(1)
    with connect(ep) as stalled:  # asks, then never reads: cut off by the idle timeout
        stalled.sendall(b"/big.bin\r\n")
        proc.wait_for(r"closed after .*\(peer stopped reading\)", timeout=30)
    second = connect(ep)
    second.sendall(b"/big.bin\r\n")
    assert second.recv(10)  # mid-transfer, not reading, when the server is told to stop
    assert proc.stop() == 0
    second.close()


def test_advertise_sets_menu_host_and_port(tree: Path, cli: type[CLIProcess]) -> None:
    proc = cli(["serve", "gopher", "--root", str(tree), "-l", "tcp:127.0.0.1:0",
                "--advertise", "gopher.example.org:70"])
    (ep,) = proc.wait_listening(1)
    menu = gopher_request(ep, b"\r\n")
    assert b"1docs\t/docs\tgopher.example.org\t70\r\n" in menu
    assert proc.stop() == 0


def test_default_root_is_the_docs_hole() -> None:
    # The hole ships in the package (a link to docs/ in a checkout); the
    # current directory is never served implicitly.
    assert Path(default_root()).resolve() == (ROOT / "docs").resolve()


# -- the sockworks client --------------------------------------------------------


def test_client_host_alone_fetches_the_root_menu(server: Endpoint) -> None:
    res = client_process(f"{server.host}:{server.port}")
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    assert "1. [text]   about.txt" in out
    assert "[binary] data.bin" in out and "[menu]   docs" in out and "[search]" in out


def test_client_seed_form_url_form_and_raw(server: Endpoint) -> None:
    seed = client(f"{server.host}:{server.port}", "/about.txt")
    assert seed.stdout == b"About this hole\n.a line starting with a dot\nbye\n"
    assert client(url(server, "0/about.txt")).stdout == seed.stdout
    raw = client(url(server, "0/about.txt"), "--raw").stdout
    assert raw.endswith(b"\r\n.\r\n") and b"\r\n..a line" in raw
    info = client(url(server, "1/mapped")).stdout.decode()
    assert "Welcome to the mapped menu." in info and "1. [text]   The about file" in info


def test_client_search(server: Endpoint) -> None:
    res = client(url(server, "7/.search"), "--search", "zebras")
    assert "[text]   /docs/guide.txt" in res.stdout.decode()
    assert client(url(server, "7/.search%09zebras")).stdout == res.stdout


def test_client_saves_binaries_by_name_and_with_o(server: Endpoint, tmp_path: Path) -> None:
    res = client_process(url(server, "9/data.bin"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data.bin").read_bytes() == BINARY
    assert b"saved %d bytes to data.bin" % len(BINARY) + b"" in res.stderr
    res = client(f"{server.host}:{server.port}", "/data.bin", "-o", str(tmp_path / "x"))
    assert (tmp_path / "x").read_bytes() == BINARY
    client(url(server, "0/about.txt"), "-o", str(tmp_path / "t.txt"))
    assert (tmp_path / "t.txt").read_bytes().startswith(b"About this hole\n.a line")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "t.txt", "x"]


def test_client_errors_one_line_each(server: Endpoint, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    cases = [
        ((f"127.0.0.1:{free}",), f"connection refused by 127.0.0.1:{free}"),
        (("no-such-host.invalid",), "host not found: no-such-host.invalid"),
        ((url(server, "0/missing.txt"),), "server error: Not found"),
        ((url(server, "9/missing.bin"), "-o", str(tmp_path / "m")), "server error: Not found"),
    ]
    for args, message in cases:
        res = client(*args)
        assert res.returncode == 1, (args, res.stderr)
        assert res.stderr.decode() == f"sockworks: error: {message}\n"
        assert res.stdout == b""
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []
    usage = client_process("http://example.org/")
    assert usage.returncode == 2 and usage.stderr.count(b"\n") == 1


def test_client_timeout_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts (in the backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        res = client(f"127.0.0.1:{port}", "--timeout", "0.2")
    assert res.returncode == 1
    expected = f"sockworks: error: timed out after 0.2 s waiting for 127.0.0.1:{port}\n"
    assert res.stderr == expected.encode()


def test_latin1_file_names_round_trip(tmp_path: Path, cli: type[CLIProcess]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n")
    proc = cli(["serve", "gopher", "--root", str(root), "-l", "tcp:127.0.0.1:0"])
    (ep,) = proc.wait_listening(1)
    menu = gopher_request(ep, b"\r\n")
    assert menu.startswith(b"0caf\xe9.txt\t/caf\xe9.txt\t")
    assert gopher_request(ep, b"/caf\xe9.txt\r\n") == b"latin-1 name\r\n.\r\n"
    shown = client(f"{ep.host}:{ep.port}").stdout.decode()
    assert "[text]   café.txt" in shown
    assert client(f"{ep.host}:{ep.port}", "/caf\udce9.txt").stdout == b"latin-1 name\n"
    assert proc.stop() == 0


def test_broken_download_leaves_no_partial_file(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve_half_then_reset() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(b"\x01" * 100_000)
        time.sleep(0.2)  # let the client read some, then reset
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=serve_half_then_reset, daemon=True)
    thread.start()
    res = client(f"gopher://127.0.0.1:{port}/9/big.iso", cwd=tmp_path, timeout=30)
    thread.join(10)
    listener.close()
    assert res.returncode == 1
    assert b"connection reset" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_browser_follows_goes_back_up_searches_and_quits(server: Endpoint,
                                                         tmp_path: Path) -> None:
    script = b"3\n1\nu\nb\nb\nb\n/ zebras\nh\ns 1 saved.txt\nq\n"
    res = client(f"{server.host}:{server.port}", "--browse", input=script, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = res.stdout.decode()
    pages = [line.split("--- ", 1)[1] for line in out.splitlines() if "--- " in line]
    base = url(server).rstrip("/")
    assert pages == [
        f"{base}/",
        f"{base}/1/docs",
        f"{base}/1/docs/deep",
        f"{base}/1/docs",  # u
        f"{base}/1/docs/deep",  # b, b, b
        f"{base}/1/docs",
        f"{base}/",
        f"{base}/7/.search%09zebras",
    ], out
    assert "saved to saved.txt" in out
    assert (tmp_path / "saved.txt").read_bytes() == b"The guide mentions zebras.\n"


# -- the sockworks client against pygopherd ----------------------------------------

PYGOPHERD_CONF = """\
[pygopherd]
detach = no
port = {port}
interface = 127.0.0.1
servertype = ThreadingTCPServer
tracebacks = no
mimetypes = {mimetypes}
encoding = [['.Z', 'compress'], ['.gz', 'gzip'], ['.bz2', 'bzip2']]
usechroot = no
root = {root}
timeout = 30
abstract_headers = no
abstract_entries = never

[logger]
logmethod = none
priority = LOG_NOTICE
facility = LOG_DAEMON

[GopherEntry]
defaultmimetype = text/plain
mapping = [['text/html', 'h'], ['text/.+', '0'], ['image/gif', 'g'], ['image/.+', 'I'],
           ['audio/.+', 's'], ['application/.+', '9'], ['.*', '0']]
eaexts = {{'.abstract': 'abstract'}}

[handlers.HandlerMultiplexer]
handlers = [dir.DirHandler, file.FileHandler]

[handlers.dir.DirHandler]
cachetime = 0
cachefile = .cache.pygopherd.dir
ignorepatt = /\\.|~$|/gophermap$

[protocols.ProtocolMultiplexer]
protocols = [rfc1436.GopherProtocol]
"""


def pygopherd_program() -> str:
    exe = shutil.which("pygopherd", path=os.path.dirname(sys.executable)) or shutil.which(
        "pygopherd")
    if exe is None:
        pytest.skip("pygopherd is not installed (pip install -e '.[test]')")
    return exe


def start_pygopherd(root: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """pygopherd serving ``root`` on a free loopback port; ready when it accepts."""
    exe = pygopherd_program()
    mimetypes = "/etc/mime.types"
    if not os.path.exists(mimetypes):
        mimetypes = str(workdir / "mime.types")
        Path(mimetypes).write_text("text/plain txt\napplication/octet-stream bin\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = workdir / "pygopherd.conf"
    conf.write_text(PYGOPHERD_CONF.format(port=port, root=root, mimetypes=mimetypes))
    proc = subprocess.Popen([exe, str(conf)], cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"pygopherd did not start: {err}") from None
            time.sleep(0.05)


def test_client_against_pygopherd(tree: Path, tmp_path: Path) -> None:
    proc, port = start_pygopherd(tree, tmp_path)
    try:
        menu = client(f"127.0.0.1:{port}")
        assert menu.returncode == 0, menu.stderr
        out = menu.stdout.decode()
        assert "[text]   about.txt" in out and "[menu]   docs" in out
        raw = client(f"127.0.0.1:{port}", "--raw").stdout
        assert b"\t+\r\n" in raw  # pygopherd marks Gopher+ items: parsed all the same
        text = client(f"gopher://127.0.0.1:{port}/0/about.txt")
        assert b"About this hole" in text.stdout and b"bye" in text.stdout
        nested = client(f"gopher://127.0.0.1:{port}/1/docs").stdout.decode()
        assert "[text]   guide.txt" in nested
        client(f"gopher://127.0.0.1:{port}/9/data.bin", "-o", str(tmp_path / "d.bin"))
        assert (tmp_path / "d.bin").read_bytes() == BINARY
        missing = client(f"gopher://127.0.0.1:{port}/0/nope.txt")
        assert missing.returncode == 1
        assert missing.stderr.startswith(b"sockworks: error: server error: ")
    finally:
        proc.terminate()
        proc.wait(10)
