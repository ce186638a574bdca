"""The relay: stdin to sockets, sockets to stdout, in one poll loop.

One thread, non-blocking sockets, a :class:`selectors.PollSelector` (poll,
not epoll: epoll refuses regular files, and stdin is often one). Data moves
through two preallocated 256 KiB buffers: ``os.readv`` and ``recv_into``
fill them, ``send``/``os.write`` take memoryview slices of them, so no
chunk is copied or allocated on the way unless ``--crlf`` must rewrite it.
Stdin is not read again until every connection has taken the last chunk:
memory stays flat whatever the transfer size.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import selectors
import socket
import ssl
import stat
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .._config import SocketOptions
from .._endpoint import Endpoint, parse_endpoint
from .._errors import SockworksError, UsageError
from .._protocol import Peer
from .._sockets import apply_options, bind
from ..proxy import encode_v1, encode_v2
from ._text import AddressFilter, CrlfTranslator, hexdump, parse_proxy_source, parse_source
from ._tls import TLSOptions, TLSStream, client_context, describe_tls_error, server_context

# Large enough that a 1 GiB transfer is ~4000 trips round the loop, so
# Python's per-chunk cost vanishes next to the kernel's copying; small
# enough to stay in L2 cache.
BUFSIZE = 256 * 1024
# After a failed TLS handshake the socket is kept this long (without
# blocking) so that the alert saying why reaches a peer that is still
# sending: closing with its data unread would send RST, which can destroy
# the alert. Bounded, because a peer that holds on costs a descriptor.
ABORT_LINGER = 1.0
# The largest UDP payload over IPv4; stdin reads are cut to this size in
# datagram mode so that each read becomes exactly one datagram.
MAX_DATAGRAM = 65507
# Pipes default to 64 KiB; 1 MiB (the unprivileged maximum) lets the
# process at the other end of a pipe run ahead of us.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_STDIN = "stdin"
_LISTENER = "listener"


class NetworkError(SockworksError):
    """Refused, reset, timed out, TLS failure, host not found: one line."""


class IdleTimeout(NetworkError):
    """Nothing moved in either direction for ``--idle-timeout`` seconds."""


@dataclass(frozen=True, slots=True)
class NetcatOptions:
    """How ``connect`` and ``listen`` behave; every field has the netcat default."""

    # At stdin EOF, shut down our write side (the peer sees EOF) and keep
    # printing until the peer closes: ``nc -N``. False: ``--no-shutdown``.
    shutdown: bool = True
    crlf: bool = False
    send_only: bool = False
    recv_only: bool = False
    # Seconds to wait for a connection (and its TLS handshake); None: the OS's.
    connect_timeout: float | None = None
    # Seconds a TLS handshake may take, on both sides; None: no limit. A
    # peer that sends half a ClientHello and stops (or a server that never
    # answers ours) would otherwise hold its socket, and a --keep-open
    # listener's slot, forever; 10 s is ample for any real client.
    handshake_timeout: float | None = 10.0
    # Seconds with no data either way before giving up; None: never.
    idle_timeout: float | None = None
    # socket.AF_INET / AF_INET6 for -4 / -6; AF_UNSPEC: whatever resolves.
    family: int = socket.AF_UNSPEC
    # --source ADDR[:PORT] (a path for unix transports).
    source: str | None = None
    # Nagle stays on: a netcat moves bulk data; --nodelay for keystrokes.
    socket_options: SocketOptions = field(default_factory=lambda: SocketOptions(nodelay=False))
    tls: TLSOptions | None = None
    # listen: serve many connections at once (stdin goes to all of them).
    keep_open: bool = False
    # listen --keep-open: connections at once; more wait in the backlog.
    max_conns: int = 64
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # stdin is a terminal: prompt, a line per message; UDP replies show the sender.
    interactive: bool = False
    # Datagrams have no close: after stdin EOF, connect waits this long for
    # more replies (since the last one) and ends.
    datagram_wait: float = 2.0
    # connect --send-proxy v1|v2: a PROXY protocol header first, as a load
    # balancer would send it (curl --haproxy-protocol), to test a PROXY
    # listener by hand. --proxy-source HOST:PORT states the client address
    # (default: our real local address).
    send_proxy: str | None = None
    proxy_source: str | None = None

    def check(self, endpoint: Endpoint, *, listening: bool) -> None:
        """Raise :class:`UsageError` for combinations that cannot work."""
        if self.send_only and self.recv_only:
            raise UsageError("--send-only and --recv-only exclude each other")
        if self.tls is not None and not endpoint.is_stream:
            raise UsageError(f"--tls works over tcp and unix streams, not {endpoint.transport}")
        if self.family != socket.AF_UNSPEC and not endpoint.is_inet:
            raise UsageError("-4/-6 apply to tcp and udp endpoints only")
        if self.socket_options.broadcast and endpoint.transport != "udp":
            raise UsageError("--broadcast applies to udp endpoints only")
        if not listening and endpoint.is_inet and endpoint.port == 0:
            raise UsageError(f"{endpoint}: cannot connect to port 0")
        if listening and self.source:
            raise UsageError("--source applies to connect; listen binds ENDPOINT itself")
        tls = self.tls
        if (tls is not None and not listening and endpoint.transport == "unix"
                and not tls.servername and not tls.insecure):
            raise UsageError("--tls over unix needs --servername (the name to verify) "
                             "or --insecure")
        AddressFilter.parse(self.allow, self.deny)  # raises on a bad rule
        self._check_proxy(endpoint, listening=listening)

    def _check_proxy(self, endpoint: Endpoint, *, listening: bool) -> None:
        if self.send_proxy is None:
            if self.proxy_source is not None:
                raise UsageError("--proxy-source needs --send-proxy v1|v2")
            return
        if self.send_proxy not in ("v1", "v2"):
            raise UsageError(f"--send-proxy takes v1 or v2, not {self.send_proxy!r}")
        if listening:
            raise UsageError("--send-proxy applies to connect (the proxy sends the header)")
        if not endpoint.is_stream:
            raise UsageError(f"--send-proxy works over tcp and unix streams, not "
                             f"{endpoint.transport} (a header opens a connection)")
        if self.proxy_source is not None:
            if not endpoint.is_inet:
                raise UsageError("--proxy-source HOST:PORT applies to tcp endpoints (over "
                                 "unix the header states the socket paths)")
            parse_proxy_source(self.proxy_source)  # raises on a bad one


@dataclass(slots=True)
class Hooks:
    """What the relay reports to its caller. The library never prints: the
    CLI decides where these go. Each is optional."""

    # --hex: dump lines, ``>`` for sent and ``<`` for received.
    hexdump: Callable[[str], None] | None = None
    # Interactive mode: show the prompt.
    prompt: Callable[[], None] | None = None
    # listen: the bound endpoint, with the real port.
    listening: Callable[[Endpoint], None] | None = None
    # Connections opened, refused, closed; errors that do not end a
    # --keep-open listener.
    event: Callable[[str], None] | None = None
    # What a person should see even without -v: a --keep-open listener's
    # failed TLS handshakes, one line each with the peer and why. When
    # unset these go to ``event``.
    warning: Callable[[str], None] | None = None


class _Conn:
    __slots__ = ("addr", "closed", "dgram", "eof", "handshaking", "host", "last", "lingering",
                 "out", "peer", "shut", "sock", "targets", "tls", "until", "want")

    def __init__(self, sock: socket.socket | TLSStream, peer: str, *, dgram: bool = False,
                 tls: bool = False, handshaking: bool = False, host: str = "") -> None:
        # A socket, or a TLSStream offering the same few methods.
        self.sock: Any = sock
        self.peer = peer
        # The peer's address without the port: whose handshakes give way first.
        self.host = host
        # Handshaking: when it times out. Lingering: when we stop waiting.
        self.until: float | None = None
        # A failed handshake's socket, kept a moment for its alert to leave.
        self.lingering = False
        self.dgram = dgram
        self.tls = tls
        self.handshaking = handshaking
        self.want = selectors.EVENT_READ
        self.out: memoryview | None = None
        self.eof = False
        self.shut = False
        self.closed = False
        self.last = time.monotonic()
        # Datagram peers: None means "the connected peer" (send, not sendto).
        self.targets: list[object] = []
        self.addr: object = None


# --------------------------------------------------------------------------
# errors


def describe_error(exc: BaseException, where: str) -> str:
    """One line naming a network error."""
    if isinstance(exc, ssl.SSLError):
        return describe_tls_error(exc, where)
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out connecting to {where}"
    if isinstance(exc, socket.gaierror):
        return f"host not found: {where} ({exc.strerror})"
    code = getattr(exc, "errno", None)
    words = {
        errno.ECONNREFUSED: f"connection refused by {where}",
        errno.ECONNRESET: f"connection reset by {where}",
        errno.EPIPE: f"connection closed by {where} before all data was sent",
        errno.ENETUNREACH: f"network unreachable: {where}",
        errno.EHOSTUNREACH: f"host unreachable: {where}",
        errno.ETIMEDOUT: f"connection to {where} timed out",
        errno.ENOENT: f"no socket at {where}",
        errno.EACCES: f"permission denied: {where}",
        errno.EMSGSIZE: f"datagram too large for {where}",
    }
    if code in words:
        return words[code]
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{where}: {text}"


def _resolve(endpoint: Endpoint, family: int, kind: int) -> list[tuple[int, object]]:
    host = endpoint.host or "localhost"
    try:
        infos = socket.getaddrinfo(host, endpoint.port, family, kind)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_ADDRFAMILY or (
            family != socket.AF_UNSPEC and exc.errno == socket.EAI_NONAME
            and _is_literal(host)
        ):
            version = "IPv4" if family == socket.AF_INET else "IPv6"
            raise NetworkError(f"{host} has no {version} address") from None
        raise NetworkError(f"host not found: {host} ({exc.strerror})") from None
    return [(info[0], info[4]) for info in infos]


def _is_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------
# opening sockets


def _client_socket(endpoint: Endpoint, options: NetcatOptions) -> socket.socket:
    """A connected (blocking) client socket; NetworkError naming what failed."""
    kind = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    if not endpoint.is_inet:
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            if options.source:
                sock.bind(options.source)
            elif endpoint.transport == "unixgram":
                # Autobind to an abstract address so that replies can reach us.
                sock.bind("")
            sock.settimeout(options.connect_timeout)
            sock.connect(endpoint.path)
        except OSError as exc:
            sock.close()
            raise NetworkError(describe_error(exc, str(endpoint))) from None
        return sock
    last: OSError | None = None
    for family, address in _resolve(endpoint, options.family, kind):
        sock = socket.socket(family, kind)
        try:
            _prepare(sock, endpoint, options, family)
            sock.settimeout(options.connect_timeout)
            sock.connect(address)  # type: ignore[arg-type]
            return sock
        except _SourceError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
    assert last is not None
    raise NetworkError(describe_error(last, str(endpoint))) from None


class _SourceError(NetworkError):
    pass


def _prepare(sock: socket.socket, endpoint: Endpoint, options: NetcatOptions,
             family: int) -> None:
    apply_options(sock, options.socket_options, stream=endpoint.is_stream, inet=True)
    if endpoint.transport == "udp" and options.socket_options.broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if options.source:
        host, port = parse_source(options.source)
        if family == socket.AF_INET6 and host and ":" not in host and _is_literal(host):
            host = "::ffff:" + host
        try:
            if port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            reason = {errno.EADDRINUSE: "address already in use",
                      errno.EADDRNOTAVAIL: "not an address of this machine",
                      errno.EACCES: "permission denied"}.get(exc.errno or 0)
            raise _SourceError(
                f"cannot bind --source {options.source}: {reason or exc.strerror}"
            ) from None


def _tls_client(sock: socket.socket, endpoint: Endpoint, options: NetcatOptions) -> TLSStream:
    assert options.tls is not None
    tls = options.tls
    # The handshake waits for the sooner of --handshake-timeout and --timeout.
    limits = [(t, flag) for t, flag in ((options.handshake_timeout, "--handshake-timeout"),
                                        (options.connect_timeout, "--timeout")) if t]
    timeout, flag = min(limits) if limits else (None, "")
    context = client_context(tls)
    name = tls.servername or (endpoint.host if endpoint.is_inet else None)
    if not context.check_hostname:
        name = tls.servername or (endpoint.host if endpoint.is_inet and
                                  not _is_literal(endpoint.host) else None)
    stream = TLSStream(sock, context, server_side=False, server_hostname=name)
    try:
        stream.handshake(timeout)
    except ssl.SSLError as exc:
        stream.abort()
        stream.close()
        raise NetworkError(describe_tls_error(exc, str(endpoint), name)) from None
    except TimeoutError:
        stream.close(wait=False)
        raise NetworkError(f"TLS handshake with {endpoint} failed: "
                           f"timed out after {timeout:g} s ({flag})") from None
    except OSError as exc:
        stream.close()
        raise NetworkError(describe_error(exc, str(endpoint))) from None
    return stream


def send_proxy_header(sock: socket.socket, endpoint: Endpoint, options: NetcatOptions,
                      hooks: Hooks | None = None) -> bytes:
    """Write the ``--send-proxy`` header on a freshly connected socket (before
    TLS, before any data) and return it. The destination is the address we
    really reached; the source is ``--proxy-source`` or our own address."""
    assert options.send_proxy is not None
    try:
        destination = Peer.from_address(sock.getpeername())
        if options.proxy_source is not None:
            source = Peer(*parse_proxy_source(options.proxy_source))
        else:
            source = Peer.from_address(sock.getsockname())
        if not endpoint.is_inet:
            # Over unix: the path we reached (an unnamed client has no path).
            destination = Peer(path=endpoint.path)
        encode = encode_v1 if options.send_proxy == "v1" else encode_v2
        header = encode(source, destination)
        # Under one MSS, so one segment: receivers may expect it whole (the spec).
        sock.sendall(header)
    except OSError as exc:
        sock.close()
        raise NetworkError(describe_error(exc, str(endpoint))) from None
    if hooks is not None and hooks.event is not None:
        shown = header.decode("ascii").strip() if header[:1] == b"P" else header.hex(" ")
        hooks.event(f"sent PROXY {options.send_proxy} header: {shown}")
    return header


def _peer_name(address: object) -> str:
    if isinstance(address, bytes | str) and address[:1] in (b"\0", "\0"):
        # A Linux abstract address (an autobound unixgram client): shown as @name.
        raw = address[1:]
        return "@" + (raw.decode(errors="replace") if isinstance(raw, bytes) else raw)
    return str(Peer.from_address(address))


def _grow_pipe(fd: int) -> None:
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed


# --------------------------------------------------------------------------
# the public entry points


def connect(
    endpoint: Endpoint | str,
    options: NetcatOptions | None = None,
    *,
    stdin: int | None = 0,
    stdout: int = 1,
    hooks: Hooks | None = None,
) -> None:
    """Connect to ``endpoint`` and relay ``stdin`` to it and it to ``stdout``.

    Returns when the exchange is over (see :class:`NetcatOptions`); raises
    :class:`NetworkError` for refused, reset, timeouts, TLS failures and
    unknown hosts, :class:`UsageError` for options that cannot work.
    ``stdin``/``stdout`` are file descriptors; ``stdin=None`` sends nothing.
    """
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    options = options or NetcatOptions()
    options.check(ep, listening=False)
    if options.tls is not None:
        client_context(options.tls)  # a bad --cafile is a usage error, before connecting
    sock = _client_socket(ep, options)
    if options.send_proxy is not None:
        send_proxy_header(sock, ep, options, hooks)
    sock.setblocking(False)
    stream: socket.socket | TLSStream = sock
    if options.tls is not None:
        stream = _tls_client(sock, ep, options)
    conn = _Conn(stream, str(ep), dgram=not ep.is_stream, tls=options.tls is not None)
    if conn.dgram:
        conn.targets = [None]
    relay = _Relay(options, hooks or Hooks(), stdin, stdout, listener=None, connecting=True)
    relay.add(conn)
    relay.run()


def listen(
    endpoint: Endpoint | str,
    options: NetcatOptions | None = None,
    *,
    stdin: int | None = 0,
    stdout: int = 1,
    hooks: Hooks | None = None,
) -> None:
    """Bind ``endpoint``, report it through ``hooks.listening`` (with the
    real port), accept one connection (or, with ``keep_open``, many) and
    relay as :func:`connect` does."""
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    options = options or NetcatOptions()
    options.check(ep, listening=True)
    hooks = hooks or Hooks()
    context = server_context(options.tls) if options.tls is not None else None
    ep = _listen_host(ep, options.family)
    bound = bind(ep, options.socket_options)
    relay = _Relay(options, hooks, stdin, stdout, listener=bound.sock, context=context)
    try:
        if not ep.is_stream:
            conn = _Conn(bound.sock, str(bound.endpoint), dgram=True)
            relay.listener = None
            relay.add(conn, announce=False)
        if hooks.listening:
            hooks.listening(bound.endpoint)
        relay.run()
    finally:
        bound.sock.close()
        if not ep.is_inet:
            try:
                os.unlink(ep.path)
            except OSError:
                pass


def _listen_host(ep: Endpoint, family: int) -> Endpoint:
    if not ep.is_inet or family == socket.AF_UNSPEC:
        return ep
    if ep.host in ("", "*"):
        return Endpoint(ep.transport, "0.0.0.0" if family == socket.AF_INET else "::", ep.port)
    kind = socket.SOCK_STREAM if ep.is_stream else socket.SOCK_DGRAM
    _, address = _resolve(ep, family, kind)[0]
    return Endpoint(ep.transport, str(address[0]), ep.port)  # type: ignore[index]


# --------------------------------------------------------------------------
# the loop


class _StdoutClosed(Exception):
    pass


class _Relay:
    def __init__(self, options: NetcatOptions, hooks: Hooks, stdin: int | None, stdout: int,
                 *, listener: socket.socket | None, context: ssl.SSLContext | None = None,
                 connecting: bool = False) -> None:
        self.options = options
        self.hooks = hooks
        try:
            if stdin is not None:
                os.fstat(stdin)
        except OSError:
            stdin = None  # a closed stdin: nothing to send
        try:
            os.fstat(stdout)
        except OSError:
            raise UsageError(f"stdout (fd {stdout}) is not open") from None
        self.stdin = stdin
        self.stdout = stdout
        self.listener = listener
        self.context = context
        self.connecting = connecting
        self.filter = AddressFilter.parse(options.allow, options.deny)
        self.sel = selectors.PollSelector()
        self.masks: dict[object, int] = {}
        self.conns: list[_Conn] = []
        # Failed TLS handshakes, kept a moment for their alert (ABORT_LINGER),
        # oldest first; not connections any more: not in conns, not counted.
        self.lingering: list[_Conn] = []
        self.accepted = 0
        self.rbuf = bytearray(BUFSIZE)
        self.rview = memoryview(self.rbuf)
        self.wbuf = bytearray(BUFSIZE)
        self.wview = memoryview(self.wbuf)
        self.crlf = CrlfTranslator() if options.crlf else None
        self.stdin_eof = stdin is None or options.recv_only
        self.stdin_eof_at = time.monotonic()
        self.last = self.started = time.monotonic()
        self.tx = 0
        self.rx = 0
        self.prompt_due: float | None = None
        self.done = False
        if stdin is not None and not options.recv_only:
            _grow_pipe(stdin)
        _grow_pipe(stdout)

    # -- bookkeeping -------------------------------------------------------

    def _event(self, text: str) -> None:
        if self.hooks.event:
            self.hooks.event(text)

    def _warn(self, text: str) -> None:
        report = self.hooks.warning or self.hooks.event
        if report:
            report(text)

    def _set_mask(self, key: object, fileobj: int | socket.socket, mask: int) -> None:
        old = self.masks.get(key, 0)
        if mask == old:
            return
        if not old:
            self.sel.register(fileobj, mask, key)
        elif not mask:
            self.sel.unregister(fileobj)
        else:
            self.sel.modify(fileobj, mask, key)
        if mask:
            self.masks[key] = mask
        else:
            self.masks.pop(key, None)

    def add(self, conn: _Conn, *, announce: bool = True) -> None:
        self.conns.append(conn)
        if self.options.interactive and not conn.handshaking and self.hooks.prompt:
            self.hooks.prompt()
        if self.stdin_eof and not conn.handshaking and not self.options.recv_only:
            self._shutdown_write(conn)  # nothing to send: say so at once

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._set_mask(conn, conn.sock, 0)
        if conn.lingering:
            self.lingering.remove(conn)
        elif conn in self.conns:
            self.conns.remove(conn)
        if conn.tls:
            # One of many (--keep-open): never wait for a peer that reads nothing.
            conn.sock.close(wait=not self.options.keep_open)
        elif conn.sock is not self.listener:
            conn.sock.close()

    def _targets(self) -> list[_Conn]:
        return [c for c in self.conns if not c.handshaking and not c.shut and (
            not c.dgram or c.targets)]

    def _stdin_done(self) -> bool:
        return self.stdin_eof and all(
            c.out is None and not (c.tls and c.sock.has_output) for c in self.conns)

    def _finished(self) -> bool:
        if self.done:
            return True
        if self.options.keep_open:
            return False
        if self.listener is not None and self.accepted == 0:
            return False
        if not self.conns:
            return True
        conn = self.conns[0]
        if conn.dgram:
            return False  # connect: ends in _timers; listen: by signal
        if conn.eof:
            return self._stdin_done() or self.options.interactive or not self.options.shutdown
        return self.options.send_only and not self.options.shutdown and self._stdin_done()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        try:
            for conn in list(self.conns):
                if conn.tls and conn.sock.pending():  # came with the handshake
                    self._read_conn(conn)
            while not self._finished():
                self._update_interest()
                events = self.sel.select(self._timeout())
                for key, mask in events:
                    tag = key.data
                    if tag == _STDIN:
                        self._read_stdin()
                    elif tag == _LISTENER:
                        self._accept()
                    elif isinstance(tag, _Conn) and not tag.closed:
                        if tag.lingering:
                            self._linger_io(tag, mask)
                            continue
                        if tag.handshaking:
                            self._handshake(tag)
                            continue
                        if mask & selectors.EVENT_WRITE:
                            self._flush(tag)
                        if mask & selectors.EVENT_READ and not tag.closed:
                            self._read_conn(tag)
                self._timers()
        except _StdoutClosed:
            pass  # `sockworks connect … | head`: the reader has what it wanted
        finally:
            for conn in [*self.conns, *self.lingering]:
                self._close(conn)
            if self.listener is not None and _LISTENER in self.masks:
                self.sel.unregister(self.listener)
            self.sel.close()

    def _update_interest(self) -> None:
        want_stdin = (not self.stdin_eof and bool(self._targets())
                      and all(c.out is None for c in self.conns))
        if self.stdin is not None:
            self._set_mask(_STDIN, self.stdin, selectors.EVENT_READ if want_stdin else 0)
        if self.listener is not None:
            if self.options.keep_open:
                # Unfinished handshakes give way to a newcomer (_make_room):
                # while one is in progress there is room to accept.
                accepting = len(self.conns) < self.options.max_conns or any(
                    c.handshaking for c in self.conns)
            else:
                accepting = self.accepted == 0
            self._set_mask(_LISTENER, self.listener, selectors.EVENT_READ if accepting else 0)
        for conn in self.lingering:
            mask = selectors.EVENT_READ
            if conn.sock.has_output:
                mask |= selectors.EVENT_WRITE
            self._set_mask(conn, conn.sock, mask)
        for conn in self.conns:
            if conn.handshaking:
                mask = conn.want
            else:
                mask = 0 if conn.eof else selectors.EVENT_READ
                if conn.out is not None or (conn.tls and conn.sock.has_output):
                    mask |= selectors.EVENT_WRITE
            self._set_mask(conn, conn.sock, mask)

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines: list[float] = []
        idle = self.options.idle_timeout
        if idle:
            if self.options.keep_open:
                deadlines.extend(c.last + idle for c in self.conns)
            elif self.conns or self.listener is None:
                deadlines.append(self.last + idle)
        if self.prompt_due is not None:
            deadlines.append(self.prompt_due)
        deadlines.extend(c.until for c in self.conns if c.handshaking and c.until is not None)
        if self.lingering:
            deadlines.append(self.lingering[0].until or now)  # the oldest ends first
        accept_by = self._accept_deadline()
        if accept_by is not None:
            deadlines.append(accept_by)
        linger = self._linger_deadline()
        if linger is not None:
            deadlines.append(linger)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _accept_deadline(self) -> float | None:
        """listen --timeout: how long to wait for the first peer."""
        if self.connecting or self.accepted or self.options.connect_timeout is None:
            return None
        return self.started + self.options.connect_timeout

    def _linger_deadline(self) -> float | None:
        if not (self.connecting and self.stdin_eof and self.conns and self.conns[0].dgram):
            return None
        if self.options.recv_only:
            return None
        return max(self.stdin_eof_at, self.conns[0].last) + self.options.datagram_wait

    def _timers(self) -> None:
        now = time.monotonic()
        accept_by = self._accept_deadline()
        if accept_by is not None and now >= accept_by:
            raise NetworkError(f"no peer within {self.options.connect_timeout:g} s (--timeout)")
        if self.prompt_due is not None and now >= self.prompt_due:
            self.prompt_due = None
            if self.hooks.prompt:
                self.hooks.prompt()
        linger = self._linger_deadline()
        if linger is not None and now >= linger:
            self.done = True
        for conn in [c for c in self.conns if c.handshaking and c.until is not None
                     and now >= c.until]:
            self._handshake_timed_out(conn)
        while self.lingering and now >= (self.lingering[0].until or now):
            self._close(self.lingering[0])
        idle = self.options.idle_timeout
        if not idle:
            return
        if self.options.keep_open:
            for conn in list(self.conns):
                if now - conn.last >= idle and not conn.dgram:
                    self._event(f"{conn.peer}: idle for {idle:g} s, closing")
                    self._close(conn)
        elif (self.conns or self.listener is None) and now - self.last >= idle:
            raise IdleTimeout(f"idle for {idle:g} s (--idle-timeout), giving up")

    # -- stdin → sockets --------------------------------------------------------

    def _read_stdin(self) -> None:
        assert self.stdin is not None
        dgram = any(c.dgram for c in self.conns)
        view = self.wview[:MAX_DATAGRAM] if dgram else self.wview
        try:
            n = os.readv(self.stdin, [view])
        except BlockingIOError:
            return
        except OSError:
            n = 0  # EIO: the terminal went away; that is the end of input
        if n == 0:
            self._stdin_ended()
            return
        now = time.monotonic()
        self.last = now
        data: memoryview = view[:n]
        if self.options.interactive and dgram:
            # A datagram per line, without its line end (as the seeds' UDP
            # client sends it), however many lines one read brought.
            lines = bytes(data).split(b"\n")
            if len(lines) > 1 and not lines[-1]:
                lines.pop()
            for line in lines:
                self._send_chunk(memoryview(line.rstrip(b"\r")), now)
        else:
            if self.crlf is not None:
                data = memoryview(self.crlf.feed(data))
            self._send_chunk(data, now)
        if self.options.interactive:
            self.prompt_due = now + 0.5

    def _send_chunk(self, data: memoryview, now: float) -> None:
        if self.hooks.hexdump:
            self.hooks.hexdump(hexdump(data, self.tx, ">"))
        self.tx += len(data)
        for conn in self._targets():
            conn.last = now
            if conn.dgram:
                self._send_datagram(conn, data)
            else:
                conn.out = data
                self._flush(conn)

    def _stdin_ended(self) -> None:
        self.stdin_eof = True
        self.stdin_eof_at = time.monotonic()
        for conn in list(self.conns):
            if conn.out is None:
                self._shutdown_write(conn)

    def _shutdown_write(self, conn: _Conn) -> None:
        if (conn.shut or conn.dgram or conn.closed or not self.options.shutdown
                or self.options.recv_only):
            return
        conn.shut = True
        try:
            if conn.tls:
                conn.sock.half_close()  # close_notify, then FIN
            else:
                conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone; the read side will say how

    def _flush(self, conn: _Conn) -> None:
        if conn.out is None:
            if conn.tls:
                try:
                    conn.sock.flush()
                except OSError as exc:
                    self._conn_failed(conn, exc)
            return
        view = conn.out
        send = conn.sock.send
        try:
            while view:
                view = view[send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            conn.out = None
            self._conn_failed(conn, exc)
            return
        if view:
            conn.out = view
            return
        conn.out = None
        if self.stdin_eof:
            self._shutdown_write(conn)

    def _send_datagram(self, conn: _Conn, data: memoryview) -> None:
        for target in list(conn.targets):
            for _ in range(2):
                try:
                    if target is None:
                        conn.sock.send(data)
                    else:
                        conn.sock.sendto(data, target)
                    break
                except BlockingIOError:
                    select.select([], [conn.sock], [], 1.0)  # a full send buffer: rare
                except OSError as exc:
                    if self.listener is None and not self.connecting and target is not None:
                        conn.targets.remove(target)  # a listener's peer went away
                        break
                    self._conn_failed(conn, exc)
                    return

    # -- sockets → stdout --------------------------------------------------------

    def _read_conn(self, conn: _Conn) -> None:
        sock = conn.sock
        while True:
            try:
                if conn.dgram:
                    n, address = sock.recvfrom_into(self.rbuf)
                else:
                    n = sock.recv_into(self.rbuf)
                    address = None
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                if conn.dgram and not self.connecting and exc.errno == errno.ECONNREFUSED:
                    return  # our last datagram's peer is gone; keep listening
                self._conn_failed(conn, exc)
                return
            if conn.dgram:
                self._got_datagram(conn, n, address)
            elif n == 0:
                self._peer_closed(conn)
                return
            else:
                self._deliver(conn, self.rview[:n], None)
            if not (conn.tls and sock.pending()):
                return

    def _got_datagram(self, conn: _Conn, n: int, address: object) -> None:
        if not self.connecting and address:
            peer = Peer.from_address(address)
            if self.filter and not self.filter.permits(peer.host):
                self._event(f"refused a datagram from {_peer_name(address)} (--allow/--deny)")
                return
            if address not in conn.targets:
                if self.options.keep_open:
                    conn.targets.append(address)
                    self.accepted += 1
                    self._event(f"datagrams from {_peer_name(address)}")
                elif not conn.targets:
                    # The first sender is our peer from now on, as with `nc -ul`.
                    try:
                        conn.sock.connect(address)
                        conn.targets = [None]
                        conn.peer = _peer_name(address)
                    except OSError:
                        conn.targets = [address]
                    self.accepted = 1
                    self._event(f"datagrams from {_peer_name(address)}")
                    if self.options.interactive and self.hooks.prompt:
                        self.hooks.prompt()
                else:
                    return  # not our peer
        self._deliver(conn, self.rview[:n], address)

    def _deliver(self, conn: _Conn, data: memoryview, address: object) -> None:
        now = time.monotonic()
        self.last = conn.last = now
        if self.hooks.hexdump:
            self.hooks.hexdump(hexdump(data, self.rx, "<"))
        self.rx += len(data)
        if self.options.send_only:
            return
        if self.options.interactive:
            text = bytes(data)
            if conn.dgram:
                sender = _peer_name(address) if address else conn.peer
                text = sender.encode() + b": " + text
            if not text.endswith(b"\n"):
                text += b"\n"
            self._write_out(memoryview(text))
            self.prompt_due = None
            if self.hooks.prompt:
                self.hooks.prompt()
            return
        self._write_out(data)

    def _write_out(self, data: memoryview) -> None:
        fd = self.stdout
        try:
            while data:
                try:
                    data = data[os.write(fd, data):]
                except BlockingIOError:
                    select.select([], [fd], [])
        except (BrokenPipeError, ConnectionResetError):
            raise _StdoutClosed() from None
        except OSError as exc:
            if exc.errno == errno.EBADF:  # started with stdout closed: nowhere to print
                raise _StdoutClosed() from None
            raise

    def _peer_closed(self, conn: _Conn) -> None:
        conn.eof = True
        if self.options.keep_open:
            self._event(f"{conn.peer} closed the connection")
            self._close(conn)

    # -- listening ---------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        got = accept_one(self.listener, self.filter, self.options.socket_options, self._event)
        if got is None:
            return
        sock, peer = got
        self.accepted += 1
        self._event(f"connection from {peer}")
        if self.context is not None:
            if self.options.keep_open and len(self.conns) >= self.options.max_conns:
                self._make_room(peer.host)
            tsock = TLSStream(sock, self.context, server_side=True)
            conn = _Conn(tsock, str(peer), tls=True, handshaking=True, host=peer.host)
            if self.options.handshake_timeout:
                conn.until = time.monotonic() + self.options.handshake_timeout
            self.conns.append(conn)
            self._handshake(conn)
            return
        self.add(_Conn(sock, str(peer)))

    def _handshake(self, conn: _Conn) -> None:
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            conn.want = selectors.EVENT_READ
            return
        except ssl.SSLWantWriteError:
            conn.want = selectors.EVENT_WRITE
            return
        except OSError as exc:
            self._conn_failed(conn, exc)
            return
        conn.handshaking = False
        conn.until = None
        self.conns.remove(conn)
        self.add(conn)
        if conn.sock.pending():  # data that came with the handshake's last flight
            self._read_conn(conn)

    def _make_room(self, host: str) -> None:
        """--max-conns reached, a newcomer from ``host`` accepted: the oldest
        unfinished handshake of the address with the most of them (the
        newcomer counted) gives way. Handshakes hold a slot only until
        someone needs it, and a flood from one address displaces itself,
        never a client on another address."""
        victim = handshake_to_drop(self.conns, host)
        if victim is not None:
            self._warn(dropped_message(victim.peer, self.options.max_conns))
            self._close(victim)

    def _handshake_timed_out(self, conn: _Conn) -> None:
        message = (f"TLS handshake with {conn.peer} failed: timed out after "
                   f"{self.options.handshake_timeout:g} s (--handshake-timeout)")
        self._close(conn)
        if not self.options.keep_open:
            raise NetworkError(message)
        self._warn(message)

    def _conn_failed(self, conn: _Conn, exc: BaseException) -> None:
        message = describe_error(exc, conn.peer)
        if self.options.keep_open:
            if conn.handshaking and not conn.sock.received and isinstance(
                    exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
                # Came and went without a byte (a port probe, a health
                # check): no TLS was attempted, so nothing failed.
                self._event(f"{conn.peer} closed the connection")
                self._close(conn)
                return
            # Failed handshakes at the default level: a person running the
            # listener should see who fails and why without -v.
            (self._warn if conn.handshaking else self._event)(message)
            if conn.tls and isinstance(exc, ssl.SSLError):
                self._linger(conn)
            else:
                self._close(conn)
            return
        if conn.tls and isinstance(exc, ssl.SSLError):
            conn.sock.abort()  # nothing else to serve: blocking briefly costs no one
        self._close(conn)
        raise NetworkError(message)

    def _linger(self, conn: _Conn) -> None:
        """A failed TLS connection of a --keep-open listener: its alert and
        FIN go out, and what it still sends is read and dropped, all from
        the loop, for at most ABORT_LINGER seconds."""
        self.conns.remove(conn)
        conn.lingering = True
        conn.until = time.monotonic() + ABORT_LINGER
        self.lingering.append(conn)
        try:
            conn.sock.start_abort()
        except OSError:
            self._close(conn)
            return
        if len(self.lingering) > self.options.max_conns:
            self._close(self.lingering[0])  # bounded: the oldest has had most of its moment

    def _linger_io(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                conn.sock.flush()
            if mask & selectors.EVENT_READ and conn.sock.drain():
                self._close(conn)  # the peer has closed: nothing left to protect
        except OSError:
            self._close(conn)


def scan(
    host: str,
    ports: Sequence[int],
    *,
    timeout: float = 1.0,
    concurrency: int = 100,
    family: int = socket.AF_UNSPEC,
) -> list[int]:
    """The TCP ports of ``host`` that accept a connection (``--zero``).

    Nothing is sent: each probe connects and closes. At most ``concurrency``
    probes are in flight, each given ``timeout`` seconds.
    """
    if concurrency < 1:
        raise UsageError("concurrency must be at least 1")
    fam, address = _resolve(Endpoint("tcp", host, 1), family, socket.SOCK_STREAM)[0]
    ip = address[0]  # type: ignore[index]
    found: list[int] = []
    todo = iter(ports)
    active: dict[int, tuple[socket.socket, int, float]] = {}
    with selectors.DefaultSelector() as sel:
        exhausted = False
        while True:
            while not exhausted and len(active) < concurrency:
                port = next(todo, None)
                if port is None:
                    exhausted = True
                    break
                sock = socket.socket(fam, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex((ip, port))
                if code == 0:
                    found.append(port)
                    sock.close()
                elif code in (errno.EINPROGRESS, errno.EAGAIN):
                    active[sock.fileno()] = (sock, port, time.monotonic() + timeout)
                    sel.register(sock, selectors.EVENT_WRITE)
                else:
                    sock.close()
            if not active:
                break
            wait = min(d for _, _, d in active.values()) - time.monotonic()
            for key, _ in sel.select(max(0.0, wait)):
                sock, port, _ = active.pop(key.fd)
                sel.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    found.append(port)
                sock.close()
            now = time.monotonic()
            for fd, (sock, _, deadline) in list(active.items()):
                if now >= deadline:
                    del active[fd]
                    sel.unregister(sock)
                    sock.close()
    return sorted(found)


def accept_one(
    listener: socket.socket,
    address_filter: AddressFilter | None,
    socket_options: SocketOptions,
    event: Callable[[str], None],
) -> tuple[socket.socket, Peer] | None:
    """One waiting connection from a non-blocking ``listener``, made
    non-blocking with the socket options set; None when none is waiting,
    accepting failed, or ``--allow``/``--deny`` refused it (each said
    through ``event``). ``listen`` and ``listen --exec`` both accept here."""
    try:
        sock, address = listener.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        event(f"accept failed: {exc.strerror or exc}")
        return None
    peer = Peer.from_address(address)
    if address_filter and not address_filter.permits(peer.host):
        event(f"refused a connection from {peer} (--allow/--deny)")
        sock.close()
        return None
    sock.setblocking(False)
    try:
        apply_options(sock, socket_options, stream=True, inet=sock.family != socket.AF_UNIX)
    except OSError:
        pass  # the peer already reset: the first read says so
    return sock, peer


class _Handshaking(Protocol):
    handshaking: bool
    host: str


_H = TypeVar("_H", bound=_Handshaking)


def handshake_to_drop(connections: Sequence[_H], host: str) -> _H | None:
    """The unfinished handshake that gives way at --max-conns when a
    newcomer from ``host`` is accepted: the oldest of the address with the
    most of them, the newcomer counted. A flood from one address displaces
    itself, never a client on another address. ``connections``: oldest
    first. ``listen`` and ``listen --exec`` both decide here."""
    shaking = [c for c in connections if c.handshaking]
    counts = Counter(c.host for c in shaking)
    counts[host] += 1
    top = max(counts.values())
    return next((c for c in shaking if counts[c.host] == top), None)


def dropped_message(peer: str, max_conns: int) -> str:
    return (f"TLS handshake with {peer} failed: unfinished at --max-conns "
            f"{max_conns}, dropped to make room for a newcomer")
