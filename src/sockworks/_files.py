"""Writing a file atomically: never a partial file under the final name.

The data goes to a temporary file in the destination's directory (so the
rename stays on one file system and is atomic), is flushed to disk, and is
renamed over the destination only once it is all there. On any error, or
Ctrl-C, the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["atomic_writer", "write_atomic"]


@contextlib.contextmanager
def atomic_writer(destination: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """``with atomic_writer(path) as f: f.write(...)``: ``path`` appears,
    complete, when the block ends without an exception; otherwise it is
    untouched and no temporary file remains."""
    path = os.fspath(destination)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = _create_temp(directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fd = -1  # owned by f now, closed by the with
            yield f
            f.flush()
            # On disk before the rename, so a crash cannot leave the final
            # name pointing at an empty or short file.
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:  # KeyboardInterrupt and SystemExit included
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_atomic(destination: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``destination`` with :func:`atomic_writer`."""
    with atomic_writer(destination) as f:
        f.write(data)


def _create_temp(directory: str) -> tuple[int, str]:
    """A new file in ``directory``, created with mode 0666 so the kernel
    applies the umask (and any default ACL) as open() would for the final
    name; tempfile.mkstemp's 0600 would need a process-wide umask() dance.
    A dot name hides it from listings and globs while it fills."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        temp = os.path.join(directory, f".sockworks-{secrets.token_hex(8)}.part")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:  # 64 random bits: practically never
            continue
    raise FileExistsError(f"no free temporary name in {directory}")
