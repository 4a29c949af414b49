"""
The long-poll short path (chatd._http.ChatChannel): the same answers as
twisted.web's full path for every request it takes, the full path for
every request it does not, on one connection, in order.
"""

import json
from typing import Any, Dict, List, Tuple

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from chatd._http import parse_long_poll_line, parse_short_headers
from tests._support import make_web
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
