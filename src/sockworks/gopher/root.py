"""What the Gopher protocol needs from a file system, as an interface.

The protocol never touches files itself: it asks a :class:`Root` to resolve
path components and list directories. The real implementation is
:class:`sockworks.gopher.fsroot.FileSystemRoot`; tests use an in-memory
one, so the protocol is tested with byte strings alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


class RootError(Exception):
    """A selector that names nothing servable; ``str()`` is for the client."""


class NotFound(RootError):
    pass


class Forbidden(RootError):
    pass


class Unreadable(Forbidden):
    """A file the server may serve but cannot read (permissions, an I/O
    error): the client gets a type-3 error, never an empty item, and the
    operator a warning. ``path`` and ``reason`` are for the log only."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__("not readable")
        self.path = path
        self.reason = reason


@dataclass(slots=True)
class Node:
    """A servable thing under the root: a directory or a regular file.

    ``parts`` are its path components from the root (its selector is
    ``/`` + ``/``-joined parts); ``path`` is what the driver opens to send
    it (the resolved real path for a real root).
    """

    parts: tuple[str, ...]
    kind: Literal["dir", "file"]
    path: str
    size: int = 0  # set by resolve(); children() may leave it 0
    mtime: float = 0.0
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.parts[-1] if self.parts else ""


class Root(Protocol):
    """A tree the server may serve from, and nothing outside it."""

    def resolve(self, parts: tuple[str, ...]) -> Node:
        """The node at ``parts``; :class:`NotFound` or :class:`Forbidden`
        when it does not exist, leaves the root, or is neither a directory
        nor a regular file (devices, sockets, FIFOs)."""
        ...

    def children(self, node: Node) -> list[Node]:
        """A directory's servable entries (hidden ones left out), any order.
        Their ``size`` and ``mtime`` may be 0: resolve one to know them."""
        ...

    def head(self, node: Node, size: int) -> bytes:
        """The first ``size`` bytes of a file (for sniffing its type)."""
        ...

    def read(self, node: Node, limit: int) -> bytes:
        """Up to ``limit`` bytes of a file."""
        ...

    def chunks(self, node: Node, size: int) -> Iterator[bytes]:
        """A file's contents in chunks of ``size`` bytes."""
        ...


#: What a :class:`StampedRoot` knows of a file it can vouch for; opaque to
#: the protocol, which only hands it back to :meth:`StampedRoot.unchanged`.
Stamp = tuple[object, ...]


@runtime_checkable
class StampedRoot(Root, Protocol):
    """A root that lets answers be cached: it can say, more cheaply than a
    full :meth:`~Root.resolve`, that a path still names the same unchanged
    file, inside the root. A root without these methods is never cached
    from (the in-memory roots of the tests)."""

    def read_stamped(self, node: Node, limit: int) -> tuple[bytes, Stamp | None]:
        """What :meth:`~Root.read` returns, with the stamp of the bytes read
        (None: not cacheable)."""
        ...

    def stamp(self, node: Node) -> Stamp | None:
        """The stamp of a file as it is now (None: not cacheable)."""
        ...

    def unchanged(self, stamp: Stamp) -> bool:
        """True only if the path of ``stamp`` still names, inside the root,
        the very file it was taken from, unchanged. False sends the caller
        back to a full resolve."""
        ...
