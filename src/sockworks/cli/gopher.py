"""``sockworks gopher``: fetch, print, save and browse Gopher items."""

from __future__ import annotations

import argparse
import contextlib
import os
import posixpath
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TextIO

from .._files import atomic_writer, write_atomic
from ..gopher.client import (
    GopherError,
    MenuReader,
    ServerError,
    TextDecoder,
    TooLarge,
    download,
    error_message,
    fetch,
    stream,
)
from ..gopher.items import (
    Item,
    guess_type,
    looks_like_menu,
    looks_like_text,
    parse_menu,
    unstuff_text,
)
from ..gopher.url import Location, parse_target, parse_url
from ._common import EXIT_ERROR, EXIT_OK, fail, seconds

# Item types shown on the terminal; everything else is saved to a file.
SHOWN = frozenset("017h")
# Bytes looked at to tell what an answer of unknown type is (the seed's
# HOST SELECTOR form, no known extension), and to find a type-3 error.
SNIFF = 4096
# The default --max-size for what is shown (menus, text, answers of unknown
# type): far beyond any real menu (10,000 entries are ~0.5 MiB) or text,
# and a stop for a server that never ends (chargen). Downloads of binaries
# have no default limit: a disk image may be gigabytes.
SHOWN_LIMIT = 64 << 20
# Ctrl-C: the shell's status for a process ended by SIGINT.
EXIT_INTERRUPTED = 130
_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b?)", re.IGNORECASE)


def size(text: str) -> int:
    """``--max-size``: bytes, or with K, M, G (KiB, MiB, GiB); 0 is no limit."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (bytes, or a number with K, M or G)")
    unit = {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    return int(match.group(1)) << unit


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gopher", help="a Gopher client: fetch, save and browse",
        description="Fetch a Gopher item: menus are shown numbered, text printed, binaries "
        "saved. URL-or-HOST is a gopher:// URL (RFC 4266, %09 before a search query) or a HOST "
        "(HOST:PORT), optionally followed by a SELECTOR as in seed 004's client; "
        "a host alone fetches its root menu.",
    )
    p.add_argument("target", metavar="URL-or-HOST")
    p.add_argument("selector", metavar="SELECTOR", nargs="?")
    p.add_argument("--raw", action="store_true", help="print the bytes as they came")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="save the item to FILE (- for stdout); binaries default to the "
                   "selector's file name")
    p.add_argument("--search", metavar="QUERY", help="send QUERY to a type-7 search item")
    p.add_argument("--type", metavar="T", help="the item type, when the target does not say")
    p.add_argument("--browse", action="store_true",
                   help="interactive browser: a number follows, b back, u up, / search, "
                   "s save, h history, q quit")
    p.add_argument("--timeout", type=seconds, default=30.0, metavar="SECONDS",
                   help="longest wait for the server at any point (default 30)")
    p.add_argument("--max-size", type=size, metavar="BYTES",
                   help="stop (status 1) when an answer is larger: bytes, or with K, M, G; "
                   "0 for no limit (default: 64M for menus and text, none for downloads)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loc = parse_target(args.target, args.selector)
    if args.type:
        loc = replace(loc, type=args.type[:1])
    if args.search is not None:
        loc = replace(loc, query=args.search, type=loc.type or "7")
    timeout = args.timeout or None
    try:
        if args.browse:
            limit = SHOWN_LIMIT if args.max_size is None else args.max_size or None
            return Browser(sys.stdin, sys.stdout, timeout or 30.0, limit).run(loc)
        return get(loc, args, timeout or 30.0)
    except TooLarge as exc:
        return fail(f"{exc} (--max-size {human(exc.limit)})", EXIT_ERROR)
    except GopherError as exc:
        return fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        # A download's temporary file is gone already (atomic_writer).
        return fail("interrupted; nothing was saved" if saving(loc, args) else "interrupted",
                    EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (| head -1): not an error of ours. Output
        # from here on goes nowhere, so the flush at exit does not complain.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def saving(loc: Location, args: argparse.Namespace) -> bool:
    """Whether this command writes a file (what Ctrl-C leaves unsaved)."""
    if args.output is not None:
        return bool(args.output != "-")
    kind = item_type(loc)
    return kind is not None and kind not in SHOWN


# -- one item -----------------------------------------------------------------


def item_type(loc: Location) -> str | None:
    """The type of ``loc``: given, or by the selector's extension."""
    if loc.type is not None:
        return loc.type
    name = posixpath.basename(loc.selector.rstrip("/"))
    if not name or loc.selector.endswith("/"):
        return "1"
    kind = guess_type(name)
    return None if kind == "9" else kind


def default_name(loc: Location) -> str:
    name = posixpath.basename(loc.selector.rstrip("/").split("?")[0])
    name = name.replace("\\", "_").lstrip(".")
    return name or "gopher.out"


def write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def limit_for(args: argparse.Namespace, kind: str | None) -> int | None:
    """The size limit: --max-size (0: none), else SHOWN_LIMIT for what is
    shown (menus, text, unknown) and none for downloads."""
    if args.max_size is not None:
        return int(args.max_size) or None
    return SHOWN_LIMIT if kind is None or kind in SHOWN else None


def get(loc: Location, args: argparse.Namespace, timeout: float) -> int:
    kind = item_type(loc)
    limit = limit_for(args, kind)
    if args.raw and args.output is None:
        stream(loc, write_out, timeout=timeout, limit=limit)
        return EXIT_OK
    if kind is not None and kind not in SHOWN:
        return save(loc, args.output or default_name(loc), timeout, limit)
    if args.output not in (None, "-") and kind not in ("0", "1", "7", None):
        return save(loc, args.output, timeout, limit)
    with contextlib.ExitStack() as files:
        if args.output not in (None, "-"):
            out: Callable[[bytes], object] = files.enter_context(atomic_writer(args.output)).write
            binary = None
        else:
            out = write_out
            # A binary (found by sniffing) is not sent to a terminal: it
            # goes to a file named after the selector, as a download would.
            binary = (lambda: files.enter_context(atomic_writer(default_name(loc))).write) \
                if sys.stdout.isatty() else None
        display = Display(kind, args.raw, out, binary)
        stream(loc, display.feed, timeout=timeout, limit=limit)
        display.finish()
    if display.saved:
        sys.stderr.write(f"sockworks: saved {display.total} bytes to {default_name(loc)}\n")
    return EXIT_OK


class Display:
    """An answer, fed in chunks as they arrive, written out as it is shown:
    once the first line has shown it is not a type-3 error (and, type
    unknown, SNIFF bytes what it is), menus are rendered and text unstuffed
    line by line as they come. At most SNIFF bytes and a partial line are
    held. ``feed`` returns True once a menu or text has ended (its ``.``
    line), so the client stops reading."""

    def __init__(self, kind: str | None, raw: bool, out: Callable[[bytes], object],
                 binary: Callable[[], Callable[[bytes], object]] | None = None) -> None:
        self.kind = kind
        self.raw = raw
        self.out = out
        self.binary = binary
        self.head = b""
        self.started = False
        self.menu: MenuReader | None = None
        self.text: TextDecoder | None = None
        self.numbered = 0
        self.total = 0
        self.saved = False  # a sniffed binary went to a file

    def _ready(self) -> bool:
        head = self.head
        if len(head) >= SNIFF:
            return True
        if self.kind is None or not head:
            return False
        return head[:1] != b"3" or b"\n" in head

    def _start(self) -> None:
        self.started = True
        head, self.head = self.head, b""
        message = error_message(head)
        if message is not None:
            raise ServerError(f"server error: {message}")
        if self.kind is None:
            if looks_like_menu(head):
                self.kind = "1"
            elif looks_like_text(head):
                self.kind = "0"
            else:
                self.kind = "9"
                if self.binary is not None:
                    self.out = self.binary()
                    self.saved = True
        if not self.raw and self.kind in ("1", "7"):
            self.menu = MenuReader()
        elif not self.raw and self.kind == "0":
            self.text = TextDecoder()
        self.feed(head)

    def feed(self, chunk: bytes) -> bool:
        if not self.started:
            self.head += chunk
            if self._ready():
                self._start()
            return self.done
        self.total += len(chunk)
        if self.menu is not None:
            self._show(self.menu.feed(chunk))
        elif self.text is not None:
            self.out(self.text.feed(chunk))
        else:
            self.out(chunk)
        return self.done

    @property
    def done(self) -> bool:
        reader = self.menu or self.text
        return reader is not None and reader.done

    def finish(self) -> None:
        if not self.started:
            self._start()
        if self.menu is not None:
            self._show(self.menu.finish())
        elif self.text is not None:
            self.out(self.text.finish())

    def _show(self, items: list[Item]) -> None:
        if not items:
            return
        lines: list[str] = []
        for item in items:
            if linkable(item):
                self.numbered += 1
            lines.append(menu_line(item, self.numbered, STREAM_WIDTH))
        self.out(("\n".join(lines) + "\n").encode())


class Progress:
    """Bytes so far and the rate, redrawn on one terminal line (Gopher sends
    no length, so there is no percentage)."""

    def __init__(self, out: TextIO, name: str) -> None:
        self.out = out
        self.name = name
        self.total = 0
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.total += n
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.last = now
            self.draw(now)

    def draw(self, now: float) -> None:
        rate = self.total / max(now - self.start, 1e-6)
        bar = "#" * min(30, int(self.total.bit_length()))
        self.out.write(f"\r{self.name[:30]:<30} [{bar:<30}] {human(self.total)} "
                       f"{human(rate)}/s  ")
        self.out.flush()

    def finish(self) -> None:
        self.draw(time.monotonic())
        self.out.write("\n")
        self.out.flush()


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def save(loc: Location, name: str, timeout: float, limit: int | None = None) -> int:
    if name == "-":
        stream(loc, write_out, timeout=timeout, limit=limit)
        return EXIT_OK
    progress = Progress(sys.stderr, name) if sys.stderr.isatty() else None
    try:
        total = download(loc, name, timeout=timeout, progress=progress, limit=limit)
    finally:
        if progress is not None:  # off the progress line, whatever happened
            progress.finish()
    sys.stderr.write(f"sockworks: saved {total} bytes to {name}\n")
    return EXIT_OK


# -- menus for people -----------------------------------------------------------


def linkable(item: Item) -> bool:
    return item.type not in ("i", "3") and bool(item.type.strip())


# The number column of a menu shown as it arrives (its length unknown):
# aligned up to 999 links.
STREAM_WIDTH = 3


def menu_line(item: Item, n: int, width: int) -> str:
    """One menu line for people; ``n`` is the link's number (links only)."""
    pad = " " * (width + 2)
    if item.type == "i":
        return f"{pad}{'':8} {item.display}".rstrip()
    if item.type == "3":
        return f"{pad}{'[error]':8} {item.display}"
    where = ""
    if item.type == "h" and item.selector.startswith("URL:"):
        where = f"  <{item.selector[4:]}>"
    label = f"[{item.kind}]"
    return f"{n:>{width}}. {label:8} {item.display}{where}"


def render_menu(items: list[Item]) -> str:
    """Numbered links with their kind; info lines as plain text."""
    lines: list[str] = []
    n = 0
    width = len(str(sum(1 for i in items if linkable(i)))) or 1
    for item in items:
        if linkable(item):
            n += 1
        lines.append(menu_line(item, n, width))
    return "\n".join(lines) + "\n"


def location_of(item: Item) -> Location:
    return Location(item.host, item.port or 70, item.selector, item.type)


# -- the browser ----------------------------------------------------------------

HELP = """\
  NUMBER   follow that item          b   back          u   up one level
  / WORDS  search (this item or the first search item on the page)
  s [N] [FILE]  save item N (or this page) to FILE
  g URL    go to a gopher:// URL     r   reload        h   history
  q        quit"""


class Browser:
    """An interactive loop over stdin/stdout; errors are shown, not fatal."""

    def __init__(self, inp: TextIO, out: TextIO, timeout: float,
                 limit: int | None = SHOWN_LIMIT) -> None:
        self.inp = inp
        self.out = out
        self.timeout = timeout
        self.limit = limit  # a page is held whole (to save it, to go back): bounded
        self.history: list[Location] = []
        self.items: list[Item] = []
        self.data = b""

    def say(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()

    def ask(self, prompt: str) -> str | None:
        self.out.write(prompt)
        self.out.flush()
        line = self.inp.readline()
        if not line:
            return None
        return line.strip()

    @property
    def here(self) -> Location | None:
        return self.history[-1] if self.history else None

    def run(self, start: Location) -> int:
        self.visit(start)
        while True:
            command = self.ask("gopher> ")
            if command is None or command in ("q", "quit", "exit"):
                return EXIT_OK
            try:
                self.do(command)
            except GopherError as exc:
                self.say(f"error: {exc}")
            except OSError as exc:
                self.say(f"error: {exc.strerror or exc}")

    def do(self, command: str) -> None:
        if not command:
            return
        head, _, rest = command.partition(" ")
        rest = rest.strip()
        if command.isdigit():
            self.follow(int(command))
        elif head == "b":
            if len(self.history) < 2:
                self.say("(no page to go back to)")
                return
            self.history.pop()
            self.show(self.history.pop())
        elif head == "u":
            self.up()
        elif head.startswith("/"):
            self.search((head[1:] + " " + rest).strip())
        elif head == "s":
            self.save(rest)
        elif head == "g" and rest:
            self.visit(parse_url(rest) if "://" in rest else parse_target(rest))
        elif head == "r" and self.here is not None:
            self.show(self.history.pop())
        elif head == "h":
            for n, loc in enumerate(self.history, 1):
                self.say(f"{n:>3}. {loc.url()}")
        elif head in ("?", "help"):
            self.say(HELP)
        else:
            self.say("unknown command; ? for help")

    def links(self) -> list[Item]:
        return [i for i in self.items if linkable(i)]

    def follow(self, n: int) -> None:
        links = self.links()
        if not 1 <= n <= len(links):
            self.say(f"no item {n} here")
            return
        item = links[n - 1]
        if item.type in ("8", "T", "2"):
            self.say(f"(a {item.kind} session to {item.host}:{item.port}; not browsable here)")
            return
        if item.type == "h" and item.selector.startswith("URL:"):
            self.say(f"(a web link: {item.selector[4:]})")
            return
        loc = location_of(item)
        if item.type == "7":
            query = self.ask(f"search {item.display!r} for: ")
            if not query:
                return
            loc = replace(loc, query=query)
        self.visit(loc)

    def visit(self, loc: Location) -> None:
        kind = item_type(loc)
        if kind is not None and kind not in SHOWN:
            name = default_name(loc)
            download(loc, name, timeout=self.timeout)
            self.say(f"saved to {name}")
            return
        if kind == "7" and loc.query is None:
            query = self.ask("search for: ")
            if not query:
                return
            loc = replace(loc, query=query)
        self.show(loc)

    def show(self, loc: Location) -> None:
        data = fetch(loc, timeout=self.timeout, limit=self.limit)
        message = error_message(data)
        if message is not None:
            raise ServerError(f"server error: {message}")
        kind = item_type(loc)
        if kind is None:
            kind = "1" if looks_like_menu(data) else "0"
            loc = replace(loc, type=kind)
        self.history.append(loc)
        self.data = data
        self.say(f"--- {loc.url()}")
        if kind in ("1", "7"):
            self.items = parse_menu(data)
            self.say(render_menu(self.items))
        else:
            self.items = []
            self.say(unstuff_text(data).decode("utf-8", "replace"))

    def up(self) -> None:
        here = self.here
        if here is None:
            return
        parent = posixpath.dirname(here.selector.rstrip("/"))
        if parent in ("", "/") and here.selector in ("", "/"):
            self.say("(already at the top)")
            return
        self.visit(replace(here, selector="" if parent == "/" else parent, type="1", query=None))

    def search(self, query: str) -> None:
        here = self.here
        if here is None:
            return
        if here.type == "7":
            target = here
        else:
            found = [i for i in self.items if i.type == "7"]
            if not found:
                self.say("(no search item on this page)")
                return
            target = location_of(found[0])
        if not query:
            query = self.ask("search for: ") or ""
            if not query:
                return
        self.show(replace(target, query=query))

    def save(self, rest: str) -> None:
        words = rest.split(maxsplit=1)
        if words and words[0].isdigit():
            links = self.links()
            n = int(words[0])
            if not 1 <= n <= len(links):
                self.say(f"no item {n} here")
                return
            loc = location_of(links[n - 1])
            name = words[1] if len(words) > 1 else default_name(loc)
            if loc.type in ("0", "1", "7"):
                data = fetch(loc, timeout=self.timeout, limit=self.limit)
                message = error_message(data)
                if message is not None:
                    raise ServerError(f"server error: {message}")
                write_atomic(name, unstuff_text(data) if loc.type == "0" else data)
            else:
                download(loc, name, timeout=self.timeout)
            self.say(f"saved to {name}")
            return
        if self.here is None:
            return
        name = rest or default_name(self.here)
        data = self.data if self.here.type in ("1", "7") else unstuff_text(self.data)
        write_atomic(name, data)
        self.say(f"saved to {os.path.abspath(name)}")
