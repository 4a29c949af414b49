"""
Origin and paths against real listening servers: cross-site form posts
and duplicate Origin headers are refused, the tutorial's cross-origin
client keeps working once its origin is allowed, and paths no file or
route can answer are JSON 404s rather than 500s or redirects.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from twisted.trial.unittest import TestCase

from tests._support import HTTP, start_chatd

#: The headers of a WebSocket opening handshake (RFC 6455 section 4.1).
_HANDSHAKE = {
    "Upgrade": ["websocket"],
    "Connection": ["Upgrade"],
    "Sec-WebSocket-Version": ["13"],
    "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="],
}

_FORM = {"Content-Type": ["application/x-www-form-urlencoded"]}


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

    async def last_seq(self, host: Optional[str] = None) -> int:
        """
        The lobby's last seq, asked for with C{Host: host} if given.
        """
        code, _, body = await self.request(
            "GET", "/api/rooms/lobby", {"Host": [host]} if host else {}
        )
        self.assertEqual(code, 200, body)
        return int(json.loads(body)["last_seq"])


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
