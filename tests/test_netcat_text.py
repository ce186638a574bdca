"""The netcat tool's pure helpers, with byte strings alone (no sockets), and
the Python API in-process."""

from __future__ import annotations

import os
import queue
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockworks import Endpoint, UsageError, netcat
from sockworks.netcat import (
    AddressFilter,
    CrlfTranslator,
    hexdump,
    parse_ports,
    parse_source,
    split_host_ports,
)


def test_port_lists() -> None:
    assert parse_ports("20-25,80,7000-7002") == [20, 21, 22, 23, 24, 25, 80, 7000, 7001, 7002]
    assert parse_ports("80,80, 22") == [22, 80]
    assert parse_ports("65535") == [65535]


@pytest.mark.parametrize("bad", ["", "0", "65536", "25-20", "a", "1-", "-5", "1,,2", "٣"])
def test_bad_port_lists(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_ports(bad)


def test_host_ports() -> None:
    assert split_host_ports("127.0.0.1:20-21") == ("127.0.0.1", [20, 21])
    assert split_host_ports("tcp:localhost:80") == ("localhost", [80])
    assert split_host_ports("[::1]:22,80") == ("::1", [22, 80])
    for bad in ("127.0.0.1", ":80", "[::1:80"):
        with pytest.raises(UsageError):
            split_host_ports(bad)


def test_source() -> None:
    assert parse_source("127.0.0.1") == ("127.0.0.1", 0)
    assert parse_source("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert parse_source("[::1]:5000") == ("::1", 5000)
    assert parse_source("::1") == ("::1", 0)
    assert parse_source("[::1]") == ("::1", 0)
    for bad in ("127.0.0.1:x", "[::1]x", "h:70000"):
        with pytest.raises(UsageError):
            parse_source(bad)


def test_hexdump_format() -> None:
    assert hexdump(b"hello\n", 0, ">") == (
        "> 00000000  68 65 6c 6c 6f 0a" + " " * 33 + "|hello.|\n"
    )
    lines = hexdump(bytes(range(256)), 0x100, "<").splitlines()
    assert len(lines) == 16
    assert lines[0].startswith("< 00000100  00 01 02 03 04 05 06 07  08 09")
    assert lines[-1].endswith("|................|")
    assert hexdump(b"") == ""


@given(st.binary(max_size=300))
def test_hexdump_round_trip(data: bytes) -> None:
    recovered = bytearray()
    for line in hexdump(data, 0, ">").splitlines():
        recovered += bytes.fromhex(line[12:61].replace("  ", " "))
    assert bytes(recovered) == data


def crlf_reference(data: bytes) -> bytes:
    out = bytearray()
    for i, b in enumerate(data):
        if b == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            out += b"\r"
        out.append(b)
    return bytes(out)


@given(st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")),
       st.integers(min_value=1, max_value=20))
def test_crlf_in_every_chunk_size(data: bytes, size: int) -> None:
    translator = CrlfTranslator()
    out = b"".join(translator.feed(data[i : i + size]) for i in range(0, len(data), size))
    assert out == crlf_reference(data)


def test_crlf_examples() -> None:
    t = CrlfTranslator()
    assert t.feed(b"a\nb\r\n") == b"a\r\nb\r\n"
    assert t.feed(b"c\r") == b"c\r"
    assert t.feed(b"\nd\n") == b"\nd\r\n"


def test_address_filter() -> None:
    f = AddressFilter.parse(allow=["127.0.0.0/8", "::1"], deny=["127.0.0.2"])
    assert f.permits("127.0.0.1")
    assert not f.permits("127.0.0.2")
    assert f.permits("::1")
    assert f.permits("::ffff:127.0.0.1")
    assert not f.permits("10.0.0.1")
    assert f.permits("")  # unix peers have no address
    deny_only = AddressFilter.parse(deny=["10.0.0.0/8"])
    assert deny_only.permits("192.0.2.1") and not deny_only.permits("10.1.2.3")
    # The most specific rule decides; deny wins a tie.
    specific = AddressFilter.parse(allow=["10.1.0.0/16"], deny=["10.0.0.0/8"])
    assert specific.permits("10.1.2.3") and not specific.permits("10.2.0.1")
    tie = AddressFilter.parse(allow=["10.0.0.0/8"], deny=["10.0.0.0/8"])
    assert not tie.permits("10.0.0.1")
    assert not AddressFilter()
    with pytest.raises(UsageError):
        AddressFilter.parse(allow=["nonsense"])


# -- the Python API, in-process (these two use loopback sockets) ----------------


def test_api_connect_and_listen_in_process(tmp_path: Path) -> None:
    endpoints: queue.Queue[Endpoint] = queue.Queue()
    received = tmp_path / "received"
    reply = bytes(range(256)) * 4
    out_fd = os.open(received, os.O_WRONLY | os.O_CREAT)
    reply_r, reply_w = os.pipe()
    os.write(reply_w, reply)
    os.close(reply_w)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            netcat.listen("tcp:127.0.0.1:0", stdin=reply_r, stdout=out_fd,
                          hooks=netcat.Hooks(listening=endpoints.put))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    endpoint = endpoints.get(timeout=10)
    data_r, data_w = os.pipe()
    os.write(data_w, b"to the listener\n")
    os.close(data_w)
    got = tmp_path / "got"
    got_fd = os.open(got, os.O_WRONLY | os.O_CREAT)
    netcat.connect(endpoint, netcat.NetcatOptions(connect_timeout=5), stdin=data_r, stdout=got_fd)
    server.join(10)
    for fd in (out_fd, got_fd, reply_r, data_r):
        os.close(fd)
    assert not errors and not server.is_alive()
    assert got.read_bytes() == reply
    assert received.read_bytes() == b"to the listener\n"


def test_api_errors_and_scan() -> None:
    with socket.create_server(("127.0.0.1", 0)) as open_one:
        port = open_one.getsockname()[1]
        assert netcat.scan("127.0.0.1", [port], timeout=2) == [port]
    with pytest.raises(netcat.NetworkError, match="connection refused"):
        netcat.connect(f"tcp:127.0.0.1:{port}", stdin=None)
    with pytest.raises(UsageError):
        netcat.connect("udp:127.0.0.1:9", netcat.NetcatOptions(tls=netcat.TLSOptions()))
