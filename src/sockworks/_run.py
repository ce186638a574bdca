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
from ._errors import SockworksError
from ._metrics import MetricsEndpoint, service_registry
from ._pool import Binding, SocketPool
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


class Reloader:
    """SIGHUP without workers: the configuration is loaded again and a new
    server starts on the same loop and the same sockets (copies of them
    from ``pool``); once it accepts, the old one stops accepting and drains,
    as an old generation of workers does. Listeners no longer configured
    drop new attempts at once and close when the old server is done."""

    def __init__(
        self,
        pool: SocketPool,
        binding: Binding,
        load: Callable[[], tuple[Sequence[ServiceConfig], float]],
        *,
        announce: Callable[[list[tuple[str, Endpoint]]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.binding = binding
        self.load = load
        self.announce = announce
        self._previous = binding  # the one before the latest reload
        self.draining: set[asyncio.Task[None]] = set()
        # Servers that ran before: their counts stay in the metrics.
        self.retired: list[Server] = []

    async def start_next(self) -> Server:
        """The next configuration, started and accepting beside the running
        one. Raises :class:`SockworksError` (or OSError) and leaves nothing
        behind when it cannot: the running configuration stays."""
        services, grace = self.load()
        binding = self.pool.attempt(dup=True)
        server = Server(services, grace=grace, sockets=binding)
        try:
            server.bind()
            await server.start()
        except BaseException:
            if server.groups:
                await server.shutdown(0)
            binding.rollback()
            raise
        self._previous, self.binding = self.binding, binding
        added = binding.added(server.endpoints)
        if added and self.announce is not None:
            self.announce(added)
        return server

    async def retire(self, old: Server) -> None:
        """``old`` stops accepting (it serves what is queued: those came
        before the reload) and drains; listeners it alone had close after."""
        previous, following = self._previous, self.binding
        self.pool.stop_accepting(previous.not_in(following))
        self.retired.append(old)
        await old.stop_accepting()  # from here on, only the new one accepts
        old.stop()

        async def drain() -> None:
            await old.shutdown()
            # Not closed if a later reload took the socket again.
            self.pool.close(previous.not_in(following, self.binding))

        task = asyncio.get_running_loop().create_task(drain())
        self.draining.add(task)
        task.add_done_callback(self.draining.discard)

    def groups(self, current: Server) -> list[Any]:
        return [g for s in (*self.retired, current) for g in s.groups]


async def serve_until_signalled(
    server: Server,
    on_ready: Callable[[Server], None] | None = None,
    *,
    notifier: Notifier | None = None,
    reloader: Reloader | None = None,
) -> bool:
    """Start ``server``, call ``on_ready``, serve until SIGINT or SIGTERM,
    then shut down gracefully. A second signal aborts at once.
    Returns True when the shutdown finished within the grace period.

    SIGHUP: with a ``reloader``, the configuration is reloaded (see
    :class:`Reloader`); without one, certificates are read again.

    ``notifier`` (default: this process's, from NOTIFY_SOCKET) hears
    READY=1 once every listener accepts, STOPPING=1, RELOADING=1 and
    READY=1 around a SIGHUP, and WATCHDOG=1 at its interval."""
    loop = asyncio.get_running_loop()
    notify = notifier if notifier is not None else process_notifier()
    await server.start()
    if on_ready is not None:
        on_ready(server)
    current = server
    watchdog: asyncio.TimerHandle | None = None

    def feed_watchdog() -> None:
        nonlocal watchdog
        notify.watchdog()
        interval = notify.watchdog_interval
        watchdog = loop.call_later(interval, feed_watchdog) if interval else None

    signals = (signal.SIGINT, signal.SIGTERM)
    stopping = False
    reloading: asyncio.Task[None] | None = None
    again = False

    def everyone() -> list[Server]:
        return [*(reloader.retired if reloader else ()), current]

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            log.info("%s received: shutting down", signal.Signals(signum).name)
            notify.stopping()
            current.stop()
        else:
            log.warning("second signal: aborting connections now")
            for running in everyone():
                running.abort_connections()

    async def reload() -> None:
        nonlocal current, reloading, again
        assert reloader is not None
        while True:
            notify.reloading()
            log.info("SIGHUP received: reloading the configuration")
            try:
                following = await reloader.start_next()
            except (SockworksError, OSError) as exc:
                log.error(
                    "reload failed: %s; still serving the configuration loaded before",
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                )
            except Exception:  # a defect: said in full, and serving goes on
                log.exception("reload failed; still serving the configuration loaded before")
            else:
                old, current = current, following
                if stopping:  # a signal came while it started
                    current.stop()
                await reloader.retire(old)
                log.info("reloaded: now serving %s", serving_status(current))
            notify.ready(serving_status(current))
            if not again or stopping:
                break
            again = False
        reloading = None

    def on_hangup() -> None:
        nonlocal reloading, again
        if reloader is not None:
            if reloading is not None:
                again = True  # once this one is done
            elif not stopping:
                reloading = loop.create_task(reload())
            return
        # SIGHUP: certificates and keys are read again (renewed by certbot
        # or the like) without a restart; a broken one keeps the old.
        log.info("SIGHUP received: reloading certificates")
        notify.reloading()
        current.reload_certificates()
        notify.ready(serving_status(current))

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    # Ready once the signals are ours too: the manager may stop or reload
    # the moment it hears READY=1.
    notify.ready(serving_status(server))
    if notify.watchdog_interval:
        feed_watchdog()
    try:
        while True:
            waited = current
            await waited.wait_stopped()
            if waited is current:  # not an old one a reload stopped
                break
        if reloading is not None:
            await reloading
        if reloader is not None:
            reloader.pool.stop_accepting()  # the sockets are the pool's
        done = await current.shutdown()
        if reloader is not None and reloader.draining:
            await asyncio.wait(list(reloader.draining))
        return done
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
    reload: Callable[[], tuple[Sequence[ServiceConfig], float]] | None = None,
    announce: Callable[[list[tuple[str, Endpoint]]], None] | None = None,
) -> bool:
    """Bind every service, then serve them until a signal (see :func:`serve`).

    ``credentials`` (:func:`sockworks._privileges.resolve`): once every
    socket is bound, drop to that user and group for good, then check the
    files the services read as that user (:func:`check_as` does the same
    before binding, for an error that leaves nothing bound).

    ``metrics``: serve Prometheus metrics over HTTP there, at /metrics: an
    endpoint bound with the services (closed again on any error), or a
    :class:`~sockworks._metrics.MetricsEndpoint` the caller bound (and closes).

    ``reload``: SIGHUP gives the configuration again, served in place of
    the running one on the same sockets (:class:`Reloader`); ``announce``
    hears the listeners a reload added."""
    configs = list(services)
    pool = SocketPool() if reload is not None else None
    binding = pool.attempt(dup=True) if pool is not None else None
    server = Server(configs, grace=grace, sockets=binding)
    reloader = None
    if pool is not None and binding is not None and reload is not None:
        reloader = Reloader(pool, binding, reload, announce=announce)
    owned = MetricsEndpoint.bind(metrics) if isinstance(metrics, str) else None
    endpoint = owned or (metrics if isinstance(metrics, MetricsEndpoint) else None)
    try:
        server.bind()  # errors surface here, before a loop exists
    except BaseException:
        if owned is not None:
            owned.close()
        if pool is not None:
            pool.close()
        raise
    if endpoint is not None:
        endpoint.serve(service_registry(
            lambda: server.groups if reloader is None else reloader.groups(server)
        ))
    loop = new_event_loop()  # before the drop: it may import uvloop
    try:
        if credentials is not None:
            drop(credentials, unix_socket_paths(server))
            check_paths(required_paths(configs), credentials.who)
        return loop.run_until_complete(
            serve_until_signalled(server, on_ready, reloader=reloader)
        )
    finally:
        loop.close()
        if owned is not None:
            owned.close()
        if pool is not None:
            pool.close()
