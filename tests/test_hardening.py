"""
Abuse, slow clients, shutdown, TLS, health and metrics: chatd keeps
serving everyone else, loses nothing, and refuses with documented answers.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, List, Tuple

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.static import Data
from zope.interface import implementer

from chatd._http import ChatSite
from chatd.limits import RateLimiter, parse_rate
from chatd.store._sql import SCHEMA_VERSION
from tests._support import HTTP, ChatdProcess, WSClient, make_certificate, start_chatd


class RateLimiterTests(SynchronousTestCase):
    """
    Token buckets.
    """

    def test_burst_then_rate(self) -> None:
        """
        BURST posts pass at once; then one per 1/RATE seconds.
        """
        clock = Clock()
        limiter = RateLimiter(clock, 3, 2.0)
        self.assertEqual([limiter.take("a") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(limiter.take("a"), 0.5)
        self.assertEqual(limiter.take("b"), 0)
        clock.advance(0.5)
        self.assertEqual(limiter.take("a"), 0)
        self.assertGreater(limiter.take("a"), 0)

    def test_idle_buckets_forgotten(self) -> None:
        """
        Buckets that have refilled are dropped: memory follows active keys.
        """
        clock = Clock()
        limiter = RateLimiter(clock, 2, 1.0)
        for i in range(1000):
            limiter.take(f"k{i}")
        clock.advance(10)
        limiter.take("new")
        self.assertEqual(len(limiter), 1)

    def test_parse(self) -> None:
        """
        --rate-limit takes BURST/PER_SECOND or off.
        """
        self.assertEqual(parse_rate("10/5"), (10, 5.0))
        self.assertEqual(parse_rate("3/0.5"), (3, 0.5))
        self.assertIsNone(parse_rate("off"))
        for bad in ["10", "a/b", "0/5", "5/0", "5/-1", "1/inf"]:
            with self.assertRaises(ValueError):
                parse_rate(bad)


class HeaderDeadlineTests(SynchronousTestCase):
    """
    Slow-loris: a request head that is not complete 10 s after its first
    byte costs its connection, on a connection's first request and on every
    later one.
    """

    def connect(self) -> Tuple[Clock, StringTransport, Any]:
        clock = Clock()
        site = ChatSite(Data(b"ok", "text/plain"), request_timeout=10, timeout=75, reactor=clock)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return clock, transport, channel

    def assertCutAfterTenSeconds(self, clock: Clock, transport: StringTransport, protocol: Any, byte: bytes) -> None:
        """
        A byte a second for 9 s keeps the connection; at 10 s it is cut.
        """
        for _ in range(9):
            protocol.dataReceived(byte)
            clock.advance(1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_dribbling_headers_cut(self) -> None:
        """
        Bytes that never end the head do not keep the connection.
        """
        self.assertCutAfterTenSeconds(*self.connect(), b"X")

    def test_complete_head_kept(self) -> None:
        """
        Once the head is complete the deadline is gone (a long-poll may
        then wait as long as it is allowed).
        """
        clock, transport, protocol = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        protocol.dataReceived(b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 "))
        clock.advance(74)
        self.assertFalse(transport.disconnecting)

    def test_blank_lines_do_not_end_a_head(self) -> None:
        """
        A connection that opens with blank lines and then dribbles is cut
        too: the deadline ends only where twisted.web's parser says the
        head ended.
        """
        clock, transport, protocol = self.connect()
        protocol.dataReceived(b"\n\n")
        self.assertCutAfterTenSeconds(clock, transport, protocol, b"G")

    def test_second_head_has_a_deadline(self) -> None:
        """
        A kept-alive connection's next request gets the same deadline,
        counted from its first byte (idle time before it is the idle
        timeout's business).
        """
        clock, transport, protocol = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.assertCutAfterTenSeconds(clock, transport, protocol, b"G")

    def test_dribbled_body_cut(self) -> None:
        """
        The deadline covers the body too: a complete head, then a body a
        byte a second, is cut 10 s after the request's first byte.
        """
        clock, transport, protocol = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        self.assertCutAfterTenSeconds(clock, transport, protocol, b"x")

    def test_body_in_time_kept(self) -> None:
        """
        A body that comes in time ends the deadline: the answer is written
        and the connection kept.
        """
        clock, transport, protocol = self.connect()
        protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.assertIn(b"HTTP/1.1 ", transport.value())


class ChatdCase(TestCase):
    timeout = 60

    async def start(self, *args: str) -> None:
        self.service, self.base = await start_chatd(self, "--store", "memory:", *args)
        self.http = HTTP(self, self.base)

    async def ws(self, path: str, source: str = "127.0.0.1") -> WSClient:
        """
        A WebSocket client; C{source} picks its loopback address, i.e. the
        IP the server sees.
        """
        return await WSClient.connect(self, self.base, path, source=source)

    async def origin_accepted(self, origin: str) -> bool:
        client = await WSClient.start(self, self.base, "/ws/lobby", origin=origin)
        return await client.opened is not None


class RateLimitTests(ChatdCase):
    """
    --rate-limit BURST/PER_SECOND.
    """

    async def test_http_post_429(self) -> None:
        """
        Past the burst a POST gets 429 with Retry-After and a JSON error,
        and nothing is stored.
        """
        await self.start("--rate-limit", "3/0.5")
        for i in range(3):
            code, _ = await self.http.post_json("/api/rooms/lobby/messages", {"body": f"m{i}"})
            self.assertEqual(code, 201)
        code, headers, body = await self.http.request(
            "POST",
            "/api/rooms/lobby/messages",
            data=b'{"body": "too many"}',
            headers={"Content-Type": ["application/json"]},
        )
        self.assertEqual(code, 429)
        self.assertEqual(json.loads(body)["error"], "rate_limited")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["2"])
        code, info = await self.http.get_json("/api/rooms/lobby")
        self.assertEqual(info["last_seq"], 3)

    async def test_flooder_closed_others_unaffected(self) -> None:
        """
        One WebSocket floods while ten others (other IPs) chat: the flooder
        gets error frames, then is closed with 1008; everyone else's
        messages all arrive.
        """
        await self.start("--rate-limit", "10/5")
        flooder = await self.ws("/ws/lobby", source="127.0.0.2")
        others = [await self.ws("/ws/lobby", source=f"127.0.1.{i}") for i in range(1, 11)]
        for i in range(200):
            flooder.send_json({"body": f"flood {i}"})
        for round_ in range(3):
            for n, client in enumerate(others):
                client.send_json({"body": f"client {n} round {round_}"})
        code = await flooder.closed
        self.assertEqual(code, 1008)
        errors = [f for f in flooder.frames if f["type"] == "error"]
        self.assertGreaterEqual(len(errors), 20)
        self.assertEqual(errors[0]["code"], "rate_limited")
        self.assertGreater(errors[0]["retry_after"], 0)
        flood_count = sum(1 for f in flooder.messages if f["body"].startswith("flood"))
        self.assertLessEqual(flood_count, 11)
        for client in others:
            await client.wait_for(
                lambda c=client: sum(1 for m in c.messages if m["body"].startswith("client")) == 30
            )
        bodies = [m["body"] for m in others[0].messages if m["body"].startswith("client")]
        self.assertEqual(len(set(bodies)), 30)


class CapTests(ChatdCase):
    """
    Connection, room and size caps.
    """

    async def test_connections_per_ip(self) -> None:
        """
        Past --max-connections-per-ip, WebSockets are refused (503) and
        long-polls get a JSON 503 with Retry-After; other IPs still connect.
        """
        await self.start("--max-connections-per-ip", "2")
        first = await self.ws("/ws/lobby")
        await self.ws("/ws/lobby")
        refused = await WSClient.start(self, self.base, "/ws/lobby")
        await refused.closed
        self.assertIn("503", refused.close_reason or "")
        code, headers, body = await self.http.request("GET", "/api/rooms/lobby/messages?timeout=1")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["error"], "too_many_connections")
        self.assertEqual(headers.getRawHeaders("retry-after"), ["5"])
        await self.ws("/ws/lobby", source="127.0.0.3")
        await first.close()
        await self.ws("/ws/lobby")

    async def test_total_connections(self) -> None:
        """
        Past --max-connections the server is full for everyone.
        """
        await self.start("--max-connections", "2")
        await self.ws("/ws/lobby", source="127.0.0.4")
        await self.ws("/ws/lobby", source="127.0.0.5")
        code, _, body = await self.http.request("GET", "/api/rooms/lobby/messages?timeout=1")
        self.assertEqual((code, json.loads(body)["error"]), (503, "server_full"))

    async def test_rooms(self) -> None:
        """
        --rooms-per-hour limits one IP (429); --max-rooms all (403).
        """
        await self.start("--rooms-per-hour", "2", "--max-rooms", "4")
        for name in ("a", "b"):
            code, _ = await self.http.post_json("/api/rooms", {"name": name})
            self.assertEqual(code, 201)
        code, answer = await self.http.post_json("/api/rooms", {"name": "c"})
        self.assertEqual((code, answer["error"]), (429, "rate_limited"))
        await self.service.core.create_room("c")
        code, answer = await self.http.post_json("/api/rooms", {"name": "d"})
        self.assertEqual((code, answer["error"]), (403, "too_many_rooms"))

    async def test_max_message(self) -> None:
        """
        --max-message sets the longest body: 413 over HTTP, an error frame
        over WebSocket.
        """
        await self.start("--max-message", "10")
        code, answer = await self.http.post_json("/api/rooms/lobby/messages", {"body": "x" * 11})
        self.assertEqual((code, answer["error"]), (413, "body_too_long"))
        client = await self.ws("/ws/lobby")
        client.send_json({"body": "y" * 11})
        await client.wait_for_frames(1)
        self.assertEqual(client.frames[0]["code"], "body_too_long")


class OriginTests(ChatdCase):
    """
    Cross-site WebSocket hijacking is refused.
    """

    async def refused(self, origin: str) -> None:
        code, _, body = await self.http.request(
            "GET",
            "/ws/lobby",
            headers={
                "Origin": [origin],
                "Upgrade": ["websocket"],
                "Connection": ["Upgrade"],
                "Sec-WebSocket-Version": ["13"],
                "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="],
            },
        )
        self.assertEqual((code, json.loads(body)["error"]), (403, "origin_not_allowed"))

    async def test_other_origin_refused(self) -> None:
        """
        A page from another site gets 403; this site's own pages and
        --allow-origin ones are let in, and so are clients sending no Origin.
        """
        await self.start("--allow-origin", "https://chat.example.org")
        await self.refused("https://evil.example")
        await self.refused("null")
        await self.refused(self.base + ".evil.example")
        self.assertTrue(await self.origin_accepted(self.base))
        self.assertTrue(await self.origin_accepted("https://chat.example.org"))
        self.assertTrue(await self.origin_accepted(None))


class SlowConsumerTests(ChatdCase):
    """
    A client that stops reading cannot make the server buffer without
    bound.
    """

    async def test_stalled_reader_dropped(self) -> None:
        """
        A WebSocket that never reads is dropped once 1 MiB waits for it;
        a normal client gets every message.
        """
        await self.start()
        port = int(self.base.rsplit(":", 1)[1])
        stalled = StalledClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stalled)
        await stalled.upgraded
        reader = await self.ws("/ws/lobby")
        body = "x" * 4000
        sends = []
        for i in range(2000):
            sends.append(ensureDeferred(self.http.post_json("/api/rooms/lobby/messages", {"body": f"{i} {body}"})))
            if len(sends) >= 50:
                await DeferredList(sends, fireOnOneErrback=True)
                sends = []
        await DeferredList(sends, fireOnOneErrback=True)
        await reader.wait_for_seq(2000)
        self.assertEqual(reader.seqs, list(range(1, 2001)))
        # Every message has been fanned out, so the stalled one is gone.
        _, _, metrics = await self.http.request("GET", "/metrics")
        self.assertIn(b'chatd_rejected_total{reason="slow_consumer"} 1.0', metrics)
        self.assertEqual(self.service.core.room("lobby").clients, 1)
        # Reading again, the client finds the connection closed (1008,
        # behind the data it had not read).
        stalled.transport.resumeProducing()
        await stalled.lost
        self.assertEqual(len(self.service.websockets.connections), 1)


class StalledClient(Protocol):
    """
    Completes the WebSocket handshake, then never reads again.
    """

    def __init__(self) -> None:
        self.upgraded: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        # A small, fixed receive buffer (no autotuning up to tens of MB), so
        # that what the server sends backs up into its own buffers soon.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.transport.write(
            b"GET /ws/lobby HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        if not self.upgraded.called and b"101" in data:
            self.transport.pauseProducing()  # stop reading: the kernel buffers fill up
            self.upgraded.callback(None)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class HealthTests(ChatdCase):
    """
    /healthz, /readyz, /metrics.
    """

    async def test_health_and_metrics(self) -> None:
        """
        Liveness and readiness answer 200; metrics are Prometheus text with
        connections, messages, rejections, waiters and latencies.
        """
        await self.start("--rate-limit", "1/0.1")
        self.assertEqual(await self.http.get_json("/healthz"), (200, {"status": "ok"}))
        self.assertEqual(await self.http.get_json("/readyz"), (200, {"status": "ready"}))
        client = await self.ws("/ws/lobby")
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "one"})
        await self.http.post_json("/api/rooms/lobby/messages", {"body": "two"})
        await client.wait_for_seq(1)
        code, headers, body = await self.http.request("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertIn("text/plain", headers.getRawHeaders("content-type")[0])
        text = body.decode()
        for line in [
            'chatd_connections{transport="websocket"} 1.0',
            'chatd_messages_posted_total{transport="http"} 1.0',
            'chatd_messages_delivered_total{transport="websocket"} 1.0',
            'chatd_rejected_total{reason="rate_limited"} 1.0',
            "chatd_longpoll_waiters 0.0",
            "chatd_delivery_latency_seconds_count 1.0",
            "chatd_store_commit_seconds_count 1.0",
        ]:
            self.assertIn(line, text)

    async def test_metrics_port(self) -> None:
        """
        With --metrics-port, /metrics moves there.
        """
        await self.start("--metrics-port", "tcp:0:interface=127.0.0.1")
        code, _, _ = await self.http.request("GET", "/metrics")
        self.assertEqual(code, 404)
        port = self.service.ports[1].getHost().port
        other = HTTP(self, f"http://127.0.0.1:{port}")
        code, _, body = await other.request("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"chatd_connections", body)

    async def test_not_ready_when_store_fails(self) -> None:
        """
        /readyz is 503 when the store does not answer.
        """
        await self.start()

        def broken() -> Deferred:
            d: Deferred = Deferred()
            d.errback(RuntimeError("disk on fire"))
            return d

        self.service.store.ping = broken  # type: ignore[method-assign]
        code, answer = await self.http.get_json("/readyz")
        self.assertEqual(code, 503)
        self.assertIn("disk on fire", answer["detail"])


class ShutdownTests(TestCase):
    """
    SIGTERM during traffic against a real twistd process.
    """

    timeout = 60

    async def test_sigterm_exit_status_on_every_store(self) -> None:
        """
        SIGTERM ends chatd with status 0 on the memory store (whose start
        finishes before the reactor runs) as on the default store.
        """
        for args in (["--store", "memory:"], ["--data-dir", os.path.abspath(self.mktemp())]):
            if args[0] == "--data-dir":
                os.makedirs(args[1])
            process = await ChatdProcess.start(self, *args)
            await process.stop("TERM")
            self.assertEqual((process.exit_code, process.signal), (0, None), process.output)

    async def test_sigterm_during_traffic(self) -> None:
        """
        WebSockets get 1001, a waiting long-poll an empty answer, the
        process exits 0, and every acknowledged message is in the store.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        process = await ChatdProcess.start(self, "--data-dir", folder, "--room", "quiet")
        http = HTTP(self, process.base)
        watchers = [await WSClient.connect(self, process.base, "/ws/lobby") for _ in range(3)]
        waiting = ensureDeferred(http.get_json("/api/rooms/quiet/messages?timeout=60"))
        acked: List[Tuple[int, str]] = []

        async def poster(n: int) -> None:
            for i in range(1000):
                try:
                    code, answer = await http.post_json("/api/rooms/lobby/messages", {"body": f"{n}-{i}"})
                except Exception:
                    return
                if code != 201:
                    return
                acked.append((answer["seq"], answer["body"]))
                if len(acked) == 50:
                    process.transport.signalProcess("TERM")

        await DeferredList([ensureDeferred(poster(n)) for n in range(3)])
        await process.ended
        self.assertEqual((process.exit_code, process.signal), (0, None), process.output)
        for watcher in watchers:
            self.assertEqual(await watcher.closed, 1001)
        code, batch = await waiting
        self.assertEqual((code, batch["messages"]), (200, []))
        self.assertIn(b"Shut down: answered", process.output)

        process = await ChatdProcess.start(self, "--data-dir", folder)
        http = HTTP(self, process.base)
        code, batch = await http.get_json("/api/rooms/lobby/messages?after=0&limit=1000")
        stored = {m["seq"]: m["body"] for m in batch["messages"]}
        for seq, body in acked:
            self.assertEqual(stored.get(seq), body)


class TLSTests(TestCase):
    """
    chatd over ssl:, with a certificate made for the test.
    """

    timeout = 20

    async def test_wss_chat(self) -> None:
        """
        A wss:// client chats through an ssl: endpoint.
        """
        key, cert = await make_certificate(self)
        service, _ = await start_chatd(
            self, "--store", "memory:", "--port",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        port = service.ports[0].getHost().port
        from twisted.internet import ssl

        with open(cert) as f:
            authority = ssl.Certificate.loadPEM(f.read())
        context = ssl.optionsForClientTLS("localhost", trustRoot=authority)
        received: Deferred = Deferred()
        closed: Deferred = Deferred()

        class Client(WebSocketClientProtocol):
            def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
                closed.callback(code)

            def onOpen(self) -> None:
                self.sendMessage(b'{"body": "over TLS"}')

            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                if not received.called:
                    received.callback(json.loads(payload))
                    self.sendClose(1000)

        factory = WebSocketClientFactory(f"wss://localhost:{port}/ws/lobby")
        factory.protocol = Client
        from twisted.internet.endpoints import SSL4ClientEndpoint

        await SSL4ClientEndpoint(reactor, "127.0.0.1", port, context).connect(factory)
        frame = await received
        self.assertEqual((frame["seq"], frame["body"]), (1, "over TLS"))
        self.assertEqual(await closed, 1000)

    async def test_clients_that_offer_alpn(self) -> None:
        """
        Clients that offer ALPN (h2 and http/1.1, as curl and browsers do)
        negotiate http/1.1 and are answered: curl, and a Twisted client
        that reports what was negotiated.
        """
        key, cert = await make_certificate(self)
        service, _ = await start_chatd(
            self, "--store", "memory:", "--port",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        port = service.ports[0].getHost().port
        out, err, code = await getProcessOutputAndValue(
            "curl",
            ["-sS", "--cacert", cert, "-w", "\n%{http_version}",
             f"https://localhost:{port}/api/rooms", "--resolve", f"localhost:{port}:127.0.0.1"],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        body, version = out.rsplit(b"\n", 1)
        self.assertEqual(version, b"1.1")
        self.assertEqual(json.loads(body)["rooms"][0]["name"], "lobby")

        from twisted.internet import ssl
        from twisted.internet.endpoints import SSL4ClientEndpoint

        with open(cert) as f:
            authority = ssl.Certificate.loadPEM(f.read())
        context = ssl.optionsForClientTLS(
            "localhost", trustRoot=authority, acceptableProtocols=[b"h2", b"http/1.1"]
        )
        answered: Deferred = Deferred()

        @implementer(IHandshakeListener)
        class Get(Protocol):
            data = b""

            def connectionMade(self) -> None:
                self.transport.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                self.data += data

            def connectionLost(self, reason: Any = None) -> None:
                answered.callback((self.negotiated, self.data))

            def handshakeCompleted(self) -> None:
                self.negotiated = self.transport.negotiatedProtocol

        client = Get()
        client.negotiated = None
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, context), client)
        negotiated, data = await answered
        self.assertEqual(negotiated, b"http/1.1")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK"), data)


class MultipartTests(ChatdCase):
    """
    chatd's Site leaves request bodies to chatd.
    """

    async def test_malformed_multipart(self) -> None:
        """
        A malformed multipart body gets chatd's JSON 415, not twisted.web's
        bare 400, and the connection is not dropped mid-answer.
        """
        await self.start()
        for body in [b"\x00", b"--x\r\n", b"\xff" * 100]:
            code, headers, content = await self.http.request(
                "POST",
                "/api/rooms/lobby/messages",
                data=body,
                headers={"Content-Type": ["multipart/form-data; boundary=x"]},
            )
            self.assertEqual((code, json.loads(content)["error"]), (415, "unsupported_media_type"))


class StartupLogTests(TestCase):
    """
    What chatd says when it starts.
    """

    timeout = 30

    async def test_version_store_and_addresses(self) -> None:
        """
        One line each: chatd's version, the store in use, and every
        address it listens on.
        """
        from chatd import __version__

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        process = await ChatdProcess.start(
            self, "--data-dir", folder, "--metrics-port", "tcp:0:interface=127.0.0.1"
        )
        await process.stop("TERM")  # (and so all it said is in)
        output = process.output.decode()
        self.assertEqual(output.count(f"chatd {__version__} starting"), 1, output)
        store = os.path.join(folder, "chatd.sqlite3")
        self.assertEqual(output.count(f"Store: sqlite:{store} (schema v{SCHEMA_VERSION})"), 1, output)
        self.assertEqual(output.count("chatd listening on 127.0.0.1:"), 2, output)


class LoggingTests(TestCase):
    """
    --log-format json, and what is logged.
    """

    timeout = 60

    async def test_json_logs(self) -> None:
        """
        With --log-format json every log line is one JSON object, with
        connection and rejection events among them.
        """
        process = await ChatdProcess.start(
            self, "--store", "memory:", "--log-format", "json", "--rate-limit", "1/0.1"
        )
        http = HTTP(self, process.base)
        client = await WSClient.connect(self, process.base, "/ws/lobby")
        await http.post_json("/api/rooms/lobby/messages", {"body": "one"})
        code, _ = await http.post_json("/api/rooms/lobby/messages", {"body": "two"})
        self.assertEqual(code, 429)
        await client.close()
        await process.stop("TERM")
        events = [json.loads(line) for line in process.output.decode().splitlines() if line.strip()]
        formats = [e.get("log_format", "") for e in events]
        self.assertIn("chatd listening on {address}", formats)
        self.assertIn("WebSocket open: {ip} in {room}", formats)
        self.assertIn("WebSocket closed: {ip} in {room} (code {code})", formats)
        rejected = [e for e in events if e.get("log_format", "").startswith("Refused")]
        self.assertEqual(rejected[0]["reason"], "rate_limited")
        # No access log unless asked for.
        self.assertFalse([e for e in events if '"POST /api' in str(e.get("log_io", ""))])

    async def test_access_log(self) -> None:
        """
        --access-log on logs every request, a line each, long-polls too.
        """
        process = await ChatdProcess.start(self, "--store", "memory:", "--access-log", "on")
        http = HTTP(self, process.base)
        code, _, _ = await http.request("GET", "/api/rooms/lobby/messages?after=0&timeout=0")
        self.assertEqual(code, 200)
        await http.post_json("/api/rooms/lobby/messages", {"body": "one"})
        await process.stop("TERM")
        output = process.output.decode()
        self.assertIn('"GET /api/rooms/lobby/messages?after=0&timeout=0 HTTP/1.1" 200', output)
        self.assertIn('"POST /api/rooms/lobby/messages HTTP/1.1" 201', output)


class FaultIsolationTests(ChatdCase):
    """
    A bug while handling one request or frame costs only that request.
    """

    async def test_exception_in_handler(self) -> None:
        """
        An unexpected exception is logged, answered with a JSON 500 (an
        error frame on WebSocket), and everything else keeps working.
        """
        await self.start()
        client = await self.ws("/ws/lobby")
        core = self.service.core
        real_post = core.post

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("bug")

        core.post = broken  # type: ignore[method-assign]
        code, answer = await self.http.post_json("/api/rooms/lobby/messages", {"body": "x"})
        self.assertEqual((code, answer["error"]), (500, "internal_error"))
        self.assertNotIn("bug", answer["detail"])
        client.send_json({"body": "x"})
        await client.wait_for_frames(1)
        self.assertEqual((client.frames[0]["type"], client.frames[0]["status"]), ("error", 500))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        core.post = real_post  # type: ignore[method-assign]
        client.send_json({"body": "works again"})
        await client.wait_for_seq(1)
