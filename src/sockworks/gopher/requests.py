"""Gopher requests, server side: the request line and selector validation.

A selector names a path under the served root, ``/`` separated. Validation
happens here, before any file system access, and again in the root object
(which resolves symlinks): defence in depth for the one promise that
matters most, never a byte from outside the root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .._errors import RemoteProtocolError


class BadRequest(RemoteProtocolError):
    """A request the server refuses; ``reason`` goes into a type-3 line."""


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request line.

    ``query`` is the search string (after TAB, or after ``?``), ``plus`` the
    Gopher+ marker a Gopher+ client sends after TAB (``+``, ``!``, ``$``),
    which a Gopher0 server answers as if it were absent.
    """

    selector: str
    query: str | None = None
    plus: str | None = None


def parse_request(line: bytes) -> Request:
    """A request line (without CRLF) to a :class:`Request`.

    Raises :class:`BadRequest` for a NUL or a line that does not decode.
    ``selector?query`` is split only by :meth:`split_query`, because a
    file name may contain ``?``.
    """
    if b"\x00" in line:
        raise BadRequest("NUL in request")
    fields = line.split(b"\t")
    try:
        text = [f.decode("utf-8", "surrogateescape") for f in fields]
    except UnicodeDecodeError:  # pragma: no cover - surrogateescape never fails
        raise BadRequest("request does not decode") from None
    selector = text[0]
    query: str | None = None
    plus: str | None = None
    rest = text[1:]
    if rest and rest[0][:1] in ("+", "!", "$") and len(rest[0]) <= 2:
        plus, rest = rest[0], rest[1:]
    elif rest:
        query = rest[0]
        if len(rest) > 1 and rest[1][:1] in ("+", "!", "$"):
            plus = rest[1]
    return Request(selector, query, plus)


def split_query(selector: str) -> tuple[str, str | None]:
    """``path?query`` to ``(path, query)``."""
    path, sep, query = selector.partition("?")
    return (path, query) if sep else (selector, None)


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # C0 controls and DEL


def _decoded_forms(selector: str) -> list[str]:
    """The selector and what it becomes after percent-decoding, up to four
    times over (``%252e`` hides ``%2e`` hides ``.``)."""
    forms = [selector]
    current = selector
    for _ in range(4):
        if not _PERCENT.search(current):
            break
        # Back to the client's bytes first: a selector that was not UTF-8
        # holds surrogate escapes, which a plain UTF-8 encode refuses.
        raw = current.encode("utf-8", "surrogateescape")
        current = unquote_to_bytes(raw).decode("utf-8", "surrogateescape")
        forms.append(current)
    return forms


def selector_parts(selector: str) -> tuple[str, ...]:
    """The path components a selector names, relative to the root.

    ``""`` and ``"/"`` name the root. Refused with :class:`BadRequest`: control characters (NUL,
    TAB, CR, LF…), backslashes, ``.`` and ``..`` components and hidden
    names (also when percent-encoded, at any depth of encoding), Windows
    drive letters, ``~`` home directories, and empty components in the
    middle (``//etc``) which some servers read as absolute paths.
    """
    for form in _decoded_forms(selector):
        if _CONTROL.search(form):
            raise BadRequest("control character in selector")
        if "\\" in form:
            raise BadRequest("backslash in selector")
        if _WINDOWS_DRIVE.match(form) or form.startswith("~") or "/~" in form:
            raise BadRequest("not a selector on this server")
        if form.startswith("//") or "//" in form.rstrip("/"):
            raise BadRequest("empty path component")
        for part in form.split("/"):
            if part.startswith("."):
                raise BadRequest("hidden or relative path component")
    return tuple(p for p in selector.split("/") if p)


def join_selector(parts: tuple[str, ...]) -> str:
    """The selector for a path under the root: ``/a/b``, ``/`` for the root."""
    return "/" + "/".join(parts)
