"""sockworks echo in its three styles, run through sockworks.serve.

    python sockworks_echo.py protocol|async|blocking [--port N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HOST, parse_args, ready

import sockworks


class Echo(sockworks.StreamProtocol):
    """The sans-I/O style (the same as the built-in ``echo`` service)."""

    def on_data(self, data: bytes) -> bytes:
        return data


async def handle_async(stream: sockworks.Stream) -> None:
    while data := await stream.read():
        await stream.write(data)


def handle_blocking(conn: sockworks.BlockingConnection) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def main() -> None:
    args = parse_args(__doc__ or "", ("protocol", "async", "blocking"))
    handler = {"protocol": Echo, "async": handle_async, "blocking": handle_blocking}[args.style]
    # Default limits, except that the blocking style gets a thread for each
    # of the benchmark's 100 connections (its default pool is 64 threads,
    # which would leave 36 connections waiting in the backlog).
    limits = sockworks.Limits(handler_threads=256)

    def on_ready(server: sockworks.Server) -> None:
        ready(server.endpoints[0][1].port)

    sockworks.serve(
        handler, f"tcp:{HOST}:{args.port}", limits=limits, grace=0.5, on_ready=on_ready
    )


if __name__ == "__main__":
    main()
