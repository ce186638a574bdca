"""Service settings from a TOML file (``sockworks serve --config``) or the
command line, checked in full before anything binds.

The file (see ``docs/classic.md`` and ``examples/inetd.toml``)::

    [server]
    grace = 5                       # seconds connections get on shutdown
    workers = 4                     # or "auto"; see docs/deploy.md

    [defaults]                      # any service key, for every service
    allow = ["127.0.0.0/8", "::1"]

    [services.echo]                 # a built-in service by name...
    listen = ["tcp:127.0.0.1:7007", "udp:127.0.0.1:7007"]

    [services.public-echo]          # ...or any name, with `service =`
    service = "echo"
    listen = ["tcp:0.0.0.0:7008"]
    per_source = 4

    [services.upper]                # your own: MODULE:NAME (see _apps.py)
    service = "mymod:Upper"
    app_dir = "/srv/app"            # where mymod.py is (default: the current directory)
    listen = ["tcp:127.0.0.1:9000"]

Every error names the file, the key and the reason
(``inetd.toml: services.echo.timeout: expected seconds (a number), got 'x'``)
and is raised as :class:`ConfigError`; nothing is half-configured.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ._access import AccessPolicy, default_per_source, parse_network
from ._config import ProcessSettings, ProxySettings, SocketOptions, TLSSettings, parse_workers
from ._endpoint import Endpoint, parse_endpoint
from ._errors import ConfigError, EndpointError, SockworksError
from ._server import ServiceConfig

Check = Callable[[Any], Any]


class _Bad(Exception):
    """A value of the wrong type or range: the reason, to be located."""


def _show(value: Any, most: int = 60) -> str:
    """``repr(value)`` for an error line, cut short: a value may be a
    list nested hundreds deep or a megabyte string."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= most else text[: most - 3] + "..."


def _number(what: str, *, zero: bool = False) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"expected {what}, got {_show(v)}")
        if v != v or v == float("inf") or v < 0 or (v == 0 and not zero):
            raise _Bad(f"expected {what}, got {_show(v)}")
        return v

    return check


def _whole(what: str, *, zero: bool = False, most: int | None = None) -> Check:
    def check(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not zero):
            raise _Bad(f"expected {what}, got {_show(v)}")
        if most is not None and v > most:
            raise _Bad(f"expected {what} up to {most}, got {_show(v)}")
        return v

    return check


def _or_off(check: Check, *, zero: bool = False) -> Check:
    """``check``, or ``"off"``/``false`` (and ``0`` when ``zero``) for None."""

    def wrapped(v: Any) -> Any:
        if v is False or (isinstance(v, str) and v.lower() in ("off", "none")):
            return None
        if zero and v == 0 and not isinstance(v, bool):
            return None
        try:
            return check(v)
        except _Bad as exc:
            also = '0 or "off" for none' if zero else 'or "off"'
            raise _Bad(f"{exc} ({also})") from None

    return wrapped


def _flag(v: Any) -> Any:
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {_show(v)}")
    return v


def _text(v: Any) -> Any:
    if not isinstance(v, str) or not v:
        raise _Bad(f"expected a non-empty string, got {_show(v)}")
    return v


def _list_of(check: Check, what: str) -> Check:
    def wrapped(v: Any) -> Any:
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            v = [v]  # one item may be written alone
        if not isinstance(v, list):
            raise _Bad(f"expected a list of {what}, got {_show(v)}")
        return tuple(check(item) for item in v)

    return wrapped


def _endpoint(v: Any) -> Any:
    if not isinstance(v, str):
        raise _Bad(f"expected an endpoint string such as \"tcp:127.0.0.1:7007\", got {_show(v)}")
    try:
        return parse_endpoint(v)
    except SockworksError as exc:
        raise _Bad(str(exc)) from None


def _network(v: Any) -> Any:
    try:
        parse_network(v)
    except ConfigError as exc:
        raise _Bad(str(exc)) from None
    return v


def _command(v: Any) -> Any:
    if not isinstance(v, list):
        raise _Bad(f'expected a list such as ["cat", "-u"], got {_show(v)}')
    if not v:
        raise _Bad("empty command: give a program to run")
    if not all(isinstance(item, str) for item in v):
        raise _Bad(f"expected a list of strings, got {_show(v)}")
    return tuple(v)


def _choice(*choices: str) -> Check:
    def check(v: Any) -> Any:
        if v not in choices:
            raise _Bad(f"expected one of {', '.join(choices)}, got {_show(v)}")
        return v

    return check


def _names(v: Any) -> Any:
    """A list of names, or one string of comma-separated names (ALPN)."""
    if isinstance(v, str):
        v = [part.strip() for part in v.split(",") if part.strip()]
    if not isinstance(v, (list, tuple)) or not v or not all(
        isinstance(x, str) and x and len(x.encode()) < 256 for x in v
    ):
        raise _Bad(f'expected protocol names such as ["h2", "http/1.1"], got {_show(v)}')
    return tuple(v)


def _environment(v: Any) -> Any:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _Bad(f'expected a table of strings such as {{ LANG = "C.UTF-8" }}, got {_show(v)}')
    return dict(v)


# Every key a service table (or [defaults]) may have, and its check.
# The names are the CLI's long options with "_" for "-".
SERVICE_KEYS: dict[str, Check] = {
    "service": _text,
    "listen": _list_of(_endpoint, "endpoints"),
    # limits
    "timeout": _number("seconds (a number, 0 for none)", zero=True),
    "request_timeout": _number("seconds (a number, 0 for none)", zero=True),
    "max_line": _whole("a positive whole number of bytes"),
    "max_conns": _whole("a positive whole number"),
    "max_output": _whole("a positive whole number of bytes"),
    "max_datagram": _whole("a positive whole number of bytes", most=65535),
    "threads": _whole("a positive whole number"),
    # socket options
    "nodelay": _flag,
    "keepalive": _flag,
    "linger": _whole("zero or more seconds", zero=True),
    "rcvbuf": _whole("a positive whole number of bytes"),
    "sndbuf": _whole("a positive whole number of bytes"),
    "backlog": _whole("a positive whole number"),
    "broadcast": _flag,
    "reuse_port": _flag,
    # service options
    "token": _text,  # greeting
    "quotes": _text,  # qotd: a file, one quote per paragraph
    "root": _text,  # gopher
    "advertise": _text,  # gopher
    "exec_scripts": _flag,  # gopher: executable files run as pages
    "script_timeout": _number("seconds (a positive number)"),  # gopher, with exec_scripts
    # access control and abuse protection
    "allow": _list_of(_network, "addresses or CIDR networks"),
    "deny": _list_of(_network, "addresses or CIDR networks"),
    # 0 or "off": no per-source limit (behind a load balancer or NAT); absent:
    # default_per_source(max_conns).
    "per_source": _or_off(_whole("a positive whole number"), zero=True),
    "instances": _or_off(_whole("a positive whole number")),
    "cps": _or_off(_number("connections per second (a positive number)")),
    "max_amplification": _or_off(_number("a factor (zero or more)", zero=True)),
    "udp_rate": _or_off(_number("datagrams per second (a positive number)")),
    "udp_burst": _whole("a positive whole number"),
    "drop_source_ports": _list_of(_whole("a port number", most=65535), "port numbers"),
    # exec (services/exec.py checks them in full): the program and its
    # arguments (a list, never split: no shell unless asked), variables
    # set or passed through, the working directory
    "exec": _command,
    "env": _environment,
    "pass_env": _list_of(_text, "environment variable names"),
    "workdir": _text,
    # TLS on the service's tls: and unix+tls: listeners
    "cert": _text,  # the certificate chain, PEM
    "key": _text,  # its private key, unless the cert file has it
    "client_ca": _text,  # clients must present a certificate it signed
    "alpn": _names,
    "handshake_timeout": _number("seconds (a positive number)"),
    # the PROXY protocol (behind HAProxy, nginx, a cloud balancer)
    "proxy_protocol": _choice("v1", "v2", "any"),
    "proxy_from": _list_of(_network, "addresses or CIDR networks"),
    "proxy_timeout": _number("seconds (a positive number)"),
    # MODULE:NAME services: the directory the module is imported from
    # (relative to the config file's directory; default: the current one)
    "app_dir": _text,
}
def _workers(v: Any) -> Any:
    try:
        return parse_workers(v)
    except ConfigError as exc:
        raise _Bad(str(exc)) from None


def _metrics(v: Any) -> Any:
    text = _text(v)
    try:
        endpoint = parse_endpoint(text)
    except EndpointError as exc:
        raise _Bad(str(exc)) from None
    if endpoint.transport not in ("tcp", "unix") or endpoint.tls:
        raise _Bad(f"metrics are served over HTTP on tcp: or unix:, not {endpoint}")
    return text


# [server]: the process as a whole (the names are serve's long options).
SERVER_KEYS: dict[str, Check] = {
    "grace": _number("seconds (a number)", zero=True),
    "workers": _workers,  # a number, or "auto": one per CPU
    "user": _text,  # drop to this user once every socket is bound
    "group": _text,
    "metrics": _metrics,  # Prometheus metrics over HTTP, at /metrics
    "log_format": _choice("text", "json"),
}
TOP_KEYS = ("server", "defaults", "services")


@dataclass(frozen=True)
class LoadedConfig:
    """What a config file describes: the services and the server's settings."""

    services: tuple[ServiceConfig, ...]
    grace: float | None = None
    process: ProcessSettings = field(default_factory=ProcessSettings)


def check_settings(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Checked and converted settings; errors name ``where.key``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        check = SERVICE_KEYS.get(key)
        if check is None:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(SERVICE_KEYS)})")
        try:
            out[key] = check(value)
        except _Bad as exc:
            raise ConfigError(f"{where}.{key}: {exc}") from None
    return out


# Settings only MODULE:NAME services take.
APP_KEYS = frozenset({"app_dir"})


def unknown_service(kind: str) -> str:
    """Why ``kind`` names no service, in one line; an endpoint given as the
    service shows how to write it."""
    from .services import SERVICES

    if "://" in kind or kind.partition(":")[0] in ("tcp", "udp", "unix", "unixgram"):
        return (f"{kind!r} is an endpoint, not a service: name the service and give "
                "the endpoint with -l (sockworks serve echo -l tcp:127.0.0.1:7007)")
    return (f"unknown service {kind!r} (known: {', '.join(sorted(SERVICES))}; "
            "or MODULE:NAME for your own)")


def takes(kind: str, key: str) -> bool:
    """Whether the service ``kind`` takes the service-specific ``key``."""
    from ._apps import is_app_reference
    from .services import SERVICES

    if kind in SERVICES:
        return key in SERVICES[kind].options
    return key in APP_KEYS and is_app_reference(kind)


def owners_of(key: str) -> str:
    """Who takes a service-specific setting, for messages."""
    from .services import SERVICES

    if key in APP_KEYS:
        return "MODULE:NAME services"
    names = [s.name for s in SERVICES.values() if key in s.options]
    return "the " + " and ".join(names) + (" services" if len(names) > 1 else " service")


def own_keys() -> frozenset[str]:
    """Every setting only some services take."""
    from .services import SERVICE_OPTIONS

    return SERVICE_OPTIONS | APP_KEYS


def app_spec(reference: str, app_dir: str | None, base: Path | None) -> Any:
    """A :class:`ServiceSpec` for ``MODULE:NAME``: the handler imported now
    (a mistake is a :class:`ConfigError` before anything binds), no default
    listener, the default limits, no service options."""
    from ._apps import load_app
    from .services import ServiceSpec

    directory: Path | None = None
    if app_dir is not None:
        directory = Path(app_dir).expanduser()
        if base is not None and not directory.is_absolute():
            directory = base / directory
    handler = load_app(reference, directory)
    return ServiceSpec(reference, "your own service", (), lambda o: handler)


def build_service(
    name: str,
    settings: Mapping[str, Any],
    *,
    where: str = "",
    base: Path | None = None,
) -> ServiceConfig:
    """A :class:`ServiceConfig` for a built-in service from checked settings
    (see :data:`SERVICE_KEYS`; absent keys keep the defaults). ``where``
    prefixes errors; ``base`` is the directory relative paths start from."""
    from ._apps import is_app_reference
    from ._drivers import make_driver
    from .protocols.classic import parse_quotes
    from .services import SERVICES, ServiceOptions, get_service
    from .services.exec import EXEC_INSTANCES, exec_options
    from .services.gopher import gopher_script_options

    prefix = f"{where}." if where else ""
    kind = settings.get("service", name)
    service_key = f"{prefix}service" if "service" in settings else where
    if kind in SERVICES:
        spec = get_service(kind)
    elif is_app_reference(kind):
        try:
            spec = app_spec(kind, settings.get("app_dir"), base)
        except ConfigError as exc:
            raise ConfigError(f"{service_key}: {exc}" if service_key else str(exc)) from None
    else:
        raise ConfigError(f"{service_key or 'service'}: {unknown_service(kind)}")
    s = settings
    # A setting of another service is a mistake to report, never ignored.
    for key in s:
        if key in own_keys() and not takes(kind, key):
            raise ConfigError(
                f"{prefix}{key}: an option of {owners_of(key)} only, "
                f"not of the {kind} service"
            )

    def attempt(key: str, make: Callable[[], Any]) -> Any:
        try:
            return make()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{key}: {exc}") from None

    limits = spec.default_limits().updated(
        idle_timeout=s.get("timeout"),
        request_timeout=s.get("request_timeout"),
        max_line=s.get("max_line"),
        max_connections=s.get("max_conns"),
        max_output_buffer=s.get("max_output"),
        handler_threads=s.get("threads"),
        max_datagram=s.get("max_datagram"),
    )
    options = SocketOptions().updated(
        nodelay=s.get("nodelay"), keepalive=s.get("keepalive"), linger=s.get("linger"),
        rcvbuf=s.get("rcvbuf"), sndbuf=s.get("sndbuf"), backlog=s.get("backlog"),
        broadcast=s.get("broadcast"), reuse_port=s.get("reuse_port"),
    )
    policy: dict[str, Any] = {"reply_slack": spec.reply_slack}
    for key in ("per_source", "instances", "cps", "max_amplification", "udp_rate", "udp_burst"):
        if key in s:
            policy[key] = s[key]
    for key in ("allow", "deny"):
        if s.get(key):
            policy[key] = tuple(s[key])
    if "drop_source_ports" in s:
        policy["drop_source_ports"] = frozenset(s["drop_source_ports"])
    if kind == "exec" and "instances" not in s:
        policy["instances"] = EXEC_INSTANCES  # a process each: systemd's MaxConnections=64
    access: AccessPolicy = attempt("access", lambda: AccessPolicy(**policy))  # keys checked
    extra: dict[str, Any] = {}
    known = {f.name for f in fields(ServiceOptions)}
    for key in ("token", "root", "advertise"):
        if s.get(key) is not None:
            if key not in known:
                raise ConfigError(f"{prefix}{key}: not an option of this sockworks")
            extra[key] = s[key]
    # gopher's scripts: refused on other services, and a timeout without them.
    try:
        extra.update(gopher_script_options(kind, s))
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    if s.get("quotes") is not None:
        path = Path(s["quotes"]).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"{prefix}quotes: cannot read {str(path)!r}: {reason}") from None
        extra["quotes"] = attempt("quotes", lambda: parse_quotes(text, str(path)))
        extra["quotes_file"] = os.path.abspath(path)  # checked as --user at start
    if "listen" in s and not s["listen"]:
        raise ConfigError(f"{prefix}listen: a service needs at least one endpoint")
    if not s.get("listen") and is_app_reference(kind) and kind not in SERVICES:
        # Your own service has no port of its own: a person says where it goes.
        raise ConfigError(
            f"{prefix}listen: {kind} has no default listener: give one "
            "(listen = [\"tcp:127.0.0.1:PORT\"]; -l on the command line)"
        )
    listen: tuple[Endpoint, ...] = s.get("listen") or tuple(
        parse_endpoint(e) for e in spec.default_listen
    )
    # exec: the program, its environment, stream listeners only; checked
    # here, before anything binds (keys for it on another service: an error).
    service_options = exec_options(
        ServiceOptions(limits=limits, access=access, **extra), kind, s, listen, prefix
    )
    handler = spec.build(service_options)
    if "per_source" not in s:
        # Safe by default: no one address may hold every connection slot.
        # The capacity is the driver's (a blocking handler is also capped
        # by its threads); the handler used only the UDP fields of the policy.
        capacity = make_driver(handler).max_connections(limits)
        if kind == "exec" and access.instances:  # a quarter of the programs at once
            capacity = min(capacity, access.instances)
        access = replace(access, per_source=default_per_source(capacity))
    tls, proxy = _layers(s, listen, prefix, base)
    return ServiceConfig(
        handler=handler, listen=listen, name=name, limits=limits, options=options,
        access=access, tls=tls, proxy=proxy,
    )


def _layers(
    s: Mapping[str, Any], listen: tuple[Endpoint, ...], prefix: str, base: Path | None
) -> tuple[TLSSettings | None, ProxySettings | None]:
    """TLS and PROXY settings, checked against the listeners they serve."""

    def path(key: str) -> str | None:
        value = s.get(key)
        if value is None:
            return None
        found = Path(value).expanduser()
        if base is not None and not found.is_absolute():
            found = base / found
        return str(found)

    tls_listeners = [e for e in listen if e.tls]
    tls_keys = [k for k in ("cert", "key", "client_ca", "alpn", "handshake_timeout") if k in s]
    tls: TLSSettings | None = None
    if tls_listeners and "cert" not in s:
        raise ConfigError(
            f"{prefix}listen: {tls_listeners[0]} needs a certificate (cert; --cert on the "
            "command line)"
        )
    if tls_keys and not tls_listeners:
        raise ConfigError(
            f"{prefix}{tls_keys[0]}: no TLS listener to use it (listen on tls:HOST:PORT "
            "or unix+tls:PATH)"
        )
    if tls_listeners:
        cert = path("cert")
        assert cert is not None
        tls = TLSSettings(
            cert=cert, key=path("key"), client_ca=path("client_ca"),
            alpn=tuple(s.get("alpn", ())),
            **({"handshake_timeout": s["handshake_timeout"]} if "handshake_timeout" in s else {}),
        )
    proxy: ProxySettings | None = None
    proxy_keys = [k for k in ("proxy_protocol", "proxy_from", "proxy_timeout") if k in s]
    if proxy_keys:
        if "proxy_protocol" not in s:
            raise ConfigError(f"{prefix}{proxy_keys[0]}: needs proxy_protocol (v1, v2 or any)")
        if not s.get("proxy_from"):
            raise ConfigError(
                f"{prefix}proxy_from: the PROXY protocol needs the balancers' addresses: "
                "a header from anyone would let anyone claim any address"
            )
        if not any(e.is_stream for e in listen):
            raise ConfigError(f"{prefix}proxy_protocol: the PROXY protocol is for stream listeners")
        proxy = ProxySettings(
            trusted=tuple(s["proxy_from"]), accept=s["proxy_protocol"],
            **({"timeout": s["proxy_timeout"]} if "proxy_timeout" in s else {}),
        )
    return tls, proxy


def check_listeners(services: list[tuple[str, ServiceConfig]]) -> None:
    """Two services on one listener, or a listener a service cannot serve,
    is an error before anything binds."""
    from ._drivers import make_driver

    seen: dict[tuple[str, str, int, str], str] = {}
    for where, config in services:
        driver = make_driver(config.handler)
        for endpoint in config.listen:
            if not driver.supports(endpoint):
                raise ConfigError(
                    f"{where}.listen: {config.name} cannot serve {endpoint.transport}"
                    f" endpoints ({endpoint})"
                )
            if not (endpoint.port or endpoint.path):
                continue  # port 0: the kernel picks a free one each time
            key = (endpoint.transport, endpoint.host, endpoint.port, endpoint.path)
            if key in seen:
                other = seen[key]
                also = "given twice" if other == where else f"also a listener of {other}"
                raise ConfigError(f"{where}.listen: {endpoint} is {also}")
            seen[key] = where


def load_config(path: str | Path) -> LoadedConfig:
    """Read and check a config file; raise :class:`ConfigError` naming the
    file, the key and the reason."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({exc.reason})") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion: a
        # file nested thousands deep is refused, never a traceback.
        raise ConfigError(
            f"{path}: cannot read: arrays or inline tables nested too deeply"
        ) from None
    try:
        return _load(data, path.parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # a value nested just shallow enough to parse
        raise ConfigError(f"{path}: values nested too deeply") from None


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table ([{key}]), got {_show(value)}")
    return value


def _load(data: Mapping[str, Any], base: Path) -> LoadedConfig:
    for key in data:
        if key not in TOP_KEYS:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(TOP_KEYS)})")
    server: dict[str, Any] = {}
    for key, value in _table(data, "server").items():
        check = SERVER_KEYS.get(key)
        if check is None:
            raise ConfigError(f"server.{key}: unknown key (known: {', '.join(SERVER_KEYS)})")
        try:
            server[key] = check(value)
        except _Bad as exc:
            raise ConfigError(f"server.{key}: {exc}") from None
    grace = server.pop("grace", None)
    process = ProcessSettings(**server)
    defaults = check_settings(_table(data, "defaults"), "defaults")
    for key in ("service", "listen"):
        if key in defaults:
            raise ConfigError(f"defaults.{key}: belongs in a [services.NAME] table")
    services = _table(data, "services")
    if not services:
        raise ConfigError("services: no service configured (add a [services.NAME] table)")
    built: list[tuple[str, ServiceConfig]] = []
    # A service-specific setting in [defaults] (token, root, app_dir...) is
    # for the services that take it; one that no service here takes is a
    # mistake, reported like any other.
    shared = {k: v for k, v in defaults.items() if k not in own_keys()}
    unused = set(defaults) - set(shared)
    for name, table in services.items():
        where = f"services.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table ([{where}]), got {_show(table)}")
        kind = table.get("service", name)
        kind = kind if isinstance(kind, str) else name
        own = {k: v for k, v in defaults.items() if k not in shared and takes(kind, k)}
        unused -= set(own)
        settings = {**shared, **own, **check_settings(table, where)}
        built.append((where, build_service(name, settings, where=where, base=base)))
    if unused:
        key = min(unused)
        raise ConfigError(
            f"defaults.{key}: no service in this file takes it (an option of {owners_of(key)})"
        )
    check_listeners(built)
    return LoadedConfig(tuple(config for _, config in built), grace, process)
