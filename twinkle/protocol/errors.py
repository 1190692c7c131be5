"""The ``TwinkleError`` family: every error twinkle raises on purpose.

Each class carries a stable ``code`` and the HTTP ``status`` the server answers it with. The
server sends the code over the wire and the client raises the same class again, so
``except twinkle.errors.CapacityError`` works the same locally and remotely. Details a layer
needs besides the message travel as fields (``request_id``, ``call``, ``blocked_by``,
``aliases``), never as edits of the message text.
"""

from __future__ import annotations

from collections.abc import Mapping


class TwinkleError(Exception):
    """Base class of all twinkle errors. ``str(err)`` is one line a user can act on.

    ``request_id``: the server request that failed (its log has the details).
    ``call``: for a failed remote call, the method that failed (``'step'``).
    ``blocked_by``: for a call that never ran because an earlier call of the same object
    failed, that earlier error.
    ``aliases``: names in the message that a remote user knows by another name (a server
    folder and its ``twinkle://`` path, the server's name for an adapter and the user's);
    the server's error scrubber applies them where errors leave the server.
    """

    code = "twinkle_error"
    status = 400

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        call: str | None = None,
        blocked_by: TwinkleError | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.call = call
        self.blocked_by = blocked_by
        self.aliases = dict(aliases or {})

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request id {self.request_id})"
        return self.message



class InvalidArgumentError(TwinkleError, ValueError):
    """An argument has the wrong value, type or shape."""

    code = "invalid_argument"


class UnknownComponentError(InvalidArgumentError):
    """A component name (loss, optimizer, template, ...) is not registered."""

    code = "unknown_component"


class PayloadTooLargeError(InvalidArgumentError):
    """A request body, or a value inside it, is larger than the server accepts."""

    code = "payload_too_large"
    status = 413


class UnsupportedMediaTypeError(InvalidArgumentError):
    """A request body's ``Content-Encoding`` or ``Content-Type`` the server cannot read."""

    code = "unsupported_media_type"
    status = 415


class MethodNotAllowedError(InvalidArgumentError):
    """An HTTP method the route does not answer."""

    code = "method_not_allowed"
    status = 405


class NotFoundError(TwinkleError, LookupError):
    """A dataset, model, run, checkpoint or remote object does not exist (or is not yours)."""

    code = "not_found"
    status = 404


class CapacityError(TwinkleError):
    """A limit is reached: no free adapter slot, rank above ``max_r``, too many objects."""

    code = "capacity"
    status = 409


class StateError(TwinkleError, RuntimeError):
    """The call is not valid in the object's current state (e.g. no optimizer set yet)."""

    code = "invalid_state"
    status = 409


class ConflictError(StateError):
    """A request clashes with an earlier one (e.g. a retried call that is not the recorded call)."""

    code = "conflict"
    status = 409


class CheckpointError(TwinkleError):
    """A path is not a complete twinkle checkpoint, or does not fit the model."""

    code = "invalid_checkpoint"


class AuthenticationError(TwinkleError):
    """The API key is missing, wrong or revoked."""

    code = "unauthenticated"
    status = 401


class ServerError(TwinkleError):
    """The server failed unexpectedly; details are in its log under the request id."""

    code = "internal"
    status = 500


class HubError(TwinkleError):
    """A model hub (ModelScope, Hugging Face) could not be reached or refused the request."""

    code = "hub_error"
    status = 502


class TransportError(TwinkleError, ConnectionError):
    """The server could not be reached (or kept dropping the connection), or is shutting down."""

    code = "unavailable"
    status = 503


class DeadlineError(TwinkleError, TimeoutError):
    """A wait ran past the timeout the caller gave; what it waited for may still finish."""

    code = "deadline_exceeded"
    status = 504


class HttpError(TwinkleError):
    """An HTTP failure with no more specific class; ``status`` is the one the server answered."""

    code = "http_error"


def _registered(root: type[TwinkleError]) -> dict[str, type[TwinkleError]]:
    found = {root.code: root}
    for sub in root.__subclasses__():
        found.update(_registered(sub))
    return found


ERRORS_BY_CODE: dict[str, type[TwinkleError]] = _registered(TwinkleError)
"""Every error class by its code: the one table both sides read."""


def status_for(code: str) -> int:
    """The HTTP status of an error code (an unknown code is the caller's fault: 400)."""
    cls = ERRORS_BY_CODE.get(code)
    return cls.status if cls is not None else 400


def error_for_status(status: int) -> type[TwinkleError]:
    """The error class of a bare HTTP status (a reply without a twinkle error body)."""
    if status in (401, 403):
        return AuthenticationError
    if status >= 500:
        return TransportError if status in (502, 503, 504) else ServerError
    for cls in (NotFoundError, PayloadTooLargeError, UnsupportedMediaTypeError, MethodNotAllowedError):
        if cls.status == status:
            return cls
    return InvalidArgumentError if status in (400, 422) else HttpError


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none: how a foreign
    exception is quoted inside a one-line twinkle error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def error_from_code(code: str, message: str, request_id: str | None = None, *,
                    call: str | None = None) -> TwinkleError:
    """Rebuild the typed error that a server reported as ``code``."""
    return ERRORS_BY_CODE.get(code, TwinkleError)(message, request_id=request_id, call=call)
