# -*- test-case-name: tests.test_core -*-
"""
The chat core: rooms, posting, reading, long-poll waits and subscriptions,
and the one rule of delivery.

Nothing in this module does I/O.  It talks to a store (L{IMessageStore})
and a bus (L{IBus}) through their interfaces, reads time only from the
clock it is given, and hands messages to recipients through L{Room}.  The
web and WebSocket adapters translate between this and their wire formats;
every rule about rooms and ordering lives here.

Ordering rule: the store assigns each message its C{seq} (the one place
sequence numbers come from).  Messages reach the core from two sources,
this node's own commits and the bus's hints of other nodes' commits, and
the core delivers each room's messages to its recipients strictly in seq
order, each exactly once: the seq after the last delivered one is
delivered at once, a later one is held and the gap filled from the store
(C{read_after}, one fill at a time per room), an earlier one is dropped.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, cast

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.interfaces import IBus, IBusListener, IBusSubscription, IIdentityStore, IMessageStore
from chatd.limits import Limits
from chatd.model import (
    GUEST,
    MAX_BODY,
    Batch,
    ChatError,
    Guard,
    Headcount,
    Identity,
    Message,
    Peer,
    RoomAccess,
    RoomLimitReached,
    User,
    auth_required,
    banned,
    check_guard,
    check_target,
    muted,
    room_exists,
    room_not_found,
    too_many_rooms,
    validate_action,
    validate_body,
    validate_client_id,
    validate_display_name,
    validate_duration,
    validate_nick,
    validate_reason,
    validate_role,
    validate_room_name,
    validate_seq,
    validate_topic,
    validate_user_id,
)
from chatd.presence import Listener, Presence, Visit, presence_key
from chatd.room import Answer, Deliver, OnReset, Room, Subscription

__all__ = ["ChatCore", "CATCH_UP_TIMEOUT", "EDIT_WINDOW", "FILL_RETRY", "READ_FLUSH"]

#: How long a fill that found nothing new waits before it tries again
#: (doubling up to ten times as long while it keeps finding nothing).
FILL_RETRY = 0.5
#: How long a long-poll whose cursor is ahead of this node waits for the
#: node to catch up with the store before it is answered empty.
CATCH_UP_TIMEOUT = 5.0
#: Messages read from the store this many seconds after they were sent
#: mean the bus did not carry them: said in the log (at most once a
#: minute), since it may be a misconfiguration (nodes on different buses).
LATE_WARNING = 3.0

#: How long after sending a message its author may edit it, by default.
EDIT_WINDOW = 3600.0
#: How long a read marker waits before it is written (markers set
#: meanwhile go in the same write).
READ_FLUSH = 2.0
#: Read markers remembered here (past it, only unwritten ones are kept;
#: the others are read from the store again).
MAX_READ_MARKS = 100_000
#: The most bans and mutes a room keeps in force at once.
MAX_RESTRICTIONS = 10_000

Failed = Callable[[Failure], object]


class _NoObserver:
    """
    The observer of a core nobody watches.
    """

    def committed(self, seconds: float) -> None:
        pass

    def delivered_to(self, subscribers: int, waiters: int, seconds: Optional[float]) -> None:
        pass

    def filled(self, room: str, messages: int) -> None:
        pass

    def event(self, kind: str, action: str = "") -> None:
        pass

    def markers_written(self, count: int) -> None:
        pass

    def arrived_late(self, seconds: float) -> None:
        pass


@implementer(IBusListener)
class ChatCore:
    """
    All rooms of one chatd node.

    @param store: where messages are stored and seq numbers assigned.
    @param clock: the only source of time.
    @param history: how many of each room's newest messages to keep in
        memory.
    @param limits: the abuse limits (None: none, for embedding and tests).
    @param bus: how this node hears other nodes' commits and tells them
        its own (None: no other nodes).
    @param observer: told about commits, deliveries and fills
        (L{chatd.metrics.Metrics}).
    @param node: this node's name (its ephemeral signals on the bus carry
        it, so that it knows its own); None: one of its own.
    """

    log = Logger()

    def __init__(
        self,
        store: IMessageStore,
        clock: IReactorTime,
        history: int = 500,
        limits: Optional[Limits] = None,
        max_body: int = MAX_BODY,
        bus: Optional[IBus] = None,
        observer: Any = None,
        guests: bool = True,
        edit_window: Optional[float] = EDIT_WINDOW,
        node: Optional[str] = None,
    ) -> None:
        if history < 1:
            raise ValueError("history must be at least 1")
        self._store = store
        self._clock = clock
        self._history = history
        self._limits = limits
        self.max_body = max_body
        self._bus = bus
        self._observer = observer if observer is not None else _NoObserver()
        self._rooms: Dict[str, Room] = {}
        self._creating: Set[str] = set()
        #: Rooms being looked up in the store, and who waits for each.
        self._finding: Dict[str, List[Deferred]] = {}
        self._bus_subscription: Optional[IBusSubscription] = None
        #: Delay before the next fill of a room that found nothing new.
        self._fill_delay: Dict[str, float] = {}
        self._warned_late_at: Optional[float] = None
        #: Whether rooms let guests in unless created saying otherwise.
        self.guests = guests
        #: Seconds after sending that a message may be edited (None: ever).
        self.edit_window = edit_window
        #: Read markers known here, and those not yet written to the store:
        #: C{{(user_id, room): seq}}.
        self._read_marks: Dict[Tuple[str, str], int] = {}
        self._unwritten: Dict[Tuple[str, str], int] = {}
        self._flush_call: Optional[IDelayedCall] = None
        self._node = node if node is not None else f"core-{id(self):x}"

    # -- start and stop ------------------------------------------------------

    def start(self, rooms: Iterable[str] = ()) -> Deferred:
        """
        Load the rooms the store knows, with their newest messages, create
        C{rooms} (and C{lobby}) where missing, then listen to the bus.

        @return: a Deferred that fires when the core is ready.
        """

        async def _start() -> None:
            for name, _ in await self._store.load_rooms():
                if name not in self._rooms:
                    await self._adopt(name)
            for name in ["lobby", *rooms]:
                if name not in self._rooms:
                    try:
                        await self.create_room(name)
                    except ChatError as e:
                        if e.code != "room_exists":
                            raise
                        # Another node made it meanwhile.
                        await self.find_room(name)
            if self._bus is not None:
                # Once the subscription is live, the bus has the core ask the
                # store for what it missed since it loaded the rooms
                # (IBusListener.catch_up).
                self._bus_subscription = self._bus.subscribe(self)

        return Deferred.fromCoroutine(_start())

    def stop(self) -> None:
        """
        Stop listening to the bus, and end the rooms' presence timers
        (connections still closing then leave at once).
        """
        subscription, self._bus_subscription = self._bus_subscription, None
        if subscription is not None:
            subscription.stop()
        for room in self._rooms.values():
            room.presence.close()

    # -- rooms ---------------------------------------------------------------

    def room(self, name: str) -> Room:
        """
        Look up a room this node follows.

        @raise ChatError: C{room_not_found}.
        """
        try:
            return self._rooms[name]
        except (KeyError, TypeError):
            raise room_not_found(name) from None

    def find_room(self, name: object) -> Deferred:
        """
        Look up a room, here or, if this node does not follow it yet (it
        was made on another node), in the store.

        @return: a Deferred firing with the L{Room}, or failing with
            C{room_not_found}.
        """
        try:
            return succeed(self._rooms[name])  # type: ignore[index]
        except (KeyError, TypeError):
            pass
        try:
            validate_room_name(name)
        except ChatError:
            return _fail(room_not_found(name))
        assert isinstance(name, str)
        d: Deferred = Deferred()
        waiting = self._finding.get(name)
        if waiting is not None:
            waiting.append(d)
            return d
        self._finding[name] = [d]

        async def find() -> Room:
            room = await self._adopt(name)
            if room is None:
                raise room_not_found(name)
            # Hints for it were dropped while it was being loaded.
            self._check_store(room)
            return room

        def done(result: object) -> None:
            for waiter in self._finding.pop(name, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        Deferred.fromCoroutine(find()).addBoth(done)
        return d

    async def _adopt(self, name: str) -> Optional[Room]:
        """
        Follow a room the store has: who may use it, as of its last seq,
        and its newest messages up to that seq into the cache.

        @return: the room, or None if the store has no such room.
        """
        access = await self._store.room_access(name)
        if access is None:
            return None
        last_seq = access.last_seq
        room = self._new_room(name, last_seq, access)
        if last_seq:
            room.load(await self._store.read_before(name, last_seq + 1, self._history))
        return self._rooms.setdefault(name, room)

    # -- who may use a room --------------------------------------------------

    def admit(self, room: Room, identity: Identity) -> Room:
        """
        Check that C{identity} may read and write C{room}: an API key may
        use every room; a private room is members only, and does not exist
        for anyone else; a public room may refuse guests.

        A user a moderator banned may do neither until the ban ends.

        @raise ChatError: C{room_not_found}, C{auth_required}, C{banned}.
        """
        if identity.key is not None:
            return room
        access = room.access
        user = identity.user
        if access.private:
            if user is None or user.id not in access.members:
                raise room_not_found(room.name)
        elif user is None and not access.guests:
            raise auth_required(f"Room {room.name!r} is for signed-in users; sign in, or send a token.")
        if user is not None and access.bans:
            ban = access.restricted("ban", user.id, self._now_ms())
            if ban is not None:
                raise banned(room.name, ban[0])
        return room

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def _speak(self, room: Room, identity: Identity) -> Room:
        """
        L{admit}, and check C{identity} may post (is not muted).

        @raise ChatError: as L{admit}, and C{muted}.
        """
        self.admit(room, identity)
        mute = self.mute_of(room, identity)
        if mute is not None:
            raise muted(room.name, mute[0])
        return room

    def _check_post(self, peer: Optional[Peer]) -> None:
        """
        Take a post from C{peer}'s allowance (none without a peer or limits).

        @raise ChatError: C{rate_limited}.
        """
        if peer is not None and self._limits is not None:
            self._limits.check_post(peer)

    def _in_room(self, room_name: str, identity: Identity, act: Callable[[Room], Any]) -> Deferred:
        """
        Coroutine C{act(room)}, once C{identity} has entered room
        C{room_name} (L{enter}).
        """
        return self.enter(room_name, identity).addCallback(lambda room: Deferred.fromCoroutine(act(room)))

    def mute_of(self, room: Room, identity: Identity) -> Optional[Tuple[Optional[int]]]:
        """
        C{(until_ms,)} while C{identity}'s user is muted in C{room}
        (C{until_ms} None: until lifted), else None.
        """
        user_id = identity.user_id
        if user_id is None or not room.access.mutes:
            return None
        return room.access.restricted("mute", user_id, self._now_ms())

    def visible(self, room: Room, identity: Identity) -> bool:
        """
        Whether C{room} is listed to C{identity} (public, or theirs).
        """
        if identity.key is not None:
            return True
        user_id = identity.user_id
        if user_id is not None and room.access.bans and room.access.restricted("ban", user_id, self._now_ms()):
            return False
        if not room.access.private:
            return True
        return user_id is not None and user_id in room.access.members

    def enter(self, name: object, identity: Identity = GUEST) -> Deferred:
        """
        L{find_room}, for C{identity}: fails with C{room_not_found} for a
        private room C{identity} is not a member of, as for no room.
        """
        room = self._rooms.get(name) if isinstance(name, str) else None
        if room is not None:
            try:
                return succeed(self.admit(room, identity))
            except ChatError as e:
                return _fail(e)
        return self.find_room(name).addCallback(self.admit, identity)

    def role(self, room: Room, identity: Identity) -> Optional[str]:
        """
        C{identity}'s role in C{room}: C{"owner"} for an API key.
        """
        if identity.key is not None:
            return "owner"
        if identity.user is None:
            return None
        return room.access.members.get(identity.user.id)

    def set_member(
        self,
        room_name: str,
        user_id: object,
        name: object,
        role: object,
        identity: Identity,
        accounts_only: bool = False,
    ) -> Deferred:
        """
        Make C{user_id} (called C{name}: None for the name the room or the
        accounts know) a member of a room with C{role}, or with C{role}
        None no longer a member: an event of the room, so every node
        applies it in seq order.  An API key and the room's owners may
        change anyone; moderators may add and remove plain members; anyone
        may leave.  With C{accounts_only}, a new member must have an
        account (their name is the account's).

        @return: a Deferred firing with the event's L{Message}, or failing
            with C{room_not_found}, C{not_allowed}, C{invalid_user},
            C{invalid_name}, C{invalid_role} or C{user_not_found}.
        """

        async def change(room: Room) -> Message:
            member_id = validate_user_id(user_id)
            new = None if role is None else validate_role(role)
            acting = self.role(room, identity)
            current = room.access.members.get(member_id)
            leaving = new is None and identity.user_id == member_id and current is not None
            if not leaving and acting != "owner" and not (
                acting == "moderator" and new in (None, "member") and current in (None, "member")
            ):
                raise ChatError(
                    "not_allowed",
                    "You may not make this change: owners may change any membership, "
                    "moderators may add and remove plain members, anyone may leave.",
                )
            if new is None and current is None:
                raise ChatError("user_not_found", f"{member_id!r} is not a member of {room.name!r}.")
            if name is not None:
                member_name = validate_display_name(name)
            elif member_id in room.access.names:
                member_name = room.access.names[member_id]
            else:
                account = await cast(IIdentityStore, self._store).get_user(member_id)
                if account is None and accounts_only:
                    raise ChatError("user_not_found", f"There is no user named {member_id!r}.")
                member_name = account[0] if account is not None else member_id
            user = User(member_id, member_name)
            meta = None
            if identity.user_id != member_id:
                meta = {"by": None if identity.user is None else identity.user.as_dict()}
            return await self._event(room, user, "member", new or "", meta=meta)

        return self._in_room(room_name, identity, change)

    async def _event(
        self,
        room: Room,
        user: Optional[User],
        kind: str,
        body: str = "",
        target: Optional[int] = None,
        meta: Optional[dict] = None,
        guard: Optional[Guard] = None,
    ) -> Message:
        """
        Store one event of C{room} that is not a chat message, then
        deliver it like one.  C{guard} is checked here first (a quick
        answer, from this node's view of the room), then by the store as
        it stores the event (the answer that holds).
        """
        now = self._clock.seconds()
        if guard is not None:
            check_guard(room.access, guard, room.name, int(now * 1000))
        nick = "" if user is None else user.name
        stored = await self._store.append(
            room.name, nick, body, int(now * 1000), None, user, kind, target, meta, guard
        )
        return self._committed(stored, room, now)

    async def _target(self, room: Room, seq: int) -> Message:
        """
        Message C{seq} of C{room}, as it is now (from memory, or the
        store).

        @raise ChatError: C{message_not_found}, C{message_deleted}.
        """
        held = room.cached_after(seq - 1, 1) if seq <= room.last_seq else []
        if held is None:
            messages, _ = await self._store.read_after(room.name, seq - 1, 1)
            held = messages
        found = held[0] if held and held[0].seq == seq else None
        return check_target(found, seq)

    def edit(
        self,
        room_name: str,
        target_seq: object,
        body: object,
        identity: Identity,
        peer: Optional[Peer] = None,
    ) -> Deferred:
        """
        Change the body of message C{target_seq}: an C{edit} event of the
        room.  Only its author may, within L{edit_window} seconds of
        sending it, in a room whose settings allow edits, and not while
        muted.

        @return: a Deferred firing with the event's L{Message}, or failing
            with C{invalid_parameter}, C{invalid_body}, C{body_too_long},
            C{auth_required}, C{not_allowed}, C{edits_disabled},
            C{edit_window_closed}, C{message_not_found},
            C{message_deleted}, C{muted}, C{rate_limited}, ...
        """

        async def edit(room: Room) -> Message:
            self._speak(room, identity)
            user = identity.user
            if user is None:
                raise auth_required("Sign in, or send a token, to edit your messages.")
            guard = Guard(user.id, edits=True)
            check_guard(room.access, guard, room.name, self._now_ms())
            target = await self._target(room, seq)
            if target.user is None or target.user.id != user.id:
                raise ChatError("not_allowed", "Only a message's author may edit it.")
            age = self._clock.seconds() - target.ts_ms / 1000.0
            if self.edit_window is not None and age > self.edit_window:
                raise ChatError(
                    "edit_window_closed",
                    f"Messages can be edited for {self.edit_window:.0f} s after they are sent.",
                )
            return await self._event(room, user, "edit", text, target=seq, guard=guard)

        try:
            self._check_post(peer)
            seq = validate_seq(target_seq)
            text = validate_body(body, self.max_body)
        except ChatError as e:
            return _fail(e)
        return self._in_room(room_name, identity, edit)

    def delete(
        self, room_name: str, target_seq: object, identity: Identity, peer: Optional[Peer] = None
    ) -> Deferred:
        """
        Delete message C{target_seq}: a C{delete} event of the room, and
        the store blanks the message's body (and its edits').  Its author
        may, and so may the room's owners and moderators and an API key.

        @return: a Deferred firing with the event's L{Message}, or failing
            with C{invalid_parameter}, C{auth_required}, C{not_allowed},
            C{message_not_found}, C{message_deleted}, C{rate_limited}, ...
        """

        async def delete(room: Room) -> Message:
            user = identity.user
            if user is None and identity.key is None:
                raise auth_required("Sign in, or send a token, to delete your messages.")
            target = await self._target(room, seq)
            author = None if target.user is None else target.user.id
            mine = user is not None and author == user.id
            guard = None
            if mine:
                guard = Guard(author, speak=False)
            elif identity.key is None:
                if self.role(room, identity) not in ("owner", "moderator"):
                    raise ChatError("not_allowed", "Only a message's author or a moderator may delete it.")
                # Moderators delete plain members' and visitors' messages,
                # owners moderators' too.
                assert user is not None
                guard = Guard(user.id, speak=False, role="moderator", over=author)
            return await self._event(room, user, "delete", target=seq, guard=guard)

        try:
            self._check_post(peer)
            seq = validate_seq(target_seq)
        except ChatError as e:
            return _fail(e)
        return self._in_room(room_name, identity, delete)

    def moderate(
        self,
        room_name: str,
        user_id: object,
        action: object,
        identity: Identity,
        duration: object = None,
        reason: object = None,
        peer: Optional[Peer] = None,
    ) -> Deferred:
        """
        A moderation action (L{chatd.model.ACTIONS}) on C{user_id}: an
        event of the room, applied by every node in seq order.  The room's
        owners may act on anyone but owners, its moderators on plain
        members and people who are not members, an API key on anyone; no
        one on themselves.  C{kick} closes the user's connections to the
        room (and ends a private room's membership); C{ban} closes them and
        keeps the user out, C{mute} lets them read but not post, each for
        C{duration} seconds or until lifted (C{unban}, C{unmute}).

        @return: a Deferred firing with the event's L{Message}, or failing
            with C{invalid_user}, C{invalid_action}, C{invalid_duration},
            C{invalid_reason}, C{not_allowed}, C{muted}, C{not_restricted},
            C{too_many_restrictions}, C{rate_limited}.
        """

        async def moderate(room: Room) -> Message:
            acting = self.role(room, identity)
            if identity.user_id == target_id or acting not in ("owner", "moderator"):
                raise ChatError(
                    "not_allowed",
                    "You may not do this: owners moderate anyone but owners, moderators "
                    "plain members and visitors, and nobody themselves.",
                )
            guard = None if identity.key is not None else Guard(identity.user_id, role="moderator", over=target_id)
            now_ms = self._now_ms()
            if guard is not None:
                check_guard(room.access, guard, room.name, now_ms)
            access = room.access
            if what in ("unban", "unmute"):
                if access.restricted(what[2:], target_id, now_ms) is None:
                    state = "banned" if what == "unban" else "muted"
                    raise ChatError("not_restricted", f"{target_id!r} is not {state} in {room.name!r}.")
            elif what in ("ban", "mute") and target_id not in access.bans and target_id not in access.mutes:
                if len(access.bans) + len(access.mutes) >= MAX_RESTRICTIONS:
                    raise ChatError(
                        "too_many_restrictions",
                        f"{room.name!r} has {MAX_RESTRICTIONS} bans and mutes in force; lift some first.",
                    )
            name = access.names.get(target_id) or room.name_of(target_id)
            if name is None:
                account = await cast(IIdentityStore, self._store).get_user(target_id)
                name = account[0] if account is not None else target_id
            until = None
            if what in ("ban", "mute") and seconds is not None:
                until = now_ms + seconds * 1000
            meta = {
                "action": what,
                "by": None if identity.user is None else identity.user.as_dict(),
                "until": until,
                "reason": why,
            }
            return await self._event(room, User(target_id, name), "moderation", meta=meta, guard=guard)

        try:
            self._check_post(peer)
            target_id = validate_user_id(user_id)
            what = validate_action(action)
            seconds = validate_duration(duration) if what in ("ban", "mute") else None
            why = validate_reason(reason)
        except ChatError as e:
            return _fail(e)
        return self._in_room(room_name, identity, moderate)

    def configure_room(
        self,
        room_name: str,
        identity: Identity,
        topic: object = None,
        edits: object = None,
        peer: Optional[Peer] = None,
    ) -> Deferred:
        """
        Change a room's topic (its owners and moderators may) or whether
        its messages may be edited (its owners may): a C{room} event.
        C{None} keeps a setting as it is.

        @return: a Deferred firing with the event's L{Message}, or failing
            with C{invalid_topic}, C{invalid_parameter}, C{not_allowed}.
        """

        async def configure(room: Room) -> Message:
            acting = self.role(room, identity)
            if acting not in ("owner", "moderator") or (edits is not None and acting != "owner"):
                raise ChatError(
                    "not_allowed",
                    "Owners and moderators may set the topic; owners whether messages may be edited.",
                )
            change: Dict[str, Any] = {}
            if text is not None:
                change["topic"] = text
            if edits is not None:
                change["edits"] = bool(edits)
            # Only what changes: the store settles the rest against the
            # room as it is then, so changes made at once both hold.
            guard = None
            if identity.key is None:
                guard = Guard(identity.user_id, role="owner" if edits is not None else "moderator")
            return await self._event(room, identity.user, "room", meta={"change": change}, guard=guard)

        try:
            self._check_post(peer)
            text = None if topic is None else validate_topic(topic)
            if edits is not None and not isinstance(edits, bool):
                raise ChatError("invalid_parameter", "edits must be true or false.")
            if topic is None and edits is None:
                raise ChatError("invalid_parameter", "Give a topic, edits, or both.")
        except ChatError as e:
            return _fail(e)
        return self._in_room(room_name, identity, configure)

    # -- read markers --------------------------------------------------------

    def mark_read(self, room_name: str, seq: object, identity: Identity) -> Deferred:
        """
        C{identity}'s user has read C{room_name} up to C{seq} (at most its
        last seq; a marker never moves back).  Kept here and written to the
        store at most every L{READ_FLUSH} seconds.

        @return: a Deferred firing with C{(read, unread)}.
        """
        user = identity.user
        try:
            if user is None:
                raise auth_required("Sign in, or send a token, to keep read markers.")
            upto = validate_seq(seq, "seq") if seq != 0 else 0
        except ChatError as e:
            return _fail(e)

        async def mark(room: Room) -> Tuple[int, int]:
            assert user is not None
            key = (user.id, room.name)
            if key not in self._read_marks:
                # What the store has, so that the answer never moves back
                # (after a restart, on another node).
                stored = await self._store.read_markers(user.id)
                self._remember(user.id, stored)
            known = self._read_marks.get(key, 0)
            read = max(min(upto, room.last_seq), known)
            if read > known or key not in self._read_marks:
                self._remember(user.id, {room.name: read})
                self._unwritten[key] = read
                if self._flush_call is None or not self._flush_call.active():
                    self._flush_call = self._clock.callLater(READ_FLUSH, self.flush_read_markers)
            return read, max(0, room.last_seq - read)

        return self._in_room(room_name, identity, mark)

    def _remember(self, user_id: str, marks: Dict[str, int]) -> None:
        """
        Keep C{user_id}'s markers here (at most L{MAX_READ_MARKS} in all:
        past it, those already written are forgotten, and read again from
        the store when needed).
        """
        if len(self._read_marks) + len(marks) > MAX_READ_MARKS:
            self._read_marks = dict(self._unwritten)
        for room, seq in marks.items():
            key = (user_id, room)
            if seq > self._read_marks.get(key, -1):
                self._read_marks[key] = seq

    def read_markers(self, identity: Identity) -> Deferred:
        """
        C{identity}'s read markers: C{{room: seq}} (none for a guest).
        """
        user = identity.user
        if user is None:
            return succeed({})

        def merge(stored: Dict[str, int]) -> Dict[str, int]:
            for (user_id, room), seq in self._unwritten.items():
                if user_id == user.id and seq > stored.get(room, -1):
                    stored[room] = seq
            return stored

        return self._store.read_markers(user.id).addCallback(merge)

    def flush_read_markers(self) -> Deferred:
        """
        Write the read markers set since the last write.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        marks, self._unwritten = self._unwritten, {}
        if not marks:
            return succeed(None)

        def failed(failure: Failure) -> None:
            self.log.failure("Writing {count} read markers failed", failure, count=len(marks))
            # Kept for the next write (unless newer ones came meanwhile).
            for key, seq in marks.items():
                if seq > self._unwritten.get(key, -1):
                    self._unwritten[key] = seq
            if self._flush_call is None or not self._flush_call.active():
                self._flush_call = self._clock.callLater(READ_FLUSH * 5, self.flush_read_markers)

        d = self._store.set_read_markers(marks)
        return d.addCallbacks(lambda _: self._observer.markers_written(len(marks)), failed)

    def rooms(self) -> List[Room]:
        """
        The rooms this node follows, by name (case aside).
        """
        return [self._rooms[name] for name in sorted(self._rooms, key=lambda n: (n.lower(), n))]

    def list_rooms(self, identity: Identity = GUEST) -> Deferred:
        """
        Every room the store has (following those this node did not yet)
        that C{identity} may see, by name.

        @return: a Deferred firing with a list of L{Room}s.
        """

        async def list_rooms() -> List[Room]:
            for name, _ in await self._store.load_rooms():
                if name not in self._rooms:
                    room = await self._adopt(name)
                    if room is not None:
                        self._check_store(room)
            return [room for room in self.rooms() if self.visible(room, identity)]

        return Deferred.fromCoroutine(list_rooms())

    def create_room(
        self,
        name: object,
        peer: Optional[Peer] = None,
        identity: Identity = GUEST,
        private: bool = False,
        guests: Optional[bool] = None,
    ) -> Deferred:
        """
        Create a room: public, or C{private} (members only; C{identity}'s
        user is its owner).  C{guests}: whether people with no identity may
        use it (None: the core's default, L{guests}).

        @return: a Deferred firing with the new L{Room}, or failing with
            L{ChatError} C{invalid_room_name}, C{room_exists},
            C{too_many_rooms}, C{auth_required} or C{rate_limited}.
        """
        owner = identity.user
        if guests is None:
            guests = self.guests and not private
        try:
            if private and owner is None and identity.key is None:
                raise auth_required("Sign in, or send a token, to create a private room.")
            if identity.guest and not self.guests and peer is not None:
                raise auth_required("Sign in, or send a token, to create a room.")
            name = validate_room_name(name)
            if name in self._rooms or name in self._creating:
                raise room_exists(name)
            if self._limits is not None and peer is not None:
                self._limits.check_room_creation(peer, len(self._rooms) + len(self._creating))
        except ChatError as e:
            return _fail(e)
        self._creating.add(name)

        access = RoomAccess(
            private,
            guests,
            {} if owner is None else {owner.id: "owner"},
            0,
            {} if owner is None else {owner.id: owner.name},
        )

        def created(new: bool) -> Room:
            if not new:
                # Another node sharing the store made it first.
                raise room_exists(name)
            return self._rooms.setdefault(name, self._new_room(name, 0, access))

        def full(failure: Failure) -> None:
            failure.trap(RoomLimitReached)
            assert isinstance(failure.value, RoomLimitReached)
            raise too_many_rooms(failure.value.limit)

        def done(result: object) -> object:
            self._creating.discard(name)
            return result

        now_ms = int(self._clock.seconds() * 1000)
        # The store counts the rooms, so the limit holds across nodes.
        max_rooms = None if self._limits is None or peer is None else self._limits.max_rooms
        d = self._store.create_room(name, now_ms, max_rooms, private, guests, owner)
        return d.addCallbacks(created, full).addBoth(done)

    # -- posting -------------------------------------------------------------

    def post(
        self,
        room_name: str,
        nick: object,
        body: object,
        client_id: object = None,
        peer: Optional[Peer] = None,
        identity: Identity = GUEST,
    ) -> Deferred:
        """
        Validate and store a message, then deliver it to the room.

        The message is C{identity}'s: a user's carries their C{user} and
        name (C{nick} is ignored); a guest's, the nick given.

        The returned Deferred fires only once the store has committed the
        message (and its delivery here has been done, whatever any one
        recipient made of it).  A C{client_id} already used in this room
        yields the original message (its original seq) and stores nothing.

        @return: a Deferred firing with the L{Message}, or failing with
            L{ChatError}.
        """
        user = identity.user
        try:
            self._check_post(peer)
            nick = validate_nick(nick) if user is None else user.name
            body = validate_body(body, self.max_body)
            client_id = validate_client_id(client_id)
        except ChatError as e:
            return _fail(e)
        room = self._rooms.get(room_name)
        if room is not None:
            try:
                self._speak(room, identity)
            except ChatError as e:
                return _fail(e)
            return self._append(room, nick, body, client_id, user)
        d = self.enter(room_name, identity).addCallback(self._speak, identity)
        return d.addCallback(self._append, nick, body, client_id, user)

    def _append(
        self, room: Room, nick: str, body: str, client_id: Optional[str], user: Optional[User] = None
    ) -> Deferred:
        now = self._clock.seconds()
        # A user's post is checked again as it is stored: a mute or ban
        # committed just before it holds.
        guard = None if user is None else Guard(user.id)
        d = self._store.append(room.name, nick, body, int(now * 1000), client_id, user, "message", None, None, guard)
        return d.addCallback(self._committed, room, now)

    def _committed(self, result: Tuple[Message, bool], room: Room, started: float) -> Message:
        message, created = result
        if not created:
            return message
        self._observer.committed(self._clock.seconds() - started)
        self._observer.event(message.kind, str((message.meta or {}).get("action", "")))
        # This node's recipients first: they never wait on the bus.
        self._arrived(room, [message], message.seq, started)
        if self._bus is not None:
            self._bus.publish(room.name, message.seq, [message])
        return message

    # -- delivery: every source goes through _arrived ------------------------

    def hint(self, room: str, last_seq: int, messages: List[Message]) -> None:
        """
        The bus says C{messages}, up to seq C{last_seq}, were committed in
        C{room} (L{IBusListener}).  A room this node does not follow is
        left alone: it is looked up in the store when someone asks for it.
        """
        followed = self._rooms.get(room)
        if followed is not None:
            self._arrived(followed, messages, last_seq, None)

    def catch_up(self) -> None:
        """
        Hints may have been lost (the bus is connected again, or is down):
        catch up every room with the store (L{IBusListener}).
        """

        def compare(rooms: List[Tuple[str, int]]) -> None:
            for name, last_seq in rooms:
                room = self._rooms.get(name)
                if room is not None:
                    self._note(room, last_seq)

        def failed(failure: Failure) -> None:
            self.log.failure("Could not read the rooms' last seqs from the store", failure)

        self._store.load_rooms().addCallbacks(compare, failed)

    def _arrived(
        self, room: Room, messages: List[Message], last_seq: int, started: Optional[float]
    ) -> None:
        """
        Messages committed in C{room}, up to seq C{last_seq}: deliver what
        follows what was delivered, hold what is beyond a gap and fill the
        gap from the store.
        """
        try:
            for message in messages:
                if message.seq <= room.last_seq:
                    continue  # delivered already
                if message.seq == room.last_seq + 1:
                    self._deliver(room, message, started)
                    held = room.next_pending()
                    while held is not None:
                        self._deliver(room, held, None)
                        held = room.next_pending()
                else:
                    room.hold(message)
            self._note(room, last_seq)
        except Exception:
            # The commit happened whatever went wrong here; its sender
            # still gets the acknowledgement.
            self.log.failure("Delivering messages of {room} failed", room=room.name)

    def _deliver(self, room: Room, message: Message, started: Optional[float]) -> None:
        subscribers, waiters = room.deliver(message)
        now = self._clock.seconds()
        if started is None:
            # Committed elsewhere (or seen late): how far behind the store
            # this node delivered it, by the message's own time.
            self._observer.arrived_late(max(0.0, now - message.ts_ms / 1000.0))
            self._observer.delivered_to(subscribers, waiters, None)
        else:
            self._observer.delivered_to(subscribers, waiters, now - started)

    def _note(self, room: Room, last_seq: int) -> None:
        """
        The store holds messages of C{room} up to C{last_seq}: fill from
        it if this node is behind.
        """
        if last_seq > room.known_last:
            room.known_last = last_seq
        if room.behind:
            self._fill(room)

    def _check_store(self, room: Room) -> None:
        """
        Ask the store for the room's last seq, and catch up with it.
        """

        def compare(state: Optional[Tuple[int, int]]) -> None:
            if state is not None:
                self._note(room, state[0])

        def failed(failure: Failure) -> None:
            self.log.failure("Could not read the state of {room}", failure, room=room.name)

        self._store.room_state(room.name).addCallbacks(compare, failed)

    def _fill(self, room: Room) -> None:
        """
        Read what the room is missing from the store, one fill at a time.
        """
        if room.filling:
            return
        room.filling = True
        before = room.last_seq
        d = self._store.read_after(room.name, before, self._history)
        d.addCallbacks(self._filled, self._fill_failed, (room, before), None, (room,))

    def _filled(self, result: Tuple[List[Message], int], room: Room, before: int) -> None:
        messages, first_seq = result
        gone = (messages[0].seq if messages else first_seq) - 1
        if gone > room.last_seq and room.known_last >= first_seq - 1:
            # Retention removed messages before this node delivered them.
            self.log.warn(
                "{room}: messages {first} to {last} are no longer in the store; skipping them",
                room=room.name,
                first=room.last_seq + 1,
                last=gone,
            )
            room.skip_to(gone)
        # Still marked as filling here, so that delivering starts no fill.
        self._arrived(room, messages, room.known_last, None)
        room.drop_delivered_pending()
        room.filling = False
        if messages:
            self._observer.filled(room.name, len(messages))
            self._warn_if_late(room, messages)
        if not room.behind:
            self._fill_delay.pop(room.name, None)
        elif room.last_seq > before:
            self._fill(room)
        else:
            # Nothing new in the store yet (the hint came before the commit
            # showed to this node's readers): try again a little later.
            self._retry_fill(room)

    def _warn_if_late(self, room: Room, messages: List[Message]) -> None:
        now = self._clock.seconds()
        late = now - messages[0].ts_ms / 1000.0
        if late < LATE_WARNING or self._bus is None:
            return
        if self._warned_late_at is not None and now - self._warned_late_at < 60:
            return
        self._warned_late_at = now
        self.log.warn(
            "{count} messages of {room} reached this node only from the store, the "
            "first {late:.1f} s after it was sent: the bus did not carry them. If the "
            "bus is up, check that every node sharing the store runs with the same "
            "--bus (or that the nodes' clocks agree).",
            count=len(messages),
            room=room.name,
            late=late,
        )

    def _fill_failed(self, failure: Failure, room: Room) -> None:
        room.filling = False
        self.log.failure("Filling a gap in {room} from the store failed", failure, room=room.name)
        self._retry_fill(room)

    def _retry_fill(self, room: Room) -> None:
        delay = self._fill_delay.get(room.name, FILL_RETRY)
        self._fill_delay[room.name] = min(delay * 2, FILL_RETRY * 10)
        # Marked as filling until then: hints do not start fills meanwhile.
        room.filling = True

        def again() -> None:
            room.filling = False
            if room.behind:
                self._fill(room)

        self._clock.callLater(delay, again)

    @property
    def behind(self) -> int:
        """
        How many messages the store holds that this node has not
        delivered yet, over all rooms.
        """
        return sum(room.known_last - room.last_seq for room in self._rooms.values())

    # -- presence and typing -------------------------------------------------

    def _new_room(self, name: str, last_seq: int, access: RoomAccess) -> Room:
        """
        A L{Room}, with its presence on this core's clock, telling typing
        to the other nodes through the bus.
        """
        publish = None
        if self._bus is not None:
            bus, node = self._bus, self._node

            def publish(signal: Dict[str, Any]) -> None:
                bus.signal(name, {**signal, "o": node})

        presence = Presence(name, self._clock, publish, self._observer)
        return Room(name, last_seq, self._history, access, presence)

    def arrive(
        self,
        room: Room,
        identity: Identity,
        client: Optional[str] = None,
        anonymous: Optional[str] = None,
        listener: Optional[Listener] = None,
        wake: Optional[Callable[[], None]] = None,
    ) -> Optional[Visit]:
        """
        A connection of C{identity} (admitted to C{room}) is here: counted
        under its user, its guest browser (C{client}), or else C{anonymous}
        (None: a key of the connection's own).  See L{Presence.arrive} for
        C{listener} and C{wake}.

        @return: the L{Visit} to leave once the connection ends; an API
            key is no one here, and gets one only to listen (or None).
        """
        presence = room.presence
        key = presence_key(identity, client, anonymous or presence.anonymous_key())
        if key is None:
            return None if listener is None and wake is None else presence.listen(listener, wake)
        return presence.arrive(key, identity.user, listener, wake)

    def typing(
        self,
        room: Room,
        identity: Identity,
        on: bool,
        nick: object = None,
        client: Optional[str] = None,
        anonymous: str = "guest",
        visit: Optional[Visit] = None,
    ) -> bool:
        """
        C{identity} (admitted to C{room}) started or stopped typing: as
        its connection's L{Visit} if given, else as its user, its guest
        browser (C{client}) or C{anonymous}.  A guest types under C{nick}.

        @return: whether it was taken (a start too soon after the last one
            is dropped quietly).
        @raise ChatError: C{invalid_nick}; C{muted}; C{not_allowed} for an
            API key.
        """
        user = identity.user
        name = user.name if user is not None else validate_nick(nick)
        mute = self.mute_of(room, identity) if on else None
        if mute is not None:
            # A muted user's typing would be words to everyone.
            raise muted(room.name, mute[0])
        if visit is not None and visit.key:
            return visit.typing(on, name)
        key = presence_key(identity, client, anonymous)
        if key is None:
            raise ChatError("not_allowed", "Only people type: an API key does not.")
        return room.presence.typing(key, user, name, on)

    def signal(self, room: str, signal: Dict[str, Any]) -> None:
        """
        An ephemeral signal of C{room} from the bus (L{IBusListener}):
        another node's typing.  This node's own come back too, and are
        dropped (they were applied here when they were made).
        """
        origin = signal.get("o")
        followed = self._rooms.get(room)
        if followed is None or not isinstance(origin, str) or origin == self._node:
            return
        if signal.get("t") == "typing":
            followed.presence.remote_typing(origin, signal)

    def share_presence(self, node: str, ttl: float) -> Deferred:
        """
        Renew this node's presence lease (who is in each room here, valid
        for C{ttl} seconds) and take the other nodes' into the rooms: their
        clients are told what changed.
        """
        rooms = {room.name: room.presence.lease() for room in self._rooms.values()}

        def take(others: Dict[str, Headcount]) -> None:
            for room in list(self._rooms.values()):
                try:
                    room.presence.remote(others.get(room.name) or Headcount())
                except Exception:
                    self.log.failure("Taking other nodes' presence into {room} failed", room=room.name)

        return self._store.share_presence(node, rooms, int(ttl * 1000)).addCallback(take)

    def withdraw_presence(self, node: str) -> Deferred:
        """
        This node is going away: its lease ends now.
        """
        return self._store.share_presence(node, {}, 0).addCallback(lambda _: None)

    # -- reading -------------------------------------------------------------

    def read(
        self, room_name: str, after: Optional[int], limit: int, identity: Identity = GUEST
    ) -> Deferred:
        """
        The messages after seq C{after} (at most C{limit}), from memory when
        the cache reaches back far enough and from the store otherwise.

        @param after: the last seq the client has; C{None} means "only new
            messages", i.e. the room's current last seq.
        @return: a Deferred firing with a L{Batch}.
        """
        return self.enter(room_name, identity).addCallback(self._read, after, limit)

    def _read(self, room: Room, after: Optional[int], limit: int) -> Deferred:
        batch = self._read_cache(room, after, limit)
        if batch is not None:
            return succeed(batch)
        return Deferred.fromCoroutine(self._read_store(room, after, limit))

    def _read_cache(self, room: Room, after: Optional[int], limit: int) -> Optional[Batch]:
        """
        L{_read} from the room's cache, or None when the cursor is not in
        it (older than the cache, or ahead of this node), or is at this
        node's last seq while the store holds more.
        """
        if after is None:
            after = room.last_seq
        if after == room.last_seq and room.behind:
            # The store holds more than this node has delivered yet (a
            # fill is under way): the cache would answer nothing.
            return None
        if 0 <= after <= room.last_seq:
            return room.cached_batch(after, limit)
        return None

    async def _read_store(
        self, room: Room, after: Optional[int], limit: int, state: Optional[Tuple[int, int]] = None
    ) -> Batch:
        """
        L{_read} from the store.  C{state} is the room's C{room_state},
        if the caller has just read it.
        """
        last_seq = room.last_seq
        if after is None:
            after = last_seq
        if after > last_seq:
            # Ahead of this node: either the node is behind the store (the
            # client came from another node), or the cursor is from the
            # future (the store lost messages the client saw, or the client
            # is confused).  Only the store can tell.
            if state is None:
                state = await self._store.room_state(room.name)
            if state is not None and state[0] > last_seq:
                last_seq = state[0]
                self._note(room, last_seq)
            if after > last_seq:
                after = -1  # from the future: say so explicitly

        messages, first_seq = await self._store.read_after(room.name, max(after, 0), limit)
        if messages and messages[-1].seq > last_seq:
            last_seq = messages[-1].seq
        # With nothing held, the next seq to be issued is where a client
        # resumes.
        reset = after < first_seq - 1
        return Batch(room.name, messages, last_seq, reset, first_seq)

    def read_before(
        self, room_name: str, before: int, limit: int, identity: Identity = GUEST
    ) -> Deferred:
        """
        Up to C{limit} messages older than seq C{before}, oldest first,
        for paging back through history.

        @return: a Deferred firing with a L{Batch}.
        """

        def read(room: Room) -> Deferred:
            last_seq = room.last_seq
            d = self._store.read_before(room.name, before, limit)
            return d.addCallback(lambda msgs: Batch(room.name, msgs, last_seq))

        return self.enter(room_name, identity).addCallback(read)

    def ping(self, timeout: float) -> Deferred:
        """
        Readiness: a Deferred that fires if the store answers within
        C{timeout} seconds.
        """
        d = self._store.ping()
        d.addTimeout(timeout, self._clock)
        return d

    # -- long-poll -----------------------------------------------------------

    def waiting(self) -> int:
        """
        How many long-poll requests are waiting, in all rooms.
        """
        return sum(room.waiting for room in self._rooms.values())

    def release_waiters(self) -> int:
        """
        Shutting down: answer every waiting long-poll with an empty batch
        now, and say how many there were.
        """
        return sum(
            room.answer_waiters(Batch(room.name, [], room.last_seq))
            for room in self._rooms.values()
        )

    def wait(
        self,
        room_name: str,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
        identity: Identity = GUEST,
    ) -> Deferred:
        """
        Long-poll: like L{read}, but when nothing is newer than C{after},
        wait until a message arrives or C{timeout} seconds pass (then the
        batch is empty).  C{timeout=None} waits for as long as it takes.

        Cancelling the Deferred (the client went away) forgets the waiter
        at once.

        @return: a Deferred firing with a L{Batch}.
        """
        waiting = _Waiting()
        d = waiting.deferred
        assert d is not None
        waiting.forget = self.wait_for(
            room_name, after, limit, timeout, waiting.answer, waiting.fail, identity
        )
        return d

    def wait_for(
        self,
        room_name: str,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
        answer: Answer,
        failed: Failed,
        identity: Identity = GUEST,
    ) -> Optional[Callable[[], None]]:
        """
        L{wait} without a Deferred: C{answer} is called with the batch (at
        once, if there is one), or C{failed} with the failure (an unknown
        room, a store that cannot be read), once, unless the returned
        function is called first (the client went away).

        @return: None if C{answer} was called already; otherwise the
            function that forgets the waiter.
        """
        room = self._rooms.get(room_name)
        user_id = identity.user_id
        if room is not None:
            try:
                self.admit(room, identity)
            except ChatError:
                failed(Failure())
                return None
            return self._wait_in(room, after, limit, timeout, answer, failed, user_id)
        call = _Call(answer, failed)
        wait_in = partial(self._wait_in, user_id=user_id)
        self.enter(room_name, identity).addCallbacks(
            call.then, call.fail, (wait_in, after, limit, timeout)
        )
        return call.cancel

    def _wait_in(
        self,
        room: Room,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
        answer: Answer,
        failed: Failed,
        user_id: Optional[str] = None,
    ) -> Optional[Callable[[], None]]:
        if after is None:
            after = room.last_seq
        now = timeout is not None and timeout <= 0
        if after == room.last_seq and not now:
            room.add_waiter(answer, timeout, self._clock, user_id)
            return _Forget(room, answer).forget
        if after <= room.last_seq or now:
            batch = self._read_cache(room, after, limit)
            if batch is not None:
                answer(batch)
                return None
            call = _Call(answer, failed)
            Deferred.fromCoroutine(self._read_store(room, after, limit)).addCallbacks(
                call.answer, call.fail
            )
            return call.cancel
        return self._wait_ahead(room, after, limit, timeout, answer, failed, user_id)

    def _wait_ahead(
        self,
        room: Room,
        after: int,
        limit: int,
        timeout: Optional[float],
        answer: Answer,
        failed: Failed,
        user_id: Optional[str] = None,
    ) -> Callable[[], None]:
        """
        A long-poll whose cursor is ahead of this node: if the store has
        messages after it, they are the answer; if the store is at the
        cursor, the node catches up and the poll waits as usual; if the
        store is behind it, the cursor is from the future (a reset).
        """
        call = _Call(answer, failed)
        started = self._clock.seconds()

        async def ahead() -> None:
            state = await self._store.room_state(room.name)
            store_last = room.last_seq if state is None else state[0]
            if store_last != after:
                call.answer(await self._read_store(room, after, limit, state))
                return
            self._note(room, store_last)
            reached = room.reaches(after)
            call.waiting_on(reached.cancel)
            reached.addTimeout(CATCH_UP_TIMEOUT, self._clock)
            try:
                await reached
            except (CancelledError, TimeoutError):
                if call.cancelled:
                    return
                # Not caught up in time: an empty answer; the client asks
                # again with the same cursor.
                call.answer(Batch(room.name, [], room.last_seq))
                return
            left = None if timeout is None else max(0.0, timeout - (self._clock.seconds() - started))
            call.waiting_on(
                self._wait_in(room, after, limit, left, call.answer, call.fail, user_id)
            )

        Deferred.fromCoroutine(ahead()).addErrback(call.fail)
        return call.cancel

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self,
        room_name: str,
        after: Optional[int],
        deliver: Deliver,
        on_reset: OnReset,
        identity: Identity = GUEST,
        on_revoked: Optional[Callable[[ChatError], None]] = None,
    ) -> Subscription:
        """
        Follow a room (one this node follows: see L{find_room}): C{deliver}
        gets every message after seq C{after} (C{None}: the cached
        history), in order, exactly once, then every new message as it is
        delivered.  If the cursor is older than what the store holds,
        C{on_reset(first_seq)} is called first.  If C{identity} is removed
        from the (private) room, kicked or banned, the subscription stops
        and C{on_revoked} is called with why (a L{ChatError}).

        @raise ChatError: C{room_not_found}, C{auth_required}.
        """
        room = self.admit(self.room(room_name), identity)
        if after is None:
            after = room.first_cached_seq - 1
        subscription = Subscription(room, deliver, on_reset, after, identity.user_id, on_revoked)
        room.subscribe(subscription)
        cached = room.cached_after(after, room.cache_size) if after <= room.last_seq else None
        if cached is not None:
            # The whole backlog is in memory: hand it over now, before any
            # later message can be offered.
            for message in cached:
                subscription.offer(message)
            return subscription
        subscription.queue = []
        self._backfill_from_store(room, subscription)
        return subscription

    def _backfill_from_store(self, room: Room, subscription: Subscription) -> None:
        async def backfill() -> None:
            first = True
            while subscription.active:
                queue = subscription.queue
                assert queue is not None
                target = room.last_seq
                batch = await self._read(room, subscription.last_seq, self._history)
                if not subscription.active:
                    return
                if not first:
                    batch.reset = False
                first = False
                subscription.queue = None
                subscription.backfill(batch)
                if subscription.last_seq >= target or not batch.messages:
                    # Caught up with everything delivered before the read
                    # began; the queue holds the rest.
                    for message in queue:
                        subscription.offer(message)
                    return
                subscription.queue = queue

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Could not load history for a subscriber of {room}",
                failure,
                room=room.name,
            )
            subscription.stop()

        Deferred.fromCoroutine(backfill()).addErrback(failed)

    # -- retention -----------------------------------------------------------

    def prune(self, before_ms: int) -> Deferred:
        """
        Retention: delete messages sent before C{before_ms} from the store
        and from memory, oldest first, stopping in each room at the first
        message to keep.  Cursors older than what remains then get a reset.

        @return: a Deferred firing with the number deleted from the store.
        """

        def forget(deleted: int) -> int:
            for room in self._rooms.values():
                room.trim(before_ms)
            return deleted

        return self._store.prune(before_ms).addCallback(forget)


class _Forget:
    """
    Forgets one waiter (without a cycle through the waiter itself).
    """

    __slots__ = ("_room", "_answer")

    def __init__(self, room: Room, answer: Answer) -> None:
        self._room = room
        self._answer = answer

    def forget(self) -> None:
        self._room.forget(self._answer)


class _Waiting:
    """
    The Deferred of one L{ChatCore.wait}, and how to forget its waiter.

    Every reference back to the Deferred is dropped once it is answered,
    failed or cancelled, so a long-poll leaves no reference cycle for the
    garbage collector (a thousand pollers make twenty thousand a second).
    """

    __slots__ = ("deferred", "forget")

    def __init__(self) -> None:
        self.deferred: Optional[Deferred] = Deferred(self._cancel)
        self.forget: Optional[Callable[[], None]] = None

    def _done(self) -> Optional[Deferred]:
        d, self.deferred, self.forget = self.deferred, None, None
        return d

    def answer(self, batch: Batch) -> None:
        d = self._done()
        if d is not None:
            d.callback(batch)

    def fail(self, failure: Failure) -> None:
        d = self._done()
        if d is not None:
            d.errback(failure)

    def _cancel(self, d: Deferred) -> None:
        forget = self.forget
        self._done()
        if forget is not None:
            forget()


class _Call:
    """
    One long-poll answered later: by C{answer} or C{failed}, once, unless
    cancelled first.
    """

    __slots__ = ("_answer", "_failed", "cancelled", "_inner")

    def __init__(self, answer: Answer, failed: Failed) -> None:
        self._answer: Optional[Answer] = answer
        self._failed: Optional[Failed] = failed
        self.cancelled = False
        self._inner: Optional[Callable[[], None]] = None

    def _take(self) -> Tuple[Optional[Answer], Optional[Failed]]:
        answer, failed = self._answer, self._failed
        self._answer = self._failed = None
        self._inner = None
        return answer, failed

    def answer(self, batch: Batch) -> None:
        answer, _ = self._take()
        if answer is not None:
            answer(batch)

    def fail(self, failure: Failure) -> None:
        _, failed = self._take()
        if failed is not None:
            failed(failure)

    def then(self, room: Room, step: Callable[..., Optional[Callable[[], None]]], *args: Any) -> None:
        """
        The room was found: take the next step (which answers this call).
        """
        if self._answer is not None:
            self.waiting_on(step(room, *args, self.answer, self.fail))

    def waiting_on(self, cancel: Optional[Callable[[], None]]) -> None:
        """
        What cancelling this call cancels now.
        """
        if self._answer is not None:
            self._inner = cancel

    def cancel(self) -> None:
        inner = self._inner
        self.cancelled = True
        self._take()
        if inner is not None:
            inner()


def _fail(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
