# -*- test-case-name: tests -*-
"""
chatd: a real-time chat server in one Twisted process.

The pieces: L{chatd.model} (the value types and input rules, a leaf
module), L{chatd.core} and L{chatd.room} (rooms, seq order, fan-out; no
I/O), the adapters around them (L{chatd.web} and L{chatd._http},
L{chatd.ws}, L{chatd.store}, L{chatd.bus}), L{chatd.service} (the
services' lifetimes) and L{chatd.tap}, which picks the implementations
and wires them together for C{twistd chatd}.
"""

from chatd._version import __version__

__all__ = ["__version__"]
