"""A blocking Gopher client: send a selector, read until the server closes.

Errors a person can meet (host not found, refused, timed out, an error
item from the server) are :class:`GopherError` with a one-line message.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from .._errors import SockworksError
from .._files import atomic_writer
from .items import encode, parse_menu
from .url import Location

DEFAULT_TIMEOUT = 30.0
CHUNK = 256 * 1024


class GopherError(SockworksError):
    """A failed request; ``str()`` is one line for a person."""


class ServerError(GopherError):
    """The server answered with a type-3 error item."""


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
    ``sink`` until the server closes. Returns the byte count. ``timeout``
    bounds each wait for the server, not the whole transfer."""
    total = 0
    with connect(loc, timeout) as sock:
        try:
            sock.sendall(request_line(loc))
            while True:
                chunk = sock.recv(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                sink(chunk)
                if limit is not None and total > limit:
                    raise GopherError(f"answer from {_where(loc)} is over {limit} bytes")
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

        return stream(loc, sink, timeout=timeout)
