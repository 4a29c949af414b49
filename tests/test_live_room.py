"""
The live room's events: edits, deletions, moderation, room settings and
read markers, in the core (with a fake clock) and over every transport.

Each is an event of the room's log with its own seq, so a client that
resumes sees it exactly once, in order; and the history a client reads
later shows every message as it is now (a deleted one blank).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd import ws as chatd_ws
from chatd.bus.local import LocalBus
from chatd.core import EDIT_WINDOW, READ_FLUSH, ChatCore
from chatd.model import ChatError, Identity, Message, User
from chatd.store.memory import MemoryStore
from chatd.store.sqlite import SQLiteStore

from ._support import HTTP, WSClient
from .test_access import _server, token
from .test_sse import EventClient

ANN = Identity(User("ann", "Ann"), "token")
BOB = Identity(User("bob", "Bob"), "token")
MOD = Identity(User("mod", "Mo"), "token")
OWNER = Identity(User("own", "Owner"), "token")
KEY = Identity(None, "key", key="k1")


def make_core(**kwargs: Any) -> Tuple[ChatCore, Clock, MemoryStore]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore(1000)
    core = ChatCore(store, clock, 50, **kwargs)
    core.start()
    return core, clock, store


def room_with_staff(test: SynchronousTestCase, **kwargs: Any) -> Tuple[ChatCore, Clock, MemoryStore]:
    """
    A core whose room "r" is owned by Owner, with Mo as a moderator.
    """
    core, clock, store = make_core(**kwargs)
    test.successResultOf(core.create_room("r", identity=OWNER))
    test.successResultOf(core.set_member("r", "mod", "Mo", "moderator", OWNER))
    return core, clock, store


def code_of(test: SynchronousTestCase, d: Deferred) -> str:
    return test.failureResultOf(d, ChatError).value.code


def history(test: SynchronousTestCase, core: ChatCore, room: str = "r") -> List[Message]:
    return test.successResultOf(core.read(room, 0, 1000, KEY)).messages


class EditTests(SynchronousTestCase):
    """
    Only a message's author edits it, within the window, where the room
    allows edits.
    """

    def test_author_edits(self) -> None:
        """
        The author's edit is an event with its own seq and the target's
        seq; the message, read again, has the new body and its time.
        """
        core, clock, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "helo", identity=ANN))
        clock.advance(5)
        edit = self.successResultOf(core.edit("r", posted.seq, " hello ", ANN))
        self.assertEqual(
            edit.as_dict(),
            {
                "type": "edit", "room": "r", "seq": posted.seq + 1, "target_seq": posted.seq,
                "nick": "Ann", "user": {"id": "ann", "name": "Ann"}, "body": "hello", "ts": 1_700_000_005.0,
            },
        )
        (message,) = [m for m in history(self, core) if m.seq == posted.seq]
        self.assertEqual((message.body, message.as_dict()["edited"]), ("hello", 1_700_000_005.0))

    def test_who_may_not_edit(self) -> None:
        """
        Another user, a moderator, a guest and an API key may not edit
        someone's message; a bad seq or body is refused first.
        """
        core, _, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "mine", identity=ANN))
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "x", BOB)), "not_allowed")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "x", MOD)), "not_allowed")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "x", Identity())), "auth_required")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "x", KEY)), "auth_required")
        for seq in ("one", -1, 0, 2**63, True, None, "9" * 5000):
            self.assertEqual(code_of(self, core.edit("r", seq, "x", ANN)), "invalid_parameter")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "   ", ANN)), "invalid_body")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "x" * 5000, ANN)), "body_too_long")
        self.assertEqual(code_of(self, core.edit("r", 999, "x", ANN)), "message_not_found")
        # The membership event at seq 1 is no message.
        self.assertEqual(code_of(self, core.edit("r", 1, "x", ANN)), "message_not_found")
        self.assertEqual(code_of(self, core.edit("nope", posted.seq, "x", ANN)), "room_not_found")
        self.assertEqual(history(self, core)[-1].seq, posted.seq)

    def test_window(self) -> None:
        """
        Past the edit window, the author may no longer edit; a core made
        with no window lets them for ever.
        """
        core, clock, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "old", identity=ANN))
        clock.advance(EDIT_WINDOW + 1)
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "new", ANN)), "edit_window_closed")
        forever, clock, _ = room_with_staff(self, edit_window=None)
        posted = self.successResultOf(forever.post("r", None, "old", identity=ANN))
        clock.advance(10 * 365 * 86400)
        self.successResultOf(forever.edit("r", posted.seq, "new", ANN))

    def test_room_setting(self) -> None:
        """
        A room whose owner turned edits off takes none; a moderator may not
        change that setting, but may set the topic.
        """
        core, _, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "fixed", identity=ANN))
        self.assertEqual(code_of(self, core.configure_room("r", MOD, edits=False)), "not_allowed")
        self.assertEqual(code_of(self, core.configure_room("r", ANN, topic="mine now")), "not_allowed")
        topic = self.successResultOf(core.configure_room("r", MOD, topic=" Be kind "))
        self.assertEqual((topic.kind, topic.body, topic.as_dict()["by"]), ("room", "Be kind", {"id": "mod", "name": "Mo"}))
        event = self.successResultOf(core.configure_room("r", OWNER, edits=False))
        self.assertEqual(event.as_dict()["edits"], False)
        self.assertEqual(event.body, "Be kind")
        self.assertEqual((core.room("r").access.topic, core.room("r").access.edits), ("Be kind", False))
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "changed", ANN)), "edits_disabled")
        self.assertEqual(code_of(self, core.configure_room("r", OWNER, topic="x" * 201)), "invalid_topic")
        self.assertEqual(code_of(self, core.configure_room("r", OWNER, topic="a\nb")), "invalid_topic")
        self.assertEqual(code_of(self, core.configure_room("r", OWNER)), "invalid_parameter")
        self.assertEqual(code_of(self, core.configure_room("r", OWNER, edits="yes")), "invalid_parameter")


class DeleteTests(SynchronousTestCase):
    """
    The author, the room's moderators and owners and an API key delete a
    message; its text is gone from every later read.
    """

    def test_author_and_moderators(self) -> None:
        """
        Bob may not delete Ann's message; she may delete hers, a moderator
        and a key anyone's.  The message (and its edits) then read blank,
        from memory and from the store alike.
        """
        core, _, store = room_with_staff(self)
        first = self.successResultOf(core.post("r", None, "secret", identity=ANN))
        self.successResultOf(core.edit("r", first.seq, "secret, edited", ANN))
        second = self.successResultOf(core.post("r", None, "other", identity=ANN))
        third = self.successResultOf(core.post("r", None, "third", identity=BOB))
        self.assertEqual(code_of(self, core.delete("r", first.seq, BOB)), "not_allowed")
        self.assertEqual(code_of(self, core.delete("r", first.seq, Identity())), "auth_required")
        gone = self.successResultOf(core.delete("r", first.seq, ANN))
        self.assertEqual(gone.as_dict()["by"], {"id": "ann", "name": "Ann"})
        by_mod = self.successResultOf(core.delete("r", second.seq, MOD))
        by_key = self.successResultOf(core.delete("r", third.seq, KEY))
        self.assertEqual((by_mod.as_dict()["by"], by_key.as_dict()["by"]), ({"id": "mod", "name": "Mo"}, None))
        self.assertEqual(code_of(self, core.delete("r", first.seq, ANN)), "message_deleted")
        self.assertEqual(code_of(self, core.edit("r", first.seq, "back", ANN)), "message_deleted")
        stored, _ = self.successResultOf(store.read_after("r", 0, 100))
        for messages in (history(self, core), stored):
            texts = [m.body for m in messages if m.kind in ("message", "edit")]
            self.assertEqual(texts, ["", "", "", ""])
            self.assertTrue(all(m.deleted for m in messages if m.kind == "message"))


class ModerationTests(SynchronousTestCase):
    """
    Kick, ban, mute and their undoing: who may, and what each does to the
    user's connections, reads and posts.
    """

    def test_ranks(self) -> None:
        """
        A moderator acts on members and visitors, not on owners or other
        moderators; an owner on moderators; a key on anyone; nobody on
        themselves, and a plain member on nobody.
        """
        core, _, _ = room_with_staff(self)
        self.successResultOf(core.set_member("r", "mod2", "Mo Two", "moderator", OWNER))
        self.assertEqual(code_of(self, core.moderate("r", "own", "ban", MOD)), "not_allowed")
        self.assertEqual(code_of(self, core.moderate("r", "mod2", "mute", MOD)), "not_allowed")
        self.assertEqual(code_of(self, core.moderate("r", "mod", "kick", MOD)), "not_allowed")
        self.assertEqual(code_of(self, core.moderate("r", "bob", "kick", ANN)), "not_allowed")
        self.assertEqual(code_of(self, core.moderate("r", "bob", "kick", Identity())), "not_allowed")
        self.successResultOf(core.moderate("r", "bob", "mute", MOD))
        self.successResultOf(core.moderate("r", "mod2", "mute", OWNER))
        self.successResultOf(core.moderate("r", "own", "mute", KEY))
        for args, code in [
            (("bob", "smite"), "invalid_action"),
            (("", "ban"), "invalid_user"),
            (("bob", "ban", 0), "invalid_duration"),
            (("bob", "ban", -5), "invalid_duration"),
            (("bob", "ban", 10**12), "invalid_duration"),
            (("bob", "ban", "soon"), "invalid_duration"),
            (("bob", "ban", 1.5), "invalid_duration"),
            (("bob", "ban", 60, "a\nb"), "invalid_reason"),
            (("bob", "ban", 60, "x" * 201), "invalid_reason"),
        ]:
            user, action, *rest = args
            duration = rest[0] if rest else None
            reason = rest[1] if len(rest) > 1 else None
            self.assertEqual(code_of(self, core.moderate("r", user, action, MOD, duration, reason)), code)

    def test_mute(self) -> None:
        """
        A muted user may read, not post or edit, until the mute ends or is
        lifted; lifting what is not there is refused.
        """
        core, clock, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "before", identity=BOB))
        event = self.successResultOf(core.moderate("r", "bob", "mute", MOD, 60, "calm down"))
        self.assertEqual(
            {k: v for k, v in event.as_dict().items() if k not in ("seq", "ts")},
            {
                "type": "moderation", "room": "r", "action": "mute", "user": {"id": "bob", "name": "Bob"},
                "by": {"id": "mod", "name": "Mo"}, "until": 1_700_000_060.0, "reason": "calm down",
            },
        )
        self.assertEqual(code_of(self, core.post("r", None, "hey", identity=BOB)), "muted")
        self.assertEqual(code_of(self, core.edit("r", posted.seq, "hey", BOB)), "muted")
        self.successResultOf(core.read("r", 0, 10, BOB))
        clock.advance(61)
        self.successResultOf(core.post("r", None, "back", identity=BOB))
        self.successResultOf(core.moderate("r", "bob", "mute", MOD))
        self.assertEqual(code_of(self, core.post("r", None, "hey", identity=BOB)), "muted")
        self.successResultOf(core.moderate("r", "bob", "unmute", MOD))
        self.successResultOf(core.post("r", None, "free", identity=BOB))
        self.assertEqual(code_of(self, core.moderate("r", "bob", "unmute", MOD)), "not_restricted")
        self.assertEqual(code_of(self, core.moderate("r", "bob", "unban", MOD)), "not_restricted")

    def test_ban_ends_reading_at_once(self) -> None:
        """
        A ban revokes the user's subscriptions and answers their long-polls
        right after the ban's own event; everyone else carries on.  Until
        it ends they may not read, follow or post.
        """
        core, clock, _ = room_with_staff(self)
        seen: Dict[str, List[Any]] = {"ann": [], "bob": []}
        revoked: List[str] = []
        for who, identity in (("ann", ANN), ("bob", BOB)):
            core.subscribe("r", None, seen[who].append, lambda first: None, identity, lambda why: revoked.append(why.code))
        polled = core.wait("r", None, 10, 30, BOB)
        ban = self.successResultOf(core.moderate("r", "bob", "ban", MOD, 3600))
        self.assertEqual(revoked, ["banned"])
        self.assertEqual(self.successResultOf(polled).messages, [ban])
        self.assertIs(seen["bob"][-1], ban)
        later = self.successResultOf(core.post("r", None, "after", identity=ANN))
        self.assertEqual(seen["ann"][-2:], [ban, later])
        self.assertNotIn(later, seen["bob"])
        for d in (core.read("r", 0, 10, BOB), core.post("r", None, "x", identity=BOB), core.wait("r", 0, 10, 1, BOB)):
            self.assertEqual(code_of(self, d), "banned")
        self.assertRaises(ChatError, core.subscribe, "r", None, print, print, BOB)
        clock.advance(3601)
        self.successResultOf(core.read("r", 0, 10, BOB))

    def test_kick(self) -> None:
        """
        A kick from a public room closes the user's subscriptions; they may
        come straight back.  From a private room it also ends membership.
        """
        core, _, _ = room_with_staff(self)
        revoked: List[str] = []
        core.subscribe("r", None, lambda m: None, lambda f: None, BOB, lambda why: revoked.append(why.code))
        self.successResultOf(core.moderate("r", "bob", "kick", MOD, reason="cool off"))
        self.assertEqual(revoked, ["kicked"])
        core.subscribe("r", None, lambda m: None, lambda f: None, BOB)
        self.successResultOf(core.create_room("p", identity=OWNER, private=True))
        self.successResultOf(core.set_member("p", "bob", "Bob", "member", OWNER))
        self.successResultOf(core.moderate("p", "bob", "kick", OWNER))
        self.assertNotIn("bob", core.room("p").access.members)
        self.assertEqual(code_of(self, core.read("p", 0, 10, BOB)), "room_not_found")


class StaffTests(SynchronousTestCase):
    """
    Moderators and owners are bound too: a muted one writes nothing, and
    ranks hold for deletions as for moderation.
    """

    def test_muted_staff_write_nothing(self) -> None:
        core, _, _ = room_with_staff(self)
        self.successResultOf(core.moderate("r", "mod", "mute", OWNER))
        self.assertEqual(code_of(self, core.configure_room("r", MOD, topic="I am muted")), "muted")
        self.assertEqual(code_of(self, core.moderate("r", "bob", "kick", MOD, reason="loud")), "muted")
        self.assertEqual(core.room("r").access.topic, "")

    def test_deletions_follow_ranks(self) -> None:
        """
        A moderator deletes plain members' and visitors' messages, not an
        owner's or another moderator's; an owner deletes a moderator's.
        """
        core, _, _ = room_with_staff(self)
        mod2 = Identity(User("mod2", "Mo Two"), "token")
        self.successResultOf(core.set_member("r", "mod2", "Mo Two", "moderator", OWNER))
        by_owner = self.successResultOf(core.post("r", None, "owner's", identity=OWNER))
        by_mod2 = self.successResultOf(core.post("r", None, "mod2's", identity=mod2))
        by_bob = self.successResultOf(core.post("r", None, "bob's", identity=BOB))
        self.assertEqual(code_of(self, core.delete("r", by_owner.seq, MOD)), "not_allowed")
        self.assertEqual(code_of(self, core.delete("r", by_mod2.seq, MOD)), "not_allowed")
        self.successResultOf(core.delete("r", by_bob.seq, MOD))
        self.successResultOf(core.delete("r", by_mod2.seq, OWNER))

    def test_banned_users_do_not_see_the_room(self) -> None:
        """
        A banned user's room list leaves the room out (its topic and
        activity included) until the ban ends.
        """
        core, clock, _ = room_with_staff(self)
        self.successResultOf(core.configure_room("r", OWNER, topic="secret plans"))
        self.assertIn("r", [room.name for room in self.successResultOf(core.list_rooms(BOB))])
        self.successResultOf(core.moderate("r", "bob", "ban", MOD, 60))
        self.assertNotIn("r", [room.name for room in self.successResultOf(core.list_rooms(BOB))])
        self.assertIn("r", [room.name for room in self.successResultOf(core.list_rooms(ANN))])
        clock.advance(61)
        self.assertIn("r", [room.name for room in self.successResultOf(core.list_rooms(BOB))])

    def test_restrictions_are_bounded(self) -> None:
        """
        A room keeps at most MAX_RESTRICTIONS bans and mutes in force.
        """
        from chatd import core as chatd_core

        self.patch(chatd_core, "MAX_RESTRICTIONS", 3)
        core, _, _ = room_with_staff(self)
        for user in ("u1", "u2", "u3"):
            self.successResultOf(core.moderate("r", user, "ban", OWNER))
        self.assertEqual(code_of(self, core.moderate("r", "u4", "mute", OWNER)), "too_many_restrictions")
        self.successResultOf(core.moderate("r", "u1", "mute", OWNER))


class ReadMarkerTests(SynchronousTestCase):
    """
    Read markers: per user and room, debounced into the store, never
    moving back.
    """

    def test_debounced_and_monotonic(self) -> None:
        core, clock, store = make_core()
        for _ in range(5):
            self.successResultOf(core.post("lobby", "x", "m"))
        self.assertEqual(self.successResultOf(core.mark_read("lobby", 3, ANN)), (3, 2))
        self.assertEqual(self.successResultOf(core.mark_read("lobby", 2, ANN)), (3, 2))
        self.assertEqual(self.successResultOf(core.mark_read("lobby", 99, BOB)), (5, 0))
        self.assertEqual(self.successResultOf(store.read_markers("ann")), {})
        self.assertEqual(self.successResultOf(core.read_markers(ANN)), {"lobby": 3})
        clock.advance(READ_FLUSH)
        self.assertEqual(self.successResultOf(store.read_markers("ann")), {"lobby": 3})
        self.assertEqual(self.successResultOf(store.read_markers("bob")), {"lobby": 5})
        self.assertEqual(code_of(self, core.mark_read("lobby", 1, Identity())), "auth_required")
        self.assertEqual(code_of(self, core.mark_read("lobby", "x", ANN)), "invalid_parameter")
        self.assertEqual(self.successResultOf(core.read_markers(Identity())), {})


class ReadMarkerRestartTests(SynchronousTestCase):
    def test_never_back_after_a_restart(self) -> None:
        """
        A node that never saw a user's marker asks the store before it
        answers: the answer never moves back.
        """
        core, clock, store = make_core()
        for _ in range(9):
            self.successResultOf(core.post("lobby", "x", "m"))
        self.successResultOf(core.mark_read("lobby", 9, ANN))
        clock.advance(READ_FLUSH)
        again = ChatCore(store, clock, 50)
        again.start()
        self.assertEqual(self.successResultOf(again.mark_read("lobby", 2, ANN)), (9, 0))


class _Client:
    """
    What a client shows of a room, built only from the events it is sent
    (as chat.js does): the messages by seq, edits and deletions applied.
    """

    def __init__(self) -> None:
        self.seqs: List[int] = []
        self.shown: Dict[int, Tuple[str, bool]] = {}

    def take(self, message: Message) -> None:
        self.seqs.append(message.seq)
        if message.kind == "message":
            self.shown[message.seq] = (message.body, message.deleted)
        elif message.kind == "edit" and message.target in self.shown and not self.shown[message.target][1]:
            self.shown[message.target] = (message.body, False)
        elif message.kind == "delete" and message.target in self.shown:
            self.shown[message.target] = ("", True)


class ResumeTests(SynchronousTestCase):
    """
    Whatever mix of posts, edits and deletions a room sees, and wherever a
    client resumes, it sees every event once, in order, and ends showing
    what the history shows.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.sampled_from(["post", "edit", "delete"]), st.integers(0, 30)), max_size=40),
        st.integers(0, 40),
    )
    def test_resume_anywhere(self, ops: List[Tuple[str, int]], resume_at: int) -> None:
        core, _, _ = room_with_staff(self)
        live, resumed, late = _Client(), _Client(), _Client()
        core.subscribe("r", 0, live.take, lambda first: None, ANN)
        subscription = core.subscribe("r", 0, resumed.take, lambda first: None, ANN)
        posted: List[int] = []
        for i, (op, pick) in enumerate(ops):
            if i == resume_at:
                subscription.stop()
                subscription = core.subscribe("r", resumed.seqs[-1] if resumed.seqs else 0, resumed.take,
                                              lambda first: None, ANN)
            if op == "post" or not posted:
                d = core.post("r", None, f"m{i}", identity=ANN)
                posted.append(self.successResultOf(d).seq)
            elif op == "edit":
                core.edit("r", posted[pick % len(posted)], f"e{i}", ANN).addErrback(lambda f: f.trap(ChatError))
            else:
                core.delete("r", posted[pick % len(posted)], ANN).addErrback(lambda f: f.trap(ChatError))
        core.subscribe("r", 0, late.take, lambda first: None, ANN)
        last = core.room("r").last_seq
        final = {m.seq: (m.body, m.deleted) for m in history(self, core) if m.kind == "message"}
        for client in (live, resumed, late):
            self.assertEqual(client.seqs, list(range(1, last + 1)))
            self.assertEqual(client.shown, final)


class NodesTests(TestCase):
    """
    Edits, deletions and bans made on one node reach the other's clients
    and memory in seq order (two cores sharing one SQLite file and a
    bus).
    """

    async def test_two_nodes(self) -> None:
        path = self.mktemp() + ".sqlite3"
        bus = LocalBus()
        cores = []
        for _ in range(2):
            store = SQLiteStore(path, reactor=reactor)
            await store.open()
            self.addCleanup(store.close)
            core = ChatCore(store, reactor, 20, bus=bus)
            await core.start()
            self.addCleanup(core.stop)
            cores.append(core)
        a, b = cores
        await a.create_room("r", identity=OWNER)
        await b.find_room("r")
        seen: List[Message] = []
        revoked: Deferred = Deferred()
        b.subscribe("r", 0, seen.append, lambda first: None, BOB, revoked.callback)
        posted = await b.post("r", None, "typo", identity=BOB)
        await a.find_room("r")
        await a.room("r").reaches(posted.seq)
        await b.edit("r", posted.seq, "fixed", BOB)
        await a.room("r").reaches(posted.seq + 1)
        await a.delete("r", posted.seq, OWNER)
        await a.moderate("r", "bob", "ban", OWNER)
        why = await revoked.addTimeout(10, reactor)
        self.assertEqual(why.code, "banned")
        self.assertEqual([m.kind for m in seen], ["message", "edit", "delete", "moderation"])
        for core in (a, b):
            batch = await core.read("r", 0, 10, KEY)
            self.assertEqual([(m.kind, m.body) for m in batch.messages],
                             [("message", ""), ("edit", ""), ("delete", ""), ("moderation", "")])
            self.assertIn("bob", core.room("r").access.bans)
        with self.assertRaises(ChatError):
            await b.post("r", None, "still here?", identity=BOB)


class TransportTests(TestCase):
    """
    Over real sockets: the events on WebSocket, SSE and long-poll, the
    moderation's close codes and errors, and the HTTP routes' errors.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "token")
        self.http = HTTP(self, self.base)
        self.tokens = {who: token(who, who.title()) for who in ("own", "mod", "ann", "bob")}
        code, _ = await self.api("POST", "/api/rooms", {"name": "r"}, "own")
        self.assertEqual(code, 201)
        code, _ = await self.api("POST", "/api/rooms/r/members", {"user": "mod", "role": "moderator"}, "own")
        self.assertEqual(code, 201)

    async def api(self, method: str, path: str, payload: Any = None, who: str = "ann",
                  raw: Optional[bytes] = None) -> Tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {self.tokens[who]}"], "Content-Type": ["application/json"]}
        data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
        code, _, body = await self.http.request(method, path, data=data, headers=headers)
        return code, json.loads(body) if body else None

    async def ws(self, who: str, after: int = 0) -> WSClient:
        return await WSClient.connect(self, self.base, f"/ws/r?after={after}&token={self.tokens[who]}")

    async def test_events_on_every_transport(self) -> None:
        """
        A post, its edit (over the WebSocket) and its deletion (over HTTP)
        reach a WebSocket, an event stream and a long-poll as three events
        in seq order; a later read shows the message blank.
        """
        ann, bob = await self.ws("ann"), await self.ws("bob")
        stream = await EventClient.open(self, f"{self.base}/api/rooms/r/events?after=0&token={self.tokens['bob']}")
        code, posted = await self.api("POST", "/api/rooms/r/messages", {"body": "helo wrld"})
        seq = posted["seq"]
        await ann.wait_for_seq(seq)
        ann.send_json({"type": "edit", "target_seq": seq, "body": "hello world"})
        await bob.wait_for(lambda: any(f["type"] == "edit" for f in bob.frames))
        code, gone = await self.api("DELETE", f"/api/rooms/r/messages/{seq}", who="mod")
        self.assertEqual((code, gone["type"], gone["target_seq"], gone["by"]["id"]), (200, "delete", seq, "mod"))
        await bob.wait_for(lambda: any(f["type"] == "delete" for f in bob.frames))
        await stream.wait_for(lambda: any(e["json"]["type"] == "delete" for e in stream.events))
        frames = [f for f in bob.frames if f.get("seq", 0) >= seq]
        self.assertEqual([(f["type"], f["seq"]) for f in frames],
                         [("message", seq), ("edit", seq + 1), ("delete", seq + 2)])
        self.assertEqual((frames[1]["body"], frames[1]["target_seq"]), ("hello world", seq))
        self.assertEqual([int(e["id"]) for e in stream.events if e["json"].get("seq", 0) >= seq],
                         [seq, seq + 1, seq + 2])
        code, batch = await self.api("GET", f"/api/rooms/r/messages?after={seq - 1}")
        self.assertEqual([(m["type"], m["body"] if "body" in m else None) for m in batch["messages"]],
                         [("message", ""), ("edit", ""), ("delete", None)])
        self.assertIn("deleted", batch["messages"][0])
        # Resuming after the message: the edit and the deletion, once.
        again = await self.ws("ann", after=seq)
        await again.wait_for(lambda: len([f for f in again.frames if "seq" in f]) >= 2)
        self.assertEqual([f["seq"] for f in again.frames if "seq" in f], [seq + 1, seq + 2])

    async def test_ban_closes_every_transport(self) -> None:
        """
        A ban: Bob's WebSocket gets the event, then closes with 4005; his
        event stream gets it and a revoked event; his waiting long-poll is
        answered with it; his next requests are 403 banned.
        """
        ws = await self.ws("bob")
        stream = await EventClient.open(self, f"{self.base}/api/rooms/r/events?token={self.tokens['bob']}")
        code, info = await self.api("GET", "/api/rooms/r", who="bob")
        poll = Deferred.fromCoroutine(self.api("GET", f"/api/rooms/r/messages?after={info['last_seq']}&timeout=20", who="bob"))
        await ws.sync()
        code, ban = await self.api("POST", "/api/rooms/r/moderation",
                                   {"user": "bob", "action": "ban", "duration": 600, "reason": "spam"}, "mod")
        self.assertEqual((code, ban["action"], ban["user"]["id"], ban["reason"]), (201, "ban", "bob", "spam"))
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_BANNED)
        self.assertEqual(ws.frames[-1]["seq"], ban["seq"])
        code, answer = await poll
        self.assertEqual((code, [m["seq"] for m in answer["messages"]]), (200, [ban["seq"]]))
        await stream.wait_for(lambda: any(e.get("event") == "revoked" for e in stream.events))
        self.assertEqual(stream.events[-1]["json"]["error"], "banned")
        self.assertEqual(stream.events[-2]["json"]["seq"], ban["seq"])
        for method, path in [("GET", "/api/rooms/r/messages?after=0"), ("POST", "/api/rooms/r/messages")]:
            code, error = await self.api(method, path, {"body": "let me in"}, "bob")
            self.assertEqual((code, error["error"]), (403, "banned"))
        refused = await WSClient.start(self, self.base, f"/ws/r?token={self.tokens['bob']}")
        await refused.closed
        self.assertIn("403", refused.close_reason or "")
        code, listed = await self.api("GET", "/api/rooms/r/moderation", who="mod")
        self.assertEqual([b["id"] for b in listed["bans"]], ["bob"])
        code, error = await self.api("GET", "/api/rooms/r/moderation", who="ann")
        self.assertEqual((code, error["error"]), (403, "not_allowed"))
        code, _ = await self.api("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "unban"}, "mod")
        self.assertEqual(code, 201)
        code, _ = await self.api("GET", "/api/rooms/r/messages?after=0", who="bob")
        self.assertEqual(code, 200)
        code, _, body = await self.http.request("GET", "/metrics")
        for line in [
            'chatd_room_events_total{action="ban",kind="moderation"} 1.0',
            'chatd_room_events_total{action="unban",kind="moderation"} 1.0',
            'chatd_room_events_total{action="",kind="member"} 1.0',
        ]:
            self.assertIn(line, body.decode())

    async def test_kick_and_mute(self) -> None:
        """
        A kick closes the WebSocket with 4004 (Bob may come back); a muted
        Bob's posts get 403 muted, over HTTP and as an error frame.
        """
        ws = await self.ws("bob")
        await self.api("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "kick"}, "mod")
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_KICKED)
        ws = await self.ws("bob")
        code, mute = await self.api("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "mute"}, "own")
        self.assertEqual((code, mute["until"]), (201, None))
        code, error = await self.api("POST", "/api/rooms/r/messages", {"body": "hello?"}, "bob")
        self.assertEqual((code, error["error"]), (403, "muted"))
        ws.send_json({"type": "message", "body": "hello?", "client_id": "c1"})
        await ws.wait_for(lambda: any(f["type"] == "error" for f in ws.frames))
        error = [f for f in ws.frames if f["type"] == "error"][-1]
        self.assertEqual((error["code"], error["status"], error["client_id"]), ("muted", 403, "c1"))
        code, info = await self.api("GET", "/api/rooms/r", who="bob")
        self.assertEqual(info["muted"], {"until": None})

    async def test_settings_and_read_markers(self) -> None:
        """
        The topic is a room event and part of the room's answers; read
        markers give each user their unread count in the room list.
        """
        code, event = await self.api("PATCH", "/api/rooms/r", {"topic": "Welcome"}, "mod")
        self.assertEqual((code, event["type"], event["topic"]), (200, "room", "Welcome"))
        for i in range(3):
            await self.api("POST", "/api/rooms/r/messages", {"body": f"m{i}"}, "bob")
        code, info = await self.api("GET", "/api/rooms/r")
        self.assertEqual((info["topic"], info["edits"], info["read"], info["unread"]), ("Welcome", True, 0, info["last_seq"]))
        code, marked = await self.api("POST", "/api/rooms/r/read", {"seq": info["last_seq"] - 1})
        self.assertEqual((code, marked["unread"]), (200, 1))
        ws = await self.ws("ann")
        ws.send_json({"type": "read", "seq": info["last_seq"]})
        await ws.wait_for(lambda: any(f["type"] == "read" for f in ws.frames))
        self.assertEqual([f for f in ws.frames if f["type"] == "read"][-1]["unread"], 0)
        code, listed = await self.api("GET", "/api/rooms")
        self.assertEqual({r["name"]: r["unread"] for r in listed["rooms"]}["r"], 0)
        code, listed = await self.api("GET", "/api/rooms", who="bob")
        self.assertEqual({r["name"]: r["unread"] for r in listed["rooms"]}["r"], info["last_seq"])

    async def test_bad_requests(self) -> None:
        """
        Every route answers malformed input with a specific 4xx and a JSON
        error, and stores nothing.
        """
        code, posted = await self.api("POST", "/api/rooms/r/messages", {"body": "mine"})
        seq = posted["seq"]
        for method, path, payload, who, status, error in [
            ("PATCH", "/api/rooms/r/messages/abc", {"body": "x"}, "ann", 400, "invalid_parameter"),
            ("PATCH", "/api/rooms/r/messages/" + "9" * 400, {"body": "x"}, "ann", 400, "invalid_parameter"),
            ("PATCH", "/api/rooms/r/messages/0", {"body": "x"}, "ann", 400, "invalid_parameter"),
            ("PATCH", "/api/rooms/r/messages/999", {"body": "x"}, "ann", 404, "message_not_found"),
            ("PATCH", f"/api/rooms/r/messages/{seq}", {"body": ""}, "ann", 400, "invalid_body"),
            ("PATCH", f"/api/rooms/r/messages/{seq}", {"body": "x"}, "bob", 403, "not_allowed"),
            ("PATCH", "/api/rooms/nope/messages/1", {"body": "x"}, "ann", 404, "room_not_found"),
            ("DELETE", f"/api/rooms/r/messages/{seq}", None, "bob", 403, "not_allowed"),
            ("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "smite"}, "mod", 400, "invalid_action"),
            ("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "ban", "duration": "forever"}, "mod", 400, "invalid_duration"),
            ("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "ban", "duration": 10**30}, "mod", 400, "invalid_duration"),
            ("POST", "/api/rooms/r/moderation", {"action": "ban"}, "mod", 400, "invalid_user"),
            ("POST", "/api/rooms/r/moderation", {"user": "own", "action": "ban"}, "mod", 403, "not_allowed"),
            ("POST", "/api/rooms/r/moderation", {"user": "bob", "action": "unmute"}, "mod", 409, "not_restricted"),
            ("PATCH", "/api/rooms/r", {"topic": "x" * 300}, "own", 400, "invalid_topic"),
            ("PATCH", "/api/rooms/r", {"topic": "hi"}, "ann", 403, "not_allowed"),
            ("PATCH", "/api/rooms/r", {}, "own", 400, "invalid_parameter"),
            ("POST", "/api/rooms/r/read", {"seq": -1}, "ann", 400, "invalid_parameter"),
            ("POST", "/api/rooms/r/read", {"seq": "9" * 5000}, "ann", 400, "invalid_parameter"),
        ]:
            code, answer = await self.api(method, path, payload, who)
            self.assertEqual((code, answer["error"]), (status, error), (method, path, payload))
            self.assertIsInstance(answer["detail"], str)
        code, answer = await self.api("PATCH", f"/api/rooms/r/messages/{seq}", raw=b"{not json")
        self.assertEqual((code, answer["error"]), (400, "invalid_json"))
        code, batch = await self.api("GET", "/api/rooms/r/messages?after=0")
        self.assertEqual(batch["messages"][-1]["seq"], seq)


class TutorialTextTests(SynchronousTestCase):
    """
    The tutorial's long-poll clients show every kind of event as a line
    of text, and a deleted message without its text.
    """

    def test_every_kind(self) -> None:
        from chatd.web import _tutorial_text

        core, _, _ = room_with_staff(self)
        posted = self.successResultOf(core.post("r", None, "hello", identity=ANN))
        events = [
            self.successResultOf(core.edit("r", posted.seq, "hello!", ANN)),
            self.successResultOf(core.delete("r", posted.seq, MOD)),
            self.successResultOf(core.moderate("r", "ann", "mute", MOD)),
            self.successResultOf(core.configure_room("r", OWNER, topic="Be kind")),
        ]
        self.assertEqual(
            [_tutorial_text(m) for m in history(self, core)[1:]],
            [
                "(message deleted)",
                "Ann edited message 2.",
                "Mo deleted message 2.",
                "Mo muted Ann.",
                "Owner set the topic: Be kind",
            ],
        )
        self.assertEqual(_tutorial_text(events[0]), "Ann edited message 2: hello!")
