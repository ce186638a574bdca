"""``--exec`` and ``--sh-exec``: a program whose stdin and stdout are the connection.

Plain TCP and Unix streams take the fast path that tcpserver takes: the
socket itself becomes the program's fd 0 and 1, and no byte passes through
us. TLS cannot: the bytes must be decrypted here, so the program gets two
pipes and one poll loop relays between them and the TLS connection.

Either way the half-close rule holds (what ncat gets wrong, nmap #2843 and
#962): the peer's EOF is the program's stdin EOF while its output still
flows; when the program exits, its output is flushed, then our side of the
connection is shut down, and what the peer still sends is read and dropped
for up to a second before the close, so that a reset never destroys the
program's last output.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType

from .._endpoint import Endpoint, parse_endpoint
from .._errors import SockworksError, UsageError
from .._sockets import bind
from ._relay import (
    Hooks,
    NetcatOptions,
    NetworkError,
    _client_socket,
    _grow_pipe,
    _listen_host,
    _tls_client,
    accept_one,
    describe_error,
    dropped_message,
    handshake_to_drop,
    send_proxy_header,
)
from ._text import AddressFilter
from ._tls import TLSStream, client_context, server_context

# After the program exits: how long what the peer still sends is read and
# dropped before the close. Closing over unread data sends RST, and a RST
# can destroy the program's last output before the peer reads it; a peer
# that keeps sending only costs us this long.
CLOSE_LINGER = 1.0
# On SIGINT/SIGTERM of sockworks: how long the programs get after SIGTERM
# before SIGKILL, so that none is left behind (or a zombie).
STOP_GRACE = 2.0
# The TLS relay's per-connection read size: a TLS record is at most 16 KiB,
# so this holds a few; allocated once per loop, not per connection.
CHUNK = 64 * 1024

# tcp-environ(5) and ucspi-unix's names: inherited values would describe
# some other connection, so they are dropped before ours are set.
CONNECTION_VARIABLES = (
    "PROTO", "TCPLOCALIP", "TCPLOCALPORT", "TCPLOCALHOST", "TCPREMOTEIP", "TCPREMOTEPORT",
    "TCPREMOTEHOST", "TCPREMOTEINFO", "REMOTE_ADDR", "REMOTE_PORT", "UNIXLOCALPATH",
    "UNIXREMOTEPID", "UNIXREMOTEEUID", "UNIXREMOTEEGID",
)

_LISTENER = "listener"
_SOCK, _PID, _IN, _OUT = "sock", "pid", "in", "out"


class ExecError(SockworksError):
    """The program could not be started (one line; status 1 in the CLI)."""


# --------------------------------------------------------------------------
# the command and its environment (pure, or nearly)


def parse_command(text: str, *, shell: bool = False) -> tuple[str, ...]:
    """``--exec 'PROGRAM ARGS'`` split as a shell would (no shell runs);
    ``--sh-exec 'COMMAND'`` (``shell``) as ``/bin/sh -c COMMAND``."""
    flag = "--sh-exec" if shell else "--exec"
    if not text.strip():
        raise UsageError(f"{flag} needs a command")
    if shell:
        return ("/bin/sh", "-c", text)
    try:
        argv = shlex.split(text)
    except ValueError as exc:  # "No closing quotation"
        raise UsageError(f"{flag} {text!r}: {str(exc).lower()}") from None
    return tuple(argv)


def check_command(argv: Sequence[str]) -> None:
    """:class:`UsageError` unless ``argv[0]`` is a program we can run, so
    that a typo is one line before anything binds or connects."""
    if not argv or not argv[0]:
        raise UsageError("empty command")
    program = argv[0]
    if shutil.which(program) is not None:
        return
    if "/" not in program:
        raise UsageError(f"no such program: {program} (not found in PATH)")
    if os.path.isdir(program):
        raise UsageError(f"cannot run {program}: it is a directory")
    if os.path.exists(program):
        raise UsageError(f"cannot run {program}: not executable")
    raise UsageError(f"no such program: {program}")


def _unmapped(ip: str) -> str:
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; tcpserver
    # would show a.b.c.d, and PROTO=TCP.
    return ip[7:] if ip.lower().startswith("::ffff:") and "." in ip else ip


def connection_environ(sock: socket.socket) -> dict[str, str]:
    """tcp-environ(5) for a connected socket: ``PROTO`` (``TCP``, ``TCP6``
    or ``UNIX``), ``TCPLOCALIP``/``PORT``, ``TCPREMOTEIP``/``PORT``, and
    ``REMOTE_ADDR``/``REMOTE_PORT`` as systemd sets them. Unix sockets get
    ucspi-unix's ``UNIXLOCALPATH`` and the peer's credentials."""
    if sock.family == socket.AF_UNIX:
        env = {"PROTO": "UNIX"}
        local = sock.getsockname()
        path = local.decode(errors="replace") if isinstance(local, bytes) else str(local or "")
        if path and not path.startswith("\0"):
            env["UNIXLOCALPATH"] = path
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            env.update(UNIXREMOTEPID=str(pid), UNIXREMOTEEUID=str(uid),
                       UNIXREMOTEEGID=str(gid))
        except (OSError, AttributeError):
            pass  # not Linux: no credentials to report
        return env
    local, remote = sock.getsockname(), sock.getpeername()
    local_ip, remote_ip = _unmapped(str(local[0])), _unmapped(str(remote[0]))
    return {
        "PROTO": "TCP6" if ":" in remote_ip else "TCP",
        "TCPLOCALIP": local_ip,
        "TCPLOCALPORT": str(local[1]),
        "TCPREMOTEIP": remote_ip,
        "TCPREMOTEPORT": str(remote[1]),
        "REMOTE_ADDR": remote_ip,
        "REMOTE_PORT": str(remote[1]),
    }


def program_environ(sock: socket.socket, base: Mapping[str, str]) -> dict[str, str]:
    """The program's environment: ``base`` (the user's, as ncat passes it)
    without stale connection variables, plus this connection's."""
    env = {k: v for k, v in base.items() if k not in CONNECTION_VARIABLES}
    env.update(connection_environ(sock))
    return env


def exit_status(returncode: int) -> int:
    """As a shell reports it: killed by signal N is 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def _check(ep: Endpoint, options: NetcatOptions, argv: Sequence[str], *,
           listening: bool) -> None:
    options.check(ep, listening=listening)
    if not ep.is_stream:
        raise UsageError(f"--exec/--sh-exec need a stream (tcp or unix): {ep.transport} has "
                         "no connection to give a program")
    for flag, on in (("--send-only", options.send_only), ("--recv-only", options.recv_only),
                     ("--crlf", options.crlf), ("--interactive", options.interactive),
                     ("--no-shutdown", not options.shutdown),
                     ("--idle-timeout", options.idle_timeout is not None)):
        if on:
            raise UsageError(f"{flag} does not apply with --exec/--sh-exec "
                             "(the program has the connection)")
    check_command(argv)


# --------------------------------------------------------------------------
# the public entry points


def exec_connect(
    endpoint: Endpoint | str,
    command: Sequence[str],
    options: NetcatOptions | None = None,
    *,
    hooks: Hooks | None = None,
) -> int:
    """Connect to ``endpoint`` and run ``command`` (an argv, see
    :func:`parse_command`) with the connection as its stdin and stdout.

    Returns the program's exit status (128 + N if killed by signal N).
    Raises :class:`UsageError` for a program that cannot be found (before
    connecting), :class:`NetworkError` if connecting fails, and
    :class:`ExecError` if the program cannot be started after all.
    """
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    options = options or NetcatOptions()
    argv = tuple(command)
    _check(ep, options, argv, listening=False)
    if options.tls is not None:
        client_context(options.tls)  # a bad --cafile is a usage error, before connecting
    sock = _client_socket(ep, options)
    if options.send_proxy is not None:
        send_proxy_header(sock, ep, options, hooks)
    sock.setblocking(False)
    tls = _tls_client(sock, ep, options) if options.tls is not None else None
    loop = _ExecLoop(argv, options, hooks or Hooks(), listener=None)
    loop.accepted = 1
    try:
        loop.start(sock, str(ep), "", tls=tls)
        loop.run()
    finally:
        loop.stop()
    return loop.status


def exec_listen(
    endpoint: Endpoint | str,
    command: Sequence[str],
    options: NetcatOptions | None = None,
    *,
    hooks: Hooks | None = None,
) -> int:
    """Bind ``endpoint`` (reported through ``hooks.listening``), accept one
    connection and run ``command`` on it; returns the program's exit
    status. With ``options.keep_open``: a program per connection, at most
    ``options.max_conns`` at once, until interrupted (then 0)."""
    ep = parse_endpoint(endpoint) if isinstance(endpoint, str) else endpoint
    options = options or NetcatOptions()
    argv = tuple(command)
    _check(ep, options, argv, listening=True)
    hooks = hooks or Hooks()
    context = server_context(options.tls) if options.tls is not None else None
    ep = _listen_host(ep, options.family)
    bound = bind(ep, options.socket_options)
    bound.sock.setblocking(False)
    loop = _ExecLoop(argv, options, hooks, listener=bound.sock, context=context)
    try:
        if hooks.listening:
            hooks.listening(bound.endpoint)
        loop.run()
    finally:
        loop.stop()
        bound.sock.close()
        if not ep.is_inet:
            try:
                os.unlink(ep.path)
            except OSError:
                pass
    return 0 if options.keep_open else loop.status


# --------------------------------------------------------------------------
# the loop


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM handlers (the CLI's KeyboardInterrupt) wait until the
    block is over: raised inside Popen, after the fork but before it returns,
    they would orphan a running program that stop() cannot know about."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are handled in the main thread only
        return
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append((signum, frame))

    # Only Python handlers: the program gets the default for those anyway
    # (exec resets caught signals), while SIG_IGN must stay inherited.
    previous = {int(sig): handler for sig in (signal.SIGINT, signal.SIGTERM)
                if callable(handler := signal.getsignal(sig))}
    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in held:
            previous[signum](signum, frame)


class _Session:
    """One connection and its program."""

    __slots__ = ("broken", "client_eof", "from_child", "handshaking", "host", "out_eof",
                 "peer", "pidfd", "proc", "sock", "status", "tls", "to_child", "to_child_fd",
                 "until", "want")

    def __init__(self, sock: socket.socket, peer: str, host: str) -> None:
        self.sock = sock  # the raw socket; over TLS, self.tls wraps it
        self.peer = peer
        self.host = host  # the peer's address without the port: whose handshakes yield
        self.tls: TLSStream | None = None
        self.handshaking = False
        self.want = selectors.EVENT_READ
        # A handshake's deadline, or the end of the lingering close.
        self.until: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.status: int | None = None  # the program's, once reaped
        # The TLS relay: our ends of the program's stdin and stdout pipes.
        self.to_child_fd: int | None = None
        self.from_child: int | None = None
        self.to_child = bytearray()  # from the peer, not yet taken by the program
        self.client_eof = False
        self.out_eof = False
        self.broken = False  # the peer is gone (reset, TLS error): nothing to relay


class _ExecLoop:
    def __init__(self, argv: tuple[str, ...], options: NetcatOptions, hooks: Hooks, *,
                 listener: socket.socket | None,
                 context: ssl.SSLContext | None = None) -> None:
        self.argv = argv
        self.options = options
        self.hooks = hooks
        self.listener = listener
        self.context = context
        self.filter = AddressFilter.parse(options.allow, options.deny)
        self.sel = selectors.PollSelector()
        self.masks: dict[int, int] = {}
        self.sessions: list[_Session] = []  # handshaking or running
        self.closing: list[_Session] = []  # program done: lingering close
        self.accepted = 0
        self.status = 0  # the last program's
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.started = time.monotonic()

    # -- bookkeeping ---------------------------------------------------------

    def _event(self, text: str) -> None:
        if self.hooks.event:
            self.hooks.event(text)

    def _warn(self, text: str) -> None:
        report = self.hooks.warning or self.hooks.event
        if report:
            report(text)

    def _want(self, fd: int, mask: int, data: object) -> None:
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not old:
            self.sel.register(fd, mask, data)
        elif not mask:
            self.sel.unregister(fd)
        else:
            self.sel.modify(fd, mask, data)
        if mask:
            self.masks[fd] = mask
        else:
            del self.masks[fd]

    def _forget(self, fd: int | None) -> None:
        """Unregister ``fd``: always before it is closed (numbers are reused)."""
        if fd is not None and fd >= 0 and self.masks.pop(fd, 0):
            self.sel.unregister(fd)

    def _close_fd(self, fd: int | None) -> None:
        if fd is not None:
            self._forget(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        while not self._finished():
            self._update_interest()
            for key, mask in self.sel.select(self._timeout()):
                if key.data == _LISTENER:
                    self._accept()
                    continue
                session, kind = key.data
                if session.sock.fileno() < 0 and kind == _SOCK:
                    continue  # closed by an earlier event of this round
                self._dispatch(session, kind, mask)
            self._timers()

    def _finished(self) -> bool:
        return (not self.options.keep_open and self.accepted > 0 and not self.sessions
                and not self.closing)

    def _dispatch(self, s: _Session, kind: str, mask: int) -> None:
        if kind == _PID:
            if s.status is None:
                self._reap(s)
        elif s in self.closing:
            self._closing_io(s, mask)
        elif s not in self.sessions:
            return
        elif s.handshaking:
            self._handshake(s)
        elif kind == _SOCK:
            if mask & selectors.EVENT_WRITE:
                self._flush_client(s)
            if mask & selectors.EVENT_READ and not s.broken:
                self._read_client(s)
        elif kind == _IN:
            self._write_child(s)
        elif kind == _OUT:
            self._read_child(s)
        if s in self.sessions:
            self._progress(s)

    def _update_interest(self) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        if self.listener is not None:
            if self.options.keep_open:
                accepting = len(self.sessions) < self.options.max_conns or any(
                    s.handshaking for s in self.sessions)
            else:
                accepting = self.accepted == 0
            self._want(self.listener.fileno(), read if accepting else 0, _LISTENER)
        for s in self.sessions:
            if s.pidfd is not None:
                self._want(s.pidfd, read, (s, _PID))
            if s.handshaking:
                self._want(s.sock.fileno(), s.want, (s, _SOCK))
                continue
            if s.tls is None or s.broken:
                continue  # the program has the socket
            mask = read if not s.client_eof and not s.to_child else 0
            if s.tls.has_output:
                mask |= write
            self._want(s.sock.fileno(), mask, (s, _SOCK))
            if s.to_child_fd is not None:
                self._want(s.to_child_fd, write if s.to_child else 0, (s, _IN))
            if s.from_child is not None:
                self._want(s.from_child, 0 if s.tls.has_output else read, (s, _OUT))
        for s in self.closing:
            mask = read
            if s.tls is not None and s.tls.has_output:
                mask |= write
            self._want(s.sock.fileno(), mask, (s, _SOCK))

    def _timeout(self) -> float | None:
        deadlines = [s.until for s in [*self.sessions, *self.closing] if s.until is not None]
        if self.listener is not None and not self.accepted and self.options.connect_timeout:
            deadlines.append(self.started + self.options.connect_timeout)
        if any(s.pidfd is None and s.proc is not None and s.status is None
               for s in self.sessions):
            deadlines.append(time.monotonic() + 0.05)  # no pidfd: poll for the exit
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _timers(self) -> None:
        now = time.monotonic()
        if (self.listener is not None and not self.accepted and self.options.connect_timeout
                and now >= self.started + self.options.connect_timeout):
            raise NetworkError(f"no peer within {self.options.connect_timeout:g} s (--timeout)")
        for s in list(self.sessions):
            if (s.pidfd is None and s.proc is not None and s.status is None
                    and s.proc.poll() is not None):
                self._reap(s)
                self._progress(s)
            if s.handshaking and s.until is not None and now >= s.until:
                self._handshake_timed_out(s)
        for s in list(self.closing):
            if s.until is not None and now >= s.until:
                self._final_close(s)

    # -- accepting and starting ---------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        got = accept_one(self.listener, self.filter, self.options.socket_options, self._event)
        if got is None:
            return
        sock, peer = got
        self.accepted += 1
        self._event(f"connection from {peer}")
        self.start(sock, str(peer), peer.host)

    def start(self, sock: socket.socket, peer: str, host: str, *,
              tls: TLSStream | None = None) -> None:
        """A connection: shake hands if we serve TLS, then run the program."""
        s = _Session(sock, peer, host)
        if self.context is not None:
            if self.options.keep_open and len(self.sessions) >= self.options.max_conns:
                self._make_room(host)
            s.tls = TLSStream(sock, self.context, server_side=True)
            s.handshaking = True
            if self.options.handshake_timeout:
                s.until = time.monotonic() + self.options.handshake_timeout
            self.sessions.append(s)
            self._handshake(s)
            return
        s.tls = tls
        self.sessions.append(s)
        self._spawn(s)

    def _handshake(self, s: _Session) -> None:
        assert s.tls is not None
        try:
            s.tls.do_handshake()
        except ssl.SSLWantReadError:
            s.want = selectors.EVENT_READ
            return
        except ssl.SSLWantWriteError:
            s.want = selectors.EVENT_WRITE
            return
        except OSError as exc:
            self._handshake_failed(s, exc)
            return
        s.handshaking = False
        s.until = None
        self._spawn(s)

    def _handshake_failed(self, s: _Session, exc: OSError) -> None:
        assert s.tls is not None
        message = describe_error(exc, s.peer)
        self.sessions.remove(s)
        if not self.options.keep_open:
            if isinstance(exc, ssl.SSLError):
                s.tls.abort()  # nothing else to serve: blocking briefly costs no one
            self._forget(s.sock.fileno())
            s.tls.close()
            raise NetworkError(message)
        if not s.tls.received and isinstance(
                exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
            # Came and went without a byte (a port probe): no TLS was attempted.
            self._event(f"{s.peer} closed the connection")
            self._final_close(s)
            return
        self._warn(message)
        if isinstance(exc, ssl.SSLError):
            try:
                s.tls.start_abort()  # the alert that says why, then a FIN
            except OSError:
                self._final_close(s)
                return
            self._linger(s)
        else:
            self._final_close(s)

    def _handshake_timed_out(self, s: _Session) -> None:
        message = (f"TLS handshake with {s.peer} failed: timed out after "
                   f"{self.options.handshake_timeout:g} s (--handshake-timeout)")
        self.sessions.remove(s)
        self._final_close(s)
        if not self.options.keep_open:
            raise NetworkError(message)
        self._warn(message)

    def _make_room(self, host: str) -> None:
        """At --max-conns a newcomer from ``host`` displaces the oldest
        unfinished handshake of the address with the most of them (as
        ``listen --tls -k`` without --exec does)."""
        victim = handshake_to_drop(self.sessions, host)
        if victim is not None:
            self._warn(dropped_message(victim.peer, self.options.max_conns))
            self.sessions.remove(victim)
            self._final_close(victim)

    def _spawn(self, s: _Session) -> None:
        """Run the program: the socket as its stdin and stdout, or (TLS)
        pipes that the loop relays. Only fds 0, 1 and 2 reach it."""
        try:
            env = program_environ(s.sock, os.environ)
        except OSError:
            env = dict(os.environ)  # the peer is already gone: the program will see EOF
        try:
            with _signals_held():
                if s.tls is None:
                    # The socket's file status flags are shared with the
                    # program, which expects a blocking descriptor.
                    s.sock.setblocking(True)
                    fd = s.sock.fileno()
                    s.proc = subprocess.Popen(self.argv, stdin=fd, stdout=fd, env=env,
                                              close_fds=True)
                else:
                    s.proc = self._spawn_piped(s, env)
        except OSError as exc:
            message = f"cannot run {self.argv[0]}: {exc.strerror or exc}"
            self.sessions.remove(s)
            self._final_close(s)
            if not self.options.keep_open:
                raise ExecError(message) from None
            self._warn(f"{s.peer}: {message}")
            return
        try:
            s.pidfd = os.pidfd_open(s.proc.pid)
        except (OSError, AttributeError):
            s.pidfd = None  # an old kernel: _timers polls for the exit instead
        self._event(f"{s.peer}: running {self.argv[0]} (pid {s.proc.pid})")
        if s.tls is not None and s.tls.pending():
            self._read_client(s)  # data that came with the handshake's last flight

    def _spawn_piped(self, s: _Session, env: dict[str, str]) -> subprocess.Popen[bytes]:
        child_in, s_in = os.pipe()
        s_out, child_out = os.pipe()
        try:
            proc = subprocess.Popen(self.argv, stdin=child_in, stdout=child_out, env=env,
                                    close_fds=True)
        except OSError:
            os.close(s_in)
            os.close(s_out)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        for fd in (s_in, s_out):
            os.set_blocking(fd, False)
            _grow_pipe(fd)
        s.to_child_fd, s.from_child = s_in, s_out
        return proc

    # -- the TLS relay -----------------------------------------------------------

    def _read_client(self, s: _Session) -> None:
        """TLS → the program's stdin, until it takes no more (then we stop
        reading: the peer's sending blocks, memory stays bounded)."""
        assert s.tls is not None
        while not s.to_child and not s.client_eof:
            try:
                n = s.tls.recv_into(self.view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as exc:
                self._client_failed(s, exc)
                return
            if n == 0:
                s.client_eof = True
                if not s.to_child:
                    self._close_child_stdin(s)
                return
            if s.to_child_fd is None:
                continue  # the program has closed its stdin (or exited): dropped
            s.to_child += self.view[:n]
            self._write_child(s)

    def _write_child(self, s: _Session) -> None:
        while s.to_child and s.to_child_fd is not None:
            try:
                n = os.write(s.to_child_fd, s.to_child)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the program reads no more; drop what it did not take
                s.to_child.clear()
                self._close_child_stdin(s)
                return
            del s.to_child[:n]
        if s.client_eof:
            self._close_child_stdin(s)  # the peer's EOF is the program's

    def _close_child_stdin(self, s: _Session) -> None:
        self._close_fd(s.to_child_fd)
        s.to_child_fd = None
        s.to_child.clear()

    def _read_child(self, s: _Session) -> None:
        """The program's stdout → TLS, a chunk at a time while TLS keeps up."""
        assert s.tls is not None and s.from_child is not None
        if s.tls.has_output:
            return  # TLS is behind (a post-handshake message came out meanwhile): later
        try:
            n = os.readv(s.from_child, [self.view])
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            s.out_eof = True
            self._close_fd(s.from_child)
            s.from_child = None
            try:
                s.tls.half_close()  # close_notify after the output, then the FIN
            except OSError as exc:
                self._client_failed(s, exc)
            return
        try:
            s.tls.send(self.view[:n])
        except OSError as exc:
            self._client_failed(s, exc)

    def _flush_client(self, s: _Session) -> None:
        assert s.tls is not None
        try:
            s.tls.flush()
        except OSError as exc:
            self._client_failed(s, exc)

    def _client_failed(self, s: _Session, exc: OSError) -> None:
        """The peer is gone: the program sees EOF on stdin and EPIPE on
        stdout; we wait for it to exit."""
        self._event(describe_error(exc, s.peer))
        s.broken = True
        self._close_child_stdin(s)
        self._close_fd(s.from_child)
        s.from_child = None
        self._forget(s.sock.fileno())
        assert s.tls is not None
        s.tls.close(wait=False)

    # -- the end of a session ---------------------------------------------------

    def _reap(self, s: _Session) -> None:
        assert s.proc is not None
        code = s.proc.wait()
        self._close_fd(s.pidfd)
        s.pidfd = None
        s.status = exit_status(code)
        self.status = s.status
        self._event(f"{s.peer}: {self.argv[0]} {_describe_exit(code)}")
        if s.tls is not None:
            self._close_child_stdin(s)  # nobody will read it: the peer's data is dropped

    def _progress(self, s: _Session) -> None:
        """Plain: the program has exited. TLS: it has exited, its output
        has reached EOF and left with our close_notify. Then the lingering
        close."""
        if s.status is None:
            return
        if s.tls is None:
            self.sessions.remove(s)
            s.sock.setblocking(False)
            try:
                s.sock.shutdown(socket.SHUT_WR)  # after the program's output, a FIN
            except OSError:
                pass
            self._linger(s)
        elif s.broken:
            self.sessions.remove(s)
        elif s.out_eof and s.tls.finished_sending:
            self.sessions.remove(s)
            self._linger(s)

    def _linger(self, s: _Session) -> None:
        s.until = time.monotonic() + CLOSE_LINGER
        self.closing.append(s)
        # Bounded: at most --max-conns sockets wait; the oldest has had most of its moment.
        if len(self.closing) > self.options.max_conns:
            self._final_close(self.closing[0])

    def _closing_io(self, s: _Session, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and s.tls is not None:
            try:
                s.tls.flush()
            except OSError:
                self._final_close(s)
                return
        if mask & selectors.EVENT_READ:
            try:
                for _ in range(16):  # bounded: a peer that floods waits for the deadline
                    if not s.sock.recv(65536):
                        break
                else:
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            self._final_close(s)  # the peer's EOF: nothing left to protect

    def _final_close(self, s: _Session) -> None:
        if s in self.closing:
            self.closing.remove(s)
        if s.sock.fileno() >= 0:
            self._forget(s.sock.fileno())
        if s.tls is not None:
            s.tls.close(wait=False)
        else:
            s.sock.close()

    def stop(self) -> None:
        """Interrupted (or done): SIGTERM to every program still running,
        SIGKILL after STOP_GRACE, every one reaped; every descriptor closed."""
        running = [s.proc for s in self.sessions if s.proc is not None and s.status is None]
        for proc in running:
            try:
                proc.terminate()
            except OSError:
                pass
        deadline = time.monotonic() + STOP_GRACE
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s in [*self.sessions, *self.closing]:
            self._close_child_stdin(s)
            self._close_fd(s.from_child)
            self._close_fd(s.pidfd)
            self._final_close(s)
        self.sessions.clear()
        if self.listener is not None:
            self._forget(self.listener.fileno())
        self.sel.close()
