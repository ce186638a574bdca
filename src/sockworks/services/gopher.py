"""The Gopher service: ``sockworks serve gopher --root DIR``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._config import Limits
from .._drivers._common import report_failed_start
from .._drivers.protocol import StreamConnection
from .._endpoint import Endpoint, split_host_port
from .._errors import ConfigError, EndpointError
from .._protocol import Peer
from ..gopher.fsroot import FileSystemRoot
from ..protocols.gopher import GopherProtocol, GopherSite
from ._spec import ServiceOptions, ServiceSpec

if TYPE_CHECKING:
    from .._server import ConnectionGroup

# Written into menus when a client came in over a Unix socket and no
# --advertise was given: there is no host and port of ours to name.
_UNIX_FALLBACK = ("localhost", 70)


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


class GopherDriver:
    """The protocol driver, plus one thing Gopher needs: each connection
    learns the address it came in on, which its menus link back to (unless
    ``--advertise`` names another)."""

    name = "protocol"

    def __init__(self, site: GopherSite) -> None:
        self.site = site

    def supports(self, endpoint: Endpoint) -> bool:
        return endpoint.is_stream

    def max_connections(self, limits: Limits) -> int:
        return limits.max_connections

    def local_address(self, sock: socket.socket) -> tuple[str, int]:
        if self.site.advertise is not None:
            return self.site.advertise
        try:
            address = sock.getsockname()
        except OSError:
            return _UNIX_FALLBACK
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
        return _UNIX_FALLBACK

    def start_stream(self, sock: socket.socket, peer: Peer, group: ConnectionGroup) -> None:
        host, port = self.local_address(sock)
        conn = StreamConnection(GopherProtocol(self.site, host, port), peer, group)
        task = group.loop.create_task(group.loop.connect_accepted_socket(lambda: conn, sock))
        task.add_done_callback(report_failed_start)

    def start_datagram(self, bound: Any, group: ConnectionGroup) -> Any:
        raise ConfigError("gopher runs over stream sockets only")

    def close(self) -> None:
        pass


def build(options: ServiceOptions) -> GopherDriver:
    root_dir = getattr(options, "root", None) or default_root()
    try:
        root = FileSystemRoot(root_dir)
    except OSError as exc:
        raise ConfigError(f"gopher root {root_dir!r}: {exc.strerror or exc}") from None
    advertise_text = getattr(options, "advertise", None)
    site = GopherSite(
        root=root,
        advertise=parse_advertise(advertise_text) if advertise_text else None,
        max_request=options.limits.max_line,
        version=__version__,
    )
    return GopherDriver(site)


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
