"""
chatd in a real browser: Debian's Chromium driven by Playwright for Python,
against chatd running as a twistd process on a free loopback port.

Each scenario runs Playwright's synchronous API in a worker thread (so the
reactor keeps serving); waits are on page conditions, never sleeps.

Outside CI these tests skip when Chromium or Playwright is missing; under
CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site
from twisted.web.static import File

from tests._support import HTTP, ChatdProcess, make_certificate

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
#: Page conditions are met in milliseconds; this bounds a broken run.
WAIT_MS = 20_000

# Recorded in every page before its own scripts run: console errors, CSP
# violations and dialogs (an executed payload would likely open one).
_WATCH = """
window.__chatd_test = {violations: []};
document.addEventListener("securitypolicyviolation",
  (e) => window.__chatd_test.violations.push(e.violatedDirective + " " + e.blockedURI));
"""


def _playwright() -> Any:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "Playwright for Python is not installed (pip install '.[test]')"
    else:
        if not os.path.exists(CHROMIUM):
            reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"browser tests must run in CI: {reason}")
        raise SkipTest(reason)
    return sync_playwright


class Browser:
    """
    One Chromium for a scenario, with helpers that read the chat page the
    way a person would.
    """

    def __init__(self, browser: Any, base: str) -> None:
        self.browser = browser
        self.base = base
        self.console_errors: List[str] = []
        self.dialogs: List[str] = []
        self.requests: List[str] = []
        self.websockets: List[str] = []
        self.pages: List[Any] = []
        #: Console errors a scenario provokes on purpose (regexes).
        self.expected_errors: List[str] = []
        #: Options of every new browser profile.
        self.context_options: Dict[str, Any] = {}

    def open(
        self,
        path: str,
        viewport: Optional[Dict[str, int]] = None,
        init: str = "",
        context: Any = None,
    ) -> Any:
        """
        Open a page in a new browser profile (or in C{context}'s).
        """
        if context is None:
            context = self.browser.new_context(
                viewport=viewport or {"width": 1200, "height": 800}, **self.context_options
            )
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.add_init_script(_WATCH + init)
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("websocket", lambda ws: self.websockets.append(ws.url))
        page.response = page.goto(self.base + path)
        self.pages.append(page)
        return page

    @staticmethod
    def wait_connected(page: Any) -> None:
        page.wait_for_function("() => document.getElementById('status').dataset.state === 'connected'")

    @staticmethod
    def say(page: Any, text: str, nick: Optional[str] = None) -> None:
        if nick is not None:
            page.fill("#nick", nick)
        page.fill("#inputbox", text)
        page.press("#inputbox", "Enter")

    @staticmethod
    def wait_messages(page: Any, count: int) -> None:
        page.wait_for_function(f"() => document.querySelectorAll('#message_list li.message:not(.pending)').length >= {count}"
        )

    @staticmethod
    def messages(page: Any) -> List[Dict[str, Any]]:
        return page.eval_on_selector_all(
            "#message_list li.message:not(.pending)",
            """els => els.map(e => ({seq: Number(e.dataset.seq), nick: e.dataset.nick,
                body: e.querySelector('.body').textContent}))""",
        )


class BrowserTestCase(TestCase):
    timeout = 180

    async def setUp(self) -> None:
        self.sync_playwright = _playwright()
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.server = await ChatdProcess.start(self, *self.chatd_args())
        self.http = HTTP(self, self.server.base)

    def chatd_args(self) -> List[str]:
        return ["--data-dir", self.folder]

    def base_url(self) -> str:
        return self.server.base

    def context_options(self) -> Dict[str, Any]:
        return {}

    def in_browser(self, scenario: Callable[[Browser], None]) -> Any:
        """
        Run C{scenario} with a fresh Chromium in a worker thread; it fails
        if any page logged a console error or a CSP violation, or opened a
        dialog.
        """
        base = self.base_url()

        def run() -> None:
            with self.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                try:
                    b = Browser(browser, base)
                    b.context_options = self.context_options()
                    scenario(b)
                    for page in b.pages:
                        violations = page.evaluate("window.__chatd_test.violations")
                        assert violations == [], violations
                    unexpected = [
                        e for e in b.console_errors
                        if not any(re.search(pattern, e) for pattern in b.expected_errors)
                    ]
                    assert unexpected == [], unexpected
                    assert b.dialogs == [], b.dialogs
                finally:
                    browser.close()

        return deferToThread(run)

    def screenshot(self, page: Any, name: str) -> None:
        """
        Save a screenshot in the test's folder, and in $CHATD_SCREENSHOTS
        when set (tools/screenshots.sh uses it for the docs).
        """
        page.screenshot(path=os.path.join(self.folder, name))
        target = os.environ.get("CHATD_SCREENSHOTS")
        if target:
            page.screenshot(path=os.path.join(target, name))


class ChatInTheBrowserTests(BrowserTestCase):
    """
    What a person does with chatd's pages.
    """

    async def test_websocket_and_longpoll_pages_chat(self) -> None:
        """
        Two WebSocket pages and one long-poll page in one room exchange
        messages typed into #inputbox + Enter, and all show them in the
        same order.
        """

        def scenario(b: Browser) -> None:
            pages = [b.open("/rooms/lobby"), b.open("/rooms/lobby"), b.open("/rooms/lobby/longpoll")]
            for page in pages:
                b.wait_connected(page)
            self.assertEqual(
                [p.text_content("#transport") for p in pages], ["websocket", "websocket", "long-poll"]
            )
            for round_ in range(2):
                for i, page in enumerate(pages):
                    b.say(page, f"hello {round_} from page {i}", nick=f"user{i}")
                    b.wait_messages(page, round_ * 3 + i + 1)
            for page in pages:
                b.wait_messages(page, 6)
            seen = [b.messages(page) for page in pages]
            self.assertEqual([m["seq"] for m in seen[0]], [1, 2, 3, 4, 5, 6])
            self.assertEqual(seen[0], seen[1])
            self.assertEqual(seen[0], seen[2])
            self.assertEqual(seen[0][5], {"seq": 6, "nick": "user2", "body": "hello 1 from page 2"})
            # The nick is remembered for the next visit.
            again = b.open("/rooms/lobby", context=pages[0].context)
            self.assertEqual(again.input_value("#nick"), "user0")
            b.wait_messages(again, 6)
            self.screenshot(pages[0], "chat-desktop.png")

        await self.in_browser(scenario)

    async def test_html_payload_is_text(self) -> None:
        """
        HTML and script sent as a message show up as text on every page and
        execute nothing; links are clickable but only http(s).
        """
        payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'

        def scenario(b: Browser) -> None:
            sender, reader = b.open("/rooms/lobby"), b.open("/rooms/lobby/longpoll")
            b.wait_connected(sender)
            b.wait_connected(reader)
            b.say(sender, payload)
            b.say(sender, "see https://example.org/x?a=1 and javascript:alert(1)")
            for page in (sender, reader):
                b.wait_messages(page, 2)
                self.assertEqual(b.messages(page)[0]["body"], payload)
                self.assertIsNone(page.evaluate("window.__pwned"))
                self.assertEqual(page.locator("#message_list img, #message_list script, #message_list b").count(), 0)
                links = page.eval_on_selector_all("#message_list a", "els => els.map(a => a.href)")
                self.assertEqual(links, ["https://example.org/x?a=1"])

        await self.in_browser(scenario)

    async def test_member_count_and_room_list(self) -> None:
        """
        The room list shows member counts and last activity; the form
        creates rooms and shows the server's errors inline.
        """

        def scenario(b: Browser) -> None:
            # The browser logs the 409 that the form then explains.
            b.expected_errors.append(r"status of 409 \(Conflict\)")
            chatting = b.open("/rooms/lobby")
            b.wait_connected(chatting)
            chatting.wait_for_function("() => document.getElementById('members').textContent === '1 here'")
            b.say(chatting, "hi")
            b.wait_messages(chatting, 1)
            index = b.open("/")
            row = index.locator("tr[data-room=lobby]")
            self.assertEqual(row.locator(".members").text_content(), "1")
            self.assertNotIn("no messages yet", row.locator(".activity").text_content())
            index.fill("#room_name", "no spaces")
            index.wait_for_selector("#create_error:not([hidden])")
            self.assertIn("letters, digits", index.text_content("#create_error"))
            index.fill("#room_name", "lobby")
            index.click("#create_room button")
            index.wait_for_function("() => document.getElementById('create_error').textContent.includes('already exists')")
            index.fill("#room_name", "new-room")
            index.click("#create_room button")
            index.wait_for_url(re.compile(r".*/rooms/new-room$"))
            b.wait_connected(index)
            self.screenshot(b.open("/"), "rooms-desktop.png")

        await self.in_browser(scenario)

    async def test_phone_viewport(self) -> None:
        """
        On a phone-sized viewport the pages fit without sideways scrolling
        and the input stays usable.
        """
        await self.http.post_json("/api/rooms/lobby/messages", {"nick": "ann", "body": "a long line " * 20})

        def scenario(b: Browser) -> None:
            phone = {"width": 375, "height": 667}
            for path in ["/", "/rooms/lobby", "/rooms/lobby/longpoll"]:
                page = b.open(path, viewport=phone)
                if path != "/":
                    b.wait_connected(page)
                    b.wait_messages(page, 1)
                    b.say(page, "from a phone")
                    b.wait_messages(page, 2 if path == "/rooms/lobby" else 3)
                width = page.evaluate("document.documentElement.scrollWidth")
                self.assertLessEqual(width, 375, path)
                if path == "/rooms/lobby":
                    self.screenshot(page, "chat-phone.png")
                if path == "/":
                    self.screenshot(page, "rooms-phone.png")

        await self.in_browser(scenario)


class TLSTests(BrowserTestCase):
    """
    The pages over https://, chatting over wss://: Chromium offers ALPN
    (h2 and http/1.1) and must get http/1.1.
    """

    async def setUp(self) -> None:
        self.sync_playwright = _playwright()
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        key, cert = await make_certificate(self)
        self.server = ChatdProcess.spawn(
            self, "--data-dir", self.folder,
            "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        await self.server.listening

    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def context_options(self) -> Dict[str, Any]:
        # The test's own self-signed certificate.
        return {"ignore_https_errors": True}

    async def test_https_page_and_wss(self) -> None:
        """
        The chat page loads over https, connects with wss (not the
        long-poll fallback), and two pages chat.
        """

        def scenario(b: Browser) -> None:
            one, two = b.open("/rooms/lobby"), b.open("/rooms/lobby")
            self.assertEqual(one.response.status, 200)
            for page in (one, two):
                b.wait_connected(page)
                self.assertEqual(page.text_content("#transport"), "websocket")
            self.assertTrue(b.websockets, "no WebSocket opened")
            self.assertTrue(all(url.startswith("wss://127.0.0.1:") for url in b.websockets), b.websockets)
            b.say(one, "over TLS", nick="ann")
            for page in (one, two):
                b.wait_messages(page, 1)
                self.assertEqual(b.messages(page)[0]["body"], "over TLS")

        await self.in_browser(scenario)


class HistoryTests(BrowserTestCase):
    """
    Paging back through history kept in the store.
    """

    def chatd_args(self) -> List[str]:
        return ["--data-dir", self.folder, "--history", "50"]

    async def test_load_older_and_grouping(self) -> None:
        """
        "Load older messages" pages back through history from the store
        until the first message; consecutive messages by one nick are
        grouped.
        """
        for i in range(120):
            await self.http.post_json(
                "/api/rooms/lobby/messages", {"nick": "ann" if i < 60 else "bob", "body": f"m{i}"}
            )

        def scenario(b: Browser) -> None:
            page = b.open("/rooms/lobby")
            b.wait_messages(page, 50)
            self.assertEqual([m["seq"] for m in b.messages(page)], list(range(71, 121)))
            page.click("#load_older")
            b.wait_messages(page, 100)
            page.click("#load_older")
            b.wait_messages(page, 120)
            page.wait_for_selector("#load_older", state="hidden")
            self.assertEqual([m["seq"] for m in b.messages(page)], list(range(1, 121)))
            grouped = page.eval_on_selector_all(
                "#message_list li.message", "els => els.map(e => e.classList.contains('cont'))"
            )
            self.assertEqual(grouped, [False] + [True] * 59 + [False] + [True] * 59)

        await self.in_browser(scenario)


class SafetyTests(BrowserTestCase):
    """
    Content-Security-Policy, console and built-ins.
    """

    async def test_csp_and_no_console_errors(self) -> None:
        """
        Pages carry a CSP that allows scripts only from chatd (no inline
        script), load nothing from other hosts, and log no errors.
        """

        def scenario(b: Browser) -> None:
            for path in ["/", "/rooms/lobby", "/rooms/lobby/longpoll"]:
                page = b.open(path)
                csp = page.response.headers["content-security-policy"]
                self.assertIn("script-src 'self'", csp)
                self.assertIn("connect-src 'self'", csp)
                self.assertNotIn("unsafe-inline", csp)
                if path != "/":
                    b.wait_connected(page)
                    b.say(page, f"csp check {path}")
                    b.wait_messages(page, 1)
            ws_base = b.base.replace("http://", "ws://")
            self.assertTrue(b.requests)
            self.assertEqual([u for u in b.requests if not u.startswith((b.base, ws_base))], [])

        await self.in_browser(scenario)

    async def test_natives_untouched(self) -> None:
        """
        After the page has run (connected, sent, received), built-in
        functions are still native, prototypes have no added properties and
        the page added no globals.
        """

        def scenario(b: Browser) -> None:
            blank = b.browser.new_page()
            blank.goto(b.base + "/static/chat.css")
            baseline = set(blank.evaluate("Object.getOwnPropertyNames(window)"))
            for path in ["/rooms/lobby", "/rooms/lobby/longpoll", "/"]:
                page = b.open(path)
                if path != "/":
                    b.wait_connected(page)
                    b.say(page, "natives")
                    b.wait_messages(page, 1)
                report = page.evaluate(
                    """() => {
                    const natives = {Object, Array, JSON, Function, Promise, Date, String, Map, Set,
                                     fetch, WebSocket, setTimeout, setInterval};
                    const bad = [];
                    const isNative = (f) => Function.prototype.toString.call(f).includes("[native code]");
                    for (const [name, owner] of Object.entries(natives)) {
                      if (typeof owner === "function" && !isNative(owner)) bad.push(name);
                      for (const key of Object.getOwnPropertyNames(owner)) {
                        const d = Object.getOwnPropertyDescriptor(owner, key);
                        if (typeof d.value === "function" && !isNative(d.value)) bad.push(name + "." + key);
                      }
                      const proto = owner.prototype;
                      if (proto) for (const key of Object.getOwnPropertyNames(proto)) {
                        const d = Object.getOwnPropertyDescriptor(proto, key);
                        if (typeof d.value === "function" && !isNative(d.value)) bad.push(name + ".prototype." + key);
                      }
                    }
                    const enumerable = [];
                    for (const key in {}) enumerable.push("Object.prototype." + key);
                    for (const key in []) enumerable.push("Array.prototype." + key);
                    return {bad, enumerable, globals: Object.getOwnPropertyNames(window)};
                }"""
                )
                self.assertEqual(report["bad"], [], path)
                self.assertEqual(report["enumerable"], [], path)
                added = set(report["globals"]) - baseline - {"__chatd_test"}
                self.assertEqual(added, set(), path)

        await self.in_browser(scenario)


class ResilienceTests(BrowserTestCase):
    """
    Restarts, blips and blocked WebSockets.
    """

    async def test_server_restart_mid_conversation(self) -> None:
        """
        When the server restarts, the WebSocket, long-poll and SSE pages
        show "reconnecting", a message typed meanwhile waits as "sending",
        and afterwards the conversation continues with no gap and no
        duplicate on each (the event stream resuming by itself, with
        Last-Event-ID).
        """

        def scenario(b: Browser) -> None:
            # While the server is down the browser logs refused connections.
            # (and an event stream that reconnects while the server shuts
            # down is refused with 503).
            b.expected_errors += [
                r"ERR_CONNECTION_REFUSED", r"WebSocket connection to .* failed", r"status of 503",
            ]
            ws, lp = b.open("/rooms/lobby"), b.open("/rooms/lobby/longpoll")
            sse = b.open("/rooms/lobby/sse")
            for page in (ws, lp, sse):
                b.wait_connected(page)
            self.assertEqual(sse.text_content("#transport"), "sse")
            for i in range(3):
                b.say(ws if i % 2 == 0 else lp, f"before {i}")
                b.wait_messages(ws, i + 1)
            b.wait_messages(lp, 3)
            b.wait_messages(sse, 3)
            port = self.server.port
            blockingCallFromThread(reactor, lambda: self.server.stop("TERM"))
            for page in (ws, lp, sse):
                page.wait_for_function("() => document.getElementById('status').dataset.state === 'reconnecting'")
            for page in (ws, lp):
                self.assertRegex(page.text_content("#status"), r"reconnecting in \d+ s")
            b.say(ws, "typed while the server was down")
            ws.wait_for_selector("#message_list li.pending")
            blockingCallFromThread(
                reactor,
                lambda: ensureDeferred(ChatdProcess.start(self, *self.chatd_args(), port=port)),
            )
            for page in (ws, lp, sse):
                b.wait_connected(page)
            b.wait_messages(ws, 4)
            b.wait_messages(lp, 4)
            b.say(sse, "after the restart")
            for page in (ws, lp, sse):
                b.wait_messages(page, 5)
            self.assertEqual(ws.locator("#message_list li.pending").count(), 0)
            # The event stream resumed by itself, with Last-Event-ID.
            for page in (ws, lp, sse):
                seen = b.messages(page)
                self.assertEqual([m["seq"] for m in seen], [1, 2, 3, 4, 5])
                self.assertEqual(
                    [m["body"] for m in seen],
                    ["before 0", "before 1", "before 2", "typed while the server was down", "after the restart"],
                )

        await self.in_browser(scenario)

    async def test_websocket_blocked_falls_back_to_longpoll(self) -> None:
        """
        When WebSocket connections never open (a proxy that blocks them),
        the chat page switches to Server-Sent Events by itself, and where
        there are none either, to long-poll; all chat with a WebSocket
        page.
        """
        blocked = """
        window.WebSocket = class {
          constructor() { setTimeout(() => this.onclose && this.onclose({code: 1006}), 5); }
          send() {} close() {}
        };
        """

        no_streams = "window.EventSource = undefined;"

        def scenario(b: Browser) -> None:
            stuck = b.open("/rooms/lobby", init=blocked)
            stuck_more = b.open("/rooms/lobby", init=blocked + no_streams)
            normal = b.open("/rooms/lobby")
            for page in (stuck, stuck_more, normal):
                b.wait_connected(page)
            self.assertEqual(stuck.text_content("#transport"), "sse")
            self.assertEqual(stuck_more.text_content("#transport"), "long-poll")
            self.assertEqual(normal.text_content("#transport"), "websocket")
            b.say(stuck, "through sse")
            b.say(stuck_more, "through long-poll")
            b.say(normal, "through websocket")
            for page in (stuck, stuck_more, normal):
                b.wait_messages(page, 3)
            self.assertEqual(b.messages(stuck), b.messages(normal))
            self.assertEqual(b.messages(stuck_more), b.messages(normal))

        await self.in_browser(scenario)


class TutorialClientTests(BrowserTestCase):
    """
    The tutorial's jQuery long-poll client, served from another origin,
    works against chatd by changing only its URL, once chatd is told that
    origin with --allow-origin (its form POSTs are cross-site).
    """

    async def setUp(self) -> None:
        fixture = os.path.join(os.path.dirname(__file__), "fixtures", "tutorial")
        self.other_origin = reactor.listenTCP(0, Site(File(fixture)), interface="127.0.0.1")
        self.addCleanup(self.other_origin.stopListening)
        self.page_origin = f"http://127.0.0.1:{self.other_origin.getHost().port}"
        await super().setUp()

    def chatd_args(self) -> List[str]:
        return [*super().chatd_args(), "--allow-origin", self.page_origin]

    async def test_cross_origin_jquery_client(self) -> None:
        """
        JSONP long-poll and form POSTs from a page on another port: the
        client greets, sends, and receives messages posted elsewhere.
        """
        page_url = f"{self.page_origin}/index.html"
        poll_url = f"{self.server.base}/rooms/lobby/poll"

        def scenario(b: Browser) -> None:
            page = b.browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{page_url}#{poll_url}", wait_until="domcontentloaded")
            page.wait_for_function("() => document.querySelectorAll('#message_list li').length >= 1")
            page.evaluate("send('from the tutorial client')")
            page.wait_for_function("() => window.lastPost !== undefined")
            self.assertEqual(
                page.evaluate("window.lastPost"),
                {"status": 1, "timestamp": 1, "data": "from the tutorial client"},
            )
            blockingCallFromThread(
                reactor,
                lambda: ensureDeferred(
                    self.http.post_json("/api/rooms/lobby/messages", {"body": "from the API"})
                ),
            )
            page.wait_for_function("() => document.querySelectorAll('#message_list li').length >= 3")
            items = page.eval_on_selector_all(
                "#message_list li", "els => els.map(e => [e.dataset.timestamp, e.textContent])"
            )
            self.assertEqual(
                items,
                [["0", "connected..."], ["1", "from the tutorial client"], ["2", "from the API"]],
            )

        await self.in_browser(scenario)


class AccountsInTheBrowserTests(BrowserTestCase):
    """
    --auth accounts, as people use it: sign up, sign in, a private room
    for two, and a third person who cannot find it.
    """

    def chatd_args(self) -> List[str]:
        return ["--data-dir", self.folder, "--auth", "accounts"]

    async def test_private_room_for_two(self) -> None:
        """
        Alice and Bob sign up; Alice makes a private room and adds Bob on
        its page; they chat; Carol sees no trace of it by any URL; Alice
        removes Bob, whose page stops; once Alice signs out (in another
        tab) her long-poll page stops and her browser reads it no more.
        """

        def sign_up(b: Browser, user: str, name: str) -> Any:
            page = b.open("/")
            page.click("#signup_link")
            page.fill("#user", user)
            page.fill("#name", name)
            page.fill("#password", "correct horse battery")
            page.click("#signup button[type=submit]")
            page.wait_for_selector("#me")
            assert page.text_content("#me") == name
            return page

        def scenario(b: Browser) -> None:
            alice = sign_up(b, "alice", "Alice")
            bob = sign_up(b, "bob", "Bob")
            carol = sign_up(b, "carol", "Carol")
            self.screenshot(alice, "signed-in.png")
            alice.fill("#room_name", "plans")
            alice.check("#room_private")
            alice.click("#create_room button[type=submit]")
            alice.wait_for_url("**/rooms/plans")
            b.wait_connected(alice)
            assert alice.query_selector(".room-name + .lock") is not None
            alice.click("#member_panel summary")
            alice.fill("#member_user", "bob")
            alice.click("#add_member button[type=submit]")
            alice.wait_for_selector("#member_list li[data-user=bob]", state="attached")
            b.wait_connected(alice)
            bob.goto(b.base + "/")
            bob.wait_for_selector("tr[data-room=plans] .lock")
            bob.click("tr[data-room=plans] .room-link")
            b.wait_connected(bob)
            b.say(alice, "the plans are in the vault")
            b.wait_messages(bob, 1)
            b.say(bob, "got it")
            b.wait_messages(alice, 2)
            names = alice.eval_on_selector_all(
                "#message_list li.message .nick", "els => els.map(e => e.firstChild.textContent)"
            )
            assert names == ["Alice", "Bob"], names
            # Bob cannot pass for Alice: there is no nick to type.
            assert bob.query_selector("#nick") is None
            self.screenshot(alice, "private-room.png")
            # Carol: not listed, and every URL of it is a 404.
            carol.goto(b.base + "/")
            assert carol.query_selector("tr[data-room=plans]") is None
            for path in ("/rooms/plans", "/rooms/plans/longpoll", "/api/rooms/plans/messages?after=0"):
                response = carol.goto(b.base + path)
                assert response.status == 404, (path, response.status)
                assert "vault" not in carol.content()
            b.expected_errors.append("404")
            b.expected_errors.append("401")
            # Alice removes Bob: his page stops, saying why.
            alice.evaluate("document.getElementById('member_panel').open = true")
            alice.click("#member_list li[data-user=bob] .remove button")
            alice.wait_for_url("**/rooms/plans#members")
            bob.wait_for_function(
                "() => document.getElementById('status').dataset.state === 'stopped'"
            )
            assert "no longer a member" in bob.text_content("#message_list"), bob.text_content("#message_list")
            assert bob.is_disabled("#send button")
            self.screenshot(bob, "removed.png")
            assert alice.query_selector("#member_list li[data-user=bob]") is None
            # Alice signs out in one tab: her long-poll tab stops too, at once.
            lp = b.open("/rooms/plans/longpoll", context=alice.context)
            b.wait_connected(lp)
            alice.goto(b.base + "/")
            alice.click("#signout")
            lp.wait_for_function("() => document.getElementById('status').dataset.state === 'stopped'")
            assert "signed out" in lp.text_content("#message_list"), lp.text_content("#message_list")
            alice.wait_for_selector("#signin_link")
            response = alice.goto(b.base + "/rooms/plans")
            assert response.status == 404, response.status
            assert "vault" not in alice.content()
            self.screenshot(alice, "signed-out.png")

        await self.in_browser(scenario)


class TokenUsersTestCase(BrowserTestCase):
    """
    chatd with --auth token, and tokens for any user (named after their
    id) signed with its secret.
    """

    def chatd_args(self) -> List[str]:
        self.secret = b"browser-secret-browser-secret-0123"
        path = os.path.join(self.folder, "secret")
        with open(path, "wb") as f:
            f.write(self.secret)
        return ["--data-dir", self.folder, "--auth", "token", "--auth-secret-file", path]

    def token(self, user: str) -> str:
        from chatd.auth import mint

        return mint(self.secret, user, user.title(), 3600)


class TokenInTheBrowserTests(TokenUsersTestCase):
    """
    --auth token: the chat page takes its token from the URL's fragment,
    and asks the embedding application's hook for fresh ones.
    """

    async def test_fragment_token_and_refresh_hook(self) -> None:
        """
        /rooms/lobby?token=JWT connects as that user (over WebSocket and
        long-poll), the token leaves the address bar, two users of one
        name are told apart, and a token about
        to expire is replaced through window.chatdGetToken with an auth
        frame the server accepts.
        """
        from chatd.auth import mint

        short = mint(self.secret, "u1", "Ann", 20)
        fresh = mint(self.secret, "u1", "Ann", 3600)
        # Another user with the same display name.
        other = mint(self.secret, "u2", "Ann", 3600)
        hook = f"window.chatdGetToken = async () => {fresh!r};"

        def scenario(b: Browser) -> None:
            sent: List[str] = []
            received: List[str] = []

            def watch(ws: Any) -> None:
                ws.on("framesent", lambda payload: sent.append(str(payload)))
                ws.on("framereceived", lambda payload: received.append(str(payload)))

            context = b.browser.new_context()
            context.on("page", lambda page: page.on("websocket", watch))
            ann = b.open(f"/rooms/lobby?token={short}", init=hook, context=context)
            b.wait_connected(ann)
            assert "token" not in ann.url, ann.url
            ann.wait_for_function("() => true")
            b.say(ann, "hello as Ann")
            b.wait_messages(ann, 1)
            ben = b.open(f"/rooms/lobby/longpoll?token={other}")
            b.wait_connected(ben)
            b.wait_messages(ben, 1)
            b.say(ben, "hello from long-poll")
            b.wait_messages(ann, 2)
            names = ann.eval_on_selector_all(
                "#message_list li.message .nick", "els => els.map(e => e.textContent)"
            )
            # Same name, told apart by their ids.
            assert names == ["Ann @u1", "Ann @u2"], names
            # The short token is within a minute of expiring: the page
            # asked the hook at once and sent the fresh one.
            ann.wait_for_function("() => true")
            for _ in range(100):
                if any('"type":"auth"' in frame.replace(" ", "") for frame in received):
                    break
                ann.wait_for_timeout(100)
            assert any(fresh in frame for frame in sent), sent
            assert any('"type":"auth"' in frame.replace(" ", "") for frame in received), received

        await self.in_browser(scenario)


class PageDefectTests(BrowserTestCase):
    """
    Defects people met on the pages, each pinned.
    """

    async def test_long_poll_backs_off_during_an_outage(self) -> None:
        """
        While the server is down, the long-poll page tries again less and
        less often, and never says "connected" before the server answers.
        """

        def scenario(b: Browser) -> None:
            # A poll in flight when the server stops gets no answer, and
            # the tries after it are refused.
            b.expected_errors += [r"ERR_CONNECTION_REFUSED", r"ERR_EMPTY_RESPONSE", r"ERR_CONNECTION_RESET"]
            page = b.open("/rooms/lobby/longpoll")
            b.wait_connected(page)
            blockingCallFromThread(reactor, lambda: self.server.stop("TERM"))
            page.wait_for_function("() => document.getElementById('status').dataset.state === 'reconnecting'")
            b.requests.clear()
            states = []
            for _ in range(40):
                page.wait_for_timeout(250)
                states.append(page.evaluate("document.getElementById('status').dataset.state"))
            tries = [url for url in b.requests if "/api/rooms/lobby" in url]
            # Backing off from 1 s (with jitter), ten seconds hold a handful
            # of tries, not one a second or more.
            assert len(tries) <= 6, tries
            assert "connected" not in states, states

        await self.in_browser(scenario)

    async def test_a_bad_link_gets_a_page(self) -> None:
        """
        A page URL that is not one (a trailing slash, a typo) gets chatd's
        404 page, not JSON; the API still answers JSON.
        """

        def scenario(b: Browser) -> None:
            for path in ("/rooms/lobby/", "/room/lobby"):
                page = b.open(path)
                assert page.response.status == 404, (path, page.response.status)
                assert page.text_content("h1") == "No such page"
                assert page.query_selector("#who") is not None
            b.expected_errors.append("404")

        await self.in_browser(scenario)
        code, _, body = await self.http.request("GET", "/api/nope")
        self.assertEqual((code, json.loads(body)["error"]), (404, "not_found"))


class NewestPageTests(BrowserTestCase):
    """
    Opening a room shows its newest page of history, whatever the cache
    holds, on every transport.
    """

    async def test_newest_page_on_every_transport(self) -> None:
        """
        With 120 messages and the default cache (500), the WebSocket, SSE
        and long-poll pages all open on the newest 50, with "load older";
        a new message follows them.
        """
        for i in range(120):
            await self.http.post_json("/api/rooms/lobby/messages", {"nick": "ann", "body": f"m{i}"})

        def scenario(b: Browser) -> None:
            pages = [b.open(path) for path in ("/rooms/lobby", "/rooms/lobby/sse", "/rooms/lobby/longpoll")]
            for page in pages:
                b.wait_connected(page)
                b.wait_messages(page, 50)
                assert [m["seq"] for m in b.messages(page)] == list(range(71, 121)), page.url
                assert page.is_visible("#load_older")
            b.say(pages[0], "new")
            for page in pages:
                b.wait_messages(page, 51)
                assert b.messages(page)[-1]["seq"] == 121
            pages[1].click("#load_older")
            b.wait_messages(pages[1], 101)

        await self.in_browser(scenario)


class ComposeTests(BrowserTestCase):
    """
    Writing and reading messages as in every chat client.
    """

    async def test_lines_links_own_messages_and_new_below(self) -> None:
        """
        An empty room says so; Shift+Enter starts a new line and Enter
        sends, and the line break is kept; a link stops before the
        sentence's punctuation; the page's own messages are marked; when
        scrolled up, a "new messages" button brings the reader down.
        """

        def scenario(b: Browser) -> None:
            page = b.open("/rooms/lobby")
            b.wait_connected(page)
            assert page.is_visible("#empty_room")
            page.fill("#inputbox", "line one")
            page.press("#inputbox", "Shift+Enter")
            page.type("#inputbox", "line two")
            page.press("#inputbox", "Enter")
            b.wait_messages(page, 1)
            assert not page.is_visible("#empty_room")
            body = page.text_content("#message_list li.message .body")
            assert body == "line one\nline two", repr(body)
            assert page.eval_on_selector("#message_list li.message", "e => e.classList.contains('mine')")
            blockingCallFromThread(reactor, lambda: ensureDeferred(self.http.post_json(
                "/api/rooms/lobby/messages", {"nick": "bob", "body": "(see https://x.org/docs)."}
            )))
            b.wait_messages(page, 2)
            last = "#message_list li.message:last-child"
            assert page.get_attribute(f"{last} .body a", "href") == "https://x.org/docs"
            assert page.text_content(f"{last} .body") == "(see https://x.org/docs)."
            assert not page.eval_on_selector(last, "e => e.classList.contains('mine')")
            for i in range(40):
                blockingCallFromThread(reactor, lambda i=i: ensureDeferred(self.http.post_json(
                    "/api/rooms/lobby/messages", {"nick": "bob", "body": f"filler {i}"}
                )))
            b.wait_messages(page, 42)
            page.evaluate("document.getElementById('message_list').scrollTop = 0")
            assert page.is_hidden("#new_messages")
            blockingCallFromThread(reactor, lambda: ensureDeferred(self.http.post_json(
                "/api/rooms/lobby/messages", {"nick": "bob", "body": "while you were reading"}
            )))
            page.wait_for_selector("#new_messages", state="visible")
            page.click("#new_messages")
            page.wait_for_selector("#new_messages", state="hidden")
            at_bottom = page.evaluate(
                "(() => { const s = document.getElementById('message_list');"
                " return s.scrollHeight - s.scrollTop - s.clientHeight < 40; })()"
            )
            assert at_bottom
            self.screenshot(page, "compose.png")

        await self.in_browser(scenario)


class FailedSendTests(BrowserTestCase):
    """
    Sends the server refuses, and a reconnect the reader asks for.
    """

    def chatd_args(self) -> List[str]:
        return ["--data-dir", self.folder, "--rate-limit", "2/1"]

    async def test_refused_sends_keep_their_text_and_retry(self) -> None:
        """
        Messages refused for coming too fast keep their text, marked with
        a "retry" button, and go out by themselves after the Retry-After
        the server gave; each is stored once.
        """

        def scenario(b: Browser) -> None:
            for path in ("/rooms/lobby", "/rooms/lobby/longpoll"):
                page = b.open(path)
                b.wait_connected(page)
                for i in range(4):
                    b.say(page, f"{path} quick {i}")
                page.wait_for_selector("#message_list li.failed button.retry")
                page.wait_for_selector("#message_list li.failed", state="detached")
                page.wait_for_selector("#message_list li.pending", state="detached")
                # (The second page also shows the first one's messages.)
                bodies = [m["body"] for m in b.messages(page) if m["body"].startswith(f"{path} quick")]
                assert sorted(bodies) == [f"{path} quick {i}" for i in range(4)], bodies
            b.expected_errors.append("429")

        await self.in_browser(scenario)

    async def test_reconnect_now(self) -> None:
        """
        While the page waits to reconnect, "reconnect now" does it at once.
        """

        def scenario(b: Browser) -> None:
            b.expected_errors += [r"ERR_CONNECTION_REFUSED", r"WebSocket connection to .* failed",
                                  r"ERR_EMPTY_RESPONSE", r"status of 503"]
            page = b.open("/rooms/lobby")
            b.wait_connected(page)
            assert page.is_hidden("#reconnect_now")
            port = self.server.port
            blockingCallFromThread(reactor, lambda: self.server.stop("TERM"))
            page.wait_for_selector("#reconnect_now", state="visible")
            # Back off far: the next try would be many seconds away.
            for _ in range(3):
                page.click("#reconnect_now")
                page.wait_for_function("() => document.getElementById('status').dataset.state === 'reconnecting'")
            blockingCallFromThread(
                reactor, lambda: ensureDeferred(ChatdProcess.start(self, *self.chatd_args(), port=port))
            )
            page.click("#reconnect_now")
            b.wait_connected(page)
            assert page.is_hidden("#reconnect_now")

        await self.in_browser(scenario)


class LiveRoomInTheBrowserTests(TokenUsersTestCase):
    """
    --auth token: Alice owns a room; Bob reads it over SSE, Carol over
    long-poll, Alice over WebSocket.  Edits, deletions, the topic, a mute,
    a kick and a ban reach every page live; unread counts and the "new
    messages" divider follow what each has read.
    """

    def api(self, method: str, path: str, payload: Any, user: str) -> Any:
        """
        The HTTP API, from the scenario's thread (chatd is another process).
        """
        from urllib.error import HTTPError
        from urllib.request import Request, urlopen

        request = Request(
            self.server.base + path,
            data=None if payload is None else json.dumps(payload).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token(user)}", "Content-Type": "application/json"},
        )
        try:
            with urlopen(request, timeout=10) as response:
                return json.load(response)
        except HTTPError as e:
            return json.load(e)

    @staticmethod
    def menu(page: Any, item: str, action: str, twice: bool = False) -> None:
        """
        Open the message menu of C{item} (a selector) and choose C{action}.
        """
        li = page.locator(item).last
        li.hover()
        li.locator(".menu-button").click()
        page.click(f"{item} .menu button[data-action={action}]")
        if twice:
            page.click(f"{item} .menu button[data-action={action}]")

    async def test_edit_delete_moderate_unread(self) -> None:
        def body_is(page: Any, seq: int, text: str) -> None:
            page.wait_for_function(
                f"() => document.querySelector('li.message[data-seq=\"{seq}\"] .body')?.textContent === {json.dumps(text)}"
            )

        def scenario(b: Browser) -> None:
            # A muted send and a banned reader's page are refused on purpose.
            b.expected_errors.append("status of 403")
            assert self.api("POST", "/api/rooms", {"name": "demo"}, "alice")["role"] == "owner"
            alice = b.open(f"/rooms/demo?token={self.token('alice')}")
            bob = b.open(f"/rooms/demo/sse?token={self.token('bob')}")
            carol = b.open(f"/rooms/demo/longpoll?token={self.token('carol')}")
            pages = [alice, bob, carol]
            for page in pages:
                b.wait_connected(page)
            b.say(bob, "helo evryone")
            b.say(carol, "hi @alice, a question")
            for page in pages:
                b.wait_messages(page, 2)
            seq = b.messages(alice)[0]["seq"]
            # Bob fixes his typo from the message menu; everyone sees it.
            self.menu(bob, "li.message.mine", "edit")
            bob.fill("li.message.mine .editbox", "hello everyone")
            bob.press("li.message.mine .editbox", "Enter")
            for page in pages:
                body_is(page, seq, "hello everyone")
                page.wait_for_selector(f"li.message[data-seq=\"{seq}\"] .edited")
            # Carol's mention of Alice is marked on Alice's page only.
            alice.wait_for_selector("li.message.mentioned .mention.me")
            assert carol.query_selector("li.message.mentioned") is None
            # Alice (the owner) deletes Bob's message.
            self.menu(alice, f"li.message[data-seq=\"{seq}\"]", "delete", twice=True)
            for page in pages:
                body_is(page, seq, "message deleted")
            assert "hello everyone" not in json.dumps(self.api("GET", "/api/rooms/demo/messages?after=0", None, "bob"))
            # The topic, set from the header.
            alice.click("#edit_topic")
            alice.fill("#topic_input", "Release day")
            alice.press("#topic_input", "Enter")
            for page in pages:
                page.wait_for_function("() => document.getElementById('topic').textContent === 'Release day'")
            self.screenshot(alice, "live-room.png")
            # Alice mutes Carol for ten minutes: her page may read, not send.
            self.menu(alice, "li.message[data-user-id=carol]", "mute")
            carol.wait_for_function("() => document.getElementById('inputbox').disabled")
            assert "muted" in carol.get_attribute("#inputbox", "placeholder")
            answer = self.api("POST", "/api/rooms/demo/messages", {"body": "let me speak"}, "carol")
            assert answer["error"] == "muted", answer
            # Kicked, Bob's page stops and offers to come back.
            alice.fill("#inputbox", "")
            self.api("POST", "/api/rooms/demo/moderation", {"user": "bob", "action": "kick"}, "alice")
            bob.wait_for_function("() => document.getElementById('status').dataset.state === 'stopped'")
            assert "removed you" in bob.text_content("#message_list")
            bob.click("#rejoin")
            b.wait_connected(bob)
            # Banned, Carol's long-poll page stops; so would any other.
            self.menu(alice, "li.message[data-user-id=carol]", "ban", twice=True)
            carol.wait_for_function("() => document.getElementById('status').dataset.state === 'stopped'")
            assert "banned" in carol.text_content("#message_list"), carol.text_content("#message_list")
            again = b.open(f"/rooms/demo/longpoll?token={self.token('carol')}")
            assert again.response.status == 403, again.response.status
            for page in (alice, bob):
                page.wait_for_function("() => document.body.textContent.includes('Alice banned Carol')")
            # Unread: Bob reads the lobby while Alice writes in demo.
            lobby = b.open(f"/rooms/lobby?token={self.token('bob')}", context=bob.context)
            b.wait_connected(lobby)
            # Bob's page said how far he read (a second after the last event).
            for _ in range(100):
                if self.api("GET", "/api/rooms/demo", None, "bob")["unread"] == 0:
                    break
                bob.wait_for_timeout(100)
            bob.close()
            b.pages.remove(bob)
            for i in range(3):
                b.say(alice, f"news {i}")
            b.wait_messages(alice, 5)
            lobby.wait_for_function(
                "() => document.querySelector('#sidebar_rooms li[data-room=demo] .unread')?.textContent === '3'"
            )
            back = b.open(f"/rooms/demo/sse?token={self.token('bob')}", context=lobby.context)
            b.wait_connected(back)
            b.wait_messages(back, 5)
            divider = back.eval_on_selector("#unread_divider .body", "e => e.textContent")
            assert divider == "news 0", divider
            # Scrolled up while messages come: the title counts them.
            back.eval_on_selector("#message_list", "e => { e.style.flex = '0 0 120px'; e.scrollTop = 0; }")
            for i in range(2):
                b.say(alice, f"more {i}")
            back.wait_for_function("() => document.title.startsWith('(2) ')")
            back.click("#new_messages")
            back.wait_for_function("() => !document.title.startsWith('(')")

        await self.in_browser(scenario)

    async def test_edits_resume_after_a_restart(self) -> None:
        """
        Edits and deletions made while the pages were cut off reach each
        page (WebSocket, SSE, long-poll) once, when it resumes from the
        last seq it showed, and change the messages it shows in place.
        """
        from chatd.model import User
        from chatd.store.sqlite import SQLiteStore

        async def change_while_down() -> None:
            store = SQLiteStore(os.path.join(self.folder, "chatd.sqlite3"), reactor=reactor)
            await store.open()
            ann = User("alice", "Alice")
            await store.append("demo", "Alice", "edited while you were away", 9_000_000_000_000, None, ann, "edit", 1)
            await store.append("demo", "Alice", "", 9_000_000_000_001, None, ann, "delete", 2)
            await store.close()

        def scenario(b: Browser) -> None:
            b.expected_errors += [
                r"ERR_CONNECTION_REFUSED", r"WebSocket connection to .* failed", r"status of 503",
            ]
            self.api("POST", "/api/rooms", {"name": "demo"}, "alice")
            pages = [
                b.open(f"/rooms/demo?token={self.token('alice')}"),
                b.open(f"/rooms/demo/sse?token={self.token('bob')}"),
                b.open(f"/rooms/demo/longpoll?token={self.token('carol')}"),
            ]
            for page in pages:
                b.wait_connected(page)
            b.say(pages[0], "first")
            b.say(pages[0], "second")
            for page in pages:
                b.wait_messages(page, 2)
            port = self.server.port
            blockingCallFromThread(reactor, lambda: self.server.stop("TERM"))
            for page in pages:
                page.wait_for_function("() => document.getElementById('status').dataset.state === 'reconnecting'")
            blockingCallFromThread(reactor, lambda: ensureDeferred(change_while_down()))
            blockingCallFromThread(
                reactor, lambda: ensureDeferred(ChatdProcess.start(self, *self.chatd_args(), port=port))
            )
            for page in pages:
                page.wait_for_function(
                    "() => document.querySelector('li.message[data-seq=\"2\"]')?.classList.contains('deleted')"
                )
                seen = b.messages(page)
                assert [(m["seq"], m["body"]) for m in seen] == [
                    (1, "edited while you were away"), (2, "message deleted"),
                ], seen
                assert page.locator("li.message[data-seq=\"1\"] .edited").count() == 1

        await self.in_browser(scenario)


class PresenceInTheBrowserTests(TokenUsersTestCase):
    """
    Who is here and who is typing, on every transport's page, with users
    who are who they say (tokens) in two browser profiles; and the "N
    here" count's defects, each pinned.
    """

    async def make_room(self, name: str) -> None:
        code, _, _ = await self.http.request(
            "POST", "/api/rooms", data=json.dumps({"name": name}).encode("utf-8"),
            headers={"Content-Type": ["application/json"], "Authorization": [f"Bearer {self.token('owner')}"]},
        )
        self.assertEqual(code, 201)

    @staticmethod
    def wait_text(page: Any, selector: str, text: str) -> None:
        page.wait_for_function(
            "([s, t]) => document.querySelector(s).textContent === t", arg=[selector, text]
        )

    @staticmethod
    def close(b: Browser, page: Any) -> None:
        """
        Close a page (its CSP is checked first, as for every page).
        """
        assert page.evaluate("window.__chatd_test.violations") == []
        b.pages.remove(page)
        page.close()

    @staticmethod
    def here(page: Any) -> List[str]:
        return page.eval_on_selector_all("#presence_list li.here", "els => els.map(e => e.textContent)")

    async def test_two_users_see_each_other_on_every_transport(self) -> None:
        """
        On the WebSocket, SSE and long-poll pages alike, two users see
        each other in the presence list and "2 here", see "… is typing…"
        while the other types (never themselves), and see it end when the
        other sends; the typing line is not in the message list.
        """
        for room in ("ws", "sse", "lp"):
            await self.make_room(room)

        def scenario(b: Browser) -> None:
            for room, suffix in (("ws", ""), ("sse", "/sse"), ("lp", "/longpoll")):
                alice = b.open(f"/rooms/{room}{suffix}?token={self.token('alice')}")
                bob = b.open(f"/rooms/{room}{suffix}?token={self.token('bob')}")
                for page in (alice, bob):
                    b.wait_connected(page)
                    self.wait_text(page, "#members", "2 here")
                    page.wait_for_function("() => document.querySelectorAll('#presence_list li.here').length === 2")
                    assert self.here(page) == ["Alice", "Bob"], (room, self.here(page))
                    assert page.is_visible("#presence_list")
                alice.fill("#inputbox", "hello b")
                self.wait_text(bob, "#typing", "Alice is typing…")
                assert alice.text_content("#typing") == "", room
                bob.fill("#inputbox", "hi")
                self.wait_text(alice, "#typing", "Bob is typing…")
                self.wait_text(bob, "#typing", "Alice is typing…")
                alice.press("#inputbox", "Enter")
                b.wait_messages(bob, 1)
                self.wait_text(bob, "#typing", "")
                bob.fill("#inputbox", "")
                self.wait_text(alice, "#typing", "")
                assert alice.locator("#message_list li").count() == 1, room
                for page in (alice, bob):
                    self.close(b, page)

        await self.in_browser(scenario)

    async def test_here_count_defects(self) -> None:
        """
        Five tabs of five users (on all three transports) read the same
        count once settled; a long-poll user does not drop out after a
        message; one user with three tabs counts once; the count shows on
        a phone; three typers read "3 people are typing…".
        """
        await self.make_room("five")

        def scenario(b: Browser) -> None:
            paths = ["", "/sse", "/longpoll", "", "/longpoll"]
            pages = [
                b.open(f"/rooms/five{suffix}?token={self.token(f'u{i}')}") for i, suffix in enumerate(paths)
            ]
            for page in pages:
                b.wait_connected(page)
            for page in pages:
                self.wait_text(page, "#members", "5 here")
            watched = pages[0]
            watched.evaluate(
                """() => {
                  window.__counts = [];
                  const el = document.getElementById('members');
                  new MutationObserver(() => window.__counts.push(el.textContent))
                    .observe(el, {childList: true, characterData: true, subtree: true});
                }"""
            )
            for i in range(3):
                b.say(pages[3], f"message {i}")
            for page in pages:
                b.wait_messages(page, 3)
            # The long-poll pages have been answered and polled again.
            b.say(pages[2], "from long-poll")
            for page in pages:
                b.wait_messages(page, 4)
            more = [b.open(f"/rooms/five{suffix}?token={self.token('u0')}") for suffix in ("", "/longpoll")]
            for page in more:
                b.wait_connected(page)
                self.wait_text(page, "#members", "5 here")
            for page in pages:
                self.wait_text(page, "#members", "5 here")
            counts = watched.evaluate("window.__counts")
            assert set(counts) <= {"5 here"}, counts
            for page in more:
                self.close(b, page)
            phone = b.open(f"/rooms/five?token={self.token('u5')}", viewport={"width": 375, "height": 667})
            b.wait_connected(phone)
            self.wait_text(phone, "#members", "6 here")
            box = phone.locator("#members").bounding_box()
            assert phone.is_visible("#members") and box is not None and box["x"] + box["width"] <= 375, box
            for page in pages[:3]:
                page.fill("#inputbox", "typing along")
            self.wait_text(pages[4], "#typing", "3 people are typing…")
            self.wait_text(phone, "#typing", "3 people are typing…")
            self.wait_text(pages[0], "#typing", "U1 and U2 are typing…")
            self.screenshot(pages[0], "presence-desktop.png")
            self.screenshot(phone, "presence-phone.png")

        await self.in_browser(scenario)
