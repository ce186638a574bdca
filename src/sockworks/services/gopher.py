"""The Gopher service: ``sockworks serve gopher --root DIR``."""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__
from .._drivers import ProtocolDriver
from .._endpoint import split_host_port
from .._errors import ConfigError, EndpointError
from ..gopher.fsroot import FileSystemRoot
from ..protocols.gopher import GopherProtocol, GopherSite
from ._spec import ServiceOptions, ServiceSpec


def default_root() -> str:
    """The ``docs/`` directory of the source tree sockworks runs from, when
    there is one (a checkout or editable install: ``make demo`` serves the
    project's documentation), else the current directory."""
    docs = Path(__file__).resolve().parents[3] / "docs"
    if docs.is_dir() and (docs / "gophermap").is_file():
        return str(docs)
    return os.getcwd()


def parse_advertise(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) for ``--advertise``."""
    try:
        host, port = split_host_port(text, subject=f"--advertise {text!r}")
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    if not host:
        raise ConfigError(f"--advertise {text!r} has no host (expected HOST:PORT)")
    return host, port


def build(options: ServiceOptions) -> ProtocolDriver:
    root_dir = options.root or default_root()
    try:
        root = FileSystemRoot(root_dir)
    except OSError as exc:
        raise ConfigError(f"gopher root {root_dir!r}: {exc.strerror or exc}") from None
    advertise_text = options.advertise
    site = GopherSite(
        root=root,
        advertise=parse_advertise(advertise_text) if advertise_text else None,
        max_request=options.limits.max_line,
        version=__version__,
    )
    return ProtocolDriver(stream=lambda: GopherProtocol(site))


GOPHER_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "gopher",
        "RFC 1436 Gopher: serves --root DIR (default: the project's docs/, else .)",
        ("tcp:127.0.0.1:7070",),
        build,
        try_it="sockworks gopher 127.0.0.1:7070",
        # A Gopher client sends its one request line at once: 30 s is
        # generous for a person typing it into telnet, and frees the slot of
        # a peer that connects and says nothing.
        limits={"idle_timeout": 30.0},
    ),
)
