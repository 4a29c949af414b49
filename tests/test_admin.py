"""
Tests for L{chatd.admin}, the C{chatd-admin} command line: each command
run in-process through L{chatd.admin.main} (with its own streams) on a
fresh SQLite store of the test's own, and checked through the store's
and the auth code's own methods.  A few runs use real processes
(C{python -m chatd admin ...} and the installed C{chatd-admin}), and one
uses PostgreSQL (127.0.0.1:5432, database test), which must be
reachable: that test fails, never skips, without it.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd import admin, auth
from chatd.bus._remote import decode
from chatd.model import ChatError
from chatd.store.postgres import PostgresStore
from chatd.store.sqlite import SQLiteStore
from tests.test_store import POSTGRES_URL, postgres_url

#: A good HS256 secret (40 bytes), as a secret file holds it.
SECRET = b"0123456789abcdef0123456789abcdef-admin-"


class _TTY(io.StringIO):
    """
    A stdin that says it is a terminal.
    """

    def isatty(self) -> bool:
        return True


class _AdminTestCase(TestCase):
    """
    Runs C{chatd-admin} in-process against a store of the test's own.
    """

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        self.folder = folder
        self.path = folder / "chatd.sqlite3"
        self.url = f"sqlite:{self.path}"

    async def admin(
        self,
        *argv: str,
        stdin: Optional[io.StringIO] = None,
        store: Optional[str] = None,
        prompts: Optional[List[str]] = None,
    ) -> Tuple[int, str, str]:
        """
        Run one command (with C{--store} this test's, unless C{store}
        is given, or is C{""} for none).

        @param prompts: what the user types at each password prompt.
        @return: its exit status, stdout and stderr.
        """
        out, err = io.StringIO(), io.StringIO()
        store = self.url if store is None else store
        args = (["--store", store] if store else []) + list(argv)
        typed = list(prompts or [])

        def getpass(prompt: str) -> str:
            if not typed:
                raise EOFError()
            return typed.pop(0)

        status = await admin.main(
            args,
            reactor,
            stdin=io.StringIO() if stdin is None else stdin,
            stdout=out,
            stderr=err,
            getpass=getpass,
        )
        return status, out.getvalue(), err.getvalue()

    async def admin_json(self, *argv: str, stdin: Optional[io.StringIO] = None) -> Dict[str, Any]:
        """
        Run one command with C{--json}, which must succeed.
        """
        status, out, err = await self.admin("--json", *argv, stdin=stdin)
        self.assertEqual(status, 0, err)
        self.assertEqual(out.count("\n"), 1)
        result: Dict[str, Any] = json.loads(out)
        return result

    def assertRefused(self, result: Tuple[int, str, str], detail: str) -> None:
        """
        The command failed with status 1 and one line on stderr holding
        C{detail}, and printed nothing on stdout.
        """
        status, out, err = result
        self.assertEqual(status, 1, (out, err))
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.endswith("\n"))
        self.assertIn(detail, err)
        self.assertNotIn("Traceback", err)

    async def store(self) -> SQLiteStore:
        """
        The test's store, opened as the server would (after the commands
        ran, so it sees what they committed).
        """
        store = SQLiteStore(str(self.path), reactor=reactor)
        self.addCleanup(store.close)
        await store.open()
        return store

    def assertClose(self, value: float, expected: float, within: float = 5.0) -> None:
        """
        C{value} is C{expected}, give or take C{within} (seconds, here).
        """
        self.assertLessEqual(abs(value - expected), within, (value, expected))

    def now_ms(self) -> int:
        return int(reactor.seconds() * 1000)


class TokenTests(_AdminTestCase):
    """
    C{chatd-admin token}: mints tokens the server's verifier accepts.
    """

    def secret_file(self, content: bytes = SECRET + b"\n") -> str:
        path = self.folder / "secret"
        path.write_bytes(content)
        return str(path)

    async def test_token_verifies(self) -> None:
        """
        The token printed verifies with the secret file's bytes (its
        trailing newline stripped), with its sub, name, audience and
        issuer, and expires after the ttl.
        """
        status, out, err = await self.admin(
            "token", "--user", "u-1", "--name", "Ann", "--ttl", "30m",
            "--secret-file", self.secret_file(), "--audience", "chat", "--issuer", "app",
            store="",
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out.count("\n"), 1)
        verifier = auth.TokenVerifier([SECRET], audience="chat", issuer="app")
        identity = verifier.verify(out.strip())
        assert identity.user is not None and identity.expires is not None
        self.assertEqual((identity.user.id, identity.user.name, identity.via), ("u-1", "Ann", "token"))
        self.assertClose(identity.expires, reactor.seconds() + 1800)
        # The audience is in the token: a verifier expecting another refuses it.
        with self.assertRaises(ChatError) as caught:
            auth.TokenVerifier([SECRET], audience="other").verify(out.strip())
        self.assertEqual(caught.exception.code, "invalid_token")

    async def test_token_defaults_json(self) -> None:
        """
        Without --name the token's name is the id, the ttl is an hour,
        and --json gives the token with its claims.
        """
        status, out, err = await self.admin(
            "token", "--user", "bob", "--secret-file", self.secret_file(), "--json", store=""
        )
        self.assertEqual((status, err), (0, ""))
        data = json.loads(out)
        self.assertEqual(
            sorted(data), ["audience", "expires", "issuer", "name", "token", "user"]
        )
        self.assertEqual((data["user"], data["name"], data["audience"]), ("bob", "bob", None))
        identity = auth.TokenVerifier([SECRET]).verify(data["token"])
        assert identity.user is not None
        self.assertEqual((identity.user.id, identity.user.name), ("bob", "bob"))
        self.assertEqual(identity.expires, data["expires"])
        self.assertClose(data["expires"], reactor.seconds() + 3600)

    async def test_bad_ttl_refused(self) -> None:
        """
        A ttl that is not a whole number of s, m, h or d, is not positive,
        or is longer than 30 days, is refused with one line (for invites
        too), and nothing is minted.
        """
        secret = self.secret_file()
        for ttl in ("0", "-1", "1.5h", "abc", "31d", "2592001", "1w", ""):
            result = await self.admin("token", "--user", "u", "--ttl", ttl, "--secret-file", secret, store="")
            self.assertRefused(result, "--ttl")
        self.assertEqual((await self.admin("token", "--user", "u", "--ttl", "30d", "--secret-file", secret, store=""))[0], 0)
        self.assertEqual(admin.parse_ttl("3600", admin.MAX_TOKEN_TTL), 3600)
        self.assertEqual(admin.parse_ttl("2d", admin.MAX_TOKEN_TTL), 172800)
        self.assertRefused(await self.admin("invite", "create", "--ttl", "31d"), "--ttl")

    async def test_bad_secret_refused(self) -> None:
        """
        A missing secret file, or one holding fewer than 32 bytes once
        stripped, is refused with one line; so are a bad id or name.
        """
        missing = str(self.folder / "missing")
        self.assertRefused(
            await self.admin("token", "--user", "u", "--secret-file", missing, store=""), "missing"
        )
        short = self.secret_file(b"  short secret  \n")
        self.assertRefused(
            await self.admin("token", "--user", "u", "--secret-file", short, store=""), "32 bytes"
        )
        good = self.secret_file()
        self.assertRefused(
            await self.admin("token", "--user", " u", "--secret-file", good, store=""), "user id"
        )
        self.assertRefused(
            await self.admin("token", "--user", "u", "--name", "a\u200bb", "--secret-file", good, store=""),
            "invisible",
        )

    def test_read_secret_file(self) -> None:
        """
        read_secret_file strips surrounding whitespace, and keeps the rest.
        """
        path = self.secret_file(b"\n  a b\tc \r\n")
        self.assertEqual(admin.read_secret_file(path), b"a b\tc")


class UserTests(_AdminTestCase):
    """
    C{chatd-admin user add|disable|enable} and C{sessions revoke}.
    """

    async def test_add_with_password_from_stdin(self) -> None:
        """
        user add --password-stdin stores the account with an argon2 hash
        of stdin's first line, which the server's Passwords accepts.
        """
        status, out, err = await self.admin(
            "user", "add", "bob", "--name", "Bob B", "--password-stdin",
            stdin=io.StringIO("correct horse battery\nignored\n"),
        )
        self.assertEqual((status, out), (0, "bob added\n"))
        # The only thing on stderr: the new store's notice.
        self.assertIn("Created a new store", err)
        store = await self.store()
        row = await store.get_user("bob")
        assert row is not None
        name, hashed, disabled = row
        self.assertEqual((name, disabled), ("Bob B", False))
        self.assertTrue(hashed.startswith("$argon2"))
        passwords = auth.Passwords(reactor)
        self.addCleanup(passwords.stop)
        self.assertEqual(await passwords.verify(hashed, "correct horse battery"), (True, None))
        self.assertEqual((await passwords.verify(hashed, "correct horse"))[0], False)

    async def test_add_prompts_at_a_terminal(self) -> None:
        """
        At a terminal the password is asked twice; two different ones are
        refused, and so is one too short.  Without a terminal (or
        --password-stdin) the account has no password.
        """
        self.assertRefused(
            await self.admin("user", "add", "ann", stdin=_TTY(), prompts=["password-1", "password-2"]),
            "differ",
        )
        self.assertRefused(
            await self.admin("user", "add", "ann", stdin=_TTY(), prompts=["short", "short"]),
            "8 to 1024",
        )
        self.assertRefused(await self.admin("user", "add", "ann", stdin=_TTY()), "No password")
        status, out, _ = await self.admin("user", "add", "ann", stdin=_TTY(), prompts=["password-1"] * 2)
        self.assertEqual((status, out), (0, "ann added\n"))
        data = await self.admin_json("user", "add", "cy")
        self.assertEqual(data, {"user": "cy", "name": "cy", "password": False})
        store = await self.store()
        self.assertEqual(await store.get_user("cy"), ("cy", None, False))
        ann = await store.get_user("ann")
        self.assertTrue(ann[1].startswith("$argon2"))

    async def test_duplicate_refused(self) -> None:
        """
        Adding an id that exists fails with status 1 and the one line
        "user ID exists", and leaves the account as it was.
        """
        self.assertEqual((await self.admin("user", "add", "bob", "--name", "First"))[0], 0)
        result = await self.admin("user", "add", "bob", "--name", "Second")
        self.assertRefused(result, "user bob exists")
        self.assertEqual(result[2], "user bob exists\n")
        store = await self.store()
        self.assertEqual((await store.get_user("bob"))[0], "First")

    async def test_bad_account_ids_refused(self) -> None:
        """
        An account id is 1 to 32 of a-z, 0-9, _ . and - (typed in any
        case), not starting with a dot: others are refused before the
        store is touched.
        """
        for user_id in (".", "..", ".bob", "bob smith", "x" * 33, "b\u00f6b", "bob!"):
            self.assertRefused(await self.admin("user", "add", user_id), "user name")
        self.assertFalse(self.path.exists())
        self.assertEqual(admin.validate_account_id("a.b_c-9"), "a.b_c-9")

    async def test_disable_ends_sessions(self) -> None:
        """
        user disable marks the user disabled and ends their sessions,
        saying how many; user enable lets them in again; enabling an
        unknown id is refused.
        """
        self.assertEqual((await self.admin("user", "add", "bob"))[0], 0)
        self.assertEqual((await self.admin("user", "add", "ann"))[0], 0)
        store = await self.store()
        now = self.now_ms()
        await store.create_session("s1", "bob", "c1", now, now + 60_000)
        await store.create_session("s2", "bob", "c2", now, now + 60_000)
        await store.create_session("s3", "ann", "c3", now, now + 60_000)
        status, out, err = await self.admin("user", "disable", "bob")
        self.assertEqual((status, out, err), (0, "bob disabled; 2 sessions ended\n", ""))
        self.assertEqual((await store.get_user("bob"))[2], True)
        self.assertIsNone(await store.get_session("s1", now))
        self.assertEqual(await store.disabled_users(["bob", "ann"]), {"bob"})
        data = await self.admin_json("user", "enable", "bob")
        self.assertEqual(data, {"user": "bob", "disabled": False, "sessions_ended": 0})
        self.assertEqual((await store.get_user("bob"))[2], False)
        self.assertRefused(await self.admin("user", "enable", "nobody"), "user nobody has no account")
        self.assertRefused(await self.admin("user", "disable", "nobody"), "user nobody has no account")
        self.assertIsNone(await store.get_user("nobody"))

    async def test_sessions_revoke(self) -> None:
        """
        sessions revoke ends every session of one user, and only theirs.
        """
        await self.admin("user", "add", "bob")
        await self.admin("user", "add", "ann")
        store = await self.store()
        now = self.now_ms()
        await store.create_session("s1", "bob", "c1", now, now + 60_000)
        await store.create_session("s2", "ann", "c2", now, now + 60_000)
        status, out, _ = await self.admin("sessions", "revoke", "bob")
        self.assertEqual((status, out), (0, "1 session of bob ended\n"))
        data = await self.admin_json("sessions", "revoke", "bob")
        self.assertEqual(data, {"user": "bob", "sessions_ended": 0})
        self.assertEqual(await store.end_sessions(user_id="ann"), 1)


class RoomTests(_AdminTestCase):
    """
    C{chatd-admin room create} and C{member add|remove}.
    """

    async def test_create_public_and_private(self) -> None:
        """
        room create makes a public room for users only by default (with
        --guests, guests too); with --private and --owner a private one
        whose owner is its first member; a name taken is refused.
        """
        status, out, _ = await self.admin("room", "create", "pub", "--guests")
        self.assertEqual((status, out), (0, "pub created (public, guests too)\n"))
        status, out, _ = await self.admin("room", "create", "users")
        self.assertEqual((status, out), (0, "users created (public, users only)\n"))
        await self.admin("user", "add", "alice", "--name", "Alice")
        data = await self.admin_json("room", "create", "priv", "--private", "--owner", "alice")
        self.assertEqual(data, {"room": "priv", "private": True, "guests": False, "owner": "alice"})
        # A private room without an owner: API keys only, until it has members.
        self.assertEqual((await self.admin("room", "create", "keys-only", "--private"))[0], 0)
        store = await self.store()
        pub = await store.room_access("pub")
        self.assertEqual((pub.private, pub.guests, pub.members), (False, True, {}))
        priv = await store.room_access("priv")
        self.assertEqual((priv.private, priv.guests, priv.members), (True, False, {"alice": "owner"}))
        self.assertEqual((await store.room_access("keys-only")).members, {})
        self.assertRefused(await self.admin("room", "create", "pub", "--private"), "already exists")
        self.assertFalse((await store.room_access("pub")).private)
        self.assertRefused(await self.admin("room", "create", "no spaces"), "room name")

    async def test_member_add_and_remove_are_events(self) -> None:
        """
        member add and member remove change the room's members by storing
        "member" events, with the room's next seqs, named after the
        account (or --name).
        """
        await self.admin("room", "create", "dev", "--owner", "alice")
        await self.admin("user", "add", "bob", "--name", "Bob B")
        status, out, _ = await self.admin("member", "add", "dev", "bob", "--role", "moderator")
        self.assertEqual((status, out), (0, "bob is moderator of dev (seq 1)\n"))
        self.assertRefused(
            await self.admin("member", "add", "dev", "tok-user", "--name", "Tok"), "give --token-user"
        )
        data = await self.admin_json("member", "add", "dev", "tok-user", "--name", "Tok", "--token-user")
        self.assertEqual(
            data, {"room": "dev", "user": "tok-user", "name": "Tok", "role": "member", "seq": 2}
        )
        store = await self.store()
        access = await store.room_access("dev")
        self.assertEqual(access.members, {"alice": "owner", "bob": "moderator", "tok-user": "member"})
        self.assertEqual(access.last_seq, 2)
        status, out, _ = await self.admin("member", "remove", "dev", "bob")
        self.assertEqual((status, out), (0, "bob removed from dev (seq 3)\n"))
        access = await store.room_access("dev")
        self.assertEqual(access.members, {"alice": "owner", "tok-user": "member"})
        messages, _ = await store.read_after("dev", 0, 10)
        self.assertEqual(
            [(m.seq, m.kind, m.user.id if m.user else None, m.nick, m.body) for m in messages],
            [
                (1, "member", "bob", "Bob B", "moderator"),
                (2, "member", "tok-user", "Tok", "member"),
                (3, "member", "bob", "Bob B", ""),
            ],
        )
        self.assertEqual(messages[2].as_dict()["role"], None)

    async def test_member_errors(self) -> None:
        """
        Removing someone who is not a member, or changing members of a
        room that does not exist, is refused with one line and stores
        nothing; so is an unknown role (a usage error, status 2).
        """
        await self.admin("room", "create", "dev")
        result = await self.admin("member", "remove", "dev", "bob")
        self.assertRefused(result, "bob is not a member of dev")
        self.assertEqual(result[2], "bob is not a member of dev\n")
        self.assertRefused(await self.admin("member", "add", "nowhere", "bob"), "no room named 'nowhere'")
        self.assertRefused(await self.admin("member", "remove", "nowhere", "bob"), "no room named 'nowhere'")
        # An id that cannot be a name needs --name.
        self.assertRefused(await self.admin("member", "add", "dev", "x" * 40, "--token-user"), "give --name")
        status, _, err = await self.admin("member", "add", "dev", "bob", "--role", "admin")
        self.assertEqual(status, 2)
        self.assertIn("invalid choice", err)
        store = await self.store()
        self.assertEqual(await store.room_state("dev"), (0, 1))


class KeyAndInviteTests(_AdminTestCase):
    """
    C{chatd-admin key create|revoke} and C{invite create}.
    """

    async def test_key_create_and_revoke(self) -> None:
        """
        key create prints a key (once, saying so on stderr) that the
        server's Keys accept; key revoke (by id, or by the whole key) makes
        it refused; revoking it again is refused.
        """
        status, out, err = await self.admin("key", "create", "billing")
        self.assertEqual(status, 0)
        self.assertIn("shown once", err)
        key = out.strip()
        parts = auth.split_key(key)
        assert parts is not None
        key_id = parts[0]
        store = await self.store()
        identity = await auth.Keys(store, reactor).identify(key)
        self.assertEqual((identity.via, identity.key, identity.user), ("key", key_id, None))
        self.assertEqual(await store.get_key(key_id), (auth.digest(parts[1]), "billing"))
        status, out, _ = await self.admin("key", "revoke", key_id)
        self.assertEqual((status, out), (0, f"{key_id} revoked\n"))
        # A fresh Keys: the one above trusts what it looked up for a while.
        refused = await self.assertFailure(auth.Keys(store, reactor).identify(key), ChatError)
        self.assertEqual(refused.code, "invalid_key")
        self.assertRefused(await self.admin("key", "revoke", key_id), f"no live API key has the id {key_id}")
        data = await self.admin_json("key", "create", "other")
        self.assertEqual(sorted(data), ["key", "key_id", "name"])
        self.assertEqual((await self.admin("key", "revoke", data["key"]))[0], 0)
        self.assertIsNone(await store.get_key(data["key_id"]))

    async def test_invite_create(self) -> None:
        """
        invite create prints a code and its sign-up path; the store takes
        the code's digest once, and only before it expires.
        """
        status, out, _ = await self.admin("invite", "create")
        self.assertEqual(status, 0)
        code, path = out.split()
        self.assertEqual(path, f"/account/signup?invite={code}")
        self.assertGreaterEqual(len(code), 32)
        data = await self.admin_json("invite", "create", "--ttl", "1h")
        self.assertEqual(data["path"], f"/account/signup?invite={data['code']}")
        self.assertClose(data["expires"], reactor.seconds() + 3600)
        store = await self.store()
        now = self.now_ms()
        self.assertTrue(await store.use_invite(auth.digest(code), "bob", now))
        self.assertFalse(await store.use_invite(auth.digest(code), "ann", now))
        later = await store.use_invite(auth.digest(data["code"]), "ann", now + 3_700_000)
        self.assertFalse(later)
        self.assertTrue(await store.use_invite(auth.digest(data["code"]), "ann", now))


class CommandLineTests(_AdminTestCase):
    """
    The store options, usage, and real processes.
    """

    async def test_memory_store_refused(self) -> None:
        """
        --store memory: is refused (nothing would persist), as are unknown
        schemes and folders that are not there.
        """
        self.assertRefused(await self.admin("room", "create", "x", store="memory:"), "memory: keeps nothing")
        self.assertRefused(await self.admin("room", "create", "x", store="redis://h"), "use sqlite:PATH")
        self.assertRefused(
            await self.admin("room", "create", "x", store=f"sqlite:{self.folder}/no/such.db"), "does not exist"
        )
        self.assertRefused(
            await self.admin("room", "create", "x", "--data-dir", str(self.folder / "no"), store=""),
            "is not a folder",
        )

    async def test_data_dir_default_store(self) -> None:
        """
        Without --store, the store is chatd.sqlite3 in --data-dir, as the
        server's; options may come before or after the command.
        """
        status, _, err = await self.admin("--data-dir", str(self.folder), "room", "create", "a", store="")
        self.assertEqual(status, 0, err)
        status, out, err = await self.admin("room", "create", "b", "--json", "-d", str(self.folder), store="")
        self.assertEqual((status, json.loads(out)["room"]), (0, "b"), err)
        store = await self.store()
        self.assertEqual([name for name, _ in await store.load_rooms()], ["a", "b"])

    async def test_usage(self) -> None:
        """
        No command, or an unknown one, is a usage error (status 2, usage
        on stderr); --help prints the commands on stdout.
        """
        status, out, err = await self.admin(store="")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("usage: chatd-admin", err)
        status, out, err = await self.admin("frobnicate", store="")
        self.assertEqual(status, 2)
        status, out, err = await self.admin("--help", store="")
        self.assertEqual((status, err), (0, ""))
        for command in ("token", "user", "room", "member", "key", "invite", "sessions"):
            self.assertIn(command, out)

    async def process(self, *argv: str, script: bool = False) -> Tuple[int, str, str]:
        """
        Run C{python -m chatd ARGV}, or the installed C{chatd-admin ARGV}.
        """
        if script:
            executable = str(Path(sys.executable).parent / "chatd-admin")
            self.assertTrue(os.path.exists(executable), f"{executable}: pip install -e . first")
        else:
            executable, argv = sys.executable, ("-m", "chatd", *argv)
        out, err, code = await getProcessOutputAndValue(
            executable, argv, env=os.environ.copy(), path=str(self.folder), reactor=reactor
        )
        return code, out.decode("utf-8"), err.decode("utf-8")

    async def test_processes(self) -> None:
        """
        python -m chatd admin and chatd-admin run the same commands on the
        same store, with the same statuses and one-line errors.
        """
        status, out, err = await self.process("admin", "room", "create", "dev")
        self.assertEqual((status, out), (0, "dev created (public, users only)\n"), err)
        self.assertIn("Created a new store, sqlite:chatd.sqlite3.", err)
        status, out, err = await self.process("user", "add", "bob", script=True)
        self.assertEqual((status, out), (0, "bob added (no password: it cannot sign in yet)\n"), err)
        status, out, err = await self.process("admin", "--json", "member", "add", "dev", "bob")
        self.assertEqual((status, json.loads(out)["seq"]), (0, 1), err)
        status, out, err = await self.process("member", "remove", "dev", "ann", script=True)
        self.assertEqual((status, out, err), (1, "", "ann is not a member of dev\n"))
        status, out, err = await self.process("--store", "memory:", "room", "create", "x", script=True)
        self.assertRefused((status, out, err), "memory:")
        store = await self.store()
        self.assertEqual((await store.room_access("dev")).members, {"bob": "member"})

    async def test_python_m_chatd_usage(self) -> None:
        """
        python -m chatd with no command, or an unknown one, prints its
        usage on stderr and exits with status 2.
        """
        for argv in ((), ("serve",)):
            status, out, err = await self.process(*argv)
            self.assertEqual((status, out), (2, ""))
            self.assertIn("usage: python -m chatd admin", err)
        status, out, err = await self.process("admin")
        self.assertEqual(status, 2)
        self.assertIn("usage: python -m chatd admin", err)


class PostgresTests(_AdminTestCase):
    """
    C{chatd-admin} on a PostgreSQL store (a schema of the test's own).
    """

    async def test_member_add_is_announced(self) -> None:
        """
        On a PostgreSQL store a membership change is announced on the
        store's notify channel, as the PostgreSQL bus encodes hints, so
        nodes on that bus hear it at once.
        """
        self.url = postgres_url(self)
        status, _, err = await self.admin("room", "create", "dev")
        self.assertEqual(status, 0, err)
        store = PostgresStore(self.url, reactor=reactor)
        self.addCleanup(store.close)
        await store.open()
        channel = store.notify_channel
        assert channel is not None
        conn = await deferToThread(_listen, channel)
        heard = deferToThread(_notifications, conn, 5.0)
        status, out, err = await self.admin("member", "add", "dev", "bob", "--role", "owner", "--token-user")
        self.assertEqual((status, out), (0, "bob is owner of dev (seq 1)\n"), err)
        payloads = await heard
        self.assertEqual(len(payloads), 1, "no NOTIFY within 5 s")
        hint = decode(payloads[0].encode("utf-8"))
        assert hint is not None
        room, last_seq, messages = hint
        self.assertEqual((room, last_seq), ("dev", 1))
        self.assertEqual(
            [(m.seq, m.kind, m.user.id if m.user else None, m.body) for m in messages],
            [(1, "member", "bob", "owner")],
        )
        self.assertEqual((await store.room_access("dev")).members, {"bob": "owner"})


def _listen(channel: str) -> Any:
    """
    In a thread: a connection LISTENing on C{channel}.
    """
    import psycopg
    from psycopg import sql

    conn = psycopg.connect(POSTGRES_URL, autocommit=True)
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return conn


def _notifications(conn: Any, timeout: float) -> List[str]:
    """
    In a thread: the first payload C{conn} hears within C{timeout}
    seconds (none if it hears nothing), then close it.
    """
    try:
        return [n.payload for n in conn.notifies(timeout=timeout, stop_after=1)]
    finally:
        conn.close()


class UntilStoppedTests(SynchronousTestCase):
    """
    How the console script turns a run into react's exit status.
    """

    class _Reactor:
        def __init__(self) -> None:
            self.triggers: List[Any] = []

        def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
            self.triggers.append((phase, event, f))

    class _Command:
        def __init__(self) -> None:
            self.result: Deferred = Deferred()

        def run(self, reactor: Any) -> Deferred:
            return self.result

    def test_statuses(self) -> None:
        """
        Status 0 succeeds; any other fails with SystemExit of it; a reactor
        stopped before the command ends (SIGINT) fails with status 130,
        and a later status changes nothing.
        """
        for status, expected in ((0, None), (1, 1)):
            command = self._Command()
            outcome = admin._until_stopped(command, self._Reactor())  # type: ignore[arg-type]
            command.result.callback(status)
            if expected is None:
                self.assertIsNone(self.successResultOf(outcome))
            else:
                self.assertEqual(self.failureResultOf(outcome, SystemExit).value.code, expected)
        command = self._Command()
        fake = self._Reactor()
        outcome = admin._until_stopped(command, fake)  # type: ignore[arg-type]
        [(phase, event, stopping)] = fake.triggers
        self.assertEqual((phase, event), ("before", "shutdown"))
        self.assertNoResult(outcome)
        stopping()
        self.assertEqual(self.failureResultOf(outcome, SystemExit).value.code, admin.INTERRUPTED)
        command.result.callback(0)
