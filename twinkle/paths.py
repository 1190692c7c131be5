"""Where twinkle keeps files on this machine, and how to write a folder atomically."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$TWINKLE_CACHE_DIR``, else ``~/.cache/twinkle``; read at call time."""
    root = os.environ.get("TWINKLE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "twinkle")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


LEFTOVER_PREFIXES = (".tmp-", ".old-", ".del-")
"""Hidden folders beside finished ones: an unfinished write (``.tmp-``), a replaced folder not
yet removed (``.old-``), a folder being deleted (``.del-``). None of them is ever complete."""
_REPLACED = re.compile(r"\.old-(.+)-\d+")


def is_leftover(name: str) -> bool:
    """Whether a folder name is one of ``atomic_directory``'s (or a deletion's) hidden leftovers."""
    return name.startswith(LEFTOVER_PREFIXES)


def replaced_target(name: str) -> str | None:
    """The target name of a ``.old-<target>-<pid>`` folder that ``atomic_directory`` moved aside
    while replacing ``target`` (None for any other name)."""
    match = _REPLACED.fullmatch(name)
    return match.group(1) if match else None


def trash_name(name: str) -> str:
    """A hidden name to rename a folder to before deleting it (the rename is atomic)."""
    return f".del-{name}-{secrets.token_hex(4)}"


@contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it into place only if the block succeeds.

    A crash inside the block leaves a hidden ``.tmp-*`` folder that no reader mistakes for a
    finished one. With ``overwrite``, an existing target is swapped out after the new one is
    complete, so readers always see either the old or the new folder in full.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
