"""The built-in services by name: their default listeners and how to build
them from options. This is where the clock is plugged into the protocols.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .._errors import UnknownServiceError
from ._spec import ServiceOptions, ServiceSpec, stream_only
from .classic import CLASSIC_SERVICES
from .exec import EXEC_KEYS, EXEC_SERVICES
from .gopher import GOPHER_SERVICES
from .seeds import SEED_SERVICES

# The settings only some services take (config-file keys; the CLI's long
# options with "-" for "_"). Kept here, beside the table of services, so one
# place says which service takes what.
OWN_OPTIONS: dict[str, frozenset[str]] = {
    "greeting": frozenset({"token"}),
    "qotd": frozenset({"quotes"}),
    "gopher": frozenset({"root", "advertise", "exec_scripts", "script_timeout"}),
    "exec": EXEC_KEYS,
}

SERVICES: dict[str, ServiceSpec] = {
    spec.name: replace(spec, options=spec.options | OWN_OPTIONS.get(spec.name, frozenset()))
    for spec in (*CLASSIC_SERVICES, *SEED_SERVICES, *GOPHER_SERVICES, *EXEC_SERVICES)
}

# Every service-specific setting, whichever service takes it.
SERVICE_OPTIONS: frozenset[str] = frozenset().union(*(s.options for s in SERVICES.values()))

__all__ = [
    "OWN_OPTIONS",
    "SERVICES",
    "SERVICE_OPTIONS",
    "ServiceOptions",
    "ServiceSpec",
    "get_service",
    "inapplicable",
    "stream_only",
]


def get_service(name: str) -> ServiceSpec:
    try:
        return SERVICES[name]
    except KeyError:
        known = ", ".join(sorted(SERVICES))
        raise UnknownServiceError(
            f"unknown service {name!r} (known: {known}; or MODULE:NAME for your own)"
        ) from None


def inapplicable(spec: ServiceSpec, keys: Iterable[str]) -> list[tuple[str, str]]:
    """The service-specific settings among ``keys`` that ``spec`` does not
    take, each with who does take it (``[("token", "greeting")]``)."""
    out = []
    for key in keys:
        if key in SERVICE_OPTIONS and key not in spec.options:
            owners = [s.name for s in SERVICES.values() if key in s.options]
            out.append((key, " and ".join(owners)))
    return out
