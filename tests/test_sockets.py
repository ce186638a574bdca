"""Listeners and the seeds' socket options, checked on the real sockets."""

from __future__ import annotations

import socket
import struct

import pytest
from conftest import CLIProcess, connect, has_ipv6, recv_all

import sockworks
from sockworks import SocketOptions
from sockworks.protocols.seeds import Echo, EchoDatagram, Thanks
from sockworks.testing import running


def test_accepted_sockets_carry_the_options() -> None:
    seen: dict[str, int] = {}

    def inspect(conn: sockworks.BlockingConnection) -> None:
        s = conn.sock
        seen["nodelay"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        seen["keepalive"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        seen["sndbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        seen["rcvbuf"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        onoff, linger = struct.unpack("ii", s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        seen["linger"] = linger if onoff else -1
        conn.sendall(b"ok")

    options = SocketOptions(nodelay=True, keepalive=True, linger=3, sndbuf=65536, rcvbuf=32768)
    with running(inspect, options=options) as srv, connect(srv.endpoint()) as sock:
        assert recv_all(sock) == b"ok"
    assert seen["nodelay"] == 1
    assert seen["keepalive"] == 1
    assert seen["linger"] == 3
    # Linux doubles the requested buffer sizes for its bookkeeping.
    assert seen["sndbuf"] >= 65536
    assert seen["rcvbuf"] >= 32768


def test_defaults_nodelay_on_keepalive_off() -> None:
    seen: list[int] = []

    def inspect(conn: sockworks.BlockingConnection) -> None:
        seen.append(conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        seen.append(conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    with running(inspect) as srv, connect(srv.endpoint()) as sock:
        recv_all(sock)
    assert seen == [1, 0]


def test_listener_options_reuseaddr_backlog_broadcast() -> None:
    options = SocketOptions(broadcast=True, backlog=7)
    echo = sockworks.ProtocolDriver(stream=Echo, datagram=EchoDatagram)
    with running(echo, "tcp:127.0.0.1:0", "udp:127.0.0.1:0", options=options) as srv:
        tcp, udp = (b.sock for b in srv.server._bound)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST) == 1


def test_restart_meets_no_address_in_use(cli: type[CLIProcess]) -> None:
    """The server closes first (thanks), leaving TIME_WAIT on its side; a
    restart on the same port still binds, thanks to SO_REUSEADDR."""
    proc = cli(["serve", "thanks", "-l", "tcp:127.0.0.1:0"])
    (endpoint,) = proc.wait_listening()
    for _ in range(3):
        with connect(endpoint) as sock:
            assert recv_all(sock) == b"thank you for connecting"
    assert proc.stop() == 0
    again = cli(["serve", "thanks", "-l", str(endpoint)])
    assert again.wait_listening() == [endpoint]
    assert again.stop() == 0


def test_port_zero_reports_the_real_port() -> None:
    echo = sockworks.ProtocolDriver(stream=Echo, datagram=EchoDatagram)
    with running(echo, "tcp:127.0.0.1:0", "udp:127.0.0.1:0") as srv:
        ports = {e.port for e in srv.endpoints}
    assert 0 not in ports


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback on this machine")
def test_ipv6_only_and_dual_stack() -> None:
    with running(Echo, "tcp:[::1]:0", "tcp::0") as srv:
        v6_only, dual = srv.endpoints
        assert str(v6_only).startswith("tcp:[::1]:")
        with connect(v6_only) as sock:
            sock.sendall(b"6")
            assert sock.recv(1) == b"6"
        # An empty host is every address, IPv4 and IPv6.
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, dual.port), timeout=5) as sock:
                sock.sendall(b"d")
                assert sock.recv(1) == b"d"


def test_two_services_cannot_share_a_listener() -> None:
    a = sockworks.ServiceConfig.create(Echo, ["tcp:127.0.0.1:7999"], name="a")
    b = sockworks.ServiceConfig.create(Thanks, ["tcp:127.0.0.1:7999"], name="b")
    with pytest.raises(sockworks.ConfigError, match="given twice"):
        sockworks.Server([a, b]).bind()
