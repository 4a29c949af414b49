"""
Memory stays flat: start chatd (twistd, SQLite store), post N messages
spread over 20 rooms over WebSocket, and report the server's resident set
size.  Run it for 2,000 and 200,000 messages and compare.

    python -m bench.memory --messages 2000 200000

Prints one JSON line per run: messages, rss_start_kib, rss_end_kib.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, List

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ProcessProtocol

ROOMS = 20


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Server(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.port: Deferred = Deferred()
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        found = re.search(rb"chatd listening on 127\.0\.0\.1:(\d+)", self.output)
        if found and not self.port.called:
            self.port.callback(int(found.group(1)))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(self.output.decode()))
        self.ended.callback(None)


class Sender(WebSocketClientProtocol):
    """
    Sends messages in windows, waiting for the echo of each window's last
    message (its seq is the acknowledgement).
    """

    def onOpen(self) -> None:
        self.waiting: Deferred | None = None
        self.target = ""
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.waiting is not None and self.target.encode() in payload:
            waiting, self.waiting = self.waiting, None
            waiting.callback(None)

    async def send_all(self, count: int, window: int, room: str) -> None:
        for start in range(0, count, window):
            end = min(count, start + window)
            for i in range(start, end):
                self.sendMessage(
                    json.dumps({"type": "message", "nick": "bench", "body": f"{room} message {i}"}).encode()
                )
            self.target = f'"{room} message {end - 1}"'
            self.waiting = Deferred()
            await self.waiting


async def run(reactor: Any, messages: int, window: int, history: int) -> dict:
    folder = tempfile.mkdtemp(prefix="chatd-mem-")
    server = Server()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    rooms = [f"r{i}" for i in range(ROOMS)]
    argv = [twistd, "-n", "--pidfile=", "chatd", "--port", "tcp:0:interface=127.0.0.1",
            "--data-dir", folder, "--history", str(history)]
    for room in rooms:
        argv += ["--room", room]
    transport = reactor.spawnProcess(server, twistd, argv, env=os.environ.copy())
    port = await server.port
    rss_start = rss_kib(transport.pid)
    senders: List[Sender] = []
    for room in rooms:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/ws/{room}")
        factory.protocol = Sender
        factory.opened = Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        senders.append(await factory.opened)
    started = time.perf_counter()
    per_room = messages // ROOMS
    await gatherResults(
        [Deferred.fromCoroutine(s.send_all(per_room, window, room)) for s, room in zip(senders, rooms, strict=True)]
    )
    seconds = time.perf_counter() - started
    rss_end = rss_kib(transport.pid)
    for sender in senders:
        sender.sendClose(1000)
    transport.signalProcess("TERM")
    await server.ended
    return {
        "bench": "memory",
        "messages": per_room * ROOMS,
        "history": history,
        "rooms": ROOMS,
        "seconds": round(seconds, 2),
        "rss_start_kib": rss_start,
        "rss_end_kib": rss_end,
    }


async def main(reactor: Any, argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, nargs="+", default=[2000, 200000])
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--history", type=int, default=500, help="chatd's --history")
    args = parser.parse_args(argv)
    for count in args.messages:
        print(json.dumps(await run(reactor, count, args.window, args.history)), flush=True)


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
