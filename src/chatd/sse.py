# -*- test-case-name: tests.test_sse -*-
"""
The Server-Sent Events transport: C{GET /api/rooms/<room>/events}, a
C{text/event-stream} a browser's C{EventSource} reads.

Every event of the room's log goes out with C{id: <seq>}, so an
C{EventSource} that reconnects sends C{Last-Event-ID} and resumes after the
last event it had: no gap, no duplicate, whichever node it reaches.  A
stream is bounded like a long-poll answer: it ends after
L{MAX_STREAM_SECONDS} (or L{MAX_STREAM_BYTES}), and the browser reconnects
by itself after the C{retry:} it was told, from where it was.  Comments
(C{: heartbeat}) keep proxies from closing a quiet stream.

Like a WebSocket, a stream is one subscription of the core's
(L{chatd.core.ChatCore.subscribe}); the request's transport pauses it when
its buffer is full, and a client that stops reading is dropped once
L{SLOW_CONSUMER_LIMIT} bytes wait for it.  Each event is encoded once for
every stream (L{event_bytes}), and a stream's events of one reactor
iteration go out in one write at the start of the next
(L{chatd._send.Ticks}), as a WebSocket's do.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from chatd._send import Backpressure
from chatd.model import ChatError, Message, encode_json
from chatd.room import Subscription

__all__ = [
    "EventStream",
    "HEARTBEAT",
    "MAX_STREAM_BYTES",
    "MAX_STREAM_SECONDS",
    "RETRY_MS",
    "SLOW_CONSUMER_LIMIT",
]

#: How long one response streams before it ends (the client resumes with
#: Last-Event-ID); under the server's idle timeout, which only bytes from
#: the client restart.
MAX_STREAM_SECONDS = 55.0
#: Bytes of events one response carries before it ends likewise.
MAX_STREAM_BYTES = 4 * 1024 * 1024
#: A comment this often, so that proxies see a live stream.
HEARTBEAT = 15.0
#: How long a browser waits before reconnecting (the C{retry:} field).
RETRY_MS = 1000
#: Bytes that may wait for a client that does not read before it is dropped.
SLOW_CONSUMER_LIMIT = 1024 * 1024

#: chatd's Content-Type for event streams.
CONTENT_TYPE = b"text/event-stream; charset=utf-8"

_last: List[Any] = [None, b""]


def event_bytes(message: Message) -> bytes:
    """
    C{message} as an event: its seq as the id, its JSON (which holds no
    line break) as the data.  The last one made is kept: the core offers
    each message to every stream of its room before the next one.
    """
    if _last[0] is not message:
        _last[0], _last[1] = message, b"id: %d\ndata: %s\n\n" % (message.seq, message.json)
    return _last[1]  # type: ignore[no-any-return]


_last_signal: List[Any] = [None, b""]


def _signal_bytes(kind: str, body: bytes) -> bytes:
    """
    A presence or typing frame as an event without an id; the last one
    made is kept (a room hands every stream the same frame).
    """
    if _last_signal[0] is not body:
        _last_signal[0], _last_signal[1] = body, b"event: %s\ndata: %s\n\n" % (kind.encode("ascii"), body)
    return _last_signal[1]  # type: ignore[no-any-return]


Subscribe = Callable[
    [Callable[[Message], None], Callable[[int], None], Callable[[ChatError], None]], Subscription
]


class EventStream:
    """
    One client's stream of a room's events.

    @param request: the C{GET}, its answer not started yet.
    @param clock: for the stream's bounds and heartbeats.
    @param expires: when the credentials it was opened with expire (a
        token's C{exp}, plus a grace period), or None.
    @param dropped: called if the client is dropped for not reading.
    @param ticks: the reactor iterations (L{chatd._send.Ticks}) a
        stream's events are gathered by; None: each is written at once.
    """

    log = Logger()

    def __init__(
        self,
        request: Any,
        clock: Any,
        expires: Optional[float] = None,
        dropped: Optional[Callable[[], None]] = None,
        ticks: Any = None,
    ) -> None:
        self._request = request
        self._dropped = dropped
        self._ticks = ticks
        #: Events held until the next reactor iteration (with ticks).
        self._held: Optional[List[bytes]] = None
        self._clock = clock
        self._expires = expires
        self._subscription: Optional[Subscription] = None
        self._timers: list = []
        #: Paused by the request's transport while its buffer is full.
        self._backpressure = Backpressure()
        self._sent = 0
        #: Fires (with C{b""}: the answer is whole) when the stream ends;
        #: cancelling it (the client went away) stops the stream.
        self.done: Deferred = Deferred(lambda _: self._stop())
        self._over = False
        #: Whether it ended because its reader was removed from the room.
        self.was_revoked = False

    def start(self, subscribe: Subscribe) -> Deferred:
        """
        Send the stream's head, then every event C{subscribe} hands over.

        @return: L{done}.
        """
        request = self._request
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        # nginx, and proxies like it, pass the events on at once.
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self._backpressure, True)
        self._write(b"retry: %d\n\n" % (RETRY_MS,))
        lifetime = MAX_STREAM_SECONDS
        if self._expires is not None:
            lifetime = max(0.0, min(lifetime, self._expires - self._clock.seconds()))
        self._timers.append(self._clock.callLater(lifetime, self.end))
        self._timers.append(self._clock.callLater(HEARTBEAT, self._heartbeat))
        try:
            self._subscription = subscribe(self.message, self.reset, self.revoked)
        except Exception:
            self._stop()
            raise
        return self.done

    # -- events -------------------------------------------------------------

    def message(self, message: Message) -> None:
        """
        A log event (a message, a membership change): its JSON (which
        holds no line break) with its seq as the event's id.
        """
        event = event_bytes(message)
        held = self._held
        if held is not None:
            held.append(event)
            return
        if self._ticks is None:
            self._write(event)
            if self._sent > MAX_STREAM_BYTES:
                self.end()
            return
        self._held = [event]
        self._ticks.flush_later(self)

    def signal(self, kind: str, body: bytes) -> None:
        """
        A presence or typing frame (L{chatd.presence}): C{event: KIND}
        with its JSON, and no C{id:} (it is not in the log, so a
        reconnecting browser's Last-Event-ID stays the last seq), in order
        with the log's events.
        """
        event = _signal_bytes(kind, body)
        held = self._held
        if held is not None:
            held.append(event)
        elif self._ticks is None:
            self._write(event)
        else:
            self._held = [event]
            self._ticks.flush_later(self)

    def flush(self) -> None:
        """
        Write the events held back, in one piece (L{chatd._send.Ticks}).
        """
        held, self._held = self._held, None
        if held and not self._over:
            self._write(held[0] if len(held) == 1 else b"".join(held))
            if self._sent > MAX_STREAM_BYTES:
                self.end()

    def reset(self, first_seq: int) -> None:
        """
        The cursor was older than what the store holds: say so, with the
        id the stream resumes from.
        """
        self.flush()
        body = encode_json({"type": "reset", "first_seq": first_seq})
        self._write(b"id: %d\nevent: reset\ndata: %s\n\n" % (first_seq - 1, body))

    def revoked(self, why: ChatError) -> None:
        """
        The user may no longer read the room (removed from it, kicked,
        banned): say why, and end.
        """
        self._subscription = None
        self.was_revoked = True
        self.flush()
        body = encode_json({"type": "revoked", "error": why.code, "detail": why.detail})
        self._write(b"event: revoked\ndata: %s\n\n" % body)
        self.end()

    def session_ended(self) -> None:
        """
        The session the stream was opened with ended: end (reconnecting,
        the client is refused).
        """
        self.end()

    def _heartbeat(self) -> None:
        self.flush()
        self._write(b": heartbeat\n\n")
        self._timers.append(self._clock.callLater(HEARTBEAT, self._heartbeat))

    # -- writing, and its bounds --------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._over:
            return
        backpressure = self._backpressure
        if backpressure.paused:
            backpressure.backlog += len(data)
            if backpressure.backlog > SLOW_CONSUMER_LIMIT:
                self.log.info("Dropping an event stream that was not being read")
                self._over = True
                self._stop()
                if self._dropped is not None:
                    self._dropped()
                # Aborted: closing would wait for the unread bytes.
                channel = self._request.channel
                if channel is not None:
                    channel.transport.abortConnection()
                return
        self._sent += len(data)
        self._request.write(data)

    # -- the end -------------------------------------------------------------

    def end(self) -> None:
        """
        End the stream: the answer is complete (the browser reconnects,
        with Last-Event-ID, after C{retry}).
        """
        if self._over:
            return
        held, self._held = self._held, None
        if held:
            self._write(b"".join(held))
        self._over = True
        self._stop()
        self.done.callback(b"")

    def _stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.stop()
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.active():
                timer.cancel()
        request = self._request
        if request.channel is not None and request.producer is self._backpressure:
            request.unregisterProducer()
