# -*- test-case-name: tests.test_accounts -*-
"""
chatd's own accounts (C{--auth accounts}): sign-up, sign-in and sign-out,
as rules the web adapter's pages and API call.

Passwords are hashed with argon2 off the reactor thread
(L{chatd.auth.Passwords}); sign-ins are rate-limited per address and per
account, and a missing account costs the same hash as a wrong password,
so neither guessing nor timing tells which accounts exist.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred

from chatd.auth import Passwords, Sessions, digest, validate_password
from chatd.limits import RateLimiter
from chatd.model import ChatError, Identity, User, rate_limited, validate_display_name

__all__ = ["Accounts", "SIGNUP_MODES", "validate_account_id"]

#: Who may sign up: anyone, holders of an invitation, or nobody (accounts
#: are made with C{chatd admin user add}).
SIGNUP_MODES = ("open", "invite", "closed")

_ACCOUNT_ID = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,31}\Z")

#: Sign-in attempts: a burst of this many per address and per account,
#: then one every this many seconds.
SIGNIN_BURST = 10
SIGNIN_EVERY = 6.0


def validate_account_id(user_id: object) -> str:
    """
    An account's id (its user name): 1 to 32 of a-z, 0-9, '_', '.' and
    '-', in lower case (what is typed is lower-cased).

    @raise ChatError: C{invalid_user}.
    """
    if isinstance(user_id, str):
        user_id = user_id.strip().lower()
    if not isinstance(user_id, str) or not _ACCOUNT_ID.match(user_id):
        raise ChatError(
            "invalid_user",
            "A user name is 1 to 32 of a-z, 0-9, '_', '.' and '-', starting with a letter, a digit or '_'.",
        )
    return user_id


class Accounts:
    """
    @param signup: one of L{SIGNUP_MODES}.
    """

    def __init__(
        self,
        store: Any,
        clock: Any,
        passwords: Passwords,
        sessions: Sessions,
        signup: str = "open",
    ) -> None:
        if signup not in SIGNUP_MODES:
            raise ValueError(f"unknown sign-up mode {signup!r}")
        self._store = store
        self._clock = clock
        self.passwords = passwords
        self.sessions = sessions
        self.signup = signup
        self._by_ip = RateLimiter(clock, SIGNIN_BURST, 1 / SIGNIN_EVERY)
        self._by_account = RateLimiter(clock, SIGNIN_BURST, 1 / SIGNIN_EVERY)

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def sign_up(
        self, user_id: object, name: object, password: object, invite: object, ip: str
    ) -> Deferred:
        """
        Make an account and sign it in.

        @return: a Deferred firing with C{(cookie, identity)}, or failing
            with C{signup_closed}, C{invalid_invite}, C{invalid_user},
            C{invalid_name}, C{invalid_password}, C{user_exists} or
            C{rate_limited}.
        """

        async def sign_up() -> Tuple[bytes, Identity]:
            if self.signup == "closed":
                raise ChatError("signup_closed", "Sign-up is closed here; ask an administrator.")
            self._limit(self._by_ip, ip)
            account = validate_account_id(user_id)
            display = validate_display_name(name if name else account)
            secret = validate_password(password)
            if not secret.strip():
                raise ChatError("invalid_password", "A password is more than white space.")
            if self.signup == "invite" and not (isinstance(invite, str) and invite):
                raise ChatError("invalid_invite", "Sign-up here needs an invitation link.")
            if await self._store.get_user(account) is not None:
                raise ChatError("user_exists", f"The user name {account!r} is taken.")
            hashed = await self.passwords.hash(secret)
            if self.signup == "invite":
                assert isinstance(invite, str)
                if not await self._store.use_invite(digest(invite), account, self._now_ms()):
                    raise ChatError("invalid_invite", "The invitation is not valid (used, or expired).")
            if not await self._store.add_user(account, display, hashed, self._now_ms()):
                raise ChatError("user_exists", f"The user name {account!r} is taken.")
            return await self.sessions.start(User(account, display))

        return Deferred.fromCoroutine(sign_up())

    def sign_in(self, user_id: object, password: object, ip: str) -> Deferred:
        """
        Check a password and start a session.

        @return: a Deferred firing with C{(cookie, identity)}, or failing
            with C{invalid_credentials} (for a wrong password, an unknown
            or disabled account alike) or C{rate_limited}.
        """

        async def sign_in() -> Tuple[bytes, Identity]:
            self._limit(self._by_ip, ip)
            wrong = ChatError("invalid_credentials", "Wrong user name or password.")
            if not isinstance(user_id, str) or not isinstance(password, str):
                raise wrong
            account = user_id.strip().lower()[:64]
            self._limit(self._by_account, account)
            row = await self._store.get_user(account)
            stored: Optional[str] = None if row is None or row[2] else row[1]
            matches, rehashed = await self.passwords.verify(stored, password[:1024])
            if not matches or row is None:
                raise wrong
            if rehashed is not None:
                await self._store.set_password(account, rehashed)
            return await self.sessions.start(User(account, row[0]))

        return Deferred.fromCoroutine(sign_in())

    def sign_out(self, identity: Identity) -> Deferred:
        """
        End C{identity}'s session (nothing for other identities).
        """
        if identity.via != "session":
            return Deferred.fromCoroutine(_nothing())
        return self.sessions.end(identity)

    def _limit(self, limiter: RateLimiter, key: str) -> None:
        wait = limiter.take(key)
        if wait:
            raise rate_limited("Too many attempts to sign in or up", wait)


async def _nothing() -> None:
    return None
