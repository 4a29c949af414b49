# -*- test-case-name: tests.test_hardening,tests.test_longpoll -*-
"""
chatd's HTTP connections: twisted.web's own C{HTTPChannel}, which parses
every byte, with the bounds a public server needs and twisted.web leaves
to its users, each written against the channel's public methods:

  - a deadline for every request, head and body, counted from its first
    byte, so clients that dribble a request a byte at a time cannot pin
    the server (twisted.web restarts its idle timer at every byte);
  - request bodies are bounded: one declared longer than
    L{MAX_REQUEST_BODY} is not read at all (no C{100 Continue}), a chunked
    one is read no further than the bound, and the request goes on at
    once to be answered 413, on a connection that then closes; bodies are
    kept in memory, never spooled to a temporary file;
  - pipelined requests wait while the client is not reading: a request's
    successor is taken up only once its answer has drained from the
    transport's buffer (twisted.web would answer every request already
    buffered, however full the transport; Twisted ticket #8868), so one
    connection holds at most one answer beyond the transport's buffer;
    a client that never drains it is dropped after the idle timeout;
  - HTTP/1.1 only over TLS (ALPN): these bounds, and the WebSocket
    upgrade, are HTTP/1.1's;
  - behind the PROXY protocol (Twisted's C{haproxy:} endpoint), a
    connection takes its place among the server's connections, under the
    client's address, once the PROXY header has been read: the endpoint's
    wrapper makes the connection (C{connectionMade}) before it has read
    the header, so until then C{getPeer()} is the balancer's address.
"""

from __future__ import annotations

import re
from functools import partial
from io import BytesIO
from typing import Any, Callable, List, Optional, Sequence

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.components import proxyForInterface
from twisted.web.http import RESPONSES, HTTPChannel, combinedLogFormatter
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site

from chatd._wire import client_host, error_body, http_status, retry_after
from chatd.limits import Connections, server_full
from chatd.model import ChatError

__all__ = ["ChatChannel", "ChatRequest", "ChatSite", "MAX_REQUEST_BODY"]

#: The largest request body read from a client, in bytes.
MAX_REQUEST_BODY = 64 * 1024

#: Refused connections being told so at once, at most; past this they are
#: closed without a word (a flood of connections costs a descriptor each
#: for at most a second).
REFUSALS = 16

#: After refusing a request unread (a connection over the caps, a body
#: over the bound), chatd reads and drops what the client goes on sending
#: for at most this many seconds and bytes, then closes: closing with
#: unread bytes would reset the connection, and the client could lose the
#: answer that says why.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

#: The paths a spare connection (the server full) may ask for.
HEALTH_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})


class ChatRequest(Request):
    """
    A request whose body twisted.web does not parse: chatd reads POST
    bodies itself (JSON or URL-encoded forms) and refuses multipart with a
    JSON 415, where twisted.web would answer a malformed multipart body
    with a bare 400 of its own and drop the connection.
    """

    _content_type: Optional[Sequence[bytes]] = None
    #: The body was longer than L{MAX_REQUEST_BODY}: what was kept of it
    #: (at most one byte more than the bound) says so to its reader.
    body_too_large = False
    _body_size = 0

    def gotLength(self, length: Optional[int]) -> None:
        # In memory, whatever the declared length: no more than the bound
        # (and a byte) is ever kept (handleContentChunk).
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        room = MAX_REQUEST_BODY + 1 - self._body_size
        if room <= 0:
            return
        if len(data) >= room:
            data = data[:room]
            self.body_too_large = True
        self._body_size += len(data)
        content: Any = self.content
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if self._content_type is not None:
            self.requestHeaders.removeHeader(b"content-type")
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Called by requestReceived once the arguments are parsed.
        if self._content_type is not None:
            self.requestHeaders.setRawHeaders(b"content-type", self._content_type)
        channel: Any = self.channel
        if channel.health_only and self.path not in HEALTH_PATHS:
            self._answer_and_close(server_full())
            return
        super().process()

    def _answer_and_close(self, error: ChatError) -> None:
        """
        Answer with C{error}'s JSON body, and close the connection.
        """
        body = error_body(error.code, error.detail)
        self.setResponseCode(http_status(error))
        self.setHeader(b"content-type", b"application/json; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % (len(body),))
        wait = retry_after(error)
        if wait is not None:
            self.setHeader(b"retry-after", wait)
        self.setHeader(b"connection", b"close")
        self.channel.persistent = False
        self.write(body)
        self.finish()


class ChatChannel(HTTPChannel):
    """
    twisted.web's HTTP channel with a deadline for every request, bounded
    request bodies, no new request taken up while the client does not
    read its answers, and a place among the server's connections.

    @ivar request_timeout: seconds from a request's first byte to the end
        of its body (set by L{ChatSite}).
    @ivar drain_timeout: seconds a client may leave its answers unread
        before its connection is dropped (the site's idle timeout).
    @ivar connections: where the connection takes its place (L{ChatSite}'s).
    @ivar health_only: the connection is a spare (the server is full): it
        may ask for health checks only.
    @ivar proxied: the transport is the C{haproxy:} endpoint's, whose
        C{getPeer()} is the client's address only once the PROXY header is
        read, that is from the first bytes it passes on (L{dataReceived}):
        the connection takes its place then, not in L{connectionMade}.
        Until then it is bounded by the request deadline alone (HAProxy
        sends the header as soon as it connects).
    """

    log = Logger()
    request_timeout = 10.0
    #: Seconds a client may leave its answers unread (the idle timeout).
    drain_timeout = 60.0
    connections: Optional[Connections] = None
    #: Told C{(ip, reason)} of each connection refused (L{ChatSite}'s).
    refused: Optional[Callable[[str, str], None]] = None
    health_only = False
    proxied = False
    #: The connection has asked for its place among the server's
    #: connections (whatever the answer).
    _placed = False
    #: Waiting for a request (from the connection's start, or since the
    #: previous request was done), until its body is in.
    _awaiting_request = True
    _request_call: Optional[IDelayedCall] = None
    #: The transport's buffer is full (it paused this channel).
    _transport_full = False
    #: A finished request whose successor waits for the transport to drain.
    _held: Optional[Request] = None
    _drain_call: Optional[IDelayedCall] = None
    #: Refused: it is being told so (L{_refuse}), and counted as such.
    _refused = False
    #: A request's body was refused unread (L{_end_body}).
    _body_refused = False
    #: Closing: what the client sends is read and dropped (L{_linger}).
    _lingering: Optional[IDelayedCall] = None
    _lingered = 0

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
        if not self.proxied and not self._take_place():
            return
        # A new connection owes its first request from the start: a client
        # that connects and sends nothing is dropped as well.
        self._start_request_deadline()

    def _take_place(self) -> bool:
        """
        Take the connection's place among the server's connections, under
        its peer's address (refusing it if over the caps).

        @return: whether the connection may go on.
        """
        self._placed = True
        if self.connections is None:
            return True
        transport: Any = self.transport
        ip = client_host(transport.getPeer())
        try:
            self.health_only = self.connections.open(transport, ip)
        except ChatError as e:
            self._refuse(ip, e)
            return False
        return True

    def _refuse(self, ip: str, error: ChatError) -> None:
        """
        Tell a connection from C{ip} over the caps so, in one write before
        reading anything, and close it (L{_linger}).  Refusals are cheap,
        and bounded: past L{REFUSALS} being told at once, connections are
        just closed.
        """
        transport: Any = self.transport
        connections = self.connections
        assert connections is not None
        if self.refused is not None:
            self.refused(ip, error.code)
        if connections.refusing >= REFUSALS:
            transport.abortConnection()
            return
        connections.refusing += 1
        self._refused = True
        transport.write(_refusal(error))
        self._linger()

    def _linger(self) -> None:
        """
        Close after what was written, reading and dropping what comes
        meanwhile (L{LINGER_SECONDS}, L{LINGER_BYTES}).
        """
        transport: Any = self.transport
        self._lingering = self.callLater(LINGER_SECONDS, transport.abortConnection)
        transport.resumeProducing()
        getattr(transport, "loseWriteConnection", transport.loseConnection)()

    def loseConnection(self) -> None:
        if not self._body_refused:
            super().loseConnection()
            return
        # The answer to a request whose body was refused is written.
        transport: Any = self.transport
        transport.unregisterProducer()
        self._linger()

    def dataReceived(self, data: bytes) -> None:
        if not self._placed:
            # Behind PROXY: the header has been read, and getPeer() is the
            # client's now.  (The request deadline runs on from the
            # connection's start.)
            if not self._take_place():
                self._stop_request_deadline()
                return
        if self._lingering is not None:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                transport: Any = self.transport
                transport.abortConnection()
            return
        if self._awaiting_request and self._request_call is None:
            self._start_request_deadline()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if self.length is not None and self.length > MAX_REQUEST_BODY:
            # Too large as declared: read none of it, and no 100 Continue.
            request.requestHeaders.removeHeader(b"expect")
            super().allHeadersReceived()
            self._end_body(request)
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        request = self.requests[-1] if self.requests else None
        if self._awaiting_request and isinstance(request, ChatRequest) and request.body_too_large:
            # A chunked body past the bound: read no more of it.  (Here,
            # not in handleContentChunk: the decoder must be done first.)
            self._end_body(request)
            self.allContentReceived()

    def _end_body(self, request: Request) -> None:
        """
        Go on with C{request} without (the rest of) its body, to answer
        it 413; its connection closes after the answer, unread.
        """
        if isinstance(request, ChatRequest):
            request.body_too_large = True
        self._body_refused = True
        self.length = 0
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def allContentReceived(self) -> None:
        self._awaiting_request = False
        self._stop_request_deadline()
        super().allContentReceived()

    def _start_request_deadline(self) -> None:
        self._request_call = self.callLater(
            self.request_timeout,
            partial(self._drop, "no complete request {seconds} s after it began", self.request_timeout),
        )

    def _stop_request_deadline(self) -> None:
        _cancel(self._request_call)
        self._request_call = None

    def _drop(self, why: str, seconds: float) -> None:
        """
        A deadline passed: say so and drop the connection.
        """
        self._request_call = self._drain_call = None
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
        self._awaiting_request = True
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
        _cancel(self._drain_call)
        self._drain_call = None

    def connectionLost(self, reason: Any = None) -> None:
        self._stop_request_deadline()
        self._cancel_drain_call()
        self._held = None
        _cancel(self._lingering)
        self._lingering = None
        if self.connections is not None:
            if self._refused:
                self._refused = False
                self.connections.refusing -= 1
            else:
                self.connections.close(self.transport)
        super().connectionLost(reason)


def _cancel(call: Optional[IDelayedCall]) -> None:
    """
    Cancel C{call} if it is still to come.
    """
    if call is not None and call.active():
        call.cancel()


def _refusal(error: ChatError) -> bytes:
    """
    The whole answer to a connection refused before it sent anything: a
    JSON error with C{Retry-After}, and the connection closes.
    """
    status = http_status(error)
    body = error_body(error.code, error.detail)
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Retry-After: %s\r\n"
        b"Connection: close\r\n\r\n"
    ) % (status, RESPONSES[status], len(body), retry_after(error) or b"1")
    return head + body


#: Query parameters the access log never shows: credentials.
_SECRET_PARAMETERS = re.compile(rb"(?<=[?&;])(token)=[^&;#]*", re.IGNORECASE)


class _Redacted(proxyForInterface(IRequest, "_request")):  # type: ignore[misc]
    """
    A request as the access log sees it: its URI without credentials
    (C{?token=}, which browsers' WebSockets and JSONP must send there).
    """

    @property
    def uri(self) -> bytes:
        return _SECRET_PARAMETERS.sub(rb"\1=REDACTED", self._request.uri)

    # Not in IRequest, which combinedLogFormatter reads too.
    @property
    def clientproto(self) -> bytes:
        return self._request.clientproto  # type: ignore[no-any-return]

    @property
    def code(self) -> int:
        return self._request.code  # type: ignore[no-any-return]

    @property
    def sentLength(self) -> int:
        return self._request.sentLength  # type: ignore[no-any-return]


def redacting_log_formatter(timestamp: str, request: Any) -> str:
    """
    Twisted's combined log format, without credentials in the URI.
    """
    return combinedLogFormatter(timestamp, _Redacted(request))  # type: ignore[no-any-return]


class ChatSite(Site):
    """
    chatd's Site: connections are L{ChatChannel}s, requests
    L{ChatRequest}s, each connection takes its place in C{connections}
    (none: no limits; C{proxied}: once its PROXY header is read, see
    L{ChatChannel.proxied}), and twisted.web's access log (a line per request)
    is written only when asked for.
    """

    protocol = ChatChannel  # type: ignore[assignment]
    requestFactory = ChatRequest

    def __init__(
        self,
        resource: Any,
        access_log: bool = False,
        request_timeout: float = 10.0,
        connections: Optional[Connections] = None,
        refused: Optional[Callable[[str, str], None]] = None,
        proxied: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("logFormatter", redacting_log_formatter)
        super().__init__(resource, **kwargs)
        self.proxied = proxied
        self.access_log = access_log
        self.request_timeout = request_timeout
        self.connections = connections
        self.refused = refused

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.request_timeout = self.request_timeout
            channel.connections = self.connections
            channel.refused = self.refused
            channel.proxied = self.proxied
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
