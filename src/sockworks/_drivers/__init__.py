"""Drivers: each runs one handler style on the shared server core.

:func:`make_driver` picks the driver from what the user wrote:

* a :class:`StreamProtocol` or :class:`DatagramProtocol` subclass (or a
  :class:`ProtocolDriver` pairing both) - the sans-I/O style;
* an ``async def handle(stream)`` - the async style;
* any other ``def handle(conn)`` - the blocking style, on threads.
"""

from __future__ import annotations

import inspect
from typing import Any

from .._core import Driver
from .._errors import ConfigError
from .._protocol import DatagramProtocol, StreamProtocol
from .async_handler import AsyncHandlerDriver, IncompleteRead, Stream
from .blocking import BlockingConnection, BlockingDriver, DatagramConnection
from .protocol import ProtocolConnection, ProtocolDriver
from .stream import StreamCore

__all__ = [
    "AsyncHandlerDriver",
    "BlockingConnection",
    "BlockingDriver",
    "DatagramConnection",
    "IncompleteRead",
    "ProtocolConnection",
    "ProtocolDriver",
    "Stream",
    "StreamCore",
    "make_driver",
]


def make_driver(handler: Any) -> Driver:
    """The driver for ``handler``, chosen by its kind (see module docs)."""
    if isinstance(handler, Driver):
        if type(handler) is ProtocolDriver:  # a subclass keeps its own behaviour
            # A fresh copy per server: drivers hold no state, but keep the
            # rule "one driver per service" true for all of them.
            return ProtocolDriver(handler.stream_factory, handler.datagram_factory)
        return handler
    if inspect.isclass(handler):
        if issubclass(handler, StreamProtocol):
            return ProtocolDriver(stream=handler)
        if issubclass(handler, DatagramProtocol):
            return ProtocolDriver(datagram=handler)
        raise ConfigError(
            f"{handler.__name__} is a class but not a StreamProtocol or DatagramProtocol"
        )
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__
    ):
        return AsyncHandlerDriver(handler)
    if callable(handler):
        return BlockingDriver(handler)
    raise ConfigError(f"cannot serve {handler!r}: not a protocol class or a handler function")
