"""One service's connection limits shared by worker processes
(sockworks._shared_limits): the table, the reasons, and real processes
that race, die holding the lock, and die in the middle of an update."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockworks._access import AccessControl, AccessPolicy
from sockworks._shared_limits import (
    _E_COUNT,
    _ENTRY_WORDS,
    _S_BUSY,
    _W_USED,
    SharedLimits,
    pack_host,
    unpack_host,
)

# -- helpers -------------------------------------------------------------------------


def view(shared: SharedLimits) -> SharedLimits:
    """Another process's view of the same memory, without forking: its own
    mapping and process-local state (the lock does not tell them apart,
    which is fine for calls made one after another)."""
    other = SharedLimits(shared._fd, shared.layout)
    other._name_key = shared._name_key
    other._hash = shared._hash
    return other


def drop(v: SharedLimits) -> None:
    """Unmap a view (the descriptor belongs to the original)."""
    v._u.release()
    v._d.release()
    v._mm.close()


@pytest.fixture
def shared() -> Iterator[SharedLimits]:
    s = SharedLimits.create(capacity=8, slots=4)
    yield s
    s.close()


def limited(
    s: SharedLimits,
    slot: int,
    *,
    instances: int | None = None,
    per_source: int | None = None,
    cps: float | None = None,
) -> SharedLimits:
    """A view attached to ``slot`` that enforces these limits."""
    v = view(s)
    v.attach(slot)
    v.set_limits(instances=instances, per_source=per_source, cps=cps)
    return v


def table_problems(s: SharedLimits) -> list[str]:
    """What breaks the table's invariants: an entry that cannot be found
    from its home (an empty entry between), a key twice, a wrong count of
    used entries."""
    u, mm = s._u, s._mm
    size = s.layout.table
    mask = size - 1
    problems = []
    keys: Counter[bytes] = Counter()

    def key_at(i: int) -> bytes:
        w = s._table + i * _ENTRY_WORDS
        return bytes(mm[4 * w : 4 * w + 16])

    def used(i: int) -> bool:
        return bool(u[s._table + i * _ENTRY_WORDS + _E_COUNT])

    for j in range(size):
        if not used(j):
            continue
        key = key_at(j)
        keys[key] += 1
        i = s._hash(key) & mask
        while i != j:
            if not used(i):
                problems.append(f"{unpack_host(key)} at {j} is cut off from its home")
                break
            i = (i + 1) & mask
    problems += [f"{unpack_host(k)} is in the table {n} times" for k, n in keys.items() if n > 1]
    if sum(keys.values()) != u[_W_USED]:
        problems.append(f"{sum(keys.values())} entries used, the header says {u[_W_USED]}")
    return problems


class Children:
    """Forked children of one test: each runs a body and exits (0 if it
    returned, 1 if it raised; never back into pytest). Whatever is still
    running when the test ends is killed, so a failure cannot leave a
    child holding the lock."""

    def __init__(self) -> None:
        self.running: set[int] = set()

    def fork(self, body: Callable[[], object]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body()
                code = 0
            except BaseException:  # whatever it was, the child exits
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        self.running.add(pid)
        return pid

    def wait(self, pid: int, timeout: float = 20.0) -> int:
        """The child's exit status (or -signal); fails instead of hanging."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.running.discard(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"child {pid} did not finish in {timeout} s (deadlocked?)")
            time.sleep(0.01)  # polling an exit, not ordering events

    def kill_the_rest(self) -> None:
        for pid in self.running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.running.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.kill_the_rest()


def read_line(fd: int, timeout: float = 20.0) -> bytes:
    """One line a child wrote to a pipe; fails instead of hanging."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise AssertionError(f"no line from the child in {timeout} s; got {data!r}")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"the child closed the pipe; got {data!r}")
        data += chunk
    return data[:-1]


# -- addresses -------------------------------------------------------------------------


def test_addresses_are_packed_into_16_bytes() -> None:
    v4 = pack_host("192.0.2.1")
    assert len(v4) == 16 and unpack_host(v4) == "192.0.2.1"
    # IPv4-mapped IPv6 is the same source as the IPv4 address.
    assert pack_host("::ffff:192.0.2.1") == v4
    v6 = pack_host("2001:db8::1")
    assert v6 == socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert unpack_host(v6) == "2001:db8::1"
    # A zone is dropped: the address is the source.
    assert pack_host("fe80::1%eth0") == pack_host("fe80::1")
    # A name (no real peer has one) lands in the discard-only 100::/64.
    name = pack_host("a", b"k" * 16)
    assert name[:8] == b"\x01\x00" + bytes(6) and unpack_host(name).startswith("name#")
    assert pack_host("a", b"k" * 16) != pack_host("b", b"k" * 16)
    assert pack_host("a", b"k" * 16) != pack_host("a", b"j" * 16)


def test_the_memory_is_not_inherited_by_programs_a_worker_runs(shared: SharedLimits) -> None:
    # exec services run programs: the memfd is close-on-exec.
    assert not os.get_inheritable(shared._fd)
    assert shared.layout.size % os.sysconf("SC_PAGE_SIZE") == 0


# -- the same answers as one process --------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SCRIPT = [
    ("admit", "127.0.0.2"), ("admit", "127.0.0.2"), ("admit", "127.0.0.2"),
    ("admit", "::ffff:127.0.0.3"), ("admit", ""), ("admit", ""), ("admit", "::1"),
    ("release", "127.0.0.2"), ("admit", "127.0.0.2"), ("tick", ""), ("admit", "127.0.0.4"),
    ("release", ""), ("release", "::1"), ("admit", "127.0.0.5"), ("admit", "127.0.0.5"),
]


@pytest.mark.parametrize(
    "policy",
    [
        AccessPolicy(per_source=2),
        AccessPolicy(instances=4),
        AccessPolicy(cps=3),
        AccessPolicy(per_source=1, instances=5, cps=4),
        AccessPolicy(deny=("127.0.0.4",), per_source=2),
    ],
    ids=["per-source", "instances", "cps", "all", "deny"],
)
def test_shared_counts_refuse_what_one_process_refuses_with_the_same_words(
    shared: SharedLimits, policy: AccessPolicy
) -> None:
    local_clock, shared_clock = FakeClock(), FakeClock()
    local = AccessControl(policy, local_clock)
    shared.attach(0)
    mine = AccessControl(policy, shared_clock, shared=shared)
    for action, host in SCRIPT:
        if action == "tick":
            local_clock.now += 0.5
            shared_clock.now += 0.5
        elif action == "admit":
            assert mine.admit_connection(host) == local.admit_connection(host), host
        else:
            local.release_connection(host)
            mine.release_connection(host)
        assert mine.active == local.active
    # The texts tests and users grep for, all seen above.
    assert mine.admit_connection("127.0.0.5") is not None


def test_every_reason_text(shared: SharedLimits) -> None:
    clock = FakeClock()
    shared.attach(0)
    ac = AccessControl(AccessPolicy(per_source=1, instances=2, cps=2.5), clock, shared=shared)
    assert ac.admit_connection("192.0.2.1") is None
    assert ac.admit_connection("192.0.2.1") == "per-source limit (1) reached"
    assert ac.admit_connection("192.0.2.2") is None
    assert ac.admit_connection("192.0.2.3") == "instance limit (2) reached"
    ac.release_connection("192.0.2.1")
    assert ac.admit_connection("192.0.2.3") == "rate limit (2.5 connections/s) exceeded"


def test_unix_peers_count_for_instances_not_per_source(shared: SharedLimits) -> None:
    shared.attach(0)
    ac = AccessControl(AccessPolicy(per_source=1, instances=3), FakeClock(), shared=shared)
    assert [ac.admit_connection("") for _ in range(3)] == [None, None, None]
    assert ac.admit_connection("") == "instance limit (3) reached"
    assert shared.held() == (3, {})
    for _ in range(4):  # one release too many changes nothing
        ac.release_connection("")
    assert shared.held() == (0, {})


def test_fit_capacity_lowers_the_shared_per_source_limit(shared: SharedLimits) -> None:
    shared.attach(0)
    ac = AccessControl(AccessPolicy(per_source=64), FakeClock(), shared=shared)
    assert ac.fit_capacity(8) == 2
    assert shared.per_source == 2
    assert [ac.admit_connection("10.0.0.1") for _ in range(3)][-1] == "per-source limit (2) reached"


def test_limits_are_per_process_counts_are_shared(shared: SharedLimits) -> None:
    # After a reload the new generation enforces its own limits on counts
    # that include the old generation's connections.
    old = limited(shared, 0, per_source=5)
    new = limited(shared, 4 - 1, per_source=2)
    assert old.admit("10.0.0.1", 0.0) is None
    assert old.admit("10.0.0.1", 0.0) is None
    assert new.admit("10.0.0.1", 0.0) == "per-source limit (2) reached"
    assert old.admit("10.0.0.1", 0.0) is None
    assert shared.count("10.0.0.1") == 3
    drop(old)
    drop(new)


def test_no_limit_counts_nothing(shared: SharedLimits) -> None:
    shared.attach(0)
    ac = AccessControl(AccessPolicy(), FakeClock(), shared=shared)
    assert ac.admit_connection("10.0.0.1") is None
    assert shared.held() == (0, {})


# -- the table -------------------------------------------------------------------------


def test_deleting_with_collisions_keeps_every_entry_findable(shared: SharedLimits) -> None:
    # Every address's home is its last byte mod 4: 10.0.0.{1,5,9} share
    # home 1, 10.0.0.{2,6} are pushed past them, 10.0.0.{3,7,11,15} further.
    shared._hash = lambda key: key[-1] % 4  # type: ignore[method-assign]
    ac = limited(shared, 0, per_source=10)
    hosts = [f"10.0.0.{i}" for i in (1, 5, 9, 2, 6, 3, 7, 11, 15)]
    for host in hosts:
        assert ac.admit(host, 0.0) is None
    assert ac.admit("10.0.0.5", 0.0) is None
    assert not table_problems(shared)
    expected = Counter(hosts) + Counter(["10.0.0.5"])
    for host in ["10.0.0.1", "10.0.0.5", "10.0.0.3", "10.0.0.9", "10.0.0.5", "10.0.0.11"]:
        ac.release(host)
        expected[host] -= 1
        assert not table_problems(shared), host
        assert shared.held()[1] == {h: n for h, n in expected.items() if n}
        for h, n in expected.items():
            assert shared.count(h) == n, h
    drop(ac)


def test_all_in_one_chain_wrapping_around(shared: SharedLimits) -> None:
    mask = shared.layout.table - 1
    # Every key's home is the last entry: each chain wraps to the start.
    shared._hash = lambda key: mask  # type: ignore[method-assign]
    ac = limited(shared, 0, per_source=10)
    hosts = [f"192.0.2.{i}" for i in range(8)]
    for host in hosts:
        assert ac.admit(host, 0.0) is None
    for host in hosts[::3] + hosts[1::3] + hosts[2::3]:
        ac.release(host)
        assert not table_problems(shared)
    assert shared.held() == (0, {})
    drop(ac)


def test_a_worker_out_of_records_refuses_rather_than_counts_unbounded() -> None:
    s = SharedLimits.create(capacity=1, slots=2)
    try:
        ac = limited(s, 0, per_source=10)
        # Two records a worker (twice its capacity); a third connection
        # with an address cannot be reaped if it dies: refused.
        assert ac.admit("10.0.0.1", 0.0) is None
        assert ac.admit("10.0.0.2", 0.0) is None
        assert ac.admit("10.0.0.3", 0.0) == "per-source table full (2 connections in a worker)"
        ac.release("10.0.0.2")
        assert ac.admit("10.0.0.3", 0.0) is None
        drop(ac)
    finally:
        s.close()


def test_slots_are_checked() -> None:
    s = SharedLimits.create(capacity=2, slots=2)
    try:
        with pytest.raises(ValueError):
            s.attach(2)
        with pytest.raises(ValueError):
            s.reap(-1)
        unattached = view(s)
        unattached.set_limits(instances=1, per_source=None, cps=None)
        with pytest.raises(RuntimeError, match="attach"):
            unattached.admit("10.0.0.1", 0.0)
        first = limited(s, 1, instances=5)
        assert first.admit("10.0.0.1", 0.0) is None
        # A slot still holding connections is not given to a new worker.
        with pytest.raises(RuntimeError, match="reap it"):
            view(s).attach(1)
        assert s.reap(1).connections == 1
        view(s).attach(1)
        # Another process that hashes differently (not forked) is refused.
        s._u[2] ^= 1
        with pytest.raises(RuntimeError, match="hash key"):
            view(s).attach(0)
    finally:
        s.close()
    with pytest.raises(ValueError):
        SharedLimits.create(capacity=0, slots=1)


HOSTS = ["10.0.0.1", "::ffff:10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", "", "::1"]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit", "release", "reap"]),
        st.integers(0, 2),
        st.sampled_from(HOSTS),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, buckets=st.integers(1, 4), per_source=st.integers(1, 3),
       instances=st.integers(2, 8))
def test_admit_release_reap_against_a_model(
    ops: list[tuple[str, int, str]], buckets: int, per_source: int, instances: int
) -> None:
    s = SharedLimits.create(capacity=2, slots=3)
    # Few homes: collisions everywhere.
    s._hash = lambda key: hash(key) % buckets  # type: ignore[method-assign]
    views: dict[int, SharedLimits] = {}

    def worker(slot: int) -> SharedLimits:
        if slot not in views:
            views[slot] = limited(s, slot, per_source=per_source, instances=instances)
        return views[slot]

    # The model: what each slot holds.
    holds: dict[int, Counter[str]] = {slot: Counter() for slot in range(3)}
    records = s.layout.records
    try:
        for action, slot, host in ops:
            key = unpack_host(pack_host(host)) if host else ""
            mine = holds[slot]
            if action == "admit":
                total = sum(sum(c.values()) for c in holds.values())
                same = sum(c[key] for c in holds.values()) if key else 0
                keyed = sum(n for h, n in mine.items() if h)
                expected: str | None
                if key and keyed >= records:
                    expected = f"per-source table full ({records} connections in a worker)"
                elif total >= instances:
                    expected = f"instance limit ({instances}) reached"
                elif key and same >= per_source:
                    expected = f"per-source limit ({per_source}) reached"
                else:
                    expected = None
                assert worker(slot).admit(host, 0.0) == expected
                if expected is None:
                    mine[key] += 1
            elif action == "release":
                # Release only what was admitted under that very name.
                if mine[key]:
                    worker(slot).release(host)
                    mine[key] -= 1
            else:
                reaped = s.reap(slot)
                assert reaped.connections == sum(mine.values())
                assert reaped.sources == {h: n for h, n in mine.items() if h and n}
                assert not reaped.torn
                if slot in views:
                    drop(views.pop(slot))
                mine.clear()
            assert not table_problems(s)
            service: Counter[str] = Counter()
            for c in holds.values():
                service.update(c)
            assert s.held() == (
                sum(service.values()), {h: n for h, n in service.items() if h and n}
            )
            for slot_, c in holds.items():
                assert s.held(slot_) == (sum(c.values()), {h: n for h, n in c.items() if h and n})
    finally:
        for v in views.values():
            drop(v)
        s.close()


# -- real processes --------------------------------------------------------------------


def test_per_source_limit_holds_across_racing_processes(children: Children) -> None:
    limit, workers, rounds = 3, 4, 3000
    s = SharedLimits.create(capacity=16, slots=workers)
    go_r, go_w = os.pipe()

    def body(slot: int) -> None:
        s.attach(slot)
        s.set_limits(instances=None, per_source=limit, cps=None)
        os.read(go_r, 1)  # all start together
        held = 0
        for i in range(rounds):
            if s.admit("198.51.100.7", 0.0) is None:
                held += 1
                # Never over the limit, whoever else holds what.
                count = s.count("198.51.100.7")
                assert 1 <= count <= limit, count
            if held and (i % 3 == 0 or held == limit):
                s.release("198.51.100.7")
                held -= 1
        for _ in range(held):
            s.release("198.51.100.7")

    try:
        pids = [children.fork(lambda slot=slot: body(slot)) for slot in range(workers)]
        os.write(go_w, b"g" * workers)
        assert [children.wait(pid) for pid in pids] == [0] * workers
        assert s.held() == (0, {})
        assert not table_problems(s)
    finally:
        os.close(go_r)
        os.close(go_w)
        s.close()


# (clock, connections each of two processes tries, connections admitted in
# all) with --cps 4 (a burst of 4) and --instances 9. The clock is given,
# so the refill is exact.
STEPS = (
    (1000.0, 5, 4),  # the burst
    (1001.0, 1, 2),  # refilled to the burst; each takes one
    (1000.5, 5, 2),  # an older clock: what is left, and no refill
    (1001.0, 5, 0),  # no refill either: the older clock did not move time back
    (1010.0, 5, 1),  # tokens again, but the ninth connection is the last
)


def test_instances_and_cps_hold_across_processes(children: Children) -> None:
    s = SharedLimits.create(capacity=8, slots=3)
    to_children = [os.pipe() for _ in range(2)]
    from_children = os.pipe()

    def body(slot: int) -> None:
        s.attach(slot)
        s.set_limits(instances=9, per_source=None, cps=4)
        for now, tries, _ in STEPS:
            os.read(to_children[slot][0], 1)  # the parent starts each step
            got = sum(s.admit(f"10.0.{slot}.1", now) is None for _ in range(tries))
            os.write(from_children[1], f"{got}\n".encode())

    try:
        pids = [children.fork(lambda slot=slot: body(slot)) for slot in range(2)]
        totals = []
        for _ in STEPS:
            for _, w in to_children:
                os.write(w, b"g")
            totals.append(sum(int(read_line(from_children[0])) for _ in range(2)))
        assert [children.wait(pid) for pid in pids] == [0, 0]
        assert totals == [admitted for _, _, admitted in STEPS]
        assert s.held()[0] == 9
        # Both exited holding their connections: reaping gives them back.
        assert s.reap(0).connections + s.reap(1).connections == 9
        assert s.held() == (0, {})
    finally:
        for r, w in [*to_children, from_children]:
            os.close(r)
            os.close(w)
        s.close()


def test_a_worker_killed_holding_the_lock_stops_nobody_and_is_reaped_exactly(
    children: Children,
) -> None:
    s = SharedLimits.create(capacity=8, slots=4)
    s.set_limits(instances=100, per_source=10, cps=None)
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    go_r, go_w = os.pipe()

    def survivor() -> None:
        s.attach(0)
        os.write(ready_w, b"attached\n")
        os.read(go_r, 1)
        # Waits for the lock until the kernel drops the dead worker's.
        assert s.admit("10.1.1.1", 0.0) is None
        assert s.admit("10.2.2.2", 0.0) is None
        os.write(ready_w, b"admitted\n")

    def victim() -> None:
        s.attach(1)
        for host in ("10.1.1.1", "10.1.1.1", "2001:db8::9", ""):
            assert s.admit(host, 0.0) is None
        s._lock()
        os.write(ready_w, b"locked\n")
        os.read(hold_r, 1)  # never comes: killed here, holding the lock

    try:
        survivor_pid = children.fork(survivor)
        assert read_line(ready_r) == b"attached"
        victim_pid = children.fork(victim)
        assert read_line(ready_r) == b"locked"
        with pytest.raises(OSError):  # held, by the victim
            fcntl.lockf(s._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1)
        os.write(go_w, b"g")
        os.kill(victim_pid, signal.SIGKILL)
        assert children.wait(victim_pid) == -signal.SIGKILL
        assert read_line(ready_r) == b"admitted"
        assert children.wait(survivor_pid) == 0
        assert s.held() == (6, {"10.1.1.1": 3, "2001:db8::9": 1, "10.2.2.2": 1})
        reaped = s.reap(1)
        assert reaped.connections == 4
        assert reaped.sources == {"10.1.1.1": 2, "2001:db8::9": 1}
        assert not reaped.torn
        assert s.held() == (2, {"10.1.1.1": 1, "10.2.2.2": 1})
        assert not table_problems(s)
        # The slot is free for the replacement worker.
        assert s.held(1) == (0, {})
    finally:
        for fd in (ready_r, ready_w, hold_r, hold_w, go_r, go_w):
            os.close(fd)
        s.close()


class _Bomb(list[int]):
    """A free list whose pop kills the process: a worker dies in the middle
    of counting a connection (the service's entry written, its own record
    not yet)."""

    def pop(self, index: int = -1) -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


@pytest.mark.parametrize("during", ["admit", "release"])
def test_a_worker_killed_mid_update_leaves_counts_that_reap_rebuilds(
    during: str, children: Children
) -> None:
    s = SharedLimits.create(capacity=8, slots=4)
    s.set_limits(instances=100, per_source=10, cps=None)
    ready_r, ready_w = os.pipe()

    def victim() -> None:
        s.attach(2)
        assert s.admit("10.9.9.9", 0.0) is None
        assert s.admit("10.8.8.8", 0.0) is None
        if during == "admit":
            s._free = _Bomb(s._free)
            s.admit("10.9.9.9", 0.0)
        else:
            def bomb(i: int, count: int, by: int) -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            s._decrement = bomb  # type: ignore[method-assign]
            s.release("10.8.8.8")

    try:
        survivor = limited(s, 0, instances=100, per_source=10)
        assert survivor.admit("10.9.9.9", 0.0) is None
        pid = children.fork(victim)
        assert children.wait(pid) == -signal.SIGKILL
        # Torn, and still usable: the lock went with the process.
        assert s._u[s.layout.slot_at(2) + _S_BUSY] == 1
        assert survivor.admit("10.7.7.7", 0.0) is None
        survivor.release("10.7.7.7")
        reaped = s.reap(2)
        assert reaped.torn
        # Exactly what the survivor holds, whatever the dead one left.
        assert s.held() == (1, {"10.9.9.9": 1})
        assert not table_problems(s)
        survivor.release("10.9.9.9")
        assert s.held() == (0, {})
        drop(survivor)
    finally:
        os.close(ready_r)
        os.close(ready_w)
        s.close()
