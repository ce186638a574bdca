"""Dropping root once every socket is bound: ``--user`` and ``--group``.

The order is what careful daemons do (OpenSSH's ``permanently_set_uid``,
nginx, the CERT rule POS36-C):

1. :func:`resolve` the names at start, before anything binds: a typo never
   leaves a port bound, and a non-root process asked to switch users says
   so in one line.
2. :func:`check_as`: the files the services will read later (a gopher root,
   a quotes file read again on reload, an exec program, TLS files read
   again on SIGHUP, your module's directory, the config file) are tried in
   a forked child that has really dropped to the user - open() and
   access() as that user are the only checks that are true (ACLs, group
   membership, modes of every directory on the way). Still before binding.
3. Bind as root (ports below 1024).
4. :func:`drop`: Unix socket files are given to the user (only root may
   give a file away), then ``setgroups([])``, ``setgid``, ``setuid`` - in
   that order, because once the user is changed the groups cannot be -
   with ``PR_SET_KEEPCAPS`` off, so that ``setuid`` clears every
   capability. Then it is verified: the ids are what was asked, no
   capability is left, and ``setuid(0)`` fails.

The worker supervisor calls :func:`drop` in the parent after binding and
before forking (workers inherit it); the single-process server
(:func:`sockworks._run.run_services`) calls it after binding, before the
event loop runs.
"""

from __future__ import annotations

import errno
import functools
import grp
import inspect
import logging
import os
import pwd
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ._errors import ConfigError, SockworksError

log = logging.getLogger("sockworks.privileges")

# Linux capability numbers (linux/capability.h) and prctl options.
_CAP_SETGID, _CAP_SETUID = 6, 7
_PR_GET_KEEPCAPS, _PR_SET_KEEPCAPS = 7, 8


class PrivilegeError(SockworksError):
    """The process cannot become, or serve as, the user asked for: not
    root, a file that user cannot read, a drop that did not hold. Exit
    status 1 (the CLI's ``sockworks: error:`` line)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Whom to become: ``uid`` None keeps the user (``--group`` alone)."""

    uid: int | None
    gid: int
    user: str | None  # the name, for messages and $USER
    group: str
    home: str | None = None  # the user's home and shell, for $HOME, $SHELL
    shell: str | None = None

    def __str__(self) -> str:
        who = f"group {self.group} (gid {self.gid})"
        if self.uid is None:
            return who
        return f"user {self.user} (uid {self.uid}), {who}"

    @property
    def who(self) -> str:
        """Who the checks run as, for messages: ``user nobody``."""
        return f"user {self.user}" if self.uid is not None else f"group {self.group}"


def _user(name: str) -> pwd.struct_passwd | int:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name.isdigit():  # a number, as chown(1) takes: found or not
        try:
            return pwd.getpwuid(int(name))
        except KeyError:
            return int(name)
    raise ConfigError(f"unknown user {name!r} (not in the user database: see getent passwd)")


def _group(name: str) -> grp.struct_group | int:
    try:
        return grp.getgrnam(name)
    except KeyError:
        pass
    if name.isdigit():
        try:
            return grp.getgrgid(int(name))
        except KeyError:
            return int(name)
    raise ConfigError(f"unknown group {name!r} (not in the group database: see getent group)")


def _capabilities(field: str) -> int | None:
    """A capability set of this process (``CapEff``...), None when unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def _may(capability: int) -> bool:
    """Whether this process may use ``capability`` (root, or granted it)."""
    effective = _capabilities("CapEff")
    if effective is None:
        return os.geteuid() == 0
    return bool(effective >> capability & 1)


def resolve(user: str | None, group: str | None) -> Credentials | None:
    """The credentials ``--user``/``--group`` name, resolved now (at start,
    before anything binds); None when there is nothing to do.

    ``user`` alone: the user's primary group. ``group`` alone: only the
    group changes (supplementary groups are cleared too). Names, or numbers
    as chown(1) takes them. Unknown names are a :class:`ConfigError`; a
    process that may not switch (not root) and is not already that user
    and group is a :class:`PrivilegeError`; one that already is has
    nothing to do (None): a service can be started the same way by root
    and, in a container or unit that starts it as that user, by itself.
    """
    if user is None and group is None:
        return None
    uid: int | None = None
    home = shell = None
    gid: int | None = None
    if user is not None:
        found = _user(user)
        if isinstance(found, int):
            uid = found
        else:
            uid, gid, home, shell = found.pw_uid, found.pw_gid, found.pw_dir, found.pw_shell
            user = found.pw_name
    if group is not None:
        found_group = _group(group)
        gid = found_group if isinstance(found_group, int) else found_group.gr_gid
    elif gid is None:  # a user number with no entry: no primary group to take
        raise ConfigError(f"user {user!r} has no entry in the user database: give --group too")
    assert gid is not None
    try:
        group_name = grp.getgrgid(gid).gr_name
    except KeyError:
        group_name = str(gid)
    credentials = Credentials(uid, gid, user, group_name, home, shell)
    same_user = uid is None or os.getresuid() == (uid, uid, uid)
    same_group = os.getresgid() == (gid, gid, gid)
    if same_user and same_group and not _may(_CAP_SETGID):
        return None  # already that user (and group): nothing this process could change
    if not same_user and not _may(_CAP_SETUID):
        raise PrivilegeError(
            f"--user {user}: only root can switch to another user (this process runs as "
            f"uid {os.getuid()}); start sockworks as root, or leave --user out"
        )
    if not _may(_CAP_SETGID):
        raise PrivilegeError(
            f"--group {group_name}: only root can switch groups (this process runs as "
            f"gid {os.getgid()}); start sockworks as root, or leave --group out"
        )
    return credentials


# -- what the services need to read, checked as the user -----------------

Need = Literal["read", "list", "run", "enter"]
_VERBS: dict[str, str] = {"read": "read", "list": "list", "run": "run", "enter": "enter"}


@dataclass(frozen=True, slots=True)
class RequiredPath:
    """A file or directory a service uses after the drop, and how:
    ``read`` a file, ``list`` a directory (read and search), ``run`` a
    program, ``enter`` a directory (a working directory)."""

    path: str
    what: str  # "gopher root", "quotes file"...
    need: Need = "read"
    service: str = ""  # the service it belongs to, for the message

    def problem(self) -> str | None:
        """Why this process cannot use it, in words; None when it can."""
        path = self.path
        try:
            if self.need == "read":
                # open() itself, not access(): what the service will do.
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            elif self.need == "list":
                os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
                if not os.access(path, os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            elif self.need == "run":
                if not os.access(path, os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            else:  # enter
                if not stat.S_ISDIR(os.stat(path).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                if not os.access(path, os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    def message(self, who: str, reason: str) -> str:
        where = f"{self.service}: " if self.service else ""
        return (
            f"{where}{who} cannot {_VERBS[self.need]} the {self.what} {self.path!r} "
            f"({reason}); it is used after the drop: give access (chmod, chown, "
            "setfacl) or choose another --user/--group"
        )


@runtime_checkable
class UsesPaths(Protocol):
    """A driver that names the files its service reads while serving
    (GopherDriver: its root; qotd: its quotes file; exec: the program)."""

    def required_paths(self) -> Iterable[RequiredPath]: ...


def _app_directory(handler: object) -> RequiredPath | None:
    """Your own service's directory (MODULE:NAME, ``--app-dir``): where a
    reload imports it again from. None for sockworks' own handlers."""
    module = inspect.getmodule(handler)
    name = getattr(module, "__name__", "")
    filename = getattr(module, "__file__", None)
    if not name or not filename or name == "__main__" or name.split(".")[0] == "sockworks":
        return None
    directory = os.path.dirname(os.path.abspath(filename))
    # Up from the module's file to the directory on sys.path it came from.
    levels = name.count(".") + (os.path.basename(filename).startswith("__init__."))
    for _ in range(levels):
        directory = os.path.dirname(directory)
    return RequiredPath(directory, f"directory of {name}", "list")


# What is read of a ServiceConfig and a Server, as protocols: this module
# stays below the server in the import graph (the server's modules may
# import it; it imports none of them).
class _TLSFiles(Protocol):
    @property
    def cert(self) -> str: ...
    @property
    def key(self) -> str | None: ...
    @property
    def client_ca(self) -> str | None: ...


class _Service(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def handler(self) -> Any: ...
    @property
    def tls(self) -> _TLSFiles | None: ...


class _Endpoint(Protocol):
    @property
    def transport(self) -> str: ...
    @property
    def path(self) -> str: ...


class _Bound(Protocol):
    @property
    def endpoints(self) -> Sequence[tuple[str, _Endpoint]]: ...


def required_paths(
    services: Sequence[_Service], config_file: str | None = None
) -> list[RequiredPath]:
    """What ``services`` read after the drop: each driver's own paths
    (:class:`UsesPaths`), TLS certificates, keys and CAs (read again on
    SIGHUP), your module's directory; and ``config_file``, which a reload
    reads again."""
    out: list[RequiredPath] = []
    for config in services:
        handler = config.handler
        found: list[RequiredPath] = []
        if isinstance(handler, UsesPaths) and not inspect.isclass(handler):
            found.extend(handler.required_paths())
        if config.tls is not None:
            tls = config.tls
            for what, path in (("certificate", tls.cert), ("private key", tls.key),
                               ("client CA file", tls.client_ca)):
                if path is not None:
                    found.append(RequiredPath(path, what))
        app = _app_directory(config.handler)
        if app is not None:
            found.append(app)
        out.extend(RequiredPath(p.path, p.what, p.need, p.service or config.name) for p in found)
    if config_file is not None:
        out.append(RequiredPath(os.path.abspath(config_file), "config file"))
    return out


def check_paths(paths: Iterable[RequiredPath], who: str = "this process") -> None:
    """Every path usable by this process as it is now (after :func:`drop`),
    or a :class:`PrivilegeError` naming the first one that is not."""
    for path in paths:
        reason = path.problem()
        if reason is not None:
            raise PrivilegeError(path.message(who, reason))


def check_as(credentials: Credentials | None, paths: Sequence[RequiredPath]) -> None:
    """:func:`check_paths` as ``credentials``, before anything is bound:
    in a forked child that really drops (this process keeps its
    privileges). One line (:class:`PrivilegeError`) for the first path
    the user cannot use, or for a drop that fails."""
    if credentials is None or not paths:
        return
    sys.stderr.flush()
    _libc()  # loaded here, not in the child
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its verdict is tested
        status = 1
        try:
            os.close(read_end)
            _switch(credentials)
            verdict = ""
            for path in paths:
                reason = path.problem()
                if reason is not None:
                    verdict = path.message(credentials.who, reason)
                    break
            status = 0
        except BaseException as exc:  # reported to the parent, never raised here
            verdict = str(exc) or type(exc).__name__
        try:
            os.write(write_end, verdict.encode("utf-8", "replace")[:4000])
        finally:
            os._exit(status)  # no atexit handlers, no flushing of the parent's buffers
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    verdict = b"".join(chunks).decode("utf-8", "replace")
    if os.waitstatus_to_exitcode(wait_status) != 0:
        raise PrivilegeError(f"cannot check files as {credentials.who}: {verdict or 'probe died'}")
    if verdict:
        raise PrivilegeError(verdict)


# -- the drop itself ------------------------------------------------------


@functools.cache
def _libc() -> Any:
    """The C library, for prctl(2); None where it cannot be loaded. Loaded
    once, before any fork (dlopen in a forked child is best avoided)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _prctl(option: int, value: int = 0) -> int | None:
    """prctl(2), None where there is none (not Linux)."""
    prctl = getattr(_libc(), "prctl", None)
    if prctl is None:
        return None
    result: int = prctl(option, value, 0, 0, 0)
    return result


def _switch(c: Credentials) -> None:
    """setgroups, setgid, setuid - this order: once the user is changed,
    the groups cannot be - then checks that it holds."""
    if c.uid is not None and c.uid != 0:
        # Off (the default, and cleared by execve): setuid away from root
        # then clears every capability. Set here in case something in this
        # process turned it on.
        _prctl(_PR_SET_KEEPCAPS, 0)
    try:
        os.setgroups([])
        os.setresgid(c.gid, c.gid, c.gid)
        if c.uid is not None:
            os.setresuid(c.uid, c.uid, c.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to {c}: {exc.strerror or exc}") from None
    _verify(c)


def _verify(c: Credentials) -> None:
    """The drop holds: ids as asked, no supplementary group, and for a
    user other than root, no capability left and no way back."""
    problems: list[str] = []
    if os.getresgid() != (c.gid, c.gid, c.gid):
        problems.append(f"group ids are {os.getresgid()}")
    if os.getgroups() not in ([], [c.gid]):
        problems.append(f"supplementary groups {os.getgroups()} remain")
    if c.uid is not None:
        if os.getresuid() != (c.uid, c.uid, c.uid):
            problems.append(f"user ids are {os.getresuid()}")
        if c.uid != 0:
            if _prctl(_PR_GET_KEEPCAPS) not in (0, None):
                problems.append("PR_SET_KEEPCAPS is on")
            for capset in ("CapEff", "CapPrm", "CapAmb"):
                if _capabilities(capset) not in (0, None):
                    problems.append(f"capabilities remain ({capset})")
            for regain in (os.setuid, os.seteuid):
                try:
                    regain(0)
                except PermissionError:
                    continue
                problems.append(f"{regain.__name__}(0) succeeded")
            if c.gid != 0:
                try:
                    os.setgid(0)
                    problems.append("setgid(0) succeeded")
                except PermissionError:
                    pass
    if problems:
        raise PrivilegeError(f"dropping to {c} did not hold: {'; '.join(problems)}")


def unix_socket_paths(server: _Bound) -> list[str]:
    """The files of the Unix listeners ``server`` bound itself: not those
    it inherited (systemd:NAME, fd:N), whose files the service manager
    made and owns."""
    return [
        e.path for _, e in server.endpoints
        if e.transport in ("unix", "unixgram") and e.path and getattr(e, "fd", None) is None
    ]


def _give_socket(path: str, c: Credentials) -> None:
    """A Unix socket file we created, to the user and group we drop to:
    then clients running as that user can connect (connect() needs write
    permission on the file; it was created 0777 & ~umask for root), and a
    directory with the sticky bit (/tmp) lets the owner remove it at
    shutdown. Never follows a symlink: someone who can write to the
    directory must not get us to chown another file."""
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            log.warning("%s is no longer a socket: not changing its owner", path)
            return
        os.chown(path, -1 if c.uid is None else c.uid, c.gid, follow_symlinks=False)
    except OSError as exc:
        log.warning("cannot give %s to %s: %s", path, c.who, exc.strerror or exc)


def _removable(path: str, who: str) -> str | None:
    """Why this process (``who``) could not remove ``path`` at shutdown."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable by {who}"
    try:
        st_dir, st = os.stat(directory), os.lstat(path)
    except OSError as exc:
        return exc.strerror
    uid = os.geteuid()
    if st_dir.st_mode & stat.S_ISVTX and uid not in (st.st_uid, st_dir.st_uid):
        return f"{directory} is sticky and the file is not {who}'s"
    return None


def drop(credentials: Credentials | None, unix_sockets: Iterable[str] = ()) -> None:
    """Become ``credentials`` for good, once every socket is bound.

    ``unix_sockets``: the files of the bound Unix listeners, given to the
    user and group first (see :func:`_give_socket`). Then supplementary
    groups are cleared, the group and the user set (real, effective and
    saved ids), and the drop verified: :class:`PrivilegeError` if it did
    not hold (``setuid(0)`` still works, a capability is left).

    The environment follows, as systemd's ``User=`` sets it: ``HOME``,
    ``USER``, ``LOGNAME`` and ``SHELL`` of the user, so that programs this
    process runs later (your code's subprocesses) do not look in root's
    home. (exec services and gopher scripts build their environment from
    scratch; a ``--pass-env HOME`` value is taken at start, as root's.)

    A Unix socket file in a directory the user cannot write to (``/run``)
    cannot be removed at shutdown: that is logged now, once; it stays
    until the next start, which removes a stale socket file by itself.

    In a process that forks workers, call this before forking: they
    inherit it. No-op for None.
    """
    if credentials is None:
        return
    c = credentials
    paths = list(unix_sockets)
    for path in paths:
        _give_socket(path, c)
    _switch(c)
    if c.uid is not None and c.user is not None:
        os.environ.update(USER=c.user, LOGNAME=c.user)
        if c.home:
            os.environ["HOME"] = c.home
        if c.shell:
            os.environ["SHELL"] = c.shell
    log.info("running as %s; supplementary groups cleared", c)
    for path in paths:
        why = _removable(path, c.who)
        if why is not None:
            log.warning(
                "%s will stay after shutdown (%s; the next start removes it): "
                "put sockets in a directory %s owns (RuntimeDirectory= under systemd)",
                path, why, c.who,
            )


__all__ = [
    "Credentials",
    "PrivilegeError",
    "RequiredPath",
    "UsesPaths",
    "check_as",
    "check_paths",
    "drop",
    "required_paths",
    "resolve",
    "unix_socket_paths",
]
