"""``sockworks gopher``: fetch, print, save and browse Gopher items."""

from __future__ import annotations

import argparse
import os
import posixpath
import sys
import time
from dataclasses import replace
from typing import Any, TextIO

from .._files import write_atomic
from ..gopher.client import GopherError, ServerError, download, error_message, fetch
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
# Responses of unknown type (the seed's HOST SELECTOR form, no known
# extension) are read into memory up to this size to decide what they are.
SNIFF_LIMIT = 64 << 20


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loc = parse_target(args.target, args.selector)
    if args.type:
        loc = replace(loc, type=args.type[:1])
    if args.search is not None:
        loc = replace(loc, query=args.search, type=loc.type or "7")
    timeout = args.timeout or None
    if args.browse:
        return Browser(sys.stdin, sys.stdout, timeout or 30.0).run(loc)
    try:
        return get(loc, args, timeout or 30.0)
    except GopherError as exc:
        return fail(str(exc), EXIT_ERROR)


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


def get(loc: Location, args: argparse.Namespace, timeout: float) -> int:
    kind = item_type(loc)
    if args.raw and args.output is None:
        write_out(fetch(loc, timeout=timeout))
        return EXIT_OK
    if kind is not None and kind not in SHOWN:
        return save(loc, args.output or default_name(loc), timeout)
    if args.output not in (None, "-") and kind not in ("0", "1", "7", None):
        return save(loc, args.output, timeout)
    data = fetch(loc, timeout=timeout, limit=SNIFF_LIMIT if kind is None else None)
    message = error_message(data)
    if message is not None:
        raise ServerError(f"server error: {message}")
    if kind is None:
        if looks_like_menu(data):
            kind = "1"
        elif looks_like_text(data[:4096]):
            kind = "0"
        else:
            kind = "9"
    if kind in ("1", "7"):
        text = render_menu(parse_menu(data)) if not args.raw else ""
        body = data if args.raw else text.encode()
    elif kind == "0":
        body = unstuff_text(data)
    else:
        body = data
    if args.output not in (None, "-"):
        write_atomic(args.output, body)
        return EXIT_OK
    if kind not in SHOWN and args.output is None and sys.stdout.isatty():
        return save_bytes(data, default_name(loc))
    write_out(body)
    return EXIT_OK


def save_bytes(data: bytes, name: str) -> int:
    write_atomic(name, data)
    sys.stderr.write(f"sockworks: saved {len(data)} bytes to {name}\n")
    return EXIT_OK


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


def save(loc: Location, name: str, timeout: float) -> int:
    if name == "-":
        write_out(fetch(loc, timeout=timeout))
        return EXIT_OK
    progress = Progress(sys.stderr, name) if sys.stderr.isatty() else None
    total = download(loc, name, timeout=timeout, progress=progress)
    if progress is not None:
        progress.finish()
    sys.stderr.write(f"sockworks: saved {total} bytes to {name}\n")
    return EXIT_OK


# -- menus for people -----------------------------------------------------------


def linkable(item: Item) -> bool:
    return item.type not in ("i", "3") and bool(item.type.strip())


def render_menu(items: list[Item]) -> str:
    """Numbered links with their kind; info lines as plain text."""
    lines: list[str] = []
    n = 0
    width = len(str(sum(1 for i in items if linkable(i)))) or 1
    pad = " " * (width + 2)
    for item in items:
        if item.type == "i":
            lines.append(f"{pad}{'':8} {item.display}".rstrip())
        elif item.type == "3":
            lines.append(f"{pad}{'[error]':8} {item.display}")
        else:
            n += 1
            where = ""
            if item.type == "h" and item.selector.startswith("URL:"):
                where = f"  <{item.selector[4:]}>"
            label = f"[{item.kind}]"
            lines.append(f"{n:>{width}}. {label:8} {item.display}{where}")
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

    def __init__(self, inp: TextIO, out: TextIO, timeout: float) -> None:
        self.inp = inp
        self.out = out
        self.timeout = timeout
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
        data = fetch(loc, timeout=self.timeout)
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
                data = fetch(loc, timeout=self.timeout)
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
