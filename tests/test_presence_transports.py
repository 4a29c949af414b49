"""
Presence and typing over real sockets, on every transport: the snapshot
after the backlog and the diffs on WebSocket and SSE (no C{id:}), typing
frames from one client to the others, long-poll answers that carry the
room's presence and typing (JSON and JSONP) and are woken when it
changes, and C{POST /api/rooms/<room>/typing} with its errors.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from chatd.auth import mint
from chatd.web import TYPING_BURST

from ._support import HTTP, WSClient
from .test_access import SECRET, Browser, _server
from .test_sse import EventClient


def as_user(user: str, name: Optional[str] = None) -> str:
    return mint(SECRET, user, name or user.title(), 600)


def presence(client: WSClient) -> List[Dict[str, Any]]:
    return [f for f in client.frames if f["type"] == "presence"]


def typing(client: WSClient) -> List[tuple]:
    return [(f["nick"], f["typing"]) for f in client.frames if f["type"] == "typing"]


def user(name: str) -> Dict[str, str]:
    return {"id": name, "name": name.title()}


class PresenceOverSocketsTests(TestCase):
    """
    A server open to guests and token users.
    """

    timeout = 20

    async def setUp(self) -> None:
        self.service, self.base = await _server(self)
        self.http = HTTP(self, self.base)

    async def ws(self, who: Optional[str], query: str = "presence=1") -> WSClient:
        token = "" if who is None else f"&token={as_user(who)}"
        return await WSClient.connect(self, self.base, f"/ws/lobby?after=0&{query}{token}")

    async def headcount(self) -> int:
        _, info = await self.http.get_json("/api/rooms/lobby")
        return int(info["clients"])

    async def typing_post(self, who: Optional[str], payload: Any, room: str = "lobby") -> tuple:
        headers = {"Content-Type": ["application/json"]}
        if who is not None:
            headers["Authorization"] = [f"Bearer {as_user(who)}"]
        code, _, body = await self.http.request(
            "POST", f"/api/rooms/{room}/typing", data=json.dumps(payload).encode("utf-8"), headers=headers
        )
        return code, json.loads(body) if body else None

    async def test_snapshot_after_backlog_then_diffs(self) -> None:
        """
        A WebSocket that asks gets the room's backlog, then the snapshot,
        then a diff for each user who comes or goes (one user's tabs are
        one user); one that does not ask gets no presence frames at all.
        """
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "before"})
        plain = await self.ws(None, "")
        alice = await self.ws("alice")
        await alice.wait_for(lambda: bool(presence(alice)))
        self.assertEqual([f["type"] for f in alice.frames], ["message", "presence"])
        self.assertEqual(
            alice.frames[1],
            {"type": "presence", "room": "lobby", "users": [user("alice")], "guests": 1},
        )
        again = await self.ws("alice")
        bob = await self.ws("bob")
        await alice.wait_for(lambda: len(presence(alice)) == 2)
        await bob.wait_for(lambda: bool(presence(bob)))
        self.assertEqual(
            presence(alice)[1],
            {"type": "presence", "room": "lobby", "joined": [user("bob")], "left": [], "guests": 1},
        )
        self.assertEqual(presence(bob)[0]["users"], [user("alice"), user("bob")])
        self.assertEqual(await self.headcount(), 3)
        await bob.close()
        await again.close()
        await alice.wait_for(lambda: len(presence(alice)) == 3)
        await alice.sync()
        self.assertEqual(presence(alice)[2]["left"], ["bob"])
        self.assertEqual(len(presence(alice)), 3)
        self.assertEqual(await self.headcount(), 2)
        await plain.sync()
        self.assertEqual([f["type"] for f in plain.frames], ["message", "pong"])

    async def test_typing_on_websocket(self) -> None:
        """
        Typing frames reach the others (the typer's own connections too):
        a start, an explicit stop, and the stop a post makes; a bad value
        is an error frame, and typing frames count toward the frame limit.
        """
        alice, bob = await self.ws("alice"), await self.ws("bob")
        alice.send_json({"type": "typing"})
        await bob.wait_for(lambda: typing(bob) == [("Alice", True)])
        self.assertEqual(
            [f for f in bob.frames if f["type"] == "typing"],
            [{"type": "typing", "room": "lobby", "user": user("alice"), "nick": "Alice", "typing": True}],
        )
        alice.send_json({"type": "typing", "typing": False})
        await bob.wait_for(lambda: typing(bob) == [("Alice", True), ("Alice", False)])
        # Too soon after the last start: dropped quietly.
        alice.send_json({"type": "typing"})
        await alice.sync()
        bob.send_json({"type": "typing"})
        await alice.wait_for(lambda: ("Bob", True) in typing(alice))
        bob.send_json({"type": "message", "body": "done typing"})
        await alice.wait_for(lambda: typing(alice)[-1:] == [("Bob", False)])
        self.assertEqual(typing(alice), [("Alice", True), ("Alice", False), ("Bob", True), ("Bob", False)])
        bob.send_json({"type": "typing", "typing": "maybe"})
        await bob.wait_for(lambda: bob.frames[-1]["type"] == "error")
        self.assertEqual(bob.frames[-1]["code"], "invalid_parameter")
        for _ in range(40):
            bob.send_json({"type": "typing"})
        await bob.wait_for(lambda: any(f.get("code") == "rate_limited" for f in bob.frames))

    async def test_typing_stops_when_the_last_tab_leaves(self) -> None:
        """
        A typer whose last connection closes is seen to stop at once.
        """
        alice, bob = await self.ws("alice"), await self.ws("bob")
        bob.send_json({"type": "typing"})
        await alice.wait_for(lambda: typing(alice) == [("Bob", True)])
        await bob.close()
        await alice.wait_for(lambda: typing(alice) == [("Bob", True), ("Bob", False)])

    async def test_guests_type_under_their_nick(self) -> None:
        """
        A guest types as the nick it gives; a nick that is none is an
        error.
        """
        alice, guest = await self.ws("alice"), await self.ws(None, "presence=1&client=b1")
        guest.send_json({"type": "typing", "nick": "zed"})
        await alice.wait_for(lambda: typing(alice) == [("zed", True)])
        self.assertIsNone([f for f in alice.frames if f["type"] == "typing"][0]["user"])
        guest.send_json({"type": "typing", "nick": "\u202ezed"})
        await guest.wait_for(lambda: guest.frames[-1]["type"] == "error")
        self.assertEqual(guest.frames[-1]["code"], "invalid_nick")

    async def test_bad_parameters_refuse_the_handshake(self) -> None:
        for query in ("presence=maybe", "client=not%20one"):
            client = await WSClient.start(self, self.base, f"/ws/lobby?{query}")
            self.assertIsNone(await client.opened)

    async def test_event_stream(self) -> None:
        """
        An event stream that asks gets the snapshot after the backlog and
        the typing frames as named events without an id: the ids stay the
        log's seqs.
        """
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "before"})
        url = f"{self.base}/api/rooms/lobby/events?after=0&presence=1&token={as_user('bob')}"
        stream = await EventClient.open(self, url)
        await stream.wait_for(lambda: len(stream.events) >= 2)
        self.assertEqual([(e.get("id"), e.get("event")) for e in stream.events], [("1", None), (None, "presence")])
        self.assertEqual(stream.events[1]["json"]["users"], [user("bob")])
        alice = await self.ws("alice")
        alice.send_json({"type": "typing"})
        await stream.wait_for(lambda: any(e.get("event") == "typing" for e in stream.events))
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "after"})
        await stream.wait_for_ids(2)
        kinds = [(e.get("id"), e.get("event")) for e in stream.events]
        self.assertEqual(kinds, [("1", None), (None, "presence"), (None, "presence"), (None, "typing"), ("2", None)])
        self.assertEqual(stream.events[2]["json"]["joined"], [user("alice")])
        self.assertEqual(stream.events[3]["json"]["user"], user("alice"))
        plain = await EventClient.open(self, f"{self.base}/api/rooms/lobby/events?after=0")
        await plain.wait_for_ids(2)
        self.assertEqual([e.get("event") for e in plain.events], [None, None])

    async def test_long_poll_carries_presence_and_is_woken(self) -> None:
        """
        A long-poll that asks for presence is answered at once the first
        time (it has seen none), its answer carrying the room's presence,
        typing and their version; sending that version back it waits, and
        is answered when someone starts typing (JSON or JSONP alike).  One
        that does not ask waits for messages only, its answers as they
        always were.  A long-poll user does not drop out after a message.
        """
        alice = await self.ws("alice")
        token = as_user("bob")
        plain = Deferred.fromCoroutine(self.http.get_json("/api/rooms/lobby/messages?after=0&timeout=20"))
        # The guest's poll is waiting (and counted) before Bob asks.
        for _ in range(200):
            if self.service.core.waiting():
                break
            await deferLater(reactor, 0.01, lambda: None)
        asking = f"/api/rooms/lobby/messages?after=0&timeout=20&token={token}&presence="
        code, first = await self.http.get_json(asking + "1")
        self.assertEqual(code, 200)
        self.assertEqual(first["messages"], [])
        version = first["presence"].pop("version")
        self.assertEqual(first["presence"], {"users": [user("alice"), user("bob")], "guests": 1})
        self.assertEqual(first["typing"], [])
        await alice.wait_for(lambda: any(user("bob") in f.get("joined", []) for f in presence(alice)))
        waiting = Deferred.fromCoroutine(self.http.get_json(asking + version))
        await alice.sync()
        self.assertNoResult(waiting)
        alice.send_json({"type": "typing"})
        code, answer = await waiting
        self.assertEqual(code, 200)
        self.assertEqual(answer["messages"], [])
        self.assertNotEqual(answer["presence"]["version"], version)
        self.assertEqual(answer["typing"], [{"user": user("alice"), "nick": "Alice"}])
        self.assertNoResult(plain)
        code, _, body = await self.http.request("GET", asking.replace("timeout=20", "timeout=0") + "1&callback=got")
        self.assertTrue(body.startswith(b"got({") and body.endswith(b"});"), body)
        self.assertEqual(json.loads(body[4:-2])["typing"], [{"user": user("alice"), "nick": "Alice"}])
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "hi"})
        code, answer = await plain
        self.assertEqual(set(answer), {"room", "messages", "last_seq", "reset"})
        # Bob's polls were answered, and he has not polled since: still here.
        self.assertEqual(await self.headcount(), 3)
        await alice.sync()
        self.assertFalse(any(f.get("left") for f in presence(alice)))

    async def test_typing_route(self) -> None:
        """
        POST .../typing: 204 and the others see it; the usual errors for
        a bad value, a bad client id or nick, an unknown room; 429 past
        its rate limit.
        """
        alice = await self.ws("alice")
        self.assertEqual(await self.typing_post("bob", {"typing": True}), (204, None))
        await alice.wait_for(lambda: typing(alice) == [("Bob", True)])
        self.assertEqual(await self.typing_post("bob", {"typing": False}), (204, None))
        await alice.wait_for(lambda: typing(alice)[-1] == ("Bob", False))
        code, _, _ = await self.http.request(
            "POST", "/api/rooms/lobby/typing", data=b"typing=true&nick=zed&client=b2",
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
        )
        self.assertEqual(code, 204)
        await alice.wait_for(lambda: typing(alice)[-1] == ("zed", True))
        for payload, room, status, error in [
            ({"typing": "maybe"}, "lobby", 400, "invalid_parameter"),
            ({"typing": True, "client": "no spaces"}, "lobby", 400, "invalid_parameter"),
            ({"typing": True, "nick": "x" * 40}, "lobby", 400, "invalid_nick"),
            ({"typing": True}, "nowhere", 404, "room_not_found"),
        ]:
            code, answer = await self.typing_post(None, payload, room)
            self.assertEqual((code, answer["error"]), (status, error))
            self.assertEqual(set(answer), {"error", "detail"})
        codes = [(await self.typing_post("carol", {"typing": False}))[0] for _ in range(TYPING_BURST + 2)]
        self.assertEqual(codes[:TYPING_BURST], [204] * TYPING_BURST)
        self.assertEqual(codes[-1], 429)


class TypingWithSessionsTests(TestCase):
    """
    --auth accounts: the typing route is a state change like any POST, so
    a session needs its CSRF token.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "accounts")

    async def test_csrf(self) -> None:
        ann = Browser(self, self.base)
        await ann.sign_up("ann", "Ann")
        code, answer = await ann.json("POST", "/api/rooms/lobby/typing", {"typing": True}, csrf=False)
        self.assertEqual((code, answer["error"]), (403, "csrf_failed"))
        code, answer = await ann.json("POST", "/api/rooms/lobby/typing", {"typing": True})
        self.assertEqual((code, answer), (204, None))
        room = self.service.core.room("lobby")
        self.assertEqual([u.name for u, _ in room.presence.typing_now], ["Ann"])
