"""
The Server-Sent Events transport over real sockets: history then live
events with their seqs as ids, resume by Last-Event-ID exactly once,
resets, bounded streams and heartbeats, private rooms, revocation and
sign-out, bad cursors, and a client that never reads.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Dict, List, Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from chatd import sse

from ._support import HTTP, start_chatd
from .test_access import Browser, _server


class EventClient:
    """
    An event-stream reader: the events (C{id}, C{event}, C{data}) and
    comments it has read, and a way to wait for the ones a test expects.
    """

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.comments: List[str] = []
        self.retry: Optional[int] = None
        self.ended: Deferred = Deferred()
        self.status: Optional[int] = None
        self.headers: Any = None
        self._buffer = b""
        self._waiting: List[Any] = []
        self._response: Any = None

    @classmethod
    async def open(
        cls, test: TestCase, url: str, headers: Optional[Dict[str, str]] = None
    ) -> "EventClient":
        client = cls()
        pool = HTTPConnectionPool(reactor, persistent=False)
        test.addCleanup(pool.closeCachedConnections)
        response = await treq.get(
            url, headers={k: [v] for k, v in (headers or {}).items()}, pool=pool, unbuffered=True
        )
        client.status, client.headers, client._response = response.code, response.headers, response
        if response.code != 200:
            client.body = await response.content()
            return client
        client._body = _Body(client)
        # IResponse.deliverBody: the body protocol's transport can stop it.
        response.deliverBody(client._body)
        test.addCleanup(client.close)
        return client

    def close(self) -> None:
        """
        Hang up (as a browser closing its tab does).
        """
        body = getattr(self, "_body", None)
        if body is not None and body.transport is not None and not self.ended.called:
            body.transport.stopProducing()

    def _data(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            event: Dict[str, Any] = {}
            for line in block.decode("utf-8").split("\n"):
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "":
                    self.comments.append(value)
                elif field == "retry":
                    self.retry = int(value)
                else:
                    event[field] = value
            if "data" in event:
                event["json"] = json.loads(event["data"])
                self.events.append(event)
        still = []
        for predicate, d in self._waiting:
            if predicate():
                d.callback(None)
            else:
                still.append((predicate, d))
        self._waiting = still

    def wait_for(self, predicate: Any) -> Deferred:
        if predicate():
            return Deferred.fromCoroutine(_none())
        d: Deferred = Deferred()
        self._waiting.append((predicate, d))
        return d

    def wait_for_ids(self, count: int) -> Deferred:
        return self.wait_for(lambda: len(self.ids) >= count)

    @property
    def ids(self) -> List[int]:
        return [int(e["id"]) for e in self.events if "id" in e and e.get("event") is None]


async def _none() -> None:
    return None


class EventStreamTests(TestCase):
    """
    /api/rooms/<room>/events on the default server.
    """

    async def setUp(self) -> None:
        self.service, self.base = await start_chatd(self)
        self.http = HTTP(self, self.base)

    async def post(self, body: str) -> Dict[str, Any]:
        code, message = await self.http.post_json("/api/rooms/lobby/messages", {"body": body})
        self.assertEqual(code, 201)
        return message

    async def test_history_then_live(self) -> None:
        """
        The stream says how long to wait before reconnecting, sends the
        messages after the cursor with their seqs as ids, then each new
        one as it is stored, exactly as the other transports carry it.
        """
        first = await self.post("one")
        await self.post("two")
        stream = await EventClient.open(self, self.base + "/api/rooms/lobby/events?after=0")
        self.assertEqual(stream.status, 200)
        self.assertEqual(
            stream.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"]
        )
        self.assertEqual(stream.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        await stream.wait_for_ids(2)
        self.assertEqual(stream.retry, sse.RETRY_MS)
        third = await self.post("three")
        await stream.wait_for_ids(3)
        self.assertEqual(stream.ids, [1, 2, 3])
        self.assertEqual(stream.events[0]["json"], first)
        self.assertEqual(stream.events[2]["json"], third)

    async def test_resume_with_last_event_id(self) -> None:
        """
        A reconnecting EventSource sends Last-Event-ID: it gets what came
        after, exactly once, whatever its URL's ?after= says.
        """
        for body in ("a", "b", "c"):
            await self.post(body)
        stream = await EventClient.open(self, self.base + "/api/rooms/lobby/events?after=0")
        await stream.wait_for_ids(3)
        stream.close()
        for body in ("d", "e"):
            await self.post(body)
        again = await EventClient.open(
            self, self.base + "/api/rooms/lobby/events?after=0", {"Last-Event-ID": "3"}
        )
        await again.wait_for_ids(2)
        await self.post("f")
        await again.wait_for_ids(3)
        self.assertEqual(again.ids, [4, 5, 6])

    async def test_bounded_streams_and_heartbeats(self) -> None:
        """
        A quiet stream gets heartbeat comments, and every stream ends
        after its time (the client resumes from its last id).
        """
        self.patch(sse, "HEARTBEAT", 0.05)
        self.patch(sse, "MAX_STREAM_SECONDS", 0.3)
        stream = await EventClient.open(self, self.base + "/api/rooms/lobby/events")
        await stream.ended
        self.assertIn("heartbeat", stream.comments)
        self.assertEqual(self.service.web.end_streams(), 0)

    async def test_bad_cursors(self) -> None:
        """
        A cursor that is no seq is a 400 with the error model.
        """
        for headers, query in [({"Last-Event-ID": "x"}, ""), ({}, "?after=-1"), ({"Last-Event-ID": "9" * 40}, "")]:
            stream = await EventClient.open(self, self.base + "/api/rooms/lobby/events" + query, headers)
            self.assertEqual(stream.status, 400)
            self.assertEqual(json.loads(stream.body)["error"], "invalid_parameter")
        stream = await EventClient.open(self, self.base + "/api/rooms/nowhere/events")
        self.assertEqual(stream.status, 404)

    async def test_client_that_never_reads(self) -> None:
        """
        A client that stops reading is dropped once its backlog passes
        the bound; the others go on receiving.
        """
        self.patch(sse, "SLOW_CONSUMER_LIMIT", 64 * 1024)
        self.patch(sse, "MAX_STREAM_BYTES", 64 * 1024 * 1024)
        port = int(self.base.rsplit(":", 1)[1])
        silent = _Silent()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), silent)
        self.addCleanup(silent.transport.loseConnection)
        await silent.got_head
        reader = await EventClient.open(self, self.base + "/api/rooms/lobby/events")
        body = "x" * 4000
        dropped = b'chatd_rejected_total{reason="slow_consumer"} 1.0'
        for i in range(2000):
            await self.post(body)
            if i % 50 == 49:
                _, _, metrics = await self.http.request("GET", "/metrics")
                if dropped in metrics:
                    break
        self.assertIn(dropped, metrics)
        self.assertIn(b'chatd_connections{transport="sse"} 1.0', metrics)
        await reader.wait_for_ids(i + 1)
        self.assertEqual(reader.ids, list(range(1, i + 2)))
        # Reading again, it finds its connection gone.
        silent.transport.resumeProducing()
        await silent.lost


class _Body(Protocol):
    """
    Hands a response's body to its L{EventClient} as it arrives.
    """

    def __init__(self, client: EventClient) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client._data(data)

    def connectionLost(self, reason: Any) -> None:
        if not self.client.ended.called:
            self.client.ended.callback(None)


class _Silent(Protocol):
    """
    Reads an event stream's head, then nothing more.
    """

    def __init__(self) -> None:
        self.got_head: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        # A small, fixed receive window (no autotuning up to tens of MB),
        # so that what the server sends backs up into its own buffers soon.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(b"GET /api/rooms/lobby/events HTTP/1.1\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if not self.got_head.called:
            self.transport.pauseProducing()  # stop reading
            self.got_head.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class PrivateEventStreamTests(TestCase):
    """
    Event streams of a private room.
    """

    async def setUp(self) -> None:
        self.service, self.base = await _server(self, "--auth", "accounts")
        self.alice, self.bob = Browser(self, self.base), Browser(self, self.base)
        await self.alice.sign_up("alice", "Alice")
        await self.bob.sign_up("bob", "Bob")
        await self.alice.json("POST", "/api/rooms", {"name": "secret", "private": True})
        await self.alice.json("POST", "/api/rooms/secret/messages", {"body": "the vault"})

    def cookie(self, browser: Browser) -> Dict[str, str]:
        return {"Cookie": f"chatd_session={browser.cookie}"}

    async def test_not_found_then_revoked(self) -> None:
        """
        A non-member's stream is a 404; a member's gets the room's events,
        and once removed, the event of it, then "revoked", and the end.
        """
        stream = await EventClient.open(self, self.base + "/api/rooms/secret/events?after=0", self.cookie(self.bob))
        self.assertEqual(stream.status, 404)
        self.assertNotIn(b"vault", stream.body)
        await self.alice.json("POST", "/api/rooms/secret/members", {"user": "bob"})
        stream = await EventClient.open(self, self.base + "/api/rooms/secret/events?after=0", self.cookie(self.bob))
        await stream.wait_for_ids(2)
        self.assertEqual([e["json"]["type"] for e in stream.events], ["message", "member"])
        await self.alice.json("DELETE", "/api/rooms/secret/members/bob")
        await stream.ended
        self.assertEqual([e.get("event") for e in stream.events][-2:], [None, "revoked"])
        self.assertEqual(stream.events[-2]["json"]["role"], None)

    async def test_sign_out_ends_the_stream(self) -> None:
        """
        Signing out ends the streams the session opened.
        """
        stream = await EventClient.open(self, self.base + "/api/rooms/secret/events", self.cookie(self.alice))
        await deferLater(reactor, 0, lambda: None)
        code, _ = await self.alice.json("POST", "/account/signout")
        self.assertEqual(code, 200)
        await stream.ended
        again = await EventClient.open(self, self.base + "/api/rooms/secret/events", self.cookie(self.alice))
        self.assertEqual(again.status, 404)
