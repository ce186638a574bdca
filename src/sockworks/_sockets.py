"""Creating listening sockets from endpoints, with the seeds' options.

Binding happens before anything is served, so that every error a person can
cause (address in use, permission denied, a live Unix socket) is reported
before the server starts, and the real bound address is known.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

from ._config import SocketOptions
from ._endpoint import Endpoint
from ._errors import BindError
from ._protocol import Peer

Address = tuple[str, int] | tuple[str, int, int, int] | str


@dataclass(slots=True)
class BoundSocket:
    """A bound (and for streams, listening) socket and its real endpoint."""

    sock: socket.socket
    endpoint: Endpoint  # with the real port


def close_bound(bound: BoundSocket) -> None:
    """Close a listener for good; a Unix socket file we made goes with it.
    An inherited socket's file (systemd's) is its owner's, and stays."""
    bound.sock.close()
    endpoint = bound.endpoint
    if endpoint.transport in ("unix", "unixgram") and endpoint.path and not endpoint.inherited:
        try:
            os.unlink(endpoint.path)
        except OSError:
            pass


# SO_ATTACH_FILTER (Linux): a classic BPF program on a socket.
_SO_ATTACH_FILTER = 26
# "return 0": drop every packet (BPF_RET | BPF_K, k = 0).
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)


def refuse_new_connections(bound: BoundSocket) -> None:
    """Before the last accept of a stopping listener: new SYNs are dropped,
    so a client's connection attempt is retried by its kernel and then
    refused by the closed port (a balancer tries another server), instead
    of being queued now and reset by the close. Linux; elsewhere a no-op.
    Not on an inherited socket: systemd keeps it for the next start, and
    the filter would stay on it (what queues meanwhile is the next
    process's to serve)."""
    sock = bound.sock
    if sock.family == socket.AF_UNIX or bound.endpoint.inherited:
        return
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        pass


def _family_for(endpoint: Endpoint) -> tuple[socket.AddressFamily, str]:
    host = endpoint.host
    if endpoint.transport in ("unix", "unixgram"):
        return socket.AF_UNIX, endpoint.path
    if host in ("", "*"):
        # Empty host: all addresses, dual-stack where the kernel allows it.
        return (socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET), ""
    try:
        infos = socket.getaddrinfo(
            host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {host!r} for {endpoint}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def apply_options(sock: socket.socket, options: SocketOptions, *, stream: bool, inet: bool) -> None:
    """Set the per-connection options; used on listeners and accepted sockets."""
    if stream and inet and options.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if stream and options.keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if options.linger is not None:
        import struct

        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, int(options.linger))
        )
    if options.rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.rcvbuf)
    if options.sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sndbuf)


def bind(endpoint: Endpoint, options: SocketOptions) -> BoundSocket:
    """Bind (and listen, for streams) a socket for ``endpoint``."""
    try:
        return _bind(endpoint, options)
    except BindError:
        raise
    except OSError as exc:
        # Out of descriptors (more listeners than the limit allows): a
        # person's error to fix, said in one line with the way out.
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise BindError(f"cannot bind {endpoint}: {out_of_descriptors(exc)}") from None
        raise


def descriptor_limit() -> int | None:
    """This process's open-file limit (the soft one), None if unlimited."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_limit_hint(suggest: int) -> str:
    """How a person raises the open-file limit, in the shell or under systemd."""
    return f"raise it with `ulimit -n {suggest}` or LimitNOFILE={suggest} in the systemd unit"


def out_of_descriptors(exc: OSError) -> str:
    """What EMFILE or ENFILE means, with the limit and how to raise it."""
    if exc.errno == errno.ENFILE:
        return "the system is out of open files (raise fs.file-max with sysctl)"
    limit = descriptor_limit()
    if limit is None:
        return "too many open files"
    return (
        f"too many open files (the limit is {limit} per process;"
        f" {raise_limit_hint(max(4096, 2 * limit))})"
    )


def _adopt(endpoint: Endpoint, options: SocketOptions) -> BoundSocket:
    """An inherited socket (systemd:NAME, fd:N), bound and listening
    already: a duplicate of it, so that the original stays open for as long
    as the process lives (a reload takes the same socket again, and a
    descriptor number is never reused under another name). Nothing of its
    binding is changed: the unit's Backlog=, address and the like hold."""
    assert endpoint.fd is not None
    try:
        sock = socket.socket(fileno=os.dup(endpoint.fd))  # the duplicate is close-on-exec
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise
        raise BindError(f"cannot use {endpoint.source}: {exc.strerror or exc}") from None
    try:
        sock.setblocking(False)
        if endpoint.transport == "udp" and options.broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        # Accepted sockets inherit these from the listener.
        apply_options(sock, options, stream=endpoint.is_stream, inet=endpoint.is_inet)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot use {endpoint.source} ({endpoint}): {exc.strerror}") from None
    return BoundSocket(sock, endpoint)


def _bind(endpoint: Endpoint, options: SocketOptions) -> BoundSocket:
    if endpoint.fd is not None:
        return _adopt(endpoint, options)
    family, host = _family_for(endpoint)
    kind = socket.SOCK_STREAM if endpoint.is_stream else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        _configure_listener(sock, endpoint, options, family, host)
        if family == socket.AF_UNIX:
            _clear_stale_unix_socket(endpoint)
            address: Address = endpoint.path
        else:
            address = (host, endpoint.port)
        try:
            sock.bind(address)
        except OSError as exc:
            raise BindError(_bind_message(endpoint, exc)) from None
        if endpoint.is_stream:
            sock.listen(options.backlog)
        sock.setblocking(False)
        return BoundSocket(sock, _real_endpoint(sock, endpoint))
    except BaseException:
        sock.close()
        raise


def _configure_listener(
    sock: socket.socket,
    endpoint: Endpoint,
    options: SocketOptions,
    family: socket.AddressFamily,
    host: str,
) -> None:
    if family != socket.AF_UNIX and endpoint.is_stream:
        # Without SO_REUSEADDR a restart meets "address in use" while the old
        # connections sit in TIME_WAIT. It never lets two live listeners
        # share a port on Linux (that is SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if options.reuse_port and family != socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        # An empty host means every address, IPv4 too; an explicit IPv6
        # address means that address only, whatever the sysctl default is.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "" else 1)
    if endpoint.transport == "udp" and options.broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    apply_options(sock, options, stream=endpoint.is_stream, inet=endpoint.is_inet)


def _clear_stale_unix_socket(endpoint: Endpoint) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    path = endpoint.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot bind {endpoint}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(f"cannot bind {endpoint}: {path} exists and is not a socket")
    kind = socket.SOCK_STREAM if endpoint.transport == "unix" else socket.SOCK_DGRAM
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left behind by a process that died
        return
    except OSError as exc:
        raise BindError(f"cannot bind {endpoint}: {exc.strerror}") from None
    finally:
        probe.close()
    raise BindError(f"cannot bind {endpoint}: another process is listening on {path}")


def _bind_message(endpoint: Endpoint, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot bind {endpoint}: address already in use"
    if exc.errno == errno.EACCES:
        hint = " (ports below 1024 need privileges)" if 0 < endpoint.port < 1024 else ""
        return f"cannot bind {endpoint}: permission denied{hint}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {endpoint}: address not available on this machine"
    return f"cannot bind {endpoint}: {exc.strerror or exc}"


def _real_endpoint(sock: socket.socket, endpoint: Endpoint) -> Endpoint:
    if not endpoint.is_inet:
        return endpoint
    name = sock.getsockname()
    host = endpoint.host if endpoint.host not in ("", "*") else str(name[0])
    return Endpoint(endpoint.transport, host=host, port=int(name[1]), tls=endpoint.tls)


def format_peer(address: object) -> Peer:
    """A peer address from what the socket calls return."""
    return Peer.from_address(address)
