"""
Hostile clients against a real chatd process (C{twistd -n chatd}, on
loopback): each test runs one kind of abuse while L{Watch} samples the
server's memory and descriptors and the latency of C{/healthz} asked from
another IP, and asserts the bounds docs/operations.md states; the room's
messages are the same after as before.

The hostile clients write raw bytes (HTTP requests, WebSocket frames) on
purpose: they are what a probe with raw sockets sends.
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import struct
import time
from typing import Any, List, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests._support import HTTP, ChatdProcess, rss_kib

#: The loopback address the "other client" speaks from (the hostile
#: client uses 127.0.0.1).
OTHER_IP = "127.0.0.2"


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Raw(Protocol):
    """
    A client that writes what it is told and keeps what it is sent; it
    may stop reading.
    """

    def __init__(self, reading: bool = True) -> None:
        self.reading = reading
        self.received = b""
        self.lost: Deferred = Deferred()
        self.made: Deferred = Deferred()
        self._wanted: List[Tuple[bytes, Deferred]] = []

    def connectionMade(self) -> None:
        if not self.reading:
            self.transport.pauseProducing()
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for wanted in list(self._wanted):
            marker, d = wanted
            if marker in self.received:
                self._wanted.remove(wanted)
                d.callback(self.received)

    def until(self, marker: bytes) -> Deferred:
        """
        Fires with all received so far once C{marker} has been received.
        """
        d: Deferred = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self._wanted.append((marker, d))
        return d

    def connectionLost(self, reason: Any = None) -> None:
        if not self.lost.called:
            self.lost.callback(self.received)

    @property
    def closed(self) -> bool:
        return self.lost.called


async def raw(
    test: TestCase, process: ChatdProcess, reading: bool = True, source: str = "127.0.0.1"
) -> Raw:
    """
    Connect a L{Raw} client to C{process} from loopback address C{source}.
    """
    client = Raw(reading)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", process.port, bindAddress=(source, 0))
    await connectProtocol(endpoint, client)

    def close() -> Any:
        if not client.closed:
            client.transport.abortConnection()
            return client.lost

    test.addCleanup(close)
    return client


def request(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def post_head(*headers: str) -> bytes:
    """
    The head of a JSON POST of a message to the lobby.
    """
    return request("/api/rooms/lobby/messages", "Content-Type: application/json", *headers, method="POST")


def ws_handshake(path: str = "/ws/lobby") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    return request(
        path,
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    )


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """
    A masked client frame (RFC 6455 section 5.2).
    """
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def server_frames(data: bytes) -> List[Tuple[int, bytes]]:
    """
    The (opcode, payload) of each complete unmasked server frame in
    C{data}, after the handshake's head.
    """
    data = data.split(b"\r\n\r\n", 1)[1]
    frames = []
    while len(data) >= 2:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        at = 2
        if size == 126:
            (size,) = struct.unpack("!H", data[2:4])
            at = 4
        elif size == 127:
            (size,) = struct.unpack("!Q", data[2:10])
            at = 10
        if len(data) < at + size:
            break
        frames.append((opcode, data[at : at + size]))
        data = data[at + size :]
    return frames


class Watch:
    """
    Samples the server's RSS and open descriptors, and the latency of
    C{/healthz} from L{OTHER_IP}, every 50 ms until stopped.
    """

    def __init__(self, test: TestCase, process: ChatdProcess) -> None:
        self._pid = process.transport.pid
        self._base = process.base
        self._test = test
        self.rss_before = rss_kib(self._pid)
        self.descriptors_before = _descriptors(self._pid)
        self.rss_peak = self.rss_before
        self.descriptors_peak = self.descriptors_before
        self.latencies: List[float] = []
        self.failures: List[str] = []
        self._running = True
        self.done = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        from treq import get
        from twisted.web.client import Agent

        agent = Agent.usingEndpointFactory(reactor, _FromOther())
        while self._running:
            started = time.monotonic()
            try:
                response = await get(self._base + "/healthz", agent=agent)
                await response.content()
                if response.code != 200:
                    self.failures.append(f"/healthz answered {response.code}")
            except Exception as e:
                self.failures.append(f"/healthz failed: {e!r}")
            self.latencies.append(time.monotonic() - started)
            self.rss_peak = max(self.rss_peak, rss_kib(self._pid))
            self.descriptors_peak = max(self.descriptors_peak, _descriptors(self._pid))
            await deferLater(reactor, 0.05, lambda: None)

    async def stop(
        self, rss_kib: int = 16 * 1024, descriptors: int = 16, median: float = 0.1, worst: float = 1.0
    ) -> None:
        """
        Stop sampling and assert: RSS grew by less than C{rss_kib}, open
        descriptors by less than C{descriptors}, and /healthz from another
        IP always answered 200, with a median under C{median} and none over
        C{worst} seconds.
        """
        self._running = False
        await self.done
        test = self._test
        test.assertEqual(self.failures, [])
        test.assertGreater(len(self.latencies), 0)
        grew = self.rss_peak - self.rss_before
        test.assertLess(grew, rss_kib, f"RSS grew by {grew} KiB")
        more = self.descriptors_peak - self.descriptors_before
        test.assertLess(more, descriptors, f"{more} more descriptors open")
        test.assertLess(statistics.median(self.latencies), median, self.latencies)
        test.assertLess(max(self.latencies), worst, self.latencies)


class _FromOther:
    """
    An endpoint factory for treq's Agent: connections from L{OTHER_IP}.
    """

    def endpointForURI(self, uri: Any) -> Any:
        return TCP4ClientEndpoint(reactor, uri.host, uri.port, bindAddress=(OTHER_IP, 0))


class HostileCase(TestCase):
    timeout = 120

    async def start(self, *args: str, prefix: Tuple[str, ...] = ()) -> ChatdProcess:
        self.process = await ChatdProcess.start(self, "--store", "memory:", *args, prefix=prefix)
        self.http = HTTP(self, self.process.base)
        return self.process

    async def messages(self) -> List[Any]:
        code, answer = await self.http.get_json("/api/rooms/lobby/messages?after=0&timeout=0&limit=1000")
        self.assertEqual(code, 200)
        return answer["messages"]

    async def post(self, count: int, size: int = 10) -> None:
        for i in range(count):
            code, _ = await self.http.post_json(
                "/api/rooms/lobby/messages", {"body": f"{i:05d}" + "x" * (size - 5)}
            )
            self.assertEqual(code, 201)

    def assertNoUnhandledErrors(self) -> None:
        self.assertNotIn(b"Unhandled Error", self.process.output)
        self.assertNotIn(b"Traceback", self.process.output)


class PipelinedAnswersTests(HostileCase):
    """
    1. Pipelined long-polls whose answers are large, to a client that
    reads almost nothing.
    """

    async def test_bounded_queue_per_connection(self) -> None:
        """
        2,000 pipelined C{?after=0&limit=1000} GETs in a room of 1 MiB of
        messages: the server reads no further while an answer waits, its
        memory grows by less than 16 MiB, others are served; once the
        client reads, every answer comes.
        """
        process = await self.start()
        await self.post(260, size=4000)
        before = await self.messages()
        count = 2000
        watch = Watch(self, process)
        client = await raw(self, process, reading=False)
        client.transport.write(request("/api/rooms/lobby/messages?after=0&limit=1000&timeout=0") * count)
        await deferLater(reactor, 2.0, lambda: None)
        await watch.stop()
        client.transport.resumeProducing()
        while client.received.count(b"HTTP/1.1 200 OK") < 5:
            await deferLater(reactor, 0.05, lambda: None)
        client.transport.abortConnection()
        self.assertEqual(await self.messages(), before)
        self.assertNoUnhandledErrors()


class WebSocketNonReaderTests(HostileCase):
    """
    2. A WebSocket client that never reads, sending frames that are
    answered (pings with large ids, frames of unknown types).
    """

    async def _flood(self, frame: bytes, count: int) -> Raw:
        process = await self.start()
        await self.post(3)
        before = await self.messages()
        watch = Watch(self, process)
        client = await raw(self, process)
        client.transport.write(ws_handshake())
        await client.until(b"\r\n\r\n")
        client.transport.pauseProducing()  # and never read again
        for _ in range(count):
            if client.closed:
                break
            client.transport.write(frame)
            await deferLater(reactor, 0, lambda: None)
        await deferLater(reactor, 1.5, lambda: None)
        await watch.stop()
        # The server closed it (a client that does not read would not
        # see that): 1008 after the flood or as too slow.
        self.assertIn(b"Closing WebSocket 127.0.0.1", self.process.output)
        client.transport.resumeProducing()
        await client.lost
        self.assertEqual(await self.messages(), before)
        self.assertNoUnhandledErrors()
        return client

    async def test_large_pings(self) -> None:
        """
        2,000 pings with 60 kB ids (120 MB) to a client that reads
        nothing: the connection is closed, and memory stays bounded.
        """
        ping = json.dumps({"type": "ping", "id": "x" * 60_000}).encode()
        await self._flood(ws_frame(ping), 2000)

    async def test_small_unknown_frames(self) -> None:
        """
        Small frames answered by error frames: the connection is closed
        after a burst of them, not answered 7 bytes for every byte.
        """
        await self._flood(ws_frame(b'{"type": "x"}') * 1000, 200)


class SlowClientTests(HostileCase):
    """
    3. Dribbling clients: a head after blank lines, a second head on a
    kept-alive connection, a body after a complete head.
    """

    async def test_dribblers_cut_at_the_request_deadline(self) -> None:
        """
        Each dribbles a byte a second; each is cut 10 s after its
        request's first byte, while others are served as usual.
        """
        process = await self.start()
        watch = Watch(self, process)
        blank = await raw(self, process)
        blank.transport.write(b"\r\n\r\n")
        second = await raw(self, process)
        second.transport.write(request("/healthz"))
        await second.until(b'{"status":"ok"}')
        body = await raw(self, process)
        body.transport.write(request("/api/rooms/lobby/messages", "Content-Length: 100", method="POST"))
        clients = [blank, second, body]
        started = time.monotonic()
        for _ in range(15):
            for client in clients:
                if not client.closed:
                    client.transport.write(b"G" if client is not body else b"x")
            await deferLater(reactor, 1.0, lambda: None)
            if all(c.closed for c in clients):
                break
        took = time.monotonic() - started
        await watch.stop()
        self.assertTrue(all(c.closed for c in clients))
        self.assertGreater(took, 8.5)
        self.assertLess(took, 13)
        self.assertEqual(await self.messages(), [])


class DescriptorTests(HostileCase):
    """
    4. One IP opening idle connections until the server has no descriptor
    left, under a 256-descriptor limit.
    """

    async def _hold(self, count: int) -> List[Raw]:
        clients = []
        for _ in range(count):
            try:
                client = await raw(self, self.process)
            except ConnectError:
                continue  # refused without a word
            client.transport.write(request("/healthz"))
            clients.append(client)
        await deferLater(reactor, 0.5, lambda: None)
        return clients

    async def test_one_ip_held_to_its_share(self) -> None:
        """
        300 kept-alive connections from one IP: 100 are served, the rest
        refused with a JSON 503 or closed; another IP is served, and the
        server never runs out of descriptors.
        """
        process = await self.start(prefix=("prlimit", "--nofile=256:256", "--"))
        self.assertIn(b"at most 192 connections, 100 from one IP", process.output)
        watch = Watch(self, process)
        clients = await self._hold(300)
        served = [c for c in clients if b'{"status":"ok"}' in c.received]
        refused = [c for c in clients if b"too_many_connections" in c.received]
        self.assertEqual(len(served), 100)
        self.assertGreater(len(refused), 0)
        self.assertTrue(all(c.closed for c in clients if c not in served))
        self.assertTrue(all(b"HTTP/1.1 503 Service Unavailable" in c.received for c in refused))
        self.assertLess(_descriptors(process.transport.pid), 256 - 32)
        # At the peak: 100 served, and what one reactor turn accepts from
        # the listen queue before it refuses them (Twisted accepts up to
        # 100 connections a turn; the queue is 1024 long, so a burst is
        # there to be accepted); never the process's limit.
        await watch.stop(descriptors=256 - 32)
        self.assertIn(b"Refused a connection from 127.0.0.1: too_many_connections", process.output)
        for client in served:
            client.transport.abortConnection()
            await client.lost
        code, _, metrics = await self.http.request("GET", "/metrics")
        self.assertIn(b'chatd_rejected_total{reason="too_many_connections"}', metrics)

    async def test_full_server_still_answers_health_checks(self) -> None:
        """
        With the per-IP cap above what the process can hold, one IP fills
        the server: other IPs get /healthz answered (from the spare
        connections) and a JSON 503 C{server_full} for anything else.
        """
        process = await self.start(
            "--max-connections-per-ip", "1000", prefix=("prlimit", "--nofile=256:256", "--")
        )
        self.assertIn(b"One IP may hold every connection", process.output)
        await self._hold(230)
        other = await raw(self, process, source=OTHER_IP)
        other.transport.write(request("/healthz") + request("/api/rooms"))
        answers = await other.lost
        self.assertIn(b'{"status":"ok"}', answers)
        self.assertIn(b"server_full", answers)
        self.assertLess(_descriptors(process.transport.pid), 256)

    async def test_soft_limit_raised(self) -> None:
        """
        chatd raises its soft descriptor limit to the hard one, and says so.
        """
        process = await self.start(prefix=("prlimit", "--nofile=256:4096", "--"))
        self.assertIn(b"Open files: soft limit 256, now 4096 (hard limit 4096)", process.output)
        self.assertIn(b"at most 4032 connections", process.output)


class OversizedBodyTests(HostileCase):
    """
    5. Bodies over the 64 KiB bound are refused without being read.
    """

    async def test_declared_too_long_with_expect(self) -> None:
        """
        C{Expect: 100-continue} with a 300 MiB Content-Length: 413 at once,
        never 100 Continue, and the connection closes.
        """
        process = await self.start()
        client = await raw(self, process)
        client.transport.write(
            post_head("Content-Length: 314572800", "Expect: 100-continue")
        )
        answer = await client.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b"request_too_large", answer)
        self.assertIn(b"Connection: close", answer)

    async def test_declared_too_long_sent_anyway(self) -> None:
        """
        The head and then 64 MiB of a 300 MiB body, sent as fast as the
        server reads: it reads almost none of it, answers 413 and closes.
        """
        process = await self.start()
        watch = Watch(self, process)
        client = await raw(self, process)
        client.transport.write(
            post_head("Content-Length: 314572800")
        )
        await client.until(b"request_too_large")
        chunk = b"x" * 65536
        for _ in range(1024):
            if client.closed:
                break
            client.transport.write(chunk)
            await deferLater(reactor, 0, lambda: None)
        await client.lost
        await watch.stop(rss_kib=8 * 1024)
        self.assertEqual(await self.messages(), [])

    async def test_chunked_body_stopped_at_the_bound(self) -> None:
        """
        A chunked body goes on past 64 KiB: 413, and nothing more is read.
        """
        process = await self.start()
        watch = Watch(self, process)
        client = await raw(self, process)
        client.transport.write(
            post_head("Transfer-Encoding: chunked")
        )
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        sent = 0
        while sent < 1024 and not client.closed and b"HTTP/1.1" not in client.received:
            client.transport.write(chunk)
            sent += 1
            await deferLater(reactor, 0.01, lambda: None)
        answer = await client.lost
        self.assertLessEqual(sent, 10)
        await watch.stop(rss_kib=8 * 1024)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:200])
        self.assertIn(b"request_too_large", answer)
        self.assertEqual(await self.messages(), [])


class FrameFloodTests(HostileCase):
    """
    6. One WebSocket flooding small frames, while it reads.
    """

    async def test_flooder_closed_others_unaffected(self) -> None:
        """
        Each of ten connections in turn floods 1 MB of pings: each is
        closed with 1008 after its burst; /healthz from another IP stays
        fast throughout; the room is unchanged.
        """
        process = await self.start()
        await self.post(3)
        before = await self.messages()
        watch = Watch(self, process)
        flood = ws_frame(b'{"type": "ping"}') * (1_000_000 // 22)
        for _ in range(10):
            client = await raw(self, process)
            client.transport.write(ws_handshake())
            await client.until(b"\r\n\r\n")
            client.transport.write(flood)
            received = await client.lost
            frames = server_frames(received)
            closes = [payload for opcode, payload in frames if opcode == 0x8]
            self.assertEqual(len(closes), 1, frames[-3:])
            self.assertEqual(struct.unpack("!H", closes[0][:2])[0], 1008)
            pongs = [p for opcode, p in frames if opcode == 0x1 and b'"pong"' in p]
            self.assertLessEqual(len(pongs), 31)
        await watch.stop()
        self.assertEqual(await self.messages(), before)
        self.assertNoUnhandledErrors()


class HugeNumberTests(HostileCase):
    """
    7. Cursors of thousands of digits, on every path.
    """

    async def test_every_cursor_400(self) -> None:
        process = await self.start()
        await self.post(2)
        huge = "9" * 5000
        for path in [
            f"/api/rooms/lobby/messages?after={huge}",
            f"/api/rooms/lobby/messages?before={huge}",
            f"/api/rooms/lobby/messages?after={huge}&callback=f",
            f"/rooms/lobby/poll?lastupdate={huge}",
            f"/ws/lobby?after={huge}",
        ]:
            code, _, body = await self.http.request("GET", path)
            self.assertEqual(code, 400, path[:40])
            if not path.startswith("/ws/"):
                text = body.decode()
                self.assertIn("invalid_parameter", text, path[:40])
        client = await raw(self, process)
        client.transport.write(ws_handshake(f"/ws/lobby?after={huge}"))
        answer = await client.until(b"invalid_parameter")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:100])
        self.assertEqual(len(await self.messages()), 2)
        self.assertNoUnhandledErrors()


class ProtocolErrorTests(HostileCase):
    """
    10. Close frames with codes RFC 6455 does not allow; C{Connection:
    close}.
    """

    async def test_invalid_close_codes_answered_1002(self) -> None:
        process = await self.start()
        for code in (5000, 65535, 999, 1005, 2999):
            client = await raw(self, process)
            client.transport.write(ws_handshake())
            await client.until(b"\r\n\r\n")
            client.transport.write(ws_frame(struct.pack("!H", code), opcode=0x8))
            frames = server_frames(await client.lost)
            self.assertEqual(frames[-1][0], 0x8, (code, frames))
            self.assertEqual(struct.unpack("!H", frames[-1][1][:2])[0], 1002, code)

    async def test_valid_close_code_echoed(self) -> None:
        process = await self.start()
        client = await raw(self, process)
        client.transport.write(ws_handshake())
        await client.until(b"\r\n\r\n")
        client.transport.write(ws_frame(struct.pack("!H", 4000), opcode=0x8))
        frames = server_frames(await client.lost)
        self.assertEqual(frames[-1][0], 0x8)
        self.assertEqual(struct.unpack("!H", frames[-1][1][:2])[0], 1000)

    async def test_connection_close_answered_with_connection_close(self) -> None:
        process = await self.start()
        for target in ("/healthz", "/api/rooms/lobby/messages?timeout=0", "/api/rooms", "/"):
            client = await raw(self, process)
            client.transport.write(request(target, "Connection: close"))
            answer = await client.lost
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            self.assertIn(b"\r\nconnection: close", head, target)
