"""The smallest end-to-end check: the CLI serves echo over TCP and UDP."""

from __future__ import annotations

from conftest import connect, datagram_exchange


def test_echo_tcp_and_udp(cli):  # type: ignore[no-untyped-def]
    server = cli(["serve", "echo", "-l", "tcp:127.0.0.1:0", "-l", "udp:127.0.0.1:0"])
    tcp, udp = server.wait_listening(2)
    with connect(tcp) as sock:
        sock.sendall(b"hello\n")
        assert sock.recv(100) == b"hello\n"
    assert datagram_exchange(udp, b"ping")[0] == b"ping"
    assert server.stop() == 0
