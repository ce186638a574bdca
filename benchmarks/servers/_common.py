"""What every benchmark server shares: its command line and its ready line.

Each server binds 127.0.0.1 on the port it is given (0: any free port),
writes ``listening on tcp:127.0.0.1:PORT`` to stderr once it accepts, and
runs until SIGTERM or SIGINT. Every contender disables Nagle
(TCP_NODELAY), as uvloop, asyncio and sockworks do by default, so that no
one of them pays a delayed-ACK stall the others do not.
"""

from __future__ import annotations

import argparse
import sys

HOST = "127.0.0.1"


def parse_args(description: str, styles: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    if styles:
        parser.add_argument("style", choices=styles)
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args()


def ready(port: int) -> None:
    """Tell the harness where we listen (one line, flushed)."""
    sys.stderr.write(f"listening on tcp:{HOST}:{port}\n")
    sys.stderr.flush()
