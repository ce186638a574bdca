"""Reading a PROXY header off a socket, and what it changes about the peer.

The header is read *exactly*: every ``recv`` takes only bytes known to be
the header's (a v2 header's length is in its first 16 bytes; a v1 line
ends at its LF), so the bytes after it (a TLS ClientHello, a request)
stay in the kernel for TLS or the protocol. Parsing is
:class:`sockworks.proxy.ProxyHeaderParser`'s: this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket

from ._protocol import Peer
from .proxy import ProxyHeaderError, ProxyHeaderParser, ProxyInfo

__all__ = ["ProxyHeaderError", "proxied_peer", "read_proxy_header"]

_V2_FIXED = 16  # signature, version/command, family, length
_V1_MAX = 107  # the longest v1 line, CRLF included (the spec's bound)


def _take(got: bytes, peeked: bytes) -> int:
    """How many of the ``peeked`` bytes belong to the header, given what
    was already read (``got``)."""
    first = (got or peeked)[:1]
    if first == b"\r":  # a v2 signature starts with CR
        if len(got) < _V2_FIXED:
            return min(_V2_FIXED - len(got), len(peeked))
        total = _V2_FIXED + int.from_bytes(got[14:16], "big")
        return min(total - len(got), len(peeked))
    if first == b"P":  # "PROXY ..." up to its LF
        end = peeked.find(b"\n")
        return end + 1 if end >= 0 else len(peeked)
    return 1  # not a header: one byte is enough for the parser to say so


async def read_proxy_header(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, accept: str
) -> ProxyInfo:
    """The PROXY header at the start of ``sock`` (non-blocking), read
    without a byte past it. Raises :class:`ProxyHeaderError` for a bad or
    missing header; the caller bounds the time (``asyncio.wait_for``)."""
    parser = ProxyHeaderParser(accept)
    got = b""
    while True:
        try:
            peeked = sock.recv(_V1_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        if not peeked:
            raise ProxyHeaderError("the connection closed before its PROXY header ended")
        data = sock.recv(_take(got, peeked))
        got += data
        info = parser.feed(data)
        if info is not None:
            return info


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def proxied_peer(peer: Peer, info: ProxyInfo) -> Peer:
    """The client as the header names it (a ``PROXY`` command); the real
    peer for ``LOCAL`` (a balancer's own health check) and unknown
    families. Either way the header rides along as ``peer.proxy``."""
    source = info.source
    if info.command == "PROXY" and source is not None:
        return Peer(host=source.host, port=source.port, path=source.path, proxy=info)
    return dataclasses.replace(peer, proxy=info)
