# -*- test-case-name: tests.test_store -*-
"""
A store that keeps a bounded number of each room's newest messages in
memory and forgets everything on restart.  For tests and throwaway servers.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from chatd.interfaces import IMessageStore
from chatd.model import Message, RoomLimitReached

__all__ = ["MemoryStore"]


class _RoomLog:
    def __init__(self, retain: int) -> None:
        self.last_seq = 0
        self.messages: Deque[Message] = deque()
        self.by_client_id: Dict[str, Message] = {}
        self.retain = retain

    def first_seq(self) -> int:
        return self.messages[0].seq if self.messages else self.last_seq + 1


@implementer(IMessageStore)
class MemoryStore:
    """
    Keeps the newest C{retain} messages of each room; older ones are gone,
    and so is their C{client_id} de-duplication.

    @param retain: how many messages to keep per room.
    """

    description = "memory"

    def __init__(self, retain: int = 500) -> None:
        if retain < 1:
            raise ValueError("retain must be at least 1")
        self._retain = retain
        self._rooms: Dict[str, _RoomLog] = {}
        #: Each node's client counts (nodes sharing one memory store live
        #: in one process, so a lease never outlives its node).
        self._presence: Dict[str, Dict[str, int]] = {}

    def open(self) -> Deferred:
        return succeed(None)

    def load_rooms(self) -> Deferred:
        return succeed([(name, log.last_seq) for name, log in self._rooms.items()])

    def room_state(self, name: str) -> Deferred:
        log = self._rooms.get(name)
        if log is None:
            return succeed(None)
        return succeed((log.last_seq, log.first_seq()))

    def create_room(self, name: str, now_ms: int = 0, max_rooms: Optional[int] = None) -> Deferred:
        if name in self._rooms:
            return succeed(False)
        if max_rooms is not None and len(self._rooms) >= max_rooms:
            return fail(RoomLimitReached(max_rooms))
        self._rooms[name] = _RoomLog(self._retain)
        return succeed(True)

    def append(
        self,
        room: str,
        nick: str,
        body: str,
        ts_ms: int,
        client_id: Optional[str],
    ) -> Deferred:
        log = self._rooms[room]
        if client_id is not None and client_id in log.by_client_id:
            return succeed((log.by_client_id[client_id], False))
        log.last_seq += 1
        message = Message(room, log.last_seq, nick, body, ts_ms, client_id)
        log.messages.append(message)
        if client_id is not None:
            log.by_client_id[client_id] = message
        if len(log.messages) > log.retain:
            old = log.messages.popleft()
            if old.client_id is not None:
                log.by_client_id.pop(old.client_id, None)
        return succeed((message, True))

    def read_after(self, room: str, after: int, limit: int) -> Deferred:
        log = self._rooms[room]
        first = log.first_seq()
        start = max(after + 1 - first, 0)
        messages = log.messages
        end = min(len(messages), start + limit)
        result: Tuple[List[Message], int] = (
            [messages[i] for i in range(start, end)],
            first,
        )
        return succeed(result)

    def read_before(self, room: str, before: int, limit: int) -> Deferred:
        log = self._rooms[room]
        first = log.first_seq()
        end = min(max(before - first, 0), len(log.messages))
        start = max(end - limit, 0)
        return succeed([log.messages[i] for i in range(start, end)])

    def prune(self, before_ms: int) -> Deferred:
        deleted = 0
        for log in self._rooms.values():
            while log.messages and log.messages[0].ts_ms < before_ms:
                old = log.messages.popleft()
                if old.client_id is not None:
                    log.by_client_id.pop(old.client_id, None)
                deleted += 1
        return succeed(deleted)

    def share_presence(self, node: str, clients: Dict[str, int], ttl_ms: int) -> Deferred:
        self._presence[node] = {room: count for room, count in clients.items() if count}
        others: Dict[str, int] = {}
        for other, counts in self._presence.items():
            if other != node:
                for room, count in counts.items():
                    others[room] = others.get(room, 0) + count
        return succeed(others)

    def ping(self) -> Deferred:
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)
