"""
python-socketio on aiohttp: the 'message' event, emitted to everyone.
"""

import json
import sys
import time

import socketio
from aiohttp import web

sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*")
app = web.Application()
sio.attach(app)
state = {"seq": 0}


@sio.on("message")
async def message(sid, data):
    frame = json.loads(data) if isinstance(data, str) else data
    state["seq"] += 1
    await sio.emit("message", json.dumps(
        {"type": "message", "room": "bench", "seq": state["seq"],
         "nick": frame.get("nick"), "body": frame.get("body"), "ts": time.time()}
    ))


async def ready(app):
    print("READY", sys.argv[1], flush=True)


app.on_startup.append(ready)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, backlog=4096)
