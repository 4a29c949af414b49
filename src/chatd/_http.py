# -*- test-case-name: tests.test_hardening -*-
"""
HTTP connection policies twisted.web does not have: a deadline for a new
connection's request head, so slow-loris clients that dribble headers a
byte at a time cannot pin the server.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import noLongerProvides

__all__ = ["HeaderDeadlineFactory"]


class _HeaderDeadline(ProtocolWrapper):
    factory: "HeaderDeadlineFactory"
    _deadline: Optional[IDelayedCall] = None
    _seen = b""

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        # The wrapper copies its transport's interfaces; claiming to be the
        # TLS transport itself would make Autobahn look for TLS internals on
        # it (channel binding) and fail the WebSocket handshake.
        if ISSLTransport.providedBy(self):
            noLongerProvides(self, ISSLTransport)

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = self.factory.clock.callLater(self.factory.seconds, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is not None:
            # Keep only enough to spot the blank line that ends the head.
            self._seen = (self._seen + data)[-4096:]
            if b"\r\n\r\n" in self._seen or b"\n\n" in self._seen:
                self._cancel()
        super().dataReceived(data)

    def _expired(self) -> None:
        self._deadline = None
        self.factory.log.info(
            "Dropping {peer}: no complete request head in {seconds} s",
            peer=self.getPeer(),
            seconds=self.factory.seconds,
        )
        transport: Any = self.transport
        transport.abortConnection()

    def _cancel(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            self._seen = b""

    @property
    def direct_transport(self) -> Any:
        """
        The transport under this wrapper, for writers that want to skip
        it once the request head deadline no longer matters.
        """
        return self.transport

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel()
        super().connectionLost(reason)


class HeaderDeadlineFactory(WrappingFactory):
    """
    Wraps the Site: each connection must send its first request head within
    C{seconds}.  (Later requests on a kept-alive connection are covered by
    the Site's idle timeout.)
    """

    protocol = _HeaderDeadline
    log = Logger()

    def __init__(self, site: Any, clock: Any, seconds: float = 10.0) -> None:
        super().__init__(site)
        self.clock = clock
        self.seconds = seconds
