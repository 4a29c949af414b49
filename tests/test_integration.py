"""
End-to-end tests against chatd listening on a real loopback port: treq for
HTTP, Autobahn's Twisted client for WebSocket.  Both transports share one
room; history, resume, resets and every WebSocket error path.
"""

import json

from twisted.trial.unittest import TestCase

from tests._support import HTTP, WSClient, start_chatd


class ChatdTestCase(TestCase):
    args: tuple = ()

    async def start(self, *args: str) -> None:
        self.service, self.base = await start_chatd(self, *(args or self.args))
        self.http = HTTP(self, self.base)

    async def ws(self, path: str) -> WSClient:
        return await WSClient.connect(self, self.base, path)

    async def post(self, room: str, body: str, **fields: str) -> dict:
        code, answer = await self.http.post_json(
            f"/api/rooms/{room}/messages", {"body": body, **fields}
        )
        self.assertEqual(code, 201, answer)
        return answer


class HTTPServingTests(ChatdTestCase):
    """
    Pages, static files and JSONP over a real socket.
    """

    async def test_pages_and_static(self) -> None:
        """
        The index, both chat pages and the static files are served from
        the installed data folders; directories are not listed.
        """
        await self.start("--room", "dev")
        for path in ["/", "/rooms/dev", "/rooms/dev/longpoll"]:
            code, headers, body = await self.http.request("GET", path)
            self.assertEqual(code, 200, path)
            self.assertEqual(headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        for path, kind in [
            ("/static/chat.js", "javascript"),
            ("/static/index.js", "javascript"),
            ("/static/chat.css", "text/css"),
        ]:
            code, headers, body = await self.http.request("GET", path)
            self.assertEqual(code, 200, path)
            self.assertIn(kind, headers.getRawHeaders("content-type")[0])
        code, _, _ = await self.http.request("GET", "/static/")
        self.assertEqual(code, 404)

    async def test_jsonp_and_tutorial_bytes(self) -> None:
        """
        JSONP and the tutorial endpoint answer byte for byte over HTTP.
        """
        await self.start()
        code, headers, body = await self.http.request("GET", "/rooms/lobby/poll?lastupdate=-1&callback=cb")
        self.assertEqual(body, b'cb({"status": 1, "timestamp": 0, "data": "connected..."});')
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/javascript; charset=utf-8"])
        await self.post("lobby", "hi")
        code, _, body = await self.http.request("GET", "/rooms/lobby/poll?lastupdate=0&callback=jQuery123_456")
        self.assertEqual(body, b'jQuery123_456({"status": 1, "timestamp": 1, "data": "hi"});')


class WebSocketTests(ChatdTestCase):
    """
    /ws/<room>.
    """

    async def test_history_then_live(self) -> None:
        """
        A new client first gets the room's history in seq order, then
        live messages; its own message comes back with its seq.
        """
        await self.start()
        for i in range(3):
            await self.post("lobby", f"old {i}")
        client = await self.ws("/ws/lobby")
        await client.wait_for_seq(3)
        client.send_json({"type": "message", "nick": "ann", "body": "live", "client_id": "k1"})
        await client.wait_for_seq(4)
        self.assertEqual(client.seqs, [1, 2, 3, 4])
        last = client.messages[-1]
        self.assertEqual(
            {k: last[k] for k in ("room", "nick", "body", "client_id")},
            {"room": "lobby", "nick": "ann", "body": "live", "client_id": "k1"},
        )
        self.assertIsInstance(last["ts"], float)

    async def test_after_resumes(self) -> None:
        """
        ?after=SEQ sends only what came after SEQ.
        """
        await self.start()
        for i in range(5):
            await self.post("lobby", f"m{i}")
        client = await self.ws("/ws/lobby?after=3")
        await client.wait_for_seq(5)
        await client.sync()
        self.assertEqual(client.seqs, [4, 5])

    async def test_old_cursor_served_from_store(self) -> None:
        """
        With a durable store, a cursor older than the in-memory cache is
        served from the store: no reset, no gap, on both transports.
        """
        await self.start("--history", "3")
        for i in range(8):
            await self.post("lobby", f"m{i}")
        client = await self.ws("/ws/lobby?after=1")
        await client.wait_for_seq(8)
        self.assertEqual(client.seqs, list(range(2, 9)))
        self.assertNotIn("reset", [f["type"] for f in client.frames])
        code, batch = await self.http.get_json("/api/rooms/lobby/messages?after=1&limit=4")
        self.assertEqual([m["seq"] for m in batch["messages"]], [2, 3, 4, 5])
        self.assertFalse(batch["reset"])
        code, batch = await self.http.get_json("/api/rooms/lobby/messages?before=3")
        self.assertEqual([m["seq"] for m in batch["messages"]], [1, 2])

    async def test_reset_frame(self) -> None:
        """
        A cursor older than what is held gets a reset frame first (the
        memory store holds only --history messages).
        """
        await self.start("--history", "3", "--store", "memory:")
        for i in range(6):
            await self.post("lobby", f"m{i}")
        client = await self.ws("/ws/lobby?after=1")
        await client.wait_for_seq(6)
        self.assertEqual(client.frames[0], {"type": "reset", "first_seq": 4})
        self.assertEqual(client.seqs, [4, 5, 6])

    async def test_websocket_and_longpoll_see_each_other(self) -> None:
        """
        A WebSocket client and a long-poll client in one room see each
        other's messages, in the same order.
        """
        await self.start("--room", "both")
        ws = await self.ws("/ws/both")
        poll = self.http.get_json("/api/rooms/both/messages?after=0&timeout=30")
        ws.send_json({"type": "message", "nick": "ws", "body": "from ws"})
        code, batch = await poll
        self.assertEqual([m["body"] for m in batch["messages"]], ["from ws"])
        await self.post("both", "from http", nick="poller")
        await ws.wait_for_seq(2)
        self.assertEqual([m["body"] for m in ws.messages], ["from ws", "from http"])
        code, batch = await self.http.get_json("/api/rooms/both/messages?after=0")
        self.assertEqual([m["seq"] for m in batch["messages"]], ws.seqs)

    async def test_plain_text_frame(self) -> None:
        """
        A text frame that is not a JSON object is the body (the tutorial's
        clients send plain text).
        """
        await self.start()
        client = await self.ws("/ws/lobby")
        client.send_raw(b"just text")
        client.send_raw(b"42")
        await client.wait_for_seq(2)
        self.assertEqual(
            [(m["nick"], m["body"]) for m in client.messages],
            [("anonymous", "just text"), ("anonymous", "42")],
        )

    async def test_malformed_frames_get_errors(self) -> None:
        """
        Malformed frames get error frames and the connection stays usable.
        """
        await self.start()
        client = await self.ws("/ws/lobby")
        client.send_json({"type": "message", "body": "", "client_id": "e1"})
        client.send_json({"type": "message", "body": "x" * 5000})
        client.send_json({"type": "message", "body": "hi", "nick": 5})
        client.send_json({"type": "bogus"})
        client.send_json({"type": "message", "body": "hi", "client_id": ["x"]})
        client.send_raw(b'{"type": "message", "body": "\\u0000"}')
        client.send_json({"type": "message", "body": "hi", "nick": "alice\u200b"})
        await client.wait_for_frames(7)
        errors = [(f["type"], f["code"], f["status"]) for f in client.frames]
        self.assertEqual(
            errors,
            [
                ("error", "invalid_body", 400),
                ("error", "body_too_long", 413),
                ("error", "invalid_nick", 400),
                ("error", "unknown_type", 400),
                ("error", "invalid_client_id", 400),
                ("error", "invalid_body", 400),
                ("error", "invalid_nick", 400),
            ],
        )
        self.assertEqual(client.frames[0]["client_id"], "e1")
        client.send_json({"type": "message", "body": "still here"})
        await client.wait_for_seq(1)
        self.assertEqual(client.messages[0]["body"], "still here")

    async def test_binary_frame_closes(self) -> None:
        """
        A binary frame closes the connection with 1003.
        """
        await self.start()
        client = await self.ws("/ws/lobby")
        client.send_raw(b"\x00\x01", binary=True)
        self.assertEqual(await client.closed, 1003)

    async def test_oversized_frame_closes(self) -> None:
        """
        A frame over the limit closes the connection with 1009.
        """
        await self.start()
        client = await self.ws("/ws/lobby")
        client.send_raw(json.dumps({"body": "x" * 70000}).encode())
        self.assertEqual(await client.closed, 1009)
        code, info = await self.http.get_json("/api/rooms/lobby")
        self.assertEqual(info["last_seq"], 0)

    async def test_unknown_room_refused(self) -> None:
        """
        The handshake for an unknown room is refused and nothing is
        created.
        """
        await self.start()
        client = await WSClient.start(self, self.base, "/ws/ghost")
        await client.closed
        self.assertIsNone(client.protocol)
        self.assertIn("404", client.close_reason or "")
        code, rooms = await self.http.get_json("/api/rooms")
        self.assertEqual([r["name"] for r in rooms["rooms"]], ["lobby"])

    async def test_retry_across_transports(self) -> None:
        """
        A message posted over HTTP and resent with the same client_id over
        WebSocket (as a client does after reconnecting) is stored once;
        the WebSocket client sees it exactly once.
        """
        await self.start()
        first = await self.post("lobby", "once", client_id="cid-77")
        client = await self.ws("/ws/lobby?after=0")
        client.send_json({"type": "message", "body": "once", "client_id": "cid-77"})
        await client.sync()
        await self.post("lobby", "next")
        await client.wait_for_seq(2)
        self.assertEqual(client.seqs, [1, 2])
        self.assertEqual(client.messages[0]["seq"], first["seq"])

    async def test_room_counts_clients(self) -> None:
        """
        GET /api/rooms counts connected WebSocket clients.
        """
        await self.start()
        a = await self.ws("/ws/lobby")
        b = await self.ws("/ws/lobby")
        await a.sync()
        await b.sync()
        code, info = await self.http.get_json("/api/rooms/lobby")
        self.assertEqual(info["clients"], 2)
        await a.close()
        await b.sync()
        code, info = await self.http.get_json("/api/rooms/lobby")
        self.assertEqual(info["clients"], 1)
