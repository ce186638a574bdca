"""A blocking Gopher client: send a selector, read until the server closes.

Errors a person can meet (host not found, refused, timed out, an error
item from the server, an answer over the size limit) are
:class:`GopherError` with a one-line message.

Answers are streamed: :func:`stream` hands each chunk on as it arrives,
and :class:`TextDecoder` / :class:`MenuReader` turn text and menus into
output line by line, holding at most one partial line, so memory does not
grow with the answer and the first line shows before the last arrives.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .._errors import SockworksError
from .._files import atomic_writer
from .items import Item, encode, parse_menu, parse_menu_line
from .url import Location

DEFAULT_TIMEOUT = 30.0
CHUNK = 256 * 1024


class GopherError(SockworksError):
    """A failed request; ``str()`` is one line for a person."""


class ServerError(GopherError):
    """The server answered with a type-3 error item."""


class TooLarge(GopherError):
    """The answer went over the size limit; what came before it was passed on."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


def _where(loc: Location) -> str:
    host = f"[{loc.host}]" if ":" in loc.host else loc.host
    return f"{host}:{loc.port}"


def request_line(loc: Location) -> bytes:
    line = encode(loc.selector)
    if loc.query is not None:
        line += b"\t" + encode(loc.query)
    return line + b"\r\n"


def connect(loc: Location, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    try:
        return socket.create_connection((loc.host, loc.port), timeout=timeout)
    except socket.gaierror:
        raise GopherError(f"host not found: {loc.host}") from None
    except ConnectionRefusedError:
        raise GopherError(f"connection refused by {_where(loc)}") from None
    except TimeoutError:
        raise GopherError(f"timed out after {timeout:g} s connecting to {_where(loc)}") from None
    except OSError as exc:
        raise GopherError(f"cannot reach {_where(loc)}: {exc.strerror or exc}") from None


def stream(
    loc: Location,
    sink: Callable[[bytes], object],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int | None = None,
) -> int:
    """Send the request for ``loc``; pass every chunk of the answer to
    ``sink`` until the server closes, or ``sink`` returns True (it has all
    it wants). Returns the byte count. ``timeout`` bounds each wait for the
    server, not the whole transfer. More than ``limit`` bytes raises
    :class:`TooLarge` after the first ``limit`` were passed on."""
    total = 0
    with connect(loc, timeout) as sock:
        try:
            sock.sendall(request_line(loc))
            while True:
                chunk = sock.recv(CHUNK)
                if not chunk:
                    break
                if limit is not None and total + len(chunk) > limit:
                    sink(chunk[: limit - total])
                    raise TooLarge(
                        f"stopped after {limit} bytes: the answer from {_where(loc)} is "
                        "larger than the size limit", limit)
                total += len(chunk)
                if sink(chunk) is True:
                    break
        except TimeoutError:
            raise GopherError(
                f"timed out after {timeout:g} s waiting for {_where(loc)}"
            ) from None
        except ConnectionResetError:
            raise GopherError(f"connection reset by {_where(loc)}") from None
        except OSError as exc:
            if isinstance(exc, GopherError):
                raise
            raise GopherError(f"error talking to {_where(loc)}: {exc.strerror or exc}") from None
    return total


def fetch(loc: Location, *, timeout: float = DEFAULT_TIMEOUT, limit: int | None = None) -> bytes:
    """The whole answer for ``loc``."""
    parts: list[bytes] = []
    stream(loc, parts.append, timeout=timeout, limit=limit)
    return b"".join(parts)


def error_message(data: bytes) -> str | None:
    """The message when ``data`` is a type-3 error answer, else None."""
    if not data.startswith(b"3"):
        return None
    items = parse_menu(data[:4096])
    if items and items[0].type == "3":
        return items[0].display.strip() or "error"
    return None


def download(
    loc: Location,
    destination: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> int:
    """Save the answer for ``loc`` to ``destination``, atomically: the data
    goes to a temporary file beside it, renamed into place only when the
    transfer is complete. A broken transfer leaves nothing under the final
    name. A type-3 answer raises :class:`ServerError` and saves nothing."""
    with atomic_writer(destination) as out:
        first = True

        def sink(chunk: bytes) -> None:
            nonlocal first
            if first:
                first = False
                message = error_message(chunk)
                if message is not None:
                    raise ServerError(f"server error: {message}")
            out.write(chunk)
            if progress is not None:
                progress(len(chunk))

        return stream(loc, sink, timeout=timeout, limit=limit)


# A line longer than this is passed on in pieces (text) or cut (menus):
# a server that never sends a line end cannot make the client hold it all.
LONG_LINE = 64 * 1024


class TextDecoder:
    """What a client does with a text item, fed in chunks of any size:
    stop at the ``.`` line, undo dot-stuffing, CRLF to LF (the streaming
    form of :func:`~sockworks.gopher.items.unstuff_text`). ``done`` is set
    once the terminator has been seen; later bytes are ignored."""

    def __init__(self) -> None:
        self._carry = b""
        self._mid = False  # the carry is the rest of a line already passed on
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        data = self._carry + chunk
        cut = data.rfind(b"\n") + 1
        out = self._lines(data[:cut]) if cut else b""
        rest = b"" if self.done else data[cut:]
        if len(rest) > LONG_LINE:  # keep a CR that may start a CRLF
            keep = 1 if rest.endswith(b"\r") else 0
            head = rest[: len(rest) - keep]
            if not self._mid and head.startswith(b".."):
                head = head[1:]
            out += head
            rest = rest[len(rest) - keep:]
            self._mid = True
        self._carry = rest
        return out

    def finish(self) -> bytes:
        """The last line, when the answer ended without a terminator."""
        if self.done or not self._carry:
            return b""
        return self._lines(self._carry + b"\n")

    def _lines(self, body: bytes) -> bytes:
        # body is whole lines (it ends with LF), starting at a line start
        # unless _mid says the first one was begun in an earlier chunk.
        body = body.replace(b"\r\n", b"\n")
        first = b""
        if self._mid:
            nl = body.find(b"\n") + 1
            first, body = body[:nl], body[nl:]
            self._mid = False
        text = b"\n" + body
        end = text.find(b"\n.\n")
        if end >= 0:
            text = text[: end + 1]
            self.done = True
        return first + text.replace(b"\n..", b"\n.")[1:]


class MenuReader:
    """Menu lines fed in chunks of any size, out as :class:`Item` objects as
    soon as each line is complete, up to the ``.`` line (then ``done``)."""

    def __init__(self) -> None:
        self._carry = b""
        self.done = False

    def feed(self, chunk: bytes) -> list[Item]:
        if self.done:
            return []
        data = self._carry + chunk
        cut = data.rfind(b"\n") + 1
        items = self._items(data[:cut]) if cut else []
        rest = data[cut:]
        if len(rest) > LONG_LINE:  # no menu line is this long: the rest of it is dropped
            rest = rest[:LONG_LINE]
        self._carry = b"" if self.done else rest
        return items

    def finish(self) -> list[Item]:
        if self.done or not self._carry:
            return []
        return self._items(self._carry + b"\n")

    def _items(self, body: bytes) -> list[Item]:
        items: list[Item] = []
        for raw in body.split(b"\n")[:-1]:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if line == b".":
                self.done = True
                break
            item = parse_menu_line(line)
            if item is not None:
                items.append(item)
        return items
