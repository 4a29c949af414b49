# -*- test-case-name: tests.test_core -*-
"""
chatd's value types and input rules: the leaf module every other part
imports, and which imports no other part of chatd.

  - L{Message} and L{Batch}: data, as the store makes them and every
    transport sends them.
  - L{ChatError}: a request refused, by a machine-readable code and a
    sentence; the adapters choose the status or frame that carries it
    (L{chatd._wire}).
  - The validators every transport shares: room names, nicks, bodies,
    client ids and seq cursors.
"""

from __future__ import annotations

import datetime
import json
import re
import unicodedata
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "settle_room_event",
    "check_guard",
    "RANKS",
    "Guard",
    "not_member",
    "kicked",
    "muted",
    "banned",
    "check_target",
    "validate_seq",
    "validate_duration",
    "validate_action",
    "validate_reason",
    "validate_topic",
    "MAX_TOPIC",
    "KINDS",
    "ACTIONS",
    "Batch",
    "ChatError",
    "DEFAULT_NICK",
    "MAX_BODY",
    "MAX_CLIENT_ID",
    "MAX_NICK",
    "MAX_SEQ",
    "Message",
    "GUEST",
    "Identity",
    "Peer",
    "ROLES",
    "RoomAccess",
    "RoomLimitReached",
    "User",
    "auth_required",
    "encode_json",
    "parse_cursor",
    "rate_limited",
    "room_exists",
    "room_not_found",
    "too_many_rooms",
    "validate_body",
    "validate_client_id",
    "validate_display_name",
    "validate_nick",
    "validate_role",
    "validate_room_name",
    "validate_user_id",
]

DEFAULT_NICK = "anonymous"
MAX_NICK = 32
MAX_BODY = 4096
MAX_CLIENT_ID = 64
#: The largest seq (and cursor) there can be: a signed 64-bit integer.
MAX_SEQ = 2**63 - 1
#: Decimal digits in MAX_SEQ: a longer number is refused before int() sees
#: it (Python refuses to convert more than 4,300 digits, and converting
#: fewer still costs time quadratic in their number).
_MAX_SEQ_DIGITS = len(str(MAX_SEQ))

_ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: The longest user id (a token's C{sub}, an account's name).
MAX_USER_ID = 128
#: Member roles, from most to least powerful.
ROLES = ("owner", "moderator", "member")
# C0 controls other than TAB and LF, DEL, and C1 controls never belong in a
# chat line; lone surrogates cannot be encoded as UTF-8 at all.
_BAD_BODY_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_LINE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ChatError(Exception):
    """
    A request chatd refuses.

    @ivar code: a short machine-readable error code, e.g. C{"room_not_found"};
        each code has one HTTP status (L{chatd._wire.http_status}).
    @ivar detail: a sentence a person can act on.
    @ivar retry_after: for refusals that pass (rate limits, a full server):
        seconds after which trying again may work, else C{None}.
    """

    def __init__(self, code: str, detail: str, retry_after: Optional[float] = None) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


class RoomLimitReached(Exception):
    """
    A store refused to create a room: it holds the most rooms allowed.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def too_many_rooms(limit: int) -> ChatError:
    """
    C{too_many_rooms}: the service holds its maximum of C{limit} rooms.
    """
    return ChatError("too_many_rooms", f"This server holds its maximum of {limit} rooms.")


def rate_limited(what: str, wait: float) -> ChatError:
    """
    C{rate_limited}: C{what} happened too often; try again in C{wait} s.
    """
    return ChatError("rate_limited", f"{what}; try again in {wait:.1f} s.", wait)


def room_exists(name: str) -> ChatError:
    """
    C{room_exists}: a room of this name is already there.
    """
    return ChatError("room_exists", f"A room named {name!r} already exists.")


def room_not_found(name: object) -> ChatError:
    """
    C{room_not_found}: no room has this name.
    """
    return ChatError("room_not_found", f"There is no room named {name!r}.")


def auth_required(detail: str = "Sign in, or send a token, to use this.") -> ChatError:
    """
    C{auth_required}: the request carries no identity, and needs one.
    """
    return ChatError("auth_required", detail)


def _until(until_ms: Optional[int]) -> str:
    if until_ms is None:
        return ""
    stamp = datetime.datetime.fromtimestamp(until_ms / 1000, datetime.timezone.utc)
    return " until " + stamp.strftime("%Y-%m-%d %H:%M UTC")


def banned(room: str, until_ms: Optional[int]) -> ChatError:
    """
    C{banned}: a moderator banned the user from C{room} (until C{until_ms}).
    """
    return ChatError("banned", f"You are banned from {room!r}{_until(until_ms)}.")


def muted(room: str, until_ms: Optional[int]) -> ChatError:
    """
    C{muted}: the user may read C{room} but not post (until C{until_ms}).
    """
    return ChatError("muted", f"You are muted in {room!r}{_until(until_ms)}: you may read, not post.")


def kicked(room: str) -> ChatError:
    """
    C{kicked}: a moderator removed the user's connections to C{room}.
    """
    return ChatError("kicked", f"A moderator removed you from {room!r}.")


def not_member(room: str) -> ChatError:
    """
    C{not_member}: the user is no longer a member of private room C{room}.
    """
    return ChatError("not_member", f"You are no longer a member of {room!r}.")


def validate_room_name(name: object) -> str:
    """
    Check a room name against C{[A-Za-z0-9_-]{1,64}}.

    @return: the name.
    @raise ChatError: C{invalid_room_name} otherwise.
    """
    if not isinstance(name, str) or not _ROOM_NAME.match(name):
        raise ChatError(
            "invalid_room_name",
            "A room name is 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
        )
    return name


def parse_cursor(value: Optional[str], name: str = "after") -> Optional[int]:
    """
    Parse a seq cursor from a query string: absent means C{None}, otherwise
    a decimal integer from 0 to L{MAX_SEQ}.

    @raise ChatError: C{invalid_parameter}, for anything else (however
        many digits it has: the length is checked before converting).
    """
    if value is None:
        return None
    if (
        not (value.isascii() and value.isdigit())
        or len(value.lstrip("0")) > _MAX_SEQ_DIGITS
        or int(value) > MAX_SEQ
    ):
        raise ChatError(
            "invalid_parameter",
            f"{name} must be a whole number from 0 to {MAX_SEQ} (a message seq).",
        )
    return int(value)


#: Unicode categories a name may not hold: controls, format characters
#: (zero-width spaces and joiners, bidi overrides and isolates, the BOM),
#: line and paragraph separators, surrogates and private use.  Each can
#: make one name look like another, or reorder the text around it.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})


def validate_nick(nick: object) -> str:
    """
    Normalise a nick: missing or blank means L{DEFAULT_NICK}; otherwise
    stripped and in Unicode's NFC form (so that the same name typed two
    ways is one name).

    @raise ChatError: C{invalid_nick} if it is not a string, is longer
        than L{MAX_NICK} characters, or holds a control, zero-width,
        bidi-control or other invisible character (L{_INVISIBLE}).
    """
    if nick is None:
        return DEFAULT_NICK
    if not isinstance(nick, str):
        raise ChatError("invalid_nick", "nick must be a string.")
    nick = nick.strip()
    if not nick:
        return DEFAULT_NICK
    if _BAD_LINE_CHARS.search(nick):
        raise ChatError("invalid_nick", f"A nick is 1 to {MAX_NICK} printable characters.")
    nick = unicodedata.normalize("NFC", nick)
    hidden = next((c for c in nick if unicodedata.category(c) in _INVISIBLE), None)
    if hidden is not None:
        raise ChatError(
            "invalid_nick",
            f"A nick may not hold invisible or direction-changing characters "
            f"(U+{ord(hidden):04X}).",
        )
    if len(nick) > MAX_NICK:
        raise ChatError("invalid_nick", f"A nick is 1 to {MAX_NICK} printable characters.")
    return nick


def validate_display_name(name: object) -> str:
    """
    A user's display name (from a token's C{name}, an account): the rules
    of L{validate_nick}, but never blank.

    @raise ChatError: C{invalid_name}.
    """
    if not isinstance(name, str) or not name.strip():
        raise ChatError("invalid_name", f"A name is 1 to {MAX_NICK} printable characters.")
    try:
        return validate_nick(name)
    except ChatError as e:
        raise ChatError("invalid_name", e.detail.replace("nick", "name")) from None


def validate_user_id(user_id: object) -> str:
    """
    A user id: 1 to L{MAX_USER_ID} printable characters, as given (ids
    are compared exactly).

    @raise ChatError: C{invalid_user}.
    """
    if (
        not isinstance(user_id, str)
        or not 0 < len(user_id) <= MAX_USER_ID
        or user_id != user_id.strip()
        or _BAD_LINE_CHARS.search(user_id)
        or any(unicodedata.category(c) in _INVISIBLE for c in user_id)
    ):
        raise ChatError(
            "invalid_user", f"A user id is 1 to {MAX_USER_ID} printable characters."
        )
    return user_id


def validate_role(role: object) -> str:
    """
    @raise ChatError: C{invalid_role} unless C{role} is one of L{ROLES}.
    """
    if role not in ROLES:
        raise ChatError("invalid_role", "A role is owner, moderator or member.")
    assert isinstance(role, str)
    return role


def validate_body(body: object, max_body: int = MAX_BODY) -> str:
    """
    Strip a message body and check it is 1 to C{max_body} characters.

    @raise ChatError: C{invalid_body} if missing, not a string, blank or
        holding control characters; C{body_too_long} if too long.
    """
    if not isinstance(body, str):
        raise ChatError("invalid_body", "body must be a non-empty string.")
    body = body.strip()
    if not body:
        raise ChatError("invalid_body", "body is empty.")
    if len(body) > max_body:
        raise ChatError(
            "body_too_long",
            f"body is {len(body)} characters; the limit is {max_body}.",
        )
    if _BAD_BODY_CHARS.search(body):
        raise ChatError(
            "invalid_body",
            "body holds control characters or unpaired surrogates.",
        )
    return body


def validate_client_id(client_id: object) -> Optional[str]:
    """
    Check an optional client-chosen idempotency key.

    @raise ChatError: C{invalid_client_id} unless it is C{None} or a string
        of 1 to L{MAX_CLIENT_ID} printable characters.
    """
    if client_id is None:
        return None
    if (
        not isinstance(client_id, str)
        or not 0 < len(client_id) <= MAX_CLIENT_ID
        or _BAD_LINE_CHARS.search(client_id)
    ):
        raise ChatError(
            "invalid_client_id",
            f"client_id is a string of 1 to {MAX_CLIENT_ID} printable characters.",
        )
    return client_id


def encode_json(value: object) -> bytes:
    """
    Encode a value as compact ASCII JSON.

    ASCII-only output keeps U+2028/U+2029 and every other non-ASCII
    character escaped, so the same bytes are safe inside JSONP.
    """
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class User:
    """
    Someone chatd knows: by a token's C{sub} and C{name}, or an account.

    @ivar id: the user id, unique in the deployment.
    @ivar name: the display name (L{validate_display_name}).
    """

    __slots__ = ("id", "name")

    def __init__(self, id: str, name: str) -> None:
        self.id = id
        self.name = name

    def __repr__(self) -> str:
        return f"<User {self.id!r} {self.name!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, User):
            return NotImplemented
        return (self.id, self.name) == (other.id, other.name)

    def __hash__(self) -> int:
        return hash(self.id)

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name}


class Identity:
    """
    Who sent a request: a guest (C{user} None), or a user known by a
    token, a session cookie or an API key.

    @ivar via: C{"guest"}, C{"token"}, C{"session"} or C{"key"}.
    @ivar expires: for a token, when it expires (seconds since the epoch).
    @ivar session: for a session, its id (as the store keys it).
    @ivar csrf: for a session, the token its state changes must carry.
    @ivar key: for an API key, its id (it acts for the server's owner:
        it may name any user, and reach every room).
    """

    __slots__ = ("user", "via", "expires", "session", "csrf", "key")

    def __init__(
        self,
        user: Optional[User] = None,
        via: str = "guest",
        expires: Optional[float] = None,
        session: Optional[str] = None,
        csrf: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        self.user = user
        self.via = via
        self.expires = expires
        self.session = session
        self.csrf = csrf
        self.key = key

    def __repr__(self) -> str:
        return f"<Identity {self.via} {self.user!r}>"

    @property
    def guest(self) -> bool:
        return self.user is None and self.key is None

    @property
    def user_id(self) -> Optional[str]:
        return None if self.user is None else self.user.id


#: Anyone, unidentified.
GUEST = Identity()


#: The kinds of a room's stored events: chat messages, membership
#: changes, edits and deletions of messages, moderation actions, and
#: changes of the room's settings (its topic, whether edits are allowed).
KINDS = ("message", "member", "edit", "delete", "moderation", "room")
#: Moderation actions: C{kick} (in a private room it also ends the
#: membership), C{ban} and C{mute} (optionally for a time), and their undoing.
ACTIONS = ("kick", "ban", "unban", "mute", "unmute")
MAX_TOPIC = 200
MAX_REASON = 200
#: The longest ban or mute with a duration: ten years, in seconds.
MAX_DURATION = 10 * 365 * 24 * 3600


class Message:
    """
    One stored event of a room, immutable once the store has made it:

      - C{kind} C{"message"}: a chat message; C{edited_ms} and
        C{deleted_ms} say its current state (a deleted one's C{body} is
        empty);
      - C{"member"}: a change of membership (C{user} is the member,
        C{nick} their name, C{body} their new role, empty once removed);
      - C{"edit"}: C{user} changed message C{target} to C{body};
      - C{"delete"}: C{user} (None: the server) deleted message C{target};
      - C{"moderation"}: C{meta["action"]} (L{ACTIONS}) on C{user}, by
        C{meta["by"]}, until C{meta["until"]} (ms, or None);
      - C{"room"}: C{user} set the topic to C{body} and C{meta["edits"]}.

    Its JSON encoding (L{json}) is computed once, on first use, and shared
    by every transport and recipient.  A change of state (an edit, a
    deletion) is a new L{Message}, made by L{changed_by}.
    """

    __slots__ = (
        "room", "seq", "nick", "body", "ts_ms", "client_id", "user", "kind",
        "target", "meta", "edited_ms", "deleted_ms", "_json",
    )

    def __init__(
        self,
        room: str,
        seq: int,
        nick: str,
        body: str,
        ts_ms: int,
        client_id: Optional[str] = None,
        user: Optional[User] = None,
        kind: str = "message",
        target: Optional[int] = None,
        meta: Optional[dict] = None,
        edited_ms: Optional[int] = None,
        deleted_ms: Optional[int] = None,
    ) -> None:
        self.room = room
        self.seq = seq
        self.nick = nick
        self.body = body
        self.ts_ms = ts_ms
        self.client_id = client_id
        self.user = user
        self.kind = kind
        self.target = target
        self.meta = meta
        self.edited_ms = edited_ms
        self.deleted_ms = deleted_ms
        self._json: Optional[bytes] = None

    def __repr__(self) -> str:
        if self.kind != "message":
            return f"<Message {self.room}#{self.seq} {self.kind} {self.target} {self.body!r}>"
        return f"<Message {self.room}#{self.seq} {self.nick!r}: {self.body!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.room, self.seq))

    @property
    def deleted(self) -> bool:
        return self.deleted_ms is not None

    def changed_by(self, event: "Message") -> Optional["Message"]:
        """
        This event's state once C{event} (a later edit or delete) has
        happened, or C{None} if C{event} does not change it: an edit
        changes its message's body; a deletion blanks its message and
        every edit of it, so that no later read shows the deleted text.
        """
        if event.kind == "edit" and event.target == self.seq and self.kind == "message":
            if self.deleted:
                return None
            return self._copy(body=event.body, edited_ms=event.ts_ms)
        if event.kind == "delete":
            if self.kind == "message" and self.seq == event.target and not self.deleted:
                return self._copy(body="", deleted_ms=event.ts_ms)
            if self.kind == "edit" and self.target == event.target and self.body:
                return self._copy(body="")
        return None

    def _copy(self, **changes: Any) -> "Message":
        fields = {name: getattr(self, name) for name in self.__slots__ if name != "_json"}
        fields.update(changes)
        return Message(**fields)

    def as_dict(self) -> dict:
        """
        The event as its wire-format dictionary.
        """
        user = None if self.user is None else self.user.as_dict()
        kind = self.kind
        meta = self.meta or {}
        ts = self.ts_ms / 1000.0
        if kind == "message":
            d = {
                "type": "message",
                "room": self.room,
                "seq": self.seq,
                "nick": self.nick,
                "user": user,
                "body": self.body,
                "ts": ts,
            }
            if self.client_id is not None:
                d["client_id"] = self.client_id
            if self.edited_ms is not None:
                d["edited"] = self.edited_ms / 1000.0
            if self.deleted_ms is not None:
                d["deleted"] = self.deleted_ms / 1000.0
            return d
        if kind == "member":
            d = {"type": "member", "room": self.room, "seq": self.seq, "user": user, "role": self.body or None}
            if "by" in meta:
                d["by"] = meta["by"]
            d["ts"] = ts
            return d
        if kind == "edit":
            return {
                "type": "edit",
                "room": self.room,
                "seq": self.seq,
                "target_seq": self.target,
                "nick": self.nick,
                "user": user,
                "body": self.body,
                "ts": ts,
            }
        if kind == "delete":
            return {
                "type": "delete",
                "room": self.room,
                "seq": self.seq,
                "target_seq": self.target,
                "by": user,
                "ts": ts,
            }
        if kind == "moderation":
            until = meta.get("until")
            return {
                "type": "moderation",
                "room": self.room,
                "seq": self.seq,
                "action": meta.get("action"),
                "user": user,
                "by": meta.get("by"),
                "until": None if until is None else until / 1000.0,
                "reason": meta.get("reason"),
                "ts": ts,
            }
        return {
            "type": "room",
            "room": self.room,
            "seq": self.seq,
            "topic": self.body,
            "edits": bool(meta.get("edits", True)),
            "by": user,
            "ts": ts,
        }

    @property
    def json(self) -> bytes:
        """
        The UTF-8 JSON encoding of L{as_dict}, computed once.
        """
        if self._json is None:
            self._json = encode_json(self.as_dict())
        return self._json


class RoomAccess:
    """
    Who may use a room, and how, as the store last committed it.

    @ivar private: members only (others are told it does not exist).
    @ivar guests: people with no identity may read and write it.
    @ivar members: C{{user_id: role}}.
    @ivar names: C{{user_id: name}} of the members.
    @ivar last_seq: the room's last seq when this was read: the members
        are those of every event up to it.
    @ivar topic: the room's topic (C{""}: none).
    @ivar edits: whether authors may edit their messages.
    @ivar bans: C{{user_id: until_ms}} (None: until lifted).
    @ivar mutes: C{{user_id: until_ms}}: they may read, not post.
    """

    __slots__ = ("private", "guests", "members", "names", "last_seq", "topic", "edits", "bans", "mutes")

    def __init__(
        self,
        private: bool = False,
        guests: bool = True,
        members: Optional[Dict[str, str]] = None,
        last_seq: int = 0,
        names: Optional[Dict[str, str]] = None,
        topic: str = "",
        edits: bool = True,
        bans: Optional[Dict[str, Optional[int]]] = None,
        mutes: Optional[Dict[str, Optional[int]]] = None,
    ) -> None:
        self.private = private
        self.guests = guests
        self.members = {} if members is None else members
        self.names = {} if names is None else names
        self.last_seq = last_seq
        self.topic = topic
        self.edits = edits
        self.bans = {} if bans is None else bans
        self.mutes = {} if mutes is None else mutes

    def __repr__(self) -> str:
        kind = "private" if self.private else "public"
        return f"<RoomAccess {kind} guests={self.guests} members={self.members!r}>"

    def copy(self) -> "RoomAccess":
        return RoomAccess(
            self.private, self.guests, dict(self.members), self.last_seq, dict(self.names),
            self.topic, self.edits, dict(self.bans), dict(self.mutes),
        )

    def restricted(self, kind: str, user_id: Optional[str], now_ms: int) -> Optional[Tuple[Optional[int]]]:
        """
        Whether C{user_id} is under a ban (C{kind} C{"ban"}) or a mute
        (C{"mute"}) at C{now_ms}: C{(until_ms,)} if so (C{until_ms} None:
        until lifted), else None.
        """
        if user_id is None:
            return None
        table = self.bans if kind == "ban" else self.mutes
        if user_id not in table:
            return None
        until = table[user_id]
        if until is not None and until <= now_ms:
            return None
        return (until,)

    def apply(self, event: Message) -> None:
        """
        Change this as C{event} (the room's next) does: memberships, bans
        and mutes, the topic and settings.  Every store and every node
        applies the same events in seq order, so they agree.
        """
        self.last_seq = max(self.last_seq, event.seq)
        user, kind, meta = event.user, event.kind, event.meta or {}
        if kind == "member" and user is not None:
            if event.body:
                self.members[user.id] = event.body
                self.names[user.id] = user.name
            else:
                self.members.pop(user.id, None)
                self.names.pop(user.id, None)
        elif kind == "moderation" and user is not None:
            action = meta.get("action")
            if action == "kick" and self.private:
                self.members.pop(user.id, None)
                self.names.pop(user.id, None)
            elif action in ("ban", "mute"):
                table = self.bans if action == "ban" else self.mutes
                # Restrictions that ended are forgotten as new ones come.
                for ended in [k for k, until in table.items() if until is not None and until <= event.ts_ms]:
                    del table[ended]
                table[user.id] = meta.get("until")
            elif action in ("unban", "unmute"):
                (self.bans if action == "unban" else self.mutes).pop(user.id, None)
        elif kind == "room":
            self.topic = event.body
            self.edits = bool(meta.get("edits", True))


def check_target(target: Optional[Message], seq: int) -> Message:
    """
    The rule every store applies, in the transaction that stores an edit
    or a deletion: its target (message C{seq}, as stored now) must be a
    chat message still held and not deleted.

    @raise ChatError: C{message_not_found} or C{message_deleted}.
    """
    if target is None or target.kind != "message":
        raise ChatError("message_not_found", f"There is no message {seq} in this room.")
    if target.deleted:
        raise ChatError("message_deleted", f"Message {seq} was deleted.")
    return target


#: Roles by rank: a moderator acts on plain members and visitors (0), an
#: owner on moderators too.
RANKS = {"owner": 3, "moderator": 2, "member": 1}


class Guard:
    """
    What an event's store checks, in the transaction that stores it and
    against the room as of every event before it (L{check_guard}): who
    acts, and what they must be allowed.  The core checks the same rules
    first, for a quick answer; the store's check is the one that holds when
    events race (a post and the mute of its sender in one batch, an edit
    and the owner turning edits off, a demotion and a ban).

    @ivar actor: the acting user's id (None: an API key or the server).
    @ivar speak: the actor must not be muted (posts, edits, settings,
        moderation all write to the room).
    @ivar edits: the room must allow edits.
    @ivar role: the least role the actor must hold (None: any).
    @ivar over: a user the actor must outrank (whom they moderate, or
        whose message they delete).
    """

    __slots__ = ("actor", "speak", "edits", "role", "over")

    def __init__(
        self,
        actor: Optional[str],
        speak: bool = True,
        edits: bool = False,
        role: Optional[str] = None,
        over: Optional[str] = None,
    ) -> None:
        self.actor = actor
        self.speak = speak
        self.edits = edits
        self.role = role
        self.over = over

    def __repr__(self) -> str:
        return f"<Guard {self.actor!r} speak={self.speak} edits={self.edits} role={self.role} over={self.over!r}>"


def check_guard(access: RoomAccess, guard: Guard, room: str, now_ms: int) -> None:
    """
    The rules L{Guard} names, against C{access}.

    @raise ChatError: C{banned}, C{muted}, C{edits_disabled} or
        C{not_allowed}.
    """
    actor = guard.actor
    if actor is not None:
        ban = access.restricted("ban", actor, now_ms)
        if ban is not None:
            raise banned(room, ban[0])
        if guard.speak:
            mute = access.restricted("mute", actor, now_ms)
            if mute is not None:
                raise muted(room, mute[0])
    if guard.edits and not access.edits:
        raise ChatError("edits_disabled", f"Messages in {room!r} cannot be edited.")
    if actor is None:
        return  # an API key acts for the server's owner
    rank = RANKS.get(access.members.get(actor, ""), 0)
    if guard.role is not None and rank < RANKS[guard.role]:
        raise ChatError("not_allowed", f"Only the room's {guard.role}s{' and owners' if guard.role == 'moderator' else ''} may do this.")
    if guard.over is not None and rank <= RANKS.get(access.members.get(guard.over, ""), 0):
        raise ChatError(
            "not_allowed",
            "You may not do this: owners moderate anyone but owners, moderators plain members "
            "and visitors, and nobody themselves.",
        )


def settle_room_event(access: RoomAccess, meta: dict) -> Tuple[str, dict]:
    """
    A C{room} event asked for as a change (C{meta["change"]}: the topic,
    whether edits are allowed, either or both): its full state, from
    C{access} (the room as of the events before it), so that two changes
    of different settings made at once both hold.

    @return: C{(topic, meta)} of the event as stored.
    """
    change = meta.get("change", {})
    topic = change["topic"] if "topic" in change else access.topic
    edits = change["edits"] if "edits" in change else access.edits
    return topic, {"edits": bool(edits)}


def validate_topic(topic: object) -> str:
    """
    A room topic: stripped, one line of at most L{MAX_TOPIC} printable
    characters (empty clears it).

    @raise ChatError: C{invalid_topic}.
    """
    if not isinstance(topic, str):
        raise ChatError("invalid_topic", "topic must be a string.")
    topic = unicodedata.normalize("NFC", topic.strip())
    if len(topic) > MAX_TOPIC or _BAD_LINE_CHARS.search(topic):
        raise ChatError("invalid_topic", f"A topic is one line of at most {MAX_TOPIC} printable characters.")
    return topic


def validate_reason(reason: object) -> Optional[str]:
    """
    A moderator's optional reason: None, or one line of at most
    L{MAX_REASON} printable characters.

    @raise ChatError: C{invalid_reason}.
    """
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason.strip()) > MAX_REASON or _BAD_LINE_CHARS.search(reason):
        raise ChatError("invalid_reason", f"A reason is one line of at most {MAX_REASON} printable characters.")
    return reason.strip() or None


def validate_action(action: object) -> str:
    """
    @raise ChatError: C{invalid_action} unless C{action} is one of L{ACTIONS}.
    """
    if action not in ACTIONS:
        raise ChatError("invalid_action", "An action is kick, ban, unban, mute or unmute.")
    assert isinstance(action, str)
    return action


def validate_duration(duration: object) -> Optional[int]:
    """
    A ban's or mute's duration: None (until lifted), or whole seconds from
    1 to L{MAX_DURATION} (a decimal string is accepted, for forms).

    @raise ChatError: C{invalid_duration}.
    """
    if duration is None or duration == "":
        return None
    if isinstance(duration, str) and duration.isascii() and duration.isdigit() and len(duration) <= 10:
        duration = int(duration)
    if isinstance(duration, bool) or not isinstance(duration, int) or not 0 < duration <= MAX_DURATION:
        raise ChatError(
            "invalid_duration", f"duration is whole seconds from 1 to {MAX_DURATION} (or absent: until lifted)."
        )
    return duration


def validate_seq(value: object, name: str = "target_seq") -> int:
    """
    A seq given in a JSON body or form: a whole number from 1 to
    L{MAX_SEQ} (a decimal string is accepted, for forms).

    @raise ChatError: C{invalid_parameter}.
    """
    if isinstance(value, str):
        try:
            parsed = parse_cursor(value, name)
        except ChatError:
            parsed = None
        value = parsed
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SEQ:
        raise ChatError("invalid_parameter", f"{name} must be a whole number from 1 to {MAX_SEQ} (a seq).")
    return value


class Batch:
    """
    The answer to a read: some messages after a cursor.

    @ivar messages: the messages, in seq order.
    @ivar last_seq: the room's newest seq when the batch was made.
    @ivar reset: C{True} when the cursor was older than anything the store
        still holds (or newer than anything ever issued), so the messages
        start at C{first_seq} and the client must drop what it shows.
    @ivar first_seq: the oldest seq still held for the room.
    """

    __slots__ = ("room", "messages", "last_seq", "reset", "first_seq")

    def __init__(
        self,
        room: str,
        messages: List[Message],
        last_seq: int,
        reset: bool = False,
        first_seq: int = 1,
    ) -> None:
        self.room = room
        self.messages = messages
        self.last_seq = last_seq
        self.reset = reset
        self.first_seq = first_seq

    def __repr__(self) -> str:
        seqs = [m.seq for m in self.messages]
        return f"<Batch {self.room} {seqs} last_seq={self.last_seq} reset={self.reset}>"


class Peer:
    """
    Who is acting: the client's IP address and, for a WebSocket, its
    connection (any hashable object), for the limits that apply to each.
    """

    __slots__ = ("ip", "connection")

    def __init__(self, ip: str, connection: object = None) -> None:
        self.ip = ip
        self.connection = connection


# -- presence ------------------------------------------------------------------

# (Added here, at the end, so that the list above stays as it was.)
__all__ += ["Headcount"]


class Headcount:
    """
    Who is in a room, as presence leases say: users by id (with their
    names) and how many guests, on one node or summed over several (a
    user on two nodes is one user).

    It is stored in a lease as JSON, C{{"users": {id: name}, "guests": n}}.
    """

    __slots__ = ("users", "guests")

    def __init__(self, users: Optional[Dict[str, str]] = None, guests: int = 0) -> None:
        self.users = {} if users is None else users
        self.guests = guests

    def __repr__(self) -> str:
        return f"<Headcount users={sorted(self.users)} guests={self.guests}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headcount):
            return NotImplemented
        return (self.users, self.guests) == (other.users, other.guests)

    @property
    def clients(self) -> int:
        """
        Users plus guests.
        """
        return len(self.users) + self.guests

    def add(self, other: "Headcount") -> None:
        """
        Count C{other}'s too: its users joined to these, its guests added.
        """
        self.users.update(other.users)
        self.guests += other.guests

    def to_json(self) -> str:
        return json.dumps({"users": self.users, "guests": self.guests}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: object, clients: int) -> "Headcount":
        """
        A lease's headcount from its JSON; a lease that names no one (an
        older node's, C{clients} alone) counts its clients as guests.
        """
        try:
            data: Any = json.loads(text) if isinstance(text, str) else None
            users = data["users"]
            guests = data["guests"]
            if isinstance(users, dict) and type(guests) is int:
                return cls({str(k): str(v) for k, v in users.items()}, max(0, guests))
        except (ValueError, TypeError, KeyError):
            pass
        return cls({}, max(0, int(clients)))
