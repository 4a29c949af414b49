# -*- test-case-name: tests.test_bus -*-
"""
What the buses between processes share: the hint encoding, and one
connection life (connect, hear, lose, back off, reconnect) with the rules
that make a lost or deaf bus lose nothing.

A bus is a hint and the store is the truth (L{chatd.interfaces.IBus}), so
a bus between processes only has to keep three promises:

 - On every (re)connect it subscribes first and then tells its listeners
   to catch up with the store (L{IBusListener.catch_up}): whatever was
   committed while it was not listening is read from there.
 - While it is not connected it tells them to catch up every
   C{poll_interval} seconds, so messages still arrive, a little late, and
   it reconnects with capped exponential backoff and jitter.
 - It publishes a heartbeat every C{heartbeat_interval} seconds and
   expects to hear it back: a connection that is up but deaf (a known
   failure of pub/sub clients, and of NATed idle connections) is dropped
   and made again when no heartbeat came back within C{deaf_after}.
 - Even while connected, it has its listeners catch up every
   C{audit_interval} seconds: what a bus loses without noticing (another
   node on another bus, say) arrives late, but arrives.

Subclasses say how to connect (L{RemoteBus._connect}), publish bytes
(L{RemoteBus._send}) and disconnect (L{RemoteBus._disconnect}); they hand
what they hear to L{RemoteBus._heard} and report a lost connection to
L{RemoteBus._lost}.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any, Callable, Dict, List, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.bus.local import Listeners
from chatd.interfaces import IBus, IBusListener, IBusSubscription
from chatd.model import KINDS, Message, User

__all__ = ["RemoteBus", "decode", "encode"]

#: The bus's states, as /readyz and the metrics name them.
CONNECTING, CONNECTED, DISCONNECTED, STOPPED = "connecting", "connected", "disconnected", "stopped"


def encode(room: str, last_seq: int, messages: Sequence[Message], limit: int) -> List[bytes]:
    """
    The payloads that tell other nodes about C{messages} (one room's, in
    seq order, ending at C{last_seq}): the messages themselves when they
    fit in C{limit} bytes, else the room and seq alone (the listeners read
    the messages from the store).
    """
    rows = [_row(m) for m in messages]
    full = _dumps({"r": room, "s": last_seq, "m": rows})
    if len(full) <= limit:
        return [full]
    return [_dumps({"r": room, "s": last_seq})]


def decode(payload: bytes) -> Optional[tuple]:
    """
    A hint's C{(room, last_seq, messages)}, a heartbeat's
    C{(None, node, n)} or an ephemeral signal's C{(room, None, signal)};
    C{None} for anything else (a payload of some other program on the
    same channel is ignored, not trusted).
    """
    try:
        data = json.loads(payload)
        if "hb" in data:
            return (None, str(data["hb"]), int(data["n"]))
        if "g" in data:
            room, signal = data["g"], data["d"]
            if not isinstance(room, str) or not isinstance(signal, dict):
                return None
            return (room, None, signal)
        room, last_seq = data["r"], data["s"]
        if not isinstance(room, str) or type(last_seq) is not int:
            return None
        return (room, last_seq, [_message(room, row) for row in data.get("m", ())])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _row(m: Message) -> List[Any]:
    row = [m.seq, m.nick, m.body, m.ts_ms, m.client_id, None if m.user is None else m.user.id, m.kind]
    if m.target is not None or m.meta is not None:
        row += [m.target, m.meta]
    return row


def _message(room: str, row: List[Any]) -> Message:
    seq, nick, body, ts_ms, cid, uid, kind = row[:7]
    target, meta = row[7:9] if len(row) >= 9 else (None, None)
    nick = str(nick)
    user = None if uid is None else User(str(uid), nick)
    kind = str(kind)
    if kind not in KINDS:
        raise ValueError(kind)
    if target is not None and type(target) is not int:
        raise ValueError(target)
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(meta)
    return Message(
        room, int(seq), nick, str(body), int(ts_ms), None if cid is None else str(cid), user, kind, target, meta
    )


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@implementer(IBus)
class RemoteBus(Service):
    """
    A bus to other processes, with the connection life described above.

    A service: it connects when started and disconnects when stopped.

    @param node: this node's name (its heartbeats carry it).
    @param limit: the largest payload to publish, in bytes.
    @param observer: told of state changes, heartbeats and reconnects
        (L{chatd.metrics.Metrics}); may be None.
    """

    log = Logger()
    description = "remote"
    #: Where the bus connects to, for the log (set by subclasses).
    target = ""
    #: The channel it publishes and listens on (set by subclasses).
    channel = ""

    def __init__(
        self,
        clock: IReactorTime,
        node: str,
        limit: int,
        heartbeat_interval: float = 2.0,
        deaf_after: float = 6.0,
        poll_interval: float = 0.5,
        audit_interval: float = 5.0,
        backoff: float = 0.25,
        max_backoff: float = 10.0,
        observer: Any = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._clock = clock
        self.node = node
        self.limit = limit
        self.heartbeat_interval = heartbeat_interval
        self.deaf_after = deaf_after
        self.poll_interval = poll_interval
        self.audit_interval = audit_interval
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._observer = observer
        self._jitter = jitter
        self._listeners = Listeners()
        self.state = STOPPED
        #: Since when the bus has not been connected.
        self._down_since = clock.seconds()
        self._attempts = 0
        self._beats = itertools.count(1)
        self._heard_at = 0.0
        #: The pending calls, by what they do: "retry" (connect again),
        #: "poll" (catch up while not connected), "beat" (a heartbeat).
        self._calls: Dict[str, IDelayedCall] = {}
        #: Hints of this reactor turn, by room: C{(last_seq, messages)}.
        self._outgoing: Dict[str, tuple] = {}
        self._connecting: Optional[Deferred] = None
        #: How many times the bus connected (the first time included).
        self.connects = 0

    # -- IBus ----------------------------------------------------------------

    def publish(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        """
        Queue the hint; every hint of this reactor turn goes out at its
        end, one payload per room, so that a burst of commits costs the
        listeners one delivery pass, not one per message.
        """
        if self.state != CONNECTED:
            # Dropped: the listeners' catch-up covers it.
            return
        pending = self._outgoing.get(room)
        if pending is None:
            self._outgoing[room] = pending = (last_seq, list(messages))
        else:
            pending[1].extend(messages)
            self._outgoing[room] = (max(pending[0], last_seq), pending[1])
        if "flush" not in self._calls:
            self._schedule("flush", 0, self._flush)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        if self.state != CONNECTED:
            return
        for room, (last_seq, messages) in outgoing.items():
            self._send_hint(room, last_seq, messages)

    def encode(self, room: str, last_seq: int, messages: Sequence[Message]) -> List[bytes]:
        """
        One room's hint as this bus's payloads (L{encode}, within its limit).
        """
        return encode(room, last_seq, messages, self.limit)

    def _send_hint(self, room: str, last_seq: int, messages: Sequence[Message]) -> None:
        """
        Publish one room's hint (subclasses may hold it back).
        """
        for payload in self.encode(room, last_seq, messages):
            self._send_safely(payload)

    def subscribe(self, listener: IBusListener) -> IBusSubscription:
        subscription = self._listeners.add(listener)
        if self.state == CONNECTED:
            self._listeners.catch_up(subscription)
        return subscription

    def signal(self, room: str, signal: Dict[str, Any]) -> None:
        """
        Send an ephemeral signal at once (signals are rare, and rate
        limited where they come from), or drop it: not connected, or
        bigger than the bus takes.
        """
        if self.state != CONNECTED:
            return
        try:
            payload = _dumps({"g": room, "d": signal})
        except (TypeError, ValueError):
            self.log.failure("A signal for {room} could not be encoded", room=room)
            return
        if len(payload) <= self.limit:
            self._send_signal(payload)

    def _send_signal(self, payload: bytes) -> None:
        """
        Publish a signal's payload (subclasses keep a node's signals in
        order where their sends could overtake each other).
        """
        self._send_safely(payload)

    # -- the connection's life -----------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._attempt()

    def stopService(self) -> Deferred:
        Service.stopService(self)
        self._set(STOPPED)
        self._cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        return self._disconnect()

    def describe(self) -> str:
        """
        The bus's state in a sentence, for /readyz.
        """
        if self.state == CONNECTED:
            return f"{self.description}: connected"
        seconds = self._clock.seconds() - self._down_since
        return (
            f"{self.description}: {self.state}, not connected for {seconds:.0f} s; "
            f"reading the store every {self.poll_interval:g} s meanwhile"
        )

    def _attempt(self) -> None:
        if not self.running:
            return
        self._set(CONNECTING)
        if "poll" not in self._calls:
            # A connection attempt can take a while (up to its timeout):
            # other nodes' messages still arrive meanwhile, from the store.
            self._schedule("poll", self.poll_interval, self._poll)
        self._connecting = d = self._connect()

        def connected(_: object) -> None:
            self._connecting = None
            if not self.running:
                self._disconnect()
                return
            self._attempts = 0
            self.connects += 1
            self.log.info(
                "The {bus} bus is {again}connected to {target}, channel {channel}",
                bus=self.description,
                again="again " if self.connects > 1 else "",
                target=self.target,
                channel=self.channel,
            )
            self._set(CONNECTED)
            self._cancel("poll", "retry")
            self._heard_at = self._clock.seconds()
            self._beat()
            self._schedule("audit", self.audit_interval, self._audit)
            # Subscribed first, then the snapshot: nothing committed from
            # now on can be missed, and what came before is in the store.
            self._listeners.catch_up()

        def failed(failure: Failure) -> None:
            self._connecting = None
            if self.running:
                self.log.warn(
                    "The {bus} bus could not connect to {target}: {error}",
                    bus=self.description,
                    target=self.target,
                    error=failure.getErrorMessage(),
                )
                self._down()

        d.addCallbacks(connected, failed)

    def _lost(self, reason: str) -> None:
        """
        Subclasses: the connection is gone (or useless).
        """
        if self.state != CONNECTED:
            return
        self.log.warn(
            "The {bus} bus connection to {target} was lost: {reason}",
            bus=self.description,
            target=self.target,
            reason=reason,
        )
        self._down()

    def _down(self) -> None:
        """
        Not connected: read the store meanwhile, and reconnect later.
        """
        self._set(DISCONNECTED)
        self._cancel("beat", "flush", "audit")
        self._outgoing = {}
        d = self._disconnect()
        d.addErrback(lambda f: None)
        self._attempts += 1
        delay = min(self._max_backoff, self._backoff * 2 ** min(self._attempts - 1, 16))
        # Full jitter on the upper half: nodes that lost the bus together
        # do not come back together.
        delay *= 0.5 + 0.5 * self._jitter()
        self._schedule("retry", delay, self._attempt)
        # Hints may have been lost just now: catch up at once, then on.
        self._poll()

    def _poll(self) -> None:
        if self.state in (CONNECTED, STOPPED):
            return
        self._listeners.catch_up()
        self._schedule("poll", self.poll_interval, self._poll)

    def _audit(self) -> None:
        """
        While connected, catch up now and then all the same: whatever the
        bus failed to carry without noticing (a node on another bus, a
        server that dropped a message) arrives within C{audit_interval}.
        """
        if self.state != CONNECTED:
            return
        self._listeners.catch_up()
        self._schedule("audit", self.audit_interval, self._audit)

    def _beat(self) -> None:
        """
        Publish a heartbeat, and check the last one came back in time.
        """
        if self.state != CONNECTED:
            return
        silent = self._clock.seconds() - self._heard_at
        if silent > self.deaf_after:
            self.log.warn(
                "The {bus} bus heard nothing for {seconds:.1f} s, not even its own "
                "heartbeat; reconnecting",
                bus=self.description,
                seconds=silent,
            )
            self._down()
            return
        self._send_safely(_dumps({"hb": self.node, "n": next(self._beats)}))
        self._schedule("beat", self.heartbeat_interval, self._beat)

    def _heard(self, payload: bytes) -> None:
        """
        Subclasses: a payload arrived on the channel.
        """
        decoded = decode(payload)
        if decoded is None:
            self.log.warn("Ignored a payload on the {bus} bus that is not chatd's", bus=self.description)
            return
        if decoded[0] is None:
            if decoded[1] == self.node:
                self._heard_at = self._clock.seconds()
                if self._observer is not None:
                    self._observer.bus_heartbeat()
            return
        room, last_seq, messages = decoded
        if last_seq is None:
            self._listeners.signal(room, messages)
            return
        self._listeners.hint(room, last_seq, messages)

    def _send_safely(self, payload: bytes) -> None:
        try:
            self._send(payload)
        except Exception:
            self.log.failure("Publishing on the {bus} bus failed", bus=self.description)

    def _set(self, state: str) -> None:
        if state != self.state:
            if self.state == CONNECTED or self.state == STOPPED:
                self._down_since = self._clock.seconds()
            self.state = state
            if self._observer is not None:
                self._observer.bus_state(state)

    def _schedule(self, name: str, delay: float, f: Callable[[], None]) -> None:
        """
        Call C{f} in C{delay} seconds, instead of the pending call C{name}.
        """
        self._cancel(name)
        self._calls[name] = self._clock.callLater(delay, self._fire, name, f)

    def _fire(self, name: str, f: Callable[[], None]) -> None:
        self._calls.pop(name, None)
        f()

    def _cancel(self, *names: str) -> None:
        """
        Cancel the pending calls C{names} (all of them if none is named).
        """
        for name in names or list(self._calls):
            call = self._calls.pop(name, None)
            if call is not None and call.active():
                call.cancel()

    # -- what subclasses provide ---------------------------------------------

    def _connect(self) -> Deferred:
        """
        Connect and subscribe; fire once what is published from now on
        will be heard.
        """
        raise NotImplementedError

    def _send(self, payload: bytes) -> None:
        """
        Publish C{payload}, without waiting; drop it if that cannot be done.
        """
        raise NotImplementedError

    def _disconnect(self) -> Deferred:
        """
        Drop the connection, if there is one.  Safe to call when there is
        none.
        """
        return succeed(None)
