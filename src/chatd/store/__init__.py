# -*- test-case-name: tests.test_store -*-
"""
Message stores: implementations of L{chatd.interfaces.IMessageStore}.
"""

from chatd.store.memory import MemoryStore

__all__ = ["MemoryStore"]
