"""The ``TwinkleError`` family, under its public name (defined in ``twinkle.protocol.errors``)."""

from .protocol.errors import (
    ERRORS_BY_CODE,
    AuthenticationError,
    CapacityError,
    CheckpointError,
    ConflictError,
    DeadlineError,
    HttpError,
    HubError,
    InvalidArgumentError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    ServerError,
    StateError,
    TransportError,
    TwinkleError,
    UnknownComponentError,
    UnsupportedMediaTypeError,
    error_for_status,
    error_from_code,
    first_line,
    one_line,
    status_for,
)

__all__ = [
    "ERRORS_BY_CODE", "AuthenticationError", "CapacityError", "CheckpointError", "ConflictError",
    "DeadlineError", "HttpError", "HubError", "InvalidArgumentError", "MethodNotAllowedError",
    "NotFoundError", "PayloadTooLargeError", "ServerError", "StateError", "TransportError", "TwinkleError",
    "UnknownComponentError", "UnsupportedMediaTypeError", "error_for_status", "error_from_code", "first_line",
    "one_line", "status_for",
]
