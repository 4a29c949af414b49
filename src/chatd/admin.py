# -*- test-case-name: tests.test_admin -*-
"""
C{chatd-admin} (also C{python -m chatd admin}): a deployment's
administration from the command line.  It mints tokens, and it manages
accounts, rooms, members, API keys, invitations and sessions.

It talks to the deployment's store only through the store's documented
methods (L{chatd.interfaces.IIdentityStore},
L{chatd.interfaces.IMessageStore}), never by editing tables, so the
store's rules hold.  For example, a membership change is an event of the
room, with a seq, that every node applies in order.  The store is built
from C{--store} by L{chatd.tap.make_store}, as the server builds it, and
opened (which creates or upgrades its schema) before each command.

Each command runs in two phases.  The first reads and checks what the
command needs from the command line, standard input, the terminal and
files.  The second runs under the reactor (L{twisted.internet.task.react})
and does only the store's and the password hasher's work, both in thread
pools.  The first phase runs before the reactor starts, so nothing blocks
the reactor thread and Ctrl-C at a password prompt works as usual.

Output: a short line on stdout, or one JSON object with C{--json}.
Errors: one line on stderr and exit status 1 (2 for a command line
argparse refuses).
"""

from __future__ import annotations

import argparse
import getpass as _getpass
import json
import re
import secrets
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Coroutine, Dict, List, NoReturn, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import react
from twisted.python.failure import Failure

from chatd import auth
from chatd.accounts import validate_account_id
from chatd.model import (
    ROLES,
    ChatError,
    User,
    room_exists,
    room_not_found,
    validate_display_name,
    validate_role,
    validate_room_name,
    validate_user_id,
)
from chatd.store import StoreError, redact

__all__ = [
    "MAX_INVITE_TTL",
    "MAX_TOKEN_TTL",
    "main",
    "parse_ttl",
    "read_secret_file",
    "run",
    "store_url",
]

#: The longest-lived token C{token} mints, and invitation C{invite
#: create} makes, in seconds.
MAX_TOKEN_TTL = 30 * 24 * 3600
MAX_INVITE_TTL = 30 * 24 * 3600

#: Exit statuses: done; refused (one line on stderr says why); a command
#: line argparse refuses; interrupted (SIGINT).
OK, REFUSED, USAGE, INTERRUPTED = 0, 1, 2, 130

_TTL = re.compile(r"([0-9]{1,9})([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# -- rules the server may come to share ---------------------------------------


def read_secret_file(path: str) -> bytes:
    """
    A secret kept in a file: its bytes with surrounding whitespace (a
    trailing newline, say) stripped, as the server reads its own.

    @raise OSError: if the file cannot be read.
    """
    with open(path, "rb") as f:
        return f.read().strip()


def parse_ttl(value: str, maximum: int, option: str = "--ttl") -> int:
    """
    A lifetime: whole seconds (C{3600}), or a whole number of seconds,
    minutes, hours or days (C{90s}, C{30m}, C{1h}, C{2d}).

    @return: seconds, from 1 to C{maximum}.
    @raise ChatError: C{invalid_parameter}.
    """
    match = _TTL.match(value.strip().lower())
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 1 <= seconds <= maximum:
        raise ChatError(
            "invalid_parameter",
            f"{option} {value!r}: give a whole number of seconds, or of minutes, hours "
            f"or days (30m, 1h, 2d), from 1 second to {_duration(maximum)}.",
        )
    return seconds


def _duration(seconds: int) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def store_url(url: Optional[str], data_dir: str) -> str:
    """
    The store a C{--store} (and C{--data-dir}) names, by the server's
    rules: the default is C{sqlite:DATA_DIR/chatd.sqlite3}.  C{memory:} is
    refused, since nothing done there would outlive the command.

    @raise ChatError: C{invalid_parameter}.
    """
    if url is None:
        if not Path(data_dir).is_dir():
            raise ChatError("invalid_parameter", f"--data-dir {data_dir!r} is not a folder.")
        return f"sqlite:{Path(data_dir) / 'chatd.sqlite3'}"
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        raise ChatError(
            "invalid_parameter",
            "--store memory: keeps nothing once this command ends; give the server's store "
            "(sqlite:PATH or postgresql://...).",
        )
    if scheme not in ("sqlite", "postgresql", "postgres") or ":" not in url:
        raise ChatError(
            "invalid_parameter",
            f"--store {redact(url)!r}: use sqlite:PATH or postgresql://user@host:port/dbname.",
        )
    if scheme == "sqlite":
        path = Path(url.split(":", 1)[1])
        if not path.name:
            raise ChatError("invalid_parameter", "--store sqlite:PATH needs a file name.")
        if not path.parent.is_dir():
            raise ChatError(
                "invalid_parameter",
                f"--store {url!r}: the folder {str(path.parent)!r} does not exist.",
            )
    return url


# -- the command line -----------------------------------------------------------


class _Streams:
    """
    Where a run reads and writes (injected by tests).
    """

    def __init__(
        self,
        stdin: Optional[IO[str]],
        stdout: IO[str],
        stderr: IO[str],
        getpass: Callable[[str], str],
    ) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.getpass = getpass


class _Exit(Exception):
    """
    End the run with C{status} (what has to be said is said already).
    """

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """
    An argparse parser that writes to the run's streams and ends with
    L{_Exit} rather than C{sys.exit}, so that L{main} can run in-process.
    """

    streams: Optional[_Streams] = None

    def _out(self, file: Any, error: bool = False) -> Any:
        if file is not None or self.streams is None:
            return file
        return self.streams.stderr if error else self.streams.stdout

    def print_usage(self, file: Any = None) -> None:
        super().print_usage(self._out(file))

    def print_help(self, file: Any = None) -> None:
        super().print_help(self._out(file))

    def exit(self, status: int = 0, message: Optional[str] = None) -> NoReturn:
        if message:
            stderr = self._out(None, error=True) or sys.stderr
            stderr.write(message)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(self._out(None, error=True) or sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


_DESCRIPTION = """\
Administer a chatd deployment: mint tokens; add, disable and enable
accounts; create rooms; add and remove members; create and revoke API
keys; create invitations; end sessions.  Every command but token works on
the deployment's store (--store, as the server's; it is created or
upgraded first).  It prints a short line, or a JSON object with --json;
an error is one line on stderr, with exit status 1 (2 for a command line
this help does not describe).
"""

_MEMBERS_EPILOG = f"""\
A membership change is an event of the room (with the next seq), as if
an owner had made it.  Running nodes learn of it by themselves.  With a
PostgreSQL store it is announced by a NOTIFY in its own transaction, and
nodes on --bus postgresql apply it at once.  On other buses, and with
SQLite, the nodes catch up from the store: a node on --bus redis:// does
so every few seconds.  Roles: {", ".join(ROLES)}.
"""

_CACHE_NOTE = (
    f"Nodes that looked a session or key up in the last {auth.CACHE_TTL:g} seconds "
    "may go on trusting it for that long."
)


def _parser(streams: _Streams, prog: str) -> _Parser:
    """
    The C{chatd-admin} command line.
    """
    parser = _Parser(
        prog=prog,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.streams = streams

    # The common options go before the command or after it; after it,
    # they have no default, so that one given before is not undone.
    def common(parser: argparse.ArgumentParser, leaf: bool) -> None:
        parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS if leaf else False,
            help="Print a JSON object.",
        )

    def store_options(parser: argparse.ArgumentParser, leaf: bool) -> None:
        parser.add_argument(
            "--store",
            "-s",
            metavar="URL",
            default=argparse.SUPPRESS if leaf else None,
            help="The deployment's store, as the server's --store: sqlite:PATH or "
            "postgresql://user[:password]@host[:port]/dbname[?schema=NAME]. "
            "Default: sqlite:DATA_DIR/chatd.sqlite3.",
        )
        parser.add_argument(
            "--data-dir", "-d", metavar="DIR", default=argparse.SUPPRESS if leaf else ".",
            help="The default SQLite store's folder (default: .).",
        )

    common(parser, leaf=False)
    store_options(parser, leaf=False)
    json_parent = argparse.ArgumentParser(add_help=False)
    common(json_parent, leaf=True)
    store_parent = argparse.ArgumentParser(add_help=False)
    store_options(store_parent, leaf=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def add(group: Any, name: str, summary: str, uses_store: bool = True, epilog: Optional[str] = None) -> _Parser:
        sub: _Parser = group.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=epilog,
            parents=[json_parent, store_parent] if uses_store else [json_parent],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.streams = streams
        sub.set_defaults(uses_store=uses_store)
        return sub

    def group(name: str, summary: str) -> Any:
        sub: _Parser = commands.add_parser(name, help=summary, description=summary)
        sub.streams = streams
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)

    token = add(
        commands,
        "token",
        "Mint an HS256 token for a user, signed with the secret the server's "
        "--auth-secret-file holds (needs no store).",
        uses_store=False,
    )
    token.add_argument("--user", required=True, metavar="ID", help="Its sub: the user id.")
    token.add_argument("--name", metavar="NAME", help="Its name: the display name (default: the id).")
    token.add_argument(
        "--ttl", default="1h", help="How long it lasts: 3600, 90s, 30m, 1h, 2d (default 1h, at most 30 days)."
    )
    token.add_argument(
        "--secret-file", required=True, metavar="PATH",
        help="The HS256 secret (at least 32 bytes; surrounding whitespace is ignored).",
    )
    token.add_argument("--audience", metavar="A", help="Its aud, if the server checks one.")
    token.add_argument("--issuer", metavar="I", help="Its iss, if the server checks one.")
    token.set_defaults(check=_check_token, act=_token)

    users = group("user", "Add, disable and enable accounts.")
    user_add = add(users, "add", "Add an account.")
    user_add.add_argument("id", metavar="ID", help="Its id: 1 to 32 of a-z, 0-9, _ . -")
    user_add.add_argument("--name", metavar="NAME", help="Its display name (default: the id).")
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        help="Read the password from the first line of stdin.  Without this, it is asked "
        "twice when stdin is a terminal.  Otherwise the account has no password, and "
        "cannot sign in yet.",
    )
    user_add.set_defaults(check=_check_user_add, act=_user_add)
    for action, disabled in (("disable", True), ("enable", False)):
        summary = (
            "Disable a user (an account, or a token's sub) and end their sessions."
            if disabled
            else "Enable a disabled user again."
        )
        sub = add(users, action, summary, epilog=_CACHE_NOTE if disabled else None)
        sub.add_argument("id", metavar="ID", help="The user id.")
        sub.set_defaults(check=_check_user_id, act=partial(_user_disable, disabled=disabled))

    rooms = group("room", "Create rooms.")
    room_create = add(rooms, "create", "Create a room.")
    room_create.add_argument("name", metavar="NAME", help="1 to 64 of A-Z, a-z, 0-9, _ -")
    room_create.add_argument(
        "--private", action="store_true",
        help="Members only (and API keys, until it has members).",
    )
    room_create.add_argument("--owner", metavar="USER_ID", help="Its first member, as owner.")
    room_create.add_argument(
        "--guests", action="store_true",
        help="Let people with no identity (guests) in too; by default only users may use it.",
    )
    room_create.set_defaults(check=_check_room_create, act=_room_create)

    members = group("member", "Add and remove a room's members.")
    member_add = add(members, "add", "Make a user a member of a room, or change their role.", epilog=_MEMBERS_EPILOG)
    member_add.add_argument("room", metavar="ROOM")
    member_add.add_argument("user", metavar="USER_ID")
    member_add.add_argument("--role", default="member", choices=ROLES, help="Default: member.")
    member_add.add_argument(
        "--name", metavar="NAME", help="Their display name in the event (default: the account's, or the id)."
    )
    member_add.add_argument(
        "--token-user", action="store_true",
        help="The user has no account here: your application's tokens name them (by default "
        "a member must have an account, so that nobody can sign up as them later).",
    )
    member_add.set_defaults(check=_check_member, act=_member_add)
    member_remove = add(members, "remove", "Remove a member from a room.", epilog=_MEMBERS_EPILOG)
    member_remove.add_argument("room", metavar="ROOM")
    member_remove.add_argument("user", metavar="USER_ID")
    member_remove.set_defaults(check=_check_member, act=_member_remove, role=None, name=None)

    keys = group("key", "Create and revoke API keys.")
    key_create = add(keys, "create", "Create an API key (it is shown once).")
    key_create.add_argument("name", metavar="NAME", help="What it is for, e.g. billing-backend.")
    key_create.set_defaults(check=_check_key_create, act=_key_create)
    key_revoke = add(keys, "revoke", "Revoke an API key.", epilog=_CACHE_NOTE)
    key_revoke.add_argument("key_id", metavar="KEY_ID", help="Its id (or the whole key).")
    key_revoke.set_defaults(check=_check_key_revoke, act=_key_revoke)

    invites = group("invite", "Create invitations to sign up.")
    invite_create = add(invites, "create", "Create an invitation, used once.")
    invite_create.add_argument("--ttl", default="7d", help="How long it lasts (default 7d, at most 30 days).")
    invite_create.set_defaults(check=_check_invite, act=_invite_create)

    sessions = group("sessions", "End sessions.")
    sessions_revoke = add(sessions, "revoke", "End every session of a user.", epilog=_CACHE_NOTE)
    sessions_revoke.add_argument("id", metavar="USER_ID")
    sessions_revoke.set_defaults(check=_check_user_id, act=_sessions_revoke)
    return parser


# -- phase one: what each command needs, read and checked -----------------------

#: What a command prints: a line, the JSON object, and a notice for stderr.
_Result = Tuple[str, Dict[str, Any], Optional[str]]


def _check_token(args: argparse.Namespace, streams: _Streams) -> None:
    args.user = validate_user_id(args.user)
    args.name = None if args.name is None else validate_display_name(args.name)
    args.ttl = parse_ttl(args.ttl, MAX_TOKEN_TTL)
    for option, value in (("--audience", args.audience), ("--issuer", args.issuer)):
        if value is not None and not value.strip():
            raise ChatError("invalid_parameter", f"{option} must not be blank.")
    path = args.secret_file
    try:
        args.secret = read_secret_file(path)
    except OSError as e:
        raise ChatError("invalid_parameter", f"--secret-file {path!r}: {e.strerror or e}.") from None
    try:
        # The server's own rules for a secret (its length).
        auth.TokenVerifier([args.secret])
    except ValueError as e:
        raise ChatError("invalid_parameter", f"--secret-file {path!r}: {e}.") from None


def _check_user_add(args: argparse.Namespace, streams: _Streams) -> None:
    args.id = validate_account_id(args.id)
    args.name = validate_display_name(args.id if args.name is None else args.name)
    args.password = _read_password(args.id, args.password_stdin, streams)


def _read_password(user_id: str, from_stdin: bool, streams: _Streams) -> Optional[str]:
    """
    The new account's password: stdin's first line, or typed twice at a
    terminal, or none.
    """
    stdin = streams.stdin
    if from_stdin:
        line = "" if stdin is None else stdin.readline()
        if not line:
            raise ChatError("invalid_password", "--password-stdin: stdin holds no password.")
        return auth.validate_password(line.rstrip("\r\n"))
    if stdin is None or not stdin.isatty():
        return None
    try:
        first = streams.getpass(f"Password for {user_id}: ")
        second = streams.getpass("The same password again: ")
    except EOFError:
        raise ChatError("invalid_password", "No password was typed.") from None
    if first != second:
        raise ChatError("invalid_password", "The two passwords differ.")
    return auth.validate_password(first)


def _check_user_id(args: argparse.Namespace, streams: _Streams) -> None:
    args.id = validate_user_id(args.id)


def _check_room_create(args: argparse.Namespace, streams: _Streams) -> None:
    args.name = validate_room_name(args.name)
    args.owner = None if args.owner is None else validate_user_id(args.owner)


def _check_member(args: argparse.Namespace, streams: _Streams) -> None:
    args.room = validate_room_name(args.room)
    args.user = validate_user_id(args.user)
    if args.role is not None:
        args.role = validate_role(args.role)
    if args.name is not None:
        args.name = validate_display_name(args.name)


def _check_key_create(args: argparse.Namespace, streams: _Streams) -> None:
    args.name = validate_display_name(args.name)


def _check_key_revoke(args: argparse.Namespace, streams: _Streams) -> None:
    key_id = args.key_id.strip()
    parts = auth.split_key(key_id) if key_id.startswith(auth.KEY_PREFIX) else None
    if parts is not None:
        key_id = parts[0]
    if not key_id:
        raise ChatError("invalid_parameter", "KEY_ID must not be blank.")
    args.key_id = key_id


def _check_invite(args: argparse.Namespace, streams: _Streams) -> None:
    args.ttl = parse_ttl(args.ttl, MAX_INVITE_TTL)


# -- phase two: the work, under the reactor --------------------------------------


def _now_ms(reactor: Any) -> int:
    return int(reactor.seconds() * 1000)


async def _token(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    now = reactor.seconds()
    token = auth.mint(args.secret, args.user, args.name, args.ttl, args.audience, args.issuer, now=now)
    data = {
        "token": token,
        "user": args.user,
        "name": args.name if args.name is not None else args.user,
        "expires": int(now) + args.ttl,
        "audience": args.audience,
        "issuer": args.issuer,
    }
    return token, data, None


async def _user_add(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    hashed = None
    if args.password is not None:
        passwords = auth.Passwords(reactor)
        try:
            hashed = await passwords.hash(args.password)
        finally:
            passwords.stop()
    if not await store.add_user(args.id, args.name, hashed, _now_ms(reactor)):
        raise ChatError("user_exists", f"user {args.id} exists")
    how = "" if hashed is not None else " (no password: it cannot sign in yet)"
    data = {"user": args.id, "name": args.name, "password": hashed is not None}
    return f"{args.id} added{how}", data, None


async def _user_disable(args: argparse.Namespace, reactor: Any, store: Any, disabled: bool) -> _Result:
    if await store.get_user(args.id) is None:
        # (The store would make a row for an unknown id, and reserve the
        # name; tokens are your application's to stop issuing.)
        raise ChatError("user_not_found", f"user {args.id} has no account")
    ended = await store.disable_user(args.id, disabled, _now_ms(reactor))
    state = "disabled" if disabled else "enabled"
    data = {"user": args.id, "disabled": disabled, "sessions_ended": ended}
    return f"{args.id} {state}; {_sessions(ended)} ended", data, None


def _sessions(count: int) -> str:
    return f"{count} session" + ("" if count == 1 else "s")


async def _account_name(store: Any, user_id: str) -> str:
    """
    A user's display name: their account's, else their id (if that
    makes a name).
    """
    row = await store.get_user(user_id)
    if row is not None:
        return str(row[0])
    try:
        return validate_display_name(user_id)
    except ChatError as e:
        raise ChatError(
            "invalid_name", f"{user_id!r} has no account, and is no name ({e.detail}); give --name."
        ) from None


async def _room_create(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    owner = None
    if args.owner is not None:
        owner = User(args.owner, await _account_name(store, args.owner))
    guests = bool(args.guests)
    created = await store.create_room(args.name, _now_ms(reactor), None, args.private, guests, owner)
    if not created:
        raise room_exists(args.name)
    details = ["private" if args.private else "public"]
    details.append("guests too" if guests else "users only")
    if owner is not None:
        details.append(f"owner {owner.id}")
    data = {"room": args.name, "private": args.private, "guests": guests, "owner": args.owner}
    return f"{args.name} created ({', '.join(details)})", data, None


async def _member_add(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    if await store.room_state(args.room) is None:
        raise room_not_found(args.room)
    if not args.token_user and await store.get_user(args.user) is None:
        raise ChatError(
            "user_not_found",
            f"user {args.user} has no account (if your application's tokens name them, "
            "give --token-user)",
        )
    name = args.name if args.name is not None else await _account_name(store, args.user)
    message = await _member_event(store, reactor, args.room, User(args.user, name), args.role)
    data = {"room": args.room, "user": args.user, "name": name, "role": args.role, "seq": message.seq}
    return f"{args.user} is {args.role} of {args.room} (seq {message.seq})", data, None


async def _member_remove(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    access = await store.room_access(args.room)
    if access is None:
        raise room_not_found(args.room)
    if args.user not in access.members:
        raise ChatError("not_a_member", f"{args.user} is not a member of {args.room}")
    user = User(args.user, await _account_name(store, args.user))
    message = await _member_event(store, reactor, args.room, user, None)
    data = {"room": args.room, "user": args.user, "name": user.name, "role": None, "seq": message.seq}
    return f"{args.user} removed from {args.room} (seq {message.seq})", data, None


async def _member_event(store: Any, reactor: Any, room: str, user: User, role: Optional[str]) -> Any:
    """
    Store a membership change as the room's next event (the store
    changes the members in the same transaction).
    """
    message, _ = await store.append(room, user.name, role or "", _now_ms(reactor), None, user, "member")
    return message


async def _key_create(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    key_id, key = auth.new_key()
    parts = auth.split_key(key)
    assert parts is not None and parts[0] == key_id
    await store.add_key(key_id, auth.digest(parts[1]), args.name, _now_ms(reactor))
    data = {"key_id": key_id, "key": key, "name": args.name}
    notice = "This key is shown once; chatd keeps only a digest of it. Store it now."
    return key, data, notice


async def _key_revoke(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    if not await store.revoke_key(args.key_id, _now_ms(reactor)):
        raise ChatError("key_not_found", f"no live API key has the id {args.key_id}")
    return f"{args.key_id} revoked", {"key_id": args.key_id, "revoked": True}, None


async def _invite_create(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    code = secrets.token_urlsafe(24)
    now_ms = _now_ms(reactor)
    expires_ms = now_ms + args.ttl * 1000
    await store.add_invite(auth.digest(code), now_ms, expires_ms)
    # token_urlsafe's alphabet needs no quoting in a query string.
    path = f"/account/signup?invite={code}"
    data = {"code": code, "path": path, "expires": expires_ms / 1000}
    return f"{code} {path}", data, None


async def _sessions_revoke(args: argparse.Namespace, reactor: Any, store: Any) -> _Result:
    ended = await store.end_sessions(user_id=args.id)
    return f"{_sessions(ended)} of {args.id} ended", {"user": args.id, "sessions_ended": ended}, None


def _announce_commits(store: Any) -> None:
    """
    With a PostgreSQL store, announce the command's commits as the server
    does (a NOTIFY in each commit's own transaction, with the PostgreSQL
    bus's payloads), so that nodes on that bus hear them at once.
    """
    if not getattr(store, "notify_channel", None):
        return
    # Imported only for a PostgreSQL store.
    from chatd.bus._remote import encode
    from chatd.bus.postgres import MAX_PAYLOAD

    store.notify_commits(partial(encode, limit=MAX_PAYLOAD))


# -- running ---------------------------------------------------------------------


class _Command:
    """
    One parsed, checked command, ready to run under the reactor.
    """

    def __init__(self, args: argparse.Namespace, streams: _Streams) -> None:
        self._args = args
        self._streams = streams
        self._notices: List[str] = []
        self._url: Optional[str] = None
        if args.uses_store:
            self._url = store_url(args.store, args.data_dir)
            if self._url.lower().startswith("sqlite:") and not Path(self._url.split(":", 1)[1]).exists():
                self._notices.append(f"Created a new store, {self._url}.")

    def run(self, reactor: Any) -> Deferred:
        """
        @return: a Deferred firing with the exit status, once everything
            is said and the store is closed.
        """
        return Deferred.fromCoroutine(self._run(reactor))

    async def _run(self, reactor: Any) -> int:
        streams = self._streams
        try:
            text, data, notice = await self._act(reactor)
        except ChatError as e:
            streams.stderr.write(f"{e.detail}\n")
            return REFUSED
        except StoreError as e:
            streams.stderr.write(f"{e}\n")
            return REFUSED
        except Exception:
            # Not a refusal: a bug, or a store gone wrong; say all there is.
            traceback.print_exc(file=streams.stderr)
            return REFUSED
        if self._args.json:
            streams.stdout.write(json.dumps(data, sort_keys=True) + "\n")
        else:
            streams.stdout.write(text + "\n")
        for line in ([notice] if notice else []) + self._notices:
            streams.stderr.write(line + "\n")
        return OK

    async def _act(self, reactor: Any) -> _Result:
        act: Callable[[argparse.Namespace, Any, Any], Coroutine[Any, Any, _Result]] = self._args.act
        if self._url is None:
            return await act(self._args, reactor, None)
        # Imported here: chatd.tap brings the whole server, which token
        # and --help do without.
        from chatd.tap import make_store

        # (history: only the memory store keeps one, and it is refused.)
        store = make_store(self._url, 1, reactor)
        try:
            await store.open()
            _announce_commits(store)
            return await act(self._args, reactor, store)
        finally:
            await store.close()


def _prepare(argv: Sequence[str], streams: _Streams, prog: str) -> _Command:
    """
    Phase one: parse the command line and read what the command needs.

    @raise _Exit: with the status to end with, once the reason is said.
    """
    args = _parser(streams, prog).parse_args(list(argv))
    try:
        args.check(args, streams)
        return _Command(args, streams)
    except ChatError as e:
        streams.stderr.write(f"{e.detail}\n")
        raise _Exit(REFUSED) from None


def main(
    argv: Sequence[str],
    reactor: Any,
    stdin: Optional[IO[str]] = None,
    stdout: Optional[IO[str]] = None,
    stderr: Optional[IO[str]] = None,
    getpass: Optional[Callable[[str], str]] = None,
    prog: str = "chatd-admin",
) -> Deferred:
    """
    Run one C{chatd-admin} command on C{reactor}, which must be running
    (or about to).

    @param argv: the arguments, without the program's name.
    @param stdin: where C{--password-stdin} reads and whose C{isatty()}
        says whether to prompt (default: C{sys.stdin}).
    @param getpass: how to prompt for a password (default:
        L{getpass.getpass}).
    @return: a Deferred firing with the exit status.
    """
    streams = _Streams(
        sys.stdin if stdin is None else stdin,
        sys.stdout if stdout is None else stdout,
        sys.stderr if stderr is None else stderr,
        _getpass.getpass if getpass is None else getpass,
    )
    try:
        command = _prepare(argv, streams, prog)
    except _Exit as e:
        return succeed(e.status)
    return command.run(reactor)


def run(argv: Optional[Sequence[str]] = None, prog: str = "chatd-admin") -> NoReturn:
    """
    The C{chatd-admin} console script: read the command (and any
    password) before the reactor starts, then run it under
    L{twisted.internet.task.react} and exit with its status.
    """
    streams = _Streams(sys.stdin, sys.stdout, sys.stderr, _getpass.getpass)
    try:
        command = _prepare(sys.argv[1:] if argv is None else argv, streams, prog)
    except _Exit as e:
        sys.exit(e.status)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(INTERRUPTED)
    react(partial(_until_stopped, command))


def _until_stopped(command: _Command, reactor: Any) -> Deferred:
    """
    Run C{command}; the Deferred fails with C{SystemExit} (how L{react}
    learns an exit status) unless it ended with status 0, or when the
    reactor is stopped (by SIGINT, say) before it ended.
    """
    outcome: Deferred = Deferred()

    def ended(status: int) -> None:
        if outcome.called:
            return
        if status == OK:
            outcome.callback(None)
        else:
            outcome.errback(Failure(SystemExit(status)))

    def failed(failure: Failure) -> None:
        # _Command.run reports every error itself; this is a last resort.
        if not outcome.called:
            outcome.errback(failure)

    def stopping() -> None:
        if not outcome.called:
            outcome.errback(Failure(SystemExit(INTERRUPTED)))

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    command.run(reactor).addCallbacks(ended, failed)
    return outcome
