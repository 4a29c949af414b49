"""
chatd behind a real HAProxy, configured as C{docs/deploy.md} says
(L{tests._cluster}): the PROXY protocol, health checks and draining,
long-poll and WebSocket through the balancer; and the parts of it that
need no balancer (the PROXY seam in L{chatd._http}, C{--drain}).
"""

from __future__ import annotations

import os
import socket
from typing import Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd.limits import Connections, Limits
from chatd.tap import Options
from tests._cluster import DEPLOY_MD, HAPROXY, Cluster, doc_block, global_section, option_value
from tests._support import HTTP, ChatdProcess, WSClient, make_web


def _header(client: str) -> bytes:
    """
    A PROXY v2 header (the binary signature, then PROXY over TCP/IPv4)
    saying C{client}, port 4321, connected to 127.0.0.1:80.
    """
    return (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11\x00\x0c"
        + socket.inet_aton(client)
        + socket.inet_aton("127.0.0.1")
        + (4321).to_bytes(2, "big")
        + (80).to_bytes(2, "big")
    )


class _Raw(Protocol):
    """
    A client that sends bytes and collects the answer until the server
    closes.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.received = b""
        self.answered: Deferred = Deferred()
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.answered.called and b"\r\n\r\n" in self.received:
            self.answered.callback(self.received)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.answered.called:
            self.answered.callback(self.received)
        self.done.callback(self.received)


async def _raw(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    protocol = _Raw(data)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    await endpoint.connect(Factory.forProtocol(lambda: protocol))
    return bytes(await protocol.done)


class ProxySeamTests(TestCase):
    """
    L{chatd._http.ChatChannel} on Twisted's C{haproxy:} endpoint (a real
    port, PROXY v2 headers written by hand): its place among the server's
    connections is taken under the PROXY header's address, not the
    connecting peer's.  Twisted's wrapper makes the connection before it
    has read the header; these tests fail if chatd takes the place then.
    """

    timeout = 30

    async def listen(self) -> Tuple[Limits, int]:
        limits = Limits(Clock(), max_connections=10, max_connections_per_ip=1)
        _, web, _ = make_web()
        site = web.site(10, 5, connections=Connections(limits), proxied=True)
        endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(site)
        self.addCleanup(port.stopListening)
        return limits, port.getHost().port

    async def test_place_taken_under_proxy_address(self) -> None:
        """
        With one connection allowed per IP, two connections from one
        peer (127.0.0.1, the balancer) for two clients (192.0.2.7 and
        192.0.2.8) are both served, each counted under its client.
        """
        limits, port = await self.listen()
        holders = [_Raw(_header(client) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") for client in
                   ("192.0.2.7", "192.0.2.8")]
        for holder in holders:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda h=holder: h))
        for holder in holders:
            await holder.answered
        for holder in holders:
            self.assertTrue(holder.received.startswith(b"HTTP/1.1 200 "), holder.received)
        self.assertEqual(limits.connections_from("192.0.2.7"), 1)
        self.assertEqual(limits.connections_from("192.0.2.8"), 1)
        self.assertEqual(limits.connections_from("127.0.0.1"), 0)
        for holder in holders:
            holder.transport.loseConnection()
            await holder.done

    async def test_refused_under_proxy_address(self) -> None:
        """
        Over the per-IP cap, the refusal is for the client's address and
        is logged (told to the site's C{refused}) with it.
        """
        limits, port = await self.listen()
        holder = _Raw(_header("192.0.2.7") + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: holder))
        await holder.answered
        with capturedLogs() as events:
            refused = await _raw(port, _header("192.0.2.7") + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused)
        self.assertIn(b"too_many_connections", refused)
        logged = [formatEvent(e) for e in events]
        self.assertIn("Refused a connection from 192.0.2.7: too_many_connections", logged)
        holder.transport.loseConnection()
        await holder.done


class DrainOptionTests(SynchronousTestCase):
    """
    C{--drain SECONDS}.
    """

    def test_drain_option(self) -> None:
        """
        C{--drain} takes seconds (a float), 0 by default; a negative or
        too long one is refused with a sentence saying what to give.
        """
        options = Options()
        options.parseOptions(["--store", "memory:"])
        self.assertEqual(options["drain"], 0.0)
        options = Options()
        options.parseOptions(["--store", "memory:", "--drain", "2.5"])
        self.assertEqual(options["drain"], 2.5)
        for bad in ["-1", "601"]:
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--store", "memory:", "--drain", bad])
            self.assertIn("--drain", str(caught.exception))

    def test_docs_drain_covers_health_checks(self) -> None:
        """
        The drain the docs' node command gives is at least HAProxy's
        C{inter} times C{fall} in the docs' configuration, plus a second
        for the check in flight.
        """
        [config] = doc_block("haproxy")
        words = config.split()
        inter = float(words[words.index("inter") + 1].rstrip("s"))
        fall = int(words[words.index("fall") + 1])
        [node] = doc_block("node")
        drain = option_value(node.split(), "--drain")
        assert drain is not None
        self.assertGreaterEqual(float(drain), inter * fall + 1)


class DrainProcessTests(TestCase):
    """
    SIGTERM with C{--drain}, on a twistd process of its own (no balancer).
    """

    timeout = 60

    async def test_drain_then_stop(self) -> None:
        """
        On SIGTERM, /readyz turns 503 at once while /healthz and the API
        still answer; a long-poll already waiting is answered at once (an
        empty batch), and a new one too; a new WebSocket is still
        accepted; at the drain's end WebSockets close with 1001 and the
        process exits 0.
        """
        process = await ChatdProcess.start(self, "--store", "memory:", "--drain", "3")
        http = HTTP(self, process.base)
        ws = await WSClient.connect(self, process.base, "/ws/lobby")
        waiting = Deferred.fromCoroutine(http.get_json("/api/rooms/lobby/messages?after=0&timeout=30"))
        # The long-poll waits (a ping barrier through another connection
        # proves the server has had time to take it up).
        await ws.sync()
        self.assertFalse(waiting.called)
        process.transport.signalProcess("TERM")
        for _ in range(100):
            code, body = await http.get_json("/readyz")
            if code == 503:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((code, body["error"]), (503, "not_ready"))
        code, body = await waiting
        self.assertEqual((code, body["messages"]), (200, []))
        self.assertEqual((await http.get_json("/healthz"))[0], 200)
        code, body = await http.get_json("/api/rooms/lobby/messages?after=0&timeout=30")
        self.assertEqual((code, body["messages"]), (200, []))
        late = await WSClient.connect(self, process.base, "/ws/lobby")
        self.assertFalse(ws.closed.called)
        self.assertEqual(await late.closed, 1001)
        self.assertEqual(await ws.closed, 1001)
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"Draining for 3 s", process.output)

    async def test_second_sigterm_ends_drain(self) -> None:
        """
        A second SIGTERM during the drain stops the node at once.
        """
        process = await ChatdProcess.start(self, "--store", "memory:", "--drain", "600")
        http = HTTP(self, process.base)
        process.transport.signalProcess("TERM")
        for _ in range(100):
            if (await http.get_json("/readyz"))[0] == 503:
                break
            await deferLater(reactor, 0.05, lambda: None)
        process.transport.signalProcess("TERM")
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"ending the drain now", process.output)


class HAProxyTests(TestCase):
    """
    Nodes behind a real HAProxy, with the docs' configuration.
    """

    timeout = 90

    async def test_real_client_address(self) -> None:
        """
        Through HAProxy with send-proxy-v2, a node counts connections by
        the client's own address: with one connection allowed per IP, a
        client at 127.0.0.2 holding a long-poll does not stop one at
        127.0.0.3, and a second one from 127.0.0.2 is refused, logged with
        127.0.0.2 (never HAProxy's 127.0.0.1).  The node's start-up said
        nothing of DNS rebinding (it listens on loopback).
        """
        cluster = await Cluster.start(self, nodes=1, args=["--max-connections-per-ip", "1"])
        node = cluster.nodes[0]
        port = int(cluster.haproxy_base.rsplit(":", 1)[1])
        host = b"Host: 127.0.0.1:%d\r\n" % (port,)
        poll = b"GET /api/rooms/lobby/messages?after=0&timeout=20 HTTP/1.1\r\n" + host + b"\r\n"
        holder = _Raw(poll)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
        await endpoint.connect(Factory.forProtocol(lambda: holder))
        ws = await WSClient.connect(self, cluster.haproxy_base, "/ws/lobby", source="127.0.0.3")
        await ws.sync()
        refused = await _raw(port, b"GET /healthz HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n", "127.0.0.2")
        self.assertIn(b" 503 ", refused.split(b"\r\n", 1)[0])
        self.assertIn(b"too_many_connections", refused)
        output = node.output.decode()
        self.assertIn("Refused a connection from 127.0.0.2: too_many_connections", output)
        self.assertNotIn("from 127.0.0.1", output)
        self.assertIn("WebSocket open: 127.0.0.3 in lobby", output)
        self.assertNotIn("DNS rebinding", output)
        await ws.close()
        # The long-poll held its place all along: still waiting.
        self.assertFalse(holder.answered.called)
        holder.transport.loseConnection()
        await holder.done

    async def test_longpoll_and_websocket_through_haproxy(self) -> None:
        """
        Through the balancer: a WebSocket opened with the page's Origin
        (the Host check passes: the Host header arrives unchanged), a
        long-poll and an event stream all receive a message posted through
        it.  (One node:
        delivery across nodes is the bus's, tested with it.)
        """
        from tests.test_sse import EventClient

        cluster = await Cluster.start(self, nodes=1)
        base = cluster.haproxy_base
        ws = await WSClient.connect(self, base, "/ws/lobby", origin=base)
        http = HTTP(self, base)
        waiting = Deferred.fromCoroutine(http.get_json("/api/rooms/lobby/messages?after=0&timeout=20"))
        stream = await EventClient.open(self, base + "/api/rooms/lobby/events?after=0")
        await ws.sync()
        code, posted = await http.post_json(
            "/api/rooms/lobby/messages", {"nick": "a", "body": "hello", "client_id": "c1"}
        )
        self.assertEqual(code, 201, posted)
        await ws.wait_for_seq(1)
        self.assertEqual([m["body"] for m in ws.messages], ["hello"])
        code, body = await waiting
        self.assertEqual((code, [m["body"] for m in body["messages"]]), (200, ["hello"]))
        # The event stream too, event by event (HAProxy buffers nothing).
        await stream.wait_for_ids(1)
        self.assertEqual(stream.events[0]["json"]["body"], "hello")
        # Another site's page is refused, through the balancer too.
        with self.assertRaises(ConnectionError):
            await WSClient.connect(self, base, "/ws/lobby", origin="http://evil.example")

    async def test_draining_node_taken_out(self) -> None:
        """
        SIGTERM to a node started with the docs' --drain: its /readyz is
        503 at once, HAProxy's checks take it out, new requests through
        the balancer go to the other node only, and its WebSockets close
        with 1001 at the drain's end (not before HAProxy took it out).
        """
        cluster = await Cluster.start(self, nodes=2, args=["--access-log", "on"])
        draining, other = cluster.nodes
        ws = await WSClient.connect(self, draining.base, "/ws/lobby", origin=draining.base)
        draining.signal("TERM")
        direct = HTTP(self, draining.base)
        code, body = await direct.get_json("/readyz")
        self.assertEqual((code, body["error"]), (503, "not_ready"))
        await cluster.wait_for_state(0, "DOWN")
        self.assertFalse(ws.closed.called, "closed before the balancer took the node out")
        http = HTTP(self, cluster.haproxy_base)
        for i in range(6):
            code, _, _ = await http.request("GET", f"/api/rooms?probe=after-drain-{i}")
            self.assertEqual(code, 200)
        self.assertNotIn(b"probe=after-drain", draining.output)
        self.assertEqual(other.output.count(b"probe=after-drain"), 6)
        self.assertEqual(await ws.closed, 1001)
        self.assertEqual(await draining.process.ended, 0)


class DeployDocTests(TestCase):
    """
    The configurations docs/deploy.md shows are valid as they stand.
    """

    timeout = 60

    async def test_haproxy_config_valid(self) -> None:
        """
        HAProxy accepts the docs' block as shown (C{haproxy -c}), after a
        C{global} section like Debian's, without warnings.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(global_section("/run/haproxy/admin.sock") + doc_block("haproxy")[0])
        out, err, code = await getProcessOutputAndValue(HAPROXY, ["-c", "-f", path], env=os.environ)
        self.assertEqual(code, 0, (out + err).decode())
        self.assertNotIn(b"WARNING", out + err)

    async def test_nginx_configs_valid(self) -> None:
        """
        nginx accepts each of the docs' nginx blocks (C{nginx -t}), with
        the addresses on loopback.
        """
        blocks = doc_block("nginx")
        self.assertEqual(len(blocks), 2)
        for block in blocks:
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            main = os.path.join(folder, "nginx.conf")
            with open(main, "w") as f:
                f.write(
                    f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                    "events {}\n" + block.replace("listen 80;", "listen 127.0.0.1:8080;")
                )
            out, err, code = await getProcessOutputAndValue(
                "/usr/sbin/nginx", ["-t", "-c", main, "-p", folder, "-g", "daemon off;"], env=os.environ
            )
            self.assertEqual(code, 0, (out + err).decode())

    def test_docs_name_the_placeholders(self) -> None:
        """
        The blocks tests/_cluster.py rewrites keep the placeholders it
        replaces.
        """
        text = DEPLOY_MD.read_text(encoding="utf-8")
        for placeholder in ["bind *:80", "server node1 10.0.0.11:8081", "haproxy:tcp:8081:interface=10.0.0.11"]:
            self.assertIn(placeholder, text)
