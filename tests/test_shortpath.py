"""
The long-poll short path (chatd._http.ChatChannel): the same answers as
twisted.web's full path for every request it takes, the full path for
every request it does not, on one connection, in order.
"""

import json
from typing import Any, Dict, List, Tuple

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd._http import parse_long_poll_line, parse_short_headers
from tests._support import make_web, start_chatd
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


class Server:
    """
    chatd's site on a fake clock, with the short path or without it.
    """

    def __init__(self, short: bool, timeout: float = 75) -> None:
        self.core, self.web, self.clock = make_web(rooms=["lobby"])
        self.site = self.web.site(timeout, access_log=not short, reactor=self.clock)
        self.site.startFactory()

    def connect(self) -> Tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        channel.makeConnection(transport)
        return channel, transport

    def exchange(self, raw: bytes) -> List[Response]:
        channel, transport = self.connect()
        channel.dataReceived(raw)
        self.clock.advance(0)
        return parse_responses(transport.value())

    def post(self, body: str) -> None:
        self.core.post("lobby", "ann", body, None, None)


# What both paths must agree on (the full path adds its chunking and may
# order headers differently).
COMPARED = (b"content-type", b"cache-control", b"x-content-type-options")


def same(a: Response, b: Response) -> bool:
    return a[0] == b[0] and a[2] == b[2] and all(a[1].get(h) == b[1].get(h) for h in COMPARED)


def get(target: bytes, *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: chatd.test\r\n" + b"".join(
        h + b"\r\n" for h in headers
    ) + b"\r\n"


class ParseTests(SynchronousTestCase):
    """
    What the short path reads itself, and what it leaves to the full path.
    """

    def test_request_lines(self) -> None:
        self.assertEqual(
            parse_long_poll_line(b"GET /api/rooms/lobby/messages?after=3&limit=10&after=4 HTTP/1.1"),
            ("lobby", {"after": "4", "limit": "10"}),
        )
        self.assertEqual(parse_long_poll_line(b"GET /api/rooms/a-b_c/messages HTTP/1.1"), ("a-b_c", {}))
        for line in [
            b"GET /api/rooms/lobby/messages HTTP/1.0",
            b"HEAD /api/rooms/lobby/messages HTTP/1.1",
            b"POST /api/rooms/lobby/messages HTTP/1.1",
            b"GET /api/rooms/lobby/messages/ HTTP/1.1",
            b"GET /api/rooms/lob%62y/messages HTTP/1.1",
            b"GET /api/rooms/lobby/messages?after=%31 HTTP/1.1",
            b"GET /api/rooms/lobby/messages?callback=a+b HTTP/1.1",
            b"GET /api/rooms/lobby/messages?after=1#x HTTP/1.1",
            b"GET /api/rooms/lobby/messages?after=\xc3\xa9 HTTP/1.1",
            b"GET http://chatd.test/api/rooms/lobby/messages HTTP/1.1",
            b"GET /api/rooms/lobby/messages  HTTP/1.1",
            b"GET /api/rooms/" + b"x" * 65 + b"/messages HTTP/1.1",
        ]:
            self.assertIsNone(parse_long_poll_line(line), line)

    def test_headers(self) -> None:
        self.assertIs(parse_short_headers(b""), False)
        self.assertIs(parse_short_headers(b"\r\nHost: x\r\nAccept: */*"), False)
        self.assertIs(parse_short_headers(b"\r\nConnection: keep-alive, Close"), True)
        self.assertIs(parse_short_headers(b"\r\nContent-Length: 0"), False)
        self.assertIs(parse_short_headers(b"\r\nX-Content-Length: 5"), False)
        for headers in [
            b"\r\nContent-Length: 5",
            b"\r\nContent-Length: 0\r\nContent-Length: 5",
            b"\r\nTransfer-Encoding: chunked",
            b"\r\nUpgrade: websocket",
            b"\r\nConnection: Upgrade",
            b"\r\nConnection: close\r\nConnection: keep-alive",
            b"\r\nExpect: 100-continue",
            b"\r\nHost : x",
            b"\r\n Host: x",
            b"\r\nHost: x\ny: z",
            b"\r\nHost: x\ry: z",
            b"\r\nHost: \x00",
            b"\r\nno colon",
            b"".join(b"\r\nX-%d: y" % i for i in range(101)),
        ]:
            self.assertIsNone(parse_short_headers(headers), headers)


class ShortPathTests(SynchronousTestCase):
    """
    The short path against the full path, over one connection.
    """

    def setUp(self) -> None:
        self.short = Server(short=True)
        self.full = Server(short=False)
        for server in (self.short, self.full):
            for i in range(3):
                server.post(f"m{i}")

    def both(self, raw: bytes) -> Tuple[List[Response], List[Response]]:
        return self.short.exchange(raw), self.full.exchange(raw)

    def assertSame(self, raw: bytes) -> List[Response]:
        short, full = self.both(raw)
        self.assertEqual(len(short), len(full), raw)
        for a, b in zip(short, full, strict=True):
            self.assertTrue(same(a, b), (raw, a, b))
        return short

    def test_answers_match(self) -> None:
        """
        Answers, errors and JSONP are the same on both paths; the short
        path's have a Content-Length.
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
            b"/api/rooms/nowhere/messages?after=0",
            b"/api/rooms/lobby/messages?after=%30&timeout=0",
            b"/api/rooms/lobby/messages?after=99&timeout=0",
        ]:
            self.assertSame(get(target))
        [(code, headers, body)] = self.short.exchange(get(b"/api/rooms/lobby/messages?after=0&timeout=0"))
        self.assertEqual(headers[b"content-length"], b"%d" % len(body))
        [(_, full_headers, _)] = self.full.exchange(get(b"/api/rooms/lobby/messages?after=0&timeout=0"))
        self.assertEqual(full_headers[b"transfer-encoding"], b"chunked")
        self.assertEqual([m["body"] for m in json.loads(body)["messages"]], ["m0", "m1", "m2"])

    def test_waits_then_answers(self) -> None:
        """
        A long-poll at the room's last seq waits for the next message, and
        gets an empty batch when its timeout passes.
        """
        channel, transport = self.short.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=3&timeout=10"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.short.core.waiting(), 1)
        self.assertEqual(self.short.web.long_polls, 1)
        self.short.post("news")
        [(code, _, body)] = parse_responses(transport.value())
        self.assertEqual((code, json.loads(body)["messages"][0]["body"]), (200, "news"))
        self.assertEqual((self.short.core.waiting(), self.short.web.long_polls), (0, 0))
        transport.clear()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=4&timeout=10"))
        self.short.clock.advance(10)
        [(code, _, body)] = parse_responses(transport.value())
        self.assertEqual(json.loads(body), {"room": "lobby", "messages": [], "last_seq": 4, "reset": False})
        self.assertFalse(transport.disconnecting)

    def test_keep_alive_then_other_routes(self) -> None:
        """
        One connection: long-polls, then a page and a post (handed to the
        full path with the bytes after them), all answered in order.
        """
        post = (b"POST /api/rooms/lobby/messages HTTP/1.1\r\nHost: chatd.test\r\n"
                b"Content-Type: application/json\r\nContent-Length: 25\r\n\r\n"
                b'{"nick":"b","body":"p!"} ')
        raw = (get(b"/api/rooms/lobby/messages?after=0&timeout=0")
               + get(b"/api/rooms/lobby/messages?after=2&timeout=0")
               + get(b"/api/rooms")
               + post
               + get(b"/api/rooms/lobby/messages?after=3&timeout=0"))
        responses = self.assertSame(raw)
        self.assertEqual([r[0] for r in responses], [200, 200, 200, 201, 200])
        self.assertEqual(json.loads(responses[4][2])["messages"][0]["body"], "p!")

    def test_pipelined_behind_a_wait(self) -> None:
        """
        Requests sent behind a waiting long-poll are answered after it, in
        order.
        """
        channel, transport = self.short.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=3&timeout=30")
                             + get(b"/api/rooms/lobby/messages?after=0&limit=1&timeout=0"))
        self.assertEqual(transport.value(), b"")
        self.short.post("late")
        bodies = [json.loads(r[2]) for r in parse_responses(transport.value())]
        self.assertEqual([[m["seq"] for m in b["messages"]] for b in bodies], [[4], [1]])

    def test_byte_at_a_time(self) -> None:
        """
        A request head that arrives a byte at a time is read the same.
        """
        raw = get(b"/api/rooms/lobby/messages?after=1&timeout=0") + get(b"/healthz")
        channel, transport = self.short.connect()
        for i in range(len(raw)):
            channel.dataReceived(raw[i : i + 1])
        self.assertEqual([r[0] for r in parse_responses(transport.value())], [200, 200])

    def test_bare_newlines_take_the_full_path(self) -> None:
        """
        A head with bare LF line ends is twisted.web's to answer.
        """
        raw = b"GET /api/rooms/lobby/messages?after=0&timeout=0 HTTP/1.1\nHost: x\n\n"
        self.assertSame(raw)

    def test_connection_close(self) -> None:
        """
        Connection: close is honoured after the answer.
        """
        channel, transport = self.short.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=0&timeout=0", b"Connection: close"))
        self.assertEqual(len(parse_responses(transport.value())), 1)
        self.assertTrue(transport.disconnecting)

    def test_client_gone(self) -> None:
        """
        A long-poll whose connection is lost is forgotten at once: no waiter,
        no connection counted, nothing written later.
        """
        channel, transport = self.short.connect()
        channel.dataReceived(get(b"/api/rooms/lobby/messages?after=3&timeout=30"))
        self.assertEqual(self.short.core.waiting(), 1)
        channel.connectionLost(None)
        self.assertEqual((self.short.core.waiting(), self.short.web.long_polls), (0, 0))
        self.short.post("after")
        self.short.clock.advance(60)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_idle_timeout_spares_a_waiting_poll(self) -> None:
        """
        The idle timeout does not close a connection whose long-poll is
        waiting, and closes it once it has been idle that long after the
        answer.
        """
        server = Server(short=True, timeout=5)
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
        full collections paused a thousand-poller server for tens of ms.
        """
        import gc

        from chatd.web import _Waiter

        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        channel, transport = self.short.connect()
        for seq in range(3, 8):
            channel.dataReceived(get(b"/api/rooms/lobby/messages?after=%d&timeout=30" % seq))
            self.short.post(f"m{seq + 1}")
        gone, _ = self.short.connect()
        gone.dataReceived(get(b"/api/rooms/lobby/messages?after=8&timeout=30"))
        gone.connectionLost(None)
        self.assertEqual(len(parse_responses(transport.value())), 5)
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, _Waiter)], [])

    def test_refused_over_connection_limit(self) -> None:
        """
        A client over its connection limit gets the full path's 503.
        """
        from chatd.limits import Limits

        for server in (self.short, self.full):
            server.core.limits = Limits(server.clock, max_connections_per_ip=1)
        raw = get(b"/api/rooms/lobby/messages?after=3&timeout=30")
        self.short.connect()[0].dataReceived(raw)
        self.full.connect()[0].dataReceived(raw)
        [short] = self.short.exchange(raw)
        [full] = self.full.exchange(raw)
        self.assertEqual(short[0], 503)
        self.assertTrue(same(short, full))

    @FUZZ
    @given(query=st.binary(max_size=80), header=st.sampled_from([
        b"Accept: */*", b"Connection: close", b"Content-Length: 0", b"X-Y:", b"Cookie: a=b; c=d",
    ]))
    def test_any_query_same_answer(self, query: bytes, header: bytes) -> None:
        """
        Any query string (escaped as a client would), with the common
        headers: the short path's answer is the full path's.
        """
        from urllib.parse import quote_from_bytes

        q = quote_from_bytes(query, safe=b"=&;,!$'()*").encode()
        self.assertSame(get(b"/api/rooms/lobby/messages?" + q + b"&timeout=0", header))

    def test_fault_in_the_core(self) -> None:
        """
        An unexpected exception in the core, at once or later, is a logged
        JSON 500 on both paths, and the long-poll's place is given back.
        """
        from twisted.internet.defer import fail

        from chatd.limits import Limits

        for server in (self.short, self.full):
            server.core.limits = Limits(server.clock)

            def broken(*args: Any) -> Any:
                raise RuntimeError("bug")

            server.core.wait = server.core.wait_for = broken  # type: ignore[method-assign]
        raw = get(b"/api/rooms/lobby/messages?after=0&timeout=0")
        [short] = self.assertSame(raw)
        self.assertEqual((short[0], json.loads(short[2])["error"]), (500, "internal_error"))
        for server in (self.short, self.full):
            server.core._store.read_after = lambda *args: fail(RuntimeError("later"))  # type: ignore[method-assign]
        [short] = self.assertSame(get(b"/api/rooms/lobby/messages?after=99&timeout=0"))
        self.assertEqual(short[0], 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 4)
        for server in (self.short, self.full):
            self.assertEqual((server.core.limits.connections, server.web.long_polls), (0, 0))


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


class RealConnectionTests(TestCase):
    """
    The short path over real connections, where the site reads kept-alive
    long-poll connections itself (chatd._http._ShortPathReads).
    """

    timeout = 30

    async def setUp(self) -> None:
        self.service, base = await start_chatd(self, "--store", "memory:")
        self.port = int(base.rsplit(":", 1)[1])
        self.site = self.service.ports[0].factory.wrappedFactory

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

    async def test_long_polls_then_other_requests(self) -> None:
        """
        After its first answer a kept-alive long-poll connection is read by
        the site's own reader; its next long-polls are answered from there,
        and a request for another route goes back to twisted.web.
        """
        client = await self.connect()
        client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        self.post("one")
        await client.answers(1)
        self.assertEqual(len(self.site.reads._reading), 1)
        for seq in (1, 2, 3):
            client.transport.write(get(b"/api/rooms/lobby/messages?after=%d&timeout=30" % seq))
            self.post(f"m{seq + 1}")
            answers = await client.answers(seq + 1)
            self.assertEqual(json.loads(answers[-1][2])["messages"][0]["seq"], seq + 1)
        self.assertEqual(len(self.site.reads._reading), 1)
        client.transport.write(get(b"/api/rooms"))
        answers = await client.answers(5)
        self.assertEqual(json.loads(answers[-1][2])["rooms"][0]["name"], "lobby")
        self.assertEqual(self.site.reads._reading, {})

    async def test_client_goes_away_while_waiting(self) -> None:
        """
        A connection closed while its long-poll waits in the site's reader
        is forgotten: no waiter left, nothing read for it.
        """
        client = await self.connect()
        client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        self.post("one")
        await client.answers(1)
        client.transport.write(get(b"/api/rooms/lobby/messages?after=1&timeout=30"))
        await until(lambda: self.service.core.waiting() == 1)
        client.transport.loseConnection()
        await client.lost
        await until(lambda: self.service.core.waiting() == 0 and not self.site.reads._reading)
        self.assertEqual(self.service.core.limits.connections, 0)

    async def test_many_connections_one_reader(self) -> None:
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
        self.assertEqual(len(self.site.reads._reading), 50)

    async def test_error_drops_only_that_connection(self) -> None:
        """
        A bug while reading one connection in the site's reader is logged
        and drops that connection; the others go on.
        """
        broken, fine = await self.connect(), await self.connect()
        for client in (broken, fine):
            client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        await until(lambda: self.service.core.waiting() == 2)
        self.post("one")
        await broken.answers(1)
        await fine.answers(1)
        [(channel, _, _)] = [
            entry for entry in self.site.reads._reading.values()
            if entry[1].getPeer().port == broken.transport.getHost().port
        ]

        def bug(data: bytes) -> None:
            raise RuntimeError("bug")

        channel.dataReceived = bug
        broken.transport.write(get(b"/api/rooms/lobby/messages?after=1&timeout=30"))
        await broken.lost
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        fine.transport.write(get(b"/api/rooms/lobby/messages?after=1&timeout=30"))
        self.post("two")
        answers = await fine.answers(2)
        self.assertEqual(json.loads(answers[-1][2])["messages"][0]["body"], "two")


async def until(condition: Any) -> None:
    """
    Wait, a reactor turn at a time, until C{condition()} holds.
    """
    from twisted.internet.task import deferLater

    for _ in range(10000):
        if condition():
            return
        await deferLater(reactor, 0, lambda: None)
    raise AssertionError("condition never held")


class ShutdownTests(TestCase):
    """
    Shutting down with long-polls waiting in the site's own reader.
    """

    timeout = 30

    async def test_shutdown_answers_and_leaves_no_reader(self) -> None:
        """
        A long-poll waiting in the site's reader is answered at shutdown,
        and neither the reader nor the connection is left with the
        reactor's readers (stopService may be called again).
        """
        service, base = await start_chatd(self, "--store", "memory:")
        site = service.ports[0].factory.wrappedFactory
        client = _RawClient()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", int(base.rsplit(":", 1)[1])), client
        )
        client.transport.write(get(b"/api/rooms/lobby/messages?after=0&timeout=30"))
        service.core.post("lobby", "ann", "one", None, None)
        await client.answers(1)
        self.assertEqual(len(site.reads._reading), 1)
        client.transport.write(get(b"/api/rooms/lobby/messages?after=1&timeout=30"))
        await until(lambda: service.core.waiting() == 1)
        await service.stopService()
        answers = await client.answers(2)
        self.assertEqual(json.loads(answers[1][2])["messages"], [])
        self.assertEqual(site.reads._reading, {})
        self.assertNotIn(site.reads, reactor.getReaders())
        await service.stopService()
        client.transport.loseConnection()
        await client.lost
