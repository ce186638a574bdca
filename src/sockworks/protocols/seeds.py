"""The seeds' services as sans-I/O protocols.

Each reproduces what the tutorial programs do on the wire, and fixes what
they get wrong (the Python 2 str/bytes mixing, no limits, no timeout
handling) without changing the bytes a seed client sees.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from datetime import datetime

from .._buffer import LineBuffer
from .._errors import LineTooLong
from .._protocol import DatagramProtocol, Output, Peer, Reply, StreamProtocol, close

_greeting_log = logging.getLogger("sockworks.greeting")
_thanks_log = logging.getLogger("sockworks.thanks")

Clock = Callable[[], float]


def ctime(timestamp: float) -> str:
    """``time.ctime(timestamp)``, without reading the clock ourselves:
    ``'Sun Nov 22 02:24:31 2026'`` in local time, day space-padded."""
    d = datetime.fromtimestamp(timestamp)
    return f"{d:%a %b} {d.day:2d} {d:%H:%M:%S %Y}"


class Timestamp(StreamProtocol):
    """Seed 001's TCP timestamp server: every chunk received is answered
    with ``[ctime] `` + the chunk. The seed client sends no newline, so the
    unit is the received chunk, as in the seed's ``recv`` loop."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_data(self, data: bytes) -> Output:
        return b"[" + ctime(self.clock()).encode() + b"] " + data


class TimestampDatagram(DatagramProtocol):
    """Seed 001's UDP timestamp server: each datagram answered the same way."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return b"[" + ctime(self.clock()).encode() + b"] " + data


class Greeting(StreamProtocol):
    """Seed 000's handshake server: the client sends a token; the right one
    gets ``welcome to server!``, anything else ``please go out!``, then the
    connection closes. A silent client is cut off by the idle timeout.

    The seed compares its first ``recv`` with ``'1'``. Over TCP a token can
    arrive in pieces, so we decide as soon as the answer is certain: at a
    line end (telnet), when the bytes equal the token (the seed's client
    sends ``1`` and no newline), or when they can no longer become it.
    """

    WELCOME = b"welcome to server!"
    GO_AWAY = b"please go out!"

    def __init__(self, token: bytes = b"1", max_line: int = 8192) -> None:
        self.token = token
        self.buffer = LineBuffer(max_line)
        self.peer: Peer | None = None

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        self.peer = peer
        return None

    def on_data(self, data: bytes) -> Output:
        self.buffer.feed(data)
        try:
            line = self.buffer.next_line()
        except LineTooLong:
            return self._answer(b"", reason="token too long")
        if line is not None:
            return self._answer(line.strip())
        received = self.buffer.peek()
        pending = received.strip()
        if pending == self.token or not self.token.startswith(received.lstrip()):
            return self._answer(pending)
        return None  # a prefix of the token: wait for the rest

    def on_eof(self) -> Output:
        rest = self.buffer.take_rest().strip()
        return self._answer(rest) if rest else Reply(close=True, reason="no token")

    def on_timeout(self) -> Output:
        _greeting_log.info("%s timed out waiting for the token", self.peer)
        return Reply(close=True, reason="timed out")

    def awaiting_request(self) -> bool:
        return True  # until the token is decided (then the connection closes)

    def on_request_timeout(self) -> Output:
        _greeting_log.info("%s timed out sending the token", self.peer)
        return Reply(close=True, reason="request timed out")

    def _answer(self, token: bytes, reason: str | None = None) -> Reply:
        if hmac.compare_digest(token, self.token):
            return close(self.WELCOME, reason="token accepted")
        return close(self.GO_AWAY, reason=reason or "wrong token")


class Thanks(StreamProtocol):
    """Seed 002's socketserver example: log the peer, thank it, close."""

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        _thanks_log.info("got connection from %s", peer)
        return close(b"thank you for connecting")


class CharCount(StreamProtocol):
    """Seed 004's server for telnet: a welcome, a prompt, one line read,
    its length (stripped, in characters) reported, close."""

    def __init__(self, max_line: int = 8192) -> None:
        self.buffer = LineBuffer(max_line)

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        address: object = (peer.host, peer.port) if peer.host else peer.path
        return f"welcome, {address!r}\nPlease enter a string:".encode()

    def on_data(self, data: bytes) -> Output:
        self.buffer.feed(data)
        try:
            line = self.buffer.next_line()
        except LineTooLong as exc:
            return close(f"\nLine too long: the limit is {exc.limit} bytes.\n".encode(), exc.reason)
        return None if line is None else self._count(line)

    def on_eof(self) -> Output:
        rest = self.buffer.take_rest()
        return self._count(rest) if rest else Reply(close=True, reason="no line")

    def awaiting_request(self) -> bool:
        return True  # until its one line is answered (then it closes)

    @staticmethod
    def _count(line: bytes) -> Reply:
        # Characters, not bytes: UTF-8 decoded, an invalid byte counting as
        # one character; stripped as the seed strips.
        text = line.decode("utf-8", "surrogateescape").strip()
        return close(f"You entered {len(text)} characters.\n".encode())


class Echo(StreamProtocol):
    """RFC 862 over TCP: everything back until the client closes."""

    def on_data(self, data: bytes) -> Output:
        return data


class EchoDatagram(DatagramProtocol):
    """RFC 862 over UDP: each datagram back to its sender."""

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return data
