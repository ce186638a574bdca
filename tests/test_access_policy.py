"""The access policy as plain calls, with a fake clock (sockworks._access)."""

from __future__ import annotations

import re

import pytest

from sockworks import ConfigError
from sockworks._access import (
    AccessControl,
    AccessPolicy,
    LogThrottle,
    TokenBucket,
    default_per_source,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def control(**kw: object) -> tuple[AccessControl, Clock]:
    clock = Clock()
    own = kw.pop("own_ports", ())
    size = kw.pop("max_datagram", None)
    return (
        AccessControl(AccessPolicy(**kw), clock, own_ports=own, max_datagram=size),  # type: ignore[arg-type]
        clock,
    )


# -- allow / deny: the most specific match wins ------------------------------------


def test_no_lists_allows_everyone() -> None:
    p = AccessPolicy()
    assert p.decide("192.0.2.1") is None
    assert p.decide("::1") is None
    assert p.decide("") is None


def test_allow_list_refuses_the_rest() -> None:
    p = AccessPolicy(allow=("127.0.0.0/8", "::1"))
    assert p.decide("127.0.0.5") is None
    assert p.decide("::1") is None
    assert p.decide("192.0.2.1") == "not in the allow list"
    assert p.decide("::2") == "not in the allow list"


def test_deny_list_allows_the_rest() -> None:
    p = AccessPolicy(deny=("10.0.0.0/8",))
    assert p.decide("10.1.2.3") == "denied by 10.0.0.0/8"
    assert p.decide("11.1.2.3") is None


@pytest.mark.parametrize(
    ("allow", "deny", "host", "allowed"),
    [
        # A host allowed inside a denied network.
        (("127.0.0.3",), ("127.0.0.0/8",), "127.0.0.3", True),
        (("127.0.0.3",), ("127.0.0.0/8",), "127.0.0.2", False),
        # A host denied inside an allowed network.
        (("127.0.0.0/8",), ("127.0.0.2/32",), "127.0.0.2", False),
        (("127.0.0.0/8",), ("127.0.0.2/32",), "127.0.0.9", True),
        # Nested three deep: the longest prefix decides, whatever the order.
        (("10.0.0.0/8", "10.1.2.0/24"), ("10.1.0.0/16",), "10.1.2.3", True),
        (("10.0.0.0/8", "10.1.2.0/24"), ("10.1.0.0/16",), "10.1.3.3", False),
        (("10.0.0.0/8", "10.1.2.0/24"), ("10.1.0.0/16",), "10.2.0.1", True),
        # A tie between allow and deny: deny wins.
        (("192.0.2.0/24",), ("192.0.2.0/24",), "192.0.2.1", False),
        # IPv6, and IPv4-mapped IPv6 peers matched as IPv4.
        (("2001:db8::/32",), ("2001:db8:bad::/48",), "2001:db8:bad::1", False),
        (("2001:db8::/32",), ("2001:db8:bad::/48",), "2001:db8:good::1", True),
        (("127.0.0.0/8",), (), "::ffff:127.0.0.1", True),
        ((), ("127.0.0.1",), "::ffff:127.0.0.1", False),
        ((), ("::ffff:127.0.0.0/104",), "127.0.0.1", False),
        # Link-local with a scope id.
        (("fe80::/10",), (), "fe80::1%eth0", True),
        # IPv4 rules never match IPv6 peers and back.
        (("0.0.0.0/0",), (), "::1", False),
        (("::/0",), (), "127.0.0.1", False),
    ],
)
def test_most_specific_match_wins(
    allow: tuple[str, ...], deny: tuple[str, ...], host: str, allowed: bool
) -> None:
    assert (AccessPolicy(allow=allow, deny=deny).decide(host) is None) is allowed


def test_unix_peers_are_not_subject_to_address_lists() -> None:
    assert AccessPolicy(allow=("127.0.0.1",)).decide("") is None


@pytest.mark.parametrize(
    "kw",
    [
        {"allow": ("not-an-address",)},
        {"deny": ("10.0.0.0/33",)},
        {"per_source": 0},
        {"instances": -1},
        {"cps": 0},
        {"udp_rate": float("inf")},
        {"udp_burst": 1.5},
        {"max_amplification": -1},
        {"reply_slack": -1},
        {"drop_source_ports": frozenset({70000})},
        {"per_source": True},
    ],
)
def test_bad_policies(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        AccessPolicy(**kw)  # type: ignore[arg-type]


# -- connection limits -------------------------------------------------------------


def test_per_source_limit_and_release() -> None:
    ac, _ = control(per_source=2)
    assert ac.admit_connection("127.0.0.2") is None
    assert ac.admit_connection("127.0.0.2") is None
    assert ac.admit_connection("127.0.0.2") == "per-source limit (2) reached"
    assert ac.admit_connection("127.0.0.3") is None
    ac.release_connection("127.0.0.2")
    assert ac.admit_connection("127.0.0.2") is None
    for _ in range(3):
        ac.release_connection("127.0.0.2")
    ac.release_connection("127.0.0.3")
    assert ac.per_source == {} and ac.active == 0


def test_unix_peers_are_not_counted_per_source() -> None:
    # A Unix-socket peer has no address: the per-source limit cannot tell
    # one from another, so it does not apply (instances and cps still do).
    ac, _ = control(per_source=1, instances=3)
    assert [ac.admit_connection("") for _ in range(3)] == [None, None, None]
    assert ac.admit_connection("") == "instance limit (3) reached"
    assert ac.per_source == {}
    for _ in range(3):
        ac.release_connection("")
    assert ac.active == 0


@pytest.mark.parametrize(
    ("capacity", "expected"), [(1024, 64), (4096, 64), (256, 64), (100, 25), (8, 2), (2, 1), (1, 1)]
)
def test_default_per_source_is_a_share_no_address_can_exhaust(capacity: int, expected: int) -> None:
    assert default_per_source(capacity) == expected
    assert default_per_source(capacity) < capacity or capacity == 1


def test_instances_limit() -> None:
    ac, _ = control(instances=2)
    assert ac.admit_connection("127.0.0.2") is None
    assert ac.admit_connection("127.0.0.3") is None
    assert ac.admit_connection("127.0.0.4") == "instance limit (2) reached"
    ac.release_connection("127.0.0.3")
    assert ac.admit_connection("127.0.0.4") is None


def test_cps_limit_refills_with_time() -> None:
    ac, clock = control(cps=2)
    assert ac.admit_connection("a") is None
    assert ac.admit_connection("b") is None
    assert ac.admit_connection("c") == "rate limit (2 connections/s) exceeded"
    clock.now += 0.5
    assert ac.admit_connection("c") is None
    assert ac.admit_connection("d") is not None


def test_refused_connections_are_not_counted() -> None:
    ac, _ = control(deny=("127.0.0.2",), instances=1)
    assert ac.admit_connection("127.0.0.2") == "denied by 127.0.0.2/32"
    assert ac.active == 0
    assert ac.admit_connection("127.0.0.3") is None


# -- datagrams -----------------------------------------------------------------------


@pytest.mark.parametrize("port", [7, 13, 17, 19, 37])
def test_datagrams_from_well_known_ports_are_dropped(port: int) -> None:
    ac, _ = control()
    assert "loop prevention" in (ac.admit_datagram("192.0.2.1", port, 10) or "")
    assert ac.admit_datagram("192.0.2.1", port + 1000, 10) is None


def test_datagrams_from_our_own_and_configured_ports_are_dropped() -> None:
    ac, _ = control(own_ports=(7007, 7019), drop_source_ports=frozenset({5353}))
    for port in (7007, 7019, 5353):
        assert ac.admit_datagram("127.0.0.1", port, 1) is not None
    assert ac.admit_datagram("127.0.0.1", 40000, 1) is None


@pytest.mark.parametrize(
    "host", ["255.255.255.255", "224.0.0.1", "239.1.2.3", "ff02::1", "0.0.0.0", "::"]
)
def test_datagrams_from_broadcast_or_multicast_are_dropped(host: str) -> None:
    ac, _ = control()
    assert ac.admit_datagram(host, 40000, 1) == "broadcast/multicast/unspecified source"


def test_oversize_datagrams_are_dropped() -> None:
    ac, _ = control(max_datagram=512)
    assert ac.admit_datagram("127.0.0.1", 40000, 512) is None
    assert "oversize" in (ac.admit_datagram("127.0.0.1", 40000, 513) or "")


def test_per_source_token_bucket() -> None:
    ac, clock = control(udp_rate=10, udp_burst=3)
    results = [ac.admit_datagram("127.0.0.2", 40000, 1) for _ in range(5)]
    assert results[:3] == [None, None, None]
    assert all(r is not None and "datagrams/s" in r for r in results[3:])
    # Another source is not affected by the first one's flood.
    assert ac.admit_datagram("127.0.0.3", 40000, 1) is None
    clock.now += 0.1
    assert ac.admit_datagram("127.0.0.2", 40000, 1) is None
    assert ac.admit_datagram("127.0.0.2", 40000, 1) is not None


def test_token_bucket_table_is_bounded() -> None:
    ac, _ = control(max_sources=100)
    for i in range(1000):
        ac.admit_datagram(f"10.0.{i // 256}.{i % 256}", 40000, 1)
    assert len(ac._udp) == 100


def test_udp_rate_off() -> None:
    ac, _ = control(udp_rate=None, udp_burst=1)
    assert all(ac.admit_datagram("127.0.0.2", 40000, 1) is None for _ in range(1000))


def test_denied_sources_are_dropped_for_datagrams_too() -> None:
    ac, _ = control(deny=("127.0.0.2",))
    assert ac.admit_datagram("127.0.0.2", 40000, 1) == "denied by 127.0.0.2/32"


# -- the amplification guard ---------------------------------------------------------


def test_amplification_guard_default_is_one_to_one() -> None:
    ac, _ = control()
    assert ac.check_reply(100, 100) is None
    assert "amplification" in (ac.check_reply(100, 101) or "")
    assert ac.check_reply(0, 0) is None


def test_amplification_slack_and_factor() -> None:
    ac, _ = control(max_amplification=2.0, reply_slack=27)
    assert ac.check_reply(10, 47) is None
    assert ac.check_reply(10, 48) is not None
    assert AccessPolicy(max_amplification=1.0, reply_slack=4).reply_allowance(0) == 4
    assert AccessPolicy(max_amplification=None).reply_allowance(0) is None


def test_token_bucket_and_log_throttle() -> None:
    b = TokenBucket(rate=1, burst=2, now=0)
    assert [b.take(0), b.take(0), b.take(0)] == [True, True, False]
    assert b.take(1.0)
    clock = Clock()
    throttle = LogThrottle(clock, interval=1.0)
    assert throttle.check("a") == 0
    assert throttle.check("a") is None
    assert throttle.check("a") is None
    assert throttle.check("b") == 0
    clock.now += 1
    assert throttle.check("a") == 2


def test_log_throttle_has_a_global_budget() -> None:
    clock = Clock()
    throttle = LogThrottle(clock, interval=1.0, rate=2)
    logged = [throttle.check(f"10.0.0.{i}") for i in range(10)]
    assert logged[:4] == [0, 0, 0, 0]  # the burst: twice the rate
    assert logged[4:] == [None] * 6
    clock.now += 0.5  # one more line allowed, for a source that was held back
    assert throttle.check("10.0.0.9") == 1
    assert throttle.check("10.0.0.8") is None


class Timers:
    """A stand-in for ``loop.call_later``: the test runs what is due."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[tuple[float, object]] = []

    def __call__(self, delay: float, fn: object) -> None:
        self.pending.append((self.clock.now + delay, fn))

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        due = [fn for at, fn in self.pending if at <= self.clock.now]
        self.pending = [(at, fn) for at, fn in self.pending if at > self.clock.now]
        for fn in due:
            fn()  # type: ignore[operator]


def test_log_throttle_sums_up_what_it_held_back() -> None:
    clock = Clock()
    timers = Timers(clock)
    lines: list[str] = []
    throttle = LogThrottle(clock, later=timers, emit=lambda fmt, *a: lines.append(fmt % a))
    key = ("127.0.0.2", "refused", "per-source limit (2) reached")
    assert throttle.check(key) == 0  # the first is logged by the caller
    assert [throttle.check(key) for _ in range(999)] == [None] * 999
    assert len(timers.pending) == 1  # one timer, however many were held back
    timers.advance(1.0)
    assert lines == [
        "127.0.0.2 refused: per-source limit (2) reached"
        " (and 999 more like it, not logged one by one)"
    ]
    # Once summed up, nothing more is said, and no timer is left behind.
    timers.advance(5.0)
    assert len(lines) == 1 and not timers.pending
    # A flood that goes on: a summary a second, no line per event.
    for _ in range(3):
        for _ in range(100):
            throttle.check(key)
        timers.advance(1.0)
    # The first after the quiet spell is logged by the caller; the rest of
    # each second is one summary line.
    assert len(lines) == 4, lines


def test_log_throttle_summary_of_many_sources_is_bounded() -> None:
    clock = Clock()
    timers = Timers(clock)
    lines: list[str] = []
    throttle = LogThrottle(
        clock, rate=20, max_keys=100, later=timers, emit=lambda fmt, *a: lines.append(fmt % a)
    )
    logged = 0
    for i in range(5000):  # 500 sources, 10 each
        if throttle.check((f"10.0.{i % 500 // 250}.{i % 250}", "refused", "denied")) is not None:
            logged += 1
    timers.advance(1.0)
    timers.advance(1.0)
    assert logged == 40  # the global budget's burst
    assert len(lines) <= 20 + 1, lines  # a second's budget, and one line for the rest
    assert "not logged one by one (over 20 log lines a second)" in lines[-1]
    # Every event is accounted for: logged, summed up per source, or counted
    # in the last line (sources forgotten included).
    counted = logged + sum(int(m.group(1)) for line in lines
                           if (m := re.search(r"\(and (\d+) more like it", line)))
    last = re.match(r"(\d+) more refused", lines[-1])
    assert last is not None
    assert counted + int(last.group(1)) == 5000
