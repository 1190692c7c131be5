"""What a remote user may name: hub and built-in ids, never files of the server."""

from __future__ import annotations

import os
from typing import Any

from twinkle.errors import InvalidArgumentError
from twinkle.protocol.names import REMOTE_SCHEMES, check_hub_id


def check_remote_id(value: Any, what: str, *, allow_local: bool) -> None:
    """Refuse an id that would make the server read its own files (a path, or a bare name that
    could be one) unless the operator allowed it with ``--allow-local-data``, and a malformed
    ``ms://``/``hf://`` id always.

    Non-strings pass: the library reports its own type errors.
    """
    if not isinstance(value, str):
        return
    check_hub_id(value, what)
    if allow_local or value.startswith(REMOTE_SCHEMES):
        return
    hint = f" (write ms://{value} for a ModelScope id)" if value.count("/") == 1 and "://" not in value else ""
    raise InvalidArgumentError(
        f"{what} {value[:200]!r} is not a builtin://, ms:// or hf:// id; this server does not read its "
        f"local files{hint}"
    )


def check_dataset_id(value: Any, *, allow_local: bool) -> None:
    """``check_remote_id`` for a dataset, plus: an ``hf://org/name`` that is also a path relative
    to the server's working folder is refused (``datasets.load_dataset`` would read that folder)."""
    check_remote_id(value, "dataset", allow_local=allow_local)
    if allow_local or not isinstance(value, str) or not value.startswith("hf://"):
        return
    if os.path.lexists(value[len("hf://"):]):
        raise InvalidArgumentError(
            f"dataset {value[:200]!r} cannot be loaded by this server: the Hugging Face loader would read "
            "a local folder of the same name"
        )
