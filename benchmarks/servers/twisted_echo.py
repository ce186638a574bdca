"""Twisted echo (the default reactor: epoll on Linux)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, parse_args, ready
from twisted.internet import protocol, reactor


class Echo(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


def main() -> None:
    args = parse_args(__doc__ or "")
    factory = protocol.Factory.forProtocol(Echo)
    port = reactor.listenTCP(args.port, factory, backlog=511, interface=HOST)
    reactor.callWhenRunning(ready, port.getHost().port)
    reactor.run()  # stops on SIGINT/SIGTERM


if __name__ == "__main__":
    main()
