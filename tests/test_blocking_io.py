"""BlockingConnection's reads: ``recv``, ``read_line``, ``reader`` and every
``makefile()`` share one receive buffer (a LineBuffer), so bytes one of them
buffered are the next one's, in order, and counted once; ``read_line``
keeps its limits. Driven over a socketpair, in one thread: the peer's bytes
are written (and its side shut) before the handler side reads."""

from __future__ import annotations

import socket
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import connect

import sockworks
from sockworks import IdleTimeout, Limits, LineTooLong
from sockworks._buffer import LineBuffer
from sockworks.testing import running


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def make_conn(sock: socket.socket, **limits: Any) -> sockworks.BlockingConnection:
    # The connection needs only its group's limits outside a server.
    group: Any = types.SimpleNamespace(limits=Limits(**limits))
    return sockworks.BlockingConnection(sock, sockworks.Peer("127.0.0.1", 1), group)


def fed(pair: tuple[socket.socket, socket.socket], data: bytes, **limits: Any) -> Any:
    """A connection on one end whose peer sent ``data`` and then EOF."""
    server, client = pair
    client.sendall(data)
    client.shutdown(socket.SHUT_WR)
    return make_conn(server, **limits)


def test_recv_read_line_and_makefile_share_one_buffer(pair: Any) -> None:
    payload = b"alpha\nbravo\ncharlie\r\ndelta\necho\nfoxtrot"
    conn = fed(pair, payload)
    assert conn.read_line() == b"alpha"  # reads the whole payload into the buffer
    assert conn.recv(3) == b"bra"
    f = conn.makefile("rb")
    assert f.readline() == b"vo\n"
    assert conn.reader.read(4) == b"char"
    assert conn.read_line(keep_end=True) == b"lie\r\n"
    assert f.read1(2) == b"de"
    assert conn.recv(100) == b"lta\necho\nfoxtrot"  # the rest of what is buffered
    assert conn.recv(100) == b""
    assert conn.read_line() == b""
    assert f.readline() == b""
    assert conn.stats.bytes_in == len(payload)  # counted once, whoever read it


def test_makefile_text_and_duplex_share_the_buffer(pair: Any) -> None:
    _server, client = pair
    conn = fed(pair, b"one\ntwo\nthree\n")
    assert conn.read_line() == b"one"
    rw = conn.makefile("rwb")
    assert rw.readline() == b"two\n"
    rw.write(b"reply\n")
    text = conn.makefile("r", encoding="utf-8")
    assert text.readline() == "three\n"
    assert client.recv(100) == b"reply\n"
    assert conn.stats.bytes_out == len(b"reply\n")


def test_closing_one_file_leaves_the_buffer_to_the_others(pair: Any) -> None:
    conn = fed(pair, b"first\nsecond\nthird\n")
    with conn.makefile("rb") as f:
        assert f.readline() == b"first\n"
    assert conn.reader.readline() == b"second\n"
    assert conn.recv(100) == b"third\n"


def test_a_closed_file_refuses_reads(pair: Any) -> None:
    conn = fed(pair, b"data\n")
    f = conn.makefile("rb")
    f.close()
    with pytest.raises(ValueError):
        f.readline()
    assert conn.recv(100) == b"data\n"


def test_reader_read_all_readinto_and_readline_size(pair: Any) -> None:
    conn = fed(pair, b"abcdefgh\nijklmnop")
    reader = conn.reader
    assert reader.readline(4) == b"abcd"  # size caps a line
    buf = bytearray(3)
    assert reader.readinto(buf) == 3 and bytes(buf) == b"efg"
    assert reader.peek()[:2] == b"h\n"
    assert conn.read_line() == b"h"
    assert reader.read() == b"ijklmnop"  # to EOF
    assert reader.read() == b""


def test_read_exact_size_reads_past_the_buffer(pair: Any) -> None:
    server, client = pair
    conn = make_conn(server)
    client.sendall(b"head\nbody-")
    assert conn.read_line() == b"head"
    client.sendall(b"0123456789")
    client.shutdown(socket.SHUT_WR)
    assert conn.reader.read(15) == b"body-0123456789"  # buffered bytes, then the socket
    assert conn.reader.read(5) == b""


def test_recv_without_buffered_bytes_reads_the_socket(pair: Any) -> None:
    server, client = pair
    conn = make_conn(server)
    client.sendall(b"x" * 10)
    assert conn.recv(4) == b"xxxx"  # the kernel keeps the rest: nothing buffered
    client.shutdown(socket.SHUT_WR)
    assert conn.read_line() == b"x" * 6
    assert conn.stats.bytes_in == 10


# -- read_line's limits ------------------------------------------------------


def test_read_line_at_the_limit(pair: Any) -> None:
    conn = fed(pair, b"0123456789\n0123456789\r\n0123456789\r\n01234567890\n", max_line=10)
    assert conn.read_line() == b"0123456789"
    assert conn.read_line() == b"0123456789"
    assert conn.read_line(keep_end=True) == b"0123456789\r\n"
    with pytest.raises(LineTooLong):
        conn.read_line()


def test_read_line_too_long_without_a_newline_buffers_a_bounded_amount(pair: Any) -> None:
    server, client = pair
    conn = make_conn(server, max_line=100)
    # More than the socket buffers hold, from another thread: the reader
    # must give up long before the sender is done.
    sender = threading.Thread(target=_send_until_closed, args=(client, b"y" * 4_000_000))
    sender.start()
    try:
        with pytest.raises(LineTooLong):
            conn.read_line()
        # At most one read past the limit was taken from the socket.
        assert conn.stats.bytes_in <= 100 + 65536 + 1
    finally:
        server.shutdown(socket.SHUT_RDWR)
        sender.join(10)


def _send_until_closed(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_after_line_too_long_the_buffered_bytes_come_first(pair: Any) -> None:
    conn = fed(pair, b"x" * 30 + b"\nnext\n", max_line=10)
    with pytest.raises(LineTooLong):
        conn.read_line()
    assert conn.recv(100) == b"x" * 30 + b"\nnext\n"  # nothing skipped or reordered


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_line_buffer_take_line_in_every_chunk_size(size: int) -> None:
    data = b"a\nbb\r\n\nccc" * 3 + b"dddd\n"
    want = data.splitlines(keepends=True)
    buf = LineBuffer(max_line=4)  # take_line has no limit: it is readline()'s
    got: list[bytes] = []
    for i in range(0, len(data), size):
        buf.feed(data[i : i + size])
        while (line := buf.take_line()) is not None:
            got.append(line)
    assert got == want
    buf.feed(b"0123456789")
    assert buf.take_line(4) == b"0123"
    assert buf.take_line(0) == b""
    assert buf.take_line(100) is None
    assert buf.take_rest() == b"456789"


def test_read_line_eof_rest_and_its_limit(pair: Any) -> None:
    conn = fed(pair, b"line\nunterminated", max_line=20)
    assert conn.read_line() == b"line"
    assert conn.read_line() == b"unterminated"
    assert conn.read_line() == b""

    a, b = socket.socketpair()
    with a, b:
        conn = fed((a, b), b"tail\r", max_line=20)
        assert conn.read_line() == b"tail"  # a CR before EOF is a line end
    a, b = socket.socketpair()
    with a, b:
        conn = fed((a, b), b"x" * 21, max_line=20)
        with pytest.raises(LineTooLong):
            conn.read_line()


def test_read_line_keep_end_and_bare_cr(pair: Any) -> None:
    conn = fed(pair, b"a\r\nb\nc\rd\n")
    assert conn.read_line(keep_end=True) == b"a\r\n"
    assert conn.read_line(keep_end=True) == b"b\n"
    assert conn.read_line() == b"c\rd"  # a CR inside a line is data


def test_one_byte_at_a_time(pair: Any) -> None:
    server, client = pair
    conn = make_conn(server, max_line=50)
    seen: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        seen.append(conn.read_line())
        seen.append(conn.recv(1))
        seen.append(conn.read_line())
        done.set()

    thread = threading.Thread(target=read)
    thread.start()
    for byte in b"hello\r\n!world\n":
        client.sendall(bytes([byte]))
    assert done.wait(10)
    thread.join()
    assert seen == [b"hello", b"!", b"world"]


def test_idle_timeout_ends_a_waiting_read_line(pair: Any) -> None:
    server, _client = pair
    conn = make_conn(server)
    conn.idle_expired()  # what the service's sweep calls
    with pytest.raises(IdleTimeout):
        conn.read_line()


def test_activity_is_none_between_calls(pair: Any) -> None:
    conn = fed(pair, b"data\n")
    assert conn.activity() is None
    assert conn.read_line() == b"data"
    assert conn.activity() is None
    conn.sendall(b"out")
    assert conn.activity() is None


def test_sendall_refuses_str_and_after_close(pair: Any) -> None:
    server, _client = pair
    conn = make_conn(server)
    with pytest.raises(sockworks.LocalProtocolError, match="encode it first"):
        conn.sendall("text")  # type: ignore[arg-type]
    conn.shutdown_write()
    with pytest.raises(sockworks.LocalProtocolError, match="shutdown_write"):
        conn.sendall(b"late")
    conn.close()
    with pytest.raises(sockworks.LocalProtocolError, match="close"):
        conn.sendall(b"late")


# -- through a server ----------------------------------------------------------


def test_mixed_reads_through_a_server() -> None:
    seen: list[object] = []
    done = threading.Event()

    def handler(conn: sockworks.BlockingConnection) -> None:
        try:
            seen.append(conn.read_line())
            seen.append(conn.recv(2))
            seen.append(conn.makefile("rb").readline())
            seen.append(conn.reader.read())
            conn.sendall(b"%d" % conn.stats.bytes_in)
        finally:
            done.set()

    with running(handler, limits=Limits(max_line=64)) as srv, connect(srv.endpoint()) as sock:
        sock.sendall(b"GET /\r\nxyz\nbody")
        sock.shutdown(socket.SHUT_WR)
        assert done.wait(10)
        assert sock.recv(100) == b"15"  # every byte counted once
    assert seen == [b"GET /", b"xy", b"z\n", b"body"]
