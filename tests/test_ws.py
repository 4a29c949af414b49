"""
Unit tests for L{chatd.ws} that need no socket.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from chatd.core import ChatCore
from chatd.store.memory import MemoryStore
from chatd.ws import ChatWebSocketFactory, frame_limit


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
