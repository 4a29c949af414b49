"""
Delivery under faults and across nodes: one recipient's failure costs
nobody else anything; several cores sharing one store (the seams the
multi-node work builds on) deliver every message exactly once, in seq
order, whether the bus carries the messages, only their seqs, or loses
them; and the bus contract every bus passes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from chatd.bus.local import LocalBus
from chatd.core import ChatCore
from chatd.interfaces import IBus, IMessageStore
from chatd.model import GUEST, Batch, ChatError, Identity, Message, User
from chatd.presence import ANNOUNCE_SPACING
from chatd.room import MAX_PENDING
from chatd.store.memory import MemoryStore
from chatd.store.sqlite import SQLiteStore
from chatd.tap import make_bus
from tests._support import HTTP, WSClient, start_chatd
from tests.test_store import postgres_url


def make_core(store: Optional[IMessageStore] = None, bus: Any = None, clock: Optional[Clock] = None) -> Tuple[ChatCore, Clock]:
    clock = clock or Clock()
    core = ChatCore(store or MemoryStore(), clock, 50, bus=bus)
    core.start()
    return core, clock


class RecipientFailureTests(SynchronousTestCase):
    """
    A long-poll waiter or a subscriber that raises is logged; every other
    recipient still gets the message, the sender its acknowledgement, and
    the room's timers keep running.
    """

    def bad(self, *args: object) -> None:
        raise RuntimeError("this recipient exploded")

    def test_raising_waiter(self) -> None:
        """
        A waiter that raises when answered: the post still succeeds, the
        other waiters (before and after it) and the subscribers get the
        message, and nothing is lost for the next one.
        """
        core, _ = make_core()
        first = core.wait("lobby", 0, 10, 30)
        core.wait_for("lobby", 0, 10, 30, self.bad, self.bad)
        last = core.wait("lobby", 0, 10, 30)
        seen: List[int] = []
        core.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        message = self.successResultOf(core.post("lobby", "a", "one"))
        self.assertEqual(message.seq, 1)
        self.assertEqual([m.seq for m in self.successResultOf(first).messages], [1])
        self.assertEqual([m.seq for m in self.successResultOf(last).messages], [1])
        self.assertEqual(seen, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(core.post("lobby", "a", "two"))
        self.assertEqual(seen, [1, 2])

    def test_raising_waiter_at_timeout(self) -> None:
        """
        A waiter that raises when its timeout answers it does not stop the
        timeouts of the waiters due with it or after it.
        """
        core, clock = make_core()
        core.wait_for("lobby", 0, 10, 5, self.bad, self.bad)
        same_time = core.wait("lobby", 0, 10, 5)
        later = core.wait("lobby", 0, 10, 10)
        clock.advance(5)
        self.assertEqual(self.successResultOf(same_time).messages, [])
        self.assertNoResult(later)
        clock.advance(5)
        self.assertEqual(self.successResultOf(later).messages, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_raising_subscriber(self) -> None:
        """
        A subscriber that raises is dropped; the waiters and the other
        subscribers get every message, and the post succeeds.
        """
        core, _ = make_core()
        core.subscribe("lobby", None, self.bad, lambda s: None)
        seen: List[int] = []
        core.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        waiter = core.wait("lobby", 0, 10, 30)
        self.assertEqual(self.successResultOf(core.post("lobby", "a", "one")).seq, 1)
        self.assertEqual([m.seq for m in self.successResultOf(waiter).messages], [1])
        self.successResultOf(core.post("lobby", "a", "two"))
        self.assertEqual(seen, [1, 2])
        self.assertEqual(core.room("lobby").subscribers, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_raising_observer(self) -> None:
        """
        Even the metrics failing costs no recipient its message, and the
        sender still has its acknowledgement.
        """

        class Broken:
            def committed(self, seconds: float) -> None:
                pass

            def delivered_to(self, *args: object) -> None:
                raise RuntimeError("metrics exploded")

            def filled(self, *args: object) -> None:
                pass

            def event(self, *args: object) -> None:
                pass

        core = ChatCore(MemoryStore(), Clock(), observer=Broken())
        core.start()
        waiter = core.wait("lobby", 0, 10, 30)
        self.assertEqual(self.successResultOf(core.post("lobby", "a", "one")).seq, 1)
        self.assertEqual([m.seq for m in self.successResultOf(waiter).messages], [1])
        self.flushLoggedErrors(RuntimeError)


class RecipientFailureOverSocketsTests(TestCase):
    """
    The same over real sockets: a broken recipient in a live chatd's room
    does not fail the HTTP POST (no 500, no duplicate on retry), and
    WebSocket and long-poll clients of the room get the message.
    """

    timeout = 30

    async def test_raising_recipients_cost_nobody(self) -> None:
        """
        With a raising waiter and a raising subscriber in the room: the
        POST answers 201, a retry with the same client_id gets the same
        seq, the WebSocket client gets seq 1 and 2, a waiting long-poll
        gets seq 1.
        """
        service, base = await start_chatd(self, "--store", "memory:")
        http = HTTP(self, base)
        client = await WSClient.connect(self, base, "/ws/lobby")

        def bad(*args: object) -> None:
            raise RuntimeError("recipient exploded")

        service.core.wait_for("lobby", 0, 10, 30, bad, bad)
        service.core.subscribe("lobby", None, bad, bad)
        poll = http.get_json("/api/rooms/lobby/messages?after=0&timeout=30")
        await client.sync()
        code, message = await http.post_json("/api/rooms/lobby/messages", {"body": "one", "client_id": "c1"})
        self.assertEqual((code, message["seq"]), (201, 1))
        code, again = await http.post_json("/api/rooms/lobby/messages", {"body": "one", "client_id": "c1"})
        self.assertEqual((code, again["seq"]), (201, 1))
        code, answer = await poll
        self.assertEqual((code, [m["seq"] for m in answer["messages"]]), (200, [1]))
        await http.post_json("/api/rooms/lobby/messages", {"body": "two"})
        await client.wait_for_seq(2)
        self.assertEqual(client.seqs, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class _Deaf:
    """
    A bus that tells each listener nothing (a node whose bus is down):
    only the store and the core's own catch-up can bring it news.
    """

    def publish(self, room: str, last_seq: int, messages: List[Message]) -> None:
        pass

    def subscribe(self, listener: Any) -> Any:
        listener.catch_up()
        return self

    def stop(self) -> None:
        pass


@implementer(IBus)
class _Lossy(LocalBus):
    """
    An in-process bus that drops the messages from its hints (listeners
    get only the seq), and every hint whose seq is in C{lose}.
    """

    def __init__(self, lose: Tuple[int, ...] = (), seqs_only: bool = True) -> None:
        super().__init__()
        self.lose = set(lose)
        self.seqs_only = seqs_only

    def publish(self, room: str, last_seq: int, messages: Any) -> None:
        if last_seq in self.lose:
            return
        super().publish(room, last_seq, [] if self.seqs_only else messages)


class SharedStoreMixin:
    """
    Two cores (two nodes) on one store and one bus, each with clients of
    its own; subclasses choose the store.
    """

    def make_store(self) -> IMessageStore:
        raise NotImplementedError

    async def nodes(self, bus: Any = None) -> Tuple[ChatCore, ChatCore, IMessageStore]:
        store_a = self.make_store()
        store_b = self.make_store()
        await store_a.open()
        await store_b.open()
        self.addCleanup(store_b.close)  # type: ignore[attr-defined]
        self.addCleanup(store_a.close)  # type: ignore[attr-defined]
        bus = bus if bus is not None else LocalBus()
        a = ChatCore(store_a, reactor, 20, bus=bus)
        b = ChatCore(store_b, reactor, 20, bus=bus)
        await a.start()
        await b.start()
        self.addCleanup(a.stop)  # type: ignore[attr-defined]
        self.addCleanup(b.stop)  # type: ignore[attr-defined]
        return a, b, store_a

    async def follow(self, core: ChatCore, room: str, count: int) -> List[int]:
        """
        Subscribe to C{room} on C{core}; the seqs once C{count} came.
        """
        await core.find_room(room)
        seen: List[int] = []
        done: Deferred = Deferred()

        def deliver(message: Message) -> None:
            seen.append(message.seq)
            if len(seen) == count and not done.called:
                done.callback(None)

        core.subscribe(room, 0, deliver, lambda first: seen.append(-first))
        await done.addTimeout(20, reactor)
        return seen

    async def poll_all(self, core: ChatCore, room: str, count: int) -> List[int]:
        """
        Long-poll C{room} on C{core} from seq 0 until C{count} messages.
        """
        seen: List[int] = []
        while len(seen) < count:
            batch: Batch = await core.wait(room, seen[-1] if seen else 0, 7, 10)
            self.assertFalse(batch.reset)  # type: ignore[attr-defined]
            seen.extend(m.seq for m in batch.messages)
        return seen

    async def test_room_made_on_one_node_is_used_on_the_other(self) -> None:
        """
        A room created on node A is found, posted to, read and followed on
        node B at once: no 404.
        """
        a, b, _ = await self.nodes()
        await a.create_room("made-on-a")
        message = await b.post("made-on-a", "bob", "from b")
        self.assertEqual(message.seq, 1)
        batch = await b.read("made-on-a", 0, 10)
        self.assertEqual([m.body for m in batch.messages], ["from b"])
        self.assertIn("made-on-a", [r.name for r in await b.list_rooms()])
        with self.assertRaises(ChatError):  # type: ignore[attr-defined]
            await b.create_room("made-on-a")

    async def test_senders_on_both_nodes(self) -> None:
        """
        Senders on both nodes, subscribers and long-polls on both: every
        one ends with seq 1..N exactly once, in order.
        """
        a, b, _ = await self.nodes()
        n = 60
        followers = [self.follow(core, "lobby", n) for core in (a, b, a, b)]
        polls = [self.poll_all(core, "lobby", n) for core in (a, b)]
        posts = [(a if i % 2 else b).post("lobby", "s", f"m{i}") for i in range(n)]
        await DeferredList(posts, fireOnOneErrback=True, consumeErrors=True)
        for seen in await DeferredList(
            [Deferred.fromCoroutine(c) for c in followers + polls], fireOnOneErrback=True, consumeErrors=True
        ):
            self.assertEqual(seen[1], list(range(1, n + 1)))  # type: ignore[attr-defined]

    async def test_presence_is_summed_over_nodes(self) -> None:
        """
        A room's headcount on every node is its own people plus the other
        nodes' leases: a user on both nodes is one user, guests are
        summed; a listener on one node hears who came on the other; a
        node that withdraws drops out.
        """
        a, b, _ = await self.nodes()
        alice = Identity(User("alice", "Alice"), "token")
        bob = Identity(User("bob", "Bob"), "token")
        frames: List[Any] = []
        on_a = a.room("lobby")
        a.arrive(on_a, alice, listener=lambda kind, body: frames.append(json.loads(body)))
        a.arrive(on_a, alice)
        a.arrive(on_a, GUEST)
        on_b = b.room("lobby")
        for identity in (alice, bob, GUEST):
            b.arrive(on_b, identity)
        await a.share_presence("a", 15)
        await b.share_presence("b", 15)
        await a.share_presence("a", 15)
        self.assertEqual((on_a.clients, on_b.clients), (4, 4))
        self.assertEqual((on_a.local_clients, on_b.local_clients), (2, 3))
        # The diff may wait for the next of the presence's moments
        # (ANNOUNCE_SPACING) after the diff of a's own guest.
        for _ in range(100):
            if frames[-1].get("guests") == 2:
                break
            await deferLater(reactor, ANNOUNCE_SPACING / 4, lambda: None)
        self.assertEqual(
            frames[-1],
            {"type": "presence", "room": "lobby", "joined": [{"id": "bob", "name": "Bob"}], "left": [], "guests": 2},
        )
        await a.withdraw_presence("a")
        await b.share_presence("b", 15)
        self.assertEqual(on_b.clients, 3)
        self.assertEqual([u.id for u in on_b.presence.users], ["alice", "bob"])

    async def test_hints_without_messages(self) -> None:
        """
        A bus that carries only seqs: node B reads each gap from the store
        and still delivers 1..N once, in order.
        """
        a, b, _ = await self.nodes(_Lossy())
        n = 30
        follower = Deferred.fromCoroutine(self.follow(b, "lobby", n))
        for i in range(n):
            await a.post("lobby", "s", f"m{i}")
        self.assertEqual(await follower, list(range(1, n + 1)))  # type: ignore[attr-defined]

    async def test_lost_hints_are_filled_by_the_next(self) -> None:
        """
        Hints lost on the way: the next hint shows the gap, and B fills it
        from the store before delivering what follows.
        """
        a, b, _ = await self.nodes(_Lossy(lose=(2, 3, 7), seqs_only=False))
        n = 10
        follower = Deferred.fromCoroutine(self.follow(b, "lobby", n))
        for i in range(n):
            await a.post("lobby", "s", f"m{i}")
        self.assertEqual(await follower, list(range(1, n + 1)))  # type: ignore[attr-defined]

    async def test_client_moving_to_a_node_that_is_behind(self) -> None:
        """
        A client that saw seq 5 on node A asks node B, which has heard
        nothing (its bus is deaf): B checks the store, catches up, and
        answers without a reset; its long-poll at seq 5 waits for seq 6.
        """
        a, b, _ = await self.nodes(_Deaf())
        for i in range(5):
            await a.post("lobby", "s", f"m{i}")
        batch = await b.read("lobby", 5, 10)
        self.assertEqual((batch.reset, batch.messages, batch.last_seq), (False, [], 5))
        batch = await b.read("lobby", 3, 10)
        self.assertEqual(([m.seq for m in batch.messages], batch.reset), ([4, 5], False))
        waiting = b.wait("lobby", 5, 10, 0.2)
        await a.post("lobby", "s", "m5")
        # B hears nothing of seq 6 (a deaf bus); it times out, no reset.
        batch = await waiting
        self.assertFalse(batch.reset)
        # A cursor really from the future is still a reset.
        batch = await b.read("lobby", 99, 10)
        self.assertTrue(batch.reset)
        self.assertEqual([m.seq for m in batch.messages], [1, 2, 3, 4, 5, 6])


class MemorySharedStoreTests(SharedStoreMixin, TestCase):
    """
    Two nodes on one memory store.
    """

    timeout = 60

    def setUp(self) -> None:
        self._store = MemoryStore()

    def make_store(self) -> IMessageStore:
        return self._store


class SQLiteSharedStoreTests(SharedStoreMixin, TestCase):
    """
    Two nodes on one SQLite file.
    """

    timeout = 60

    def setUp(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        self._path = os.path.join(folder, "chatd.sqlite3")

    def make_store(self) -> IMessageStore:
        return SQLiteStore(self._path, reactor=reactor)


class PostgresSharedStoreTests(SharedStoreMixin, TestCase):
    """
    Two nodes on one PostgreSQL schema.
    """

    timeout = 60

    def setUp(self) -> None:
        self._url = postgres_url(self)

    def make_store(self) -> IMessageStore:
        from chatd.store.postgres import PostgresStore

        return PostgresStore(self._url, reactor=reactor)


class GapTests(SynchronousTestCase):
    """
    The core's gap filling, step by step on a fake clock.
    """

    def test_held_messages_are_bounded(self) -> None:
        """
        However many messages arrive beyond a gap, a room holds at most
        MAX_PENDING, and one fill at a time reads the gap; once the fills
        are done, every message has been delivered once, in order.
        """

        class SlowReads(MemoryStore):
            def __init__(self) -> None:
                super().__init__(retain=5000)
                self.reads: List[Tuple[Deferred, Deferred]] = []

            def read_after(self, room: str, after: int, limit: int) -> Deferred:
                d: Deferred = Deferred()
                self.reads.append((d, super().read_after(room, after, limit)))
                return d

        store = SlowReads()
        core, _ = make_core(store)
        seen: List[int] = []
        core.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        total = MAX_PENDING + 500
        messages = [self.successResultOf(store.append("lobby", "a", f"m{i}", 0, None))[0] for i in range(total)]
        # Seq 1's hint is lost; every later one comes, with its message.
        for message in messages[1:]:
            core.hint("lobby", message.seq, [message])
        room = core.room("lobby")
        self.assertEqual((room.pending, room.last_seq, len(store.reads)), (MAX_PENDING, 0, 1))
        fills = 0
        while store.reads:
            d, inner = store.reads.pop(0)
            inner.addCallback(d.callback)
            fills += 1
            self.assertLessEqual(len(store.reads), 1, "one fill at a time per room")
        self.assertEqual(seen, list(range(1, total + 1)))
        self.assertEqual((room.last_seq, room.pending), (total, 0))
        self.assertGreater(fills, 1)

    def test_messages_only_the_store_had_are_reported(self) -> None:
        """
        Messages a node finds only in the store, seconds after they were
        sent (its bus did not carry them: another node on another bus),
        are delivered, and said in the log at most once a minute.
        """
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = MemoryStore()
        clock = Clock()
        clock.advance(1_700_000_000)
        a, _ = make_core(store, clock=clock)
        b, _ = make_core(store, bus=_Deaf(), clock=clock)
        seen: List[int] = []
        b.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        a.post("lobby", "n", "one")
        clock.advance(4)
        b.catch_up()
        self.assertEqual(seen, [1])
        late = [e for e in events if "reached this node only from the store" in e.get("log_format", "")]
        self.assertEqual(len(late), 1)
        self.assertIn("the same --bus", formatEvent(late[0]))
        a.post("lobby", "n", "two")
        clock.advance(4)
        b.catch_up()
        self.assertEqual(seen, [1, 2])
        self.assertEqual(len([e for e in events if "only from the store" in e.get("log_format", "")]), 1)

    def test_empty_fill_retries_later(self) -> None:
        """
        A hint of a seq the store does not show yet: the fill finds
        nothing and tries again after FILL_RETRY (doubling), not in a
        loop.
        """
        from chatd.core import FILL_RETRY

        store = MemoryStore()
        core, clock = make_core(store)
        core.hint("lobby", 1, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertTrue(core.room("lobby").behind)
        self.successResultOf(store.append("lobby", "a", "late", 0, None))
        clock.advance(FILL_RETRY)
        self.assertEqual(core.room("lobby").last_seq, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lower_seqs_are_dropped(self) -> None:
        """
        A hint of messages already delivered changes nothing.
        """
        core, _ = make_core()
        seen: List[int] = []
        core.subscribe("lobby", None, lambda m: seen.append(m.seq), lambda s: None)
        message = self.successResultOf(core.post("lobby", "a", "one"))
        core.hint("lobby", 1, [message])
        core.hint("lobby", 1, [])
        self.assertEqual(seen, [1])


class _RealBusMixin(SharedStoreMixin):
    """
    Two nodes on one store, each with a bus of its own to a real server
    (as two processes would have), heartbeats and reconnects on.
    """

    bus_name = ""

    async def nodes(self, bus: Any = None) -> Tuple[ChatCore, ChatCore, IMessageStore]:
        if bus is not None:
            # The tests that need a bus that loses hints bring their own.
            return await super().nodes(bus)
        cores = []
        stores = []
        for name in ("a", "b"):
            store: Any = self.make_store()
            await store.open()
            self.addCleanup(store.close)  # type: ignore[attr-defined]
            node_bus: Any = make_bus(
                self.bus_name, store, reactor, f"{name}-{id(self)}", None, None,
                heartbeat_interval=0.2, deaf_after=1.0, poll_interval=0.1, backoff=0.05,
            )
            core = ChatCore(store, reactor, 20, bus=node_bus)
            await core.start()
            node_bus.startService()
            self.addCleanup(node_bus.stopService)  # type: ignore[attr-defined]
            self.addCleanup(core.stop)  # type: ignore[attr-defined]
            cores.append(core)
            stores.append(store)
        for core_bus in (cores[0]._bus, cores[1]._bus):
            for _ in range(500):
                if core_bus.state == "connected":  # type: ignore[union-attr]
                    break
                await deferLater(reactor, 0.01)
        return cores[0], cores[1], stores[0]

    async def cut(self, core: ChatCore) -> None:
        raise NotImplementedError

    async def test_bus_cut_mid_stream_loses_nothing(self) -> None:
        """
        Senders on both nodes while node B's bus connection is cut: every
        subscriber and long-poll on both nodes still ends with 1..N once,
        in order (B reads the store while its bus is down).
        """
        a, b, _ = await self.nodes()
        n = 200
        followers = [self.follow(core, "lobby", n) for core in (a, b, b)]
        polls = [self.poll_all(core, "lobby", n) for core in (a, b)]
        posts = []
        for i in range(n):
            posts.append((a if i % 3 else b).post("lobby", "s", f"m{i}"))
            if i == n // 4:
                await self.cut(b)
            if i % 20 == 0:
                await deferLater(reactor, 0.01)
        await DeferredList(posts, fireOnOneErrback=True, consumeErrors=True)
        for seen in await DeferredList(
            [Deferred.fromCoroutine(c) for c in followers + polls], fireOnOneErrback=True, consumeErrors=True
        ):
            self.assertEqual(seen[1], list(range(1, n + 1)))  # type: ignore[attr-defined]
        for _ in range(500):
            if b._bus.connects >= 2:  # type: ignore[union-attr]
                break
            await deferLater(reactor, 0.01)
        self.assertGreaterEqual(b._bus.connects, 2)  # type: ignore[union-attr]
        self.flushLoggedErrors()  # type: ignore[attr-defined]


class PostgresBusSharedStoreTests(_RealBusMixin, TestCase):
    """
    Two nodes on one PostgreSQL schema, hearing each other by NOTIFY.
    """

    timeout = 60
    bus_name = "postgresql"

    def setUp(self) -> None:
        self._url = postgres_url(self)

    async def cut(self, core: ChatCore) -> None:
        import psycopg

        from tests.test_store import POSTGRES_URL

        name = f"chatd-bus {core._bus.node}"  # type: ignore[union-attr]
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (name,),
            ).fetchall()
        self.assertEqual(len(killed), 1)

    def make_store(self) -> IMessageStore:
        from chatd.store.postgres import PostgresStore

        return PostgresStore(self._url, reactor=reactor)


class RedisBusSharedStoreTests(_RealBusMixin, TestCase):
    """
    Two nodes on one PostgreSQL schema, hearing each other through Redis
    (127.0.0.1:6379).
    """

    timeout = 60
    bus_name = "redis://127.0.0.1:6379/0"

    def setUp(self) -> None:
        self._url = postgres_url(self)

    async def cut(self, core: ChatCore) -> None:
        # The subscriber's connection breaks under it.
        core._bus._subscriber.transport.abortConnection()  # type: ignore[union-attr]

    def make_store(self) -> IMessageStore:
        from chatd.store.postgres import PostgresStore

        return PostgresStore(self._url, reactor=reactor)
