"""``--log-format json``: one JSON object per log line, for journald and
log shippers.

Every line has ``time`` (ISO 8601, UTC, milliseconds), ``level``,
``logger``, ``message`` and ``pid``; ``service`` when the line is about one
(its logger is the service's), ``worker`` in a worker process, ``exc``
(the traceback, one string) when there is one. Lines about a connection
add what the engine passes as ``extra``: ``event`` (connected, closed,
refused, dropped, error, listening, metrics), ``peer``, ``duration``
(seconds), ``bytes_in``, ``bytes_out``, ``reason``, ``request`` (what the
peer asked for, such as a Gopher selector), ``endpoint``.

The output is ASCII (``ensure_ascii``): valid whatever the stream's
encoding, and a peer's bytes can never break a line or the JSON. Text the
peer supplied that is not valid Unicode (lone surrogates) becomes U+FFFD.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

# The worker number in a worker process (set by the supervisor after
# fork); None in a single process or the supervising parent.
WORKER: int | None = None


def set_worker(slot: int | None) -> None:
    """This process is worker ``slot`` (the supervisor sets it after fork)."""
    global WORKER
    WORKER = slot


# Structured fields a record may carry (``extra=``), in output order.
FIELDS = (
    "event",
    "peer",
    "endpoint",
    "duration",
    "bytes_in",
    "bytes_out",
    "reason",
    "request",
)

# Logger name -> service name, for the services' own loggers
# (``sockworks.NAME``; see :func:`service_logger`).
_SERVICES: dict[str, str] = {}


def service_logger(name: str) -> logging.Logger:
    """The logger of service ``name``: its lines carry ``service``."""
    logger = logging.getLogger(f"sockworks.{name}")
    _SERVICES[logger.name] = name
    return logger


def _clean(text: str) -> str:
    """``text`` without lone surrogates (bytes that were not UTF-8,
    decoded with surrogateescape): those have no valid JSON form."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _value(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _clean(str(value))  # a Peer, an Endpoint: their log form


def iso_time(created: float) -> str:
    """``2026-12-02T09:28:04.123Z``."""
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def record_fields(record: logging.LogRecord, message: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": iso_time(record.created),
        "level": record.levelname,
        "logger": record.name,
    }
    attrs = record.__dict__
    service = attrs.get("service") or _SERVICES.get(record.name)
    if service is not None:
        out["service"] = _value(service)
    out["message"] = _clean(message)
    for key in FIELDS:
        value = attrs.get(key)
        if value is not None:
            out[key] = _value(value)
        elif key == "reason" and key in attrs:
            out[key] = None  # a closing line's reason: null is a normal close
    out["pid"] = record.process if record.process is not None else os.getpid()
    if WORKER is not None:
        out["worker"] = WORKER
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module's docs)."""

    def format(self, record: logging.LogRecord) -> str:
        out = record_fields(record, record.getMessage())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = _clean(record.exc_text)
        if record.stack_info:
            out["stack"] = _clean(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=True)


def event_line(message: str, *, logger: str = "sockworks", level: str = "INFO",
               **fields: Any) -> str:
    """A JSON line for what the CLI writes itself (``listening on``,
    ``metrics on``), shaped like a log record's."""
    record = logging.LogRecord(logger, getattr(logging, level), "", 0, message, None, None)
    record.__dict__.update(fields)
    return JsonFormatter().format(record)


# The format the CLI set up (``setup_logging``): what its own lines follow.
_FORMAT = "text"


def set_format(fmt: str) -> None:
    global _FORMAT
    _FORMAT = fmt


def is_json() -> bool:
    return _FORMAT == "json"


def handler(stream: Any = None) -> logging.Handler:
    """A stderr handler writing JSON lines."""
    out = logging.StreamHandler(sys.stderr if stream is None else stream)
    out.setFormatter(JsonFormatter())
    return out
