# -*- test-case-name: tests.test_hardening,tests.test_shortpath -*-
"""
HTTP connection handling twisted.web does not have:

  - a deadline for a new connection's request head, so slow-loris clients
    that dribble headers a byte at a time cannot pin the server;
  - a short path for the long-poll C{GET /api/rooms/<room>/messages}, the
    one request a long-poll client sends again and again, answered without
    twisted.web's per-request machinery (L{ChatChannel}).
"""

from __future__ import annotations

import re
import select
from typing import Any, Callable, Dict, Optional, Protocol, Tuple, cast

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.http import RESPONSES, HTTPChannel, datetimeToString
from twisted.web.server import Site
from twisted.web.server import version as server_version
from zope.interface import noLongerProvides

from chatd._send import direct_writer
from chatd.core import ChatError

__all__ = ["EXTRA_REASONS", "ChatChannel", "ChatSite", "HeaderDeadlineFactory", "LongPolls"]


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


#: What a long-poll request line starts with.
_SHORT_PREFIX = b"GET /api/rooms/"
#: The longest request head (with any pipelined bytes) the short path holds.
MAX_SHORT_HEAD = 8 * 1024
_MAX_SHORT_HEADERS = 100
#: How much the short path reads from a connection at a time.
SHORT_READ_SIZE = 16 * 1024

#: How many request lines (and header blocks) the site keeps read.
_KEPT = 1024
#: The request line of a long-poll: an ASCII room name and a query with
#: nothing escaped (anything else takes the full path).
_LONG_POLL_LINE = re.compile(
    rb"GET /api/rooms/([A-Za-z0-9_-]{1,64})/messages(?:\?([!$&'()*,-;=@-Z_a-z~]*))? HTTP/1\.1\Z"
)
#: Header lines: a token, a colon, a value without control characters.
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*)*")
_CONTENT_LENGTH = b"\r\ncontent-length:"
_CONNECTION = b"\r\nconnection:"
#: Headers that send a request down the full path (a body, an upgrade).
_NOT_SHORT = (b"\r\ntransfer-encoding:", b"\r\nupgrade:", b"\r\nexpect:")
#: Reason phrases twisted.web's RESPONSES does not have.
EXTRA_REASONS = {426: b"Upgrade Required", 429: b"Too Many Requests"}


def parse_long_poll_line(line: bytes) -> Optional[Tuple[str, Dict[str, str]]]:
    """
    Read a request line as a long-poll GET.

    @return: the room and the query's parameters (the last value of each),
        or None for any other request, and for one that would need decoding
        (percent-escapes, C{+}, bytes outside ASCII).
    """
    request = _LONG_POLL_LINE.match(line)
    if request is None:
        return None
    params: Dict[str, str] = {}
    query = request.group(2)
    if query:
        for pair in query.decode("ascii").split("&"):
            name, _, value = pair.partition("=")
            params[name] = value
    return request.group(1).decode("ascii"), params


def parse_short_headers(headers: bytes) -> Optional[bool]:
    """
    Read a long-poll's header lines (each after its CRLF, without the final
    blank line).

    @return: whether the client asked to close the connection after the
        answer; or None when the request needs the full path: a body, an
        upgrade, an expectation, a line that is not C{token: value} or a
        line ending other than CRLF.
    """
    if not headers:
        return False
    if not _HEADER_LINES.fullmatch(headers) or headers.count(b"\r\n") > _MAX_SHORT_HEADERS:
        return None
    lowered = headers.lower()
    at = lowered.find(_CONTENT_LENGTH)
    if at >= 0 and (
        lowered.count(_CONTENT_LENGTH) > 1
        or lowered[at + len(_CONTENT_LENGTH) :].split(b"\r\n", 1)[0].strip() != b"0"
    ):
        return None
    for header in _NOT_SHORT:
        if header in lowered:
            return None
    at = lowered.find(_CONNECTION)
    if at < 0:
        return False
    tokens = {t.strip() for t in lowered[at + len(_CONNECTION) :].split(b"\r\n", 1)[0].split(b",")}
    if b"upgrade" in tokens or lowered.count(_CONNECTION) > 1:
        return None
    return b"close" in tokens


class _ShortPathReads:
    """
    Reads the short path's connections through an epoll set of its own,
    itself one reader of the reactor.

    A long-poll connection is read once per message (its next request).
    Through the reactor, each read costs a logging context, the transport's
    dispatch and the wrappers' dataReceived, more than reading the request
    and answering it; here it is one recv() and the channel's dataReceived.
    A connection leaves for the reactor's own reading whenever anything but
    a request arrives for the short path: the end of the stream or an error
    (which the transport then meets as usual), a hand-over to the full
    path, or a pause.
    """

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._epoll: Optional[select.epoll] = None
        #: fd -> (channel, TCP transport, its socket's recv)
        self._reading: Dict[int, Tuple["ChatChannel", Any, Any]] = {}
        #: The site stopped: connections stay with the reactor from now on.
        self._closed = False

    def fileno(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else -1

    def logPrefix(self) -> str:
        return "chatd-long-polls"

    def take(self, channel: "ChatChannel", transport: Any) -> Optional[int]:
        """
        Read C{channel}'s connection here from now on, if it is plain TCP
        (and this is Linux, for epoll).

        @return: its file descriptor, or None if it stays with the reactor.
        """
        if (
            self._closed
            or not isinstance(transport, tcp.Connection)
            or ISSLTransport.providedBy(transport)
            or not hasattr(select, "epoll")
        ):
            return None
        if self._epoll is None:
            self._epoll = select.epoll()
        fd = transport.fileno()
        transport.stopReading()
        self._epoll.register(fd, select.EPOLLIN)
        if not self._reading:
            self._reactor.addReader(self)
        self._reading[fd] = (channel, transport, transport.socket.recv)
        return fd

    def give_back(self, fd: int) -> None:
        """
        The reactor reads this connection again (if it is still open).
        """
        entry = self._reading.pop(fd, None)
        if entry is None:
            return
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed
        if not self._reading:
            self._reactor.removeReader(self)
        channel, transport, _ = entry
        channel._read_fd = None
        if not transport.disconnected:
            transport.startReading()

    def _give_all_back(self) -> None:
        for fd in list(self._reading):
            self.give_back(fd)

    def doRead(self) -> None:
        if self._epoll is None:
            return
        reading = self._reading
        for fd, _ in self._epoll.poll(0, 256):
            entry = reading.get(fd)
            if entry is None:
                continue
            channel, transport, recv = entry
            try:
                data = recv(SHORT_READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                self.give_back(fd)  # the transport meets the error itself
                continue
            if not data:
                self.give_back(fd)  # and the end of the stream
                continue
            try:
                channel.dataReceived(data)
            except Exception:
                # As the reactor does for a protocol's error: log it and
                # drop that connection, not every long-poll.
                self._log.failure("Dropping a long-poll connection after an error")
                self.give_back(fd)
                transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        # The reactor dropped this reader: the connections read here go
        # back to it.
        self._give_all_back()

    def close(self) -> None:
        self._closed = True
        self._give_all_back()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


class _Kept(Dict[bytes, Any]):
    """
    What C{compute} made of each key, kept for the next time (a dict
    lookup on the hot path); all dropped when C{_KEPT} are held.
    """

    def __init__(self, compute: Callable[[bytes], Any]) -> None:
        super().__init__()
        self._compute = compute

    def __missing__(self, key: bytes) -> Any:
        value = self._compute(key)
        if len(self) >= _KEPT:
            self.clear()
        self[key] = value
        return value


class LongPolls(Protocol):
    """
    What answers the short path's long-polls (L{chatd.web.ChatWeb}).
    """

    def prepare_long_poll(self, room: str, query: Dict[str, str]) -> object:
        """
        Check a long-poll's parameters (not its room).  The result depends
        on nothing else, so the site keeps it for the same request line.

        @raise ChatError: what the full path would refuse.
        """

    def long_poll(
        self, prepared: Any, ip: str, write: Callable[[int, bytes, bytes], None]
    ) -> Callable[[], None]:
        """
        Start a prepared long-poll for C{ip}: C{write} gets the answer's
        status, content type and body, once, unless the returned function
        is called first (the client went away).

        @raise ChatError: what the full path would refuse.
        """


class ChatChannel(HTTPChannel):
    """
    twisted.web's HTTP channel, with a short path for long-poll GETs.

    A long-poll client asks C{GET /api/rooms/<room>/messages?after=N} again
    after every answer; with a thousand of them, parsing each request into a
    twisted.web Request, routing it through Klein and writing the answer in
    chunks cost more than the 50 ms between two messages.  This channel
    reads such a request itself, has the site's L{LongPolls} answer it and
    writes the answer in one piece with a Content-Length.

    A connection starts on the short path.  The first request it does not
    take -- any other route, anything needing decoding, a refused
    parameter or room (so the full path gives the same error answer) --
    hands the connection to HTTPChannel for good, with every byte not yet
    used, and HTTPChannel starts from its first request as if it had read
    the connection from the start.
    """

    site: "ChatSite"
    #: Handed to HTTPChannel for good.
    _full = False
    #: Received and not yet used by the short path.
    _unread = b""
    #: A long-poll is waiting for its answer.
    _waiting = False
    #: Forgets the waiting long-poll.
    _cancel: Optional[Callable[[], None]] = None
    #: When the idle timer was last restarted (whole seconds).
    _active_at = -1
    _close_after = False
    _serving = False
    _paused = False
    _write: Optional[Callable[[bytes], None]] = None
    _client_ip: Optional[str] = None
    #: The file descriptor the site's reader reads this connection by.
    _read_fd: Optional[int] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if getattr(self.site, "long_polls", None) is None:
            self._full = True

    def dataReceived(self, data: bytes) -> None:
        if self._full:
            super().dataReceived(data)
            return
        if not (self._unread or self._waiting) and data.find(b"\r\n\r\n") == len(data) - 4:
            # The usual: one whole request head in one read.
            if not self._start(data[:-4]):
                self._unread = data
                self._hand_over()
            return
        self._unread += data
        if self._waiting:
            # Pipelined behind a long-poll: held until it is answered.
            if len(self._unread) > MAX_SHORT_HEAD and not self._paused:
                self._paused = True
                self._read_by_reactor()
                self._networkProducer.pauseProducing()
            return
        # (The idle timer restarts when an answer is written, not for every
        # chunk received: a client dribbling a request head gets no longer.)
        self._serve()

    def _serve(self) -> None:
        if self._serving:
            return
        self._serving = True
        try:
            while not self._full and not self._waiting and self._unread:
                data = self._unread
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if (
                        len(data) > MAX_SHORT_HEAD
                        or b"\n\n" in data
                        or b"\n\r\n" in data
                        or not (data.startswith(_SHORT_PREFIX) or _SHORT_PREFIX.startswith(data))
                    ):
                        self._hand_over()
                    return
                if not self._start(data[:end]):
                    self._hand_over()
                    return
                self._unread = data[end + 4 :]
        finally:
            self._serving = False

    def _start(self, head: bytes) -> bool:
        if len(head) > MAX_SHORT_HEAD:
            return False
        site = self.site
        line_end = head.find(b"\r\n")
        if line_end < 0:
            line_end = len(head)
        close = site.headers[head[line_end:]]
        if close is None:
            return False
        # (The line has no CR or LF left in it that a long-poll's could have.)
        prepared = site.prepared[head[:line_end]]
        long_polls = site.long_polls
        if prepared is None or long_polls is None:
            return False
        self._close_after = close
        self._waiting = True
        try:
            cancel = long_polls.long_poll(prepared, self._ip(), self._answer)
        except Exception:
            # A refusal, or a bug: the full path answers it (a JSON 4xx/503,
            # or a logged 500) as it answers any other request.
            self._waiting = False
            return False
        if self._waiting:
            self._cancel = cancel
        return True

    def timeoutConnection(self) -> None:
        # A connection with a long-poll waiting is not idle (HTTPChannel
        # stops its timer while it handles a request; re-arming it here
        # costs less than stopping and restarting it for every request).
        if self._waiting:
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def _ip(self) -> str:
        if self._client_ip is None:
            transport: Any = self.transport
            self._client_ip = str(getattr(transport.getPeer(), "host", "?"))
        return self._client_ip

    def _answer(self, status: int, content_type: bytes, body: bytes) -> None:
        if not self._waiting:
            return  # the connection was lost meanwhile
        self._waiting = False
        self._cancel = None
        site = self.site
        if self._write is None:
            transport: Any = self.transport
            self._write = direct_writer(getattr(transport, "direct_transport", transport), None)
        self._write(site.response(status, content_type, body))
        if self._close_after:
            self._full = True
            cast(Any, self.transport).loseConnection()
            return
        # Idle from now on; restarting the timer at most once a second is
        # close enough for a 75 s timeout, and costs less.
        if self._active_at != site.second:
            self._active_at = site.second
            self.resetTimeout()
        if self._paused:
            self._paused = False
            self._networkProducer.resumeProducing()
        elif self._read_fd is None and not self._full:
            self._read_fd = site.reads.take(
                self, getattr(self.transport, "direct_transport", self.transport)
            )
        if self._unread:
            self._serve()

    def _read_by_reactor(self) -> None:
        fd, self._read_fd = self._read_fd, None
        if fd is not None:
            self.site.reads.give_back(fd)

    def _hand_over(self) -> None:
        self._full = True
        self._read_by_reactor()
        data, self._unread = self._unread, b""
        super().dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._read_by_reactor()
        cancel, self._cancel = self._cancel, None
        self._waiting = False
        if cancel is not None:
            cancel()
        super().connectionLost(reason)


class ChatSite(Site):
    """
    chatd's Site: connections are L{ChatChannel}s, and twisted.web's
    access log (a line per request) is written only when asked for.

    @ivar long_polls: answers the channels' short-path long-polls; None
        sends every request down twisted.web's full path.
    """

    protocol = ChatChannel  # type: ignore[assignment]
    long_polls: Optional[LongPolls] = None

    def __init__(self, resource: Any, access_log: bool = False, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log
        #: Reads the short path's connections.
        self.reads = _ShortPathReads(self.reactor)
        #: Long-poll request lines, read and checked (L{LongPolls.prepare_long_poll}),
        #: or None for one the full path must answer.  After a message, a
        #: room's long-poll clients all ask again with the same line.
        self.prepared = _Kept(self._prepare)
        #: Header blocks read by L{parse_short_headers}: a client sends the
        #: same headers with every poll.
        self.headers = _Kept(parse_short_headers)
        self._date = b""
        #: The whole second of the last answer's Date.
        self.second = -1
        self._last: Tuple[object, bytes] = (None, b"")

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)

    def stopFactory(self) -> None:
        self.reads.close()
        super().stopFactory()

    def _prepare(self, line: bytes) -> object:
        request = parse_long_poll_line(line)
        if request is None or self.long_polls is None:
            return None
        try:
            return self.long_polls.prepare_long_poll(*request)
        except ChatError:
            return None

    def response(self, status: int, content_type: bytes, body: bytes) -> bytes:
        """
        A short-path answer: the status line and headers the full path
        sends for the same answer, with a Content-Length, and the body.
        The last one is kept, for the many clients a message goes to.
        """
        now = int(self.reactor.seconds())
        if now != self.second:
            self.second = now
            self._date = datetimeToString(now)
            self._last = (None, b"")
        key = (status, content_type, body)
        last_key, last = self._last
        if last_key == key:
            return last
        data = b"".join((
            b"HTTP/1.1 %d %s\r\n" % (status, RESPONSES.get(status) or EXTRA_REASONS.get(status, b"Error")),
            b"Server: ", server_version,
            b"\r\nDate: ", self._date,
            b"\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
            b"Content-Type: ", content_type,
            b"\r\nContent-Length: %d\r\n\r\n" % (len(body),),
            body,
        ))
        self._last = (key, data)
        return data
