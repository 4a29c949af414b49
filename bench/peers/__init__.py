"""
Peer servers for the benchmark: the same job as chatd's WebSocket fan-out
(JSON broadcast to the room, sender included, with a seq), each written
with its library's documented idiom.  Each prints "READY <port>" when it
listens on 127.0.0.1.
"""
