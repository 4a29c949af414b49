"""
Store throughput: messages per second committed by one process, through
the chat core (validation, seq assignment, group commit, delivery), for
each store.

    python -m bench.store [--messages 20000] [--window 2000] [--postgres URL]

Prints one JSON line per store: messages, seconds, messages_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from typing import Any, List

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from chatd.core import ChatCore
from chatd.store.memory import MemoryStore
from chatd.store.postgres import PostgresStore
from chatd.store.sqlite import SQLiteStore


async def measure(reactor: Any, store: Any, name: str, messages: int, window: int, rooms: int) -> dict:
    await store.open()
    core = ChatCore(store, reactor, history=500)
    await core.start([f"r{i}" for i in range(rooms)])
    started = time.perf_counter()
    sent = 0
    while sent < messages:
        batch: List[Deferred] = []
        for _ in range(min(window, messages - sent)):
            batch.append(core.post(f"r{sent % rooms}", "bench", f"message {sent}", f"c{sent}"))
            sent += 1
        await gatherResults(batch)
    seconds = time.perf_counter() - started
    await store.close()
    return {
        "bench": "store",
        "store": name,
        "messages": messages,
        "window": window,
        "rooms": rooms,
        "seconds": round(seconds, 3),
        "messages_per_s": round(messages / seconds),
    }


async def main(reactor: Any, argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=2000, help="posts in flight at once")
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--stores", default="memory,sqlite,postgresql")
    args = parser.parse_args(argv)
    for name in args.stores.split(","):
        schema = None
        if name == "memory":
            store: Any = MemoryStore(retain=500)
        elif name == "sqlite":
            folder = tempfile.mkdtemp(prefix="chatd-bench-")
            store = SQLiteStore(os.path.join(folder, "bench.sqlite3"), reactor=reactor)
        else:
            schema = f"chatd_bench_{uuid.uuid4().hex[:8]}"
            store = PostgresStore(f"{args.postgres}?schema={schema}", reactor=reactor)
        try:
            print(json.dumps(await measure(reactor, store, name, args.messages, args.window, args.rooms)), flush=True)
        finally:
            if schema is not None:
                import psycopg

                with psycopg.connect(args.postgres, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    import sys

    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
