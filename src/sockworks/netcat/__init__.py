"""A netcat-class client and listener: ``sockworks connect`` and ``listen``.

::

    from sockworks import netcat

    netcat.connect("tcp:example.org:443", netcat.NetcatOptions(tls=netcat.TLSOptions()))
    open_ports = netcat.scan("127.0.0.1", netcat.parse_ports("20-25,80"))

stdin goes to the socket and the socket to stdout (any file descriptors),
binary-safe, over tcp, udp, unix and unixgram, optionally over TLS; or
(:func:`exec_connect`, :func:`exec_listen`) a program's stdin and stdout
are the connection, as with ``ncat -e``. The library never prints: what a
person should see arrives through :class:`Hooks`, failures as
:class:`NetworkError` (the network's fault) or :class:`~sockworks.UsageError`
(the caller's).
"""

from ._exec import (
    ExecError,
    check_command,
    connection_environ,
    exec_connect,
    exec_listen,
    parse_command,
    program_environ,
)
from ._relay import (
    BUFSIZE,
    Hooks,
    IdleTimeout,
    NetcatOptions,
    NetworkError,
    connect,
    describe_error,
    listen,
    scan,
)
from ._text import (
    AddressFilter,
    CrlfTranslator,
    hexdump,
    parse_ports,
    parse_source,
    split_host_ports,
)
from ._tls import TLSOptions, describe_tls_error

__all__ = [
    "BUFSIZE",
    "AddressFilter",
    "CrlfTranslator",
    "ExecError",
    "Hooks",
    "IdleTimeout",
    "NetcatOptions",
    "NetworkError",
    "TLSOptions",
    "check_command",
    "connect",
    "connection_environ",
    "describe_error",
    "describe_tls_error",
    "exec_connect",
    "exec_listen",
    "hexdump",
    "listen",
    "parse_command",
    "parse_ports",
    "parse_source",
    "program_environ",
    "scan",
    "split_host_ports",
]
