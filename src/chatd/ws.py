# -*- test-case-name: tests.test_ws -*-
"""
The WebSocket adapter: C{/ws/<room>} frames to and from the core.

Server frames are JSON text: C{message} frames (the core's messages, in
seq order), C{reset}, C{error} and C{pong}.  Client frames are a JSON
object C{{"type": "message", "nick": ..., "body": ..., "client_id": ...}},
C{{"type": "ping"}}, or plain text, which is taken as a message body.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import unquote

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatd.core import ChatCore, ChatError, Message, Subscription, encode_json, parse_cursor

__all__ = ["ChatWebSocketFactory", "ChatWebSocketProtocol", "MAX_FRAME"]

# Large enough for any valid message (4096 characters, up to 4 bytes each in
# UTF-8, JSON-escaped) with room to spare; anything bigger is abuse and gets
# close code 1009 from Autobahn.
MAX_FRAME = 64 * 1024

# RFC 6455 close code for data of a type the endpoint cannot accept.
CLOSE_UNSUPPORTED_DATA = 1003


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
    _closed = False

    def onConnect(self, request: ConnectionRequest) -> None:
        """
        Accept C{/ws/<room>[?after=SEQ]} for a room that exists.
        """
        prefix = "/ws/"
        path = request.path
        if not path.startswith(prefix):
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "No such endpoint.")
        name = unquote(path[len(prefix):])
        try:
            self.factory.core.room(name)
            after = request.params.get("after", [None])[-1]
            self._after = parse_cursor(after, "after")
        except ChatError as e:
            raise ConnectionDeny(e.status, e.detail) from None
        self._room = name

    def onOpen(self) -> None:
        """
        Start following the room: history first, then live messages.
        """
        assert self._room is not None
        try:
            self._subscription = self.factory.core.subscribe(
                self._room, self._after, self._send_message, self._send_reset
            )
        except ChatError as e:
            self._send_error(e)
            self.close_with(1011, e.detail)

    def close_with(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with a protocol-level close code
        (1001, 1003, 1008, ...), which Autobahn's C{sendClose} reserves for
        itself; the handshake timeout still applies.
        """
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def _send_message(self, message: Message) -> None:
        self.sendPreparedMessage(self.factory.prepared(message))

    def _send_reset(self, first_seq: int) -> None:
        self.sendMessage(encode_json({"type": "reset", "first_seq": first_seq}))

    def _send_error(self, error: ChatError, client_id: Any = None) -> None:
        frame: dict = {
            "type": "error",
            "code": error.code,
            "status": error.status,
            "detail": error.detail,
        }
        if isinstance(client_id, str):
            frame["client_id"] = client_id
        self.sendMessage(encode_json(frame))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """
        Handle one client frame.  Errors get an C{error} frame and leave
        the connection usable; binary frames close it (1003).
        """
        if isBinary:
            self.close_with(CLOSE_UNSUPPORTED_DATA, "Binary frames are not supported.")
            return
        try:
            self._handle(payload.decode("utf-8"))
        except ChatError as e:
            self._send_error(e)

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
        if kind == "ping":
            pong: dict = {"type": "pong"}
            if "id" in frame:
                pong["id"] = frame["id"]
            self.sendMessage(encode_json(pong))
            return
        if kind != "message":
            raise ChatError(
                "unknown_type",
                "A frame's type is 'message' or 'ping'.",
            )
        assert self._room is not None
        client_id = frame.get("client_id")
        d = self.factory.core.post(
            self._room, frame.get("nick"), frame.get("body"), client_id
        )
        # The sender's acknowledgement is its own message coming back
        # through the room, like everyone else's; only failures are ours.
        d.addErrback(self._post_failed, client_id)

    def _post_failed(self, failure: Failure, client_id: Any) -> None:
        if self._closed:
            return
        if isinstance(failure.value, ChatError):
            self._send_error(failure.value, client_id)
            return
        self._log.failure("Storing a message failed", failure)
        self._send_error(
            ChatError("internal_error", "The message could not be stored.", 500),
            client_id,
        )

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        """
        Stop following the room, also if the history is still loading.
        """
        self._closed = True
        if self._subscription is not None:
            self._subscription.stop()
            self._subscription = None


class ChatWebSocketFactory(WebSocketServerFactory):
    """
    Builds L{ChatWebSocketProtocol}s that share one L{ChatCore}.

    Each message is framed once (C{prepareMessage}) and the same bytes are
    written to every recipient.
    """

    protocol = ChatWebSocketProtocol  # type: ignore[assignment]

    def __init__(self, core: ChatCore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.core = core
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_FRAME,
            maxMessagePayloadSize=MAX_FRAME,
            # No HTML status page (and its ?redirect=) for plain GETs; the
            # web adapter answers those itself.
            webStatus=False,
            # Send the close frame (e.g. 1009 for an oversized message) so
            # the client learns why, instead of just dropping the socket.
            failByDrop=False,
        )
        self._last_message: Optional[Message] = None
        self._last_prepared: Any = None

    def prepared(self, message: Message) -> Any:
        """
        The framed form of C{message}.  The core offers each new message to
        all of a room's subscribers before the next one, so remembering the
        last message frames it once per fan-out.
        """
        if message is not self._last_message:
            self._last_prepared = self.prepareMessage(message.json)
            self._last_message = message
        return self._last_prepared
