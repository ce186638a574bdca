"""Gopher URLs (RFC 4266) and the seed's ``HOST SELECTOR`` form."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from .._endpoint import split_host_port as _split_host_port
from .._errors import UsageError

DEFAULT_PORT = 70


@dataclass(frozen=True, slots=True)
class Location:
    """Where a Gopher item is: host, port, selector, and its type if known
    (``None`` when the seed's form gave no type). ``query`` is a search
    string to send after a TAB."""

    host: str
    port: int = DEFAULT_PORT
    selector: str = ""
    type: str | None = "1"
    query: str | None = None

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        type_ = self.type or "1"
        # Selectors keep a server's undecodable bytes as surrogate escapes:
        # they go back to those bytes, percent-encoded.
        selector = self.selector.encode("utf-8", "surrogateescape")
        path = "" if not selector and type_ == "1" else type_ + quote(selector, safe="/")
        query = "" if self.query is None else "%09" + quote(
            self.query.encode("utf-8", "surrogateescape"), safe="")
        return f"gopher://{host}{port}/{path}{query}"


def split_host_port(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port``, ``[v6]``, or a bare IPv6
    literal; the port defaults to 70. Raise :class:`UsageError`."""
    return _split_host_port(text, default_port=DEFAULT_PORT, subject=f"address {text!r}")


def _decode(text: str) -> str:
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def parse_url(url: str) -> Location:
    """``gopher://host[:port]/[type][selector][%09query[%09plus]]``.

    Per RFC 4266 the first character of the path is the item type, the rest
    (percent-decoded) the selector; ``%09`` separates a search query.
    """
    if not url.lower().startswith("gopher://"):
        raise UsageError(f"not a gopher URL: {url!r}")
    rest = url[len("gopher://") :]
    slash = rest.find("/")
    hostport, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash + 1 :])
    if not hostport:
        raise UsageError(f"no host in {url!r}")
    host, port = split_host_port(hostport)
    if not host:
        raise UsageError(f"no host in {url!r}")
    if not path:
        return Location(host, port, "", "1")
    type_, encoded = path[0], path[1:]
    query: str | None = None
    lower = encoded.lower()
    tab = lower.find("%09")
    if tab >= 0:
        query_part = encoded[tab + 3 :]
        encoded = encoded[:tab]
        # A second %09 would carry a Gopher+ string: not used here.
        q2 = query_part.lower().find("%09")
        query = _decode(query_part if q2 < 0 else query_part[:q2])
    selector = _decode(encoded)
    if "\t" in selector:  # a literal TAB decoded from elsewhere
        selector, _, query = selector.partition("\t")
    return Location(host, port, selector, type_, query)


def parse_target(target: str, selector: str | None = None) -> Location:
    """What a person typed: a ``gopher://`` URL, or the seed's ``HOST``
    (``HOST:PORT``) with an optional ``SELECTOR``. The host alone is the
    root menu; a selector from the seed's form has no known type."""
    if target.lower().startswith("gopher://"):
        if selector is not None:
            raise UsageError("give either a gopher:// URL or HOST SELECTOR, not both")
        return parse_url(target)
    if "://" in target:
        raise UsageError(f"not a gopher URL: {target!r}")
    # The seed's own example: "quux.org/" - a host with a slash after it.
    host_part, _, path = target.partition("/")
    host, port = split_host_port(host_part)
    if not host:
        raise UsageError(f"no host in {target!r}")
    if selector is None and path:
        selector = "/" + path
    if not selector:
        return Location(host, port, "", "1")
    return Location(host, port, selector, None)
