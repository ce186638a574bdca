"""Raw uvloop baselines for paths_bench: what a person would write by hand.

    python uvloop_raw.py thanks      # asyncio.Protocol: write the seed's line, close
    python uvloop_raw.py udp-echo    # datagram endpoint: every datagram back to its sender

``thanks`` writes exactly what ``sockworks serve thanks`` writes
(``thank you for connecting``, no newline) and closes; ``close()`` sends
what was written first. The ready line is ``listening on tcp:…`` or
``listening on udp:…``, as sockworks writes it.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, parse_args

THANKS = b"thank you for connecting"


class Thanks(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(THANKS)  # type: ignore[attr-defined]
        transport.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(style: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if style == "thanks":
        server = await loop.create_server(Thanks, HOST, port, backlog=511)
        bound = server.sockets[0].getsockname()[1]
        sys.stderr.write(f"listening on tcp:{HOST}:{bound}\n")
        sys.stderr.flush()
        await stop.wait()
        server.close()
    else:
        transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(HOST, port))
        bound = transport.get_extra_info("sockname")[1]
        sys.stderr.write(f"listening on udp:{HOST}:{bound}\n")
        sys.stderr.flush()
        await stop.wait()
        transport.close()


def main() -> None:
    args = parse_args(__doc__ or "", ("thanks", "udp-echo"))
    import uvloop

    uvloop.run(serve(args.style, args.port))


if __name__ == "__main__":
    main()
