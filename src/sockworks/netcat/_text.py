"""Pure helpers of the netcat tool: no sockets, no clock, no printing.

Port lists for ``--zero``, the ``--hex`` dump, ``--crlf`` translation, the
``--source`` address and the ``--allow``/``--deny`` address matcher are all
plain functions of their input, tested with byte strings alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .._access import AccessPolicy
from .._errors import UsageError


def parse_ports(text: str) -> list[int]:
    """``"20-25,80,7000-7100"`` → the sorted ports, each once.

    Raise :class:`UsageError` naming the bad part.
    """
    ports: set[int] = set()
    if not text.strip():
        raise UsageError("empty port list (expected e.g. 20-25,80)")
    for part in text.split(","):
        part = part.strip()
        low_text, dash, high_text = part.partition("-")
        low = _port(low_text, text)
        high = _port(high_text, text) if dash else low
        if high < low:
            raise UsageError(f"port range {part!r} goes backwards")
        ports.update(range(low, high + 1))
    return sorted(ports)


def _port(text: str, whole: str) -> int:
    text = text.strip()
    if not text.isascii() or not text.isdigit():
        raise UsageError(f"{text!r} in port list {whole!r} is not a port number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise UsageError(f"port {value} in {whole!r} is out of range (1-65535)")
    return value


def split_host_ports(text: str) -> tuple[str, list[int]]:
    """``HOST:PORTS`` or ``[IPV6]:PORTS`` (``tcp:`` prefix allowed) for ``--zero``."""
    rest = text.removeprefix("tcp:")
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1 : close + 2] != ":":
            raise UsageError(f"{text!r}: expected [IPV6]:PORTS")
        host, ports = rest[1:close], rest[close + 2 :]
    else:
        host, sep, ports = rest.rpartition(":")
        if not sep or not host:
            raise UsageError(f"{text!r}: expected HOST:PORTS, e.g. 127.0.0.1:20-25,80")
    return host, parse_ports(ports)


def parse_source(text: str) -> tuple[str, int]:
    """``--source ADDR[:PORT]``: ``127.0.0.1``, ``127.0.0.1:5000``, ``[::1]:5000``, ``::1``."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UsageError(f"--source {text!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"--source {text!r}: expected [ADDR]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""  # an IPv4 address, a name, or bare IPv6
    port = 0
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
            raise UsageError(f"--source {text!r}: {port_text!r} is not a port")
        port = int(port_text)
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
