# -*- test-case-name: tests.test_auth -*-
"""
The auth adapter: who a request is from.

  - L{TokenVerifier}: JSON Web Tokens an application's backend signs
    (PyJWT): HS256 with shared secrets, RS256 or ES256 with public keys;
    C{exp} and C{sub} required, C{aud} and C{iss} checked when configured.
  - L{Passwords}: argon2 hashes (argon2-cffi), computed in a small thread
    pool of their own, never in the reactor thread.
  - L{Sessions}: signed-in browsers.  The cookie holds a random secret,
    signed with the deployment's secret (itsdangerous), so a forged
    cookie is refused without asking the store; the store keeps only the
    secret's SHA-256, with the session's CSRF token.
  - L{Keys}: API keys for an application's backend, C{ck_ID_SECRET}; the
    store keeps the SHA-256 of the secret part.
  - L{Authenticator}: the rules that pick one of these for a request, the
    same for the HTTP and the WebSocket adapters, which only read the
    credentials off their own requests (L{Credentials}).

Nothing here logs a password, a token or a cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from itsdangerous import BadSignature, Signer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from chatd.model import (
    GUEST,
    MAX_NICK,
    ChatError,
    Identity,
    User,
    validate_display_name,
    validate_user_id,
)

__all__ = [
    "AUTH_MODES",
    "Authenticator",
    "Credentials",
    "Keys",
    "Passwords",
    "SESSION_COOKIE",
    "SessionWatch",
    "Sessions",
    "TOKEN_GRACE",
    "TokenVerifier",
    "check_csrf",
    "digest",
]

_log = Logger(namespace="chatd.auth")

#: What --auth may be.
AUTH_MODES = ("open", "token", "accounts")
#: Seconds of clock difference allowed when checking C{exp}, C{nbf}, C{iat}.
TOKEN_LEEWAY = 30.0
#: The longest token read (a longer one is refused before it is decoded).
MAX_TOKEN = 8 * 1024
#: How long past its token's C{exp} a connection (a WebSocket, an event
#: stream) stays open, for the client to bring a fresh token.
TOKEN_GRACE = 30.0
#: The session cookie's name.
SESSION_COOKIE = b"chatd_session"
#: How long a session lasts.
SESSION_TTL = 14 * 24 * 3600.0
#: How long a node trusts a session or key it looked up (ending one on
#: another node takes effect here within this time).
CACHE_TTL = 5.0
#: The most sessions and keys a node remembers at once.
CACHE_SIZE = 10_000
#: API keys start with this.
KEY_PREFIX = "ck_"


def digest(secret: str) -> str:
    """
    The SHA-256 of a random secret, as the store keeps it.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def invalid_token(detail: str) -> ChatError:
    return ChatError("invalid_token", detail)


# -- tokens -------------------------------------------------------------------


class TokenVerifier:
    """
    Checks the tokens an application's backend signs.

    @param secrets: HS256 secrets (several during a rotation: a token
        signed with any of them is good).
    @param public_keys: PEM public keys, RSA (RS256) or EC P-256 (ES256).
    @param audience: if given, the C{aud} every token must name.
    @param issuer: if given, the C{iss} every token must have.
    """

    def __init__(
        self,
        secrets: Sequence[bytes] = (),
        public_keys: Sequence[bytes] = (),
        audience: Optional[str] = None,
        issuer: Optional[str] = None,
        leeway: float = TOKEN_LEEWAY,
    ) -> None:
        self._keys: List[Tuple[Any, List[str]]] = []
        for secret in secrets:
            if len(secret) < 32:
                raise ValueError("an HS256 secret must be at least 32 bytes")
            self._keys.append((secret, ["HS256"]))
        for pem in public_keys:
            key = load_pem_public_key(pem)
            if isinstance(key, rsa.RSAPublicKey):
                self._keys.append((key, ["RS256"]))
            elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
                self._keys.append((key, ["ES256"]))
            else:
                raise ValueError("a public key must be RSA (RS256) or EC P-256 (ES256)")
        if not self._keys:
            raise ValueError("no key to check tokens with")
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway

    def verify(self, token: object) -> Identity:
        """
        The identity a token proves.

        @raise ChatError: C{invalid_token} (a bad signature, an algorithm
            not allowed, C{alg: none}, a wrong audience or issuer, a
            missing claim, a malformed token) or C{token_expired}.
        """
        # A JWT is base64url and dots: anything else (lone surrogates,
        # which PyJWT cannot even encode, included) is refused unread.
        if (
            not isinstance(token, str)
            or not token
            or len(token) > MAX_TOKEN
            or not token.isascii()
        ):
            raise invalid_token(f"A token is a JWT of at most {MAX_TOKEN} characters.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid_token("The token is not a JWT.") from None
        algorithm = header.get("alg")
        keys = [(key, algs) for key, algs in self._keys if algorithm in algs]
        if not keys:
            raise invalid_token(f"Tokens signed with {algorithm!r} are not accepted here.")
        claims = None
        for key, algorithms in keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
                )
                break
            except jwt.InvalidSignatureError:
                continue  # another key, during a rotation
            except jwt.ExpiredSignatureError:
                raise ChatError("token_expired", "The token has expired; get a new one.") from None
            except jwt.MissingRequiredClaimError as e:
                raise invalid_token(f"The token has no {e.claim!r} claim.") from None
            except jwt.InvalidAudienceError:
                raise invalid_token("The token is for another audience (aud).") from None
            except jwt.InvalidIssuerError:
                raise invalid_token("The token is from another issuer (iss).") from None
            except jwt.ImmatureSignatureError:
                raise invalid_token("The token is not valid yet (nbf or iat).") from None
            except jwt.InvalidTokenError as e:
                raise invalid_token(f"The token is not valid: {e}") from None
        if claims is None:
            raise invalid_token("The token's signature does not match any key.")
        return _token_identity(claims)


def _token_identity(claims: dict) -> Identity:
    try:
        user_id = validate_user_id(claims["sub"])
        # Without a name, the sub names the user: ids may be longer than
        # names, so only its first MAX_NICK characters.
        name = validate_display_name(
            claims["name"] if "name" in claims else user_id[:MAX_NICK].strip()
        )
    except ChatError as e:
        raise invalid_token(f"The token's claims are not usable: {e.detail}") from None
    expires = claims["exp"]
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise invalid_token("exp must be a number.")
    try:
        return Identity(User(user_id, name), "token", expires=float(expires))
    except OverflowError:
        raise invalid_token("exp is out of range.") from None


def mint(
    secret: bytes,
    user_id: str,
    name: Optional[str],
    ttl: float,
    audience: Optional[str] = None,
    issuer: Optional[str] = None,
    now: Optional[float] = None,
) -> str:
    """
    Sign an HS256 token, as an application's backend would (for
    C{chatd admin token}, scripts and tests).
    """
    issued = int(time.time() if now is None else now)
    claims: dict = {"sub": user_id, "iat": issued, "exp": issued + int(ttl)}
    if name is not None:
        claims["name"] = name
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


# -- passwords ---------------------------------------------------------------

#: The shortest and longest password accepted.
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


def validate_password(password: object) -> str:
    """
    @raise ChatError: C{invalid_password}.
    """
    if (
        not isinstance(password, str)
        or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD
        or not _encodable(password)
    ):
        raise ChatError(
            "invalid_password", f"A password is {MIN_PASSWORD} to {MAX_PASSWORD} characters."
        )
    return password


class Passwords:
    """
    argon2 password hashes, made and checked in a thread pool of their own
    (each takes tens of milliseconds and tens of MiB: two at a time at
    most, and at most L{MAX_QUEUED} waiting, beyond which chatd is busy).

    @param hasher: the argon2-cffi hasher (its defaults: RFC 9106's
        low-memory profile).
    """

    MAX_QUEUED = 64

    def __init__(self, reactor: Any, hasher: Optional[PasswordHasher] = None, threads: int = 2) -> None:
        self._reactor = reactor
        self._hasher = hasher if hasher is not None else PasswordHasher()
        self._pool = ThreadPool(1, threads, name="chatd-passwords")
        self._started = False
        self._queued = 0
        # A hash to check against when there is no account, so that a
        # missing account costs the same time as a wrong password.
        self._dummy: Optional[str] = None

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._pool.start()

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()

    def _run(self, work: Callable[..., Any], *args: Any) -> Deferred:
        if self._queued >= self.MAX_QUEUED:
            return fail(ChatError("server_busy", "Too many sign-ins at once; try again.", 1.0))
        self.start()
        self._queued += 1

        def done(result: object) -> object:
            self._queued -= 1
            return result

        return deferToThreadPool(self._reactor, self._pool, work, *args).addBoth(done)

    def hash(self, password: str) -> Deferred:
        """
        @return: a Deferred firing with the hash of C{password}.
        """
        return self._run(self._hasher.hash, password)

    def verify(self, stored: Optional[str], password: str) -> Deferred:
        """
        @return: a Deferred firing with C{(matches, new_hash)}: new_hash
            is a fresh hash to store when the stored one was made with
            weaker parameters than today's, else None.
        """
        hasher = self._hasher

        def check() -> Tuple[bool, Optional[str]]:
            if stored is None:
                if self._dummy is None:
                    self._dummy = hasher.hash(secrets.token_hex(16))
                _matches(hasher, self._dummy, password)
                return False, None
            if not _matches(hasher, stored, password):
                return False, None
            return True, (hasher.hash(password) if hasher.check_needs_rehash(stored) else None)

        return self._run(check)


def _encodable(text: str) -> bool:
    """
    Whether C{text} has a UTF-8 encoding (no lone surrogates).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _matches(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return bool(hasher.verify(stored, password))
    # ValueError: a stored hash argon2-cffi cannot even read as ASCII (or a
    # password it cannot encode) is a mismatch too.
    except (VerifyMismatchError, VerificationError, InvalidHashError, ValueError):
        return False


# -- sessions and keys ---------------------------------------------------------


class _Cache:
    """
    Lookups a node trusts for L{CACHE_TTL} seconds, at most L{CACHE_SIZE}.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._entries: "OrderedDict[str, Tuple[float, Any]]" = OrderedDict()

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None or entry[0] < self._clock.seconds():
            return None
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = (self._clock.seconds() + CACHE_TTL, value)
        self._entries.move_to_end(key)
        while len(self._entries) > CACHE_SIZE:
            self._entries.popitem(last=False)

    def drop(self, match: Callable[[str, Any], bool]) -> None:
        for key in [k for k, (_, v) in self._entries.items() if match(k, v)]:
            del self._entries[key]


class Sessions:
    """
    Signed-in browsers: start, look up and end sessions.

    @param secret: the deployment's secret (L{IIdentityStore.secret}),
        which signs the cookies, or a function that returns it.
    """

    def __init__(
        self,
        store: Any,
        clock: Any,
        secret: Union[str, Callable[[], Optional[str]]],
        ttl: float = SESSION_TTL,
    ) -> None:
        self._store = store
        self._clock = clock
        self._secret = secret
        self._signer_made: Optional[Signer] = None
        self.ttl = ttl
        self._cache = _Cache(clock)

    @property
    def _signer(self) -> Signer:
        # Made on first use: the deployment's secret is known once the
        # store is open (C{secret} may be a function that reads it then).
        if self._signer_made is None:
            secret = self._secret if isinstance(self._secret, str) else self._secret()
            if not secret:
                raise RuntimeError("the deployment's secret is not known yet")
            self._signer_made = Signer(secret, salt="chatd.session")
        return self._signer_made

    def start(self, user: User) -> Deferred:
        """
        @return: a Deferred firing with C{(cookie value, identity)}.
        """
        raw = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = self._clock.seconds()
        expires = now + self.ttl
        session = digest(raw)
        d = self._store.create_session(session, user.id, csrf, int(now * 1000), int(expires * 1000))
        identity = Identity(user, "session", expires=expires, session=session, csrf=csrf)
        cookie = self._signer.sign(raw.encode("ascii"))
        return d.addCallback(lambda _: (cookie, identity))

    def identify(self, cookie: Optional[bytes]) -> Deferred:
        """
        @return: a Deferred firing with the session's L{Identity}, or None
            for no cookie, a forged one, or a session that ended.
        """
        if not cookie or len(cookie) > 256:
            return succeed(None)
        try:
            raw = self._signer.unsign(cookie).decode("ascii")
        except (BadSignature, UnicodeDecodeError):
            return succeed(None)
        session = digest(raw)
        cached = self._cache.get(session)
        if cached is not None:
            if cached.expires is not None and cached.expires < self._clock.seconds():
                self._cache.drop(lambda key, _: key == session)
                return succeed(None)
            return succeed(cached)

        def found(row: Optional[Tuple[str, str, str, int]]) -> Optional[Identity]:
            if row is None:
                return None
            user_id, name, csrf, expires_ms = row
            identity = Identity(
                User(user_id, name), "session", expires=expires_ms / 1000, session=session, csrf=csrf
            )
            self._cache.put(session, identity)
            return identity

        now_ms = int(self._clock.seconds() * 1000)
        return self._store.get_session(session, now_ms).addCallback(found)

    def end(self, identity: Identity) -> Deferred:
        """
        Sign out: end C{identity}'s session.
        """
        session = identity.session
        self._cache.drop(lambda key, _: key == session)
        return self._store.end_sessions(session=session)

    def end_all(self, user_id: str) -> Deferred:
        """
        End every session of C{user_id} (those this node trusts at once).
        """
        self._cache.drop(lambda _, identity: identity.user_id == user_id)
        return self._store.end_sessions(user_id=user_id)


class SessionWatch:
    """
    Who relies on a session right now (a WebSocket opened with it, a
    long-poll it authorised), and telling them once it ends: at once when
    it ends on this node (signing out, revoked here), and within
    L{CACHE_TTL} seconds when it ends elsewhere (L{recheck}: one query for
    every session watched).
    """

    def __init__(self, store: Any, clock: Any) -> None:
        self._store = store
        self._clock = clock
        #: session: {watcher: (user_id, on_end)}
        self._watchers: Dict[str, Dict[object, Tuple[Optional[str], Callable[[], None]]]] = {}

    def watch(self, identity: Identity, on_end: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{on_end} once C{identity}'s session ends (nothing for other
        identities).

        @return: the function that stops watching.
        """
        session = identity.session
        if identity.via != "session" or session is None:
            return _nothing
        key = object()
        self._watchers.setdefault(session, {})[key] = (identity.user_id, on_end)

        def unwatch() -> None:
            held = self._watchers.get(session)
            if held is not None:
                held.pop(key, None)
                if not held:
                    del self._watchers[session]

        return unwatch

    def ended(self, session: Optional[str] = None, user_id: Optional[str] = None) -> None:
        """
        A session (or every session of C{user_id}) ended.
        """
        if session is not None:
            sessions = [session] if session in self._watchers else []
        else:
            sessions = [
                s for s, held in self._watchers.items() if any(u == user_id for u, _ in held.values())
            ]
        for ending in sessions:
            for _, on_end in list(self._watchers.pop(ending, {}).values()):
                try:
                    on_end()
                except Exception:
                    _log.failure("Telling a client its session ended failed")

    def recheck(self) -> Deferred:
        """
        Ask the store which watched sessions still live; end the others.
        """
        sessions = sorted(self._watchers)
        if not sessions:
            return succeed(None)
        now_ms = int(self._clock.seconds() * 1000)

        def compare(live: Set[str]) -> None:
            for session in sessions:
                if session not in live:
                    self.ended(session=session)

        def failed(failure: Any) -> None:
            _log.failure("Could not check the sessions in use", failure)

        return self._store.live_sessions(sessions, now_ms).addCallbacks(compare, failed)


def _nothing() -> None:
    pass


def check_csrf(identity: Identity, given: Optional[str]) -> None:
    """
    A state change authorised by a session cookie must carry the
    session's CSRF token (a header or form field that another site's page
    cannot know).

    @raise ChatError: C{csrf_failed}.
    """
    if identity.via != "session":
        return
    expected = identity.csrf or ""
    # (CSRF tokens are ASCII: anything else, or not a string, is wrong.)
    if (
        not isinstance(given, str)
        or not given
        or not given.isascii()
        or not hmac.compare_digest(given.encode("ascii"), expected.encode("utf-8"))
    ):
        raise ChatError(
            "csrf_failed",
            "This change needs the page's CSRF token (the X-CSRF-Token header or a csrf field).",
        )


def new_key() -> Tuple[str, str]:
    """
    A new API key: its public id, and the whole key (shown once).
    """
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """
    An API key's id and secret, or None if it is not shaped like one.
    """
    # Keys are ASCII (hex ids, base64url secrets).
    if not key.startswith(KEY_PREFIX) or len(key) > 128 or not key.isascii():
        return None
    key_id, _, secret = key[len(KEY_PREFIX):].partition("_")
    if not key_id or not secret:
        return None
    return key_id, secret


class Keys:
    """
    API keys: made by C{chatd admin key create}, sent as
    C{Authorization: Bearer ck_...}.
    """

    def __init__(self, store: Any, clock: Any) -> None:
        self._store = store
        self._clock = clock
        self._cache = _Cache(clock)

    def identify(self, key: str) -> Deferred:
        """
        @return: a Deferred firing with the key's L{Identity}, or failing
            with C{invalid_key}.
        """
        parts = split_key(key)
        refused = ChatError("invalid_key", "The API key is not valid (or was revoked).")
        if parts is None:
            return fail(refused)
        key_id, secret = parts
        cached = self._cache.get(key)
        if cached is not None:
            return succeed(cached)

        def found(row: Optional[Tuple[str, str]]) -> Identity:
            if row is None or not hmac.compare_digest(row[0], digest(secret)):
                raise refused
            identity = Identity(None, "key", key=key_id)
            self._cache.put(key, identity)
            return identity

        return self._store.get_key(key_id).addCallback(found)

    def forget(self, key_id: str) -> None:
        """
        A key was revoked: stop trusting it here at once.
        """
        self._cache.drop(lambda _, identity: identity.key == key_id)


# -- the rules ---------------------------------------------------------------


class Credentials(NamedTuple):
    """
    What a request carries, as its adapter read it.

    @ivar bearer: the C{Authorization: Bearer} value.
    @ivar token: the C{?token=} query parameter.
    @ivar cookie: the session cookie.
    @ivar cross_site: a JSONP read (or anything else another site's page
        can make a browser send with its cookies and read): cookies do not
        count.
    """

    bearer: Optional[str] = None
    token: Optional[str] = None
    cookie: Optional[bytes] = None
    cross_site: bool = False


class Authenticator:
    """
    Who a request is from, by the same rules on every transport: an API
    key or a token (in C{Authorization: Bearer}, or a token in C{?token=})
    if one is given, and a bad one is refused, not taken for a guest; else
    the session cookie, with C{--auth accounts}, except for cross-site
    reads; else a guest.

    @param mode: C{open}, C{token} or C{accounts} (L{AUTH_MODES}).
    @param tokens: how tokens are checked, if they are accepted.
    @param sessions: the sessions, with accounts.
    """

    def __init__(
        self,
        mode: str,
        keys: Keys,
        tokens: Optional[TokenVerifier] = None,
        sessions: Optional[Sessions] = None,
    ) -> None:
        if mode not in AUTH_MODES:
            raise ValueError(f"unknown auth mode {mode!r}")
        self.mode = mode
        self.keys = keys
        self.tokens = tokens
        self.sessions = sessions

    def identify_now(self, credentials: Credentials) -> Optional[Identity]:
        """
        L{identify}, when it needs no store: a guest or a token user.

        @return: None when it needs the store (a key, a cookie).
        @raise ChatError: for a bad token.
        """
        bearer, token, cookie, cross_site = credentials
        if bearer is not None and token is not None:
            raise invalid_token("Send one credential: Authorization or ?token=, not both.")
        if bearer is not None:
            if bearer.startswith(KEY_PREFIX):
                return None
            return self._token(bearer)
        if token is not None:
            return self._token(token)
        if cookie and self.sessions is not None and not cross_site:
            return None
        return GUEST

    def identify(self, credentials: Credentials) -> Deferred:
        """
        @return: a Deferred firing with the L{Identity}, or failing with
            C{invalid_token}, C{token_expired} or C{invalid_key}.
        """
        try:
            identity = self.identify_now(credentials)
        except ChatError as e:
            return fail(e)
        if identity is not None:
            return succeed(identity)
        bearer, _, cookie, _ = credentials
        if bearer is not None:
            return self.keys.identify(bearer)
        assert self.sessions is not None
        return self.sessions.identify(cookie).addCallback(lambda found: found or GUEST)

    def _token(self, token: str) -> Identity:
        if self.tokens is None:
            raise invalid_token("This server does not take tokens (see --auth).")
        return self.tokens.verify(token)
