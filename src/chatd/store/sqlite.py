# -*- test-case-name: tests.test_store -*-
"""
The embedded store: one SQLite file in WAL mode.

Writes go through a single connection in a one-thread pool (SQLite has one
writer at a time anyway, and one writer commits batches in seq order);
reads use two more connections, which WAL lets run beside the writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.interfaces import IIdentityStore, IMessageStore
from chatd.store._sql import SQLStore, StoreError

__all__ = ["SQLiteStore"]


#: How long a connection waits for another's lock before giving up.
BUSY_SECONDS = 10.0


def _configure(conn: Any) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is on disk before it is acknowledged, so an
    # acknowledged message survives a power cut, not only a crash.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    # 1 MiB of page cache per connection (SQLite's default is 2 MiB): the
    # newest pages are what chatd reads, and the OS caches the file anyway.
    conn.execute("PRAGMA cache_size = -1024")
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")


@implementer(IMessageStore, IIdentityStore)
class SQLiteStore(SQLStore):
    """
    Messages in an SQLite database file.

    @param path: the database file; created if missing.
    """

    backend = "sqlite"
    placeholder = "?"
    begin = "BEGIN IMMEDIATE"
    read_snapshot = "BEGIN"
    # (BEGIN IMMEDIATE makes room creation one at a time by itself.)
    now_ms = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = Path(path)
        self.description = f"sqlite:{path}"
        if not self.path.parent.is_dir():
            raise StoreError(f"cannot open the {self.description} store: {self.path.parent} is not a folder")

        def pool(threads: int) -> adbapi.ConnectionPool:
            return adbapi.ConnectionPool(
                "sqlite3",
                str(self.path),
                # We begin transactions ourselves (BEGIN IMMEDIATE).
                isolation_level=None,
                # adbapi closes connections from the reactor thread.
                check_same_thread=False,
                # Wait for another connection's lock (another node opening
                # the same file) from the very first statement, the
                # journal mode's included, as busy_timeout does after.
                timeout=BUSY_SECONDS,
                cp_min=threads,
                cp_max=threads,
                cp_openfun=_configure,
                cp_reactor=reactor,
                cp_noisy=False,
            )

        super().__init__(pool(1), pool(2))

    def open(self) -> Deferred:
        """
        Open the file (creating it if missing) and its schema.  A file this
        call created is removed again if opening fails, so that a failed
        start leaves no data file behind.
        """
        created = [
            p for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")) if not p.exists()
        ]

        def failed(failure: Failure) -> Failure:
            if self.path in created:
                for path in created:
                    try:
                        path.unlink()
                    except OSError:
                        pass
            return failure

        return super().open().addErrback(failed)

    def _sqlalchemy_url(self) -> str:
        return f"sqlite:///{self.path.resolve()}?timeout={BUSY_SECONDS:g}"

    def _prepare_migration(self, engine: Any) -> None:
        """
        SQLAlchemy's recipe for transactional DDL on SQLite: the driver
        begins no transaction of its own, and each one begins IMMEDIATE,
        so a migration holds the database's write lock from its first
        statement (two processes starting at once migrate one at a time).
        """
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def connect(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None
            dbapi_connection.execute(f"PRAGMA busy_timeout = {int(BUSY_SECONDS * 1000)}")

        @event.listens_for(engine, "begin")
        def begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
