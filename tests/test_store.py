"""
The store contract, run against every store: memory, SQLite (a file of the
test's own) and PostgreSQL (127.0.0.1:5432, database test, a schema of the
test's own, dropped afterwards).  PostgreSQL must be reachable: these tests
fail, never skip, without it.
"""

import json
import os
import sqlite3
import uuid
from typing import Any, Dict

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from chatd.interfaces import IMessageStore
from chatd.model import Headcount, Message, RoomLimitReached
from chatd.store._sql import SCHEMA_VERSION, StoreError, _statements, schema_files
from chatd.store.memory import MemoryStore
from chatd.store.postgres import PostgresStore, redact
from chatd.store.sqlite import SQLiteStore

#: Where the PostgreSQL tests connect; CI provides this server.
POSTGRES_URL = os.environ.get("CHATD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_url(test: TestCase) -> str:
    """
    A URL for a fresh schema, dropped when the test ends.
    """
    schema = f"chatd_test_{uuid.uuid4().hex[:12]}"

    def drop() -> None:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    test.addCleanup(drop)
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}schema={schema}"


class StoreContractMixin:
    """
    What every L{IMessageStore} must do.  Subclasses define make_store().
    """

    durable = True

    def make_store(self) -> Any:
        raise NotImplementedError

    async def open_store(self) -> Any:
        store = self.make_store()
        self.addCleanup(store.close)
        await store.open()
        return store

    async def test_provides_interface(self) -> None:
        """
        The store declares IMessageStore.
        """
        store = await self.open_store()
        self.assertTrue(IMessageStore.providedBy(store))

    async def test_rooms(self) -> None:
        """
        create_room makes a room once; load_rooms lists rooms with their
        last seq.
        """
        store = await self.open_store()
        self.assertTrue(await store.create_room("b", 1))
        self.assertTrue(await store.create_room("a", 1))
        self.assertFalse(await store.create_room("a", 2))
        self.assertEqual(sorted(await store.load_rooms()), [("a", 0), ("b", 0)])

    async def test_room_limit(self) -> None:
        """
        create_room with max_rooms refuses a room past the limit (counted
        in the store), but still answers False for one that exists.
        """
        store = await self.open_store()
        self.assertTrue(await store.create_room("a", 1, 2))
        self.assertTrue(await store.create_room("b", 1, 2))
        self.assertFalse(await store.create_room("a", 1, 2))
        with self.assertRaises(RoomLimitReached) as caught:
            await store.create_room("c", 1, 2)
        self.assertEqual(caught.exception.limit, 2)
        self.assertTrue(await store.create_room("c", 1, 3))
        self.assertEqual([name for name, _ in sorted(await store.load_rooms())], ["a", "b", "c"])

    async def test_presence(self) -> None:
        """
        share_presence replaces a node's lease and answers the others'
        together: users joined (one user on two nodes is one), guests
        summed; a node with no one left has no lease.
        """
        store = await self.open_store()
        ann, bob = {"ann": "Ann"}, {"bob": "Bob"}
        self.assertEqual(
            await store.share_presence("n1", {"a": Headcount(ann, 1), "b": Headcount({}, 1)}, 60_000), {}
        )
        self.assertEqual(
            await store.share_presence("n2", {"a": Headcount({**ann, **bob}, 2), "c": Headcount()}, 60_000),
            {"a": Headcount(ann, 1), "b": Headcount({}, 1)},
        )
        self.assertEqual(
            await store.share_presence("n3", {}, 60_000),
            {"a": Headcount({**ann, **bob}, 3), "b": Headcount({}, 1)},
        )
        await store.share_presence("n1", {"b": Headcount(ann, 4)}, 60_000)
        self.assertEqual(
            await store.share_presence("n3", {}, 60_000),
            {"a": Headcount({**ann, **bob}, 2), "b": Headcount(ann, 4)},
        )
        await store.share_presence("n1", {}, 0)
        self.assertEqual(await store.share_presence("n3", {}, 60_000), {"a": Headcount({**ann, **bob}, 2)})

    async def test_append_assigns_seq(self) -> None:
        """
        Each room numbers its messages 1, 2, 3...; rooms are independent.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        await store.create_room("b", 0)
        m1, created = await store.append("a", "ann", "one", 1000, None)
        self.assertTrue(created)
        self.assertEqual((m1.room, m1.seq, m1.nick, m1.body, m1.ts_ms), ("a", 1, "ann", "one", 1000))
        m2, _ = await store.append("a", "bob", "two", 2000, "cid")
        b1, _ = await store.append("b", "cy", "other", 3000, None)
        self.assertEqual((m2.seq, m2.client_id, b1.seq), (2, "cid", 1))
        self.assertEqual(sorted(await store.load_rooms()), [("a", 2), ("b", 1)])

    async def test_client_id_dedup(self) -> None:
        """
        A client_id already used in a room returns the original message and
        stores nothing; in another room it is a new message.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        await store.create_room("b", 0)
        original, _ = await store.append("a", "ann", "one", 1000, "k")
        again, created = await store.append("a", "ann", "changed", 5000, "k")
        self.assertFalse(created)
        self.assertEqual(again, original)
        other, created = await store.append("b", "ann", "one", 1000, "k")
        self.assertTrue(created)
        self.assertEqual(other.seq, 1)
        messages, _ = await store.read_after("a", 0, 10)
        self.assertEqual([m.body for m in messages], ["one"])

    async def test_concurrent_appends(self) -> None:
        """
        Many appends issued at once (group commit) get consecutive seqs in
        the order they were issued, duplicates within the batch included.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        ds = [store.append("a", "n", f"m{i}", i, f"c{i % 150}") for i in range(200)]
        results = await gatherResults(ds)
        created = [m.seq for m, new in results if new]
        self.assertEqual(created, list(range(1, 151)))
        for i, (message, new) in enumerate(results):
            self.assertEqual(message.client_id, f"c{i % 150}")
            self.assertEqual(message.body, f"m{i % 150}")
            self.assertEqual(new, i < 150)
        messages, first = await store.read_after("a", 0, 1000)
        self.assertEqual([m.seq for m in messages], list(range(1, 151)))
        self.assertEqual(first, 1)

    async def test_read_after_and_before(self) -> None:
        """
        read_after pages forward from a cursor; read_before pages back.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        for i in range(10):
            await store.append("a", "n", f"m{i}", i, None)
        messages, first = await store.read_after("a", 3, 4)
        self.assertEqual([m.seq for m in messages], [4, 5, 6, 7])
        self.assertEqual(first, 1)
        messages, _ = await store.read_after("a", 10, 4)
        self.assertEqual(messages, [])
        older = await store.read_before("a", 5, 3)
        self.assertEqual([m.seq for m in older], [2, 3, 4])
        self.assertEqual([m.seq for m in await store.read_before("a", 2, 10)], [1])
        self.assertIsInstance(older[0], Message)

    async def test_prune(self) -> None:
        """
        prune deletes messages older than the cutoff, oldest first, stops at
        the first message to keep, and moves first_seq.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        await store.create_room("b", 0)
        for i, ts in enumerate([100, 200, 300, 400, 500]):
            await store.append("a", "n", f"m{i}", ts, f"k{i}")
        await store.append("b", "n", "old", 50, None)
        deleted = await store.prune(350)
        self.assertEqual(deleted, 4)
        messages, first = await store.read_after("a", 0, 10)
        self.assertEqual(([m.seq for m in messages], first), ([4, 5], 4))
        messages, first = await store.read_after("b", 0, 10)
        self.assertEqual((messages, first), ([], 2))
        # Numbering continues after pruning.
        message, _ = await store.append("b", "n", "new", 600, None)
        self.assertEqual(message.seq, 2)
        self.assertEqual(await store.prune(350), 0)

    async def test_prune_in_chunks(self) -> None:
        """
        Pruning many messages works through them in small transactions.
        """
        store = await self.open_store()
        if not hasattr(store, "_delete_range"):
            return
        await store.create_room("a", 0)
        await gatherResults([store.append("a", "n", f"m{i}", i, None) for i in range(50)])
        self.assertEqual(await store.prune(45, chunk=7), 45)
        messages, first = await store.read_after("a", 0, 100)
        self.assertEqual(([m.seq for m in messages], first), ([46, 47, 48, 49, 50], 46))

    async def test_reopen_keeps_everything(self) -> None:
        """
        A durable store reopened on the same database has every room,
        message and seq, and numbering continues.
        """
        if not self.durable:
            return
        store = self.make_store()
        await store.open()
        await store.create_room("a", 0)
        for i in range(5):
            await store.append("a", "n", f"m{i}", i, f"k{i}")
        await store.close()
        store = await self.open_store()
        self.assertEqual(await store.load_rooms(), [("a", 5)])
        messages, _ = await store.read_after("a", 0, 10)
        self.assertEqual([m.body for m in messages], [f"m{i}" for i in range(5)])
        again, created = await store.append("a", "n", "retry", 9, "k2")
        self.assertEqual((again.seq, created), (3, False))
        message, _ = await store.append("a", "n", "next", 9, None)
        self.assertEqual(message.seq, 6)

    async def test_close_waits_for_writes(self) -> None:
        """
        close() lets queued appends commit first, then refuses new ones.
        """
        if not self.durable:
            return
        store = self.make_store()
        await store.open()
        await store.create_room("a", 0)
        ds = [store.append("a", "n", f"m{i}", i, None) for i in range(50)]
        await store.close()
        results = await DeferredList(ds, consumeErrors=True)
        self.assertTrue(all(ok for ok, _ in results))
        with self.assertRaises(StoreError):
            await store.append("a", "n", "late", 1, None)
        store = await self.open_store()
        self.assertEqual(await store.load_rooms(), [("a", 50)])


class MemoryStoreTests(StoreContractMixin, TestCase):
    """
    The contract for the memory store.
    """

    durable = False

    def make_store(self) -> Any:
        return MemoryStore(retain=1000)


class SQLiteStoreTests(StoreContractMixin, TestCase):
    """
    The contract for the SQLite store.
    """

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp() + ".sqlite3")

    def make_store(self) -> Any:
        return SQLiteStore(self.path, reactor=reactor)

    async def test_wal(self) -> None:
        """
        The database is in WAL mode.
        """
        await self.open_store()
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone(), ("wal",))

    async def test_unusable_path(self) -> None:
        """
        A path SQLite cannot open (here: a folder) fails open() with one
        clear line naming the store.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        store = SQLiteStore(folder, reactor=reactor)
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as e:
            await store.open()
        self.assertIn(f"cannot open the sqlite:{folder} store", str(e.exception))
        self.assertNotIn("\n", str(e.exception))

    async def test_failed_open_leaves_no_file(self) -> None:
        """
        When SQLite creates the file but opening then fails (here its WAL
        file cannot be made: a folder has that name), the file it created
        is removed again; what was there before stays.
        """
        os.makedirs(self.path + "-wal")
        store = self.make_store()
        self.addCleanup(store.close)
        with self.assertRaises(StoreError):
            await store.open()
        self.assertFalse(os.path.exists(self.path))
        self.assertTrue(os.path.isdir(self.path + "-wal"))


class PostgresStoreTests(StoreContractMixin, TestCase):
    """
    The contract for the PostgreSQL store, plus what only a shared server
    can show.
    """

    def setUp(self) -> None:
        self.url = postgres_url(self)

    def make_store(self) -> Any:
        return PostgresStore(self.url, reactor=reactor)

    async def test_two_processes_never_share_a_seq(self) -> None:
        """
        Two stores on one database (as two chatd processes would be)
        appending to one room at once hand out every seq exactly once.
        """
        first = await self.open_store()
        second = await self.open_store()
        await first.create_room("a", 0)
        ds = []
        for i in range(100):
            ds.append(first.append("a", "one", f"1-{i}", i, None))
            ds.append(second.append("a", "two", f"2-{i}", i, None))
        results = await gatherResults(ds)
        seqs = sorted(m.seq for m, _ in results)
        self.assertEqual(seqs, list(range(1, 201)))
        messages, _ = await first.read_after("a", 0, 1000)
        self.assertEqual(
            {m.seq: m.body for m in messages}, {m.seq: m.body for m, _ in results}
        )

    async def test_client_id_across_processes(self) -> None:
        """
        A retry through another process still returns the original.
        """
        first = await self.open_store()
        second = await self.open_store()
        await first.create_room("a", 0)
        original, _ = await first.append("a", "n", "x", 1, "same")
        again, created = await second.append("a", "n", "x", 2, "same")
        self.assertEqual((again, created), (original, False))

    async def test_presence_leases_expire(self) -> None:
        """
        A lease not renewed in time (its node died) stops counting, by the
        database's clock.
        """
        first = await self.open_store()
        second = await self.open_store()
        await first.share_presence("dead", {"a": Headcount({"x": "X"}, 7)}, 1)
        await first.share_presence("alive", {"a": Headcount({}, 1)}, 60_000)
        await deferLater(reactor, 0.01)
        self.assertEqual(await second.share_presence("me", {}, 60_000), {"a": Headcount({}, 1)})

    async def test_presence_renewed_at_once_by_nodes(self) -> None:
        """
        Nodes renewing their leases at once, each finding the others'
        expired, never wait on or deadlock with each other.
        """
        stores = [await self.open_store() for _ in range(3)]
        for _ in range(30):
            await gatherResults(
                [
                    store.share_presence(
                        f"n{i}", {"a": Headcount({}, 1), "b": Headcount({"u": "U"}, 2), "c": Headcount({}, 3)}, 1
                    )
                    for i, store in enumerate(stores)
                ]
            )

    async def test_room_limit_across_processes(self) -> None:
        """
        Two stores creating rooms at once (two nodes) never pass the limit
        between them.
        """
        first = await self.open_store()
        second = await self.open_store()
        ds = [
            store.create_room(f"r{i}-{n}", 0, 10)
            for i in range(10)
            for n, store in enumerate((first, second))
        ]
        results = await DeferredList(ds, consumeErrors=True)
        created = [ok and value for ok, value in results]
        self.assertEqual(created.count(True), 10)
        for ok, value in results:
            if not ok:
                value.trap(RoomLimitReached)
        self.assertEqual(len(await first.load_rooms()), 10)

    async def test_commits_announced_in_their_transaction(self) -> None:
        """
        With notify_commits, each batch's messages are sent on the channel
        from inside the transaction that stores them: heard by a listener
        in seq order, exactly once each.
        """
        import psycopg

        store = await self.open_store()
        store.notify_commits(lambda room, last, ms: [
            json.dumps([room, last, [m.seq for m in ms]]).encode("utf-8")
        ])
        await store.create_room("a", 0)
        conn = psycopg.connect(POSTGRES_URL, autocommit=True)
        self.addCleanup(conn.close)
        conn.execute(f'LISTEN "{store.notify_channel}"')
        await gatherResults([store.append("a", "n", f"m{i}", i, None) for i in range(50)])
        notifies = await deferToThread(lambda: list(conn.notifies(timeout=5, stop_after=50)))
        heard = [json.loads(n.payload) for n in notifies]
        seqs = [seq for _, _, batch in heard for seq in batch]
        self.assertEqual(seqs, list(range(1, 51)))
        self.assertEqual([last for _, last, _ in heard], [batch[-1] for _, _, batch in heard])

    async def test_one_pruner_at_a_time(self) -> None:
        """
        While one node holds the retention lock, another's prune deletes
        nothing; once released, it does.
        """
        import psycopg

        first = await self.open_store()
        await first.create_room("a", 0)
        await first.append("a", "n", "old", 1, None)
        schema = self.url.rsplit("schema=", 1)[1]
        holder = psycopg.connect(POSTGRES_URL, autocommit=True)
        self.addCleanup(holder.close)
        holder.execute(f'SET search_path TO "{schema}"')
        holder.execute("SELECT pg_advisory_lock(hashtext('chatd-retention:' || current_schema()))")
        self.assertEqual(await first.prune(10), 0)
        holder.execute("SELECT pg_advisory_unlock(hashtext('chatd-retention:' || current_schema()))")
        self.assertEqual(await first.prune(10), 1)

    async def test_unreachable(self) -> None:
        """
        A server that cannot be reached fails open() with one line that
        names the store without its password.
        """
        store = PostgresStore(
            "postgresql://chatd:secret@127.0.0.1:1/nothing", reactor=reactor
        )
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as e:
            await store.open()
        message = str(e.exception)
        self.assertIn("postgresql://chatd:***@127.0.0.1:1/nothing", message)
        self.assertNotIn("secret", message)
        self.assertNotIn("\n", message)

    def test_redact(self) -> None:
        """
        Passwords never reach logs.
        """
        self.assertEqual(redact("postgresql://u:pw@h/d"), "postgresql://u:***@h/d")
        self.assertEqual(redact("postgresql://u@h/d"), "postgresql://u@h/d")


def _sqlite_shape(path: str) -> Dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        shape: Dict[str, Any] = {}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
            shape[name] = {
                "columns": conn.execute(f"PRAGMA table_info({name})").fetchall(),
                "indexes": sorted(
                    (row[1], row[2], row[4])
                    for row in conn.execute(f"PRAGMA index_list({name})").fetchall()
                ),
            }
        shape["version"] = conn.execute("SELECT version FROM schema_version").fetchall()
        return shape
    finally:
        conn.close()


def _postgres_shape(conn: Any, schema: str) -> Dict[str, Any]:
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default "
        "FROM information_schema.columns WHERE table_schema = %s "
        "ORDER BY table_name, column_name",
        (schema,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT tablename, indexname, replace(indexdef, %s, '') FROM pg_indexes "
        "WHERE schemaname = %s ORDER BY indexname",
        (schema + ".", schema),
    ).fetchall()
    constraints = conn.execute(
        "SELECT conname, contype FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
        "WHERE n.nspname = %s ORDER BY conname",
        (schema,),
    ).fetchall()
    version = conn.execute(f'SELECT version FROM "{schema}".schema_version').fetchall()
    return {"columns": columns, "indexes": indexes, "constraints": constraints, "version": version}


class SchemaUpgradeTests(TestCase):
    """
    A database made by an older chatd, upgraded in place, has exactly the
    schema of a new one, and keeps its data.
    """

    def _v1_sqlite(self, path: str) -> None:
        conn = sqlite3.connect(path)
        for statement in _statements(schema_files("sqlite", "v1.sql")):
            conn.execute(statement)
        conn.execute("INSERT INTO rooms (name, last_seq, created_ms) VALUES ('old', 1, 0)")
        conn.execute("INSERT INTO messages VALUES (1, 1, 'n', 'kept', 0, NULL)")
        conn.commit()
        conn.close()

    async def test_sqlite_upgrade_equals_fresh(self) -> None:
        """
        SQLite: v1 upgraded to the current version matches a fresh database.
        """
        old = os.path.abspath(self.mktemp())
        new = os.path.abspath(self.mktemp())
        self._v1_sqlite(old)
        for path in (old, new):
            store = SQLiteStore(path, reactor=reactor)
            self.assertEqual(await store.open(), SCHEMA_VERSION)
            await store.close()
        self.assertEqual(_sqlite_shape(old), _sqlite_shape(new))
        store = SQLiteStore(old, reactor=reactor)
        self.addCleanup(store.close)
        await store.open()
        messages, first = await store.read_after("old", 0, 10)
        self.assertEqual(([m.body for m in messages], first), (["kept"], 1))

    async def test_postgres_upgrade_equals_fresh(self) -> None:
        """
        PostgreSQL: v1 upgraded to the current version matches a fresh one.
        """
        import psycopg

        old_url, new_url = postgres_url(self), postgres_url(self)
        old_schema = old_url.rsplit("schema=", 1)[1]
        new_schema = new_url.rsplit("schema=", 1)[1]
        with psycopg.connect(POSTGRES_URL) as conn:
            conn.execute(f'CREATE SCHEMA "{old_schema}"')
            conn.execute(f'SET search_path TO "{old_schema}"')
            for statement in _statements(schema_files("postgresql", "v1.sql")):
                conn.execute(statement)
            conn.execute("INSERT INTO rooms (name, last_seq, created_ms) VALUES ('old', 1, 0)")
            conn.execute("INSERT INTO messages VALUES (1, 1, 'n', 'kept', 0, NULL)")
        for url in (old_url, new_url):
            store = PostgresStore(url, reactor=reactor)
            self.assertEqual(await store.open(), SCHEMA_VERSION)
            await store.close()
        with psycopg.connect(POSTGRES_URL) as conn:
            old_shape = _postgres_shape(conn, old_schema)
            new_shape = _postgres_shape(conn, new_schema)
        # Only the schema names may differ.
        self.assertEqual(
            repr(old_shape).replace(old_schema, "S"), repr(new_shape).replace(new_schema, "S")
        )

    def test_revisions_end_at_the_schema_version(self) -> None:
        """
        Alembic's revisions are v1 to the schema version, in one line.
        """
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        config = Config()
        config.set_main_option("script_location", "chatd.store:migrations")
        script = ScriptDirectory.from_config(config)
        chain = [r.revision for r in script.walk_revisions()]
        self.assertEqual(chain, [f"v{n}" for n in range(SCHEMA_VERSION, 0, -1)])

    async def test_opened_at_once(self) -> None:
        """
        Two stores (two nodes starting together) opening one new database
        at once migrate it once, one after the other, on each backend.
        """
        import psycopg

        path = os.path.abspath(self.mktemp())
        url = postgres_url(self)
        for make in (lambda: SQLiteStore(path, reactor=reactor), lambda: PostgresStore(url, reactor=reactor)):
            stores = [make(), make()]
            for store in stores:
                self.addCleanup(store.close)
            versions = await gatherResults([store.open() for store in stores])
            self.assertEqual(versions, [SCHEMA_VERSION, SCHEMA_VERSION])
            self.assertEqual(stores[0].deployment, stores[1].deployment)
            self.assertEqual(stores[0].secret, stores[1].secret)
        schema = url.rsplit("schema=", 1)[1]
        with psycopg.connect(POSTGRES_URL) as conn:
            (revision,) = conn.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchone()
        self.assertEqual(revision, f"v{SCHEMA_VERSION}")

    async def test_newer_schema_refused(self) -> None:
        """
        A database from a newer chatd is refused with a clear error.
        """
        path = os.path.abspath(self.mktemp())
        store = SQLiteStore(path, reactor=reactor)
        await store.open()
        await store.close()
        conn = sqlite3.connect(path)
        conn.execute("UPDATE schema_version SET version = 99")
        conn.commit()
        conn.close()
        store = SQLiteStore(path, reactor=reactor)
        self.addCleanup(store.close)
        with self.assertRaises(StoreError) as e:
            await store.open()
        self.assertIn("version 99", str(e.exception))

