"""How failures become responses: status codes by error code, one-line messages, no tracebacks."""

from __future__ import annotations

import logging

from twinkle.errors import TwinkleError
from twinkle.protocol.wire import ErrorInfo

log = logging.getLogger("twinkle_server")

STATUS_BY_CODE = {
    "invalid_argument": 400,
    "unknown_component": 400,
    "invalid_checkpoint": 400,
    "twinkle_error": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "capacity": 409,
    "invalid_state": 409,
    "internal": 500,
    "hub_error": 502,
    "unavailable": 503,
}
INTERNAL_MESSAGE = "internal server error"


def status_for(code: str) -> int:
    """The HTTP status of an error code (unknown codes are the caller's fault: 400)."""
    return STATUS_BY_CODE.get(code, 400)


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def error_info(exc: BaseException, request_id: str | None, *, call: str | None = None) -> ErrorInfo:
    """The client-facing form of ``exc``. Anything unexpected is logged with its traceback and
    reported only as ``internal`` with the request id."""
    if isinstance(exc, TwinkleError):
        return ErrorInfo(code=exc.code, message=one_line(exc.message) or exc.code, request_id=request_id, call=call)
    if isinstance(exc, IndexError):  # the library's own "index out of range" for dataset[i]
        return ErrorInfo(code="invalid_argument", message=one_line(str(exc)) or "index out of range",
                         request_id=request_id, call=call)
    where = f" in call {call!r}" if call else ""
    log.error("request %s failed%s", request_id, where, exc_info=exc)
    return ErrorInfo(code="internal", message=INTERNAL_MESSAGE, request_id=request_id, call=call)
