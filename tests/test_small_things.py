"""One implementation of each small thing: the host:port parser and port
validator every caller shares, the atomic file writer of the Gopher client,
and the Greeting protocol on the shared LineBuffer."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockworks import Endpoint, EndpointError, LineBuffer, UsageError, parse_endpoint
from sockworks._endpoint import parse_port, partition_host_port, split_host_port
from sockworks._errors import ConfigError
from sockworks._files import atomic_writer, write_atomic
from sockworks.cli.serve import _port as cli_port
from sockworks.gopher import client as gopher_client
from sockworks.gopher.client import GopherError, ServerError, download
from sockworks.gopher.url import Location, parse_target, parse_url
from sockworks.gopher.url import split_host_port as gopher_split
from sockworks.netcat import parse_ports, parse_source, split_host_ports
from sockworks.protocols.seeds import Greeting
from sockworks.services.gopher import parse_advertise
from sockworks.testing import ProtocolTester, chunkings

# -- the port validator -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "zero_ok", "port"),
    [("1", False, 1), ("80", False, 80), ("65535", False, 65535), ("0080", False, 80),
     ("0", True, 0), ("000", True, 0), ("65535", True, 65535)],
)
def test_good_ports(text: str, zero_ok: bool, port: int) -> None:
    assert parse_port(text, zero_ok=zero_ok) == port


@pytest.mark.parametrize(
    ("text", "zero_ok", "message"),
    [
        ("", False, "no port number"),
        ("0", False, "port 0 is out of range (1-65535)"),
        ("65536", True, "port 65536 is out of range (0-65535)"),
        ("9" * 5000, True, "out of range"),  # no int() of 5000 digits
        ("-1", True, "port '-1' is not a number"),
        ("+1", True, "not a number"),
        (" 1", True, "not a number"),
        ("1.0", True, "not a number"),
        ("http", True, "not a number"),
        ("٣", True, "not a number"),  # a digit to isdigit(), not to a person
        ("²", True, "not a number"),
    ],
)
def test_bad_ports(text: str, zero_ok: bool, message: str) -> None:
    with pytest.raises(EndpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_port(text, zero_ok=zero_ok)


def test_port_errors_name_their_subject() -> None:
    with pytest.raises(EndpointError, match=r"^--thing 'x': port 'x' is not a number$"):
        parse_port("x", subject="--thing 'x'")


# -- the host:port parser -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "zero_ok", "expected"),
    [
        ("127.0.0.1:7", None, False, ("127.0.0.1", 7)),
        ("localhost:65535", None, False, ("localhost", 65535)),
        ("example.org:70", None, False, ("example.org", 70)),
        ("[::1]:8080", None, False, ("::1", 8080)),
        ("[fe80::1%eth0]:22", None, False, ("fe80::1%eth0", 22)),
        ("[::ffff:1.2.3.4]:5", None, False, ("::ffff:1.2.3.4", 5)),
        (":80", None, False, ("", 80)),  # all addresses, when binding
        ("localhost:0", None, True, ("localhost", 0)),
        ("bücher.example:1", None, False, ("bücher.example", 1)),
        # a default port makes the port optional
        ("example.org", 70, False, ("example.org", 70)),
        ("example.org:7070", 70, False, ("example.org", 7070)),
        ("[::1]", 70, False, ("::1", 70)),
        ("::1", 70, False, ("::1", 70)),
        ("fe80::1%eth0", 0, True, ("fe80::1%eth0", 0)),
        ("2001:db8::1", 0, True, ("2001:db8::1", 0)),
        ("", 70, False, ("", 70)),
    ],
)
def test_good_host_ports(
    text: str, default: int | None, zero_ok: bool, expected: tuple[str, int]
) -> None:
    assert split_host_port(text, default_port=default, zero_ok=zero_ok) == expected


@pytest.mark.parametrize(
    ("text", "default", "message"),
    [
        ("127.0.0.1", None, "has no port (expected HOST:PORT)"),
        ("", None, "has no port"),
        ("127.0.0.1:", None, "no port number"),
        ("127.0.0.1:", 70, "no port number"),
        ("127.0.0.1:http", None, "port 'http' is not a number"),
        ("127.0.0.1:0", None, "out of range (1-65535)"),
        ("127.0.0.1:65536", 70, "out of range"),
        ("::1:80", None, "write IPv6 addresses in brackets"),
        ("::1", None, "write IPv6 addresses in brackets"),
        ("h:p:q", 70, "write IPv6 addresses in brackets"),
        ("[::1]80", None, "expected [IPV6]:PORT"),
        ("[::1]", None, "expected [IPV6]:PORT"),
        ("[::1:80", 70, "missing ']'"),
        ("[nothex]:80", None, "'nothex' is not an IPv6 address"),
        ("[]:80", None, "is not an IPv6 address"),
        ("[1.2.3.4]:80", None, "is not an IPv6 address"),
        ("bad host:1", None, "white space"),
        ("tab\there:1", None, "white space"),
        ("nul\0here:1", None, "no host name has"),
        ("sur\udce9:1", None, "no host name has"),
    ],
)
def test_bad_host_ports(text: str, default: int | None, message: str) -> None:
    pattern = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    with pytest.raises(EndpointError, match=pattern.replace(")", r"\)")):
        split_host_port(text, default_port=default)


def test_partition_leaves_the_port_text_to_the_caller() -> None:
    assert partition_host_port("10.0.0.1:20-25,80") == ("10.0.0.1", "20-25,80")
    assert partition_host_port("[::1]:1,2") == ("::1", "1,2")
    assert partition_host_port("host", port_optional=True) == ("host", None)
    with pytest.raises(EndpointError, match=r"expected HOST:PORTS"):
        partition_host_port("host", port_name="PORTS")


# Strings built from the characters that matter to the parser, so hypothesis
# reaches every branch, plus arbitrary text and bytes decoded as a shell would.
PIECES = st.text(alphabet=st.sampled_from("[]:%0123456789abcdef.fe80 \t\0é-,٣"), max_size=24)
ANY_TEXT = st.one_of(
    PIECES,
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


def _valid_host(host: str) -> bool:
    return isinstance(host, str) and not any(c.isspace() or ord(c) < 32 for c in host)


@settings(max_examples=400)
@given(ANY_TEXT, st.sampled_from([None, 0, 70]), st.booleans())
def test_split_host_port_returns_an_address_or_a_usage_error(
    text: str, default: int | None, zero_ok: bool
) -> None:
    try:
        host, port = split_host_port(text, default_port=default, zero_ok=zero_ok)
    except EndpointError as exc:
        assert isinstance(exc, UsageError)
        assert "\n" not in str(exc) or "\n" in text  # one line, unless the input had one
        return
    assert _valid_host(host)
    assert isinstance(port, int)
    low = 0 if zero_ok or port == default else 1
    assert low <= port <= 65535
    if default is None:
        assert text.endswith(f":{port}") or text.rpartition(":")[2].lstrip("0") == str(port)


# Every public wrapper keeps the same contract: an answer or a UsageError.
WRAPPERS: list[Callable[[str], object]] = [
    parse_endpoint,
    gopher_split,
    parse_target,
    parse_url,
    parse_source,
    split_host_ports,
    parse_ports,
    parse_advertise,
]


@settings(max_examples=300)
@given(ANY_TEXT, st.sampled_from(WRAPPERS))
def test_every_wrapper_answers_or_raises_a_usage_error(
    text: str, parse: Callable[[str], object]
) -> None:
    try:
        parse(text)
    except UsageError:
        pass


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    ),
    st.integers(0, 65535),
)
def test_formatted_addresses_parse_back(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert split_host_port(text, zero_ok=True) == (host, port)
    assert parse_endpoint("udp:" + text) == Endpoint("udp", host, port)


# -- the callers: same forms, clear messages -------------------------------------------


def test_gopher_addresses() -> None:
    assert gopher_split("quux.org") == ("quux.org", 70)
    assert gopher_split("[::1]") == ("::1", 70)
    assert gopher_split("::1") == ("::1", 70)
    assert parse_url("gopher://[::1]:7070/0/a") == Location("::1", 7070, "/a", "0")
    with pytest.raises(UsageError, match=r"address 'h:99999': port 99999 is out of range"):
        parse_url("gopher://h:99999/")
    with pytest.raises(UsageError, match=r"address 'h:0': port 0 is out of range \(1-65535\)"):
        parse_target("h:0")


def test_netcat_addresses() -> None:
    assert parse_source("10.1.2.3") == ("10.1.2.3", 0)
    assert parse_source("10.1.2.3:0") == ("10.1.2.3", 0)
    assert parse_source(":5000") == ("", 5000)
    with pytest.raises(UsageError, match=r"^--source '10.1.2.3:x': port 'x' is not a number$"):
        parse_source("10.1.2.3:x")
    with pytest.raises(UsageError, match=r"has no port \(expected HOST:PORTS\)"):
        split_host_ports("127.0.0.1")
    with pytest.raises(UsageError, match=r"has no host"):
        split_host_ports(":80")
    with pytest.raises(UsageError, match=r"port list '20-x': port 'x' is not a number"):
        parse_ports("20-x")
    with pytest.raises(UsageError, match=r"port 0 is out of range \(1-65535\)"):
        split_host_ports("h:0-3")


def test_advertise() -> None:
    assert parse_advertise("gopher.example.org:70") == ("gopher.example.org", 70)
    assert parse_advertise("[2001:db8::1]:7070") == ("2001:db8::1", 7070)
    for bad, message in [("gopher.example.org", "has no port"), (":70", "has no host"),
                         ("[::1]", r"expected \[IPV6\]:PORT"), ("h:0", "out of range")]:
        with pytest.raises(ConfigError, match=rf"^--advertise '.*'.*{message}"):
            parse_advertise(bad)


def test_serve_drop_source_port_option() -> None:
    assert cli_port("5353") == 5353
    for bad, message in [("70000", "out of range"), ("0", "out of range"),
                         ("x", "not a number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            cli_port(bad)


# -- the atomic writer ------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_write_creates_the_file_with_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_atomic(target, b"payload")
    assert target.read_bytes() == b"payload"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")
    with atomic_writer(str(target)) as f:
        f.write(b"new ")
        f.write(b"content")
        assert target.read_bytes() == b"old"  # nothing visible until the end
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_an_exception_leaves_the_target_untouched_and_no_temp_file(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"precious")
    with pytest.raises(type(error)), atomic_writer(target) as f:
        f.write(b"half of it")
        raise error
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_failed_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(TypeError), atomic_writer(target) as f:
        f.write("not bytes")  # type: ignore[call-overload]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_fsync_leaves_the_target_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"precious")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"x" * 1000)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "such" / "file", b"x")


def _fake_stream(chunks: list[bytes], error: BaseException | None) -> Callable[..., int]:
    def stream(loc: Location, sink: Callable[[bytes], object], **kwargs: object) -> int:
        for chunk in chunks:
            sink(chunk)
        if error is not None:
            raise error
        return sum(map(len, chunks))

    return stream


@pytest.mark.parametrize(
    ("chunks", "error", "raised"),
    [
        ([b"\x01" * 1000], GopherError("connection reset by h:70"), GopherError),
        ([b"\x01" * 1000], KeyboardInterrupt(), KeyboardInterrupt),
        ([b"3No such file\t\terror.host\t1\r\n"], None, ServerError),
    ],
)
def test_gopher_download_is_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    chunks: list[bytes], error: BaseException | None, raised: type[BaseException],
) -> None:
    target = tmp_path / "big.iso"
    target.write_bytes(b"the old copy")
    monkeypatch.setattr(gopher_client, "stream", _fake_stream(chunks, error))
    with pytest.raises(raised):
        download(Location("h", 70, "/big.iso", "9"), str(target))
    assert target.read_bytes() == b"the old copy"
    assert [p.name for p in tmp_path.iterdir()] == ["big.iso"]


def test_gopher_download_saves_the_whole_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gopher_client, "stream", _fake_stream([b"ab", b"cd"], None))
    seen: list[int] = []
    assert download(Location("h"), str(tmp_path / "f"), progress=seen.append) == 4
    assert (tmp_path / "f").read_bytes() == b"abcd"
    assert seen == [2, 2]


# -- Greeting on the shared LineBuffer ----------------------------------------------------


def test_line_buffer_peek_does_not_consume() -> None:
    buf = LineBuffer(16)
    buf.feed(b"ab\r\ncd")
    assert buf.peek() == b"ab\r\ncd"
    assert buf.next_line() == b"ab"
    assert buf.next_line() is None
    assert buf.peek() == b"cd"
    buf.feed(b"e\n")
    assert buf.next_line() == b"cde"
    assert buf.peek() == b""


class OldGreeting(Greeting):
    """The hand-rolled reader Greeting had before it used LineBuffer, kept
    as the reference: the bytes sent must not change."""

    def __init__(self, token: bytes, max_line: int) -> None:
        super().__init__(token, max_line)
        self.max_line = max_line
        self.received = bytearray()

    def on_data(self, data: bytes) -> object:  # type: ignore[override]
        self.received += data
        nl = self.received.find(b"\n")
        if nl >= 0:
            return self._answer(bytes(self.received[:nl]).strip())
        if len(self.received) > self.max_line:
            return self._answer(b"", reason="token too long")
        pending = bytes(self.received).strip()
        if pending == self.token or not self.token.startswith(bytes(self.received).lstrip()):
            return self._answer(pending)
        return None

    def on_eof(self) -> object:  # type: ignore[override]
        rest = bytes(self.received).strip()
        return self._answer(rest) if rest else super().on_eof()


def _session(proto: Greeting, chunks: list[bytes]) -> bytes:
    t = ProtocolTester(proto)
    t.connect()
    t.feed_chunks(chunks)
    if not t.closed:
        t.eof()
    assert t.closed
    return bytes(t.sent)


GREETING_BYTES = st.binary(max_size=24) | st.text(
    alphabet=st.sampled_from("1s3cret \r\n\t"), max_size=24).map(str.encode)


@settings(max_examples=300)
@given(GREETING_BYTES, st.sampled_from([b"1", b"s3cret", b"1" * 10]), st.sampled_from([4, 8192]))
def test_greeting_sends_what_it_always_sent(data: bytes, token: bytes, max_line: int) -> None:
    # One difference, by design: a first line longer than max_line (and not
    # decided before it grew that long) was answered by its content when it
    # arrived in one piece and refused when it came in small pieces; now it
    # is refused however it arrives.
    first_line = data.partition(b"\n")[0].removesuffix(b"\r")
    over_limit = b"\n" in data and len(first_line) > max_line
    for chunks in chunkings(data):
        new = _session(Greeting(token, max_line), chunks)
        old = _session(OldGreeting(token, max_line), chunks)
        if over_limit:
            assert new in (old, Greeting.GO_AWAY), chunks
        else:
            assert new == old, chunks


def test_greeting_refuses_an_overlong_line_however_it_arrives() -> None:
    data = b" " * 10 + b"1\r\n"
    for chunks in chunkings(data):
        assert _session(Greeting(b"1", max_line=8), chunks) == Greeting.GO_AWAY, chunks
