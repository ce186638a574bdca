"""The seeds' services (echo is with the classic ones, in ``classic.py``)."""

from __future__ import annotations

from .._drivers import ProtocolDriver
from ..protocols import seeds
from ._spec import ServiceSpec, stream_only

SEED_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "timestamp",
        "seed 001: each chunk or datagram answered with [ctime] + the data",
        ("tcp:127.0.0.1:21567", "udp:127.0.0.1:21567"),
        lambda o: ProtocolDriver(
            stream=lambda: seeds.Timestamp(o.clock),
            datagram=lambda: seeds.TimestampDatagram(o.clock),
        ),
        try_it="nc 127.0.0.1 21567",
        # "[" + a 24-character ctime + "] ": what a UDP reply adds to the
        # request, allowed past the amplification guard.
        reply_slack=27,
    ),
    ServiceSpec(
        "greeting",
        "seed 000: send the token (1) within 5 s and be welcomed",
        ("tcp:127.0.0.1:8001",),
        stream_only(lambda o: seeds.Greeting(o.token.encode(), o.limits.max_line)),
        try_it="echo 1 | nc 127.0.0.1 8001",
        # The seed's connection.settimeout(5).
        limits={"idle_timeout": 5.0, "request_timeout": 5.0},
    ),
    ServiceSpec(
        "thanks",
        "seed 002: 'thank you for connecting', then close",
        ("tcp:127.0.0.1:1234",),
        stream_only(lambda o: seeds.Thanks()),
        try_it="nc 127.0.0.1 1234",
    ),
    ServiceSpec(
        "charcount",
        "seed 004: type a line, get its length in characters (for telnet)",
        ("tcp:127.0.0.1:51423",),
        stream_only(lambda o: seeds.CharCount(o.limits.max_line)),
        try_it="telnet 127.0.0.1 51423",
    ),
)
