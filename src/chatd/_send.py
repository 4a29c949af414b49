# -*- test-case-name: tests.test_send -*-
"""
The one seam where chatd writes past Twisted's transport buffer.

Twisted's C{transport.write} keeps every payload for the next reactor
iteration: it asks epoll to say when the socket is writable, sends in that
iteration, and asks epoll to stop watching again.  For the WebSocket
fan-out that is two epoll calls and an iteration's delay per recipient
per message, the larger part of delivering a message to a thousand
clients.  L{FrameWriter} sends a connection's first payload of an
iteration at once, in one C{send()}, when Twisted holds nothing unsent for
it; everything else goes through the transport's own C{write} (the
fan-out's further frames of an iteration joined into one), so bytes are
never reordered and backpressure (the transport pausing its producer)
works as before.

What it relies on, pinned by C{tests/test_send.py} so that a Twisted
upgrade that changes it fails the tests loudly rather than going slower
or reordering bytes:

  - a plain TCP transport is a L{twisted.internet.tcp.Connection} whose
    C{getHandle()} is its non-blocking socket;
  - everything Twisted has not yet sent for it is in its C{dataBuffer}
    (bytes) and counted by its C{_tempDataLen} (an int): when both are
    empty, nothing is queued, so a direct C{send()} cannot overtake
    earlier bytes.

Where that does not hold (TLS, UNIX sockets, another reactor, or a Twisted
whose buffer looks different, which L{direct_writes_available} reports at
start-up), nothing is sent at once: every payload goes through the
transport's C{write}.

Only the WebSocket adapter uses it, through Autobahn's C{sendData} (the
one method every frame Autobahn sends goes through, L{chatd.ws}).
"""

from __future__ import annotations

import socket
from typing import Any, List, Optional

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = [
    "Backpressure",
    "FrameWriter",
    "Ticks",
    "direct_writes_available",
]


class Ticks:
    """
    Counts reactor iterations in which something was sent, so that a
    connection sends at most its first payload of an iteration at once,
    and flushes, at the start of the next iteration, what writers held
    back in this one.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.now = 0
        self._scheduled = False
        self._holding: List["FrameWriter"] = []

    def current(self) -> int:
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._next)
        return self.now

    def flush_later(self, writer: "FrameWriter") -> None:
        """
        Have C{writer} flush what it holds at the start of the next
        iteration.
        """
        self._holding.append(writer)
        self.current()

    def _next(self) -> None:
        self.now += 1
        self._scheduled = False
        holding, self._holding = self._holding, []
        for writer in holding:
            writer.flush()


def direct_writes_available() -> bool:
    """
    Whether this Twisted's TCP transports look as L{FrameWriter} needs:
    checked once at start-up, so that a Twisted that changed says so.
    """
    return isinstance(getattr(tcp.Connection, "dataBuffer", None), bytes) and callable(
        getattr(tcp.Connection, "getHandle", None)
    )


def _direct(transport: Any) -> bool:
    return (
        isinstance(transport, tcp.Connection)
        and isinstance(getattr(transport, "dataBuffer", None), bytes)
        and isinstance(getattr(transport, "_tempDataLen", None), int)
        and isinstance(transport.getHandle(), socket.socket)
    )


class FrameWriter:
    """
    Writes one connection's bytes, in order.

    L{write} is for every payload (handshake, close, pong, error frames):
    it first writes whatever L{queue} held back.  L{queue} is for the
    fan-out's message frames: the first one of a reactor iteration goes
    out at once when it can (see the module docstring), the rest are held
    and written to the transport together, in one C{write}, at the start
    of the next iteration, instead of one C{write} each (Twisted's write
    costs more than the rest of a delivery).  Without ticks (no clock),
    both are the transport's own C{write}.
    """

    __slots__ = ("_transport", "_write", "_send", "_ticks", "_last", "_held")

    def __init__(self, transport: Any, ticks: Optional[Ticks]) -> None:
        self._transport = transport
        self._write = transport.write
        self._send = transport.getHandle().send if ticks is not None and _direct(transport) else None
        self._ticks = ticks
        self._last = -1
        self._held: Optional[List[bytes]] = None

    def write(self, data: bytes) -> None:
        """
        Write C{data} after everything written or queued before it.
        """
        if self._held is not None:
            self.flush()
        if self._send is None or not self._sent_at_once(data):
            self._write(data)

    def queue(self, frame: bytes) -> None:
        """
        Write a fan-out frame: at once, or with the connection's other
        frames of this iteration.
        """
        held = self._held
        if held is not None:
            held.append(frame)
            return
        if self._send is not None and self._sent_at_once(frame):
            return
        if self._ticks is None:
            self._write(frame)
            return
        self._held = [frame]
        self._ticks.flush_later(self)

    def flush(self) -> None:
        """
        Write what L{queue} held back, in one piece.
        """
        held, self._held = self._held, None
        if held:
            self._write(held[0] if len(held) == 1 else b"".join(held))

    def _sent_at_once(self, data: bytes) -> bool:
        """
        Send C{data} now if it is this connection's first payload of the
        iteration and the transport holds nothing unsent; what the socket
        did not take goes to the transport.

        @return: whether C{data} was dealt with.
        """
        transport = self._transport
        assert self._ticks is not None and self._send is not None
        tick = self._ticks.current()
        if self._last == tick or transport.dataBuffer or transport._tempDataLen or transport.disconnecting:
            return False
        self._last = tick
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let the transport meet the error and close as it does.
            return False
        if sent < len(data):
            self._write(data[sent:])
        return True


@implementer(IPushProducer)
class Backpressure:
    """
    Registered with a connection's transport (or a streaming request),
    which pauses it when its write buffer is full: while paused, what the
    connection is sent accumulates there (C{backlog}, counted by the
    writer), and past a limit the reader is too slow.  Shared by the
    WebSocket and event-stream writers.
    """

    __slots__ = ("paused", "backlog")

    def __init__(self) -> None:
        self.paused = False
        self.backlog = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.backlog = 0

    def stopProducing(self) -> None:
        self.paused = False
