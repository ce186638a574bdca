"""Runs a program per connection, as inetd, xinetd and tcpserver do.

The accepted socket itself becomes the program's standard input and output
(what tcpserver does): sockworks never touches the bytes, so the program
reads and writes at kernel speed, half-close is the kernel's (the client's
FIN is the program's EOF on stdin; the program's exit, or its closing of
stdout, is the client's EOF), and a client that floods a program that
never reads is held back by TCP flow control, not by server memory. The
server's copy of the socket is closed right after the spawn, so the
connection ends when the program (and whatever it handed the socket to)
is done with it.

What the server keeps per connection: the child's pid, a pidfd watched by
the event loop (no thread per child, no zombie), and the read end of a pipe
that is the child's standard error, logged a line at a time. The idle rule
cannot see bytes it never touches, so ``Limits.idle_timeout`` (``--timeout``)
bounds the whole session: SIGTERM, then SIGKILL :data:`KILL_AFTER` seconds
later. Byte counts are unknown (the program had the socket).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._core import ConnectionStats, Driver
from .._endpoint import Endpoint
from .._errors import ConfigError
from .._protocol import Peer

if TYPE_CHECKING:
    import asyncio

    from .._core import ConnectionGroup

log = logging.getLogger("sockworks.driver")

# The child's PATH unless the service sets or passes one: the directories
# every Unix has programs in, and nothing of the server's own PATH (which
# may hold a virtualenv's or a user's directories the program must not
# depend on by accident). The program itself is looked up at start with
# the server's PATH and run by its full path.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# After a session timeout's SIGTERM, the program gets this long before
# SIGKILL: the server's default --grace.
KILL_AFTER = 5.0
# Longest line of the program's standard error written to the log; the
# rest of a longer line is dropped (a program cannot make one log line of
# megabytes, nor make the server buffer them).
STDERR_LINE = 1024
# Spawn failures (out of processes, memory or descriptors) logged per
# second at most; the rest are counted into the next line.
FAILURE_LOG_INTERVAL = 1.0
# What a connection's closing line says of its byte counts.
BYTES_UNKNOWN = "bytes unknown: the program had the socket"

_UNPRINTABLE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
# Signals Python ignores or changes that a program expects at their
# defaults: SIGPIPE (a writer to a closed socket must die of it, as under
# a shell), SIGXFSZ.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True)
class ExecCommand:
    """What an exec service runs: checked at start (:func:`make_command`)."""

    argv: tuple[str, ...]  # as given: argv[0] is what the program sees
    program: str  # argv[0] resolved to a full path at start
    env: tuple[tuple[str, str], ...] = field(default=(("PATH", DEFAULT_PATH),))
    workdir: str | None = None


def resolve_program(name: str, search_path: str | None = None) -> str:
    """``name``'s full path (looked up in ``search_path``, the server's PATH,
    when it has no slash); a missing or non-executable program is a
    :class:`ConfigError`, raised before anything binds."""
    if not name:
        raise ConfigError("empty program name")
    if "/" in name:
        path = os.path.abspath(name)
    else:
        found = shutil.which(name, path=search_path)
        if found is None:
            raise ConfigError(f"program {name!r} not found in PATH")
        path = os.path.abspath(found)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"program {name!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"program {name!r} is a directory")
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise ConfigError(f"program {name!r} is not executable")
    return path


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_env_name(name: object) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigError(f"{name!r} is not an environment variable name")
    return name


def make_command(
    argv: Iterable[str],
    *,
    env: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    pass_env: Iterable[str] = (),
    workdir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ExecCommand:
    """An :class:`ExecCommand`, checked: the program exists and is
    executable, the working directory exists. The child's environment is
    PATH (:data:`DEFAULT_PATH`), then the ``pass_env`` variables the server
    has (their values now), then ``env``; the connection's own variables
    (tcp-environ(5)) are added per connection and override all of these."""
    environ = os.environ if environ is None else environ
    args = tuple(argv)
    if not args:
        raise ConfigError("empty command: give a program to run")
    for arg in args:
        if not isinstance(arg, str):
            raise ConfigError(f"command arguments must be strings, got {arg!r}")
        if "\0" in arg:
            raise ConfigError(f"command argument {arg!r} contains a NUL byte")
    program = resolve_program(args[0], environ.get("PATH", os.defpath))
    child: dict[str, str] = {"PATH": DEFAULT_PATH}
    for name in pass_env:
        check_env_name(name)
        if name in environ:
            child[name] = environ[name]
    pairs = env.items() if isinstance(env, Mapping) else env
    for name, value in pairs:
        check_env_name(name)
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(f"environment variable {name}: {value!r} is not a string")
        child[name] = value
    if workdir is not None:
        workdir = os.path.abspath(os.path.expanduser(workdir))
        if not os.path.isdir(workdir):
            raise ConfigError(f"working directory {workdir!r} is not a directory")
    return ExecCommand(args, program, tuple(child.items()), workdir)


def connection_environment(sock: socket.socket, peer: Peer) -> dict[str, str]:
    """tcp-environ(5): what tcpserver sets (PROTO, TCPLOCALIP, TCPLOCALPORT,
    TCPREMOTEIP, TCPREMOTEPORT; no TCPLOCALHOST/TCPREMOTEHOST/TCPREMOTEINFO:
    sockworks does no DNS or ident lookups), plus systemd's REMOTE_ADDR and
    REMOTE_PORT. Unix sockets: PROTO=UNIX and ucspi-unix's UNIXLOCALPATH,
    UNIXREMOTEPID, UNIXREMOTEEUID, UNIXREMOTEEGID."""
    out: dict[str, str] = {}
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        local = sock.getsockname()
        out["PROTO"] = "TCP6" if sock.family == socket.AF_INET6 else "TCP"
        out["TCPLOCALIP"] = str(local[0])
        out["TCPLOCALPORT"] = str(local[1])
        out["TCPREMOTEIP"] = out["REMOTE_ADDR"] = peer.host
        out["TCPREMOTEPORT"] = out["REMOTE_PORT"] = str(peer.port)
    else:
        out["PROTO"] = "UNIX"
        local_path = sock.getsockname()
        if isinstance(local_path, bytes):
            local_path = local_path.decode(errors="replace")
        if local_path:
            out["UNIXLOCALPATH"] = str(local_path)
        cred = getattr(socket, "SO_PEERCRED", None)
        if cred is not None:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, cred, 12)
                pid, uid, gid = (int.from_bytes(raw[i : i + 4], "little") for i in (0, 4, 8))
            except OSError:
                pass
            else:
                out["UNIXREMOTEPID"] = str(pid)
                out["UNIXREMOTEEUID"] = str(uid)
                out["UNIXREMOTEEGID"] = str(gid)
    return out


def exit_of(status: int) -> tuple[int | None, str | None]:
    """A wait status as (exit code, None) or (None, the signal's name)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return None, signal.Signals(sig).name
        except ValueError:
            return None, f"signal {sig}"
    return os.waitstatus_to_exitcode(status), None


def describe_status(status: int) -> str:
    """``exit 0``, ``exit 3``, ``killed by SIGTERM``."""
    code, killer = exit_of(status)
    return f"killed by {killer}" if killer else f"exit {code}"


def _above_stdio(fd: int) -> tuple[int, bool]:
    """``fd``, or a close-on-exec copy of it numbered 3 or more when it is
    0-2 (a server started with closed stdio): the child's dup2 onto 0, 1
    and 2 must not overwrite a source before using it. True: a copy."""
    if fd > 2:
        return fd, False
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), True


def close_inherited_descriptors() -> None:
    """Mark every descriptor above 2 close-on-exec. Python opens its own
    that way, and so does the event loop; this catches those the server
    inherited from whoever started it, so that no descriptor of the server
    leaks into a program."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                pass  # the one listdir used, now closed


class ExecConnection:
    """One running program: the core's :class:`~sockworks._core.Connection`."""

    __slots__ = (
        "_cause", "_err_buf", "_err_fd", "_err_skip", "_group", "_kill_timer", "_pidfd",
        "_popen", "_session_timer", "_signalled", "idle_seen", "idle_since", "pid",
        "stats", "status",
    )

    def __init__(self, peer: Peer, group: ConnectionGroup) -> None:
        self.stats = ConnectionStats(peer)
        self.idle_seen: object = None
        self.idle_since = 0.0
        self.pid = 0
        self.status: int | None = None
        self._group = group
        self._pidfd = -1
        self._err_fd = -1
        self._err_buf = bytearray()
        self._err_skip = False
        self._popen: subprocess.Popen[bytes] | None = None
        self._cause: str | None = None
        self._signalled = 0
        self._session_timer: asyncio.TimerHandle | None = None
        self._kill_timer: asyncio.TimerHandle | None = None

    # -- the core's Connection interface -----------------------------------

    def activity(self) -> None:
        # The program owns the bytes: never idle by the core's rule; the
        # session timeout (``--timeout``) bounds the connection instead.
        return None

    def idle_expired(self) -> None:  # pragma: no cover - activity() is None
        self._session_over()

    def begin_shutdown(self) -> None:
        self._stop("server stopping", signal.SIGTERM)

    def abort(self) -> None:
        self._stop("aborted", signal.SIGKILL)
        self.on_exit()
        if self.status is None:
            # Not dead yet: the server is about to exit, so say it now; the
            # pidfd reaps it if the loop runs on (else init does).
            self.stats.set_reason(f"{self._cause}, then SIGKILL; {BYTES_UNKNOWN}")
            self._group.closed(self)

    # -- the program's life --------------------------------------------------

    def _session_over(self) -> None:
        timeout = self._group.limits.idle_timeout
        self._session_timer = None
        self._stop(f"session timeout ({timeout:g} s)", signal.SIGTERM)
        if self.status is None:
            self._kill_timer = self._group.loop.call_later(KILL_AFTER, self._kill)

    def _kill(self) -> None:
        self._kill_timer = None
        self._stop("did not stop on SIGTERM", signal.SIGKILL)

    def _stop(self, cause: str, sig: int) -> None:
        if self._cause is None:
            self._cause = cause
        # SIGTERM once, SIGKILL once, never SIGTERM after SIGKILL.
        strength = 2 if sig == signal.SIGKILL else 1
        if self.status is not None or self.pid == 0 or self._signalled >= strength:
            return
        self._signalled = strength
        # Its process group (it leads one): a pipeline under `sh -c` stops
        # with it. If it left the group, the process itself.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def on_exit(self) -> None:
        """The pidfd is readable (or SIGCHLD came): reap, log, release."""
        if self.status is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: nothing more to learn
            pid, status = self.pid, 0
        if pid == 0:
            return  # not yet (a spurious wake-up)
        self.status = status
        if self._popen is not None:
            self._popen.returncode = os.waitstatus_to_exitcode(status)
        group = self._group
        if self._pidfd >= 0:
            group.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        # What it wrote to stderr before it exited is in the pipe: log it
        # before the closing line. A child of its own that still holds the
        # pipe loses the rest (its writes then fail with EPIPE).
        self._read_stderr(final=True)
        for timer in (self._session_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        self._session_timer = self._kill_timer = None
        done = describe_status(status)
        cause = f"{self._cause}, {done}" if self._cause else done
        self.stats.set_reason(f"{cause}; {BYTES_UNKNOWN}")
        group.closed(self)

    def on_stderr(self) -> None:
        self._read_stderr(final=False)

    def _read_stderr(self, *, final: bool) -> None:
        fd = self._err_fd
        if fd < 0:
            return
        eof = False
        # Bounded per wake-up, so that a chatty program cannot starve the loop.
        for _ in range(16):
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            self._take_lines(data)
        if eof or final:
            if self._err_buf:
                self._log_line(bytes(self._err_buf))
                self._err_buf.clear()
            self._group.loop.remove_reader(fd)
            os.close(fd)
            self._err_fd = -1

    def _take_lines(self, data: bytes) -> None:
        start = 0
        buf = self._err_buf
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._err_skip:
                self._err_skip = False
            else:
                buf += data[start:end]
                self._log_line(bytes(buf))
            buf.clear()
            start = end + 1
        if not self._err_skip:
            buf += data[start:]
            if len(buf) > STDERR_LINE:
                # Logged now, cut short; the rest of the line is dropped.
                self._log_line(bytes(buf[:STDERR_LINE]) + b"...")
                buf.clear()
                self._err_skip = True

    def _log_line(self, line: bytes) -> None:
        line = _UNPRINTABLE.sub(lambda m: b"\\x%02x" % m.group()[0], line.rstrip(b"\r"))
        self._group.log.info("%s: stderr: %s", self.stats.peer, line.decode(errors="replace"))


class ExecDriver(Driver):
    """Serves each accepted stream connection with a run of ``command``."""

    # The program gets the socket itself: over TLS it would read ciphertext.
    tls_sockets = False

    name = "exec"

    def __init__(self, command: ExecCommand) -> None:
        self.command = command
        self._base_env = dict(command.env)
        self._sigchld: dict[int, ExecConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failures = 0
        self._failure_logged = -FAILURE_LOG_INTERVAL

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint.is_stream

    def connection_factory(self, group: ConnectionGroup) -> None:
        # None: the server's socket listener accepts and calls start_socket
        # with each socket. Called once as the server starts.
        close_inherited_descriptors()
        return None

    def start_socket(
        self,
        sock: socket.socket,
        peer: Peer,
        group: ConnectionGroup,
        *,
        original: socket.socket | None = None,
    ) -> None:
        conn = ExecConnection(peer, group)
        group.opened(conn)
        try:
            env = self._base_env.copy()
            # Relayed (TLS): the environment describes the client's own
            # connection, not the socketpair the program reads.
            env.update(connection_environment(original or sock, peer))
            # The program gets a blocking socket, as from tcpserver (the
            # flag belongs to the socket, shared by every copy of it).
            sock.setblocking(True)
            self._spawn(conn, sock, env)
        except OSError as exc:
            self._spawn_failed(conn, group, exc)
            return
        finally:
            # The program has its own copy: the connection is its alone.
            sock.close()
        if group.limits.idle_timeout is not None:
            conn._session_timer = group.loop.call_later(
                group.limits.idle_timeout, conn._session_over
            )
        self._watch(conn, group.loop)
        if group.shutting_down:
            conn.begin_shutdown()

    def _spawn(self, conn: ExecConnection, sock: socket.socket, env: dict[str, str]) -> None:
        command = self.command
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        copies: list[int] = []
        try:
            sock_fd, copied = _above_stdio(sock.fileno())
            if copied:
                copies.append(sock_fd)
            err_fd, copied = _above_stdio(err_w)
            if copied:
                copies.append(err_fd)
            if command.workdir is None:
                # posix_spawn (vfork and exec in glibc): measured a little
                # faster than subprocess.Popen per connection.
                conn.pid = os.posix_spawn(
                    command.program,
                    command.argv,
                    env,
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, sock_fd, 0),
                        (os.POSIX_SPAWN_DUP2, sock_fd, 1),
                        (os.POSIX_SPAWN_DUP2, err_fd, 2),
                    ],
                    setpgroup=0,
                    setsigdef=_RESET_SIGNALS,
                    setsigmask=(),
                )
            else:
                # posix_spawn cannot change directory (no addchdir in Python).
                conn._popen = subprocess.Popen(
                    command.argv,
                    executable=command.program,
                    stdin=sock_fd,
                    stdout=sock_fd,
                    stderr=err_fd,
                    env=env,
                    cwd=command.workdir,
                    close_fds=True,
                    process_group=0,
                    restore_signals=True,
                )
                conn.pid = conn._popen.pid
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(err_w)
            for fd in copies:
                os.close(fd)
        os.set_blocking(err_r, False)
        conn._err_fd = err_r

    def _watch(self, conn: ExecConnection, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(conn._err_fd, conn.on_stderr)
        try:
            conn._pidfd = os.pidfd_open(conn.pid)
        except (AttributeError, OSError):
            # No pidfd (not Linux 5.3+, or out of descriptors): SIGCHLD.
            self._sigchld[conn.pid] = conn
            if self._loop is None:
                self._loop = loop
                loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
            self._on_sigchld()  # it may have exited already
            return
        loop.add_reader(conn._pidfd, conn.on_exit)

    def _on_sigchld(self) -> None:
        for pid, conn in list(self._sigchld.items()):
            conn.on_exit()
            if conn.status is not None:
                del self._sigchld[pid]

    def _spawn_failed(self, conn: ExecConnection, group: ConnectionGroup, exc: OSError) -> None:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EAGAIN:
            why += " (the process limit?)"
        conn.stats.set_reason(f"cannot start {self.command.argv[0]}: {why}")
        self._failures += 1
        now = time.monotonic()
        if now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            more = f" (and {self._failures - 1} more)" if self._failures > 1 else ""
            group.log.warning(
                "%s: cannot start %s: %s%s", conn.stats.peer, self.command.program, why, more
            )
            self._failure_logged = now
            self._failures = 0
        group.closed(conn)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None
