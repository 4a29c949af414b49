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

from chatd._send import FrameWriter, Ticks, direct_writes_available


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

    def test_other_transports(self) -> None:
        """
        On anything but plain TCP (here a test transport) nothing is sent
        at once: write() goes to the transport's write, and queued frames
        are written together, in order, at the next iteration, or at once
        before anything written after them.
        """
        clock = Clock()
        transport = StringTransport()
        writer = FrameWriter(transport, Ticks(clock))
        writer.queue(b"1")
        writer.queue(b"2")
        self.assertEqual(transport.value(), b"")
        clock.advance(0)
        self.assertEqual(transport.value(), b"12")
        writer.queue(b"3")
        writer.write(b"4")
        self.assertEqual(transport.value(), b"1234")
        clock.advance(0)
        self.assertEqual(transport.value(), b"1234")

    def test_without_ticks(self) -> None:
        """
        Without a clock both write() and queue() are the transport's write.
        """
        transport = StringTransport()
        writer = FrameWriter(transport, None)
        writer.queue(b"a")
        writer.write(b"b")
        self.assertEqual(transport.value(), b"ab")


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
        Many payloads through the writer, queued and written, over many
        reactor iterations, to a client that reads late: every byte
        arrives, in order, whether it was sent at once, held for the next
        iteration or queued by the transport.
        """
        transport, reader = await self.connect()
        writer = FrameWriter(transport, Ticks(reactor))
        sent: List[bytes] = []
        for burst in range(60):
            for i in range(20):
                payload = b"%06d-%06d|" % (burst, i) * 300
                sent.append(payload)
                # Mostly fan-out frames, now and then another frame.
                (writer.write if i % 7 == 3 else writer.queue)(payload)
            await deferLater(reactor, 0, lambda: None)
        reader.transport.resumeProducing()
        expected = b"".join(sent)
        for _ in range(2000):
            if len(reader.data) >= len(expected):
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(bytes(reader.data), expected)
