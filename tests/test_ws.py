"""
Unit tests for L{chatd.ws} that need no socket.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from chatd.core import ChatCore
from chatd.store.memory import MemoryStore
from chatd.ws import ChatWebSocketFactory, ChatWebSocketProtocol, frame_limit
from tests._support import quiet_factory


class FactoryTests(SynchronousTestCase):
    """
    The factory frames each message once for all recipients.
    """

    def setUp(self) -> None:
        self.core = ChatCore(MemoryStore(), Clock())
        self.core.start()
        self.factory = ChatWebSocketFactory(self.core)

    def test_framed_once_per_message(self) -> None:
        """
        frame() returns the same WebSocket frame for the same message, and
        a new one for the next message; the frame is an unmasked text frame
        carrying the message's JSON.
        """
        first = self.successResultOf(self.core.post("lobby", "a", "one"))
        second = self.successResultOf(self.core.post("lobby", "a", "two"))
        framed = self.factory.frame(first)
        self.assertIs(self.factory.frame(first), framed)
        self.assertEqual(framed[0], 0x81)  # FIN + text
        self.assertEqual(framed[2:], first.json)
        self.assertEqual(framed[1], len(first.json))
        self.assertIsNot(self.factory.frame(second), framed)

    def test_limits(self) -> None:
        """
        Frames and messages are capped, the HTML status page (with its
        open redirect) is off, and failures send a close frame.
        """
        options = self.factory
        self.assertEqual(options.maxFramePayloadSize, frame_limit(4096))
        self.assertEqual(options.maxMessagePayloadSize, frame_limit(4096))
        self.assertEqual(frame_limit(4096), 64 * 1024)
        self.assertEqual(options.autoPingInterval, 30.0)
        self.assertFalse(options.webStatus)
        self.assertFalse(options.failByDrop)


class _NoProducer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


HANDSHAKE = (
    b"GET /ws/lobby?after=0 HTTP/1.1\r\nHost: chatd.test\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class SendTests(SynchronousTestCase):
    """
    Every byte goes out through Autobahn's sendData, and nothing is written
    once the connection is closing or closed.
    """

    def open(self) -> tuple:
        core = ChatCore(MemoryStore(), Clock())
        core.start()
        self.clock = Clock()
        factory = quiet_factory(core, self.clock)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        self.addCleanup(lambda: protocol.state == protocol.STATE_CLOSED or protocol.connectionLost(Failure(ConnectionDone())))
        # The HTTP channel that carried the handshake is the producer.
        transport.registerProducer(_NoProducer(), True)
        protocol.makeConnection(transport)
        protocol.dataReceived(HANDSHAKE)
        self.assertIn(b"101 Switching Protocols", transport.value())
        transport.clear()
        return core, protocol, transport

    def test_messages_then_close(self) -> None:
        """
        Messages are written as prepared frames while open; after the close
        frame, neither messages nor other frames are written.
        """
        core, protocol, transport = self.open()
        first = self.successResultOf(core.post("lobby", "a", "one"))
        self.clock.advance(0)  # the frames of an iteration go out together
        self.assertEqual(transport.value(), protocol.factory.frame(first))
        transport.clear()
        second = self.successResultOf(core.post("lobby", "a", "two"))
        third = self.successResultOf(core.post("lobby", "a", "three"))
        # Held for this iteration's write, they still precede the close frame.
        protocol.close_with(1000, "bye")
        frames = protocol.factory.frame(second) + protocol.factory.frame(third)
        self.assertEqual(transport.value()[: len(frames)], frames)
        close_frame = transport.value()[len(frames) :]
        transport.clear()
        transport.write(close_frame)
        self.assertEqual(close_frame[0], 0x88)  # FIN + close
        core.post("lobby", "a", "two")
        protocol._send_frame({"type": "pong"})
        self.assertEqual(transport.value(), close_frame)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(protocol.state, protocol.STATE_CLOSED)
        protocol.sendData(b"late")
        self.assertEqual(transport.value(), close_frame)

    def test_pong_goes_through_send_data(self) -> None:
        """
        A pong (any frame Autobahn builds) is written by the same writer.
        """
        core, protocol, transport = self.open()
        written: list = []

        class Recording:
            def write(self, data: bytes) -> None:
                written.append(("write", data))

            def queue(self, frame: bytes) -> None:
                written.append(("queue", frame))

        protocol._writer = Recording()
        protocol.onMessage(b'{"type": "ping", "id": 7}', False)
        message = self.successResultOf(core.post("lobby", "a", "one"))
        self.assertEqual(len(written), 2)
        self.assertEqual(written[0][0], "write")
        self.assertIn(b'{"type":"pong","id":7}', written[0][1])
        self.assertEqual(written[1], ("queue", protocol.factory.frame(message)))


class ConfiguredTests(SynchronousTestCase):
    """
    The factory's protocol options live on its protocol class
    (L{chatd.ws.configured}), not on each connection: what that relies on
    in Autobahn, and that every connection still sees every option.
    """

    def open(self, factory: ChatWebSocketFactory) -> ChatWebSocketProtocol:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        transport.registerProducer(_NoProducer(), True)
        self.addCleanup(lambda: protocol.state == protocol.STATE_CLOSED or protocol.connectionLost(Failure(ConnectionDone())))
        protocol.makeConnection(transport)
        protocol.dataReceived(HANDSHAKE)
        self.assertIn(b"101 Switching Protocols", transport.value())
        return protocol

    def factory(self) -> ChatWebSocketFactory:
        core = ChatCore(MemoryStore(), Clock())
        core.start()
        return quiet_factory(core, Clock())

    def test_autobahn_copies_config_attrs_only(self) -> None:
        """
        What the seam relies on: Autobahn copies exactly the names in a
        protocol's C{CONFIG_ATTRS} from its factory onto a connection that
        lacks them (a plain Autobahn protocol gets every one of them in its
        own dict), and each is an attribute of the factory.
        """
        factory = WebSocketServerFactory()
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        factory.protocol = WebSocketServerProtocol
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertIn(name, vars(protocol))
            self.assertEqual(getattr(protocol, name), getattr(factory, name))

    def test_options_on_the_class(self) -> None:
        """
        A chatd connection has every option of its factory, read from its
        class: none is copied into its own dict (but C{trackTimings}, which
        Autobahn may set itself), and a function stays a function.
        """
        factory = self.factory()
        protocol = self.open(factory)
        self.assertIsInstance(protocol, ChatWebSocketProtocol)
        self.assertEqual(type(protocol).CONFIG_ATTRS, ())
        for name in WebSocketServerProtocol.CONFIG_ATTRS:
            self.assertEqual(getattr(protocol, name), getattr(factory, name), name)
        copied = set(vars(protocol)) & set(WebSocketServerProtocol.CONFIG_ATTRS)
        self.assertLessEqual(copied, {"trackTimings"})
        self.assertIs(protocol.perMessageCompressionAccept, factory.perMessageCompressionAccept)

    def test_options_changed_later(self) -> None:
        """
        Options set after the factory was made reach the connections made
        after that, as Autobahn's own copies would.
        """
        factory = self.factory()
        factory.setProtocolOptions(maxFramePayloadSize=1234, autoPingInterval=7)
        protocol = self.open(factory)
        self.assertEqual(protocol.maxFramePayloadSize, 1234)
        self.assertEqual(protocol.autoPingInterval, 7)
        factory.resetProtocolOptions()
        self.assertEqual(factory.buildProtocol(None).maxFramePayloadSize, factory.maxFramePayloadSize)
