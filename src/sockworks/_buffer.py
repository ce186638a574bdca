"""A receive buffer with linear-time line extraction and a hard size limit.

Lines are found by searching only the bytes that arrived since the last
search, and consumed bytes are dropped in amortised O(1) (we advance an
offset and compact when more than half the buffer is dead). Twisted's
LineReceiver, which re-splits the whole buffer on every chunk, goes
quadratic on a peer that sends one byte at a time; this does not.
"""

from __future__ import annotations

from ._errors import LineTooLong


class LineBuffer:
    """Collects bytes and yields complete lines, never holding more than
    ``max_line`` bytes of an unfinished line.

    ``next_line()`` returns a line without its terminator (LF, with an
    optional CR before it), or ``None`` when no complete line is buffered.
    A line longer than ``max_line`` raises :class:`LineTooLong` as soon as
    it is known to be too long, before it is all buffered.
    """

    __slots__ = ("_buf", "_scanned", "_start", "max_line")

    def __init__(self, max_line: int = 8192) -> None:
        self._buf = bytearray()
        self._start = 0  # first unconsumed byte
        self._scanned = 0  # bytes from _start already searched for LF
        self.max_line = max_line

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        buf, start = self._buf, self._start
        nl = buf.find(b"\n", start + self._scanned)
        if nl < 0:
            pending = self._scanned = len(buf) - start
            # One byte over is allowed only if it is a CR waiting for its LF.
            if pending > self.max_line and (pending > self.max_line + 1 or buf[-1] != 0x0D):
                raise LineTooLong(self.max_line)
            return None
        end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
        if end - start > self.max_line:
            raise LineTooLong(self.max_line)
        line = bytes(buf[start:end])
        self._start = nl + 1
        self._scanned = 0
        if self._start > 4096 and self._start * 2 > len(buf):
            del buf[: self._start]
            self._start = 0
        return line

    def peek(self) -> bytes:
        """Everything buffered, without consuming it: after ``next_line()``
        returned ``None``, the unfinished line so far (a protocol that can
        decide before the line ends, like the seeds' greeting, looks at it)."""
        return bytes(self._buf[self._start :])

    def take_rest(self) -> bytes:
        """Everything buffered (an unterminated last line at EOF)."""
        rest = bytes(self._buf[self._start :])
        self._buf.clear()
        self._start = self._scanned = 0
        return rest

    def take(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what is buffered, in order (a stream read)."""
        buf, start = self._buf, self._start
        end = min(len(buf), start + max_bytes)
        # All of it (a stream read's usual case): one copy, not a slice and
        # then a copy of the slice.
        data = bytes(buf) if start == 0 and end == len(buf) else bytes(buf[start:end])
        if end == len(buf):
            buf.clear()
            self._start = 0
        else:
            self._start = end
            if self._start > 4096 and self._start * 2 > len(buf):
                del buf[: self._start]
                self._start = 0
        self._scanned = 0
        return data

    def next_line_with_end(self) -> bytes | None:
        """Like :meth:`next_line`, but the line keeps its LF or CRLF."""
        buf, start = self._buf, self._start
        nl = buf.find(b"\n", start + self._scanned)
        if nl < 0:
            self.next_line()  # the length check, and the scan bookmark
            return None
        end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
        if end - start > self.max_line:
            raise LineTooLong(self.max_line)
        line = self.take(nl + 1 - start)
        return line

    def take_line(self, max_bytes: int = -1) -> bytes | None:
        """The next line with its LF, or its first ``max_bytes`` bytes when
        it is longer (``max_bytes`` >= 0): a file's ``readline(size)``, with
        no line limit. ``None`` when neither is buffered yet."""
        buf, start = self._buf, self._start
        nl = buf.find(b"\n", start + self._scanned)
        if nl >= 0 and (max_bytes < 0 or nl - start < max_bytes):
            return self.take(nl + 1 - start)
        pending = len(buf) - start
        if 0 <= max_bytes <= pending:
            return self.take(max_bytes)
        self._scanned = pending
        return None
