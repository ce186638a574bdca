"""sockworks: network services over TCP, UDP and Unix sockets.

Write a service in one of three styles and run it with limits, timeouts,
graceful shutdown and logging::

    import sockworks

    def handle(conn):                      # blocking, the seeds' style
        while data := conn.recv(4096):
            conn.sendall(data)

    sockworks.serve(handle, "tcp:127.0.0.1:9000")
"""

from ._access import AccessPolicy, default_per_source
from ._buffer import LineBuffer
from ._config import Limits, ProxySettings, SocketOptions, TLSSettings
from ._drivers import (
    BlockingConnection,
    DatagramConnection,
    IncompleteRead,
    ProtocolDriver,
    Stream,
    make_driver,
)
from ._endpoint import Endpoint, parse_endpoint
from ._errors import (
    BindError,
    CertificateError,
    ConfigError,
    ConnectionClosed,
    EndpointError,
    IdleTimeout,
    LineTooLong,
    LocalProtocolError,
    RemoteProtocolError,
    SockworksError,
    UnknownServiceError,
    UsageError,
)
from ._protocol import (
    DatagramProtocol,
    FileSpan,
    Output,
    Peer,
    Reply,
    StreamProtocol,
    close,
    send,
)
from ._run import run_services, serve
from ._server import Server, ServiceConfig

__version__ = "0.1.0"

__all__ = [
    "AccessPolicy",
    "BindError",
    "CertificateError",
    "BlockingConnection",
    "ConfigError",
    "ConnectionClosed",
    "DatagramConnection",
    "DatagramProtocol",
    "Endpoint",
    "EndpointError",
    "FileSpan",
    "IdleTimeout",
    "IncompleteRead",
    "Limits",
    "LineBuffer",
    "LineTooLong",
    "LocalProtocolError",
    "Output",
    "Peer",
    "ProxySettings",
    "ProtocolDriver",
    "RemoteProtocolError",
    "Reply",
    "Server",
    "ServiceConfig",
    "SocketOptions",
    "SockworksError",
    "Stream",
    "StreamProtocol",
    "TLSSettings",
    "UnknownServiceError",
    "UsageError",
    "close",
    "default_per_source",
    "make_driver",
    "parse_endpoint",
    "run_services",
    "send",
    "serve",
]
