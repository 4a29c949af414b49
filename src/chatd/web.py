# -*- test-case-name: tests.test_web -*-
"""
The HTTP adapter: HTML pages, the JSON/JSONP long-poll and POST API, the
tutorial-compatible long-poll endpoint, static files, and the doorway to
the WebSocket at C{/ws/<room>}.

Every API error is a specific 4xx (or 500) with a JSON body
C{{"error": CODE, "detail": TEXT}}; no traceback reaches a client.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, cast
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Request, Site
from twisted.web.static import File
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from chatd._http import EXTRA_REASONS, ChatSite
from chatd.core import (
    Batch,
    ChatCore,
    ChatError,
    Message,
    Peer,
    Room,
    Ticket,
    encode_json,
    parse_cursor,
)
from chatd.metrics import CONTENT_TYPE, Metrics

__all__ = ["ChatWeb", "MAX_REQUEST_BODY", "make_environment"]

#: The largest request body read from a client, in bytes.
MAX_REQUEST_BODY = 64 * 1024

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0

_CALLBACK = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*\Z")
_MAX_CALLBACK = 64

_JSON = b"application/json; charset=utf-8"
_JAVASCRIPT = b"application/javascript; charset=utf-8"
_HTML = b"text/html; charset=utf-8"

# Pages may run scripts and open connections only to chatd itself.
_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; "
    b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
    b"form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)

# Reason phrases twisted.web does not know.

_INTERNAL_ERROR = ("internal_error", "The server failed to handle this request.")

_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
}


def make_environment(templates: Path) -> Environment:
    """
    The Jinja2 environment for chatd's pages: autoescaping on, templates
    from C{templates}.
    """
    env = Environment(
        loader=FileSystemLoader(str(templates)),
        autoescape=select_autoescape(default=True, default_for_string=True),
        auto_reload=False,
    )
    env.filters["timestamp"] = _timestamp
    return env


def _timestamp(seconds: float) -> str:
    """
    A UTC time for pages rendered without JavaScript; the page's script
    shows it in the reader's own time zone.
    """
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def _query(request: IRequest, name: str) -> Optional[str]:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ChatError("invalid_parameter", f"{name} is not valid UTF-8.") from None


def _bounded_int(
    request: IRequest, name: str, default: int, low: int, high: int
) -> int:
    return _int_value(_query(request, name), name, default, low, high)


def _int_value(value: Optional[str], name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or int(value) < low:
        raise ChatError(
            "invalid_parameter", f"{name} must be a whole number of at least {low}."
        )
    return min(int(value), high)


def _bounded_seconds(request: IRequest, name: str, default: float, high: float) -> float:
    return _seconds_value(_query(request, name), name, default, high)


def _seconds_value(value: Optional[str], name: str, default: float, high: float) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ChatError("invalid_parameter", f"{name} must be a number of seconds >= 0.")
    return min(seconds, high)


def _callback(request: IRequest) -> Optional[bytes]:
    return _callback_value(_query(request, "callback"))


def _callback_value(value: Optional[str]) -> Optional[bytes]:
    """
    The JSONP callback name, if any; never reflected unless it is a plain
    JavaScript identifier path.
    """
    if value is None:
        return None
    if len(value) > _MAX_CALLBACK or not _CALLBACK.match(value):
        raise ChatError(
            "invalid_callback",
            "callback must be a JavaScript identifier path "
            "(letters, digits, '_', '$' and dots; at most 64 characters).",
        )
    return value.encode("ascii")


def _jsonp(callback: Optional[bytes], body: bytes) -> Tuple[bytes, bytes]:
    """
    The content type and body of a JSON answer, wrapped for JSONP when
    there is a callback.
    """
    if callback is not None:
        return _JAVASCRIPT, callback + b"(" + body + b");"
    return _JSON, body


def _read_body(request: IRequest) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BODY:
        raise ChatError(
            "request_too_large",
            f"The request body is over {MAX_REQUEST_BODY} bytes.",
            413,
        )
    body = request.content.read(MAX_REQUEST_BODY + 1)
    if len(body) > MAX_REQUEST_BODY:
        raise ChatError(
            "request_too_large",
            f"The request body is over {MAX_REQUEST_BODY} bytes.",
            413,
        )
    return body


def _form_or_json(request: IRequest) -> Dict[str, Any]:
    """
    The fields of a POST body: a JSON object, or an URL-encoded form.

    @raise ChatError: 400 for a malformed body, 413 for a large one, 415
        for any other content type.
    """
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0]
    content_type = content_type.strip().lower()
    body = _read_body(request)
    if content_type == b"application/json":
        try:
            fields = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ChatError("invalid_json", "The request body is not valid JSON.") from None
        if not isinstance(fields, dict):
            raise ChatError("invalid_json", "The request body must be a JSON object.")
        return fields
    if content_type == b"application/x-www-form-urlencoded":
        try:
            form = parse_qs(
                body.decode("ascii"), keep_blank_values=True, strict_parsing=False,
                encoding="utf-8", errors="strict",
            )
        except (UnicodeDecodeError, ValueError):
            raise ChatError("invalid_form", "The form is not valid URL-encoded UTF-8.") from None
        return {key: values[-1] for key, values in form.items()}
    raise ChatError(
        "unsupported_media_type",
        "Send application/json or application/x-www-form-urlencoded.",
        415,
    )


def _ip(request: IRequest) -> str:
    return getattr(request.getClientAddress(), "host", "?")


#: A long-poll answer holds at most this many bytes of messages (the client
#: asks again for the rest), so a slow reader pins a bounded buffer.
MAX_RESPONSE_BYTES = 1024 * 1024


def _within_budget(batch: Batch) -> bytes:
    body = batch.json
    if len(body) <= MAX_RESPONSE_BYTES or len(batch.messages) <= 1:
        return body
    size, keep = 0, 0
    for message in batch.messages:
        size += len(message.json) + 1
        if size > MAX_RESPONSE_BYTES - 256:
            break
        keep += 1
    smaller = Batch(batch.room, batch.messages[: max(keep, 1)], batch.last_seq, batch.reset, batch.first_seq)
    return smaller.json


class _Waiter:
    """
    One short-path long-poll (L{ChatWeb.long_poll}): answered, failed or
    cancelled once, its connection place given back once.
    """

    __slots__ = ("web", "ticket", "callback", "write", "forget", "finished")

    def __init__(
        self,
        web: "ChatWeb",
        ticket: Ticket,
        callback: Optional[bytes],
        write: Callable[[int, bytes, bytes], None],
    ) -> None:
        self.web = web
        self.ticket = ticket
        self.callback = callback
        self.write = write
        self.forget: Optional[Callable[[], None]] = None
        self.finished = False

    def done(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        # forget holds this waiter's answer, and so the waiter: a cycle
        # that would leave every long-poll to the garbage collector.
        self.forget = None
        self.web._end_long_poll(self.ticket)
        return True

    def answer(self, batch: Batch) -> None:
        if self.done():
            self.write(200, *_jsonp(self.callback, _within_budget(batch)))

    def failed(self, failure: Failure) -> None:
        if not self.done():
            return
        if failure.check(ChatError):
            error = cast(ChatError, failure.value)
            status, code, detail = error.status, error.code, error.detail
        else:
            self.web.log.failure("Unhandled error serving a long-poll", failure)
            status, code, detail = 500, *_INTERNAL_ERROR
        self.write(status, _JSON, encode_json({"error": code, "detail": detail}))

    def cancel(self) -> None:
        forget = self.forget
        if self.done() and forget is not None:
            forget()


class _LongPoll(NamedTuple):
    """
    A long-poll's checked parameters (L{ChatWeb.prepare_long_poll}).
    """

    room: str
    after: Optional[int]
    limit: int
    timeout: float
    callback: Optional[bytes]


def _room_info(room: Room) -> dict:
    return {
        "name": room.name,
        "last_seq": room.last_seq,
        "clients": room.clients,
        "last_activity": room.last_activity,
    }


class _Root(Resource):
    """
    The site's root: refuses URLs that are not UTF-8 with a JSON 400
    (Klein would answer them with a bare text page), then routes.
    """

    isLeaf = True

    def __init__(self, app: IResource) -> None:
        super().__init__()
        self._app = app

    def render(self, request: IRequest) -> Any:
        try:
            b"/".join(request.postpath).decode("utf-8")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            request.setHeader(b"content-type", _JSON)
            request.setHeader(b"x-content-type-options", b"nosniff")
            return encode_json(
                {"error": "invalid_url", "detail": "The URL path is not valid UTF-8."}
            )
        return self._app.render(request)


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


class _StaticFiles(File):
    """
    Static files without directory listings.
    """

    def directoryListing(self) -> IResource:
        return NoResource()


class ChatWeb:
    """
    The Klein application.  State lives on the instance; the route table
    on the class.

    @param core: the chat core.
    @param env: the Jinja2 environment for pages.
    @param static: the folder of static files.
    @param websocket: the resource that takes over a C{/ws/<room>} request.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        core: ChatCore,
        env: Environment,
        static: Path,
        websocket: IResource,
        metrics: Optional[Metrics] = None,
        allow_origins: Sequence[str] = (),
        serve_metrics: bool = True,
    ) -> None:
        self._core = core
        self._metrics = metrics
        #: Long-polls in progress, read by the metrics at each scrape.
        self.long_polls = 0
        if metrics is not None:
            metrics.connections.labels("longpoll").set_function(lambda: self.long_polls)
        self._allow_origins = {o.rstrip("/").lower() for o in allow_origins}
        self._serve_metrics = serve_metrics
        #: Set when the server starts shutting down: /readyz says no, and
        #: long-polls are answered at once.
        self.shutting_down = False
        self._static = _StaticFiles(str(static))
        self._websocket = websocket
        # Loaded once here, never per request.
        self._index = env.get_template("index.html")
        self._room_page = env.get_template("room.html")
        self._error_page = env.get_template("error.html")

    def resource(self) -> IResource:
        """
        The root resource to serve.
        """
        return _Root(self.app.resource())

    def site(self, timeout: float, access_log: bool = False, reactor: Any = None) -> Site:
        """
        The Site to serve: L{resource} with L{ChatRequest}, closing
        connections idle for C{timeout} seconds, long-poll GETs on the
        channel's short path (L{long_poll}).  With C{access_log}, every
        request takes twisted.web's full path and is logged, a line each.
        """
        site = ChatSite(self.resource(), access_log=access_log, timeout=timeout, reactor=reactor)
        site.requestFactory = ChatRequest
        if not access_log:
            site.long_polls = self
        return site

    # -- responses -----------------------------------------------------------

    def _json(
        self, request: IRequest, body: bytes, status: int = 200, jsonp: bool = True
    ) -> bytes:
        content_type, body = _jsonp(_callback(request) if jsonp else None, body)
        request.setResponseCode(status, EXTRA_REASONS.get(status))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", content_type)
        return body

    def _page(self, request: IRequest, template: Any, status: int = 200, **context: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", _HTML)
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"same-origin")
        return template.render(**context).encode("utf-8")

    @app.handle_errors(ChatError)
    def _chat_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(ChatError, failure.value)
        if error.retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % (max(1, math.ceil(error.retry_after)),))
        if error.status in (403, 413, 429, 503):
            self._log_rejection(request, error.code)
        return self._error_json(request, error.status, error.code, error.detail)

    def _log_rejection(self, request: IRequest, reason: str) -> None:
        self.log.info(
            "Refused {method} {path} from {ip}: {reason}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            ip=_ip(request),
            reason=reason,
        )
        if self._metrics is not None:
            self._metrics.rejected.labels(reason).inc()

    @app.handle_errors(HTTPException)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        error = cast(HTTPException, failure.value)
        status = error.code or 500
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"allow", ", ".join(error.valid_methods).encode("ascii"))
        code = _HTTP_ERROR_CODES.get(status, "http_error")
        detail = error.description or error.name
        return self._error_json(request, status, code, detail)

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("Unhandled error serving {uri}", failure, uri=request.uri)
        return self._error_json(request, 500, *_INTERNAL_ERROR)

    def _error_json(self, request: IRequest, status: int, code: str, detail: str) -> bytes:
        body = encode_json({"error": code, "detail": detail})
        return self._json(request, body, status, jsonp=False)

    # -- pages ---------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        """
        The room list and the create-room form.
        """
        rooms = [_room_info(room) for room in self._core.rooms()]
        return self._page(request, self._index, rooms=rooms)

    def _chat_page(self, request: IRequest, name: str, transport: str) -> bytes:
        try:
            room = self._core.room(name)
        except ChatError as e:
            return self._page(
                request, self._error_page, e.status, title="No such room", detail=e.detail
            )
        return self._page(request, self._room_page, room=_room_info(room), transport=transport)

    @app.route("/rooms/<room>", methods=["GET"])
    def room_page(self, request: IRequest, room: str) -> bytes:
        """
        A room's chat page, over WebSocket.
        """
        return self._chat_page(request, room, "websocket")

    @app.route("/rooms/<room>/longpoll", methods=["GET"])
    def longpoll_page(self, request: IRequest, room: str) -> bytes:
        """
        A room's chat page, over long-poll.
        """
        return self._chat_page(request, room, "longpoll")

    @app.route("/static/", branch=True, methods=["GET"])
    def static(self, request: IRequest) -> IResource:
        """
        JavaScript and CSS.
        """
        return self._static

    # -- rooms API -----------------------------------------------------------

    @app.route("/api/rooms", methods=["GET"])
    def list_rooms(self, request: IRequest) -> bytes:
        """
        C{{"rooms": [{"name", "last_seq", "clients"}, ...]}}.
        """
        rooms = [_room_info(room) for room in self._core.rooms()]
        return self._json(request, encode_json({"rooms": rooms}))

    @app.route("/api/rooms", methods=["POST"])
    def create_room(self, request: IRequest) -> Deferred:
        """
        Create a room from C{{"name": ...}} (JSON or form): 201, or 303 to
        the room's page for a form.
        """
        fields = _form_or_json(request)
        is_form = not (request.getHeader(b"content-type") or b"").lower().startswith(
            b"application/json"
        )

        def created(room: Room) -> bytes:
            location = f"/rooms/{room.name}".encode("ascii")
            if is_form:
                request.setResponseCode(303)
                request.setHeader(b"location", location)
                return b""
            request.setHeader(b"location", b"/api/rooms/" + room.name.encode("ascii"))
            return self._json(request, encode_json(_room_info(room)), 201, jsonp=False)

        return self._core.create_room(fields.get("name"), Peer(_ip(request))).addCallback(created)

    @app.route("/api/rooms/<room>", methods=["GET"])
    def room_info(self, request: IRequest, room: str) -> bytes:
        """
        One room's C{{"name", "last_seq", "clients"}}.
        """
        return self._json(request, encode_json(_room_info(self._core.room(room))))

    # -- messages API --------------------------------------------------------

    @app.route("/api/rooms/<room>/messages", methods=["GET"])
    def get_messages(self, request: IRequest, room: str) -> Deferred:
        """
        Long-poll for messages after C{after}, or page back before
        C{before}.
        """
        self._core.room(room)
        _callback(request)  # refuse a bad callback before waiting
        after = parse_cursor(_query(request, "after"), "after")
        before = parse_cursor(_query(request, "before"), "before")
        limit = _bounded_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        if before is not None:
            if after is not None:
                raise ChatError("invalid_parameter", "Give after or before, not both.")
            d = self._core.read_before(room, before, limit)
        else:
            timeout = _bounded_seconds(request, "timeout", DEFAULT_TIMEOUT, MAX_TIMEOUT)
            d = self._wait(_ip(request), room, after, limit, timeout)

        def respond(batch: Batch) -> bytes:
            return self._json(request, _within_budget(batch))

        return d.addCallback(respond)

    def _wait(
        self, ip: str, room: str, after: Optional[int], limit: int, timeout: Optional[float]
    ) -> Deferred:
        """
        Long-poll within the connection limits, counted as a connection
        while it waits.
        """
        ticket, timeout = self._start_long_poll(ip, timeout)

        def done(result: object) -> object:
            self._end_long_poll(ticket)
            return result

        try:
            d = self._core.wait(room, after, limit, timeout)
        except BaseException:
            done(None)
            raise
        return d.addBoth(done)

    def _start_long_poll(self, ip: str, timeout: Optional[float]) -> Tuple[Ticket, Optional[float]]:
        """
        Take a connection place for a long-poll and count it.

        @return: its ticket, and how long it may wait (not at all while
            shutting down).
        """
        ticket = self._core.admit(ip)
        self.long_polls += 1
        return ticket, 0.0 if self.shutting_down else timeout

    def _end_long_poll(self, ticket: Ticket) -> None:
        ticket.release()
        self.long_polls -= 1

    def prepare_long_poll(self, room: str, query: Mapping[str, str]) -> "_LongPoll":
        """
        The parameters of a C{GET /api/rooms/<room>/messages?after=...},
        checked as L{get_messages} checks them, for the HTTP channel's short
        path (L{chatd._http.ChatChannel}, which keeps the result for the
        same request line).

        @param query: the query's parameters (the last value of each).
        @raise ChatError: for what L{get_messages} would refuse; the channel
            then hands the request to it, for the same answer.
        """
        if "before" in query:
            raise ChatError("invalid_parameter", "Paging back takes the full path.")
        return _LongPoll(
            room,
            parse_cursor(query.get("after"), "after"),
            _int_value(query.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
            _seconds_value(query.get("timeout"), "timeout", DEFAULT_TIMEOUT, MAX_TIMEOUT),
            _callback_value(query.get("callback")),
        )

    def long_poll(
        self, poll: "_LongPoll", ip: str, write: Callable[[int, bytes, bytes], None]
    ) -> Callable[[], None]:
        """
        Start a prepared long-poll: the same wait as L{get_messages}, with
        no Deferred (this is the path every long-poll takes).  C{write} is
        called once, with the answer's status, content type and body (a
        JSON error if the store fails), unless the returned function is
        called first (the client went away).

        @raise ChatError: for a room that does not exist or a client over
            its connection limits (the channel hands those to the full path).
        """
        ticket, timeout = self._start_long_poll(ip, poll.timeout)
        waiter = _Waiter(self, ticket, poll.callback, write)
        try:
            waiter.forget = self._core.wait_for(
                poll.room, poll.after, poll.limit, timeout, waiter.answer, waiter.failed
            )
        except BaseException:
            waiter.done()
            raise
        return waiter.cancel

    @app.route("/api/rooms/<room>/messages", methods=["POST"])
    def post_message(self, request: IRequest, room: str) -> Deferred:
        """
        Post C{{"nick", "body", "client_id"}} (JSON or form); 201 with the
        stored message once it is committed.
        """
        self._core.room(room)
        fields = _form_or_json(request)
        d = self._core.post(
            room, fields.get("nick"), fields.get("body"), fields.get("client_id"), Peer(_ip(request))
        )

        def respond(message: Message) -> bytes:
            self._count_post()
            return self._json(request, message.json, 201, jsonp=False)

        return d.addCallback(respond)

    # -- WebSocket -----------------------------------------------------------

    @app.route("/ws/<room>", methods=["GET"])
    def websocket(self, request: IRequest, room: str) -> IResource:
        """
        Hand a WebSocket upgrade for an existing room to Autobahn.
        """
        self._core.room(room)
        parse_cursor(_query(request, "after"), "after")
        self._check_origin(request)
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() != b"websocket":
            request.setHeader(b"upgrade", b"websocket")
            raise ChatError(
                "upgrade_required", "This is a WebSocket endpoint; connect with ws://.", 426
            )
        return self._websocket

    def _check_origin(self, request: IRequest) -> None:
        """
        Refuse cross-site WebSocket hijacking: a browser's Origin must be
        this server's own, or one given with --allow-origin.  Clients that
        send no Origin (not browsers) are let through.
        """
        origin = request.getHeader(b"origin")
        if origin is None:
            return
        text = origin.decode("latin-1").rstrip("/").lower()
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        if text in self._allow_origins or urlsplit(text).netloc == host and host:
            return
        raise ChatError(
            "origin_not_allowed",
            f"WebSocket connections from {text!r} are not allowed here.",
            403,
        )

    def _count_post(self) -> None:
        if self._metrics is not None:
            self._metrics.posted.labels("http").inc()

    # -- health and metrics --------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request: IRequest) -> bytes:
        """
        Liveness: the process answers.
        """
        return self._json(request, b'{"status":"ok"}', jsonp=False)

    @app.route("/readyz", methods=["GET"])
    def readyz(self, request: IRequest) -> Deferred:
        """
        Readiness: accepting work, and the store answers within 2 seconds.
        """
        if self.shutting_down:
            return succeed(self._not_ready(request, "The server is shutting down."))
        d = self._core.ping(2.0)

        def ready(_: object) -> bytes:
            return self._json(request, b'{"status":"ready"}', jsonp=False)

        def failed(failure: Failure) -> bytes:
            return self._not_ready(request, f"The store does not answer: {failure.getErrorMessage()}")

        return d.addCallbacks(ready, failed)

    def _not_ready(self, request: IRequest, detail: str) -> bytes:
        return self._error_json(request, 503, "not_ready", detail)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        """
        Prometheus metrics (unless they are served on --metrics-port).
        """
        if self._metrics is None or not self._serve_metrics:
            raise ChatError("not_found", "Metrics are not served here.", 404)
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._metrics.render()

    # -- the tutorial's long-poll protocol -----------------------------------

    def _tutorial(self, request: IRequest, payload: dict) -> bytes:
        # Cross-origin, as in the tutorial: the page is served by another
        # origin and reads these answers.  No credentials are involved.
        request.setHeader(b"access-control-allow-origin", b"*")
        return self._json(request, json.dumps(payload).encode("ascii"))

    @app.route("/rooms/<room>/poll", methods=["GET"])
    def tutorial_poll(self, request: IRequest, room: str) -> Any:
        """
        The tutorial's long-poll: one message after cursor C{lastupdate}
        (the previous answer's C{timestamp}, which is a seq here).
        """
        self._core.room(room)
        _callback(request)
        raw = _query(request, "lastupdate")
        if raw is None or raw == "-1":
            return self._tutorial(
                request, {"status": 1, "timestamp": 0, "data": "connected..."}
            )
        after = parse_cursor(raw, "lastupdate")
        # The tutorial holds the request until a message exists; a client
        # may ask for a bound with ?timeout=.
        timeout: Optional[float] = None
        if _query(request, "timeout") is not None:
            timeout = _bounded_seconds(request, "timeout", 0, MAX_TIMEOUT)

        def respond(batch: Batch) -> bytes:
            if not batch.messages:
                # Only reached with an explicit ?timeout=: no news, same cursor.
                return self._tutorial(
                    request, {"status": 0, "timestamp": after, "data": ""}
                )
            message = batch.messages[0]
            return self._tutorial(
                request, {"status": 1, "timestamp": message.seq, "data": message.body}
            )

        return self._wait(_ip(request), room, after, 1, timeout).addCallback(respond)

    @app.route("/rooms/<room>/poll", methods=["POST"])
    def tutorial_post(self, request: IRequest, room: str) -> Deferred:
        """
        The tutorial's post: form field C{new_message}.
        """
        self._core.room(room)
        request.setHeader(b"access-control-allow-origin", b"*")
        fields = _form_or_json(request)
        d = self._core.post(
            room, fields.get("nick"), fields.get("new_message"), None, Peer(_ip(request))
        )

        def respond(message: Message) -> bytes:
            self._count_post()
            return self._tutorial(
                request, {"status": 1, "timestamp": message.seq, "data": message.body}
            )

        return d.addCallback(respond)
