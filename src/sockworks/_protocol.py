"""The sans-I/O protocol interface.

A protocol is a plain object that is told what happened (a connection, some
bytes, EOF, an idle timeout) and answers with what to do. It imports no
socket, asyncio, thread or clock: the same protocol runs under every driver
and is tested with byte strings alone.

Each callback returns an :data:`Output`:

* ``None`` - nothing to do;
* ``bytes`` - send these (the fast path: no object is allocated);
* a :class:`Reply` - send, then optionally send a file, half-close, close,
  or ask to be called again when the peer has drained what was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ._config import Limits


@dataclass(frozen=True, slots=True)
class FileSpan:
    """A region of a file to send (by ``sendfile`` where the driver can)."""

    path: str
    offset: int = 0
    count: int | None = None  # None: to the end of the file


@dataclass(frozen=True, slots=True)
class Reply:
    """What a protocol wants done, in this order: send ``data``, send
    ``file``, then half-close or close.

    ``more`` asks the driver to call :meth:`StreamProtocol.on_writable` once
    the peer has taken what was sent, so that output is paced by TCP flow
    control instead of piling up in memory (chargen). ``reason`` is logged
    when the connection closes (``"line too long"``).

    ``offload`` is work too slow for the event loop (a search, a large
    listing): after ``data`` is sent the driver runs it on a worker thread,
    reads nothing more from the peer meanwhile, and carries out the
    :data:`Output` it returns as if a callback had returned it. It must be
    the only action besides ``data``; the function must not touch the
    protocol's state that other callbacks use (it runs on another thread).
    """

    data: bytes = b""
    file: FileSpan | None = None
    close: bool = False
    half_close: bool = False
    more: bool = False
    reason: str | None = None
    offload: Callable[[], Output] | None = None
    # The offloaded work mostly waits (a child process, a slow disk) rather
    # than computes: it runs on threads of its own, not queued behind CPU work.
    offload_waits: bool = False


Output = bytes | Reply | None


@dataclass(frozen=True, slots=True)
class Peer:
    """The address of the other end: ``host``/``port`` for IP, ``path`` for Unix.

    ``str(peer)`` is the form used in logs: ``127.0.0.1:5000``,
    ``[::1]:5000``, or the Unix path (``unix-peer`` when unnamed).
    """

    host: str = ""
    port: int = 0
    path: str = ""
    # Behind a balancer: the PROXY header the client's address came from
    # (a sockworks.proxy.ProxyInfo, with its TLVs), else None.
    proxy: object = field(default=None, compare=False, repr=False)
    # Over TLS with client certificates: the verified subject
    # ("commonName=alice,organizationName=Example"), else None.
    tls_subject: str | None = field(default=None, compare=False)

    @classmethod
    def from_address(cls, address: object) -> Peer:
        """From what ``accept()``/``recvfrom()`` return."""
        if isinstance(address, tuple) and len(address) >= 2:
            return cls(host=str(address[0]), port=int(address[1]))
        if isinstance(address, bytes):
            return cls(path=address.decode(errors="replace"))
        return cls(path=str(address or ""))

    def __str__(self) -> str:
        if self.host:
            return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return self.path or "unix-peer"


def send(data: bytes) -> Reply:
    return Reply(data=data)


def close(data: bytes = b"", reason: str | None = None) -> Reply:
    """Send ``data`` (if any), then close once it is flushed."""
    return Reply(data=data, close=True, reason=reason)


class StreamProtocol:
    """Base class for a connection-oriented protocol (TCP, Unix stream).

    One instance per connection. Override what you need; the defaults echo
    nothing and close when the peer does.
    """

    # The reason logged when the peer resets or vanishes, for protocols
    # whose sessions normally end that way (chargen); None: "reset by peer".
    peer_gone_reason: str | None = None

    # The service's limits (``--max-line``, ``--timeout`` …): set by the
    # driver on each new instance before any callback, so a protocol reads
    # them without plumbing of its own (``LineBuffer(self.limits.max_line)``
    # in ``on_connect``). The class default is the defaults.
    limits: Limits = Limits()

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        """A peer connected to ``local`` (our address: a listener's IP and
        port, or its Unix path). Protocols that take only ``peer`` are
        still called that way."""
        return None

    def on_data(self, data: bytes) -> Output:
        """Bytes arrived. Chunk boundaries carry no meaning on a stream."""
        return None

    def on_eof(self) -> Output:
        """The peer will send no more (it closed or half-closed)."""
        return Reply(close=True)

    def on_writable(self) -> Output:
        """Called after a ``Reply(more=True)`` once output has drained."""
        return None

    def on_timeout(self) -> Output:
        """The peer was idle for the configured idle timeout."""
        return Reply(close=True, reason="idle timeout")

    def awaiting_request(self) -> bool:
        """True while the protocol waits for (the rest of) a request line: the
        request deadline (``Limits.request_timeout``) runs meanwhile. The
        default, False, never applies it."""
        return False

    def request_summary(self) -> str | None:
        """What the peer asked for, for the connection's closing log line
        (Gopher: the selector); None for nothing. Keep it short and
        printable: it is logged as given."""
        return None

    def on_request_timeout(self) -> Output:
        """A request was not complete within the request timeout (a slow
        drip keeps the idle timer happy, not this one)."""
        return Reply(close=True, reason="request timed out")

    def on_shutdown(self) -> Output:
        """The server is stopping; the default closes once output is flushed."""
        return Reply(close=True, reason="server shutting down")


class DatagramProtocol:
    """Base class for a datagram protocol (UDP, Unix datagram).

    One instance per listening socket. Return the reply to ``peer``, if any.
    """

    # The service's limits, set by the driver as for stream protocols.
    limits: Limits = Limits()

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return None
