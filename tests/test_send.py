"""
The one seam where chatd writes past Twisted's transport buffer
(L{chatd._send}): these tests pin what it relies on in Twisted's TCP
transport, so that a Twisted that changes it fails here, loudly, instead
of chatd going slower or sending bytes out of order.
"""

from __future__ import annotations

from typing import Any, List

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from chatd._send import DirectWriter, Ticks, direct_writes_available, writer_for


class LayoutTests(SynchronousTestCase):
    """
    What the seam reads of twisted.internet.tcp.Connection.
    """

    def test_layout_is_known(self) -> None:
        """
        This Twisted's TCP transport has the buffer attributes and the
        socket accessor the direct writer uses.
        """
        self.assertTrue(direct_writes_available())
        self.assertIsInstance(tcp.Connection.dataBuffer, bytes)
        self.assertTrue(callable(tcp.Connection.getHandle))

    def test_other_transports_write_plainly(self) -> None:
        """
        Anything but plain TCP (here a test transport) gets its own write;
        so does TCP without ticks.
        """
        transport = StringTransport()
        self.assertEqual(writer_for(transport, Ticks(Clock())), transport.write)
        self.assertEqual(writer_for(transport, None), transport.write)


class _Server(Protocol):
    def connectionMade(self) -> None:
        self.factory.connected.callback(self)  # type: ignore[attr-defined]


class _Reader(Protocol):
    """
    A client that reads only when told to.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class RealTransportTests(TestCase):
    """
    The direct writer on a real loopback TCP connection.
    """

    timeout = 30

    async def connect(self) -> tuple:
        factory = Factory.forProtocol(_Server)
        factory.connected = Deferred()  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        reader = _Reader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reader)
        server = await factory.connected  # type: ignore[attr-defined]
        self.addCleanup(self.close, server, reader)
        return server.transport, reader

    async def close(self, server: Protocol, reader: _Reader) -> None:
        reader.transport.loseConnection()
        server.transport.loseConnection()
        await reader.lost

    async def test_unsent_bytes_are_where_the_writer_looks(self) -> None:
        """
        When the socket cannot take more, what Twisted keeps unsent shows
        in dataBuffer or _tempDataLen (so the writer knows not to send
        past it); once the client has read it all, both are empty.
        """
        transport, reader = await self.connect()
        self.assertIsInstance(transport, tcp.Connection)
        self.assertIsInstance(transport._tempDataLen, int)
        self.assertFalse(transport.dataBuffer or transport._tempDataLen)
        chunk = b"x" * 65536
        for _ in range(400):  # far more than loopback's socket buffers
            transport.write(chunk)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(transport.dataBuffer or transport._tempDataLen)
        reader.transport.resumeProducing()
        for _ in range(2000):
            if len(reader.data) == 400 * 65536:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(reader.data), 400 * 65536)
        self.assertFalse(transport.dataBuffer or transport._tempDataLen)

    async def test_order_is_kept(self) -> None:
        """
        Many payloads through the direct writer, over many reactor
        iterations, to a client that reads late: every byte arrives, in
        order, whether it was sent at once or queued by the transport.
        """
        transport, reader = await self.connect()
        write = writer_for(transport, Ticks(reactor))
        self.assertIsInstance(write.__self__, DirectWriter)  # type: ignore[attr-defined]
        sent: List[bytes] = []
        for burst in range(60):
            for i in range(20):
                payload = b"%06d-%06d|" % (burst, i) * 300
                sent.append(payload)
                write(payload)
            await deferLater(reactor, 0, lambda: None)
        reader.transport.resumeProducing()
        expected = b"".join(sent)
        for _ in range(2000):
            if len(reader.data) >= len(expected):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(bytes(reader.data), expected)
