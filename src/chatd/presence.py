# -*- test-case-name: tests.test_presence -*-
"""
Who is in a room now, and who is typing: one room's ephemeral state, with
no I/O.  Nothing here is stored or has a seq; it lives as long as the
connections it counts.

Presence is counted by I{entry}: one per user (however many tabs and
transports they have open: C{user:ID}), one per guest browser that names
itself (C{guest:CLIENT}, the page's own random id), and one per
connection of a guest that does not (C{conn:N}, or C{ip:ADDRESS} for a
long-poll).  An entry is here while it has connections (L{Visit}s) or
while its lease lasts: a long-poll holds its entry while it waits and
leaves a lease of L{POLL_GRACE} seconds when it is answered, so a user
who polls again is never seen to leave between polls; an event stream
that the server ended leaves one of L{STREAM_GRACE} while its browser
reconnects.  Other nodes' entries come from their presence leases
(L{Presence.remote}), as a L{chatd.model.Headcount}.

What clients see is the union over the nodes: users by id (with their
names) and how many guests.  Listeners (the room's WebSocket and SSE
connections that asked for it) get a snapshot when they arrive, then a
diff whenever the union changes, and a frame whenever someone starts or
stops typing; long-polls that asked for it are woken (at most every
L{WAKE_SPACING} seconds) so that their answers carry the new state, and
one that has not seen the current state (its L{Presence.seen}) is
answered at once.

Typing: a start is accepted at most once per L{TYPING_EVERY} seconds per
typer (more are dropped quietly), and expires L{TYPING_EXPIRES} seconds
after the last one accepted; it stops on an explicit stop, when the typer
posts (L{Presence.delivered}), and when their entry leaves.  Starts and
stops of this node's typers go to the other nodes through C{publish} (the
bus's ephemeral signals); theirs come back through L{Presence.remote_typing}.

Every listener is called on its own: one that raises is logged and
dropped, and costs the others nothing.
"""

from __future__ import annotations

import heapq
import itertools
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chatd.model import ChatError, Headcount, Identity, Message, User, encode_json

__all__ = [
    "ANNOUNCE_SPACING",
    "Listener",
    "MAX_ENTRIES",
    "MAX_TYPERS",
    "POLL_GRACE",
    "Presence",
    "STREAM_GRACE",
    "TYPING_EVERY",
    "TYPING_EXPIRES",
    "Visit",
    "WAKE_SPACING",
    "presence_key",
    "validate_client",
    "validate_flag",
    "validate_seen",
]

#: Seconds a typing start lasts unless another one comes.
TYPING_EXPIRES = 6.0
#: One typing start per typer is accepted per this many seconds.
TYPING_EVERY = 2.0
#: Seconds a long-poll's entry stays after its poll is answered.
POLL_GRACE = 10.0
#: Seconds an event stream's entry stays after the server ended it (the
#: browser reconnects a second later).
STREAM_GRACE = 10.0
#: Long-polls waiting for presence are woken at most this often.
WAKE_SPACING = 0.5
#: Presence diffs go to listening connections at most this often: the
#: first change after a quiet spell at once, the changes of a busier one
#: together in one diff (a crowd of N arriving would otherwise send each
#: of N listeners N frames).
ANNOUNCE_SPACING = 0.1
#: The most entries a room tracks on one node; past it, newcomers are not
#: counted (their connections still work).
MAX_ENTRIES = 10_000
#: The most people shown typing in a room at once; past it, new typers
#: are dropped.
MAX_TYPERS = 50

#: Called with a frame's kind (C{"presence"} or C{"typing"}) and its JSON.
Listener = Callable[[str, bytes], None]

_CLIENT = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_SEEN = re.compile(r"[0-9a-f]{1,16}\.[0-9]{1,19}\Z")

_log = Logger(namespace="chatd.presence")


def validate_client(value: object) -> Optional[str]:
    """
    A page's own id (C{client}, the same in all of a browser's tabs): 1 to
    64 letters, digits, C{-} and C{_}, or None when not given.

    @raise ChatError: C{invalid_parameter} otherwise.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _CLIENT.match(value):
        raise ChatError("invalid_parameter", "client must be 1 to 64 letters, digits, '-' or '_'.")
    return value


def validate_flag(value: object, name: str, default: bool) -> bool:
    """
    A yes/no parameter: JSON true/false, or C{1}/C{true}/C{0}/C{false}
    (a query string's or a form's); C{default} when not given.

    @raise ChatError: C{invalid_parameter} otherwise.
    """
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "on", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "off", "no"):
        return False
    raise ChatError("invalid_parameter", f"{name} must be true or false.")


def validate_seen(value: Optional[str]) -> Tuple[bool, Optional[str]]:
    """
    A long-poll's C{presence}: absent or C{0}/C{false} (not wanted),
    C{1}/C{true} (wanted, nothing seen yet), or the C{version} of the
    presence its last answer carried.

    @return: C{(wanted, version seen)}.
    @raise ChatError: C{invalid_parameter}.
    """
    if value is not None and _SEEN.match(value):
        return True, value
    try:
        return validate_flag(value, "presence", False), None
    except ChatError:
        raise ChatError(
            "invalid_parameter", "presence must be 1, 0, or the presence version of the last answer."
        ) from None


def presence_key(identity: Identity, client: Optional[str], anonymous: str) -> Optional[str]:
    """
    The entry C{identity} is counted under: its user's, a guest browser's
    (C{client}), or C{anonymous} for a guest that gives none.  An API key
    is no one here (None): it acts for an application, not a person.
    """
    if identity.key is not None:
        return None
    if identity.user is not None:
        return "user:" + identity.user.id
    if client is not None:
        return "guest:" + client
    return anonymous


class _Entry:
    """
    One user or guest here on this node.
    """

    __slots__ = ("user", "visits", "until", "queued")

    def __init__(self, user: Optional[User]) -> None:
        self.user = user
        #: Connections and waiting polls that hold it.
        self.visits = 0
        #: With no visits, it stays until then (a lease).
        self.until = 0.0
        #: Whether its lease is in the expiry heap.
        self.queued = False


class _Typer:
    """
    Someone typing, until C{call} fires.
    """

    __slots__ = ("user", "nick", "call")

    def __init__(self, user: Optional[User], nick: str, call: Optional[IDelayedCall]) -> None:
        self.user = user
        self.nick = nick
        self.call = call

    def as_dict(self) -> dict:
        return {"user": None if self.user is None else self.user.as_dict(), "nick": self.nick}


class Visit:
    """
    One connection or waiting long-poll in a room's presence: L{leave}
    once it ends.

    @ivar key: the entry it counts under (typing from it is under it too).
    @ivar since: the presence version when it arrived (a long-poll is
        woken only by changes after it).
    """

    __slots__ = ("_presence", "key", "user", "since", "counted", "active")

    def __init__(self, presence: "Presence", key: str, user: Optional[User], counted: bool) -> None:
        self._presence = presence
        self.key = key
        self.user = user
        self.since = presence.version
        self.counted = counted
        self.active = True

    def leave(self, linger: float = 0.0) -> None:
        """
        The connection ended; its entry stays C{linger} more seconds if it
        has no other.  Safe to call twice.
        """
        if self.active:
            self.active = False
            self._presence._leave(self, linger)

    def typing(self, on: bool, nick: str) -> bool:
        """
        L{Presence.typing} from this connection.
        """
        return self._presence.typing(self.key, self.user, nick, on)


class Presence:
    """
    One room's presence and typing (see the module's docstring).

    @param room: the room's name (frames carry it).
    @param clock: leases and typing expire by it; without one nothing
        lingers and typing is ignored.
    @param publish: tells the other nodes a typing start or stop (a small
        dict; the bus's ephemeral signal), or None.
    @param observer: told of frames sent and typing signals
        (L{chatd.metrics.Metrics}), or None.
    @ivar version: goes up with every change clients can see.
    """

    def __init__(
        self,
        room: str,
        clock: Optional[IReactorTime] = None,
        publish: Optional[Callable[[Dict[str, Any]], None]] = None,
        observer: Any = None,
        spacing: float = ANNOUNCE_SPACING,
    ) -> None:
        self.room = room
        #: Seconds between diffs (L{ANNOUNCE_SPACING}; 0: a diff for every
        #: change).
        self.spacing = spacing
        self._clock = clock
        self._publish = publish
        self._observer = observer
        self._entries: Dict[str, _Entry] = {}
        #: Guest entries among them.
        self._guests = 0
        self._remote = Headcount()
        #: What clients were last told: the union over the nodes.
        self._shown: Dict[str, str] = {}
        self._shown_guests = 0
        self._listeners: Dict[Visit, Listener] = {}
        self._wakes: Dict[Visit, Callable[[], None]] = {}
        self._typers: Dict[str, _Typer] = {}
        #: When each typer's last start was accepted (the rate limit).
        self._started: Dict[str, float] = {}
        #: C{(until, n, key)} of leases, earliest first, and one call for
        #: the earliest.
        self._leases: List[Tuple[float, int, str]] = []
        self._entries_seq = itertools.count()
        self._expiry: Optional[IDelayedCall] = None
        self._expiry_at = 0.0
        self._wake_call: Optional[IDelayedCall] = None
        self._woke_at = float("-inf")
        #: Changes not yet told to listeners (L{_announce}): user id to
        #: name, or None for gone; and whether any change (guests too) is.
        self._pending: Dict[str, Optional[str]] = {}
        self._pending_any = False
        self._tell_call: Optional[IDelayedCall] = None
        self._told_at = float("-inf")
        self._connections = itertools.count(1)
        self.version = 0
        #: Tells this presence's versions apart from another's (another
        #: node's, another life of this one's).
        self._tag = f"{id(self) & 0xFFFFFFFFFFFF:012x}"
        self._snapshot: Tuple[int, bytes] = (-1, b"")
        self._fields: Tuple[int, bytes] = (-1, b"")

    def __repr__(self) -> str:
        return f"<Presence {self.room} users={len(self._shown)} guests={self._shown_guests}>"

    # -- what it shows ---------------------------------------------------------

    @property
    def clients(self) -> int:
        """
        Distinct users plus guests here, on every node.
        """
        return len(self._shown) + self._shown_guests

    @property
    def local_clients(self) -> int:
        """
        Distinct users plus guests here on this node.
        """
        return len(self._entries)

    @property
    def users(self) -> List[User]:
        """
        The users here, on every node, by name then id.
        """
        return [User(i, n) for i, n in sorted(self._shown.items(), key=lambda item: (item[1], item[0]))]

    @property
    def guests(self) -> int:
        """
        How many guests are here, on every node.
        """
        return self._shown_guests

    @property
    def typing_now(self) -> List[Tuple[Optional[User], str]]:
        """
        Who is typing: C{(user or None, nick)}, the earliest first.
        """
        return [(t.user, t.nick) for t in self._typers.values()]

    def snapshot(self) -> bytes:
        """
        The C{presence} snapshot frame, encoded once per version.
        """
        version, body = self._snapshot
        if version != self.version:
            body = encode_json(
                {
                    "type": "presence",
                    "room": self.room,
                    "users": [u.as_dict() for u in self.users],
                    "guests": self._shown_guests,
                }
            )
            self._snapshot = (self.version, body)
        return body

    @property
    def seen(self) -> str:
        """
        What a long-poll answer calls this state (its C{presence.version}):
        a poll that sends it back is answered when it changes, one that
        sends another at once.  It names this presence as well as its
        version, so a client that moves to another node is answered there
        at once too.
        """
        return f"{self._tag}.{self.version}"

    def poll_fields(self) -> bytes:
        """
        A long-poll answer's C{"presence": {...}, "typing": [...]} (the
        members of a JSON object, without braces), encoded once per
        version: it is spliced into answers that are encoded already.
        """
        version, body = self._fields
        if version != self.version:
            here = encode_json(
                {"users": [u.as_dict() for u in self.users], "guests": self._shown_guests, "version": self.seen}
            )
            typing = encode_json([t.as_dict() for t in self._typers.values()])
            body = b'"presence":' + here + b',"typing":' + typing
            self._fields = (self.version, body)
        return body

    def lease(self) -> Headcount:
        """
        This node's users and guests here, for its presence lease.
        """
        users = {e.user.id: e.user.name for e in self._entries.values() if e.user is not None}
        return Headcount(users, self._guests)

    # -- arriving and leaving ----------------------------------------------------

    def anonymous_key(self) -> str:
        """
        An entry key of its own, for a guest connection that names no
        browser.
        """
        return f"conn:{next(self._connections)}"

    def arrive(
        self,
        key: str,
        user: Optional[User],
        listener: Optional[Listener] = None,
        wake: Optional[Callable[[], None]] = None,
    ) -> Visit:
        """
        A connection (or a waiting long-poll) is here, under entry C{key}.
        C{listener}, if given, gets the snapshot now (and the typers), then
        every diff and typing frame; C{wake}, if given, is called (once at
        most, soon after) when what clients see changes.
        """
        entry = self._entries.get(key)
        counted = True
        if entry is None:
            if len(self._entries) >= MAX_ENTRIES:
                counted = False
            else:
                entry = self._entries[key] = _Entry(user)
                if user is None:
                    self._guests += 1
                    self._guests_changed()
                else:
                    self._user_here(user)
        elif user is not None and entry.user != user:
            # The same user under a new name (a fresh token).
            entry.user = user
            self._user_here(user)
        if entry is not None:
            entry.visits += 1
        return self._register(Visit(self, key, user, counted), listener, wake)

    def listen(self, listener: Optional[Listener] = None, wake: Optional[Callable[[], None]] = None) -> Visit:
        """
        L{arrive} for a connection that is no one here (an API key's): it
        hears and is woken like the others, and is not counted.
        """
        return self._register(Visit(self, "", None, False), listener, wake)

    def _register(
        self, visit: Visit, listener: Optional[Listener], wake: Optional[Callable[[], None]]
    ) -> Visit:
        if listener is not None:
            if not self._listeners:
                # Changes held for listeners that have all gone since (and
                # none recorded after): the snapshot says what is now.
                self._forget_pending()
            self._listeners[visit] = listener
            self._tell(visit, listener, "presence", self.snapshot())
            typers = list(self._typers.values())
            for typer in typers:
                self._tell(visit, listener, "typing", self._typing_frame(typer, True))
            self._observe("presence_frame", "presence", 1)
            self._observe("presence_frame", "typing", len(typers))
        if wake is not None:
            self._wakes[visit] = wake
        return visit

    def _leave(self, visit: Visit, linger: float) -> None:
        self._listeners.pop(visit, None)
        self._wakes.pop(visit, None)
        if not visit.counted:
            return
        entry = self._entries.get(visit.key)
        if entry is None:
            return
        entry.visits -= 1
        clock = self._clock
        now = 0.0 if clock is None else clock.seconds()
        if clock is not None and linger > 0:
            # Kept even while other visits hold it: it may outlast them.
            entry.until = max(entry.until, now + linger)
        if entry.visits > 0:
            return
        if clock is not None and entry.until > now:
            self._queue_lease(visit.key, entry)
            return
        self._remove(visit.key)

    def _queue_lease(self, key: str, entry: _Entry) -> None:
        """
        Have entry C{key} looked at when its lease ends (once: a lease
        extended meanwhile is queued again then).
        """
        if entry.queued:
            return
        clock = self._clock
        assert clock is not None
        entry.queued = True
        heapq.heappush(self._leases, (entry.until, next(self._entries_seq), key))
        delay = max(0.0, entry.until - clock.seconds())
        if self._expiry is None:
            self._expiry = clock.callLater(delay, self._expire)
            self._expiry_at = entry.until
        elif entry.until < self._expiry_at:
            self._expiry.reset(delay)
            self._expiry_at = entry.until

    def _expire(self) -> None:
        self._expiry = None
        clock = self._clock
        assert clock is not None
        now = clock.seconds()
        leases = self._leases
        again = []
        while leases and leases[0][0] <= now:
            _, _, key = heapq.heappop(leases)
            entry = self._entries.get(key)
            if entry is None:
                continue
            entry.queued = False
            if entry.visits > 0:
                continue
            if entry.until > now:
                again.append((key, entry))
                continue
            self._remove(key)
        if leases and self._expiry is None:
            self._expiry_at = leases[0][0]
            self._expiry = clock.callLater(max(0.0, self._expiry_at - now), self._expire)
        for key, entry in again:
            self._queue_lease(key, entry)

    def _remove(self, key: str) -> None:
        """
        Entry C{key} is gone from this node: say so, and stop its typing.
        """
        entry = self._entries.pop(key)
        if entry.user is None:
            self._guests -= 1
            self._guests_changed()
        else:
            self._user_gone(entry.user.id)
        self._stop(key, publish=True)

    # -- what clients are told ---------------------------------------------------

    def _user_here(self, user: User) -> None:
        if self._shown.get(user.id) != user.name:
            self._shown[user.id] = user.name
            self._announce([user], [])

    def _user_gone(self, user_id: str) -> None:
        remote = self._remote.users.get(user_id)
        if remote is not None:
            # Still here on another node (perhaps by another name).
            if self._shown.get(user_id) != remote:
                self._shown[user_id] = remote
                self._announce([User(user_id, remote)], [])
        elif self._shown.pop(user_id, None) is not None:
            self._announce([], [user_id])

    def _guests_changed(self) -> None:
        guests = self._guests + self._remote.guests
        if guests != self._shown_guests:
            self._shown_guests = guests
            self._announce([], [])

    def remote(self, others: Headcount) -> None:
        """
        The other nodes' leases, as the latest share read them: clients
        are told what that changes.
        """
        self._remote = others
        shown = dict(others.users)
        for entry in self._entries.values():
            if entry.user is not None:
                shown[entry.user.id] = entry.user.name
        joined = [User(i, n) for i, n in shown.items() if self._shown.get(i) != n]
        left = [i for i in self._shown if i not in shown]
        guests = self._guests + others.guests
        if not joined and not left and guests == self._shown_guests:
            return
        self._shown = shown
        self._shown_guests = guests
        self._announce(joined, left)

    def _announce(self, joined: List[User], left: List[str]) -> None:
        """
        What clients see changed: listeners hear it in the next diff
        (L{spacing}), waiting long-polls are woken.  With no
        listener nothing is kept (one that comes gets the snapshot).
        """
        self.version += 1
        if self._listeners:
            pending = self._pending
            for user in joined:
                pending[user.id] = user.name
            for user_id in left:
                pending[user_id] = None
            self._pending_any = True
            self._tell_soon()
        self._wake_soon()

    def _forget_pending(self) -> None:
        """
        Drop the changes not yet told, and the timer that would tell them.
        """
        self._pending = {}
        self._pending_any = False
        if self._tell_call is not None and self._tell_call.active():
            self._tell_call.cancel()
        self._tell_call = None

    def _tell_soon(self) -> None:
        clock = self._clock
        if clock is None:
            self._tell_pending()
            return
        if self._tell_call is not None:
            return
        wait = self._told_at + self.spacing - clock.seconds()
        if wait <= 0:
            self._tell_pending()
        else:
            self._tell_call = clock.callLater(wait, self._tell_pending)

    def _tell_pending(self) -> None:
        """
        One diff of the changes since the last: who joined (or changed
        name), who left, and the guests now.
        """
        pending, changed = self._pending, self._pending_any
        # (Its timer, if it is told sooner: the node is stopping.)
        self._forget_pending()
        if not changed or not self._listeners:
            return
        if self._clock is not None:
            self._told_at = self._clock.seconds()
        joined = sorted((User(i, n) for i, n in pending.items() if n is not None), key=lambda u: (u.name, u.id))
        frame = encode_json(
            {
                "type": "presence",
                "room": self.room,
                "joined": [u.as_dict() for u in joined],
                "left": sorted(i for i, n in pending.items() if n is None),
                "guests": self._shown_guests,
            }
        )
        self._tell_all("presence", frame)

    def _tell_all(self, kind: str, frame: bytes) -> None:
        listeners = list(self._listeners.items())
        for visit, listener in listeners:
            self._tell(visit, listener, kind, frame)
        self._observe("presence_frame", kind, len(listeners))

    def _tell(self, visit: Visit, listener: Listener, kind: str, frame: bytes) -> None:
        try:
            listener(kind, frame)
        except Exception:
            # One failing listener must cost the others nothing: it hears
            # no more (its connection is still counted until it leaves).
            _log.failure("Dropping a presence listener of {room} after an error", room=self.room)
            self._listeners.pop(visit, None)

    def _wake_soon(self) -> None:
        """
        Wake the long-polls waiting for presence, soon (changes of one
        moment together, and at most every L{WAKE_SPACING} seconds).
        """
        if not self._wakes:
            return
        clock = self._clock
        if clock is None:
            self._wake()
            return
        if self._wake_call is not None:
            return
        delay = max(0.0, self._woke_at + WAKE_SPACING - clock.seconds())
        self._wake_call = clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._wake_call = None
        if self._clock is not None:
            self._woke_at = self._clock.seconds()
        version = self.version
        for visit, wake in list(self._wakes.items()):
            if visit.since >= version:
                continue  # it arrived after the change: it knows
            self._wakes.pop(visit, None)
            try:
                wake()
            except Exception:
                _log.failure("Waking a long-poll of {room} failed", room=self.room)

    def _observe(self, event: str, *args: object) -> None:
        report = getattr(self._observer, event, None)
        if report is None:
            return
        try:
            report(*args)
        except Exception:
            _log.failure("The presence observer failed")

    # -- typing ------------------------------------------------------------------

    def typing(self, key: str, user: Optional[User], nick: str, on: bool) -> bool:
        """
        Typer C{key} (a user's entry key, or a guest's) started (C{on}) or
        stopped typing.  A start within L{TYPING_EVERY} seconds of the last
        one accepted, or of a new typer when L{MAX_TYPERS} type already, is
        dropped.

        @return: whether it was taken (and told to the other nodes).
        """
        clock = self._clock
        if clock is None:
            return False
        if not on:
            if key not in self._typers:
                return False
            self._observe("typing_signal", "stopped")
            self._stop(key, publish=True)
            return True
        now = clock.seconds()
        last = self._started.get(key)
        if (last is not None and now - last < TYPING_EVERY) or not self._room_for(key, now):
            self._observe("typing_signal", "dropped")
            return False
        self._started[key] = now
        self._observe("typing_signal", "started")
        self._start(key, user, nick)
        self._send({"t": "typing", "k": key, "u": _user_row(user), "n": nick, "s": True})
        return True

    def _room_for(self, key: str, now: float) -> bool:
        """
        Whether typer C{key} may start: already typing, or there is room
        for one more (the rate limit's memory is bounded too).
        """
        if key in self._typers:
            return True
        if len(self._typers) >= MAX_TYPERS:
            return False
        if len(self._started) >= 2 * MAX_TYPERS:
            self._started = {k: t for k, t in self._started.items() if now - t < TYPING_EVERY}
            if len(self._started) >= 2 * MAX_TYPERS:
                return False
        return True

    def remote_typing(self, origin: str, signal: Dict[str, Any]) -> None:
        """
        A typing start or stop from node C{origin}'s clients (the bus's
        signal, as L{typing} sent it there).
        """
        if self._clock is None:
            return
        try:
            key, on, nick, row = signal["k"], signal["s"], signal["n"], signal["u"]
            if not (isinstance(key, str) and isinstance(on, bool) and isinstance(nick, str)):
                return
            user = None if row is None else User(str(row[0]), str(row[1]))
        except (KeyError, TypeError, IndexError):
            return
        if user is None:
            # A guest's key is its node's.
            key = f"{origin}/{key}"
        self._observe("typing_signal", "remote")
        if not on:
            self._stop(key)
        elif key in self._typers or len(self._typers) < MAX_TYPERS:
            self._start(key, user, nick)

    def delivered(self, message: Message) -> None:
        """
        A message was posted here: its sender has stopped typing (on
        every node, which each deliver it).  A guest is known by nick.
        """
        if message.kind != "message" or not self._typers:
            return
        try:
            if message.user is not None:
                self._stop("user:" + message.user.id)
                return
            for key in [k for k, t in self._typers.items() if t.user is None and t.nick == message.nick]:
                self._stop(key)
        except Exception:
            _log.failure("Stopping a typer of {room} failed", room=self.room)

    def _start(self, key: str, user: Optional[User], nick: str) -> None:
        clock = self._clock
        assert clock is not None
        typer = self._typers.get(key)
        if typer is not None:
            typer.nick = nick
            if typer.call is not None and typer.call.active():
                typer.call.reset(TYPING_EXPIRES)
            return
        call = clock.callLater(TYPING_EXPIRES, self._expired, key)
        typer = self._typers[key] = _Typer(user, nick, call)
        self.version += 1
        self._tell_all("typing", self._typing_frame(typer, True))
        self._wake_soon()

    def _stop(self, key: str, publish: bool = False) -> None:
        typer = self._typers.pop(key, None)
        if typer is None:
            return
        if typer.call is not None and typer.call.active():
            typer.call.cancel()
        self.version += 1
        self._tell_all("typing", self._typing_frame(typer, False))
        self._wake_soon()
        if publish:
            self._send({"t": "typing", "k": key, "u": _user_row(typer.user), "n": typer.nick, "s": False})

    def _expired(self, key: str) -> None:
        typer = self._typers.get(key)
        if typer is None:
            return
        typer.call = None
        self._observe("typing_signal", "expired")
        # The other nodes expire it by themselves.
        self._stop(key)

    def _typing_frame(self, typer: _Typer, on: bool) -> bytes:
        return encode_json(
            {
                "type": "typing",
                "room": self.room,
                "user": None if typer.user is None else typer.user.as_dict(),
                "nick": typer.nick,
                "typing": on,
            }
        )

    def _send(self, signal: Dict[str, Any]) -> None:
        if self._publish is None:
            return
        try:
            self._publish(signal)
        except Exception:
            _log.failure("Telling the other nodes about typing in {room} failed", room=self.room)

    def close(self) -> None:
        """
        The node is stopping: cancel every timer, and set none from now on
        (entries leave at once, typing is ignored, long-polls are woken at
        once).
        """
        # What listeners were still to hear, they hear now.
        self._tell_pending()
        self._clock = None
        for call in [self._expiry, self._wake_call, *(t.call for t in self._typers.values())]:
            if call is not None and call.active():
                call.cancel()
        self._expiry = self._wake_call = None
        for typer in self._typers.values():
            typer.call = None


def _user_row(user: Optional[User]) -> Optional[List[str]]:
    return None if user is None else [user.id, user.name]
