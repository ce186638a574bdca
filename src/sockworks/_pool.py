"""Listening sockets that outlive the servers using them.

A reload starts a new configuration on the sockets of the running one:
each listener is matched by its endpoint as configured (the n-th listener
of a service on ``tcp:127.0.0.1:0`` is the same socket at every reload), new ones are
bound, and the ones no longer configured are closed once nothing serves
them. The pool's owner (the supervisor's parent process, or the one
process without workers) drops new attempts and closes the sockets when it
stops; the servers on them do neither.
"""

from __future__ import annotations

import dataclasses
import socket
from collections import Counter
from collections.abc import Sequence

from ._config import SocketOptions
from ._endpoint import Endpoint
from ._sockets import BoundSocket, bind, close_bound, refuse_new_connections

# A listener as configured: (the service, for an ephemeral port; the
# endpoint; which one of its kind).
Key = tuple[str, Endpoint, int]


class SocketPool:
    """The parent's listening sockets, by the endpoint as configured (the
    n-th listener of a service on ``tcp:127.0.0.1:0`` is the same socket at every
    reload): a reload keeps the sockets of the endpoints it keeps."""

    def __init__(self) -> None:
        self.sockets: dict[Key, BoundSocket] = {}

    def attempt(self, *, dup: bool = False) -> Binding:
        return Binding(self, dup=dup)

    def close(self, keys: Sequence[Key] | None = None) -> None:
        """Close these sockets (all when None), unlinking Unix paths we made."""
        for key in list(self.sockets) if keys is None else keys:
            bound = self.sockets.pop(key, None)
            if bound is not None:
                close_bound(bound)

    def stop_accepting(self, keys: Sequence[Key] | None = None) -> None:
        """New connection attempts to these stream sockets are dropped from
        now on (clients retry, then find the port closed); what is queued
        is still accepted by the workers draining."""
        for key in list(self.sockets) if keys is None else keys:
            bound = self.sockets.get(key)
            if bound is not None and bound.endpoint.is_stream:
                refuse_new_connections(bound)


class Binding:
    """One configuration's sockets from the pool: the ones it shares with
    the running configuration, and the ones bound anew for it."""

    def __init__(self, pool: SocketPool, *, dup: bool = False) -> None:
        self.pool = pool
        # A copy of each socket for the server: two servers of one process
        # (a reload without workers) each close their own.
        self.dup = dup
        self.copies: list[socket.socket] = []
        self.keys: list[Key] = []
        self.new: list[Key] = []
        self._seen: Counter[tuple[str, Endpoint]] = Counter()

    def __call__(self, service: str, endpoint: Endpoint, options: SocketOptions) -> BoundSocket:
        # TLS is a layer above the socket: turning it on keeps the socket.
        plain = dataclasses.replace(endpoint, tls=False)
        # A fixed address is the same socket whichever service has it; an
        # ephemeral port (0) is known only as "the service's n-th one".
        owner = service if endpoint.is_inet and not endpoint.port else ""
        key = (owner, plain, self._seen[owner, plain])
        self._seen[owner, plain] += 1
        self.keys.append(key)
        bound = self.pool.sockets.get(key)
        if bound is None:
            bound = bind(endpoint, options)
            self.pool.sockets[key] = bound
            self.new.append(key)
        sock = bound.sock
        if self.dup:
            sock = sock.dup()
            sock.setblocking(False)
            self.copies.append(sock)
        return BoundSocket(sock, dataclasses.replace(bound.endpoint, tls=endpoint.tls))

    def added(self, endpoints: Sequence[tuple[str, Endpoint]]) -> list[tuple[str, Endpoint]]:
        """Of the endpoints of the server this binding served (in the order
        it asked for them), those bound anew for it: the ones to announce."""
        new = set(self.new)
        return [pair for pair, key in zip(endpoints, self.keys, strict=True) if key in new]

    def not_in(self, *others: Binding) -> list[Key]:
        """This binding's listeners that none of ``others`` uses."""
        used = {key for other in others for key in other.keys}
        return [key for key in self.keys if key not in used]

    def rollback(self) -> None:
        """The configuration will not run: close what was bound for it."""
        for sock in self.copies:
            sock.close()
        self.copies.clear()
        self.pool.close(self.new)
        self.new.clear()
