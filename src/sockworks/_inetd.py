"""inetd mode: serve the one connection that inetd, xinetd (``wait = no``)
or systemd (``Accept=yes``) put on standard input, or for a datagram
service the datagram socket there (until it has been idle for the idle
timeout), then exit.

The connection runs on the engine every listener uses: the service's
:class:`~sockworks._core.ConnectionGroup` (limits, the idle rule, access
control, the log lines) and its driver's own way of starting a connection,
so every handler style behaves as it does behind a listener.

Standard output is the connection too (inetd puts the socket on 0, 1 and,
for xinetd, 2): once the socket is taken, descriptors 0 and 1 become
/dev/null, so nothing but the protocol can ever reach the peer; and when
standard error is the same socket it becomes /dev/null too, and logs go to
syslog (``/dev/log``) if there is one, else nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import signal
import socket
import stat
from dataclasses import dataclass, replace

from ._access import AccessControl, AccessPolicy
from ._core import ConnectionGroup, Driver
from ._endpoint import Endpoint, inherited_endpoint
from ._errors import ConfigError, UsageError
from ._run import new_event_loop
from ._server import ServiceConfig
from ._sockets import BoundSocket, apply_options, format_peer
from ._systemd import inspect, sockets_given

log = logging.getLogger("sockworks.inetd")

SYSLOG = "/dev/log"


@dataclass(slots=True)
class StdinSocket:
    """The socket taken from standard input."""

    sock: socket.socket  # a descriptor of our own (0 is /dev/null now)
    endpoint: Endpoint  # its local side: what the service is served on
    stderr_is_connection: bool  # xinetd passes the socket as 0, 1 and 2


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def take_stdin(fd: int = 0) -> StdinSocket:
    """Check that standard input is a connection (or a datagram socket),
    take it, and put /dev/null where it was (descriptors 0 and 1, and 2
    when standard error is the same socket). A terminal, a file or a pipe
    there is a :class:`UsageError`, raised before anything is changed."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISSOCK(mode):
        what = "a terminal" if mode and os.isatty(fd) else "not a socket"
        hint = ""
        if sockets_given():  # Accept=yes without StandardInput=socket
            hint = " (systemd puts the connection there with StandardInput=socket)"
        raise UsageError(
            f"--inetd serves the connection on standard input, and standard input is {what}: "
            f"start it from inetd, xinetd or a systemd Accept=yes socket{hint}"
        )
    passed = inspect(fd, subject="--inetd: standard input")
    if passed.is_stream and passed.listening:
        raise UsageError(
            "--inetd: standard input is a listening socket (inetd's wait = yes), not a "
            "connection: serve it with --listen fd:0 instead of --inetd"
        )
    stderr_is_connection = _same_file(fd, 2)
    sock = socket.socket(fileno=os.dup(fd))  # close-on-exec, unlike 0
    endpoint = replace(inherited_endpoint(passed, "stdin"), fd=sock.fileno())
    # From here on nothing written to 0, 1 (print, a stray library) or to a
    # standard error that is the connection can reach the peer; and the
    # connection closes when our own descriptor does.
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for target in (0, 1, 2) if stderr_is_connection else (0, 1):
            os.dup2(null, target)
    finally:
        if null > 2:
            os.close(null)
    return StdinSocket(sock, endpoint, stderr_is_connection)


def log_to_syslog(address: str = SYSLOG) -> logging.Handler:
    """Logs to syslog when standard error is the connection: a handler on
    the root logger for ``address`` if it is there, else one that drops
    everything (never the connection). Returns the handler."""
    handler: logging.Handler
    try:
        if not os.path.exists(address):
            raise OSError(f"{address} does not exist")
        handler = logging.handlers.SysLogHandler(
            address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter(f"sockworks[{os.getpid()}]: %(name)s: %(message)s"))
    except OSError:
        handler = logging.NullHandler()
    root = logging.getLogger()
    # Whatever writes to standard error (/dev/null now) stays; this is added.
    root.addHandler(handler)
    return handler


class _WatchedAccess(AccessControl):
    """The service's access control, which also notes when the last
    datagram came: a datagram service in inetd mode ends once it has had
    none for the idle timeout."""

    last_datagram = 0.0

    def admit_datagram(self, host: str, port: int, size: int) -> str | None:
        self.last_datagram = self.clock()
        return super().admit_datagram(host, port, size)


def run_inetd(config: ServiceConfig, taken: StdinSocket, *, grace: float = 5.0) -> int:
    """Serve ``taken`` with ``config``'s service; the exit status (0 once
    the connection is done, or the datagram socket has been idle for the
    idle timeout, or after SIGTERM/SIGINT)."""
    from ._drivers import make_driver

    endpoint = taken.endpoint
    driver = make_driver(config.handler)
    if not driver.supports(endpoint):
        raise ConfigError(
            f"{config.name}: a {driver.name} handler cannot serve {endpoint.transport} "
            f"sockets, and standard input is one ({endpoint})"
        )
    if config.tls is not None or config.proxy is not None:
        raise ConfigError(
            "--inetd serves the connection as it is: TLS and the PROXY protocol are "
            "for listeners (--listen tls:..., --proxy-protocol without --inetd)"
        )
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(config, driver, taken, grace))
    finally:
        loop.close()
    return 0


async def _serve(config: ServiceConfig, driver: Driver, taken: StdinSocket, grace: float) -> None:
    loop = asyncio.get_running_loop()
    endpoint, sock = taken.endpoint, taken.sock
    access: AccessControl | None = None
    if not endpoint.is_stream:
        # A datagram service's idle rule is kept by its access control;
        # the CLI always gives a policy, the API may not: then the defaults.
        access = _WatchedAccess(
            config.access or AccessPolicy(),
            loop.time,
            own_ports={endpoint.port} if endpoint.transport == "udp" else (),
            max_datagram=config.limits.max_datagram,
        )
    elif config.access is not None:
        access = AccessControl(config.access, loop.time, max_datagram=config.limits.max_datagram)
    group = ConnectionGroup(
        config.name, driver, loop, limits=config.limits, options=config.options, access=access
    )
    stopped = asyncio.Event()
    datagrams = None

    def on_signal(signum: int) -> None:
        if stopped.is_set():
            group.abort_all()
            return
        log.info("%s received: finishing", signal.Signals(signum).name)
        stopped.set()
        group.shutting_down = True
        if datagrams is not None:
            datagrams.begin_shutdown()
        for conn in list(group.live):
            conn.begin_shutdown()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        if endpoint.is_stream:
            # The socket is the connection's from here (it closes it).
            await _start_connection(group, driver, sock, endpoint)
            await _until_idle(group, stopped, grace)
        else:
            assert isinstance(access, _WatchedAccess)
            access.last_datagram = loop.time()
            datagrams = driver.start_datagram(BoundSocket(sock, endpoint), group)
            await _until_quiet(access, config.limits.idle_timeout, stopped)
            datagrams.begin_shutdown()
            await asyncio.sleep(0)  # the transport's close takes a turn
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        group.stop()
        driver.close()


async def _start_connection(
    group: ConnectionGroup, driver: Driver, sock: socket.socket, endpoint: Endpoint
) -> None:
    """Start the connection the way a listener would for this driver."""
    factory = driver.connection_factory(group)
    if factory is not None:
        sock.setblocking(False)
        # The connection admits itself (access control), as when accepted.
        try:
            await group.loop.connect_accepted_socket(factory, sock)
        except OSError as exc:
            group.log.info("the connection ended before it started: %s", exc.strerror or exc)
            sock.close()
        return
    try:
        peer = format_peer(sock.getpeername())
        apply_options(sock, group.options, stream=True, inet=endpoint.is_inet)
    except OSError as exc:  # the peer left already
        group.log.info("the connection ended before it started: %s", exc.strerror or exc)
        sock.close()
        return
    if not group.admit(peer):
        sock.close()
        return
    driver.start_socket(sock, peer, group)


async def _until_idle(group: ConnectionGroup, stopped: asyncio.Event, grace: float) -> None:
    """Until the connection is over; after a signal, at most ``grace`` more."""
    done = asyncio.ensure_future(group.wait_idle())
    signalled = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({done, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            return
        finished, _ = await asyncio.wait({done}, timeout=grace)
        if not finished:
            log.warning("grace period of %.1f s over: aborting the connection", grace)
            group.abort_all()
            await asyncio.sleep(0)
    finally:
        done.cancel()
        signalled.cancel()


async def _until_quiet(
    access: _WatchedAccess, timeout: float | None, stopped: asyncio.Event
) -> None:
    """Until no datagram has come for ``timeout`` seconds (or a signal)."""
    loop = asyncio.get_running_loop()
    while not stopped.is_set():
        wait = None if timeout is None else access.last_datagram + timeout - loop.time()
        if wait is not None and wait <= 0:
            return
        try:
            await asyncio.wait_for(stopped.wait(), wait)
        except TimeoutError:
            continue
