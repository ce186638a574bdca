"""A Gopher server (RFC 1436) as a sans-I/O protocol.

One request line per connection, answered, then the connection closes.
The file system comes in through a :class:`~sockworks.gopher.root.Root`
(the real one is :class:`~sockworks.gopher.fsroot.FileSystemRoot`), so
this module is tested with byte strings and an in-memory tree.

What is answered:

* a directory: its ``gophermap`` if it has one, else the automatic listing
  (sorted, hidden files left out), as a menu;
* a text file (type ``0``): CRLF lines, dot-stuffed, ``.`` terminated;
* any other file: its bytes, raw, by sendfile, until close;
* ``/.search`` (and ``/.search/DIR``): full-text search of the text files
  under the root (or DIR), the query after a TAB or a ``?``;
* ``caps.txt``: a generated capabilities file;
* ``URL:…``: an HTML page that sends a web browser on (the Bucktooth
  convention for links to other protocols);
* with scripts on (``GopherSite.scripts``), an executable file: its output,
  from a run on a thread of its own (see :mod:`sockworks.gopher.scripts`;
  ``*.dcgi`` output is a gophermap, made a menu);
* anything else, or anything unsafe: a type-3 error menu.

Any byte string a client sends gets one of these answers or a type-3
error; nothing it sends raises anything but the project's own errors.

Nothing slow runs on the event loop: a search, and a directory menu that is
not cached (listings run to 10,000 entries), are returned as
``Reply(offload=…)``, which the driver runs on a worker thread. Those
functions only read: the root, this connection's host and port, the
site's limits. The one shared thing they write, the menu cache, takes
their menus through a thread-safe queue (see :class:`GopherSite`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html import escape
from typing import Protocol

from .._buffer import LineBuffer
from .._errors import LineTooLong
from .._protocol import FileSpan, Output, Peer, Reply, StreamProtocol
from ..gopher.gophermap import LISTING, parse_gophermap
from ..gopher.items import (
    TEXT_TYPES,
    DotStuffer,
    Item,
    error_menu,
    format_menu,
    guess_type,
    info,
    selector_is_safe,
    stuff_text,
)
from ..gopher.requests import BadRequest, join_selector, parse_request, selector_parts, split_query
from ..gopher.root import Node, NotFound, Root, RootError, Stamp, StampedRoot, Unreadable

# Files the server cannot read are the operator's to fix: a warning each.
log = logging.getLogger("sockworks.gopher")

SEARCH = "/.search"
CAPS = ("caps.txt", "/caps.txt")
# At most this many bytes of a request line go into the closing log line.
SUMMARY_BYTES = 120
GOPHERMAP = "gophermap"

# Text files up to this size are stuffed in one piece; larger ones are
# streamed, paced by flow control, so memory does not grow with the file.
WHOLE_TEXT_LIMIT = 1 << 20
TEXT_CHUNK = 256 * 1024
# Bytes of a file read to guess its type when its extension says nothing.
SNIFF_BYTES = 512
# What an entry of the answer cache is counted as beyond its key, its
# bytes and its stamp (see _footprint): the OrderedDict slot, the entry
# tuple, the Reply.
ANSWER_OVERHEAD = 256


@dataclass(frozen=True)
class SearchLimits:
    """Bounds on one search. A search runs on a worker thread, not on the
    event loop, but worker threads are few and share the CPU (and the GIL)
    with the loop: ten heavy searches must not starve everyone else.

    ``max_work`` bounds what the files and bytes limits cannot: a query of
    many words costs words x bytes (each word is looked for in each file's
    text), so 1,000 words over 5 MiB is as much work as 5 words over 1 GiB.
    Work is counted in characters scanned: each file costs 2 per byte
    (decoding and case-folding), each word the characters it scanned to be
    found (the whole text when it is missing), each directory entry
    :data:`ENTRY_WORK`.
    """

    max_files: int = 5000  # text files looked at
    max_bytes: int = 64 << 20  # bytes read in all
    max_file_bytes: int = 1 << 20  # bytes read from any one file
    max_results: int = 100
    # 8 x max_bytes: a query of up to 6 words, each found only at the end of
    # every file, over everything the bytes limit lets a search read. At
    # about 2 G characters a second (str.find) that is ~0.25 s of one core,
    # however many words a request line of 8 KiB can hold.
    max_work: int = 512 << 20


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One run of a script: what its environment is made of."""

    path: str  # the resolved file, inside the root
    script: str  # its own selector (``/cgi/hello``)
    selector: str  # the selector as asked, ``?query`` included
    query: str  # after ``?`` in the selector ("" for none)
    search: str  # after the TAB (a type-7 search string; "" for none)
    item_type: str  # what the output is sent as
    host: str  # this server, as written into menus
    port: int
    remote_host: str  # the client ("" over a Unix socket)
    remote_port: int


@dataclass(frozen=True, slots=True)
class ScriptResult:
    """What a run gave: ``output`` when ``failure`` is None; else why (for
    the log and the close reason) and ``message`` for the type-3 line."""

    output: bytes
    failure: str | None = None
    message: str = ""
    busy: bool = False  # refused for the bound on scripts at once


class Scripts(Protocol):
    """What the protocol needs to run executable files as pages (the real
    one: :class:`sockworks.gopher.scripts.ScriptRunner`)."""

    def is_script(self, path: str) -> bool:
        """Whether a resolved regular file is run rather than served."""
        ...

    def run(self, call: ScriptCall) -> ScriptResult:
        """Run it to the end (on a worker thread; thread-safe)."""
        ...


# A script whose name ends so writes a gophermap, served as a menu (the
# geomyidae convention; Gophernicus calls such output a "dynamic menu").
DCGI = ".dcgi"


# A directory entry looked at by a search (readdir, a Node, its type, the
# sort) costs about as much as scanning 4 KiB of text: counted as such, a
# tree of many small or non-text files cannot escape the work budget.
ENTRY_WORK = 4096


@dataclass
class GopherSite:
    """What every connection of one Gopher service shares: the root, the
    advertised address (``None``: the listener's own), and limits."""

    root: Root
    advertise: tuple[str, int] | None = None
    max_request: int = 8192
    search: SearchLimits = field(default_factory=SearchLimits)
    description: str = "a sockworks Gopher server"
    version: str = "0"
    # Menus are kept, keyed by the directory's and its gophermap's mtimes
    # (and the advertised address), until either changes: a 10,000-entry
    # listing costs a readdir and 10,000 Python objects, a hit a stat.
    # Bounded in bytes; the oldest entries go first.
    cache_bytes: int = 64 << 20
    _menus: OrderedDict[tuple[object, ...], bytes] = field(default_factory=OrderedDict)
    _cached: int = 0
    # Menus are built on worker threads (Reply.offload) but the cache is
    # read and reordered on the event loop. Rather than a lock (the protocol
    # layer imports no threading, and the loop would wait on it), a builder
    # only appends to this deque, whose append and popleft are atomic; the
    # loop moves what is there into the cache before each lookup, so the
    # OrderedDict is only ever touched by one thread. Bounded: a burst of
    # builds with no lookup in between keeps the newest 64.
    _built: deque[tuple[tuple[object, ...], bytes]] = field(
        default_factory=lambda: deque(maxlen=64)
    )
    # Answers to file requests are kept too, keyed by the request line:
    # a text file's stuffed bytes (up to answer_max each), a binary's
    # FileSpan, each with the root's stamp of the file. A hit costs one
    # lstat per path component (the root's StampedRoot.unchanged, which
    # proves the path still names that file, unchanged, inside the root),
    # instead of a realpath, a stat, an access, the type guess, an open,
    # reads and dot-stuffing. Only roots that can stamp are cached from.
    # Read and written on the event loop only: no worker thread serves
    # files. Bounded in bytes (keys, answers and ANSWER_OVERHEAD each);
    # least recently used first out. 0 turns it off.
    answer_cache_bytes: int = 16 << 20
    answer_max: int = 256 << 10
    _answers: OrderedDict[bytes, tuple[Stamp, Reply, int]] = field(default_factory=OrderedDict)
    _answered: int = 0
    _stamper: StampedRoot | None = field(default=None, init=False)
    # Executable files run as pages (``--exec-scripts``); None: served as
    # files, as any other.
    scripts: Scripts | None = None

    def __post_init__(self) -> None:
        if isinstance(self.root, StampedRoot):
            self._stamper = self.root

    def cached_menu(self, key: tuple[object, ...]) -> bytes | None:
        """The cached menu for ``key``, or None. On the event loop only."""
        self._settle()
        menu = self._menus.get(key)
        if menu is not None:
            self._menus.move_to_end(key)
        return menu

    def keep_menu(self, key: tuple[object, ...], menu: bytes) -> None:
        """Offer a menu to the cache. Safe from any thread: it is queued,
        and cached at the next :meth:`cached_menu`."""
        if len(menu) <= self.cache_bytes // 4:
            self._built.append((key, menu))

    def cached_answer(self, line: bytes) -> Reply | None:
        """The cached answer to a request line, if its file is unchanged
        (else the entry goes, and the caller resolves in full). On the loop."""
        entry = self._answers.get(line)
        if entry is None:
            return None
        stamper = self._stamper
        if stamper is not None and stamper.unchanged(entry[0]):
            self._answers.move_to_end(line)
            return entry[1]
        del self._answers[line]
        self._answered -= entry[2]
        return None

    def keep_answer(self, line: bytes, stamp: Stamp, reply: Reply) -> None:
        """Cache ``reply`` to ``line`` under ``stamp``. On the loop."""
        size = len(line) + len(reply.data) + _footprint(stamp) + ANSWER_OVERHEAD
        if size > self.answer_cache_bytes or len(reply.data) > self.answer_max:
            return
        old = self._answers.pop(line, None)
        if old is not None:
            self._answered -= old[2]
        self._answers[line] = (stamp, reply, size)
        self._answered += size
        while self._answered > self.answer_cache_bytes:
            _, dropped = self._answers.popitem(last=False)
            self._answered -= dropped[2]

    def _settle(self) -> None:
        while True:
            try:
                key, menu = self._built.popleft()
            except IndexError:
                return
            self._store(key, menu)

    def _store(self, key: tuple[object, ...], menu: bytes) -> None:
        old = self._menus.pop(key, None)
        if old is not None:
            self._cached -= len(old)
        self._menus[key] = menu
        self._cached += len(menu)
        while self._cached > self.cache_bytes:
            _, dropped = self._menus.popitem(last=False)
            self._cached -= len(dropped)


def _footprint(obj: object) -> int:
    """Roughly the bytes a stamp holds (it is opaque: a root's own tuple of
    paths, ints and tuples), so that the cache's bound counts it."""
    if isinstance(obj, (str, bytes)):
        return 64 + len(obj)
    if isinstance(obj, tuple):
        return 64 + 8 * len(obj) + sum(_footprint(o) for o in obj)
    return 32


def _caps(site: GopherSite) -> bytes:
    lines = [
        "CAPS",
        "",
        "# Generated by sockworks. See gopher://<this server>/0/caps.txt",
        "CapsVersion=1",
        "ExpireCapsAfter=3600",
        "",
        "PathDelimeter=/",
        "PathIdentity=.",
        "PathParent=..",
        "PathParentDouble=FALSE",
        "PathKeepPreDelimeter=FALSE",
        "",
        "ServerSoftware=sockworks",
        f"ServerSoftwareVersion={site.version}",
        f"ServerDescription={site.description}",
        "DefaultEncoding=UTF-8",
        "ServerSupportsStdinScripts=FALSE",
        f"SearchSelector={SEARCH}",
    ]
    return stuff_text(("\n".join(lines) + "\n").encode())


# Schemes a redirect page never links to: in a browser (through a
# Gopher-to-web proxy) they run script on the proxy's origin.
_SCRIPT_SCHEMES = ("javascript:", "vbscript:", "data:")


def _redirect_target(url: str) -> str:
    """The ``URL:`` target a redirect page may link to; BadRequest if none."""
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in url):  # undecodable bytes
        raise BadRequest("URL is not UTF-8")
    if not url.isprintable():
        raise BadRequest("control character in URL")
    if url.strip().lower().startswith(_SCRIPT_SCHEMES):
        raise BadRequest("URL scheme not allowed")
    return url


def _redirect_page(url: str) -> bytes:
    target = escape(url, quote=True)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"refresh\" content=\"0;url={target}\">"
        f"<title>{target}</title></head><body><p>This Gopher link leads to "
        f"<a href=\"{target}\">{target}</a>.</p></body></html>\n"
    ).encode()


# Written into menus when a client came in over a Unix socket and no
# --advertise was given: there is no host and port of ours to name.
UNIX_FALLBACK = ("localhost", 70)


class GopherProtocol(StreamProtocol):
    """One Gopher connection. ``host``/``port`` go into menu links: the
    site's advertised address, else (from ``on_connect``) the address the
    client connected to."""

    def __init__(self, site: GopherSite, host: str | None = None, port: int | None = None) -> None:
        self.site = site
        self.root = site.root
        advertised = site.advertise or UNIX_FALLBACK
        self.host = host if host is not None else advertised[0]
        self.port = port if port is not None else advertised[1]
        # Made only when a request line comes in pieces (see on_data).
        self.buffer: LineBuffer | None = None
        self.answered = False
        self._stream: Iterator[bytes] | None = None
        self._asked: bytes | None = None  # the request line, for the log
        self.peer: Peer | None = None  # the client, for scripts

    # -- the connection ------------------------------------------------------

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        self.peer = peer
        if self.site.advertise is None and local is not None and local.host:
            self.host, self.port = local.host, local.port
        return None

    def on_data(self, data: bytes) -> Output:
        if self.answered:
            return None  # a request per connection; the rest is ignored
        if b"\x00" in data:
            return self._refuse("NUL in request")
        buffer = self.buffer
        if buffer is None:
            # The usual case, the whole line in the first chunk, without a
            # buffer: the same line and limit as LineBuffer's (the rest of
            # the chunk is ignored, as after any request).
            nl = data.find(b"\n")
            if nl >= 0:
                end = nl - 1 if nl and data[nl - 1] == 0x0D else nl
                if end > self.site.max_request:
                    return self._refuse("request too long")
                return self.answer(data[:end])
            buffer = self.buffer = LineBuffer(self.site.max_request)
        buffer.feed(data)
        try:
            line = buffer.next_line()
        except LineTooLong:
            return self._refuse("request too long")
        if line is None:
            return None
        return self.answer(line)

    def on_eof(self) -> Output:
        if self.answered:
            return None if self._stream is not None else Reply(close=True)
        rest = self.buffer.take_rest() if self.buffer is not None else b""
        if rest:  # a request without CRLF, then a half-close: answer it
            return self.answer(rest.rstrip(b"\r"))
        return Reply(close=True, reason="no request")

    def on_timeout(self) -> Output:
        if self.answered:
            return Reply(close=True, reason="idle timeout")
        return self._refuse("request timed out")

    def awaiting_request(self) -> bool:
        return not self.answered

    def on_request_timeout(self) -> Output:
        return self._refuse("request timed out")

    def request_summary(self) -> str | None:
        return None if self._asked is None else loggable(self._asked)

    def on_writable(self) -> Output:
        if self._stream is None:
            return None
        chunk = next(self._stream, None)
        if chunk is None:
            self._stream = None
            return Reply(close=True)
        return Reply(data=chunk, more=True)

    # -- requests ------------------------------------------------------------

    def _refuse(self, reason: str) -> Reply:
        self.answered = True
        return Reply(data=error_menu(_sentence(reason)), close=True, reason=reason)

    def answer(self, line: bytes) -> Reply:
        """The reply to one request line (without CRLF)."""
        self.answered = True
        self._asked = line
        if self.site._answers:
            cached = self.site.cached_answer(line)
            if cached is not None:
                return cached
        try:
            return self._answer(line)
        except BadRequest as exc:
            return Reply(data=error_menu(f"Bad selector: {exc.reason}"), close=True,
                         reason=exc.reason)
        except RootError as exc:
            if isinstance(exc, Unreadable):
                log.warning("cannot read %s: %s (answered with an error)", exc.path, exc.reason)
            return Reply(data=error_menu(_sentence(str(exc))), close=True,
                         reason=str(exc))

    def _answer(self, line: bytes) -> Reply:
        request = parse_request(line)
        selector = request.selector
        if selector.startswith("URL:"):
            return Reply(data=_redirect_page(_redirect_target(selector[4:])), close=True)
        if selector in CAPS:
            return Reply(data=_caps(self.site), close=True)
        path, query = split_query(selector)
        if path == SEARCH or path.startswith(SEARCH + "/"):
            if request.query is not None:
                query = request.query
            # The scope is resolved here, on the loop (one realpath): a bad
            # one is answered at once, without a trip to a worker thread.
            start = self.root.resolve(selector_parts(path[len(SEARCH):]))
            text = query or ""
            if not text.split():
                return Reply(data=_NO_WORDS, close=True)
            # The first line goes out at once: the client sees its query
            # taken while the search runs on a worker thread.
            return self._offload(lambda: self._search(start, text), first=_search_header(text))
        scripts = self.site.scripts
        if scripts is not None and "?" in selector:
            script = self._script_with_query(scripts, selector, request.query)
            if script is not None:
                return script
        parts = selector_parts(selector)
        node = self.root.resolve(parts)
        if node.kind == "dir":
            return self._menu_reply(node)
        if scripts is not None and node.name != GOPHERMAP and scripts.is_script(node.path):
            return self._script(scripts, node, selector, "", request.query)
        # The answer is cached under the request line when the line is
        # the file's own selector (with or without its leading /, a Gopher+
        # marker at most): the many other spellings of one file (trailing
        # slashes, a search query a file ignores) would only crowd it out.
        stamper = self.site._stamper
        key = line if (
            stamper is not None and request.query is None
            and selector.lstrip("/") == "/".join(parts) and self.site.answer_cache_bytes
        ) else None
        kind = self._type(node)
        if kind in TEXT_TYPES:
            return self._text(node, key)
        reply = Reply(file=FileSpan(node.path, 0, node.size), close=True)
        if key is not None and stamper is not None:
            stamp = stamper.stamp(node)
            if stamp is not None:
                self.site.keep_answer(key, stamp, reply)
        return reply

    def _offload(self, work: Callable[[], bytes], first: bytes = b"") -> Reply:
        """``first`` sent at once, then ``work()`` run by the driver on a
        worker thread, its bytes sent, then close. ``work`` must only read
        (the root, ``host``/``port``, the site's limits) or queue a menu for
        the cache (thread-safe); its refusals become type-3 menus there, as
        on the loop."""

        def run() -> Output:
            try:
                return Reply(data=work(), close=True)
            except BadRequest as exc:
                return Reply(data=error_menu(f"Bad selector: {exc.reason}"), close=True,
                             reason=exc.reason)
            except RootError as exc:
                return Reply(data=error_menu(_sentence(str(exc))), close=True, reason=str(exc))

        return Reply(data=first, offload=run)

    # -- scripts -------------------------------------------------------------

    def _script_with_query(self, scripts: Scripts, selector: str,
                           search: str | None) -> Reply | None:
        """``/cgi/page?query``: the script ``/cgi/page`` with QUERY_STRING
        ``query``, when no file is named the whole selector (a file name
        may hold a ``?``, and is served as before). None: not a script."""
        try:
            self.root.resolve(selector_parts(selector))
            return None  # a file or directory of that very name
        except (BadRequest, NotFound):
            pass
        path, query = split_query(selector)
        try:
            node = self.root.resolve(selector_parts(path))
        except (BadRequest, RootError):
            return None  # the whole selector's own error is answered
        if node.kind != "file" or node.name == GOPHERMAP or not scripts.is_script(node.path):
            return None
        return self._script(scripts, node, selector, query or "", search)

    def _script(self, scripts: Scripts, node: Node, selector: str, query: str,
                search: str | None) -> Reply:
        """Run an executable file on a thread of its own; its output is
        the item: a menu for ``*.dcgi`` (its gophermap lines), text
        dot-stuffed for a text type, anything else raw. A failure is a
        type-3 error (the runner logs why)."""
        kind = "1" if node.name.lower().endswith(DCGI) else self._type(node)
        directory = self.root.resolve(node.parts[:-1]) if kind == "1" else None
        peer = self.peer
        call = ScriptCall(
            path=node.path, script=join_selector(node.parts), selector=selector,
            query=query, search=search or "", item_type=kind, host=self.host,
            port=self.port, remote_host=peer.host if peer is not None else "",
            remote_port=peer.port if peer is not None else 0,
        )

        def run() -> Output:
            result = scripts.run(call)
            if result.failure is not None:
                return Reply(data=error_menu(result.message or "Script failed"), close=True,
                             reason=f"script: {result.failure}")
            if directory is not None:
                data = format_menu(self.mapped(directory, result.output))
            elif kind in TEXT_TYPES:
                data = stuff_text(result.output)
            else:
                data = result.output
            return Reply(data=data, close=True)

        return Reply(offload=run, offload_waits=True)

    def _text(self, node: Node, key: bytes | None = None) -> Reply:
        if node.size <= WHOLE_TEXT_LIMIT:
            stamper = self.site._stamper
            if key is None or stamper is None or node.size > self.site.answer_max:
                return Reply(data=stuff_text(self.root.read(node, WHOLE_TEXT_LIMIT + 1)),
                             close=True)
            data, stamp = stamper.read_stamped(node, WHOLE_TEXT_LIMIT + 1)
            reply = Reply(data=stuff_text(data), close=True)
            if stamp is not None:
                self.site.keep_answer(key, stamp, reply)
            return reply
        self._stream = self._stuffed(node)
        return Reply(more=True)

    def _stuffed(self, node: Node) -> Iterator[bytes]:
        stuffer = DotStuffer()
        for chunk in self.root.chunks(node, TEXT_CHUNK):
            out = stuffer.feed(chunk)
            if out:
                yield out
        yield stuffer.finish()

    def _type(self, node: Node) -> str:
        if node.kind == "dir":
            return "1"
        if self.site.scripts is not None and node.name.lower().endswith(DCGI):
            return "1"  # a dynamic menu (listed so; run when asked)
        kind = guess_type(node.name)
        if kind == "9":  # no known extension: look at the first bytes
            return guess_type(node.name, self.root.head(node, SNIFF_BYTES))
        return kind

    # -- menus ---------------------------------------------------------------

    def _link(self, node: Node, display: str | None = None) -> Item | None:
        selector = join_selector(node.parts)
        if not selector_is_safe(selector):
            return None  # a file name with TAB/CR/LF cannot be linked to
        return Item(self._type(node), display or node.name, selector, self.host, self.port)

    def listing(self, node: Node, hidden: frozenset[str] = frozenset()) -> list[Item]:
        """The automatic listing of a directory: sorted by name, hidden
        files, the gophermap and names in ``hidden`` left out."""
        children = [
            c for c in self.root.children(node)
            if c.name != GOPHERMAP and c.name not in hidden and not c.name.startswith(".")
        ]
        children.sort(key=lambda c: (c.name.casefold(), c.name))
        host, port = self.host, self.port
        items: list[Item] = []
        for child in children:
            selector = "/" + "/".join(child.parts)
            if "\t" in selector or "\n" in selector or "\r" in selector:
                continue  # a file name with TAB/CR/LF cannot be linked to
            kind = "1" if child.kind == "dir" else self._type(child)
            items.append(Item(kind, child.name, selector, host, port))
        return items

    def _menu_source(self, node: Node) -> tuple[Node | None, tuple[object, ...] | None]:
        """A directory's gophermap (if any) and its menu's cache key (None:
        the root knows no mtimes, nothing is cached). A stat or two."""
        try:
            gmap_node: Node | None = self.root.resolve((*node.parts, GOPHERMAP))
        except RootError:
            gmap_node = None
        if gmap_node is not None and gmap_node.kind != "file":
            gmap_node = None
        key: tuple[object, ...] | None = None
        if node.mtime:  # a root that knows mtimes: cacheable
            key = (node.parts, node.mtime, gmap_node and gmap_node.mtime, self.host, self.port)
        return gmap_node, key

    def _menu_reply(self, node: Node) -> Reply:
        """A cached menu at once; any other is built on a worker thread."""
        gmap_node, key = self._menu_source(node)
        if key is not None:
            cached = self.site.cached_menu(key)
            if cached is not None:
                return Reply(data=cached, close=True)
        return self._offload(lambda: self._build_menu(node, gmap_node, key))

    def menu(self, node: Node) -> bytes:
        """A directory's menu, built here if it is not cached (call it on
        the loop thread: it reads the cache)."""
        gmap_node, key = self._menu_source(node)
        if key is not None:
            cached = self.site.cached_menu(key)
            if cached is not None:
                return cached
        return self._build_menu(node, gmap_node, key)

    def _build_menu(self, node: Node, gmap_node: Node | None,
                    key: tuple[object, ...] | None) -> bytes:
        """Build a menu and offer it to the cache; safe on a worker thread."""
        if gmap_node is None:
            items = self.listing(node)
            if not node.parts:  # the root's automatic listing offers search
                items.append(Item("7", "Search the text files here", SEARCH, self.host,
                                  self.port))
            menu = format_menu(items)
        else:
            menu = format_menu(self.mapped(node, self.root.read(gmap_node, 1 << 20)))
        if key is not None:
            self.site.keep_menu(key, menu)
        return menu

    def mapped(self, node: Node, gophermap: bytes) -> list[Item]:
        """A directory's menu from its gophermap (see gopher/gophermap.py)."""
        gmap = parse_gophermap(gophermap)
        items: list[Item] = []
        here = join_selector(node.parts)
        for line in gmap.lines:
            if line.type == LISTING:
                items.extend(self.listing(node, frozenset(gmap.hidden)))
            elif line.type == "i":
                items.append(info(line.display))
            else:
                selector = line.selector or ""
                host, port = line.host, line.port
                if host is None:
                    host, port = self.host, (self.port if port is None else port)
                    if not selector.startswith(("/", "URL:", "GET ")):
                        selector = here.rstrip("/") + "/" + selector
                elif port is None:
                    port = 70
                if not (selector_is_safe(selector) and selector_is_safe(host)):
                    continue
                items.append(Item(line.type, line.display, selector, host, port))
        return items

    # -- search --------------------------------------------------------------

    def search(self, scope: tuple[str, ...], query: str) -> bytes:
        """The whole answer to a search of ``query`` under ``scope``, built
        here (a connection offloads :meth:`_search` instead)."""
        if not query.split():
            return _NO_WORDS
        return _search_header(query) + self._search(self.root.resolve(scope), query)

    def _search(self, start: Node, query: str) -> bytes:
        """The search menu after its first line (:func:`_search_header`):
        the count, then the matches. Runs on a worker thread and only
        reads. Bounded by :class:`SearchLimits`, work counted as documented
        there."""
        words = list(dict.fromkeys(query.casefold().split()))  # each word once
        limits = self.site.search
        scripts = self.site.scripts
        found: list[Item] = []
        matches = files = read = work = 0
        pending = deque([start] if start.kind == "dir" else [])
        truncated = False
        while pending and not truncated and matches < limits.max_results:
            directory = pending.popleft()
            children = sorted(self.root.children(directory), key=lambda c: c.name.casefold())
            work += ENTRY_WORK * len(children)
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.kind == "dir":
                    pending.append(child)
                    continue
                if self._type(child) not in TEXT_TYPES:
                    continue
                if scripts is not None and scripts.is_script(child.path):
                    continue  # a page is run, never shown as its source
                if (files >= limits.max_files or read >= limits.max_bytes
                        or work >= limits.max_work):
                    truncated = True
                    break
                files += 1
                try:
                    data = self.root.read(child, min(limits.max_file_bytes,
                                                     limits.max_bytes - read))
                except RootError:  # one unreadable file does not end the search
                    continue
                read += len(data)
                hit, cost = _match(child.name, data, words, limits.max_work - work)
                work += cost
                if hit is None:
                    if work >= limits.max_work:
                        truncated = True  # stopped inside this file
                        break
                    continue
                link = self._link(child, join_selector(child.parts))
                if link is None:
                    continue
                matches += 1
                found.append(link)
                if hit:
                    found.append(info("    " + hit))
                if matches >= limits.max_results:
                    break
        head = f"{matches} text file(s) match {_shown(query)!r}"
        return format_menu([info(head + (" (search cut short)" if truncated else "")), *found])


_NO_WORDS = format_menu([info("Type one or more words to search for.")])


def _search_header(query: str) -> bytes:
    return info(f"Searching the text files for {_shown(query)!r}").to_bytes()


def loggable(line: bytes, limit: int = SUMMARY_BYTES) -> str:
    """A request line as the log shows it: quoted like repr(), every
    control or invisible character escaped (a selector cannot forge log
    lines or colour a terminal), at most ``limit`` bytes of it."""
    text = line[:limit].decode("utf-8", "backslashreplace")
    return repr(text) + ("..." if len(line) > limit else "")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _shown(query: str, limit: int = 60) -> str:
    """A query as it can be shown: undecodable bytes as U+FFFD, trimmed."""
    text = query.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text[:limit] + ("…" if len(text) > limit else "")


def _match(name: str, data: bytes, words: list[str], budget: int) -> tuple[str | None, int]:
    """Whether every word is in the file's text or its name, and the work
    that took (in characters scanned, see :class:`SearchLimits`).

    The first item is None when some word is missing (or the budget ran out
    before all were found), else the line of the earliest match (trimmed),
    or ``""`` when only the name matched.

    Linear in the text per word: it is decoded and case-folded once, each
    word is found with one ``str.find`` (C speed, stopping at the first
    occurrence), and the line to show comes from the positions found, not
    from a pass over the lines. A missing word ends the file at once.
    """
    # surrogateescape: a word with bytes that are not UTF-8 can still match
    # the same bytes in a Latin-1 file.
    text = data.decode("utf-8", "surrogateescape")
    folded = text.casefold()
    size = len(folded)
    work = 2 * len(data)
    name_folded = name.casefold()
    first = size
    for word in words:
        if work >= budget:
            return None, work
        pos = folded.find(word)
        if pos < 0:
            work += size
            if word not in name_folded:
                return None, work
            continue
        work += pos + len(word)
        first = min(first, pos)
    if first == size:
        return "", work
    # casefold() neither adds nor removes line feeds, so the folded text's
    # line number is the original's.
    number = folded.count("\n", 0, first)
    line = text.split("\n", number + 1)[number]
    work += first
    line = " ".join(line.split())
    return line[:70] + ("…" if len(line) > 70 else ""), work
