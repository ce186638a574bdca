"""The real :class:`~sockworks.gopher.root.Root`: a directory on disk.

Confinement, in layers: the selector was validated before it gets here
(no ``..``, no hidden names, no control characters, no backslashes); every
component is checked again; the joined path is resolved with
``os.path.realpath`` (all symlinks followed) and must still lie under the
root's own real path; and only directories and regular files are served:
devices, sockets and FIFOs are refused (opening a FIFO would block).
Symlinks that stay inside the root are followed.

Stamps, for the protocol's answer cache: a file reached without any
symlink below the root can be stamped, and a stamp is re-checked per
request with one ``lstat`` per path component (see :meth:`unchanged`
for why that is as strict as the full resolve).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Literal, cast

from .root import Forbidden, Node, NotFound, RootError, Stamp, Unreadable

# A file changed this recently may change again without its mtime or
# ctime moving: the kernel stamps files from a coarse clock (a tick of 1 to
# 10 ms), and some file systems keep no finer than a second (FAT, two).
# Such a file is served but not stamped until it has been still this long,
# so that any later write is sure to show in the times a stamp compares.
# Times that are whole seconds, both of them, are taken to come from such
# a file system (the ctime cannot be set: a tar-extracted file with a
# whole-second mtime still has a fine one).
SETTLE_NS = 100_000_000
COARSE_SETTLE_NS = 2_000_000_000
# A stamp holds a path per component (each a prefix of the next): files
# deeper than this are resolved in full every time, not stamped.
MAX_STAMP_DEPTH = 32


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # The mode holds the file type (a symlink's differs from a file's) and
    # the permissions; the ctime moves on every write, chmod, chown, link,
    # unlink and utime, and cannot be set back by anyone but the clock.
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileSystemRoot:
    """Serves the tree under ``directory``; see the module notes."""

    def __init__(self, directory: str, clock: Callable[[], int] = time.time_ns) -> None:
        real = os.path.realpath(directory)
        if not os.path.isdir(real):
            raise NotADirectoryError(f"{directory}: not a directory")
        # A root the server cannot list is an error at start, not a hole
        # that answers every request with a type-3 error.
        if not os.access(real, os.R_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)
        self.directory = real
        self._prefix = real.rstrip(os.sep) + os.sep
        st = os.stat(real)
        self._root_id = (st.st_dev, st.st_ino)
        self._clock = clock  # nanoseconds since the epoch, as file times are

    def _inside(self, real: str) -> bool:
        return real == self.directory or real.startswith(self._prefix)

    def _node(self, parts: tuple[str, ...], real: str) -> Node:
        try:
            st = os.stat(real)
        except OSError:
            raise NotFound("not found") from None
        if stat.S_ISDIR(st.st_mode):
            kind: Literal["dir", "file"] = "dir"
            need = os.R_OK | os.X_OK
        elif stat.S_ISREG(st.st_mode):
            kind, need = "file", os.R_OK
        else:
            raise Forbidden("not a file or directory")
        # Refused here, as a type-3 error, rather than served as an empty
        # text or failing later while the reply is sent.
        if not os.access(real, need):
            raise Unreadable(real, "permission denied")
        return Node(parts, kind, real, st.st_size if kind == "file" else 0, st.st_mtime)

    def resolve(self, parts: tuple[str, ...]) -> Node:
        for part in parts:
            if (
                not part
                or part.startswith(".")
                or "/" in part
                or "\\" in part
                or "\x00" in part
            ):
                raise Forbidden("bad path component")
        path = os.path.join(self.directory, *parts) if parts else self.directory
        try:
            real = os.path.realpath(path, strict=True)
        except OSError:
            raise NotFound("not found") from None
        if not self._inside(real):
            raise Forbidden("outside the served directory")
        return self._node(parts, real)

    def children(self, node: Node) -> list[Node]:
        if node.kind != "dir":
            return []
        out: list[Node] = []
        try:
            entries = list(os.scandir(node.path))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            parts = (*node.parts, name)
            try:
                # The type from readdir: no stat per entry for plain files
                # and directories (a listing does not show sizes). Devices,
                # sockets and FIFOs are neither, and are left out.
                if entry.is_file(follow_symlinks=False):
                    out.append(Node(parts, "file", entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    out.append(Node(parts, "dir", entry.path))
                elif entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not self._inside(real):
                        continue
                    st = os.stat(real)
                    if stat.S_ISDIR(st.st_mode):
                        out.append(Node(parts, "dir", real, 0, st.st_mtime))
                    elif stat.S_ISREG(st.st_mode):
                        out.append(Node(parts, "file", real, st.st_size, st.st_mtime))
            except OSError:
                continue  # vanished, or a dangling link
        return out

    def head(self, node: Node, size: int) -> bytes:
        try:
            return self.read(node, size)
        except RootError:  # only a type guess: an unreadable file is refused when asked for
            return b""

    def read(self, node: Node, limit: int) -> bytes:
        if node.kind != "file":
            return b""
        # O_NONBLOCK: should the file have been swapped for a FIFO since it
        # was resolved, the open does not hang the server.
        # An OS error is Unreadable (a type-3 error and a warning), never
        # empty data served as if it were the file.
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise Unreadable(node.path, exc.strerror or str(exc)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            chunks: list[bytes] = []
            left = limit
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise Unreadable(node.path, exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    # -- stamps, for the answer cache -----------------------------------------
    #
    # A stamp is (the absolute path of every component from the root down,
    # the (st_dev, st_ino) of every directory among them, the file's
    # identity). It is only taken for a file whose resolved real path is
    # its joined path (no symlink below the root, none at the root), after
    # lstat (which never follows the last component) found every directory
    # on the way a directory and the file a regular file.
    #
    # Why unchanged() is as strict as resolve(): the rule is that a path is
    # served only if it resolves, all symlinks followed, inside the root.
    # unchanged() lstats the root's own path and every component below it
    # and accepts only if the root's path still names the root directory
    # (same device and inode, and not a symlink), every directory on the way
    # is still the same directory (not a symlink: lstat would report the
    # link, whose inode and type differ), and the file is still the same
    # regular file with the same size, mode, mtime and ctime. Then the walk
    # root -> a -> b -> file follows no symlink below the root's path at
    # all: the path names, inside the root, the very inode whose bytes the
    # cache holds, unchanged since they were read. Anything else (a
    # component swapped for a symlink, renamed, removed, the file rewritten,
    # chmod-ed, linked or unlinked elsewhere: each moves its ctime) fails
    # the check, and the caller falls back to the full resolve, which
    # refuses what must be refused. The one difference: an ancestor of the
    # root's path (outside the tree, writable only by whoever could replace
    # the root itself) swapped for a symlink that still leads to the same
    # root directory passes here, where the full resolve refuses it; what is
    # served is still a file of that root directory, never one from
    # outside it. Races between the checks and the send are those of the
    # full resolve (it too checks, then opens by path).

    def _components(self, parts: tuple[str, ...]) -> tuple[str, ...]:
        prefix = self._prefix
        return tuple(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))

    def _walk(self, paths: tuple[str, ...]) -> tuple[tuple[tuple[int, int], ...],
                                                      os.stat_result] | None:
        """The directory ids and the file's lstat along ``paths``, if the
        root and every directory are what they must be and the last is a
        regular file; None otherwise."""
        try:
            st = os.lstat(self.directory)
            if (st.st_dev, st.st_ino) != self._root_id or not stat.S_ISDIR(st.st_mode):
                return None
            dirs: list[tuple[int, int]] = []
            for path in paths[:-1]:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    return None
                dirs.append((st.st_dev, st.st_ino))
            st = os.lstat(paths[-1])
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return tuple(dirs), st

    def _stampable(self, node: Node) -> tuple[str, ...] | None:
        if node.kind != "file" or not node.parts or len(node.parts) > MAX_STAMP_DEPTH:
            return None
        paths = self._components(node.parts)
        # resolve() found no symlink on the way, or the real path would differ.
        return paths if node.path == paths[-1] else None

    def _settled(self, st: os.stat_result) -> bool:
        mtime, ctime = st.st_mtime_ns, st.st_ctime_ns
        coarse = mtime % 1_000_000_000 == 0 and ctime % 1_000_000_000 == 0
        return self._clock() - max(mtime, ctime) >= (COARSE_SETTLE_NS if coarse else SETTLE_NS)

    def stamp(self, node: Node) -> Stamp | None:
        paths = self._stampable(node)
        walked = None if paths is None else self._walk(paths)
        if paths is None or walked is None:
            return None
        dirs, st = walked
        if st.st_size != node.size or not self._settled(st):
            return None
        return (paths, dirs, _identity(st))

    def read_stamped(self, node: Node, limit: int) -> tuple[bytes, Stamp | None]:
        paths = self._stampable(node)
        walked = None if paths is None else self._walk(paths)
        if paths is None or walked is None:
            return self.read(node, limit), None
        dirs, st = walked
        ident = _identity(st)
        if st.st_size > limit or not self._settled(st):
            return self.read(node, limit), None
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(paths[-1], flags)
        except OSError:
            return self.read(node, limit), None
        try:
            # The file opened is the one walked to, and it did not change
            # while it was read: the bytes are those of the stamped file.
            if _identity(os.fstat(fd)) != ident:
                data = None
            else:
                data = os.read(fd, st.st_size + 1)
                if len(data) != st.st_size or _identity(os.fstat(fd)) != ident:
                    data = None
        except OSError:
            data = None
        finally:
            os.close(fd)
        if data is None:  # it changed under us: read as ever, stamp nothing
            return self.read(node, limit), None
        return data, (paths, dirs, ident)

    def unchanged(self, stamp: Stamp) -> bool:
        # _walk and the comparisons, inlined: this runs on every cache hit.
        paths = cast("tuple[str, ...]", stamp[0])
        dirs = cast("tuple[tuple[int, int], ...]", stamp[1])
        S_ISDIR = stat.S_ISDIR
        try:
            st = os.lstat(self.directory)
            if (st.st_dev, st.st_ino) != self._root_id or not S_ISDIR(st.st_mode):
                return False
            for i in range(len(dirs)):
                st = os.lstat(paths[i])
                if (st.st_dev, st.st_ino) != dirs[i] or not S_ISDIR(st.st_mode):
                    return False
            st = os.lstat(paths[-1])
        except OSError:
            return False
        # The mode compared holds the type: a symlink's is not a file's.
        return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns,
                st.st_ctime_ns) == stamp[2]

    def chunks(self, node: Node, size: int) -> Iterator[bytes]:
        if node.kind != "file":
            return
        with open(node.path, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return
            while chunk := f.read(size):
                yield chunk
