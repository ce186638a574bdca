"""Pure helpers of the netcat tool: no sockets, no clock, no printing.

Port lists for ``--zero``, the ``--hex`` dump, ``--crlf`` translation, the
``--source`` address and the ``--allow``/``--deny`` address matcher are all
plain functions of their input, tested with byte strings alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .._access import AccessPolicy
from .._endpoint import parse_port, partition_host_port, split_host_port
from .._errors import UsageError


def parse_ports(text: str) -> list[int]:
    """``"20-25,80,7000-7100"`` → the sorted ports, each once.

    Raise :class:`UsageError` naming the bad part.
    """
    ports: set[int] = set()
    if not text.strip():
        raise UsageError("empty port list (expected e.g. 20-25,80)")
    subject = f"port list {text!r}"
    for part in text.split(","):
        part = part.strip()
        low_text, dash, high_text = part.partition("-")
        low = parse_port(low_text.strip(), subject=subject)
        high = parse_port(high_text.strip(), subject=subject) if dash else low
        if high < low:
            raise UsageError(f"port range {part!r} goes backwards")
        ports.update(range(low, high + 1))
    return sorted(ports)


def split_host_ports(text: str) -> tuple[str, list[int]]:
    """``HOST:PORTS`` or ``[IPV6]:PORTS`` (``tcp:`` prefix allowed) for ``--zero``."""
    host, ports = partition_host_port(text.removeprefix("tcp:"), port_name="PORTS")
    if not host:
        raise UsageError(f"{text!r} has no host (expected HOST:PORTS, e.g. 127.0.0.1:20-25,80)")
    return host, parse_ports(ports or "")


def parse_source(text: str) -> tuple[str, int]:
    """``--source ADDR[:PORT]``: ``127.0.0.1``, ``127.0.0.1:5000``, ``[::1]:5000``, ``::1``.

    No port, or port 0, lets the kernel choose one.
    """
    return split_host_port(text, default_port=0, zero_ok=True, subject=f"--source {text!r}")


def parse_proxy_source(text: str) -> tuple[str, int]:
    """``--proxy-source HOST:PORT`` (``[IPV6]:PORT``): the client address a
    PROXY header states. An IP literal, never a name: the header carries
    addresses, and a receiver must not have to resolve anything."""
    subject = f"--proxy-source {text!r}"
    host, port = split_host_port(text, zero_ok=True, subject=subject)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{subject}: {host!r} is not an IP address (a PROXY header "
                         "states addresses, not names)") from None
    return host, port


def hexdump(data: bytes | memoryview, offset: int = 0, marker: str = ">") -> str:
    """Hex dump lines for ``data``, each prefixed by ``marker`` (``>`` sent,
    ``<`` received) and the running ``offset`` of that direction::

        > 00000000  68 65 6c 6c 6f 0a                                 |hello.|
    """
    raw = bytes(data)
    lines = []
    for start in range(0, len(raw), 16):
        row = raw[start : start + 16]
        hexes = " ".join(f"{b:02x}" for b in row[:8])
        if len(row) > 8:
            hexes += "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{marker} {offset + start:08x}  {hexes:<49} |{text}|\n")
    return "".join(lines)


class CrlfTranslator:
    """``--crlf``: every LF not already preceded by CR becomes CRLF.

    Stateful across chunks, so a CR at the end of one read and the LF at the
    start of the next are left alone.
    """

    __slots__ = ("_last_cr",)

    def __init__(self) -> None:
        self._last_cr = False

    def feed(self, data: bytes | memoryview) -> bytes:
        raw = bytes(data)
        if not raw:
            return raw
        out = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if raw.startswith(b"\n") and self._last_cr:
            out = out[1:]  # the CR was already sent with the previous chunk
        self._last_cr = raw.endswith(b"\r")
        return out


@dataclass(frozen=True, slots=True)
class AddressFilter:
    """``--allow``/``--deny``: addresses or CIDR networks, decided by the
    server's access-control rule (``docs/classic.md``, ``_access.py``): of
    the allow and deny networks containing the peer, the one with the
    longest prefix decides, deny winning a tie; a peer matching nothing is
    allowed when there are no allow rules and refused when there are.
    IPv4-mapped IPv6 peers match as IPv4; Unix peers are always allowed.
    """

    policy: AccessPolicy = field(default_factory=AccessPolicy)

    @classmethod
    def parse(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AddressFilter:
        """Raise :class:`UsageError` (a ConfigError) naming a bad rule."""
        return cls(AccessPolicy(allow=tuple(allow), deny=tuple(deny)))

    def __bool__(self) -> bool:
        return bool(self.policy.allow or self.policy.deny)

    def permits(self, host: str) -> bool:
        return self.policy.decide(host) is None
