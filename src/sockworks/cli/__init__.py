"""The ``sockworks`` command: the only code that prints or exits.

Each subcommand is a module with ``register(subparsers)``, which adds its
parser and sets ``func`` to a function taking the parsed arguments and
returning the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .._errors import BindError, SockworksError, UsageError
from . import gopher, netcat, serve
from ._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Parser, examples, fail

COMMANDS = (serve, gopher, netcat)

# Examples for the --help of subcommands whose module gives none.
EXAMPLES = {
    "sockworks": examples(
        ("sockworks serve echo", "run a built-in service"),
        ("sockworks serve mymod:Upper -l tcp:127.0.0.1:9000", "run your own"),
        ("echo hi | sockworks connect 127.0.0.1:7007", "talk to a service"),
    ),
    "demo": examples(
        ("sockworks demo", "every built-in service on its default ports"),
        ("sockworks demo --port-offset 10000", "the same, ports moved: echo on 17007"),
        ("sockworks demo -q", "warnings only, no connection log"),
    ),
    "services": examples(
        ("sockworks services", "the built-in services, their ports and what they do"),
        ("sockworks serve qotd --help", "a service's options"),
    ),
    "gopher": examples(
        ("sockworks gopher 127.0.0.1:7070", "a server's root menu, numbered"),
        ("sockworks gopher gopher://127.0.0.1:7070/0/gopher.md", "one item by URL"),
        ("sockworks gopher 127.0.0.1:7070 --browse", "browse: a number follows, q quits"),
    ),
}


def build_parser() -> Parser:
    parser = Parser(
        prog="sockworks", description="Network services over TCP, UDP and Unix sockets.",
        epilog=EXAMPLES["sockworks"], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sockworks {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    for name, p in sub.choices.items():
        if p.epilog is None and name in EXAMPLES:
            p.epilog = EXAMPLES[name]
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand's parser: "see sockworks serve --help"
        sub = _subparsers(parser).get(getattr(args, "command", None) or "", parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
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


def _subparsers(parser: Parser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def run() -> NoReturn:
    sys.exit(main())
