"""
The commit rate one PostgreSQL sustains with chatd's NOTIFY against
without it.

    python -m bench.notify [--writers 8] [--window 1] [--seconds 5]
                           [--modes off,on] [--postgres URL]

W writers append small messages for S seconds, each through a
L{chatd.store.postgres.PostgresStore} of its own, as W nodes would (each
store has one writer connection and commits by group commit), each with K
appends in flight, to a room of its own (so the writers share nothing but
the database: no room row lock is contended).  With K = 1 every
transaction commits one message: many concurrent small commits, the case
in which NOTIFY's queue lock, taken at every commit that notified, costs
most.  C{on} makes each store announce its commits from inside the append
transaction as C{--bus postgresql} does (L{PostgresStore.notify_commits},
with the bus's own payloads), and one listener process LISTENs on the
channel as a node would, and counts the messages announced: every
committed message must be announced (C{unannounced} is 0).  Every mode
runs on a fresh schema, dropped afterwards.

Prints one JSON line per mode: messages, seconds, commits_per_s (= messages
per second when K = 1), the writing process's CPU seconds, and for C{on}
the announced count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import uuid
from typing import Any, Dict, List

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from chatd.bus._remote import encode
from chatd.bus.postgres import MAX_PAYLOAD
from chatd.store.postgres import PostgresStore


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sleep(reactor: Any, seconds: float) -> Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


async def measure(
    reactor: Any, postgres: str, notify: bool, writers: int, window: int, seconds: float,
    listener_cpu: List[str],
) -> Dict[str, Any]:
    schema = f"chatd_bench_{uuid.uuid4().hex[:8]}"
    url = f"{postgres}?schema={schema}"
    stores = [PostgresStore(url, reactor=reactor) for _ in range(writers)]
    listener = None
    try:
        for store in stores:
            # One at a time: the first creates the schema.
            await store.open()
        for i in range(writers):
            await stores[0].create_room(f"w{i}")
        if notify:
            channel = stores[0].notify_channel
            for store in stores:
                # As chatd.tap.make_bus does for --bus postgresql.
                store.notify_commits(
                    lambda room, last_seq, messages: encode(room, last_seq, messages, MAX_PAYLOAD)
                )
            listener = subprocess.Popen(
                listener_cpu + [sys.executable, "-m", "bench.notify", "--listen", stores[0].conninfo, channel],
                stdout=subprocess.PIPE,
            )
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != b"READY":
                raise RuntimeError("the listener did not start")
        appended = 0
        stopping = False

        async def writer(store: PostgresStore, room: str) -> None:
            nonlocal appended
            n = 0
            while not stopping:
                batch = []
                for _ in range(window):
                    batch.append(store.append(room, "bench", f"n{n}", int(time.time() * 1000), None))
                    n += 1
                await gatherResults(batch)
                appended += window

        running = [Deferred.fromCoroutine(writer(store, f"w{i}")) for i, store in enumerate(stores)]
        await _sleep(reactor, 1.0)  # connections warm, batches flowing
        start_count, start_cpu, started = appended, _cpu(), time.perf_counter()
        await _sleep(reactor, seconds)
        count, cpu, elapsed = appended - start_count, _cpu() - start_cpu, time.perf_counter() - started
        stopping = True
        await gatherResults(running)
        row: Dict[str, Any] = {
            "bench": "notify",
            "notify": "on" if notify else "off",
            "writers": writers,
            "window": window,
            "messages": count,
            "seconds": round(elapsed, 3),
            "commits_per_s": round(count / elapsed),
            "writer_cpu_s": round(cpu, 3),
        }
        if listener is not None:
            assert listener.stdout is not None
            total = appended
            await stores[0].announce(b"stop")
            heard = json.loads(listener.stdout.readline())
            listener.wait(30)
            listener = None
            row["announced"] = heard["messages"]
            row["unannounced"] = total - heard["messages"]
        return row
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        for store in stores:
            await store.close()
        import psycopg

        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def listen(conninfo: str, channel: str) -> None:
    """
    LISTEN on C{channel} as a node would, until a C{stop} payload: print
    how many messages the payloads announced.
    """
    import psycopg
    from psycopg import sql

    messages = hints = 0
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print("READY", flush=True)
        for note in conn.notifies():
            if note.payload == "stop":
                break
            data = json.loads(note.payload)
            messages += len(data.get("m", ()))
            hints += "m" not in data
    print(json.dumps({"messages": messages, "hints_without_messages": hints}), flush=True)


async def main(reactor: Any, argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--window", type=int, default=1, help="appends in flight per writer")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--modes", default="off,on")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--listener-cpu", default="", help="a CPU to pin the listener to")
    args = parser.parse_args(argv)
    pin = ["taskset", "-c", args.listener_cpu] if args.listener_cpu else []
    for mode in args.modes.split(","):
        row = await measure(reactor, args.postgres, mode == "on", args.writers, args.window, args.seconds, pin)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--listen"]:
        listen(sys.argv[2], sys.argv[3])
    else:
        task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
