"""
A TCP proxy on loopback that a test can freeze: the connections it
carries stay open, but nothing more reaches the client (the failure of a
pub/sub connection that is up but deaf), or cut.
"""

from typing import List, Optional

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase


class _Upstream(Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: object) -> None:
        self.client.transport.loseConnection()


class _Client(Protocol):
    def __init__(self, proxy: "FreezableProxy") -> None:
        self.proxy = proxy
        self.upstream: Optional[_Upstream] = None
        self.buffer: List[bytes] = []

    def connectionMade(self) -> None:
        self.proxy.connections.append(self)
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target_port)
        d = endpoint.connect(Factory.forProtocol(lambda: _Upstream(self)))

        def connected(upstream: _Upstream) -> None:
            self.upstream = upstream
            self.transport.resumeProducing()
            if self.proxy.freeze_new:
                self.freeze()

        d.addCallbacks(connected, lambda f: self.transport.loseConnection())

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: object) -> None:
        if self in self.proxy.connections:
            self.proxy.connections.remove(self)
        if self.upstream is not None:
            self.upstream.transport.loseConnection()

    def freeze(self) -> None:
        # Stop reading the server: what it sends stays in its socket.
        if self.upstream is not None:
            self.upstream.transport.pauseProducing()

    def thaw(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resumeProducing()


class FreezableProxy:
    """
    Forwards 127.0.0.1:C{port} to 127.0.0.1:C{target_port}.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections: List[_Client] = []
        self.port = 0
        #: Freeze every connection as soon as it is made.
        self.freeze_new = False
        self._listening: Optional[IListeningPort] = None

    @classmethod
    async def start(cls, test: TestCase, target_port: int) -> "FreezableProxy":
        proxy = cls(target_port)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        proxy._listening = await endpoint.listen(Factory.forProtocol(lambda: _Client(proxy)))
        proxy.port = proxy._listening.getHost().port
        test.addCleanup(proxy.stop)
        return proxy

    def freeze(self) -> int:
        """
        Freeze every connection open now (new ones are carried as usual).

        @return: how many were frozen.
        """
        for connection in self.connections:
            connection.freeze()
        return len(self.connections)

    def thaw(self) -> None:
        """
        Carry on forwarding on every connection open now.
        """
        for connection in self.connections:
            connection.thaw()

    def cut(self) -> None:
        """
        Close every connection open now.
        """
        for connection in list(self.connections):
            connection.transport.abortConnection()

    async def stop(self) -> None:
        self.cut()
        if self._listening is not None:
            await self._listening.stopListening()
