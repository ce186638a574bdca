"""The Gopher answer cache: small files' answers kept per site, keyed by the
request line, re-checked per request by the root's stamp. Hits, every kind
of change that must end one (content, rename, a symlink swapped in for the
file, a directory or the root: refused exactly as without the cache), the
settling rule for freshly written files, and the bound in bytes. With a
real file system under a temporary directory; no sockets, no sleeps (the
root's clock is handed in)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from sockworks import FileSpan
from sockworks.gopher.fsroot import COARSE_SETTLE_NS, SETTLE_NS, FileSystemRoot
from sockworks.gopher.items import stuff_text
from sockworks.gopher.root import Node
from sockworks.protocols.gopher import ANSWER_OVERHEAD, GopherProtocol, GopherSite
from sockworks.testing import ProtocolTester

HOST, PORT = "gopher.example", 7070
SECRET = b"TOPSECRET-outside-the-root"
TEXT = b"line one\n.dot line\nline three\n"


def later() -> int:
    """A clock well past every file's times (year 2116): all settled."""
    return 1 << 62


class CountingRoot(FileSystemRoot):
    """Counts full resolves and reads: a hit does neither."""

    def __init__(self, directory: str, clock: Callable[[], int] = later) -> None:
        super().__init__(directory, clock)
        self.resolves = 0
        self.reads = 0

    def resolve(self, parts: tuple[str, ...]) -> Node:
        self.resolves += 1
        return super().resolve(parts)

    def read(self, node: Node, limit: int) -> bytes:
        self.reads += 1
        return super().read(node, limit)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET + b"\n")
    (outside / "sub" / "b.txt").write_bytes(SECRET + b" b\n")
    (outside / "x.bin").write_bytes(SECRET + b"\x00")
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(TEXT)
    (root / "sub" / "b.txt").write_bytes(b"inside b\n")
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"inside c\n")
    (root / "x.bin").write_bytes(b"\x00\x01binary")
    (root / "link_in").symlink_to("a.txt")
    return root


def get(site: GopherSite, request: bytes) -> ProtocolTester:
    t = ProtocolTester(GopherProtocol(site, HOST, PORT))
    t.connect()
    t.out = t.feed(request + b"\r\n")  # type: ignore[attr-defined]
    assert t.closed
    return t


def text(site: GopherSite, request: bytes) -> bytes:
    out: bytes = get(site, request).out  # type: ignore[attr-defined]
    return out


def refused(site: GopherSite, request: bytes) -> None:
    t = get(site, request)
    out: bytes = t.out  # type: ignore[attr-defined]
    assert out.startswith(b"3"), out[:80]
    assert SECRET not in out and not t.files


def test_a_hit_skips_resolve_and_read_and_answers_the_same(tree: Path) -> None:
    root = CountingRoot(str(tree))
    site = GopherSite(root)
    first = text(site, b"/a.txt")
    assert first == stuff_text(TEXT)
    assert (root.resolves, len(site._answers)) == (1, 1)
    for _ in range(3):
        assert text(site, b"/a.txt") == first
    assert root.resolves == 1 and root.reads == 0  # read_stamped, then nothing
    # Deeper paths and the form without the leading / are cached too.
    assert text(site, b"sub/deeper/c.txt") == b"inside c\r\n.\r\n"
    assert text(site, b"sub/deeper/c.txt") == b"inside c\r\n.\r\n"
    assert text(site, b"/sub/deeper/c.txt\t+") == b"inside c\r\n.\r\n"
    assert root.resolves == 3


def test_a_binary_span_is_cached_and_refused_once_swapped(tree: Path) -> None:
    root = CountingRoot(str(tree))
    site = GopherSite(root)
    span = FileSpan(str(tree / "x.bin"), 0, 8)
    assert get(site, b"/x.bin").files == [span]
    assert get(site, b"/x.bin").files == [span]
    assert root.resolves == 1
    (tree / "x.bin").unlink()
    (tree / "x.bin").symlink_to(tree.parent / "outside" / "x.bin")
    refused(site, b"/x.bin")


def test_content_changes_end_a_hit(tree: Path) -> None:
    root = CountingRoot(str(tree))
    site = GopherSite(root)
    path = tree / "a.txt"
    assert text(site, b"/a.txt") == stuff_text(TEXT)
    path.write_bytes(b"a longer new text\n")
    assert text(site, b"/a.txt") == b"a longer new text\r\n.\r\n"
    # The same size, written within one tick of the kernel's coarse clock:
    # its times may not move, so set the mtime apart, as any later write
    # (after SETTLE_NS) would.
    st = path.stat()
    path.write_bytes(b"a longer NEW text\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert text(site, b"/a.txt") == b"a longer NEW text\r\n.\r\n"
    path.chmod(0o600)  # the ctime moves: resolved again, same answer
    before = root.resolves
    assert text(site, b"/a.txt") == b"a longer NEW text\r\n.\r\n"
    assert root.resolves == before + 1


def test_rename_ends_a_hit(tree: Path) -> None:
    site = GopherSite(CountingRoot(str(tree)))
    assert text(site, b"/sub/b.txt") == b"inside b\r\n.\r\n"
    (tree / "sub" / "b.txt").rename(tree / "sub" / "moved.txt")
    assert text(site, b"/sub/b.txt").startswith(b"3Not found")
    (tree / "a.txt").rename(tree / "sub" / "b.txt")  # another file, same name
    assert text(site, b"/sub/b.txt") == stuff_text(TEXT)
    # A directory on the way renamed and another put in its place.
    (tree / "sub").rename(tree / "sub_old")
    (tree / "sub").mkdir()
    (tree / "sub" / "b.txt").write_bytes(b"new sub\n")
    assert text(site, b"/sub/b.txt") == b"new sub\r\n.\r\n"


def test_file_swapped_for_a_symlink_out_of_the_root_is_refused(tree: Path) -> None:
    site = GopherSite(CountingRoot(str(tree)))
    assert text(site, b"/a.txt") == stuff_text(TEXT)
    (tree / "a.txt").unlink()
    (tree / "a.txt").symlink_to(tree.parent / "outside" / "secret.txt")
    refused(site, b"/a.txt")
    refused(site, b"/a.txt")
    assert not site._answers


def test_directory_swapped_for_a_symlink_out_of_the_root_is_refused(tree: Path) -> None:
    site = GopherSite(CountingRoot(str(tree)))
    assert text(site, b"/sub/b.txt") == b"inside b\r\n.\r\n"
    (tree / "sub").rename(tree / "sub_old")
    (tree / "sub").symlink_to(tree.parent / "outside" / "sub")
    refused(site, b"/sub/b.txt")
    # Even one that points back inside, at the very same directory: the
    # path now goes through a symlink, so it is resolved in full (allowed).
    (tree / "sub").unlink()
    (tree / "sub").symlink_to("sub_old")
    assert text(site, b"/sub/b.txt") == b"inside b\r\n.\r\n"
    assert not site._answers  # reached through a symlink: never cached


def test_root_path_swapped_for_a_symlink_is_refused_as_without_the_cache(tree: Path) -> None:
    site = GopherSite(CountingRoot(str(tree)))
    assert text(site, b"/a.txt") == stuff_text(TEXT)
    moved = tree.parent / "root_moved"
    tree.rename(moved)
    tree.symlink_to(moved)
    refused(site, b"/a.txt")  # realpath leaves the root's path: refused, as ever
    fresh = GopherSite(FileSystemRoot(str(moved)))
    assert text(fresh, b"/a.txt") == stuff_text(TEXT)


def test_symlinks_inside_the_root_are_served_but_not_cached(tree: Path) -> None:
    root = CountingRoot(str(tree))
    site = GopherSite(root)
    assert text(site, b"/link_in") == stuff_text(TEXT)
    assert text(site, b"/link_in") == stuff_text(TEXT)
    assert root.resolves == 2 and not site._answers


def test_other_spellings_are_answered_but_not_cached(tree: Path) -> None:
    site = GopherSite(CountingRoot(str(tree)))
    for request in (b"/a.txt/", b"/a.txt\tsome query", b"/a.txt?x"):
        text(site, request)
    assert not site._answers


def test_a_freshly_written_file_is_not_cached_until_it_settles(tree: Path) -> None:
    st = (tree / "a.txt").stat()
    now = max(st.st_mtime_ns, st.st_ctime_ns)
    root = CountingRoot(str(tree), clock=lambda: now + SETTLE_NS - 1)
    site = GopherSite(root)
    assert text(site, b"/a.txt") == text(site, b"/a.txt") == stuff_text(TEXT)
    assert get(site, b"/x.bin").files
    assert root.resolves == 3 and not site._answers
    settled = CountingRoot(str(tree), clock=lambda: now + SETTLE_NS)
    site = GopherSite(settled)
    text(site, b"/a.txt")
    assert len(site._answers) == 1


def test_times_in_whole_seconds_settle_longer(tree: Path) -> None:
    now = 1_700_000_000 * 10**9
    root = FileSystemRoot(str(tree), clock=lambda: now)

    def settled(mtime: int, ctime: int) -> bool:
        return root._settled(SimpleNamespace(st_mtime_ns=mtime, st_ctime_ns=ctime))  # type: ignore[arg-type]

    fine = now - SETTLE_NS
    assert settled(fine, fine)
    assert not settled(fine + 1, fine) and not settled(fine, fine + 1)
    whole = now - 10**9  # a second ago, on a file system that keeps seconds
    assert not settled(whole, whole)
    assert settled(now - COARSE_SETTLE_NS, now - COARSE_SETTLE_NS)
    assert settled(whole, whole + 7)  # only the mtime was set (tar, cp -p)


def test_bounded_in_bytes_least_recently_used_first_out(tree: Path) -> None:
    names = [f"f{i:02}.txt" for i in range(20)]
    for name in names:
        (tree / name).write_bytes(b"x" * 1000 + b"\n")
    probe = GopherSite(CountingRoot(str(tree)))
    text(probe, b"/f00.txt")
    entry = probe._answered  # every name is as long: every entry as big
    assert entry > len(b"/f00.txt") + len(b"x" * 1000 + b"\r\n.\r\n") + ANSWER_OVERHEAD
    site = GopherSite(CountingRoot(str(tree)), answer_cache_bytes=5 * entry)
    for name in names:
        text(site, b"/" + name.encode())
        assert site._answered <= 5 * entry
    assert len(site._answers) == 5
    assert list(site._answers) == [b"/" + n.encode() for n in names[-5:]]
    assert site._answered == sum(size for _, _, size in site._answers.values())
    # An answer over answer_max is served, not cached.
    (tree / "big.txt").write_bytes(b"y" * 3000 + b"\n")
    small = GopherSite(CountingRoot(str(tree)), answer_max=2000)
    text(small, b"/big.txt")
    assert not small._answers
    off = GopherSite(CountingRoot(str(tree)), answer_cache_bytes=0)
    text(off, b"/a.txt")
    assert not off._answers
