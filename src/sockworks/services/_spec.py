"""What a built-in service is: its name, default listeners, and builder."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._access import AccessPolicy
from .._config import Limits
from .._drivers import ProtocolDriver
from .._privileges import RequiredPath


@dataclass(frozen=True)
class ServiceOptions:
    """Service-specific settings, from the CLI or a config file."""

    limits: Limits = field(default_factory=Limits)
    token: str = "1"
    # gopher: the directory served (None: see services/gopher.py
    # default_root) and the HOST:PORT written into menus (None: the
    # address each client connected to).
    root: str | None = None
    advertise: str | None = None
    # gopher: run executable files as pages (--exec-scripts), and their
    # time limit in seconds (None: gopher/scripts.py DEFAULT_TIMEOUT).
    exec_scripts: bool = False
    script_timeout: float | None = None
    clock: Callable[[], float] = time.time
    # qotd: the quotes to serve (None: the built-in set).
    quotes: tuple[bytes, ...] | None = None
    # qotd: the file they came from, read again on reload: checked at start
    # as the user --user drops to (see _privileges.py).
    quotes_file: str | None = None
    # Random choices (chargen lengths, qotd quotes): injected for tests.
    random: random.Random = field(default_factory=random.Random)
    # The access policy the service runs under: UDP services that size
    # their replies (chargen, qotd) keep within its amplification limit.
    access: AccessPolicy | None = None


@dataclass(frozen=True)
class ServiceSpec:
    """A built-in service: what it is, where it listens by default, how to build it."""

    name: str
    summary: str
    default_listen: tuple[str, ...]
    build: Callable[[ServiceOptions], Any]
    try_it: str = ""  # a command that talks to it, for the demo
    # Limits that differ from the defaults for this service.
    limits: dict[str, Any] = field(default_factory=dict)
    # Bytes a UDP reply may exceed the amplification cap by: the fixed size
    # of the service's answer (time 4, daytime 64, timestamp 27).
    reply_slack: int = 0
    # The service's own settings (config-file keys such as "token"); any
    # other service given one of them is refused, never silently ignored.
    options: frozenset[str] = frozenset()

    def default_limits(self) -> Limits:
        return Limits().updated(**self.limits)


class FileReadingDriver(ProtocolDriver):
    """A :class:`ProtocolDriver` that names the files its service reads
    (qotd's quotes), so that they are checked at start as the user the
    server drops to (:class:`sockworks._privileges.UsesPaths`)."""

    def __init__(self, stream: Any = None, datagram: Any = None, *,
                 paths: tuple[RequiredPath, ...] = ()) -> None:
        super().__init__(stream=stream, datagram=datagram)
        self.paths = paths

    def required_paths(self) -> tuple[RequiredPath, ...]:
        return self.paths


def stream_only(factory: Callable[[ServiceOptions], Any]) -> Callable[[ServiceOptions], Any]:
    """A builder for a service with a stream protocol only."""
    return lambda o: ProtocolDriver(stream=lambda: factory(o))
