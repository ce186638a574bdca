"""The ``sockworks`` command: the only code that prints or exits.

Each subcommand is a module with ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments and
returning the exit status.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .._errors import BindError, SockworksError, UsageError
from . import gopher, netcat, serve
from ._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Parser, fail

COMMANDS = (serve, gopher, netcat)


def build_parser() -> Parser:
    parser = Parser(
        prog="sockworks", description="Network services over TCP, UDP and Unix sockets."
    )
    parser.add_argument("--version", action="version", version=f"sockworks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except BindError as exc:
        return fail(str(exc), EXIT_ERROR)
    except UsageError as exc:
        return fail(str(exc), EXIT_USAGE)
    except SockworksError as exc:
        return fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_OK


def run() -> NoReturn:
    sys.exit(main())
