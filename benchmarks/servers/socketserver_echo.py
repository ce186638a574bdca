"""socketserver.ThreadingTCPServer echo: the standard library's blocking style."""

from __future__ import annotations

import signal
import socket
import socketserver
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, parse_args, ready


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except ConnectionError:
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 511


def main() -> None:
    args = parse_args(__doc__ or "")
    with Server((HOST, args.port), EchoHandler) as server:
        # shutdown() must not run on the serve_forever thread: stop from another.
        def stop(signum: int, frame: object) -> None:
            threading.Thread(target=server.shutdown).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        ready(server.server_address[1])
        server.serve_forever()


if __name__ == "__main__":
    main()
