"""
Paths against a real listening server: paths no file or route can answer
are chatd's JSON 404s rather than 500s or redirects.
"""

from __future__ import annotations

import json
from typing import Any, Tuple

from twisted.trial.unittest import TestCase

from tests._support import HTTP, start_chatd


class OriginCase(TestCase):
    """
    A chatd on a loopback port, with the options a test gives.
    """

    timeout = 60

    async def start(self, *args: str) -> None:
        self.service, self.base = await start_chatd(self, "--store", "memory:", *args)
        self.port = self.service.ports[0].getHost().port
        self.http = HTTP(self, self.base)

    def assertError(self, result: Tuple[int, Any, bytes], status: int, code: str) -> None:
        got, headers, body = result
        self.assertEqual(got, status, body)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"])
        answer = json.loads(body)
        self.assertEqual(set(answer), {"error", "detail"})
        self.assertEqual(answer["error"], code)


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
