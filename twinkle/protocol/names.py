"""What a name or id may look like: adapters, checkpoints, runs, hub repositories, ``twinkle://`` paths.

Every layer checks user-given names against these rules and nothing else, so a name the
library accepts is one the server accepts and the client can route. A bad name is always an
``InvalidArgumentError``; a well-formed name that names nothing is a ``NotFoundError``.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidArgumentError

TWINKLE_SCHEME = "twinkle://"
REMOTE_SCHEMES = ("builtin://", "ms://", "hf://")
"""The ids a remote user may name: built-in resources and hub repositories."""
HUB_SCHEMES = ("ms://", "hf://")

_PART = r"[A-Za-z0-9][\w.-]*"
_HUB_REPO = re.compile(f"{_PART}/{_PART}")
_ADAPTER = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")
_CHECKPOINT = re.compile(r"[A-Za-z0-9][\w.-]{0,127}")
_RUN_ID = re.compile(r"run-[0-9a-f]{12}")


def shown(value: Any, limit: int = 200) -> str:
    """``repr`` of a user-given value, cut to ``limit`` characters and on one line."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.replace("\n", " ").replace("\r", " ")


def check_adapter_name(name: Any) -> str:
    """An adapter name: 1-64 letters, digits, ``_``, ``-`` or ``.``, starting with a letter or digit."""
    if not isinstance(name, str) or not _ADAPTER.fullmatch(name):
        raise InvalidArgumentError(
            "adapter name must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit; "
            f"got {shown(name)}"
        )
    return name


def is_checkpoint_name(name: Any) -> bool:
    return isinstance(name, str) and bool(_CHECKPOINT.fullmatch(name))


def check_checkpoint_name(name: Any) -> str:
    """A checkpoint name: 1-128 letters, digits, ``_``, ``-`` or ``.``, starting with a letter or digit."""
    if not is_checkpoint_name(name):
        raise InvalidArgumentError(
            "checkpoint name must be 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit; "
            f"got {shown(name)}"
        )
    return name


def is_run_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_RUN_ID.fullmatch(value))


def is_hub_repo(value: Any) -> bool:
    """True for an ``org/name`` hub repository id that can name no file by itself: one slash,
    each part starting with a letter or digit, no ``..``."""
    return isinstance(value, str) and bool(_HUB_REPO.fullmatch(value)) and ".." not in value


def split_hub_id(value: Any, what: str = "hub id") -> tuple[str, str]:
    """``('ms'|'hf', 'org/name')`` of ``ms://org/name``, ``hf://org/name`` or a bare ``org/name``
    (ModelScope, as upstream); anything else is an ``InvalidArgumentError``."""
    if isinstance(value, str):
        scheme, repo = "ms", value
        for prefix in HUB_SCHEMES:
            if value.startswith(prefix):
                scheme, repo = prefix[:-3], value[len(prefix):]
                break
        if is_hub_repo(repo):
            return scheme, repo
    raise InvalidArgumentError(
        f"{what} {shown(value)} is not a hub id: write 'org/name', 'ms://org/name' or 'hf://org/name' "
        "(letters, digits, '_', '-', '.')"
    )


def check_hub_id(value: Any, what: str) -> None:
    """Refuse an ``ms://``/``hf://`` id whose repository part is not ``org/name`` (``hf:///tmp/x``
    would make a hub library read local files). Other strings pass."""
    if isinstance(value, str) and value.startswith(HUB_SCHEMES):
        split_hub_id(value, what)


def twinkle_path(run_id: str, name: str) -> str:
    """``twinkle://<run_id>/weights/<name>``: how a checkpoint is named on the wire."""
    return f"{TWINKLE_SCHEME}{run_id}/weights/{name}"


def split_twinkle_path(value: Any) -> tuple[str, str] | None:
    """``(run_id, name)`` of a well-formed ``twinkle_path``; None for anything else."""
    if not isinstance(value, str) or not value.startswith(TWINKLE_SCHEME):
        return None
    parts = value[len(TWINKLE_SCHEME):].split("/")
    if len(parts) != 3 or parts[1] != "weights" or not is_run_id(parts[0]) or not is_checkpoint_name(parts[2]):
        return None
    return parts[0], parts[2]
