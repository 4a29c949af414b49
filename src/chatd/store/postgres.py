# -*- test-case-name: tests.test_store -*-
"""
The production store: PostgreSQL through psycopg 3.

psycopg 3 is the maintained PostgreSQL driver; it is DB-API 2, so
L{twisted.enterprise.adbapi} runs it in a thread pool and nothing blocks
the reactor.  (Its asyncio API would need an asyncio reactor bridge for no
gain here: every query is short, and group commit keeps the writer busy
with few, large transactions.)

Several chatd processes may share one database: a room's row is locked
while its next seq numbers are handed out, so seqs are never duplicated
and commit in order.

URL: C{postgresql://user[:password]@host[:port]/dbname[?schema=NAME]}.
C{schema} (chatd's own parameter) keeps chatd's tables in that schema,
which is created if missing; other parameters go to libpq.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from zope.interface import implementer

from chatd.interfaces import IIdentityStore, IMessageStore
from chatd.store._sql import SQLStore, StoreError

__all__ = ["PostgresStore", "redact"]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


def redact(url: str) -> str:
    """
    The URL with any password replaced by C{***}, for logs and errors.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _split_schema(url: str) -> Tuple[str, Optional[str]]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    if not any(key == "connect_timeout" for key, _ in rest):
        rest.append(("connect_timeout", "5"))
    if schema is not None and not _SCHEMA_NAME.match(schema):
        raise StoreError(
            "schema must be lower-case letters, digits and '_', starting with a letter or '_'"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def _channel(schema: str) -> str:
    """
    The NOTIFY channel of a schema's commits: C{chatd:SCHEMA}, or for a
    name too long for a channel (PostgreSQL's identifiers end at 63
    bytes) C{chatd:} and a digest of it.
    """
    channel = f"chatd:{schema}"
    if len(channel.encode("utf-8")) <= 63:
        return channel
    return "chatd:" + hashlib.sha256(schema.encode("utf-8")).hexdigest()[:32]


@implementer(IMessageStore, IIdentityStore)
class PostgresStore(SQLStore):
    """
    Messages in a PostgreSQL database.
    """

    backend = "postgresql"
    placeholder = "%s"
    lock_rooms = " FOR UPDATE"
    read_snapshot = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
    lock_room_count = "SELECT pg_advisory_xact_lock(hashtext('chatd-rooms:' || current_schema()))"
    now_ms = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    notify = "SELECT pg_notify(?, ?)"
    # Leases another node is renewing or forgetting right now are left to
    # it: two nodes forgetting the same expired leases never wait on (or
    # deadlock with) each other.
    expire_presence = (
        "DELETE FROM presence WHERE (node, room) IN (SELECT node, room FROM presence "
        "WHERE expires_ms < {now} AND node <> ? FOR UPDATE SKIP LOCKED)"
    )

    def __init__(self, url: str, reactor: Any = None) -> None:
        self.description = redact(url)
        conninfo, self.schema = _split_schema(url)
        #: libpq's connection string (without chatd's own parameters).
        self.conninfo = conninfo
        #: The NOTIFY channel of this store's commits: named after its
        #: schema, so that deployments sharing a database (one schema each)
        #: never hear each other.
        self.notify_channel = _channel(self.schema or "public")
        try:
            # Imported only when PostgreSQL is chosen.
            import psycopg
        except ImportError:
            raise StoreError(
                "the postgresql store needs psycopg: pip install 'chatd[postgresql]'"
            ) from None

        def configure(conn: Any) -> None:
            if self.schema is None:
                return
            try:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                conn.commit()
            except psycopg.errors.UniqueViolation:
                # Another connection created it at the same moment.
                conn.rollback()
            conn.execute(f'SET search_path TO "{self.schema}"')
            conn.commit()

        def pool(threads: int) -> adbapi.ConnectionPool:
            return adbapi.ConnectionPool(
                "psycopg",
                conninfo,
                cp_min=1,
                cp_max=threads,
                cp_openfun=configure,
                cp_reconnect=True,
                cp_reactor=reactor,
                cp_noisy=False,
            )

        super().__init__(pool(1), pool(3))

    def _sqlalchemy_url(self) -> str:
        # psycopg 3, as SQLAlchemy names it; libpq's parameters as given.
        return "postgresql+psycopg://" + self.conninfo.split("://", 1)[1]

    def _lock_schema(self, connection: Any) -> None:
        if self.schema is not None:
            # (The pool's first connection has created it.)
            connection.exec_driver_sql(f'SET search_path TO "{self.schema}"')
        connection.exec_driver_sql(
            "SELECT pg_advisory_xact_lock(hashtext('chatd-schema:' || current_schema()))"
        )

    def _pipeline(self, conn: Any) -> Any:
        """
        psycopg's pipeline mode: a batch's inserts, seq updates and
        announcements reach the server in one round trip, not three.
        """
        return conn.pipeline()

    def announce(self, payload: bytes) -> Deferred:
        """
        Send C{payload} on this store's notify channel, outside any append.

        @return: a Deferred firing with the fraction of PostgreSQL's
            notification queue in use.
        """

        def send(conn: Any) -> float:
            row = conn.execute(
                "SELECT pg_notify(%s, %s), pg_notification_queue_usage()",
                (self.notify_channel, payload.decode("utf-8")),
            ).fetchone()
            return float(row[1])

        return self._read.runWithConnection(send)

    def prune(self, before_ms: int, chunk: int = 5000) -> Deferred:
        """
        Retention, on one node at a time: a node that finds another one
        pruning (holding the schema's retention lock) deletes nothing.
        """
        return self._read.runWithConnection(self._prune_locked, before_ms, chunk)

    def _prune_locked(self, conn: Any, before_ms: int, chunk: int) -> int:
        lock = "hashtext('chatd-retention:' || current_schema())"
        (locked,) = conn.execute(f"SELECT pg_try_advisory_lock({lock})").fetchone()
        conn.commit()
        if not locked:
            self.log.info("Another node is pruning {store}; this one skips its turn", store=self.description)
            return 0
        try:
            deleted = 0
            rooms = conn.execute("SELECT id, first_seq FROM rooms").fetchall()
            conn.commit()
            for room_id, first_seq in rooms:
                keep = self._keep_from(conn, room_id, before_ms)
                conn.commit()
                while first_seq < keep:
                    upto = min(keep, first_seq + chunk)
                    deleted += self._delete_range(conn, room_id, upto)
                    conn.commit()
                    first_seq = upto
            return deleted
        finally:
            conn.rollback()
            conn.execute(f"SELECT pg_advisory_unlock({lock})")
            conn.commit()
