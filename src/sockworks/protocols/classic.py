"""The classic Internet services of RFC 862-868 as sans-I/O protocols.

No socket, no event loop, no clock and no random source of their own: the
time (seconds since the Unix epoch) and the random choices are passed in,
so that every byte is tested, the 2036 rollover included.

Wire formats (see ``docs/classic.md``):

* echo (862): every byte back; discard (863): nothing back.
* chargen (864): the 95 printable ASCII characters 32-126 as a ring; line N
  is the 72 characters starting at offset N mod 95, then CRLF. Over TCP the
  lines flow for as long as the client reads, paced by flow control; over
  UDP each datagram gets a random-length run (0-512) from line 0 on.
* qotd (865): one quote, under 512 characters, lines ending in CRLF.
* daytime (867): ``Sunday, November 22, 2026 02:44:30-UTC`` + CRLF, always
  in UTC, English names whatever the locale.
* time (868): 4 bytes, big-endian, seconds since 1900-01-01 00:00 UTC,
  modulo 2**32: at 2036-02-07 06:28:16 UTC the count wraps to 0 and goes on
  (NTP's era convention), it never stops or saturates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from .._errors import ConfigError, RemoteProtocolError
from .._protocol import DatagramProtocol, Output, Peer, Reply, StreamProtocol, close
from .seeds import Echo, EchoDatagram

__all__ = [
    "CHARGEN_PERIOD",
    "DEFAULT_QUOTES",
    "RFC868_OFFSET",
    "Chargen",
    "ChargenDatagram",
    "Daytime",
    "DaytimeDatagram",
    "Discard",
    "DiscardDatagram",
    "Echo",
    "EchoDatagram",
    "Qotd",
    "QotdDatagram",
    "Time",
    "TimeDatagram",
    "chargen_line",
    "daytime_text",
    "parse_quotes",
    "rfc868_time",
]

Clock = Callable[[], float]
# rand(a, b): a whole number N with a <= N <= b (random.Random.randint).
RandInt = Callable[[int, int], int]
# allowance(request_size): the largest reply the amplification guard lets
# out, or None when the guard is off (AccessPolicy.reply_allowance).
Allowance = Callable[[int], int | None]

# -- discard -----------------------------------------------------------------


class Discard(StreamProtocol):
    """RFC 863 over TCP: read and drop everything; close when the client does."""

    def on_data(self, data: bytes) -> Output:
        return None


class DiscardDatagram(DatagramProtocol):
    """RFC 863 over UDP: never answer."""

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return None


# -- chargen -----------------------------------------------------------------

_RING = bytes(range(32, 127))  # the 95 printable ASCII characters
_LINE = 72


def chargen_line(n: int) -> bytes:
    """Line ``n`` (from 0) of the RFC 864 pattern, CRLF included."""
    start = n % len(_RING)
    return (_RING + _RING)[start : start + _LINE] + b"\r\n"


# The pattern repeats every 95 lines (7030 bytes).
CHARGEN_PERIOD = b"".join(chargen_line(n) for n in range(len(_RING)))
# What one on_writable call sends: whole periods, so every chunk is the same
# bytes object and the stream stays in phase at no cost. 56 KiB per call
# keeps the calls few and stays below the default output limit (256 KiB).
_CHUNK = CHARGEN_PERIOD * 8
_UDP_MAX = 512


class Chargen(StreamProtocol):
    """RFC 864 over TCP: the pattern until the client goes away.

    Each chunk asks for ``on_writable`` (``Reply(more=True)``): the next one
    is produced only once the peer has taken the last, so a slow reader
    costs at most the output limit in memory. What the client sends is
    discarded.
    """

    # A client that hangs up with output unread resets the connection:
    # that is how a chargen session normally ends.
    peer_gone_reason = "client went away (normal for chargen)"

    def __init__(self, chunk: bytes = _CHUNK) -> None:
        self.chunk = chunk
        self.sent = 0

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        return self.on_writable()

    def on_data(self, data: bytes) -> Output:
        return None

    def on_writable(self) -> Output:
        self.sent += len(self.chunk)
        return Reply(self.chunk, more=True)

    def on_eof(self) -> Output:
        # The normal end of a chargen session.
        return Reply(close=True, reason=self.peer_gone_reason)


class ChargenDatagram(DatagramProtocol):
    """RFC 864 over UDP: a random-length run (0-512) of the pattern, never
    longer than the amplification guard allows for the request."""

    def __init__(self, rand: RandInt, allowance: Allowance | None = None) -> None:
        self.rand = rand
        self.allowance = allowance

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        most = _UDP_MAX
        if self.allowance is not None:
            cap = self.allowance(len(data))
            if cap is not None:
                most = max(0, min(most, cap))
        return CHARGEN_PERIOD[: self.rand(0, most)]


# -- qotd --------------------------------------------------------------------

# Written for this project. Each is well under 512 characters.
_DEFAULT_QUOTES_TEXT = """\
Bind first, then say where you listen, then accept. A server that
announces itself before it can answer is only guessing.

A protocol that never touches a socket can be tested with nothing
but byte strings, in every chunk size there is.

The peer will send the one byte you did not expect, in the one
chunk size you did not test.

Every limit you leave off is a limit an attacker sets for you.

Readiness is signalled, never slept on.

An echo server is the smallest honest thing on a network: it says
exactly what it heard.

Two polite services that always answer will talk to each other until
the wire melts. Never answer a server.

Flow control is the reader's way of saying: not so fast.
"""


def parse_quotes(text: str, source: str = "quotes") -> tuple[bytes, ...]:
    """Quotes from ``text``, one per paragraph (blank-line separated).

    Each becomes CRLF-terminated lines; each must be printable ASCII and,
    with its CRLFs, under 512 characters (RFC 865). Errors name the
    paragraph: ``quotes: quote 3 is 600 characters (the limit is 511)``.
    """
    quotes: list[bytes] = []
    paragraph: list[str] = []
    number = 0

    def finish() -> None:
        nonlocal number
        if not paragraph:
            return
        number += 1
        body = "".join(line + "\r\n" for line in paragraph)
        paragraph.clear()
        bad = next((c for c in body if not (" " <= c <= "~" or c in "\r\n")), None)
        if bad is not None:
            raise ConfigError(
                f"{source}: quote {number} contains {bad!r}; RFC 865 allows printable"
                " ASCII, CR and LF only"
            )
        if len(body) >= 512:
            raise ConfigError(
                f"{source}: quote {number} is {len(body)} characters with its line ends"
                " (RFC 865: under 512)"
            )
        quotes.append(body.encode("ascii"))

    for raw in text.splitlines():
        line = raw.rstrip()
        if line:
            paragraph.append(line)
        else:
            finish()
    finish()
    if not quotes:
        raise ConfigError(f"{source}: no quotes found (one quote per paragraph)")
    return tuple(quotes)


DEFAULT_QUOTES = parse_quotes(_DEFAULT_QUOTES_TEXT, "default quotes")

# choose(n): an index in range(n) (random.Random.randrange).
Choose = Callable[[int], int]


class Qotd(StreamProtocol):
    """RFC 865 over TCP: one quote, then close (what the client sends is ignored)."""

    def __init__(self, quotes: Sequence[bytes], choose: Choose) -> None:
        self.quotes = quotes
        self.choose = choose

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        return close(self.quotes[self.choose(len(self.quotes))], reason="quote sent")


class QotdDatagram(DatagramProtocol):
    """RFC 865 over UDP: one quote per datagram.

    Under the amplification guard, the quote is chosen among those that fit
    in the reply the request allows; a request too short for any quote is
    dropped with a reason (send a longer datagram, or raise the limit).
    """

    def __init__(
        self, quotes: Sequence[bytes], choose: Choose, allowance: Allowance | None = None
    ) -> None:
        self.quotes = quotes
        self.choose = choose
        self.allowance = allowance

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        quotes = self.quotes
        cap = self.allowance(len(data)) if self.allowance is not None else None
        if cap is not None:
            quotes = [q for q in quotes if len(q) <= cap]
            if not quotes:
                raise RemoteProtocolError(
                    f"a {len(data)} B request is too short for any quote under the"
                    " amplification limit"
                )
        return quotes[self.choose(len(quotes))]


# -- daytime -----------------------------------------------------------------

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)
# The longest line daytime sends ("Wednesday, September 30, 2026
# 12:34:56-UTC\r\n" is 44 bytes): the reply slack the UDP service declares.
DAYTIME_MAX = 64


def daytime_text(timestamp: float) -> bytes:
    """RFC 867's first suggested format, in UTC:
    ``Weekday, Month Day, Year HH:MM:SS-UTC`` + CRLF."""
    d = datetime.fromtimestamp(int(timestamp), UTC)
    return (
        f"{_DAYS[d.weekday()]}, {_MONTHS[d.month - 1]} {d.day}, {d.year}"
        f" {d:%H:%M:%S}-UTC\r\n"
    ).encode("ascii")


class Daytime(StreamProtocol):
    """RFC 867 over TCP: the date and time, then close."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        return close(daytime_text(self.clock()), reason="daytime sent")


class DaytimeDatagram(DatagramProtocol):
    """RFC 867 over UDP: the same line for any datagram."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return daytime_text(self.clock())


# -- time --------------------------------------------------------------------

# Seconds from 1900-01-01 to 1970-01-01 (70 years, 17 of them leap).
RFC868_OFFSET = 2_208_988_800


def rfc868_time(timestamp: float) -> bytes:
    """4 bytes, big-endian: whole seconds since 1900-01-01 00:00 UTC, modulo
    2**32. 2036-02-07 06:28:15 UTC is ``ff ff ff ff``; one second later the
    count wraps to ``00 00 00 00`` (era 1, as NTP does) and goes on."""
    seconds = (int(timestamp // 1) + RFC868_OFFSET) % (1 << 32)
    return seconds.to_bytes(4, "big")


class Time(StreamProtocol):
    """RFC 868 over TCP: 4 bytes, then close."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_connect(self, peer: Peer, local: Peer | None = None) -> Output:
        return close(rfc868_time(self.clock()), reason="time sent")


class TimeDatagram(DatagramProtocol):
    """RFC 868 over UDP: 4 bytes for any datagram."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_datagram(self, data: bytes, peer: Peer) -> bytes | None:
        return rfc868_time(self.clock())
