"""What a built-in service is: its name, default listeners, and builder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._config import Limits
from .._drivers import ProtocolDriver


@dataclass(frozen=True)
class ServiceOptions:
    """Service-specific settings, from the CLI or a config file."""

    limits: Limits = field(default_factory=Limits)
    token: str = "1"
    clock: Callable[[], float] = time.time


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

    def default_limits(self) -> Limits:
        return Limits().updated(**self.limits)


def stream_only(factory: Callable[[ServiceOptions], Any]) -> Callable[[ServiceOptions], Any]:
    """A builder for a service with a stream protocol only."""
    return lambda o: ProtocolDriver(stream=lambda: factory(o))
