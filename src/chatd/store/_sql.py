# -*- test-case-name: tests.test_store -*-
"""
What the SQLite and PostgreSQL stores share: versioned schema files,
group commit, and the one place a message's seq is assigned.

All database work runs in L{twisted.enterprise.adbapi} thread pools; the
reactor thread only queues work and fires Deferreds.

Seq assignment happens inside the write transaction: the room's row is
locked (C{BEGIN IMMEDIATE} in SQLite, C{SELECT ... FOR UPDATE} in
PostgreSQL), its C{last_seq} read, the messages inserted with the following
numbers, and C{last_seq} updated, all before COMMIT.  Two processes sharing
one database therefore never hand out the same seq, and since the lock is
held until commit, seq N+1 can only become visible after seq N.
"""

from __future__ import annotations

import json
import secrets
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

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
from chatd.store._schema import schema_files, statements

__all__ = ["SQLStore", "StoreError", "schema_files"]

#: The schema version this chatd writes; databases at an older version are
#: upgraded in place with the upgrade-to-vN.sql steps.
SCHEMA_VERSION = 5

#: The most messages one transaction commits.
MAX_BATCH = 2000


class StoreError(Exception):
    """
    The store cannot be used (unreachable, wrong schema, ...); the message
    is one line a person can act on.
    """


_statements = statements


#: room, nick, body, ts_ms, client_id, user id, kind, target seq, meta, guard.
_Append = Tuple[
    str, str, str, int, Optional[str], Optional[str], str, Optional[int], Optional[dict], Optional[Guard]
]
#: Turns one room's new messages of a batch into the payloads that tell
#: other nodes of them.
Encode = Callable[[str, int, Sequence[Message]], List[bytes]]


class SQLStore:
    """
    An L{chatd.interfaces.IMessageStore} on a DB-API database, written by
    one writer (so batches commit in order) and read by a small pool.

    Subclasses set C{backend}, C{placeholder} and C{lock_rooms}, and build
    the pools.
    """

    log = Logger()

    backend = ""
    description = ""
    # DB-API paramstyle marker for this backend's driver.
    placeholder = "?"
    # Appended to the SELECT that reads a room's last_seq for writing.
    lock_rooms = ""
    # Executed first in every write transaction (None: the driver begins).
    begin: Optional[str] = None
    # Begins a read whose statements all see one snapshot.
    read_snapshot: Optional[str] = None
    # Keeps two processes from counting the rooms at once (before a create).
    lock_room_count = ""
    # The database's clock, in ms since the epoch (for presence leases).
    now_ms = ""
    # Forgets other nodes' expired leases ({now}: now_ms; ?: this node).
    expire_presence = "DELETE FROM presence WHERE expires_ms < {now} AND node <> ?"

    def __init__(self, write_pool: adbapi.ConnectionPool, read_pool: adbapi.ConnectionPool) -> None:
        self._write = write_pool
        self._read = read_pool
        self._pending: List[Tuple[_Append, Deferred]] = []
        self._flushing = False
        self._idle: List[Deferred] = []
        self._closed = False
        #: This deployment's random name (from the store, once open): the
        #: nodes sharing this store share it, and nobody else has it.
        self.deployment: Optional[str] = None
        #: The deployment's secret, shared by its nodes (once open).
        self.secret: Optional[str] = None
        #: How commits are announced in their own transaction, if they are
        #: (L{notify_commits}).
        self._notify: Optional[Encode] = None

    def _sql(self, query: str) -> str:
        return query.replace("?", self.placeholder)

    # -- schema --------------------------------------------------------------

    def _sqlalchemy_url(self) -> str:
        """
        The database's URL as SQLAlchemy (and so Alembic) names it.
        """
        raise NotImplementedError

    def _prepare_migration(self, engine: Any) -> None:
        """
        Set up C{engine} before it migrates (SQLite: its transactions).
        """

    def _lock_schema(self, connection: Any) -> None:
        """
        In the migration's transaction: keep two processes from migrating
        the same database at once.
        """

    def open(self) -> Deferred:
        """
        Connect, and create or upgrade the schema (Alembic, in a database
        thread).

        @return: a Deferred firing with the schema version, or failing with
            L{StoreError}.
        """
        d = self._write.runWithConnection(self._open)

        def explain(failure: Failure) -> Failure:
            if failure.check(StoreError):
                return failure
            message = str(failure.value).strip().splitlines()
            reason = message[0] if message else repr(failure.value)
            raise StoreError(f"cannot open the {self.description} store: {reason}")

        return d.addErrback(explain)

    def _open(self, conn: Any) -> int:
        version = self._migrate()
        # The deployment's secret (which signs session cookies): made here,
        # by the operating system's generator, once for every node.
        conn.execute(
            self._sql("UPDATE deployment SET secret = ? WHERE secret IS NULL"),
            (secrets.token_hex(32),),
        )
        conn.commit()
        self.deployment, self.secret = conn.execute("SELECT id, secret FROM deployment").fetchone()
        conn.commit()
        return version

    def _migrate(self) -> int:
        """
        In a database thread: bring the schema to L{SCHEMA_VERSION} with
        Alembic, on a connection of its own, in one transaction under the
        schema's lock.  A database made before chatd used Alembic (it has
        only C{schema_version}) is first stamped with its version.
        """
        from alembic import command
        from alembic.config import Config
        from alembic.util.exc import CommandError
        from sqlalchemy import create_engine, inspect, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(self._sqlalchemy_url(), poolclass=NullPool)
        self._prepare_migration(engine)
        config = Config()
        config.set_main_option("script_location", "chatd.store:migrations")
        try:
            with engine.begin() as connection:
                self._lock_schema(connection)
                config.attributes["connection"] = connection
                tables = set(inspect(connection).get_table_names())
                version = 0
                if "schema_version" in tables:
                    version = int(connection.execute(text("SELECT version FROM schema_version")).scalar_one())
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database's schema is version {version}, newer than this "
                        f"chatd knows ({SCHEMA_VERSION}); upgrade chatd"
                    )
                if version and "alembic_version" not in tables:
                    command.stamp(config, f"v{version}")
                before = version
                command.upgrade(config, "head")
                (version,) = connection.execute(text("SELECT version FROM schema_version")).one()
        except CommandError as e:
            raise StoreError(f"cannot migrate the {self.description} store: {e}") from None
        finally:
            engine.dispose()
        if before and before != version:
            self.log.info(
                "Upgraded the {store} schema from v{before} to v{version}",
                store=self.description, before=before, version=version,
            )
        return int(version)

    # -- rooms ---------------------------------------------------------------

    def load_rooms(self) -> Deferred:
        def load(conn: Any) -> List[Tuple[str, int]]:
            rows = conn.execute("SELECT name, last_seq FROM rooms ORDER BY name").fetchall()
            return [(name, last_seq) for name, last_seq in rows]

        return self._read.runWithConnection(load)

    def room_state(self, name: str) -> Deferred:
        def read(conn: Any) -> Optional[Tuple[int, int]]:
            row = conn.execute(
                self._sql("SELECT last_seq, first_seq FROM rooms WHERE name = ?"), (name,)
            ).fetchone()
            return None if row is None else (int(row[0]), int(row[1]))

        return self._read.runWithConnection(read)

    def room_access(self, name: str) -> Deferred:
        def read(conn: Any) -> Optional[RoomAccess]:
            # One snapshot: the members, bans and mutes as of exactly that
            # last_seq (one read transaction; repeatable read on PostgreSQL).
            if self.read_snapshot:
                conn.execute(self.read_snapshot)
            row = conn.execute(
                self._sql(
                    "SELECT id, last_seq, private, guests, topic, edits FROM rooms WHERE name = ?"
                ),
                (name,),
            ).fetchone()
            if row is None:
                return None
            return self._access(conn, row)

        return self._read.runWithConnection(read)

    def _access(self, conn: Any, row: Sequence[Any], with_members: bool = True) -> RoomAccess:
        """
        A room's access from its row (C{id, last_seq, private, guests,
        topic, edits}), its members (unless not C{with_members}) and its
        restrictions.
        """
        room_id, last_seq, private, guests, topic, edits = row
        members = []
        if with_members:
            members = conn.execute(
                self._sql("SELECT user_id, role, name FROM members WHERE room_id = ?"), (room_id,)
            ).fetchall()
        restrictions = conn.execute(
            self._sql("SELECT user_id, action, until_ms FROM restrictions WHERE room_id = ?"),
            (room_id,),
        ).fetchall()
        access = RoomAccess(
            bool(private),
            bool(guests),
            {user_id: role for user_id, role, _ in members},
            int(last_seq),
            {user_id: member_name for user_id, _, member_name in members},
            topic,
            bool(edits),
        )
        for user_id, action, until_ms in restrictions:
            (access.bans if action == "ban" else access.mutes)[user_id] = until_ms
        return access

    def create_room(
        self,
        name: str,
        now_ms: int = 0,
        max_rooms: Optional[int] = None,
        private: bool = False,
        guests: bool = True,
        owner: Optional[User] = None,
    ) -> Deferred:
        def create(conn: Any) -> bool:
            if self.begin:
                conn.execute(self.begin)
            if max_rooms is not None:
                if self.lock_room_count:
                    conn.execute(self.lock_room_count)
                found = conn.execute(
                    self._sql("SELECT 1 FROM rooms WHERE name = ?"), (name,)
                ).fetchone()
                if found is not None:
                    return False
                (count,) = conn.execute("SELECT COUNT(*) FROM rooms").fetchone()
                if count >= max_rooms:
                    raise RoomLimitReached(max_rooms)
            cursor = conn.execute(
                self._sql(
                    "INSERT INTO rooms (name, last_seq, created_ms, private, guests) "
                    "VALUES (?, 0, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
                ),
                (name, now_ms, private, guests),
            )
            if cursor.rowcount != 1:
                return False
            if owner is not None:
                conn.execute(
                    self._sql(
                            "INSERT INTO members (room_id, user_id, role, name) "
                        "SELECT id, ?, 'owner', ? FROM rooms WHERE name = ?"
                    ),
                    (owner.id, owner.name, name),
                )
            return True

        return self._write.runWithConnection(create)

    def rooms_of(self, user_id: str) -> Deferred:
        """
        @return: a Deferred firing with C{{room: role}} of C{user_id}.
        """

        def read(conn: Any) -> Dict[str, str]:
            rows = conn.execute(
                self._sql(
                    "SELECT r.name, m.role FROM members m JOIN rooms r ON r.id = m.room_id "
                    "WHERE m.user_id = ?"
                ),
                (user_id,),
            ).fetchall()
            return {name: role for name, role in rows}

        return self._read.runWithConnection(read)

    # -- writing: group commit -----------------------------------------------

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
        if self._closed:
            return _failed(StoreError("the store is closed"))
        d: Deferred = Deferred()
        user_id = None if user is None else user.id
        self._pending.append(((room, nick, body, ts_ms, client_id, user_id, kind, target, meta, guard), d))
        if not self._flushing:
            self._flush()
        return d

    def _flush(self) -> None:
        """
        Commit everything queued in one transaction; whatever arrives
        meanwhile waits for the next.  Under load, batches grow by
        themselves; when idle, a message is committed at once.
        """
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        self._flushing = True
        d = self._write.runWithConnection(self._append_batch, [item for item, _ in batch])

        def committed(results: List[Union[Tuple[Message, bool], ChatError]]) -> None:
            for (_, waiter), result in zip(batch, results, strict=True):
                if isinstance(result, ChatError):
                    waiter.errback(Failure(result))
                else:
                    waiter.callback(result)

        def failed(failure: Failure) -> None:
            self.log.failure("Committing {count} messages failed", failure, count=len(batch))
            for _, waiter in batch:
                waiter.errback(failure)

        def next_batch(_: object) -> None:
            self._flushing = False
            if self._pending:
                self._flush()
            else:
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)

        d.addCallbacks(committed, failed).addBoth(next_batch)

    def _append_batch(
        self, conn: Any, items: Sequence[_Append]
    ) -> List[Union[Tuple[Message, bool], ChatError]]:
        """
        In a database thread: store a batch, giving each new event the
        next seq of its room.  This is the one place seq numbers are made.

        An event's effects are written in the same transaction: a
        membership, a ban or a mute, the room's settings, and the current
        state of the message an edit or deletion targets (a deletion blanks
        the message and its edits).  An edit or deletion whose target is
        not a message, or was deleted (perhaps earlier in this batch), is
        refused here, with the rooms locked, and gets no seq.
        """
        if self.begin:
            conn.execute(self.begin)
        names = sorted({item[0] for item in items})
        rooms: Dict[str, List[Any]] = {}
        # One query locks every room of the batch, in name order so that two
        # processes cannot deadlock.
        for chunk in _chunks(names):
            found = conn.execute(
                self._sql(
                    f"SELECT name, id, last_seq, private FROM rooms WHERE name IN ({_marks(chunk)}) "
                    "ORDER BY name" + self.lock_rooms
                ),
                chunk,
            ).fetchall()
            for name, room_id, last_seq, private in found:
                rooms[name] = [room_id, last_seq, bool(private)]
        missing = set(names) - set(rooms)
        if missing:
            raise StoreError(f"rooms {sorted(missing)!r} are not in the database")
        # The rooms whose events are checked (L{chatd.model.Guard}) or
        # settled against the room: as committed, then as each event of
        # the batch changes it.
        # A plain post's guard needs only the room's bans and mutes; the
        # members are read where a role counts.
        accesses: Dict[str, RoomAccess] = {}
        checked: Dict[str, bool] = {}
        for item in items:
            guard, kind = item[9], item[6]
            if guard is not None or kind == "room":
                roles = kind != "message" or guard is None or guard.role is not None or guard.over is not None
                checked[item[0]] = checked.get(item[0], False) or roles
        for name, roles in sorted(checked.items()):
            row = conn.execute(
                self._sql("SELECT id, last_seq, private, guests, topic, edits FROM rooms WHERE id = ?"),
                (rooms[name][0],),
            ).fetchone()
            accesses[name] = self._access(conn, row, with_members=roles)
        known = self._originals(conn, rooms, items)
        results: List[Union[Tuple[Message, bool], ChatError]] = []
        rows = []
        #: Messages of this batch, and messages it changed, by (room, seq).
        fresh: Dict[Tuple[str, int], Message] = {}
        #: The effects of the batch's events, in seq order: (statement, args).
        effects: List[Tuple[str, Tuple[Any, ...]]] = []
        for room, nick, body, ts_ms, client_id, user_id, kind, target, meta, guard in items:
            state = rooms[room]
            room_id = state[0]
            if client_id is not None:
                original = known.get((room, client_id))
                if original is not None:
                    results.append((original, False))
                    continue
            access = accesses.get(room)
            if guard is not None:
                assert access is not None
                try:
                    check_guard(access, guard, room, ts_ms)
                except ChatError as e:
                    results.append(e)
                    continue
            if kind == "room":
                assert access is not None
                body, meta = settle_room_event(access, meta or {})
            held: Optional[Message] = None
            if kind in ("edit", "delete"):
                assert target is not None
                held = fresh.get((room, target))
                if held is None:
                    held = self._stored(conn, room, room_id, target)
                try:
                    held = check_target(held, target)
                except ChatError as e:
                    results.append(e)
                    continue
            state[1] += 1
            message = Message(
                room, state[1], nick, body, ts_ms, client_id, _user(user_id, nick), kind, target, meta
            )
            fresh[(room, message.seq)] = message
            if access is not None:
                access.apply(message)
            if client_id is not None:
                known[(room, client_id)] = message
            rows.append((
                room_id, state[1], nick, body, ts_ms, client_id, user_id, kind, target,
                None if meta is None else json.dumps(meta, separators=(",", ":")),
            ))
            if held is not None:
                changed = held.changed_by(message)
                if changed is not None:
                    fresh[(room, held.seq)] = changed
            effects.extend(self._effects(room_id, state[2], message, user_id))
            results.append((message, True))
        if rows:
            # The writes need no answer but success: sent together.
            with self._pipeline(conn):
                conn.cursor().executemany(
                    self._sql(
                        "INSERT INTO messages (room_id, seq, nick, body, ts_ms, client_id, "
                        "user_id, kind, target_seq, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    ),
                    rows,
                )
                for statement, args in effects:
                    conn.execute(self._sql(statement), args)
                conn.cursor().executemany(
                    self._sql("UPDATE rooms SET last_seq = ? WHERE id = ?"),
                    [(state[1], state[0]) for state in rooms.values()],
                )
                if self._notify is not None:
                    self._announce(
                        conn, [r[0] for r in results if not isinstance(r, ChatError) and r[1]]
                    )
        return results

    def _stored(self, conn: Any, room: str, room_id: int, seq: int) -> Optional[Message]:
        row = conn.execute(
            self._sql(f"SELECT {_COLUMNS} FROM messages WHERE room_id = ? AND seq = ?"), (room_id, seq)
        ).fetchone()
        return None if row is None else _message(room, row)

    def _effects(
        self, room_id: int, private: bool, event: Message, user_id: Optional[str]
    ) -> List[Tuple[str, Tuple[Any, ...]]]:
        """
        The statements that make C{event}'s effects (the same ones
        L{chatd.model.RoomAccess.apply} and L{chatd.model.Message.changed_by}
        make in memory).
        """
        kind, meta = event.kind, event.meta or {}
        if kind == "edit":
            return [(
                "UPDATE messages SET body = ?, edited_ms = ? WHERE room_id = ? AND seq = ?",
                (event.body, event.ts_ms, room_id, event.target),
            )]
        if kind == "delete":
            return [
                (
                    "UPDATE messages SET body = '', deleted_ms = ? WHERE room_id = ? AND seq = ?",
                    (event.ts_ms, room_id, event.target),
                ),
                (
                    "UPDATE messages SET body = '' WHERE room_id = ? AND target_seq = ? AND kind = 'edit'",
                    (room_id, event.target),
                ),
            ]
        if kind == "room":
            return [(
                "UPDATE rooms SET topic = ?, edits = ? WHERE id = ?",
                (event.body, bool(meta.get("edits", True)), room_id),
            )]
        if user_id is None:
            return []
        leave = ("DELETE FROM members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
        if kind == "member":
            if not event.body:
                return [leave]
            return [leave, (
                "INSERT INTO members (room_id, user_id, role, name) VALUES (?, ?, ?, ?)",
                (room_id, user_id, event.body, event.nick),
            )]
        if kind == "moderation":
            action = meta.get("action")
            if action == "kick":
                return [leave] if private else []
            lifted = {"unban": "ban", "unmute": "mute"}.get(str(action), str(action))
            clear = (
                "DELETE FROM restrictions WHERE room_id = ? AND user_id = ? AND action = ?",
                (room_id, user_id, lifted),
            )
            if action in ("ban", "mute"):
                return [clear, (
                    "DELETE FROM restrictions WHERE room_id = ? AND action = ? AND until_ms <= ?",
                    (room_id, action, event.ts_ms),
                ), (
                    "INSERT INTO restrictions (room_id, user_id, action, until_ms) VALUES (?, ?, ?, ?)",
                    (room_id, user_id, action, meta.get("until")),
                )]
            return [clear]
        return []

    def _pipeline(self, conn: Any) -> ContextManager[Any]:
        """
        A block whose statements may go to the database together, without
        waiting for each one's answer (where the driver can).
        """
        return nullcontext()

    # -- announcing commits --------------------------------------------------

    def notify_commits(self, encode: Encode) -> None:
        """
        Announce every batch's new messages on C{notify_channel} from
        inside the transaction that stores them (the payloads C{encode}
        makes), so that an announcement is sent if and only if its commit
        happens, in commit order.  Only backends with C{notify} support it.
        """
        if not self.notify or not self.notify_channel:
            raise StoreError(f"the {self.backend} store cannot announce its commits")
        self._notify = encode

    #: The statement that sends one payload on a channel, and the channel
    #: this store's commits go to (C{None}: the backend has no such thing).
    notify: Optional[str] = None
    notify_channel: Optional[str] = None

    def _announce(self, conn: Any, messages: List[Message]) -> None:
        assert self._notify is not None and self.notify is not None
        channel, encode = self.notify_channel, self._notify
        by_room: Dict[str, List[Message]] = {}
        for message in messages:
            by_room.setdefault(message.room, []).append(message)
        payloads = [
            (channel, payload.decode("utf-8"))
            for room, new in by_room.items()
            for payload in encode(room, new[-1].seq, new)
        ]
        statement = self._sql(self.notify)
        cursor = conn.cursor()
        for payload in payloads:
            cursor.execute(statement, payload)

    def _originals(
        self, conn: Any, rooms: Dict[str, List[int]], items: Sequence[_Append]
    ) -> Dict[Tuple[str, str], Message]:
        """
        The stored messages whose client_id the batch uses again, one query
        per room (the room rows are locked, so none can appear meanwhile).
        """
        wanted: Dict[str, List[str]] = {}
        for room, _, _, _, client_id, *_ in items:
            if client_id is not None:
                wanted.setdefault(room, []).append(client_id)
        known: Dict[Tuple[str, str], Message] = {}
        for room, client_ids in wanted.items():
            for chunk in _chunks(sorted(set(client_ids))):
                found = conn.execute(
                    self._sql(
                        f"SELECT {_COLUMNS} FROM messages "
                        f"WHERE room_id = ? AND client_id IN ({_marks(chunk)})"
                    ),
                    [rooms[room][0], *chunk],
                ).fetchall()
                for row in found:
                    message = _message(room, row)
                    assert message.client_id is not None
                    known[(room, message.client_id)] = message
        return known

    # -- reading -------------------------------------------------------------

    def read_after(self, room: str, after: int, limit: int) -> Deferred:
        def read(conn: Any) -> Tuple[List[Message], int]:
            room_id, first_seq = self._room_row(conn, room)
            rows = conn.execute(
                self._sql(
                    f"SELECT {_COLUMNS} FROM messages "
                    "WHERE room_id = ? AND seq > ? ORDER BY seq LIMIT ?"
                ),
                (room_id, after, limit),
            ).fetchall()
            return [_message(room, row) for row in rows], first_seq

        return self._read.runWithConnection(read)

    def read_before(self, room: str, before: int, limit: int) -> Deferred:
        def read(conn: Any) -> List[Message]:
            room_id, _ = self._room_row(conn, room)
            rows = conn.execute(
                self._sql(
                    f"SELECT {_COLUMNS} FROM messages "
                    "WHERE room_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
                ),
                (room_id, before, limit),
            ).fetchall()
            return [_message(room, row) for row in reversed(rows)]

        return self._read.runWithConnection(read)

    def _room_row(self, conn: Any, room: str) -> Tuple[int, int]:
        row = conn.execute(
            self._sql("SELECT id, first_seq FROM rooms WHERE name = ?"), (room,)
        ).fetchone()
        if row is None:
            raise StoreError(f"room {room!r} is not in the database")
        return row[0], row[1]

    # -- read markers --------------------------------------------------------

    def set_read_markers(self, marks: Dict[Tuple[str, str], int]) -> Deferred:
        """
        Store read markers (C{{(user_id, room): seq}}) in one transaction;
        a stored marker never moves back.
        """
        rows = [(user_id, seq, room) for (user_id, room), seq in sorted(marks.items())]

        def write(conn: Any) -> None:
            conn.cursor().executemany(
                self._sql(
                    "INSERT INTO read_markers (user_id, room_id, seq) "
                    "SELECT ?, id, ? FROM rooms WHERE name = ? "
                    "ON CONFLICT (user_id, room_id) DO UPDATE SET seq = CASE "
                    "WHEN excluded.seq > read_markers.seq THEN excluded.seq ELSE read_markers.seq END"
                ),
                rows,
            )

        return self._write_txn(write)

    def read_markers(self, user_id: str) -> Deferred:
        """
        @return: a Deferred firing with C{{room: seq}} of C{user_id}.
        """

        def read(conn: Any) -> Dict[str, int]:
            rows = conn.execute(
                self._sql(
                    "SELECT r.name, k.seq FROM read_markers k JOIN rooms r ON r.id = k.room_id "
                    "WHERE k.user_id = ?"
                ),
                (user_id,),
            ).fetchall()
            return {name: int(seq) for name, seq in rows}

        return self._read.runWithConnection(read)

    # -- presence ------------------------------------------------------------

    def share_presence(self, node: str, rooms: Dict[str, Headcount], ttl_ms: int) -> Deferred:
        """
        Replace C{node}'s presence lease (who is in each room there, valid
        for C{ttl_ms} by the database's clock), forget expired leases, and
        read everyone else's.

        @return: a Deferred firing with C{{room: Headcount}} over the
            other nodes' live leases.
        """

        def share(conn: Any) -> Dict[str, Headcount]:
            if self.begin:
                conn.execute(self.begin)
            conn.execute(self._sql("DELETE FROM presence WHERE node = ?"), (node,))
            conn.execute(self._sql(self.expire_presence.format(now=self.now_ms)), (node,))
            rows = [
                (node, room, here.clients, here.to_json(), ttl_ms)
                for room, here in sorted(rooms.items())
                if here.clients
            ]
            if rows:
                conn.cursor().executemany(
                    self._sql(
                        "INSERT INTO presence (node, room, clients, users, expires_ms) "
                        f"VALUES (?, ?, ?, ?, {self.now_ms} + ?)"
                    ),
                    rows,
                )
            found = conn.execute(
                self._sql("SELECT room, clients, users FROM presence WHERE node <> ?"), (node,)
            ).fetchall()
            others: Dict[str, Headcount] = {}
            for room, clients, users in found:
                others.setdefault(room, Headcount()).add(Headcount.from_json(users, clients))
            return others

        return self._write.runWithConnection(share)

    # -- users, sessions, invitations and API keys ---------------------------

    def _write_txn(self, work: Callable[..., Any], *args: Any) -> Deferred:
        def run(conn: Any) -> Any:
            if self.begin:
                conn.execute(self.begin)
            return work(conn, *args)

        return self._write.runWithConnection(run)

    def add_user(self, user_id: str, name: str, password: Optional[str], now_ms: int) -> Deferred:
        """
        Add an account (C{password}: its argon2 hash, or None: no sign-in).

        @return: a Deferred firing with C{False} if the id is taken.
        """

        def add(conn: Any) -> bool:
            cursor = conn.execute(
                self._sql(
                    "INSERT INTO users (id, name, password, created_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING"
                ),
                (user_id, name, password, now_ms),
            )
            return bool(cursor.rowcount == 1)

        return self._write_txn(add)

    def get_user(self, user_id: str) -> Deferred:
        """
        @return: a Deferred firing with C{(name, password hash, disabled)},
            or None.
        """

        def read(conn: Any) -> Optional[Tuple[str, Optional[str], bool]]:
            row = conn.execute(
                self._sql("SELECT name, password, disabled FROM users WHERE id = ?"), (user_id,)
            ).fetchone()
            return None if row is None else (row[0], row[1], bool(row[2]))

        return self._read.runWithConnection(read)

    def set_password(self, user_id: str, password: str) -> Deferred:
        """
        Replace an account's password hash (after a rehash, say).
        """

        def update(conn: Any) -> None:
            conn.execute(
                self._sql("UPDATE users SET password = ? WHERE id = ?"), (password, user_id)
            )

        return self._write_txn(update)

    def disable_user(self, user_id: str, disabled: bool, now_ms: int) -> Deferred:
        """
        Disable (or enable again) a user, known or not, and end their
        sessions.

        @return: a Deferred firing with the number of sessions ended.
        """

        def update(conn: Any) -> int:
            conn.execute(
                self._sql(
                    "INSERT INTO users (id, name, created_ms, disabled) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET disabled = excluded.disabled"
                ),
                (user_id, user_id, now_ms, disabled),
            )
            cursor = conn.execute(
                self._sql("DELETE FROM sessions WHERE user_id = ?"), (user_id,)
            )
            return int(cursor.rowcount)

        return self._write_txn(update)

    def disabled_users(self, user_ids: Sequence[str]) -> Deferred:
        """
        @return: a Deferred firing with the set of C{user_ids} disabled.
        """

        def read(conn: Any) -> set:
            found: set = set()
            for chunk in _chunks(sorted(set(user_ids))):
                rows = conn.execute(
                    self._sql(
                        f"SELECT id FROM users WHERE disabled = ? AND id IN ({_marks(chunk)})"
                    ),
                    [True, *chunk],
                ).fetchall()
                found.update(row[0] for row in rows)
            return found

        return self._read.runWithConnection(read)

    def create_session(
        self, session: str, user_id: str, csrf: str, now_ms: int, expires_ms: int
    ) -> Deferred:
        """
        Store a session (C{session}: the SHA-256 of its secret), and forget
        expired ones.
        """

        def create(conn: Any) -> None:
            conn.execute(self._sql("DELETE FROM sessions WHERE expires_ms < ?"), (now_ms,))
            conn.execute(
                self._sql(
                    "INSERT INTO sessions (id, user_id, csrf, created_ms, expires_ms) "
                    "VALUES (?, ?, ?, ?, ?)"
                ),
                (session, user_id, csrf, now_ms, expires_ms),
            )

        return self._write_txn(create)

    def get_session(self, session: str, now_ms: int) -> Deferred:
        """
        A live session of an enabled user.

        @return: a Deferred firing with C{(user_id, name, csrf,
            expires_ms)}, or None.
        """

        def read(conn: Any) -> Optional[Tuple[str, str, str, int]]:
            row = conn.execute(
                self._sql(
                    "SELECT u.id, u.name, s.csrf, s.expires_ms FROM sessions s "
                    "JOIN users u ON u.id = s.user_id "
                    "WHERE s.id = ? AND s.expires_ms >= ? AND u.disabled = ?"
                ),
                (session, now_ms, False),
            ).fetchone()
            return None if row is None else (row[0], row[1], row[2], int(row[3]))

        return self._read.runWithConnection(read)

    def live_sessions(self, sessions: Sequence[str], now_ms: int) -> Deferred:
        """
        @return: a Deferred firing with the set of C{sessions} that live
            (not ended, not expired, of an enabled user).
        """

        def read(conn: Any) -> set:
            live: set = set()
            for chunk in _chunks(sorted(set(sessions))):
                rows = conn.execute(
                    self._sql(
                        "SELECT s.id FROM sessions s JOIN users u ON u.id = s.user_id "
                        f"WHERE s.id IN ({_marks(chunk)}) AND s.expires_ms >= ? AND u.disabled = ?"
                    ),
                    [*chunk, now_ms, False],
                ).fetchall()
                live.update(row[0] for row in rows)
            return live

        return self._read.runWithConnection(read)

    def end_sessions(self, session: Optional[str] = None, user_id: Optional[str] = None) -> Deferred:
        """
        End one session, or every session of C{user_id}.

        @return: a Deferred firing with how many ended.
        """

        def end(conn: Any) -> int:
            if session is not None:
                cursor = conn.execute(self._sql("DELETE FROM sessions WHERE id = ?"), (session,))
            else:
                cursor = conn.execute(
                    self._sql("DELETE FROM sessions WHERE user_id = ?"), (user_id,)
                )
            return int(cursor.rowcount)

        return self._write_txn(end)

    def add_invite(self, invite: str, now_ms: int, expires_ms: int) -> Deferred:
        """
        Store an invitation (C{invite}: the SHA-256 of its code).
        """

        def add(conn: Any) -> None:
            conn.execute(
                self._sql("INSERT INTO invites (id, created_ms, expires_ms) VALUES (?, ?, ?)"),
                (invite, now_ms, expires_ms),
            )

        return self._write_txn(add)

    def use_invite(self, invite: str, user_id: str, now_ms: int) -> Deferred:
        """
        Use an invitation up, if it is there, unused and not expired.

        @return: a Deferred firing with whether it was.
        """

        def use(conn: Any) -> bool:
            cursor = conn.execute(
                self._sql(
                    "UPDATE invites SET used_by = ? "
                    "WHERE id = ? AND used_by IS NULL AND expires_ms >= ?"
                ),
                (user_id, invite, now_ms),
            )
            return bool(cursor.rowcount == 1)

        return self._write_txn(use)

    def add_key(self, key_id: str, digest: str, name: str, now_ms: int) -> Deferred:
        """
        Store an API key: its public id, and the SHA-256 of its secret.
        """

        def add(conn: Any) -> None:
            conn.execute(
                self._sql(
                    "INSERT INTO api_keys (id, hash, name, created_ms) VALUES (?, ?, ?, ?)"
                ),
                (key_id, digest, name, now_ms),
            )

        return self._write_txn(add)

    def get_key(self, key_id: str) -> Deferred:
        """
        @return: a Deferred firing with C{(digest, name)} of a key that is
            not revoked, or None.
        """

        def read(conn: Any) -> Optional[Tuple[str, str]]:
            row = conn.execute(
                self._sql("SELECT hash, name FROM api_keys WHERE id = ? AND revoked_ms IS NULL"),
                (key_id,),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        return self._read.runWithConnection(read)

    def revoke_key(self, key_id: str, now_ms: int) -> Deferred:
        """
        @return: a Deferred firing with whether a live key was revoked.
        """

        def revoke(conn: Any) -> bool:
            cursor = conn.execute(
                self._sql(
                    "UPDATE api_keys SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL"
                ),
                (now_ms, key_id),
            )
            return bool(cursor.rowcount == 1)

        return self._write_txn(revoke)

    # -- retention -----------------------------------------------------------

    def prune(self, before_ms: int, chunk: int = 5000) -> Deferred:
        """
        Delete each room's oldest messages, up to the first one sent at or
        after C{before_ms}, in transactions of at most C{chunk} rows so
        writers are never held up for long.

        @return: a Deferred firing with the number of messages deleted.
        """

        async def prune() -> int:
            rooms = await self._read.runWithConnection(
                lambda conn: conn.execute("SELECT id, first_seq FROM rooms").fetchall()
            )
            deleted = 0
            for room_id, first_seq in rooms:
                keep = await self._write.runWithConnection(self._keep_from, room_id, before_ms)
                while first_seq < keep:
                    upto = min(keep, first_seq + chunk)
                    deleted += await self._write.runWithConnection(
                        self._delete_range, room_id, upto
                    )
                    first_seq = upto
            return deleted

        return Deferred.fromCoroutine(prune())

    def _keep_from(self, conn: Any, room_id: int, before_ms: int) -> int:
        """
        The oldest seq to keep: the first message at or after the cutoff
        (never one older than a message being kept), or the next seq if
        every message is older.
        """
        (keep,) = conn.execute(
            self._sql("SELECT MIN(seq) FROM messages WHERE room_id = ? AND ts_ms >= ?"),
            (room_id, before_ms),
        ).fetchone()
        if keep is None:
            (last_seq,) = conn.execute(
                self._sql("SELECT last_seq FROM rooms WHERE id = ?"), (room_id,)
            ).fetchone()
            keep = last_seq + 1
        return int(keep)

    def _delete_range(self, conn: Any, room_id: int, upto: int) -> int:
        if self.begin:
            conn.execute(self.begin)
        cursor = conn.execute(
            self._sql("DELETE FROM messages WHERE room_id = ? AND seq < ?"), (room_id, upto)
        )
        conn.execute(
            self._sql("UPDATE rooms SET first_seq = ? WHERE id = ? AND first_seq < ?"),
            (upto, room_id, upto),
        )
        return int(cursor.rowcount)

    # -- lifetime ------------------------------------------------------------

    def ping(self) -> Deferred:
        return self._read.runWithConnection(lambda conn: conn.execute("SELECT 1").fetchone())

    def close(self) -> Deferred:
        """
        Refuse new writes, wait for queued ones to commit, then close the
        connections.  Closing again does nothing more.
        """
        if self._closed:
            return succeed(None)
        self._closed = True
        if self._flushing or self._pending:
            d: Deferred = Deferred()
            self._idle.append(d)
        else:
            d = succeed(None)

        def close_pools(_: object) -> None:
            for pool in {id(self._write): self._write, id(self._read): self._read}.values():
                pool.close()

        return d.addCallback(close_pools)


#: A message row's columns, as L{_message} reads them.
_COLUMNS = "seq, nick, body, ts_ms, client_id, user_id, kind, target_seq, meta, edited_ms, deleted_ms"


def _message(room: str, row: Sequence[Any]) -> Message:
    seq, nick, body, ts_ms, client_id, user_id, kind, target, meta, edited_ms, deleted_ms = row
    return Message(
        room, seq, nick, body, ts_ms, client_id, _user(user_id, nick), kind, target,
        None if meta is None else json.loads(meta), edited_ms, deleted_ms,
    )


def _user(user_id: Optional[str], name: str) -> Optional[User]:
    return None if user_id is None else User(user_id, name)


def _chunks(values: List[str], size: int = 500) -> List[List[str]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
