"""The classic services on real loopback sockets, run by the CLI as a user
runs them (``sockworks serve --config`` and ``sockworks serve NAME``), on
port 0."""

from __future__ import annotations

import calendar
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLIProcess, connect, datagram_exchange, recv_all

from sockworks import Endpoint, parse_endpoint
from sockworks.protocols.classic import CHARGEN_PERIOD, DEFAULT_QUOTES, chargen_line

CLASSIC = ("echo", "discard", "daytime", "qotd", "chargen", "time")
NAMED = re.compile(r"sockworks: (\S+) listening on (\S+)")
MY_QUOTES = "Quote one, written\nfor this test.\n\nQuote two.\n"


def listeners(proc: CLIProcess, count: int) -> dict[tuple[str, str], Endpoint]:
    proc.wait_listening(count)
    found = {}
    for line in proc.lines:
        m = NAMED.search(line)
        if m:
            ep = parse_endpoint(m.group(2))
            found[(m.group(1), ep.transport)] = ep
    return found


@pytest.fixture(scope="module")
def classic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[CLIProcess, dict[tuple[str, str], Endpoint]]
]:
    tmp = tmp_path_factory.mktemp("classic")
    (tmp / "quotes.txt").write_text(MY_QUOTES)
    lines: list[str] = []
    for name in CLASSIC:
        lines += [f"[services.{name}]", 'listen = ["tcp:127.0.0.1:0", "udp:127.0.0.1:0"]']
    lines += [
        "[services.myquotes]",
        'service = "qotd"',
        'quotes = "quotes.txt"',
        'listen = ["tcp:127.0.0.1:0", "udp:127.0.0.1:0"]',
        "max_amplification = 'off'",
    ]
    (tmp / "classic.toml").write_text("\n".join(lines) + "\n")
    proc = CLIProcess(["serve", "--config", str(tmp / "classic.toml")])
    try:
        yield proc, listeners(proc, 2 * len(CLASSIC) + 2)
    finally:
        assert proc.stop() == 0


Server = tuple[CLIProcess, dict[tuple[str, str], Endpoint]]


def udp_reply(endpoint: Endpoint, payload: bytes, timeout: float = 5.0) -> bytes | None:
    try:
        return datagram_exchange(endpoint, payload, timeout=timeout)[0]
    except TimeoutError:
        return None


# -- echo, discard ---------------------------------------------------------------


def test_echo_tcp_every_byte(classic: Server) -> None:
    _, eps = classic
    data = bytes(range(256)) * 64
    with connect(eps["echo", "tcp"]) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == data


def test_echo_udp(classic: Server) -> None:
    _, eps = classic
    for payload in (b"x", bytes(range(256)), b"y" * 8000):
        assert udp_reply(eps["echo", "udp"], payload) == payload


def test_discard_tcp_answers_nothing(classic: Server) -> None:
    _, eps = classic
    with connect(eps["discard", "tcp"]) as sock:
        sock.sendall(b"into the void\r\n" * 1000)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b""


def test_discard_udp_answers_nothing(classic: Server) -> None:
    _, eps = classic
    assert udp_reply(eps["discard", "udp"], b"hello", timeout=0.5) is None


# -- daytime, time ---------------------------------------------------------------

DAYTIME = re.compile(
    rb"^(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    rb"(January|February|March|April|May|June|July|August|September|October|November"
    rb"|December) (\d{1,2}), (\d{4}) (\d\d):(\d\d):(\d\d)-UTC\r\n$"
)
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


def daytime_seconds(line: bytes) -> int:
    m = DAYTIME.match(line)
    assert m, line
    month = MONTHS.index(m.group(2).decode()) + 1
    fields = (int(m.group(4)), month, int(m.group(3)), *(int(m.group(i)) for i in (5, 6, 7)))
    return calendar.timegm((*fields, 0, 0, 0))


def test_daytime_tcp_and_udp(classic: Server) -> None:
    _, eps = classic
    before = int(time.time())
    with connect(eps["daytime", "tcp"]) as sock:
        line = recv_all(sock)
    udp = udp_reply(eps["daytime", "udp"], b"")  # an empty request: the reply fits the slack
    after = int(time.time())
    for text in (line, udp):
        assert text is not None
        assert before <= daytime_seconds(text) <= after


def test_time_tcp_and_udp(classic: Server) -> None:
    _, eps = classic
    before = int(time.time()) + 2_208_988_800
    with connect(eps["time", "tcp"]) as sock:
        tcp = recv_all(sock)
    udp = udp_reply(eps["time", "udp"], b"")
    after = int(time.time()) + 2_208_988_800
    for wire in (tcp, udp):
        assert wire is not None and len(wire) == 4
        assert before % 2**32 <= int.from_bytes(wire, "big") <= after % 2**32


# -- qotd --------------------------------------------------------------------------


def test_qotd_tcp_one_quote_then_close(classic: Server) -> None:
    _, eps = classic
    with connect(eps["qotd", "tcp"]) as sock:
        assert recv_all(sock) in DEFAULT_QUOTES


def test_qotd_udp_under_the_amplification_guard(classic: Server) -> None:
    proc, eps = classic
    # An empty request may not get a 100-byte quote: dropped, with a reason.
    assert udp_reply(eps["qotd", "udp"], b"", timeout=0.5) is None
    proc.wait_for(r"qotd: .* datagram dropped: a 0 B request is too short for any quote")
    # A request as long as the longest quote gets one.
    assert udp_reply(eps["qotd", "udp"], b"\0" * 512) in DEFAULT_QUOTES


def test_qotd_quotes_file(classic: Server) -> None:
    _, eps = classic
    mine = {b"Quote one, written\r\nfor this test.\r\n", b"Quote two.\r\n"}
    seen = set()
    for _ in range(20):
        with connect(eps["myquotes", "tcp"]) as sock:
            seen.add(recv_all(sock))
        seen.add(udp_reply(eps["myquotes", "udp"], b""))  # guard off for this one
    assert seen == mine


# -- chargen -----------------------------------------------------------------------


def test_chargen_tcp_pattern(classic: Server) -> None:
    _, eps = classic
    with connect(eps["chargen", "tcp"]) as sock:
        data = b""
        while len(data) < 74 * 300:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    assert data[: 74 * 300] == b"".join(chargen_line(n) for n in range(300))


def test_chargen_udp_never_exceeds_the_request(classic: Server) -> None:
    _, eps = classic
    for size in (1, 50, 100, 600, 2000):
        reply = udp_reply(eps["chargen", "udp"], b"\0" * size)
        assert reply is not None
        assert len(reply) <= min(size, 512)
        assert reply == CHARGEN_PERIOD[: len(reply)]


def test_chargen_client_going_away_is_normal(classic: Server) -> None:
    proc, eps = classic
    with connect(eps["chargen", "tcp"]) as sock:
        port = sock.getsockname()[1]
        assert sock.recv(74) == chargen_line(0)
    # Closing with output unread resets the connection: logged as normal.
    proc.wait_for(rf"chargen: 127\.0\.0\.1:{port} closed .*\(client went away \(normal")
    assert "Traceback" not in proc.log


# -- a slow reader: memory stays bounded -------------------------------------------


def test_chargen_slow_reader_keeps_server_output_bounded(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    max_output = 64 * 1024
    sndbuf = 16 * 1024
    server = cli(["serve", "chargen", "-l", "tcp:127.0.0.1:0",
                  "--max-output", str(max_output), "--sndbuf", str(sndbuf)])
    (endpoint,) = server.wait_listening(1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((endpoint.host, endpoint.port))
    port = sock.getsockname()[1]
    read = 0
    # Read a little, now and then: an unbounded server would have written
    # gigabytes by the end of this loop.
    for _ in range(20):
        data = sock.recv(100)
        assert data
        read += len(data)
        time.sleep(0.05)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.close()
    line = server.wait_for(rf"127\.0\.0\.1:{port} closed .* (\d+) B out").group(0)
    written = int(re.search(r"(\d+) B out", line).group(1))  # type: ignore[union-attr]
    # What the server produced beyond what we read is at most: its output
    # limit, one chunk, and what the two kernels' socket buffers hold.
    chunk = 8 * len(CHARGEN_PERIOD)
    bound = max_output + chunk + 4 * sndbuf + 2 * rcvbuf
    print("chargen slow reader:", written, "B written,", read, "B read, bound", bound)
    assert written - read <= bound, (written, read, bound)


# -- an echo/chargen loop cannot start -----------------------------------------------


def _bound_udp(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
    except OSError as exc:
        s.close()
        pytest.skip(f"cannot bind {host}:{port}: {exc}")
    s.settimeout(0.5)
    return s


def test_echo_chargen_loop_cannot_start(classic: Server) -> None:
    proc, eps = classic
    echo, chargen = eps["echo", "udp"], eps["chargen", "udp"]
    # A datagram to chargen "from" the echo service's port (the spoofed
    # packet of CERT CA-1996-01; here from 127.0.0.2, same port number)...
    with _bound_udp("127.0.0.2", echo.port) as fake_echo:
        fake_echo.sendto(b"x" * 100, (chargen.host, chargen.port))
        proc.wait_for(rf"chargen: 127\.0\.0\.2:{echo.port} datagram dropped: source port")
        with pytest.raises(TimeoutError):
            fake_echo.recvfrom(1000)
    # ...and to echo from chargen's port: neither answers, no loop.
    with _bound_udp("127.0.0.2", chargen.port) as fake_chargen:
        fake_chargen.sendto(b"x" * 100, (echo.host, echo.port))
        proc.wait_for(rf"echo: 127\.0\.0\.2:{chargen.port} datagram dropped: source port")
        with pytest.raises(TimeoutError):
            fake_chargen.recvfrom(1000)


@pytest.mark.parametrize("port", [7, 19])
def test_datagrams_from_well_known_ports_are_dropped(classic: Server, port: int) -> None:
    proc, eps = classic
    with _bound_udp("127.0.0.3", port) as s:  # needs root; skipped otherwise
        s.sendto(b"x", (eps["echo", "udp"].host, eps["echo", "udp"].port))
        proc.wait_for(rf"echo: 127\.0\.0\.3:{port} datagram dropped: source port {port}")
        with pytest.raises(TimeoutError):
            s.recvfrom(100)


# -- the single-service CLI --------------------------------------------------------


def test_serve_time_by_name(cli) -> None:  # type: ignore[no-untyped-def]
    server = cli(["serve", "time", "-l", "tcp:127.0.0.1:0", "-l", "udp:127.0.0.1:0"])
    tcp, udp = server.wait_listening(2)
    with connect(tcp) as sock:
        assert len(recv_all(sock)) == 4
    assert len(datagram_exchange(udp, b"")[0]) == 4
    assert server.stop() == 0


def test_serve_qotd_quotes_option(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    quotes = tmp_path / "q.txt"
    quotes.write_text("Only this one.\n")
    server = cli(["serve", "qotd", "-l", "tcp:127.0.0.1:0", "--quotes", str(quotes)])
    (tcp,) = server.wait_listening(1)
    with connect(tcp) as sock:
        assert recv_all(sock) == b"Only this one.\r\n"
    assert server.stop() == 0
