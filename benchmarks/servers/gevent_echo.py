"""gevent StreamServer echo: blocking-style code on greenlets."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gevent  # noqa: E402
from _common import HOST, parse_args, ready  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def handle(sock: socket.socket, address: object) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while data := sock.recv(65536):
            sock.sendall(data)
    except ConnectionError:
        pass


def main() -> None:
    args = parse_args(__doc__ or "")
    server = StreamServer((HOST, args.port), handle, backlog=511)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    ready(server.address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
