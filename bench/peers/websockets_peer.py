"""
The websockets library (asyncio), broadcasting with websockets.broadcast.
"""

import asyncio
import json
import sys
import time

from websockets.asyncio.server import broadcast, serve

CLIENTS = set()
SEQ = 0


async def handler(websocket):
    global SEQ
    CLIENTS.add(websocket)
    try:
        async for payload in websocket:
            frame = json.loads(payload)
            SEQ += 1
            broadcast(CLIENTS, json.dumps(
                {"type": "message", "room": "bench", "seq": SEQ,
                 "nick": frame.get("nick"), "body": frame.get("body"), "ts": time.time()}
            ))
    finally:
        CLIENTS.discard(websocket)


async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None, backlog=4096) as server:
        print("READY", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()


asyncio.run(main())
