"""One service's connection limits shared by its worker processes.

``--instances``, ``--per-source`` and ``--cps`` protect a *service*; with
``--workers N`` every worker accepts on the same sockets, so their counts
must live where every worker sees them. The parent creates a
:class:`SharedLimits` before it forks (a ``memfd`` mapped ``MAP_SHARED``,
inherited by the children); each worker attaches to its slot and admits
and releases through it (``AccessControl`` does, given ``shared=``); the
parent reaps a worker's slot when the worker exits, so that a worker
killed while it held connections leaks nothing.

The contract:

- ``create(capacity=, slots=)`` in the parent before any fork.
  ``capacity``: the most connections one worker holds at once (its
  ``max_connections``); a worker may hold twice that before a connection
  is refused for want of room. ``slots``: worker slot numbers
  0..slots-1 (two generations of N workers overlap during a reload:
  ``2 * N``).
- ``attach(slot)`` in a worker after fork, before its first ``admit``;
  the slot must be free (never attached, or reaped).
- ``set_limits(...)`` in the process that admits (``AccessControl`` does it
  from its policy): the limits are per process, the counts are shared, so a
  new generation after a reload enforces its new limits on counts that
  include the old generation's connections.
- ``admit``/``release`` from one thread per process (the event loop's:
  the lock excludes other processes, not other threads), ``release(host)``
  once per connection ``admit(host)`` counted; ``reap``/``held`` from one
  thread of the parent.
- ``reap(slot)`` in the parent once the worker in ``slot`` has exited
  (after ``waitpid``), before the slot is given to a new worker.
- ``close()`` in the parent when the service is gone.

Mutual exclusion is an ``fcntl`` record lock on the memfd: the kernel drops
it when its process dies, even by SIGKILL, where a semaphore or a
``multiprocessing.Lock`` held by a killed worker would stop every other one
for good (a robust pthread mutex would survive too, but only through
ctypes, for no gain: both cost a system call or two). Record locks belong
to the process, are not inherited across fork, and are released when the
process closes *any* descriptor of the file: nothing here dups the memfd.
A process that finds the lock taken tries again a few times before it
sleeps on it: the lock is held for a few microseconds, and a sleep and a
wake-up cost more (measured: a third of the connections per second).

What the parent needs to reap a slot is kept by the slot itself: its
number of connections and, with a per-source limit, one record per
connection with the packed address (written under the lock with the
service's counts, so the two always agree). A worker killed in the middle
of an update can leave the service's table torn; the others keep working
on it (every probe is bounded, a missing entry is skipped), and ``reap``
sees the slot's ``busy`` mark and rebuilds the service's counts from the
surviving slots' records.

The service's per-source counts are an open-addressing table (linear
probing, backward-shift deletion, so no tombstones accumulate) over the
peer's address packed into 16 bytes: IPv4 as IPv4-mapped IPv6, so
``1.2.3.4`` and ``::ffff:1.2.3.4`` are one source; an IPv6 zone is dropped.
Entries are found with Python's ``hash`` of those bytes: keyed SipHash, so
a client choosing addresses in its /64 cannot aim them at one chain; the
key is inherited across fork and checked in ``attach``. Sizes are fixed:
the table has room for every record of every slot at 3/4 full, and a
worker out of records refuses the connection (``per-source table full``)
rather than count it somewhere unbounded.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from ._access import instances_reason, per_source_reason, rate_reason

# The memory is read as 32-bit words (and the cps bucket as two doubles):
# indexing a memoryview costs half of a struct call.
#
# The header: magic (2 words), hash check (2), the service's connections,
# distinct sources in its table, ..., cps tokens (NaN: full, never used)
# and last refill as doubles 4 and 5.
_MAGIC = b"SWLIMIT3"
_HEADER_WORDS = 16
_W_CHECK = 2
_W_ACTIVE = 4
_W_USED = 5
_D_TOKENS = 4
_D_LAST = 5
# One record per worker slot: its connections, its pid, and "busy" (set
# while it updates shared state: if it dies then, reap rebuilds).
_SLOT_WORDS = 4
_S_PID = 1
_S_BUSY = 2
# A table entry (a source and its count; count 0: free) or a connection
# record (a source and 1; 0: free): 16 bytes of address, count, padding.
_ENTRY_WORDS = 6
_E_COUNT = 4
_FREE = bytes(4 * _ENTRY_WORDS)

_V4_PREFIX = bytes(10) + b"\xff\xff"
# Peers that are not IP addresses but have a name (none today: Unix peers
# have an empty host and are not counted per source) are hashed into the
# discard-only prefix 100::/64 (RFC 6666), where no real peer can be.
_NAME_PREFIX = b"\x01\x00" + bytes(6)
_HASH_PROBE = b"sockworks shared limits"
# Tries of the lock before sleeping on it (each a system call, ~0.3 µs).
_SPIN = 20
_TRY = fcntl.LOCK_EX | fcntl.LOCK_NB


def _check_word(value: int) -> int:
    # The parent's hash of a fixed string, as a word: another process that
    # hashes differently (not forked from it) would find nothing.
    return value & 0xFFFFFFFF


class Layout:
    """Where everything is, in words, in the shared memory of ``slots``
    workers of ``capacity`` connections."""

    __slots__ = ("capacity", "records", "records_at", "size", "slots", "slots_at", "table",
                 "table_at")

    def __init__(self, capacity: int, slots: int) -> None:
        self.capacity = capacity
        self.slots = slots
        # Connection records per slot: twice the connections a worker
        # serves (it may hold a few more while they queue for a place).
        self.records = 2 * capacity
        # The service's table, a power of two at most 3/4 full when every
        # record of every slot is a different source: it is never the one
        # that is full.
        self.table = 4
        while _fill_cap(self.table) < self.records * slots:
            self.table *= 2
        self.slots_at = _HEADER_WORDS
        self.table_at = self.slots_at + slots * _SLOT_WORDS
        self.records_at = self.table_at + self.table * _ENTRY_WORDS
        end = 4 * (self.records_at + slots * self.records * _ENTRY_WORDS)
        # Bytes, in whole pages; pages never written take no memory.
        self.size = -(-end // mmap.PAGESIZE) * mmap.PAGESIZE

    def slot_at(self, slot: int) -> int:
        return self.slots_at + slot * _SLOT_WORDS

    def records_of(self, slot: int) -> int:
        return self.records_at + slot * self.records * _ENTRY_WORDS


def _fill_cap(size: int) -> int:
    # Linear probing stays short below 3/4 full.
    return size * 3 // 4


@dataclass(frozen=True)
class Reaped:
    """What a worker's slot held when the parent reaped it."""

    slot: int
    connections: int
    # Source address (as a string) -> connections from it.
    sources: dict[str, int] = field(default_factory=dict)
    # The worker died in the middle of an update: the service's counts were
    # rebuilt from the other slots' records (exact), and these numbers are
    # what its own record said (may be one off).
    torn: bool = False


class SharedLimits:
    """The cross-process counts of one service (see the module's contract)."""

    def __init__(self, fd: int, layout: Layout) -> None:
        """Use :meth:`create`. ``fd``: a file of ``layout.size`` bytes."""
        self.layout = layout
        self.capacity = layout.capacity
        self.slots = layout.slots
        self._fd = fd
        self._mm = mmap.mmap(fd, layout.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._u = memoryview(self._mm).cast("I")
        self._d = memoryview(self._mm).cast("d")
        self._table = layout.table_at
        self._mask = layout.table - 1
        self._table_cap = _fill_cap(layout.table)
        self._hash = hash
        self._name_key = os.urandom(16)
        # Packed addresses of recent hosts (a release packs what admit did).
        self._keys: dict[str, bytes] = {}
        # This process's slot: its record, its records, the free ones, and
        # which records hold each host's connections.
        self.slot: int | None = None
        self._slot_at = 0
        self._records = 0
        self._free: list[int] = []
        self._held: dict[bytes, list[int]] = {}
        # The limits this process enforces (set_limits).
        self.instances: int | None = None
        self.per_source: int | None = None
        self.cps: float | None = None
        self._burst = 1.0
        self._counting = False

    # -- set-up -------------------------------------------------------------

    @classmethod
    def create(cls, *, capacity: int, slots: int) -> SharedLimits:
        """In the parent, before fork: zeroed shared state for a service
        whose workers hold at most ``capacity`` connections each (twice
        that is refused), in ``slots`` worker slots."""
        if capacity < 1 or slots < 1:
            raise ValueError(f"capacity and slots must be positive ({capacity}, {slots})")
        layout = Layout(capacity, slots)
        fd = _shared_fd()
        try:
            os.ftruncate(fd, layout.size)
            self = cls(fd, layout)
        except BaseException:
            os.close(fd)
            raise
        self._mm[0:8] = _MAGIC
        self._u[_W_CHECK] = _check_word(hash(_HASH_PROBE))
        self._d[_D_TOKENS] = float("nan")
        return self

    def attach(self, slot: int) -> None:
        """In a worker after fork: this process counts as ``slot``."""
        layout = self.layout
        if not 0 <= slot < layout.slots:
            raise ValueError(f"slot {slot} is not in 0..{layout.slots - 1}")
        if self._mm[0:8] != _MAGIC or self._u[_W_CHECK] != _check_word(hash(_HASH_PROBE)):
            raise RuntimeError(
                "shared limits: not the parent's hash key (attach only in a forked child,"
                " never after exec)"
            )
        at = layout.slot_at(slot)
        records = layout.records_of(slot)
        self._lock()
        try:
            if self._u[at] or self._records_held(records):
                raise RuntimeError(f"shared limits: slot {slot} still holds connections: reap it")
            self._u[at + _S_PID] = os.getpid() & 0xFFFFFFFF
        finally:
            self._unlock()
        self.slot = slot
        self._slot_at = at
        self._records = records
        self._free = list(range(layout.records - 1, -1, -1))
        self._held = {}

    def set_limits(
        self, *, instances: int | None, per_source: int | None, cps: float | None
    ) -> None:
        """The limits this process enforces on the shared counts (None: off)."""
        self.instances = instances
        self.per_source = per_source
        self.cps = cps
        self._burst = max(1.0, cps) if cps else 1.0
        self._counting = instances is not None or per_source is not None or cps is not None

    def close(self) -> None:
        """Unmap and close (in the parent once every worker is gone)."""
        self._u.release()
        self._d.release()
        if not self._mm.closed:
            self._mm.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- connections -------------------------------------------------------
    #
    # The hot path, once per connection each: written for speed (locals,
    # the lock and the probe inline).

    def admit(self, host: str, now: float) -> str | None:
        """None: the connection is counted for this process's slot; else
        the reason it is refused (the same texts as ``AccessControl``).
        ``now``: CLOCK_MONOTONIC seconds (``time.monotonic``, the loop's
        time), the same clock in every process; only read with ``cps``."""
        if not self._counting:
            return None
        at = self._slot_at
        if not at:
            raise RuntimeError("shared limits: attach(slot) before admit")
        per_source = self.per_source
        key = None
        i = limit = 0
        # What needs no lock is done before taking it.
        if per_source is not None and host:
            limit = per_source
            if not self._free:
                return f"per-source table full ({self.layout.records} connections in a worker)"
            key = self._keys.get(host) or self._key(host)
            i = self._hash(key) & self._mask
        fd = self._fd
        try:
            fcntl.lockf(fd, _TRY, 1)
        except OSError:
            _wait_for_lock(fd)
        try:
            u = self._u
            active = u[_W_ACTIVE]
            instances = self.instances
            if instances is not None and active >= instances:
                return instances_reason(instances)
            w = count = 0
            if key is not None:
                mm = self._mm
                table, mask = self._table, self._mask
                for _ in range(mask + 1):
                    w = table + i * _ENTRY_WORDS
                    count = u[w + _E_COUNT]
                    if not count or mm[4 * w : 4 * w + 16] == key:
                        break
                    i = (i + 1) & mask
                else:
                    w = -1  # not found and nothing free: only a torn table
                if count >= limit:
                    return per_source_reason(limit)
                if not count and (w < 0 or u[_W_USED] >= self._table_cap):
                    return f"per-source table full ({self._table_cap} sources at once)"
            cps = self.cps
            if cps is not None:
                d = self._d
                tokens = d[_D_TOKENS]
                if tokens != tokens:  # NaN: never used yet, full
                    tokens = self._burst
                    d[_D_LAST] = now
                elif now > d[_D_LAST]:
                    # Only forward: another worker may have read a later
                    # clock before us, and an interval must not refill twice.
                    tokens = min(self._burst, tokens + (now - d[_D_LAST]) * cps)
                    d[_D_LAST] = now
                if tokens < 1.0:
                    d[_D_TOKENS] = tokens
                    return rate_reason(cps)
                d[_D_TOKENS] = tokens - 1.0
            u[at + _S_BUSY] = 1
            if key is not None:
                if count:
                    u[w + _E_COUNT] = count + 1
                else:
                    # The count last: an entry is there once it is not 0.
                    mm[4 * w : 4 * w + 16] = key
                    u[w + _E_COUNT] = 1
                    u[_W_USED] += 1
                record = self._free.pop()
                r = self._records + record * _ENTRY_WORDS
                mm[4 * r : 4 * r + 16] = key
                u[r + _E_COUNT] = 1
                held = self._held.get(key)
                if held is None:
                    self._held[key] = [record]
                else:
                    held.append(record)
            u[_W_ACTIVE] = active + 1
            u[at] += 1
            u[at + _S_BUSY] = 0
            return None
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1)

    def release(self, host: str) -> None:
        """A connection this process admitted ended."""
        if not self._counting:
            return
        at = self._slot_at
        if not at:
            return
        record = -1
        if host and self._held:
            key = self._keys.get(host) or self._key(host)
            held = self._held.get(key)
            if held:
                record = held.pop()
                if not held:
                    del self._held[key]
        fd = self._fd
        try:
            fcntl.lockf(fd, _TRY, 1)
        except OSError:
            _wait_for_lock(fd)
        try:
            u = self._u
            mine = u[at]
            if not mine:
                return  # nothing held: a release too many changes nothing
            u[at + _S_BUSY] = 1
            u[at] = mine - 1
            active = u[_W_ACTIVE]
            if active:
                u[_W_ACTIVE] = active - 1
            if record >= 0:
                mm = self._mm
                r = 4 * (self._records + record * _ENTRY_WORDS)
                key = mm[r : r + 16]
                mm[r : r + 4 * _ENTRY_WORDS] = _FREE
                self._free.append(record)
                # Missing only if a worker died mid-update (reap rebuilds).
                i, count = self._find(key)
                if count:
                    self._decrement(i, count, 1)
            u[at + _S_BUSY] = 0
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1)

    # -- the parent ----------------------------------------------------------

    def reap(self, slot: int) -> Reaped:
        """The worker in ``slot`` has exited: take what it held off the
        service's counts, exactly, and free the slot for a new worker."""
        layout = self.layout
        if not 0 <= slot < layout.slots:
            raise ValueError(f"slot {slot} is not in 0..{layout.slots - 1}")
        u = self._u
        at = layout.slot_at(slot)
        self._lock()
        try:
            active, busy = u[at], u[at + _S_BUSY]
            sources = self._records_held(layout.records_of(slot))
            if not active and not sources and not busy:
                return Reaped(slot, 0)
            self._clear_slot(slot)
            if busy:
                # Torn: count the service again from the slots that
                # finished every update they started.
                self._rebuild()
            else:
                u[_W_ACTIVE] = max(0, u[_W_ACTIVE] - active)
                for key, count in sources.items():
                    i, found = self._find(key)
                    if found:
                        self._decrement(i, found, count)
        finally:
            self._unlock()
        return Reaped(
            slot, active, {unpack_host(k): c for k, c in sources.items()}, torn=bool(busy)
        )

    def count(self, host: str) -> int:
        """The service's connections from ``host`` now (with a per-source
        limit; 0 without one)."""
        key = self._keys.get(host) or self._key(host)
        self._lock()
        try:
            return self._find(key)[1]
        finally:
            self._unlock()

    def held(self, slot: int | None = None) -> tuple[int, dict[str, int]]:
        """(connections, {source: connections}) of the service, or of one
        slot: for logs, metrics and tests."""
        layout = self.layout
        self._lock()
        try:
            if slot is None:
                active = self._u[_W_ACTIVE]
                entries = dict(self._entries(self._table, layout.table))
            else:
                active = self._u[layout.slot_at(slot)]
                entries = self._records_held(layout.records_of(slot))
        finally:
            self._unlock()
        return active, {unpack_host(k): c for k, c in entries.items()}

    # -- the table -------------------------------------------------------------

    def _key(self, host: str) -> bytes:
        keys = self._keys
        if len(keys) >= 4096:
            keys.clear()
        key = keys[host] = pack_host(host, self._name_key)
        return key

    def _find(self, key: bytes) -> tuple[int, int]:
        """(index, count) of ``key`` in the service's table, or (free
        index, 0), or (-1, 0) if no entry is free. Bounded even in a torn
        table."""
        mm, u = self._mm, self._u
        table, mask = self._table, self._mask
        i = self._hash(key) & mask
        for _ in range(mask + 1):
            w = table + i * _ENTRY_WORDS
            count = u[w + _E_COUNT]
            if not count or mm[4 * w : 4 * w + 16] == key:
                return i, count
            i = (i + 1) & mask
        return -1, 0

    def _decrement(self, i: int, count: int, by: int) -> None:
        """Take ``by`` off entry ``i`` (holding ``count``); at zero, delete
        it by shifting back the entries after it that probed past it."""
        mm, u = self._mm, self._u
        table = self._table
        if count > by:
            u[table + i * _ENTRY_WORDS + _E_COUNT] = count - by
            return
        mask = self._mask
        h = self._hash
        size = 4 * _ENTRY_WORDS
        j = i
        for _ in range(mask):
            j = (j + 1) & mask
            at = 4 * (table + j * _ENTRY_WORDS)
            if not u[at // 4 + _E_COUNT]:
                break
            # The entry at j may fill the hole at i unless its home lies
            # cyclically in (i, j]: there it would no longer be found.
            if (h(mm[at : at + 16]) - i - 1) & mask >= (j - i) & mask:
                hole = 4 * (table + i * _ENTRY_WORDS)
                mm[hole : hole + size] = mm[at : at + size]
                i = j
        hole = 4 * (table + i * _ENTRY_WORDS)
        mm[hole : hole + size] = _FREE
        used = u[_W_USED]
        if used:
            u[_W_USED] = used - 1

    def _entries(self, at: int, size: int) -> list[tuple[bytes, int]]:
        """The (key, count) entries in use of a table or records at word ``at``."""
        u, mm = self._u, self._mm
        return [
            (mm[4 * w : 4 * w + 16], u[w + _E_COUNT])
            for w in range(at, at + size * _ENTRY_WORDS, _ENTRY_WORDS)
            if u[w + _E_COUNT]
        ]

    def _records_held(self, at: int) -> Counter[bytes]:
        return Counter(k for k, _ in self._entries(at, self.layout.records))

    def _clear_slot(self, slot: int) -> None:
        layout = self.layout
        start = 4 * layout.records_of(slot)
        end = start + 4 * layout.records * _ENTRY_WORDS
        self._mm[start:end] = bytes(end - start)
        at = layout.slot_at(slot)
        self._u[at : at + _SLOT_WORDS] = memoryview(bytes(4 * _SLOT_WORDS)).cast("I")

    def _rebuild(self) -> None:
        """The service's counts from the slots' records (under the lock)."""
        layout = self.layout
        u, mm = self._u, self._mm
        total = 0
        sources: Counter[bytes] = Counter()
        for slot in range(layout.slots):
            total += u[layout.slot_at(slot)]
            sources.update(self._records_held(layout.records_of(slot)))
        start = 4 * self._table
        mm[start : start + 4 * layout.table * _ENTRY_WORDS] = bytes(4 * layout.table * _ENTRY_WORDS)
        for key, count in sources.items():
            i, _ = self._find(key)
            if i < 0:
                continue  # cannot be: the table has room for every record
            w = self._table + i * _ENTRY_WORDS
            mm[4 * w : 4 * w + 16] = key
            u[w + _E_COUNT] = count
        u[_W_ACTIVE] = total
        u[_W_USED] = len(sources)

    # -- the lock (the parent's side; admit and release inline it) --------------

    def _lock(self) -> None:
        try:
            fcntl.lockf(self._fd, _TRY, 1)
        except OSError:
            _wait_for_lock(self._fd)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1)


def _wait_for_lock(fd: int) -> None:
    """The lock is taken: try again a few times (it is held for a few
    microseconds), then sleep until it is free."""
    for _ in range(_SPIN):
        try:
            fcntl.lockf(fd, _TRY, 1)
            return
        except OSError:
            pass
    fcntl.lockf(fd, fcntl.LOCK_EX, 1)


def _shared_fd() -> int:
    """A file only this process tree can reach, to map and to lock.
    Close-on-exec: an ``exec`` service's programs never see it."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("sockworks-limits", os.MFD_CLOEXEC)
    with tempfile.TemporaryFile() as f:  # not Linux: an unlinked file
        return os.dup(f.fileno())


def pack_host(host: str, name_key: bytes = b"") -> bytes:
    """The 16 bytes a source is counted under: an IPv6 address, IPv4 as
    IPv4-mapped, the zone dropped; anything else hashed into 100::/64."""
    if ":" in host:
        try:
            return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        except OSError:
            pass
    else:
        try:
            return _V4_PREFIX + socket.inet_pton(socket.AF_INET, host)
        except OSError:
            pass
    digest = hashlib.blake2b(host.encode("utf-8", "surrogateescape"), digest_size=8, key=name_key)
    return _NAME_PREFIX + digest.digest()


def unpack_host(key: bytes) -> str:
    """The address ``key`` was packed from (a hashed name as ``name#HEX``)."""
    if key[:12] == _V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, key[12:])
    if key[:8] == _NAME_PREFIX:
        return "name#" + key[8:].hex()
    return socket.inet_ntop(socket.AF_INET6, key)
