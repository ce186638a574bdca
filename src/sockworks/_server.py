"""The server core: binding, accepting, limits and graceful shutdown.

Written once for every handler style. The server binds every listener before
it serves anything (so errors come first and real ports are known), accepts
connections itself so that it can stop accepting at ``max_connections`` (the
excess waits in the kernel's backlog), and on shutdown stops accepting, asks
every connection to finish, and aborts what is left after the grace period.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._access import AccessControl, AccessPolicy, LogThrottle
from ._config import Limits, SocketOptions
from ._endpoint import Endpoint, parse_endpoint
from ._errors import ConfigError
from ._protocol import Peer
from ._sockets import BoundSocket, apply_options, bind, format_peer

log = logging.getLogger("sockworks.server")

# Connections accepted per wake-up of a listener: high enough to drain a
# burst, low enough that one busy listener cannot starve the others.
_ACCEPT_BATCH = 64


class Connection(Protocol):
    """What the core needs from a live connection of any driver."""

    def begin_shutdown(self) -> None: ...

    def abort(self) -> None: ...


class Driver(Protocol):
    """Runs one handler style on the event loop (see ``_drivers``)."""

    name: str

    def supports(self, endpoint: Endpoint) -> bool: ...

    def max_connections(self, limits: Limits) -> int: ...

    def start_stream(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None: ...

    def start_datagram(self, bound: BoundSocket, group: ConnectionGroup) -> Connection: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    """One service and where it listens: the unit ``Server`` runs.

    ``handler`` is anything :func:`sockworks.make_driver` accepts: a
    :class:`StreamProtocol` class or factory, an ``async def handle(stream)``
    or a blocking ``def handle(conn)``; or a ready :class:`Driver`.
    """

    handler: Any
    listen: tuple[Endpoint, ...]
    name: str = "service"
    limits: Limits = field(default_factory=Limits)
    options: SocketOptions = field(default_factory=SocketOptions)
    # Access control and abuse protection (allow/deny, per-source and rate
    # limits, the UDP amplification guard). None: no checks at all, the
    # API's default; the CLI and config files always set one.
    access: AccessPolicy | None = None

    @classmethod
    def create(
        cls,
        handler: Any,
        listen: Iterable[str | Endpoint],
        *,
        name: str | None = None,
        limits: Limits | None = None,
        options: SocketOptions | None = None,
        access: AccessPolicy | None = None,
    ) -> ServiceConfig:
        endpoints = tuple(e if isinstance(e, Endpoint) else parse_endpoint(e) for e in listen)
        if not endpoints:
            raise ConfigError("a service needs at least one endpoint to listen on")
        return cls(
            handler=handler,
            listen=endpoints,
            name=name or str(getattr(handler, "__name__", type(handler).__name__)),
            limits=limits or Limits(),
            options=options or SocketOptions(),
            access=access,
        )


class ConnectionGroup:
    """The live connections of one service, its limits, and its logger.

    Drivers call :meth:`add` when a connection starts and :meth:`discard`
    when it ends; the group pauses and resumes accepting around
    ``max_connections``.
    """

    def __init__(
        self, config: ServiceConfig, driver: Driver, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.config = config
        self.name = config.name
        self.limits = config.limits
        self.options = config.options
        self.loop = loop
        self.driver = driver
        self.log = logging.getLogger(f"sockworks.{config.name}")
        self.live: set[Connection] = set()
        self.max_connections = driver.max_connections(config.limits)
        self.shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[_Listener] = []
        # Set by Server.start() when the service has an access policy.
        self.access: AccessControl | None = None
        self._refusals = LogThrottle(loop.time)

    def refused(self, peer: Peer, reason: str, *, datagram: bool = False) -> None:
        """Log a refused connection (one INFO line each) or a dropped
        datagram (at most one line a second per source and reason)."""
        if not datagram:
            self.log.info("%s refused: %s", peer, reason)
            return
        suppressed = self._refusals.check(f"{peer.host}|{reason}")
        if suppressed is not None:
            more = f" (and {suppressed} more like it)" if suppressed else ""
            self.log.info("%s datagram dropped: %s%s", peer, reason, more)

    def add(self, conn: Connection) -> None:
        self.live.add(conn)
        self._idle.clear()
        if len(self.live) >= self.max_connections:
            for listener in self._listeners:
                listener.pause()

    def discard(self, conn: Connection) -> None:
        if self.access is not None and conn in self.live:
            stats = getattr(conn, "stats", None)
            self.access.release_connection(stats.peer.host if stats is not None else "")
        self.live.discard(conn)
        if not self.live:
            self._idle.set()
        if len(self.live) < self.max_connections and not self.shutting_down:
            for listener in self._listeners:
                listener.resume()

    @property
    def full(self) -> bool:
        return len(self.live) >= self.max_connections

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Listener:
    """A listening stream socket whose accepts we drive ourselves."""

    def __init__(self, bound: BoundSocket, group: ConnectionGroup) -> None:
        self.bound = bound
        self.group = group
        self.sock = bound.sock
        self.stream = bound.endpoint.is_stream
        self.inet = bound.endpoint.is_inet
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None

    def resume(self) -> None:
        if not self._reading and self.sock.fileno() >= 0:
            self.group.loop.add_reader(self.sock.fileno(), self._on_acceptable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self.group.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _on_acceptable(self) -> None:
        group = self.group
        for _ in range(_ACCEPT_BATCH):
            if group.full:
                self.pause()
                return
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: stop accepting for a
                    # moment rather than spin; queued peers wait in the
                    # backlog.
                    group.log.warning("accept failed: %s; pausing accepts for 0.5 s", exc.strerror)
                    self.pause()
                    self._retry = group.loop.call_later(0.5, self.resume)
                    return
                raise
            conn.setblocking(False)
            try:
                apply_options(conn, group.options, stream=True, inet=self.inet)
            except OSError as exc:  # the peer already reset
                group.log.debug("cannot set options on accepted socket: %s", exc)
                conn.close()
                continue
            peer = format_peer(addr)
            if group.access is not None:
                # Checked after accept, before anything is started: a
                # refused peer costs one close and one log line.
                refused = group.access.admit_connection(peer.host)
                if refused is not None:
                    conn.close()
                    group.refused(peer, refused)
                    continue
            group.driver.start_stream(conn, peer, group)

    def close(self) -> None:
        # Closed at once, not at the end of the grace period: new peers are
        # refused instead of waiting in a backlog nobody will accept from.
        self.pause()
        if self._retry is not None:
            self._retry.cancel()
        self.sock.close()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Server:
    """Runs one or more services on one event loop.

    Use ``await start()`` (binds everything, then accepts), read
    :attr:`endpoints`, then ``await wait_stopped()`` / ``await shutdown()``.
    """

    def __init__(self, services: Sequence[ServiceConfig], *, grace: float = 5.0) -> None:
        if not services:
            raise ConfigError("no service to run")
        self.services = tuple(services)
        self.grace = grace
        self.groups: list[ConnectionGroup] = []
        self.endpoints: list[tuple[str, Endpoint]] = []
        self._listeners: list[_Listener] = []
        self._datagram_conns: list[tuple[ConnectionGroup, Connection]] = []
        self._stopped: asyncio.Event | None = None
        self._bound: list[BoundSocket] = []
        self._plan: list[tuple[ServiceConfig, Driver, list[BoundSocket]]] = []

    def bind(self) -> None:
        """Bind every listener, or none: on any error, close what was bound."""
        from ._drivers import make_driver

        if self._plan:
            return
        seen: dict[tuple[str, str, int, str], str] = {}
        plan: list[tuple[ServiceConfig, Driver, list[BoundSocket]]] = []
        try:
            for config in self.services:
                driver = make_driver(config.handler)
                for endpoint in config.listen:
                    if not driver.supports(endpoint):
                        raise ConfigError(
                            f"{config.name}: a {driver.name} handler cannot serve"
                            f" {endpoint.transport} endpoints ({endpoint})"
                        )
                    key = (endpoint.transport, endpoint.host, endpoint.port, endpoint.path)
                    if (endpoint.port or endpoint.path) and key in seen:
                        raise ConfigError(
                            f"{endpoint} is given twice (services {seen[key]} and {config.name})"
                        )
                    seen[key] = config.name
                plan.append((config, driver, []))
            for config, _driver, bound in plan:
                for endpoint in config.listen:
                    bound.append(bind(endpoint, config.options))
                    self._bound.append(bound[-1])
        except BaseException:
            self._close_bound()
            raise
        self._plan = plan
        self.endpoints = [(c.name, b.endpoint) for c, _, bs in plan for b in bs]

    def _close_bound(self) -> None:
        for bound in self._bound:
            bound.sock.close()
            if bound.endpoint.transport in ("unix", "unixgram"):
                _unlink_quietly(bound.endpoint.path)
        self._bound.clear()

    async def start(self) -> None:
        """Bind (if not yet bound) and start serving."""
        self.bind()
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        # A datagram from one of our own UDP ports is another service's
        # reply: never answered, so that no two services can loop.
        udp_ports = {
            b.endpoint.port for _, _, bs in self._plan for b in bs if b.endpoint.transport == "udp"
        }
        for config, driver, bound_sockets in self._plan:
            group = ConnectionGroup(config, driver, loop)
            if config.access is not None:
                group.access = AccessControl(
                    config.access,
                    loop.time,
                    own_ports=udp_ports,
                    max_datagram=config.limits.max_datagram,
                )
            self.groups.append(group)
            for bound in bound_sockets:
                if bound.endpoint.is_stream:
                    listener = _Listener(bound, group)
                    group._listeners.append(listener)
                    self._listeners.append(listener)
                else:
                    conn = driver.start_datagram(bound, group)
                    self._datagram_conns.append((group, conn))
        for listener in self._listeners:
            listener.resume()

    def stop(self) -> None:
        """Ask the server to shut down (thread-safe from the loop only)."""
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()

    async def shutdown(self, grace: float | None = None) -> bool:
        """Stop accepting, let connections finish for ``grace`` seconds,
        then abort the rest. Returns True when everything finished in time."""
        grace = self.grace if grace is None else grace
        for listener in self._listeners:
            listener.close()
        for group in self.groups:
            group.shutting_down = True
        for _group, conn in self._datagram_conns:
            conn.begin_shutdown()
        for group in self.groups:
            for conn in list(group.live):
                conn.begin_shutdown()
        waits = [asyncio.ensure_future(g.wait_idle()) for g in self.groups]
        done = True
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            for w in pending:
                w.cancel()
            done = not pending
        if not done:
            left = sum(len(g.live) for g in self.groups)
            log.warning("grace period of %.1f s over: aborting %d connection(s)", grace, left)
            for group in self.groups:
                for conn in list(group.live):
                    conn.abort()
            # Give aborted transports one loop turn to report connection_lost.
            await asyncio.sleep(0)
        for group in self.groups:
            group.driver.close()
        self._close_bound()
        if self._stopped is not None:
            self._stopped.set()
        return done

    async def serve(self) -> None:
        """start(), wait for stop(), shutdown()."""
        await self.start()
        try:
            await self.wait_stopped()
        finally:
            await self.shutdown()
