"""Gopher items and menus (RFC 1436): the item-type table, menu lines in
both directions, and the text-file transformations (dot-stuffing).

Pure functions on bytes and strings: no sockets, no files, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

CRLF = b"\r\n"
TERMINATOR = b".\r\n"

# Host and port written into lines that are not links (info and error
# lines): the convention of Gophernicus and Bucktooth, which every client
# shows as plain text.
NULL_HOST = "null.host"
NULL_PORT = 1

#: The item types sockworks knows, with the word the client shows.
KINDS: dict[str, str] = {
    "0": "text",
    "1": "menu",
    "2": "cso",
    "3": "error",
    "4": "binhex",
    "5": "archive",
    "6": "uuencoded",
    "7": "search",
    "8": "telnet",
    "9": "binary",
    "+": "mirror",
    "g": "gif",
    "I": "image",
    "T": "tn3270",
    "h": "html",
    "i": "info",
    "s": "sound",
    ";": "video",
    "d": "document",
    "M": "mime",
    "c": "calendar",
    "p": "png",
    "r": "rtf",
    "P": "pdf",
    "X": "xml",
}


def _each(extensions: str, kind: str) -> dict[str, str]:
    return dict.fromkeys(extensions.split(), kind)


#: Item types by file extension (lower case). Anything else is sniffed:
#: see :func:`guess_type`. Documented in docs/gopher.md.
EXTENSION_TYPES: dict[str, str] = {
    **_each(".txt .text .md .markdown .rst .asc .csv .tsv .log .conf .cfg .ini .toml .yaml .yml "
        ".json .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .sh .bash .pl .rb .lua "
        ".sql .diff .patch .tex .org .adoc .nfo .me .1 .gmi .xml", "0"),
    **_each(".html .htm .xhtml", "h"),
    ".gif": "g",
    **_each(".jpg .jpeg .png .bmp .webp .tif .tiff .ico .svg .pcx .ppm", "I"),
    **_each(".wav .mp3 .ogg .oga .flac .au .aiff .aif .m4a .opus .mid .midi", "s"),
    **_each(".mp4 .mkv .avi .webm .mov .mpg .mpeg .ogv", ";"),
    **_each(".pdf .ps .eps .doc .docx .odt .rtf .epub .djvu", "d"),
    **_each(".zip .gz .tgz .bz2 .xz .7z .zst .tar .rar .lz .lzma .z .arj .lha", "5"),
    ".hqx": "4",
    **_each(".uue .uu", "6"),
    **_each(".mbox .eml", "M"),
    **_each(".ics .ical", "c"),
}

# Magic numbers for files whose extension says nothing.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF8", "g"),
    (b"\x89PNG\r\n\x1a\n", "I"),
    (b"\xff\xd8\xff", "I"),
    (b"%PDF-", "d"),
    (b"PK\x03\x04", "5"),
    (b"\x1f\x8b", "5"),
    (b"BZh", "5"),
    (b"\xfd7zXZ\x00", "5"),
    (b"7z\xbc\xaf\x27\x1c", "5"),
    (b"\x7fELF", "9"),
    (b"<!DOCTYPE html", "h"),
    (b"<!doctype html", "h"),
    (b"<html", "h"),
)

#: Types served as text: dot-stuffed, CRLF line ends, ``.`` terminator.
TEXT_TYPES = frozenset("0")


def extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def looks_like_text(head: bytes) -> bool:
    """True when ``head`` (the start of a file) is text: no NUL, and UTF-8,
    or Latin-1 made mostly of printable characters."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError as exc:
        if exc.start >= len(head) - 3:  # a character cut by the sample's end
            return True
    printable = sum(1 for b in head if b >= 0x20 or b in b"\t\r\n\f")
    return printable >= 0.95 * len(head)


def guess_type(name: str, head: bytes | None = None) -> str:
    """The item type of a regular file: by extension, else by its first
    bytes (``head``): magic numbers, then text or binary. A file with no
    known extension and no sample is binary (``9``)."""
    by_ext = EXTENSION_TYPES.get(extension(name))
    if by_ext is not None:
        return by_ext
    if head is None:
        return "9"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return "0" if looks_like_text(head) else "9"


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def sanitize(text: str) -> str:
    """A display string that cannot break a menu line: TAB, CR, LF and
    other control characters become spaces."""
    return _UNSAFE.sub(" ", text)


def selector_is_safe(selector: str) -> bool:
    """A selector may go into a menu line: no TAB, CR, LF or NUL."""
    return not any(c in selector for c in "\t\r\n\x00")


def encode(text: str) -> bytes:
    """Text to bytes for the wire: UTF-8, file names' undecodable bytes
    (surrogate escapes) restored as they were."""
    return text.encode("utf-8", "surrogateescape")


class Item(NamedTuple):
    """One menu line: type, display string, selector, host, port.

    ``extra`` holds fields after the port (a Gopher+ ``+`` is one). A named
    tuple: a 10,000-entry listing makes 10,000 of them.
    """

    type: str
    display: str
    selector: str = ""
    host: str = NULL_HOST
    port: int = NULL_PORT
    extra: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return KINDS.get(self.type, f"type {self.type}")

    @property
    def is_info(self) -> bool:
        return self.type == "i"

    @property
    def gopher_plus(self) -> bool:
        return bool(self.extra) and self.extra[0].startswith(("+", "?"))

    def to_bytes(self) -> bytes:
        """The menu line, CRLF included; display sanitised, selector and
        host must already be safe (see :func:`selector_is_safe`)."""
        line = (
            f"{self.type}{sanitize(self.display)}\t{self.selector}\t{self.host}\t{self.port}"
        )
        if self.extra:
            line += "\t" + "\t".join(self.extra)
        return encode(line) + CRLF


def info(text: str) -> Item:
    return Item("i", text, "", NULL_HOST, NULL_PORT)


def format_menu(items: Iterable[Item]) -> bytes:
    """Menu lines followed by the ``.`` terminator (the same lines as
    :meth:`Item.to_bytes`, built in one piece: menus can be 10,000 lines)."""
    lines: list[str] = []
    for item in items:
        display = item.display
        if not display.isprintable():  # C-speed test; the regex only when needed
            display = sanitize(display)
        line = f"{item.type}{display}\t{item.selector}\t{item.host}\t{item.port}"
        if item.extra:
            line += "\t" + "\t".join(item.extra)
        lines.append(line)
    if not lines:
        return TERMINATOR
    return encode("\r\n".join(lines)) + CRLF + TERMINATOR


def error_menu(message: str) -> bytes:
    """A type-3 error, as a one-line menu (what every client understands)."""
    return format_menu([Item("3", message, "", NULL_HOST, NULL_PORT)])


# -- menus, client side ------------------------------------------------------


def decode_display(raw: bytes) -> str:
    """A display string for people: UTF-8, else Latin-1 (old holes)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_menu_line(line: bytes) -> Item | None:
    """One menu line (without its line end), or None for an empty line.

    Lenient like real clients: missing fields are empty, a bad port is 0, a
    line without TAB is taken as an info line with its whole text.
    Selectors keep their exact bytes (surrogate escapes), so that asking
    for one sends back what the server sent.
    """
    if not line:
        return None
    if b"\t" not in line:
        text = line[1:] if line[:1] == b"i" else line
        return Item("i", decode_display(text), "", "", 0)
    fields = line.split(b"\t")
    # bytes index: an int, never fails on Latin-1; no type at all: info.
    type_ = chr(fields[0][0]) if fields[0] else "i"
    display = decode_display(fields[0][1:])
    selector = fields[1].decode("utf-8", "surrogateescape") if len(fields) > 1 else ""
    host = fields[2].decode("latin-1").strip() if len(fields) > 2 else ""
    port = 0
    if len(fields) > 3:
        digits = fields[3].strip()
        port = int(digits) if digits.isdigit() and len(digits) <= 5 else 0
    extra = tuple(f.decode("latin-1") for f in fields[4:])
    return Item(type_, display, selector, host, port, extra)


def iter_lines(data: bytes) -> Iterator[bytes]:
    """Lines of ``data`` without their CRLF or LF; a last line without an
    end is included."""
    start = 0
    n = len(data)
    while start < n:
        nl = data.find(b"\n", start)
        if nl < 0:
            yield data[start:]
            return
        end = nl - 1 if nl > start and data[nl - 1] == 0x0D else nl
        yield data[start:end]
        start = nl + 1


def parse_menu(data: bytes) -> list[Item]:
    """The items of a menu, stopping at the ``.`` line if there is one."""
    items: list[Item] = []
    for line in iter_lines(data):
        if line == b".":
            break
        item = parse_menu_line(line)
        if item is not None:
            items.append(item)
    return items


def looks_like_menu(data: bytes) -> bool:
    """A guess for responses of unknown type: every non-empty line before
    the terminator has at least three TABs and a known-looking type."""
    lines = [line for line in iter_lines(data[:65536]) if line and line != b"."]
    if not lines:
        return False
    good = sum(
        1 for line in lines if line.count(b"\t") >= 3 and chr(line[0]) in KINDS
    )
    return good >= max(1, int(0.9 * len(lines)))


# -- text files ---------------------------------------------------------------


class DotStuffer:
    """Turns a text file, fed in chunks of any size, into the RFC 1436 text
    form: lines end in CRLF, a line starting with ``.`` gets another ``.``
    (so that no line is the terminator), and :meth:`finish` adds ``.`` CRLF.
    """

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        return _stuff_lines(data[:cut]) if cut else b""

    def finish(self) -> bytes:
        rest, self._carry = self._carry, b""
        out = _stuff_lines(rest + b"\n") if rest else b""
        return out + TERMINATOR


def _stuff_lines(data: bytes) -> bytes:
    # data ends with LF. Normalise CRLF and LF to CRLF, then double leading dots.
    body = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..")


def stuff_text(data: bytes) -> bytes:
    """A whole text file in RFC 1436 text form (see :class:`DotStuffer`)."""
    s = DotStuffer()
    return s.feed(data) + s.finish()


def unstuff_text(data: bytes) -> bytes:
    """What a client does with a text item: stop at the ``.`` line, undo
    dot-stuffing; line ends become LF. Without a terminator, all of it."""
    out: list[bytes] = []
    for line in iter_lines(data):
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b"..") else line)
    return b"".join(line + b"\n" for line in out)
