"""``gophermap`` files: a directory's hand-written menu.

The common subset of Bucktooth and Gophernicus (see docs/gopher.md):

* ``Tdisplay<TAB>selector<TAB>host<TAB>port`` - a full item line. Missing
  trailing fields are filled in: no selector means the display string
  names a file in this directory; no host means this server (and its
  port); a host without a port means port 70.
* A selector not starting with ``/`` (and not ``URL:``…) is relative to
  the gophermap's directory; one starting with ``/`` is from the root.
* A line without a TAB is an info line (``i``), shown as text.
* ``*`` alone: the automatic listing of the directory goes here.
* ``.`` alone: stop reading the file.
* ``#comment`` lines are skipped; ``!Title`` is shown as an info line;
  ``-name`` hides ``name`` from the automatic listing.
* An item line whose type is not one printable ASCII character is dropped;
  a port that is not a number from 1 to 65535 is left to its default.

Parsing is pure: it gives a list of entries, resolved by the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .items import decode_display, iter_lines

LISTING = "*"


@dataclass(frozen=True, slots=True)
class MapLine:
    """One meaningful gophermap line: an item (host/port ``None`` when they
    are to be filled in), an info line (type ``i``), or the listing marker
    (type ``*``)."""

    type: str
    display: str
    selector: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(slots=True)
class Gophermap:
    lines: list[MapLine] = field(default_factory=list)
    hidden: set[str] = field(default_factory=set)


def parse_gophermap(data: bytes) -> Gophermap:
    result = Gophermap()
    for raw in iter_lines(data):
        if b"\t" not in raw:
            text = decode_display(raw)
            if text == ".":
                break
            if text == LISTING:
                result.lines.append(MapLine(LISTING, ""))
            elif text.startswith("#"):
                continue
            elif text.startswith("!"):
                result.lines.append(MapLine("i", text[1:]))
            elif text.startswith("-") and len(text) > 1:
                result.hidden.add(text[1:])
            else:
                result.lines.append(MapLine("i", text))
            continue
        fields = raw.split(b"\t")
        head = fields[0]
        if head and not 0x21 <= head[0] <= 0x7E:
            continue  # not a type: a menu line's type is one printable ASCII byte
        type_ = chr(head[0]) if head else "i"
        display = decode_display(head[1:])
        selector = fields[1].decode("utf-8", "surrogateescape") if len(fields) > 1 else ""
        host = fields[2].decode("latin-1").strip() if len(fields) > 2 else ""
        port: int | None = None
        digits = fields[3].strip() if len(fields) > 3 else b""
        if digits.isdigit() and len(digits) <= 5 and 0 < int(digits) <= 65535:  # else default
            port = int(digits)
        if not selector and type_ != "i":
            selector = display  # the display string names a local file
        result.lines.append(MapLine(type_, display, selector, host or None, port))
    return result
