"""
Who may read and write what, over real sockets, on every transport: a
guest, a token user and a session user, in public and private rooms.

A private room does not exist for anyone who is not a member: every path
answers them 404 and nothing of its messages, JSONP from another site's
page included (a cookie never authorises a JSONP read).  A member removed
stops reading at once, on every transport.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from chatd import ws as chatd_ws
from chatd.auth import mint
from chatd.service import ChatService

from ._support import HTTP, WSClient, start_chatd

SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret!"
#: Tests sign up several users: a cheap hash keeps them quick (the
#: default hasher is tested in tests/test_auth.py).
FAST_HASH = ("time_cost", 1)


def _cheap_passwords(test: TestCase) -> None:
    """
    Accounts made in these tests hash with argon2's cheapest settings.
    """
    from argon2 import PasswordHasher

    from chatd import auth

    original = auth.Passwords.__init__

    def init(self: Any, reactor: Any, hasher: Any = None, threads: int = 2) -> None:
        original(self, reactor, PasswordHasher(time_cost=1, memory_cost=8, parallelism=1), threads)

    test.patch(auth.Passwords, "__init__", init)


class Browser:
    """
    One person's cookie jar and CSRF token, over treq.
    """

    def __init__(self, test: TestCase, base: str) -> None:
        self.http = HTTP(test, base)
        self.base = base
        self.cookie: Optional[str] = None
        self.csrf = ""
        self.user: Optional[Dict[str, str]] = None

    def headers(self, extra: Optional[Dict[str, str]] = None, cookie: bool = True) -> Dict[str, List[str]]:
        headers = {k: [v] for k, v in (extra or {}).items()}
        if cookie and self.cookie:
            headers["Cookie"] = [f"chatd_session={self.cookie}"]
        return headers

    async def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        headers: Optional[Dict[str, str]] = None,
        csrf: bool = True,
    ) -> Tuple[int, Any, bytes]:
        extra = dict(headers or {})
        data = None
        if payload is not None:
            extra["Content-Type"] = "application/json"
            data = json.dumps(payload).encode("utf-8")
        if csrf and self.csrf and method != "GET":
            extra.setdefault("X-CSRF-Token", self.csrf)
        return await self.http.request(method, path, data=data, headers=self.headers(extra))

    async def json(self, method: str, path: str, payload: Any = None, **kwargs: Any) -> Tuple[int, Any]:
        code, _, body = await self.request(method, path, payload, **kwargs)
        text = body.decode("utf-8")
        if text.startswith("cb("):
            text = text[3:-2]
        return code, json.loads(text) if text else None

    async def sign_up(self, user: str, name: Optional[str] = None) -> None:
        code, headers, body = await self.request(
            "POST", "/account/signup", {"user": user, "name": name, "password": "correct horse"}
        )
        assert code == 200, body
        self._take(headers, body)

    async def sign_in(self, user: str, password: str = "correct horse") -> int:
        code, headers, body = await self.request(
            "POST", "/account/signin", {"user": user, "password": password}
        )
        if code == 200:
            self._take(headers, body)
        return code

    def _take(self, headers: Any, body: bytes) -> None:
        for value in headers.getRawHeaders(b"set-cookie", []):
            cookie = value.decode("ascii").split(";")[0]
            name, _, self.cookie = cookie.partition("=")
            assert name == "chatd_session"
        answer = json.loads(body)
        self.csrf, self.user = answer["csrf"], answer["user"]

    async def websocket(self, test: TestCase, path: str, **kwargs: Any) -> WSClient:
        headers = {"Cookie": f"chatd_session={self.cookie}"} if self.cookie else None
        return await WSClient.start(test, self.base, path, headers=headers, **kwargs)


def token(user: str, name: Optional[str] = None, ttl: float = 600) -> str:
    return mint(SECRET, user, name, ttl)


async def _server(test: TestCase, *args: str) -> Tuple[ChatService, str]:
    _cheap_passwords(test)
    secret = os.path.abspath(test.mktemp())
    with open(secret, "wb") as f:
        f.write(SECRET + b"\n")
    return await start_chatd(test, "--auth-secret-file", secret, *args)


class PrivateRoomTests(TestCase):
    """
    --auth accounts (and tokens): Alice's private room, with Bob added
    later, and Carol, a guest and a token user who are not members.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "accounts")
        self.alice, self.bob, self.carol = (Browser(self, self.base) for _ in range(3))
        await self.alice.sign_up("alice", "Alice")
        await self.bob.sign_up("bob", "Bob")
        await self.carol.sign_up("carol", "Carol")
        self.guest = Browser(self, self.base)
        code, room = await self.alice.json("POST", "/api/rooms", {"name": "secret", "private": True})
        self.assertEqual((code, room["private"], room["role"]), (201, True, "owner"))
        code, message = await self.alice.json(
            "POST", "/api/rooms/secret/messages", {"body": "the plans are in the vault"}
        )
        self.assertEqual(code, 201)

    def outsiders(self) -> List[Tuple[str, Browser, str]]:
        """
        Everyone who must not see the room, with a query suffix carrying
        their credentials where a cookie would not count.
        """
        stranger = Browser(self, self.base)
        return [
            ("carol (session)", self.carol, ""),
            ("guest", self.guest, ""),
            ("token user", stranger, f"token={token('tina', 'Tina')}"),
        ]

    async def test_not_found_on_every_path(self) -> None:
        """
        Non-members get 404 (not 403) on every read and write path, and
        no byte of the room's messages; the room is not listed to them.
        """
        paths = [
            ("GET", "/rooms/secret"),
            ("GET", "/rooms/secret/longpoll"),
            ("GET", "/rooms/secret/sse"),
            ("GET", "/api/rooms/secret/events"),
            ("GET", "/api/rooms/secret/events?after=0"),
            ("GET", "/api/rooms/secret"),
            ("GET", "/api/rooms/secret/members"),
            ("GET", "/api/rooms/secret/messages?after=0&timeout=0"),
            ("GET", "/api/rooms/secret/messages?before=100"),
            ("GET", "/api/rooms/secret/messages?after=0&callback=cb"),
            ("GET", "/rooms/secret/poll?lastupdate=0&timeout=0"),
            ("GET", "/rooms/secret/poll?lastupdate=0&timeout=0&callback=cb"),
            ("POST", "/api/rooms/secret/messages"),
            ("POST", "/rooms/secret/poll"),
            ("POST", "/api/rooms/secret/members"),
            ("DELETE", "/api/rooms/secret/members/alice"),
        ]
        for who, browser, query in self.outsiders():
            for method, path in paths:
                if query:
                    path += ("&" if "?" in path else "?") + query
                payload = {"body": "x", "new_message": "x", "user": who} if method == "POST" else None
                code, _, body = await browser.request(method, path, payload)
                self.assertEqual(code, 404, (who, method, path, body))
                self.assertNotIn(b"vault", body, (who, path))
            ws = await browser.websocket(self, "/ws/secret" + (f"?{query}" if query else ""))
            await ws.closed
            self.assertIsNone(ws.protocol)
            self.assertIn("404", ws.close_reason or "", who)
            self.assertEqual(ws.frames, [])
            for listing in ("/", "/api/rooms", "/api/rooms?callback=cb"):
                if query:
                    listing += ("&" if "?" in listing else "?") + query
                code, _, body = await browser.request("GET", listing)
                self.assertEqual(code, 200)
                self.assertNotIn(b"secret", body, (who, listing))

    async def test_guests_create_no_rooms(self) -> None:
        """
        Where rooms are for users, a guest creates none (and is not
        offered the form).
        """
        code, answer = await self.guest.json("POST", "/api/rooms", {"name": "mine"})
        self.assertEqual((code, answer["error"]), (401, "auth_required"))
        code, _, page = await self.guest.request("GET", "/")
        self.assertNotIn(b'id="create_room"', page)
        self.assertIn(b"Sign in</a> to create rooms", page)

    async def test_metrics_name_no_room(self) -> None:
        """
        /metrics has no label naming a room.
        """
        code, _, body = await self.guest.request("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertNotIn(b"secret", body)

    async def test_jsonp_is_never_authorised_by_a_cookie(self) -> None:
        """
        Alice's own cookie does not let a JSONP read of her room through,
        from another site's page or not; her token in the URL does.
        """
        for path in [
            "/api/rooms/secret/messages?after=0&callback=cb",
            "/rooms/secret/poll?lastupdate=0&timeout=0&callback=cb",
            "/api/rooms?callback=cb",
        ]:
            for origin in (None, "https://evil.example"):
                headers = {"Referer": "https://evil.example/page"}
                if origin:
                    headers["Origin"] = origin
                code, _, body = await self.alice.request("GET", path, headers=headers)
                self.assertNotIn(b"vault", body, path)
                self.assertNotIn(b'"secret"', body, path)
        code, answer = await self.alice.json(
            "GET", f"/api/rooms/secret/messages?after=0&callback=cb&token={token('alice')}"
        )
        self.assertEqual(code, 200)
        self.assertEqual([m["body"] for m in answer["messages"]], ["the plans are in the vault"])

    async def test_members_on_every_transport(self) -> None:
        """
        Once Alice adds Bob, he reads and writes over WebSocket (his
        cookie), long-poll, history paging and the tutorial's endpoint
        (a token there: it is cross-site by design), and sees the room
        listed with his role and its members.
        """
        code, event = await self.alice.json("POST", "/api/rooms/secret/members", {"user": "bob"})
        self.assertEqual(code, 201)
        self.assertEqual(
            (event["type"], event["user"], event["role"]),
            ("member", {"id": "bob", "name": "Bob"}, "member"),
        )
        ws = await self.bob.websocket(self, "/ws/secret?after=0")
        await ws.wait_for(lambda: len(ws.frames) >= 2)
        self.assertEqual([f["type"] for f in ws.frames], ["message", "member"])
        code, batch = await self.bob.json("GET", "/api/rooms/secret/messages?after=0&timeout=0")
        self.assertEqual((code, [m["seq"] for m in batch["messages"]]), (200, [1, 2]))
        code, batch = await self.bob.json("GET", "/api/rooms/secret/messages?before=3")
        self.assertEqual((code, len(batch["messages"])), (200, 2))
        code, answer = await self.bob.json(
            "GET", f"/rooms/secret/poll?lastupdate=0&token={token('bob', 'Bob')}"
        )
        self.assertEqual((code, answer["data"]), (200, "the plans are in the vault"))
        code, listing = await self.bob.json("GET", "/api/rooms")
        rooms = {room["name"]: room for room in listing["rooms"]}
        self.assertEqual(rooms["secret"]["role"], "member")
        code, members = await self.bob.json("GET", "/api/rooms/secret/members")
        self.assertEqual(
            members["members"],
            [
                {"id": "alice", "name": "Alice", "role": "owner"},
                {"id": "bob", "name": "Bob", "role": "member"},
            ],
        )
        ws.send_json({"type": "message", "nick": "alice", "body": "I am not Alice"})
        await ws.wait_for_seq(3)
        self.assertEqual(ws.messages[-1]["user"], {"id": "bob", "name": "Bob"})
        self.assertEqual(ws.messages[-1]["nick"], "Bob")
        page = await self.bob.request("GET", "/rooms/secret")
        self.assertEqual(page[0], 200)
        self.assertIn(b"member_list", page[2])

    async def test_removed_member_stops_at_once(self) -> None:
        """
        Removing Bob closes his WebSocket on the room (4003, after the
        event of his removal), answers his waiting long-poll at once, and
        his next request of any kind is a 404.
        """
        await self.alice.json("POST", "/api/rooms/secret/members", {"user": "bob"})
        ws = await self.bob.websocket(self, "/ws/secret?after=2")
        await ws.opened
        await ws.sync()
        poll: Deferred = Deferred.fromCoroutine(
            self.bob.json("GET", "/api/rooms/secret/messages?after=2&timeout=50")
        )
        await self.service.core.room("secret").reaches(2)
        # The poll is waiting once the room counts it.
        while self.service.core.room("secret").waiting == 0:
            await ws.sync()
        code, _ = await self.alice.json("DELETE", "/api/rooms/secret/members/bob")
        self.assertEqual(code, 200)
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_REVOKED)
        self.assertEqual([(f["type"], f["role"]) for f in ws.frames if f["type"] == "member"], [("member", None)])
        code, batch = await poll
        self.assertEqual(code, 200)
        code, _, body = await self.bob.request("GET", "/api/rooms/secret/messages?after=0")
        self.assertEqual(code, 404)
        self.assertNotIn(b"vault", body)

    async def test_csrf(self) -> None:
        """
        A cookie-authorised change needs the session's CSRF token (header
        or form field); another site's page is refused by its Origin.
        """
        code, answer = await self.alice.json(
            "POST", "/api/rooms/secret/messages", {"body": "no token"}, csrf=False
        )
        self.assertEqual((code, answer["error"]), (403, "csrf_failed"))
        code, answer = await self.alice.json(
            "POST", "/api/rooms/secret/messages", {"body": "bad"}, headers={"X-CSRF-Token": "x"}
        )
        self.assertEqual((code, answer["error"]), (403, "csrf_failed"))
        code, _, _ = await self.alice.http.request(
            "POST",
            "/api/rooms/secret/messages",
            data=f"body=form&csrf={self.alice.csrf}".encode("ascii"),
            headers=self.alice.headers({"Content-Type": "application/x-www-form-urlencoded"}),
        )
        self.assertEqual(code, 201)
        code, answer = await self.alice.json(
            "POST", "/api/rooms/secret/messages", {"body": "x"}, headers={"Origin": "https://evil.example"}
        )
        self.assertEqual((code, answer["error"]), (403, "origin_not_allowed"))

    async def test_sign_out(self) -> None:
        """
        Signing out closes the session's WebSockets (4001) and ends its
        cookie: the room is no longer readable with it.
        """
        ws = await self.alice.websocket(self, "/ws/secret")
        await ws.opened
        code, _ = await self.alice.json("POST", "/account/signout")
        self.assertEqual(code, 200)
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_AUTH_EXPIRED)
        code, _, body = await self.alice.request("GET", "/api/rooms/secret/messages?after=0")
        self.assertEqual(code, 404)
        code, me = await self.alice.json("GET", "/api/me")
        self.assertEqual(me, {"user": None, "via": "guest"})

    async def _waiting_poll(self, browser: Browser, ws: WSClient) -> Deferred:
        """
        A long-poll of C{browser}'s on the room, once it waits.
        """
        room = self.service.core.room("secret")
        before = room.waiting
        poll: Deferred = Deferred.fromCoroutine(
            browser.json("GET", f"/api/rooms/secret/messages?after={room.last_seq}&timeout=50")
        )
        while room.waiting == before:
            await ws.sync()
        return poll

    async def test_sign_out_ends_long_polls_at_once(self) -> None:
        """
        Signing out answers the session's waiting long-polls at once with
        401: no message posted after it reaches them.
        """
        ws = await self.alice.websocket(self, "/ws/secret")
        await ws.opened
        poll = await self._waiting_poll(self.alice, ws)
        other = Browser(self, self.base)
        await other.sign_in("alice")
        code, _ = await self.alice.json("POST", "/account/signout")
        self.assertEqual(code, 200)
        code, answer = await poll
        self.assertEqual((code, answer["error"]), (401, "auth_required"))
        # Her other session is still hers.
        code, _ = await other.json("GET", "/api/rooms/secret")
        self.assertEqual(code, 200)

    async def test_session_ended_elsewhere(self) -> None:
        """
        A session ended on another node (or by chatd-admin) closes this
        node's WebSockets and long-polls it authorised at the next check
        (every few seconds; called here at once).
        """
        await self.alice.json("POST", "/api/rooms/secret/members", {"user": "bob"})
        ws = await self.bob.websocket(self, "/ws/secret")
        await ws.opened
        poll = await self._waiting_poll(self.bob, ws)
        watching = Browser(self, self.base)
        await watching.sign_in("alice")
        alice_ws = await watching.websocket(self, "/ws/secret")
        await alice_ws.opened
        self.assertEqual(await self.service.store.end_sessions(user_id="bob"), 1)
        await self.service.web.sessions.recheck()
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_AUTH_EXPIRED)
        code, answer = await poll
        self.assertEqual((code, answer["error"]), (401, "auth_required"))
        await alice_ws.sync()
        self.assertIsNotNone(alice_ws.protocol)

    async def test_wrong_password_and_unknown_user_alike(self) -> None:
        """
        A wrong password and an unknown user get the same 401.
        """
        stranger = Browser(self, self.base)
        self.assertEqual(await stranger.sign_in("alice", "wrong password"), 401)
        self.assertEqual(await stranger.sign_in("nobody"), 401)
        self.assertEqual(await stranger.sign_in("alice"), 200)
        self.assertEqual(stranger.user, {"id": "alice", "name": "Alice"})


class TokenTests(TestCase):
    """
    --auth token: every client carries a token the application signed.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "token")
        self.http = HTTP(self, self.base)

    async def test_no_token_no_entry(self) -> None:
        """
        Without a token, rooms are closed (401 with WWW-Authenticate); a
        bad or expired token is refused, not taken for a guest.
        """
        code, headers, body = await self.http.request("GET", "/api/rooms/lobby/messages?after=0")
        self.assertEqual((code, json.loads(body)["error"]), (401, "auth_required"))
        self.assertEqual(headers.getRawHeaders(b"www-authenticate"), [b'Bearer realm="chatd"'])
        for bad, error in [
            ("not-a-jwt", "invalid_token"),
            (mint(b"another-secret-another-secret-1234", "eve", None, 600), "invalid_token"),
            (token("eve", ttl=-120), "token_expired"),
        ]:
            code, answer = await self.http.get_json(f"/api/rooms/lobby/messages?after=0&token={bad}")
            self.assertEqual((code, answer["error"]), (401, error))
            code, _, body = await self.http.request(
                "POST", "/api/rooms/lobby/messages", data=b'{"body": "x"}',
                headers={"Content-Type": ["application/json"], "Authorization": [f"Bearer {bad}"]},
            )
            self.assertEqual((code, json.loads(body)["error"]), (401, error))
        ws = await WSClient.start(self, self.base, "/ws/lobby")
        await ws.closed
        self.assertIn("401", ws.close_reason or "")

    async def test_token_user_over_websocket_and_long_poll(self) -> None:
        """
        A token user posts over WebSocket and long-poll; the server names
        them in each message, whatever nick they send.
        """
        ws = await WSClient.connect(self, self.base, f"/ws/lobby?token={token('u1', 'Ann')}")
        ws.send_json({"type": "message", "nick": "root", "body": "hello"})
        await ws.wait_for_seq(1)
        code, _, body = await self.http.request(
            "POST", "/api/rooms/lobby/messages", data=b'{"body": "over http", "nick": "root"}',
            headers={"Content-Type": ["application/json"], "Authorization": [f"Bearer {token('u2', 'Ben')}"]},
        )
        self.assertEqual(code, 201)
        await ws.wait_for_seq(2)
        self.assertEqual(
            [(m["nick"], m["user"]) for m in ws.messages],
            [("Ann", {"id": "u1", "name": "Ann"}), ("Ben", {"id": "u2", "name": "Ben"})],
        )
        code, batch = await self.http.get_json(f"/api/rooms/lobby/messages?after=0&token={token('u3')}")
        self.assertEqual([m["user"]["id"] for m in batch["messages"]], ["u1", "u2"])

    async def test_expired_token_closes_the_websocket(self) -> None:
        """
        A connection whose token expires is closed (4001) once the grace
        period is over, unless a fresh token for the same user comes first.
        """
        self.patch(chatd_ws, "TOKEN_GRACE", 0.2)
        # Expiring in a second, within PyJWT's leeway either way.
        short = token("u1", "Ann", ttl=1)
        refreshed = await WSClient.connect(self, self.base, f"/ws/lobby?token={short}")
        expiring = await WSClient.connect(self, self.base, f"/ws/lobby?token={short}")
        refreshed.send_json({"type": "auth", "token": token("u9", "Mallory")})
        await refreshed.wait_for(lambda: any(f["type"] == "error" for f in refreshed.frames))
        self.assertEqual(refreshed.frames[-1]["code"], "not_allowed")
        refreshed.send_json({"type": "auth", "token": token("u1", "Ann", ttl=600)})
        await refreshed.wait_for(lambda: any(f["type"] == "auth" for f in refreshed.frames))
        self.assertEqual(await expiring.closed, chatd_ws.CLOSE_AUTH_EXPIRED)
        await refreshed.sync()
        self.assertIsNotNone(refreshed.protocol)


class OpenModeTests(TestCase):
    """
    --auth open (the default): the tutorial's clients work as before, as
    guests, beside token users.
    """

    async def test_guest_and_token_user(self) -> None:
        service, base = await _server(self)
        http = HTTP(self, base)
        code, message = await http.post_json("/api/rooms/lobby/messages", {"nick": "ann", "body": "hi"})
        self.assertEqual((code, message["nick"], message["user"]), (201, "ann", None))
        code, _, body = await http.request(
            "POST", "/api/rooms/lobby/messages", data=b'{"body": "verified"}',
            headers={"Content-Type": ["application/json"], "Authorization": [f"Bearer {token('u1', 'Ann')}"]},
        )
        self.assertEqual(json.loads(body)["user"], {"id": "u1", "name": "Ann"})
        code, _ = await http.post_json("/api/rooms", {"name": "closed", "private": True})
        self.assertEqual(code, 401)
        code, _, body = await http.request("GET", "/account/signin")
        self.assertEqual(code, 404)


class ServerAPITests(TestCase):
    """
    An application's backend, with an API key: every room, members, posts
    as a user or a bot, signing users out; rate-limited per key.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "accounts", "--api-rate", "30/0.01")
        self.http = HTTP(self, self.base)
        self.key = await self.new_key()

    async def new_key(self) -> str:
        from chatd.auth import digest, new_key, split_key

        key_id, key = new_key()
        parts = split_key(key)
        assert parts is not None
        await self.service.store.add_key(key_id, digest(parts[1]), "test", 0)
        return key

    async def api(self, method: str, path: str, payload: Any = None, key: Optional[str] = None) -> Tuple[int, Any]:
        headers = {"Authorization": [f"Bearer {key or self.key}"]}
        data = None
        if payload is not None:
            headers["Content-Type"] = ["application/json"]
            data = json.dumps(payload).encode("utf-8")
        code, _, body = await self.http.request(method, path, data=data, headers=headers)
        return code, json.loads(body)

    async def test_rooms_members_and_posts(self) -> None:
        """
        A key creates a private room with an owner, adds and removes
        members, posts as a bot and as a user, and sees every room.
        """
        code, room = await self.api(
            "POST", "/api/rooms", {"name": "support", "private": True, "owner": {"id": "carol", "name": "Carol"}}
        )
        self.assertEqual((code, room["private"]), (201, True))
        code, event = await self.api("POST", "/api/rooms/support/members", {"user": "dan", "name": "Dan", "role": "moderator"})
        self.assertEqual((code, event["role"]), (201, "moderator"))
        code, message = await self.api("POST", "/api/rooms/support/messages", {"body": "ticket", "bot": "helpdesk"})
        self.assertEqual(message["user"], {"id": "bot:helpdesk", "name": "helpdesk"})
        code, message = await self.api(
            "POST", "/api/rooms/support/messages", {"body": "on it", "as": {"id": "dan", "name": "Dan"}}
        )
        self.assertEqual((message["nick"], message["user"]), ("Dan", {"id": "dan", "name": "Dan"}))
        code, listing = await self.api("GET", "/api/rooms")
        self.assertIn("support", [r["name"] for r in listing["rooms"]])
        code, members = await self.api("GET", "/api/rooms/support/members")
        self.assertEqual(
            [(m["id"], m["role"]) for m in members["members"]], [("carol", "owner"), ("dan", "moderator")]
        )
        code, _ = await self.api("DELETE", "/api/rooms/support/members/dan")
        self.assertEqual(code, 200)
        code, answer = await self.api("DELETE", "/api/rooms/support/members/dan")
        self.assertEqual((code, answer["error"]), (404, "user_not_found"))
        # Dan's token no longer reads it.
        code, _, _ = await self.http.request("GET", f"/api/rooms/support?token={token('dan', 'Dan')}")
        self.assertEqual(code, 404)
        code, _, _ = await self.http.request("GET", f"/api/rooms/support?token={token('carol', 'Carol')}")
        self.assertEqual(code, 200)

    async def test_bad_input(self) -> None:
        """
        Malformed requests get a specific 4xx and the error model.
        """
        for method, path, payload, status, error in [
            ("POST", "/api/rooms/lobby/messages", {"body": "x", "as": "dan"}, 400, "invalid_user"),
            ("POST", "/api/rooms/lobby/messages", {"body": "x", "nick": "anon"}, 400, "invalid_user"),
            ("POST", "/api/rooms/lobby/messages", {"body": "x", "bot": "b", "as": {"id": "u"}}, 400, "invalid_user"),
            ("POST", "/api/rooms/lobby/messages", {"body": "x", "as": {"id": "a\u202eb"}}, 400, "invalid_user"),
            ("POST", "/api/rooms/lobby/messages", {"body": "x", "bot": "\u200b"}, 400, "invalid_name"),
            ("POST", "/api/rooms/lobby/members", {"user": "dan", "role": "admin"}, 400, "invalid_role"),
            ("POST", "/api/rooms/lobby/members", {"user": ""}, 400, "invalid_user"),
            ("POST", "/api/rooms", {"name": "x", "private": "maybe"}, 400, "invalid_parameter"),
            ("DELETE", "/api/rooms/lobby/members/nobody", None, 404, "user_not_found"),
            ("DELETE", "/api/users/nobody/sessions", None, 200, None),
        ]:
            code, answer = await self.api(method, path, payload)
            self.assertEqual(code, status, (path, payload, answer))
            if error is not None:
                self.assertEqual(answer["error"], error, (path, payload))
                self.assertIsInstance(answer["detail"], str)

    async def test_revoked_and_forged_keys(self) -> None:
        """
        A revoked key, a forged one and one of the wrong shape are 401.
        """
        revoked = await self.new_key()
        key_id = revoked.split("_")[1]
        self.assertTrue(await self.service.store.revoke_key(key_id, 0))
        for key in (revoked, "ck_0000_forged", self.key[:-1] + ("A" if self.key[-1] != "A" else "B")):
            code, answer = await self.api("GET", "/api/rooms", key=key)
            self.assertEqual((code, answer["error"]), (401, "invalid_key"))

    async def test_rate_limited_per_key(self) -> None:
        """
        Past its burst a key gets 429 with Retry-After; another key is
        not held up by it.
        """
        codes = [(await self.api("GET", "/api/rooms"))[0] for _ in range(31)]
        self.assertEqual(codes[:30], [200] * 30)
        code, answer = await self.api("GET", "/api/rooms")
        self.assertEqual((code, answer["error"]), (429, "rate_limited"))
        other = await self.new_key()
        self.assertEqual((await self.api("GET", "/api/rooms", key=other))[0], 200)

    async def test_revoke_sessions(self) -> None:
        """
        Ending a user's sessions signs them out and closes the WebSockets
        their sessions opened.
        """
        bob = Browser(self, self.base)
        await bob.sign_up("bob", "Bob")
        code, _ = await self.api("POST", "/api/rooms", {"name": "team", "private": True, "owner": {"id": "bob"}})
        ws = await bob.websocket(self, "/ws/team")
        await ws.opened
        code, answer = await self.api("DELETE", "/api/users/bob/sessions")
        self.assertEqual((code, answer), (200, {"user": "bob", "ended": 1}))
        self.assertEqual(await ws.closed, chatd_ws.CLOSE_AUTH_EXPIRED)
        code, me = await bob.json("GET", "/api/me")
        self.assertEqual(me["user"], None)
        code, _ = await bob.json("GET", "/api/rooms/team")
        self.assertEqual(code, 404)


class CookieTests(TestCase):
    """
    The session cookie's attributes, and what the log never holds.
    """

    async def test_cookie_attributes(self) -> None:
        """
        HttpOnly and SameSite=Lax always; Secure when clients reach chatd
        over https (its --public-url says so).
        """
        for args, host, secure in [
            ((), None, False),
            (("--public-url", "https://chat.example"), "chat.example", True),
        ]:
            service, base = await _server(self, "--auth", "accounts", *args)
            http = HTTP(self, base)
            headers = {"Content-Type": ["application/json"]}
            if host:
                headers["Host"] = [host]
            code, response_headers, _ = await http.request(
                "POST", "/account/signup", headers=headers,
                data=b'{"user": "ann", "password": "correct horse"}',
            )
            self.assertEqual(code, 200)
            (cookie,) = response_headers.getRawHeaders(b"set-cookie")
            attributes = [part.strip() for part in cookie.split(b";")[1:]]
            self.assertIn(b"HttpOnly", attributes)
            self.assertIn(b"SameSite=Lax", attributes)
            self.assertIn(b"Path=/", attributes)
            self.assertEqual(b"Secure" in attributes, secure, args)
            await service.stopService()

    async def test_passwords_and_tokens_are_not_logged(self) -> None:
        """
        With the access log on, sign-ups, sign-ins (right and wrong) and
        token requests leave no password, token or cookie in the log.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        lines: List[str] = []

        def observe(event: Dict[str, Any]) -> None:
            lines.append(formatEvent(event) + repr(event.get("log_failure", "")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service, base = await _server(self, "--auth", "accounts", "--access-log", "on")
        browser = Browser(self, base)
        await browser.sign_up("ann", "Ann")
        self.assertEqual(await browser.sign_in("ann", "a wrong password"), 401)
        self.assertEqual(await browser.sign_in("ann"), 200)
        secret_token = token("ann", "Ann")
        code, _ = await browser.json("GET", "/api/rooms")
        code, _, _ = await browser.http.request(
            "GET", "/api/rooms", headers={"Authorization": [f"Bearer {secret_token}"]}
        )
        code, _, _ = await browser.http.request("GET", f"/api/rooms/lobby/messages?after=0&timeout=0&token={secret_token}")
        self.assertEqual(code, 200)
        text = "\n".join(lines)
        self.assertIn("/account/signin", text)  # the access log is on
        self.assertIn("/api/rooms/lobby/messages?after=0&timeout=0&token=REDACTED", text)
        for secret in ("correct horse", "a wrong password", secret_token, browser.cookie or "?"):
            self.assertNotIn(secret, text)


class RedirectTests(TestCase):
    """
    Where a sign-in sends the browser next.
    """

    def test_no_open_redirect(self) -> None:
        """
        Only a path on this server: never another site, however written.
        """
        from chatd.web import _safe_next

        self.assertEqual(_safe_next("/rooms/plans"), b"/rooms/plans")
        self.assertEqual(_safe_next("/rooms/plans?x=1"), b"/rooms/plans?x=1")
        for bad in ["//evil.example", "/\\evil.example", "https://evil.example", "evil", "",
                    "/\x00", "/\u00e9", None, 5, "/" + "x" * 300]:
            self.assertEqual(_safe_next(bad), b"/", bad)


class MemberFormTests(TestCase):
    """
    The room page's member forms, as a browser posts them.
    """

    async def test_unknown_user_and_refusals_are_pages(self) -> None:
        """
        With accounts, a member is someone with an account: adding an
        unknown user name is refused, and a refused form gets a page
        saying why (with the way back), not JSON.
        """
        service, base = await _server(self, "--auth", "accounts")
        alice, bob = Browser(self, base), Browser(self, base)
        await alice.sign_up("alice", "Alice")
        await bob.sign_up("bob", "Bob")
        await alice.json("POST", "/api/rooms", {"name": "plans", "private": True})
        code, answer = await alice.json("POST", "/api/rooms/plans/members", {"user": "nosuchuser"})
        self.assertEqual((code, answer["error"]), (404, "user_not_found"))
        code, answer = await alice.json("POST", "/api/rooms/plans/members", {"user": "BOB "})
        self.assertEqual((code, answer["user"]), (201, {"id": "bob", "name": "Bob"}))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        code, _, page = await bob.http.request(
            "POST", "/api/rooms/plans/members", data=f"user=carol&csrf={bob.csrf}".encode(),
            headers=bob.headers(form),
        )
        self.assertEqual(code, 403)
        self.assertIn(b"Back to the room", page)
        self.assertIn(b"You may not make this change", page)
        code, headers, _ = await alice.http.request(
            "POST", "/api/rooms/plans/members/bob/remove", data=f"csrf={alice.csrf}".encode(),
            headers=alice.headers(form), allow_redirects=False,
        )
        self.assertEqual((code, headers.getRawHeaders(b"location")), (303, [b"/rooms/plans#members"]))


class SignUpModeTests(TestCase):
    """
    --signup invite and --signup closed.
    """

    async def test_invite_only(self) -> None:
        """
        With --signup invite, sign-up needs an invitation's code, and each
        code signs up one account.
        """
        from chatd.auth import digest

        service, base = await _server(self, "--auth", "accounts", "--signup", "invite")
        await service.store.add_invite(digest("the-code"), 0, 2**62)
        payload = {"user": "ann", "password": "correct horse"}
        browser = Browser(self, base)
        code, answer = await browser.json("POST", "/account/signup", payload)
        self.assertEqual((code, answer["error"]), (403, "invalid_invite"))
        code, answer = await browser.json("POST", "/account/signup", {**payload, "invite": "wrong"})
        self.assertEqual((code, answer["error"]), (403, "invalid_invite"))
        code, answer = await browser.json("POST", "/account/signup", {**payload, "invite": "the-code"})
        self.assertEqual((code, answer["user"]["id"]), (200, "ann"))
        code, answer = await browser.json(
            "POST", "/account/signup", {"user": "bob", "password": "correct horse", "invite": "the-code"}
        )
        self.assertEqual((code, answer["error"]), (403, "invalid_invite"))
        code, _, page = await browser.request("GET", "/account/signup?invite=the-code")
        self.assertIn(b'name="invite" value="the-code"', page)
        code, _, page = await browser.request("GET", "/account/signup")
        self.assertIn(b"needs an invitation link", page)

    async def test_closed(self) -> None:
        """
        With --signup closed nobody signs up (accounts come from
        chatd-admin), and the pages offer no sign-up.
        """
        service, base = await _server(self, "--auth", "accounts", "--signup", "closed")
        browser = Browser(self, base)
        code, answer = await browser.json("POST", "/account/signup", {"user": "ann", "password": "correct horse"})
        self.assertEqual((code, answer["error"]), (403, "signup_closed"))
        code, _, page = await browser.request("GET", "/")
        self.assertIn(b"signin_link", page)
        self.assertNotIn(b"signup_link", page)
