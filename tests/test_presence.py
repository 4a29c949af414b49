"""
Tests for L{chatd.presence}: who is in a room and who is typing, on a fake
clock (no sockets), and the core's presence across nodes sharing a bus.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatd.bus.local import LocalBus
from chatd.core import ChatCore
from chatd.model import GUEST, ChatError, Headcount, Identity, Message, User
from chatd.presence import (
    ANNOUNCE_SPACING,
    MAX_ENTRIES,
    MAX_TYPERS,
    POLL_GRACE,
    TYPING_EVERY,
    TYPING_EXPIRES,
    WAKE_SPACING,
    Presence,
    presence_key,
    validate_client,
    validate_flag,
    validate_seen,
)
from chatd.store.memory import MemoryStore

ALICE = User("alice", "Alice")
BOB = User("bob", "Bob")


class Frames:
    """
    A listener that records the frames it is told, decoded.
    """

    def __init__(self) -> None:
        self.frames: List[Tuple[str, Dict[str, Any]]] = []

    def __call__(self, kind: str, body: bytes) -> None:
        self.frames.append((kind, json.loads(body)))

    def of(self, kind: str) -> List[Dict[str, Any]]:
        return [frame for k, frame in self.frames if k == kind]

    @property
    def typing(self) -> List[Tuple[str, bool]]:
        return [(f["nick"], f["typing"]) for f in self.of("typing")]


def diff(joined: List[User] = (), left: List[str] = (), guests: int = 0) -> Dict[str, Any]:  # type: ignore[assignment]
    return {
        "type": "presence",
        "room": "lobby",
        "joined": [u.as_dict() for u in joined],
        "left": list(left),
        "guests": guests,
    }


class PresenceTests(SynchronousTestCase):
    """
    Who is here: users by id, guests counted, snapshots and diffs.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.signals: List[Dict[str, Any]] = []
        # A diff for every change (what each one says; how a busy moment's
        # are told together is ANNOUNCE_SPACING's test).
        self.presence = Presence("lobby", self.clock, self.signals.append, spacing=0)
        self.watcher = Frames()
        self.presence.arrive("guest:watcher", None, self.watcher)

    def test_three_tabs_of_one_user_are_one(self) -> None:
        """
        One user with three tabs is one entry: one C{joined} when the
        first arrives, none for the others, one C{left} when the last
        leaves.
        """
        tabs = [self.presence.arrive("user:alice", ALICE) for _ in range(3)]
        self.assertEqual(self.presence.clients, 2)
        self.assertEqual([u.id for u in self.presence.users], ["alice"])
        tabs[0].leave()
        tabs[1].leave()
        self.assertEqual(self.presence.clients, 2)
        tabs[2].leave()
        tabs[2].leave()
        self.assertEqual(self.presence.clients, 1)
        self.assertEqual(self.watcher.of("presence")[1:], [diff([ALICE], [], 1), diff([], ["alice"], 1)])

    def test_snapshot_on_arrival(self) -> None:
        """
        A listener's first frame is the snapshot: users by name then id,
        and the guests; nobody else is told of a connection that changes
        nothing.
        """
        for user in (BOB, User("al2", "Alice"), ALICE):
            self.presence.arrive("user:" + user.id, user)
        frames = Frames()
        self.presence.arrive("user:bob", BOB, frames)
        self.assertEqual(
            frames.frames,
            [
                (
                    "presence",
                    {
                        "type": "presence",
                        "room": "lobby",
                        "users": [
                            {"id": "al2", "name": "Alice"},
                            {"id": "alice", "name": "Alice"},
                            {"id": "bob", "name": "Bob"},
                        ],
                        "guests": 1,
                    },
                )
            ],
        )
        self.assertEqual(len(self.watcher.of("presence")), 4)

    def test_guests(self) -> None:
        """
        Guests are counted, not named: each anonymous connection is one,
        a guest browser's tabs (one client id) are one.
        """
        first = self.presence.arrive(self.presence.anonymous_key(), None)
        self.presence.arrive(self.presence.anonymous_key(), None)
        tabs = [self.presence.arrive("guest:b1", None) for _ in range(2)]
        self.assertEqual((self.presence.clients, self.presence.guests, self.presence.users), (4, 4, []))
        tabs[0].leave()
        first.leave()
        self.assertEqual(self.presence.guests, 3)
        self.assertEqual([f["guests"] for f in self.watcher.of("presence")], [1, 2, 3, 4, 3])

    def test_a_new_name_is_joined_again(self) -> None:
        """
        The same user arriving under a new name (a fresh token) is
        announced with it.
        """
        self.presence.arrive("user:alice", ALICE)
        self.presence.arrive("user:alice", User("alice", "Alice B."))
        self.assertEqual(self.watcher.of("presence")[-1], diff([User("alice", "Alice B.")], [], 1))
        self.assertEqual(self.presence.users, [User("alice", "Alice B.")])

    def test_long_poll_lease(self) -> None:
        """
        A long-poll holds its entry while it waits and leaves a lease when
        answered: polling again within the lease, its user never leaves;
        not polling again, they leave once the lease ends.
        """
        for _ in range(5):
            poll = self.presence.arrive("user:alice", ALICE)
            self.clock.advance(20)
            poll.leave(POLL_GRACE)
            self.clock.advance(POLL_GRACE - 0.5)
        self.assertEqual(self.watcher.of("presence")[1:], [diff([ALICE], [], 1)])
        self.clock.advance(0.5)
        self.assertEqual(self.watcher.of("presence")[-1], diff([], ["alice"], 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lease_and_connection(self) -> None:
        """
        A user whose long-poll lease is running and whose WebSocket closes
        stays until the lease ends; leases extended meanwhile are kept.
        """
        poll = self.presence.arrive("user:alice", ALICE)
        poll.leave(POLL_GRACE)
        ws = self.presence.arrive("user:alice", ALICE)
        self.clock.advance(POLL_GRACE + 1)
        self.assertEqual(self.presence.clients, 2)
        again = self.presence.arrive("user:alice", ALICE)
        again.leave(POLL_GRACE)
        ws.leave()
        self.clock.advance(POLL_GRACE - 1)
        self.assertEqual(self.presence.clients, 2)
        self.clock.advance(1)
        self.assertEqual(self.presence.clients, 1)

    def test_many_leases_expire_in_order(self) -> None:
        """
        Leases of many entries end each at its own time, with one timer.
        """
        for i in range(5):
            self.presence.arrive(f"ip:10.0.0.{i}", None).leave(POLL_GRACE + i)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        counts = []
        for _ in range(5):
            self.clock.advance(1 if counts else POLL_GRACE)
            counts.append(self.presence.guests)
        self.assertEqual(counts, [5, 4, 3, 2, 1])

    def test_remote_nodes(self) -> None:
        """
        Other nodes' leases join in: a user on two nodes is one user, and
        leaves only when gone from both; guests are summed.
        """
        here = self.presence.arrive("user:alice", ALICE)
        self.presence.remote(Headcount({"alice": "Alice", "bob": "Bob"}, 2))
        self.assertEqual(self.presence.clients, 5)
        self.assertEqual(self.watcher.of("presence")[-1], diff([BOB], [], 3))
        here.leave()
        self.assertEqual(self.presence.clients, 5)
        self.assertEqual(len(self.watcher.of("presence")), 3)
        self.presence.remote(Headcount({"bob": "Bob"}, 0))
        self.assertEqual(self.watcher.of("presence")[-1], diff([], ["alice"], 1))
        self.presence.remote(Headcount({"bob": "Bob"}, 0))
        self.assertEqual(len(self.watcher.of("presence")), 4)
        self.assertEqual(self.presence.lease(), Headcount({}, 1))

    def test_failing_listener_costs_nobody(self) -> None:
        """
        A listener that raises is logged and dropped; the others hear on,
        and counting goes on.
        """

        def broken(kind: str, body: bytes) -> None:
            if json.loads(body).get("joined"):
                raise RuntimeError("listener exploded")

        self.presence.arrive("guest:broken", None, broken)
        self.presence.arrive("user:alice", ALICE)
        self.presence.arrive("user:bob", BOB)
        self.assertEqual([f.get("joined") for f in self.watcher.of("presence")[-2:]], [[ALICE.as_dict()], [BOB.as_dict()]])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.presence.clients, 4)

    def test_bounded(self) -> None:
        """
        Past L{MAX_ENTRIES} entries newcomers are not counted (their
        visits still leave cleanly).
        """
        for i in range(MAX_ENTRIES):
            self.presence.arrive(f"ip:{i}", None)
        extra = self.presence.arrive("user:alice", ALICE)
        self.assertEqual(self.presence.local_clients, MAX_ENTRIES)
        self.assertEqual(self.presence.users, [])
        extra.leave()
        self.assertEqual(self.presence.local_clients, MAX_ENTRIES)

    def test_encoded_once_per_change(self) -> None:
        """
        The snapshot and the long-poll fields are encoded once per change
        and shared until the next.
        """
        fields = self.presence.poll_fields()
        self.assertIs(self.presence.poll_fields(), fields)
        self.assertEqual(
            json.loads(b"{" + fields + b"}"),
            {"presence": {"users": [], "guests": 1, "version": self.presence.seen}, "typing": []},
        )
        snapshot = self.presence.snapshot()
        self.presence.arrive("user:alice", ALICE)
        self.assertIsNot(self.presence.poll_fields(), fields)
        self.assertIsNot(self.presence.snapshot(), snapshot)
        self.presence.typing("user:alice", ALICE, "Alice", True)
        self.assertEqual(
            json.loads(b"{" + self.presence.poll_fields() + b"}"),
            {
                "presence": {"users": [ALICE.as_dict()], "guests": 1, "version": self.presence.seen},
                "typing": [{"user": ALICE.as_dict(), "nick": "Alice"}],
            },
        )


class WakeTests(SynchronousTestCase):
    """
    Long-polls waiting for presence are woken by changes after they came,
    a moment's changes together, at most every L{WAKE_SPACING} seconds.
    """

    def test_woken_once_per_moment(self) -> None:
        clock = Clock()
        presence = Presence("lobby", clock)
        woken: List[str] = []
        presence.arrive("user:alice", ALICE, wake=lambda: woken.append("alice"))
        presence.arrive("user:bob", BOB)
        presence.arrive(presence.anonymous_key(), None)
        # Bob's own poll came after the change: it is not woken for it.
        presence.arrive("user:bob", BOB, wake=lambda: woken.append("bob"))
        self.assertEqual(woken, [])
        clock.advance(0)
        self.assertEqual(woken, ["alice"])
        presence.arrive("user:carol", User("carol", "Carol"), wake=lambda: woken.append("carol"))
        clock.advance(0)
        self.assertEqual(woken, ["alice"])
        clock.advance(WAKE_SPACING)
        self.assertEqual(woken, ["alice", "bob"])

    def test_a_poll_that_left_is_not_woken(self) -> None:
        clock = Clock()
        presence = Presence("lobby", clock)
        woken: List[int] = []
        presence.arrive("user:alice", ALICE, wake=lambda: woken.append(1)).leave(POLL_GRACE)
        presence.arrive("user:bob", BOB)
        clock.advance(1)
        self.assertEqual(woken, [])


class CrowdTests(SynchronousTestCase):
    """
    A busy moment's changes reach listeners together: the first change
    after a quiet spell at once, the rest in one diff each
    L{ANNOUNCE_SPACING}, so a crowd of N arriving costs each listener a
    few frames, not N.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.presence = Presence("lobby", self.clock)
        self.listeners = [Frames() for _ in range(50)]
        for i, frames in enumerate(self.listeners):
            self.presence.arrive(f"guest:{i}", None, frames)
            self.clock.advance(ANNOUNCE_SPACING)

    def diffs(self, frames: Frames) -> List[Dict[str, Any]]:
        return [f for f in frames.of("presence") if "joined" in f]

    def test_crowd_told_together(self) -> None:
        """
        1000 users arriving at once (a reconnect storm): every listener
        gets the first at once, then one diff with all the others; what
        the diffs add up to is the room as it is.
        """
        first = self.listeners[0]
        told = len(self.diffs(first))
        users = [User(f"u{i:04}", f"User {i}") for i in range(1000)]
        for user in users:
            self.presence.arrive("user:" + user.id, user)
        self.assertEqual(len(self.diffs(first)), told + 1)
        self.clock.advance(ANNOUNCE_SPACING)
        last = self.diffs(first)[-1]
        self.assertEqual(len(self.diffs(first)), told + 2)
        self.assertEqual([u["id"] for u in last["joined"]], [u.id for u in sorted(users[1:], key=lambda u: (u.name, u.id))])
        self.assertEqual((last["left"], last["guests"]), ([], 50))
        self.assertEqual(self.diffs(first)[-2:], self.diffs(self.listeners[-1])[-2:])
        # Quiet again: the next change is told at once.
        self.clock.advance(10)
        self.presence.arrive("user:late", User("late", "Late"))
        self.assertEqual(self.diffs(first)[-1]["joined"], [{"id": "late", "name": "Late"}])

    def test_joined_and_left_within_a_moment(self) -> None:
        """
        Someone who came and went between two diffs is told as gone (a
        left for someone a listener never saw changes nothing for it);
        someone who went and came back, as here.
        """
        first = self.listeners[0]
        self.presence.arrive("user:x", User("x", "X")).leave()
        self.assertEqual(self.diffs(first)[-1], diff([User("x", "X")], [], 50))
        visit = self.presence.arrive("user:alice", ALICE)
        self.clock.advance(ANNOUNCE_SPACING)
        self.assertEqual(self.diffs(first)[-1], diff([ALICE], ["x"], 50))
        visit.leave()
        self.presence.arrive("user:bob", BOB).leave()
        self.presence.arrive("user:alice", ALICE)
        self.clock.advance(ANNOUNCE_SPACING)
        self.assertEqual(self.diffs(first)[-1], diff([ALICE], ["bob"], 50))
        self.assertEqual(self.presence.clients, 51)

    def test_closed_tells_what_waits(self) -> None:
        """
        A diff waiting when the node stops is sent then, and no timer is
        left.
        """
        self.presence.arrive("user:alice", ALICE)
        self.presence.arrive("user:bob", BOB)
        self.presence.close()
        self.assertEqual(self.diffs(self.listeners[0])[-1], diff([BOB], [], 50))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_listener_gone_meanwhile(self) -> None:
        """
        Changes held for listeners that all went before the diff are
        forgotten: listeners that come back get the snapshot, and no
        stale diff after it (a blip that drops and reconnects a whole
        small room).
        """
        presence = Presence("lobby", self.clock)
        a, b = Frames(), Frames()
        visit_a = presence.arrive("user:alice", ALICE, a)
        visit_b = presence.arrive("user:bob", BOB, b)  # told at once
        self.clock.advance(ANNOUNCE_SPACING / 10)
        visit_b.leave()  # held: bob left
        visit_a.leave()
        b = Frames()
        presence.arrive("user:bob", BOB, b)
        a = Frames()
        presence.arrive("user:alice", ALICE, a)
        self.clock.advance(ANNOUNCE_SPACING)
        for frames in (a, b):
            snapshot, *diffs = frames.of("presence")
            here = {u["id"] for u in snapshot["users"]}
            for d in diffs:
                here |= {u["id"] for u in d["joined"]}
                here -= set(d["left"])
            self.assertEqual(here, {"alice", "bob"})
        self.assertEqual([u.id for u in presence.users], ["alice", "bob"])


class TypingTests(SynchronousTestCase):
    """
    Typing: rate-limited starts, expiry, stops, guests, and what the other
    nodes are told.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.signals: List[Dict[str, Any]] = []
        self.presence = Presence("lobby", self.clock, self.signals.append)
        self.watcher = Frames()
        self.presence.arrive("guest:watcher", None, self.watcher)

    def test_expires_after_silence(self) -> None:
        """
        A start shows a typer until about six seconds after the last one
        accepted; the expiry says so (other nodes expire it themselves).
        """
        self.assertTrue(self.presence.typing("user:alice", ALICE, "Alice", True))
        self.assertEqual(
            self.watcher.of("typing"),
            [{"type": "typing", "room": "lobby", "user": ALICE.as_dict(), "nick": "Alice", "typing": True}],
        )
        self.clock.advance(TYPING_EVERY)
        self.assertTrue(self.presence.typing("user:alice", ALICE, "Alice", True))
        self.clock.advance(TYPING_EXPIRES - 0.1)
        self.assertEqual(self.watcher.typing, [("Alice", True)])
        self.clock.advance(0.1)
        self.assertEqual(self.watcher.typing, [("Alice", True), ("Alice", False)])
        self.assertEqual([s["s"] for s in self.signals], [True, True])
        self.assertEqual(self.presence.typing_now, [])

    def test_rate_limit(self) -> None:
        """
        Starts within two seconds of the last one accepted are dropped
        quietly: they neither refresh the expiry nor go to other nodes.
        """
        self.presence.typing("user:alice", ALICE, "Alice", True)
        for _ in range(7):
            self.clock.advance(0.25)
            self.assertFalse(self.presence.typing("user:alice", ALICE, "Alice", True))
        self.clock.advance(0.25)
        self.assertEqual(len(self.signals), 1)
        self.clock.advance(TYPING_EXPIRES - 1.0)
        self.assertEqual(self.watcher.typing, [("Alice", True), ("Alice", False)])

    def test_stop(self) -> None:
        """
        An explicit stop ends it at once and is told to the other nodes; a
        stop of someone not typing is nothing.
        """
        self.presence.typing("user:alice", ALICE, "Alice", True)
        self.assertTrue(self.presence.typing("user:alice", ALICE, "Alice", False))
        self.assertFalse(self.presence.typing("user:alice", ALICE, "Alice", False))
        self.assertEqual(self.watcher.typing, [("Alice", True), ("Alice", False)])
        self.assertEqual([(s["k"], s["s"]) for s in self.signals], [("user:alice", True), ("user:alice", False)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_posting_stops(self) -> None:
        """
        A message from the typer stops their typing (a guest's, by nick).
        """
        self.presence.typing("user:alice", ALICE, "Alice", True)
        self.presence.typing("guest:b1", None, "zed", True)
        self.presence.typing("guest:b2", None, "yan", True)
        self.presence.delivered(Message("lobby", 1, "Alice", "hi", 0, None, ALICE))
        self.presence.delivered(Message("lobby", 2, "zed", "hi", 0))
        self.presence.delivered(Message("lobby", 3, "yan", "", 0, None, None, "member"))
        self.assertEqual(self.presence.typing_now, [(None, "yan")])
        self.assertEqual(self.watcher.typing[-2:], [("Alice", False), ("zed", False)])

    def test_last_connection_leaving_stops(self) -> None:
        """
        A typer whose last connection leaves stops typing (and the other
        nodes are told); one tab leaving of two is nothing.
        """
        tabs = [self.presence.arrive("user:alice", ALICE) for _ in range(2)]
        tabs[0].typing(True, "Alice")
        tabs[0].leave()
        self.assertEqual(self.presence.typing_now, [(ALICE, "Alice")])
        tabs[1].leave()
        self.assertEqual(self.presence.typing_now, [])
        self.assertEqual(self.signals[-1]["s"], False)
        self.assertEqual(self.watcher.typing, [("Alice", True), ("Alice", False)])

    def test_newcomer_hears_who_types(self) -> None:
        """
        A listener that arrives while someone types is told after the
        snapshot.
        """
        self.presence.typing("guest:b1", None, "zed", True)
        frames = Frames()
        self.presence.arrive("user:bob", BOB, frames)
        self.assertEqual([kind for kind, _ in frames.frames], ["presence", "typing"])
        self.assertEqual(frames.typing, [("zed", True)])

    def test_bounded(self) -> None:
        """
        At most L{MAX_TYPERS} type at once; more are dropped until one
        stops.
        """
        for i in range(MAX_TYPERS):
            self.assertTrue(self.presence.typing(f"guest:{i}", None, f"g{i}", True))
        self.assertFalse(self.presence.typing("user:alice", ALICE, "Alice", True))
        self.presence.typing("guest:0", None, "g0", False)
        self.clock.advance(TYPING_EVERY)
        self.assertTrue(self.presence.typing("user:alice", ALICE, "Alice", True))
        self.assertEqual(len(self.presence.typing_now), MAX_TYPERS)

    def test_remote(self) -> None:
        """
        Another node's typers show here and expire here by themselves; a
        guest's key is its node's; malformed signals are ignored.
        """
        self.presence.remote_typing("n2", {"t": "typing", "k": "user:bob", "u": ["bob", "Bob"], "n": "Bob", "s": True})
        self.presence.remote_typing("n2", {"t": "typing", "k": "conn:1", "u": None, "n": "zed", "s": True})
        self.presence.remote_typing("n3", {"t": "typing", "k": "conn:1", "u": None, "n": "yan", "s": True})
        self.presence.remote_typing("n3", {"t": "typing", "k": 1, "u": None, "n": "x", "s": True})
        self.presence.remote_typing("n3", {"t": "typing"})
        self.assertEqual([nick for _, nick in self.presence.typing_now], ["Bob", "zed", "yan"])
        self.presence.remote_typing("n2", {"t": "typing", "k": "conn:1", "u": None, "n": "zed", "s": False})
        self.assertEqual([nick for _, nick in self.presence.typing_now], ["Bob", "yan"])
        self.clock.advance(TYPING_EXPIRES)
        self.assertEqual(self.presence.typing_now, [])
        self.assertEqual(self.signals, [])

    def test_without_a_clock(self) -> None:
        """
        A presence with no clock (a room built on its own) counts, lingers
        not, and ignores typing.
        """
        presence = Presence("lobby")
        presence.arrive("user:alice", ALICE).leave(POLL_GRACE)
        self.assertEqual(presence.clients, 0)
        self.assertFalse(presence.typing("user:alice", ALICE, "Alice", True))


class RulesTests(SynchronousTestCase):
    """
    The small rules the adapters share.
    """

    def test_keys(self) -> None:
        """
        A user is counted as themselves, a guest browser by its client id,
        another guest by the key given; an API key is no one.
        """
        self.assertEqual(presence_key(Identity(ALICE, "token"), "b1", "ip:x"), "user:alice")
        self.assertEqual(presence_key(GUEST, "b1", "ip:x"), "guest:b1")
        self.assertEqual(presence_key(GUEST, None, "ip:x"), "ip:x")
        self.assertIsNone(presence_key(Identity(None, "key", key="k1"), None, "ip:x"))

    def test_parameters(self) -> None:
        self.assertEqual(validate_client("a-B_9" * 12), "a-B_9" * 12)
        self.assertIsNone(validate_client(None))
        for bad in ("", "x" * 65, "a b", "é", 7):
            self.assertRaises(ChatError, validate_client, bad)
        self.assertEqual([validate_flag(v, "f", True) for v in (None, False, "0", "true", "1")], [True, False, False, True, True])
        with self.assertRaises(ChatError) as caught:
            validate_flag("maybe", "typing", True)
        self.assertEqual((caught.exception.code, caught.exception.detail), ("invalid_parameter", "typing must be true or false."))

    def test_seen(self) -> None:
        """
        A long-poll's presence=: a flag, or the version its last answer
        carried (which names the presence: another's never matches).
        """
        presence, other = Presence("lobby"), Presence("lobby")
        self.assertEqual(validate_seen(presence.seen), (True, presence.seen))
        self.assertNotEqual(presence.seen, other.seen)
        self.assertEqual([validate_seen(v) for v in (None, "0", "1")], [(False, None), (False, None), (True, None)])
        for bad in ("2", "x.1", "abc.", "abc.1.2"):
            self.assertRaises(ChatError, validate_seen, bad)
        before = presence.seen
        presence.arrive("user:alice", ALICE)
        self.assertNotEqual(presence.seen, before)
        self.assertEqual(json.loads(b"{" + presence.poll_fields() + b"}")["presence"]["version"], presence.seen)

    def test_old_leases_count_guests(self) -> None:
        """
        A lease written by an older node (no names: C{'{}'}) counts its
        clients as guests; a good one round-trips, names and all.
        """
        self.assertEqual(Headcount.from_json("{}", 3), Headcount({}, 3))
        self.assertEqual(Headcount.from_json("not json", 2), Headcount({}, 2))
        here = Headcount({"zoë": "Zoë"}, 1)
        self.assertEqual(Headcount.from_json(here.to_json(), 9), here)


class AcrossCoresTests(SynchronousTestCase):
    """
    Two cores sharing a store and a local bus, as two nodes: typing
    crosses by the bus, presence by the leases.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        store, bus = MemoryStore(), LocalBus()
        self.a = ChatCore(store, self.clock, bus=bus, node="a")
        self.b = ChatCore(store, self.clock, bus=bus, node="b")
        self.a.start()
        self.b.start()

    def test_typing_crosses_once(self) -> None:
        """
        Alice typing on A is seen on B; A's own signal coming back is not
        applied twice; a message from her stops it on both.
        """
        on_a, on_b = Frames(), Frames()
        alice = Identity(ALICE, "token")
        visit = self.a.arrive(self.a.room("lobby"), alice, listener=on_a)
        self.b.arrive(self.b.room("lobby"), GUEST, listener=on_b)
        self.assertTrue(self.a.typing(self.a.room("lobby"), alice, True, visit=visit))
        self.assertEqual((on_a.typing, on_b.typing), ([("Alice", True)], [("Alice", True)]))
        self.successResultOf(self.a.post("lobby", None, "hi", identity=alice))
        self.assertEqual((on_a.typing, on_b.typing), ([("Alice", True), ("Alice", False)],) * 2)

    def test_guest_typing_needs_a_nick_that_is_one(self) -> None:
        room = self.a.room("lobby")
        self.assertRaises(ChatError, self.a.typing, room, GUEST, True, "\u202e")
        self.assertTrue(self.a.typing(room, GUEST, True, "zed", client="b1"))
        self.assertEqual(room.presence.typing_now, [(None, "zed")])
        with self.assertRaises(ChatError) as caught:
            self.a.typing(room, Identity(None, "key", key="k1"), True)
        self.assertEqual(caught.exception.code, "not_allowed")

    def test_presence_through_leases(self) -> None:
        """
        Bob on B shows on A once both have shared their leases; API keys
        are no one.
        """
        on_a, bot = Frames(), Frames()
        self.a.arrive(self.a.room("lobby"), GUEST, listener=on_a)
        key = Identity(None, "key", key="k1")
        self.assertIsNone(self.b.arrive(self.b.room("lobby"), key))
        # An API key may listen all the same.
        listening = self.a.arrive(self.a.room("lobby"), key, listener=bot)
        assert listening is not None
        self.assertRaises(ChatError, self.a.typing, self.a.room("lobby"), key, True, visit=listening)
        self.b.arrive(self.b.room("lobby"), Identity(BOB, "token"))
        self.successResultOf(self.b.share_presence("b", 15))
        self.successResultOf(self.a.share_presence("a", 15))
        self.assertEqual(on_a.of("presence")[-1], {**diff([BOB], [], 1)})
        self.assertEqual(bot.frames, [("presence", {"type": "presence", "room": "lobby", "users": [], "guests": 1})] + [("presence", diff([BOB], [], 1))])
        self.assertEqual(self.a.room("lobby").clients, 2)
        listening.leave()
        self.assertEqual(self.a.room("lobby").clients, 2)
