# -*- test-case-name: tests.test_store -*-
"""
A store that keeps a bounded number of each room's newest messages in
memory and forgets everything on restart.  For tests and throwaway servers.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from chatd.interfaces import IIdentityStore, IMessageStore
from chatd.model import (
    ChatError,
    Guard,
    Headcount,
    Message,
    RoomAccess,
    RoomLimitReached,
    User,
    check_guard,
    check_target,
    settle_room_event,
)

__all__ = ["MemoryStore"]


def _access(log: "_RoomLog") -> RoomAccess:
    access = log.access.copy()
    access.last_seq = log.last_seq
    return access


class _RoomLog:
    def __init__(self, retain: int) -> None:
        self.last_seq = 0
        self.messages: Deque[Message] = deque()
        self.by_client_id: Dict[str, Message] = {}
        self.retain = retain
        #: Members, bans, mutes, topic, as of last_seq.
        self.access = RoomAccess()
        #: The seqs of each held message's edits.
        self.edits: Dict[int, List[int]] = {}

    def first_seq(self) -> int:
        return self.messages[0].seq if self.messages else self.last_seq + 1


@implementer(IMessageStore, IIdentityStore)
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
        #: user id: {room: last read seq}
        self._read_marks: Dict[str, Dict[str, int]] = {}
        #: Each node's users and guests per room (nodes sharing one memory
        #: store live in one process, so a lease never outlives its node).
        self._presence: Dict[str, Dict[str, Headcount]] = {}
        #: id: [name, password hash, disabled]
        self._users: Dict[str, List[Any]] = {}
        #: session: (user_id, csrf, expires_ms)
        self._sessions: Dict[str, Tuple[str, str, int]] = {}
        #: invite: [expires_ms, used_by]
        self._invites: Dict[str, List[Any]] = {}
        #: key id: [digest, name, revoked]
        self._keys: Dict[str, List[Any]] = {}
        self.deployment = secrets.token_hex(16)
        self.secret = secrets.token_hex(32)

    def open(self) -> Deferred:
        return succeed(None)

    def load_rooms(self) -> Deferred:
        return succeed([(name, log.last_seq) for name, log in self._rooms.items()])

    def room_state(self, name: str) -> Deferred:
        log = self._rooms.get(name)
        if log is None:
            return succeed(None)
        return succeed((log.last_seq, log.first_seq()))

    def room_access(self, name: str) -> Deferred:
        log = self._rooms.get(name)
        if log is None:
            return succeed(None)
        return succeed(
            _access(log)
        )

    def create_room(
        self,
        name: str,
        now_ms: int = 0,
        max_rooms: Optional[int] = None,
        private: bool = False,
        guests: bool = True,
        owner: Optional[User] = None,
    ) -> Deferred:
        if name in self._rooms:
            return succeed(False)
        if max_rooms is not None and len(self._rooms) >= max_rooms:
            return fail(RoomLimitReached(max_rooms))
        log = self._rooms[name] = _RoomLog(self._retain)
        log.access.private, log.access.guests = private, guests
        if owner is not None:
            log.access.members[owner.id] = "owner"
            log.access.names[owner.id] = owner.name
        return succeed(True)

    def rooms_of(self, user_id: str) -> Deferred:
        return succeed(
            {
                name: log.access.members[user_id]
                for name, log in self._rooms.items()
                if user_id in log.access.members
            }
        )

    def append(
        self,
        room: str,
        nick: str,
        body: str,
        ts_ms: int,
        client_id: Optional[str],
        user: Optional[User] = None,
        kind: str = "message",
        target: Optional[int] = None,
        meta: Optional[dict] = None,
        guard: Optional[Guard] = None,
    ) -> Deferred:
        log = self._rooms[room]
        if client_id is not None and client_id in log.by_client_id:
            return succeed((log.by_client_id[client_id], False))
        messages = log.messages
        first = log.first_seq()
        try:
            if guard is not None:
                check_guard(log.access, guard, room, ts_ms)
            if kind in ("edit", "delete"):
                assert target is not None
                index = target - first
                check_target(messages[index] if 0 <= index < len(messages) else None, target)
        except ChatError as e:
            return fail(e)
        if kind == "room":
            body, meta = settle_room_event(log.access, meta or {})
        stored = None if user is None else User(user.id, nick)
        message = Message(room, log.last_seq + 1, nick, body, ts_ms, client_id, stored, kind, target, meta)
        log.last_seq += 1
        if kind in ("edit", "delete"):
            assert target is not None
            # The target and (for a deletion) its edits.
            changes = [target, *log.edits.pop(target, ())] if kind == "delete" else [target]
            for seq in changes:
                i = seq - first
                changed = messages[i].changed_by(message) if 0 <= i < len(messages) else None
                if changed is not None:
                    messages[i] = changed
                    if changed.client_id is not None:
                        log.by_client_id[changed.client_id] = changed
            if kind == "edit":
                log.edits.setdefault(target, []).append(message.seq)
        log.access.apply(message)
        messages.append(message)
        if client_id is not None:
            log.by_client_id[client_id] = message
        if len(messages) > log.retain:
            old = messages.popleft()
            if old.client_id is not None:
                log.by_client_id.pop(old.client_id, None)
            log.edits.pop(old.seq, None)
        return succeed((message, True))

    def set_read_markers(self, marks: Dict[Tuple[str, str], int]) -> Deferred:
        for (user_id, room), seq in marks.items():
            if room in self._rooms:
                mine = self._read_marks.setdefault(user_id, {})
                mine[room] = max(seq, mine.get(room, 0))
        return succeed(None)

    def read_markers(self, user_id: str) -> Deferred:
        return succeed(dict(self._read_marks.get(user_id, {})))

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
                log.edits.pop(old.seq, None)
                deleted += 1
        return succeed(deleted)

    def share_presence(self, node: str, rooms: Dict[str, Headcount], ttl_ms: int) -> Deferred:
        self._presence[node] = {
            room: Headcount(dict(here.users), here.guests) for room, here in rooms.items() if here.clients
        }
        others: Dict[str, Headcount] = {}
        for other, leases in self._presence.items():
            if other != node:
                for room, here in leases.items():
                    others.setdefault(room, Headcount()).add(here)
        return succeed(others)

    # -- users, sessions, invitations and API keys ---------------------------

    def add_user(self, user_id: str, name: str, password: Optional[str], now_ms: int) -> Deferred:
        if user_id in self._users:
            return succeed(False)
        self._users[user_id] = [name, password, False]
        return succeed(True)

    def get_user(self, user_id: str) -> Deferred:
        row = self._users.get(user_id)
        return succeed(None if row is None else (row[0], row[1], row[2]))

    def set_password(self, user_id: str, password: str) -> Deferred:
        if user_id in self._users:
            self._users[user_id][1] = password
        return succeed(None)

    def disable_user(self, user_id: str, disabled: bool, now_ms: int) -> Deferred:
        self._users.setdefault(user_id, [user_id, None, False])[2] = disabled
        return self.end_sessions(user_id=user_id)

    def disabled_users(self, user_ids: Sequence[str]) -> Deferred:
        found: Set[str] = {u for u in user_ids if u in self._users and self._users[u][2]}
        return succeed(found)

    def create_session(
        self, session: str, user_id: str, csrf: str, now_ms: int, expires_ms: int
    ) -> Deferred:
        for key in [k for k, v in self._sessions.items() if v[2] < now_ms]:
            del self._sessions[key]
        self._sessions[session] = (user_id, csrf, expires_ms)
        return succeed(None)

    def get_session(self, session: str, now_ms: int) -> Deferred:
        row = self._sessions.get(session)
        if row is None or row[2] < now_ms:
            return succeed(None)
        user = self._users.get(row[0])
        if user is None or user[2]:
            return succeed(None)
        return succeed((row[0], user[0], row[1], row[2]))

    def live_sessions(self, sessions: Sequence[str], now_ms: int) -> Deferred:
        live = set()
        for session in sessions:
            row = self._sessions.get(session)
            user = None if row is None else self._users.get(row[0])
            if row is not None and row[2] >= now_ms and user is not None and not user[2]:
                live.add(session)
        return succeed(live)

    def end_sessions(self, session: Optional[str] = None, user_id: Optional[str] = None) -> Deferred:
        if session is not None:
            return succeed(1 if self._sessions.pop(session, None) is not None else 0)
        ended = [k for k, v in self._sessions.items() if v[0] == user_id]
        for key in ended:
            del self._sessions[key]
        return succeed(len(ended))

    def add_invite(self, invite: str, now_ms: int, expires_ms: int) -> Deferred:
        self._invites[invite] = [expires_ms, None]
        return succeed(None)

    def use_invite(self, invite: str, user_id: str, now_ms: int) -> Deferred:
        row = self._invites.get(invite)
        if row is None or row[1] is not None or row[0] < now_ms:
            return succeed(False)
        row[1] = user_id
        return succeed(True)

    def add_key(self, key_id: str, digest: str, name: str, now_ms: int) -> Deferred:
        self._keys[key_id] = [digest, name, False]
        return succeed(None)

    def get_key(self, key_id: str) -> Deferred:
        row = self._keys.get(key_id)
        return succeed(None if row is None or row[2] else (row[0], row[1]))

    def revoke_key(self, key_id: str, now_ms: int) -> Deferred:
        row = self._keys.get(key_id)
        if row is None or row[2]:
            return succeed(False)
        row[2] = True
        return succeed(True)

    def ping(self) -> Deferred:
        return succeed(None)

    def close(self) -> Deferred:
        return succeed(None)
