"""Raw asyncio echo servers: an asyncio.Protocol or streams, on uvloop or
asyncio's default loop.

    python asyncio_echo.py uvloop-protocol|uvloop-streams|asyncio-protocol|asyncio-streams
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, parse_args, ready


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def handle_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(style: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    if style.endswith("protocol"):
        server = await loop.create_server(EchoProtocol, HOST, port, backlog=511)
    else:
        server = await asyncio.start_server(handle_streams, HOST, port, backlog=511)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ready(server.sockets[0].getsockname()[1])
    await stop.wait()
    server.close()


def main() -> None:
    styles = ("uvloop-protocol", "uvloop-streams", "asyncio-protocol", "asyncio-streams")
    args = parse_args(__doc__ or "", styles)
    if args.style.startswith("uvloop"):
        import uvloop

        uvloop.run(serve(args.style, args.port))
    else:
        asyncio.run(serve(args.style, args.port))


if __name__ == "__main__":
    main()
