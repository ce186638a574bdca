"""The real :class:`~sockworks.gopher.root.Root`: a directory on disk.

Confinement, in layers: the selector was validated before it gets here
(no ``..``, no hidden names, no control characters, no backslashes); every
component is checked again; the joined path is resolved with
``os.path.realpath`` (all symlinks followed) and must still lie under the
root's own real path; and only directories and regular files are served:
devices, sockets and FIFOs are refused (opening a FIFO would block).
Symlinks that stay inside the root are followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Literal

from .root import Forbidden, Node, NotFound


class FileSystemRoot:
    """Serves the tree under ``directory``; see the module notes."""

    def __init__(self, directory: str) -> None:
        real = os.path.realpath(directory)
        if not os.path.isdir(real):
            raise NotADirectoryError(f"{directory}: not a directory")
        self.directory = real
        self._prefix = real.rstrip(os.sep) + os.sep

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
            raise Forbidden("not readable")
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
        return self.read(node, size)

    def read(self, node: Node, limit: int) -> bytes:
        if node.kind != "file":
            return b""
        # O_NONBLOCK: should the file have been swapped for a FIFO since it
        # was resolved, the open does not hang the server.
        try:
            fd = os.open(node.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return b""
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
        except OSError:
            return b""
        finally:
            os.close(fd)

    def chunks(self, node: Node, size: int) -> Iterator[bytes]:
        if node.kind != "file":
            return
        with open(node.path, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return
            while chunk := f.read(size):
                yield chunk
