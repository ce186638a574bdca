"""Running a server in the foreground: the event loop, uvloop, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._access import AccessPolicy
from ._config import Limits, SocketOptions
from ._endpoint import Endpoint
from ._metrics import MetricsEndpoint, service_registry
from ._privileges import Credentials, check_paths, drop, required_paths, unix_socket_paths
from ._server import Server, ServiceConfig
from ._systemd import Notifier, process_notifier

log = logging.getLogger("sockworks")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (it is a dependency), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serving_status(server: Server) -> str:
    """The one-line STATUS= text: what is served where."""
    where: dict[str, list[str]] = {}
    for name, endpoint in server.endpoints:
        where.setdefault(name, []).append(str(endpoint))
    return "serving " + "; ".join(f"{name} on {', '.join(e)}" for name, e in where.items())


async def serve_until_signalled(
    server: Server,
    on_ready: Callable[[Server], None] | None = None,
    *,
    notifier: Notifier | None = None,
) -> bool:
    """Start ``server``, call ``on_ready``, serve until SIGINT or SIGTERM,
    then shut down gracefully. A second signal aborts at once.
    Returns True when the shutdown finished within the grace period.

    ``notifier`` (default: this process's, from NOTIFY_SOCKET) hears
    READY=1 once every listener accepts, STOPPING=1, RELOADING=1 and
    READY=1 around a SIGHUP, and WATCHDOG=1 at its interval."""
    loop = asyncio.get_running_loop()
    notify = notifier if notifier is not None else process_notifier()
    await server.start()
    if on_ready is not None:
        on_ready(server)
    watchdog: asyncio.TimerHandle | None = None

    def feed_watchdog() -> None:
        nonlocal watchdog
        notify.watchdog()
        interval = notify.watchdog_interval
        watchdog = loop.call_later(interval, feed_watchdog) if interval else None

    signals = (signal.SIGINT, signal.SIGTERM)
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s received: shutting down", signal.Signals(signum).name)
            notify.stopping()
            server.stop()
        else:
            log.warning("second signal: aborting connections now")
            for group in server.groups:
                for conn in list(group.live):
                    conn.abort()

    def on_hangup() -> None:
        # SIGHUP: certificates and keys are read again (renewed by certbot
        # or the like) without a restart; a broken one keeps the old.
        log.info("SIGHUP received: reloading certificates")
        notify.reloading()
        server.reload_certificates()
        notify.ready(serving_status(server))

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    # Ready once the signals are ours too: the manager may stop or reload
    # the moment it hears READY=1.
    notify.ready(serving_status(server))
    if notify.watchdog_interval:
        feed_watchdog()
    try:
        await server.wait_stopped()
        return await server.shutdown()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)


# The CLI's format, so a script's log reads like ``sockworks serve``'s.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%dT%H:%M:%S"


@contextmanager
def default_logging(enabled: bool = True) -> Iterator[None]:
    """While serving, log INFO and above to stderr as the CLI does - unless
    ``enabled`` is false or the application configured logging itself (a
    handler on the ``sockworks`` logger or an ancestor, such as root after
    ``logging.basicConfig()``): then its configuration rules. Without this,
    Python would show only warnings (``logging.lastResort``): no
    ``listening on`` line, no connection log. Undone on return."""
    logger = logging.getLogger("sockworks")
    if not enabled or logger.hasHandlers():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def log_listening(server: Server) -> None:
    """The ``listening on ENDPOINT`` lines, as log records (library code
    never prints; the CLI writes its own to stderr)."""
    for name, endpoint in server.endpoints:
        from_ = f" ({endpoint.source})" if endpoint.source else ""
        logging.getLogger(f"sockworks.{name}").info("listening on %s%s", endpoint, from_)


def serve(
    handler: Any,
    *listen: str | Endpoint,
    limits: Limits | None = None,
    options: SocketOptions | None = None,
    access: AccessPolicy | None = None,
    grace: float = 5.0,
    name: str | None = None,
    on_ready: Callable[[Server], None] | None = None,
    log: bool = True,
) -> None:
    """Serve ``handler`` on ``listen`` endpoints until SIGINT/SIGTERM.

    ``handler`` is a :class:`StreamProtocol` subclass, an
    ``async def handle(stream)`` or a blocking ``def handle(conn)``.
    ``access`` is an :class:`AccessPolicy` (allow/deny, per-source and rate
    limits); None checks nothing.

    Logs like ``sockworks serve``: a ``listening on`` line per listener and
    a line per connection opened and closed, on stderr unless the
    application configured logging itself (then through its handlers);
    ``log=False`` adds no handler and logs no ``listening on`` line.
    """
    config = ServiceConfig.create(
        handler, listen, name=name, limits=limits, options=options, access=access
    )

    def ready(server: Server) -> None:
        if log:
            log_listening(server)
        if on_ready is not None:
            on_ready(server)

    with default_logging(log):
        run_services([config], grace=grace, on_ready=ready)


def run_services(
    services: Sequence[ServiceConfig] | Iterable[ServiceConfig],
    *,
    grace: float = 5.0,
    on_ready: Callable[[Server], None] | None = None,
    credentials: Credentials | None = None,
    metrics: str | MetricsEndpoint | None = None,
) -> bool:
    """Bind every service, then serve them until a signal (see :func:`serve`).

    ``credentials`` (:func:`sockworks._privileges.resolve`): once every
    socket is bound, drop to that user and group for good, then check the
    files the services read as that user (:func:`check_as` does the same
    before binding, for an error that leaves nothing bound).

    ``metrics``: serve Prometheus metrics over HTTP there, at /metrics: an
    endpoint bound with the services (closed again on any error), or a
    :class:`~sockworks._metrics.MetricsEndpoint` the caller bound (and closes)."""
    configs = list(services)
    server = Server(configs, grace=grace)
    owned = MetricsEndpoint.bind(metrics) if isinstance(metrics, str) else None
    endpoint = owned or (metrics if isinstance(metrics, MetricsEndpoint) else None)
    try:
        server.bind()  # errors surface here, before a loop exists
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    if endpoint is not None:
        endpoint.serve(service_registry(lambda: server.groups))
    loop = new_event_loop()  # before the drop: it may import uvloop
    try:
        if credentials is not None:
            drop(credentials, unix_socket_paths(server))
            check_paths(required_paths(configs), credentials.who)
        return loop.run_until_complete(serve_until_signalled(server, on_ready))
    finally:
        loop.close()
        if owned is not None:
            owned.close()
