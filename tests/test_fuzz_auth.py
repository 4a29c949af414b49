"""
Property-based abuse of what identity added: sign-up and sign-in, the
members and server API, and credentials of every shape (tokens, keys,
cookies, CSRF tokens) on every route.  Every answer is a documented status
with a JSON error (or a page), nothing is logged as a failure, and nothing
lets a stranger into a private room.

Hypothesis runs derandomized, so every run tries the same cases.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from chatd._paths import find_data_dir
from chatd.accounts import Accounts
from chatd.auth import (
    Authenticator,
    Keys,
    Sessions,
    TokenVerifier,
    digest,
    mint,
    new_key,
    split_key,
)
from chatd.core import ChatCore
from chatd.limits import RateLimiter
from chatd.model import User
from chatd.store.memory import MemoryStore
from chatd.web import ChatWeb, make_environment
from tests.test_fuzz import BASE, FUZZ, json_values

SECRET = b"fuzz-secret-fuzz-secret-fuzz-secret"
DOCUMENTED = {200, 201, 303, 400, 401, 403, 404, 405, 409, 413, 415, 429, 503}


class _Passwords:
    """
    Stands in for argon2 (whose thread pool a synchronous test cannot
    wait for): a hash is the password, marked.
    """

    def hash(self, password: str) -> Deferred:
        return succeed("h:" + password)

    def verify(self, stored: Optional[str], password: str) -> Deferred:
        return succeed((stored == "h:" + password, None))


text = st.text(max_size=40)
credential = (
    st.none()
    | text
    | st.just("ck_")
    | st.just("ck_x_y")
    | st.builds(lambda s: mint(SECRET, s, None, 600), st.text(min_size=1, max_size=20))
    | st.builds(lambda s: mint(SECRET, "u", s, -600), st.text(max_size=10))
)
fields = st.dictionaries(
    st.sampled_from(
        ["user", "name", "password", "invite", "next", "role", "private", "guests", "owner", "as",
         "bot", "body", "nick", "csrf"]
    ),
    json_values | text,
    max_size=6,
)


class AuthFuzzTests(SynchronousTestCase):
    """
    The routes identity added, and credentials on the old ones.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MemoryStore()
        self.core = ChatCore(self.store, self.clock, guests=False)
        self.core.start()
        sessions = Sessions(self.store, self.clock, "deployment-secret")
        auth = Authenticator("accounts", Keys(self.store, self.clock), TokenVerifier([SECRET]), sessions)
        accounts = Accounts(self.store, self.clock, _Passwords(), sessions)  # type: ignore[arg-type]
        templates, static = find_data_dir("templates"), find_data_dir("static")
        assert templates is not None and static is not None
        self.web = ChatWeb(
            self.core, make_environment(templates), static, Resource(), auth=auth, accounts=accounts,
            key_limiter=RateLimiter(self.clock, 10_000, 1000.0),
        )
        self.stub = StubTreq(self.web.resource())
        key_id, self.key = new_key()
        parts = split_key(self.key)
        assert parts is not None
        self.store.add_key(key_id, digest(parts[1]), "fuzz", 0)
        self.successResultOf(
            self.core.create_room("secret", identity=_as("alice"), private=True)
        )
        self.successResultOf(self.core.post("secret", None, "the vault", identity=_as("alice")))

    def request(
        self, method: str, path: str, payload: Any = None, headers: Optional[Dict[str, str]] = None
    ) -> Tuple[int, Any, bytes]:
        sent = {k: [v] for k, v in (headers or {}).items()}
        data = None
        if payload is not None:
            sent["Content-Type"] = ["application/json"]
            data = json.dumps(payload).encode("utf-8")
        d = self.stub.request(method, BASE + path, data=data, headers=sent)
        self.stub.flush()
        self.clock.advance(61)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.stub.content(response))
        return response.code, response.headers, content

    def check(self, code: int, headers: Any, content: bytes) -> None:
        self.assertIn(code, DOCUMENTED, content[:300])
        kind = (headers.getRawHeaders("content-type") or [""])[0]
        if code >= 400 and "json" in kind:
            answer = json.loads(content)
            self.assertEqual(set(answer), {"error", "detail"})
        self.assertNotIn(b"vault", content)
        self.assertEqual(self.flushLoggedErrors(), [])

    @FUZZ
    @given(path=st.sampled_from(["/account/signup", "/account/signin"]), payload=fields)
    def test_accounts(self, path: str, payload: Dict[str, Any]) -> None:
        """
        Sign-up and sign-in with fields of any shape.
        """
        self.check(*self.request("POST", path, payload))

    @FUZZ
    @given(
        bearer=credential,
        token=credential,
        cookie=st.none() | text | st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
        csrf=st.none() | text,
        route=st.sampled_from(
            [
                ("GET", "/api/rooms/secret/messages?after=0&timeout=0"),
                ("GET", "/api/rooms/secret/messages?after=0&callback=cb"),
                ("GET", "/api/rooms"),
                ("GET", "/api/rooms/lobby/messages?before=5"),
                ("GET", "/rooms/secret"),
                ("GET", "/api/me"),
                ("POST", "/api/rooms/secret/messages"),
                ("POST", "/api/rooms/lobby/messages"),
                ("POST", "/api/rooms/secret/members"),
                ("DELETE", "/api/rooms/secret/members/alice"),
                ("POST", "/account/signout"),
                ("DELETE", "/api/users/alice/sessions"),
            ]
        ),
        payload=fields,
    )
    def test_credentials_everywhere(
        self,
        bearer: Optional[str],
        token: Optional[str],
        cookie: Optional[str],
        csrf: Optional[str],
        route: Tuple[str, str],
        payload: Dict[str, Any],
    ) -> None:
        """
        Any Authorization header, ?token=, cookie and CSRF token on any
        route: a documented answer, and nobody reads the private room.
        """
        method, path = route
        headers: Dict[str, str] = {}
        if bearer is not None and bearer.isprintable() and bearer.isascii():
            headers["Authorization"] = f"Bearer {bearer}"
        if cookie is not None and cookie.isprintable() and cookie.isascii():
            headers["Cookie"] = f"chatd_session={cookie}"
        if csrf is not None and csrf.isprintable() and csrf.isascii():
            headers["X-CSRF-Token"] = csrf
        if token is not None:
            from urllib.parse import quote

            path += ("&" if "?" in path else "?") + "token=" + quote(token, safe="")
        self.check(*self.request(method, path, payload if method == "POST" else None, headers))
        access = self.core.room("secret").access
        self.assertEqual(access.members, {"alice": "owner"})

    @FUZZ
    @given(
        route=st.sampled_from(
            [
                ("POST", "/api/rooms"),
                ("POST", "/api/rooms/lobby/members"),
                ("POST", "/api/rooms/lobby/messages"),
                ("POST", "/api/rooms/secret/messages"),
            ]
        ),
        payload=fields,
        user=st.text(max_size=20),
    )
    def test_server_api(self, route: Tuple[str, str], payload: Dict[str, Any], user: str) -> None:
        """
        The API key's routes with fields of any shape, and any user in a
        member's URL.
        """
        headers = {"Authorization": f"Bearer {self.key}"}
        self.check(*self.request(*route, payload, headers))
        from urllib.parse import quote

        self.check(
            *self.request("DELETE", f"/api/rooms/lobby/members/{quote(user, safe='')}", None, headers)
        )


def _as(user: str) -> Any:
    from chatd.model import Identity

    return Identity(User(user, user.title()), "token", expires=2e9)
