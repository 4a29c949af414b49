# -*- test-case-name: tests.test_web,tests.test_ws -*-
"""
What the HTTP and WebSocket adapters share: the HTTP status of each
L{ChatError} code (an HTTP answer's status, a WebSocket error frame's
C{status} field, a refused handshake's status), the JSON error body, and
how a client's address is read.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from chatd.model import ChatError, encode_json

__all__ = ["STATUS", "REASONS", "client_host", "error_body", "http_status", "retry_after"]

#: Every error code chatd uses, with its HTTP status.
STATUS: Dict[str, int] = {
    "invalid_url": 400,
    "invalid_room_name": 400,
    "invalid_nick": 400,
    "invalid_body": 400,
    "invalid_client_id": 400,
    "invalid_parameter": 400,
    "invalid_callback": 400,
    "invalid_json": 400,
    "invalid_form": 400,
    "invalid_utf8": 400,
    "unknown_type": 400,
    "invalid_origin": 400,
    "invalid_name": 400,
    "invalid_user": 400,
    "invalid_role": 400,
    "invalid_password": 400,
    "invalid_topic": 400,
    "invalid_reason": 400,
    "invalid_action": 400,
    "invalid_duration": 400,
    "auth_required": 401,
    "invalid_token": 401,
    "token_expired": 401,
    "invalid_key": 401,
    "invalid_credentials": 401,
    "csrf_failed": 403,
    "not_allowed": 403,
    "banned": 403,
    "muted": 403,
    "kicked": 403,
    "not_member": 403,
    "edits_disabled": 403,
    "edit_window_closed": 403,
    "too_many_restrictions": 403,
    "signup_closed": 403,
    "invalid_invite": 403,
    "user_not_found": 404,
    "user_exists": 409,
    "message_not_found": 404,
    "message_deleted": 409,
    "not_restricted": 409,
    "origin_not_allowed": 403,
    "too_many_rooms": 403,
    "room_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "misdirected_request": 421,
    "room_exists": 409,
    "body_too_long": 413,
    "request_too_large": 413,
    "unsupported_media_type": 415,
    "upgrade_required": 426,
    "rate_limited": 429,
    "internal_error": 500,
    "server_full": 503,
    "too_many_connections": 503,
    "not_ready": 503,
    "server_busy": 503,
}

#: Reason phrases twisted.web's own table lacks.
REASONS: Dict[int, bytes] = {
    421: b"Misdirected Request",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
}


def http_status(error: ChatError) -> int:
    """
    The HTTP status that carries C{error}.
    """
    return STATUS[error.code]


def error_body(code: str, detail: str) -> bytes:
    """
    The JSON body of an HTTP error: C{{"error": CODE, "detail": TEXT}}.
    """
    return encode_json({"error": code, "detail": detail})


def retry_after(error: ChatError) -> Optional[bytes]:
    """
    The C{Retry-After} value for C{error}: its wait in whole seconds, at
    least 1; None for refusals that do not pass.
    """
    if error.retry_after is None:
        return None
    return b"%d" % (max(1, math.ceil(error.retry_after)),)


def client_host(address: Any) -> str:
    """
    The host part of a peer address (the TCP peer's, or the one the PROXY
    protocol gave, which Twisted's C{haproxy:} endpoint puts in its place);
    C{"?"} for addresses without one (UNIX sockets).
    """
    return str(getattr(address, "host", "?"))
