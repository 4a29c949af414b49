# -*- test-case-name: tests.test_bus -*-
"""
The Redis bus: hints as Redis pub/sub messages, through txredisapi.

For sites whose PostgreSQL is shared with a NOTIFY-heavy application, or
that need more commits per second than NOTIFY's commit-time lock allows:
publishing here happens after the commit, outside the database.  Each
node publishes its own commits, in commit order, on one connection, so
each listener hears one node's hints in order; hints of different nodes
may interleave in any order, and the core's gap filling puts them right.

Two connections per node: one subscribed (a subscribed Redis connection
can do nothing else), one to publish on.  Either one failing counts as
the bus failing: both are made again, and the subscription renewed, on
every reconnect (L{chatd.bus._remote.RemoteBus}).

URL: C{redis://[:password@]host[:port][/db]}.  Pub/sub channels are not
per database in Redis, so the channel is named after the store (its
schema or file), never after the Redis database.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure

from chatd.bus._remote import RemoteBus

__all__ = ["RedisBus", "parse_url"]

#: Payloads up to this size carry their messages (Redis takes far larger
#: ones; this keeps one hint small next to other nodes' traffic).
MAX_PAYLOAD = 64 * 1024
#: Publishes not yet answered past which hints are dropped (the store
#: catch-up covers them): a stalled Redis must not grow this node's memory.
MAX_UNANSWERED = 1000
#: Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0


def parse_url(url: str) -> tuple:
    """
    C{redis://[:password@]host[:port][/db]} as C{(host, port, db, password)}.

    @raise ValueError: with a sentence saying what is wrong.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"a Redis bus URL looks like redis://host:6379/0, not {url!r}")
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"the Redis database and port must be numbers in {url!r}") from None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, port, db, password


class RedisBus(RemoteBus):
    """
    Hints on a Redis pub/sub channel.

    @param channel: gives the channel's name when the bus connects (the
        store's deployment name is known once the store is open).
    """

    description = "redis"

    def __init__(
        self, reactor: Any, node: str, url: str, channel: Callable[[], str], **kwargs: Any
    ) -> None:
        super().__init__(reactor, node, MAX_PAYLOAD, **kwargs)
        self._reactor = reactor
        self._host, self._port, self.db, self.password = parse_url(url)
        self.target = f"redis://{self._host}:{self._port}/{self.db}"
        self._channel = channel
        self._subscriber: Optional[Any] = None
        self._publisher: Optional[Any] = None
        self._unanswered = 0
        #: Hints dropped because Redis did not keep up.
        self.dropped = 0
        #: The newest seq of each room whose hints were dropped meanwhile.
        self._owed: Dict[str, int] = {}

    def _endpoint(self) -> HostnameEndpoint:
        return HostnameEndpoint(self._reactor, self._host, self._port, timeout=CONNECT_TIMEOUT)

    def _connect(self) -> Deferred:
        self.channel = self._channel()

        async def connect() -> None:
            subscriber: Any = await self._endpoint().connect(_factory(self, subscriber=True))
            self._subscriber = subscriber
            await subscriber.whenConnected()
            # Named, so that an operator (or a test) can tell chatd's
            # connections apart in CLIENT LIST.
            await subscriber.execute_command("CLIENT", "SETNAME", f"chatd-bus-sub:{self.node}")
            await subscriber.subscribe(self.channel)
            publisher: Any = await self._endpoint().connect(_factory(self, subscriber=False))
            self._publisher = publisher
            await publisher.whenConnected()
            await publisher.execute_command("CLIENT", "SETNAME", f"chatd-bus-pub:{self.node}")
            if not (subscriber.connected and publisher.connected):
                raise ConnectionError("a connection was lost while the bus connected")
            self._unanswered = 0
            self._owed = {}

        # The whole attempt has a deadline: a server that takes the TCP
        # connection but never answers (or a connection lost half-way
        # through its AUTH or SELECT, which txredisapi leaves waiting)
        # must not leave the bus connecting for ever.
        d = Deferred.fromCoroutine(connect()).addTimeout(2 * CONNECT_TIMEOUT, self._reactor)

        def failed(failure: Failure) -> Failure:
            self._disconnect()
            return failure

        return d.addErrback(failed)

    def _send_hint(self, room: str, last_seq: int, messages: Any) -> None:
        if self._unanswered >= MAX_UNANSWERED:
            # Owed instead: one seq-only hint per room once Redis catches
            # up, so that a room's last messages are not left to the audit.
            self.dropped += 1
            self._owed[room] = max(last_seq, self._owed.get(room, 0))
            return
        super()._send_hint(room, last_seq, messages)

    def _send(self, payload: bytes) -> None:
        publisher = self._publisher
        if publisher is None or not publisher.connected:
            return
        if self._unanswered >= MAX_UNANSWERED:
            self.dropped += 1
            return
        self._unanswered += 1
        d = publisher.publish(self.channel, payload.decode("utf-8"))

        def answered(result: object) -> None:
            self._unanswered -= 1
            if isinstance(result, Failure):
                self.log.warn("Publishing on the redis bus failed: {error}", error=result.getErrorMessage())
            elif self._owed and self._unanswered < MAX_UNANSWERED // 2:
                owed, self._owed = self._owed, {}
                for room, seq in owed.items():
                    super(RedisBus, self)._send_hint(room, seq, [])

        d.addBoth(answered)

    def _received(self, message: Any) -> None:
        if isinstance(message, str):
            self._heard(message.encode("utf-8"))

    def _connection_lost(self, protocol: Any, reason: str) -> None:
        if protocol is self._subscriber or protocol is self._publisher:
            if self._connecting is not None:
                # Lost half-way through connecting: fail the attempt now.
                self._connecting.cancel()
            self._lost(reason)

    def _disconnect(self) -> Deferred:
        closing = []
        for protocol in (self._subscriber, self._publisher):
            if protocol is not None and protocol.transport is not None:
                closing.append(protocol.whenDisconnected())
                # Aborted, not closed: a connection that is being dropped
                # may be stalled, and nothing queued on it matters (the
                # store has every message).
                protocol.transport.abortConnection()
        self._subscriber = self._publisher = None
        if not closing:
            return succeed(None)
        return DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.bus._received(message)

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connection_lost(self, why.getErrorMessage())


class _Publisher(txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connection_lost(self, why.getErrorMessage())


def _factory(bus: RedisBus, subscriber: bool) -> Any:
    """
    A txredisapi factory for one connection of C{bus}, with its own
    reconnection off: the bus makes both connections again together.
    """
    if subscriber:
        factory = txredisapi.SubscriberFactory()
        factory.protocol = _Subscriber
    else:
        factory = txredisapi.RedisFactory(None, bus.db, 1)
        factory.protocol = _Publisher
    factory.reconnect = False
    factory.password = bus.password
    factory.bus = bus
    # Its pool's readiness, which the bus does not use (a failed AUTH or
    # SELECT fails it, and the bus's own deadline reports that).
    factory.deferred.addErrback(lambda failure: None)
    return factory
