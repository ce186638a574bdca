"""The classic Internet services (RFC 862-868) by name.

Default ports are 7000 + the RFC port on 127.0.0.1, so that they run
without root. The clock and the random source come from
:class:`ServiceOptions`, so tests inject their own.
"""

from __future__ import annotations

from .._drivers import ProtocolDriver
from .._privileges import RequiredPath
from ..protocols import classic
from ._spec import FileReadingDriver, ServiceOptions, ServiceSpec


def _allowance(o: ServiceOptions) -> classic.Allowance | None:
    return o.access.reply_allowance if o.access is not None else None


def _quotes(o: ServiceOptions) -> tuple[bytes, ...]:
    return o.quotes or classic.DEFAULT_QUOTES


def _qotd(o: ServiceOptions) -> ProtocolDriver:
    # The quotes file was read at start (as root, with --user): it is read
    # again on reload, as the user, so it is named for the check at start.
    stream = lambda: classic.Qotd(_quotes(o), o.random.randrange)  # noqa: E731
    datagram = lambda: classic.QotdDatagram(  # noqa: E731
        _quotes(o), o.random.randrange, _allowance(o)
    )
    if o.quotes_file is None:
        return ProtocolDriver(stream=stream, datagram=datagram)
    return FileReadingDriver(stream=stream, datagram=datagram,
                             paths=(RequiredPath(o.quotes_file, "quotes file"),))


CLASSIC_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "echo",
        "RFC 862 echo: everything sent comes back (TCP and UDP)",
        ("tcp:127.0.0.1:7007", "udp:127.0.0.1:7007"),
        lambda o: ProtocolDriver(stream=classic.Echo, datagram=classic.EchoDatagram),
        try_it="nc 127.0.0.1 7007",
    ),
    ServiceSpec(
        "discard",
        "RFC 863 discard: reads and drops everything, never answers",
        ("tcp:127.0.0.1:7009", "udp:127.0.0.1:7009"),
        lambda o: ProtocolDriver(stream=classic.Discard, datagram=classic.DiscardDatagram),
        try_it="echo gone | nc -N 127.0.0.1 7009",
    ),
    ServiceSpec(
        "daytime",
        "RFC 867 daytime: one line with the date and time in UTC, then close",
        ("tcp:127.0.0.1:7013", "udp:127.0.0.1:7013"),
        lambda o: ProtocolDriver(
            stream=lambda: classic.Daytime(o.clock),
            datagram=lambda: classic.DaytimeDatagram(o.clock),
        ),
        try_it="nc 127.0.0.1 7013",
        reply_slack=classic.DAYTIME_MAX,
    ),
    ServiceSpec(
        "qotd",
        "RFC 865 quote of the day: one quote, then close (--quotes FILE)",
        ("tcp:127.0.0.1:7017", "udp:127.0.0.1:7017"),
        _qotd,
        try_it="nc 127.0.0.1 7017",
    ),
    ServiceSpec(
        "chargen",
        "RFC 864 character generator: the pattern until you hang up (TCP)",
        ("tcp:127.0.0.1:7019", "udp:127.0.0.1:7019"),
        lambda o: ProtocolDriver(
            stream=classic.Chargen,
            datagram=lambda: classic.ChargenDatagram(o.random.randint, _allowance(o)),
        ),
        try_it="nc 127.0.0.1 7019 | head -5",
    ),
    ServiceSpec(
        "time",
        "RFC 868 time: 4 bytes, seconds since 1900 (big-endian), then close",
        ("tcp:127.0.0.1:7037", "udp:127.0.0.1:7037"),
        lambda o: ProtocolDriver(
            stream=lambda: classic.Time(o.clock),
            datagram=lambda: classic.TimeDatagram(o.clock),
        ),
        try_it="nc 127.0.0.1 7037 | od -An -tu1",
        reply_slack=4,
    ),
)
