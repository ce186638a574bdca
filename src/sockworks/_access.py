"""Access control and abuse protection, written once for every service.

Pure policy: no sockets, no event loop, and the clock is passed in, so that
every rule is tested with plain calls. The server core asks an
:class:`AccessControl` before it starts a connection (after ``accept``) and
before it hands a datagram to a service, and releases a connection when it
ends.

The allow/deny rule (documented in ``docs/classic.md``): of all the
``allow`` and ``deny`` networks that contain the peer's address, the one
with the longest prefix decides; if an allow and a deny network are equally
specific, deny wins. An address that matches nothing is allowed when the
``allow`` list is empty and refused when it is not. IPv4-mapped IPv6
addresses (``::ffff:192.0.2.1``) are matched as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ._errors import ConfigError

Clock = Callable[[], float]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The well-known ports of the classic UDP services that answer (echo,
# daytime, qotd, chargen, time). A datagram *from* one of them is another
# server's answer, never a request: answering it is how two services are
# made to talk to each other forever (CERT CA-1996-01).
WELL_KNOWN_UDP_PORTS: frozenset[int] = frozenset({7, 13, 17, 19, 37})


def parse_network(text: str) -> Network:
    """An address or CIDR network (``10.0.0.0/8``, ``::1``, ``2001:db8::/32``)."""
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not an address or network")
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{text!r} is not an IPv4/IPv6 address or CIDR network") from None
    if (
        isinstance(net, ipaddress.IPv6Network)
        and net.network_address.ipv4_mapped is not None
        and net.prefixlen >= 96
    ):
        mapped = net.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


def parse_address(host: str) -> Address | None:
    """The peer's address, IPv4-mapped IPv6 unwrapped; None if not an IP."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


# The per-source limit the CLI and config files apply when none is given:
# a quarter of the connections a service serves at once, at most 64 (so 64
# of the default 1024). One address can then never hold every slot: it
# takes at least four (sixteen, at the defaults) to fill a service, while a
# person or a script is never near 64 at once (a browser opens 6 per host).
# Behind a load balancer or NAT every client shares one address: there,
# turn it off (0) or raise it.
PER_SOURCE_CAP = 64


def default_per_source(capacity: int) -> int:
    """The default per-source limit for a service that serves ``capacity``
    connections at once (its ``max_connections``, or fewer threads)."""
    return max(1, min(PER_SOURCE_CAP, capacity // 4))


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may use a service and how much. ``None`` turns a limit off.

    The UDP guard is on by default: a reply may be at most
    ``max_amplification`` x the request plus ``reply_slack`` bytes (the
    fixed size a service declares it needs, such as time's 4 bytes), each
    source gets ``udp_rate`` datagrams a second (bursts of ``udp_burst``),
    and datagrams from the classic services' ports, the server's own UDP
    ports and broadcast/multicast sources are dropped.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    # Concurrent connections from one address (xinetd's per_source). None
    # here (the Python API); the CLI and config files default to
    # default_per_source(max_connections).
    per_source: int | None = None
    # Concurrent connections to the service in all (xinetd's instances);
    # over it a connection is refused, where max_connections only queues.
    instances: int | None = None
    # New connections per second to the service (xinetd's cps), with a
    # burst of one second's worth.
    cps: float | None = None
    # A reply at most this many times the request (UDP). 1.0: a spoofed
    # request never makes us send more bytes than the attacker sent.
    max_amplification: float | None = 1.0
    # Bytes a reply may exceed the amplification cap by: declared by the
    # service for its fixed-size answer (time 4, daytime 64, timestamp 27).
    reply_slack: int = 0
    # Datagrams answered per second per source, and the burst allowed: a
    # person or a script never needs more; a flood from one address is cut
    # to this and cannot starve the others.
    udp_rate: float | None = 50.0
    udp_burst: int = 100
    # Source ports whose datagrams are dropped, on top of the well-known
    # ones and the server's own UDP ports.
    drop_source_ports: frozenset[int] = frozenset()
    # Datagrams "from" broadcast or multicast addresses are always forged.
    drop_broadcast: bool = True
    # Sources remembered for the per-source counters: memory stays bounded
    # under a flood of spoofed addresses (the least recently seen go first).
    max_sources: int = 65536
    _allow: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    _deny: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", tuple(parse_network(n) for n in self.allow))
        object.__setattr__(self, "_deny", tuple(parse_network(n) for n in self.deny))
        for name in ("per_source", "instances", "udp_burst", "max_sources"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigError(f"{name} must be a positive whole number, not {value!r}")
        for name in ("cps", "udp_rate"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        amp = self.max_amplification
        if amp is not None and (not _is_number(amp) or not 0 <= amp < float("inf")):
            raise ConfigError(f"max_amplification must be zero or more, not {amp!r}")
        if not _is_int(self.reply_slack) or self.reply_slack < 0:
            raise ConfigError(f"reply_slack must be zero or more bytes, not {self.reply_slack!r}")
        for port in self.drop_source_ports:
            if not _is_int(port) or not 0 < port < 65536:
                raise ConfigError(f"drop_source_ports: {port!r} is not a port number")

    def decide(self, host: str) -> str | None:
        """None if ``host`` passes allow/deny, else the reason it does not."""
        if not self._allow and not self._deny:
            return None
        addr = parse_address(host)
        if addr is None:
            return None  # not an IP peer (Unix socket): allow/deny do not apply
        best: Network | None = None
        best_allows = False
        for allows, nets in ((True, self._allow), (False, self._deny)):
            for net in nets:
                if addr.version != net.version or addr not in net:
                    continue
                if best is None or net.prefixlen > best.prefixlen or (
                    net.prefixlen == best.prefixlen and not allows
                ):
                    best, best_allows = net, allows
        if best is None:
            return "not in the allow list" if self._allow else None
        return None if best_allows else f"denied by {best}"

    def reply_allowance(self, request_size: int) -> int | None:
        """The largest reply allowed to a datagram of ``request_size`` bytes."""
        if self.max_amplification is None:
            return None
        return int(self.max_amplification * request_size) + self.reply_slack


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Why a connection is refused: tests and users grep these texts, and the
# shared counts (with workers) give the same ones.
def instances_reason(instances: int) -> str:
    return f"instance limit ({instances}) reached"


def per_source_reason(limit: int) -> str:
    return f"per-source limit ({limit}) reached"


def rate_reason(cps: float) -> str:
    return f"rate limit ({cps:g} connections/s) exceeded"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> bool:
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SharedCounts(Protocol):
    """A service's connection counts shared by its worker processes
    (``sockworks._shared_limits.SharedLimits``, which builds on this
    module: hence a protocol here, not an import)."""

    def set_limits(
        self, *, instances: int | None, per_source: int | None, cps: float | None
    ) -> None: ...
    def admit(self, host: str, now: float) -> str | None: ...
    def release(self, host: str) -> None: ...


class AccessControl:
    """One service's policy at run time: its counters and buckets.

    ``own_ports`` are the UDP ports this server listens on (a datagram from
    one of them is another service's reply); ``max_datagram`` the largest
    datagram accepted.

    ``shared``: with worker processes, the service's counts shared by all of
    them (sockworks._shared_limits, attached to this worker's slot): the
    instances, per-source and cps limits then hold for the service as a
    whole. Allow/deny and the UDP rules stay per process (a source's UDP
    rate is per worker). :attr:`active` still counts this process's
    connections; :attr:`per_source` stays empty.
    """

    def __init__(
        self,
        policy: AccessPolicy,
        clock: Clock,
        *,
        own_ports: Iterable[int] = (),
        max_datagram: int | None = None,
        shared: SharedCounts | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.max_datagram = max_datagram
        self.drop_ports = WELL_KNOWN_UDP_PORTS | policy.drop_source_ports | frozenset(own_ports)
        self.active = 0
        self.per_source: dict[str, int] = {}
        # The policy's per-source limit, unless fit_capacity lowered it.
        self.per_source_limit = policy.per_source
        self._cps = (
            TokenBucket(policy.cps, max(1.0, policy.cps), clock()) if policy.cps else None
        )
        self._udp: OrderedDict[str, TokenBucket] = OrderedDict()
        self._source_verdicts: dict[str, str | None] = {}
        # Whether replies are size-checked at all (the amplification guard).
        self.reply_limited = policy.max_amplification is not None
        self.shared = shared
        if shared is not None:
            shared.set_limits(
                instances=policy.instances, per_source=self.per_source_limit, cps=policy.cps
            )
            # The clock is read only for cps.
            self._shared_cps = policy.cps is not None

    # -- connections ----------------------------------------------------

    def admit_connection(self, host: str) -> str | None:
        """None and the connection is counted, or the reason it is refused."""
        p = self.policy
        refused = p.decide(host)
        if refused is not None:
            return refused
        shared = self.shared
        if shared is not None:
            refused = shared.admit(host, self.clock() if self._shared_cps else 0.0)
            if refused is None:
                self.active += 1
            return refused
        if p.instances is not None and self.active >= p.instances:
            return instances_reason(p.instances)
        count = self.per_source.get(host, 0)
        limit = self.per_source_limit
        if limit is not None and host and count >= limit:
            return per_source_reason(limit)
        if self._cps is not None and not self._cps.take(self.clock()):
            return rate_reason(self._cps.rate)
        self.active += 1
        if host:
            self.per_source[host] = count + 1
        return None

    def fit_capacity(self, capacity: int) -> int | None:
        """The service can hold only ``capacity`` connections (fewer than
        configured: the descriptor limit). A per-source limit that no
        longer keeps one address from taking them all is lowered to the
        default share; returns the new limit if it changed."""
        limit = self.per_source_limit
        if limit is None or limit < capacity or capacity <= 1:
            return None
        self.per_source_limit = default_per_source(capacity)
        if self.shared is not None:
            self.shared.set_limits(
                instances=self.policy.instances,
                per_source=self.per_source_limit,
                cps=self.policy.cps,
            )
        return self.per_source_limit

    def release_connection(self, host: str) -> None:
        """A connection admitted by :meth:`admit_connection` ended."""
        self.active = max(0, self.active - 1)
        if self.shared is not None:
            self.shared.release(host)
            return
        count = self.per_source.get(host)
        if count is None:
            return
        if count <= 1:
            del self.per_source[host]
        else:
            self.per_source[host] = count - 1

    # -- datagrams ---------------------------------------------------------

    def admit_datagram(self, host: str, port: int, size: int) -> str | None:
        """None if the datagram may be served, else why it is dropped."""
        p = self.policy
        if self.max_datagram is not None and size > self.max_datagram:
            return f"oversize datagram ({size} B > {self.max_datagram} B)"
        if host and port in self.drop_ports:
            return f"source port {port} is a service port (loop prevention)"
        # What depends on the address alone (allow/deny, forged broadcast
        # sources) is decided once per source and remembered: parsing an
        # address costs more than answering an echo.
        verdicts = self._source_verdicts
        try:
            refused = verdicts[host]
        except KeyError:
            refused = self._source_verdict(host)
            if len(verdicts) >= p.max_sources:
                verdicts.clear()
            verdicts[host] = refused
        if refused is not None:
            return refused
        if p.udp_rate is not None and host:
            now = self.clock()
            bucket = self._udp.get(host)
            if bucket is None:
                if len(self._udp) >= p.max_sources:
                    self._udp.popitem(last=False)
                bucket = self._udp[host] = TokenBucket(p.udp_rate, p.udp_burst, now)
            else:
                self._udp.move_to_end(host)
            if not bucket.take(now):
                return f"source over {p.udp_rate:g} datagrams/s"
        return None

    def _source_verdict(self, host: str) -> str | None:
        p = self.policy
        if host and p.drop_broadcast:
            addr = parse_address(host)
            if addr is not None and (
                addr.is_multicast
                or addr.is_unspecified
                or addr == ipaddress.IPv4Address("255.255.255.255")
            ):
                return "broadcast/multicast/unspecified source"
        return p.decide(host)

    def check_reply(self, request_size: int, reply_size: int) -> str | None:
        """None if the reply may go out, else why it is dropped."""
        allowance = self.policy.reply_allowance(request_size)
        if allowance is not None and reply_size > allowance:
            return (
                f"reply of {reply_size} B to a {request_size} B request exceeds"
                f" the amplification limit ({allowance} B)"
            )
        return None


class LogThrottle:
    """At most one line per key and ``interval``, and ``rate`` lines a
    second in all: a flood of refused connections or dropped datagrams,
    even from many (forged) addresses, costs a few lines a second, each
    with the count of the similar ones not logged.

    Keys are ``(source, event, reason)``, such as ``("127.0.0.2",
    "refused", "denied by 127.0.0.2/32")``. Given ``later`` (the loop's
    ``call_later``) and ``emit`` (a logger method), what was held back is
    also summed up once the interval is over, even if the flood has
    stopped: ``127.0.0.2 refused: denied by 127.0.0.2/32 (and 999 more like
    it, not logged one by one)``. Without them the count is only added to
    the next line for that key.
    """

    def __init__(
        self,
        clock: Clock,
        interval: float = 1.0,
        max_keys: int = 1024,
        rate: float = 20.0,
        *,
        later: Callable[[float, Callable[[], None]], object] | None = None,
        emit: Callable[..., None] | None = None,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.max_keys = max_keys
        self.rate = rate
        self._seen: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()
        self._budget = TokenBucket(rate, 2 * rate, clock())
        self._later = later if emit is not None else None
        self._emit = emit
        self._flush_due = False
        # Counts of keys forgotten (over max_keys) before they were summed up.
        self._lost = 0
        self._lost_keys = 0

    def check(self, key: Hashable) -> int | None:
        """The number suppressed since the last line if one may be logged now."""
        now = self.clock()
        entry = self._seen.get(key)
        due = entry is None or now - entry[0] >= self.interval
        if due and self._budget.take(now):
            suppressed = entry[1] if entry else 0
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            if len(self._seen) > self.max_keys:
                self._forget_oldest()
            return suppressed
        if entry is None:  # over the global budget: remembered, logged later
            entry = (now - self.interval, 0)
            if len(self._seen) >= self.max_keys:
                self._forget_oldest()
        self._seen[key] = (entry[0], entry[1] + 1)
        if self._later is not None and not self._flush_due:
            self._flush_due = True
            self._later(self.interval, self.flush)
        return None

    def _forget_oldest(self) -> None:
        _, (_, count) = self._seen.popitem(last=False)
        if count:
            self._lost += count
            self._lost_keys += 1

    def flush(self, *, everything: bool = False) -> None:
        """Sum up what was held back for every key whose interval is over
        (one line each, within the global budget; the rest in one line), and
        come back later for the others. ``everything``: every key now (the
        server is stopping: nothing held back goes unsaid)."""
        self._flush_due = False
        emit = self._emit
        if emit is None:
            return
        now = self.clock()
        waiting = False
        over, over_keys = self._lost, self._lost_keys
        self._lost = self._lost_keys = 0
        seen = self._seen
        for key, (last, count) in list(seen.items()):
            if not count:
                continue
            if now - last < self.interval and not everything:
                waiting = True
                continue
            seen[key] = (now, 0)
            if not self._budget.take(now):
                over += count
                over_keys += 1
            elif isinstance(key, tuple) and len(key) == 3:  # (source, event, reason)
                emit("%s %s: %s (and %d more like it, not logged one by one)", *key, count)
            else:
                emit("%s (and %d more like it, not logged one by one)", key, count)
        if over:
            # One line whatever the budget: what is not logged is still counted.
            emit("%d more refused connections or dropped datagrams from %d sources, not"
                 " logged one by one (over %g log lines a second)", over, over_keys, self.rate)
        if waiting and self._later is not None:
            self._flush_due = True
            self._later(self.interval, self.flush)
