# -*- test-case-name: tests -*-
"""
chatd: a real-time chat server in one Twisted process.

The pieces: L{chatd.core} (rooms, messages, seq numbers, fan-out; no I/O),
the adapters around it (L{chatd.web}, L{chatd.ws}, L{chatd.store}) and
L{chatd.tap}, which wires them together for C{twistd chatd}.
"""

from chatd._version import __version__

__all__ = ["__version__"]
