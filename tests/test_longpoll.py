"""
The long-poll over twisted.web's one HTTP parser: C{GET
/api/rooms/<room>/messages} answered past Klein's routing gives exactly
what the Klein route gives; the channel's bounds (pipelined requests wait
while their client does not read); waits, cancels, faults and garbage.
"""

from __future__ import annotations

import gc
import json
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote_from_bytes

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd._http import ChatSite
from chatd.limits import Connections, Limits
from chatd.store.memory import MemoryStore
from tests._support import HTTP, ChatdProcess, make_web, rss_kib, start_chatd
from tests.test_fuzz import FUZZ

Response = Tuple[int, Dict[bytes, bytes], bytes]
PEER = IPv4Address("TCP", "127.0.0.1", 40000)


def parse_responses(data: bytes) -> List[Response]:
    """
    Split what a server wrote into responses: status, headers (names in
    lower case) and body (Content-Length or chunked).
    """
    responses = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.lower()] = value.strip()
        data = data[end + 4 :]
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = data[:length], data[length:]
        else:
            assert headers.get(b"transfer-encoding") == b"chunked", headers
            body = b""
            while True:
                size_end = data.index(b"\r\n")
                size = int(data[:size_end], 16)
                chunk = data[size_end + 2 : size_end + 2 + size]
                data = data[size_end + 2 + size + 2 :]
                if size == 0:
                    break
                body += chunk
        responses.append((status, headers, body))
    return responses


class FlakyStore(MemoryStore):
    """
    A memory store whose reads fail while C{broken} is set.
    """

    broken = False

    def read_after(self, room: str, after: int, limit: int) -> Deferred:
        if self.broken:
            return fail(RuntimeError("the store failed"))
        return super().read_after(room, after, limit)


class Server:
    """
    chatd's site on a fake clock: with the long-poll answered at the root
    (as chatd serves it), or with every request routed by Klein.
    """

    def __init__(self, klein: bool, timeout: float = 75, limits: Optional[Callable[[Clock], Limits]] = None) -> None:
        self.store = FlakyStore()
        self.limits: Optional[Limits] = None

        def make_limits(clock: Clock) -> Limits:
            assert limits is not None
            self.limits = limits(clock)
            return self.limits

        self.core, self.web, self.clock = make_web(
            rooms=["lobby"], limits=None if limits is None else make_limits, store=self.store
        )
        resource = self.web.app.resource() if klein else self.web.resource()
        self.site = ChatSite(
            resource,
            request_timeout=10,
            timeout=timeout,
            reactor=self.clock,
            connections=None if self.limits is None else Connections(self.limits),
        )
        self.site.startFactory()

    def connect(self) -> Tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, raw: bytes, wait: float = 0) -> List[Response]:
        channel, transport = self.connect()
        channel.dataReceived(raw)
        self.clock.advance(wait)
        responses = parse_responses(transport.value())
        channel.connectionLost(Failure(ConnectionDone()))
        return responses

    def post(self, body: str) -> None:
        self.core.post("lobby", "ann", body, None, None)


# The headers that carry meaning (Date may differ by a second).
COMPARED = (
    b"content-type",
    b"content-length",
    b"cache-control",
    b"x-content-type-options",
    b"retry-after",
    b"allow",
    b"transfer-encoding",
)


#: A presence version names its server's presence too: it differs.
_PRESENCE_VERSION = re.compile(rb'"version":"[0-9a-f]{12}\.')


def same(a: Response, b: Response) -> bool:
    bodies = [_PRESENCE_VERSION.sub(b'"version":"TAG.', r[2]) for r in (a, b)]
    return a[0] == b[0] and bodies[0] == bodies[1] and all(a[1].get(h) == b[1].get(h) for h in COMPARED)


def get(target: bytes, *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: chatd.test\r\n" + b"".join(
        h + b"\r\n" for h in headers
    ) + b"\r\n"


class SameAnswerTests(SynchronousTestCase):
    """
    The long-poll answered at the site's root and through Klein's route:
    the same status, meaningful headers and body, for any request.
    """

    def setUp(self) -> None:
        self.direct = Server(klein=False)
        self.klein = Server(klein=True)
        for server in (self.direct, self.klein):
            for i in range(3):
                server.post(f"m{i}")

    def assertSame(self, raw: bytes, wait: float = 0) -> List[Response]:
        direct = self.direct.exchange(raw, wait)
        klein = self.klein.exchange(raw, wait)
        self.assertEqual(len(direct), len(klein), raw)
        for a, b in zip(direct, klein, strict=True):
            self.assertTrue(same(a, b), (raw, a, b))
        return direct

    def test_answers_match(self) -> None:
        """
        Answers, errors and JSONP match, each with a Content-Length.
        """
        for target in [
            b"/api/rooms/lobby/messages?after=0&timeout=0",
            b"/api/rooms/lobby/messages?after=1&limit=1&timeout=0",
            b"/api/rooms/lobby/messages?after=0&timeout=0&callback=chat.got",
            b"/api/rooms/lobby/messages?after=-1&timeout=0",
            b"/api/rooms/lobby/messages?after=x",
            b"/api/rooms/lobby/messages?limit=0",
            b"/api/rooms/lobby/messages?timeout=-1",
            b"/api/rooms/lobby/messages?callback=alert(1)",
            b"/api/rooms/lobby/messages?before=3",
            b"/api/rooms/lobby/messages?before=3&after=1",
            b"/api/rooms/nowhere/messages?after=0",
            b"/api/rooms/lobby/messages?after=%30&timeout=0",
            b"/api/rooms/lo%62by/messages?after=0&timeout=0",
            b"/api/rooms/lobby/messages?after=99&timeout=0",
            b"/api/rooms/lobby/messages?after=" + b"9" * 5000,
            b"/api/rooms/lobby/messages?limit=" + b"9" * 5000 + b"&timeout=0",
            b"/api/rooms/lobby/messages?after=1&timeout=0&presence=1&client=tab-1",
            b"/api/rooms/lobby/messages?after=0&timeout=0&presence=1&callback=got",
            b"/api/rooms/lobby/messages?after=0&presence=maybe",
            b"/api/rooms/lobby/messages?after=0&presence=abc.12x",
            b"/api/rooms/lobby/messages?after=0&client=two%20words",
            b"/api/rooms/lobby/messages?before=3&presence=1",
        ]:
            [(status, headers, body)] = self.assertSame(get(target))
            self.assertEqual(headers[b"content-length"], b"%d" % len(body))
            self.assertNotIn(b"transfer-encoding", headers)

    def test_semicolons_split_the_query(self) -> None:
        """
        twisted.web splits a query on ';' as well as '&', on every path:
        C{x=1;after=0} asks for everything after seq 0.
        """
        [(status, _, body)] = self.assertSame(get(b"/api/rooms/lobby/messages?x=1;after=0&timeout=0"))
        self.assertEqual([m["seq"] for m in json.loads(body)["messages"]], [1, 2, 3])

    def test_waits_alike(self) -> None:
        """
        A long-poll with nothing newer waits on both, and times out alike.
        """
        [(status, _, body)] = self.assertSame(get(b"/api/rooms/lobby/messages?after=3&timeout=5"), wait=5)
        self.assertEqual(json.loads(body), {"room": "lobby", "messages": [], "last_seq": 3, "reset": False})
        # Asking for presence, the first poll is answered at once, with it
        # (and its version); sending that back, the next one waits.
        [(status, _, body)] = self.assertSame(get(b"/api/rooms/lobby/messages?after=3&timeout=5&presence=1"))
        answer = json.loads(body)
        version = answer["presence"].pop("version")
        self.assertEqual(
            answer,
            {
                "room": "lobby",
                "messages": [],
                "last_seq": 3,
                "reset": False,
                "presence": {"users": [], "guests": 1},
                "typing": [],
            },
        )
        for server in (self.direct, self.klein):
            seen = server.core.room("lobby").presence.seen
            self.assertEqual(version.split(".")[1], seen.split(".")[1])
            target = b"/api/rooms/lobby/messages?after=3&timeout=5&presence=" + seen.encode("ascii")
            self.assertEqual(server.exchange(get(target)), [])

    @FUZZ
    @given(
        pairs=st.lists(
            st.tuples(
                st.sampled_from([b"after", b"before", b"limit", b"timeout", b"callback", b"x", b"", b"after%00"]),
                st.one_of(
                    st.integers(min_value=-5, max_value=10).map(lambda n: b"%d" % n),
                    st.just(b"9" * 30),
                    st.just(b"1" * 4400),
                    st.sampled_from([b"", b"%30", b"%ff", b"+1", b"1e3", b"inf", b"nan", b"0x1", b"a.b", b"$", b"3;4"]),
                    st.binary(max_size=12).map(lambda v: quote_from_bytes(v).encode()),
                ),
            ),
            max_size=5,
        ),
        separator=st.sampled_from([b"&", b";"]),
    )
    def test_any_query_same_answer(self, pairs: List[Tuple[bytes, bytes]], separator: bytes) -> None:
        """
        Any query (repeated parameters, empty values, escapes, huge
        numbers, ';' separators): the same answer on both paths; one that
        waits is answered at its timeout, alike.
        """
        query = separator.join(name + b"=" + value for name, value in pairs)
        self.assertSame(get(b"/api/rooms/lobby/messages?" + query), wait=61)


class LongPollTests(SynchronousTestCase):
    """
    The long-poll answered at the site's root, on one connection.
    """

    def setUp(self) -> None:
        self.server = Server(klein=False)
        for i in range(3):
            self.server.post(f"m{i}")

    def test_waits_then_answers(self) -> None:
        """
        A long-poll at the room's last seq waits for the next message, and
        gets an empty batch when its timeout passes; the connection stays.
        """
        server = self.server
        channel, transport = server.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=3&timeout=10"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual((server.core.waiting(), server.web.long_polls), (1, 1))
        server.post("news")
        [(code, _, body)] = parse_responses(transport.value())
        self.assertEqual((code, json.loads(body)["messages"][0]["body"]), (200, "news"))
        self.assertEqual((server.core.waiting(), server.web.long_polls), (0, 0))
        transport.clear()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=4&timeout=10"))
        server.clock.advance(10)
        [(code, _, body)] = parse_responses(transport.value())
        self.assertEqual(json.loads(body), {"room": "lobby", "messages": [], "last_seq": 4, "reset": False})
        self.assertFalse(transport.disconnecting)

    def test_pipelined_behind_a_wait(self) -> None:
        """
        Requests sent behind a waiting long-poll are answered after it, in
        order.
        """
        channel, transport = self.server.connect()
        channel.dataReceived(
            get(b"/api/rooms/lobby/messages?after=3&timeout=30")
            + get(b"/api/rooms/lobby/messages?after=0&limit=1&timeout=0")
            + get(b"/api/rooms")
        )
        self.assertEqual(transport.value(), b"")
        self.server.post("late")
        responses = parse_responses(transport.value())
        bodies = [json.loads(r[2]) for r in responses]
        self.assertEqual([[m["seq"] for m in b["messages"]] for b in bodies[:2]], [[4], [1]])
        self.assertEqual(bodies[2]["rooms"][0]["name"], "lobby")

    def test_byte_at_a_time(self) -> None:
        """
        A request head that arrives a byte at a time is read the same.
        """
        raw = get(b"/api/rooms/lobby/messages?after=1&timeout=0") + get(b"/healthz")
        channel, transport = self.server.connect()
        for i in range(len(raw)):
            channel.dataReceived(raw[i : i + 1])
        self.assertEqual([r[0] for r in parse_responses(transport.value())], [200, 200])

    def test_bare_newlines(self) -> None:
        """
        A head with bare LF line ends is read as twisted.web reads it: as
        a head that never ends, dropped at the head deadline.
        """
        raw = b"GET /api/rooms/lobby/messages?after=0&timeout=0 HTTP/1.1\nHost: x\n\n"
        channel, transport = self.server.connect()
        channel.dataReceived(raw)
        self.server.clock.advance(9)
        self.assertEqual((transport.value(), transport.disconnecting), (b"", False))
        self.server.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_http_1_0_and_connection_close(self) -> None:
        """
        HTTP/1.0 and Connection: close get their answer with a
        Content-Length, and the connection is closed after it.
        """
        for raw in [
            get(b"/api/rooms/lobby/messages?after=0&timeout=0", b"Connection: close"),
            b"GET /api/rooms/lobby/messages?after=0&timeout=0 HTTP/1.0\r\n\r\n",
        ]:
            channel, transport = self.server.connect()
            channel.dataReceived(raw)
            [(code, headers, body)] = parse_responses(transport.value())
            self.assertEqual((code, headers[b"content-length"]), (200, b"%d" % len(body)))
            self.assertTrue(transport.disconnecting)

    def test_client_gone(self) -> None:
        """
        A long-poll whose connection is lost is forgotten at once: no waiter,
        no connection counted, nothing written later, nothing logged.
        """
        server = self.server
        channel, transport = server.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=3&timeout=30"))
        self.assertEqual(server.core.waiting(), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((server.core.waiting(), server.web.long_polls), (0, 0))
        server.post("after")
        server.clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_idle_timeout_spares_a_waiting_poll(self) -> None:
        """
        The idle timeout does not close a connection whose long-poll is
        waiting, and closes it once it has been idle that long after the
        answer.
        """
        server = Server(klein=False, timeout=5)
        channel, transport = server.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=0&timeout=10"))
        server.clock.pump([3, 3, 3])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        server.clock.advance(1)  # the long-poll's own timeout
        self.assertEqual(len(parse_responses(transport.value())), 1)
        server.clock.advance(4)
        self.assertFalse(transport.disconnecting)
        server.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_no_garbage_cycles(self) -> None:
        """
        A long-poll's objects are freed when it ends, answered or gone, by
        reference counting: none waits for the garbage collector, whose
        full collections pause a server of a thousand pollers.
        """
        from chatd.web import _Poll

        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        channel, transport = self.server.connect()
        for seq in range(3, 8):
            channel.dataReceived(get(b"/api/rooms/lobby/messages?after=%d&timeout=30" % seq))
            self.server.post(f"m{seq + 1}")
        gone, _ = self.server.connect()
        gone.dataReceived(get(b"/api/rooms/lobby/messages?after=8&timeout=30"))
        gone.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(parse_responses(transport.value())), 5)
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, _Poll)], [])

    def test_refused_over_connection_limit(self) -> None:
        """
        A client over its connection limit gets a JSON 503 with a
        Retry-After before its request is read, whichever route it asks for.
        """
        direct = Server(klein=False, limits=lambda clock: Limits(clock, max_connections_per_ip=1))
        klein = Server(klein=True, limits=lambda clock: Limits(clock, max_connections_per_ip=1))
        raw = get(b"/api/rooms/lobby/messages?after=0&timeout=30")
        direct.connect()[0].dataReceived(raw)
        klein.connect()[0].dataReceived(raw)
        [a] = direct.exchange(raw)
        [b] = klein.exchange(raw)
        self.assertEqual((a[0], a[1][b"retry-after"]), (503, b"5"))
        self.assertTrue(same(a, b), (a, b))

    def test_fault_in_the_store(self) -> None:
        """
        A store that fails a read is a logged JSON 500 on both paths, and
        the long-poll's place is given back.
        """
        direct = Server(klein=False, limits=Limits)
        klein = Server(klein=True, limits=Limits)
        for server in (direct, klein):
            for i in range(3):
                server.post(f"m{i}")
            server.store.broken = True
        raw = get(b"/api/rooms/lobby/messages?after=99&timeout=0")
        [a], [b] = direct.exchange(raw), klein.exchange(raw)
        self.assertTrue(same(a, b), (a, b))
        self.assertEqual((a[0], json.loads(a[2])["error"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        for server in (direct, klein):
            assert server.limits is not None
            self.assertEqual((server.limits.connections, server.web.long_polls), (0, 0))
            self.assertEqual(server.core.waiting(), 0)


class BoundedPipelineTests(SynchronousTestCase):
    """
    A connection whose client does not read: its next pipelined request
    waits until its answers drain, and the connection is dropped if they
    never do.
    """

    def test_next_request_waits_for_the_transport(self) -> None:
        """
        While the transport says its buffer is full, answered requests do
        not let the next one start; when it drains, the next is answered.
        """
        server = Server(klein=False, timeout=30)
        channel, transport = server.connect()
        channel.pauseProducing()  # what a full transport buffer does
        raw = get(b"/api/rooms/lobby/messages?after=0&timeout=0") * 3
        channel.dataReceived(raw)
        self.assertEqual(len(parse_responses(transport.value())), 1)
        channel.resumeProducing()
        self.assertEqual(len(parse_responses(transport.value())), 3)
        self.assertFalse(transport.disconnecting)

    def test_never_drained_is_dropped(self) -> None:
        """
        A connection whose answers are not read for the idle timeout is
        dropped.
        """
        server = Server(klein=False, timeout=30)
        channel, transport = server.connect()
        channel.pauseProducing()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=0&timeout=0") * 2)
        server.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        server.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))


class _RawClient(Protocol):
    """
    A bare TCP client: writes requests, collects answers.
    """

    def __init__(self) -> None:
        self.data = b""
        self._wanted: List[Tuple[int, Deferred]] = []
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def _complete(self) -> List[Response]:
        try:
            return parse_responses(self.data)
        except (ValueError, IndexError):
            return []  # (the last answer is not all here yet)

    def _check(self) -> None:
        have = len(self._complete())
        for count, d in list(self._wanted):
            if have >= count:
                self._wanted.remove((count, d))
                d.callback(None)

    async def answers(self, count: int) -> List[Response]:
        d: Deferred = Deferred()
        self._wanted.append((count, d))
        self._check()
        await d
        return self._complete()


async def until(condition: Callable[[], bool]) -> None:
    """
    Wait, a reactor turn at a time (bounded), until C{condition()} holds.
    """
    for _ in range(10000):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    raise AssertionError("condition never held")


class RealConnectionTests(TestCase):
    """
    Long-polls over real kept-alive connections.
    """

    timeout = 30

    async def setUp(self) -> None:
        self.service, base = await start_chatd(self, "--store", "memory:")
        self.port = int(base.rsplit(":", 1)[1])

    async def connect(self) -> _RawClient:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        client = await connectProtocol(endpoint, _RawClient())
        self.addCleanup(self.close, client)
        return client

    async def close(self, client: _RawClient) -> None:
        if client.transport is not None and client.transport.connected:
            client.transport.loseConnection()
            await client.lost

    def post(self, body: str) -> None:
        self.service.core.post("lobby", "ann", body, None, None)

    async def test_many_connections(self) -> None:
        """
        Fifty kept-alive pollers through several messages: every one gets
        every message, in order, exactly once.
        """
        clients = [await self.connect() for _ in range(50)]
        for client in clients:
            client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        await until(lambda: self.service.core.waiting() == 50)
        for seq in range(1, 6):
            self.post(f"m{seq}")
            for client in clients:
                answers = await client.answers(seq)
                self.assertEqual([m["seq"] for m in json.loads(answers[-1][2])["messages"]], [seq])
                client.transport.write(get(b"/api/rooms/lobby/messages?after=%d&timeout=30" % seq))
            await until(lambda: self.service.core.waiting() == 50)

    async def test_client_goes_away_while_waiting(self) -> None:
        """
        A connection closed while its long-poll waits is forgotten: no
        waiter left, its place given back.
        """
        client = await self.connect()
        client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        await until(lambda: self.service.core.waiting() == 1)
        client.transport.loseConnection()
        await client.lost
        await until(lambda: self.service.core.waiting() == 0)
        self.assertEqual(self.service.web.long_polls, 0)

    async def test_shutdown_answers_waiting_polls(self) -> None:
        """
        A long-poll waiting at shutdown is answered with an empty batch
        (and stopService may be called again).
        """
        client = await self.connect()
        client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        await until(lambda: self.service.core.waiting() == 1)
        await self.service.stopService()
        [(code, _, body)] = await client.answers(1)
        self.assertEqual((code, json.loads(body)["messages"]), (200, []))
        await self.service.stopService()


class _Flood(Protocol):
    """
    Sends C{count} pipelined requests at once and reads nothing until
    told to; then counts the answers.
    """

    def __init__(self, request: bytes, count: int) -> None:
        self._request = request
        self._count = count
        self.answered = 0
        self._tail = b""
        self.done: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # read nothing
        self.transport.write(self._request * self._count)

    def dataReceived(self, data: bytes) -> None:
        marker = b"HTTP/1.1 200 OK\r\n"
        chunk = self._tail + data
        self.answered += chunk.count(marker)
        # Keep enough to see a marker cut in two, but never count it twice.
        cut = chunk.rfind(marker)
        rest = chunk[cut + len(marker) :] if cut >= 0 else chunk
        self._tail = rest[-(len(marker) - 1) :]
        if self.answered >= self._count and not self.done.called:
            self.done.callback(self.answered)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class PipelineFloodTests(TestCase):
    """
    One connection pipelines 100,000 long-poll GETs and reads nothing:
    chatd holds a bounded number of bytes for it, serves everyone else
    as usual, and answers every request once the client reads.
    """

    timeout = 180

    async def test_hundred_thousand_pipelined_gets(self) -> None:
        """
        The server's memory grows by less than 4 MiB while the flood
        waits; /healthz and a long-poll from another client are answered
        within a second; then all 100,000 answers arrive, and the room is
        unchanged.
        """
        process = await ChatdProcess.start(self, "--store", "memory:")
        pid = process.transport.pid
        http = HTTP(self, process.base)
        await http.post_json("/api/rooms/lobby/messages", {"body": "hello"})
        for _ in range(200):  # warm up the request path
            await http.request("GET", "/api/rooms/lobby/messages?after=0&timeout=0")
        before = rss_kib(pid)
        request = get(b"/api/rooms/lobby/messages?after=0&timeout=0")
        flood = _Flood(request, 100_000)
        port = int(process.base.rsplit(":", 1)[1])
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), flood)
        self.addCleanup(self._close, flood)
        peak = before
        for _ in range(20):
            await deferLater(reactor, 0.1, lambda: None)
            peak = max(peak, rss_kib(pid))
            started = time.monotonic()
            code, _ = await http.get_json("/healthz")
            self.assertEqual(code, 200)
            self.assertLess(time.monotonic() - started, 1.0)
        code, answer = await http.get_json("/api/rooms/lobby/messages?after=0&timeout=0")
        self.assertEqual((code, [m["body"] for m in answer["messages"]]), (200, ["hello"]))
        self.assertLess(flood.answered, 100_000, "the flood was read by the client")
        self.assertLess(peak - before, 4 * 1024, f"RSS grew from {before} KiB to {peak} KiB")
        flood.transport.resumeProducing()
        self.assertEqual(await flood.done, 100_000)
        code, info = await http.get_json("/api/rooms/lobby")
        self.assertEqual(info["last_seq"], 1)

    async def _close(self, flood: _Flood) -> None:
        if flood.transport is not None and flood.transport.connected:
            flood.transport.loseConnection()
            await flood.lost



def upgrade(target: bytes, *headers: bytes) -> bytes:
    return get(
        target,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        *headers,
    )


class SameUpgradeTests(SynchronousTestCase):
    """
    A WebSocket upgrade handed to Autobahn at the site's root
    (L{chatd.web.ChatWeb.websocket_now}) and through Klein's route: the
    same handshake answer and the same first frames, or the same refusal.
    """

    def setUp(self) -> None:
        self.servers = []
        for klein in (False, True):
            core, web, clock = make_web(rooms=["lobby"], websocket=True)
            web.ready = True
            site = ChatSite(web.app.resource() if klein else web.resource(), reactor=clock)
            site.startFactory()
            for i in range(3):
                core.post("lobby", "ann", f"m{i}", None, None)
            self.servers.append((site, clock))

    def exchange(self, raw: bytes) -> List[bytes]:
        answers = []
        for site, clock in self.servers:
            channel = site.buildProtocol(PEER)
            transport = StringTransport(peerAddress=PEER)
            # As a TCP transport has it: Autobahn's resource hands the
            # connection on by replacing it.
            transport.protocol = channel
            channel.makeConnection(transport)
            channel.dataReceived(raw)
            clock.advance(0)
            # The date differs by a second at most; nothing else may.
            answers.append(re.sub(rb"(?im)^date: .*$", b"date: -", transport.value()))
            transport.protocol.connectionLost(Failure(ConnectionDone()))
        return answers

    def test_same_answers(self) -> None:
        """
        Accepted upgrades (resuming, or not) and refused ones: the same
        bytes either way.
        """
        for raw in [
            upgrade(b"/ws/lobby"),
            upgrade(b"/ws/lobby?after=1"),
            upgrade(b"/ws/lobby?after=x"),
            upgrade(b"/ws/lobby?after=" + b"9" * 5000),
            upgrade(b"/ws/lobby?presence=maybe"),
            upgrade(b"/ws/lobby?token=nonsense"),
            upgrade(b"/ws/nowhere"),
            upgrade(b"/ws/lo%62by"),
            upgrade(b"/ws/lobby", b"Origin: http://chatd.test"),
            get(b"/ws/lobby"),
        ]:
            direct, klein = self.exchange(raw)
            self.assertEqual(direct, klein, raw)
            self.assertTrue(direct.startswith(b"HTTP/1.1 "), direct)

    def test_accepted_at_the_root(self) -> None:
        """
        An upgrade the root can accept at once is Autobahn's: it switches
        protocols and sends the history asked for.
        """
        direct, _ = self.exchange(upgrade(b"/ws/lobby?after=1"))
        self.assertIn(b"101 Switching Protocols", direct)
        self.assertIn(b'"body":"m1"', direct)
        self.assertNotIn(b'"body":"m0"', direct)
