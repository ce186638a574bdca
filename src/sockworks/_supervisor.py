"""Worker processes: seed 002's prefork model, supervised.

The parent binds every listener once, then forks workers that all accept
on the shared sockets; each worker is the ordinary single-process
:class:`Server`. The parent serves nothing itself. It

- replaces a worker that dies (logged with its exit status or signal),
  after a back-off that grows while workers keep dying young; a worker
  that dies before it is ready at start fails the whole start instead
  (no crash loop);
- stops on SIGTERM or SIGINT: new connection attempts are dropped at the
  shared sockets, every worker serves what is queued and drains within its
  grace period, and the parent exits once all have;
- reloads on SIGHUP: the configuration is read and checked again; on an
  error the running one stays, with one line saying why; otherwise a new
  generation of workers starts on the same sockets (new listeners bound,
  removed ones closed), and only once all of it is ready do the old
  workers stop accepting and drain. The sockets stay open throughout, so
  under load no connection attempt is refused or reset by a reload.

The supervisor's own loop is a selector over a signal wake-up socket and
one readiness pipe per starting worker: no event loop and no thread in the
parent, so that forking is always safe.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from ._drivers.exec import exit_of
from ._endpoint import Endpoint
from ._errors import SockworksError
from ._logformat import set_worker
from ._pool import Binding, SocketPool
from ._run import new_event_loop, serving_status
from ._server import Server, ServiceConfig
from ._shared_limits import SharedLimits

log = logging.getLogger("sockworks.supervisor")

# A starting worker has this long to report ready (binding is done by the
# parent, so a worker only builds its event loop and starts accepting).
READY_TIMEOUT = 30.0
# Back-off before replacing a worker that died young: doubling from the
# first to the last, reset once a worker has lived STABLE seconds.
BACKOFF_FIRST, BACKOFF_MAX, STABLE = 0.1, 10.0, 10.0
# After the grace period, how long the parent waits for workers to exit
# (they abort what is left themselves) before it kills them.
EXIT_MARGIN = 5.0
# Worker slot numbers per worker asked for: the current generation, one
# draining after a reload, and room for one more reload meanwhile. What a
# worker holds in shared state is found by its slot.
SLOTS_PER_WORKER = 4
# Readiness messages on a worker's pipe: ready; stopped accepting (told
# to stop or drain); or the reason it could not start.
_READY, _STOPPED, _FAILED = b"R", b"S", b"E"


class Notifier(Protocol):
    """The service manager's readiness protocol (sd_notify); see _systemd."""

    def ready(self, status: str | None = None) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...
    @property
    def watchdog_interval(self) -> float | None: ...


class WorkerHooks(Protocol):
    """What else the parent does around its workers (metrics, limits shared
    between them): called in the parent, and in each worker after fork."""

    def before_fork(self, generation: Generation) -> None: ...
    def in_worker(self, generation: Generation, slot: int) -> None: ...
    def worker_exiting(self, generation: Generation, slot: int) -> None: ...
    def worker_exited(self, generation: Generation, slot: int, pid: int) -> None: ...
    def generation_ended(self, generation: Generation) -> None: ...
    def child_exited(self, pid: int) -> None: ...  # a child that is not a worker
    def close(self) -> None: ...


# A configuration as loaded: the services and their grace period.
Loaded = tuple[Sequence[ServiceConfig], float]


@dataclass(eq=False)
class Worker:
    slot: int
    pid: int
    generation: Generation
    ready_fd: int | None
    started: float
    ready: bool = False
    # Cleared when it says it stopped accepting (a reload's old worker).
    accepting: bool = True
    # Why it could not start, as it said on its readiness pipe.
    failure: str | None = None


@dataclass(eq=False)
class Generation:
    """Workers started from one configuration."""

    number: int
    server: Server
    grace: float
    binding: Binding
    workers: dict[int, Worker] = field(default_factory=dict)  # by slot
    # Slots whose worker died, with the time a replacement is due.
    due: dict[int, float] = field(default_factory=dict)
    draining: bool = False
    # A draining generation's workers are killed if still there by then.
    deadline: float | None = None
    # It served once (a start or a reload is over).
    started: bool = False

    @property
    def all_ready(self) -> bool:
        return not self.due and all(w.ready for w in self.workers.values())


class Supervisor:
    """Runs ``count`` workers of the configuration ``load()`` returns, and
    again of a new one at each SIGHUP.

    ``announce(endpoints)`` is called with the ``(service, endpoint)``
    pairs newly listening, once the workers serving them are ready (all of
    them at start). ``after_bind`` runs in the parent once the first
    configuration is bound, before any worker starts (dropping privileges).
    """

    def __init__(
        self,
        load: Callable[[], Loaded],
        count: int,
        *,
        announce: Callable[[list[tuple[str, Endpoint]]], None] = lambda _: None,
        after_bind: Callable[[Server], None] | None = None,
        notifier: Notifier | None = None,
        hooks: Sequence[WorkerHooks] = (),
    ) -> None:
        if count < 1:
            raise SockworksError(f"workers must be 1 or more, not {count}")
        self.load = load
        self.count = count
        self.announce = announce
        self.after_bind = after_bind
        self.notifier = notifier
        self.hooks = tuple(hooks)
        self.pool = SocketPool()
        self.current: Generation | None = None
        self.pending: Generation | None = None  # a reload, starting
        self.old: list[Generation] = []  # draining
        self._numbers = 0
        self._pids: dict[int, Worker] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._stop_deadline: float | None = None
        self._killed = False
        self._reload_asked = False
        self._failure: str | None = None
        self._backoff: dict[int, float] = {}
        self._watchdog_due: float | None = None
        # The old generation of a reload, until it has stopped accepting.
        self._switching: Generation | None = None

    # -- the parent's loop ---------------------------------------------

    def run(self) -> int:
        """Bind, start the workers, supervise until stopped. Returns 0 when
        every worker stopped; raises :class:`SockworksError` when the
        configuration cannot be served or a worker fails at start."""
        services, grace = self.load()
        binding = self.pool.attempt()
        server = Server(services, grace=grace, sockets=binding)
        try:
            server.bind()
            if self.after_bind is not None:
                self.after_bind(server)
        except BaseException:
            self.pool.close()
            raise
        previous = self._install_signals()
        try:
            self.current = self._start_generation(server, grace, binding)
            while not self.current.all_ready:
                self._step()
                if self._failure is not None:
                    raise SockworksError(self._failure)
                if self._stopping:
                    break
            if not self._stopping:
                self.announce(list(server.endpoints))
                self._ready_status()
            while self._pids or not self._stopping:
                self._step()
            return 0
        except BaseException:
            self._kill_everything()
            raise
        finally:
            self._restore_signals(previous)
            self.pool.close()
            for gen in [self.current, self.pending, *self.old]:
                if gen is not None:
                    for hook in self.hooks:
                        hook.generation_ended(gen)

    def _install_signals(self) -> dict[int, Any]:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            previous[sig] = signal.signal(sig, _noop)
        previous[-1] = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        if self.notifier is not None and self.notifier.watchdog_interval:
            self._watchdog_due = time.monotonic()
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _step(self) -> None:
        """Wait for the next event (a signal, a worker's readiness, a timer)
        and handle it."""
        now = time.monotonic()
        events = self._selector.select(self._timeout(now))
        for key, _ in events:
            if key.fileobj is self._wake_r:
                self._on_signals()
            else:
                self._on_ready_pipe(key.data)
        # SIGCHLD may coalesce or arrive before the pipe closes: look anyway.
        self._reap()
        self._timers(time.monotonic())
        if (
            self._reload_asked
            and not self._stopping
            and self.pending is None
            and self.current is not None
            and self.current.all_ready
            and self._started
        ):
            self._reload_asked = False
            self._reload()

    def _timeout(self, now: float) -> float | None:
        deadlines = [t for gen in self._generations() for t in gen.due.values()]
        for gen in self._generations():
            for w in gen.workers.values():
                if not w.ready:
                    deadlines.append(w.started + READY_TIMEOUT)
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        deadlines.extend(g.deadline for g in self.old if g.deadline is not None and g.workers)
        if self._watchdog_due is not None:
            deadlines.append(self._watchdog_due)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _generations(self) -> list[Generation]:
        return [g for g in (self.current, self.pending, *self.old) if g is not None]

    # -- signals ---------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            data = self._wake_r.recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._on_stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                # Done once the workers are up and no other reload is
                # starting (see _step): SIGHUPs meanwhile make one reload.
                self._reload_asked = True

    def _on_stop(self, name: str) -> None:
        if self._stopping:
            log.warning("%s again: the workers abort their connections now", name)
            self._signal_all(signal.SIGTERM)
            return
        self._stopping = True
        workers = len(self._pids)
        log.info("%s received: shutting down %d worker(s)", name, workers)
        if self.notifier is not None:
            self.notifier.stopping()
        # Before any worker stops: new attempts are dropped at the sockets
        # (kept open until every worker is gone), queued ones are served.
        self.pool.stop_accepting()
        self._signal_all(signal.SIGTERM)
        grace = max((g.grace for g in self._generations()), default=0.0)
        self._stop_deadline = time.monotonic() + grace + EXIT_MARGIN
        for gen in self._generations():
            gen.due.clear()

    def _signal_all(self, signum: int) -> None:
        for pid in list(self._pids):
            _kill(pid, signum)

    # -- workers -----------------------------------------------------------

    def _start_generation(self, server: Server, grace: float, binding: Binding) -> Generation:
        self._numbers += 1
        gen = Generation(self._numbers, server, grace, binding)
        for hook in self.hooks:
            hook.before_fork(gen)
        for slot in self._free_slots(self.count):
            self._fork(gen, slot)
        return gen

    def _free_slots(self, count: int) -> list[int]:
        """Slots for a new generation: numbers no running worker holds, so
        that what a worker holds in shared state is found by its slot."""
        taken = {w.slot for w in self._pids.values()}
        taken |= {s for g in self._generations() for s in g.due}
        free = [n for n in range(SLOTS_PER_WORKER * self.count) if n not in taken]
        if len(free) < count:
            raise SockworksError(
                f"{len(taken)} workers of earlier configurations are still running or"
                " draining; reload again once they have finished"
            )
        return free[:count]

    def _fork(self, gen: Generation, slot: int) -> None:
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            self._become_worker(gen, slot, ready_w, parent)
        os.close(ready_w)
        worker = Worker(slot, pid, gen, ready_r, time.monotonic())
        gen.workers[slot] = worker
        self._pids[pid] = worker
        os.set_blocking(ready_r, False)
        self._selector.register(ready_r, selectors.EVENT_READ, worker)
        log.debug("worker %d (pid %d) started", slot, pid)

    def _become_worker(self, gen: Generation, slot: int, ready_w: int, parent: int) -> NoReturn:
        status = 1
        started: list[bool] = []
        try:
            # Nothing of the parent's loop: its signal wake-up, its selector,
            # the other workers' pipes.
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # Ctrl-C reaches the whole process group: the parent decides,
            # and tells the workers with SIGTERM. Reload is the parent's too.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            for other in self._pids.values():
                if other.ready_fd is not None:
                    os.close(other.ready_fd)
            _die_with_parent(parent)
            set_worker(slot)  # the "worker" field of JSON log lines
            for hook in self.hooks:
                hook.in_worker(gen, slot)

            def ready() -> None:
                os.write(ready_w, _READY)
                started.append(True)

            def stopped_accepting() -> None:
                try:
                    os.write(ready_w, _STOPPED)
                except OSError:
                    pass  # the parent is gone (killed): nobody to tell

            status = run_worker(gen.server, ready, stopped_accepting)
            for hook in self.hooks:  # the last counts, before the process goes
                hook.worker_exiting(gen, slot)
        except BaseException as exc:  # whatever it is, never back into the parent's code
            try:
                if not started:  # the parent says it, in one line
                    os.write(ready_w, _FAILED + str(exc).encode(errors="replace")[:400])
                else:
                    log.error("worker %d failed: %s", slot, exc, exc_info=True)
            except BaseException:  # exiting matters more than saying why
                pass
        finally:
            logging.shutdown()
            os._exit(status)

    def _on_ready_pipe(self, worker: Worker) -> None:
        assert worker.ready_fd is not None
        try:
            data = os.read(worker.ready_fd, 512)
        except BlockingIOError:
            return
        if not data:  # EOF: it exited; the reaper tells how
            self._close_ready(worker)
            return
        if data.startswith(_FAILED):  # before it was ready, and last
            worker.failure = data[1:].decode(errors="replace")
            self._close_ready(worker)
            return
        for message in data:
            if message == _READY[0] and not worker.ready:
                worker.ready = True
                log.debug("worker %d (pid %d) ready", worker.slot, worker.pid)
                self._after_ready(worker.generation)
            elif message == _STOPPED[0]:
                worker.accepting = False
                self._switch_settled()

    def _close_ready(self, worker: Worker) -> None:
        if worker.ready_fd is not None:
            self._selector.unregister(worker.ready_fd)
            os.close(worker.ready_fd)
            worker.ready_fd = None

    def _after_ready(self, gen: Generation) -> None:
        if gen is self.pending and gen.all_ready and not self._stopping:
            self._switch_to(gen)

    def _reap(self) -> None:
        while self._pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self._pids.pop(pid, None)
            if worker is None:  # a program a hook started (the metrics server)
                for hook in self.hooks:
                    hook.child_exited(pid)
                continue
            self._worker_exited(worker, status)

    def _worker_exited(self, worker: Worker, status: int) -> None:
        gen = worker.generation
        if worker.ready_fd is not None:  # what it said before it died
            self._on_ready_pipe(worker)
        self._close_ready(worker)
        gen.workers.pop(worker.slot, None)
        for hook in self.hooks:
            hook.worker_exited(gen, worker.slot, worker.pid)
        how = describe_status(status)
        if self._stopping or gen.draining:
            log.debug("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            if gen.draining and not gen.workers:
                self._retire(gen)
            elif gen is self._switching:
                self._switch_settled()
            return
        why = worker.failure
        what = f"worker {worker.slot} (pid {worker.pid}) {how}" + (f": {why}" if why else "")
        if not worker.ready:
            if gen is self.pending:
                self._reload_failed(f"{what} before it was ready")
                return
            if gen is self.current and not self._started:
                self._failure = f"{what} before it was ready; not starting"
                return
        self._replace_later(gen, worker, what)

    @property
    def _started(self) -> bool:
        """The first generation was ready once (the start is over)."""
        return self.current is not None and self.current.started

    def _replace_later(self, gen: Generation, worker: Worker, what: str) -> None:
        lived = time.monotonic() - worker.started
        if lived >= STABLE:
            delay = 0.0
            self._backoff.pop(worker.slot, None)
        else:
            last = self._backoff.get(worker.slot)
            delay = BACKOFF_FIRST if last is None else min(BACKOFF_MAX, 2 * last)
            self._backoff[worker.slot] = delay
        log.error("%s; starting another in %.1f s", what, delay)
        gen.due[worker.slot] = time.monotonic() + delay

    def _timers(self, now: float) -> None:
        for gen in self._generations():
            for slot, when in list(gen.due.items()):
                if when <= now and not self._stopping:
                    del gen.due[slot]
                    self._fork(gen, slot)
            for worker in list(gen.workers.values()):
                if not worker.ready and now - worker.started > READY_TIMEOUT:
                    log.error("worker %d (pid %d) not ready after %.0f s; killing it",
                              worker.slot, worker.pid, READY_TIMEOUT)
                    worker.failure = f"not ready after {READY_TIMEOUT:.0f} s"
                    worker.started = float("inf")  # once
                    _kill(worker.pid, signal.SIGKILL)
        for gen in self.old:
            if gen.deadline is not None and now >= gen.deadline and gen.workers:
                gen.deadline = None  # once
                log.error("%d old worker(s) still running after the grace period; killing them",
                          len(gen.workers))
                for worker in gen.workers.values():
                    _kill(worker.pid, signal.SIGKILL)
        if self._stop_deadline is not None and now >= self._stop_deadline and not self._killed:
            self._killed = True
            log.error("%d worker(s) still running after the grace period; killing them",
                      len(self._pids))
            self._signal_all(signal.SIGKILL)
        if self._watchdog_due is not None and now >= self._watchdog_due:
            assert self.notifier is not None and self.notifier.watchdog_interval
            self.notifier.watchdog()
            self._watchdog_due = now + self.notifier.watchdog_interval

    def _kill_everything(self) -> None:
        """Start failed or the parent is going down abnormally: no worker
        outlives it."""
        self._signal_all(signal.SIGKILL)
        for pid in list(self._pids):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._pids.clear()

    # -- reload ------------------------------------------------------------

    def _reload(self) -> None:
        if self.notifier is not None:
            self.notifier.reloading()
        log.info("SIGHUP received: reloading the configuration")
        try:
            services, grace = self.load()
        except SockworksError as exc:
            self._reload_refused(str(exc))
            return
        except Exception as exc:  # a defect: said in full, and serving goes on
            log.exception("reading the configuration failed")
            self._reload_refused(f"{type(exc).__name__}: {exc}")
            return
        binding = self.pool.attempt()
        server = Server(services, grace=grace, sockets=binding)
        try:
            server.bind()
            self._free_slots(self.count)  # room for the new generation
        except Exception as exc:
            binding.rollback()
            if not isinstance(exc, (SockworksError, OSError)):
                log.exception("binding the new configuration failed")
            self._reload_refused(str(exc))
            return
        self.pending = self._start_generation(server, grace, binding)

    def _reload_refused(self, why: str) -> None:
        log.error("reload failed: %s; still serving the configuration loaded before", why)
        self._ready_status()

    def _reload_failed(self, why: str) -> None:
        gen = self.pending
        assert gen is not None
        self.pending = None
        gen.draining = True
        gen.due.clear()
        for worker in gen.workers.values():
            _kill(worker.pid, signal.SIGTERM)
        gen.deadline = time.monotonic() + gen.grace + EXIT_MARGIN
        self.old.append(gen)
        gen.binding.rollback()
        if not gen.workers:
            self._retire(gen)
        self._reload_refused(why)

    def _switch_to(self, gen: Generation) -> None:
        """The new generation is ready: the old one stops accepting and drains."""
        old = self.current
        assert old is not None
        self.pending = None
        self.current = gen
        old.draining = True
        old.due.clear()
        self.old.append(old)
        # Sockets no longer configured: attempts are dropped from now on;
        # what is queued the old workers still serve before they exit.
        self.pool.stop_accepting(old.binding.not_in(gen.binding))
        for worker in old.workers.values():
            _kill(worker.pid, signal.SIGTERM)
        old.deadline = time.monotonic() + old.grace + EXIT_MARGIN
        added = gen.binding.added(gen.server.endpoints)
        if added:
            self.announce(added)
        self._switching = old
        if not old.workers:
            self._retire(old)
        self._switch_settled()

    def _switch_settled(self) -> None:
        """A reload is done once every old worker has stopped accepting (it
        says so on its pipe) or exited: from then on only the new
        configuration takes connections, and the service manager hears
        READY=1."""
        old = self._switching
        if old is None or any(w.accepting for w in old.workers.values()):
            return
        self._switching = None
        log.info("reloaded: %d new worker(s) serving; the old ones finish their connections",
                 len(self.current.workers) if self.current else 0)
        self._ready_status()

    def _retire(self, gen: Generation) -> None:
        """Every worker of a draining generation has exited."""
        if gen in self.old:
            self.old.remove(gen)
        if gen is self._switching:
            self._switch_settled()
        self.pool.close(gen.binding.not_in(*(g.binding for g in self._generations())))
        for hook in self.hooks:
            hook.generation_ended(gen)

    def _ready_status(self) -> None:
        gen = self.current
        if gen is not None:
            gen.started = True
        if self.notifier is None or gen is None:
            return
        self.notifier.ready(f"{len(gen.workers)} worker(s) {serving_status(gen.server)}")


class SharedConnectionLimits:
    """A service's ``instances``, ``per_source`` and ``cps`` held for the
    service as a whole rather than per worker: one :class:`SharedLimits`
    per service, created in the parent before it forks, each worker
    attached to its slot, a dead worker's counts reaped. It is kept across
    reloads for a service of the same name, so the connections the old
    generation still holds count against the new one's limits."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.by_service: dict[str, SharedLimits] = {}
        self._users: dict[int, set[int]] = {}  # by id: the generations using it

    def before_fork(self, generation: Generation) -> None:
        for config in generation.server.services:
            policy = config.access
            if policy is None or (
                policy.per_source is None and policy.instances is None and policy.cps is None
            ):
                continue
            # What one worker may hold: its connections, and a whole backlog
            # it accepts while it drains.
            capacity = config.limits.max_connections + config.options.backlog
            shared = self.by_service.get(config.name)
            if shared is None or shared.capacity < capacity:
                # New, or too small for the new configuration: counting
                # starts afresh (the old generation keeps its own until it ends).
                shared = SharedLimits.create(capacity=capacity, slots=self.slots)
                self.by_service[config.name] = shared
            generation.server.shared_limits[config.name] = shared
            self._users.setdefault(id(shared), set()).add(generation.number)

    def in_worker(self, generation: Generation, slot: int) -> None:
        for shared in generation.server.shared_limits.values():
            shared.attach(slot)

    def worker_exiting(self, generation: Generation, slot: int) -> None:
        pass  # its connections are gone; the parent reaps the slot

    def worker_exited(self, generation: Generation, slot: int, pid: int) -> None:
        for shared in generation.server.shared_limits.values():
            shared.reap(slot)

    def generation_ended(self, generation: Generation) -> None:
        for name, shared in generation.server.shared_limits.items():
            users = self._users.get(id(shared), set())
            users.discard(generation.number)
            if users:
                continue  # a generation still running counts in it
            self._users.pop(id(shared), None)
            if self.by_service.get(name) is shared:
                del self.by_service[name]
            shared.close()

    def child_exited(self, pid: int) -> None:
        pass

    def close(self) -> None:
        for shared in self.by_service.values():
            shared.close()
        self.by_service.clear()


def run_worker(
    server: Server,
    on_ready: Callable[[], None],
    on_stopped_accepting: Callable[[], None] = lambda: None,
) -> int:
    """A worker's life: a fresh event loop, serve until SIGTERM (a second
    SIGTERM aborts the connections left), then exit status 0."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(server, on_ready, on_stopped_accepting))
    finally:
        loop.close()
    return 0


async def _serve(
    server: Server, on_ready: Callable[[], None], on_stopped_accepting: Callable[[], None]
) -> None:
    loop = asyncio.get_running_loop()
    await server.start()
    on_ready()
    stopping = False

    async def leave() -> None:
        # What is queued now is served here; then the parent hears that
        # only the other workers accept (a reload waits for that).
        try:
            await server.stop_accepting()
            on_stopped_accepting()
        finally:
            server.stop()  # whatever happened above, the worker stops

    def on_term() -> None:
        nonlocal stopping
        if stopping:
            server.abort_connections()
            return
        stopping = True
        leaving.append(loop.create_task(leave()))

    leaving: list[asyncio.Task[None]] = []

    loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        await server.wait_stopped()
        await server.shutdown()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def describe_status(status: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    code, killer = exit_of(status)
    return f"was killed by {killer}" if killer else f"exited with status {code}"


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _noop(signum: int, frame: object) -> None:
    """The wake-up socket carries the signal; the handler itself does nothing."""


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """A worker whose parent is killed outright (SIGKILL, OOM) stops too,
    rather than serve on unsupervised: Linux's parent-death signal."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


