"""
The floor of the latency cell: the Autobahn peer's handshakes and
message, then each message's frame written to every connection with one
send() each, at once (the socket's own call, no buffering, no
per-connection bookkeeping).  Nothing a chat server could skip is left;
what it measures is the kernel's cost of a send() to each of 1000
loopback sockets.
"""

from autobahn_peer import Broadcast, serve


class Floor(Broadcast):
    def onMessage(self, payload, isBinary):
        data = self.prepared(payload).payloadHybi
        for client in self.factory.clients:
            sent = client.transport.getHandle().send(data)
            if sent < len(data):
                # The socket's buffer is full: the rest waits in Twisted's.
                client.transport.write(data[sent:])


if __name__ == "__main__":
    serve(Floor)
