"""What both drivers' datagram endpoints share."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, cast

from .._protocol import Peer

if TYPE_CHECKING:
    from .._core import ConnectionGroup

log = logging.getLogger("sockworks.driver")


def send_datagram(
    transport: asyncio.DatagramTransport, sock: socket.socket, data: bytes, addr: Any
) -> None:
    """``transport.sendto``, except for an empty datagram, which asyncio and
    uvloop silently drop (before Python 3.13) but RFC 862 echo must send."""
    if data:
        transport.sendto(data, addr)
        return
    try:
        sock.sendto(b"", addr)
    except OSError as exc:
        log.debug("cannot send an empty datagram to %r: %s", addr, exc)


# Senders whose Peer is kept between datagrams.
_PEER_CACHE = 4096


class DatagramSocket(asyncio.DatagramProtocol):
    """What both drivers' datagram endpoints share: the transport, the
    access check on arrival, error logging and the shutdown interface."""

    def __init__(self, group: ConnectionGroup, sock: socket.socket) -> None:
        self.group = group
        self.sock = sock  # for empty replies: see send_datagram
        self.transport: asyncio.DatagramTransport | None = None
        # The Peer of each recent sender: a datagram from a known source
        # allocates nothing here. Bounded: cleared when full (a flood of
        # forged sources costs one dict, never unbounded memory).
        self._peers: dict[Any, Peer] = {}
        # Per-datagram debug lines cost a call each even when not written:
        # decided once (``-v`` is set before the server starts).
        self.debug = group.log.isEnabledFor(logging.DEBUG)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's: no isinstance check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def admit(self, data: bytes, addr: Any) -> Peer | None:
        """The sender, or None when the access policy drops the datagram."""
        peers = self._peers
        peer = peers.get(addr)
        if peer is None:
            if len(peers) >= _PEER_CACHE:
                peers.clear()
            peer = peers[addr] = Peer.from_address(addr)
        access = self.group.access
        if access is not None:
            refused = access.admit_datagram(peer.host, peer.port, len(data))
            if refused is not None:
                self.group.refused(peer, refused, datagram=True)
                return None
        return peer

    def error_received(self, exc: Exception) -> None:
        self.group.log.debug("datagram socket error: %s", exc)

    def begin_shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def report_failed_start(task: asyncio.Task[object]) -> None:
    """Done-callback for connect_accepted_socket tasks: a peer that reset
    before the transport existed costs a debug line."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("connection failed before it started: %r", task.exception())
