# -*- test-case-name: tests.test_ws -*-
"""
The WebSocket adapter: C{/ws/<room>} frames to and from the core.

Server frames are JSON text: the room's events in seq order (C{message}
and C{member} frames), C{reset}, C{error}, C{pong} and C{auth}.  Client
frames are a JSON object C{{"type": "message", "nick": ..., "body": ...,
"client_id": ...}}, C{{"type": "ping"}}, C{{"type": "auth", "token":
...}} (a fresh token, before the connection's expires), or plain text,
which is taken as a message body.

With C{?presence=1} a connection also gets C{presence} and C{typing}
frames (L{chatd.presence}), and may send C{{"type": "typing"}} (C{"typing":
false} to stop).

Who the client is comes from the handshake, by the rules every transport
shares (L{chatd.auth.Authenticator}): C{?token=}, C{Authorization: Bearer},
or the session cookie.
"""

from __future__ import annotations

import json
from http.cookies import CookieError, SimpleCookie
from typing import Any, Dict, List, Optional, Set, Type, TypeVar, cast
from urllib.parse import unquote

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd._send import Backpressure, FrameWriter, Ticks
from chatd._wire import client_host, http_status
from chatd.auth import SESSION_COOKIE, Authenticator, Credentials, SessionWatch
from chatd.auth import TOKEN_GRACE as AUTH_TOKEN_GRACE
from chatd.core import ChatCore
from chatd.limits import Connections, RateLimiter
from chatd.model import (
    GUEST,
    ChatError,
    Identity,
    Message,
    Peer,
    encode_json,
    parse_cursor,
    rate_limited,
)
from chatd.presence import Visit, validate_client, validate_flag
from chatd.room import Subscription

__all__ = ["ChatWebSocketFactory", "ChatWebSocketProtocol", "configured", "frame_limit"]

# RFC 6455 close codes.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_INTERNAL_ERROR = 1011
#: chatd's own close codes: the token (or session) the connection was
#: opened with expired or was ended (get a new one, and connect again);
#: the user is no longer a member of the (private) room.
CLOSE_AUTH_EXPIRED = 4001
CLOSE_REVOKED = 4003
#: A moderator kicked the user (they may connect again), or banned them
#: (they may not, until the ban ends).
CLOSE_KICKED = 4004
CLOSE_BANNED = 4005

#: How long past its token's C{exp} a connection stays open, for the
#: client to send a fresh token (an C{auth} frame).
TOKEN_GRACE = AUTH_TOKEN_GRACE

#: Rate-limited frames in a row after which a connection is closed (1008).
FLOOD_CLOSE_AFTER = 20

#: Frames other than messages (pings, pongs, frames of unknown types or
#: that are not JSON): a burst of this many, then L{FRAMES_PER_SECOND}.
#: (Messages have the posting limit, C{--rate-limit}.)
FRAME_BURST = 30
FRAMES_PER_SECOND = 10.0

#: Bytes of client frames handled per reactor iteration: a read full of
#: small frames is handled a slice at a time, and other clients are
#: served between the slices.
READ_SLICE = 8 * 1024

#: Outgoing bytes a connection may have waiting (the kernel and Twisted
#: buffers full) before it is closed as too slow (1008).
SLOW_CONSUMER_LIMIT = 1024 * 1024


def _valid_close_code(code: int) -> bool:
    """
    Whether a client may send close code C{code} (RFC 6455 section 7.4).
    """
    return code in WebSocketServerProtocol.CLOSE_STATUS_CODES_ALLOWED or 3000 <= code <= 4999


def frame_limit(max_body: int) -> int:
    """
    The largest frame or message accepted: room for any valid message
    (each character up to 6 bytes once JSON-escaped) and its other fields.
    """
    return max(64 * 1024, 6 * max_body + 4096)


_P = TypeVar("_P", bound=WebSocketServerProtocol)


def configured(base: Type[_P], factory: WebSocketServerFactory) -> Type[_P]:
    """
    A subclass of protocol class C{base} that holds C{factory}'s protocol
    options (C{setProtocolOptions}) as class attributes, and whose
    C{CONFIG_ATTRS} is empty.

    Autobahn copies every name in a protocol's public C{CONFIG_ATTRS}
    from its factory onto each new connection, unless the connection
    already has it, and formats the whole list for a debug log line
    whether or not debug logging is on (C{_connectionMade}).  That
    formatting was a fifth of the server's CPU per connection in a
    reconnect storm, and the 29 copies a quarter of an idle connection's
    instance dict.  The protocol reads the same values from its class
    instead: one copy per factory.  (C{tests.test_ws.ConfiguredTests}
    pins what this relies on.)
    """
    # Each value as it is: a function (perMessageCompressionAccept) is
    # not made a method of the connection.
    options = {name: staticmethod(getattr(factory, name)) for name in WebSocketServerProtocol.CONFIG_ATTRS}
    subclass = type(base.__name__, (base,), {**options, "CONFIG_ATTRS": (), "__module__": base.__module__})
    return cast(Type[_P], subclass)


class ChatWebSocketProtocol(WebSocketServerProtocol):
    """
    One WebSocket client following one room.
    """

    # Not "log": Autobahn's own txaio logger lives there and filters its
    # per-frame debug chatter by level.
    _log = Logger()
    factory: "ChatWebSocketFactory"

    _room: Optional[str] = None
    _after: Optional[int] = None
    _subscription: Optional[Subscription] = None
    #: The handshake was accepted: the connection is counted as open.
    _admitted = False
    _backpressure: Optional[Backpressure] = None
    _closed = False
    # Live messages may be written (open, and no close frame sent yet).
    _sending = False
    _rejected = 0
    _ip = "?"
    #: Writes this connection's bytes once it is open (L{sendData}).
    _writer: Optional[FrameWriter] = None
    #: Bytes read but not yet handled (L{dataReceived}).
    _unread: Optional[bytes] = None
    #: Who the client is (from the handshake).
    _identity: Identity = GUEST
    #: Closes the connection once its token has expired.
    _expiry: Any = None
    #: Stops watching its session (L{SessionWatch}).
    _unwatch: Any = None
    #: Its place in the room's presence (L{chatd.presence}), and whether it
    #: asked for presence and typing frames (C{?presence=1}), as which
    #: guest browser (C{?client=}).
    _visit: Optional[Visit] = None
    _wants_presence = False
    _client: Optional[str] = None

    def onConnect(self, request: ConnectionRequest) -> Any:
        """
        Accept C{/ws/<room>[?after=SEQ]} for a room that exists and that
        the client may use, within the connection limits.
        """
        prefix = "/ws/"
        path = request.path
        if not path.startswith(prefix):
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "No such endpoint.")
        name = unquote(path[len(prefix):])
        transport: Any = self.transport
        self._ip = client_host(transport.getPeer())
        core = self.factory.core
        auth = self.factory.auth
        if auth is not None:
            try:
                credentials = _credentials(request)
                identity = auth.identify_now(credentials)
            except ChatError:
                return self._refuse(Failure(), path)
            if identity is None:
                d = auth.identify(credentials).addCallback(self._identified, name)
                return d.addCallbacks(lambda _: self._admit(request, name), self._refuse, errbackArgs=(path,))
            self._identity = identity
        try:
            core.admit(core.room(name), self._identity)
        except ChatError:
            # Not followed by this node (yet): the store may know it; or
            # refused (enter says why).
            d = core.enter(name, self._identity)
            return d.addCallbacks(lambda _: self._admit(request, name), self._refuse, errbackArgs=(path,))
        return self._admit(request, name)

    def _admit(self, request: ConnectionRequest, name: str) -> None:
        try:
            after = request.params.get("after", [None])[-1]
            self._after = parse_cursor(after, "after")
            self._presence_params(request.params)
        except ChatError as e:
            self._refuse(Failure(e), request.path)
        self._room = name
        return None

    def _identified(self, identity: Identity, name: str) -> Deferred:
        self._identity = identity
        return self.factory.core.enter(name, identity)

    def _refuse(self, failure: Failure, path: str) -> None:
        failure.trap(ChatError)
        error = failure.value
        assert isinstance(error, ChatError)
        self._log.info(
            "Refused WebSocket from {ip} to {path}: {reason}", ip=self._ip, path=path, reason=error.code
        )
        self.factory.rejected(error.code)
        raise ConnectionDeny(http_status(error), error.detail)

    def onOpen(self) -> None:
        """
        Start following the room: history first, then live messages.
        """
        assert self._room is not None
        self._admitted = True
        self.factory.opened(self)
        self._log.info("WebSocket open: {ip} in {room}", ip=self._ip, room=self._room)
        self._backpressure = Backpressure()
        # The HTTP channel that carried the handshake registered itself as
        # the transport's producer; the connection is ours now.
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.registerProducer(self._backpressure, True)
        # It may also have stopped reading (twisted.web does while it
        # handles a request, past 16 KiB of what follows it: a client
        # that sent frames before the handshake's answer, which RFC 6455
        # forbids); reading is this protocol's now.
        transport.resumeProducing()
        self._writer = FrameWriter(transport, self.factory.ticks)
        self._sending = True
        if self.factory.sessions is not None:
            self._unwatch = self.factory.sessions.watch(self._identity, self.end_session)
        self._watch_expiry()
        try:
            self._subscription = self.factory.core.subscribe(
                self._room,
                self._after,
                self._send_message,
                self._send_reset,
                self._identity,
                self._revoked,
            )
        except ChatError as e:
            self._send_error(e)
            self.close_with(CLOSE_INTERNAL_ERROR, e.detail)
            return
        self._arrive()

    # -- presence and typing -----------------------------------------------------

    def _presence_params(self, params: Dict[str, List[str]]) -> None:
        """
        C{?presence=1} (presence and typing frames) and C{?client=ID} (the
        guest browser this tab belongs to).

        @raise ChatError: C{invalid_parameter}.
        """
        self._wants_presence = validate_flag(params.get("presence", [None])[-1], "presence", False)
        self._client = validate_client(params.get("client", [None])[-1])

    def _arrive(self) -> None:
        """
        Count the connection in the room's presence (listening, if it
        asked to), right after its backlog.
        """
        assert self._room is not None
        core = self.factory.core
        listener = self._send_signal if self._wants_presence else None
        self._visit = core.arrive(core.room(self._room), self._identity, self._client, None, listener)

    def _leave(self) -> None:
        visit, self._visit = self._visit, None
        if visit is not None:
            visit.leave()

    def _send_signal(self, kind: str, body: bytes) -> None:
        """
        A presence or typing frame (its JSON made once for every
        listener, and framed once: L{ChatWebSocketFactory.signal_frame}).
        """
        if not self._sending or self.state != self.STATE_OPEN:
            return
        frame = self.factory.signal_frame(body)
        if self._backlog_exceeded(len(frame)):
            return
        writer = self._writer
        assert writer is not None
        writer.queue(frame)

    def _typing(self, frame: Dict[str, Any]) -> None:
        """
        C{{"type": "typing"}} (started, or still typing) or
        C{{"type": "typing", "typing": false}} (stopped); a guest's may
        carry its C{nick}.  Taken or dropped quietly (the rate limit);
        answered only when malformed.
        """
        assert self._room is not None
        on = validate_flag(frame.get("typing"), "typing", True)
        core = self.factory.core
        core.typing(core.room(self._room), self._identity, on, frame.get("nick"), visit=self._visit)

    def _watch_expiry(self) -> None:
        """
        Close the connection L{TOKEN_GRACE} seconds after its token
        expires, unless a fresh one comes first (an C{auth} frame).
        """
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        expires = self._identity.expires
        clock = self.factory.clock
        if self._identity.via != "token" or expires is None or clock is None:
            return
        delay = max(0.0, expires + TOKEN_GRACE - clock.seconds())
        self._expiry = clock.callLater(delay, self.end_session, "Your token expired; connect again with a new one.")

    def end_session(self, reason: str = "You were signed out.") -> None:
        """
        The connection's token expired, or its session was ended: close
        with L{CLOSE_AUTH_EXPIRED}.
        """
        self._expiry = None
        if self._sending:
            if self._subscription is not None:
                self._subscription.stop()
                self._subscription = None
            self.close_with(CLOSE_AUTH_EXPIRED, reason)

    def _revoked(self, why: ChatError) -> None:
        """
        The user may no longer read the room (its subscription stopped):
        removed from a private room (L{CLOSE_REVOKED}), kicked
        (L{CLOSE_KICKED}) or banned (L{CLOSE_BANNED}).  The event that
        says so (C{member}, C{moderation}) was the last frame before it.
        """
        self._subscription = None
        if self._sending:
            code = {"kicked": CLOSE_KICKED, "banned": CLOSE_BANNED}.get(why.code, CLOSE_REVOKED)
            self.close_with(code, why.detail)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with a protocol-level close code
        (1001, 1003, 1008, ...), which Autobahn's C{sendClose} reserves for
        itself; the handshake timeout still applies.
        """
        self._sending = False
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def _send_frame(self, frame: dict) -> None:
        # After our close frame (or the peer's) nothing more may be sent.
        if self._sending and self.state == self.STATE_OPEN:
            self.sendMessage(encode_json(frame))

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        """
        Every byte Autobahn sends comes here (frames, prepared messages,
        close frames, pongs).  Once the connection is open, a plain write
        goes to this connection's writer (L{chatd._send}): at once where
        that keeps the bytes in order, and without formatting Autobahn's
        debug-log arguments on every call (a fifth of the fan-out's CPU).
        Synchronous and chopped sends, and anything queued by them, stay
        with Autobahn, and so does everything before the connection opens.
        """
        writer = self._writer
        if writer is None or sync or chopsize or self.send_queue or cast(Any, self).logOctets:
            super().sendData(data, sync, chopsize)
            return
        if self.state == self.STATE_CLOSED:
            return  # nothing is written after the connection closed
        if self._backlog_exceeded(len(data)):
            return
        writer.write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)

    def _send_message(self, message: Message) -> None:
        # The fan-out hot path: the message's frame, made once for every
        # recipient (prepareMessage), is queued on this connection's writer
        # (sendData's, the chatd._send seam), which joins a connection's
        # frames of one reactor iteration into one write; only while the
        # connection is open and no close frame was sent.
        if not self._sending or self.state != self.STATE_OPEN:
            return
        frame = self.factory.frame(message)
        if self._backlog_exceeded(len(frame)):
            return
        writer = self._writer
        assert writer is not None
        writer.queue(frame)

    def _backlog_exceeded(self, size: int) -> bool:
        """
        Count C{size} more bytes for the client while it is not reading
        (every byte chatd writes to it: messages, pongs, error frames); past
        the limit, close it as too slow.

        @return: whether the connection is being closed (write nothing).
        """
        backpressure = self._backpressure
        if backpressure is None or not backpressure.paused or not self._sending:
            return False
        backpressure.backlog += size
        if backpressure.backlog <= self.factory.slow_consumer_limit:
            return False
        self._too_slow()
        return True

    def _too_slow(self) -> None:
        """
        The client stopped reading: stop following the room and close with
        1008.  The close frame waits behind what the client has not read, so
        Autobahn's close-handshake timeout (1 s) then drops the connection;
        nothing more is queued for it meanwhile.
        """
        self._log.warn(
            "Closing WebSocket {ip} in {room}: more than {limit} bytes waiting to be read",
            ip=self._ip,
            room=self._room,
            limit=self.factory.slow_consumer_limit,
        )
        self.factory.rejected("slow_consumer")
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None
        self.close_with(CLOSE_POLICY_VIOLATION, "Too slow: messages were not being read.")

    def _send_reset(self, first_seq: int) -> None:
        self._send_frame({"type": "reset", "first_seq": first_seq})

    def _send_error(self, error: ChatError, client_id: Any = None) -> None:
        frame: dict = {
            "type": "error",
            "code": error.code,
            "status": http_status(error),
            "detail": error.detail,
        }
        if error.retry_after is not None:
            frame["retry_after"] = round(error.retry_after, 3)
        if isinstance(client_id, str):
            frame["client_id"] = client_id
        self._send_frame(frame)

    def dataReceived(self, data: bytes) -> None:
        """
        Hand what the client sent to Autobahn, at most L{READ_SLICE} bytes
        per reactor iteration once the connection is open: reading stops
        while the rest of a larger read waits for the next iterations.
        """
        if self._unread is not None:
            self._unread += data
            return
        if len(data) <= READ_SLICE or self._writer is None or self.factory.clock is None:
            super().dataReceived(data)
            return
        transport: Any = self.transport
        transport.pauseProducing()
        self._unread = data
        self._read_on()

    def _read_on(self) -> None:
        """
        Hand Autobahn the next slice of what was read; reading resumes once
        the last slice is handed on.
        """
        unread, self._unread = self._unread, None
        if unread is None or self.state == self.STATE_CLOSED:
            return
        if len(unread) > READ_SLICE:
            self._unread = unread[READ_SLICE:]
            unread = unread[:READ_SLICE]
            assert self.factory.clock is not None
            self.factory.clock.callLater(0, self._read_on)
        else:
            transport: Any = self.transport
            transport.resumeProducing()
        super().dataReceived(unread)

    def _frame_allowed(self) -> bool:
        """
        Take a token for a frame that is not a message; refuse it (an
        C{error} frame, and 1008 after L{FLOOD_CLOSE_AFTER} in a row) when
        there is none.
        """
        limiter = self.factory.frames
        if limiter is None:
            return True
        wait = limiter.take(self)
        if not wait:
            return True
        self._refused(rate_limited("Too many frames", wait))
        return False

    def _refused(self, error: ChatError, client_id: Any = None) -> None:
        """
        A frame was refused by a rate limit: say so, and close a client
        that keeps flooding.
        """
        self.factory.rejected(error.code)
        self._send_error(error, client_id)
        self._rejected += 1
        if self._rejected >= FLOOD_CLOSE_AFTER and self._sending:
            self._log.warn("Closing WebSocket {ip}: flooding", ip=self._ip)
            self.close_with(CLOSE_POLICY_VIOLATION, "Too many messages or frames.")

    def onPing(self, payload: bytes) -> None:
        if self._frame_allowed():
            super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        if self._frame_allowed():
            super().onPong(payload)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        """
        A close frame with a code RFC 6455 does not allow is a protocol
        error: answer 1002 and close once it is written (Autobahn would
        take the client's close as the reply to its own and drop the
        connection before the client could read why).
        """
        if code is not None and self.state == self.STATE_OPEN and not _valid_close_code(code):
            self._sending = False
            self.sendCloseFrame(code=CLOSE_PROTOCOL_ERROR, reasonUtf8=b"Invalid close code.", isReply=True)
            self.dropConnection(abort=False)
            return True
        return super().onCloseFrame(code, reasonRaw)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """
        Handle one client frame.  Errors get an C{error} frame and leave
        the connection usable; binary frames close it (1003).
        """
        if not self._sending:
            return  # closing: nothing more is answered
        if isBinary:
            self.factory.rejected("binary_frame")
            self.close_with(CLOSE_UNSUPPORTED_DATA, "Binary frames are not supported.")
            return
        try:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                # Autobahn checks text frames are UTF-8; this is a safety net.
                raise ChatError("invalid_utf8", "Text frames must be UTF-8.") from None
            self._handle(text)
        except ChatError as e:
            self._send_error(e)
        except Exception:
            # A bug must cost this frame, not the connection or the process.
            self._log.failure("Handling a frame from {ip} failed", ip=self._ip)
            self._send_error(ChatError("internal_error", "The frame could not be handled."))

    def _handle(self, text: str) -> None:
        frame: Any
        try:
            frame = json.loads(text)
        except (ValueError, RecursionError):
            frame = None
        if not isinstance(frame, dict):
            # The tutorial's clients send bare text; so may a person typing
            # "42" or "[1]" into one.
            frame = {"type": "message", "body": text}
        kind = frame.get("type", "message")
        if kind != "message" and not self._frame_allowed():
            return
        if kind == "ping":
            pong: dict = {"type": "pong"}
            if "id" in frame:
                pong["id"] = frame["id"]
            self._send_frame(pong)
            return
        if kind == "auth":
            self._reauthenticate(frame.get("token"))
            return
        if kind in ("edit", "delete", "read"):
            self._change(kind, frame)
            return
        if kind == "typing":
            self._typing(frame)
            return
        if kind != "message":
            raise ChatError(
                "unknown_type",
                "A frame's type is 'message', 'edit', 'delete', 'read', 'typing', 'ping' or 'auth'.",
            )
        assert self._room is not None
        client_id = frame.get("client_id")
        d = self.factory.core.post(
            self._room,
            frame.get("nick"),
            frame.get("body"),
            client_id,
            Peer(self._ip, self),
            self._identity,
        )
        # The sender's acknowledgement is its own message coming back
        # through the room, like everyone else's; only failures are ours.
        d.addCallbacks(self._posted, self._post_failed, errbackArgs=(client_id,))

    def _change(self, kind: str, frame: dict) -> None:
        """
        An C{edit} or C{delete} of a message (its event comes back through
        the room, as a message does; only failures are answered here), or
        a C{read} marker (answered with the room's unread count).
        """
        assert self._room is not None
        core, client_id = self.factory.core, frame.get("client_id")
        if kind == "read":
            d = core.mark_read(self._room, frame.get("seq"), self._identity)
            d.addCallback(lambda marked: self._send_frame({"type": "read", "seq": marked[0], "unread": marked[1]}))
        elif kind == "edit":
            d = core.edit(self._room, frame.get("target_seq"), frame.get("body"), self._identity, Peer(self._ip, self))
        else:
            d = core.delete(self._room, frame.get("target_seq"), self._identity, Peer(self._ip, self))
        d.addCallbacks(lambda _: None, self._post_failed, errbackArgs=(client_id,))

    def _reauthenticate(self, token: object) -> None:
        """
        A fresh token for the same user: the connection lives on until it
        expires in turn.
        """
        auth = self.factory.auth
        if auth is None or auth.tokens is None or self._identity.via != "token":
            raise ChatError("not_allowed", "This connection was not opened with a token.")
        identity = auth.tokens.verify(token)
        if identity.user_id != self._identity.user_id:
            raise ChatError("not_allowed", "A fresh token must be for the same user (sub).")
        self._identity = identity
        self._watch_expiry()
        self._send_frame({"type": "auth", "expires": identity.expires})

    def _posted(self, message: Message) -> None:
        self._rejected = 0
        self.factory.posted()

    def _post_failed(self, failure: Failure, client_id: Any) -> None:
        if self._closed:
            return
        error = failure.value
        if isinstance(error, ChatError):
            if error.code == "rate_limited":
                self._refused(error, client_id)
                return
            self.factory.rejected(error.code)
            self._send_error(error, client_id)
            return
        self._log.failure("Storing a message failed", failure)
        self._send_error(
            ChatError("internal_error", "The message could not be stored."),
            client_id,
        )

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        """
        Stop following the room, also if the history is still loading, and
        give back the connection's place.
        """
        self._closed = True
        self._sending = False
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None
        self._leave()
        # The connection's place, taken by the HTTP channel that carried
        # the handshake, is this protocol's to give back now.
        self.factory.connection_lost(self.transport)
        if self._admitted:
            self._admitted = False
            self.factory.closed(self)
            self._log.info(
                "WebSocket closed: {ip} in {room} (code {code})",
                ip=self._ip,
                room=self._room,
                code=code,
            )


def _credentials(request: ConnectionRequest) -> Credentials:
    """
    What a handshake carries: C{?token=}, C{Authorization: Bearer}, the
    session cookie (Autobahn gives the headers with lower-case names).

    @raise ChatError: C{invalid_token} for another Authorization scheme.
    """
    headers = request.headers
    bearer = None
    header = headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ChatError("invalid_token", "Send Authorization: Bearer TOKEN (or ?token=).")
        bearer = value.strip()
    tokens = request.params.get("token")
    cookie = None
    if "cookie" in headers:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers["cookie"])
        except CookieError:
            pass
        morsel = jar.get(SESSION_COOKIE.decode("ascii"))
        if morsel is not None:
            cookie = morsel.value.encode("latin-1")
    return Credentials(bearer, tokens[-1] if tokens else None, cookie, False)


class ChatWebSocketFactory(WebSocketServerFactory):
    """
    Builds L{ChatWebSocketProtocol}s that share one L{ChatCore}.

    Each message is framed once (C{prepareMessage}) and the same prepared
    message is sent to every recipient.

    @param metrics: optional; told about connections, posts and rejections.
    """

    protocol = ChatWebSocketProtocol  # type: ignore[assignment]
    #: The class L{configured} subclasses with this factory's options.
    base_protocol: Type[ChatWebSocketProtocol] = ChatWebSocketProtocol

    def __init__(
        self,
        core: ChatCore,
        *args: Any,
        metrics: Any = None,
        clock: Any = None,
        auto_ping: float = 30.0,
        slow_consumer_limit: int = SLOW_CONSUMER_LIMIT,
        connections: Optional[Connections] = None,
        auth: Optional[Authenticator] = None,
        sessions: Optional[SessionWatch] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.core = core
        #: Who clients are (None: every client is a guest).
        self.auth = auth
        #: Closes connections whose session ends.
        self.sessions = sessions
        self._connections = connections
        self.metrics = metrics
        #: With a clock, frames may be sent at once (L{chatd._send}), reads
        #: are handled a slice at a time, and frames other than messages
        #: are rate-limited, per connection.
        self.clock = clock
        self.ticks = Ticks(clock) if clock is not None else None
        self.frames = RateLimiter(clock, FRAME_BURST, FRAMES_PER_SECOND) if clock is not None else None
        self.slow_consumer_limit = slow_consumer_limit
        self.connections: Set[ChatWebSocketProtocol] = set()
        limit = frame_limit(core.max_body)
        self.setProtocolOptions(
            maxFramePayloadSize=limit,
            maxMessagePayloadSize=limit,
            # No HTML status page (and its ?redirect=) for plain GETs; the
            # web adapter answers those itself.
            webStatus=False,
            # Send the close frame (e.g. 1009 for an oversized message) so
            # the client learns why, instead of just dropping the socket.
            failByDrop=False,
            # Reap dead and half-open connections: ping when idle, drop if
            # no pong comes back.
            autoPingInterval=auto_ping,
            autoPingTimeout=auto_ping,
        )
        self._last_message: Optional[Message] = None
        self._last_prepared: Optional[PreparedMessage] = None
        self._last_signal: Optional[bytes] = None
        self._last_signal_frame = b""

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        """
        Autobahn's, and the protocol class that holds the options
        (L{configured}).
        """
        super().setProtocolOptions(*args, **kwargs)
        self.protocol = configured(self.base_protocol, self)

    def resetProtocolOptions(self) -> None:
        super().resetProtocolOptions()
        self.protocol = configured(self.base_protocol, self)

    def prepared(self, message: Message) -> PreparedMessage:
        """
        C{message} framed for sending (C{prepareMessage}).  The core offers
        each new message to all of a room's subscribers before the next
        one, so remembering the last message frames it once per fan-out.
        """
        if message is not self._last_message or self._last_prepared is None:
            # Server frames are unmasked and not compressed (chatd does not
            # negotiate permessage-deflate), so the frame is the same for all.
            self._last_prepared = self.prepareMessage(message.json)
            self._last_message = message
        return self._last_prepared

    def signal_frame(self, body: bytes) -> bytes:
        """
        A presence or typing frame's JSON as a complete WebSocket frame:
        made once per frame however many connections it goes to (the
        presence of a room hands every listener the same bytes).
        """
        if body is not self._last_signal:
            self._last_signal_frame = self.prepareMessage(body).payloadHybi
            self._last_signal = body
        return self._last_signal_frame

    def frame(self, message: Message) -> bytes:
        """
        C{message} as the bytes of a complete WebSocket frame.
        """
        if message is self._last_message and self._last_prepared is not None:
            return self._last_prepared.payloadHybi
        return self.prepared(message).payloadHybi

    # -- bookkeeping -----------------------------------------------------------

    def opened(self, protocol: ChatWebSocketProtocol) -> None:
        self.connections.add(protocol)
        if self.metrics is not None:
            self.metrics.websocket_connections.inc()

    def closed(self, protocol: ChatWebSocketProtocol) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            if self.metrics is not None:
                self.metrics.websocket_connections.dec()

    def connection_lost(self, transport: Any) -> None:
        """
        A connection upgraded to a WebSocket is gone: give back its place
        among the server's connections.
        """
        if self._connections is not None:
            self._connections.close(transport)

    def posted(self) -> None:
        if self.metrics is not None:
            self.metrics.websocket_posted.inc()

    def rejected(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()

    def shutdown(self, timeout: float, clock: Any) -> Deferred:
        """
        Close every connection with 1001 (going away) and wait, at most
        C{timeout} seconds, for them to go.
        """
        waits = []
        for protocol in list(self.connections):
            done: Deferred = Deferred()
            protocol.is_closed.addBoth(lambda _, d=done: d.callback(None))
            waits.append(done)
            protocol.close_with(CLOSE_GOING_AWAY, "The server is shutting down.")
        d = DeferredList(waits, consumeErrors=True)
        d.addTimeout(timeout, clock, onTimeoutCancel=lambda *_: None)
        return d
