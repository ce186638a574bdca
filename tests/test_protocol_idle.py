"""The idle timeout of the sans-I/O and async drivers: their data path
reads no clock, the timer looks at the byte counter every timeout / 20. A
silent peer must be cut off never early and at most about 5 % late; a peer
that keeps sending, with pauses shorter than the timeout, must never be cut
off."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from sockworks import Limits, Output, Reply, Stream, StreamProtocol
from sockworks.testing import running


class Echo(StreamProtocol):
    def on_data(self, data: bytes) -> Output:
        return data

    def on_timeout(self) -> Output:
        return Reply(data=b"bye\n", close=True, reason="idle timeout")


async def echo_async(stream: Stream) -> None:
    # An idle timeout closes the connection under the handler: read() ends.
    while data := await stream.read():
        await stream.write(data)


STYLES: dict[str, Any] = {"protocol": Echo, "async": echo_async}


def _open(srv: object) -> socket.socket:
    endpoint = srv.endpoint()  # type: ignore[attr-defined]
    return socket.create_connection((endpoint.host, endpoint.port), timeout=10)


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("style", STYLES)
def test_silent_peer_cut_off_after_last_data_not_early(style: str) -> None:
    timeout = 0.6
    with running(STYLES[style], limits=Limits(idle_timeout=timeout)) as srv, _open(srv) as sock:
        time.sleep(0.2)  # the timer has looked a few times meanwhile
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        last = time.monotonic()
        assert _until_closed(sock) == (b"bye\n" if style == "protocol" else b"")
        waited = time.monotonic() - last
    assert waited >= timeout - 0.005  # loop clock resolution
    assert waited < timeout * 1.05 + 0.5  # generous for a loaded machine


@pytest.mark.parametrize("style", STYLES)
def test_peer_with_short_pauses_is_never_cut_off(style: str) -> None:
    timeout = 0.5
    with running(STYLES[style], limits=Limits(idle_timeout=timeout)) as srv, _open(srv) as sock:
        for i in range(8):  # 8 x 0.3 s: far longer than one timeout in all
            sock.sendall(b"%d" % i)
            assert sock.recv(100) == b"%d" % i
            time.sleep(0.3)
        sock.sendall(b"end")
        assert sock.recv(100) == b"end"
