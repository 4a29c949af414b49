"""
Fill a room of an SQLite store with N messages (for the GET-cost bench).

    python -m bench.fill PATH ROOM N      -> prints the room's last seq
"""

import sys

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from chatd.store.sqlite import SQLiteStore


async def fill(reactor, path: str, room: str, count: int) -> None:
    store = SQLiteStore(path, reactor=reactor)
    await store.open()
    await store.create_room(room, 0)
    sent = 0
    while sent < count:
        batch = [store.append(room, "fill", f"message {i}", i, None) for i in range(sent, min(count, sent + 2000))]
        sent += len(batch)
        await gatherResults(batch)
    rooms = dict(await store.load_rooms())
    await store.close()
    print(rooms[room])


if __name__ == "__main__":
    path, room, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    task.react(lambda reactor: Deferred.fromCoroutine(fill(reactor, path, room, count)))
