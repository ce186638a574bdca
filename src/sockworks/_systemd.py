"""systemd's side of a service: sockets it passes (socket activation) and
the readiness messages it reads (sd_notify).

Both protocols are small and stable, and written here by hand rather than
through libsystemd (gunicorn does the same):

* **Socket activation** (sd_listen_fds(3)): ``LISTEN_FDS`` descriptors,
  from 3 up, were passed to the process whose id is ``LISTEN_PID``, named
  by ``LISTEN_FDNAMES`` (colon-separated). They are read once, marked
  close-on-exec, and the variables removed from the environment, so that
  no program started later believes the sockets are its own. What each
  socket is (family, type, address, listening or not) is read from the
  socket itself, never guessed from the unit.
* **Readiness** (sd_notify(3)): datagrams of ``NAME=VALUE`` lines sent to
  the Unix socket ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
  one). :class:`Notifier` sends them; without ``NOTIFY_SOCKET`` every
  method does nothing.

This module imports nothing of sockworks but its errors: endpoints
(``_endpoint``) are built from what it reports.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from ._errors import BindError, EndpointError

log = logging.getLogger("sockworks.systemd")

# sd_listen_fds(3): passed descriptors start here (SD_LISTEN_FDS_START).
FIRST_FD = 3
LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# The name systemd gives a passed socket whose unit names none.
UNNAMED = "unknown"

# Not in Python's socket module on every version: SO_DOMAIN, SO_PROTOCOL
# and SO_ACCEPTCONN are 39, 38 and 30 on Linux.
_SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)
_SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)


# -- what a passed descriptor is ------------------------------------------------


@dataclass(frozen=True, slots=True)
class PassedSocket:
    """A socket this process inherited, as read from the socket itself."""

    fd: int
    name: str  # its LISTEN_FDNAMES name; "" for a descriptor given as fd:N
    transport: str  # tcp, udp, unix or unixgram
    address: Any  # what getsockname() returns
    listening: bool  # a stream socket in listen(); datagram sockets: False

    @property
    def is_stream(self) -> bool:
        return self.transport in ("tcp", "unix")


def _transport(family: int, kind: int) -> str | None:
    stream = kind == socket.SOCK_STREAM
    if kind not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        return None
    if family in (socket.AF_INET, socket.AF_INET6):
        return "tcp" if stream else "udp"
    if family == socket.AF_UNIX:
        return "unix" if stream else "unixgram"
    return None


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def inspect(fd: int, *, name: str = "", subject: str | None = None) -> PassedSocket:
    """What descriptor ``fd`` is: a :class:`PassedSocket`, or a
    :class:`BindError` (one line, starting with ``subject``) when it is not
    open, not a socket, or a kind of socket sockworks cannot serve."""
    subject = subject or f"fd:{fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise BindError(f"{subject}: descriptor {fd} is not open in this process") from None
        raise BindError(f"{subject}: descriptor {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        what = "a terminal" if os.isatty(fd) else "not a socket"
        raise BindError(f"{subject}: descriptor {fd} is {what}")
    # A socket object over the descriptor, only to ask it questions; it is
    # detached afterwards, so the descriptor stays open and ours.
    probe = socket.socket(fileno=fd)
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        transport = _transport(family, kind)
        if transport is None:
            raise BindError(
                f"{subject}: descriptor {fd} is an {_family_name(family)} socket of type "
                f"{kind}; sockworks serves TCP, UDP, Unix stream and Unix datagram sockets"
            )
        address = probe.getsockname()
        listening = bool(probe.getsockopt(socket.SOL_SOCKET, _SO_ACCEPTCONN))
    except OSError as exc:
        raise BindError(f"{subject}: descriptor {fd}: {exc.strerror or exc}") from None
    finally:
        probe.detach()
    return PassedSocket(fd, name, transport, address, listening)


def check_listening(passed: PassedSocket, subject: str) -> None:
    """A stream socket to accept on must be listening: a connected one is
    a connection (systemd's Accept=yes), which --inetd serves."""
    if passed.is_stream and not passed.listening:
        raise BindError(
            f"{subject}: descriptor {passed.fd} is a connected {passed.transport} socket, "
            "not a listening one (for a connection passed by inetd or Accept=yes, use --inetd)"
        )


# -- sockets passed by systemd (LISTEN_FDS) -------------------------------------


@dataclass(frozen=True, slots=True)
class _Passed:
    given: bool  # LISTEN_FDS was in the environment
    sockets: tuple[PassedSocket, ...] = ()
    problem: str | None = None  # why none of them is ours to use


_passed: _Passed | None = None


def _read_passed(environ: MutableMapping[str, str]) -> _Passed:
    values = {name: environ.pop(name, None) for name in LISTEN_VARIABLES}
    count_text, pid_text, names_text = (values[name] for name in LISTEN_VARIABLES)
    if count_text is None:
        return _Passed(False)
    if not count_text.isascii() or not count_text.isdigit():
        return _Passed(True, problem=f"LISTEN_FDS={count_text!r} is not a number")
    if pid_text is None:
        return _Passed(True, problem="LISTEN_FDS is set but LISTEN_PID is not")
    if not pid_text.isascii() or not pid_text.isdigit():
        return _Passed(True, problem=f"LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != os.getpid():
        return _Passed(
            True,
            problem=f"the sockets in LISTEN_FDS were passed to process {pid_text}, not to "
            f"this one ({os.getpid()}): ExecStart= must run sockworks itself "
            "(or exec it from a wrapper script)",
        )
    count = int(count_text)
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        return _Passed(
            True,
            problem=f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count} sockets",
        )
    names = names or [UNNAMED] * count
    sockets = []
    for index in range(count):
        fd = FIRST_FD + index
        try:
            # sd_listen_fds does the same: a program started later must not
            # inherit the sockets (the environment that named them is gone).
            os.set_inheritable(fd, False)
        except OSError:
            pass  # inspect() says what is wrong with it
        try:
            sockets.append(inspect(fd, name=names[index], subject=f"systemd:{index}"))
        except BindError as exc:
            return _Passed(True, problem=str(exc))
    return _Passed(True, tuple(sockets))


def _claimed() -> _Passed:
    global _passed
    if _passed is None:
        _passed = _read_passed(os.environ)
    return _passed


def claim_environment() -> None:
    """Read (once) and remove every variable systemd set for this process:
    the passed sockets and the readiness socket. Call it before anything
    reads the environment for a child (exec's --pass-env): systemd's
    variables are for this process alone. Problems are reported later,
    when the sockets are used."""
    _claimed()
    process_notifier()


def sockets_given() -> bool:
    """Whether systemd passed sockets (to this process or not: using them
    then says why not); LISTEN_FDS=0 passes none."""
    passed = _claimed()
    return passed.given and bool(passed.sockets or passed.problem)


def passed_sockets() -> tuple[PassedSocket, ...]:
    """Every socket systemd passed, in order; :class:`BindError` when
    LISTEN_FDS was set but the sockets cannot be used (not ours)."""
    passed = _claimed()
    if passed.problem is not None:
        raise BindError(passed.problem)
    return passed.sockets


def lookup(key: str, subject: str) -> PassedSocket:
    """The passed socket named ``key`` (LISTEN_FDNAMES), or with 0-based
    index ``key`` when it is a number."""
    if not key:
        raise EndpointError(f"endpoint {subject!r} has no socket name (systemd:NAME or systemd:N)")
    passed = _claimed()
    if not passed.given:
        raise BindError(
            f"{subject}: no sockets were passed by systemd (LISTEN_FDS is not set): start "
            "sockworks from a .socket unit or with systemd-socket-activate"
        )
    if passed.problem is not None:
        raise BindError(f"{subject}: {passed.problem}")
    sockets = passed.sockets
    if key.isascii() and key.isdigit():
        index = int(key)
        if index >= len(sockets):
            raise BindError(
                f"{subject}: there is no socket {index}: systemd passed "
                f"{_describe_names(sockets)}"
            )
        return sockets[index]
    named = [s for s in sockets if s.name == key]
    if not named:
        raise BindError(
            f"{subject}: no socket named {key!r} was passed: systemd passed "
            f"{_describe_names(sockets)} (FileDescriptorName= in the .socket unit names them)"
        )
    if len(named) > 1:
        indexes = ", ".join(f"systemd:{sockets.index(s)}" for s in named)
        raise BindError(
            f"{subject}: {len(named)} sockets are named {key!r}: take each by its index "
            f"({indexes}), or give them different FileDescriptorName="
        )
    return named[0]


def _describe_names(sockets: tuple[PassedSocket, ...]) -> str:
    if not sockets:
        return "none (LISTEN_FDS=0)"
    return ", ".join(f"{s.name} (index {i}, {s.transport})" for i, s in enumerate(sockets))


def _reset_for_tests() -> None:
    """Forget what was read (the tests run several environments)."""
    global _passed, _notifier
    _passed = None
    _notifier = None


# -- readiness (NOTIFY_SOCKET) ---------------------------------------------------


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, what MONOTONIC_USEC= carries."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Tells the service manager how the service is doing (sd_notify).

    Usable with or without an event loop: each method sends one datagram at
    once (a non-blocking send; a full queue drops it, with a log line) and
    returns. It speaks only for the process that read the environment: in
    a forked child every method does nothing, so that only the main process
    is heard (``NotifyAccess=main``).
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address: str | bytes | None = None
        if address:
            if address.startswith("@"):
                # Abstract namespace: a leading NUL instead of the "@".
                self._address = b"\0" + address[1:].encode()
            elif address.startswith("/"):
                self._address = address
            else:
                log.warning(
                    "NOTIFY_SOCKET=%s is not a Unix socket path or @name: not notifying",
                    address,
                )
        self._watchdog = watchdog_usec / 2e6 if watchdog_usec else None
        self._pid = os.getpid()
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
        ``WATCHDOG_PID``; with ``unset`` they are removed from ``environ``
        (sd_notify's unset_environment), so that no child speaks for us."""
        environ = os.environ if environ is None else environ
        get = environ.pop if unset else environ.get
        values = {name: get(name, None) for name in NOTIFY_VARIABLES}
        usec_text, pid_text = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        usec: int | None = None
        if usec_text and usec_text.isascii() and usec_text.isdigit() and int(usec_text) > 0:
            usec = int(usec_text)
        elif usec_text:
            log.warning("WATCHDOG_USEC=%r is not a number of microseconds: ignored", usec_text)
        if usec is not None and pid_text and pid_text != str(os.getpid()):
            usec = None  # the watchdog is another process's to feed
        return cls(values["NOTIFY_SOCKET"], watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (NOTIFY_SOCKET set, this process)."""
        return self._address is not None and os.getpid() == self._pid

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` calls: half of WATCHDOG_USEC,
        as sd_watchdog_enabled(3) advises; None when no watchdog is asked."""
        return self._watchdog if self.enabled else None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``NAME=VALUE`` each) in one datagram; True when sent."""
        if not self.enabled:
            return False
        assert self._address is not None
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the event loop on the manager's socket.
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.warning(
                "cannot notify the service manager (%s): %s",
                fields[0] if fields else "", exc.strerror or exc,
            )
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Every listener is up (``READY=1``), with a status line."""
        if status is None:
            self.notify("READY=1")
        else:
            self.notify("READY=1", _status(status))

    def status(self, text: str) -> None:
        self.notify(_status(text))

    def reloading(self) -> None:
        """A reload starts: ``RELOADING=1`` with the time it started
        (``MONOTONIC_USEC``, which Type=notify-reload requires); send
        :meth:`ready` when it is over."""
        self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """The watchdog's keep-alive (``WATCHDOG=1``)."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str) -> str:
    # One line: a newline would start a field of its own.
    return "STATUS=" + " ".join(text.split())


_notifier: Notifier | None = None


def process_notifier() -> Notifier:
    """This process's notifier, made from the environment (which loses the
    variables) on first use, and the same object afterwards."""
    global _notifier
    if _notifier is None:
        _notifier = Notifier.from_environment()
    return _notifier
