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
from chatd.model import ChatError, Guard, Headcount, Message, RoomLimitReached, User
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


    # -- the live room's events ---------------------------------------------

    async def reopen(self, store: Any) -> Any:
        await store.close()
        return await self.open_store()

    async def _room_with_message(self, store: Any) -> Message:
        await store.create_room("r", 0)
        message, _ = await store.append("r", "Ann", "first words", 1000, "c1", User("ann", "Ann"))
        return message

    async def test_edit_changes_the_message(self) -> None:
        """
        An edit is an event with its own seq and target; the message, as
        every later read shows it, has the new body and when it changed.
        """
        store = await self.open_store()
        await self._room_with_message(store)
        edit, created = await store.append("r", "Ann", "better words", 2000, None, User("ann", "Ann"), "edit", 1)
        self.assertTrue(created)
        self.assertEqual((edit.seq, edit.kind, edit.target, edit.body), (2, "edit", 1, "better words"))
        messages, _ = await store.read_after("r", 0, 10)
        self.assertEqual([m.as_dict() for m in messages], [
            {"type": "message", "room": "r", "seq": 1, "nick": "Ann", "user": {"id": "ann", "name": "Ann"},
             "body": "better words", "ts": 1.0, "client_id": "c1", "edited": 2.0},
            edit.as_dict(),
        ])
        self.assertEqual(await store.read_before("r", 3, 10), messages)
        # The client_id's original is the message as it is now.
        again, created = await store.append("r", "Ann", "first words", 3000, "c1", User("ann", "Ann"))
        self.assertEqual((again.seq, again.body, created), (1, "better words", False))

    async def test_delete_blanks_the_message_and_its_edits(self) -> None:
        """
        A deletion blanks the message and every edit of it (who and when
        stay), so no read shows the deleted text; the message cannot be
        edited or deleted again, and a refusal takes no seq.
        """
        store = await self.open_store()
        await self._room_with_message(store)
        await store.append("r", "Ann", "second thoughts", 2000, None, User("ann", "Ann"), "edit", 1)
        delete, _ = await store.append("r", "Mod", "", 3000, None, User("mod", "Mod"), "delete", 1)
        self.assertEqual(delete.as_dict(), {
            "type": "delete", "room": "r", "seq": 3, "target_seq": 1,
            "by": {"id": "mod", "name": "Mod"}, "ts": 3.0,
        })
        messages, _ = await store.read_after("r", 0, 10)
        self.assertEqual([(m.seq, m.kind, m.body) for m in messages],
                         [(1, "message", ""), (2, "edit", ""), (3, "delete", "")])
        self.assertEqual((messages[0].deleted_ms, messages[0].user), (3000, User("ann", "Ann")))
        self.assertEqual(messages[0].as_dict()["deleted"], 3.0)
        for kind in ("edit", "delete"):
            with self.assertRaises(ChatError) as caught:
                await store.append("r", "Ann", "again", 4000, None, User("ann", "Ann"), kind, 1)
            self.assertEqual(caught.exception.code, "message_deleted")
        following, _ = await store.append("r", "Ann", "next", 5000, None, User("ann", "Ann"))
        self.assertEqual(following.seq, 4)
        if self.durable:
            reopened = await self.reopen(store)
            messages, _ = await reopened.read_after("r", 0, 10)
            self.assertEqual([m.body for m in messages], ["", "", "", "next"])

    async def test_edit_needs_a_message(self) -> None:
        """
        An edit or deletion of a seq that is not a message (none, or a
        membership change) is refused with message_not_found.
        """
        store = await self.open_store()
        await self._room_with_message(store)
        await store.append("r", "Bob", "member", 2000, None, User("bob", "Bob"), "member")
        for target in (2, 99):
            with self.assertRaises(ChatError) as caught:
                await store.append("r", "Ann", "x", 3000, None, User("ann", "Ann"), "edit", target)
            self.assertEqual(caught.exception.code, "message_not_found")
        self.assertEqual(sorted(await store.load_rooms()), [("r", 2)])

    async def test_edit_after_delete_in_one_batch(self) -> None:
        """
        A deletion and an edit of one message committed together (group
        commit): the edit, after the deletion, is refused; the others of
        the batch are stored, with consecutive seqs.
        """
        store = await self.open_store()
        await self._room_with_message(store)
        ann = User("ann", "Ann")
        results = await DeferredList([
            store.append("r", "Ann", "", 2000, None, ann, "delete", 1),
            store.append("r", "Ann", "too late", 2001, None, ann, "edit", 1),
            store.append("r", "Ann", "after", 2002, None, ann),
        ], consumeErrors=True)
        self.assertTrue(results[0][0] and results[2][0])
        self.assertFalse(results[1][0])
        self.assertEqual(results[1][1].value.code, "message_deleted")
        self.assertEqual((results[0][1][0].seq, results[2][1][0].seq), (2, 3))
        messages, _ = await store.read_after("r", 0, 10)
        self.assertEqual([(m.seq, m.kind, m.body) for m in messages],
                         [(1, "message", ""), (2, "delete", ""), (3, "message", "after")])

    async def test_moderation_and_settings(self) -> None:
        """
        Bans and mutes (with their end), their lifting, a kick from a
        private room and the room's settings are events whose effects
        room_access shows; meta comes back as stored.
        """
        store = await self.open_store()
        await store.create_room("p", 0, private=True, owner=User("own", "Owner"))
        by = {"id": "own", "name": "Owner"}
        await store.append("p", "Bob", "member", 1000, None, User("bob", "Bob"), "member")
        await store.append("p", "Cy", "member", 1001, None, User("cy", "Cy"), "member")
        ban, _ = await store.append(
            "p", "Bob", "", 1002, None, User("bob", "Bob"), "moderation",
            meta={"action": "ban", "by": by, "until": 90_000, "reason": "spam"},
        )
        self.assertEqual(ban.as_dict()["until"], 90.0)
        await store.append("p", "Cy", "", 1003, None, User("cy", "Cy"), "moderation",
                           meta={"action": "mute", "by": by, "until": None, "reason": None})
        await store.append("p", "Owner", "", 1004, None, User("own", "Owner"), "room",
                           meta={"change": {"topic": "Be nice", "edits": False}})
        access = await store.room_access("p")
        self.assertEqual((access.bans, access.mutes, access.topic, access.edits, access.last_seq),
                         ({"bob": 90_000}, {"cy": None}, "Be nice", False, 5))
        self.assertEqual(access.restricted("ban", "bob", 89_999), (90_000,))
        self.assertIsNone(access.restricted("ban", "bob", 90_000))
        await store.append("p", "Cy", "", 1005, None, User("cy", "Cy"), "moderation",
                           meta={"action": "unmute", "by": by, "until": None, "reason": None})
        await store.append("p", "Bob", "", 1006, None, User("bob", "Bob"), "moderation",
                           meta={"action": "kick", "by": by, "until": None, "reason": None})
        access = await store.room_access("p")
        self.assertEqual((access.mutes, access.bans, sorted(access.members)), ({}, {"bob": 90_000}, ["cy", "own"]))
        messages, _ = await store.read_after("p", 2, 10)
        self.assertEqual([m.meta["action"] for m in messages if m.kind == "moderation"],
                         ["ban", "mute", "unmute", "kick"])
        self.assertEqual(messages[0], ban)

    async def test_settings_change_only_what_they_say(self) -> None:
        """
        A room event asks for a change; the store settles it against the
        room as it is, so a topic change does not undo edits being turned
        off in the same batch.
        """
        store = await self.open_store()
        await store.create_room("s", 0)
        own = User("own", "Owner")
        off, topic = await gatherResults([
            store.append("s", "Owner", "", 1000, None, own, "room", meta={"change": {"edits": False}}),
            store.append("s", "Mo", "", 1001, None, User("mo", "Mo"), "room", meta={"change": {"topic": "Hi"}}),
        ])
        self.assertEqual((off[0].body, off[0].meta), ("", {"edits": False}))
        self.assertEqual((topic[0].body, topic[0].meta), ("Hi", {"edits": False}))
        access = await store.room_access("s")
        self.assertEqual((access.topic, access.edits), ("Hi", False))

    async def test_guards_hold_within_a_batch(self) -> None:
        """
        A guarded event is checked against the room as of every event
        before it, those of its own batch included: posts after their
        sender's mute, an edit after edits were turned off, a moderator's
        action after their demotion are refused and take no seq.
        """
        store = await self.open_store()
        await store.create_room("g", 0, owner=User("own", "Owner"))
        own, mo, ann = User("own", "Owner"), User("mo", "Mo"), User("ann", "Ann")
        await store.append("g", "Mo", "moderator", 1000, None, mo, "member")
        first, _ = await store.append("g", "Ann", "mine", 1001, None, ann, guard=Guard("ann"))
        mute = {"action": "mute", "by": None, "until": None, "reason": None}
        results = await DeferredList([
            store.append("g", "Ann", "before", 1002, None, ann, guard=Guard("ann")),
            store.append("g", "Ann", "", 1003, None, ann, "moderation", meta=mute, guard=Guard("mo", role="moderator", over="ann")),
            store.append("g", "Ann", "after", 1004, None, ann, guard=Guard("ann")),
            store.append("g", "Owner", "", 1005, None, own, "room", meta={"change": {"edits": False}}, guard=Guard("own", role="owner")),
            store.append("g", "Ann", "edited", 1006, None, ann, "edit", first.seq, guard=Guard("ann", speak=False, edits=True)),
            store.append("g", "Mo", "member", 1007, None, mo, "member"),
            store.append("g", "Ann", "", 1008, None, ann, "moderation",
                         meta={**mute, "action": "unmute"}, guard=Guard("mo", role="moderator", over="ann")),
        ], consumeErrors=True)
        outcome = [r[1].seq if r[0] else r[1].value.code for r in
                   [(ok, value[0] if ok else value) for ok, value in results]]
        self.assertEqual(outcome, [3, 4, "muted", 5, "edits_disabled", 6, "not_allowed"])
        access = await store.room_access("g")
        self.assertEqual((access.mutes, access.edits, access.members["mo"]), ({"ann": None}, False, "member"))
        with self.assertRaises(ChatError) as caught:
            await store.append("g", "Ann", "later", 2000, None, ann, guard=Guard("ann"))
        self.assertEqual(caught.exception.code, "muted")
        ban = {"action": "ban", "by": None, "until": 3000, "reason": None}
        await store.append("g", "Ann", "", 2001, None, ann, "moderation", meta=ban, guard=Guard("own", role="moderator", over="ann"))
        with self.assertRaises(ChatError) as caught:
            await store.append("g", "Ann", "", 2500, None, ann, "delete", first.seq, guard=Guard("ann", speak=False))
        self.assertEqual(caught.exception.code, "banned")
        # The ban's end holds by the event's time.
        await store.append("g", "Ann", "", 3000, None, ann, "delete", first.seq, guard=Guard("ann", speak=False))

    async def test_kick_from_public_room_keeps_membership(self) -> None:
        """
        A kick from a public room closes connections, nothing more: a
        member stays a member.
        """
        store = await self.open_store()
        await store.create_room("pub", 0, owner=User("own", "Owner"))
        await store.append("pub", "Bob", "member", 1000, None, User("bob", "Bob"), "member")
        await store.append("pub", "Bob", "", 1001, None, User("bob", "Bob"), "moderation",
                           meta={"action": "kick", "by": None, "until": None, "reason": None})
        self.assertEqual((await store.room_access("pub")).members, {"own": "owner", "bob": "member"})

    async def test_read_markers(self) -> None:
        """
        Read markers are kept per user and room, never move back, and a
        room that does not exist is ignored.
        """
        store = await self.open_store()
        await store.create_room("a", 0)
        await store.create_room("b", 0)
        await store.set_read_markers({("ann", "a"): 5, ("ann", "b"): 2, ("bob", "a"): 1, ("ann", "nope"): 3})
        await store.set_read_markers({("ann", "a"): 4, ("ann", "b"): 7})
        self.assertEqual(await store.read_markers("ann"), {"a": 5, "b": 7})
        self.assertEqual(await store.read_markers("bob"), {"a": 1})
        self.assertEqual(await store.read_markers("cy"), {})


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

    async def test_sqlite_v4_takes_the_live_room_events(self) -> None:
        """
        A v4 database (before edits, moderation and read markers) keeps its
        messages and members through the upgrade, and its rooms then take
        every new kind of event.
        """
        path = os.path.abspath(self.mktemp())
        conn = sqlite3.connect(path)
        for name in ["v1.sql", "upgrade-to-v2.sql", "upgrade-to-v3.sql", "upgrade-to-v4.sql"]:
            for statement in _statements(schema_files("sqlite", name)):
                conn.execute(statement)
        conn.execute("INSERT INTO rooms (name, last_seq, created_ms) VALUES ('old', 1, 0)")
        conn.execute(
            "INSERT INTO messages (room_id, seq, nick, body, ts_ms, client_id, user_id, kind) "
            "VALUES (1, 1, 'Ann', 'kept', 0, NULL, 'ann', 'message')"
        )
        conn.execute("INSERT INTO members VALUES (1, 'ann', 'owner', 'Ann')")
        conn.commit()
        conn.close()
        store = SQLiteStore(path, reactor=reactor)
        self.addCleanup(store.close)
        self.assertEqual(await store.open(), SCHEMA_VERSION)
        access = await store.room_access("old")
        self.assertEqual((access.members, access.topic, access.edits, access.bans), ({"ann": "owner"}, "", True, {}))
        ann = User("ann", "Ann")
        await store.append("old", "Ann", "edited", 1000, None, ann, "edit", 1)
        await store.append("old", "Ann", "", 2000, None, ann, "moderation",
                           meta={"action": "mute", "by": None, "until": None, "reason": None})
        messages, _ = await store.read_after("old", 0, 10)
        self.assertEqual([(m.kind, m.body, m.edited_ms) for m in messages],
                         [("message", "edited", 1000), ("edit", "edited", None), ("moderation", "", None)])
        await store.set_read_markers({("ann", "old"): 3})
        self.assertEqual(await store.read_markers("ann"), {"old": 3})

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

