"""Byte-level tests of the seed protocols: no sockets, no event loop.

Each input is fed whole and split into every chunk size, and must give the
same answer (per-chunk services are checked chunk by chunk).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockworks import Peer
from sockworks.protocols.seeds import (
    CharCount,
    Echo,
    EchoDatagram,
    Greeting,
    Thanks,
    Timestamp,
    TimestampDatagram,
    ctime,
)
from sockworks.testing import ProtocolTester, chunkings

FIXED = 1_700_000_000.0  # an injected clock: Tue Nov 14 22:13:20 2023 UTC


def test_ctime_matches_time_ctime() -> None:
    for t in (0.0, FIXED, FIXED + 86400 * 20, 2**31 + 5.0):
        assert ctime(t) == time.ctime(t)


# -- timestamp (seed 001) ----------------------------------------------------


@pytest.mark.parametrize("chunks", list(chunkings(b"hello, world")))
def test_timestamp_answers_each_chunk(chunks: list[bytes]) -> None:
    t = ProtocolTester(Timestamp(lambda: FIXED))
    assert t.connect() == b""
    stamp = f"[{time.ctime(FIXED)}] ".encode()
    for chunk in chunks:
        assert t.feed(chunk) == stamp + chunk
    t.eof()
    assert t.closed


def test_timestamp_datagram() -> None:
    proto = TimestampDatagram(lambda: FIXED)
    reply = proto.on_datagram(b"hi", Peer("127.0.0.1", 1))
    assert reply == f"[{time.ctime(FIXED)}] hi".encode()
    assert proto.on_datagram(b"", Peer("127.0.0.1", 1)) == f"[{time.ctime(FIXED)}] ".encode()


@given(st.binary(max_size=200))
def test_timestamp_is_binary_safe(data: bytes) -> None:
    t = ProtocolTester(Timestamp(lambda: FIXED))
    t.connect()
    if data:
        assert t.feed(data).endswith(b"] " + data)


# -- greeting (seed 000) ------------------------------------------------------

GREETING_CASES = [
    (b"1", b"welcome to server!"),  # the seed's client: no newline
    (b"1\n", b"welcome to server!"),
    (b"1\r\n", b"welcome to server!"),  # telnet
    (b"  1  \r\n", b"welcome to server!"),
    (b"2", b"please go out!"),
    (b"hello\r\n", b"please go out!"),
    (b"\x00\xff\xfe", b"please go out!"),
]


@pytest.mark.parametrize(("data", "answer"), GREETING_CASES)
def test_greeting_every_chunking(data: bytes, answer: bytes) -> None:
    for chunks in chunkings(data):
        t = ProtocolTester(Greeting(b"1"))
        t.connect()
        t.feed_chunks(chunks)
        if not t.closed:
            t.eof()
        assert bytes(t.sent) == answer, chunks
        assert t.closed


@pytest.mark.parametrize("chunks", list(chunkings(b"s3cret\r\n")))
def test_greeting_long_token_in_pieces(chunks: list[bytes]) -> None:
    t = ProtocolTester(Greeting(b"s3cret"))
    t.connect()
    t.feed_chunks(chunks)
    assert bytes(t.sent) == b"welcome to server!"


def test_greeting_decides_on_the_first_exact_match() -> None:
    # Like the seed's single recv(): "1" is welcomed the moment it arrives;
    # "11" in one chunk is not the token.
    t = ProtocolTester(Greeting(b"1"))
    t.connect()
    assert t.feed(b"11") == b"please go out!"


def test_greeting_waits_for_the_rest_of_a_prefix() -> None:
    t = ProtocolTester(Greeting(b"s3cret"))
    t.connect()
    assert t.feed(b"s3c") == b""
    assert not t.closed
    assert t.feed(b"ret") == b"welcome to server!"


def test_greeting_timeout_closes_silently() -> None:
    t = ProtocolTester(Greeting(b"1"))
    t.connect()
    assert t.timeout() == b""
    assert t.closed and t.reason == "timed out"


def test_greeting_eof_without_token() -> None:
    t = ProtocolTester(Greeting(b"1"))
    t.connect()
    assert t.eof() == b""
    assert t.closed


def test_greeting_oversized_token_is_refused_without_growing() -> None:
    t = ProtocolTester(Greeting(b"1" * 10, max_line=64))
    t.connect()
    out = t.feed(b"1" * 100)
    assert out == b"please go out!"
    assert t.closed


# -- thanks (seed 002) ---------------------------------------------------------


def test_thanks_on_connect() -> None:
    t = ProtocolTester(Thanks())
    assert t.connect() == b"thank you for connecting"
    assert t.closed


# -- charcount (seed 004) ---------------------------------------------------


PROMPT = b"welcome, ('127.0.0.1', 50000)\nPlease enter a string:"


@pytest.mark.parametrize(
    ("line", "count"),
    [
        (b"hello\n", 5),
        (b"hello\r\n", 5),  # telnet sends CRLF
        (b"  padded  \r\n", 6),  # stripped, as the seed strips
        ("héllo wörld\r\n".encode(), 11),  # characters, not bytes
        (b"\n", 0),
        (b"\xff\xfe\x00ab\n", 5),  # invalid UTF-8 and NUL: one each
    ],
)
def test_charcount_every_chunking(line: bytes, count: int) -> None:
    for chunks in chunkings(line):
        t = ProtocolTester(CharCount())
        assert t.connect() == PROMPT
        t.feed_chunks(chunks)
        assert bytes(t.sent) == PROMPT + f"You entered {count} characters.\n".encode()
        assert t.closed


def test_charcount_ipv6_and_unix_peers() -> None:
    assert ProtocolTester(CharCount()).connect(Peer("::1", 7)).startswith(b"welcome, ('::1', 7)\n")
    assert ProtocolTester(CharCount()).connect(Peer(path="")).startswith(b"welcome, ''\n")


def test_charcount_eof_without_newline_counts_what_came() -> None:
    t = ProtocolTester(CharCount())
    t.connect()
    assert t.feed(b"abc") == b""
    assert t.eof() == b"You entered 3 characters.\n"


def test_charcount_line_too_long() -> None:
    t = ProtocolTester(CharCount(max_line=16))
    t.connect()
    out = t.feed(b"x" * 100)
    assert b"Line too long" in out
    assert t.closed and t.reason == "line longer than 16 bytes"


def test_charcount_only_first_line_counts() -> None:
    t = ProtocolTester(CharCount())
    t.connect()
    out = t.feed(b"ab\ncdef\n")
    assert out == b"You entered 2 characters.\n"
    assert t.closed


# -- echo ------------------------------------------------------------------------


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=10))
def test_echo_returns_every_byte(chunks: list[bytes]) -> None:
    t = ProtocolTester(Echo())
    t.connect()
    assert t.feed_chunks(chunks) == b"".join(chunks)
    t.eof()
    assert t.closed


def test_echo_datagram() -> None:
    assert EchoDatagram().on_datagram(b"\x00" * 3, Peer("::1", 9)) == b"\x00" * 3
