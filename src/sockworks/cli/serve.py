"""``sockworks serve``, ``sockworks demo`` and ``sockworks services``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .._config import SocketOptions
from .._endpoint import parse_endpoint
from .._run import run_services
from .._server import Server, ServiceConfig
from ..services import SERVICES, ServiceOptions, ServiceSpec, get_service
from ._common import EXIT_OK, add_logging_options, positive_int, seconds, setup_logging


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run a service", description="Run one service.")
    serve.add_argument("service", metavar="SERVICE", help="service name: " + ", ".join(SERVICES))
    serve.add_argument(
        "--listen", "-l", metavar="ENDPOINT", action="append", default=[],
        help="where to listen (repeatable): tcp:HOST:PORT, tcp:[::1]:PORT, udp:HOST:PORT, "
        "unix:PATH, unixgram:PATH; HOST:PORT means TCP. Default: the service's own ports "
        "on 127.0.0.1",
    )
    service = serve.add_argument_group("service options")
    service.add_argument("--token", help="greeting: the token that is welcomed (default 1)")
    add_server_options(serve)
    serve.set_defaults(func=run_serve)

    demo = sub.add_parser(
        "demo", help="run every built-in service on its default ports",
        description="Run every built-in service on its default ports, "
        "and say how to talk to each.",
    )
    add_server_options(demo)
    demo.set_defaults(func=run_demo)

    services = sub.add_parser("services", help="list the built-in services")
    services.set_defaults(func=run_list)


def add_server_options(p: argparse.ArgumentParser) -> None:
    limits = p.add_argument_group("limits (on by default)")
    limits.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="idle timeout; 0 turns it off (default 300, greeting 5)")
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
    limits.add_argument("--grace", type=seconds, default=5.0, metavar="SECONDS",
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
    add_logging_options(p)


def service_config(
    spec: ServiceSpec, args: argparse.Namespace, listen: Sequence[str]
) -> ServiceConfig:
    """A :class:`ServiceConfig` for ``spec`` from the command line."""
    limits = spec.default_limits().updated(
        idle_timeout=args.timeout,
        max_line=args.max_line,
        max_connections=args.max_conns,
        max_output_buffer=args.max_output,
        handler_threads=args.threads,
    )
    options = SocketOptions().updated(
        nodelay=args.nodelay, keepalive=args.keepalive, linger=args.linger,
        rcvbuf=args.rcvbuf, sndbuf=args.sndbuf, backlog=args.backlog,
        broadcast=args.broadcast, reuse_port=args.reuse_port,
    )
    extra: dict[str, Any] = {}
    if getattr(args, "token", None) is not None:
        extra["token"] = args.token
    return ServiceConfig(
        handler=spec.build(ServiceOptions(limits=limits, **extra)),
        listen=tuple(parse_endpoint(e) for e in (listen or spec.default_listen)),
        name=spec.name,
        limits=limits,
        options=options,
    )


def announce(server: Server) -> None:
    """The ``listening on ENDPOINT`` lines scripts wait for."""
    for name, endpoint in server.endpoints:
        sys.stderr.write(f"sockworks: {name} listening on {endpoint}\n")
    sys.stderr.flush()


def run_serve(args: argparse.Namespace) -> int:
    config = service_config(get_service(args.service), args, args.listen)
    setup_logging(args)
    run_services([config], grace=args.grace, on_ready=announce)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    configs = [service_config(spec, args, ()) for spec in SERVICES.values()]
    setup_logging(args)

    def ready(server: Server) -> None:
        announce(server)
        print("\nsockworks demo: every built-in service is up. Talk to them:")
        for spec in SERVICES.values():
            print(f"  {spec.name:<10} {spec.try_it:<36} # {spec.summary}")
        print("\nCtrl-C stops everything.", flush=True)

    run_services(configs, grace=args.grace, on_ready=ready)
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    for spec in SERVICES.values():
        print(f"{spec.name:<10} {' '.join(spec.default_listen):<44} {spec.summary}")
    return EXIT_OK
