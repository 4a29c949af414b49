# -*- test-case-name: tests.test_hardening,tests.test_longpoll -*-
"""
chatd's HTTP connections: twisted.web's own C{HTTPChannel}, which parses
every byte, with the bounds a public server needs and twisted.web leaves
to its users, each written against the channel's public methods:

  - a deadline for every request head, counted from its first byte, so
    clients that dribble a head a byte at a time cannot pin the server
    (twisted.web restarts its idle timer at every byte);
  - pipelined requests wait while the client is not reading: a request's
    successor is taken up only once its answer has drained from the
    transport's buffer (twisted.web would answer every request already
    buffered, however full the transport; Twisted ticket #8868), so one
    connection holds at most one answer beyond the transport's buffer;
    a client that never drains it is dropped after the idle timeout;
  - HTTP/1.1 only over TLS (ALPN): these bounds, and the WebSocket
    upgrade, are HTTP/1.1's.
"""

from __future__ import annotations

from functools import partial
from typing import Any, List, Optional, Sequence

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

__all__ = ["ChatChannel", "ChatRequest", "ChatSite"]


class ChatRequest(Request):
    """
    A request whose body twisted.web does not parse: chatd reads POST
    bodies itself (JSON or URL-encoded forms) and refuses multipart with a
    JSON 415, where twisted.web would answer a malformed multipart body
    with a bare 400 of its own and drop the connection.
    """

    _content_type: Optional[Sequence[bytes]] = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if self._content_type is not None:
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Called by requestReceived once the arguments are parsed.
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._content_type)
        super().process()


class ChatChannel(HTTPChannel):
    """
    twisted.web's HTTP channel with a deadline for every request head and
    no new request taken up while the client does not read its answers.

    @ivar head_timeout: seconds from a request's first byte to the end of
        its head (set by L{ChatSite}).
    @ivar drain_timeout: seconds a client may leave its answers unread
        before its connection is dropped (the site's idle timeout).
    """

    log = Logger()
    head_timeout = 10.0
    #: Seconds a client may leave its answers unread (the idle timeout).
    drain_timeout = 60.0
    #: Waiting for the head of a request (from the connection's start, or
    #: since the previous request was done).
    _awaiting_head = True
    _head_call: Optional[IDelayedCall] = None
    #: The transport's buffer is full (it paused this channel).
    _transport_full = False
    #: A finished request whose successor waits for the transport to drain.
    _held: Optional[Request] = None
    _drain_call: Optional[IDelayedCall] = None

    _host: Any = None

    def getHost(self) -> Any:
        """
        The connection's own address, asked of the transport once (every
        request asks for it, and for TCP each asking is a system call).
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        super().connectionMade()
        # A new connection owes its first head from the start: a client
        # that connects and sends nothing is dropped as well.
        self._start_head_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_head and self._head_call is None:
            self._start_head_deadline()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = False
        self._stop_head_deadline()
        super().allHeadersReceived()

    def _start_head_deadline(self) -> None:
        self._head_call = self.callLater(
            self.head_timeout,
            partial(self._drop, "no complete request head {seconds} s after it began", self.head_timeout),
        )

    def _stop_head_deadline(self) -> None:
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()

    def _drop(self, why: str, seconds: float) -> None:
        """
        A deadline passed: say so and drop the connection.
        """
        self._head_call = self._drain_call = None
        transport: Any = self.transport
        self.log.info("Dropping {peer}: " + why, peer=transport.getPeer(), seconds=seconds)
        transport.abortConnection()

    def requestDone(self, request: Request) -> None:
        if self._transport_full:
            # The client has not read this answer: keep its next request
            # (if any has come) unread until it does.
            self._held = request
            self._drain_call = self.callLater(
                self.drain_timeout,
                partial(self._drop, "its answers were not read for {seconds} s", self.drain_timeout),
            )
            return
        self._next_request(request)

    def _next_request(self, request: Request) -> None:
        self._awaiting_head = True
        super().requestDone(request)

    def pauseProducing(self) -> None:
        self._transport_full = True
        super().pauseProducing()
        transport: Any = self.transport
        if transport is not None:
            # twisted.web goes on reading while it handles a request, and
            # would pile the pipelined requests of a client that does not
            # read into its buffer without bound.  Its own resumes (when
            # the transport drains between requests, and in requestDone)
            # start reading again.  (No transport: the connection is a
            # WebSocket's now.)
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport_full = False
        super().resumeProducing()
        held, self._held = self._held, None
        if held is not None:
            self._cancel_drain_call()
            self._next_request(held)

    def _cancel_drain_call(self) -> None:
        call, self._drain_call = self._drain_call, None
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_head_deadline()
        self._cancel_drain_call()
        self._held = None
        super().connectionLost(reason)


class ChatSite(Site):
    """
    chatd's Site: connections are L{ChatChannel}s, requests
    L{ChatRequest}s, and twisted.web's access log (a line per request) is
    written only when asked for.
    """

    protocol = ChatChannel  # type: ignore[assignment]
    requestFactory = ChatRequest

    def __init__(
        self, resource: Any, access_log: bool = False, head_timeout: float = 10.0, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log
        self.head_timeout = head_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.head_timeout = self.head_timeout
            if self.timeOut:
                channel.drain_timeout = self.timeOut
        return channel

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def acceptableProtocols(self) -> List[bytes]:
        """
        ALPN: HTTP/1.1 only, even where twisted.web could speak HTTP/2 (the
        bounds above and the WebSocket upgrade are HTTP/1.1's).
        """
        return [b"http/1.1"]
