# -*- test-case-name: tests.test_web,tests.test_longpoll -*-
"""
The HTTP adapter: HTML pages, the JSON/JSONP long-poll and POST API, the
tutorial-compatible long-poll endpoint, static files, and the doorway to
the WebSocket at C{/ws/<room>}.

Every HTTP byte is parsed by twisted.web (L{chatd._http}).  Routing is
Klein's, with one exception: C{GET /api/rooms/<room>/messages}, the
request a long-poll client sends again after every answer, goes from the
site's root straight to the handler Klein's route runs (L{_Root}), which
saves werkzeug's routing on every poll.  Both ways run the same code for
parameters, the answer and its errors, so they answer alike byte for byte
(C{tests/test_longpoll.py} checks this).

Every API error is a specific 4xx (or 500) with a JSON body
C{{"error": CODE, "detail": TEXT}}; no traceback reaches a client.

Before any route, L{_Root} checks where a request was addressed and, for
WebSocket upgrades and state-changing methods, which page sent it
(L{ChatWeb.check_request}): with C{--public-url}, a Host that is not one
of those URLs' is a 421, which is what stops DNS rebinding; a browser's
Origin that is not this server's own or an C{--allow-origin} one is a
403, which stops cross-site WebSocket hijacking and cross-site form posts.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import File
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import RequestRedirect

from chatd._http import MAX_REQUEST_BODY, ChatSite
from chatd._send import Ticks
from chatd._wire import REASONS, client_host, error_body, http_status, retry_after
from chatd.accounts import Accounts, validate_account_id
from chatd.auth import (
    SESSION_COOKIE,
    TOKEN_GRACE,
    Authenticator,
    Credentials,
    SessionWatch,
    check_csrf,
)
from chatd.core import ChatCore
from chatd.limits import Connections, RateLimiter
from chatd.metrics import CONTENT_TYPE, Metrics
from chatd.model import (
    GUEST,
    Batch,
    ChatError,
    Identity,
    Message,
    Peer,
    User,
    encode_json,
    parse_cursor,
    rate_limited,
    validate_display_name,
    validate_user_id,
)
from chatd.presence import (
    POLL_GRACE,
    STREAM_GRACE,
    Visit,
    validate_client,
    validate_flag,
    validate_seen,
)
from chatd.room import Room
from chatd.sse import EventStream

__all__ = ["ChatWeb", "MAX_REQUEST_BODY", "canonical_origin", "make_environment"]

DEFAULT_LIMIT = 100
#: POST /api/rooms/<room>/typing: a burst of this many, then this many a
#: second, per user (per IP for guests, who may be many behind one).  A
#: page sends one every few seconds; a typer's starts are limited again in
#: the room (chatd.presence).
TYPING_BURST = 30
TYPING_PER_SECOND = 5.0
MAX_LIMIT = 1000
DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 60.0

_CALLBACK = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*)*\Z")
_MAX_CALLBACK = 64
#: A room name as a path segment (what L{_Root} sends to the long-poll).
_ROOM_SEGMENT = re.compile(rb"[A-Za-z0-9_-]{1,64}\Z")

_JSON = b"application/json; charset=utf-8"
_JAVASCRIPT = b"application/javascript; charset=utf-8"
_HTML = b"text/html; charset=utf-8"

# Pages may run scripts and open connections only to chatd itself.
_CSP = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; "
    b"img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
    b"form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)

_INTERNAL_ERROR = ("internal_error", "The server failed to handle this request.")

_HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
}

#: Statuses whose refusals are logged and counted (abuse, not mistakes).
_LOGGED_REFUSALS = frozenset({403, 413, 429, 503})

#: Methods that change something: a browser sends them cross-site without
#: asking first (a form post), so their Origin is checked.
_STATE_CHANGING = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})

#: What load balancers and Prometheus ask for by IP address: answered
#: whatever the Host header says.
_PROBES = ([b"healthz"], [b"readyz"], [b"metrics"])

_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_origin(text: str) -> Optional[str]:
    """
    An http or https origin as browsers write it in an Origin header:
    C{scheme://host[:port]} in lower case, without the scheme's default
    port (RFC 6454 section 6.1).

    @param text: an origin or a URL with no path beyond C{/}.
    @return: the origin, or None if C{text} is no such origin (C{null},
        another scheme, a user name, a path, a bad port, a name that is not
        ASCII: browsers send internationalised names in punycode).
    """
    if not text.isascii():
        return None
    try:
        parts = urlsplit(text.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.netloc.endswith(":")
    ):
        return None
    netloc = parts.netloc
    if port == _DEFAULT_PORTS[parts.scheme]:
        netloc = netloc.rsplit(":", 1)[0]
    return f"{parts.scheme}://{netloc}"


def _hosts_of(origin: str) -> Tuple[bytes, ...]:
    """
    The Host header values that address C{origin} (a L{canonical_origin}):
    its host and port, the default port written out or left out.
    """
    scheme, netloc = origin.split("://", 1)
    host = netloc.encode("ascii")
    if urlsplit(origin).port is None:
        return (host, b"%s:%d" % (host, _DEFAULT_PORTS[scheme]))
    return (host,)


def _is_loopback(host: str) -> bool:
    """
    Whether an interface address is a loopback one (127.0.0.0/8, ::1).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


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


# -- query parameters: twisted.web parsed the query (request.args) ----------


def _query(request: IRequest, name: str) -> Optional[str]:
    """
    The last value of query parameter C{name}, or None.
    """
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise ChatError("invalid_parameter", f"{name} is not valid UTF-8.") from None


#: More digits than any bound of a count parameter: capped without
#: converting (Python refuses to convert over 4,300 digits).
_MAX_COUNT_DIGITS = 12


def _bounded_int(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    value = _query(request, name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()):
        raise ChatError("invalid_parameter", f"{name} must be a whole number of at least {low}.")
    if len(value.lstrip("0")) > _MAX_COUNT_DIGITS:
        return high
    number = int(value)
    if number < low:
        raise ChatError("invalid_parameter", f"{name} must be a whole number of at least {low}.")
    return min(number, high)


def _bounded_seconds(request: IRequest, name: str, default: float, high: float) -> float:
    value = _query(request, name)
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
    """
    The JSONP callback name, if any; never reflected unless it is a plain
    JavaScript identifier path.
    """
    value = _query(request, "callback")
    if value is None:
        return None
    if len(value) > _MAX_CALLBACK or not _CALLBACK.match(value):
        raise ChatError(
            "invalid_callback",
            "callback must be a JavaScript identifier path "
            "(letters, digits, '_', '$' and dots; at most 64 characters).",
        )
    return value.encode("ascii")


# -- bodies ------------------------------------------------------------------


def _read_body(request: IRequest) -> bytes:
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BODY:
        raise ChatError(
            "request_too_large",
            f"The request body is over {MAX_REQUEST_BODY} bytes.",
        )
    body = request.content.read(MAX_REQUEST_BODY + 1)
    if len(body) > MAX_REQUEST_BODY:
        raise ChatError(
            "request_too_large",
            f"The request body is over {MAX_REQUEST_BODY} bytes.",
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
    )


def _ip(request: IRequest) -> str:
    """
    The client's IP address: the one place the HTTP side reads it.
    """
    return client_host(request.getClientAddress())


# -- answers -----------------------------------------------------------------

#: A long-poll answer holds at most this many bytes of messages (the client
#: asks again for the rest), so a slow reader pins a bounded buffer.
MAX_RESPONSE_BYTES = 1024 * 1024


class _BatchBodies:
    """
    Long-poll bodies: a batch's JSON, at most L{MAX_RESPONSE_BYTES} of
    messages, built from the messages' own cached encodings.  The last one
    made is kept: every waiter of a room gets the same batch when a message
    arrives, and it is encoded once for all of them.
    """

    __slots__ = ("_batch", "_body")

    def __init__(self) -> None:
        self._batch: Optional[Batch] = None
        self._body = b""

    def body(self, batch: Batch) -> bytes:
        if batch is not self._batch:
            self._body = _encode_batch(_within_budget(batch))
            self._batch = batch
        return self._body


def _within_budget(batch: Batch) -> Batch:
    messages = batch.messages
    if len(messages) <= 1 or sum(len(m.json) + 1 for m in messages) <= MAX_RESPONSE_BYTES - 256:
        return batch
    size, keep = 0, 0
    for message in messages:
        size += len(message.json) + 1
        if size > MAX_RESPONSE_BYTES - 256:
            break
        keep += 1
    return Batch(batch.room, messages[: max(keep, 1)], batch.last_seq, batch.reset, batch.first_seq)


def _encode_batch(batch: Batch) -> bytes:
    parts = [
        b'{"room":"',
        # Room names are [A-Za-z0-9_-]: nothing to escape.
        batch.room.encode("ascii"),
        b'","messages":[',
        b",".join(m.json for m in batch.messages),
        b'],"last_seq":%d,"reset":%s' % (batch.last_seq, b"true" if batch.reset else b"false"),
    ]
    if batch.reset:
        parts.append(b',"first_seq":%d' % (batch.first_seq,))
    parts.append(b"}")
    return b"".join(parts)


def _jsonp(callback: Optional[bytes], body: bytes) -> Tuple[bytes, bytes]:
    """
    The content type and body of a JSON answer, wrapped for JSONP when
    there is a callback.
    """
    if callback is not None:
        return _JAVASCRIPT, callback + b"(" + body + b");"
    return _JSON, body


class _PresentBodies:
    """
    Long-poll bodies that carry the room's presence and typing: a batch's
    body (L{_BatchBodies}) with the presence's fields, encoded once per
    change, spliced in before its closing brace.  The last one made is
    kept, so a room's waiters answered together share one.
    """

    __slots__ = ("_body", "_fields", "_present", "_wake_key", "_wake")

    def __init__(self) -> None:
        self._body = b""
        self._fields = b""
        self._present = b""
        self._wake_key: Tuple[str, int, int] = ("", -1, -1)
        self._wake: Optional[Batch] = None

    def body(self, body: bytes, fields: bytes) -> bytes:
        if body is not self._body or fields is not self._fields:
            self._present = body[:-1] + b"," + fields + b"}"
            self._body, self._fields = body, fields
        return self._present

    def wake_batch(self, room: Room) -> Batch:
        """
        The empty batch that answers the room's polls woken by a change of
        its presence: one for all of them.
        """
        key = (room.name, room.last_seq, room.presence.version)
        if key != self._wake_key or self._wake is None:
            self._wake_key = key
            self._wake = Batch(room.name, [], room.last_seq)
        return self._wake


class _PollPresence(NamedTuple):
    """
    A request's presence parameters: C{presence=1} (presence and typing
    wanted: a long-poll's answers carry them, and it is woken by changes)
    or, on a long-poll, C{presence=VERSION} (the version its last answer
    carried: a poll that has not seen the current one is answered at
    once); and C{client=ID} (the guest browser it belongs to).
    """

    wanted: bool
    client: Optional[str]
    seen: Optional[str] = None


def _presence_query(request: IRequest, poll: bool = False) -> _PollPresence:
    """
    @raise ChatError: C{invalid_parameter}.
    """
    value = _query(request, "presence")
    if poll:
        wanted, seen = validate_seen(value)
    else:
        wanted, seen = validate_flag(value, "presence", False), None
    return _PollPresence(wanted, validate_client(_query(request, "client")), seen)


class _MessagesQuery(NamedTuple):
    """
    The checked parameters of C{GET /api/rooms/<room>/messages}.
    """

    after: Optional[int]
    before: Optional[int]
    limit: int
    timeout: float


def _messages_query(request: IRequest) -> _MessagesQuery:
    """
    Read and check a messages GET's parameters, in the order the errors
    are reported.

    @raise ChatError: C{invalid_callback}, C{invalid_parameter}.
    """
    _callback(request)  # refuse a bad callback before waiting
    after = parse_cursor(_query(request, "after"), "after")
    before = parse_cursor(_query(request, "before"), "before")
    limit = _bounded_int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    if before is not None:
        if after is not None:
            raise ChatError("invalid_parameter", "Give after or before, not both.")
        return _MessagesQuery(None, before, limit, DEFAULT_TIMEOUT)
    timeout = _bounded_seconds(request, "timeout", DEFAULT_TIMEOUT, MAX_TIMEOUT)
    return _MessagesQuery(after, None, limit, timeout)


class _Poll:
    """
    One long-poll request, waiting in the core: it is counted among the
    waiting long-polls until it is answered, failed or its client goes
    away, and then no more, once.
    """

    __slots__ = ("_web", "_request", "_waiting", "_forget", "_timeout", "_failed", "_unwatch", "_visit")

    def __init__(self, web: "ChatWeb", request: Any, timeout: float) -> None:
        self._web = web
        self._request = request
        self._timeout = timeout
        self._waiting = False
        self._forget: Optional[Callable[[], None]] = None
        self._failed: Optional[Callable[[Failure], None]] = None
        self._unwatch: Optional[Callable[[], None]] = None
        #: Its place in the room's presence while it waits.
        self._visit: Optional[Visit] = None

    def wait(
        self,
        room: str,
        query: _MessagesQuery,
        answer: Callable[[bytes], None],
        failed: Callable[[Failure], None],
        identity: Identity = GUEST,
        here: Optional["_PollPresence"] = None,
    ) -> None:
        """
        Wait in C{room} after C{query.after}, for C{identity}: C{answer}
        gets the body of the answer (its status and headers set on the
        request), C{failed} the failure (a refusal, a store error).  While
        it waits it is counted in the room's presence; with C{here.wanted}
        it is also answered when the presence changes, and its answer
        carries it.
        """
        web = self._web
        request = self._request
        timeout = web._start_poll(self._timeout)
        self._waiting = True
        present = web._core.room(room) if here is not None and here.wanted else None

        def got(batch: Batch) -> None:
            if self._done():
                try:
                    if present is None:
                        body = web._respond_batch(batch, request)
                    else:
                        body = web._respond_present(batch, request, present)
                except Exception:
                    failed(Failure())
                    return
                answer(body)

        def failure(reason: Failure) -> None:
            if self._done():
                failed(reason)

        forget = web._core.wait_for(
            room, query.after, query.limit, timeout, got, failure, identity
        )
        if self._waiting:
            self._forget = forget
            self._failed = failed
            if web.sessions is not None:
                self._unwatch = web.sessions.watch(identity, self.session_ended)
            if here is not None:
                self._arrive(room, identity, here, got)

    def _arrive(self, room: str, identity: Identity, here: "_PollPresence", got: Callable[[Batch], None]) -> None:
        """
        Count the waiting poll in the room's presence (the room is one this
        node follows: the poll was admitted to it).
        """
        web = self._web
        found = web._core.room(room)
        wake = None
        if here.wanted:

            def wake() -> None:
                # What the room's presence shows changed: answered now,
                # with no messages (the same cursor) and the new presence.
                forget = self._forget
                if forget is not None:
                    forget()
                    got(web._wake_batch(found))

        anonymous = "ip:" + _ip(self._request)
        self._visit = web._core.arrive(found, identity, here.client, anonymous, None, wake)
        if wake is not None and here.seen != found.presence.seen:
            # It has not seen this state (its first poll, or a change came
            # between its last answer and this poll): answered now.
            wake()

    def _done(self) -> bool:
        waiting, self._waiting = self._waiting, False
        # Dropping the forget and failed functions breaks the cycles
        # through the waiter's closures and this poll's own methods, so a
        # finished poll is freed at once.
        self._forget = None
        self._failed = None
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        visit, self._visit = self._visit, None
        if visit is not None:
            # Polling again at once, as clients do, it stays here.
            visit.leave(POLL_GRACE)
        if waiting:
            self._web._end_poll()
        return waiting

    def session_ended(self) -> None:
        """
        The session that authorised this poll ended (signed out, revoked):
        it waits no more, and is answered 401.
        """
        forget, failed = self._forget, self._failed
        self._failed = None
        if self._done():
            if forget is not None:
                forget()
            if failed is not None:
                failed(Failure(ChatError("auth_required", "You were signed out; sign in again.")))

    def cancel(self) -> None:
        """
        The client went away: forget the waiter.
        """
        forget = self._forget
        if self._done() and forget is not None:
            forget()

    def gone(self, failure: Failure) -> None:
        """
        C{notifyFinish}'s errback: the connection was lost.
        """
        self.cancel()

    def write(self, body: bytes) -> None:
        _finish(body, self._request)

    def write_error(self, failure: Failure) -> None:
        self._web._finish_failed(failure, self._request)


def _role(room: Room, identity: Identity) -> Optional[str]:
    """
    The identity's role in the room, as the room's answers show it (a
    user's; an API key has none to show).
    """
    user_id = identity.user_id
    return None if user_id is None else room.access.members.get(user_id)


def _room_info(
    room: Room, role: Optional[str] = None, read: Optional[int] = None, muted: Optional[dict] = None
) -> dict:
    """
    A room as the API shows it; for a signed-in user also their C{role},
    how far they have C{read} and how many events are C{unread}, and
    whether they are C{muted} (C{{"until": ts or null}}).
    """
    access = room.access
    info = {
        "name": room.name,
        "last_seq": room.last_seq,
        "clients": room.clients,
        "last_activity": room.last_activity,
        "private": access.private,
        "guests": access.guests,
        "topic": access.topic,
        "edits": access.edits,
    }
    if role is not None:
        info["role"] = role
    if read is not None:
        info["read"] = read
        info["unread"] = max(0, room.last_seq - read)
    if muted is not None:
        info["muted"] = muted
    return info


def _members(room: Room) -> List[dict]:
    access = room.access
    return [
        {"id": user_id, "name": access.names.get(user_id, user_id), "role": role}
        for user_id, role in sorted(access.members.items())
    ]


def _flag(fields: Dict[str, Any], name: str, default: Optional[bool]) -> Optional[bool]:
    """
    A yes/no field: JSON true/false, or a form's on/true/1/yes and
    off/false/0/no (a checkbox sends "on", or nothing).
    """
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("off", "false", "0", "no", ""):
        return False
    raise ChatError("invalid_parameter", f"{name} must be true or false.")


Renderable = Union[bytes, Deferred]


class _Root(Resource):
    """
    The site's root: refuses requests addressed to another host or sent
    by another site's page (L{ChatWeb.check_request}), URLs that are not
    UTF-8 with a JSON 400 (Klein would answer them with a bare text page),
    and everything but C{/healthz} with a 503 until chatd is ready; sends
    long-poll GETs straight to their handler (L{ChatWeb.long_poll}), and
    WebSocket upgrades it can accept at once straight to Autobahn
    (L{ChatWeb.websocket_now}); routes the rest through Klein.
    """

    isLeaf = True

    def __init__(self, web: "ChatWeb", app: IResource) -> None:
        super().__init__()
        self._web = web
        self._app = app

    def render(self, request: IRequest) -> Any:
        postpath = request.postpath
        web = self._web
        try:
            web.check_request(request)
        except ChatError:
            return web.refuse_now(request, Failure())
        if (
            request.method == b"GET"
            and len(postpath) == 4
            and postpath[3] == b"messages"
            and postpath[1] == b"rooms"
            and postpath[0] == b"api"
            and _ROOM_SEGMENT.match(postpath[2])
        ):
            # The route Klein would pick for this path: a room name is
            # ASCII, so werkzeug would read the segment as it is.
            if web.ready:
                return web.long_poll(request, postpath[2].decode("ascii"))
        elif (
            request.method == b"GET"
            and len(postpath) == 2
            and postpath[0] == b"ws"
            and _ROOM_SEGMENT.match(postpath[1])
            and web.ready
        ):
            # Likewise the WebSocket upgrade, which a crowd reconnecting
            # after a restart sends all at once.
            upgrade = web.websocket_now(request, postpath[1].decode("ascii"))
            if upgrade is not None:
                return upgrade.render(request)
        else:
            try:
                b"/".join(postpath).decode("utf-8")
            except UnicodeDecodeError:
                return web.error_now(request, 400, "invalid_url", "The URL path is not valid UTF-8.")
        if not web.ready and postpath != [b"healthz"]:
            request.setHeader(b"retry-after", b"1")
            return web.error_now(request, 503, "not_ready", "chatd is starting; try again in a moment.")
        return self._app.render(request)


class _StaticFiles(File):
    """
    Static files without directory listings, where a path segment that
    cannot name a file is not found like any missing file.

    Give it a C{childNotFound} (C{File}'s resource for 404s, handed on to
    every child it makes) to answer those as the rest of chatd does.
    """

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        # Each segment must be one file name.  File would take "." as the
        # folder itself and "x/" (from x%2F) as "x", and a NUL makes
        # os.stat raise ValueError, which File does not catch (a 500).
        # Anything else the OS refuses to take as a name (ValueError, e.g.
        # a name the file system's encoding cannot write) is not a file
        # here either.
        if path in (b".", b"..") or b"/" in path or b"\0" in path:
            return cast(IResource, self.childNotFound)
        try:
            return cast(IResource, super().getChild(path, request))
        except ValueError:
            return cast(IResource, self.childNotFound)

    def directoryListing(self) -> IResource:
        return cast(IResource, self.childNotFound)


class _NotFound(Resource):
    """
    chatd's JSON 404, as a resource (for L{_StaticFiles}).
    """

    isLeaf = True

    def __init__(self, web: "ChatWeb") -> None:
        super().__init__()
        self._web = web

    def render(self, request: IRequest) -> bytes:
        return self._web.error_now(request, 404, "not_found", "No such file.")


class ChatWeb:
    """
    The Klein application.  State lives on the instance; the route table
    on the class.

    @param core: the chat core.
    @param env: the Jinja2 environment for pages.
    @param static: the folder of static files.
    @param websocket: the resource that takes over a C{/ws/<room>} request.
    @param allow_origins: origins (C{scheme://host[:port]}) whose pages may
        also open WebSockets and send state-changing requests.
    @param public_urls: the URLs clients reach chatd by
        (C{scheme://host[:port]}).  If given, requests must be addressed
        to one of their hosts, and browsers' requests must come from one
        of their origins (or an allowed one); if not, this server's own
        origin is the one the Host header names.
    @ivar ready: requests are served (set once the core is loaded; until
        then everything but C{/healthz} is a 503).
    @ivar shutting_down: set when the server starts shutting down:
        C{/readyz} says no, and long-polls are answered at once.
    """

    app = Klein()
    # Before any route is added (rules take the map's setting as they are
    # added): werkzeug would answer a path with an empty segment, such as
    # /rooms//lobby, with a redirect to the merged path.  chatd does not
    # redirect; no route matches such a path, so it is a 404.
    app.url_map.merge_slashes = False
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
        ready: bool = True,
        public_urls: Sequence[str] = (),
        bus: Any = None,
        auth: Optional[Authenticator] = None,
        accounts: Optional[Accounts] = None,
        key_limiter: Optional[RateLimiter] = None,
        sessions: Optional[SessionWatch] = None,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._core = core
        self._bus = bus
        #: Who requests are from (None: everyone is a guest).
        self._auth = auth
        self._accounts = accounts
        #: The server API's limit per key.
        self._key_limiter = key_limiter
        #: Tells the WebSockets and long-polls a session authorised when
        #: it ends.
        self.sessions = sessions
        self._metrics = metrics
        #: Long-polls in progress, read by the metrics at each scrape.
        self.long_polls = 0
        #: Event streams (SSE) in progress, and the reactor iterations
        #: their events are gathered by.
        self._streams: Set[EventStream] = set()
        self._ticks = Ticks(clock)
        if metrics is not None:
            metrics.connections.labels("longpoll").set_function(lambda: self.long_polls)
            metrics.connections.labels("sse").set_function(lambda: len(self._streams))
            metrics.watch_waiters(core.waiting)
        self._allow_origins = frozenset(_checked_origins(allow_origins))
        self._public_origins = frozenset(_checked_origins(public_urls))
        self._public_hosts = frozenset(
            host for origin in self._public_origins for host in _hosts_of(origin)
        )
        self._serve_metrics = serve_metrics
        self.ready = ready
        self.shutting_down = False
        self._static = _StaticFiles(str(static))
        # File documents childNotFound as any Resource; mypy infers the
        # type of twisted's own default, a private class.
        self._static.childNotFound = _NotFound(self)  # type: ignore[assignment]
        self._websocket = websocket
        self._bodies = _BatchBodies()
        self._present = _PresentBodies()
        #: POST .../typing, per user (or IP, for guests).
        self._typing_limiter = RateLimiter(clock, TYPING_BURST, TYPING_PER_SECOND)
        # Loaded once here, never per request.
        self._index = env.get_template("index.html")
        self._room_page = env.get_template("room.html")
        self._error_page = env.get_template("error.html")
        self._signin_page = env.get_template("signin.html")
        self._signup_page = env.get_template("signup.html")

    def resource(self) -> IResource:
        """
        The root resource to serve.
        """
        return _Root(self, self.app.resource())

    def site(
        self,
        timeout: float,
        request_timeout: float,
        connections: Optional[Connections] = None,
        access_log: bool = False,
        reactor: Any = None,
        proxied: bool = False,
    ) -> ChatSite:
        """
        The Site to serve L{resource}: connections idle for C{timeout}
        seconds are closed, a request (head and body) must arrive within
        C{request_timeout} seconds of its first byte, and every connection
        takes its place in C{connections} (C{proxied}: once its PROXY
        header is read, L{chatd._http.ChatChannel.proxied}).  With
        C{access_log}, every request is logged, a line each.
        """
        return ChatSite(
            self.resource(),
            access_log=access_log,
            request_timeout=request_timeout,
            connections=connections,
            refused=self.refused_connection,
            proxied=proxied,
            timeout=timeout,
            reactor=reactor,
        )

    # -- responses -----------------------------------------------------------

    def _json(
        self, request: IRequest, body: bytes, status: int = 200, jsonp: bool = True
    ) -> bytes:
        """
        Set up a JSON (or JSONP) answer: its status and headers, with a
        Content-Length; the body is returned, to be written in one piece.
        """
        content_type, body = _jsonp(_callback(request) if jsonp else None, body)
        request.setResponseCode(status, REASONS.get(status))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % (len(body),))
        return body

    def _page(self, request: IRequest, template: Any, status: int = 200, **context: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", _HTML)
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"same-origin")
        return template.render(**context).encode("utf-8")

    def _error_answer(self, request: IRequest, failure: Failure) -> bytes:
        """
        The answer to a request that failed: a L{ChatError}'s status and
        JSON body, or a logged 500 for anything else.  Both the Klein
        routes and the long-poll (L{long_poll}) answer their errors here.
        """
        if not failure.check(ChatError):
            self.log.failure("Unhandled error serving {uri}", failure, uri=request.uri)
            return self._error_json(request, 500, *_INTERNAL_ERROR)
        error = cast(ChatError, failure.value)
        status = http_status(error)
        wait = retry_after(error)
        if wait is not None:
            request.setHeader(b"retry-after", wait)
        if status == 401:
            request.setHeader(b"www-authenticate", b'Bearer realm="chatd"')
        if status in _LOGGED_REFUSALS:
            self._log_rejection(request, error.code)
        return self._error_json(request, status, error.code, error.detail)

    def refused_connection(self, ip: str, reason: str) -> None:
        """
        A connection was refused before it sent anything (the site's
        L{chatd._http.ChatChannel}): log and count it like a refused request.
        """
        self.log.info("Refused a connection from {ip}: {reason}", ip=ip, reason=reason)
        if self._metrics is not None:
            self._metrics.rejected.labels(reason).inc()

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
    def _http_error(self, request: IRequest, failure: Failure) -> Any:
        error = cast(HTTPException, failure.value)
        if (error.code == 404 or isinstance(error, RequestRedirect)) and _wants_page(request):
            # A browser that followed a bad link (/rooms/lobby/, a typo):
            # chatd's page, showing who is reading, not JSON.
            def page(identity: Identity) -> bytes:
                return self._page(
                    request, self._error_page, 404, title="No such page",
                    detail="There is no page at this address.", **self._page_context(identity),
                )

            return self.identify(request).addCallbacks(page, lambda _: page(GUEST))
        if isinstance(error, RequestRedirect):
            # werkzeug redirects a path missing a rule's trailing slash
            # (/static); its exception carries no Location for Klein to
            # send.  chatd does not redirect: no route has that path.
            return self._error_json(request, 404, "not_found", "No such path.")
        status = error.code or 500
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"allow", ", ".join(error.valid_methods).encode("ascii"))
        code = _HTTP_ERROR_CODES.get(status, "http_error")
        detail = error.description or error.name
        return self._error_json(request, status, code, detail)

    @app.handle_errors(Exception)
    def _failed(self, request: IRequest, failure: Failure) -> bytes:
        return self._error_answer(request, failure)

    def _error_json(self, request: IRequest, status: int, code: str, detail: str) -> bytes:
        return self._json(request, error_body(code, detail), status, jsonp=False)

    def error_now(self, request: IRequest, status: int, code: str, detail: str) -> bytes:
        """
        A JSON error answer for a request refused before routing.
        """
        return self._error_json(request, status, code, detail)

    def refuse_now(self, request: IRequest, failure: Failure) -> bytes:
        """
        The answer to a request refused before routing with a
        L{ChatError}, logged and counted as the routes' refusals are.
        """
        return self._error_answer(request, failure)

    # -- who is asking --------------------------------------------------------

    def _credentials(self, request: IRequest, cross_site: bool = False) -> Credentials:
        """
        What the request carries: C{Authorization: Bearer}, C{?token=},
        the session cookie.  A JSONP read (a C{callback}) is C{cross_site}:
        another site's page can make it with the browser's cookies.

        @raise ChatError: C{invalid_token} for an Authorization header of
            another scheme, or with no credentials.
        """
        bearer = None
        header = request.getHeader(b"authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(b" ")
            value = value.strip()
            if scheme.lower() != b"bearer" or not value:
                raise ChatError("invalid_token", "Send Authorization: Bearer TOKEN (or an API key).")
            bearer = value.decode("latin-1")
        return Credentials(
            bearer,
            _query(request, "token"),
            request.getCookie(SESSION_COOKIE),
            cross_site or b"callback" in request.args,
        )

    def identify(self, request: IRequest, cross_site: bool = False) -> Deferred:
        """
        The request's L{Identity} (L{chatd.auth.Authenticator}'s rules).
        """
        if self._auth is None:
            return succeed(GUEST)
        try:
            credentials = self._credentials(request, cross_site)
        except ChatError as e:
            return fail(e)
        return self._auth.identify(credentials).addCallback(self._limit_key)

    def _identify_now(self, request: IRequest) -> Optional[Identity]:
        """
        L{identify}, when that needs no store (a guest, a token); None
        otherwise, or for credentials that are refused (L{identify} then
        says why).
        """
        if self._auth is None:
            return GUEST
        try:
            return self._auth.identify_now(self._credentials(request))
        except ChatError:
            return None

    def _limit_key(self, identity: Identity) -> Identity:
        if identity.key is not None and self._key_limiter is not None:
            wait = self._key_limiter.take(identity.key)
            if wait:
                raise rate_limited("Too many requests with this API key", wait)
        return identity

    def _fields(self, request: IRequest, identity: Identity) -> Dict[str, Any]:
        """
        A state change's fields (L{_form_or_json}), once its CSRF token is
        checked, if a session cookie authorised it.
        """
        fields = _form_or_json(request)
        if identity.via == "session":
            header = request.getHeader(b"x-csrf-token")
            given = header.decode("latin-1") if header is not None else fields.get("csrf")
            check_csrf(identity, given if isinstance(given, str) else None)
        return fields

    def _in_room(
        self,
        request: IRequest,
        name: str,
        then: Callable[..., Any],
        *args: Any,
        cross_site: bool = False,
    ) -> Deferred:
        """
        C{then(identity, room, *args)}, once the request's identity is
        known and room C{name} is one it may use: a room this node follows
        or, after looking it up, one in the store (another node may have
        made it).  A room it may not see (unknown, or private and not
        theirs) fails with C{room_not_found} before anything else about
        the request is checked, on every route.
        """

        def entered(identity: Identity) -> Deferred:
            d = self._core.enter(name, identity)
            return d.addCallback(lambda room: then(identity, room, *args))

        return self.identify(request, cross_site).addCallback(entered)

    # -- pages ---------------------------------------------------------------

    def _page_context(self, identity: Identity) -> Dict[str, Any]:
        """
        What every page shows of who is reading it.
        """
        mode = "open" if self._auth is None else self._auth.mode
        return {
            "me": None if identity.user is None else identity.user.as_dict(),
            "csrf": identity.csrf or "",
            "auth_mode": mode,
            "accounts": self._accounts is not None,
            "signup": None if self._accounts is None else self._accounts.signup,
        }

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> Deferred:
        """
        The room list (the rooms the reader may see) and the create-room
        form.
        """

        def listed(identity: Identity) -> Deferred:
            def render(rooms: Sequence[Room], marks: Dict[str, int]) -> bytes:
                infos = [self._info(room, identity, marks) for room in rooms]
                return self._page(request, self._index, rooms=infos, **self._page_context(identity))

            d = self._core.list_rooms(identity)
            return d.addCallback(lambda rooms: self._core.read_markers(identity).addCallback(
                lambda marks: render(rooms, marks)))

        return self.identify(request).addCallback(listed)

    def _chat_page(self, request: IRequest, name: str, transport: str) -> Deferred:
        def render(identity: Identity, room: Room, marks: Dict[str, int]) -> bytes:
            window = self._core.edit_window
            return self._page(
                request,
                self._room_page,
                room=self._info(room, identity, marks),
                members=_members(room) if room.access.private else [],
                transport=transport,
                edit_window=0 if window is None else int(window),
                **self._page_context(identity),
            )

        def refused(failure: Failure, identity: Identity) -> bytes:
            failure.trap(ChatError)
            error = cast(ChatError, failure.value)
            if error.code == "auth_required" and self._accounts is not None:
                request.setResponseCode(303)
                request.setHeader(b"location", b"/account/signin?next=" + request.path)
                return b""
            title = {"auth_required": "Sign in first", "room_not_found": "No such room"}.get(
                error.code, "Not available"
            )
            # The reader is shown as who they are, the same way whether
            # the room does not exist or is private and not theirs.
            return self._page(
                request, self._error_page, http_status(error), title=title, detail=error.detail,
                **self._page_context(identity),
            )

        def entered(identity: Identity) -> Deferred:
            def marked(room: Room) -> Deferred:
                return self._core.read_markers(identity).addCallback(lambda marks: render(identity, room, marks))

            d = self._core.enter(name, identity)
            return d.addCallback(marked).addErrback(refused, identity)

        def unidentified(failure: Failure) -> bytes:
            return refused(failure, GUEST)

        return self.identify(request).addCallbacks(entered, unidentified)

    @app.route("/rooms/<room>", methods=["GET"])
    def room_page(self, request: IRequest, room: str) -> Deferred:
        """
        A room's chat page, over WebSocket.
        """
        return self._chat_page(request, room, "websocket")

    @app.route("/rooms/<room>/longpoll", methods=["GET"])
    def longpoll_page(self, request: IRequest, room: str) -> Deferred:
        """
        A room's chat page, over long-poll.
        """
        return self._chat_page(request, room, "longpoll")

    @app.route("/rooms/<room>/sse", methods=["GET"])
    def sse_page(self, request: IRequest, room: str) -> Deferred:
        """
        A room's chat page, over Server-Sent Events.
        """
        return self._chat_page(request, room, "sse")

    @app.route("/static/", branch=True, methods=["GET"])
    def static(self, request: IRequest) -> IResource:
        """
        JavaScript and CSS.
        """
        return self._static

    # -- accounts --------------------------------------------------------------

    def _accounts_on(self) -> Accounts:
        if self._accounts is None:
            raise ChatError("not_found", "This server has no accounts (see --auth accounts).")
        return self._accounts

    def _set_session(self, request: IRequest, cookie: Optional[bytes], max_age: int) -> None:
        """
        Set (or, with C{cookie} None, clear) the session cookie: HttpOnly,
        SameSite=Lax, Secure when the page came over TLS.
        """
        parts = [
            SESSION_COOKIE + b"=" + (cookie or b""),
            b"Path=/",
            b"HttpOnly",
            b"SameSite=Lax",
            b"Max-Age=%d" % (max_age if cookie is not None else 0,),
        ]
        if request.isSecure() or self._secure_cookies:
            parts.append(b"Secure")
        request.responseHeaders.addRawHeader(b"set-cookie", b"; ".join(parts))

    @property
    def _secure_cookies(self) -> bool:
        return any(origin.startswith("https://") for origin in self._public_origins)

    def _account_form(
        self, request: IRequest, template: Any, status: int = 200, **context: Any
    ) -> bytes:
        return self._page(request, template, status, **self._page_context(GUEST), **context)

    @app.route("/account/signin", methods=["GET"])
    def signin_page(self, request: IRequest) -> bytes:
        """
        The sign-in form.
        """
        self._accounts_on()
        return self._account_form(request, self._signin_page, next=_next(request), error=None)

    @app.route("/account/signup", methods=["GET"])
    def signup_page(self, request: IRequest) -> bytes:
        """
        The sign-up form (with an invitation's code from the link).
        """
        self._accounts_on()
        return self._account_form(
            request, self._signup_page, invite=_query(request, "invite") or "", error=None
        )

    def _signed_in(self, request: IRequest, fields: Dict[str, Any], is_form: bool) -> Callable[..., bytes]:
        def done(result: Tuple[bytes, Identity]) -> bytes:
            cookie, identity = result
            accounts = self._accounts_on()
            self._set_session(request, cookie, int(accounts.sessions.ttl))
            if is_form:
                request.setResponseCode(303)
                request.setHeader(b"location", _safe_next(fields.get("next")))
                return b""
            assert identity.user is not None
            body = encode_json({"user": identity.user.as_dict(), "csrf": identity.csrf})
            return self._json(request, body, 200, jsonp=False)

        return done

    def _form_refused(
        self, request: IRequest, template: Any, is_form: bool, **context: Any
    ) -> Callable[[Failure], Any]:
        def refused(failure: Failure) -> Any:
            failure.trap(ChatError)
            if not is_form:
                return failure
            error = cast(ChatError, failure.value)
            wait = retry_after(error)
            if wait is not None:
                request.setHeader(b"retry-after", wait)
            return self._account_form(
                request, template, http_status(error), error=error.detail, **context
            )

        return refused

    @app.route("/account/signin", methods=["POST"])
    def signin(self, request: IRequest) -> Deferred:
        """
        Sign in with C{user} and C{password} (a form: 303 to C{next}; JSON:
        the user and the session's CSRF token); the session cookie is set.
        """
        accounts = self._accounts_on()
        fields = _form_or_json(request)
        is_form = _is_form(request)
        d = accounts.sign_in(fields.get("user"), fields.get("password"), _ip(request))
        d.addCallback(self._signed_in(request, fields, is_form))
        next_ = fields.get("next") if isinstance(fields.get("next"), str) else "/"
        user = str(fields.get("user") or "")[:32]
        refused = self._form_refused(request, self._signin_page, is_form, next=next_, user=user)
        return d.addErrback(lambda failure: refused(failure))

    @app.route("/account/signup", methods=["POST"])
    def signup(self, request: IRequest) -> Deferred:
        """
        Make an account from C{user}, C{name}, C{password} (and
        C{invite}), and sign it in.
        """
        accounts = self._accounts_on()
        fields = _form_or_json(request)
        is_form = _is_form(request)
        d = accounts.sign_up(
            fields.get("user"), fields.get("name"), fields.get("password"), fields.get("invite"),
            _ip(request),
        )
        d.addCallback(self._signed_in(request, fields, is_form))
        invite = fields.get("invite") if isinstance(fields.get("invite"), str) else ""
        user = str(fields.get("user") or "")[:32]
        name = str(fields.get("name") or "")[:32]
        refused = self._form_refused(
            request, self._signup_page, is_form, invite=invite, user=user, name=name
        )
        return d.addErrback(lambda failure: refused(failure))

    @app.route("/account/signout", methods=["POST"])
    def signout(self, request: IRequest) -> Deferred:
        """
        End this browser's session (its CSRF token required), and clear
        the cookie.
        """
        accounts = self._accounts_on()

        def sign_out(identity: Identity) -> Deferred:
            self._check_change(request, identity)

            def done(_: object) -> bytes:
                self._set_session(request, None, 0)
                if identity.session is not None and self.sessions is not None:
                    self.sessions.ended(session=identity.session)
                if _is_form(request):
                    request.setResponseCode(303)
                    request.setHeader(b"location", b"/")
                    return b""
                return self._json(request, b'{"status":"signed_out"}', jsonp=False)

            return accounts.sign_out(identity).addCallback(done)

        return self.identify(request).addCallback(sign_out)

    @app.route("/api/me", methods=["GET"])
    def me(self, request: IRequest) -> Deferred:
        """
        Who the request is from: C{{"user": {"id", "name"} or null, "via"}}.
        """

        def render(identity: Identity) -> bytes:
            user = None if identity.user is None else identity.user.as_dict()
            return self._json(request, encode_json({"user": user, "via": identity.via}), jsonp=False)

        return self.identify(request).addCallback(render)

    # -- rooms API -----------------------------------------------------------

    @app.route("/api/rooms", methods=["GET"])
    def list_rooms(self, request: IRequest) -> Deferred:
        """
        C{{"rooms": [{"name", "last_seq", "clients", ...}, ...]}}: the
        rooms the request's identity may see.
        """
        _callback(request)  # refuse a bad callback first

        def listed(identity: Identity) -> Deferred:
            def render(rooms: Sequence[Room], marks: Dict[str, int]) -> bytes:
                infos = [self._info(r, identity, marks) for r in rooms]
                return self._json(request, encode_json({"rooms": infos}))

            d = self._core.list_rooms(identity)
            return d.addCallback(lambda rooms: self._core.read_markers(identity).addCallback(
                lambda marks: render(rooms, marks)))

        return self.identify(request).addCallback(listed)

    @app.route("/api/rooms", methods=["POST"])
    def create_room(self, request: IRequest) -> Deferred:
        """
        Create a room from C{{"name": ..., "private": bool, "guests":
        bool}} (JSON or form): 201, or 303 to the room's page for a form.
        A private room's creator is its owner (with an API key: C{owner},
        C{{"id", "name"}}, if given).
        """
        is_form = _is_form(request)

        def create(identity: Identity) -> Deferred:
            fields = self._fields(request, identity)
            private = _flag(fields, "private", False)
            guests = _flag(fields, "guests", None)
            if identity.key is not None and fields.get("owner") is not None:
                identity = Identity(_named_user(fields.get("owner")), "key", key=identity.key)

            def created(room: Room) -> bytes:
                location = f"/rooms/{room.name}".encode("ascii")
                if is_form:
                    request.setResponseCode(303)
                    request.setHeader(b"location", location)
                    return b""
                request.setHeader(b"location", b"/api/rooms/" + room.name.encode("ascii"))
                info = _room_info(room, _role(room, identity))
                return self._json(request, encode_json(info), 201, jsonp=False)

            d = self._core.create_room(
                fields.get("name"), Peer(_ip(request)), identity, bool(private), guests
            )
            return d.addCallback(created)

        return self.identify(request).addCallback(create)

    @app.route("/api/rooms/<room>", methods=["GET"])
    def room_info(self, request: IRequest, room: str) -> Deferred:
        """
        One room's C{{"name", "last_seq", "clients", ...}}.
        """

        def render(identity: Identity, found: Room) -> Deferred:
            def answer(marks: Dict[str, int]) -> bytes:
                return self._json(request, encode_json(self._info(found, identity, marks)))

            return self._core.read_markers(identity).addCallback(answer)

        return self._in_room(request, room, render)

    def _info(self, room: Room, identity: Identity, marks: Dict[str, int]) -> dict:
        """
        L{_room_info} for C{identity}, with its read markers C{marks}.
        """
        read = None if identity.user is None else marks.get(room.name, 0)
        mute = self._core.mute_of(room, identity)
        muted = None if mute is None else {"until": None if mute[0] is None else mute[0] / 1000.0}
        return _room_info(room, _role(room, identity), read, muted)

    # -- members API -----------------------------------------------------------

    @app.route("/api/rooms/<room>/members", methods=["GET"])
    def list_members(self, request: IRequest, room: str) -> Deferred:
        """
        C{{"members": [{"id", "name", "role"}, ...]}}.
        """

        def render(identity: Identity, found: Room) -> bytes:
            return self._json(request, encode_json({"room": found.name, "members": _members(found)}))

        return self._in_room(request, room, render)

    @app.route("/api/rooms/<room>/members", methods=["POST"])
    def add_member(self, request: IRequest, room: str) -> Deferred:
        """
        Add a member, or change their role: C{{"user": ID, "role":
        "member"|"moderator"|"owner", "name": optional}}.
        """

        is_form = _is_form(request)

        def add(identity: Identity, found: Room) -> Deferred:
            d = maybeDeferred(adding, identity, found)
            return d.addErrback(self._member_refused, request, found.name, is_form, identity)

        def adding(identity: Identity, found: Room) -> Deferred:
            fields = self._fields(request, identity)
            role = fields.get("role") or "member"
            user, name = fields.get("user"), fields.get("name")
            # Members are people with accounts here (an API key may name
            # anyone: its application's users).
            accounts_only = self._accounts is not None and identity.key is None
            if accounts_only:
                user = validate_account_id(user)
                name = None
            d = self._core.set_member(found.name, user, name, role, identity, accounts_only)
            return d.addCallback(self._member_answer, request, found, 201, is_form)

        return self._in_room(request, room, add)

    @app.route("/api/rooms/<room>/members/<user>", methods=["DELETE"])
    def remove_member(self, request: IRequest, room: str, user: str) -> Deferred:
        """
        Remove a member: their WebSockets on the room close and their
        long-polls stop at once, on every node.
        """

        def remove(identity: Identity, found: Room) -> Deferred:
            self._check_change(request, identity)
            d = self._core.set_member(found.name, user, None, None, identity)
            return d.addCallback(self._member_answer, request, found, 200, False)

        return self._in_room(request, room, remove)

    @app.route("/api/rooms/<room>/members/<user>/remove", methods=["POST"])
    def remove_member_form(self, request: IRequest, room: str, user: str) -> Deferred:
        """
        L{remove_member}, for the room page's form.
        """

        is_form = _is_form(request)

        def remove(identity: Identity, found: Room) -> Deferred:
            d = maybeDeferred(removing, identity, found)
            return d.addErrback(self._member_refused, request, found.name, is_form, identity)

        def removing(identity: Identity, found: Room) -> Deferred:
            self._fields(request, identity)
            d = self._core.set_member(found.name, user, None, None, identity)
            return d.addCallback(self._member_answer, request, found, 200, is_form, identity)

        return self._in_room(request, room, remove)

    def _check_change(self, request: IRequest, identity: Identity) -> None:
        """
        The CSRF check of a state change that needs no fields (a DELETE, a
        sign-out): a form's csrf field if it sends a body, else the header.
        """
        length = request.getHeader(b"content-length")
        has_body = length is not None and length.strip() not in (b"", b"0")
        if request.getHeader(b"content-type") is not None and has_body:
            self._fields(request, identity)
        elif identity.via == "session":
            header = request.getHeader(b"x-csrf-token")
            check_csrf(identity, None if header is None else header.decode("latin-1"))

    def _member_refused(
        self, failure: Failure, request: IRequest, room: str, is_form: bool, identity: Identity
    ) -> Any:
        """
        A refused membership change from the room page's form: a page
        saying why, with the way back (an API client gets the JSON error).
        """
        if not is_form or not failure.check(ChatError):
            return failure
        error = cast(ChatError, failure.value)
        return self._page(
            request,
            self._error_page,
            http_status(error),
            title="Not changed",
            detail=error.detail,
            back=f"/rooms/{room}",
            **self._page_context(identity),
        )

    def _member_answer(
        self,
        event: Message,
        request: IRequest,
        room: Room,
        status: int,
        is_form: bool,
        identity: Identity = GUEST,
    ) -> bytes:
        if is_form:
            request.setResponseCode(303)
            gone = event.body == "" and event.user is not None and event.user.id == identity.user_id
            target = "/" if gone else f"/rooms/{room.name}#members"
            request.setHeader(b"location", target.encode("ascii"))
            return b""
        return self._json(request, event.json, status, jsonp=False)

    # -- server API: users -------------------------------------------------------

    @app.route("/api/users/<user>/sessions", methods=["DELETE"])
    def revoke_sessions(self, request: IRequest, user: str) -> Deferred:
        """
        End every session of a user (an API key's request): they are
        signed out everywhere, and their WebSockets opened with a session
        close.
        """

        def revoke(identity: Identity) -> Deferred:
            if identity.key is None:
                raise ChatError("not_allowed", "Only an API key may end a user's sessions.")
            accounts = self._accounts_on()
            user_id = validate_user_id(user)

            def done(count: int) -> bytes:
                if self.sessions is not None:
                    self.sessions.ended(user_id=user_id)
                return self._json(request, encode_json({"user": user_id, "ended": count}), jsonp=False)

            return accounts.sessions.end_all(user_id).addCallback(done)

        return self.identify(request).addCallback(revoke)

    # -- messages API --------------------------------------------------------

    @app.route("/api/rooms/<room>/messages", methods=["GET"])
    def get_messages(self, request: IRequest, room: str) -> Renderable:
        """
        Long-poll for messages after C{after}, or page back before
        C{before}.  (A plain GET comes here past Klein: L{long_poll}.)
        """
        return self._in_room(request, room, self._get_messages, request)

    def _get_messages(self, identity: Identity, room: Room, request: IRequest) -> Deferred:
        query = _messages_query(request)
        here = _presence_query(request, poll=True)
        if query.before is not None:
            d = self._core.read_before(room.name, query.before, query.limit, identity)
            return d.addCallback(self._respond_batch, request)
        poll = _Poll(self, request, query.timeout)
        d = Deferred(lambda _: poll.cancel())
        poll.wait(room.name, query, d.callback, d.errback, identity, here)
        return d

    def _respond_batch(self, batch: Batch, request: IRequest) -> bytes:
        return self._json(request, self._bodies.body(batch))

    def _respond_present(self, batch: Batch, request: IRequest, room: Room) -> bytes:
        """
        L{_respond_batch}, with the room's presence and typing spliced in
        (neither the batch nor the presence is encoded again).
        """
        body = self._present.body(self._bodies.body(batch), room.presence.poll_fields())
        return self._json(request, body)

    def _wake_batch(self, room: Room) -> Batch:
        return self._present.wake_batch(room)

    def long_poll(self, request: Any, room: str) -> object:
        """
        Answer C{GET /api/rooms/<room>/messages} as its Klein route does
        (L{get_messages}), without Klein's routing: the same parameters,
        the same wait, the same answers and errors, written in one piece
        with a Content-Length.  A client that goes away cancels its wait
        (C{notifyFinish}).  This is the request every long-poll client
        sends after every answer, so it does without Deferreds of its own.
        """
        try:
            identity, _ = self._enter_now(request, room)
            query = _messages_query(request)
            here = _presence_query(request, poll=True)
            if query.before is not None:
                raise _NotNow()
        except Exception:
            # An unknown room (maybe another node's: looked up in the
            # store), credentials to look up, a refusal, a history page, a
            # bug: the route's own way.
            self._answer_later(request, self._in_room, request, room, self._get_messages, request)
            return NOT_DONE_YET
        poll = _Poll(self, request, query.timeout)
        request.notifyFinish().addErrback(poll.gone)
        poll.wait(room, query, poll.write, poll.write_error, identity, here)
        return NOT_DONE_YET

    def _answer_later(self, request: Any, handler: Callable[..., Any], *args: Any) -> None:
        """
        Write the answer (or the error answer) that C{handler(*args)}
        comes to, at once or later.
        """
        result = maybeDeferred(handler, *args)
        result.addCallbacks(_finish, self._finish_failed, callbackArgs=(request,), errbackArgs=(request,))
        request.notifyFinish().addErrback(_cancel, result)

    def _finish_failed(self, failure: Failure, request: Any) -> None:
        if request.channel is None or failure.check(CancelledError):
            return  # the client went away
        _finish(self._error_answer(request, failure), request)

    def _start_poll(self, timeout: Optional[float]) -> Optional[float]:
        """
        Count a long-poll that starts waiting (its connection holds a place
        among the server's connections already, L{chatd.limits.Connections}).

        @return: how long it may wait (not at all while shutting down).
        """
        self.long_polls += 1
        return 0.0 if self.shutting_down else timeout

    def _end_poll(self) -> None:
        self.long_polls -= 1

    def _wait(
        self,
        room: str,
        after: Optional[int],
        limit: int,
        timeout: Optional[float],
        identity: Identity,
    ) -> Deferred:
        """
        Long-poll, counted while it waits (the tutorial's endpoint).
        """
        timeout = self._start_poll(timeout)

        def done(result: object) -> object:
            self._end_poll()
            return result

        return self._core.wait(room, after, limit, timeout, identity).addBoth(done)

    @app.route("/api/rooms/<room>/messages", methods=["POST"])
    def post_message(self, request: IRequest, room: str) -> Renderable:
        """
        Post C{{"nick", "body", "client_id"}} (JSON or form); 201 with the
        stored message once it is committed.  A user's message is theirs
        (C{nick} is ignored); an API key posts as C{{"as": {"id",
        "name"}}} (a user) or C{{"bot": NAME}}.
        """
        return self._in_room(request, room, self._post_message, request)

    def _post_message(self, identity: Identity, room: Room, request: IRequest) -> Deferred:
        fields = self._fields(request, identity)
        if identity.key is not None:
            identity = Identity(_speaker(fields), "key", key=identity.key)
        d = self._core.post(
            room.name,
            fields.get("nick"),
            fields.get("body"),
            fields.get("client_id"),
            Peer(_ip(request)),
            identity,
        )

        def respond(message: Message) -> bytes:
            self._count_post()
            return self._json(request, message.json, 201, jsonp=False)

        return d.addCallback(respond)

    # -- edits, deletions, moderation, settings, read markers ------------------

    def _acting(self, identity: Identity, fields: Dict[str, Any]) -> Identity:
        """
        Who acts: the request's identity, or for an API key the user named
        in C{as}, if it names one.
        """
        if identity.key is not None and fields.get("as") is not None:
            return Identity(_named_user(fields.get("as")), "key", key=identity.key)
        return identity

    def _event_answer(self, event: Message, request: IRequest, status: int = 200) -> bytes:
        return self._json(request, event.json, status, jsonp=False)

    @app.route("/api/rooms/<room>/messages/<seq>", methods=["PATCH"])
    def edit_message(self, request: IRequest, room: str, seq: str) -> Deferred:
        """
        Edit message C{seq}: C{{"body": ...}}; 200 with the C{edit} event.
        """

        def edit(identity: Identity, found: Room) -> Deferred:
            fields = self._fields(request, identity)
            d = self._core.edit(
                found.name, seq, fields.get("body"), self._acting(identity, fields), Peer(_ip(request))
            )
            return d.addCallback(self._event_answer, request)

        return self._in_room(request, room, edit)

    @app.route("/api/rooms/<room>/messages/<seq>", methods=["DELETE"])
    def delete_message(self, request: IRequest, room: str, seq: str) -> Deferred:
        """
        Delete message C{seq}; 200 with the C{delete} event.
        """

        def delete(identity: Identity, found: Room) -> Deferred:
            self._check_change(request, identity)
            d = self._core.delete(found.name, seq, identity, Peer(_ip(request)))
            return d.addCallback(self._event_answer, request)

        return self._in_room(request, room, delete)

    @app.route("/api/rooms/<room>/moderation", methods=["POST"])
    def moderate(self, request: IRequest, room: str) -> Deferred:
        """
        A moderation action: C{{"user": ID, "action": "kick"|"ban"|
        "unban"|"mute"|"unmute", "duration": seconds, "reason": text}};
        201 with the C{moderation} event.
        """

        def moderate(identity: Identity, found: Room) -> Deferred:
            fields = self._fields(request, identity)
            d = self._core.moderate(
                found.name,
                fields.get("user"),
                fields.get("action"),
                identity,
                fields.get("duration"),
                fields.get("reason"),
                Peer(_ip(request)),
            )
            return d.addCallback(self._event_answer, request, 201)

        return self._in_room(request, room, moderate)

    @app.route("/api/rooms/<room>/moderation", methods=["GET"])
    def restrictions(self, request: IRequest, room: str) -> Deferred:
        """
        The bans and mutes in force (for the room's owners and moderators):
        C{{"bans": [{"id", "name", "until"}], "mutes": [...]}}.
        """

        def render(identity: Identity, found: Room) -> bytes:
            if self._core.role(found, identity) not in ("owner", "moderator"):
                raise ChatError("not_allowed", "Only the room's owners and moderators see its bans and mutes.")
            now_ms = int(self._clock.seconds() * 1000)
            access = found.access

            def listed(table: Dict[str, Optional[int]], kind: str) -> List[dict]:
                return [
                    {
                        "id": user_id,
                        "name": access.names.get(user_id, user_id),
                        "until": None if until is None else until / 1000.0,
                    }
                    for user_id, until in sorted(table.items())
                    if access.restricted(kind, user_id, now_ms) is not None
                ]

            body = {"room": found.name, "bans": listed(access.bans, "ban"), "mutes": listed(access.mutes, "mute")}
            return self._json(request, encode_json(body), jsonp=False)

        return self._in_room(request, room, render)

    @app.route("/api/rooms/<room>", methods=["PATCH"])
    def configure_room(self, request: IRequest, room: str) -> Deferred:
        """
        Change the room's settings: C{{"topic": text, "edits": bool}}
        (either or both); 200 with the C{room} event.
        """

        def configure(identity: Identity, found: Room) -> Deferred:
            fields = self._fields(request, identity)
            edits = _flag(fields, "edits", None) if "edits" in fields else None
            d = self._core.configure_room(found.name, identity, fields.get("topic"), edits, Peer(_ip(request)))
            return d.addCallback(self._event_answer, request)

        return self._in_room(request, room, configure)

    @app.route("/api/rooms/<room>/read", methods=["POST"])
    def mark_read(self, request: IRequest, room: str) -> Deferred:
        """
        The user has read the room up to C{{"seq": N}}: 200 with C{{"room",
        "read", "unread"}}.
        """

        def mark(identity: Identity, found: Room) -> Deferred:
            fields = self._fields(request, identity)

            def render(marked: Tuple[int, int]) -> bytes:
                body = {"room": found.name, "read": marked[0], "unread": marked[1]}
                return self._json(request, encode_json(body), jsonp=False)

            return self._core.mark_read(found.name, fields.get("seq"), identity).addCallback(render)

        return self._in_room(request, room, mark)
    # -- typing ----------------------------------------------------------------

    @app.route("/api/rooms/<room>/typing", methods=["POST"])
    def post_typing(self, request: IRequest, room: str) -> Deferred:
        """
        C{{"typing": true|false}} (JSON or form; a guest may add C{nick}
        and C{client}): the sender started (or is still) typing, or
        stopped.  204, or the usual error; a start too soon after the last
        one is dropped quietly.
        """
        return self._in_room(request, room, self._typing, request)

    def _typing(self, identity: Identity, room: Room, request: IRequest) -> bytes:
        wait = self._typing_limiter.take(identity.user_id or _ip(request))
        if wait:
            raise rate_limited("Too many typing signals", wait)
        fields = self._fields(request, identity)
        on = validate_flag(fields.get("typing"), "typing", True)
        client = validate_client(fields.get("client"))
        self._core.typing(room, identity, on, fields.get("nick"), client, "ip:" + _ip(request))
        request.setResponseCode(204)
        request.setHeader(b"cache-control", b"no-store")
        return b""

    # -- Server-Sent Events ----------------------------------------------------

    @app.route("/api/rooms/<room>/events", methods=["GET"])
    def events(self, request: IRequest, room: str) -> Deferred:
        """
        The room's events as C{text/event-stream} (L{chatd.sse}): after
        C{Last-Event-ID} (a reconnecting C{EventSource}'s) or C{?after=},
        else the room's cached history, then live.
        """
        return self._in_room(request, room, self._event_stream, request)

    def _event_stream(self, identity: Identity, room: Room, request: IRequest) -> Deferred:
        resumed = request.getHeader(b"last-event-id")
        if resumed is not None:
            after = parse_cursor(resumed.decode("latin-1").strip(), "Last-Event-ID")
        else:
            after = parse_cursor(_query(request, "after"), "after")
        expires = None
        if identity.via == "token" and identity.expires is not None:
            expires = identity.expires + TOKEN_GRACE
        if self.shutting_down:
            raise ChatError("not_ready", "The server is shutting down; try another.")
        here = _presence_query(request)
        stream = EventStream(request, self._clock, expires, self._slow_stream, self._ticks)
        self._streams.add(stream)
        unwatch = None if self.sessions is None else self.sessions.watch(identity, stream.session_ended)

        def subscribe(deliver: Any, on_reset: Any, on_revoked: Any) -> Any:
            return self._core.subscribe(room.name, after, deliver, on_reset, identity, on_revoked)

        def over(result: object) -> object:
            self._streams.discard(stream)
            if unwatch is not None:
                unwatch()
            return result

        d = stream.start(subscribe).addBoth(over)
        self._stream_here(stream, d, room, identity, here)
        return d

    def _stream_here(
        self, stream: EventStream, done: Deferred, room: Room, identity: Identity, here: _PollPresence
    ) -> None:
        """
        Count an event stream in the room's presence, right after its
        backlog (listening, with C{?presence=1}), until it ends; a stream
        the server ended stays a while, as its browser comes back.
        """
        if done.called:
            return
        listener = stream.signal if here.wanted else None
        visit = self._core.arrive(room, identity, here.client, None, listener)
        if visit is None:
            return

        def leave(result: object) -> object:
            ended = not isinstance(result, Failure) and not stream.was_revoked
            visit.leave(STREAM_GRACE if ended else 0.0)
            return result

        done.addBoth(leave)

    def _slow_stream(self) -> None:
        self.log.info("Dropped an event stream that was not being read")
        if self._metrics is not None:
            self._metrics.rejected.labels("slow_consumer").inc()

    def end_streams(self) -> int:
        """
        Shutting down (or draining): end every event stream (their clients
        resume elsewhere, with Last-Event-ID).

        @return: how many there were.
        """
        streams = list(self._streams)
        for stream in streams:
            stream.end()
        return len(streams)

    # -- WebSocket -----------------------------------------------------------

    @app.route("/ws/<room>", methods=["GET"])
    def websocket(self, request: IRequest, room: str) -> Any:
        """
        Hand a WebSocket upgrade for a room the client may use to Autobahn
        (which checks who it is again, from the same credentials).
        """
        return self._in_room(request, room, self._websocket_upgrade, request)

    def websocket_now(self, request: IRequest, name: str) -> Optional[IResource]:
        """
        L{websocket}'s answer without Klein's routing, where it is known at
        once (a room this node follows, credentials that need no store,
        an upgrade it accepts): Autobahn's resource.  None otherwise: the
        route's own way gives the answer (a lookup, an error).
        """
        try:
            return self._websocket_upgrade(*self._enter_now(request, name), request)
        except Exception:
            return None

    def _enter_now(self, request: IRequest, name: str) -> Tuple[Identity, Room]:
        """
        The request's identity and room C{name}, where both are known at
        once: credentials that need no store (L{_identify_now}), a room
        this node follows, admitted.

        @raise _NotNow: the credentials must be looked up.
        @raise ChatError: not a room this node follows, or refused.
        """
        identity = self._identify_now(request)
        if identity is None:
            raise _NotNow()
        return identity, self._core.admit(self._core.room(name), identity)

    def _websocket_upgrade(self, identity: Identity, room: Room, request: IRequest) -> IResource:
        parse_cursor(_query(request, "after"), "after")
        upgrade = request.getHeader(b"upgrade") or b""
        if upgrade.lower() != b"websocket":
            request.setHeader(b"upgrade", b"websocket")
            raise ChatError(
                "upgrade_required", "This is a WebSocket endpoint; connect with ws://."
            )
        return self._websocket

    def check_request(self, request: IRequest) -> None:
        """
        Refuse a request addressed to another host (with --public-url), or
        a WebSocket upgrade or state-changing request from another site's
        page.  Every request comes here before routing.

        @raise ChatError: C{misdirected_request}, C{invalid_origin},
            C{origin_not_allowed}.
        """
        if self._public_hosts and request.postpath not in _PROBES:
            self._check_host(request)
        upgrade = request.getHeader(b"upgrade")
        is_upgrade = upgrade is not None and b"websocket" in upgrade.lower()
        if is_upgrade or request.method in _STATE_CHANGING:
            self._check_origin(request)

    def _check_host(self, request: IRequest) -> None:
        """
        DNS rebinding: a page on another site whose name now resolves to
        chatd's address reaches chatd with its own name as Host, and with
        Origin agreeing.  Only requests addressed to a public URL are
        answered.
        """
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if hosts is not None and len(hosts) == 1 and hosts[0].lower() in self._public_hosts:
            return
        given = b", ".join(hosts or [b"none"]).decode("latin-1")
        raise ChatError(
            "misdirected_request",
            f"This server answers for {', '.join(sorted(self._public_origins))}, "
            f"not for Host {given!r}.",
        )

    def _check_origin(self, request: IRequest) -> None:
        """
        Refuse cross-site WebSocket hijacking and cross-site posts: a
        browser's Origin must be this server's own (a --public-url one, or
        without those the Host header's), or one given with
        --allow-origin.  Clients that send no Origin (not browsers) are
        let through; C{null} (sandboxed frames, file: pages) is not.
        """
        origins = request.requestHeaders.getRawHeaders(b"origin")
        if origins is None:
            return
        # Every value, not the last one (getHeader's): a check of one of
        # several would let the others past it.
        if len(origins) != 1 or len(origins[0].replace(b",", b" ").split()) != 1:
            raise ChatError("invalid_origin", "Send one Origin header with one origin.")
        text = origins[0].decode("latin-1")
        origin = canonical_origin(text)
        if origin is not None and self._origin_allowed(origin, request):
            return
        raise ChatError(
            "origin_not_allowed", f"Requests from pages of {text!r} are not allowed here."
        )

    def _origin_allowed(self, origin: str, request: IRequest) -> bool:
        if origin in self._allow_origins:
            return True
        if self._public_origins:
            return origin in self._public_origins
        host = request.getHeader(b"host")
        if not host:
            return False
        scheme = origin.split("://", 1)[0]
        return canonical_origin(f"{scheme}://{host.decode('latin-1')}") == origin

    def listening(self, address: object) -> None:
        """
        Told where the site listens, once it does: without --public-url,
        warn if that is beyond loopback, where DNS rebinding can reach it.

        @param address: the listening port's address (C{getHost()}).
        """
        host = getattr(address, "host", None)
        if self._public_hosts or not isinstance(host, str) or _is_loopback(host):
            return
        self.log.warn(
            "chatd listens on {address}, beyond loopback, without --public-url: "
            "DNS rebinding is possible (a page on any site can reach chatd under "
            "a name of its own and pass for chatd's own pages). Give --public-url "
            "with each URL clients use, e.g. --public-url https://chat.example.org.",
            address=f"{host}:{getattr(address, 'port', '?')}",
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
            describe = getattr(self._bus, "describe", None)
            if describe is None:
                return self._json(request, b'{"status":"ready"}', jsonp=False)
            # Ready either way: without its bus a node reads the store
            # instead, a little later; the detail says so.
            body = encode_json({"status": "ready", "bus": describe()})
            return self._json(request, body, jsonp=False)

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
            raise ChatError("not_found", "Metrics are not served here.")
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._metrics.render()

    # -- the tutorial's long-poll protocol -----------------------------------

    def _tutorial(self, request: IRequest, payload: dict) -> bytes:
        # Cross-origin, as in the tutorial: the page is served by another
        # origin and reads these answers.  No credentials are involved.
        request.setHeader(b"access-control-allow-origin", b"*")
        return self._json(request, json.dumps(payload).encode("ascii"))

    @app.route("/rooms/<room>/poll", methods=["GET"])
    def tutorial_poll(self, request: IRequest, room: str) -> Renderable:
        """
        The tutorial's long-poll: one message after cursor C{lastupdate}
        (the previous answer's C{timestamp}, which is a seq here).
        """
        return self._in_room(request, room, self._tutorial_poll, request, cross_site=True)

    def _tutorial_poll(self, identity: Identity, found: Room, request: IRequest) -> Renderable:
        room = found.name
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
                request, {"status": 1, "timestamp": message.seq, "data": _tutorial_text(message)}
            )

        return self._wait(room, after, 1, timeout, identity).addCallback(respond)

    @app.route("/rooms/<room>/poll", methods=["POST"])
    def tutorial_post(self, request: IRequest, room: str) -> Renderable:
        """
        The tutorial's post: form field C{new_message}.
        """
        return self._in_room(request, room, self._tutorial_post, request, cross_site=True)

    def _tutorial_post(self, identity: Identity, found: Room, request: IRequest) -> Deferred:
        request.setHeader(b"access-control-allow-origin", b"*")
        fields = _form_or_json(request)
        d = self._core.post(
            found.name,
            fields.get("nick"),
            fields.get("new_message"),
            None,
            Peer(_ip(request)),
            identity,
        )

        def respond(message: Message) -> bytes:
            self._count_post()
            return self._tutorial(
                request, {"status": 1, "timestamp": message.seq, "data": message.body}
            )

        return d.addCallback(respond)


class _NotNow(Exception):
    """
    The long-poll's fast path cannot answer this request.
    """


def _tutorial_text(message: Message) -> str:
    """
    What the tutorial's clients show of an event: a message's body (as it
    is now), every other event in words.
    """
    kind, user, meta = message.kind, message.user, message.meta or {}
    if kind == "message":
        return "(message deleted)" if message.deleted else message.body
    who = "someone" if user is None else user.name
    if kind == "member":
        return f"{who} is now a {message.body} of this room." if message.body else f"{who} left this room."
    if kind == "edit":
        return f"{who} edited message {message.target}: {message.body}" if message.body else f"{who} edited message {message.target}."
    if kind == "delete":
        return f"{'A moderator' if user is None else who} deleted message {message.target}."
    by = meta.get("by")
    actor = "The server" if not isinstance(by, dict) else str(by.get("name"))
    if kind == "moderation":
        verbs = {"kick": "removed", "ban": "banned", "unban": "lifted the ban on", "mute": "muted", "unmute": "unmuted"}
        return f"{actor} {verbs.get(str(meta.get('action')), 'moderated')} {who}."
    return f"{who} set the topic: {message.body}" if message.body else f"{who} cleared the topic."


def _wants_page(request: IRequest) -> bool:
    """
    Whether a request is a browser's for a page (not the API's, a
    WebSocket's or a static file's).
    """
    path = request.path
    return (
        request.method in (b"GET", b"HEAD")
        and not path.startswith((b"/api/", b"/ws/", b"/static/"))
        and b"text/html" in (request.getHeader(b"accept") or b"")
    )


def _is_form(request: IRequest) -> bool:
    """
    Whether a browser's form sent the request (it is answered with a
    redirect, not JSON).
    """
    content_type = (request.getHeader(b"content-type") or b"").lower()
    return content_type.startswith(b"application/x-www-form-urlencoded")


def _next(request: IRequest) -> str:
    return _safe_next(_query(request, "next")).decode("ascii")


def _safe_next(value: object) -> bytes:
    """
    Where to go after signing in: a path on this server, never another
    site (an open redirect).
    """
    if (
        isinstance(value, str)
        and value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and value.isascii()
        and value.isprintable()
        and len(value) <= 256
    ):
        return value.encode("ascii")
    return b"/"


def _named_user(value: object) -> User:
    """
    C{{"id", "name"}} of a user an API key names.
    """
    if not isinstance(value, dict):
        raise ChatError("invalid_user", 'Name a user as {"id": ..., "name": ...}.')
    user_id = validate_user_id(value.get("id"))
    return User(user_id, validate_display_name(value.get("name") or user_id))


def _speaker(fields: Dict[str, Any]) -> User:
    """
    Who an API key posts as: C{as} (a user) or C{bot} (a name), one of
    them.

    @raise ChatError: C{invalid_user} for neither or both.
    """
    speaker, bot = fields.get("as"), fields.get("bot")
    if (speaker is None) == (bot is None):
        raise ChatError(
            "invalid_user",
            'An API key posts as a user, {"as": {"id", "name"}}, or as a bot, {"bot": NAME}: one of them.',
        )
    if speaker is not None:
        return _named_user(speaker)
    name = validate_display_name(bot)
    return User(f"bot:{name}", name)


def _checked_origins(urls: Sequence[str]) -> List[str]:
    """
    The L{canonical_origin}s of C{urls}.

    @raise ValueError: if one of them is not an http or https origin.
    """
    origins = []
    for url in urls:
        origin = canonical_origin(url)
        if origin is None:
            raise ValueError(f"{url!r} is not an http or https origin")
        origins.append(origin)
    return origins


def _finish(body: bytes, request: Any) -> None:
    """
    Write a whole answer and finish the request, unless its client went
    away meanwhile.
    """
    if request.channel is None:
        return
    request.write(body)
    request.finish()


def _cancel(failure: Failure, d: Deferred) -> None:
    """
    The request's connection was lost: cancel what it waits for.
    """
    d.cancel()
