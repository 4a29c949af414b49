# -*- test-case-name: tests.test_core -*-
"""
One room's live state, with no I/O: its newest messages (a bounded
cache), its subscribers, its waiting long-polls and the messages it holds
until the seqs before them arrive.

L{Room.deliver} is the one place a message reaches a room's recipients.
Every recipient is called on its own: one that raises is logged (and a
subscriber dropped), and costs nobody else the message, the sender its
acknowledgement, or the room its timers.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from chatd.model import Batch, ChatError, Message, RoomAccess, banned, kicked, not_member
from chatd.presence import Presence

__all__ = ["Answer", "Deliver", "OnReset", "Room", "Subscription", "MAX_PENDING"]

Deliver = Callable[[Message], None]
OnReset = Callable[[int], None]
#: Called with the batch that answers a long-poll.
Answer = Callable[[Batch], None]

#: The most messages a room holds ahead of a gap (seqs beyond the next
#: expected one).  Past it, later ones are dropped: the store has them, and
#: the fill that closes the gap reads them from there.
MAX_PENDING = 1000

_log = Logger(namespace="chatd.room")


class Subscription:
    """
    One live listener on a room (a WebSocket connection).

    It receives every message with seq greater than its cursor exactly
    once, in order: first the backlog, then live messages.  Live messages
    that arrive while the backlog is still being read from the store are
    queued and replayed after it, skipping any the backlog already held.
    """

    __slots__ = ("_room", "_deliver", "_on_reset", "_last", "queue", "active", "user_id", "on_revoked")

    def __init__(
        self,
        room: "Room",
        deliver: Deliver,
        on_reset: OnReset,
        after: int,
        user_id: Optional[str] = None,
        on_revoked: Optional[Callable[[ChatError], None]] = None,
    ) -> None:
        self._room = room
        self._deliver = deliver
        self._on_reset = on_reset
        self._last = after
        #: Whose it is (None: a guest's, or an API key's).
        self.user_id = user_id
        #: Called once its user may no longer read the room (after it
        #: stopped), with why (C{not_member}, C{kicked}, C{banned}).
        self.on_revoked = on_revoked
        #: Live messages held while the backlog loads (None: not loading).
        self.queue: Optional[List[Message]] = None
        self.active = True

    @property
    def last_seq(self) -> int:
        """
        The seq of the last message handed to this subscriber.
        """
        return self._last

    def offer(self, message: Message) -> None:
        """
        A message for this subscriber: delivered unless it already had it,
        or queued while its backlog loads.
        """
        if self.queue is not None:
            self.queue.append(message)
        elif message.seq > self._last:
            self._last = message.seq
            self._deliver(message)

    def backfill(self, batch: Batch) -> None:
        """
        Deliver a batch of backlog read from the store (after a reset, if it
        says so).
        """
        if batch.reset:
            self._last = batch.first_seq - 1
            self._on_reset(batch.first_seq)
        for message in batch.messages:
            if not self.active:
                return
            self.offer(message)

    def stop(self) -> None:
        """
        Stop receiving messages.  Safe to call more than once, and before
        the backlog has finished loading.
        """
        if self.active:
            self.active = False
            self._room.unsubscribe(self)
            self.queue = None

    def revoke(self, why: ChatError) -> None:
        """
        Its user may no longer read the room: stop, and say C{why}.
        """
        self.stop()
        revoked, self.on_revoked = self.on_revoked, None
        if revoked is not None:
            revoked(why)


class Room:
    """
    A chat room's live state.

    @ivar last_seq: the newest seq delivered here; every message up to it
        has reached this room's recipients, in order.
    @ivar known_last: the newest seq known to exist (from commits and bus
        hints); when it is beyond C{last_seq}, the core fills the gap.
    @ivar filling: a fill from the store is under way.
    """

    def __init__(
        self,
        name: str,
        last_seq: int,
        history: int,
        access: Optional[RoomAccess] = None,
        presence: Optional[Presence] = None,
    ) -> None:
        self.name = name
        #: Who is here and who is typing (L{chatd.presence}).
        self.presence = presence if presence is not None else Presence(name)
        #: Who may use it (kept up to date by its member events).
        self.access = access if access is not None else RoomAccess()
        self.last_seq = last_seq
        self.known_last = last_seq
        self.filling = False
        self._cache: Deque[Message] = deque(maxlen=history)
        #: The seqs of each cached message's edits, for its deletion.
        self._edits: Dict[int, List[int]] = {}
        self._subscriptions: Set[Subscription] = set()
        #: Waiting long-polls: each is called with the batch that answers
        #: it; the value is whose poll it is (None: a guest's).
        self._waiters: Dict[Answer, Optional[str]] = {}
        #: C{(deadline, n, waiter)} of waiters with a timeout, earliest
        #: first, and one call for the earliest (cheaper than a call each,
        #: on the path every long-poll takes).  Entries of waiters already
        #: answered or forgotten are dropped when they come up.
        self._deadlines: List[Tuple[float, int, Answer]] = []
        self._expiry: Optional[IDelayedCall] = None
        self._expiry_at = 0.0
        self._entries = itertools.count()
        self._last_read: Optional[Tuple[int, int, Batch]] = None
        #: Messages beyond a gap, by seq, until the gap is filled.
        self._pending: Dict[int, Message] = {}
        #: C{(seq, Deferred)}: who waits for this room to reach a seq.
        self._reaching: List[Tuple[int, Deferred]] = []

    def __repr__(self) -> str:
        return f"<Room {self.name} last_seq={self.last_seq} known_last={self.known_last}>"

    # -- the history cache ---------------------------------------------------

    def load(self, newest: List[Message]) -> None:
        """
        Fill the cache with the room's newest messages, read at start-up
        (consecutive seqs ending at L{last_seq}).
        """
        self._cache.extend(newest)
        for message in newest:
            if message.kind == "edit" and message.target is not None:
                self._edits.setdefault(message.target, []).append(message.seq)

    @property
    def first_cached_seq(self) -> int:
        """
        The oldest seq in the cache (L{last_seq} + 1 when it is empty).
        """
        return self._cache[0].seq if self._cache else self.last_seq + 1

    @property
    def cache_size(self) -> int:
        """
        How many messages the cache holds.
        """
        return len(self._cache)

    @property
    def last_activity(self) -> Optional[float]:
        """
        When the newest message was sent (seconds), if one is in memory.
        """
        return self._cache[-1].ts_ms / 1000.0 if self._cache else None

    def name_of(self, user_id: str) -> Optional[str]:
        """
        The name C{user_id} last spoke under in the cached history, if
        they did.
        """
        for message in reversed(self._cache):
            if message.kind == "message" and message.user is not None and message.user.id == user_id:
                return message.user.name
        return None

    def cached_after(self, after: int, limit: int) -> Optional[List[Message]]:
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

    def cached_batch(self, after: int, limit: int) -> Optional[Batch]:
        """
        The batch of cached messages after C{after}, or C{None} when the
        cache does not reach back that far.  The last one made is kept:
        clients that fell behind by the same messages (a room's long-poll
        clients, after a burst) share one batch and its encoding.
        """
        last = self._last_read
        if last is not None and last[0] == after and last[1] == limit and last[2].last_seq == self.last_seq:
            return last[2]
        messages = self.cached_after(after, limit)
        if messages is None:
            return None
        batch = Batch(self.name, messages, self.last_seq)
        self._last_read = (after, limit, batch)
        return batch

    def trim(self, before_ms: int) -> None:
        """
        Retention: forget cached messages sent before C{before_ms}.
        """
        cache = self._cache
        while cache and cache[0].ts_ms < before_ms:
            cache.popleft()
        self._last_read = None

    def skip_to(self, seq: int) -> None:
        """
        The store no longer holds the messages up to C{seq} (retention
        removed them before this room saw them): continue after it.  The
        cache is emptied, so that its seqs stay consecutive.
        """
        self._cache.clear()
        self._edits.clear()
        self._last_read = None
        self.last_seq = max(self.last_seq, seq)
        self.known_last = max(self.known_last, seq)
        for pending in [s for s in self._pending if s <= seq]:
            del self._pending[pending]

    # -- delivery ------------------------------------------------------------

    def deliver(self, message: Message) -> Tuple[int, int]:
        """
        Hand the message that follows L{last_seq} to the room's waiters and
        subscribers, each on its own.

        @return: how many subscribers and waiters it went to.
        """
        assert message.seq == self.last_seq + 1, (message.seq, self.last_seq)
        self.last_seq = message.seq
        if message.seq > self.known_last:
            self.known_last = message.seq
        self._cache.append(message)
        kind = message.kind
        if kind == "edit" or kind == "delete":
            self._change_cached(message)
        waiters = 0
        if self._waiters:
            # Every waiter was waiting at the room's previous last seq, so
            # they all get this same batch, encoded once.
            waiters = self.answer_waiters(Batch(self.name, [message], message.seq))
        subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            try:
                subscription.offer(message)
            except Exception:
                # One failing recipient must not cost the others the
                # message: drop it and carry on.
                _log.failure("Dropping subscriber of {room} after a delivery error", room=self.name)
                subscription.stop()
        self.presence.delivered(message)
        if kind != "message" and kind != "edit" and kind != "delete":
            self._access_changed(message)
        if self._reaching:
            self._reached()
        return len(subscriptions), waiters

    def _change_cached(self, event: Message) -> None:
        """
        An edit or deletion: the cached messages it changes are replaced
        by their new state (L{Message.changed_by}), so that every read from
        memory shows what the store shows.  A deletion changes its message
        and the edits of it, found by L{_edits} (not by a scan of the
        cache).
        """
        cache = self._cache
        target = event.target
        assert target is not None
        if event.kind == "edit":
            self._edits.setdefault(target, []).append(event.seq)
            seqs = [target]
        else:
            seqs = [target, *self._edits.pop(target, ())]
        first = cache[0].seq
        for seq in seqs:
            i = seq - first
            if 0 <= i < len(cache) - 1:
                changed = cache[i].changed_by(event)
                if changed is not None:
                    cache[i] = changed
        if len(self._edits) > len(cache):
            # Edits of messages no longer cached are not needed.
            self._edits = {seq: edits for seq, edits in self._edits.items() if seq >= first}
        self._last_read = None

    def _access_changed(self, message: Message) -> None:
        """
        A membership, moderation or settings event: the room's access
        changes with it.  A member removed from a private room, and a user
        kicked or banned, stop reading at once (after this event): their
        subscriptions are revoked and their waiting long-polls answered
        (their next request is refused, but a kicked one's).
        """
        self.access.apply(message)
        user = message.user
        if user is None:
            return
        action = (message.meta or {}).get("action")
        why: Optional[ChatError] = None
        if message.kind == "member" and not message.body and self.access.private:
            why = not_member(self.name)
        elif message.kind == "moderation" and action == "ban":
            why = banned(self.name, (message.meta or {}).get("until"))
        elif message.kind == "moderation" and action == "kick":
            why = kicked(self.name)
        if why is None:
            return
        for subscription in [s for s in self._subscriptions if s.user_id == user.id]:
            try:
                subscription.revoke(why)
            except Exception:
                _log.failure("Revoking a subscriber of {room} failed", room=self.name)
        theirs = [answer for answer, owner in self._waiters.items() if owner == user.id]
        for answer in theirs:
            del self._waiters[answer]
        if not self._waiters:
            self._clear_deadlines()
        _answer_each(theirs, Batch(self.name, [], self.last_seq), self.name)

    def hold(self, message: Message) -> None:
        """
        Keep a message that arrived ahead of a gap, within L{MAX_PENDING}.
        """
        if message.seq > self.known_last:
            self.known_last = message.seq
        if len(self._pending) < MAX_PENDING:
            self._pending[message.seq] = message

    def next_pending(self) -> Optional[Message]:
        """
        Take the held message that now follows L{last_seq}, if there is one.
        """
        if not self._pending:
            return None
        return self._pending.pop(self.last_seq + 1, None)

    def drop_delivered_pending(self) -> None:
        """
        Forget held messages at or below L{last_seq} (a fill delivered them).
        """
        for seq in [s for s in self._pending if s <= self.last_seq]:
            del self._pending[seq]

    @property
    def pending(self) -> int:
        """
        How many messages are held ahead of a gap.
        """
        return len(self._pending)

    @property
    def behind(self) -> bool:
        """
        Whether messages are known to exist that this room has not
        delivered.
        """
        return self.known_last > self.last_seq

    def reaches(self, seq: int) -> Deferred:
        """
        A Deferred that fires once L{last_seq} is at least C{seq}.
        """
        d: Deferred = Deferred(lambda d: self._forget_reaching(d))
        if self.last_seq >= seq:
            d.callback(None)
        else:
            self._reaching.append((seq, d))
        return d

    def _forget_reaching(self, d: Deferred) -> None:
        self._reaching = [(s, w) for s, w in self._reaching if w is not d]

    def _reached(self) -> None:
        ready = [d for s, d in self._reaching if s <= self.last_seq]
        if ready:
            self._reaching = [(s, d) for s, d in self._reaching if s > self.last_seq]
            for d in ready:
                d.callback(None)

    # -- subscribers ---------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        """
        Add a subscriber (it is offered every message delivered from now).
        """
        self._subscriptions.add(subscription)

    def unsubscribe(self, subscription: Subscription) -> None:
        """
        Remove a subscriber, if it is here.
        """
        self._subscriptions.discard(subscription)

    # -- long-poll waiters ---------------------------------------------------

    def answer_waiters(self, batch: Batch) -> int:
        """
        Answer every waiting long-poll with C{batch} and forget them.

        @return: how many there were.
        """
        waiters = list(self._waiters)
        self._waiters.clear()
        self._clear_deadlines()
        _answer_each(waiters, batch, self.name)
        return len(waiters)

    def add_waiter(
        self,
        answer: Answer,
        timeout: Optional[float],
        clock: IReactorTime,
        user_id: Optional[str] = None,
    ) -> None:
        """
        Call C{answer} with the next message's batch, or with an empty one
        after C{timeout} seconds (C{None}: no timeout) if none comes first.
        """
        self._waiters[answer] = user_id
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

    def forget(self, answer: Answer) -> None:
        """
        Waiter C{answer} is no longer waiting (its client went away).
        """
        self._waiters.pop(answer, None)
        if not self._waiters:
            self._clear_deadlines()

    @property
    def waiting(self) -> int:
        """
        How many long-polls are waiting here.
        """
        return len(self._waiters)

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
        # The next call is set up before anyone is answered, so that an
        # answer that raises cannot stall the timeouts after it.
        if deadlines:
            self._expiry_at = deadlines[0][0]
            self._expiry = clock.callLater(self._expiry_at - now, self._expire, clock)
        _answer_each(due, Batch(self.name, [], self.last_seq), self.name)

    @property
    def subscribers(self) -> int:
        """
        How many subscribers follow the room here.
        """
        return len(self._subscriptions)

    @property
    def local_clients(self) -> int:
        """
        How many people are here on this node: distinct users plus guests
        (L{chatd.presence}).
        """
        return self.presence.local_clients

    @property
    def clients(self) -> int:
        """
        How many people are here, on this node and (as their presence
        leases last said) the others: distinct users plus guests.
        """
        return self.presence.clients


def _answer_each(waiters: List[Answer], batch: Batch, room: str) -> None:
    """
    Call every waiter with C{batch}; one that raises is logged and the
    rest are still answered.
    """
    for answer in waiters:
        try:
            answer(batch)
        except Exception:
            _log.failure("A long-poll waiter of {room} failed on its answer", room=room)
