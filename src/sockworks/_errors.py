"""The error hierarchy.

Two families, as in h11: what a *person running sockworks* got wrong
(:class:`UsageError` and its children: a bad endpoint, a port in use), and
what a *peer on the network* did (:class:`RemoteProtocolError`: a line too
long, garbage). The CLI turns the first family into one line on stderr and a
non-zero exit; the server turns the second into a log line and a closed
connection, never a traceback.
"""

from __future__ import annotations


class SockworksError(Exception):
    """Base class of every error sockworks raises on purpose."""


class UsageError(SockworksError):
    """Something the person running sockworks can fix: bad input or config."""


class EndpointError(UsageError, ValueError):
    """An endpoint string that does not parse."""


class BindError(UsageError, OSError):
    """A listener could not be bound (address in use, permission denied…)."""


class ConfigError(UsageError):
    """A configuration file or option that is not valid."""


class UnknownServiceError(UsageError, LookupError):
    """A service name that is not registered."""


class RemoteProtocolError(SockworksError):
    """The peer broke the protocol; the connection is closed with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LineTooLong(RemoteProtocolError):
    """The peer sent a line longer than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"line longer than {limit} bytes")
        self.limit = limit


class ConnectionClosed(SockworksError):
    """The connection is gone (reset, broken pipe, or closed by shutdown)."""


class LocalProtocolError(SockworksError):
    """Our own side broke the connection's rules: output of the wrong type,
    output after close, a half-close twice. A bug in the handler, reported
    where it happens (h11's LocalProtocolError)."""


class IdleTimeout(ConnectionClosed, TimeoutError):
    """The peer was idle for the idle timeout: raised by a read or write
    that was waiting on it, in every handler style."""


class CertificateError(SockworksError):
    """A certificate or key that cannot be loaded (unreadable, not PEM, the
    key not matching the certificate): found at start, before binding."""
