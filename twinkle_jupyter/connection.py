"""Which ``TwinkleClient`` the notebook layer talks to, and one-line error messages.

The notebook layer never keeps a client of its own: it asks ``twinkle_client`` for the
*current connection* each time, so a later ``init_twinkle_client(...)`` or
``%twinkle connect`` (which closes the previous client) is picked up by live plots too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["current_client", "one_line_error", "is_twinkle_error"]


def current_client(explicit: Any = None) -> Any:
    """``explicit`` if given, else twinkle_client's current connection (made from the env if none)."""
    if explicit is not None:
        return explicit
    from twinkle_client.client import current_client as _current

    return _current()


def is_twinkle_error(exc: BaseException) -> bool:
    from twinkle.errors import TwinkleError

    return isinstance(exc, TwinkleError)


def one_line_error(exc: BaseException) -> str:
    """``str(err)`` of a twinkle error; for anything else the type and the first line of the message."""
    if is_twinkle_error(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split()) or type(exc).__name__
