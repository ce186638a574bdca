"""Endpoint strings: ``tcp:HOST:PORT``, ``udp:HOST:PORT``, ``unix:PATH``…

The same strings are accepted by the CLI and the Python API, and an
:class:`Endpoint` prints back as the string that would parse to it, so the
``listening on ENDPOINT`` line can be pasted into another command.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from ._errors import EndpointError

Transport = Literal["tcp", "udp", "unix", "unixgram"]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp", "unix", "unixgram")
STREAM_TRANSPORTS = frozenset({"tcp", "unix"})
INET_TRANSPORTS = frozenset({"tcp", "udp"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a socket listens or connects.

    ``host`` and ``port`` are set for tcp/udp, ``path`` for unix/unixgram.
    ``host`` is kept as written (a name, an IPv4 or an IPv6 literal without
    brackets); an empty host means "all addresses".
    """

    transport: Transport
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_stream(self) -> bool:
        return self.transport in STREAM_TRANSPORTS

    @property
    def is_inet(self) -> bool:
        return self.transport in INET_TRANSPORTS

    def __str__(self) -> str:
        if not self.is_inet:
            return f"{self.transport}:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.transport, self.host, port, self.path)


def parse_endpoint(text: str, default_transport: Transport = "tcp") -> Endpoint:
    """Parse an endpoint string; raise :class:`EndpointError` naming the problem.

    ``HOST:PORT`` alone means ``default_transport`` (TCP unless told).
    """
    if not isinstance(text, str) or not text:
        raise EndpointError("empty endpoint")
    transport: str = default_transport
    rest = text
    head, sep, tail = text.partition(":")
    if sep and head in TRANSPORTS:
        transport, rest = head, tail
    elif sep and head.isalpha() and ":" in tail:
        # "sctp:host:1" looks like a transport we do not know, not HOST:PORT.
        raise EndpointError(
            f"unknown transport {head!r} in endpoint {text!r} (use tcp, udp, unix or unixgram)"
        )
    if transport in ("unix", "unixgram"):
        if not rest:
            raise EndpointError(f"endpoint {text!r} has no socket path")
        if "\0" in rest:
            raise EndpointError(f"endpoint {text!r}: a socket path cannot contain NUL")
        return Endpoint(transport, path=rest)  # type: ignore[arg-type]
    host, port = _split_host_port(rest, text)
    return Endpoint(transport, host=host, port=port)  # type: ignore[arg-type]


def _split_host_port(rest: str, text: str) -> tuple[str, int]:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1 : close + 2] != ":":
            raise EndpointError(f"endpoint {text!r}: expected [IPV6]:PORT")
        host, port_text = rest[1:close], rest[close + 2 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise EndpointError(f"endpoint {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise EndpointError(f"endpoint {text!r} has no port (expected HOST:PORT)")
        if ":" in host:
            raise EndpointError(f"endpoint {text!r}: write IPv6 addresses in brackets, [::1]:PORT")
    if not port_text.isdigit() or not port_text.isascii():
        raise EndpointError(f"endpoint {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise EndpointError(f"endpoint {text!r}: port {port} is out of range (0-65535)")
    if any(c.isspace() for c in host):
        raise EndpointError(f"endpoint {text!r}: host contains white space")
    return host, port
