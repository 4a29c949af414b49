# -*- test-case-name: tests.test_store -*-
"""
Message stores: implementations of L{chatd.interfaces.IMessageStore}.

The SQL stores are imported by L{chatd.tap} only when chosen, so their
drivers load only when used.
"""

from chatd.store.memory import MemoryStore

__all__ = ["MemoryStore"]
