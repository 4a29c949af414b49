"""
Tests for L{chatd.web}: pages, the JSON/JSONP API, the tutorial endpoint
and every error path, through StubTreq (no sockets) on a fake clock.
"""

import json
from typing import Any, Tuple

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from chatd.presence import POLL_GRACE
from tests._support import make_web

BASE = "http://chatd.test"


class WebTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.core, self.web, self.clock = make_web(rooms=["dev"])
        self.stub = StubTreq(self.web.resource())

    def request(self, method: str, path: str, **kwargs: Any) -> Tuple[int, Any, bytes]:
        d = self.stub.request(method, BASE + path, **kwargs)
        self.stub.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(self.stub.content(response))
        return response.code, response.headers, body

    def get(self, path: str) -> Tuple[int, Any, bytes]:
        return self.request("GET", path)

    def post_json(self, path: str, payload: Any) -> Tuple[int, Any, bytes]:
        return self.request(
            "POST",
            path,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": ["application/json"]},
        )

    def assertError(self, result: Tuple[int, Any, bytes], status: int, code: str) -> None:
        got_status, headers, body = result
        self.assertEqual(got_status, status, body)
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"]
        )
        answer = json.loads(body)
        self.assertEqual(set(answer), {"error", "detail"})
        self.assertEqual(answer["error"], code)
        self.assertIsInstance(answer["detail"], str)
        self.assertNotIn("Traceback", answer["detail"])


class PageTests(WebTestCase):
    """
    The HTML pages.
    """

    def test_index_lists_rooms(self) -> None:
        """
        / lists every room with links to both chat pages and has the
        create form; it is served with a strict CSP.
        """
        code, headers, body = self.get("/")
        self.assertEqual(code, 200)
        page = body.decode("utf-8")
        for link in ['href="/rooms/dev"', 'href="/rooms/lobby/longpoll"', 'id="create_room"']:
            self.assertIn(link, page)
        csp = headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("script-src 'self'", csp)
        self.assertNotIn("unsafe-inline", csp)

    def test_room_pages(self) -> None:
        """
        Both chat pages have the message list, the input box and the nick
        field, and name their transport.
        """
        for path, transport in [("/rooms/dev", "websocket"), ("/rooms/dev/longpoll", "longpoll")]:
            code, headers, body = self.get(path)
            self.assertEqual(code, 200)
            page = body.decode("utf-8")
            for marker in ['id="message_list"', "<ul>", 'id="inputbox"', 'id="nick"']:
                self.assertIn(marker, page)
            self.assertIn(f'data-transport="{transport}"', page)
            self.assertIn('src="/static/chat.js"', page)
            self.assertNotIn("<script>", page)

    def test_unknown_room_page(self) -> None:
        """
        A chat page for a room that does not exist is a 404 page, and the
        room is not created.
        """
        code, headers, body = self.get("/rooms/ghost")
        self.assertEqual(code, 404)
        self.assertIn(b"No such room", body)
        self.assertEqual([r.name for r in self.core.rooms()], ["dev", "lobby"])


class RoomsAPITests(WebTestCase):
    """
    GET and POST /api/rooms.
    """

    def test_list(self) -> None:
        """
        GET /api/rooms lists rooms with last_seq and connected clients.
        """
        self.core.post("dev", "a", "hi")
        # A waiting long-poll is someone here.
        self.stub.get(BASE + "/api/rooms/dev/messages")
        self.stub.flush()
        code, _, body = self.get("/api/rooms")
        self.assertEqual(code, 200)
        self.assertEqual(
            json.loads(body),
            {
                "rooms": [
                    {"name": "dev", "last_seq": 1, "clients": 1, "last_activity": 1_700_000_000.0, "private": False, "guests": True, "topic": "", "edits": True},
                    {"name": "lobby", "last_seq": 0, "clients": 0, "last_activity": None, "private": False, "guests": True, "topic": "", "edits": True},
                ]
            },
        )

    def test_create(self) -> None:
        """
        POST /api/rooms creates a room: 201 with its info and Location.
        """
        code, headers, body = self.post_json("/api/rooms", {"name": "new-room"})
        self.assertEqual(code, 201)
        self.assertEqual(json.loads(body), {"name": "new-room", "last_seq": 0, "clients": 0, "last_activity": None, "private": False, "guests": True, "topic": "", "edits": True})
        self.assertEqual(headers.getRawHeaders("location"), ["/api/rooms/new-room"])
        self.assertEqual(self.core.room("new-room").name, "new-room")

    def test_create_from_form(self) -> None:
        """
        The index page's form (no JavaScript) gets a 303 to the new room.
        """
        code, headers, _ = self.request(
            "POST", "/api/rooms", data={"name": "formed"}, allow_redirects=False
        )
        self.assertEqual(code, 303)
        self.assertEqual(headers.getRawHeaders("location"), ["/rooms/formed"])

    def test_create_errors(self) -> None:
        """
        Existing names are 409, invalid ones 400, and nothing is created.
        """
        self.assertError(self.post_json("/api/rooms", {"name": "dev"}), 409, "room_exists")
        for bad in [{"name": "no spaces"}, {"name": ""}, {}, {"name": 5}, {"name": "x" * 65}]:
            self.assertError(self.post_json("/api/rooms", bad), 400, "invalid_room_name")
        self.assertEqual(len(self.core.rooms()), 2)

    def test_room_info(self) -> None:
        """
        GET /api/rooms/<room> describes one room; unknown is 404.
        """
        code, _, body = self.get("/api/rooms/dev")
        self.assertEqual(json.loads(body), {"name": "dev", "last_seq": 0, "clients": 0, "last_activity": None, "private": False, "guests": True, "topic": "", "edits": True})
        self.assertError(self.get("/api/rooms/ghost"), 404, "room_not_found")


class PostMessageTests(WebTestCase):
    """
    POST /api/rooms/<room>/messages.
    """

    def test_post_json(self) -> None:
        """
        A JSON post answers 201 with the stored message and its seq.
        """
        code, headers, body = self.post_json(
            "/api/rooms/dev/messages", {"nick": "ann", "body": "hello", "client_id": "c-1"}
        )
        self.assertEqual(code, 201)
        self.assertEqual(
            json.loads(body),
            {
                "type": "message",
                "room": "dev",
                "seq": 1,
                "nick": "ann",
                "user": None,
                "body": "hello",
                "ts": 1_700_000_000.0,
                "client_id": "c-1",
            },
        )

    def test_post_form(self) -> None:
        """
        An HTML form post works the same way.
        """
        code, _, body = self.request(
            "POST", "/api/rooms/dev/messages", data={"nick": "bob", "body": "form ✓"}
        )
        self.assertEqual(code, 201)
        self.assertEqual(json.loads(body)["body"], "form ✓")

    def test_retry_returns_original(self) -> None:
        """
        Posting the same client_id again returns the original message and
        stores nothing new.
        """
        payload = {"nick": "ann", "body": "once", "client_id": "retry-me"}
        _, _, first = self.post_json("/api/rooms/dev/messages", payload)
        code, _, second = self.post_json("/api/rooms/dev/messages", payload)
        self.assertEqual(code, 201)
        self.assertEqual(json.loads(first), json.loads(second))
        self.assertEqual(self.core.room("dev").last_seq, 1)

    def test_errors(self) -> None:
        """
        Each malformed post gets its own 4xx and stores nothing.
        """
        path = "/api/rooms/dev/messages"
        self.assertError(self.post_json(path, {"nick": "a"}), 400, "invalid_body")
        self.assertError(self.post_json(path, {"body": "   "}), 400, "invalid_body")
        self.assertError(self.post_json(path, {"body": ["x"]}), 400, "invalid_body")
        self.assertError(self.post_json(path, {"body": "x" * 4097}), 413, "body_too_long")
        self.assertError(self.post_json(path, {"body": "x", "nick": "n" * 33}), 400, "invalid_nick")
        self.assertError(self.post_json(path, {"body": "x", "nick": "alice\u200b"}), 400, "invalid_nick")
        self.assertError(self.post_json(path, {"body": "x", "nick": "\u202eecila"}), 400, "invalid_nick")
        self.assertError(
            self.post_json(path, {"body": "x", "client_id": 3}), 400, "invalid_client_id"
        )
        self.assertError(self.post_json(path, [1, 2]), 400, "invalid_json")
        self.assertError(
            self.request("POST", path, data=b"{nope", headers={"Content-Type": ["application/json"]}),
            400,
            "invalid_json",
        )
        self.assertError(
            self.request(
                "POST", path, data=b"[" * 60000, headers={"Content-Type": ["application/json"]}
            ),
            400,
            "invalid_json",
        )
        self.assertError(
            self.request("POST", path, data=b"\xff\xfe", headers={"Content-Type": ["application/json"]}),
            400,
            "invalid_json",
        )
        self.assertError(
            self.request("POST", path, data=b"body=%ff", headers={"Content-Type": ["application/x-www-form-urlencoded"]}),
            400,
            "invalid_form",
        )
        self.assertError(
            self.request("POST", path, data=b"hi", headers={"Content-Type": ["text/plain"]}),
            415,
            "unsupported_media_type",
        )
        self.assertError(
            self.post_json(path, {"body": "x" * 70000}), 413, "request_too_large"
        )
        self.assertError(self.post_json("/api/rooms/ghost/messages", {"body": "x"}), 404, "room_not_found")
        self.assertEqual(self.core.room("dev").last_seq, 0)

    def test_method_not_allowed(self) -> None:
        """
        A wrong method is a JSON 405 with Allow.
        """
        result = self.request("DELETE", "/api/rooms/dev/messages")
        self.assertError(result, 405, "method_not_allowed")
        self.assertIn("POST", result[1].getRawHeaders("allow")[0])

    def test_non_utf8_url(self) -> None:
        """
        A URL path that is not UTF-8 is a JSON 400, not a text page.
        """
        self.assertError(self.get("/rooms/%ff"), 400, "invalid_url")
        self.assertError(self.get("/api/rooms/%c3%28/messages"), 400, "invalid_url")

    def test_unknown_path(self) -> None:
        """
        An unknown path is a JSON 404.
        """
        self.assertError(self.get("/api/nothing/here"), 404, "not_found")


class LongPollTests(WebTestCase):
    """
    GET /api/rooms/<room>/messages.
    """

    def test_immediate(self) -> None:
        """
        With messages after the cursor, the answer is immediate and holds
        them all (up to limit).
        """
        for i in range(5):
            self.core.post("dev", "a", f"m{i}")
        code, headers, body = self.get("/api/rooms/dev/messages?after=1&limit=3")
        self.assertEqual(code, 200)
        answer = json.loads(body)
        self.assertEqual([m["seq"] for m in answer["messages"]], [2, 3, 4])
        self.assertEqual((answer["room"], answer["last_seq"], answer["reset"]), ("dev", 5, False))
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])

    def test_waits_then_wakes(self) -> None:
        """
        With nothing new the request is held, and answered the moment a
        message is posted (no clock tick).
        """
        d = self.stub.get(BASE + "/api/rooms/dev/messages")
        self.stub.flush()
        self.assertNoResult(d)
        self.core.post("dev", "ann", "wake up")
        self.stub.flush()
        response = self.successResultOf(d)
        answer = json.loads(self.successResultOf(self.stub.content(response)))
        self.assertEqual([m["body"] for m in answer["messages"]], ["wake up"])

    def test_timeout(self) -> None:
        """
        At the timeout the answer is an empty list.
        """
        d = self.stub.get(BASE + "/api/rooms/dev/messages?after=0&timeout=5")
        self.stub.flush()
        self.clock.advance(4)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.stub.flush()
        answer = json.loads(self.successResultOf(self.stub.content(self.successResultOf(d))))
        self.assertEqual(answer, {"room": "dev", "messages": [], "last_seq": 0, "reset": False})

    def test_timeout_capped(self) -> None:
        """
        timeout is capped at 60 seconds and defaults to 25.
        """
        d1 = self.stub.get(BASE + "/api/rooms/dev/messages?timeout=3600")
        d2 = self.stub.get(BASE + "/api/rooms/dev/messages")
        self.stub.flush()
        self.clock.advance(25)
        self.stub.flush()
        self.assertNoResult(d1)
        self.successResultOf(d2)
        self.clock.advance(35)
        self.stub.flush()
        self.successResultOf(d1)

    def test_disconnect_forgets_waiter(self) -> None:
        """
        A client that goes away while waiting is forgotten at once.
        """
        d = self.stub.get(BASE + "/api/rooms/dev/messages")
        self.stub.flush()
        self.assertEqual(self.core.room("dev").waiting, 1)
        d.cancel()
        self.stub.flush()
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(self.core.room("dev").waiting, 0)
        # Its client is still counted as here a while (it may be polling
        # again), then not, and nothing is left behind.
        self.assertEqual(self.core.room("dev").clients, 1)
        self.clock.advance(POLL_GRACE)
        self.assertEqual(self.core.room("dev").clients, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reset(self) -> None:
        """
        A cursor older than what is held answers reset=true with first_seq.
        """
        core, web, _ = make_web(history=3)
        stub = StubTreq(web.resource())
        for i in range(10):
            core.post("lobby", "a", f"m{i}")
        d = stub.get(BASE + "/api/rooms/lobby/messages?after=2")
        stub.flush()
        answer = json.loads(self.successResultOf(stub.content(self.successResultOf(d))))
        self.assertEqual((answer["reset"], answer["first_seq"]), (True, 8))
        self.assertEqual([m["seq"] for m in answer["messages"]], [8, 9, 10])

    def test_before(self) -> None:
        """
        ?before=SEQ pages backwards.
        """
        for i in range(10):
            self.core.post("dev", "a", f"m{i}")
        _, _, body = self.get("/api/rooms/dev/messages?before=6&limit=2")
        self.assertEqual([m["seq"] for m in json.loads(body)["messages"]], [4, 5])

    def test_bad_parameters(self) -> None:
        """
        Malformed query parameters are 400s; limit is capped at 1000.
        """
        for query in [
            "after=-1", "after=x", "after=1.5", "limit=0", "limit=abc",
            "timeout=-1", "timeout=nan", "timeout=inf", "after=1&before=2", "after=%ff",
        ]:
            self.assertError(self.get(f"/api/rooms/dev/messages?{query}"), 400, "invalid_parameter")
        for i in range(3):
            self.core.post("dev", "a", f"m{i}")
        code, _, body = self.get("/api/rooms/dev/messages?after=0&limit=100000")
        self.assertEqual((code, len(json.loads(body)["messages"])), (200, 3))

    def test_unknown_room(self) -> None:
        """
        Long-polling an unknown room is a 404.
        """
        self.assertError(self.get("/api/rooms/ghost/messages"), 404, "room_not_found")


class JSONPTests(WebTestCase):
    """
    ?callback= on any GET.
    """

    def test_jsonp(self) -> None:
        """
        A valid callback wraps the JSON as NAME(...); with the JavaScript
        content type and nosniff.
        """
        self.core.post("dev", "a", "</script><b>hi</b>")
        code, headers, body = self.get("/api/rooms/dev/messages?after=0&callback=chat.got_1$")
        self.assertEqual(code, 200)
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/javascript; charset=utf-8"]
        )
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertTrue(body.startswith(b"chat.got_1$({"))
        self.assertTrue(body.endswith(b"});"))
        answer = json.loads(body[len(b"chat.got_1$("):-2])
        self.assertEqual(answer["messages"][0]["body"], "</script><b>hi</b>")
        code, _, body = self.get("/api/rooms?callback=cb")
        self.assertTrue(body.startswith(b"cb({\"rooms\""))

    def test_bad_callbacks_not_reflected(self) -> None:
        """
        Anything but an identifier path is a 400 that does not echo it.
        """
        for bad in ["alert(1)", "a.", ".a", "1abc", "a..b", "a b", "x" * 65, "%3Cscript%3E", "a-b"]:
            code, _, body = self.get(f"/api/rooms/dev/messages?after=0&callback={bad}")
            self.assertEqual(code, 400)
            self.assertEqual(json.loads(body)["error"], "invalid_callback")
            self.assertNotIn(b"alert", body)
            self.assertNotIn(b"script", body)


class TutorialTests(WebTestCase):
    """
    The tutorial's long-poll wire format at /rooms/<room>/poll.
    """

    def test_connected(self) -> None:
        """
        lastupdate=-1 answers the tutorial's greeting at once, byte for
        byte, cross-origin readable.
        """
        code, headers, body = self.get("/rooms/dev/poll?lastupdate=-1&callback=cb")
        self.assertEqual(code, 200)
        self.assertEqual(body, b'cb({"status": 1, "timestamp": 0, "data": "connected..."});')
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["*"])

    def test_next_message_and_cursor(self) -> None:
        """
        Each answer carries one message and its seq as the cursor; the
        request is held until one exists.
        """
        self.core.post("dev", "ann", "first")
        _, _, body = self.get("/rooms/dev/poll?lastupdate=0&callback=cb")
        self.assertEqual(body, b'cb({"status": 1, "timestamp": 1, "data": "first"});')
        d = self.stub.get(BASE + "/rooms/dev/poll?lastupdate=1&callback=cb")
        self.stub.flush()
        self.clock.advance(3600)
        self.assertNoResult(d)
        code, _, body = self.request(
            "POST", "/rooms/dev/poll", data={"new_message": "second"}
        )
        self.assertEqual(code, 200)
        self.assertEqual(body, b'{"status": 1, "timestamp": 2, "data": "second"}')
        self.stub.flush()
        body = self.successResultOf(self.stub.content(self.successResultOf(d)))
        self.assertEqual(body, b'cb({"status": 1, "timestamp": 2, "data": "second"});')

    def test_plain_json(self) -> None:
        """
        Without callback the answer is plain JSON.
        """
        _, headers, body = self.get("/rooms/dev/poll?lastupdate=-1")
        self.assertEqual(body, b'{"status": 1, "timestamp": 0, "data": "connected..."}')
        self.assertEqual(
            headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"]
        )

    def test_errors(self) -> None:
        """
        Bad cursors, empty messages and unknown rooms get JSON 4xx.
        """
        self.assertError(self.get("/rooms/dev/poll?lastupdate=abc"), 400, "invalid_parameter")
        self.assertError(self.get("/rooms/ghost/poll?lastupdate=-1"), 404, "room_not_found")
        self.assertError(
            self.request("POST", "/rooms/dev/poll", data={"new_message": ""}), 400, "invalid_body"
        )


class WebSocketDoorTests(WebTestCase):
    """
    /ws/<room> checks before handing over to Autobahn.
    """

    def test_plain_get(self) -> None:
        """
        A GET without an Upgrade header is told to upgrade (426).
        """
        result = self.get("/ws/dev")
        self.assertError(result, 426, "upgrade_required")

    def test_unknown_room(self) -> None:
        """
        An unknown room is a JSON 404 before any upgrade.
        """
        self.assertError(self.get("/ws/ghost"), 404, "room_not_found")
        self.assertError(self.get("/ws/dev?after=x"), 400, "invalid_parameter")
