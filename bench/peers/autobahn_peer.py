"""
Autobahn on Twisted, broadcasting with prepareMessage/sendPreparedMessage:
the ceiling of the library chatd sits on.
"""

import json
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor


class Broadcast(WebSocketServerProtocol):
    def onOpen(self):
        self.factory.clients.add(self)

    def onClose(self, wasClean, code, reason):
        self.factory.clients.discard(self)

    def prepared(self, payload):
        """
        The message for the room: the client's JSON with a seq, framed once.
        """
        frame = json.loads(payload)
        self.factory.seq += 1
        out = json.dumps(
            {"type": "message", "room": "bench", "seq": self.factory.seq,
             "nick": frame.get("nick"), "body": frame.get("body"), "ts": reactor.seconds()}
        ).encode()
        return self.factory.prepareMessage(out)

    def onMessage(self, payload, isBinary):
        prepared = self.prepared(payload)
        for client in self.factory.clients:
            client.sendPreparedMessage(prepared)


def serve(protocol):
    factory = WebSocketServerFactory()
    factory.protocol = protocol
    factory.clients = set()
    factory.seq = 0
    port = reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1", backlog=4096)
    print("READY", port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    serve(Broadcast)
