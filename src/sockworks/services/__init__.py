"""The built-in services by name: their default listeners and how to build
them from options. This is where the clock is plugged into the protocols.
"""

from __future__ import annotations

from .._errors import UnknownServiceError
from ._spec import ServiceOptions, ServiceSpec, stream_only
from .classic import CLASSIC_SERVICES
from .exec import EXEC_SERVICES
from .gopher import GOPHER_SERVICES
from .seeds import SEED_SERVICES

SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (*CLASSIC_SERVICES, *SEED_SERVICES, *GOPHER_SERVICES, *EXEC_SERVICES)
}

__all__ = ["SERVICES", "ServiceOptions", "ServiceSpec", "get_service", "stream_only"]


def get_service(name: str) -> ServiceSpec:
    try:
        return SERVICES[name]
    except KeyError:
        known = ", ".join(sorted(SERVICES))
        raise UnknownServiceError(f"unknown service {name!r} (known: {known})") from None
