"""The PROXY protocol (HAProxy's ``doc/proxy-protocol.txt``, versions 1 and 2), sans-I/O.

A load balancer that relays a TCP connection prepends a header that says
who the client really was. :class:`ProxyHeaderParser` reads that header from
the first bytes of a connection, fed in any chunks; :func:`encode_v1` and
:func:`encode_v2` write one (``sockworks connect --send-proxy``)::

    parser = ProxyHeaderParser(accept="any")
    info = parser.feed(first_bytes)        # None: feed more; raises ProxyHeaderError
    if info is not None:
        client = info.source or real_peer  # LOCAL/UNKNOWN: the real addresses
        application_bytes = parser.rest

No socket, event loop or clock is touched here: the header timeout belongs
to the driver. The parser decides at the first byte that proves a header
bad, and never holds more than the header itself (107 bytes for v1, 16 +
65535 for v2); the bytes after the header are left in ``rest``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from ._errors import LocalProtocolError, RemoteProtocolError
from ._protocol import Peer

__all__ = [
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeaderError",
    "ProxyHeaderParser",
    "ProxyInfo",
    "ProxySSL",
    "crc32c",
    "encode_v1",
    "encode_v2",
]

# The registered TLV types (section 2.2 of the spec).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest v1 line the spec allows, CRLF included ("PROXY UNKNOWN" with
# two full IPv6 addresses and ports): a line without CRLF by then is bad.
V1_MAX_LENGTH = 107
_V1_PREFIX = b"PROXY "
_V1_FAMILIES = (b"TCP4", b"TCP6", b"UNKNOWN")
_V2_FIXED = 16  # signature, version/command, family, length
_V2_MAX = _V2_FIXED + 0xFFFF
_UNIX_PATH = 108  # sizeof(sun_path) on Linux: each v2 AF_UNIX address
_UNIQUE_ID_MAX = 128

# v2 address families: (name, bytes of the address block).
_FAMILIES = {0x0: ("UNSPEC", 0), 0x1: ("TCP4", 12), 0x2: ("TCP6", 36), 0x3: ("UNIX", 216)}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}

_V4_CHARS = frozenset(b"0123456789. ")
_V6_CHARS = frozenset(b"0123456789abcdefABCDEF:. ")


class ProxyHeaderError(RemoteProtocolError):
    """The peer sent a PROXY header that is not valid; ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"bad PROXY header: {reason}")


@dataclass(frozen=True, slots=True)
class ProxySSL:
    """The ``PP2_TYPE_SSL`` TLV: how the client spoke TLS to the proxy."""

    client: int  # bit field: 0x01 TLS, 0x02 a certificate on this connection, 0x04 in the session
    verify: int  # 0: the client's certificate was verified
    version: str | None = None  # "TLSv1.3"
    cn: str | None = None  # the client certificate's Common Name
    cipher: str | None = None
    sig_alg: str | None = None  # of the proxy's own certificate ("RSA-SHA256")
    key_alg: str | None = None  # of the proxy's own certificate ("RSA2048")
    tlvs: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def client_ssl(self) -> bool:
        return bool(self.client & 0x01)

    @property
    def client_cert_conn(self) -> bool:
        return bool(self.client & 0x02)

    @property
    def client_cert_sess(self) -> bool:
        return bool(self.client & 0x04)

    @property
    def verified(self) -> bool:
        """The client presented a certificate and the proxy verified it."""
        return self.verify == 0 and bool(self.client & 0x06)


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What a PROXY header said.

    ``family`` names the address family as v1 does: ``TCP4`` (IPv4),
    ``TCP6`` (IPv6), ``UNIX`` or ``UNSPEC``; ``transport`` is ``STREAM``,
    ``DGRAM`` or ``UNSPEC`` (a v2 header can relay UDP: family ``TCP4``,
    transport ``DGRAM``). ``source`` (the client) and ``destination`` are
    None when the receiver must use the real connection's addresses: a
    v2 ``LOCAL`` command (a proxy's health check), v1 ``UNKNOWN``, or the
    ``UNSPEC`` family.
    """

    version: int
    command: str  # "PROXY" or "LOCAL" (v1 UNKNOWN is "LOCAL")
    family: str
    source: Peer | None
    destination: Peer | None
    # Every TLV by type, raw (the first of each type when one repeats); v2 only.
    tlvs: Mapping[int, bytes] = field(default_factory=lambda: MappingProxyType({}))
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: ProxySSL | None = None
    transport: str = "STREAM"


# --------------------------------------------------------------------------
# CRC32C (Castagnoli, RFC 4960 appendix B): reflected polynomial 0x82F63B78.


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The CRC32C of ``data``; pass a previous result as ``crc`` to continue it."""
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --------------------------------------------------------------------------
# the parser


class ProxyHeaderParser:
    """Reads one PROXY header from the start of a connection.

    ``accept`` is ``"v1"``, ``"v2"`` or ``"any"``; ``max_v2_length`` bounds
    a v2 header, its 16 fixed bytes included (the default is the most the
    16-bit length field can say). :meth:`feed` returns None until the header
    is complete, then the :class:`ProxyInfo`; ``rest`` then holds what the
    peer sent after the header. A bad header raises :class:`ProxyHeaderError`
    as soon as a byte proves it bad, and again on any later :meth:`feed`.
    """

    __slots__ = ("_buf", "_error", "_total", "_version", "accept", "info", "max_v2_length",
                 "rest")

    def __init__(self, accept: str = "any", max_v2_length: int = _V2_MAX) -> None:
        if accept not in ("v1", "v2", "any"):
            raise ValueError(f"accept must be 'v1', 'v2' or 'any', not {accept!r}")
        if not _V2_FIXED <= max_v2_length <= _V2_MAX:
            raise ValueError(f"max_v2_length must be within {_V2_FIXED}..{_V2_MAX}")
        self.accept = accept
        self.max_v2_length = max_v2_length
        self.info: ProxyInfo | None = None
        self.rest = b""
        self._buf = bytearray()
        self._version = 0  # 0 until the first byte decides
        self._total = 0  # a v2 header's full length, once its length field is in
        self._error: ProxyHeaderError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished header held (never over the bounds above)."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyInfo | None:
        if self._error is not None:
            raise self._error
        if self.info is not None:
            raise LocalProtocolError("the PROXY header is already complete: read .rest")
        try:
            info = self._feed(data)
        except ProxyHeaderError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if info is not None:
            self.info = info
            self._buf = bytearray()
        return info

    def _feed(self, data: bytes) -> ProxyInfo | None:
        if not data:
            return None
        if self._version == 0:
            self._version = self._choose(data)
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    def _choose(self, data: bytes) -> int:
        # The first byte decides: 'P' can only start v1, CR only v2.
        first = data[0]
        if first == _V1_PREFIX[0] and self.accept != "v2":
            return 1
        if first == V2_SIGNATURE[0] and self.accept != "v1":
            return 2
        expected = {"v1": "'PROXY ' (v1)", "v2": "the v2 signature",
                    "any": "'PROXY ' (v1) or the v2 signature"}[self.accept]
        raise ProxyHeaderError(f"the connection starts with {data[:8]!r}, not {expected}")

    # -- version 1 ---------------------------------------------------------

    def _feed_v1(self, data: bytes) -> ProxyInfo | None:
        buf = self._buf
        chunk = data[: V1_MAX_LENGTH - len(buf)]
        lf = chunk.find(b"\n")
        if lf >= 0:
            chunk = chunk[: lf + 1]
        start = len(buf)
        buf += chunk
        _check_v1_prefix(buf, start)
        if lf >= 0:
            info = _parse_v1(bytes(buf))
            self.rest = data[len(chunk):]
            return info
        if len(buf) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"no CRLF within the first {V1_MAX_LENGTH} bytes of a v1 line")
        return None

    # -- version 2 ---------------------------------------------------------

    def _feed_v2(self, data: bytes) -> ProxyInfo | None:
        buf = self._buf
        pos = 0
        if len(buf) < _V2_FIXED:
            take = data[: _V2_FIXED - len(buf)]
            start = len(buf)
            buf += take
            pos = len(take)
            self._check_v2_fixed(start)
            if len(buf) < _V2_FIXED:
                return None
        # Only the header's own bytes are taken: the rest is the application's.
        take = data[pos : pos + self._total - len(buf)]
        buf += take
        pos += len(take)
        if len(buf) < self._total:
            return None
        info = _parse_v2(bytes(buf))
        self.rest = data[pos:]
        return info

    def _check_v2_fixed(self, start: int) -> None:
        """Judge the fixed 16 bytes as far as they have arrived."""
        buf = self._buf
        have = min(len(buf), 12)
        if start < 12 and buf[:have] != V2_SIGNATURE[:have]:
            raise ProxyHeaderError(f"bad v2 signature {bytes(buf[:have])!r}")
        if start <= 12 < len(buf):
            version, command = buf[12] >> 4, buf[12] & 0x0F
            if version != 2:
                raise ProxyHeaderError(f"v2 signature with protocol version {version}, not 2")
            if command not in _COMMANDS:
                raise ProxyHeaderError(f"unknown v2 command 0x{command:x} (LOCAL 0 and PROXY 1 "
                                       "only)")
        if start <= 13 < len(buf):
            family, transport = buf[13] >> 4, buf[13] & 0x0F
            if family not in _FAMILIES:
                raise ProxyHeaderError(f"unknown v2 address family 0x{family:x}")
            if transport not in _TRANSPORTS:
                raise ProxyHeaderError(f"unknown v2 transport protocol 0x{transport:x}")
        if len(buf) == _V2_FIXED:
            length = int.from_bytes(buf[14:16], "big")
            name, size = _FAMILIES[buf[13] >> 4]
            # LOCAL: the family is ignored with the rest of the block (the spec).
            if length < size and buf[12] & 0x0F == 0x1:
                raise ProxyHeaderError(f"v2 length {length} is too short for {name} addresses "
                                       f"({size} bytes)")
            if _V2_FIXED + length > self.max_v2_length:
                raise ProxyHeaderError(f"v2 header of {_V2_FIXED + length} bytes is over the "
                                       f"limit of {self.max_v2_length}")
            self._total = _V2_FIXED + length


def _check_v1_prefix(buf: bytearray, start: int) -> None:
    """Reject a v1 line at its first wrong byte, before the CRLF arrives."""
    head = bytes(buf[:6])
    if start < 6 and head != _V1_PREFIX[: len(head)]:
        raise ProxyHeaderError(f"a v1 line must start with 'PROXY ', not {head!r}")
    # A CR must be followed by LF, and an LF preceded by CR (never a lone one).
    cr = buf.find(b"\r", max(start - 1, 0))
    if cr >= 0 and cr + 1 < len(buf) and buf[cr + 1] != 0x0A:
        raise ProxyHeaderError("a CR not followed by LF in a v1 line")
    lf = buf.find(b"\n", start)
    if lf >= 0 and (lf == 0 or buf[lf - 1] != 0x0D):
        raise ProxyHeaderError("a v1 line ends with LF alone, not CRLF")
    if len(buf) <= 6:
        return
    family_end = len(buf)
    for stop in (b" ", b"\r"):
        at = buf.find(stop, 6)
        if at >= 0:
            family_end = min(family_end, at)
    family = bytes(buf[6:family_end])
    complete = family_end < len(buf)
    if not any(f == family if complete else f.startswith(family) for f in _V1_FAMILIES):
        raise ProxyHeaderError(f"unknown v1 protocol {family[:8]!r} (TCP4, TCP6 or UNKNOWN)")
    if family in (b"TCP4", b"TCP6"):
        allowed = _V4_CHARS if family == b"TCP4" else _V6_CHARS
        for i in range(max(start, family_end), len(buf)):
            if buf[i] not in allowed and buf[i] not in (0x0D, 0x0A):
                raise ProxyHeaderError(f"byte {bytes(buf[i:i + 1])!r} in a v1 "
                                       f"{family.decode()} line")


def _parse_v1(line: bytes) -> ProxyInfo:
    """A complete v1 line, CRLF included (already known to start well)."""
    body = line[6:-2]
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        # The receiver must ignore the rest of an UNKNOWN line.
        return ProxyInfo(1, "LOCAL", "UNSPEC", None, None, transport="UNSPEC")
    fields = body.split(b" ")
    if len(fields) != 5:
        raise ProxyHeaderError(f"a v1 {fields[0].decode('ascii', 'replace')} line needs 4 "
                               "fields after the protocol, separated by single spaces")
    family = fields[0].decode("ascii")
    parse = _v1_ipv4 if family == "TCP4" else _v1_ipv6
    src, dst = parse(fields[1], "source"), parse(fields[2], "destination")
    sport, dport = _v1_port(fields[3], "source"), _v1_port(fields[4], "destination")
    return ProxyInfo(1, "PROXY", family, Peer(src, sport), Peer(dst, dport))


def _v1_ipv4(text: bytes, what: str) -> str:
    parts = text.split(b".")
    if len(parts) != 4 or not all(
        p.isdigit() and len(p) <= 3 and (p == b"0" or not p.startswith(b"0")) and int(p) <= 255
        for p in parts
    ):
        raise ProxyHeaderError(f"v1 {what} address {text[:40]!r} is not an IPv4 dotted quad "
                               "(0-255, no leading zeros)")
    return text.decode("ascii")


def _v1_ipv6(text: bytes, what: str) -> str:
    try:
        address = ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"v1 {what} address {text[:40]!r} is not an IPv6 address") from None
    return _ip_text(address)


def _ip_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # An IPv4-mapped IPv6 address as the kernel shows it (::ffff:192.0.2.1),
    # whatever this Python's ipaddress prints.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _v1_port(text: bytes, what: str) -> int:
    # Digits only (no sign, no space), no leading zeros (the spec: no octal confusion).
    if (not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0"))
            or int(text) > 65535):
        raise ProxyHeaderError(f"v1 {what} port {text[:8]!r} is not a decimal 0-65535 "
                               "without leading zeros")
    return int(text)


def _parse_v2(header: bytes) -> ProxyInfo:
    """A complete v2 header whose fixed 16 bytes were already judged."""
    command = _COMMANDS[header[12] & 0x0F]
    family, size = _FAMILIES[header[13] >> 4]
    transport = _TRANSPORTS[header[13] & 0x0F]
    if command == "LOCAL" or family == "UNSPEC":
        # The receiver must use the real addresses and ignore the block (the
        # spec): it is not parsed, so it cannot be wrong.
        return ProxyInfo(2, command, family, None, None, transport=transport)
    source, destination = _v2_addresses(family, header[16 : 16 + size])
    tlvs, crc_at = _v2_tlvs(header, 16 + size)
    if crc_at is not None:
        expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
        actual = crc32c(header[crc_at + 4 :], crc32c(b"\0\0\0\0", crc32c(header[:crc_at])))
        if actual != expected:
            raise ProxyHeaderError(f"CRC32C mismatch: the header says 0x{expected:08x}, its "
                                   f"bytes give 0x{actual:08x}")
    unique_id = tlvs.get(PP2_TYPE_UNIQUE_ID)
    if unique_id is not None and len(unique_id) > _UNIQUE_ID_MAX:
        raise ProxyHeaderError(f"UNIQUE_ID of {len(unique_id)} bytes (at most {_UNIQUE_ID_MAX})")
    ssl_raw = tlvs.get(PP2_TYPE_SSL)
    return ProxyInfo(
        2, command, family, source, destination,
        tlvs=MappingProxyType(tlvs),
        alpn=tlvs.get(PP2_TYPE_ALPN),
        authority=_text(tlvs.get(PP2_TYPE_AUTHORITY), "utf-8"),
        unique_id=unique_id,
        netns=_text(tlvs.get(PP2_TYPE_NETNS), "ascii"),
        ssl=None if ssl_raw is None else _v2_ssl(ssl_raw),
        transport=transport,
    )


def _v2_addresses(family: str, block: bytes) -> tuple[Peer, Peer]:
    if family == "UNIX":
        return Peer(path=_unix_path(block[:_UNIX_PATH])), Peer(path=_unix_path(block[_UNIX_PATH:]))
    n = 4 if family == "TCP4" else 16
    src, dst = (_ip_text(ipaddress.ip_address(block[i : i + n])) for i in (0, n))
    sport = int.from_bytes(block[2 * n : 2 * n + 2], "big")
    dport = int.from_bytes(block[2 * n + 2 : 2 * n + 4], "big")
    return Peer(src, sport), Peer(dst, dport)


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0" and raw.strip(b"\0"):
        # A Linux abstract address: shown as @name, as elsewhere in sockworks.
        return "@" + raw[1:].rstrip(b"\0").decode(errors="replace")
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _split_tlvs(data: bytes, start: int, what: str) -> list[tuple[int, int, bytes]]:
    """(offset, type, value) of each TLV in ``data[start:]``, which they must fill exactly."""
    out = []
    at, end = start, len(data)
    while at < end:
        if end - at < 3:
            raise ProxyHeaderError(f"{what}: {end - at} stray bytes where a TLV (3 bytes at "
                                   "least) should start")
        kind, size = data[at], int.from_bytes(data[at + 1 : at + 3], "big")
        if at + 3 + size > end:
            raise ProxyHeaderError(f"{what}: TLV 0x{kind:02x} of {size} bytes runs past the "
                                   f"end ({end - at - 3} bytes left)")
        out.append((at + 3, kind, data[at + 3 : at + 3 + size]))
        at += 3 + size
    return out


def _v2_tlvs(header: bytes, start: int) -> tuple[dict[int, bytes], int | None]:
    tlvs: dict[int, bytes] = {}
    crc_at = None
    for offset, kind, value in _split_tlvs(header, start, "v2 header"):
        if kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise ProxyHeaderError(f"CRC32C TLV of {len(value)} bytes, not 4")
            if crc_at is not None:
                raise ProxyHeaderError("two CRC32C TLVs")
            crc_at = offset
        tlvs.setdefault(kind, value)
    return tlvs, crc_at


def _v2_ssl(raw: bytes) -> ProxySSL:
    if len(raw) < 5:
        raise ProxyHeaderError(f"SSL TLV of {len(raw)} bytes (5 at least: client and verify)")
    subs: dict[int, bytes] = {}
    for _, kind, value in _split_tlvs(raw, 5, "SSL TLV"):
        subs.setdefault(kind, value)
    return ProxySSL(
        client=raw[0],
        verify=int.from_bytes(raw[1:5], "big"),
        version=_text(subs.get(PP2_SUBTYPE_SSL_VERSION), "ascii"),
        cn=_text(subs.get(PP2_SUBTYPE_SSL_CN), "utf-8"),
        cipher=_text(subs.get(PP2_SUBTYPE_SSL_CIPHER), "ascii"),
        sig_alg=_text(subs.get(PP2_SUBTYPE_SSL_SIG_ALG), "ascii"),
        key_alg=_text(subs.get(PP2_SUBTYPE_SSL_KEY_ALG), "ascii"),
        tlvs=MappingProxyType(subs),
    )


def _text(raw: bytes | None, encoding: str) -> str | None:
    # Informational strings: a bad byte is replaced, not fatal (the raw value
    # stays in ``tlvs``).
    return None if raw is None else raw.decode(encoding, errors="replace")


# --------------------------------------------------------------------------
# encoding


def _ip_pair(
    source: Peer, destination: Peer
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
           ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        # A zone (fe80::1%eth0, from getsockname) means nothing to the receiver.
        src = ipaddress.ip_address(source.host.split("%", 1)[0])
        dst = ipaddress.ip_address(destination.host.split("%", 1)[0])
    except ValueError as exc:
        raise ValueError(f"a PROXY header states IP addresses, not names: {exc}") from None
    if src.version != dst.version:
        # One of each: state both as IPv6, the IPv4 one mapped (::ffff:a.b.c.d).
        src, dst = _as_v6(src), _as_v6(dst)
    for peer in (source, destination):
        if not 0 <= peer.port <= 0xFFFF:
            raise ValueError(f"port {peer.port} is outside 0-65535")
    return src, dst


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(f"::ffff:{address}")


def _is_unix(peer: Peer) -> bool:
    return not peer.host


def encode_v1(source: Peer | None, destination: Peer | None) -> bytes:
    """A v1 line for ``source`` (the client) connecting to ``destination``.

    Both None, or Unix peers (which v1 cannot state), give
    ``PROXY UNKNOWN\\r\\n``; IPv4 beside IPv6 is stated as TCP6 with the
    IPv4 address mapped. ``ValueError`` for names instead of addresses.
    """
    if source is None or destination is None:
        if source is not destination:
            raise ValueError("give both source and destination, or neither")
        return b"PROXY UNKNOWN\r\n"
    if _is_unix(source) or _is_unix(destination):
        return b"PROXY UNKNOWN\r\n"
    src, dst = _ip_pair(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {family} {_ip_text(src)} {_ip_text(dst)} {source.port} {destination.port}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: Peer | None,
    destination: Peer | None,
    *,
    command: str = "PROXY",
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 header (TCP over IPv4/IPv6, or a Unix stream) with ``tlvs`` in order.

    ``command="LOCAL"`` (a health check) takes no addresses. Both addresses
    None give the UNSPEC family. A ``PP2_TYPE_CRC32C`` entry in ``tlvs``
    gets the header's checksum, whatever value it was given.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', not {command!r}")
    if (source is None) != (destination is None):
        raise ValueError("give both source and destination, or neither")
    if command == "LOCAL" and source is not None:
        raise ValueError("a LOCAL header states no addresses (the receiver uses the real ones)")
    block = b""
    family = transport = 0x0
    if source is not None and destination is not None:
        transport = 0x1  # STREAM: what sockworks relays
        if _is_unix(source) and _is_unix(destination):
            family = 0x3
            block = _unix_block(source.path) + _unix_block(destination.path)
        elif _is_unix(source) or _is_unix(destination):
            raise ValueError("source and destination must both be IP or both be Unix")
        else:
            src, dst = _ip_pair(source, destination)
            family = 0x1 if src.version == 4 else 0x2
            block = (src.packed + dst.packed + source.port.to_bytes(2, "big")
                     + destination.port.to_bytes(2, "big"))
    body = bytearray(block)
    crc_at = None
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type {kind} is outside 0-255")
        if kind == PP2_TYPE_CRC32C:
            if crc_at is not None:
                raise ValueError("one CRC32C TLV at most")
            value = b"\0\0\0\0"  # filled in below, computed with these zeros
            crc_at = _V2_FIXED + len(body) + 3
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:02x} of {len(value)} bytes (65535 at most)")
        body += bytes((kind,)) + len(value).to_bytes(2, "big") + value
    if len(body) > 0xFFFF:
        raise ValueError(f"v2 header body of {len(body)} bytes (65535 at most)")
    header = bytearray(V2_SIGNATURE)
    header += bytes((0x20 | (1 if command == "PROXY" else 0), family << 4 | transport))
    header += len(body).to_bytes(2, "big") + body
    if crc_at is not None:
        header[crc_at : crc_at + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


def _unix_block(path: str) -> bytes:
    raw = b"\0" + path[1:].encode() if path.startswith("@") else path.encode()
    if len(raw) > _UNIX_PATH:
        raise ValueError(f"Unix path of {len(raw)} bytes (108 at most)")
    return raw.ljust(_UNIX_PATH, b"\0")
