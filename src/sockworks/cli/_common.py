"""What every subcommand shares: the parser class, argument types, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return value


def add_logging_options(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("logging")
    out.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    out.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.WARNING if args.quiet == 1 else logging.ERROR
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )


def fail(message: str, status: int = EXIT_ERROR) -> int:
    """One line on stderr; returns the exit status to use."""
    sys.stderr.write(f"sockworks: error: {message}\n")
    sys.stderr.flush()
    return status
