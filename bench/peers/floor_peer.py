"""
The floor of the latency cell: Autobahn for the handshake and the
sender's frames, then each message's JSON framed once and written to
every connection with one send() each, at once (the socket's own call,
no buffering, no per-connection bookkeeping).  Nothing a chat server
could skip is left; what it measures is the kernel's cost of a send()
to each of 1000 loopback sockets.
"""

import json
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Floor(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.clients.append(self)

    def onClose(self, wasClean, code, reason):
        if self in self.factory.clients:
            self.factory.clients.remove(self)

    def onMessage(self, payload, isBinary):
        frame = json.loads(payload)
        self.factory.seq += 1
        out = json.dumps(
            {"type": "message", "room": "bench", "seq": self.factory.seq,
             "nick": frame.get("nick"), "body": frame.get("body"), "ts": reactor.seconds()}
        ).encode()
        data = self.factory.prepareMessage(out).payloadHybi
        for client in self.factory.clients:
            sent = client.transport.getHandle().send(data)
            if sent < len(data):
                # The socket's buffer is full: the rest waits in Twisted's.
                client.transport.write(data[sent:])


factory = WebSocketServerFactory()
factory.protocol = Floor
factory.clients = []
factory.seq = 0
port = reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1", backlog=4096)
print("READY", port.getHost().port, flush=True)
reactor.run()
