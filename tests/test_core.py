"""
Tests for L{chatd.core}: rooms, validation, ordering, bounds, fan-out,
long-poll waiters and subscriptions, with no reactor and no I/O.
"""

from typing import Any, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from chatd._wire import http_status
from chatd.core import ChatCore
from chatd.interfaces import IMessageStore
from chatd.model import (
    Batch,
    ChatError,
    Message,
    parse_cursor,
    validate_body,
    validate_client_id,
    validate_nick,
    validate_room_name,
)
from chatd.store.memory import MemoryStore
from chatd.web import _encode_batch


def make_core(history: int = 500, retain: Optional[int] = None, rooms=()) -> Tuple[ChatCore, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    core = ChatCore(MemoryStore(retain or history), clock, history)
    core.start(rooms)
    return core, clock


@implementer(IMessageStore)
class ManualStore:
    """
    A store wrapper whose appends and reads complete only when the test
    says so, to make commits and history loads arrive in any order.
    """

    description = "manual"

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.appends: List[Tuple[Deferred, object]] = []
        self.reads: List[Tuple[Deferred, object]] = []

    def load_rooms(self):
        return self.inner.load_rooms()

    def open(self):
        return self.inner.open()

    def create_room(self, name, now_ms, *args):
        return self.inner.create_room(name, now_ms, *args)

    def room_access(self, name):
        return self.inner.room_access(name)

    def share_presence(self, node, clients, ttl_ms):
        return self.inner.share_presence(node, clients, ttl_ms)

    def room_state(self, name):
        return self.inner.room_state(name)

    def prune(self, before_ms):
        return self.inner.prune(before_ms)

    def append(self, *args):
        # The seq is assigned now (in call order); only the reply waits.
        result = self.inner.append(*args)
        d: Deferred = Deferred()
        self.appends.append((d, result))
        return d

    def read_after(self, room, after, limit):
        d: Deferred = Deferred()
        self.reads.append((d, self.inner.read_after(room, after, limit)))
        return d

    def read_before(self, room, before, limit):
        return self.inner.read_before(room, before, limit)

    def close(self):
        return succeed(None)

    @staticmethod
    def release(pending: List[Tuple[Deferred, object]], index: int) -> None:
        d, inner = pending.pop(index)
        inner.addCallback(d.callback)


class ValidationTests(SynchronousTestCase):
    """
    The input rules every transport shares.
    """

    def test_room_names(self) -> None:
        """
        Room names are 1-64 of [A-Za-z0-9_-]; anything else is refused.
        """
        for good in ["a", "lobby", "A-b_9", "x" * 64]:
            self.assertEqual(validate_room_name(good), good)
        for bad in ["", "x" * 65, "a b", "a/b", "ä", "<script>", None, 5, "a\n"]:
            with self.assertRaises(ChatError) as e:
                validate_room_name(bad)
            self.assertEqual((e.exception.code, http_status(e.exception)), ("invalid_room_name", 400))

    def test_nick_defaults_and_limits(self) -> None:
        """
        A missing or blank nick is "anonymous"; nicks are stripped and at
        most 32 printable characters.
        """
        self.assertEqual(validate_nick(None), "anonymous")
        self.assertEqual(validate_nick("   "), "anonymous")
        self.assertEqual(validate_nick("  ann "), "ann")
        self.assertEqual(validate_nick("n" * 32), "n" * 32)
        for bad in ["n" * 33, "a\x00b", "a\nb", 7, ["x"]]:
            with self.assertRaises(ChatError) as e:
                validate_nick(bad)
            self.assertEqual(e.exception.code, "invalid_nick")

    def test_nick_lookalikes(self) -> None:
        """
        Nicks are NFC-normalised (the same name typed two ways is one
        name); zero-width, bidi-control and other invisible characters
        are refused, saying which.
        """
        self.assertEqual(validate_nick("Jose\u0301"), "Jos\u00e9")
        self.assertEqual(validate_nick("Jos\u00e9"), "Jos\u00e9")
        self.assertEqual(validate_nick("a\u00a0b"), "a\u00a0b")
        self.assertEqual(validate_nick("\u0430lice"), "\u0430lice")  # Cyrillic a: a letter
        for bad, code_point in [
            ("alice\u200b", "U+200B"),
            ("al\u200dice", "U+200D"),
            ("\u202ealice", "U+202E"),
            ("\u2066bob\u2069", "U+2066"),
            ("\ufeffbob", "U+FEFF"),
            ("a\u2028b", "U+2028"),
            ("a\ue000b", "U+E000"),
        ]:
            with self.assertRaises(ChatError) as e:
                validate_nick(bad)
            self.assertEqual(e.exception.code, "invalid_nick")
            self.assertIn(code_point, e.exception.detail)

    def test_body_rules(self) -> None:
        """
        A body is stripped and must be 1-4096 characters; too long is 413,
        empty, non-string or control characters are 400.
        """
        self.assertEqual(validate_body("  hi\n there \t"), "hi\n there")
        self.assertEqual(validate_body("é" * 4096), "é" * 4096)
        with self.assertRaises(ChatError) as e:
            validate_body("x" * 4097)
        self.assertEqual((e.exception.code, http_status(e.exception)), ("body_too_long", 413))
        for bad in ["", "   ", None, 3, {"a": 1}, "a\x00", "bell\x07", "\ud800"]:
            with self.assertRaises(ChatError) as e:
                validate_body(bad)
            self.assertEqual((e.exception.code, http_status(e.exception)), ("invalid_body", 400))

    def test_client_id(self) -> None:
        """
        client_id is optional, else a 1-64 character printable string.
        """
        self.assertIsNone(validate_client_id(None))
        self.assertEqual(validate_client_id("abc-1"), "abc-1")
        for bad in ["", "x" * 65, 12, "a\tb"]:
            with self.assertRaises(ChatError):
                validate_client_id(bad)

    def test_cursor(self) -> None:
        """
        Cursors are non-negative decimal integers.
        """
        self.assertIsNone(parse_cursor(None))
        self.assertEqual(parse_cursor("0"), 0)
        self.assertEqual(parse_cursor("42"), 42)
        for bad in ["-1", "1.5", "x", "", " 1", "١", str(2**63)]:
            with self.assertRaises(ChatError) as e:
                parse_cursor(bad)
            self.assertEqual(e.exception.code, "invalid_parameter")


class RoomTests(SynchronousTestCase):
    """
    Rooms are created explicitly and are separate.
    """

    def test_lobby_and_startup_rooms(self) -> None:
        """
        lobby always exists; rooms passed to start() are created.
        """
        core, _ = make_core(rooms=["dev", "ops"])
        self.assertEqual([r.name for r in core.rooms()], ["dev", "lobby", "ops"])

    def test_create(self) -> None:
        """
        create_room adds a room with no messages.
        """
        core, _ = make_core()
        room = self.successResultOf(core.create_room("new"))
        self.assertEqual((room.name, room.last_seq, room.clients), ("new", 0, 0))
        self.assertIs(core.room("new"), room)

    def test_create_existing(self) -> None:
        """
        Creating an existing room is a 409.
        """
        core, _ = make_core()
        failure = self.failureResultOf(core.create_room("lobby"), ChatError)
        self.assertEqual((failure.value.code, http_status(failure.value)), ("room_exists", 409))

    def test_create_invalid(self) -> None:
        """
        An invalid name is a 400 and creates nothing.
        """
        core, _ = make_core()
        failure = self.failureResultOf(core.create_room("a b"), ChatError)
        self.assertEqual(http_status(failure.value), 400)
        self.assertEqual(len(core.rooms()), 1)

    def test_unknown_room_everywhere(self) -> None:
        """
        An unknown room is a 404 for every operation and is never created.
        """
        core, _ = make_core()
        for d in [
            core.post("nope", "a", "b"),
            core.read("nope", 0, 10),
            core.wait("nope", 0, 10, 5),
            core.read_before("nope", 5, 10),
        ]:
            self.assertEqual(http_status(self.failureResultOf(d, ChatError).value), 404)
        with self.assertRaises(ChatError):
            core.subscribe("nope", None, lambda m: None, lambda s: None)
        self.assertEqual([r.name for r in core.rooms()], ["lobby"])

    def test_rooms_are_separate(self) -> None:
        """
        Messages posted in one room are never seen in another, and each
        room has its own seq numbering.
        """
        core, _ = make_core(rooms=["a", "b"])
        seen = {"a": [], "b": []}
        for name in seen:
            core.subscribe(name, None, seen[name].append, lambda s: None)
        self.successResultOf(core.post("a", "x", "in a"))
        self.successResultOf(core.post("b", "x", "in b 1"))
        self.successResultOf(core.post("b", "x", "in b 2"))
        self.assertEqual([(m.room, m.seq, m.body) for m in seen["a"]], [("a", 1, "in a")])
        self.assertEqual(
            [(m.room, m.seq) for m in seen["b"]], [("b", 1), ("b", 2)]
        )
        self.assertEqual(self.successResultOf(core.read("a", 0, 10)).messages, seen["a"])


class PostTests(SynchronousTestCase):
    """
    Posting assigns seq numbers and timestamps.
    """

    def test_seq_and_fields(self) -> None:
        """
        seq starts at 1 and increases by one; ts is the clock's time.
        """
        core, clock = make_core()
        first = self.successResultOf(core.post("lobby", None, " hello "))
        clock.advance(1.5)
        second = self.successResultOf(core.post("lobby", "bob", "again"))
        self.assertEqual(
            first.as_dict(),
            {
                "type": "message",
                "room": "lobby",
                "seq": 1,
                "nick": "anonymous",
                "user": None,
                "body": "hello",
                "ts": 1_700_000_000.0,
            },
        )
        self.assertEqual((second.seq, second.ts_ms), (2, 1_700_000_001_500))
        self.assertEqual(core.room("lobby").last_seq, 2)

    def test_invalid_post_stores_nothing(self) -> None:
        """
        A refused message gets no seq and changes nothing.
        """
        core, _ = make_core()
        self.failureResultOf(core.post("lobby", "x", ""), ChatError)
        self.failureResultOf(core.post("lobby", "x" * 40, "hi"), ChatError)
        self.assertEqual(core.room("lobby").last_seq, 0)
        self.assertEqual(self.successResultOf(core.post("lobby", "x", "ok")).seq, 1)

    def test_client_id_dedup(self) -> None:
        """
        A second post with the same client_id returns the original, with
        its seq, and delivers nothing new.
        """
        core, _ = make_core(rooms=["other"])
        seen: List[Message] = []
        core.subscribe("lobby", None, seen.append, lambda s: None)
        original = self.successResultOf(core.post("lobby", "a", "one", "cid-1"))
        again = self.successResultOf(core.post("lobby", "a", "one (retry)", "cid-1"))
        self.assertIs(again, original)
        self.assertEqual(seen, [original])
        # The same client_id in another room is another message.
        other = self.successResultOf(core.post("other", "a", "one", "cid-1"))
        self.assertEqual(other.seq, 1)
        self.assertEqual(other.room, "other")

    def test_json_encoded_once(self) -> None:
        """
        A message's JSON is computed once and shared.
        """
        core, _ = make_core()
        message = self.successResultOf(core.post("lobby", "a", 'say "<hi>" \u2028 ok'))
        self.assertIs(message.json, message.json)
        self.assertEqual(
            message.json,
            b'{"type":"message","room":"lobby","seq":1,"nick":"a","user":null,'
            b'"body":"say \\"<hi>\\" \\u2028 ok","ts":1700000000.0}',
        )

    def test_out_of_order_commits_are_delivered_in_order(self) -> None:
        """
        When the store reports seq 2 committed before seq 1, subscribers
        and waiters still see 1 then 2, each once.
        """
        store = ManualStore(MemoryStore())
        core = ChatCore(store, Clock())
        core.start()
        seen: List[int] = []
        core.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        waiter = core.wait("lobby", 0, 10, 30)
        d1 = core.post("lobby", "a", "one")
        d2 = core.post("lobby", "a", "two")
        d3 = core.post("lobby", "a", "three")
        store.release(store.appends, 1)
        self.assertEqual(seen, [])
        self.assertNoResult(waiter)
        self.assertEqual(self.successResultOf(d2).seq, 2)
        store.release(store.appends, 0)
        self.assertEqual(seen, [1, 2])
        self.assertEqual([m.seq for m in self.successResultOf(waiter).messages], [1])
        self.assertNoResult(d3)
        store.release(store.appends, 0)
        self.assertEqual(seen, [1, 2, 3])
        self.successResultOf(d1)


class BoundsTests(SynchronousTestCase):
    """
    Memory does not grow with the number of messages ever sent.
    """

    def test_cache_is_bounded(self) -> None:
        """
        A room caches at most `history` messages, and the memory store
        keeps no more than it retains.
        """
        core, _ = make_core(history=5)
        for i in range(1, 101):
            self.successResultOf(core.post("lobby", "a", f"m{i}", f"c{i}"))
        room = core.room("lobby")
        self.assertEqual([m.seq for m in room._cache], [96, 97, 98, 99, 100])
        log = core._store._rooms["lobby"]
        self.assertEqual(len(log.messages), 5)
        self.assertEqual(len(log.by_client_id), 5)

    def test_old_cursor_resets(self) -> None:
        """
        A cursor older than what is held gets reset=True and continues
        from the oldest message still held, never a silent gap.
        """
        core, _ = make_core(history=5)
        for i in range(1, 21):
            core.post("lobby", "a", f"m{i}")
        batch = self.successResultOf(core.read("lobby", 3, 100))
        self.assertTrue(batch.reset)
        self.assertEqual(batch.first_seq, 16)
        self.assertEqual([m.seq for m in batch.messages], [16, 17, 18, 19, 20])
        self.assertIn(b'"reset":true,"first_seq":16}', _encode_batch(batch))
        # A cursor just before the oldest held is not a reset.
        batch = self.successResultOf(core.read("lobby", 15, 100))
        self.assertFalse(batch.reset)
        self.assertEqual(len(batch.messages), 5)

    def test_future_cursor_resets(self) -> None:
        """
        A cursor beyond the newest seq (the server lost messages the
        client saw) is answered with a reset and what is held.
        """
        core, _ = make_core()
        core.post("lobby", "a", "one")
        batch = self.successResultOf(core.read("lobby", 99, 10))
        self.assertTrue(batch.reset)
        self.assertEqual([m.seq for m in batch.messages], [1])

    def test_read_limit(self) -> None:
        """
        read returns at most `limit` messages, oldest first.
        """
        core, _ = make_core()
        for i in range(10):
            core.post("lobby", "a", f"m{i}")
        batch = self.successResultOf(core.read("lobby", 2, 3))
        self.assertEqual([m.seq for m in batch.messages], [3, 4, 5])
        self.assertEqual(batch.last_seq, 10)

    def test_read_before(self) -> None:
        """
        read_before pages backwards: the newest `limit` messages older
        than `before`, oldest first.
        """
        core, _ = make_core()
        for i in range(10):
            core.post("lobby", "a", f"m{i}")
        batch = self.successResultOf(core.read_before("lobby", 8, 3))
        self.assertEqual([m.seq for m in batch.messages], [5, 6, 7])
        batch = self.successResultOf(core.read_before("lobby", 2, 3))
        self.assertEqual([m.seq for m in batch.messages], [1])


class WaitTests(SynchronousTestCase):
    """
    Long-poll waiters: answered at once, on the next message, or empty
    at the timeout; cancelled ones are forgotten.
    """

    def test_immediate_when_newer_exists(self) -> None:
        """
        If messages after the cursor exist, wait answers at once.
        """
        core, _ = make_core()
        core.post("lobby", "a", "one")
        batch = self.successResultOf(core.wait("lobby", 0, 10, 25))
        self.assertEqual([m.body for m in batch.messages], ["one"])

    def test_wakes_on_message_without_tick(self) -> None:
        """
        A waiter fires as soon as a message is committed: no clock advance
        is needed.
        """
        core, _ = make_core()
        d = core.wait("lobby", None, 10, 25)
        self.assertNoResult(d)
        self.assertEqual(core.room("lobby").waiting, 1)
        core.post("lobby", "a", "now")
        batch = self.successResultOf(d)
        self.assertEqual([m.body for m in batch.messages], ["now"])
        self.assertEqual(core.room("lobby").waiting, 0)

    def test_many_waiters_share_one_encoding(self) -> None:
        """
        All waiters of a room get the same batch, encoded once.
        """
        core, _ = make_core()
        waiters = [core.wait("lobby", 0, 10, 25) for _ in range(5)]
        core.post("lobby", "a", "x")
        batches = [self.successResultOf(d) for d in waiters]
        self.assertTrue(all(b is batches[0] for b in batches))

    def test_timeout_answers_empty(self) -> None:
        """
        At the timeout the waiter answers with no messages and is gone.
        """
        core, clock = make_core()
        d = core.wait("lobby", 0, 10, 25)
        clock.advance(24.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        batch = self.successResultOf(d)
        self.assertEqual((batch.messages, batch.last_seq), ([], 0))
        self.assertEqual(core.room("lobby").waiting, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_forgets_waiter(self) -> None:
        """
        Cancelling (the client disconnected) removes the waiter and its
        timer at once.
        """
        core, clock = make_core()
        d = core.wait("lobby", 0, 10, 25)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(core.room("lobby").waiting, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        core.post("lobby", "a", "after cancel")

    def test_timeouts_of_many_waiters(self) -> None:
        """
        Waiters of one room each time out at their own deadline, whatever
        order they came in, with one timer for the room; cancelled or
        answered ones are not answered again.
        """
        core, clock = make_core()
        late = core.wait("lobby", 0, 10, 30)
        soon = core.wait("lobby", 0, 10, 5)
        gone = core.wait("lobby", 0, 10, 5)
        same = core.wait("lobby", 0, 10, 5)
        never = core.wait("lobby", 0, 10, None)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        clock.advance(5)
        self.assertEqual(self.successResultOf(soon).messages, [])
        self.assertEqual(self.successResultOf(same).messages, [])
        self.assertNoResult(late)
        self.assertEqual(core.room("lobby").waiting, 2)
        clock.advance(25)
        self.assertEqual(self.successResultOf(late).messages, [])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNoResult(never)
        core.post("lobby", "a", "for never")
        self.assertEqual([m.body for m in self.successResultOf(never).messages], ["for never"])

    def test_message_stops_the_timer(self) -> None:
        """
        A message answers every waiter and leaves no timer; later waiters
        get a timer of their own.
        """
        core, clock = make_core()
        first = [core.wait("lobby", 0, 10, 25) for _ in range(3)]
        clock.advance(10)
        core.post("lobby", "a", "x")
        self.assertEqual([len(self.successResultOf(d).messages) for d in first], [1, 1, 1])
        self.assertEqual(clock.getDelayedCalls(), [])
        d = core.wait("lobby", 1, 10, 25)
        clock.advance(24)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual(self.successResultOf(d).last_seq, 1)

    def test_wait_for(self) -> None:
        """
        The Deferred-free long-poll: answered at once when messages exist
        (behind-by-the-same clients share one batch), else on the next
        message or at the timeout; forgotten when its client goes away.
        """
        core, clock = make_core()
        core.post("lobby", "a", "one")
        got: List[Any] = []
        self.assertIsNone(core.wait_for("lobby", 0, 10, 25, got.append, got.append))
        self.assertIsNone(core.wait_for("lobby", 0, 10, 25, got.append, got.append))
        self.assertEqual([m.body for m in got[0].messages], ["one"])
        self.assertIs(got[0], got[1])
        del got[:]
        forget = core.wait_for("lobby", 1, 10, 25, got.append, got.append)
        gone = core.wait_for("lobby", 1, 10, 25, lambda batch: self.fail("answered"), got.append)
        assert gone is not None and forget is not None
        gone()
        self.assertEqual(core.room("lobby").waiting, 1)
        core.post("lobby", "a", "two")
        self.assertEqual([m.body for m in got[0].messages], ["two"])
        del got[:]
        core.wait_for("lobby", 2, 10, 5, got.append, got.append)
        clock.advance(5)
        self.assertEqual((got[0].messages, got[0].last_seq), ([], 2))
        self.assertEqual(clock.getDelayedCalls(), [])
        del got[:]
        core.wait_for("nowhere", 0, 10, 5, lambda batch: self.fail("answered"), got.append)
        self.assertEqual(got[0].value.code, "room_not_found")

    def test_zero_timeout(self) -> None:
        """
        timeout=0 answers at once even when there is nothing new.
        """
        core, _ = make_core()
        self.assertEqual(self.successResultOf(core.wait("lobby", None, 10, 0)).messages, [])

    def test_no_timeout(self) -> None:
        """
        timeout=None waits with no timer.
        """
        core, clock = make_core()
        d = core.wait("lobby", None, 1, None)
        self.assertEqual(clock.getDelayedCalls(), [])
        core.post("lobby", "a", "x")
        self.assertEqual(len(self.successResultOf(d).messages), 1)


class SubscriptionTests(SynchronousTestCase):
    """
    Subscriptions see history then live messages, in order, exactly once.
    """

    def test_history_then_live(self) -> None:
        """
        With no cursor, a subscriber gets the cached history, then new
        messages.
        """
        core, _ = make_core(history=3)
        for i in range(5):
            core.post("lobby", "a", f"m{i}")
        seen: List[int] = []
        resets: List[int] = []
        sub = core.subscribe("lobby", None, lambda m: seen.append(m.seq), resets.append)
        self.assertEqual(seen, [3, 4, 5])
        core.post("lobby", "a", "live")
        self.assertEqual(seen, [3, 4, 5, 6])
        self.assertEqual(resets, [])
        self.assertEqual(sub.last_seq, 6)

    def test_after_cursor(self) -> None:
        """
        ?after=SEQ resumes exactly after SEQ.
        """
        core, _ = make_core()
        for i in range(5):
            core.post("lobby", "a", f"m{i}")
        seen: List[int] = []
        core.subscribe("lobby", 3, lambda m: seen.append(m.seq), lambda s: None)
        self.assertEqual(seen, [4, 5])

    def test_old_cursor_resets(self) -> None:
        """
        A cursor older than what is held is answered with a reset, then
        the held messages.
        """
        core, _ = make_core(history=3)
        for i in range(10):
            core.post("lobby", "a", f"m{i}")
        events: List[object] = []
        core.subscribe("lobby", 2, lambda m: events.append(m.seq), lambda s: events.append(("reset", s)))
        self.assertEqual(events, [("reset", 8), 8, 9, 10])

    def test_slow_backfill_has_no_gap_or_duplicate(self) -> None:
        """
        While history is still being read from the store, new messages
        are queued and handed over after it: no gap, no duplicate at the
        seam.
        """
        inner = MemoryStore(retain=100)
        store = ManualStore(inner)
        core = ChatCore(store, Clock(), history=2)
        core.start()
        for i in range(6):
            core.post("lobby", "a", f"m{i}")
            store.release(store.appends, 0)
        seen: List[int] = []
        sub = core.subscribe("lobby", 1, lambda m: seen.append(m.seq), lambda s: None)
        # The cache holds 5-6 only, so the store is asked for 2..
        self.assertEqual(len(store.reads), 1)
        core.post("lobby", "a", "during")
        store.release(store.appends, 0)
        self.assertEqual(seen, [])
        # history=2 pages the backfill two at a time; the later pages are
        # read after seq 7 was committed and include it, so the queued live
        # copy must not be delivered again.
        while store.reads:
            store.release(store.reads, 0)
        self.assertEqual(seen, [2, 3, 4, 5, 6, 7])
        core.post("lobby", "a", "later")
        store.release(store.appends, 0)
        self.assertEqual(seen, [2, 3, 4, 5, 6, 7, 8])
        self.assertEqual(sub.last_seq, 8)

    def test_stop_during_backfill(self) -> None:
        """
        A subscription stopped while its history loads delivers nothing.
        """
        store = ManualStore(MemoryStore(retain=100))
        core = ChatCore(store, Clock(), history=1)
        core.start()
        for i in range(3):
            core.post("lobby", "a", f"m{i}")
            store.release(store.appends, 0)
        seen: List[Message] = []
        sub = core.subscribe("lobby", 0, seen.append, lambda s: None)
        sub.stop()
        sub.stop()
        store.release(store.reads, 0)
        self.assertEqual(seen, [])
        self.assertEqual(core.room("lobby").subscribers, 0)

    def test_failing_subscriber_is_isolated(self) -> None:
        """
        A subscriber whose delivery raises is dropped and logged; the
        others still get the message.
        """
        core, _ = make_core()
        good: List[int] = []

        def bad(message: Message) -> None:
            raise RuntimeError("client exploded")

        core.subscribe("lobby", None, bad, lambda s: None)
        core.subscribe("lobby", None, lambda m: good.append(m.seq), lambda s: None)
        core.post("lobby", "a", "one")
        core.post("lobby", "a", "two")
        self.assertEqual(good, [1, 2])
        self.assertEqual(core.room("lobby").subscribers, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_removes(self) -> None:
        """
        A stopped subscription receives nothing more.
        """
        core, _ = make_core()
        seen: List[Message] = []
        sub = core.subscribe("lobby", None, seen.append, lambda s: None)
        self.assertEqual(core.room("lobby").subscribers, 1)
        sub.stop()
        core.post("lobby", "a", "x")
        self.assertEqual(seen, [])
        self.assertEqual(core.room("lobby").subscribers, 0)


class ManySendersTests(SynchronousTestCase):
    """
    Interleaved senders, receivers joining mid-stream and commits
    completing out of order still give every receiver 1..N exactly once.
    """

    def test_interleaved(self) -> None:
        """
        300 messages from 3 senders with commits released in a scrambled
        order; subscribers join at different points, some with cursors,
        and long-poll clients follow along; everyone ends with 1..300.
        """
        store = ManualStore(MemoryStore(retain=1000))
        core = ChatCore(store, Clock(), history=50)
        core.start()
        logs: List[List[int]] = []

        def join(after: Optional[int]) -> None:
            log: List[int] = []
            logs.append(log)
            core.subscribe("lobby", after, lambda m: log.append(m.seq), lambda s: None)

        polls: List[List[int]] = [[] for _ in range(3)]
        cursors = [0, 0, 0]

        def poll(i: int) -> None:
            def got(batch: Batch) -> None:
                polls[i].extend(m.seq for m in batch.messages)
                if batch.messages:
                    cursors[i] = batch.messages[-1].seq
                poll(i)

            core.wait("lobby", cursors[i], 7, 25).addCallback(got)

        join(0)
        for i in range(3):
            poll(i)
        order = [5, 0, 3, 1, 2, 4]
        for n in range(300):
            core.post("lobby", f"s{n % 3}", f"m{n}")
            if n == 120:
                join(0)
            if n == 200:
                join(150)
            if len(store.appends) >= 6:
                # Release a scrambled batch of six commits.
                batch = list(store.appends)
                store.appends.clear()
                for k in order:
                    d, inner = batch[k]
                    inner.addCallback(d.callback)
            while store.reads:
                store.release(store.reads, 0)
        while store.appends:
            store.release(store.appends, len(store.appends) - 1)
        while store.reads:
            store.release(store.reads, 0)
        expected = list(range(1, 301))
        self.assertEqual(logs[0], expected)
        self.assertEqual(logs[1], expected)
        self.assertEqual(logs[2], list(range(151, 301)))
        for log in polls:
            self.assertEqual(log, expected)
