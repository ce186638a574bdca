"""The Gopher server protocol with byte strings: an in-memory root, every
chunking, gophermaps, search, caps.txt, refusals; and the real file-system
root against 50+ attack selectors (no sockets here: see test_gopher_interop)."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sockworks import FileSpan
from sockworks._protocol import Output, Peer, Reply, StreamProtocol
from sockworks.gopher.fsroot import FileSystemRoot
from sockworks.gopher.items import guess_type, parse_menu, stuff_text, unstuff_text
from sockworks.gopher.root import Forbidden, Node, NotFound
from sockworks.protocols.gopher import GopherProtocol, GopherSite, SearchLimits
from sockworks.testing import ProtocolTester, chunkings

HOST, PORT = "gopher.example", 7070


class InlineOffload(StreamProtocol):
    """A protocol whose ``Reply(offload=fn)`` is carried out inline, as a
    driver does on a worker thread: ``data`` first, then what ``fn()``
    returned. Counts the offloads, so tests can see what left the loop.
    (Done here, not by ProtocolTester, so these tests need nothing from it.)"""

    def __init__(self, proto: StreamProtocol) -> None:
        self.proto = proto
        self.offloads = 0

    def _run(self, out: Output) -> Output:
        while isinstance(out, Reply) and out.offload is not None:
            self.offloads += 1
            first, result = out.data, out.offload()
            if result is None:
                out = Reply(data=first)
            elif isinstance(result, bytes):
                out = first + result
            else:
                out = dataclasses.replace(result, data=first + result.data)
        return out

    def on_connect(self, peer: Peer) -> Output:
        return self._run(self.proto.on_connect(peer))

    def on_data(self, data: bytes) -> Output:
        return self._run(self.proto.on_data(data))

    def on_eof(self) -> Output:
        return self._run(self.proto.on_eof())

    def on_writable(self) -> Output:
        return self._run(self.proto.on_writable())

    def on_timeout(self) -> Output:
        return self._run(self.proto.on_timeout())

    def on_shutdown(self) -> Output:
        return self._run(self.proto.on_shutdown())


def connected(proto: GopherProtocol, *, pump: int = 16) -> ProtocolTester:
    """A connected ProtocolTester for ``proto``, offloads run inline."""
    t = ProtocolTester(InlineOffload(proto), pump=pump)
    t.connect()
    return t


class MemoryRoot:
    """A Root made of a dict: path ("a/b.txt") to bytes, or None for a dir."""

    def __init__(self, files: dict[str, bytes | None]) -> None:
        self.files: dict[tuple[str, ...], bytes | None] = {(): None}
        for path, data in files.items():
            parts = tuple(path.split("/"))
            for i in range(1, len(parts)):
                self.files.setdefault(parts[:i], None)
            self.files[parts] = data

    def _node(self, parts: tuple[str, ...]) -> Node:
        data = self.files[parts]
        if data is None:
            return Node(parts, "dir", "/mem/" + "/".join(parts))
        return Node(parts, "file", "/mem/" + "/".join(parts), len(data))

    def resolve(self, parts: tuple[str, ...]) -> Node:
        if any(p.startswith(".") for p in parts):
            raise Forbidden("hidden")
        if parts not in self.files:
            raise NotFound("not found")
        return self._node(parts)

    def children(self, node: Node) -> list[Node]:
        n = len(node.parts)
        return [
            self._node(p) for p in self.files
            if len(p) == n + 1 and p[:n] == node.parts and not p[-1].startswith(".")
        ]

    def head(self, node: Node, size: int) -> bytes:
        return (self.files[node.parts] or b"")[:size]

    def read(self, node: Node, limit: int) -> bytes:
        return (self.files[node.parts] or b"")[:limit]

    def chunks(self, node: Node, size: int) -> Iterator[bytes]:
        data = self.files[node.parts] or b""
        for i in range(0, len(data), size):
            yield data[i : i + size]


TREE: dict[str, bytes | None] = {
    "about.txt": b"Hello gopher\n.hidden dot line\nlast line",
    "zebra.md": b"# zebra\nstripes\n",
    "Apple.txt": b"apples are red\n",
    "image.png": b"\x89PNG\r\n\x1a\n....",
    "README": b"plain text without an extension\n",
    "blob": b"\x00\x01\x02binary",
    "page.html": b"<html>hi</html>",
    "archive.zip": b"PK\x03\x04",
    "docs/guide.txt": b"the guide explains stripes\n",
    "docs/deep/notes.txt": b"deep notes about zebras\n",
    ".secret": b"hidden",
    "bad\tname.txt": b"cannot be linked",
    "new\nline.txt": b"cannot be linked",
}


def make_tester(tree: dict[str, bytes | None] | None = None, **site: object) -> ProtocolTester:
    root = MemoryRoot(TREE if tree is None else tree)
    return connected(GopherProtocol(GopherSite(root, **site), HOST, PORT))  # type: ignore[arg-type]


def ask(request: bytes, tree: dict[str, bytes | None] | None = None, **site: object) -> bytes:
    t = make_tester(tree, **site)
    out = t.feed(request)
    assert t.closed, "a Gopher answer ends with a close"
    return out


def lines(menu: bytes) -> list[bytes]:
    assert menu.endswith(b"\r\n.\r\n"), menu[-20:]
    return menu[:-5].split(b"\r\n")


def test_root_menu_sorted_hidden_left_out_lines_well_formed() -> None:
    menu = ask(b"\r\n")
    got = lines(menu)
    assert got == [
        b"0about.txt\t/about.txt\tgopher.example\t7070",
        b"0Apple.txt\t/Apple.txt\tgopher.example\t7070",
        b"5archive.zip\t/archive.zip\tgopher.example\t7070",
        b"9blob\t/blob\tgopher.example\t7070",
        b"1docs\t/docs\tgopher.example\t7070",
        b"Iimage.png\t/image.png\tgopher.example\t7070",
        b"hpage.html\t/page.html\tgopher.example\t7070",
        b"0README\t/README\tgopher.example\t7070",
        b"0zebra.md\t/zebra.md\tgopher.example\t7070",
        b"7Search the text files here\t/.search\tgopher.example\t7070",
    ]
    for line in got:
        assert line.count(b"\t") == 3 and b"\r" not in line and b"\n" not in line


@pytest.mark.parametrize("request_line", [b"\r\n", b"\n", b"/\r\n", b"\t+\r\n", b"/\t$\r\n"])
def test_root_selectors(request_line: bytes) -> None:
    assert ask(request_line) == ask(b"\r\n")


def test_every_chunking_gives_the_same_answer() -> None:
    request = b"/docs/guide.txt\r\n"
    whole = ask(request)
    for chunks in chunkings(request):
        t = make_tester()
        assert t.feed_chunks(chunks) == whole


def test_nested_menu_and_text_with_dot_stuffing() -> None:
    assert lines(ask(b"/docs\r\n")) == [
        b"1deep\t/docs/deep\tgopher.example\t7070",
        b"0guide.txt\t/docs/guide.txt\tgopher.example\t7070",
    ]
    assert ask(b"/about.txt\r\n") == b"Hello gopher\r\n..hidden dot line\r\nlast line\r\n.\r\n"
    assert unstuff_text(ask(b"/about.txt\r\n")) == b"Hello gopher\n.hidden dot line\nlast line\n"


def test_binary_is_a_file_span_then_close() -> None:
    t = make_tester()
    assert t.feed(b"/blob\r\n") == b""
    assert t.files == [FileSpan("/mem/blob", 0, len(TREE["blob"] or b""))]
    assert t.closed


def test_large_text_is_streamed_and_stuffed() -> None:
    body = b"".join(b".line %d\n" % i for i in range(200_000))
    t = connected(GopherProtocol(GopherSite(MemoryRoot({"big.txt": body})), HOST, PORT),
               pump=10_000)
    out = t.feed(b"/big.txt\r\n")
    assert t.closed
    assert out == stuff_text(body)
    assert unstuff_text(out) == body


def test_display_strings_sanitised_and_unlinkable_names_skipped() -> None:
    menu = ask(b"/\r\n", {"a\x07b.txt": b"x", "tab\there": b"x", "ok.txt": b"x"})
    assert lines(menu)[0] == b"0a b.txt\t/a\x07b.txt\tgopher.example\t7070"
    for line in lines(menu):
        assert line.count(b"\t") == 3
        assert b"\x07" not in line.split(b"\t")[0]
    assert b"tab" not in menu


def test_gophermap_items_info_listing_relative_and_absolute() -> None:
    gmap = (
        b"!Welcome\n"
        b"Plain info line\n"
        b"# a comment\n"
        b"-zebra.md\n"
        b"0Relative file\tabout.txt\n"
        b"1Absolute menu\t/docs\n"
        b"0Display is selector\t\n"
        b"1Elsewhere\t/x\tother.example\n"
        b"1Elsewhere port\t/x\tother.example\t7071\n"
        b"hWeb\tURL:https://example.org/\n"
        b"*\n"
        b"trailer\n"
        b".\n"
        b"ignored after the dot\n"
    )
    tree = {"sub/gophermap": gmap, "sub/about.txt": b"a", "sub/zebra.md": b"z", "sub/b.txt": b"b"}
    got = lines(ask(b"/sub\r\n", tree))
    assert got == [
        b"iWelcome\t\tnull.host\t1",
        b"iPlain info line\t\tnull.host\t1",
        b"0Relative file\t/sub/about.txt\tgopher.example\t7070",
        b"1Absolute menu\t/docs\tgopher.example\t7070",
        b"0Display is selector\t/sub/Display is selector\tgopher.example\t7070",
        b"1Elsewhere\t/x\tother.example\t70",
        b"1Elsewhere port\t/x\tother.example\t7071",
        b"hWeb\tURL:https://example.org/\tgopher.example\t7070",
        b"0about.txt\t/sub/about.txt\tgopher.example\t7070",
        b"0b.txt\t/sub/b.txt\tgopher.example\t7070",
        b"itrailer\t\tnull.host\t1",
    ]


def test_url_selector_gets_a_redirect_page() -> None:
    out = ask(b"URL:https://example.org/?a=<b>\r\n")
    assert b'url=https://example.org/?a=&lt;b&gt;"' in out and b"<b>" not in out


def test_caps_txt() -> None:
    out = ask(b"caps.txt\r\n")
    assert out.startswith(b"CAPS\r\n") and out.endswith(b"\r\n.\r\n")
    assert b"PathDelimeter=/" in out
    assert ask(b"/caps.txt\r\n") == out


@pytest.mark.parametrize(
    "request_line", [b"/.search\tstripes\r\n", b"/.search?stripes\r\n", b"/.search\tSTRIPES\t+\r\n"]
)
def test_search_both_query_forms(request_line: bytes) -> None:
    items = parse_menu(ask(request_line))
    links = [i.selector for i in items if not i.is_info]
    assert links == ["/zebra.md", "/docs/guide.txt"]
    assert items[0].display.startswith("Searching the text files for")
    assert items[1].display.startswith("2 text file(s) match")


def test_search_scoped_and_all_words_and_limits() -> None:
    items = parse_menu(ask(b"/.search/docs\tzebras deep\r\n"))
    assert [i.selector for i in items if not i.is_info] == ["/docs/deep/notes.txt"]
    assert [i for i in parse_menu(ask(b"/.search\tnothing-matches\r\n")) if not i.is_info] == []
    assert parse_menu(ask(b"/.search\r\n"))[0].type == "i"
    cut = parse_menu(ask(b"/.search\te\r\n", search=SearchLimits(max_files=1)))
    assert "cut short" in cut[1].display
    assert parse_menu(ask(b"/.search/../x\tq\r\n"))[0].type == "3"


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"/about.txt\x00\r\n", "NUL in request"), (b"x" * 9000, "request too long")],
)
def test_refusals_are_type_3(data: bytes, reason: str) -> None:
    t = make_tester()
    out = t.feed(data)
    assert out.startswith(b"3") and out.endswith(b".\r\n") and t.closed and t.reason == reason


@pytest.mark.parametrize("size", [8191, 8192, 8193])
@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_line_limit_the_same_whole_or_in_pieces(size: int, end: bytes) -> None:
    # A line that comes whole is found without the LineBuffer: same limit.
    request = b"/" + b"x" * (size - 1) + end + b"ignored"
    whole = ask(request)
    assert whole.startswith(b"3Request too long" if size > 8192 else b"3Not found")
    for cut in (1, size // 2, size, size + 1):
        t = make_tester()
        out = t.feed(request[:cut])
        if not t.closed:  # a line known to be too long is refused at once
            out += t.feed(request[cut:])
        assert out == whole


def test_timeout_before_the_request_is_refused() -> None:
    t = make_tester()
    t.feed(b"/abo")
    assert t.timeout().startswith(b"3Request timed out")
    assert t.closed


def test_request_without_crlf_is_answered_at_eof() -> None:
    t = make_tester()
    assert t.feed(b"/docs") == b""
    assert t.eof().startswith(b"1deep")


def test_not_found_and_hidden() -> None:
    assert ask(b"/nope\r\n").startswith(b"3Not found\t")
    assert ask(b"/.secret\r\n").startswith(b"3Bad selector")


@pytest.mark.parametrize(
    ("name", "head", "kind"),
    [
        ("a.TXT", None, "0"), ("x.gif", None, "g"), ("x.jpeg", None, "I"), ("x.html", None, "h"),
        ("x.mp3", None, "s"), ("x.tar.gz", None, "5"), ("x.pdf", None, "d"), ("x.hqx", None, "4"),
        ("x.uue", None, "6"), ("x.mkv", None, ";"), ("README", b"hello\n", "0"),
        ("README", b"caf\xe9 latin-1 text\n", "0"), ("data", b"\x00\x01", "9"),
        ("pic", b"GIF89a", "g"), ("noext", None, "9"), ("empty", b"", "0"),
    ],
)
def test_type_table(name: str, head: bytes | None, kind: str) -> None:
    assert guess_type(name, head) == kind


# -- the real file system: confinement -----------------------------------------

SECRET = b"TOPSECRET-outside-the-root"


@pytest.fixture(scope="module")
def hole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("hole")
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET + b"\n")
    (outside / "secret.bin").write_bytes(SECRET + b"\x00")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"inside\n")
    (root / "sub" / "b.txt").write_bytes(b"inside b\n")
    (root / ".hidden").write_bytes(SECRET)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(SECRET)
    (root / "link_out").symlink_to(outside)
    (root / "link_file").symlink_to(outside / "secret.txt")
    (root / "link_bin").symlink_to(outside / "secret.bin")
    (root / "link_abs").symlink_to("/etc")
    (root / "sub" / "link_up").symlink_to("../../outside")
    (root / "loop").symlink_to("loop")
    (root / "link_in").symlink_to("a.txt")  # inside: allowed
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock"))
    try:
        os.mknod(root / "dev_null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        (root / "dev_null").symlink_to("/dev/null")
    yield root
    sock.close()


def attack_selectors(root: Path) -> list[bytes]:
    outside = str(root.parent / "outside")
    return [s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s for s in [
        "..", "../", "/..", "/../", "../outside/secret.txt", "/../outside/secret.txt",
        "/sub/../../outside/secret.txt", "/sub/../..", "/sub/..", "/a.txt/../../outside",
        "%2e%2e/outside/secret.txt", "/%2e%2e/outside/secret.txt", "%2E%2E%2Foutside%2Fsecret.txt",
        "/%2e%2e%2f%2e%2e%2foutside", "%252e%252e/outside/secret.txt", "%25252e%25252e/outside",
        "..%2foutside%2fsecret.txt", "..%5coutside%5csecret.txt", "/sub/%2e%2e/%2e%2e/outside",
        "..\\outside\\secret.txt", "\\..\\outside", "/sub\\..\\..\\outside\\secret.txt",
        "/%2e%2e%5c%2e%2e%5coutside", outside + "/secret.txt", "/" + outside + "/secret.txt",
        "//" + outside.lstrip("/") + "/secret.txt", "//etc/passwd", "///etc/passwd",
        "/etc/passwd", "%2fetc%2fpasswd", "C:\\Windows\\win.ini", "c:/windows/win.ini",
        "~root", "/~root/.ssh/id_rsa", "file:///etc/passwd", "/link_out/secret.txt",
        "/link_out", "/link_file", "/link_bin", "/link_abs/passwd", "/link_abs",
        "/sub/link_up/secret.txt", "/sub/link_up", "/loop", "/fifo", "/sock", "/dev_null",
        "/.hidden", "/.git/config", "/.git", "/sub/.hidden", "/.", "/./", ".", "./a.txt",
        "/sub/./b.txt", "....//....//outside", "..../outside", "..;/outside/secret.txt",
        "/%c0%ae%c0%ae/outside/secret.txt", "/..%c0%af../outside",
        "/\u2024\u2024/outside/secret.txt", "/\uff0e\uff0e/outside/secret.txt",
        "/a.txt%00.gif", "/%00", "/sub/\r/../x", b"/a.txt\x00", b"/\x00../outside",
        b"/\xc0\xae\xc0\xae/outside/secret.txt", "/.search/../outside\tsecret",
        "/.search/..\tsecret", "/.search/link_out\tsecret", "/.search?..", "URL:../x",
    ]]


def test_at_least_fifty_attacks_all_refused_by_the_protocol(hole: Path) -> None:
    site = GopherSite(FileSystemRoot(str(hole)))
    attacks = attack_selectors(hole)
    assert len(attacks) >= 50
    for selector in attacks:
        t = connected(GopherProtocol(site, HOST, PORT))
        out = t.feed(selector + b"\r\n")
        assert t.closed, selector
        assert SECRET not in out, selector
        assert not t.files, (selector, t.files)
        if selector.startswith((b"/.search", b"URL:")):
            continue  # a (confined) search result or a redirect page, never the file
        assert out.startswith(b"3"), (selector, out[:80])


def test_attacks_all_refused_with_a_warm_answer_cache(hole: Path) -> None:
    # A clock past every file's times: every answer that may be cached is.
    site = GopherSite(FileSystemRoot(str(hole), clock=lambda: 1 << 62))
    for warm in (b"/a.txt", b"a.txt", b"/sub/b.txt", b"/link_in"):
        for _ in range(2):
            t = connected(GopherProtocol(site, HOST, PORT))
            assert t.feed(warm + b"\r\n").startswith(b"inside")
    assert sorted(site._answers) == [b"/a.txt", b"/sub/b.txt", b"a.txt"]
    for selector in attack_selectors(hole):
        t = connected(GopherProtocol(site, HOST, PORT))
        out = t.feed(selector + b"\r\n")
        assert t.closed and SECRET not in out and not t.files, selector
        if not selector.startswith((b"/.search", b"URL:")):
            assert out.startswith(b"3"), (selector, out[:80])
    assert sorted(site._answers) == [b"/a.txt", b"/sub/b.txt", b"a.txt"]


def test_real_root_listing_leaves_out_what_it_must(hole: Path) -> None:
    site = GopherSite(FileSystemRoot(str(hole)))
    t = connected(GopherProtocol(site, HOST, PORT))
    names = {i.display for i in parse_menu(t.feed(b"/\r\n")) if i.type != "7"}
    assert names == {"a.txt", "sub", "link_in"}
    t = connected(GopherProtocol(site, HOST, PORT))
    assert t.feed(b"/link_in\r\n") == b"inside\r\n.\r\n"


def test_real_root_binary_span_is_the_resolved_path(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00" * 10)
    site = GopherSite(FileSystemRoot(str(tmp_path)))
    t = connected(GopherProtocol(site, HOST, PORT))
    t.feed(b"/x.bin\r\n")
    assert t.files == [FileSpan(os.path.realpath(tmp_path / "x.bin"), 0, 10)]
