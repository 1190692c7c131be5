"""What a name or id may look like: adapters, checkpoints, runs (ids, and the names, tags and
dataset a user gives them), hub repositories, ``twinkle://`` paths.

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


MAX_RUN_NAME = 100
"""The longest name a user gives a run."""
MAX_RUN_TAGS = 16
"""The most tags one run carries."""
MAX_TAG_LENGTH = 32
"""The longest tag."""
MAX_RUN_DATASET = 200
"""The longest dataset id a user records for a run."""
_TAG = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:=+-]{{0,{MAX_TAG_LENGTH - 1}}}")


def _one_line_text(value: Any, what: str, most: int) -> str:
    """``value`` stripped, if it is a string of at most ``most`` printable characters
    (so one line: no newlines, tabs or control characters); ``''`` clears."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    if len(value) > most:
        raise InvalidArgumentError(f"{what} must be at most {most} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidArgumentError(f"{what} must be one line of printable characters; got {shown(value, 60)}")
    return value


def check_run_name(value: Any) -> str:
    """A run's name: at most ``MAX_RUN_NAME`` printable characters on one line (``''``: none)."""
    return _one_line_text(value, "run name", MAX_RUN_NAME)


def check_run_dataset(value: Any) -> str:
    """A run's dataset id as the user records it (``ms://org/name``, ``builtin://...``): at most
    ``MAX_RUN_DATASET`` printable characters on one line (``''``: none)."""
    return _one_line_text(value, "dataset", MAX_RUN_DATASET)


def is_tag(value: Any) -> bool:
    return isinstance(value, str) and bool(_TAG.fullmatch(value))


def check_tag(value: Any) -> str:
    """A tag: 1-32 letters, digits, ``_ . : = + -``, starting with a letter or digit (so a
    tag is one word in a filter box and on a magic's command line: ``lr=1e-3``, ``sweep-2``)."""
    if not is_tag(value):
        raise InvalidArgumentError(
            f"a tag must be 1-{MAX_TAG_LENGTH} letters, digits, '_', '.', ':', '=', '+' or '-', starting with "
            f"a letter or digit; got {shown(value, 60)}"
        )
    return value


def check_run_tags(value: Any) -> list[str]:
    """A run's tags: a list of at most ``MAX_RUN_TAGS`` tags (``check_tag``), repeats dropped,
    order kept."""
    if not isinstance(value, list | tuple):
        raise InvalidArgumentError(f"tags must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_RUN_TAGS:
        raise InvalidArgumentError(f"a run may have at most {MAX_RUN_TAGS} tags, got {len(value)}")
    return list(dict.fromkeys(check_tag(t) for t in value))


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


TINKER_SCHEME = "tinker://"
SAMPLER_WEIGHTS_PREFIX = "sampler."
"""A checkpoint saved for sampling through the Tinker API (``save_weights_for_sampler``) is the
checkpoint ``sampler.<name>`` of its run: ``tinker://<run_id>/sampler_weights/<name>``."""


def tinker_path(run_id: str, name: str) -> str:
    """The checkpoint ``twinkle_path(run_id, name)`` as the Tinker SDK names it:
    ``tinker://<run_id>/weights/<name>``, or ``.../sampler_weights/<rest>`` for a
    ``sampler.<rest>`` checkpoint."""
    if name.startswith(SAMPLER_WEIGHTS_PREFIX) and len(name) > len(SAMPLER_WEIGHTS_PREFIX):
        return f"{TINKER_SCHEME}{run_id}/sampler_weights/{name[len(SAMPLER_WEIGHTS_PREFIX):]}"
    return f"{TINKER_SCHEME}{run_id}/weights/{name}"


def split_tinker_path(value: Any) -> tuple[str, str] | None:
    """``(run_id, checkpoint name)`` of a well-formed ``tinker_path``; None for anything else."""
    if not isinstance(value, str) or not value.startswith(TINKER_SCHEME):
        return None
    parts = value[len(TINKER_SCHEME):].split("/")
    if len(parts) != 3 or not is_run_id(parts[0]) or parts[1] not in ("weights", "sampler_weights"):
        return None
    name = parts[2] if parts[1] == "weights" else SAMPLER_WEIGHTS_PREFIX + parts[2]
    return (parts[0], name) if is_checkpoint_name(name) and is_checkpoint_name(parts[2]) else None
