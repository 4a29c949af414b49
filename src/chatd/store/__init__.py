# -*- test-case-name: tests.test_store -*-
"""
Message stores: implementations of L{chatd.interfaces.IMessageStore}.

The SQL stores are imported by L{chatd.tap} only when chosen, so their
drivers load only when used.
"""

from chatd.store._sql import StoreError
from chatd.store.memory import MemoryStore
from chatd.store.postgres import redact

__all__ = ["MemoryStore", "StoreError", "redact"]
