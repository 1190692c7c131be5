"""What a remote user may name: hub and built-in ids, never files of the server."""

from __future__ import annotations

from typing import Any

from twinkle.errors import InvalidArgumentError

REMOTE_SCHEMES = ("builtin://", "ms://", "hf://")


def check_remote_id(value: Any, what: str, *, allow_local: bool) -> None:
    """Refuse an id that would make the server read its own files (a path, or a bare name that
    could be one) unless the operator allowed it with ``--allow-local-data``.

    Non-strings pass: the library reports its own type errors.
    """
    if not isinstance(value, str) or allow_local or value.startswith(REMOTE_SCHEMES):
        return
    hint = f" (write ms://{value} for a ModelScope id)" if value.count("/") == 1 and "://" not in value else ""
    raise InvalidArgumentError(
        f"{what} {value[:200]!r} is not a builtin://, ms:// or hf:// id; this server does not read its "
        f"local files{hint}"
    )
