"""
Several chatd nodes acting as one: real C{twistd} processes on one
PostgreSQL schema, hearing each other through a real bus (PostgreSQL's
NOTIFY, or a Redis server of the test's own), with clients spread over
the nodes and over WebSocket and long-poll.

Every client must end with exactly seq 1..N, in the same order, whatever
node it is on and whatever happens to the bus or to a node meanwhile.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests._cluster import Cluster, Node
from tests._proxy import FreezableProxy
from tests._support import HTTP, ChatdProcess, WSClient
from tests.test_bus import _RedisServer, wait_until
from tests.test_store import POSTGRES_URL

#: A node of a cluster (behind HAProxy) or one started on its own.
AnyNode = Union[Node, ChatdProcess]


class Resuming:
    """
    A WebSocket client that, whenever its connection ends, connects again
    (through C{base}, the balancer) resuming with C{?after=} its last seq.
    """

    def __init__(self, test: TestCase, base: str, room: str = "lobby") -> None:
        self.test = test
        self.base = base
        self.room = room
        self.seqs: List[int] = []
        self.received_at: List[float] = []
        self.reconnects = 0
        self.running = True
        self.client: Optional[WSClient] = None
        self.done: Deferred = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while self.running:
            after = f"?after={self.seqs[-1]}" if self.seqs else ""
            try:
                client = await WSClient.connect(self.test, self.base, f"/ws/{self.room}{after}")
            except Exception:
                await deferLater(reactor, 0.1)
                continue
            self.client = client
            seen = 0
            while self.running and client.protocol is not None:
                try:
                    await client.wait_for(lambda c=client, n=seen: len(c.messages) > n or c.protocol is None)
                except ConnectionError:
                    break
                for frame in client.messages[seen:]:
                    self.seqs.append(frame["seq"])
                    self.received_at.append(time.monotonic())
                seen = len(client.messages)
            if self.running:
                self.reconnects += 1

    async def stop(self) -> None:
        self.running = False
        if self.client is not None:
            await self.client.close()
        await self.done


class LongPoller:
    """
    A long-poll client: asks for what follows its last seq, again and
    again, recording every message once.
    """

    def __init__(self, test: TestCase, base: str, room: str = "lobby") -> None:
        self.http = HTTP(test, base)
        self.room = room
        self.seqs: List[int] = []
        self.bodies: List[str] = []
        self.resets = 0
        self.running = True
        self._request: Optional[Deferred] = None
        self.done: Deferred = Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        while self.running:
            after = self.seqs[-1] if self.seqs else 0
            self._request = Deferred.fromCoroutine(
                self.http.get_json(f"/api/rooms/{self.room}/messages?after={after}&timeout=5")
            )
            try:
                code, answer = await self._request
            except Exception:
                # Its node went away: the test points it elsewhere.
                await deferLater(reactor, 0.05)
                continue
            if code != 200:
                await deferLater(reactor, 0.05)
                continue
            if answer["reset"]:
                self.resets += 1
            for message in answer["messages"]:
                self.seqs.append(message["seq"])
                self.bodies.append(message["body"])

    def stop(self) -> Deferred:
        self.running = False
        if self._request is not None:
            self._request.cancel()
        return self.done


class ClusterMixin:
    """
    Three nodes on one schema with the bus the subclass picks.
    """

    timeout = 120

    def bus_args(self) -> List[str]:
        raise NotImplementedError

    async def nodes(self, count: int = 3, extra: Sequence[str] = ()) -> List[Node]:
        """
        C{count} nodes behind HAProxy (the docs' configuration), their
        buses connected.
        """
        self.cluster = await Cluster.start(self, nodes=count, args=[*self.bus_args(), *extra])  # type: ignore[arg-type]
        self.url = self.cluster.store
        for node in self.cluster.nodes:
            await wait_until(lambda node=node: _bus_state(node) == "connected")
        return self.cluster.nodes

    async def post_everywhere(self, nodes: Sequence[AnyNode], count: int, room: str = "lobby") -> None:
        """
        C{count} messages posted over every node at once, in bursts.
        """
        clients = [HTTP(self, node.base) for node in nodes]  # type: ignore[arg-type]
        for start in range(0, count, 30):
            posts = [
                clients[i % len(clients)].post_json(f"/api/rooms/{room}/messages", {"body": f"m{i}"})
                for i in range(start, min(count, start + 30))
            ]
            for code, _ in await gatherResults([Deferred.fromCoroutine(p) for p in posts]):
                self.assertEqual(code, 201)  # type: ignore[attr-defined]

    async def test_every_client_sees_one_order(self) -> None:
        """
        Senders on every node, WebSocket and long-poll clients on every
        node and through the balancer: every client ends with seq 1..N
        exactly once, and all of them with the same bodies in the same
        order.
        """
        nodes = await self.nodes()
        sockets = []
        polls = []
        for base in [node.base for node in nodes] + [self.cluster.haproxy_base] * 3:
            for _ in range(2):
                sockets.append(await WSClient.connect(self, base, "/ws/lobby"))  # type: ignore[arg-type]
            polls.append(LongPoller(self, base))  # type: ignore[arg-type]
        n = 150
        await self.post_everywhere(nodes, n)
        for client in sockets:
            await client.wait_for_seq(n)
        await wait_until(lambda: all(len(p.seqs) >= n for p in polls))
        for p in polls:
            await p.stop()
        orders = [[m["body"] for m in c.messages] for c in sockets] + [p.bodies for p in polls]
        for client in sockets:
            self.assertEqual(client.seqs, list(range(1, n + 1)))  # type: ignore[attr-defined]
        for p in polls:
            self.assertEqual(p.seqs, list(range(1, n + 1)))  # type: ignore[attr-defined]
            self.assertEqual(p.resets, 0)  # type: ignore[attr-defined]
        for order in orders:
            self.assertEqual(order, orders[0])  # type: ignore[attr-defined]
        self.assertEqual(sorted(orders[0]), sorted(f"m{i}" for i in range(n)))  # type: ignore[attr-defined]

    async def test_room_made_on_one_node_is_used_on_another(self) -> None:
        """
        A room created on node A is fetched, posted to and subscribed on
        node B at once.
        """
        a, b = await self.nodes(2)
        code, _ = await HTTP(self, a.base).post_json("/api/rooms", {"name": "made-on-a"})  # type: ignore[arg-type]
        self.assertEqual(code, 201)  # type: ignore[attr-defined]
        on_b = HTTP(self, b.base)  # type: ignore[arg-type]
        code, room = await on_b.get_json("/api/rooms/made-on-a")
        self.assertEqual((code, room["last_seq"]), (200, 0))  # type: ignore[attr-defined]
        client = await WSClient.connect(self, b.base, "/ws/made-on-a")  # type: ignore[arg-type]
        code, message = await on_b.post_json("/api/rooms/made-on-a/messages", {"body": "hi"})
        self.assertEqual((code, message["seq"]), (201, 1))  # type: ignore[attr-defined]
        await client.wait_for_seq(1)
        code, _ = await HTTP(self, a.base).post_json("/api/rooms/made-on-a/messages", {"body": "back"})  # type: ignore[arg-type]
        await client.wait_for_seq(2)
        self.assertEqual([m["body"] for m in client.messages], ["hi", "back"])  # type: ignore[attr-defined]

    async def test_private_room_across_nodes(self) -> None:
        """
        A private room made on node A: a member reads it on node B, a
        stranger gets 404 on every node, and once removed on A the member's
        WebSocket on B closes (4003) and their long-poll on C is answered
        at once, their next one refused.
        """
        from chatd.auth import mint
        from chatd.ws import CLOSE_REVOKED

        secret = b"cluster-secret-cluster-secret-0123"
        path = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        with open(path, "wb") as f:
            f.write(secret)
        a, b, c = await self.nodes(3, ["--auth", "token", "--auth-secret-file", path])

        def as_(user: str) -> Dict[str, List[str]]:
            return {
                "Authorization": [f"Bearer {mint(secret, user, user.title(), 600)}"],
                "Content-Type": ["application/json"],
            }

        async def call(node: Node, method: str, path: str, user: str, payload: Any = None) -> Tuple[int, Any]:
            data = None if payload is None else json.dumps(payload).encode("utf-8")
            code, _, body = await HTTP(self, node.base).request(method, path, data=data, headers=as_(user))  # type: ignore[arg-type]
            return code, json.loads(body)

        code, _ = await call(a, "POST", "/api/rooms", "alice", {"name": "plans", "private": True})
        self.assertEqual(code, 201)  # type: ignore[attr-defined]
        code, _ = await call(a, "POST", "/api/rooms/plans/members", "alice", {"user": "bob"})
        self.assertEqual(code, 201)  # type: ignore[attr-defined]
        for node in (a, b, c):
            code, _ = await call(node, "GET", "/api/rooms/plans/messages?after=0&timeout=0", "eve")
            self.assertEqual(code, 404)  # type: ignore[attr-defined]
        bob_ws = await WSClient.connect(self, b.base, f"/ws/plans?token={mint(secret, 'bob', 'Bob', 600)}")  # type: ignore[arg-type]
        code, _ = await call(a, "POST", "/api/rooms/plans/messages", "alice", {"body": "the plans"})
        self.assertEqual(code, 201)  # type: ignore[attr-defined]
        await bob_ws.wait_for_seq(2)
        poll = Deferred.fromCoroutine(call(c, "GET", "/api/rooms/plans/messages?after=2&timeout=50", "bob"))
        # The poll waits on C once C has delivered seq 2.
        await wait_until(lambda: _waiting(c) >= 1)
        code, _ = await call(a, "DELETE", "/api/rooms/plans/members/bob", "alice")
        self.assertEqual(code, 200)  # type: ignore[attr-defined]
        self.assertEqual(await bob_ws.closed, CLOSE_REVOKED)  # type: ignore[attr-defined]
        code, answer = await poll
        self.assertEqual(code, 200)  # type: ignore[attr-defined]
        code, _ = await call(c, "GET", "/api/rooms/plans/messages?after=0&timeout=0", "bob")
        self.assertEqual(code, 404)  # type: ignore[attr-defined]

    async def test_presence_and_typing_across_nodes(self) -> None:
        """
        Alice on node A sees Bob on node B arrive (once the nodes have
        shared their leases), sees him typing and stop (through the bus,
        no seq, nothing stored), and sees him leave; a user on both nodes
        is one user.
        """
        from chatd.auth import mint

        secret = b"cluster-secret-cluster-secret-0123"
        path = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        with open(path, "wb") as f:
            f.write(secret)
        a, b = await self.nodes(2, ["--auth", "token", "--auth-secret-file", path, "--presence-lease", "3"])

        async def connect(node: Node, user: str) -> WSClient:
            token = mint(secret, user, user.title(), 600)
            return await WSClient.connect(self, node.base, f"/ws/lobby?presence=1&token={token}")  # type: ignore[arg-type]

        def seen(client: WSClient, kind: str) -> List[Dict[str, Any]]:
            return [f for f in client.frames if f["type"] == kind]

        alice = await connect(a, "alice")
        bob = await connect(b, "bob")
        await alice.wait_for(lambda: any(f.get("joined") for f in seen(alice, "presence")))
        await bob.wait_for(lambda: any(f.get("joined") for f in seen(bob, "presence")))
        # Bob on A too, for a moment: he was here already, nobody is told.
        bob_on_a = await connect(a, "bob")
        await bob_on_a.close()
        bob.send_json({"type": "typing"})
        await alice.wait_for(lambda: [f["typing"] for f in seen(alice, "typing")] == [True])
        self.assertEqual(seen(alice, "typing")[0]["user"], {"id": "bob", "name": "Bob"})
        bob.send_json({"type": "typing", "typing": False})
        await alice.wait_for(lambda: [f["typing"] for f in seen(alice, "typing")] == [True, False])
        token = mint(secret, "carol", "Carol", 600)
        _, info = await HTTP(self, a.base).get_json(f"/api/rooms/lobby?token={token}")  # type: ignore[arg-type]
        self.assertEqual((info["clients"], info["last_seq"]), (2, 0))
        await bob.close()
        await alice.wait_for(lambda: any(f.get("left") == ["bob"] for f in seen(alice, "presence")))
        joined = [u["id"] for f in seen(alice, "presence") for u in f.get("joined", f.get("users", []))]
        self.assertEqual(sorted(joined), ["alice", "bob"])
        self.assertEqual([f["left"] for f in seen(alice, "presence") if f.get("left")], [["bob"]])

    async def test_killed_node(self) -> None:
        """
        kill -9 one of three nodes while messages flow through the
        balancer: its clients reconnect through HAProxy with ?after= and
        see no gap, and the other nodes' clients never stall.
        """
        await self.lose_a_node_mid_stream(lambda node: node.kill())

    async def test_drained_node(self) -> None:
        """
        SIGTERM to one of three nodes (started with the docs' --drain):
        HAProxy takes it out, its WebSockets close with 1001 and resume on
        the others with ?after=, and nobody sees a gap.
        """
        await self.lose_a_node_mid_stream(lambda node: node.signal("TERM"))
        process = self.cluster.nodes[0].process
        self.assertEqual((process.exit_code, process.signal), (0, None), process.output[-3000:])
        self.assertRegex(self.cluster.nodes[0].output, rb"closed [1-9][0-9]* WebSockets")

    async def lose_a_node_mid_stream(self, lose: Callable[[Node], object]) -> None:
        nodes = await self.nodes()
        clients = [Resuming(self, self.cluster.haproxy_base) for _ in range(9)]
        await wait_until(lambda: all(c.client is not None for c in clients))
        sender = HTTP(self, self.cluster.haproxy_base)

        async def post(i: int) -> None:
            while True:
                # A post in flight on the dying node may fail: retried with
                # the same client_id, it is stored once.
                try:
                    code, _ = await sender.post_json(
                        "/api/rooms/lobby/messages", {"body": f"m{i}", "client_id": f"k-{i}"}
                    )
                except Exception:
                    code = 0
                if code == 201:
                    return
                await deferLater(reactor, 0.05)

        n = 150
        for i in range(100):
            if i == 40:
                await maybeDeferred(lose, nodes[0])
            await post(i)
            await deferLater(reactor, 0.02)
        # The node is gone (at once, or once its drain is over): the rest
        # reach its clients on the other nodes.
        await nodes[0].process.ended
        for i in range(100, n):
            await post(i)
        await wait_until(lambda: all(len(c.seqs) >= n for c in clients), timeout=30)
        for client in clients:
            await client.stop()
            self.assertEqual(client.seqs, list(range(1, n + 1)))  # type: ignore[attr-defined]
        moved = [c for c in clients if c.reconnects]
        stayed = [c for c in clients if not c.reconnects]
        self.assertTrue(moved and stayed, (len(moved), len(stayed)))  # type: ignore[attr-defined]
        for client in stayed:
            gaps = [b - a for a, b in zip(client.received_at[:-1], client.received_at[1:], strict=True)]
            # Never stalled: no pause longer than HAProxy needs to see the
            # node gone (the posts wait for it) plus slack.
            self.assertLess(max(gaps), 5.0)  # type: ignore[attr-defined]

    async def test_bus_cut_mid_stream(self) -> None:
        """
        The bus connections cut while messages flow: meanwhile messages
        still reach the other nodes (from the store, within a second or
        two), and once the bus is back every client has everything once.
        """
        a, b, c = await self.nodes()
        sockets = [await WSClient.connect(self, node.base, "/ws/lobby") for node in (a, b, c)]  # type: ignore[arg-type]
        polls = [LongPoller(self, node.base) for node in (b, c)]  # type: ignore[arg-type]
        await self.post_everywhere([a, b, c], 30)
        await self.cut_bus([a, b, c])
        await wait_until(lambda: _bus_state(b) != "connected" or _connects(b) >= 2, timeout=10)
        # While the bus is down (or just back), a post on A reaches B.
        started = time.monotonic()
        await HTTP(self, a.base).post_json("/api/rooms/lobby/messages", {"body": "during"})  # type: ignore[arg-type]
        await sockets[1].wait_for_seq(31)
        self.assertLess(time.monotonic() - started, 3.0)  # type: ignore[attr-defined]
        await self.post_everywhere([a, b, c], 30)
        for node in (a, b, c):
            await wait_until(lambda node=node: _bus_state(node) == "connected" and _connects(node) >= 2, 30)
        await self.post_everywhere([a, b, c], 30)
        n = 91
        for client in sockets:
            await client.wait_for_seq(n)
            self.assertEqual(client.seqs, list(range(1, n + 1)))  # type: ignore[attr-defined]
        await wait_until(lambda: all(len(p.seqs) >= n for p in polls))
        for p in polls:
            await p.stop()
            self.assertEqual(p.seqs, list(range(1, n + 1)))  # type: ignore[attr-defined]

    async def cut_bus(self, nodes: Sequence[AnyNode]) -> None:
        raise NotImplementedError


def _metrics(node: AnyNode) -> Dict[str, float]:
    """
    The node's metrics, read in a thread (a plain blocking GET).
    """
    import urllib.request

    with urllib.request.urlopen(node.base + "/metrics", timeout=5) as response:
        text = response.read().decode("utf-8")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _bus_state(node: AnyNode) -> Optional[str]:
    try:
        metrics = _metrics(node)
    except OSError:
        return None
    for state in ("connected", "connecting", "disconnected", "stopped"):
        if metrics.get(f'chatd_bus_state{{chatd_bus_state="{state}"}}') == 1.0:
            return state
    return None


def _waiting(node: AnyNode) -> float:
    """
    How many long-polls wait on the node.
    """
    return _metrics(node).get("chatd_longpoll_waiters", 0.0)


def _connects(node: AnyNode) -> int:
    return int(_metrics(node).get("chatd_bus_connects_total", 0))


class PostgresClusterTests(ClusterMixin, TestCase):
    """
    Three nodes on the PostgreSQL bus (LISTEN/NOTIFY); and what the nodes
    share through the store whatever the bus (the room cap, presence).
    """

    def bus_args(self) -> List[str]:
        return ["--bus", "postgresql"]

    async def cut_bus(self, nodes: Sequence[AnyNode]) -> None:
        import psycopg

        def terminate() -> int:
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'chatd-bus %%' AND query LIKE 'LISTEN%%'"
                    " AND pid <> pg_backend_pid()"
                ).fetchall()
                return len(rows)

        self.assertGreaterEqual(await deferToThread(terminate), len(nodes))

    async def test_room_cap_is_shared(self) -> None:
        """
        --max-rooms holds for the service, not per node.
        """
        nodes = await self.nodes(2, ["--max-rooms", "4", "--rooms-per-hour", "0"])
        self.assertEqual(len(nodes), 2)
        codes = []
        for i in range(5):
            code, answer = await HTTP(self, nodes[i % 2].base).post_json("/api/rooms", {"name": f"r{i}"})
            codes.append((code, answer.get("error")))
        # lobby is one of the four.
        self.assertEqual(codes[:3], [(201, None)] * 3)
        self.assertEqual([c[1] for c in codes[3:]], ["too_many_rooms"] * 2)

    async def test_presence_is_summed_and_a_killed_node_drops_out(self) -> None:
        """
        The member counts of GET /api/rooms are summed over live nodes;
        a node killed with SIGKILL drops out within its lease.
        """
        a, b, c = await self.nodes(3, ["--presence-lease", "3"])
        for node, count in ((a, 2), (b, 3)):
            for _ in range(count):
                await WSClient.connect(self, node.base, "/ws/lobby")
        on_c = HTTP(self, c.base)

        async def clients() -> int:
            _, answer = await on_c.get_json("/api/rooms/lobby")
            return int(answer["clients"])

        counted = [0]

        async def check(expected: int, within: float) -> float:
            started = time.monotonic()
            while time.monotonic() - started < within:
                counted[0] = await clients()
                if counted[0] == expected:
                    return time.monotonic() - started
                await deferLater(reactor, 0.1)
            raise AssertionError(f"{counted[0]} clients counted, not {expected}, after {within} s")

        # Each node renews its lease and reads the others' every 1 s.
        await check(5, 5)
        await b.kill()
        took = await check(2, 10)
        # Within the lease (3 s) and one more renewal of C's.
        self.assertLess(took, 3 + 1 + 1)

    async def test_frozen_listener_reconnects(self) -> None:
        """
        A node whose listening connection stays up but hears nothing (it
        goes through a proxy that stops forwarding) finds out by its
        heartbeat and connects again; messages keep arriving meanwhile.
        """
        proxy = await FreezableProxy.start(self, 5432)
        dsn = f"host=127.0.0.1 port={proxy.port} dbname=test user=postgres"
        a = (await self.nodes(1))[0]
        b = await ChatdProcess.start(self, "--store", self.url, "--bus", "postgresql", "--bus-dsn", dsn)
        await wait_until(lambda: _bus_state(b) == "connected")
        client = await WSClient.connect(self, b.base, "/ws/lobby")
        self.assertEqual(proxy.freeze(), 1)
        post = HTTP(self, a.base)
        for i in range(3):
            await post.post_json("/api/rooms/lobby/messages", {"body": f"frozen {i}"})
            await deferLater(reactor, 1.0)
        await wait_until(lambda: _connects(b) >= 2 and _bus_state(b) == "connected", timeout=20)
        self.assertIn(b"heard nothing for", b.output)
        await post.post_json("/api/rooms/lobby/messages", {"body": "after"})
        await client.wait_for_seq(4)
        self.assertEqual(client.seqs, [1, 2, 3, 4])


class RedisClusterTests(ClusterMixin, TestCase):
    """
    Three nodes on the Redis bus, a Redis server of the test's own (so it
    can be restarted).
    """

    async def setUp(self) -> None:  # type: ignore[override]
        self.redis = await _RedisServer.start(self)

    def bus_args(self) -> List[str]:
        return ["--bus", f"redis://127.0.0.1:{self.redis.port}/0"]

    async def test_a_node_on_another_bus(self) -> None:
        """
        A node started by mistake with another bus (PostgreSQL's, beside
        Redis nodes): its messages still reach the others, from the store,
        within the audit interval (5 s), and they say what is wrong.
        """
        nodes = await self.nodes(2)
        stray = await ChatdProcess.start(self, "--store", self.url, "--bus", "postgresql")
        client = await WSClient.connect(self, nodes[0].base, "/ws/lobby")
        started = time.monotonic()
        code, _ = await HTTP(self, stray.base).post_json("/api/rooms/lobby/messages", {"body": "astray"})
        self.assertEqual(code, 201)
        await client.wait_for_seq(1)
        self.assertLess(time.monotonic() - started, 5 + 2)
        # A message that waited for the audit more than 3 s is reported
        # (posted once a second, some do).
        warned = False
        for i in range(12):
            await HTTP(self, stray.base).post_json("/api/rooms/lobby/messages", {"body": f"astray {i}"})
            await deferLater(reactor, 1.0)
            warned = any(b"the same --bus" in node.output for node in nodes)
            if warned:
                break
        self.assertTrue(warned)

    async def cut_bus(self, nodes: Sequence[AnyNode]) -> None:
        """
        Restart Redis (on the same port); it keeps nothing.
        """
        await self.redis.stop()
        await deferLater(reactor, 1.0)
        self.redis = await _RedisServer.start(self, self.redis.port)


