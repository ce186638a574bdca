"""What every subcommand shares: the parser class, argument types, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn

from .._logformat import event_line
from .._logformat import handler as json_handler
from .._logformat import is_json as is_json_logging
from .._logformat import set_format as set_log_format

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not a usage dump, and
    starts like every other error: ``sockworks: error:``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"sockworks: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def examples(*lines: tuple[str, str]) -> str:
    """An ``--help`` epilog: commands, each with what it does."""
    width = max(len(command) for command, _ in lines)
    body = "\n".join(f"  {command:<{width}}  # {what}" for command, what in lines)
    return f"examples:\n{body}"


def doc(name: str) -> str:
    """Where a person finds the document ``docs/NAME``: the copy shipped
    inside the package (sockworks/hole, the Gopher documentation hole), so
    the path is true for any install; else the source tree's."""
    from ..services.gopher import HOLE

    shipped = HOLE / name
    return str(shipped.resolve()) if shipped.is_file() else f"docs/{name} in the sockworks source"


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


def setup_logging(args: argparse.Namespace, log_format: str = "text") -> None:
    """Log to stderr at the level -v/-q give: ``text`` lines (the default,
    unchanged), or ``json``, one object per line (see _logformat.py); the
    CLI's own lines (:func:`say`) follow the same format."""
    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.WARNING if args.quiet == 1 else logging.ERROR
    set_log_format(log_format)
    if log_format == "json":
        logging.basicConfig(level=level, handlers=[json_handler(sys.stderr)])
        return
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
    )


def say(message: str, *, service: str | None = None, **fields: Any) -> None:
    """One line of the CLI's own on stderr (``listening on``, ``metrics
    on``): ``sockworks: [SERVICE ]MESSAGE``, or under ``--log-format json``
    an object like a log record's, with ``fields`` (``event=...``)."""
    if is_json_logging():
        logger = f"sockworks.{service}" if service else "sockworks"
        line = event_line(message, logger=logger, service=service, **fields)
    else:
        line = f"sockworks: {service} {message}" if service else f"sockworks: {message}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(message: str, status: int = EXIT_ERROR) -> int:
    """One line on stderr; returns the exit status to use."""
    sys.stderr.write(f"sockworks: error: {message}\n")
    sys.stderr.flush()
    return status
