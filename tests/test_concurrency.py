"""
Try to break ordering: many senders on both transports, many receivers on
both transports, and a receiver that reconnects mid-stream.  Every receiver
must end with exactly 1..N, no gap, no duplicate, in order.
"""

from typing import List, Tuple

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.trial.unittest import TestCase

from tests._support import HTTP, WSClient, start_chatd
from tests.test_store import postgres_url

PER_SENDER = 100
WS_SENDERS = 2
HTTP_SENDERS = 2
TOTAL = PER_SENDER * (WS_SENDERS + HTTP_SENDERS)


class ManySendersManyReceiversMixin:
    """
    The exactly-once, in-order guarantee under concurrent load, on the
    store that store_args() names.
    """

    timeout = 120

    def store_args(self) -> Tuple[str, ...]:
        raise NotImplementedError

    async def test_everyone_sees_one_sequence(self) -> None:
        """
        400 messages from 2 WebSocket and 2 HTTP senders, posted all at
        once; 3 WebSocket receivers (one reconnects with ?after= midway),
        2 long-poll receivers; each ends with seq 1..400 exactly once, in
        order, with every body that was sent.
        """
        _, base = await start_chatd(self, "--room", "load", *self.store_args())
        http = HTTP(self, base)
        receivers = [await WSClient.connect(self, base, "/ws/load") for _ in range(2)]
        reconnector = await WSClient.connect(self, base, "/ws/load")

        polled: List[List[dict]] = [[], []]

        async def long_poll(into: List[dict]) -> None:
            cursor = 0
            while cursor < TOTAL:
                code, batch = await http.get_json(
                    f"/api/rooms/load/messages?after={cursor}&limit=37&timeout=30"
                )
                assert code == 200, batch
                into.extend(batch["messages"])
                if batch["messages"]:
                    cursor = batch["messages"][-1]["seq"]

        polls = [ensureDeferred(long_poll(into)) for into in polled]

        ws_senders = [await WSClient.connect(self, base, "/ws/load") for _ in range(WS_SENDERS)]
        sent = set()
        limit = DeferredSemaphore(20)

        async def http_send(n: int, i: int) -> None:
            body = f"http{n}-{i}"
            code, answer = await http.post_json(
                "/api/rooms/load/messages", {"nick": f"h{n}", "body": body}
            )
            assert code == 201, answer

        posts: List[Deferred] = []
        for i in range(PER_SENDER):
            for n, sender in enumerate(ws_senders):
                body = f"ws{n}-{i}"
                sent.add(body)
                sender.send_json({"type": "message", "nick": f"w{n}", "body": body})
            for n in range(HTTP_SENDERS):
                sent.add(f"http{n}-{i}")
                posts.append(limit.run(lambda n=n, i=i: ensureDeferred(http_send(n, i))))

        # Midway through, one receiver drops and resumes from its cursor.
        await reconnector.wait_for_seq(TOTAL // 3)
        await reconnector.close()
        before = reconnector.messages
        resumed = await WSClient.connect(self, base, f"/ws/load?after={before[-1]['seq']}")

        await DeferredList(posts, fireOnOneErrback=True, consumeErrors=True)
        await DeferredList(polls, fireOnOneErrback=True, consumeErrors=True)
        for client in [*receivers, resumed, *ws_senders]:
            await client.wait_for_seq(TOTAL)

        expected = list(range(1, TOTAL + 1))
        streams = {
            "ws0": receivers[0].messages,
            "ws1": receivers[1].messages,
            "reconnected": before + resumed.messages,
            "sender0": ws_senders[0].messages,
            "sender1": ws_senders[1].messages,
            "poll0": polled[0],
            "poll1": polled[1],
        }
        for name, stream in streams.items():
            self.assertEqual([m["seq"] for m in stream], expected, name)
            self.assertEqual({m["body"] for m in stream}, sent, name)
        # Every receiver saw the same message at each seq.
        reference = [(m["seq"], m["body"]) for m in streams["ws0"]]
        for name, stream in streams.items():
            self.assertEqual([(m["seq"], m["body"]) for m in stream], reference, name)
        # Each sender's own messages are in the order it sent them.
        for n in range(WS_SENDERS):
            mine = [m["body"] for m in streams["ws0"] if m["nick"] == f"w{n}"]
            self.assertEqual(mine, [f"ws{n}-{i}" for i in range(PER_SENDER)])


class MemoryStoreConcurrencyTests(ManySendersManyReceiversMixin, TestCase):
    """
    With the memory store (commits are synchronous).
    """

    def store_args(self) -> Tuple[str, ...]:
        return ("--store", "memory:")


class SQLiteConcurrencyTests(ManySendersManyReceiversMixin, TestCase):
    """
    With the default SQLite store (group commit in a database thread).
    """

    def store_args(self) -> Tuple[str, ...]:
        return ()


class PostgresConcurrencyTests(ManySendersManyReceiversMixin, TestCase):
    """
    With PostgreSQL.
    """

    def store_args(self) -> Tuple[str, ...]:
        return ("--store", postgres_url(self))
