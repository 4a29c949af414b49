# -*- test-case-name: tests.test_bus -*-
"""
Buses: implementations of L{chatd.interfaces.IBus}, chosen by name in
L{chatd.tap}.
"""

from chatd.bus.local import LocalBus

__all__ = ["LocalBus"]
