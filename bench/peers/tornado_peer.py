"""
Tornado's WebSocketHandler, writing the message to every handler.
"""

import asyncio
import json
import sys
import time

import tornado.web
import tornado.websocket


class Broadcast(tornado.websocket.WebSocketHandler):
    clients = set()
    seq = 0

    def check_origin(self, origin):
        return True

    def open(self):
        Broadcast.clients.add(self)

    def on_close(self):
        Broadcast.clients.discard(self)

    def on_message(self, payload):
        frame = json.loads(payload)
        Broadcast.seq += 1
        out = json.dumps(
            {"type": "message", "room": "bench", "seq": Broadcast.seq,
             "nick": frame.get("nick"), "body": frame.get("body"), "ts": time.time()}
        )
        for client in Broadcast.clients:
            client.write_message(out)


async def main():
    app = tornado.web.Application([(r"/ws/bench", Broadcast)])
    server = app.listen(int(sys.argv[1]), address="127.0.0.1", backlog=4096)
    port = list(server._sockets.values())[0].getsockname()[1]
    print("READY", port, flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
