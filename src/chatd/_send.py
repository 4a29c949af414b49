# -*- test-case-name: tests.test_ws,tests.test_shortpath -*-
"""
Writing to a TCP connection without waiting for the reactor: a
connection's first payload in a reactor iteration goes out in one system
call, where Twisted's own write would buffer it, ask epoll to say when the
socket is writable, send it in the next iteration and ask epoll to stop
watching again.  The WebSocket fan-out and the long-poll answers use it.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from twisted.internet import tcp

__all__ = ["Ticks", "direct_writer"]


class Ticks:
    """
    Counts reactor iterations in which something was sent, so that a
    connection sends at most its first frame of an iteration at once and
    lets the transport batch the rest.
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


def direct_writer(transport: Any, ticks: Optional[Ticks]) -> Callable[[bytes], None]:
    """
    A write function that sends at once.  On a plain TCP connection with
    nothing queued, a payload goes out in one system call instead of
    waiting for the next reactor iteration (which also adds and removes the
    socket from epoll each time): the last of a thousand recipients then
    gets a message about as soon as the first.  Anything not sent, and
    anything written while something is queued, goes through the
    transport's own write, in order.

    With C{ticks} (the WebSocket fan-out), only a connection's first
    payload in a reactor iteration is sent at once, and later ones are left
    to the transport to send together; without (long-poll answers, one per
    request), every payload is.

    This reads twisted.internet.tcp.Connection's buffer attributes; where
    they are not there (TLS, another reactor or Twisted version), it is the
    transport's plain write.
    """
    write = transport.write
    sock = getattr(transport, "socket", None)
    if not (
        isinstance(transport, tcp.Connection)
        and isinstance(sock, socket.socket)
        and hasattr(transport, "dataBuffer")
        and hasattr(transport, "_tempDataLen")
    ):
        return write
    send = sock.send
    last = -1

    def direct(frame: bytes) -> None:
        nonlocal last
        if ticks is not None:
            tick = ticks.current()
            if last == tick:
                write(frame)
                return
            last = tick
        if transport.dataBuffer or transport._tempDataLen or transport.disconnecting:
            write(frame)
            return
        try:
            sent = send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let the transport meet the error and close as it does.
            write(frame)
            return
        if sent < len(frame):
            write(frame[sent:])

    return direct
