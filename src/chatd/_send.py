# -*- test-case-name: tests.test_send -*-
"""
The one seam where chatd writes past Twisted's transport buffer.

Twisted's C{transport.write} keeps every payload for the next reactor
iteration: it asks epoll to say when the socket is writable, sends in that
iteration, and asks epoll to stop watching again.  For the WebSocket
fan-out that is two epoll calls and an iteration's delay per recipient
per message, the larger part of delivering a message to a thousand
clients.  L{DirectWriter} sends a connection's first payload of an
iteration at once, in one C{send()}, when Twisted holds nothing unsent for
it; everything else goes through the transport's own C{write}, so bytes
are never reordered and backpressure (the transport pausing its
producer) works as before.

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
start-up), the writer is the transport's plain C{write}.

Only the WebSocket adapter uses it, through Autobahn's C{sendData} (the
one method every frame Autobahn sends goes through, L{chatd.ws}).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from twisted.internet import tcp

__all__ = ["DirectWriter", "Ticks", "direct_writes_available", "writer_for"]


class Ticks:
    """
    Counts reactor iterations in which something was sent, so that a
    connection sends at most its first payload of an iteration at once
    and lets the transport batch the rest.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.now = 0
        self._scheduled = False

    def current(self) -> int:
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._next)
        return self.now

    def _next(self) -> None:
        self.now += 1
        self._scheduled = False


def direct_writes_available() -> bool:
    """
    Whether this Twisted's TCP transports look as L{DirectWriter} needs:
    checked once at start-up, so that a Twisted that changed says so.
    """
    return isinstance(getattr(tcp.Connection, "dataBuffer", None), bytes) and callable(
        getattr(tcp.Connection, "getHandle", None)
    )


class DirectWriter:
    """
    Writes to one plain TCP transport, sending at once where that keeps
    the bytes in order (see the module docstring).
    """

    __slots__ = ("_transport", "_write", "_send", "_ticks", "_last")

    def __init__(self, transport: Any, ticks: Ticks) -> None:
        self._transport = transport
        self._write = transport.write
        self._send = transport.getHandle().send
        self._ticks = ticks
        self._last = -1

    def write(self, data: bytes) -> None:
        transport = self._transport
        tick = self._ticks.current()
        if (
            self._last == tick
            or transport.dataBuffer
            or transport._tempDataLen
            or transport.disconnecting
        ):
            self._write(data)
            return
        self._last = tick
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let the transport meet the error and close as it does.
            self._write(data)
            return
        if sent < len(data):
            self._write(data[sent:])


def writer_for(transport: Any, ticks: Optional[Ticks]) -> Callable[[bytes], None]:
    """
    The write function for C{transport}: a L{DirectWriter}'s on a plain
    TCP connection (with C{ticks}), else the transport's own C{write}.
    """
    if (
        ticks is not None
        and isinstance(transport, tcp.Connection)
        and isinstance(getattr(transport, "dataBuffer", None), bytes)
        and isinstance(getattr(transport, "_tempDataLen", None), int)
        and isinstance(transport.getHandle(), socket.socket)
    ):
        return DirectWriter(transport, ticks).write
    return transport.write
