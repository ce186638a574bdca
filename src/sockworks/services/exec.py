"""The ``exec`` service: a program per connection, inetd style.

``sockworks serve exec -l ENDPOINT -- PROGRAM [ARG ...]``, or in a config
file ``service = "exec"`` with ``exec = ["PROGRAM", "ARG", ...]`` (and
``env``, ``pass_env``, ``workdir``). Everything is checked here, before
anything binds: the program exists and is executable, the listeners are
stream listeners. See ``docs/exec.md`` and ``_drivers/exec.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .._drivers.exec import ExecCommand, ExecDriver, check_env_name, make_command
from .._endpoint import Endpoint
from .._errors import ConfigError
from .._privileges import RequiredPath
from ._spec import ServiceOptions, ServiceSpec

# Programs running at once, by default (systemd's MaxConnections=64): a
# process each, so far fewer than the 1024 connections a built-in service
# serves. Over it a connection is refused (xinetd's instances).
EXEC_INSTANCES = 64
# The settings only an exec service has.
EXEC_KEYS = frozenset({"exec", "env", "pass_env", "workdir"})
USAGE = (
    "sockworks serve exec -l ENDPOINT -- PROGRAM [ARG ...];"
    ' in a config file, exec = ["PROGRAM", "ARG"]'
)


@dataclass(frozen=True)
class ExecOptions(ServiceOptions):
    """:class:`ServiceOptions` with the program to run."""

    command: ExecCommand | None = None


def _command(value: Any) -> tuple[str, ...]:
    # A string is refused, not split: `exec = "sh -c x"` would otherwise
    # look for a program named "sh -c x" (no shell unless asked).
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f'expected a list such as ["cat", "-u"], got {value!r:.60}')
    if not value:
        raise ConfigError("empty command: give a program to run")
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"expected a list of strings, got {item!r:.60} in it")
    return tuple(value)


def _env(value: Any) -> list[tuple[str, str]]:
    # A table from a config file; NAME=VALUE pairs from --env.
    if isinstance(value, Mapping):
        pairs: list[Any] = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
    else:
        raise ConfigError(f'expected a table such as {{ LANG = "C.UTF-8" }}, got {value!r:.60}')
    out: list[tuple[str, str]] = []
    for name, text in pairs:
        check_env_name(name)
        if not isinstance(text, str):
            raise ConfigError(f"{name}: expected a string, got {text!r:.60}")
        out.append((name, text))
    return out


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"expected a list of variable names, got {value!r:.60}")
    return [check_env_name(name) for name in value]


def exec_options(
    options: ServiceOptions,
    kind: str,
    settings: Mapping[str, Any],
    listen: Sequence[Endpoint],
    prefix: str = "",
) -> ServiceOptions:
    """``options`` with the program an exec service runs, from ``settings``
    (config-file keys: ``exec``, ``env``, ``pass_env``, ``workdir``);
    :class:`ConfigError` naming the key for anything wrong."""
    given = sorted(EXEC_KEYS & settings.keys())
    if kind != "exec":
        if given:
            raise ConfigError(f"{prefix}{given[0]}: only the exec service runs a program")
        return options
    if settings.get("exec") is None:
        raise ConfigError(f"{prefix}exec: no program to run ({USAGE})")
    if not listen:
        raise ConfigError(
            f"{prefix}listen: the exec service has no default listener: give one "
            "(--listen tcp:127.0.0.1:PORT, listen = [...] in a config file)"
        )
    for endpoint in listen:
        if not endpoint.is_stream:
            raise ConfigError(
                f"{prefix}listen: {endpoint}: exec serves stream endpoints only;"
                " inetd's wait mode is not supported"
            )

    def checked(key: str, check: Any) -> Any:
        try:
            return check(settings[key]) if settings.get(key) is not None else None
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{key}: {exc}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{prefix}{key}: not valid: {settings[key]!r:.60}") from None

    argv = checked("exec", _command)
    env = checked("env", _env) or ()
    pass_env = checked("pass_env", _names) or ()
    workdir = settings.get("workdir")
    try:
        command = make_command(argv, env=env, pass_env=pass_env, workdir=workdir)
    except ConfigError as exc:
        key = "workdir" if "working directory" in str(exc) else "exec"
        raise ConfigError(f"{prefix}{key}: {exc}") from None
    kept = {f.name: getattr(options, f.name) for f in fields(options)}
    return ExecOptions(**kept, command=command)


class ExecServiceDriver(ExecDriver):
    """The exec service's driver: names the program and the working
    directory, so that both are checked at start as the user ``--user``
    drops to (the program then runs as that user: a process inherits its
    ids), not at each connection (see _privileges.py)."""

    def required_paths(self) -> tuple[RequiredPath, ...]:
        command = self.command
        # A script is read by its interpreter, as the user: read and run.
        paths = [RequiredPath(command.program, "program", "run")]
        if _is_script(command.program):
            paths.append(RequiredPath(command.program, "script", "read"))
        if command.workdir is not None:
            paths.append(RequiredPath(command.workdir, "working directory", "enter"))
        return tuple(paths)


def _is_script(program: str) -> bool:
    try:
        with open(program, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def build(options: ServiceOptions) -> ExecDriver:
    command = options.command if isinstance(options, ExecOptions) else None
    if command is None:
        raise ConfigError(f"exec: no program to run ({USAGE})")
    return ExecServiceDriver(command)


EXEC_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "exec",
        "a program per connection, the connection as its stdin and stdout (-- PROGRAM ARG...)",
        (),  # no default: a person says where a program is exposed
        build,
        # --timeout bounds the whole session (the program owns the bytes, so
        # idleness cannot be seen): an hour, long enough for an interactive
        # session, short enough that abandoned ones end.
        limits={"idle_timeout": 3600.0},
    ),
)

__all__ = ["EXEC_INSTANCES", "EXEC_KEYS", "EXEC_SERVICES", "ExecOptions", "exec_options"]
