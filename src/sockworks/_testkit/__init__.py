"""Test tools shipped to users: a virtual-clock event loop and an in-memory
stream transport, so services are tested without real time or sockets.
Re-exported by :mod:`sockworks.testing`."""

from .clock import VirtualClockLoop, new_virtual_loop, run_virtual
from .transport import MemoryPeer, MemoryTransport, memory_connection

__all__ = [
    "MemoryPeer",
    "MemoryTransport",
    "VirtualClockLoop",
    "memory_connection",
    "new_virtual_loop",
    "run_virtual",
]
