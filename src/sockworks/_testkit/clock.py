"""An asyncio event loop with a virtual clock that jumps over idle time.

Modelled on Trio's ``MockClock(autojump_threshold=0)``: ``loop.time()`` is
virtual, and when nothing is ready to run and no descriptor is ready, the
loop moves the clock straight to the next timer instead of sleeping. A test
of a 300-second idle timeout then runs in milliseconds, and always in the
same order.

How: asyncio's ``_run_once`` asks the selector to wait ``timeout`` seconds,
the time to the next timer. The loop's selector is wrapped so that such a
wait first polls the real selector with timeout 0 (real descriptors still
work) and, if nothing is ready, adds ``timeout`` to the virtual clock and
returns no events: the timer is then due. A wait with no timeout (nothing
scheduled at all) blocks on the real selector as usual.

Threads: work in ``loop.run_in_executor`` (and so ``asyncio.to_thread`` and
``loop.getaddrinfo``) finishes in *real* time, so jumping would order a
timer before a thread that would in production finish first. While any
executor future is pending the loop therefore does not jump: the virtual
clock follows the real one (it waits for real on the selector, then adds
the real time waited, never more than the wait asked for). ``with
loop.real_time():`` does the same around any other outside work (a
subprocess, a peer in another thread). Threads the loop does not know of
(a plain ``threading.Thread`` calling ``call_soon_threadsafe``, a real
remote peer) can be jumped over, exactly as with Trio's autojump: wrap the
wait in ``real_time()``.

With ``autojump`` off the clock moves only by ``advance()``, executor work
or not. ``await loop.wait_idle()`` returns when the loop has nothing left to
do but wait (just before it would jump): the signal a test awaits instead of
sleeping, like Trio's ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, Unpack

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["VirtualClockLoop", "new_virtual_loop", "run_virtual"]

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


def _noop() -> None:
    pass


class _VirtualSelector(selectors.BaseSelector):
    """Delegates to the real selector; only ``select`` is changed."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualClockLoop) -> None:
        self._real = real
        self._loop = loop

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_key(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self._loop
        if timeout is not None and timeout <= 0:
            return self._real.select(timeout)  # callbacks are ready: a plain poll
        if loop._idle_waiters and not loop._real_work:
            # The loop would block or jump: everything is waiting. Waking
            # wait_idle() callers comes first (as in Trio, a task waiting for
            # all others to block counts as runnable, so the clock stays).
            events = self._real.select(0)
            if events:
                return events
            loop._wake_idle_waiters()
            return []
        if timeout is None:
            return self._real.select(None)  # nothing scheduled: block until I/O or a thread
        if not loop.autojump:
            # Time moves only by advance(); it (from another thread) and any
            # I/O wake the real selector.
            return self._real.select(None)
        if loop._real_work:
            # Outside work finishes in real time: wait for real, and let the
            # virtual clock follow, landing exactly on the timer if it is due.
            start = time.monotonic()
            events = self._real.select(timeout)
            waited = time.monotonic() - start
            loop._now += timeout if not events else min(waited, timeout)
            return events
        events = self._real.select(0)
        if events:
            return events
        loop._now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual.

    ``autojump`` (default on): when every task is waiting and no descriptor
    is ready, jump the clock to the next timer. Off: the clock moves only by
    :meth:`advance`. ``start`` is the clock's first reading.
    """

    def __init__(
        self,
        selector: selectors.BaseSelector | None = None,
        *,
        autojump: bool = True,
        start: float = 0.0,
    ) -> None:
        super().__init__(selector)
        self._now = float(start)
        self._autojump = autojump
        # Executor futures and real_time() blocks still running; while any
        # is, the clock follows real time instead of jumping.
        self._real_work = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        # asyncio keeps its selector in the private ``_selector`` and calls
        # only its select/register/modify/unregister/get_key/close: wrapping
        # it is the one hook into the loop's wait that needs no copy of
        # ``_run_once``.
        self._selector: selectors.BaseSelector = _VirtualSelector(self._selector, self)

    def time(self) -> float:
        return self._now

    @property
    def autojump(self) -> bool:
        return self._autojump

    @autojump.setter
    def autojump(self, value: bool) -> None:
        self._autojump = bool(value)
        self._wake()

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward by ``seconds``; timers now due run
        on the loop's next iterations. Callable from any thread."""
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        if self.is_running() and not self._in_loop_thread():
            self.call_soon_threadsafe(self.advance, seconds)
            return
        self._now += seconds

    @contextmanager
    def real_time(self) -> Iterator[None]:
        """Within this block the clock follows real time instead of jumping:
        for waits on work the loop cannot see (a subprocess, another thread,
        a real remote peer)."""
        self._real_work += 1
        try:
            yield
        finally:
            self._real_work -= 1

    async def wait_idle(self) -> None:
        """Return once every other task is blocked: no callback is ready, no
        descriptor is ready and no executor work is pending, just before the
        clock would jump (or the loop would block). The signal for "the
        service has done all it will do for now", in place of a sleep."""
        fut: asyncio.Future[None] = self.create_future()
        self._idle_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._idle_waiters:
                self._idle_waiters.remove(fut)

    def _wake_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def run_in_executor(
        self,
        executor: Executor | None,
        func: Callable[[Unpack[_Ts]], _T],
        *args: *_Ts,
    ) -> asyncio.Future[_T]:
        fut = super().run_in_executor(executor, func, *args)
        self._real_work += 1
        # The future is completed on the loop (from the thread through
        # call_soon_threadsafe), and its callbacks run after that: the count
        # drops only once the result is on the loop, so no jump can slip in
        # between the thread finishing and its result being seen.
        fut.add_done_callback(self._real_work_done)
        return fut

    # Shutting the default executor down joins its threads in another thread
    # (under a 300 s timeout from asyncio.Runner since 3.12): real work too.
    if sys.version_info >= (3, 12):

        async def shutdown_default_executor(self, timeout: float | None = None) -> None:
            with self.real_time():
                await super().shutdown_default_executor(timeout)

    else:

        async def shutdown_default_executor(self) -> None:
            with self.real_time():
                await super().shutdown_default_executor()

    def _real_work_done(self, _fut: asyncio.Future[Any]) -> None:
        self._real_work -= 1

    def _in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self
        except RuntimeError:
            return False

    def _wake(self) -> None:
        # Re-run the loop's wait so a changed autojump setting takes effect
        # even while it blocks on the selector.
        if self.is_running() and not self.is_closed():
            self.call_soon_threadsafe(_noop)


def new_virtual_loop(*, autojump: bool = True, start: float = 0.0) -> VirtualClockLoop:
    """A new :class:`VirtualClockLoop` (not set as the current loop)."""
    return VirtualClockLoop(autojump=autojump, start=start)


def run_virtual(
    coro: Coroutine[Any, Any, _T],
    *,
    autojump: bool = True,
    start: float = 0.0,
    debug: bool | None = None,
) -> _T:
    """Like :func:`asyncio.run`, on a new :class:`VirtualClockLoop`."""
    with asyncio.Runner(
        debug=debug, loop_factory=lambda: new_virtual_loop(autojump=autojump, start=start)
    ) as runner:
        return runner.run(coro)

