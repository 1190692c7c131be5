"""The ``TwinkleError`` family: every error twinkle raises on purpose.

Each class carries a stable ``code``. The server sends that code over the wire and the
client raises the same class again, so ``except twinkle.errors.CapacityError`` works the
same locally and remotely.
"""

from __future__ import annotations


class TwinkleError(Exception):
    """Base class of all twinkle errors. ``str(err)`` is one line a user can act on."""

    code = "twinkle_error"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

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


class NotFoundError(TwinkleError, LookupError):
    """A dataset, model, run, checkpoint or remote object does not exist (or is not yours)."""

    code = "not_found"


class CapacityError(TwinkleError):
    """A limit is reached: no free adapter slot, rank above ``max_r``, too many objects."""

    code = "capacity"


class StateError(TwinkleError, RuntimeError):
    """The call is not valid in the object's current state (e.g. no optimizer set yet)."""

    code = "invalid_state"


class CheckpointError(TwinkleError):
    """A path is not a complete twinkle checkpoint, or does not fit the model."""

    code = "invalid_checkpoint"


class AuthenticationError(TwinkleError):
    """The API key is missing, wrong or revoked."""

    code = "unauthenticated"


class ServerError(TwinkleError):
    """The server failed unexpectedly; details are in its log under the request id."""

    code = "internal"


class TransportError(TwinkleError, ConnectionError):
    """The server could not be reached (or kept dropping the connection)."""

    code = "unavailable"


class HubError(TwinkleError):
    """A model hub (ModelScope, Hugging Face) could not be reached or refused the request."""

    code = "hub_error"


ERRORS_BY_CODE: dict[str, type[TwinkleError]] = {
    cls.code: cls
    for cls in (
        TwinkleError,
        InvalidArgumentError,
        UnknownComponentError,
        NotFoundError,
        CapacityError,
        StateError,
        CheckpointError,
        AuthenticationError,
        ServerError,
        TransportError,
        HubError,
    )
}


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none: how a foreign
    exception is quoted inside a one-line twinkle error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_from_code(code: str, message: str, request_id: str | None = None) -> TwinkleError:
    """Rebuild the typed error that a server reported as ``code``."""
    return ERRORS_BY_CODE.get(code, TwinkleError)(message, request_id=request_id)
