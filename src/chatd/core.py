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
from twisted.internet.interfaces import IReactorTime
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
    Headcount,
    Identity,
    Message,
    Peer,
    RoomAccess,
    RoomLimitReached,
    User,
    auth_required,
    room_exists,
    room_not_found,
    too_many_rooms,
    validate_body,
    validate_client_id,
    validate_display_name,
    validate_nick,
    validate_role,
    validate_room_name,
    validate_user_id,
)
from chatd.presence import Listener, Presence, Visit, presence_key
from chatd.room import Answer, Deliver, OnReset, Room, Subscription

__all__ = ["ChatCore", "FILL_RETRY", "CATCH_UP_TIMEOUT"]

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

        @raise ChatError: C{room_not_found}, C{auth_required}.
        """
        if identity.key is not None:
            return room
        access = room.access
        if access.private:
            user = identity.user
            if user is None or user.id not in access.members:
                raise room_not_found(room.name)
        elif identity.user is None and not access.guests:
            raise auth_required(f"Room {room.name!r} is for signed-in users; sign in, or send a token.")
        return room

    def visible(self, room: Room, identity: Identity) -> bool:
        """
        Whether C{room} is listed to C{identity} (public, or theirs).
        """
        if not room.access.private or identity.key is not None:
            return True
        return identity.user is not None and identity.user.id in room.access.members

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
            now = self._clock.seconds()
            stored = await self._store.append(
                room.name, user.name, new or "", int(now * 1000), None, user, "member"
            )
            return self._committed(stored, room, now)

        return self.enter(room_name, identity).addCallback(
            lambda room: Deferred.fromCoroutine(change(room))
        )

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
            if peer is not None and self._limits is not None:
                self._limits.check_post(peer)
            nick = validate_nick(nick) if user is None else user.name
            body = validate_body(body, self.max_body)
            client_id = validate_client_id(client_id)
        except ChatError as e:
            return _fail(e)
        room = self._rooms.get(room_name)
        if room is not None:
            try:
                self.admit(room, identity)
            except ChatError as e:
                return _fail(e)
            return self._append(room, nick, body, client_id, user)
        return self.enter(room_name, identity).addCallback(self._append, nick, body, client_id, user)

    def _append(
        self, room: Room, nick: str, body: str, client_id: Optional[str], user: Optional[User] = None
    ) -> Deferred:
        now = self._clock.seconds()
        d = self._store.append(room.name, nick, body, int(now * 1000), client_id, user)
        return d.addCallback(self._committed, room, now)

    def _committed(self, result: Tuple[Message, bool], room: Room, started: float) -> Message:
        message, created = result
        if not created:
            return message
        self._observer.committed(self._clock.seconds() - started)
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
        @raise ChatError: C{invalid_nick}; C{not_allowed} for an API key.
        """
        user = identity.user
        name = user.name if user is not None else validate_nick(nick)
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
        it (older than the cache, or ahead of this node).
        """
        if after is None:
            after = room.last_seq
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
        on_revoked: Optional[Callable[[], None]] = None,
    ) -> Subscription:
        """
        Follow a room (one this node follows: see L{find_room}): C{deliver}
        gets every message after seq C{after} (C{None}: the cached
        history), in order, exactly once, then every new message as it is
        delivered.  If the cursor is older than what the store holds,
        C{on_reset(first_seq)} is called first.  If C{identity} is removed
        from the (private) room, the subscription stops and C{on_revoked}
        is called.

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
