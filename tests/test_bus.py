"""
The buses: the connection life every bus between processes shares (on a
fake clock), and one contract every bus passes against its real server
(the in-process bus; PostgreSQL at 127.0.0.1:5432; a Redis server of the
test's own, so it can be restarted).  They fail, never skip, without
PostgreSQL or redis-server.
"""

import os
import shutil
import socket
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from chatd.bus._remote import CONNECTED, DISCONNECTED, RemoteBus, decode, encode
from chatd.bus.local import LocalBus
from chatd.bus.redis import parse_url
from chatd.interfaces import IBus, IBusListener
from chatd.model import Message
from chatd.store.postgres import PostgresStore
from chatd.tap import make_bus
from tests._proxy import FreezableProxy
from tests.test_store import POSTGRES_URL, postgres_url


@implementer(IBusListener)
class Listener:
    """
    Records what a bus tells it.
    """

    def __init__(self) -> None:
        self.hints: List[Tuple[str, int, List[Message]]] = []
        self.catch_ups = 0
        self.signals: List[Tuple[str, Dict[str, Any]]] = []

    def hint(self, room: str, last_seq: int, messages: List[Message]) -> None:
        self.hints.append((room, last_seq, list(messages)))

    def signal(self, room: str, signal: Dict[str, Any]) -> None:
        self.signals.append((room, signal))

    def catch_up(self) -> None:
        self.catch_ups += 1

    @property
    def last_seqs(self) -> List[int]:
        return [last for _, last, _ in self.hints]

    @property
    def seqs(self) -> List[int]:
        return [m.seq for _, _, messages in self.hints for m in messages]


@implementer(IBusListener)
class _Broken:
    """
    A listener that raises at everything it is told.
    """

    def hint(self, *args: object) -> None:
        raise RuntimeError("listener exploded")

    def catch_up(self) -> None:
        raise RuntimeError("listener exploded")

    def signal(self, *args: object) -> None:
        raise RuntimeError("listener exploded")


class _Loopback(RemoteBus):
    """
    A bus whose server is the test: each connection attempt waits for the
    test to fire it, and what is published comes straight back unless the
    bus is made deaf.
    """

    description = "loopback"

    def __init__(self, clock: Clock, **kwargs: Any) -> None:
        kwargs.setdefault("jitter", lambda: 1.0)
        super().__init__(clock, "node-a", 300, **kwargs)
        self.attempts: List[Deferred] = []
        self.times: List[float] = []
        self.sent: List[bytes] = []
        self.deaf = False
        self.disconnects = 0

    def _connect(self) -> Deferred:
        d: Deferred = Deferred()
        self.attempts.append(d)
        self.times.append(self._clock.seconds())
        return d

    def _send(self, payload: bytes) -> None:
        self.sent.append(payload)
        if not self.deaf:
            self._heard(payload)

    def _disconnect(self) -> Deferred:
        self.disconnects += 1
        return succeed(None)


class RemoteBusTests(SynchronousTestCase):
    """
    The connection life of every bus between processes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = _Loopback(self.clock)
        self.listener = Listener()
        self.bus.subscribe(self.listener)
        self.bus.startService()
        self.addCleanup(self.bus.stopService)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IBus, self.bus))

    def test_catch_up_once_subscribed(self) -> None:
        """
        Listeners catch up with the store once the subscription is live,
        not before (what is committed meanwhile would be missed).
        """
        self.assertEqual(self.listener.catch_ups, 0)
        self.bus.attempts[0].callback(None)
        self.assertEqual((self.bus.state, self.listener.catch_ups), (CONNECTED, 1))
        late = Listener()
        self.bus.subscribe(late)
        self.assertEqual(late.catch_ups, 1)

    def test_hints_reach_every_listener(self) -> None:
        self.bus.attempts[0].callback(None)
        other = Listener()
        self.bus.subscribe(other)
        self.bus.publish("lobby", 1, [Message("lobby", 1, "n", "b", 5)])
        self.bus.publish("dev", 9, [])
        self.clock.advance(0)
        for listener in (self.listener, other):
            self.assertEqual(listener.last_seqs, [1, 9])
            self.assertEqual(listener.seqs, [1])
            self.assertEqual(listener.hints[0][2][0].body, "b")

    def test_while_down_polls_and_backs_off(self) -> None:
        """
        A bus that cannot connect has its listeners read the store every
        poll interval, and tries again after capped exponential delays.
        """
        self.bus.attempts[0].errback(ConnectionError("refused"))
        self.assertEqual(self.bus.state, DISCONNECTED)
        self.assertEqual(self.listener.catch_ups, 1)
        self.clock.advance(0.25)
        self.assertEqual(self.listener.catch_ups, 1)
        self.clock.advance(0.25)
        self.assertEqual(self.listener.catch_ups, 2)
        # Each attempt fails as soon as it is made; delays (jitter at its
        # top): 0.25, 0.5, 1, 2, 4, 8, then 10 s, the cap.
        for _ in range(8):
            self.bus.attempts[-1].errback(ConnectionError("refused"))
            before = len(self.bus.attempts)
            while len(self.bus.attempts) == before:
                self.clock.advance(0.25)
        times = self.bus.times
        gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
        # (The second attempt failed 0.25 s after it was made.)
        self.assertEqual(gaps, [0.25, 0.25 + 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])
        self.assertGreater(self.listener.catch_ups, 60)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_audit_while_connected(self) -> None:
        """
        Connected, listeners still catch up every audit interval (5 s),
        so that what the bus loses without noticing arrives all the same.
        """
        self.bus.attempts[0].callback(None)
        self.assertEqual(self.listener.catch_ups, 1)
        self.clock.pump([0.5] * 20)
        self.assertEqual(self.listener.catch_ups, 3)

    def test_describe(self) -> None:
        """
        /readyz's sentence says since when the bus has not been connected,
        across failed attempts.
        """
        self.clock.advance(1)
        self.bus.attempts[0].errback(ConnectionError("refused"))
        self.clock.pump([0.25] * 12)
        self.bus.attempts[-1].errback(ConnectionError("refused"))
        self.assertEqual(
            self.bus.describe(),
            "loopback: disconnected, not connected for 4 s; reading the store every 0.5 s meanwhile",
        )
        self.clock.advance(1)
        self.bus.attempts[-1].callback(None)
        self.assertEqual(self.bus.describe(), "loopback: connected")
        self.flushLoggedErrors()

    def test_slow_connect_polls(self) -> None:
        """
        While a connection attempt hangs (up to its timeout), listeners
        read the store every poll interval; once connected, they stop.
        """
        self.clock.pump([0.5] * 4)
        self.assertEqual(self.listener.catch_ups, 4)
        self.bus.attempts[0].callback(None)
        self.clock.pump([0.5] * 4)
        self.assertEqual(self.listener.catch_ups, 5)

    def test_jitter_spreads_reconnects(self) -> None:
        """
        The delay before a reconnect is between half and all of the
        capped exponential one.
        """
        bus = _Loopback(self.clock, jitter=lambda: 0.0, max_backoff=4.0)
        bus.startService()
        self.addCleanup(bus.stopService)
        for expected in (0.125, 0.25, 0.5, 1.0, 2.0, 2.0):
            bus.attempts[-1].errback(ConnectionError("refused"))
            count = len(bus.attempts)
            self.clock.advance(expected - 0.001)
            self.assertEqual(len(bus.attempts), count)
            self.clock.advance(0.001)
            self.assertEqual(len(bus.attempts), count + 1)

    def test_lost_connection(self) -> None:
        """
        A lost connection: the listeners read the store meanwhile, the bus
        reconnects, and they catch up again; the backoff starts afresh.
        """
        self.bus.attempts[0].callback(None)
        self.bus._lost("gone")
        self.assertEqual((self.bus.state, self.bus.disconnects), (DISCONNECTED, 1))
        self.assertEqual(self.listener.catch_ups, 2)
        self.bus.publish("lobby", 2, [])
        self.clock.advance(0)
        self.assertEqual(self.listener.hints, [])
        self.clock.advance(0.25)
        self.assertEqual(len(self.bus.attempts), 2)
        self.bus.attempts[1].callback(None)
        self.assertEqual(self.bus.state, CONNECTED)
        caught = self.listener.catch_ups
        self.clock.advance(4)
        self.assertEqual(self.listener.catch_ups, caught)
        self.bus._lost("again")
        self.clock.advance(0.25)
        self.assertEqual(len(self.bus.attempts), 3)

    def test_deaf_connection_is_made_again(self) -> None:
        """
        A connection that hears nothing, not even this node's heartbeat,
        for longer than deaf_after is dropped and made again.
        """
        self.bus.attempts[0].callback(None)
        self.clock.pump([0.5] * 40)
        self.assertEqual((self.bus.state, self.bus.disconnects), (CONNECTED, 0))
        self.bus.deaf = True
        self.clock.pump([0.5] * 12)
        self.assertEqual(self.bus.state, CONNECTED)
        self.clock.pump([0.5] * 4)
        self.assertEqual((self.bus.state, self.bus.disconnects), (DISCONNECTED, 1))
        self.bus.deaf = False
        self.clock.advance(0.25)
        self.bus.attempts[-1].callback(None)
        self.assertEqual((self.bus.state, self.bus.connects), (CONNECTED, 2))
        self.flushLoggedErrors()

    def test_other_nodes_heartbeats_do_not_count(self) -> None:
        self.bus.attempts[0].callback(None)
        self.bus.deaf = True
        for _ in range(16):
            self.bus._heard(b'{"hb":"node-b","n":1}')
            self.clock.advance(0.5)
        self.assertEqual(self.bus.disconnects, 1)
        self.assertEqual(self.listener.hints, [])

    def test_one_payload_per_room_and_turn(self) -> None:
        """
        Hints published in one reactor turn go out together, one payload
        per room, their messages in order.
        """
        self.bus.attempts[0].callback(None)
        sent = len(self.bus.sent)
        for seq in (1, 2, 3):
            self.bus.publish("lobby", seq, [Message("lobby", seq, "n", "b", 5)])
        self.bus.publish("dev", 4, [])
        self.assertEqual(len(self.bus.sent), sent)
        self.clock.advance(0)
        self.assertEqual(len(self.bus.sent), sent + 2)
        self.assertEqual(self.listener.hints[0][:2], ("lobby", 3))
        self.assertEqual(self.listener.seqs, [1, 2, 3])
        self.assertEqual(self.listener.hints[1], ("dev", 4, []))

    def test_foreign_payloads_are_ignored(self) -> None:
        self.bus.attempts[0].callback(None)
        for payload in [b"", b"not json", b"[1,2]", b'{"r":1,"s":2}', b'{"r":"a","s":"2"}',
                        b'{"r":"a","s":2,"m":[[1]]}']:
            self.bus._heard(payload)
        self.assertEqual(self.listener.hints, [])

    def test_failing_listener_is_its_own(self) -> None:
        self.bus.subscribe(_Broken())
        good = Listener()
        self.bus.subscribe(good)
        self.bus.attempts[0].callback(None)
        self.bus.publish("lobby", 3, [])
        self.clock.advance(0)
        self.assertEqual((good.last_seqs, good.catch_ups), ([3], 1))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_signals(self) -> None:
        """
        An ephemeral signal goes out at once, as it is, to every listener
        (one that raises costs the others nothing); with no seq, it is no
        hint.  Not connected, or too big for the bus, it is dropped.
        """
        self.bus.signal("lobby", {"t": "typing"})
        self.assertEqual(self.bus.sent, [])
        self.bus.attempts[0].callback(None)
        self.bus.subscribe(_Broken())
        self.bus.signal("lobby", {"t": "typing", "n": "Zoë", "s": True})
        self.bus.signal("lobby", {"t": "typing", "n": "x" * 400})
        self.assertEqual(self.listener.signals, [("lobby", {"t": "typing", "n": "Zoë", "s": True})])
        self.assertEqual(self.listener.hints, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stop(self) -> None:
        """
        Stopping cancels every timer and a connection attempt under way.
        """
        self.bus.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.bus.attempts[0].called)
        self.bus.attempts[0].addErrback(lambda f: None)
        subscription = self.bus.subscribe(Listener())
        subscription.stop()
        subscription.stop()


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        messages = [Message("r", 1, "n", "b\u2028é", 5, None), Message("r", 2, "n", "c", 6, "id")]
        (payload,) = encode("r", 2, messages, 1000)
        self.assertEqual(decode(payload), ("r", 2, messages))

    def test_too_big_carries_the_seq_only(self) -> None:
        messages = [Message("r", 7, "n", "x" * 4000, 5, None), Message("r", 8, "n", "y" * 4000, 5, None)]
        (payload,) = encode("r", 8, messages, 7000)
        self.assertLess(len(payload), 100)
        self.assertEqual(decode(payload), ("r", 8, []))

    def test_heartbeat_is_not_a_room(self) -> None:
        self.assertEqual(decode(b'{"hb":"n","n":3}'), (None, "n", 3))

    def test_signal(self) -> None:
        """
        A signal decodes as C{(room, None, signal)}; a malformed one is
        not chatd's.
        """
        self.assertEqual(decode(b'{"g":"r","d":{"t":"typing"}}'), ("r", None, {"t": "typing"}))
        for bad in (b'{"g":1,"d":{}}', b'{"g":"r","d":[1]}', b'{"g":"r"}'):
            self.assertIsNone(decode(bad))

    def test_redis_urls(self) -> None:
        self.assertEqual(parse_url("redis://127.0.0.1:6380/2"), ("127.0.0.1", 6380, 2, None))
        self.assertEqual(parse_url("redis://:s%40cret@h"), ("h", 6379, 0, "s@cret"))
        for bad in ("redis://", "http://h", "redis://h/x", "redis://h:port"):
            self.assertRaises(ValueError, parse_url, bad)


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """
    Wait, on the reactor, until C{predicate()} holds (or fail after
    C{timeout} seconds).
    """
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError(f"not true after {timeout} s: {predicate}")


_FAST = dict(heartbeat_interval=0.2, deaf_after=1.0, poll_interval=0.1, backoff=0.05, max_backoff=0.5)


class BusContractMixin:
    """
    What every bus does, against its real server.  Subclasses make two
    nodes' buses on one deployment and say how a node commits.
    """

    remote = True

    async def make_node(self, name: str) -> Tuple[Any, Callable[..., Any]]:
        """
        A started bus for node C{name}, and C{commit(room, bodies)}: an
        async function that commits messages the way that node does and
        returns them.
        """
        raise NotImplementedError

    async def live(self, bus: Any) -> None:
        if self.remote:
            await wait_until(lambda: bus.state == CONNECTED)

    async def test_every_node_hears_every_commit_in_order(self) -> None:
        """
        Each node's listener hears the commits of every node (its own
        too), each node's in order, messages carried when they are small.
        """
        a, commit_a = await self.make_node("a")
        b, _ = await self.make_node("b")
        heard_a, heard_b = Listener(), Listener()
        a.subscribe(heard_a)
        b.subscribe(heard_b)
        await self.live(a)
        await self.live(b)
        sent = []
        for i in range(20):
            sent.extend(await commit_a("lobby", [f"m{i}"]))
        for heard in (heard_a, heard_b):
            await wait_until(lambda heard=heard: heard.last_seqs[-1:] == [20])
            # Hints of one reactor turn may travel together: the seqs they
            # end at rise, and their messages are every message, in order.
            self.assertEqual(heard.last_seqs, sorted(set(heard.last_seqs)))
            self.assertEqual([m.body for _, _, ms in heard.hints for m in ms], [m.body for m in sent])
            self.assertEqual(heard.seqs, list(range(1, 21)))
            self.assertGreaterEqual(heard.catch_ups, 1)

    async def test_big_messages_travel_as_seqs(self) -> None:
        """
        Messages too big for one payload are announced by seq alone.
        """
        a, commit_a = await self.make_node("a")
        heard = Listener()
        a.subscribe(heard)
        await self.live(a)
        await commit_a("lobby", ["x" * 4000, "y" * 4000])
        await wait_until(lambda: heard.last_seqs[-1:] == [2])
        for room, last, messages in heard.hints:
            self.assertEqual(room, "lobby")
            self.assertIn([m.seq for m in messages], ([], list(range(last - len(messages) + 1, last + 1))))

    async def test_interface(self) -> None:
        a, _ = await self.make_node("a")
        self.assertTrue(verifyObject(IBus, a))  # type: ignore[attr-defined]

    async def test_signals_reach_every_node(self) -> None:
        """
        An ephemeral signal published on one node reaches every node's
        listener (its own too) as it was sent, in the order sent, and is
        no hint (no seq, nothing for the store).
        """
        a, _ = await self.make_node("a")
        b, _ = await self.make_node("b")
        heard_a, heard_b = Listener(), Listener()
        a.subscribe(heard_a)
        b.subscribe(heard_b)
        await self.live(a)
        await self.live(b)
        sent = [{"t": "typing", "k": "user:zoë", "n": "Zoë", "s": on, "o": "a"} for on in (True, False)]
        for signal in sent:
            a.signal("lobby", signal)
        for heard in (heard_a, heard_b):
            await wait_until(lambda heard=heard: len(heard.signals) >= 2)
            self.assertEqual(heard.signals, [("lobby", signal) for signal in sent])  # type: ignore[attr-defined]
            self.assertEqual(heard.hints, [])  # type: ignore[attr-defined]

    async def test_failing_listener_is_its_own(self) -> None:
        """
        A listener that raises does not keep the others from hearing, and
        committing does not fail.
        """
        a, commit_a = await self.make_node("a")

        good = Listener()
        a.subscribe(_Broken())
        a.subscribe(good)
        await self.live(a)
        await commit_a("lobby", ["one"])
        await wait_until(lambda: good.last_seqs == [1])
        self.assertGreaterEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # type: ignore[attr-defined]

    async def test_stopped_subscription_hears_nothing(self) -> None:
        a, commit_a = await self.make_node("a")
        gone, kept = Listener(), Listener()
        subscription = a.subscribe(gone)
        a.subscribe(kept)
        await self.live(a)
        subscription.stop()
        await commit_a("lobby", ["one"])
        await wait_until(lambda: kept.last_seqs == [1])
        self.assertEqual(gone.hints, [])


class RemoteContractMixin(BusContractMixin):
    """
    What every bus between processes does when its connection fails.
    """

    async def cut(self, bus: Any) -> None:
        """
        Break C{bus}'s connection from the server's side.
        """
        raise NotImplementedError

    async def test_losing_the_connection_loses_nothing(self) -> None:
        """
        Cut from the server's side, a bus reports it, has its listeners
        read the store meanwhile, reconnects and catches them up again;
        what is committed after is heard.
        """
        a, commit_a = await self.make_node("a")
        b, _ = await self.make_node("b")
        heard = Listener()
        b.subscribe(heard)
        await self.live(b)
        await commit_a("lobby", ["before"])
        await wait_until(lambda: heard.last_seqs[-1:] == [1])
        caught = heard.catch_ups
        await self.cut(b)
        await wait_until(lambda: b.state != CONNECTED)
        await wait_until(lambda: heard.catch_ups >= caught + 2)
        await wait_until(lambda: b.state == CONNECTED)
        await self.live(a)
        after = heard.catch_ups
        await commit_a("lobby", ["after"])
        await wait_until(lambda: heard.last_seqs[-1:] == [2])
        self.assertGreaterEqual(b.connects, 2)
        self.assertGreaterEqual(after, caught + 2)
        self.flushLoggedErrors()  # type: ignore[attr-defined]

    async def test_frozen_listener_reconnects(self) -> None:
        """
        A connection that stays up but hears nothing (frozen in a proxy)
        is found by the heartbeat and made again.
        """
        b, proxy = await self.make_frozen_node("b")
        heard = Listener()
        b.subscribe(heard)
        await self.live(b)
        await wait_until(lambda: b.connects == 1 and b.state == CONNECTED)
        self.assertGreaterEqual(proxy.freeze(), 1)
        await wait_until(lambda: b.connects >= 2 and b.state == CONNECTED)
        self.assertGreaterEqual(heard.catch_ups, 2)

    async def make_frozen_node(self, name: str) -> Tuple[Any, FreezableProxy]:
        raise NotImplementedError


class LocalBusContractTests(BusContractMixin, TestCase):
    remote = False

    def setUp(self) -> None:
        self.bus = LocalBus()
        self.seq = 0

    async def make_node(self, name: str) -> Tuple[Any, Callable[..., Any]]:
        async def commit(room: str, bodies: List[str]) -> List[Message]:
            messages = []
            for body in bodies:
                self.seq += 1
                messages.append(Message(room, self.seq, name, body, 0))
            self.bus.publish(room, self.seq, messages)
            return messages

        return self.bus, commit


class PostgresBusTests(RemoteContractMixin, TestCase):
    """
    The PostgreSQL bus: NOTIFY from the store's append transaction.
    """

    def setUp(self) -> None:
        self.url = postgres_url(self)

    async def _store(self, url: Optional[str] = None) -> PostgresStore:
        store = PostgresStore(url or self.url, reactor=reactor)
        self.addCleanup(store.close)
        await store.open()
        if not await store.room_state("lobby"):
            await store.create_room("lobby", 0)
        return store

    async def make_node(self, name: str, dsn: Optional[str] = None, url: Optional[str] = None) -> Tuple[Any, Callable[..., Any]]:
        store = await self._store(url)
        bus: Any = make_bus("postgresql", store, reactor, f"{name}-{uuid.uuid4().hex[:6]}", None, dsn, **_FAST)
        bus.startService()
        self.addCleanup(bus.stopService)

        async def commit(room: str, bodies: List[str]) -> List[Message]:
            results = [await store.append(room, name, body, 0, None) for body in bodies]
            return [message for message, _ in results]

        return bus, commit

    async def cut(self, bus: Any) -> None:
        import psycopg

        def terminate() -> int:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                    (f"chatd-bus {bus.node}",),
                ).fetchall()
                return len(rows)

        self.assertEqual(await deferToThread(terminate), 1)

    async def make_frozen_node(self, name: str) -> Tuple[Any, FreezableProxy]:
        proxy = await FreezableProxy.start(self, 5432)
        bus, _ = await self.make_node(name, dsn=f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres")
        return bus, proxy

    async def test_long_schema_name(self) -> None:
        """
        A schema name as long as PostgreSQL allows still makes a channel
        (a digest of it), and commits are heard.
        """
        url = f"{POSTGRES_URL}?schema={'s' * 60}"
        self.addCleanup(_drop_schema, "s" * 60)
        a, commit_a = await self.make_node("a", url=url)
        self.assertLessEqual(len(a.channel), 63)
        heard = Listener()
        a.subscribe(heard)
        await self.live(a)
        await commit_a("lobby", ["long"])
        await wait_until(lambda: heard.last_seqs == [1])

    async def test_schemas_do_not_hear_each_other(self) -> None:
        """
        Two deployments in one database (a schema each) never hear each
        other's commits.
        """
        a, commit_a = await self.make_node("a")
        b, commit_b = await self.make_node("b", url=postgres_url(self))
        heard_a, heard_b = Listener(), Listener()
        a.subscribe(heard_a)
        b.subscribe(heard_b)
        await self.live(a)
        await self.live(b)
        await commit_a("lobby", ["for a"])
        await commit_b("lobby", ["for b", "for b too"])
        await wait_until(lambda: heard_a.last_seqs == [1] and heard_b.last_seqs[-1:] == [2])
        self.assertEqual([m.body for _, _, ms in heard_a.hints for m in ms], ["for a"])
        self.assertNotIn("for a", [m.body for _, _, ms in heard_b.hints for m in ms])

    async def test_heartbeats_read_the_queue(self) -> None:
        """
        Each heartbeat reads how full PostgreSQL's notification queue is.
        """
        store = await self._store()
        seen: List[float] = []

        class Observer:
            def bus_state(self, state: str) -> None:
                pass

            def bus_heartbeat(self) -> None:
                pass

            def bus_queue_usage(self, fraction: float) -> None:
                seen.append(fraction)

        bus: Any = make_bus("postgresql", store, reactor, "q", Observer(), None, **_FAST)
        bus.startService()
        self.addCleanup(bus.stopService)
        await wait_until(lambda: len(seen) >= 2)
        self.assertTrue(all(0.0 <= f < 0.5 for f in seen))


def _drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


class _RedisServer(ProcessProtocol):
    """
    A redis-server of the test's own, on a free loopback port, keeping
    nothing on disk.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.ended: Deferred = Deferred()

    @classmethod
    async def start(cls, test: TestCase, port: int = 0) -> "_RedisServer":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise AssertionError("redis-server is required (apt-get install redis-server)")
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        server = cls(port)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        reactor.spawnProcess(server, binary, argv, env=os.environ.copy())
        test.addCleanup(server.stop)

        def answers() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        await wait_until(answers)
        return server

    def processEnded(self, reason: object) -> None:
        self.ended.callback(None)

    def stop(self) -> Deferred:
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        return self.ended


class _Deployment:
    deployment = ""


class RedisBusTests(RemoteContractMixin, TestCase):
    """
    The Redis bus, against a redis-server of the test's own.
    """

    async def setUp(self) -> None:  # type: ignore[override]
        self.redis = await _RedisServer.start(self)
        self.store = _Deployment()
        self.store.deployment = uuid.uuid4().hex
        self.seq = 0

    async def make_node(self, name: str, port: Optional[int] = None) -> Tuple[Any, Callable[..., Any]]:
        url = f"redis://127.0.0.1:{port or self.redis.port}/0"
        bus: Any = make_bus(url, self.store, reactor, f"{name}-{uuid.uuid4().hex[:6]}", None, **_FAST)
        bus.startService()
        self.addCleanup(bus.stopService)

        async def commit(room: str, bodies: List[str]) -> List[Message]:
            messages = []
            for body in bodies:
                self.seq += 1
                messages.append(Message(room, self.seq, name, body, 0))
            bus.publish(room, self.seq, messages)
            return messages

        return bus, commit

    async def cut(self, bus: Any) -> None:
        """
        Restart the Redis server (on the same port).
        """
        await self.redis.stop()
        self.redis = await _RedisServer.start(self, self.redis.port)

    async def make_frozen_node(self, name: str) -> Tuple[Any, FreezableProxy]:
        proxy = await FreezableProxy.start(self, self.redis.port)
        bus, _ = await self.make_node(name, port=proxy.port)
        return bus, proxy

    async def test_deployments_do_not_hear_each_other(self) -> None:
        """
        Two deployments on one Redis (any database) never hear each other.
        """
        a, commit_a = await self.make_node("a")
        other = _Deployment()
        other.deployment = uuid.uuid4().hex
        b: Any = make_bus(f"redis://127.0.0.1:{self.redis.port}/0", other, reactor, "b", None, **_FAST)
        b.startService()
        self.addCleanup(b.stopService)
        heard_a, heard_b = Listener(), Listener()
        a.subscribe(heard_a)
        b.subscribe(heard_b)
        await self.live(a)
        await self.live(b)
        await commit_a("lobby", ["only for a"])
        await wait_until(lambda: heard_a.last_seqs == [1])
        await deferLater(reactor, 0.3)
        self.assertEqual(heard_b.hints, [])

    async def test_stalled_redis_bounds_publishes(self) -> None:
        """
        Publishes Redis does not answer are bounded: past the bound,
        hints are dropped (the store catch-up covers them) and counted.
        """
        from chatd.bus import redis as redis_bus

        proxy = await FreezableProxy.start(self, self.redis.port)
        a, commit_a = await self.make_node("a", port=proxy.port)
        await self.live(a)
        a.heartbeat_interval = a.deaf_after = 3600.0
        self.patch(redis_bus, "MAX_UNANSWERED", 50)
        proxy.freeze()
        for i in range(200):
            await commit_a("lobby", [str(i)])
            # One reactor turn each: one publish each.
            await deferLater(reactor, 0)
        self.assertLessEqual(a._unanswered, 50)
        self.assertGreaterEqual(a.dropped, 150)
        # Once Redis answers again, the dropped hints are made up for: one
        # seq-only hint for the room's newest seq.
        b, _ = await self.make_node("b")
        heard = Listener()
        b.subscribe(heard)
        await self.live(b)
        proxy.thaw()
        await wait_until(lambda: heard.last_seqs[-1:] == [200])

    async def test_connect_that_hangs_is_given_up(self) -> None:
        """
        A server that takes the connection and never answers: the attempt
        is given up after its deadline, and the bus tries again.
        """
        from chatd.bus import redis as redis_bus

        self.patch(redis_bus, "CONNECT_TIMEOUT", 0.2)
        proxy = await FreezableProxy.start(self, self.redis.port)
        proxy.freeze_new = True
        a, _ = await self.make_node("a", port=proxy.port)
        await wait_until(lambda: a.state == DISCONNECTED)
        proxy.freeze_new = False
        await wait_until(lambda: a.state == CONNECTED)
        self.flushLoggedErrors()
