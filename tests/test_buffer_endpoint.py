"""The line buffer and endpoint parsing: the two parsers every service uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockworks import Endpoint, EndpointError, LineBuffer, LineTooLong, parse_endpoint
from sockworks.testing import chunkings

# -- LineBuffer -------------------------------------------------------------------


def lines_of(buf: LineBuffer) -> list[bytes]:
    out = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


@pytest.mark.parametrize("chunks", list(chunkings(b"one\r\ntwo\nthree\r\n\nfour")))
def test_lines_in_every_chunking(chunks: list[bytes]) -> None:
    buf = LineBuffer(100)
    got = []
    for chunk in chunks:
        buf.feed(chunk)
        got += lines_of(buf)
    assert got == [b"one", b"two", b"three", b""]
    assert buf.take_rest() == b"four"


@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b), max_size=20), st.data())
def test_lines_roundtrip(lines: list[bytes], data: st.DataObject) -> None:
    # A CR at the end of a line is part of the terminator, so keep none.
    lines = [line.rstrip(b"\r") for line in lines]
    stream = b"".join(line + b"\n" for line in lines)
    size = data.draw(st.integers(min_value=1, max_value=max(1, len(stream))))
    buf = LineBuffer(64)
    got = []
    for i in range(0, len(stream), size):
        buf.feed(stream[i : i + size])
        got += lines_of(buf)
    assert got == lines


def test_line_too_long_is_raised_before_it_is_buffered() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 11)
    with pytest.raises(LineTooLong):
        buf.next_line()


def test_line_at_the_limit_is_accepted_with_crlf() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 10 + b"\r")
    assert buf.next_line() is None
    buf.feed(b"\n")
    assert buf.next_line() == b"x" * 10


def test_complete_line_over_the_limit() -> None:
    buf = LineBuffer(4)
    buf.feed(b"12345\n")
    with pytest.raises(LineTooLong):
        buf.next_line()


def test_byte_at_a_time_scans_each_byte_once() -> None:
    """Linear time: feeding n bytes one at a time searches O(n) bytes in all.
    Checked by counting, not timing: the scan offset only moves forward."""
    buf = LineBuffer(1 << 20)
    for _ in range(10000):
        buf.feed(b"a")
        assert buf.next_line() is None
    assert buf._scanned == 10000  # nothing was rescanned
    buf.feed(b"\n")
    assert buf.next_line() == b"a" * 10000


def test_consumed_bytes_are_released() -> None:
    buf = LineBuffer(100)
    for _ in range(10000):
        buf.feed(b"0123456789\n")
        assert buf.next_line() == b"0123456789"
    assert len(buf._buf) < 10000  # compacted, not grown to 110 kB


# -- endpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:7", Endpoint("tcp", "127.0.0.1", 7)),
        ("127.0.0.1:7", Endpoint("tcp", "127.0.0.1", 7)),
        ("localhost:0", Endpoint("tcp", "localhost", 0)),
        ("tcp:[::1]:8080", Endpoint("tcp", "::1", 8080)),
        ("udp:[::]:53", Endpoint("udp", "::", 53)),
        ("udp:0.0.0.0:65535", Endpoint("udp", "0.0.0.0", 65535)),
        ("tcp::80", Endpoint("tcp", "", 80)),
        ("unix:/tmp/x.sock", Endpoint("unix", path="/tmp/x.sock")),
        ("unixgram:rel/x.sock", Endpoint("unixgram", path="rel/x.sock")),
        ("unix:/tmp/with:colon", Endpoint("unix", path="/tmp/with:colon")),
    ],
)
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected
    assert parse_endpoint(str(expected)) == expected  # prints back as it parses


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("tcp:127.0.0.1", "no port"),
        ("127.0.0.1", "no port"),
        ("tcp:127.0.0.1:http", "not a number"),
        ("tcp:127.0.0.1:65536", "out of range"),
        ("tcp:127.0.0.1:-1", "not a number"),
        ("tcp:::1:80", "brackets"),
        ("tcp:[::1]80", "[IPV6]:PORT"),
        ("tcp:[nothex]:80", "not an IPv6"),
        ("sctp:host:80", "unknown transport"),
        ("unix:", "no socket path"),
        ("unix:/tmp/a\0b", "NUL"),
        ("tcp:bad host:1", "white space"),
    ],
)
def test_bad_endpoints(text: str, message: str) -> None:
    with pytest.raises(EndpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_endpoint(text)


@given(st.text(max_size=40))
def test_parse_endpoint_never_crashes(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except EndpointError:
        return
    assert isinstance(endpoint, Endpoint)
