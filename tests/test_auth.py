"""
chatd.auth, attacked: forged, confused, expired, oversized and malformed
tokens (by hand and by hypothesis), password hashing off the reactor
thread, session cookies and API keys that must be refused without asking
the store, CSRF, the rules that pick an identity for a request, and the
identity half of every store (memory, SQLite, PostgreSQL), which must
behave alike.

PostgreSQL must be reachable (127.0.0.1:5432, database test): its tests
fail, never skip, without it.  Hypothesis runs derandomized, so every run
tries the same cases.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import string
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import jwt
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jwt.utils import base64url_decode
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd import auth
from chatd._wire import STATUS, http_status
from chatd.auth import (
    CACHE_TTL,
    KEY_PREFIX,
    MAX_TOKEN,
    Authenticator,
    Credentials,
    Keys,
    Passwords,
    Sessions,
    TokenVerifier,
    check_csrf,
    digest,
    mint,
    new_key,
    split_key,
    validate_password,
)
from chatd.model import GUEST, ChatError, Identity, Message, RoomAccess, User
from chatd.store.memory import MemoryStore
from chatd.store.postgres import PostgresStore
from chatd.store.sqlite import SQLiteStore
from tests.test_store import postgres_url

#: HS256 secrets (at least 32 bytes each).
SECRET = b"s" * 32
OLD_SECRET = b"o" * 40
NEW_SECRET = b"n" * 48

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: Every character, lone surrogates included: a JSON body or WebSocket
#: frame can carry "\\ud800", and json.loads makes it a str.
any_text = st.text(st.characters(exclude_categories=()), max_size=200)


def b64(data: bytes) -> str:
    """
    Unpadded base64url, as in a JWT.
    """
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segments(header: Any, claims: Any) -> str:
    """
    The signing input of a JWT with this header and payload (any JSON).
    """
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


def hs256(key: bytes, claims: Any, header: Optional[Dict[str, Any]] = None) -> str:
    """
    A JWT signed by hand with HMAC-SHA256 and C{key}, whatever the claims
    and the header (PyJWT itself refuses some of what an attacker sends).
    """
    signing_input = segments({"alg": "HS256", "typ": "JWT"} if header is None else header, claims)
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key(curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve)


def claims(sub: Any = "alice", ttl: float = 3600, **more: Any) -> Dict[str, Any]:
    """
    Claims for a token valid for C{ttl} seconds from now (the wall clock:
    PyJWT, and so L{TokenVerifier}, read it).
    """
    now = int(time.time())
    found: Dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl)}
    found.update(more)
    return found


class CountingStore:
    """
    A store that counts the identity lookups made through it.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.lookups: List[Tuple[str, Any]] = []

    def get_session(self, session: str, now_ms: int) -> Any:
        self.lookups.append(("get_session", session))
        return self._store.get_session(session, now_ms)

    def get_key(self, key_id: str) -> Any:
        self.lookups.append(("get_key", key_id))
        return self._store.get_key(key_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


# -- the error codes ---------------------------------------------------------------


class StatusTests(SynchronousTestCase):
    """
    Every code chatd.auth refuses with has an HTTP status.
    """

    def test_auth_codes_have_statuses(self) -> None:
        """
        invalid_token, token_expired, invalid_key and auth_required are 401,
        csrf_failed is 403, and http_status finds each of them.
        """
        expected = {
            "invalid_token": 401,
            "token_expired": 401,
            "invalid_key": 401,
            "auth_required": 401,
            "csrf_failed": 403,
        }
        self.assertEqual({code: STATUS.get(code) for code in expected}, expected)
        for code, status in expected.items():
            self.assertEqual(http_status(ChatError(code, "x")), status)

    def test_server_busy_has_a_status(self) -> None:
        """
        server_busy (too many password checks queued) is a 503.
        """
        self.assertEqual(STATUS.get("server_busy"), 503)

    def test_invalid_password_has_a_status(self) -> None:
        """
        invalid_password (validate_password) is a client error.
        """
        self.assertIn(STATUS.get("invalid_password"), range(400, 500))


# -- tokens --------------------------------------------------------------------------


class TokenVerifierTests(SynchronousTestCase):
    """
    L{TokenVerifier} accepts exactly the tokens its keys signed, with the
    claims it requires, and refuses everything else with a L{ChatError}.
    """

    def setUp(self) -> None:
        self.verifier = TokenVerifier([SECRET])

    def refused(self, verifier: TokenVerifier, token: object, code: str = "invalid_token") -> ChatError:
        """
        C{verifier} refuses C{token} with C{code}.
        """
        error = self.assertRaises(ChatError, verifier.verify, token)
        self.assertEqual(error.code, code, error.detail)
        return error

    def test_good_token(self) -> None:
        """
        A token signed with the secret is a token identity of its sub and
        name, expiring at its exp.
        """
        token = mint(SECRET, "alice", "Alice Liddell", 3600)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        identity = self.verifier.verify(token)
        self.assertIsInstance(identity, Identity)
        self.assertEqual(identity.via, "token")
        self.assertEqual(identity.user, User("alice", "Alice Liddell"))
        self.assertEqual(identity.expires, float(exp))
        self.assertFalse(identity.guest)

    def test_name_defaults_to_sub(self) -> None:
        """
        Without a name claim, the user's name is their sub.
        """
        identity = self.verifier.verify(mint(SECRET, "bob", None, 3600))
        self.assertEqual(identity.user, User("bob", "bob"))

    def test_long_sub_without_name(self) -> None:
        """
        A sub of up to 128 characters is a valid user id, and a token with
        no name is still usable: the name taken from the sub fits the
        display-name rules.
        """
        for sub in ["u" * 33, "google-oauth2|" + "1" * 30, "x" * 128]:
            identity = self.verifier.verify(mint(SECRET, sub, None, 3600))
            assert identity.user is not None
            self.assertEqual(identity.user.id, sub)
            self.assertTrue(identity.user.name)
            self.assertEqual(auth.validate_display_name(identity.user.name), identity.user.name)

    def test_bad_signature(self) -> None:
        """
        A token signed with another secret is refused.
        """
        self.refused(self.verifier, mint(b"x" * 32, "alice", "Alice", 3600))

    def test_alg_none(self) -> None:
        """
        An unsigned token (alg none, in any spelling, with or without a
        signature segment) is refused.
        """
        payload = claims()
        for alg in ["none", "None", "NONE", "nOnE"]:
            unsigned = segments({"alg": alg, "typ": "JWT"}, payload)
            self.refused(self.verifier, unsigned + ".")
            self.refused(self.verifier, unsigned)
        self.refused(self.verifier, segments({"typ": "JWT"}, payload) + ".")

    def test_hmac_with_public_key(self) -> None:
        """
        Algorithm confusion: an HS256 token whose HMAC secret is the RSA
        public key's PEM (which anyone may know) is refused by a verifier
        that holds that public key, with or without HS256 secrets of its own.
        """
        pem = public_pem(rsa_key())
        forged = hs256(pem, claims())
        self.refused(TokenVerifier(public_keys=[pem]), forged)
        self.refused(TokenVerifier([SECRET], public_keys=[pem]), forged)
        ec_pem = public_pem(ec_key(ec.SECP256R1()))
        self.refused(TokenVerifier(public_keys=[ec_pem]), hs256(ec_pem, claims()))

    def test_rs256(self) -> None:
        """
        RS256 tokens are checked with the RSA public key; one signed by
        another RSA key is refused.
        """
        key = rsa_key()
        verifier = TokenVerifier(public_keys=[public_pem(key)])
        identity = verifier.verify(jwt.encode(claims("carol", name="Carol"), key, algorithm="RS256"))
        self.assertEqual((identity.via, identity.user), ("token", User("carol", "Carol")))
        self.refused(verifier, jwt.encode(claims(), rsa_key(), algorithm="RS256"))

    def test_es256(self) -> None:
        """
        ES256 tokens are checked with the P-256 public key; one signed by
        another P-256 key is refused.
        """
        key = ec_key(ec.SECP256R1())
        verifier = TokenVerifier(public_keys=[public_pem(key)])
        identity = verifier.verify(jwt.encode(claims("dave"), key, algorithm="ES256"))
        self.assertEqual(identity.user, User("dave", "dave"))
        self.refused(verifier, jwt.encode(claims(), ec_key(ec.SECP256R1()), algorithm="ES256"))

    def test_es256_needs_an_ec_key(self) -> None:
        """
        An ES256 token is refused by a verifier with only an RSA key (and
        an RS256 token by one with only a P-256 key, or only secrets).
        """
        rsa_private, ec_private = rsa_key(), ec_key(ec.SECP256R1())
        es256 = jwt.encode(claims(), ec_private, algorithm="ES256")
        rs256 = jwt.encode(claims(), rsa_private, algorithm="RS256")
        self.refused(TokenVerifier(public_keys=[public_pem(rsa_private)]), es256)
        self.refused(TokenVerifier(public_keys=[public_pem(ec_private)]), rs256)
        self.refused(self.verifier, rs256)
        self.refused(self.verifier, es256)

    def test_other_algorithms_refused(self) -> None:
        """
        HS384/HS512 with the right secret, PS256 with the right RSA key and
        ES384 are not accepted: only HS256, RS256 and ES256 are.
        """
        key, secret = rsa_key(), b"6" * 64
        verifier = TokenVerifier([secret], public_keys=[public_pem(key)])
        for alg in ["HS384", "HS512"]:
            self.refused(verifier, jwt.encode(claims(), secret, algorithm=alg))
        self.refused(verifier, jwt.encode(claims(), key, algorithm="PS256"))
        self.refused(verifier, jwt.encode(claims(), ec_key(ec.SECP384R1()), algorithm="ES384"))

    def test_embedded_key_ignored(self) -> None:
        """
        A token carrying its own key (jwk, jku, x5u, kid headers) is checked
        with the configured key only: the attacker's is refused.
        """
        mine, attacker = rsa_key(), rsa_key()
        verifier = TokenVerifier(public_keys=[public_pem(mine)])
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
        headers = {"jwk": jwk, "jku": "https://evil.test/jwks", "x5u": "https://evil.test/c", "kid": "x"}
        self.refused(verifier, jwt.encode(claims(), attacker, algorithm="RS256", headers=headers))

    def test_expired(self) -> None:
        """
        A token whose exp passed more than the leeway ago is token_expired.
        """
        token = mint(SECRET, "alice", None, 60, now=time.time() - 3600)
        self.refused(self.verifier, token, "token_expired")

    def test_within_leeway(self) -> None:
        """
        A token whose exp passed less than the leeway (30 s) ago is still
        accepted; a verifier with no leeway refuses it.
        """
        token = mint(SECRET, "alice", None, 60, now=time.time() - 70)
        self.assertEqual(self.verifier.verify(token).user_id, "alice")
        self.refused(TokenVerifier([SECRET], leeway=0), token, "token_expired")

    def test_missing_exp(self) -> None:
        """
        A token without exp is refused, naming the claim.
        """
        error = self.refused(self.verifier, hs256(SECRET, {"sub": "alice"}))
        self.assertIn("exp", error.detail)

    def test_missing_sub(self) -> None:
        """
        A token without sub is refused, naming the claim.
        """
        error = self.refused(self.verifier, hs256(SECRET, {"exp": int(time.time()) + 60}))
        self.assertIn("sub", error.detail)

    def test_exp_not_a_usable_number(self) -> None:
        """
        An exp that is not a number, or a number too large for a float, is
        invalid_token (never another exception).
        """
        for exp in ["soon", str(int(time.time()) + 3600), None, [1], {"a": 1}, 10**400]:
            self.refused(self.verifier, hs256(SECRET, claims(exp=exp)))

    def test_nbf_in_future(self) -> None:
        """
        A token not valid yet (nbf an hour ahead) is invalid_token, not
        expired.
        """
        self.refused(self.verifier, hs256(SECRET, claims(nbf=int(time.time()) + 3600)))

    def test_audience(self) -> None:
        """
        With an audience configured, a token for another audience, or for
        none, is refused; one naming it (alone or in a list) is accepted.
        """
        verifier = TokenVerifier([SECRET], audience="chatd")
        self.assertEqual(verifier.verify(mint(SECRET, "a", None, 60, audience="chatd")).user_id, "a")
        self.assertEqual(verifier.verify(hs256(SECRET, claims(aud=["x", "chatd"]))).user_id, "alice")
        self.refused(verifier, mint(SECRET, "a", None, 60, audience="other"))
        error = self.refused(verifier, mint(SECRET, "a", None, 60))
        self.assertIn("aud", error.detail)
        self.refused(verifier, hs256(SECRET, claims(aud=5)))

    def test_no_audience_configured(self) -> None:
        """
        Without an audience configured, a token's aud is not checked.
        """
        self.assertEqual(self.verifier.verify(mint(SECRET, "a", None, 60, audience="x")).user_id, "a")

    def test_issuer(self) -> None:
        """
        With an issuer configured, a token from another issuer, or from
        none, is refused.
        """
        verifier = TokenVerifier([SECRET], issuer="https://app.test")
        self.assertEqual(
            verifier.verify(mint(SECRET, "a", None, 60, issuer="https://app.test")).user_id, "a"
        )
        self.refused(verifier, mint(SECRET, "a", None, 60, issuer="https://evil.test"))
        self.refused(verifier, mint(SECRET, "a", None, 60))
        self.refused(verifier, hs256(SECRET, claims(iss=["https://app.test"])))

    def test_key_rotation(self) -> None:
        """
        During a rotation both secrets are good; after it, the old one is
        refused.
        """
        old, new = mint(OLD_SECRET, "a", None, 60), mint(NEW_SECRET, "b", None, 60)
        during = TokenVerifier([OLD_SECRET, NEW_SECRET])
        self.assertEqual(during.verify(old).user_id, "a")
        self.assertEqual(during.verify(new).user_id, "b")
        after = TokenVerifier([NEW_SECRET])
        self.assertEqual(after.verify(new).user_id, "b")
        self.refused(after, old)

    def test_rotation_mixed_keys(self) -> None:
        """
        A verifier with two RSA keys accepts tokens of either.
        """
        first, second = rsa_key(), rsa_key()
        verifier = TokenVerifier(public_keys=[public_pem(first), public_pem(second)])
        for key in (first, second):
            self.assertEqual(verifier.verify(jwt.encode(claims(), key, algorithm="RS256")).user_id, "alice")

    def test_short_secret(self) -> None:
        """
        A secret shorter than 32 bytes is refused at construction, even
        beside a good one.
        """
        for secret in [b"", b"x" * 31]:
            self.assertRaises(ValueError, TokenVerifier, [secret])
            self.assertRaises(ValueError, TokenVerifier, [SECRET, secret])
        TokenVerifier([b"x" * 32])

    def test_no_keys(self) -> None:
        """
        A verifier with nothing to check with cannot be made.
        """
        self.assertRaises(ValueError, TokenVerifier)

    def test_unsupported_public_keys(self) -> None:
        """
        Ed25519, P-384 and P-521 public keys (and non-keys) are refused at
        construction.
        """
        for private in [
            ed25519.Ed25519PrivateKey.generate(),
            ec_key(ec.SECP384R1()),
            ec_key(ec.SECP521R1()),
            ec_key(ec.SECP256K1()),
        ]:
            self.assertRaises(ValueError, TokenVerifier, public_keys=[public_pem(private)])
        self.assertRaises(ValueError, TokenVerifier, public_keys=[b"not a key"])

    def test_oversized_token(self) -> None:
        """
        A validly signed token longer than MAX_TOKEN is refused unread; one
        just within MAX_TOKEN is accepted.
        """

        def padded(size: int) -> str:
            base = hs256(SECRET, claims(pad=""))
            token = hs256(SECRET, claims(pad="x" * ((size - len(base)) * 3 // 4)))
            while len(token) < size:
                pad = jwt.decode(token, options={"verify_signature": False})["pad"]
                token = hs256(SECRET, claims(pad=pad + "x"))
            return token

        fits = padded(MAX_TOKEN - 3)
        self.assertLessEqual(len(fits), MAX_TOKEN)
        self.assertEqual(self.verifier.verify(fits).user_id, "alice")
        big = padded(MAX_TOKEN + 1)
        self.assertGreater(len(big), MAX_TOKEN)
        self.refused(self.verifier, big)

    def test_not_a_string(self) -> None:
        """
        A token must be a non-empty str: bytes (even of a good token), None,
        numbers and lists are refused before decoding.
        """
        good = mint(SECRET, "a", None, 60)
        for token in [good.encode("ascii"), None, 1, [good], {"token": good}, ""]:
            self.refused(self.verifier, token)

    def test_unencodable_token(self) -> None:
        """
        A token holding a lone surrogate (JSON's "\\ud800" decodes to one)
        is invalid_token, not an encoding error.
        """
        good = mint(SECRET, "a", None, 60)
        for token in ["\ud800", good + "\udfff", "\ud800." + good.split(".", 1)[1]]:
            self.refused(self.verifier, token)

    def test_malformed_tokens(self) -> None:
        """
        Tokens that are not JWTs are invalid_token.
        """
        good = mint(SECRET, "a", None, 60)
        for token in [
            ".",
            "..",
            "....",
            "a.b.c",
            good + ".x",
            good.replace(".", "", 1),
            b64(b"[1]") + ".e30.x",
            b64(b'{"alg":{"HS256":1}}') + ".e30.x",
            b64(b'{"alg":["HS256"]}') + ".e30.x",
            b64(b"\xff\xfe") + ".e30.x",
            b64(b'{"alg":"HS256","kid":1}') + ".e30.x",
            b64(b'{"alg":"HS256","x":' + b"[" * 3000 + b"]" * 3000 + b"}") + ".e30.x",
            hs256(SECRET, [claims()]),
            hs256(SECRET, "alice"),
        ]:
            self.refused(self.verifier, token)

    def test_bad_sub(self) -> None:
        """
        A sub that is not a string, is empty or blank-edged, holds
        zero-width, bidi or control characters, or is over 128 characters,
        is invalid_token.
        """
        for sub in [
            1,
            None,
            ["alice"],
            "",
            " alice",
            "alice\n",
            "al\u200bice",
            "\u202ealice",
            "ali\u2066ce",
            "al\x00ice",
            "\ufeffalice",
            "a" * 129,
        ]:
            self.refused(self.verifier, hs256(SECRET, claims(sub, name="Alice")))

    def test_sub_at_limit(self) -> None:
        """
        A sub of exactly 128 characters is accepted, as given.
        """
        sub = "e\u0301" * 64
        identity = self.verifier.verify(hs256(SECRET, claims(sub, name="Alice")))
        self.assertEqual(identity.user_id, sub)

    def test_bad_name(self) -> None:
        """
        A name with bidi overrides, zero-width or control characters, over
        32 characters, blank or not a string is invalid_token.
        """
        for name in [
            "Alice\u202e",
            "A\u200blice",
            "Al\x07ice",
            "Al\x1bice",
            "Al\x85ice",
            "A" * 33,
            "   ",
            "",
            5,
            ["Alice"],
        ]:
            self.refused(self.verifier, hs256(SECRET, claims(name=name)))

    def test_name_normalised(self) -> None:
        """
        A name typed in NFD comes back in NFC (one name, however typed).
        """
        identity = self.verifier.verify(mint(SECRET, "rene", "Rene\u0301", 60))
        assert identity.user is not None
        self.assertEqual(identity.user.name, "Ren\u00e9")

    def test_future_iat(self) -> None:
        """
        A token issued an hour in the future is not valid yet.
        """
        self.refused(self.verifier, hs256(SECRET, claims(iat=int(time.time()) + 3600)))


class TokenFuzzTests(SynchronousTestCase):
    """
    Random and mutated tokens: only ever a L{ChatError}, and never an
    identity that the signature does not prove.
    """

    def setUp(self) -> None:
        self.rsa = rsa_key()
        self.ec = ec_key(ec.SECP256R1())
        self.verifier = TokenVerifier(
            [SECRET], public_keys=[public_pem(self.rsa), public_pem(self.ec)]
        )
        self.token = mint(SECRET, "alice", "Alice", 3600)
        self.identity = self.verifier.verify(self.token)

    def refused_or(self, token: str) -> Optional[Identity]:
        """
        The identity C{token} proves, or None if it is refused with
        invalid_token or token_expired (anything else fails the test).
        """
        try:
            return self.verifier.verify(token)
        except ChatError as e:
            self.assertIn(e.code, {"invalid_token", "token_expired"})
            return None

    @FUZZ
    @given(token=any_text)
    def test_random_text(self, token: str) -> None:
        """
        Any text is refused with invalid_token.
        """
        self.assertIsNone(self.refused_or(token))

    @FUZZ
    @given(data=st.binary(max_size=300))
    def test_random_bytes_as_latin1(self, data: bytes) -> None:
        """
        Any bytes, as a latin-1 header value would arrive, are refused.
        """
        self.assertIsNone(self.refused_or(data.decode("latin-1")))

    @FUZZ
    @given(
        header=st.binary(max_size=80),
        payload=st.binary(max_size=120),
        signature=st.binary(max_size=80),
    )
    def test_random_segments(self, header: bytes, payload: bytes, signature: bytes) -> None:
        """
        Three well-formed base64url segments of random bytes are refused.
        """
        self.assertIsNone(self.refused_or(f"{b64(header)}.{b64(payload)}.{b64(signature)}"))

    @FUZZ
    @given(
        position=st.integers(min_value=0, max_value=10_000),
        replacement=st.sampled_from(string.ascii_letters + string.digits + "-_.=+/ !\x00\u00e9\u202e"),
    )
    def test_one_character_changed(self, position: int, replacement: str) -> None:
        """
        A good token with one character changed is refused, unless the
        change is in the signature and leaves its decoded bytes the same
        (base64's unused low bits): then it is the very same identity.
        """
        token = self.token
        index = position % len(token)
        assume(token[index] != replacement)
        mutated = token[:index] + replacement + token[index + 1 :]
        identity = self.refused_or(mutated)
        if identity is None:
            return
        signature_start = token.rindex(".") + 1
        self.assertGreaterEqual(index, signature_start, mutated)
        self.assertEqual(
            base64url_decode(mutated[signature_start:]), base64url_decode(token[signature_start:])
        )
        self.assertEqual(
            (identity.via, identity.user, identity.expires),
            (self.identity.via, self.identity.user, self.identity.expires),
        )

    @FUZZ
    @given(
        alg=st.sampled_from(["HS256", "RS256", "ES256", "none", "HS512", "PS256", ""]),
        extra=st.dictionaries(
            st.sampled_from(["typ", "kid", "jwk", "crit", "b64", "cty", "x5u"]),
            st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=3),
            max_size=3,
        ),
        key=st.sampled_from([SECRET, b"k" * 32, b""]),
    )
    def test_random_headers(self, alg: str, extra: Dict[str, Any], key: bytes) -> None:
        """
        Any header on a payload signed with HMAC: only a genuine HS256 token
        with the right secret is accepted, whatever the header adds.
        """
        header = dict(extra, alg=alg)
        identity = self.refused_or(hs256(key, claims(), header))
        if identity is not None:
            self.assertEqual((alg, key), ("HS256", SECRET))
            self.assertEqual(identity.user_id, "alice")

    def signed_or_refused(self, payload: Dict[str, Any]) -> Optional[Identity]:
        """
        The identity a genuinely signed token of C{payload} proves: its
        sub exactly, with a usable name and a float expiry; or None.
        """
        identity = self.refused_or(hs256(SECRET, payload))
        if identity is not None:
            self.assertEqual(identity.user_id, payload["sub"])
            assert identity.user is not None
            self.assertEqual(auth.validate_display_name(identity.user.name), identity.user.name)
            self.assertIsInstance(identity.expires, float)
        return identity

    @FUZZ
    @given(
        sub=st.sampled_from(["alice", "x" * 128])
        | st.none()
        | st.integers()
        | any_text
        | st.lists(st.text(max_size=3), max_size=2),
        name=st.sampled_from(["Alice", "Ren\u00e9"]) | st.none() | st.integers() | any_text,
        drop=st.sets(st.sampled_from(["sub", "name"])),
    )
    def test_signed_odd_sub_and_name(self, sub: Any, name: Any, drop: Any) -> None:
        """
        A genuinely signed token with a sub and name of any shape is
        refused with a ChatError, or is the user its sub names, exactly.
        """
        payload = {"sub": sub, "name": name, "exp": int(time.time()) + 3600}
        for claim in drop:
            del payload[claim]
        self.signed_or_refused(payload)

    @FUZZ
    @given(
        exp=st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**400)
        | st.sampled_from([10**400, -(10**400), 2**63, 2**1024])
        | st.floats(allow_nan=True)
        | st.text(max_size=5),
        extra=st.dictionaries(
            st.sampled_from(["nbf", "iat", "aud", "iss", "jti"]),
            st.none() | st.integers(min_value=-(10**30), max_value=10**400) | st.floats() | st.text(max_size=5),
            max_size=3,
        ),
    )
    def test_signed_odd_times(self, exp: Any, extra: Dict[str, Any]) -> None:
        """
        A genuinely signed token with exp, nbf, iat (and aud, iss, jti) of
        any shape is refused with a ChatError, or accepted with a float
        expiry.
        """
        self.signed_or_refused(dict(extra, sub="alice", exp=exp))


# -- passwords -----------------------------------------------------------------------


class RecordingHasher(PasswordHasher):
    """
    An argon2 hasher that records its calls and the threads they ran in.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: List[Tuple[str, int]] = []
        #: When set, every call waits for it (at most 10 s).
        self.gate: Optional[threading.Event] = None
        #: When true, hash raises RuntimeError.
        self.broken = False

    def hash(self, password: Any, *, salt: Optional[bytes] = None) -> str:
        self.calls.append(("hash", threading.get_ident()))
        if self.gate is not None:
            self.gate.wait(10)
        if self.broken:
            raise RuntimeError("the hasher broke")
        return super().hash(password, salt=salt)

    def verify(self, hash: Any, password: Any) -> bool:
        self.calls.append(("verify", threading.get_ident()))
        if self.gate is not None:
            self.gate.wait(10)
        return super().verify(hash, password)


def cheap_hasher() -> RecordingHasher:
    return RecordingHasher(time_cost=1, memory_cost=8, parallelism=1)


class PasswordsTests(TestCase):
    """
    L{Passwords} hashes and checks in its own threads, never raises for a
    bad stored hash, and refuses work beyond its queue.
    """

    def make(self, hasher: Optional[PasswordHasher] = None) -> Passwords:
        passwords = Passwords(reactor, cheap_hasher() if hasher is None else hasher)
        self.addCleanup(passwords.stop)
        return passwords

    async def test_hash_then_verify(self) -> None:
        """
        A hash verifies against its password, and needs no rehash.
        """
        passwords = self.make()
        stored = await passwords.hash("correct horse")
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertNotIn("correct horse", stored)
        self.assertEqual(await passwords.verify(stored, "correct horse"), (True, None))

    async def test_default_hasher(self) -> None:
        """
        With argon2-cffi's default parameters too.
        """
        passwords = Passwords(reactor)
        self.addCleanup(passwords.stop)
        stored = await passwords.hash("correct horse")
        self.assertEqual(await passwords.verify(stored, "correct horse"), (True, None))
        self.assertEqual(await passwords.verify(stored, "correct horsE"), (False, None))

    async def test_wrong_password(self) -> None:
        """
        A wrong password is (False, None).
        """
        passwords = self.make()
        stored = await passwords.hash("correct horse")
        for wrong in ["correct hors", "correct horse ", "Correct horse", "\u00e9" * 8]:
            self.assertEqual(await passwords.verify(stored, wrong), (False, None))

    async def test_no_account_still_hashes(self) -> None:
        """
        No stored hash (no such account) is (False, None), after checking
        the password against a hash all the same, every time.
        """
        hasher = cheap_hasher()
        passwords = self.make(hasher)
        self.assertEqual(await passwords.verify(None, "whatever1"), (False, None))
        verifies = [name for name, _ in hasher.calls].count("verify")
        self.assertEqual(verifies, 1)
        self.assertEqual(await passwords.verify(None, "whatever2"), (False, None))
        self.assertEqual([name for name, _ in hasher.calls].count("verify"), 2)

    async def test_rehash_weaker(self) -> None:
        """
        A hash made with weaker parameters verifies, and comes with a new
        hash of today's parameters that verifies too.
        """
        weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        strong = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
        passwords = self.make(strong)
        matches, new_hash = await passwords.verify(weak.hash("correct horse"), "correct horse")
        self.assertTrue(matches)
        assert new_hash is not None
        self.assertTrue(strong.verify(new_hash, "correct horse"))
        self.assertFalse(strong.check_needs_rehash(new_hash))
        self.assertEqual(await passwords.verify(new_hash, "correct horse"), (True, None))

    async def test_weaker_wrong_password_no_rehash(self) -> None:
        """
        A wrong password against an old hash gets no new hash.
        """
        weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        passwords = self.make(RecordingHasher(time_cost=2, memory_cost=16, parallelism=1))
        self.assertEqual(await passwords.verify(weak.hash("correct horse"), "wrong horse"), (False, None))

    async def test_corrupt_stored_hash(self) -> None:
        """
        A stored hash that is not one (empty, truncated, another scheme,
        bad parameters, bad base64, non-ASCII) is (False, None), never an
        exception.
        """
        passwords = self.make()
        good = cheap_hasher().hash("correct horse")
        for stored in [
            "",
            "x",
            "correct horse",
            "$argon2id$",
            good[:-5],
            good[:-1] + "!",
            good.replace("v=19", "v=99"),
            good.replace("m=8", "m=0"),
            good.replace("argon2id", "argon2x"),
            "$2b$12$abcdefghijklmnopqrstuuZ1jzGvV6mLJgpQCVyJEHcUp7JuZqGlO",
            good.replace("$", "$\u00e9", 1),
            "\u00e9" * 40,
        ]:
            self.assertEqual(await passwords.verify(stored, "correct horse"), (False, None), stored)

    async def test_off_the_reactor_thread(self) -> None:
        """
        Hashing and checking run in a thread other than the reactor's.
        """
        hasher = cheap_hasher()
        passwords = self.make(hasher)
        stored = await passwords.hash("correct horse")
        await passwords.verify(stored, "correct horse")
        await passwords.verify(None, "correct horse")
        here = threading.get_ident()
        self.assertTrue(hasher.calls)
        self.assertNotIn(here, [thread for _, thread in hasher.calls])

    async def test_too_many_queued(self) -> None:
        """
        Beyond MAX_QUEUED calls at once, the extra ones fail at once with
        server_busy (and a retry time); once the queue drains, calls work
        again.
        """
        hasher = cheap_hasher()
        passwords = self.make(hasher)
        stored = cheap_hasher().hash("correct horse")
        hasher.gate = threading.Event()
        self.addCleanup(hasher.gate.set)
        waiting = [passwords.verify(stored, "correct horse") for _ in range(Passwords.MAX_QUEUED)]
        extra = [passwords.verify(stored, "correct horse") for _ in range(3)]
        extra.append(passwords.hash("correct horse"))
        for d in extra:
            error = self.failureResultOf(d, ChatError).value
            self.assertEqual(error.code, "server_busy")
            self.assertIsNotNone(error.retry_after)
        hasher.gate.set()
        results = await gatherResults(waiting)
        self.assertEqual(results, [(True, None)] * Passwords.MAX_QUEUED)
        self.assertEqual(await passwords.verify(stored, "correct horse"), (True, None))

    async def test_queue_drains_after_errors(self) -> None:
        """
        Work that fails still leaves the queue: MAX_QUEUED failures later,
        a call is accepted.
        """
        hasher = cheap_hasher()
        hasher.broken = True
        passwords = self.make(hasher)
        failures = [passwords.hash("correct horse") for _ in range(Passwords.MAX_QUEUED)]
        for d in failures:
            with self.assertRaises(RuntimeError):
                await d
        hasher.broken = False
        self.assertEqual(await passwords.verify(None, "correct horse"), (False, None))


class ValidatePasswordTests(SynchronousTestCase):
    """
    L{validate_password}: 8 to 1024 characters, and a string.
    """

    def test_bounds(self) -> None:
        """
        8 and 1024 characters pass; 7 and 1025 are invalid_password.
        """
        for size in (8, 1024):
            self.assertEqual(validate_password("p" * size), "p" * size)
        for size in (0, 7, 1025):
            error = self.assertRaises(ChatError, validate_password, "p" * size)
            self.assertEqual(error.code, "invalid_password")

    def test_counts_characters(self) -> None:
        """
        The bounds count characters, not bytes.
        """
        self.assertEqual(validate_password("\u00e9" * 8), "\u00e9" * 8)
        self.assertEqual(validate_password("\U0001f600" * 1024), "\U0001f600" * 1024)

    def test_not_a_string(self) -> None:
        """
        None, bytes, numbers and lists are invalid_password.
        """
        for password in [None, b"password1", 123456789, ["password1"], {"p": "password1"}]:
            error = self.assertRaises(ChatError, validate_password, password)
            self.assertEqual(error.code, "invalid_password")

    def test_unencodable(self) -> None:
        """
        A password with lone surrogates (which JSON can carry, and which
        argon2 cannot hash: UTF-8 has no encoding for them) is
        invalid_password, not a crash in the hashing thread.
        """
        for password in ["\ud800" * 8, "password\udfff"]:
            # (Not assertRaises: its message would print the surrogates
            # raw, which trial's reporter cannot write.)
            try:
                validate_password(password)
            except ChatError as e:
                self.assertEqual(e.code, "invalid_password")
            else:
                self.fail(f"validate_password accepted {ascii(password)}")


# -- sessions ----------------------------------------------------------------------


class SessionsTests(SynchronousTestCase):
    """
    L{Sessions} on the memory store and a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.memory = MemoryStore()
        self.store = CountingStore(self.memory)
        self.sessions = Sessions(self.store, self.clock, self.memory.secret, ttl=3600)
        self.alice = User("alice", "Alice")
        self.successResultOf(self.memory.add_user("alice", "Alice", None, 0))
        self.successResultOf(self.memory.add_user("bob", "Bob", None, 0))

    def start(self, user: Optional[User] = None) -> Tuple[bytes, Identity]:
        cookie, identity = self.successResultOf(self.sessions.start(user or self.alice))
        return cookie, identity

    def identify(self, cookie: Any) -> Optional[Identity]:
        result: Optional[Identity] = self.successResultOf(self.sessions.identify(cookie))
        return result

    def test_start(self) -> None:
        """
        start gives a cookie and a session identity with a CSRF token.
        """
        cookie, identity = self.start()
        self.assertIsInstance(cookie, bytes)
        self.assertLessEqual(len(cookie), 256)
        self.assertEqual((identity.via, identity.user), ("session", self.alice))
        self.assertTrue(identity.csrf)
        self.assertTrue(identity.session)
        self.assertEqual(identity.expires, self.clock.seconds() + 3600)

    def test_sessions_differ(self) -> None:
        """
        Two sessions of one user have different cookies, ids and CSRF tokens.
        """
        (c1, i1), (c2, i2) = self.start(), self.start()
        self.assertNotEqual(c1, c2)
        self.assertNotEqual(i1.session, i2.session)
        self.assertNotEqual(i1.csrf, i2.csrf)

    def test_identify(self) -> None:
        """
        The cookie identifies the same user, via session, with the same
        CSRF token.
        """
        cookie, started = self.start()
        identity = self.identify(cookie)
        assert identity is not None
        self.assertEqual((identity.via, identity.user), ("session", self.alice))
        self.assertEqual((identity.session, identity.csrf), (started.session, started.csrf))

    def test_changed_cookie(self) -> None:
        """
        A cookie with any one character changed is refused without asking
        the store (unless the change leaves the signature's decoded bytes
        the same: then it is the same session).
        """
        cookie, _ = self.start()
        signature_start = cookie.rindex(b".") + 1
        for index in range(len(cookie)):
            for replacement in (b"A", b"z", b"-", b".", b"\xff"):
                if cookie[index : index + 1] == replacement:
                    continue
                changed = cookie[:index] + replacement + cookie[index + 1 :]
                before = len(self.store.lookups)
                found = self.identify(changed)
                if found is not None:
                    self.assertGreaterEqual(index, signature_start, changed)
                    self.assertEqual(
                        base64url_decode(changed[signature_start:]),
                        base64url_decode(cookie[signature_start:]),
                    )
                    self.assertEqual(found.user, self.alice)
                else:
                    self.assertEqual(self.store.lookups[before:], [], changed)

    def test_other_secret(self) -> None:
        """
        A cookie signed with another deployment's secret is refused without
        asking the store.
        """
        other = Sessions(MemoryStore(), self.clock, MemoryStore().secret)
        cookie, _ = self.successResultOf(other.start(self.alice))
        self.assertIsNone(self.identify(cookie))
        self.assertEqual(self.store.lookups, [])

    def test_junk_cookies(self) -> None:
        """
        No cookie, an empty one, a 300-byte one, a non-ASCII or unsigned one
        is None, and the store is never asked.
        """
        cookie, _ = self.start()
        for junk in [None, b"", b"x" * 300, cookie + b"x" * 300, "\u00e9t\u00e9".encode(),
                     b"\xff" * 40, b".", b"..", b"raw.", b".sig", cookie.split(b".")[0]]:
            self.assertIsNone(self.identify(junk), junk)
        self.assertEqual(self.store.lookups, [])

    @FUZZ
    @given(junk=st.binary(max_size=300))
    def test_random_cookies(self, junk: bytes) -> None:
        """
        Random bytes are never a session, and never reach the store.
        """
        self.assertIsNone(self.identify(junk))
        self.assertEqual(self.store.lookups, [])

    def test_end(self) -> None:
        """
        After end, the cookie identifies nobody at once on this node, even
        though it was cached.
        """
        cookie, _ = self.start()
        identity = self.identify(cookie)
        assert identity is not None
        self.successResultOf(self.sessions.end(identity))
        self.assertIsNone(self.identify(cookie))

    def test_end_all(self) -> None:
        """
        end_all ends every session of one user at once, and nobody else's.
        """
        (a1, _), (a2, _) = self.start(), self.start()
        b, _ = self.start(User("bob", "Bob"))
        for cookie in (a1, a2, b):
            self.assertIsNotNone(self.identify(cookie))
        self.successResultOf(self.sessions.end_all("alice"))
        self.assertIsNone(self.identify(a1))
        self.assertIsNone(self.identify(a2))
        found = self.identify(b)
        assert found is not None
        self.assertEqual(found.user_id, "bob")

    def test_expiry(self) -> None:
        """
        Past its ttl, a session identifies nobody once the node's cached
        lookup is older than CACHE_TTL.
        """
        cookie, _ = self.start()
        self.clock.advance(3600 - 1)
        self.assertIsNotNone(self.identify(cookie))
        self.clock.advance(1 + CACHE_TTL + 0.001)
        self.assertIsNone(self.identify(cookie))

    def test_disabled_user(self) -> None:
        """
        A user disabled in the store identifies as nobody once this node's
        cached lookup is older than CACHE_TTL.
        """
        cookie, _ = self.start()
        self.assertIsNotNone(self.identify(cookie))
        self.successResultOf(self.memory.disable_user("alice", True, 0))
        self.clock.advance(CACHE_TTL + 0.001)
        self.assertIsNone(self.identify(cookie))

    def test_cache(self) -> None:
        """
        A session looked up is trusted for CACHE_TTL without asking the
        store again.
        """
        cookie, _ = self.start()
        self.identify(cookie)
        self.identify(cookie)
        self.assertEqual(len(self.store.lookups), 1)
        self.clock.advance(CACHE_TTL + 0.001)
        self.identify(cookie)
        self.assertEqual(len(self.store.lookups), 2)

    def test_store_keeps_digest(self) -> None:
        """
        The memory store keeps the SHA-256 of the cookie's secret, never the
        secret (nor the cookie).
        """
        cookie, identity = self.start()
        raw = cookie.rsplit(b".", 1)[0].decode("ascii")
        self.assertEqual(list(self.memory._sessions), [digest(raw)])
        self.assertEqual(identity.session, digest(raw))
        kept = repr(self.memory._sessions)
        self.assertNotIn(raw, kept)
        self.assertNotIn(cookie.decode("ascii"), kept)


class SessionsSQLiteTests(TestCase):
    """
    L{Sessions} on an SQLite store.
    """

    async def test_store_keeps_digest(self) -> None:
        """
        The sessions table holds the SHA-256 of the cookie's secret, never
        the secret itself, and the cookie works through it.
        """
        path = os.path.abspath(self.mktemp() + ".sqlite3")
        store = SQLiteStore(path, reactor=reactor)
        self.addCleanup(store.close)
        await store.open()
        await store.add_user("alice", "Alice", None, 0)
        clock = Clock()
        clock.advance(1_700_000_000)
        sessions = Sessions(store, clock, store.secret)
        cookie, _ = await sessions.start(User("alice", "Alice"))
        identity = await sessions.identify(cookie)
        self.assertEqual((identity.via, identity.user), ("session", User("alice", "Alice")))
        raw = cookie.rsplit(b".", 1)[0].decode("ascii")
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        rows = conn.execute("SELECT * FROM sessions").fetchall()
        self.assertEqual([row[0] for row in rows], [digest(raw)])
        self.assertNotIn(raw, repr(rows))
        self.assertNotIn(cookie.decode("ascii"), repr(rows))


# -- CSRF --------------------------------------------------------------------------


class CheckCSRFTests(SynchronousTestCase):
    """
    L{check_csrf}: a session's changes carry its token.
    """

    def setUp(self) -> None:
        self.session = Identity(User("alice", "Alice"), "session", session="s", csrf="tok-123")

    def test_right_token(self) -> None:
        """
        The session's token passes.
        """
        self.assertIsNone(check_csrf(self.session, "tok-123"))

    def test_wrong_tokens(self) -> None:
        """
        A wrong, empty, missing, prefix, longer or non-ASCII token is
        csrf_failed.
        """
        for token in ["tok-124", "", None, "tok-12", "tok-1234", "TOK-123", "t\u00f6k-123"]:
            error = self.assertRaises(ChatError, check_csrf, self.session, token)
            self.assertEqual(error.code, "csrf_failed")

    def test_unencodable_token(self) -> None:
        """
        A token with a lone surrogate (JSON can carry one) is csrf_failed,
        not an encoding error.
        """
        error = self.assertRaises(ChatError, check_csrf, self.session, "tok-\ud800")
        self.assertEqual(error.code, "csrf_failed")

    def test_not_a_string(self) -> None:
        """
        A csrf field of another JSON type (a number, a list) is csrf_failed,
        not a crash.
        """
        for token in [123, ["tok-123"], {"csrf": "tok-123"}, b"tok-123"]:
            error = self.assertRaises(ChatError, check_csrf, self.session, token)
            self.assertEqual(error.code, "csrf_failed")

    def test_session_without_csrf(self) -> None:
        """
        A session identity with no CSRF token lets nothing through, not even
        an empty token.
        """
        bare = Identity(User("alice", "Alice"), "session", session="s")
        for token in ["", None, "x"]:
            self.assertRaises(ChatError, check_csrf, bare, token)

    def test_others_need_none(self) -> None:
        """
        Token, key and guest identities carry no cookie, and need no token.
        """
        for identity in [
            Identity(User("alice", "Alice"), "token", expires=1.0),
            Identity(None, "key", key="abc"),
            GUEST,
        ]:
            self.assertIsNone(check_csrf(identity, None))
            self.assertIsNone(check_csrf(identity, "whatever"))


# -- API keys ----------------------------------------------------------------------


class KeysTests(SynchronousTestCase):
    """
    L{Keys}, L{new_key} and L{split_key}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryStore()
        self.store = CountingStore(self.memory)
        self.keys = Keys(self.store, self.clock)
        self.key_id, self.key = new_key()
        _, secret = split_key(self.key) or ("", "")
        self.successResultOf(self.memory.add_key(self.key_id, digest(secret), "app", 0))

    def refused(self, key: str) -> None:
        error = self.failureResultOf(self.keys.identify(key), ChatError).value
        self.assertEqual(error.code, "invalid_key")

    def test_round_trip(self) -> None:
        """
        new_key makes ck_ID_SECRET, which split_key takes apart again; keys
        differ.
        """
        key_id, key = new_key()
        self.assertTrue(key.startswith(KEY_PREFIX + key_id + "_"))
        parts = split_key(key)
        assert parts is not None
        self.assertEqual(parts[0], key_id)
        self.assertEqual(key, f"{KEY_PREFIX}{parts[0]}_{parts[1]}")
        self.assertGreaterEqual(len(parts[1]), 32)
        self.assertEqual(len({new_key()[1] for _ in range(50)}), 50)

    def test_split_malformed(self) -> None:
        """
        Strings not shaped like a key split into None.
        """
        for key in ["", "ck_", "ck_x", "ck_x_", "ck__x", "bearer", "CK_x_y", "x" * 200, "ck_x_" + "y" * 200]:
            self.assertIsNone(split_key(key), key)

    def test_identify(self) -> None:
        """
        A stored key is a key identity of its id, acting for no user.
        """
        identity = self.successResultOf(self.keys.identify(self.key))
        self.assertEqual((identity.via, identity.key, identity.user), ("key", self.key_id, None))
        self.assertFalse(identity.guest)

    def test_wrong_secret(self) -> None:
        """
        The right id with a wrong secret is invalid_key, even while the
        right key is cached.
        """
        self.successResultOf(self.keys.identify(self.key))
        self.refused(self.key[:-1] + ("A" if self.key[-1] != "A" else "B"))
        self.refused(f"{KEY_PREFIX}{self.key_id}_{'x' * 43}")

    def test_unencodable_secret(self) -> None:
        """
        The right id with a secret holding a lone surrogate is invalid_key,
        not an encoding error.
        """
        self.refused(f"{KEY_PREFIX}{self.key_id}_\ud800")

    def test_unknown_id(self) -> None:
        """
        A well-shaped key with an id the store does not know is invalid_key.
        """
        self.refused(new_key()[1])

    def test_malformed(self) -> None:
        """
        Malformed keys are invalid_key, without asking the store.
        """
        for key in ["ck_", "ck_x", "bearer", "", KEY_PREFIX + "a_" + "b" * 200, "x" * 200]:
            self.refused(key)
        self.assertEqual(self.store.lookups, [])

    def test_revoked(self) -> None:
        """
        A key revoked in the store, and forgotten by this node, is refused
        at once, though it was cached.
        """
        self.successResultOf(self.keys.identify(self.key))
        self.assertTrue(self.successResultOf(self.memory.revoke_key(self.key_id, 0)))
        self.keys.forget(self.key_id)
        self.refused(self.key)

    def test_revoked_elsewhere(self) -> None:
        """
        A key revoked by another node is refused here within CACHE_TTL.
        """
        self.successResultOf(self.keys.identify(self.key))
        self.successResultOf(self.memory.revoke_key(self.key_id, 0))
        self.clock.advance(CACHE_TTL + 0.001)
        self.refused(self.key)

    @FUZZ
    @given(secret=any_text)
    def test_random_secrets(self, secret: str) -> None:
        """
        The stored id with any other secret is invalid_key, and nothing
        else.
        """
        _, real = split_key(self.key) or ("", "")
        assume(secret != real)
        self.refused(f"{KEY_PREFIX}{self.key_id}_{secret}")


# -- the rules ---------------------------------------------------------------------


class AuthenticatorTests(SynchronousTestCase):
    """
    L{Authenticator}: which credential counts, and what a bad one means.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.memory = MemoryStore()
        self.store = CountingStore(self.memory)
        self.successResultOf(self.memory.add_user("alice", "Alice", None, 0))
        self.sessions = Sessions(self.store, self.clock, self.memory.secret)
        self.keys = Keys(self.store, self.clock)
        self.auth = Authenticator("accounts", self.keys, TokenVerifier([SECRET]), self.sessions)
        self.token = mint(SECRET, "tom", "Tom", 3600)
        self.key_id, self.key = new_key()
        _, secret = split_key(self.key) or ("", "")
        self.successResultOf(self.memory.add_key(self.key_id, digest(secret), "app", 0))
        self.cookie, _ = self.successResultOf(self.sessions.start(User("alice", "Alice")))

    def identify(self, **credentials: Any) -> Identity:
        identity: Identity = self.successResultOf(self.auth.identify(Credentials(**credentials)))
        return identity

    def fails(self, code: str, **credentials: Any) -> None:
        error = self.failureResultOf(self.auth.identify(Credentials(**credentials)), ChatError).value
        self.assertEqual(error.code, code)

    def test_bearer_token(self) -> None:
        """
        A JWT in Authorization: Bearer is a token identity.
        """
        identity = self.identify(bearer=self.token)
        self.assertEqual((identity.via, identity.user), ("token", User("tom", "Tom")))

    def test_bearer_key(self) -> None:
        """
        A ck_ key in Authorization: Bearer is a key identity.
        """
        identity = self.identify(bearer=self.key)
        self.assertEqual((identity.via, identity.key), ("key", self.key_id))

    def test_query_token(self) -> None:
        """
        ?token= is a token identity.
        """
        self.assertEqual(self.identify(token=self.token).via, "token")

    def test_bad_bearer(self) -> None:
        """
        A bad bearer token or key fails, even beside a good cookie: it is
        never taken for a guest or for the session.
        """
        self.fails("invalid_token", bearer="junk")
        self.fails("invalid_token", bearer="")
        self.fails("invalid_token", bearer=mint(b"x" * 32, "tom", None, 60))
        self.fails("token_expired", bearer=mint(SECRET, "tom", None, 60, now=time.time() - 3600))
        unknown_id, unknown = new_key()
        self.fails("invalid_key", bearer=unknown)
        self.fails("invalid_key", bearer="ck_x")
        self.fails("invalid_token", bearer="junk", cookie=self.cookie)
        self.fails("invalid_token", token="junk", cookie=self.cookie)
        self.assertEqual(self.store.lookups, [("get_key", unknown_id)])

    def test_bearer_beats_cookie(self) -> None:
        """
        With a bearer token and a cookie, the token counts and the cookie is
        not looked up.
        """
        self.assertEqual(self.identify(bearer=self.token, cookie=self.cookie).via, "token")
        self.assertEqual(self.store.lookups, [])

    def test_no_verifier(self) -> None:
        """
        A token sent to a server that takes none is invalid_token.
        """
        open_auth = Authenticator("open", self.keys)
        for credentials in [Credentials(bearer=self.token), Credentials(token=self.token)]:
            error = self.failureResultOf(open_auth.identify(credentials), ChatError).value
            self.assertEqual(error.code, "invalid_token")
            self.assertRaises(ChatError, open_auth.identify_now, credentials)

    def test_cookie(self) -> None:
        """
        The session cookie is a session identity.
        """
        identity = self.identify(cookie=self.cookie)
        self.assertEqual((identity.via, identity.user_id), ("session", "alice"))

    def test_bad_cookie_is_guest(self) -> None:
        """
        A cookie that is not a session (forged, ended) is a guest.
        """
        self.assertIs(self.identify(cookie=b"forged.cookie"), GUEST)

    def test_cross_site_cookie(self) -> None:
        """
        A cross-site read with a good cookie is a guest, and the cookie is
        not looked up.
        """
        self.assertIs(self.identify(cookie=self.cookie, cross_site=True), GUEST)
        self.assertEqual(self.store.lookups, [])

    def test_nothing(self) -> None:
        """
        No credentials: a guest.
        """
        self.assertIs(self.identify(), GUEST)
        self.assertIs(self.identify(cookie=b""), GUEST)

    def test_cookie_without_sessions(self) -> None:
        """
        Without sessions (no accounts), a cookie means nothing.
        """
        auth = Authenticator("token", self.keys, TokenVerifier([SECRET]))
        self.assertIs(self.successResultOf(auth.identify(Credentials(cookie=self.cookie))), GUEST)
        self.assertIs(auth.identify_now(Credentials(cookie=self.cookie)), GUEST)

    def test_identify_now(self) -> None:
        """
        identify_now answers at once except when the store must be asked
        (a key, a cookie that counts), and then says None.
        """
        now = self.auth.identify_now
        self.assertIsNone(now(Credentials(bearer=self.key)))
        self.assertIsNone(now(Credentials(cookie=self.cookie)))
        self.assertIs(now(Credentials()), GUEST)
        self.assertIs(now(Credentials(cookie=self.cookie, cross_site=True)), GUEST)
        identity = now(Credentials(bearer=self.token, cookie=self.cookie))
        assert identity is not None
        self.assertEqual(identity.via, "token")
        token_identity = now(Credentials(token=self.token))
        assert token_identity is not None
        self.assertEqual(token_identity.via, "token")
        self.assertRaises(ChatError, now, Credentials(bearer="junk"))
        self.assertEqual(self.store.lookups, [])

    def test_unknown_mode(self) -> None:
        """
        Only the known modes are accepted.
        """
        self.assertRaises(ValueError, Authenticator, "closed", self.keys)


# -- the stores' identity half ----------------------------------------------------


class IdentityStoreContractMixin:
    """
    What every store does with users, sessions, invitations, API keys and
    room membership.  Subclasses define make_store().
    """

    def make_store(self) -> Any:
        raise NotImplementedError

    async def open_store(self) -> Any:
        store = self.make_store()
        self.addCleanup(store.close)
        await store.open()
        return store

    async def test_secret(self) -> None:
        """
        An open store has a secret long enough to sign cookies with.
        """
        store = await self.open_store()
        self.assertIsInstance(store.secret, str)
        self.assertGreaterEqual(len(store.secret), 32)

    async def test_add_user(self) -> None:
        """
        add_user adds an id once; get_user reads it back.
        """
        store = await self.open_store()
        self.assertTrue(await store.add_user("alice", "Alice", "$argon2id$h", 1))
        self.assertFalse(await store.add_user("alice", "Other", None, 2))
        self.assertEqual(await store.get_user("alice"), ("Alice", "$argon2id$h", False))
        self.assertIsNone(await store.get_user("nobody"))
        self.assertTrue(await store.add_user("bob", "Bob", None, 1))
        self.assertEqual(await store.get_user("bob"), ("Bob", None, False))

    async def test_user_ids_exact(self) -> None:
        """
        User ids are compared exactly: case, and NFC against NFD, differ.
        """
        store = await self.open_store()
        self.assertTrue(await store.add_user("ren\u00e9", "A", None, 1))
        self.assertTrue(await store.add_user("rene\u0301", "B", None, 1))
        self.assertTrue(await store.add_user("REN\u00c9", "C", None, 1))
        self.assertEqual((await store.get_user("rene\u0301"))[0], "B")

    async def test_set_password(self) -> None:
        """
        set_password replaces the hash; for an unknown user it adds nobody.
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", "old", 1)
        await store.set_password("alice", "new")
        self.assertEqual(await store.get_user("alice"), ("Alice", "new", False))
        await store.set_password("nobody", "x")
        self.assertIsNone(await store.get_user("nobody"))

    async def test_disable_unknown_user(self) -> None:
        """
        disable_user on a user the store does not know (a token user)
        records them, disabled; enabling them again keeps the row.
        """
        store = await self.open_store()
        self.assertEqual(await store.disable_user("tom", True, 5), 0)
        self.assertEqual(await store.get_user("tom"), ("tom", None, True))
        self.assertEqual(await store.disabled_users(["tom", "alice", "nobody"]), {"tom"})
        await store.disable_user("tom", False, 6)
        self.assertEqual(await store.get_user("tom"), ("tom", None, False))
        self.assertEqual(await store.disabled_users(["tom"]), set())
        self.assertFalse(await store.add_user("tom", "Tom", None, 7))

    async def test_disable_ends_sessions(self) -> None:
        """
        disable_user keeps an account's name and hash and ends its sessions
        (answering how many), no one else's.
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", "hash", 1)
        await store.add_user("bob", "Bob", None, 1)
        await store.create_session("s1", "alice", "c1", 0, 10_000)
        await store.create_session("s2", "alice", "c2", 0, 10_000)
        await store.create_session("s3", "bob", "c3", 0, 10_000)
        self.assertEqual(await store.disable_user("alice", True, 5), 2)
        self.assertEqual(await store.get_user("alice"), ("Alice", "hash", True))
        self.assertIsNone(await store.get_session("s1", 1))
        self.assertIsNone(await store.get_session("s2", 1))
        self.assertEqual(await store.get_session("s3", 1), ("bob", "Bob", "c3", 10_000))

    async def test_get_session(self) -> None:
        """
        get_session reads a live session of an enabled user: (user id,
        name, csrf, expires_ms); live through its expires_ms.
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", None, 1)
        await store.create_session("s1", "alice", "csrf1", 0, 10_000)
        self.assertEqual(await store.get_session("s1", 5), ("alice", "Alice", "csrf1", 10_000))
        self.assertEqual(await store.get_session("s1", 10_000), ("alice", "Alice", "csrf1", 10_000))
        self.assertIsNone(await store.get_session("s1", 10_001))
        self.assertIsNone(await store.get_session("unknown", 5))

    async def test_get_session_hides_disabled(self) -> None:
        """
        A session of a disabled user is not returned.
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", None, 1)
        await store.disable_user("alice", True, 2)
        await store.create_session("s1", "alice", "csrf1", 3, 10_000)
        self.assertIsNone(await store.get_session("s1", 5))

    async def test_create_session_forgets_expired(self) -> None:
        """
        Creating a session forgets the expired ones (even if asked about
        with an earlier clock afterwards).
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", None, 1)
        await store.create_session("old", "alice", "c", 0, 1_000)
        await store.create_session("new", "alice", "c", 2_000, 10_000)
        self.assertIsNone(await store.get_session("old", 500))
        self.assertIsNotNone(await store.get_session("new", 2_000))

    async def test_end_sessions(self) -> None:
        """
        end_sessions ends one session by id or all of a user's, answering
        how many.
        """
        store = await self.open_store()
        await store.add_user("alice", "Alice", None, 1)
        await store.add_user("bob", "Bob", None, 1)
        for session, user in [("a1", "alice"), ("a2", "alice"), ("a3", "alice"), ("b1", "bob")]:
            await store.create_session(session, user, "c", 0, 10_000)
        self.assertEqual(await store.end_sessions(session="a1"), 1)
        self.assertEqual(await store.end_sessions(session="a1"), 0)
        self.assertIsNone(await store.get_session("a1", 1))
        self.assertEqual(await store.end_sessions(user_id="alice"), 2)
        self.assertEqual(await store.end_sessions(user_id="alice"), 0)
        self.assertIsNotNone(await store.get_session("b1", 1))

    async def test_invites(self) -> None:
        """
        An invitation is used once only, and never after it expires.
        """
        store = await self.open_store()
        await store.add_invite("i1", 0, 1_000)
        self.assertTrue(await store.use_invite("i1", "alice", 1_000))
        self.assertFalse(await store.use_invite("i1", "alice", 500))
        self.assertFalse(await store.use_invite("i1", "bob", 500))
        await store.add_invite("i2", 0, 1_000)
        self.assertFalse(await store.use_invite("i2", "alice", 1_001))
        self.assertFalse(await store.use_invite("i2", "alice", 1_002))
        self.assertFalse(await store.use_invite("unknown", "alice", 0))

    async def test_keys(self) -> None:
        """
        add_key/get_key/revoke_key: a revoked key is gone; revoking twice,
        or a key never made, answers False.
        """
        store = await self.open_store()
        await store.add_key("k1", "d1", "app one", 1)
        await store.add_key("k2", "d2", "app two", 1)
        self.assertEqual(await store.get_key("k1"), ("d1", "app one"))
        self.assertIsNone(await store.get_key("nope"))
        self.assertTrue(await store.revoke_key("k1", 2))
        self.assertIsNone(await store.get_key("k1"))
        self.assertFalse(await store.revoke_key("k1", 3))
        self.assertFalse(await store.revoke_key("nope", 3))
        self.assertEqual(await store.get_key("k2"), ("d2", "app two"))

    async def test_private_room_with_owner(self) -> None:
        """
        A private room without guests, made with an owner, has that owner
        as its one member.
        """
        store = await self.open_store()
        owner = User("u1", "U")
        self.assertTrue(await store.create_room("r", 1, None, private=True, guests=False, owner=owner))
        access = await store.room_access("r")
        self.assertIsInstance(access, RoomAccess)
        self.assertEqual(
            (access.private, access.guests, access.members, access.last_seq),
            (True, False, {"u1": "owner"}, 0),
        )
        self.assertEqual(await store.rooms_of("u1"), {"r": "owner"})
        self.assertIsNone(await store.room_access("nope"))

    async def test_public_room(self) -> None:
        """
        By default a room is public, open to guests, with no members.
        """
        store = await self.open_store()
        await store.create_room("r", 1)
        access = await store.room_access("r")
        self.assertEqual((access.private, access.guests, access.members), (False, True, {}))

    async def test_member_events(self) -> None:
        """
        Member events change room_access's members as they commit, and
        read back as member messages with their user.
        """
        store = await self.open_store()
        await store.create_room("r", 1, None, private=True, guests=False, owner=User("u1", "U"))
        bob = User("bob", "Bob")
        added, created = await store.append("r", "Bob", "member", 10, None, bob, "member")
        self.assertTrue(created)
        access = await store.room_access("r")
        self.assertEqual(access.members, {"u1": "owner", "bob": "member"})
        self.assertEqual(access.last_seq, added.seq)
        self.assertEqual(await store.rooms_of("bob"), {"r": "member"})
        promoted, _ = await store.append("r", "Bob", "moderator", 11, None, bob, "member")
        self.assertEqual((await store.room_access("r")).members, {"u1": "owner", "bob": "moderator"})
        removed, _ = await store.append("r", "Bob", "", 12, None, bob, "member")
        access = await store.room_access("r")
        self.assertEqual(access.members, {"u1": "owner"})
        self.assertEqual(access.last_seq, removed.seq)
        self.assertEqual(await store.rooms_of("bob"), {})
        messages, _ = await store.read_after("r", 0, 10)
        self.assertEqual(
            [(m.seq, m.kind, m.user, m.nick, m.body) for m in messages],
            [
                (1, "member", bob, "Bob", "member"),
                (2, "member", bob, "Bob", "moderator"),
                (3, "member", bob, "Bob", ""),
            ],
        )
        self.assertEqual(messages, [added, promoted, removed])
        self.assertEqual(messages[0].as_dict()["role"], "member")
        self.assertIsNone(messages[2].as_dict()["role"])

    async def test_member_events_in_one_batch(self) -> None:
        """
        Several member events committed together apply in seq order.
        """
        store = await self.open_store()
        await store.create_room("r", 1)
        bob, carol = User("bob", "Bob"), User("carol", "Carol")
        await gatherResults(
            [
                store.append("r", "Bob", "member", 1, None, bob, "member"),
                store.append("r", "Carol", "member", 2, None, carol, "member"),
                store.append("r", "Bob", "", 3, None, bob, "member"),
                store.append("r", "Carol", "owner", 4, None, carol, "member"),
                store.append("r", "Bob", "moderator", 5, None, bob, "member"),
            ]
        )
        access = await store.room_access("r")
        self.assertEqual(access.members, {"bob": "moderator", "carol": "owner"})
        self.assertEqual(access.last_seq, 5)

    async def test_message_with_user(self) -> None:
        """
        A message sent by a known user reads back with that user (named by
        the message's nick) and nick; one without has no user.
        """
        store = await self.open_store()
        await store.create_room("r", 1)
        sent, _ = await store.append("r", "Ann", "hi", 10, "c1", User("ann", "Ann"))
        self.assertEqual((sent.user, sent.kind), (User("ann", "Ann"), "message"))
        await store.append("r", "guest", "hello", 11, None)
        messages, _ = await store.read_after("r", 0, 10)
        self.assertEqual(
            [(m.nick, m.body, m.user, m.kind, m.client_id) for m in messages],
            [("Ann", "hi", User("ann", "Ann"), "message", "c1"), ("guest", "hello", None, "message", None)],
        )
        self.assertEqual(messages[0], sent)
        self.assertEqual(messages[0].as_dict()["user"], {"id": "ann", "name": "Ann"})
        self.assertEqual((await store.read_before("r", 3, 10))[0].user, User("ann", "Ann"))
        self.assertIsInstance(messages[0], Message)
        self.assertEqual((await store.room_access("r")).members, {})


    async def test_live_sessions(self) -> None:
        """
        live_sessions names the sessions still live: not ended, not
        expired, of an enabled user.
        """
        store = await self.open_store()
        for user in ("ann", "bob"):
            await store.add_user(user, user.title(), None, 0)
        await store.create_session("s1", "ann", "c", 0, 10_000)
        await store.create_session("s2", "ann", "c", 0, 500)
        await store.create_session("s3", "bob", "c", 0, 10_000)
        await store.create_session("s4", "ann", "c", 0, 10_000)
        await store.end_sessions(session="s4")
        await store.disable_user("bob", True, 0)
        self.assertEqual(await store.live_sessions(["s1", "s2", "s3", "s4", "nope"], 1000), {"s1"})  # type: ignore[attr-defined]
        self.assertEqual(await store.live_sessions([], 1000), set())  # type: ignore[attr-defined]


class MemoryIdentityStoreTests(IdentityStoreContractMixin, TestCase):
    """
    The identity contract for the memory store.
    """

    def make_store(self) -> Any:
        return MemoryStore(retain=1000)


class SQLiteIdentityStoreTests(IdentityStoreContractMixin, TestCase):
    """
    The identity contract for the SQLite store.
    """

    def make_store(self) -> Any:
        return SQLiteStore(os.path.abspath(self.mktemp() + ".sqlite3"), reactor=reactor)


class PostgresIdentityStoreTests(IdentityStoreContractMixin, TestCase):
    """
    The identity contract for the PostgreSQL store.
    """

    def setUp(self) -> None:
        self.url = postgres_url(self)

    def make_store(self) -> Any:
        return PostgresStore(self.url, reactor=reactor)
