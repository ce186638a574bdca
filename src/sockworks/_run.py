"""Running a server in the foreground: the event loop, uvloop, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._config import Limits, SocketOptions
from ._endpoint import Endpoint
from ._server import Server, ServiceConfig

log = logging.getLogger("sockworks")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (it is a dependency), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve_until_signalled(
    server: Server, on_ready: Callable[[Server], None] | None = None
) -> bool:
    """Start ``server``, call ``on_ready``, serve until SIGINT or SIGTERM,
    then shut down gracefully. A second signal aborts at once.
    Returns True when the shutdown finished within the grace period."""
    loop = asyncio.get_running_loop()
    await server.start()
    if on_ready is not None:
        on_ready(server)
    signals = (signal.SIGINT, signal.SIGTERM)
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s received: shutting down", signal.Signals(signum).name)
            server.stop()
        else:
            log.warning("second signal: aborting connections now")
            for group in server.groups:
                for conn in list(group.live):
                    conn.abort()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.wait_stopped()
        return await server.shutdown()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def serve(
    handler: Any,
    *listen: str | Endpoint,
    limits: Limits | None = None,
    options: SocketOptions | None = None,
    grace: float = 5.0,
    name: str | None = None,
    on_ready: Callable[[Server], None] | None = None,
) -> None:
    """Serve ``handler`` on ``listen`` endpoints until SIGINT/SIGTERM.

    ``handler`` is a :class:`StreamProtocol` subclass, an
    ``async def handle(stream)`` or a blocking ``def handle(conn)``.
    """
    config = ServiceConfig.create(handler, listen, name=name, limits=limits, options=options)
    run_services([config], grace=grace, on_ready=on_ready)


def run_services(
    services: Sequence[ServiceConfig] | Iterable[ServiceConfig],
    *,
    grace: float = 5.0,
    on_ready: Callable[[Server], None] | None = None,
) -> bool:
    """Bind every service, then serve them until a signal (see :func:`serve`)."""
    server = Server(list(services), grace=grace)
    server.bind()  # errors surface here, before a loop exists
    loop = new_event_loop()
    try:
        return loop.run_until_complete(serve_until_signalled(server, on_ready))
    finally:
        loop.close()
