"""The server core: binding, accepting, limits and graceful shutdown.

Written once for every handler style. The server binds every listener before
it serves anything (so errors come first and real ports are known), accepts
connections itself so that it can stop accepting at ``max_connections`` (the
excess waits in the kernel's backlog), and on shutdown stops accepting, asks
every connection to finish, and aborts what is left after the grace period.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import resource
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._access import AccessControl, AccessPolicy
from ._config import Limits, ProxySettings, SocketOptions, TLSSettings
from ._core import ConnectionGroup, Driver, Stoppable
from ._drivers.relay import RelaySide, pair
from ._drivers.stream import StreamCore
from ._endpoint import Endpoint, parse_endpoint
from ._errors import CertificateError, ConfigError
from ._protocol import Peer
from ._proxy_io import ProxyHeaderError, proxied_peer, read_proxy_header
from ._shared_limits import SharedLimits
from ._sockets import (
    BoundSocket,
    apply_options,
    bind,
    close_bound,
    format_peer,
    refuse_new_connections,
)
from ._tls import peer_subject, server_context, tls_failure_reason

log = logging.getLogger("sockworks.server")

# After an out-of-descriptors error, how long before accepting again.
_RETRY_ACCEPT = 0.5
# Connections accepted per wake-up of a listener: high enough to drain a
# burst, low enough that one busy listener cannot starve the others.
_ACCEPT_BATCH = 64


# Gives the listening socket for a service's endpoint instead of binding
# one here: (service name, endpoint, options).
SocketSource = Callable[[str, Endpoint, SocketOptions], BoundSocket]


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
    # TLS for the service's tls: and unix+tls: listeners.
    tls: TLSSettings | None = None
    # The PROXY protocol on the service's stream listeners.
    proxy: ProxySettings | None = None

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
        tls: TLSSettings | None = None,
        proxy: ProxySettings | None = None,
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
            tls=tls,
            proxy=proxy,
        )


def _accept_queued(
    sock: socket.socket, group: ConnectionGroup
) -> list[tuple[socket.socket, Peer]]:
    """Everything waiting in ``sock``'s backlog now, whatever the limits."""
    queued: list[tuple[socket.socket, Peer]] = []
    inet = sock.family != socket.AF_UNIX
    while True:
        try:
            conn, addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return queued
        except OSError as exc:
            if exc.errno == errno.ECONNABORTED:
                continue
            group.log.warning("accepting the queued connections failed: %s", exc)
            return queued
        conn.setblocking(False)
        try:
            apply_options(conn, group.options, stream=True, inet=inet)
        except OSError:
            conn.close()
            continue
        queued.append((conn, format_peer(addr)))


def _returning(protocol: asyncio.Protocol) -> Callable[[], asyncio.Protocol]:
    return lambda: protocol


class _SocketListener:
    """A listening stream socket whose accepts we drive ourselves: for
    drivers that take the socket itself (the blocking style)."""

    def __init__(self, bound: BoundSocket, group: ConnectionGroup) -> None:
        self.bound = bound
        self.group = group
        self.sock = bound.sock
        self.inet = bound.endpoint.is_inet
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        # Stopping: drop new connection attempts before the last accept.
        # Not in a worker: the socket is shared and outlives it.
        self.refuse_on_drain = True

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
                    group.log.warning(
                        "accept failed: %s; pausing accepts for %.1f s",
                        exc.strerror, _RETRY_ACCEPT,
                    )
                    self.pause()
                    self._retry = group.loop.call_later(_RETRY_ACCEPT, self.resume)
                    return
                raise
            conn.setblocking(False)
            try:
                apply_options(conn, group.options, stream=True, inet=self.inet)
            except OSError as exc:  # the peer already reset
                group.log.debug("cannot set options on accepted socket: %s", exc)
                conn.close()
                continue
            self._accepted(conn, format_peer(addr))

    async def drain(self) -> None:
        """Stopping: serve what is already in the backlog, then close.
        Closing a listening socket resets the connections still queued on
        it, and a balancer in front cannot retry those (its request went)."""
        self.pause()
        if self.refuse_on_drain:
            refuse_new_connections(self.bound)
        queued = _accept_queued(self.sock, self.group)
        # Closed in the same turn as the last accept: the window in which a
        # new connection could queue, to be reset by the close, is a moment.
        self.close()
        for conn, peer in queued:
            self._accepted(conn, peer)

    def _accepted(self, conn: socket.socket, peer: Peer) -> None:
        group = self.group
        # Checked after accept, before anything is started: a refused peer
        # costs one close and one log line.
        if not group.admit(peer):
            conn.close()
            return
        group.driver.start_socket(conn, peer, group)

    def close(self) -> None:
        # Closed at once, not at the end of the grace period: new peers are
        # refused instead of waiting in a backlog nobody will accept from.
        self.pause()
        if self._retry is not None:
            self._retry.cancel()
        self.sock.close()


def _failed_start(group: ConnectionGroup, peer: Peer, bucket: str, what: str) -> None:
    """A connection that never started (its PROXY header or TLS handshake
    failed): counted as refused (``bucket``), and one line."""
    group.count_refused(bucket)
    group.log.info("%s %s", peer, what, extra={"event": "refused", "peer": peer, "reason": what})


class _SecureListener(_SocketListener):
    """A listener with layers before the protocol: the PROXY header, then
    TLS (the order DESIGN.md gives; the header is never read inside TLS).

    It accepts in Python like the blocking style's listener, then per
    connection: reads the PROXY header exactly (never a byte past it, so
    that TLS gets every byte of its own), admits the client by its real
    address, runs the TLS handshake with a deadline, and only then starts
    the style's connection. One task per connection on this path: a
    handshake costs far more. Connections in these stages count against
    ``max_connections``, so stalled ones cannot take every descriptor, and
    each is dropped at its deadline.
    """

    def __init__(
        self,
        bound: BoundSocket,
        group: ConnectionGroup,
        factory: Callable[[], asyncio.Protocol] | None,
        *,
        tls: TLSSettings | None,
        context: ssl.SSLContext | None,
        proxy: ProxySettings | None,
    ) -> None:
        super().__init__(bound, group)
        self.factory = factory
        self.tls = tls
        self.context = context
        self.proxy = proxy
        self.trusted = (
            AccessPolicy(allow=proxy.trusted) if proxy is not None else None
        )
        self.starting = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def _accepted(self, conn: socket.socket, peer: Peer) -> None:
        self.starting += 1
        self.group.starting += 1
        task = self.group.loop.create_task(self._start(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_report_start_failure)

    async def drain(self) -> None:
        await super().drain()
        if self._tasks:  # each is bounded by its header and handshake deadlines
            await asyncio.wait(list(self._tasks))

    async def _start(self, sock: socket.socket, peer: Peer) -> None:
        group = self.group
        admitted = started = False
        try:
            if self.proxy is not None:
                assert self.trusted is not None
                if self.trusted.decide(peer.host) is not None:
                    group.refused(peer, "not a trusted proxy (--proxy-from); no header accepted")
                    return
                info = await asyncio.wait_for(
                    read_proxy_header(group.loop, sock, self.proxy.accept), self.proxy.timeout
                )
                peer = proxied_peer(peer, info)
            if not group.admit(peer):
                return
            admitted = True
            if self.factory is None and self.context is not None and not group.driver.tls_sockets:
                await self._relay_tls(sock, peer)
                started = True
                return
            if self.factory is None:
                if self.context is not None:
                    tls_sock = await self._blocking_handshake(sock)
                    sock = tls_sock
                    subject = peer_subject(tls_sock.getpeercert())
                    if subject is not None:
                        peer = dataclasses.replace(peer, tls_subject=subject)
                group.driver.start_socket(sock, peer, group)
                started = True
                return
            conn = self.factory()
            if isinstance(conn, StreamCore):
                conn.preset(peer)  # admitted already, by its real address
            # The loop's own handshake deadline (no extra task per
            # connection); it ends the handshake with ConnectionAbortedError.
            await group.loop.connect_accepted_socket(
                lambda: conn,
                sock,
                ssl=self.context,
                ssl_handshake_timeout=self.tls.handshake_timeout if self.tls else None,
            )
            started = True
        except TimeoutError:
            if self.proxy is not None and not admitted:
                _failed_start(group, peer, "proxy_timeout", "PROXY header timed out")
            else:
                _failed_start(group, peer, "tls_timeout", "TLS handshake timed out")
        except ConnectionAbortedError as exc:
            if self.tls is not None and "handshake" in str(exc):
                _failed_start(group, peer, "tls_timeout",
                              f"TLS handshake timed out after {self.tls.handshake_timeout:g} s")
            else:
                _failed_start(group, peer, "left_early",
                              f"left before the connection started: {exc}")
        except ProxyHeaderError as exc:
            _failed_start(group, peer, "bad_proxy_header", f"bad PROXY header: {exc.reason}")
        except ssl.SSLError as exc:
            _failed_start(group, peer, "tls_failed",
                          f"TLS handshake failed: {tls_failure_reason(exc)}")
        except (ConnectionError, OSError) as exc:
            _failed_start(group, peer, "left_early",
                          f"left before the connection started: {exc.strerror or exc}")
        finally:
            self.starting -= 1
            group.starting -= 1
            if not started:
                sock.close()
                if admitted and group.access is not None:
                    group.access.release_connection(peer.host)
                group.starting_ended()

    async def _relay_tls(self, sock: socket.socket, peer: Peer) -> None:
        """TLS for a driver whose program gets a socket (exec): the loop
        terminates TLS, and the program gets one end of a socketpair that
        the relay joins to it (see _drivers/relay.py)."""
        assert self.context is not None and self.tls is not None
        loop = self.group.loop
        client, program = RelaySide(), RelaySide()
        pair(client, program)
        # The program's side first: the client may send as soon as TLS is up.
        ours, theirs = socket.socketpair()
        try:
            await loop.connect_accepted_socket(lambda: program, ours)
            await asyncio.wait_for(
                loop.connect_accepted_socket(
                    lambda: client, sock, ssl=self.context,
                    ssl_handshake_timeout=2 * self.tls.handshake_timeout,
                ),
                self.tls.handshake_timeout,
            )
        except BaseException:
            if program.transport is not None:
                program.transport.abort()
            ours.close()
            theirs.close()
            raise
        # The socket stays open under the TLS transport: its addresses are
        # the connection's for the program's environment.
        self.group.driver.start_socket(theirs, peer, self.group, original=sock)

    async def _blocking_handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """The blocking style gets an ``SSLSocket``; the handshake runs here,
        on the loop, without blocking it."""
        assert self.context is not None and self.tls is not None
        tls_sock = self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        loop = self.group.loop
        deadline = loop.time() + self.tls.handshake_timeout
        while True:
            try:
                tls_sock.do_handshake()
                return tls_sock
            except ssl.SSLWantReadError:
                await _wait_fd(loop, tls_sock.fileno(), False, deadline)
            except ssl.SSLWantWriteError:
                await _wait_fd(loop, tls_sock.fileno(), True, deadline)


async def _wait_fd(
    loop: asyncio.AbstractEventLoop, fd: int, write: bool, deadline: float
) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _report_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a connection failed to start", exc_info=task.exception())


class _TransportListener:
    """A listening stream socket served by the event loop's own accept path
    (``loop.create_server``: in uvloop, C code), with no task or coroutine
    per connection: the driver's factory makes each connection's protocol.

    The loop's server runs on a duplicate of the listening descriptor, so
    that pausing at ``max_connections`` closes only the duplicate: the
    socket, and the connections waiting in its backlog, stay.
    """

    def __init__(
        self, bound: BoundSocket, group: ConnectionGroup, factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self.bound = bound
        self.group = group
        self.sock = bound.sock
        self.factory = factory
        self._server: asyncio.AbstractServer | None = None
        self._opening = False
        self._paused = True
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self.refuse_on_drain = True  # see _SocketListener

    def resume(self) -> None:
        if not self._paused or self._closed:
            return
        self._paused = False
        if self._server is None and not self._opening:
            self._opening = True
            self.group.loop.create_task(self._open()).add_done_callback(_report_open_failure)

    async def _open(self) -> None:
        loop = self.group.loop
        try:
            dup = self.sock.dup()
            backlog = self.group.options.backlog
            if self.bound.endpoint.transport == "unix":
                server = await loop.create_unix_server(
                    self.factory, sock=dup, backlog=backlog, **_keep_unix_path(loop)
                )
            else:
                server = await loop.create_server(self.factory, sock=dup, backlog=backlog)
        except OSError as exc:
            # Out of descriptors (the duplicate) or memory: try again soon
            # rather than stop serving; peers wait in the backlog meanwhile.
            self._opening = False
            self.group.log.warning(
                "cannot accept on %s: %s; retrying in %.1f s",
                self.bound.endpoint, exc.strerror or exc, _RETRY_ACCEPT,
            )
            if not self._paused and not self._closed:
                self._paused = True
                self._retry = loop.call_later(_RETRY_ACCEPT, self._retry_open)
            return
        self._opening = False
        if self._paused or self._closed:
            server.close()
        else:
            self._server = server

    async def drain(self) -> None:
        """Stopping: serve what is already in the backlog, then close (see
        _SocketListener.drain). The loop's accept path is stopped; the
        queued connections are accepted here and attached like any other."""
        self.pause()
        loop = self.group.loop
        if self.refuse_on_drain:
            refuse_new_connections(self.bound)
        queued = _accept_queued(self.sock, self.group)
        self.close()  # at once: see _SocketListener.drain
        attach = [
            loop.connect_accepted_socket(_returning(self.factory()), conn) for conn, _ in queued
        ]
        if attach:
            for outcome in await asyncio.gather(*attach, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    self.group.log.debug("a queued connection failed to start: %s", outcome)

    def _retry_open(self) -> None:
        self._retry = None
        if not self.group.full:  # else the next free slot resumes it
            self.resume()

    def pause(self) -> None:
        self._paused = True
        if self._server is not None:
            self._server.close()  # closes the duplicate only
            self._server = None

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self.pause()
        self.sock.close()


def _keep_unix_path(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """asyncio (3.13+) unlinks a Unix socket's path when its server closes;
    a paused listener must keep it. (uvloop never unlinks a given socket.)"""
    if isinstance(loop, asyncio.BaseEventLoop) and sys.version_info >= (3, 13):
        return {"cleanup_socket": False}
    return {}


def _report_open_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("cannot serve a listener: %s", task.exception())


# Descriptors kept free beside the connections (a file being sent, its
# sendfile watcher, a log file, a child's pipes): an eighth of the limit,
# between 4 and 32.
_FD_MARGIN_MIN, _FD_MARGIN_MAX = 4, 32


def _open_descriptors() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return None  # not Linux: not known


def _fit_descriptor_limit(groups: list[ConnectionGroup]) -> None:
    """Lower the services' ``max_connections`` to what the open-file limit
    allows. Out of descriptors, the loop's accept path closes the
    connections waiting in the backlog instead of leaving them queued, so
    a service must stop accepting (at its ``max_connections``) before the
    limit is reached; the excess then waits in the backlog as documented."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    in_use = _open_descriptors()
    if soft == resource.RLIM_INFINITY or in_use is None:
        return
    margin = max(_FD_MARGIN_MIN, min(_FD_MARGIN_MAX, soft // 8))
    available = max(len(groups), soft - in_use - margin)
    total = sum(g.max_connections for g in groups)
    if total <= available:
        return
    for group in groups:
        fitted = max(1, group.max_connections * available // total)
        group.log.warning(
            "max connections lowered from %d to %d: the open-file limit is %d"
            " (raise it with `ulimit -n` or LimitNOFILE= in a systemd unit)",
            group.max_connections, fitted, soft,
        )
        group.max_connections = fitted
        if group.access is not None:
            lowered = group.access.fit_capacity(fitted)
            if lowered is not None:
                group.log.warning("per-source limit lowered to %d to match", lowered)


class Server:
    """Runs one or more services on one event loop.

    Use ``await start()`` (binds everything, then accepts), read
    :attr:`endpoints`, then ``await wait_stopped()`` / ``await shutdown()``.
    """

    def __init__(
        self,
        services: Sequence[ServiceConfig],
        *,
        grace: float = 5.0,
        sockets: SocketSource | None = None,
    ) -> None:
        """``sockets``: where listening sockets come from instead of binding
        them here (a worker's, shared with its parent and the other
        workers). The server then neither unlinks Unix socket paths nor
        drops new connection attempts when it stops: the sockets outlive it,
        and their owner decides."""
        if not services:
            raise ConfigError("no service to run")
        self.services = tuple(services)
        self.grace = grace
        self._source = sockets
        self.owns_sockets = sockets is None
        self._accepting_stopped = False
        # Per service name: connection limits that hold across worker
        # processes (set by the supervisor before it forks).
        self.shared_limits: dict[str, SharedLimits] = {}
        self.groups: list[ConnectionGroup] = []
        self.endpoints: list[tuple[str, Endpoint]] = []
        self._listeners: list[_SocketListener | _TransportListener] = []
        self._datagram_conns: list[tuple[ConnectionGroup, Stoppable]] = []
        self._stopped: asyncio.Event | None = None
        self._bound: list[BoundSocket] = []
        self._plan: list[tuple[ServiceConfig, Driver, list[BoundSocket]]] = []
        self._contexts: dict[str, ssl.SSLContext] = {}

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
                    if endpoint.tls and config.tls is None:
                        raise ConfigError(
                            f"{config.name}: {endpoint} needs a certificate (--cert, --key)"
                        )
                    if endpoint.tls and not endpoint.is_stream:
                        raise ConfigError(f"{config.name}: TLS runs over stream endpoints only")
                if config.tls is not None and config.name not in self._contexts:
                    # Before binding: a certificate that cannot be used is
                    # an error at start, never per connection.
                    self._contexts[config.name] = server_context(config.tls)
                plan.append((config, driver, []))
            for config, _driver, bound in plan:
                for endpoint in config.listen:
                    if self._source is not None:
                        bound.append(self._source(config.name, endpoint, config.options))
                    else:
                        bound.append(bind(endpoint, config.options))
                    self._bound.append(bound[-1])
        except BaseException:
            if self.owns_sockets:
                self._close_bound()
            else:
                self._bound.clear()  # their owner closes them
            raise
        self._plan = plan
        self.endpoints = [(c.name, b.endpoint) for c, _, bs in plan for b in bs]

    def _close_bound(self) -> None:
        for bound in self._bound:
            if self.owns_sockets:
                close_bound(bound)
            else:
                bound.sock.close()  # a copy: the socket is its owner's
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
            access = None
            if config.access is not None:
                access = AccessControl(
                    config.access,
                    loop.time,
                    own_ports=udp_ports,
                    max_datagram=config.limits.max_datagram,
                    shared=self.shared_limits.get(config.name),
                )
            group = ConnectionGroup(
                config.name,
                driver,
                loop,
                limits=config.limits,
                options=config.options,
                access=access,
            )
            self.groups.append(group)
            factory = driver.connection_factory(group)
            for bound in bound_sockets:
                if bound.endpoint.is_stream:
                    listener: _SocketListener | _TransportListener
                    if bound.endpoint.tls or config.proxy is not None:
                        listener = _SecureListener(
                            bound,
                            group,
                            factory,
                            tls=config.tls if bound.endpoint.tls else None,
                            context=self._contexts.get(config.name) if bound.endpoint.tls else None,
                            proxy=config.proxy,
                        )
                    elif factory is None:
                        listener = _SocketListener(bound, group)
                    else:
                        listener = _TransportListener(bound, group, factory)
                    listener.refuse_on_drain = self.owns_sockets
                    group.listeners.append(listener)
                    self._listeners.append(listener)
                else:
                    conn = driver.start_datagram(bound, group)
                    self._datagram_conns.append((group, conn))
        _fit_descriptor_limit([g for g in self.groups if g.listeners])
        for listener in self._listeners:
            listener.resume()

    def reload_certificates(self) -> int:
        """Read every service's certificate and key again (SIGHUP): new
        handshakes use them, connections already up keep theirs. A file
        that cannot be used keeps the old context, with one log line.
        Returns how many services now use new files."""
        renewed = 0
        for config in self.services:
            if config.tls is None or config.name not in self._contexts:
                continue
            try:
                context = server_context(config.tls)
            except CertificateError as exc:
                log.error("%s: %s; keeping the certificate in use", config.name, exc)
                continue
            self._contexts[config.name] = context
            for listener in self._listeners:
                if (
                    isinstance(listener, _SecureListener)
                    and listener.group.name == config.name
                    and listener.context is not None
                ):
                    listener.context = context
            renewed += 1
            log.info("%s: certificate %s loaded again", config.name, config.tls.cert)
        return renewed

    async def stop_accepting(self, timeout: float | None = None) -> None:
        """Accept nothing more: what already waits in a backlog is taken and
        served (a close would reset it), then every listener closes.
        :meth:`shutdown` begins with this; a reload's old server does it
        before the new configuration is announced, so that every connection
        that comes later is the new one's."""
        if self._accepting_stopped:
            return
        self._accepting_stopped = True
        for group in self.groups:
            group.shutting_down = True  # a freed slot resumes no listener
            group.start_held_for_shutdown()
        drains = [asyncio.ensure_future(listener.drain()) for listener in self._listeners]
        if drains:
            await asyncio.wait(drains, timeout=self.grace if timeout is None else timeout)
        for listener in self._listeners:
            listener.close()

    def abort_connections(self) -> None:
        """Every connection of every service ends now."""
        for group in self.groups:
            group.abort_all()

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
        # What already waits in a backlog is served (told of the shutdown
        # once it has started, like every other connection), then the
        # listeners close: new peers are refused, not queued.
        await self.stop_accepting(grace)
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
            self.abort_connections()
            # Give aborted transports one loop turn to report connection_lost.
            await asyncio.sleep(0)
        for group in self.groups:
            group.stop()
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
