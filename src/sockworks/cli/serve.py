"""``sockworks serve``, ``sockworks demo`` and ``sockworks services``."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._access import PER_SOURCE_CAP, parse_network
from .._apps import is_app_reference
from .._config import ProcessSettings, parse_workers
from .._configfile import (
    SERVICE_KEYS,
    build_service,
    load_config,
    own_keys,
    owners_of,
    takes,
    unknown_service,
)
from .._endpoint import Endpoint, inherited_endpoints, parse_endpoint, parse_port
from .._errors import BindError, ConfigError, EndpointError, SockworksError, UsageError
from .._inetd import log_to_syslog, run_inetd, take_stdin
from .._metrics import MetricsEndpoint, WorkerMetrics
from .._privileges import check_as, drop, required_paths, unix_socket_paths
from .._privileges import resolve as resolve_credentials
from .._run import run_services
from .._server import Server, ServiceConfig
from .._sockets import bind as bind_socket
from .._sockets import descriptor_limit, raise_limit_hint
from .._supervisor import SLOTS_PER_WORKER, SharedConnectionLimits, Supervisor, WorkerHooks
from .._systemd import claim_environment as claim_systemd_environment
from .._systemd import process_notifier
from .._systemd import sockets_given as systemd_sockets_given
from ..services import SERVICES, ServiceSpec, get_service
from ._common import (
    EXIT_OK,
    add_logging_options,
    doc,
    examples,
    positive_int,
    say,
    seconds,
    setup_logging,
)

SERVE_EXAMPLES = examples(
    ("sockworks serve echo", "tcp and udp on 127.0.0.1:7007"),
    ("sockworks serve greeting --token s3cret -l tcp:127.0.0.1:8001", "a built-in, elsewhere"),
    ("sockworks serve mymod:Upper -l tcp:127.0.0.1:9000", "your own: Upper in ./mymod.py"),
    ("sockworks serve --config inetd.toml", "several services, inetd style"),
)


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run a service",
        description="Run one service, or (--config) any number of them, inetd style.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("service", metavar="SERVICE", nargs="?",
                       help="a built-in service (" + ", ".join(SERVICES) + "), or "
                       "MODULE:NAME: your own protocol class, handler or factory NAME in "
                       "MODULE (found in --app-dir)")
    serve.add_argument("--config", "-c", metavar="FILE.toml",
                       help=f"run the services a TOML file describes (see {doc('classic.md')})")
    serve.add_argument(
        "--listen", "-l", metavar="ENDPOINT", action="append", default=[],
        help="where to listen (repeatable): tcp:HOST:PORT, tcp:[::1]:PORT, udp:HOST:PORT, "
        "unix:PATH, unixgram:PATH; HOST:PORT means TCP. An empty host binds EVERY "
        "interface: -l :80 listens on tcp:[::]:80, open to the network. Default: the "
        "service's own ports on 127.0.0.1 (MODULE:NAME has none: -l is required)",
    )
    serve.add_argument("--app-dir", metavar="DIR",
                       help="MODULE:NAME: the directory MODULE is imported from "
                       "(default: the current directory)")
    service = serve.add_argument_group("service options")
    service.add_argument("--token", help="greeting: the token that is welcomed (default 1)")
    service.add_argument("--quotes", metavar="FILE",
                         help="qotd: quotes to serve, one per paragraph (default: built-in)")
    service.add_argument("--root", metavar="DIR",
                         help="gopher: the directory served (default: the sockworks "
                         "documentation shipped with it, never the current directory)")
    service.add_argument("--advertise", metavar="HOST:PORT",
                         help="gopher: the host and port written into menus (default: the "
                         "address the client connected to)")
    service.add_argument("--exec-scripts", action="store_true", default=None,
                         help="gopher: run executable files inside the root and send their "
                         "output (dynamic pages; *.dcgi output is a menu). Default: off, "
                         "executables are served as files")
    service.add_argument("--script-timeout", type=seconds, metavar="SECONDS",
                         help="gopher, with --exec-scripts: a script's time limit (default 10)")
    add_exec_options(serve)
    add_server_options(serve)
    add_deploy_options(serve)
    serve.set_defaults(func=run_serve)

    demo = sub.add_parser(
        "demo", help="run every built-in service on its default ports",
        description="Run every built-in service on its default ports, "
        "and say how to talk to each. A service whose port is taken is skipped "
        "with a warning; --port-offset moves every port.",
    )
    demo.add_argument("--port-offset", type=int, default=0, metavar="N",
                      help="add N to every port, for when the default ones are taken "
                      "(e.g. 10000: echo on 17007, gopher on 17070)")
    add_server_options(demo)
    demo.set_defaults(func=run_demo)

    services = sub.add_parser("services", help="list the built-in services")
    services.set_defaults(func=run_list)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def add_exec_options(p: argparse.ArgumentParser) -> None:
    """``exec``'s options, and the program after ``--`` (as ``args.exec``)."""
    ex = p.add_argument_group(
        "exec: a program per connection (see docs/exec.md)",
        "sockworks serve exec -l ENDPOINT [options] -- PROGRAM [ARG ...]",
    )
    ex.add_argument("--workdir", metavar="DIR",
                    help="the program's working directory (default: the server's)")
    ex.add_argument("--env", metavar="NAME=VALUE", action="append", type=_env_pair,
                    help="set a variable in the program's environment (repeatable)")
    ex.add_argument("--pass-env", metavar="NAME", action="append",
                    help="pass this variable of the server's environment (repeatable); "
                    "else the program gets only PATH=/usr/local/bin:/usr/bin:/bin and "
                    "the connection's (PROTO, TCPREMOTEIP...)")
    parse = p.parse_known_args

    # Everything after the first "--" is the program and its arguments, taken
    # before argparse sees them (it would mix them with SERVICE, and drop
    # later "--"s the program may need).
    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        command = None
        if "--" in args:
            cut = args.index("--")
            args, command = args[:cut], tuple(args[cut + 1:])
        known, rest = parse(args, namespace)
        known.exec = command
        return known, rest

    setattr(p, "parse_known_args", parse_known_args)  # noqa: B010 - an instance's own


def _workers(text: str) -> int:
    try:
        return parse_workers(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_deploy_options(p: argparse.ArgumentParser) -> None:
    """The process as a whole (``[server]`` in a config file, where the
    command line wins): see docs/deploy.md."""
    dep = p.add_argument_group(f"deployment (see {doc('deploy.md')})")
    dep.add_argument("--workers", type=_workers, metavar="N|auto",
                     help="worker processes accepting on the same sockets, supervised and "
                     "replaced when they die; SIGHUP then reloads (auto: one per CPU). "
                     "Default: one process")
    dep.add_argument("--user", metavar="NAME",
                     help="drop to this user once every socket is bound (bind port 70 as "
                     "root, serve as nobody)")
    dep.add_argument("--group", metavar="NAME",
                     help="and to this group (default: the user's); supplementary groups "
                     "are cleared")
    dep.add_argument("--inetd", action="store_true",
                     help="serve the one connection (or datagram socket) on standard input, "
                     "for inetd, xinetd (wait=no) and systemd Accept=yes")
    dep.add_argument("--metrics", type=_metrics_endpoint, metavar="ENDPOINT",
                     help="serve Prometheus metrics over HTTP at /metrics on this endpoint "
                     "(e.g. 127.0.0.1:9100)")
    dep.add_argument("--log-format", choices=("text", "json"),
                     help="text (default), or json: one object per line for journald and "
                     "log shippers")


def _metrics_endpoint(text: str) -> str:
    from .._configfile import SERVER_KEYS

    try:
        checked: str = SERVER_KEYS["metrics"](text)
    except Exception as exc:  # the check's own message
        raise argparse.ArgumentTypeError(str(exc)) from None
    return checked


def process_settings(
    args: argparse.Namespace, base: ProcessSettings | None = None
) -> ProcessSettings:
    """The deployment options given on the command line over ``base``
    (a config file's ``[server]``)."""
    return (base or ProcessSettings()).updated(
        workers=getattr(args, "workers", None),
        user=getattr(args, "user", None),
        group=getattr(args, "group", None),
        metrics=getattr(args, "metrics", None),
        log_format=getattr(args, "log_format", None),
    )


def add_server_options(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("limits (on by default)")
    limits.add_argument("--timeout", "--idle-timeout", type=seconds, metavar="SECONDS",
                        dest="timeout",
                        help="idle timeout: a peer is disconnected when nothing has moved "
                        "either way for this long (not a connect timeout); 0 turns it off "
                        "(default 300, greeting 5)")
    limits.add_argument("--request-timeout", type=seconds, metavar="SECONDS",
                        help="time for a whole request line (gopher, charcount, greeting), "
                        "however slowly it drips in; 0 turns it off (default 30, greeting 5)")
    limits.add_argument("--max-line", type=positive_int, metavar="BYTES",
                        help="longest line or request accepted (default 8192)")
    limits.add_argument("--max-conns", type=positive_int, metavar="N",
                        help="connections served at once; more wait in the backlog "
                        "(default 1024)")
    limits.add_argument("--max-output", type=positive_int, metavar="BYTES",
                        help="output queued for a slow reader before reading from it stops "
                        "(default 262144)")
    limits.add_argument("--threads", type=positive_int, metavar="N",
                        help="threads for blocking handlers (default 64)")
    limits.add_argument("--max-datagram", type=positive_int, metavar="BYTES",
                        help="larger datagrams are dropped (default 65535)")
    limits.add_argument("--grace", type=seconds, metavar="SECONDS",
                        help="on SIGINT/SIGTERM, time connections get to finish (default 5)")
    sock = p.add_argument_group("socket options")
    sock.add_argument("--nodelay", action=argparse.BooleanOptionalAction, default=None,
                      help="TCP_NODELAY (default on)")
    sock.add_argument("--keepalive", action=argparse.BooleanOptionalAction, default=None,
                      help="SO_KEEPALIVE (default off)")
    sock.add_argument("--linger", type=int, metavar="SECONDS",
                      help="SO_LINGER; 0 resets connections on close")
    sock.add_argument("--rcvbuf", type=positive_int, metavar="BYTES", help="SO_RCVBUF")
    sock.add_argument("--sndbuf", type=positive_int, metavar="BYTES", help="SO_SNDBUF")
    sock.add_argument("--backlog", type=positive_int, metavar="N",
                      help="listen backlog (default 511)")
    sock.add_argument("--broadcast", action="store_true", default=None,
                      help="SO_BROADCAST, for UDP")
    sock.add_argument("--reuse-port", action="store_true", default=None,
                      help="SO_REUSEPORT: let several processes share the port")
    add_access_options(p)
    add_logging_options(p)


def _network(text: str) -> str:
    try:
        parse_network(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _rate(text: str) -> float | str:
    if text.lower() == "off":
        return "off"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or off)") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive (or off)")
    return value


def _factor(text: str) -> float | str:
    if text.lower() == "off":
        return "off"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or off)") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more (or off)")
    return value


def _count_or_off(text: str) -> int | str:
    if text.lower() in ("off", "0"):
        return "off"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive whole number (or 0/off for no limit)"
        ) from None


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except EndpointError as exc:  # argparse shows this message, not a generic one
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_access_options(p: argparse.ArgumentParser) -> None:
    tls = p.add_argument_group(
        "TLS and the PROXY protocol",
        "TLS runs on tls:HOST:PORT and unix+tls:PATH listeners; the PROXY protocol on every "
        "stream listener of the service (give direct clients a listener of their own)",
    )
    tls.add_argument("--cert", metavar="FILE",
                     help="certificate chain, PEM (with the key, unless --key); read again on "
                     "SIGHUP")
    tls.add_argument("--key", metavar="FILE", help="private key, PEM")
    tls.add_argument("--client-ca", metavar="FILE",
                     help="require client certificates signed by this CA; the verified subject "
                     "reaches handlers as peer.tls_subject")
    tls.add_argument("--alpn", type=_protocol_names, metavar="P1,P2",
                     help="ALPN protocols offered, most preferred first")
    tls.add_argument("--handshake-timeout", type=positive_seconds, metavar="SECONDS",
                     help="a TLS handshake not done in this time is dropped (default 10)")
    tls.add_argument("--proxy-protocol", choices=("v1", "v2", "any"),
                     help="peers in --proxy-from must begin with a PROXY header (HAProxy, "
                     "nginx); its client address is used everywhere")
    tls.add_argument("--proxy-from", metavar="CIDR", action="append",
                     help="a balancer's address or network (repeatable); other peers are "
                     "refused on a PROXY listener, never guessed")
    tls.add_argument("--proxy-timeout", type=positive_seconds, metavar="SECONDS",
                     help="the whole PROXY header within this (default 3)")
    acc = p.add_argument_group(
        f"access control (most specific allow/deny match wins; see {doc('classic.md')})")
    acc.add_argument("--allow", metavar="NET", action="append", type=_network,
                     help="allow this address or CIDR network (repeatable); once any is "
                     "given, addresses matching none are refused")
    acc.add_argument("--deny", metavar="NET", action="append", type=_network,
                     help="refuse this address or CIDR network (repeatable)")
    acc.add_argument("--per-source", type=_count_or_off, metavar="N|0",
                     help="concurrent connections from one address; more are refused. 0 or "
                     "off: no limit (behind a load balancer or NAT, where clients share one "
                     f"address). Default: a quarter of --max-conns, at most {PER_SOURCE_CAP}")
    acc.add_argument("--instances", type=positive_int, metavar="N",
                     help="concurrent connections in all; more are refused (default: no limit)")
    acc.add_argument("--cps", type=_rate, metavar="RATE",
                     help="new connections per second; more are refused (default: no limit)")
    acc.add_argument("--max-amplification", type=_factor, metavar="X|off",
                     help="UDP: no reply larger than X times the request plus the service's "
                     "fixed answer size (default 1.0)")
    acc.add_argument("--udp-rate", type=_rate, metavar="RATE|off",
                     help="UDP: datagrams answered per second per source (default 50)")
    acc.add_argument("--udp-burst", type=positive_int, metavar="N",
                     help="UDP: burst allowed over --udp-rate (default 100)")
    acc.add_argument("--drop-source-port", type=_port, metavar="PORT", action="append",
                     dest="drop_source_ports",
                     help="UDP: drop datagrams from this source port, besides 7, 13, 17, 19, "
                     "37 and the server's own UDP ports (repeatable)")


def _protocol_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected protocol names such as h2,http/1.1: {text!r}")
    return names


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds: {text!r}")
    return value


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The service settings given on the command line (config-file keys)."""
    out: dict[str, Any] = {}
    for key in SERVICE_KEYS:
        if key in ("service", "listen"):
            continue
        value = getattr(args, key, None)
        if value is not None:
            out[key] = None if value == "off" else value  # --udp-rate off and the like
    return out


def option_name(key: str) -> str:
    """The command-line option for a setting (``exec_scripts``: ``--exec-scripts``)."""
    if key == "exec":
        return "a PROGRAM after --"
    if key == "drop_source_ports":
        return "--drop-source-port"
    return "--" + key.replace("_", "-")


def check_applicable(kind: str, settings: dict[str, Any]) -> None:
    """A service option given to a service that does not take it is a usage
    error naming the option and the service (``--token`` on echo)."""
    for key in settings:
        if key in own_keys() and not takes(kind, key):
            if key == "exec":  # the message tests and scripts know
                raise UsageError(f"exec: only the exec service runs a program, not {kind}")
            raise UsageError(
                f"{option_name(key)} does not apply to the {kind} service "
                f"({key}: an option of {owners_of(key)} only)"
            )


def service_config(
    spec: ServiceSpec | str, args: argparse.Namespace, listen: Sequence[str | Endpoint]
) -> ServiceConfig:
    """A :class:`ServiceConfig` for a built-in ``spec`` or a ``MODULE:NAME``
    reference, from the command line. With no ``listen`` and sockets passed
    by systemd (LISTEN_FDS), the service listens on every one of them."""
    kind = spec if isinstance(spec, str) else spec.name
    settings = cli_settings(args)
    check_applicable(kind, settings)
    if listen:
        settings["listen"] = [e if isinstance(e, Endpoint) else parse_endpoint(e) for e in listen]
    elif systemd_sockets_given():
        settings["listen"] = inherited_endpoints()
    elif kind not in SERVICES:
        raise UsageError(
            f"{kind} has no default listener: give one with -l, e.g. "
            f"sockworks serve {kind} -l tcp:127.0.0.1:9000"
        )
    return build_service(kind, settings)


# Descriptors the process holds besides its listeners: stdio, and what the
# event loop opens (uvloop: epoll, io_uring, wakeup pipes, an eventfd, the
# signal socketpair - 13 measured), with room for a few connections.
LOOP_DESCRIPTORS = 32


def _open_descriptors() -> int:
    for fds in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(fds)) - 1  # minus the one listdir had open
        except OSError:
            continue
    return 3  # stdin, stdout, stderr


def check_descriptors(configs: Sequence[ServiceConfig]) -> None:
    """More listeners than the open-file limit can serve is one clear line
    before anything binds, not a traceback or a server that serves half of
    them (the loop accepts on a duplicate of each stream listener)."""
    limit = descriptor_limit()
    if limit is None:
        return
    listeners = [e for c in configs for e in c.listen]
    needed = (
        _open_descriptors()
        + LOOP_DESCRIPTORS
        + sum(2 if e.is_stream else 1 for e in listeners)
    )
    if needed <= limit:
        return
    # Enough for every listener and a full house of connections.
    full = needed + sum(c.limits.max_connections for c in configs)
    suggest = max(4096, 1 << (full - 1).bit_length())
    raise BindError(
        f"{len(listeners)} listeners need about {needed} open files before the first "
        f"connection, over this process's limit of {limit}; {raise_limit_hint(suggest)}"
    )


# A configuration as (re)loaded: its services and grace period.
Loader = Callable[[], tuple[Sequence[ServiceConfig], float]]


def start(configs: Sequence[ServiceConfig], args: argparse.Namespace, grace: float | None,
          on_ready: Callable[[Server], None], where: str = "", *,
          process: ProcessSettings | None = None, reload: Loader | None = None) -> None:
    """Check the descriptors, bind and serve; bind errors name ``where``.
    With ``process.workers``, a supervisor runs that many workers and
    ``reload`` gives the configuration again at each SIGHUP."""
    process = process or ProcessSettings()
    grace = 5.0 if grace is None else grace
    metrics: MetricsEndpoint | None = None
    hooks: list[WorkerHooks] = []
    try:
        check_descriptors(configs)
        setup_logging(args, process.log_format)
        # --user/--group: names resolved and files tried as that user
        # before anything binds; the drop itself comes after binding.
        credentials = resolve_credentials(process.user, process.group)
        check_as(credentials, required_paths(configs, where or None))
        # Bound with the listeners, before anything serves (in use: one line).
        metrics = MetricsEndpoint.bind(process.metrics) if process.metrics else None

        def ready(server: Server) -> None:
            on_ready(server)
            announce_metrics(metrics)

        # A reload runs as the dropped user, so building its services reads
        # their files as that user: one it cannot use is a failed reload.
        if process.workers is None:
            run_services(configs, grace=grace, on_ready=ready, credentials=credentials,
                         metrics=metrics, reload=reload, announce=announce_endpoints)
            return
        # --per-source, --instances and --cps hold for the service as a whole.
        limits = SharedConnectionLimits(slots=SLOTS_PER_WORKER * process.workers)
        hooks.append(limits)
        if metrics is not None:
            hooks.append(WorkerMetrics(metrics))
        first = (configs, grace)
        loads = iter([first])

        def load() -> tuple[Sequence[ServiceConfig], float]:
            # The configuration given, then at each reload a fresh one.
            loaded = next(loads, None)
            if loaded is not None:
                return loaded
            return reload() if reload is not None else first

        announced: list[bool] = []

        def announce_workers(endpoints: Sequence[tuple[str, Endpoint]]) -> None:
            announce_endpoints(endpoints)
            if not announced:  # at start; a reload announces new listeners only
                announced.append(True)
                announce_metrics(metrics)

        Supervisor(load, process.workers, announce=announce_workers,
                   after_bind=lambda server: drop(credentials, unix_socket_paths(server)),
                   notifier=process_notifier(), hooks=hooks).run()
    except BindError as exc:
        if not where:
            raise
        raise BindError(f"{where}: {exc}") from None
    finally:
        for hook in hooks:
            hook.close()
        if metrics is not None:
            metrics.close()


def announce_endpoints(endpoints: Sequence[tuple[str, Endpoint]]) -> None:
    """The ``listening on ENDPOINT`` lines scripts wait for."""
    for name, endpoint in endpoints:
        from_ = f" ({endpoint.source})" if endpoint.source else ""
        say(f"listening on {endpoint}{from_}", service=name, event="listening",
            endpoint=endpoint)


def announce_metrics(metrics: MetricsEndpoint | None) -> None:
    """``metrics on http://HOST:PORT/metrics``, the real port for port 0."""
    if metrics is not None:
        say(f"metrics on {metrics.where}", event="metrics", endpoint=metrics.endpoint)


def announce(server: Server) -> None:
    announce_endpoints(server.endpoints)


def run_serve(args: argparse.Namespace) -> int:
    # systemd's variables are this process's alone: gone from the
    # environment before anything (exec's --pass-env) copies it.
    claim_systemd_environment()
    if args.inetd:
        return serve_inetd(args)
    if args.config is not None:
        if args.service is not None or args.listen or cli_settings(args):
            raise UsageError(
                "--config runs the services its file describes: give their listeners "
                "and options there, not on the command line"
            )
        path: str = args.config
        loaded = load_config(path)
        grace = args.grace if args.grace is not None else loaded.grace

        def reload_file() -> tuple[Sequence[ServiceConfig], float]:
            again = load_config(path)
            grace = args.grace if args.grace is not None else again.grace
            return again.services, 5.0 if grace is None else grace

        start(loaded.services, args, grace, announce, where=path,
              process=process_settings(args, loaded.process), reload=reload_file)
        return EXIT_OK
    if args.service is None:
        raise UsageError("name a SERVICE to run, or give --config FILE.toml")
    kind: str = args.service
    if kind not in SERVICES and not is_app_reference(kind):
        raise UsageError(unknown_service(kind))

    def build() -> ServiceConfig:
        return service_config(get_service(kind) if kind in SERVICES else kind, args, args.listen)

    def rebuild() -> tuple[Sequence[ServiceConfig], float]:
        # The command line cannot change, but what it names can: a quotes
        # file, a gopher root, certificates, your module's code.
        return [build()], 5.0 if args.grace is None else args.grace

    start([build()], args, args.grace, announce, process=process_settings(args), reload=rebuild)
    return EXIT_OK


def serve_inetd(args: argparse.Namespace) -> int:
    """``--inetd``: the one connection (or datagram socket) on standard input."""
    taken = take_stdin()  # a terminal there: one line, before anything changes
    # Standard error may be the connection now: logs go to syslog instead
    # (with it, errors; fail()'s line goes to /dev/null, never the peer).
    setup_logging(args, args.log_format or "text")
    if taken.stderr_is_connection:
        log_to_syslog()
    try:
        ignored = [
            option for option, given in (
                ("--config", args.config is not None), ("--listen", bool(args.listen)),
                ("--workers", args.workers is not None), ("--user", args.user is not None),
                ("--group", args.group is not None), ("--metrics", args.metrics is not None),
            ) if given
        ]
        if ignored:
            raise UsageError(
                f"--inetd serves one service on the connection on standard input: "
                f"{', '.join(ignored)} does not apply (inetd or the unit says who runs it)"
            )
        if args.service is None:
            raise UsageError("--inetd: name the SERVICE to run on standard input")
        kind: str = args.service
        if kind not in SERVICES and not is_app_reference(kind):
            raise UsageError(unknown_service(kind))
        spec = get_service(kind) if kind in SERVICES else kind
        config = service_config(spec, args, [taken.endpoint])
        return run_inetd(config, taken, grace=5.0 if args.grace is None else args.grace)
    except SockworksError as exc:
        if taken.stderr_is_connection:
            logging.getLogger("sockworks").error("%s", exc)
        raise


# The demo runs on fixed ports: how a person moves them when some are taken.
PORT_OFFSET_HINT = "sockworks demo --port-offset N moves every demo port by N"


def demo_listen(spec: ServiceSpec, offset: int) -> list[str]:
    """``spec``'s default listeners with every port moved by ``offset``."""
    out = []
    for text in spec.default_listen:
        endpoint = parse_endpoint(text)
        if endpoint.is_inet:
            port = endpoint.port + offset
            if not 0 < port < 65536:
                raise UsageError(
                    f"--port-offset {offset} would move {spec.name} from port "
                    f"{endpoint.port} to {port}, outside 1-65535"
                )
            endpoint = endpoint.with_port(port)
        out.append(str(endpoint))
    return out


def demo_try_it(spec: ServiceSpec, offset: int) -> str:
    """``spec.try_it`` with its port numbers moved by ``offset``."""
    ports = {parse_endpoint(e).port for e in spec.default_listen}

    def move(match: re.Match[str]) -> str:
        number = int(match.group())
        return str(number + offset) if number in ports else match.group()

    return re.sub(r"\b\d+\b", move, spec.try_it) if offset else spec.try_it


def unavailable(config: ServiceConfig) -> BindError | None:
    """Why ``config`` cannot bind all its (TCP/UDP) listeners now, or None.
    Each is bound and closed again; the server binds for real right after
    (SO_REUSEADDR, so the closed probes do not stand in its way)."""
    for endpoint in config.listen:
        if not endpoint.is_inet:
            continue  # the demo has none; a Unix path would be left behind
        try:
            bind_socket(endpoint, config.options).sock.close()
        except BindError as exc:
            return exc
    return None


def run_demo(args: argparse.Namespace) -> int:
    offset: int = args.port_offset
    # Services with default listeners (exec needs a program and a listener).
    specs = {spec.name: spec for spec in SERVICES.values() if spec.default_listen}
    configs = [service_config(spec, args, demo_listen(spec, offset)) for spec in specs.values()]
    skipped: list[str] = []

    def ready(server: Server) -> None:
        announce(server)
        up = "every built-in service is up" if not skipped else (
            f"{len(configs) - len(skipped)} of {len(configs)} services are up "
            f"({', '.join(skipped)} skipped, see above)"
        )
        print(f"\nsockworks demo: {up}. Talk to them:")
        for name in dict.fromkeys(name for name, _ in server.endpoints):
            spec = specs[name]
            print(f"  {spec.name:<10} {demo_try_it(spec, offset):<36} # {spec.summary}")
        print("\nCtrl-C stops everything.", flush=True)

    # One busy port skips its service, not the whole demo. A port taken
    # between the check and the bind fails the bind: check again, and give
    # up only when nothing new is taken (then the error is something else).
    while True:
        newly = [(c.name, why) for c in configs
                 if c.name not in skipped and (why := unavailable(c)) is not None]
        for name, why in newly:
            skipped.append(name)
            sys.stderr.write(f"sockworks: warning: {name} skipped: {why} ({PORT_OFFSET_HINT})\n")
        sys.stderr.flush()
        running = [c for c in configs if c.name not in skipped]
        if not running:
            raise BindError(f"no demo service could bind its ports; {PORT_OFFSET_HINT}")
        try:
            start(running, args, args.grace, ready)
        except BindError:
            if all(unavailable(c) is None for c in running):
                raise
            continue
        return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    for spec in SERVICES.values():
        print(f"{spec.name:<10} {' '.join(spec.default_listen):<44} {spec.summary}")
    return EXIT_OK
