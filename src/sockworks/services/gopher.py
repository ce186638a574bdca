"""The Gopher service: ``sockworks serve gopher --root DIR``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._core import Driver
from .._drivers import ProtocolDriver
from .._endpoint import split_host_port
from .._errors import ConfigError, EndpointError
from .._privileges import RequiredPath
from ..gopher.fsroot import FileSystemRoot
from ..gopher.scripts import DEFAULT_TIMEOUT, ScriptRunner
from ..protocols.gopher import GopherProtocol, GopherSite
from ._spec import ServiceOptions, ServiceSpec

if TYPE_CHECKING:
    import asyncio

    from .._core import ConnectionGroup


# The documentation hole shipped inside the package: sockworks/hole is a
# symlink to the project's docs/ in git, and real files in a wheel (see
# pyproject.toml), so it is there however sockworks was installed.
HOLE = Path(__file__).resolve().parent.parent / "hole"


def default_root() -> str:
    """The directory served without ``--root``: the documentation hole
    shipped with sockworks (this project's docs/ and its gophermap). Never
    the current directory: a server started in /tmp or $HOME must not
    publish it by accident."""
    if not (HOLE / "gophermap").is_file():
        raise ConfigError(
            f"this installation has no documentation hole ({HOLE}): give --root DIR"
        )
    return str(HOLE.resolve())


# The settings only gopher has, for its scripts.
SCRIPT_KEYS = ("exec_scripts", "script_timeout")


def gopher_script_options(kind: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`ServiceOptions` fields for gopher's scripts from
    config-file keys (``exec_scripts``, ``script_timeout``). A
    :class:`ConfigError` naming the key for them on another service, for a
    timeout without scripts, or for a timeout that is not a positive number
    of seconds."""
    given = [k for k in SCRIPT_KEYS if settings.get(k) is not None]
    if not given:
        return {}
    if kind != "gopher":
        raise ConfigError(f"{given[0]}: an option of the gopher service only")
    out: dict[str, Any] = {"exec_scripts": bool(settings.get("exec_scripts"))}
    timeout = settings.get("script_timeout")
    if timeout is not None:
        if not out["exec_scripts"]:
            raise ConfigError("script_timeout: needs exec_scripts (--exec-scripts)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < float("inf")
        ):
            raise ConfigError(f"script_timeout: expected a positive number of seconds, "
                              f"got {timeout!r:.60}")
        out["script_timeout"] = float(timeout)
    return out


def parse_advertise(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) for ``--advertise``."""
    try:
        host, port = split_host_port(text, subject=f"--advertise {text!r}")
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    if not host:
        raise ConfigError(f"--advertise {text!r} has no host (expected HOST:PORT)")
    return host, port


class GopherDriver(ProtocolDriver):
    """The protocol driver (connections are the core's plain
    ProtocolConnection), plus two things at the service's edges: at start
    it says which directory is served (with the root chosen by default, a
    person must see what is published), and at the end it stops scripts
    still running past the grace period, so that their threads end."""

    def __init__(self, stream: Callable[[], GopherProtocol], served: str,
                 scripts: ScriptRunner | None = None, root: str | None = None) -> None:
        super().__init__(stream=stream)
        self.served = served
        self.scripts = scripts
        self.root = root

    def connection_factory(self, group: ConnectionGroup) -> Callable[[], asyncio.Protocol] | None:
        group.log.info("serving %s", self.served)
        return super().connection_factory(group)

    def required_paths(self) -> tuple[RequiredPath, ...]:
        """The root, listed on every request: checked at start as the user
        ``--user`` drops to, so that an unreadable root is one line then,
        not an error page per request (see _privileges.py)."""
        return (RequiredPath(self.root, "gopher root", "list"),) if self.root else ()

    def close(self) -> None:
        if self.scripts is not None:
            self.scripts.stop_all()
        super().close()


def build(options: ServiceOptions) -> Driver:
    root_dir = options.root or default_root()
    try:
        root = FileSystemRoot(root_dir)
    except OSError as exc:
        raise ConfigError(f"gopher root {root_dir!r}: {exc.strerror or exc}") from None
    advertise_text = options.advertise
    scripts = ScriptRunner(
        root.directory,
        timeout=options.script_timeout or DEFAULT_TIMEOUT,
        version=__version__,
    ) if options.exec_scripts else None
    site = GopherSite(
        root=root,
        advertise=parse_advertise(advertise_text) if advertise_text else None,
        max_request=options.limits.max_line,
        version=__version__,
        scripts=scripts,
    )
    served = f"{root.directory} (" + (
        "--root)" if options.root else "the documentation shipped with sockworks; "
        "--root DIR serves another)"
    )
    if scripts is not None:
        served += f"; executable files run as pages (--exec-scripts, {scripts.timeout:g} s each)"
    return GopherDriver(lambda: GopherProtocol(site), served, scripts, root.directory)


GOPHER_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "gopher",
        "RFC 1436 Gopher: serves --root DIR (default: the sockworks documentation)",
        ("tcp:127.0.0.1:7070",),
        build,
        try_it="sockworks gopher 127.0.0.1:7070",
        # A Gopher client sends its one request line at once: 30 s is
        # generous for a person typing it into telnet, and frees the slot of
        # a peer that connects and says nothing.
        limits={"idle_timeout": 30.0},
    ),
)
