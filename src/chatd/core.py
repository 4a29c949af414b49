# -*- test-case-name: tests.test_core -*-
"""
The chat core: rooms, messages, per-room sequence numbers and fan-out.

Nothing in this module does I/O.  It talks to a store (L{IMessageStore})
through Deferreds, reads time only from the clock it is given, and hands
messages to subscribers and long-poll waiters through plain callables.
The web and WebSocket adapters translate between this and their wire
formats; every rule about rooms and ordering lives here.

Ordering rule: the store assigns each message its C{seq} (the one place
sequence numbers come from) and the core delivers a room's messages to
every subscriber strictly in C{seq} order, each exactly once, whatever
order the store's Deferreds fire in.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
from collections import deque
from functools import partial
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.interfaces import IMessageStore
from chatd.limits import Limits

__all__ = [
    "ChatCore",
    "ChatError",
    "Batch",
    "Message",
    "Peer",
    "Room",
    "Ticket",
    "Subscription",
    "DEFAULT_NICK",
    "MAX_BODY",
    "MAX_NICK",
    "MAX_CLIENT_ID",
    "encode_json",
    "parse_cursor",
    "validate_room_name",
]

DEFAULT_NICK = "anonymous"
MAX_NICK = 32
MAX_BODY = 4096
MAX_CLIENT_ID = 64

_ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# C0 controls other than TAB and LF, DEL, and C1 controls never belong in a
# chat line; lone surrogates cannot be encoded as UTF-8 at all.
_BAD_BODY_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_LINE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class ChatError(Exception):
    """
    A request the core refuses, with the status an HTTP adapter should use.

    @ivar code: a short machine-readable error code, e.g. C{"room_not_found"}.
    @ivar detail: a sentence a person can act on.
    @ivar status: the HTTP status that matches (400, 404, 409, 413...).
    """

    def __init__(
        self, code: str, detail: str, status: int = 400, retry_after: Optional[float] = None
    ) -> None:
        super().__init__(code, detail, status)
        self.code = code
        self.detail = detail
        self.status = status
        #: For 429 and 503: seconds after which trying again may work.
        self.retry_after = retry_after


def _rate_limited(what: str, wait: float) -> ChatError:
    return ChatError("rate_limited", f"{what}; try again in {wait:.1f} s.", 429, wait)


def _room_exists(name: str) -> ChatError:
    return ChatError("room_exists", f"A room named {name!r} already exists.", 409)


def _room_not_found(name: str) -> ChatError:
    return ChatError("room_not_found", f"There is no room named {name!r}.", 404)


def validate_room_name(name: object) -> str:
    """
    Check a room name against C{[A-Za-z0-9_-]{1,64}}.

    @return: the name.
    @raise ChatError: C{invalid_room_name} (400) otherwise.
    """
    if not isinstance(name, str) or not _ROOM_NAME.match(name):
        raise ChatError(
            "invalid_room_name",
            "A room name is 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
        )
    return name


_MAX_SEQ = 2**63 - 1


def parse_cursor(value: Optional[str], name: str = "after") -> Optional[int]:
    """
    Parse a seq cursor from a query string: absent means C{None}, otherwise
    a decimal integer from 0 to 2**63-1.

    @raise ChatError: C{invalid_parameter} (400).
    """
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) > _MAX_SEQ:
        raise ChatError(
            "invalid_parameter",
            f"{name} must be a whole number of at least 0 (a message seq).",
        )
    return int(value)


def validate_nick(nick: object) -> str:
    """
    Normalise a nick: missing or blank means L{DEFAULT_NICK}.

    @raise ChatError: C{invalid_nick} (400) if it is not a string, is longer
        than L{MAX_NICK} characters or holds control characters.
    """
    if nick is None:
        return DEFAULT_NICK
    if not isinstance(nick, str):
        raise ChatError("invalid_nick", "nick must be a string.")
    nick = nick.strip()
    if not nick:
        return DEFAULT_NICK
    if len(nick) > MAX_NICK or _BAD_LINE_CHARS.search(nick):
        raise ChatError(
            "invalid_nick",
            f"A nick is 1 to {MAX_NICK} printable characters.",
        )
    return nick


def validate_body(body: object, max_body: int = MAX_BODY) -> str:
    """
    Strip a message body and check it is 1 to C{max_body} characters.

    @raise ChatError: C{invalid_body} (400) if missing, not a string, blank
        or holding control characters; C{body_too_long} (413) if too long.
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
            413,
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

    @raise ChatError: C{invalid_client_id} (400) unless it is C{None} or a
        string of 1 to L{MAX_CLIENT_ID} printable characters.
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


class Message:
    """
    One stored chat message.  Immutable once the store has made it.

    Its JSON encoding is computed once, on first use, and shared by every
    transport and recipient.
    """

    __slots__ = ("room", "seq", "nick", "body", "ts_ms", "client_id", "_json")

    def __init__(
        self,
        room: str,
        seq: int,
        nick: str,
        body: str,
        ts_ms: int,
        client_id: Optional[str] = None,
    ) -> None:
        self.room = room
        self.seq = seq
        self.nick = nick
        self.body = body
        self.ts_ms = ts_ms
        self.client_id = client_id
        self._json: Optional[bytes] = None

    def __repr__(self) -> str:
        return f"<Message {self.room}#{self.seq} {self.nick!r}: {self.body!r}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.room, self.seq))

    def as_dict(self) -> dict:
        """
        The message as its wire-format dictionary.
        """
        d = {
            "type": "message",
            "room": self.room,
            "seq": self.seq,
            "nick": self.nick,
            "body": self.body,
            "ts": self.ts_ms / 1000.0,
        }
        if self.client_id is not None:
            d["client_id"] = self.client_id
        return d

    @property
    def json(self) -> bytes:
        """
        The UTF-8 JSON encoding of L{as_dict}, computed once.
        """
        if self._json is None:
            self._json = encode_json(self.as_dict())
        return self._json


def encode_json(value: object) -> bytes:
    """
    Encode a value as compact ASCII JSON.

    ASCII-only output keeps U+2028/U+2029 and every other non-ASCII
    character escaped, so the same bytes are safe inside JSONP.
    """
    return json.dumps(value, separators=(",", ":")).encode("ascii")


class Batch:
    """
    The answer to a read: some messages after a cursor.

    @ivar messages: the messages, in seq order.
    @ivar last_seq: the room's newest seq when the batch was made.
    @ivar reset: C{True} when the cursor was older than anything still
        held (or newer than anything ever issued), so the messages start
        at C{first_seq} and the client must drop what it shows.
    @ivar first_seq: the oldest seq still held for the room.
    """

    __slots__ = ("room", "messages", "last_seq", "reset", "first_seq", "_json")

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
        self._json: Optional[bytes] = None

    @property
    def json(self) -> bytes:
        """
        The long-poll response body, built from the messages' cached
        encodings; computed once even when many waiters share the batch.
        """
        if self._json is None:
            parts = [
                b'{"room":"',
                # Room names are [A-Za-z0-9_-]: nothing to escape.
                self.room.encode("ascii"),
                b'","messages":[',
                b",".join(m.json for m in self.messages),
                b'],"last_seq":%d,"reset":%s' % (
                    self.last_seq,
                    b"true" if self.reset else b"false",
                ),
            ]
            if self.reset:
                parts.append(b',"first_seq":%d' % (self.first_seq,))
            parts.append(b"}")
            self._json = b"".join(parts)
        return self._json


class Peer:
    """
    Who is acting: the client's IP address and, for a WebSocket, its
    connection (any hashable object), for the limits that apply to each.
    """

    __slots__ = ("ip", "connection")

    def __init__(self, ip: str, connection: object = None) -> None:
        self.ip = ip
        self.connection = connection


class Ticket:
    """
    A place among the server's concurrent connections; L{release} it when
    the connection ends (safe to call twice).
    """

    __slots__ = ("_limits", "_ip")

    def __init__(self, limits: Optional[Limits], ip: str) -> None:
        self._limits = limits
        self._ip = ip

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is None:
            return
        limits.connections -= 1
        left = limits.connections_by_ip[self._ip] - 1
        if left:
            limits.connections_by_ip[self._ip] = left
        else:
            del limits.connections_by_ip[self._ip]


Deliver = Callable[[Message], None]
OnReset = Callable[[int], None]
#: Called with the batch that answers a long-poll.
Answer = Callable[[Batch], None]


class Subscription:
    """
    One live listener on a room (a WebSocket connection).

    It receives every message with seq greater than its cursor exactly
    once, in order: first the backlog, then live messages.  Live messages
    that arrive while the backlog is still being read from the store are
    queued and replayed after it, skipping any the backlog already held.
    """

    __slots__ = ("_room", "_deliver", "_on_reset", "_last", "_queue", "active")

    def __init__(
        self, room: "Room", deliver: Deliver, on_reset: OnReset, after: int
    ) -> None:
        self._room = room
        self._deliver = deliver
        self._on_reset = on_reset
        self._last = after
        self._queue: Optional[List[Message]] = None
        self.active = True

    @property
    def last_seq(self) -> int:
        """
        The seq of the last message handed to this subscriber.
        """
        return self._last

    def _offer(self, message: Message) -> None:
        if self._queue is not None:
            self._queue.append(message)
        elif message.seq > self._last:
            self._last = message.seq
            self._deliver(message)

    def _backfill(self, batch: Batch) -> None:
        if batch.reset:
            self._last = batch.first_seq - 1
            self._on_reset(batch.first_seq)
        for message in batch.messages:
            if not self.active:
                return
            self._offer(message)

    def stop(self) -> None:
        """
        Stop receiving messages.  Safe to call more than once, and before
        the backlog has finished loading.
        """
        if self.active:
            self.active = False
            self._room._subscriptions.discard(self)
            self._queue = None


class Room:
    """
    A chat room's live state: the newest messages (a bounded cache), its
    subscribers and its waiting long-poll requests.
    """

    def __init__(self, name: str, last_seq: int, history: int) -> None:
        self.name = name
        self.last_seq = last_seq
        self._cache: Deque[Message] = deque(maxlen=history)
        self._subscriptions: Set[Subscription] = set()
        #: Waiting long-polls: each is called with the batch that answers it.
        self._waiters: Dict[Answer, None] = {}
        #: C{(deadline, n, waiter)} of waiters with a timeout, earliest
        #: first, and one call for the earliest (cheaper than a call each,
        #: on the path every long-poll takes).  Entries of waiters already
        #: answered or forgotten are dropped when they come up.
        self._deadlines: List[Tuple[float, int, Answer]] = []
        self._expiry: Optional[IDelayedCall] = None
        self._expiry_at = 0.0
        self._entries = itertools.count()
        self._last_read: Optional[Tuple[int, int, Batch]] = None
        # Messages committed out of order, held until the gap before them
        # is filled; see ChatCore._committed.
        self._pending: Dict[int, Message] = {}

    def _answer_waiters(self, batch: Batch) -> int:
        """
        Answer every waiting long-poll with C{batch} and forget them.

        @return: how many there were.
        """
        waiters = list(self._waiters)
        self._waiters.clear()
        self._clear_deadlines()
        for answer in waiters:
            answer(batch)
        return len(waiters)

    def _add_waiter(self, answer: Answer, timeout: Optional[float], clock: IReactorTime) -> None:
        """
        Call C{answer} with the next message's batch, or with an empty one
        after C{timeout} seconds (C{None}: no timeout) if none comes first.
        """
        self._waiters[answer] = None
        if timeout is None:
            return
        deadline = clock.seconds() + timeout
        heapq.heappush(self._deadlines, (deadline, next(self._entries), answer))
        if self._expiry is None:
            self._expiry = clock.callLater(timeout, self._expire, clock)
            self._expiry_at = deadline
        elif deadline < self._expiry_at:
            self._expiry.reset(timeout)
            self._expiry_at = deadline

    def _forget(self, answer: Answer) -> None:
        """
        Waiter C{answer} is no longer waiting (its client went away).
        """
        self._waiters.pop(answer, None)
        if not self._waiters:
            self._clear_deadlines()

    def _clear_deadlines(self) -> None:
        """
        No waiter is left to time out: drop the deadlines and their call.
        """
        self._deadlines.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self, clock: IReactorTime) -> None:
        self._expiry = None
        now = clock.seconds()
        deadlines = self._deadlines
        due = []
        while deadlines and deadlines[0][0] <= now:
            answer = heapq.heappop(deadlines)[2]
            if answer in self._waiters:
                del self._waiters[answer]
                due.append(answer)
        if deadlines:
            self._expiry_at = deadlines[0][0]
            self._expiry = clock.callLater(self._expiry_at - now, self._expire, clock)
        empty = Batch(self.name, [], self.last_seq)
        for answer in due:
            answer(empty)

    @property
    def last_activity(self) -> Optional[float]:
        """
        When the newest message was sent (seconds), if one is in memory.
        """
        return self._cache[-1].ts_ms / 1000.0 if self._cache else None

    @property
    def clients(self) -> int:
        """
        How many clients are connected: subscribers plus waiting polls.
        """
        return len(self._subscriptions) + len(self._waiters)

    def _cached_after(self, after: int, limit: int) -> Optional[List[Message]]:
        """
        The cached messages after C{after}, or C{None} when the cache does
        not reach back that far.
        """
        cache = self._cache
        first = cache[0].seq if cache else self.last_seq + 1
        if after < first - 1:
            return None
        # seq numbers in the cache are consecutive, so index arithmetic
        # finds the start without scanning.
        start = after + 1 - first
        return [cache[i] for i in range(start, min(len(cache), start + limit))]

    def _cached_batch(self, after: int, limit: int) -> Optional[Batch]:
        """
        The batch of cached messages after C{after}, or C{None} when the
        cache does not reach back that far.  The last one made is kept:
        clients that fell behind by the same messages (a room's long-poll
        clients, after a burst) share one batch and its encoding.
        """
        last = self._last_read
        if last is not None and last[0] == after and last[1] == limit and last[2].last_seq == self.last_seq:
            return last[2]
        messages = self._cached_after(after, limit)
        if messages is None:
            return None
        batch = Batch(self.name, messages, self.last_seq)
        self._last_read = (after, limit, batch)
        return batch


class ChatCore:
    """
    All rooms of one chatd process.

    @param store: where messages are stored and seq numbers assigned.
    @param clock: the only source of time.
    @param history: how many of each room's newest messages to keep in
        memory.
    """

    log = Logger()

    def __init__(
        self,
        store: IMessageStore,
        clock: IReactorTime,
        history: int = 500,
        limits: Optional[Limits] = None,
        max_body: int = MAX_BODY,
    ) -> None:
        if history < 1:
            raise ValueError("history must be at least 1")
        self._store = store
        self._clock = clock
        self._history = history
        #: None: no limits (embedding, unit tests); chatd's tap always sets them.
        self.limits = limits
        self.max_body = max_body
        #: Told about commits and fan-outs (see L{chatd.metrics.Metrics}).
        self.observer: Any = None
        self._rooms: Dict[str, Room] = {}
        self._creating: Set[str] = set()

    # -- rooms ---------------------------------------------------------------

    def start(self, rooms: Iterable[str] = ()) -> Deferred:
        """
        Load the rooms the store knows, with their newest messages, then
        create C{rooms} (and C{lobby}) where missing.

        @return: a Deferred that fires when the core is ready.
        """

        async def _start() -> None:
            for name, last_seq in await self._store.load_rooms():
                if name in self._rooms:
                    continue
                room = Room(name, last_seq, self._history)
                if last_seq:
                    newest = await self._store.read_before(
                        name, last_seq + 1, self._history
                    )
                    room._cache.extend(newest)
                self._rooms[name] = room
            for name in ["lobby", *rooms]:
                if name not in self._rooms:
                    await self.create_room(name)

        return Deferred.fromCoroutine(_start())

    def room(self, name: str) -> Room:
        """
        Look up a room.

        @raise ChatError: C{room_not_found} (404).
        """
        try:
            return self._rooms[name]
        except (KeyError, TypeError):
            raise _room_not_found(name) from None

    def rooms(self) -> List[Room]:
        """
        All rooms, by name.
        """
        return [self._rooms[name] for name in sorted(self._rooms)]

    def create_room(self, name: object, peer: Optional[Peer] = None) -> Deferred:
        """
        Create a room.

        @return: a Deferred firing with the new L{Room}, or failing with
            L{ChatError} C{invalid_room_name} (400), C{room_exists} (409),
            C{too_many_rooms} (403) or C{rate_limited} (429).
        """
        try:
            name = validate_room_name(name)
            if name in self._rooms or name in self._creating:
                raise _room_exists(name)
            self._check_room_limits(peer)
        except ChatError as e:
            return _fail(e)
        self._creating.add(name)

        def created(new: bool) -> Room:
            if not new:
                # Another process sharing the store made it first.
                raise _room_exists(name)
            room = self._rooms[name] = Room(name, 0, self._history)
            return room

        def done(result: object) -> object:
            self._creating.discard(name)
            return result

        now_ms = int(self._clock.seconds() * 1000)
        d = self._store.create_room(name, now_ms)
        return d.addCallback(created).addBoth(done)

    def _check_room_limits(self, peer: Optional[Peer]) -> None:
        limits = self.limits
        if limits is None or peer is None:
            return
        if len(self._rooms) + len(self._creating) >= limits.max_rooms:
            raise ChatError(
                "too_many_rooms", f"This server holds its maximum of {limits.max_rooms} rooms.", 403
            )
        if limits.rooms_by_ip is not None:
            wait = limits.rooms_by_ip.take(peer.ip)
            if wait:
                raise _rate_limited(f"Too many rooms created from {peer.ip}", wait)

    # -- connections ---------------------------------------------------------

    def admit(self, ip: str) -> Ticket:
        """
        Take a place for a WebSocket connection or a waiting long-poll.

        @raise ChatError: C{server_full} or C{too_many_connections} (503).
        """
        limits = self.limits
        if limits is None:
            return Ticket(None, ip)
        if limits.connections >= limits.max_connections:
            raise ChatError(
                "server_full", "The server has no room for more connections.", 503, 5.0
            )
        mine = limits.connections_by_ip.get(ip, 0)
        if mine >= limits.max_connections_per_ip:
            raise ChatError(
                "too_many_connections",
                f"{ip} already has {mine} connections open; close some first.",
                503,
                5.0,
            )
        limits.connections += 1
        limits.connections_by_ip[ip] = mine + 1
        return Ticket(limits, ip)

    # -- posting -------------------------------------------------------------

    def post(
        self,
        room_name: str,
        nick: object,
        body: object,
        client_id: object = None,
        peer: Optional[Peer] = None,
    ) -> Deferred:
        """
        Validate and store a message, then deliver it to the room.

        The returned Deferred fires only once the store has committed the
        message.  A C{client_id} already used in this room yields the
        original message (its original seq) and stores nothing.

        @return: a Deferred firing with the L{Message}, or failing with
            L{ChatError}.
        """
        try:
            room = self.room(room_name)
            if peer is not None:
                self._check_rate(peer)
            nick = validate_nick(nick)
            body = validate_body(body, self.max_body)
            client_id = validate_client_id(client_id)
        except ChatError as e:
            return _fail(e)
        now = self._clock.seconds()
        d = self._store.append(room.name, nick, body, int(now * 1000), client_id)
        return d.addCallback(self._committed, room, now)

    def _check_rate(self, peer: Peer) -> None:
        limits = self.limits
        if limits is None or limits.posting_by_ip is None or limits.posting_by_connection is None:
            return
        wait = limits.posting_by_ip.take(peer.ip)
        if not wait and peer.connection is not None:
            wait = limits.posting_by_connection.take(peer.connection)
        if wait:
            raise _rate_limited("Too many messages", wait)

    def _committed(
        self, result: Tuple[Message, bool], room: Room, started: Optional[float] = None
    ) -> Message:
        message, created = result
        if not created:
            return message
        observer = self.observer
        if observer is not None and started is not None:
            observer.committed(self._clock.seconds() - started)
        if message.seq <= room.last_seq:
            # Already delivered (a store that reports twice); never resend.
            return message
        if message.seq != room.last_seq + 1:
            # A later seq committed before an earlier one reported back:
            # hold it so that every subscriber still sees seq order.
            room._pending[message.seq] = message
            return message
        subscribers, waiters = self._deliver(room, message)
        if observer is not None and started is not None:
            observer.delivered_to(subscribers, waiters, self._clock.seconds() - started)
        while room.last_seq + 1 in room._pending:
            self._deliver(room, room._pending.pop(room.last_seq + 1))
        return message

    def _deliver(self, room: Room, message: Message) -> Tuple[int, int]:
        """
        Hand a committed message to the room's waiters and subscribers.

        @return: how many subscribers and waiters it went to.
        """
        room.last_seq = message.seq
        room._cache.append(message)
        waiters = 0
        if room._waiters:
            # Every waiter was waiting at the room's previous last seq, so
            # they all get this same batch, encoded once.
            waiters = room._answer_waiters(Batch(room.name, [message], message.seq))
        subscriptions = list(room._subscriptions)
        for subscription in subscriptions:
            try:
                subscription._offer(message)
            except Exception:
                # One failing recipient must not cost the others the
                # message: drop it and carry on.
                self.log.failure(
                    "Dropping subscriber of {room} after a delivery error",
                    room=room.name,
                )
                subscription.stop()
        return len(subscriptions), waiters

    # -- reading -------------------------------------------------------------

    def read(self, room_name: str, after: Optional[int], limit: int) -> Deferred:
        """
        The messages after seq C{after} (at most C{limit}), from memory when
        the cache reaches back far enough and from the store otherwise.

        @param after: the last seq the client has; C{None} means "only new
            messages", i.e. the room's current last seq.
        @return: a Deferred firing with a L{Batch}.
        """
        try:
            room = self.room(room_name)
        except ChatError as e:
            return _fail(e)
        return self._read(room, after, limit)

    def _read(self, room: Room, after: Optional[int], limit: int) -> Deferred:
        batch = self._read_cache(room, after, limit)
        if batch is not None:
            return succeed(batch)
        return self._read_store(room, after, limit)

    def _read_cache(self, room: Room, after: Optional[int], limit: int) -> Optional[Batch]:
        """
        L{_read} from the room's cache, or None when the cursor is not in
        it (older than the cache, or from the future).
        """
        if after is None:
            after = room.last_seq
        if 0 <= after <= room.last_seq:
            return room._cached_batch(after, limit)
        return None

    def _read_store(self, room: Room, after: Optional[int], limit: int) -> Deferred:
        last_seq = room.last_seq
        if after is None:
            after = last_seq
        if after > last_seq:
            # A cursor from the future: this server lost messages the
            # client saw (or the client is confused).  Say so explicitly.
            after = -1

        def answer(result: Tuple[List[Message], int]) -> Batch:
            messages, first_seq = result
            # With nothing held, the next seq to be issued is where a
            # client resumes.
            reset = after < first_seq - 1
            return Batch(room.name, messages, last_seq, reset, first_seq)

        d = self._store.read_after(room.name, max(after, 0), limit)
        return d.addCallback(answer)

    def read_before(self, room_name: str, before: int, limit: int) -> Deferred:
        """
        Up to C{limit} messages older than seq C{before}, oldest first,
        for paging back through history.

        @return: a Deferred firing with a L{Batch}.
        """
        try:
            room = self.room(room_name)
        except ChatError as e:
            return _fail(e)
        last_seq = room.last_seq
        d = self._store.read_before(room.name, before, limit)
        return d.addCallback(lambda msgs: Batch(room.name, msgs, last_seq))

    def ping(self, timeout: float) -> Deferred:
        """
        Readiness: a Deferred that fires if the store answers within
        C{timeout} seconds.
        """
        d = self._store.ping()
        d.addTimeout(timeout, self._clock)
        return d

    def waiting(self) -> int:
        """
        How many long-poll requests are waiting, in all rooms.
        """
        return sum(len(room._waiters) for room in self._rooms.values())

    def release_waiters(self) -> int:
        """
        Shutting down: answer every waiting long-poll with an empty batch
        now, and say how many there were.
        """
        return sum(
            room._answer_waiters(Batch(room.name, [], room.last_seq))
            for room in self._rooms.values()
        )

    def prune(self, before_ms: int) -> Deferred:
        """
        Retention: delete messages sent before C{before_ms} from the store
        and from memory, oldest first, stopping in each room at the first
        message to keep.  Cursors older than what remains then get a reset.

        @return: a Deferred firing with the number deleted from the store.
        """

        def forget(deleted: int) -> int:
            for room in self._rooms.values():
                cache = room._cache
                while cache and cache[0].ts_ms < before_ms:
                    cache.popleft()
                room._last_read = None
            return deleted

        return self._store.prune(before_ms).addCallback(forget)

    def wait(
        self,
        room_name: str,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
    ) -> Deferred:
        """
        Long-poll: like L{read}, but when nothing is newer than C{after},
        wait until a message arrives or C{timeout} seconds pass (then the
        batch is empty).  C{timeout=None} waits for as long as it takes.

        Cancelling the Deferred (the client went away) forgets the waiter
        at once.

        @return: a Deferred firing with a L{Batch}.
        """
        try:
            room = self.room(room_name)
        except ChatError as e:
            return _fail(e)
        if after is None:
            after = room.last_seq
        if after != room.last_seq or (timeout is not None and timeout <= 0):
            return self._read(room, after, limit)

        d: Deferred[Batch] = Deferred(lambda d: room._forget(d.callback))
        room._add_waiter(d.callback, timeout, self._clock)
        return d

    def wait_for(
        self,
        room_name: str,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
        answer: Answer,
        failed: Callable[[Failure], object],
    ) -> Optional[Callable[[], None]]:
        """
        L{wait} without a Deferred, for the long-poll short path: C{answer}
        is called with the batch (at once, if there is one), or C{failed}
        if the store cannot be read.

        @raise ChatError: C{room_not_found}.
        @return: when the waiter is waiting, a function that forgets it
            (its client went away); otherwise None.
        """
        room = self.room(room_name)
        if after is None:
            after = room.last_seq
        if after != room.last_seq or (timeout is not None and timeout <= 0):
            batch = self._read_cache(room, after, limit)
            if batch is not None:
                answer(batch)
            else:
                self._read_store(room, after, limit).addCallbacks(answer, failed)
            return None
        room._add_waiter(answer, timeout, self._clock)
        return partial(room._forget, answer)

    def subscribe(
        self,
        room_name: str,
        after: Optional[int],
        deliver: Deliver,
        on_reset: OnReset,
    ) -> Subscription:
        """
        Follow a room: C{deliver} gets every message after seq C{after}
        (C{None}: the cached history), in order, exactly once, then every
        new message as it is committed.  If the cursor is older than what
        is held, C{on_reset(first_seq)} is called first.

        @raise ChatError: C{room_not_found}.
        """
        room = self.room(room_name)
        if after is None:
            after = room._cache[0].seq - 1 if room._cache else room.last_seq
        subscription = Subscription(room, deliver, on_reset, after)
        room._subscriptions.add(subscription)
        cached = room._cached_after(after, len(room._cache)) if after <= room.last_seq else None
        if cached is not None:
            # The whole backlog is in memory: hand it over now, before any
            # later message can be offered.
            for message in cached:
                subscription._offer(message)
            return subscription
        subscription._queue = []
        self._backfill_from_store(room, subscription)
        return subscription

    def _backfill_from_store(self, room: Room, subscription: Subscription) -> None:
        async def backfill() -> None:
            first = True
            while subscription.active:
                queue = subscription._queue
                assert queue is not None
                target = room.last_seq
                batch = await self._read(room, subscription._last, self._history)
                if not subscription.active:
                    return
                if not first:
                    batch.reset = False
                first = False
                subscription._queue = None
                subscription._backfill(batch)
                if subscription._last >= target or not batch.messages:
                    # Caught up with everything committed before the read
                    # began; the queue holds the rest.
                    for message in queue:
                        subscription._offer(message)
                    return
                subscription._queue = queue

        def failed(failure: Failure) -> None:
            self.log.failure(
                "Could not load history for a subscriber of {room}",
                failure,
                room=room.name,
            )
            subscription.stop()

        Deferred.fromCoroutine(backfill()).addErrback(failed)


def _fail(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
