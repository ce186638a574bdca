"""A relay between two transports, for a program that must not see TLS.

An ``exec`` service hands the client's socket to its program; over TLS the
program would read ciphertext. The listener then gives the program one end
of a socketpair and relays between the other end and the TLS connection,
so the program sees what it would see over plain TCP:

* bytes both ways, paced by flow control (a side that cannot keep up stops
  the other from being read, so memory stays bounded);
* half-close both ways: the client's EOF (close_notify, or its FIN)
  becomes EOF on the program's stdin, and its output still flows back;
  the program's exit (EOF on its end) closes the TLS connection once what
  it wrote has been sent (close_notify, then FIN).
"""

from __future__ import annotations

import asyncio
from typing import cast


class RelaySide(asyncio.Protocol):
    """One side; ``other`` is the side its bytes go to."""

    __slots__ = ("_done", "eof", "other", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: RelaySide | None = None
        self.eof = False
        self._done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is not None and other.transport is not None:
            if other.transport.can_write_eof():
                other.transport.write_eof()  # the far end sees EOF, may still send
            else:
                other.transport.close()  # TLS: close_notify after what is queued
            if other.eof:
                # Both directions are done: nothing more will come either way.
                self._close_both()
        # True keeps our write side open (a plain socket); TLS cannot.
        return self.transport is not None and self.transport.can_write_eof()

    def pause_writing(self) -> None:
        # We cannot send as fast as the other side reads: stop reading it.
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            # Gone: the other side closes once what is queued is sent (a
            # reset on our side makes the other side's program see EOF).
            other.transport.close()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _close_both(self) -> None:
        for side in (self, self.other):
            if side is not None and side.transport is not None:
                side.transport.close()


def pair(a: RelaySide, b: RelaySide) -> None:
    """Connect two sides: what one receives, the other sends."""
    a.other, b.other = b, a
