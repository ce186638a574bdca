"""Gopher (RFC 1436) building blocks, shared by the server and the client.

Pure modules (no sockets, no files): :mod:`.items` (item types, menu lines,
dot-stuffing, the client's menu parser), :mod:`.requests` (request lines and
selector validation), :mod:`.gophermap`, :mod:`.url` (RFC 4266 URLs).
I/O lives apart: :mod:`.fsroot` (the served directory) and :mod:`.client`.
The server protocol is :class:`sockworks.protocols.gopher.GopherProtocol`.
"""

from .items import Item, error_menu, format_menu, parse_menu, stuff_text, unstuff_text
from .url import Location, parse_target, parse_url

__all__ = [
    "Item",
    "Location",
    "error_menu",
    "format_menu",
    "parse_menu",
    "parse_target",
    "parse_url",
    "stuff_text",
    "unstuff_text",
]
