"""The raw baseline for tls_bench: a uvloop ``asyncio.Protocol`` echo over
TLS, what a person would write by hand.

    python uvloop_tls.py --cert CHAIN.pem [--key KEY.pem] [--port 0]

Its ``ssl.SSLContext`` is built exactly as ``sockworks._tls.server_context``
builds a listener's (without client certificates or ALPN, as tls_bench runs
sockworks): the library's server defaults (``Purpose.CLIENT_AUTH``: its
cipher list, no compression), TLS 1.2 at least, an EOF without close_notify
not fatal, the same certificate and key. tls_bench checks before measuring
that both servers negotiate the same version and cipher. The ready line is
``listening on tls:127.0.0.1:PORT``, as sockworks writes it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys

HOST = "127.0.0.1"


def server_context(cert: str, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    context.load_cert_chain(cert, key)
    return context


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(port: int, context: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Echo, HOST, port, backlog=511, ssl=context)
    bound = server.sockets[0].getsockname()[1]
    sys.stderr.write(f"listening on tls:{HOST}:{bound}\n")
    sys.stderr.flush()
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, server_context(args.cert, args.key)))


if __name__ == "__main__":
    main()
