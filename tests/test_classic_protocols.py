"""RFC 862-868 byte by byte, at the protocol level: no sockets, no clock."""

from __future__ import annotations

import calendar
import random

import pytest

from sockworks import ConfigError, Peer, RemoteProtocolError
from sockworks.protocols import classic
from sockworks.protocols.classic import (
    CHARGEN_PERIOD,
    DEFAULT_QUOTES,
    Chargen,
    ChargenDatagram,
    Daytime,
    DaytimeDatagram,
    Discard,
    DiscardDatagram,
    Echo,
    EchoDatagram,
    Qotd,
    QotdDatagram,
    Time,
    TimeDatagram,
    chargen_line,
    daytime_text,
    parse_quotes,
    rfc868_time,
)
from sockworks.testing import ProtocolTester, chunkings

PEER = Peer("127.0.0.1", 40000)
DATA = b"hello\r\nworld \x00\xff line\n"


def utc(*fields: int) -> int:
    return calendar.timegm((*fields[:6], 0, 0, 0))


# -- echo and discard ----------------------------------------------------------


def test_echo_returns_every_byte_in_every_chunking() -> None:
    for chunks in chunkings(DATA):
        t = ProtocolTester(Echo())
        assert t.connect() == b""
        assert t.feed_chunks(chunks) == DATA
        assert not t.closed
        t.eof()
        assert t.closed


def test_echo_datagram() -> None:
    assert EchoDatagram().on_datagram(DATA, PEER) == DATA
    assert EchoDatagram().on_datagram(b"", PEER) == b""


def test_discard_never_answers() -> None:
    for chunks in chunkings(DATA):
        t = ProtocolTester(Discard())
        assert t.connect() == b""
        assert t.feed_chunks(chunks) == b""
        assert t.eof() == b""
        assert t.closed
    assert DiscardDatagram().on_datagram(DATA, PEER) is None


# -- chargen -------------------------------------------------------------------


def test_chargen_lines_are_the_rfc_pattern() -> None:
    ring = bytes(range(32, 127))
    assert len(ring) == 95
    assert chargen_line(0) == (
        b" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"
    )
    assert chargen_line(1) == (
        b"!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh\r\n"
    )
    for n in range(300):
        line = chargen_line(n)
        assert len(line) == 74 and line.endswith(b"\r\n")
        start = n % 95
        assert line[:72] == bytes(ring[(start + i) % 95] for i in range(72))
    assert chargen_line(95) == chargen_line(0)
    # The line after "~" wraps to " ".
    assert chargen_line(94)[:2] == b"~ "
    assert b"".join(chargen_line(n) for n in range(95)) == CHARGEN_PERIOD
    assert len(CHARGEN_PERIOD) == 95 * 74


def test_chargen_stream_is_continuous_and_paced() -> None:
    t = ProtocolTester(Chargen(), pump=5)
    out = t.connect()
    # One chunk per on_writable, and each asks for more: the driver paces it.
    assert t.wants_writable
    expected = b"".join(chargen_line(n) for n in range(len(out) // 74 + 1))
    assert out == expected[: len(out)]
    assert len(out) > 6 * 74 * 95
    # What the client sends is discarded, whatever its chunking.
    for chunks in chunkings(DATA, max_sizes=4):
        assert ProtocolTester(Chargen(), pump=0).feed_chunks(chunks) == b""


def test_chargen_small_chunks_stay_in_phase() -> None:
    chunk = b"".join(chargen_line(n) for n in range(95))
    t = ProtocolTester(Chargen(chunk), pump=3)
    out = t.connect()
    assert out == chunk * 4
    t.writable()
    assert t.sent == chunk * 8


def test_chargen_ends_when_the_client_goes_away() -> None:
    t = ProtocolTester(Chargen(), pump=0)
    t.connect()
    t.eof()
    assert t.closed and t.reason is not None and "normal" in t.reason


def test_chargen_datagram_is_a_random_run_up_to_512() -> None:
    rng = random.Random(7)
    proto = ChargenDatagram(rng.randint)
    sizes = set()
    for _ in range(500):
        reply = proto.on_datagram(b"x" * 1000, PEER)
        assert reply is not None
        assert 0 <= len(reply) <= 512
        assert reply == CHARGEN_PERIOD[: len(reply)]
        sizes.add(len(reply))
    assert len(sizes) > 100  # really random lengths
    assert ChargenDatagram(lambda a, b: b).on_datagram(b"", PEER) == CHARGEN_PERIOD[:512]


def test_chargen_datagram_stays_within_the_amplification_allowance() -> None:
    proto = ChargenDatagram(lambda a, b: b, allowance=lambda n: n)
    assert proto.on_datagram(b"x" * 10, PEER) == CHARGEN_PERIOD[:10]
    assert proto.on_datagram(b"", PEER) == b""
    assert proto.on_datagram(b"x" * 9000, PEER) == CHARGEN_PERIOD[:512]
    off = ChargenDatagram(lambda a, b: b, allowance=lambda n: None)
    assert off.on_datagram(b"", PEER) == CHARGEN_PERIOD[:512]


# -- qotd ----------------------------------------------------------------------


def test_default_quotes_follow_rfc_865() -> None:
    assert len(DEFAULT_QUOTES) >= 5
    for q in DEFAULT_QUOTES:
        assert len(q) < 512
        assert q.endswith(b"\r\n")
        assert all(32 <= c < 127 or c in (10, 13) for c in q)


def test_parse_quotes_one_per_paragraph() -> None:
    text = "first line\nsecond line\n\n\n  \nanother quote   \n"
    assert parse_quotes(text) == (b"first line\r\nsecond line\r\n", b"another quote\r\n")
    assert parse_quotes("a\r\n\r\nb\r\n") == (b"a\r\n", b"b\r\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no quotes"),
        ("\n\n", "no quotes"),
        ("ok\n\n" + "x" * 510 + "\n", "quote 2 is 512 characters"),
        ("caf\u00e9\n", "quote 1 contains"),
        ("tab\there\n", "quote 1 contains"),
    ],
)
def test_parse_quotes_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_quotes(text, "q.txt")


def test_longest_quote_allowed_is_511() -> None:
    assert len(parse_quotes("x" * 509)[0]) == 511


def test_qotd_tcp_sends_one_quote_then_closes() -> None:
    quotes = (b"one\r\n", b"two\r\n")
    for i in (0, 1):
        t = ProtocolTester(Qotd(quotes, lambda n, i=i: i))
        assert t.connect() == quotes[i]
        assert t.closed


def test_qotd_udp_picks_a_quote_that_fits() -> None:
    quotes = (b"short\r\n", b"a much longer quote\r\n")
    proto = QotdDatagram(quotes, lambda n: n - 1, allowance=lambda n: n)
    assert proto.on_datagram(b"x" * 100, PEER) == quotes[1]
    assert proto.on_datagram(b"x" * 7, PEER) == quotes[0]
    with pytest.raises(RemoteProtocolError, match="too short"):
        proto.on_datagram(b"", PEER)
    assert QotdDatagram(quotes, lambda n: 0).on_datagram(b"", PEER) == quotes[0]


# -- daytime -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "line"),
    [
        (0, b"Thursday, January 1, 1970 00:00:00-UTC\r\n"),
        (utc(1982, 2, 22, 17, 37, 43), b"Monday, February 22, 1982 17:37:43-UTC\r\n"),
        (utc(2026, 9, 30, 12, 34, 56), b"Wednesday, September 30, 2026 12:34:56-UTC\r\n"),
        (utc(2036, 2, 7, 6, 28, 16), b"Thursday, February 7, 2036 06:28:16-UTC\r\n"),
    ],
)
def test_daytime_format(when: int, line: bytes) -> None:
    assert daytime_text(when) == line
    assert daytime_text(when + 0.999) == line
    assert len(line) <= classic.DAYTIME_MAX
    t = ProtocolTester(Daytime(lambda: when))
    assert t.connect() == line
    assert t.closed
    assert DaytimeDatagram(lambda: when).on_datagram(b"anything", PEER) == line


def test_daytime_ignores_what_the_client_sends() -> None:
    t = ProtocolTester(Daytime(lambda: 0))
    t.connect()
    assert t.closed


# -- time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "seconds"),
    [
        # RFC 868's own examples.
        (utc(1970, 1, 1, 0, 0, 0), 2_208_988_800),
        (utc(1976, 1, 1, 0, 0, 0), 2_398_291_200),
        (utc(1980, 1, 1, 0, 0, 0), 2_524_521_600),
        (utc(1983, 5, 1, 0, 0, 0), 2_629_584_000),
        # The 32-bit rollover: the count wraps to 0 and goes on (era 1).
        (utc(2036, 2, 7, 6, 28, 15), 0xFFFF_FFFF),
        (utc(2036, 2, 7, 6, 28, 16), 0),
        (utc(2036, 2, 7, 6, 28, 17), 1),
        (utc(2040, 1, 1, 0, 0, 0), utc(2040, 1, 1, 0, 0, 0) + 2_208_988_800 - 2**32),
    ],
)
def test_time_is_4_bytes_since_1900(when: int, seconds: int) -> None:
    wire = seconds.to_bytes(4, "big")
    assert rfc868_time(when) == wire
    assert rfc868_time(when + 0.5) == wire  # whole seconds
    t = ProtocolTester(Time(lambda: when))
    assert t.connect() == wire
    assert t.closed
    assert TimeDatagram(lambda: when).on_datagram(b"", PEER) == wire


def test_time_ignores_input_in_every_chunking() -> None:
    for chunks in chunkings(b"abc\r\n"):
        t = ProtocolTester(Time(lambda: 0))
        assert t.connect() == (2_208_988_800).to_bytes(4, "big")
        assert t.closed
        assert chunks  # nothing is read: the answer came on connect


def test_protocol_module_is_pure() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(classic))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"socket", "asyncio", "time", "random", "threading", "selectors"}
