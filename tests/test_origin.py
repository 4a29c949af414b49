"""
Host and Origin against real listening servers: DNS rebinding, cross-site
form posts and duplicate Origin headers are refused, the tutorial's
cross-origin client keeps working once its origin is allowed, and paths no
file or route can answer are JSON 404s rather than 500s or redirects.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from chatd._paths import find_data_dir
from chatd.tap import Options
from chatd.web import ChatWeb, make_environment
from tests._support import HTTP, ChatdProcess, make_web, start_chatd

#: The public URL the servers of these tests are given.
PUBLIC = "http://chat.example"

#: The headers of a WebSocket opening handshake (RFC 6455 section 4.1).
_HANDSHAKE = {
    "Upgrade": ["websocket"],
    "Connection": ["Upgrade"],
    "Sec-WebSocket-Version": ["13"],
    "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="],
}

_FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}


class _Handshake(WebSocketClientProtocol):
    """
    Fires its factory's C{result} with True once the handshake succeeds,
    or False if the connection ends before that.
    """

    factory: "_HandshakeFactory"

    def onOpen(self) -> None:
        if not self.factory.result.called:
            self.factory.result.callback(True)
        self.sendClose(1000)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self.factory.result.called:
            self.factory.result.callback(False)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.factory.closed.callback(None)


class _HandshakeFactory(WebSocketClientFactory):
    protocol = _Handshake

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.result: Deferred = Deferred()
        #: Fires once the connection is gone.
        self.closed: Deferred = Deferred()


class OriginCase(TestCase):
    """
    A chatd on a loopback port, with the options a test gives.
    """

    timeout = 60

    async def start(self, *args: str) -> None:
        self.service, self.base = await start_chatd(self, "--store", "memory:", *args)
        self.port = self.service.ports[0].getHost().port
        self.http = HTTP(self, self.base)

    async def request(
        self, method: str, path: str, headers: Dict[str, List[str]], data: bytes = b""
    ) -> Tuple[int, Any, bytes]:
        """
        C{method path} with exactly C{headers} (C{Host} among them, if
        given, replaces the one the URL implies).
        """
        if method == "GET":
            return await self.http.request(method, path, headers=headers)
        return await self.http.request(method, path, headers=headers, data=data)

    def assertError(self, result: Tuple[int, Any, bytes], status: int, code: str) -> None:
        got, headers, body = result
        self.assertEqual(got, status, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        answer = json.loads(body)
        self.assertEqual(set(answer), {"error", "detail"})
        self.assertEqual(answer["error"], code)

    async def websocket_opens(self, url: str, origin: Optional[str]) -> bool:
        """
        Whether a real WebSocket handshake for C{url} (whose host becomes
        the Host header, as a browser sends it after DNS rebinding), sent
        to this test's server on loopback, succeeds.
        """
        factory = _HandshakeFactory(url, origin=origin)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await endpoint.connect(factory)
        self.addCleanup(lambda: factory.closed)
        return bool(await factory.result)

    async def last_seq(self, host: Optional[str] = None) -> int:
        """
        The lobby's last seq, asked for with C{Host: host} if given.
        """
        code, _, body = await self.request(
            "GET", "/api/rooms/lobby", {"Host": [host]} if host else {}
        )
        self.assertEqual(code, 200, body)
        return int(json.loads(body)["last_seq"])


class PublicURLTests(OriginCase):
    """
    With --public-url, requests must be addressed to that URL, and
    browsers' requests must come from its pages (or --allow-origin ones).
    """

    async def test_dns_rebinding_websocket_refused(self) -> None:
        """
        A page on evil.example whose name now resolves to chatd's address
        opens a WebSocket with C{Host: evil.example} and C{Origin:
        http://evil.example}: Host and Origin agree, and today's rule let
        it in.  With --public-url it is refused with 421, while chatd's own
        pages (Host and Origin of the public URL, port given or not) get in.
        """
        await self.start("--public-url", PUBLIC)
        self.assertFalse(
            await self.websocket_opens("ws://evil.example/ws/lobby", "http://evil.example")
        )
        self.assertError(
            await self.request(
                "GET",
                "/ws/lobby",
                {**_HANDSHAKE, "Host": ["evil.example"], "Origin": ["http://evil.example"]},
            ),
            421,
            "misdirected_request",
        )
        self.assertTrue(await self.websocket_opens("ws://chat.example/ws/lobby", PUBLIC))
        self.assertTrue(
            await self.websocket_opens("ws://CHAT.example:80/ws/lobby", "http://Chat.Example:80")
        )

    async def test_websocket_origin_checked_against_public_url(self) -> None:
        """
        Addressed to the public URL but from another page (the Host
        header's own origin included, which is no longer "this server"):
        403.
        """
        await self.start("--public-url", PUBLIC)
        self.assertFalse(
            await self.websocket_opens("ws://chat.example/ws/lobby", "http://evil.example")
        )
        self.assertError(
            await self.request(
                "GET", "/ws/lobby", {**_HANDSHAKE, "Host": ["chat.example"], "Origin": [self.base]}
            ),
            403,
            "origin_not_allowed",
        )

    async def test_host_mismatch_page_and_api(self) -> None:
        """
        A page, an API GET and a long-poll GET (which skips Klein's
        routing) addressed to another host are 421 JSON answers; the public
        URL's host, in any case, with or without the default port, is
        served.
        """
        await self.start("--public-url", PUBLIC, "--public-url", "https://chat.example:8443")
        for path in ["/", "/api/rooms", "/api/rooms/lobby/messages?after=0&timeout=0"]:
            for host in [
                "evil.example",
                f"127.0.0.1:{self.port}",
                "chat.example:8080",
                "chat.example:443",
            ]:
                self.assertError(
                    await self.request("GET", path, {"Host": [host]}), 421, "misdirected_request"
                )
            for host in ["chat.example", "Chat.Example:80", "chat.example:8443"]:
                code, _, body = await self.request("GET", path, {"Host": [host]})
                self.assertEqual(code, 200, (path, host, body))

    async def test_probes_exempt(self) -> None:
        """
        Load balancers and Prometheus probe by IP: /healthz, /readyz and
        /metrics answer whatever the Host header says.
        """
        await self.start("--public-url", PUBLIC)
        for path in ["/healthz", "/readyz", "/metrics"]:
            code, _, body = await self.request("GET", path, {"Host": [f"127.0.0.1:{self.port}"]})
            self.assertEqual(code, 200, (path, body))

    async def test_cross_site_post_refused(self) -> None:
        """
        A form posted from another site's page to the public URL is 403;
        from the public URL's own pages it is stored.
        """
        await self.start("--public-url", PUBLIC)
        headers = {**_FORM, "Host": ["chat.example"]}
        self.assertError(
            await self.request(
                "POST",
                "/api/rooms/lobby/messages",
                {**headers, "Origin": ["https://evil.example"]},
                b"body=pwned",
            ),
            403,
            "origin_not_allowed",
        )
        self.assertError(
            await self.request(
                "POST",
                "/api/rooms/lobby/messages",
                {**headers, "Origin": [self.base]},
                b"body=pwned",
            ),
            403,
            "origin_not_allowed",
        )
        self.assertEqual(await self.last_seq("chat.example"), 0)
        code, _, body = await self.request(
            "POST", "/api/rooms/lobby/messages", {**headers, "Origin": [PUBLIC]}, b"body=ours"
        )
        self.assertEqual(code, 201, body)
        self.assertEqual(await self.last_seq("chat.example"), 1)


class DefaultOriginTests(OriginCase):
    """
    Without --public-url: this server's own origin is the Host header's.
    """

    async def test_cross_site_form_post_refused(self) -> None:
        """
        A page on evil.example posting a form (no preflight needed) to
        every state-changing route is refused with 403 and nothing
        changes; so is C{Origin: null} (sandboxed frames, file: pages).
        """
        await self.start()
        for origin in ["https://evil.example", "null", self.base + ".evil.example"]:
            for path, form in [
                ("/api/rooms/lobby/messages", b"body=pwned"),
                ("/rooms/lobby/poll", b"new_message=pwned"),
                ("/api/rooms", b"name=pwned"),
            ]:
                self.assertError(
                    await self.request("POST", path, {**_FORM, "Origin": [origin]}, form),
                    403,
                    "origin_not_allowed",
                )
        self.assertEqual(await self.last_seq(), 0)
        code, rooms = await self.http.get_json("/api/rooms")
        self.assertEqual([room["name"] for room in rooms["rooms"]], ["lobby"])

    async def test_same_origin_and_no_origin_post_allowed(self) -> None:
        """
        chatd's own pages (Origin equal to the Host header's origin) and
        clients that send no Origin at all (curl, servers) post as before.
        """
        await self.start()
        code, _, body = await self.request("POST", "/api/rooms/lobby/messages", _FORM, b"body=curl")
        self.assertEqual(code, 201, body)
        code, _, body = await self.request(
            "POST", "/api/rooms/lobby/messages", {**_FORM, "Origin": [self.base]}, b"body=page"
        )
        self.assertEqual(code, 201, body)

    async def test_allowed_origin_post_and_longpoll(self) -> None:
        """
        The tutorial's page, served from another origin given with
        --allow-origin, posts (to both post routes) and long-polls as
        before, and may read the tutorial endpoint's answers.
        """
        page = "http://127.0.0.1:9"
        await self.start("--allow-origin", page)
        origin = {"Origin": [page]}
        code, headers, body = await self.request(
            "POST", "/rooms/lobby/poll", {**_FORM, **origin}, b"new_message=from+the+tutorial"
        )
        self.assertEqual((code, json.loads(body)["timestamp"]), (200, 1))
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["*"])
        code, _, body = await self.request(
            "POST", "/api/rooms/lobby/messages", {**_FORM, **origin}, b"body=two"
        )
        self.assertEqual(code, 201, body)
        code, headers, body = await self.request(
            "GET", "/rooms/lobby/poll?lastupdate=0&callback=cb", origin
        )
        self.assertEqual(
            (code, body), (200, b'cb({"status": 1, "timestamp": 1, "data": "from the tutorial"});')
        )
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), ["*"])

    async def test_duplicate_origin_refused(self) -> None:
        """
        Two Origin headers, or one listing several origins, are 400
        C{invalid_origin} on a WebSocket upgrade and on a POST, even when
        the last one is allowed (a check of the last alone would pass it).
        """
        await self.start()
        for origins in [
            ["https://evil.example", self.base],
            [self.base, self.base],
            [f"https://evil.example, {self.base}"],
        ]:
            self.assertError(
                await self.request("GET", "/ws/lobby", {**_HANDSHAKE, "Origin": origins}),
                400,
                "invalid_origin",
            )
            self.assertError(
                await self.request(
                    "POST", "/api/rooms/lobby/messages", {**_FORM, "Origin": origins}, b"body=x"
                ),
                400,
                "invalid_origin",
            )
        self.assertEqual(await self.last_seq(), 0)


class StartupWarningTests(TestCase):
    """
    Without --public-url, chatd says at start-up when DNS rebinding can
    reach it.  (The tests never listen beyond loopback: the warning is
    asked for with the address a port on 0.0.0.0 or :: would report.)
    """

    timeout = 60

    def warnings(self, address: object, *public_urls: str) -> List[str]:
        core, web, _ = make_web()
        if public_urls:
            web = ChatWeb(
                core,
                make_environment(find_data_dir("templates")),
                find_data_dir("static"),
                Resource(),
                public_urls=public_urls,
            )
        with capturedLogs() as events:
            web.listening(address)
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_warning_beyond_loopback(self) -> None:
        """
        Listening on 0.0.0.0 (or ::) without --public-url logs one warning
        naming DNS rebinding and --public-url; with --public-url, or on
        loopback, nothing is said.
        """
        for host in ["0.0.0.0", "192.0.2.7"]:
            [warning] = self.warnings(IPv4Address("TCP", host, 8080))
            self.assertIn("DNS rebinding", warning)
            self.assertIn("--public-url", warning.split("DNS rebinding")[1])
        [warning] = self.warnings(IPv6Address("TCP", "::", 8080))
        self.assertIn("DNS rebinding", warning)
        self.assertEqual(self.warnings(IPv4Address("TCP", "0.0.0.0", 8080), PUBLIC), [])
        for host in ["127.0.0.1", "127.1.2.3"]:
            self.assertEqual(self.warnings(IPv4Address("TCP", host, 8080)), [])
        self.assertEqual(self.warnings(IPv6Address("TCP", "::1", 8080)), [])

    async def test_no_warning_on_loopback(self) -> None:
        """
        A twistd process on 127.0.0.1 says nothing of DNS rebinding.
        """
        process = await ChatdProcess.start(self, "--store", "memory:")
        await process.stop("TERM")
        output = process.output.decode()
        self.assertNotIn("DNS rebinding", output)
        self.assertNotIn("#warn]", output)


class PathTests(OriginCase):
    """
    Paths that no file and no route can answer are chatd's JSON 404.
    """

    async def test_static_nul_404(self) -> None:
        """
        A NUL byte in a static path (last segment, or inside a name) is a
        JSON 404 like any missing file, not a 500 with a traceback logged;
        so is any other segment that is not one file name (C{.}, C{..},
        one with an escaped C{/}), a missing file and the folder itself.
        Real files are still served.
        """
        await self.start()
        for path in [
            "/static/%00",
            "/static/app.js%00.css",
            "/static/chat.js%00",
            "/static/%00/chat.js",
            "/static/%2e/chat.js",
            "/static/%2e",
            "/static/%2e%2e/setup.cfg",
            "/static/chat.js%2f",
            "/static/chat.js/",
            "/static/nothing.js",
            "/static/",
        ]:
            self.assertError(await self.http.request("GET", path), 404, "not_found")
        code, headers, _ = await self.http.request("GET", "/static/chat.js")
        self.assertEqual(code, 200)
        self.assertIn("javascript", headers.getRawHeaders("content-type")[0])

    async def test_empty_segment_404(self) -> None:
        """
        A path with an empty segment is a 404, not a 308 without a
        Location; so is a missing trailing slash that werkzeug would
        redirect.  chatd does not redirect.
        """
        await self.start()
        for path in [
            "/rooms//lobby",
            "/api//rooms",
            "/static//chat.js",
            "/api/rooms//messages",
            "/static",
        ]:
            result = await self.http.request("GET", path)
            self.assertError(result, 404, "not_found")
            self.assertIsNone(result[1].getRawHeaders("location"))


class PublicURLOptionTests(SynchronousTestCase):
    """
    --public-url takes scheme://host[:port], http or https, like
    --allow-origin.
    """

    def test_public_url(self) -> None:
        """
        Good values are kept (repeatable); others are a UsageError naming
        the option.
        """
        options = Options()
        options.parseOptions(
            ["--public-url", "https://chat.example.org/", "--public-url", "http://[::1]:8080"]
        )
        self.assertEqual(options["public-urls"], ["https://chat.example.org", "http://[::1]:8080"])
        for bad in [
            "chat.example.org",
            "ftp://chat.example.org",
            "https://chat.example.org/chat",
            "https://user@chat.example.org",
            "https://chat.example.org:99999",
            "https://",
        ]:
            with self.assertRaises(usage.UsageError) as e:
                Options().parseOptions(["--public-url", bad])
            self.assertIn("--public-url", str(e.exception))
