"""Checkpoint folders on the server's disk: naming, completeness, deletion and crash recovery.

``twinkle://<run_id>/weights/<name>`` is the only way a client names a checkpoint; it is
resolved here, against the caller's own records. A folder counts only when it is complete
(``is_complete``): a save in progress or interrupted lives in a hidden leftover folder of
``atomic_directory`` (``twinkle.paths``) that no reader takes for a checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from twinkle import checkpoint as ckpt
from twinkle.errors import CheckpointError, InvalidArgumentError, NotFoundError
from twinkle.paths import is_leftover, replaced_target, trash_name
from twinkle.protocol.names import TWINKLE_SCHEME, is_checkpoint_name, shown, split_twinkle_path, twinkle_path
from twinkle.protocol.wire import CheckpointPath

from .settings import Settings
from .store import CheckpointRow, Store

log = logging.getLogger("twinkle_server.checkpoints")


def parse_twinkle_path(value: Any) -> tuple[str, str]:
    """``(run_id, name)`` of a ``twinkle://<run_id>/weights/<name>`` path.

    Anything else that starts with ``twinkle://`` is a checkpoint that does not exist (404);
    anything not starting with it is refused (400): clients never name server paths.
    """
    if isinstance(value, CheckpointPath):
        value = value.twinkle_path
    if not isinstance(value, str):
        raise InvalidArgumentError(f"a checkpoint is named by a twinkle:// path, got {type(value).__name__}")
    if not value.startswith(TWINKLE_SCHEME):
        raise InvalidArgumentError("pass a twinkle:// path; server paths are not accepted")
    parts = split_twinkle_path(value)
    if parts is None:
        raise NotFoundError(f"no checkpoint {shown(value)}")
    return parts


def is_complete(folder: Path, *, hidden_ok: bool = False) -> bool:
    """Whether ``folder`` is a whole twinkle checkpoint: its metadata, the adapter files and, if
    the metadata says it has one, the training state. The metadata file alone proves nothing
    once a deletion or a crash has removed files. ``hidden_ok`` admits a leftover folder's name
    (to judge a replaced checkpoint before restoring it)."""
    try:
        meta = ckpt.CheckpointMeta.read(folder)
        ckpt.check_checkpoint_dir(folder, need_training_state=bool(meta.has_training_state), leftover_ok=hidden_ok)
    except CheckpointError:
        return False
    return True


def record_checkpoint(store: Store, run_id: str, name: str, folder: Path) -> None:
    """Insert (or replace) the row of a checkpoint folder that is complete on disk, from its metadata."""
    meta = ckpt.CheckpointMeta.read(folder)
    store.upsert_checkpoint(
        run_id,
        name,
        time_=meta.created,
        size_bytes=ckpt.folder_size(folder),
        step=meta.cur_step,
        consumed_train_samples=meta.consumed_train_samples,
        loss=meta.last_loss,
        has_optimizer=meta.has_training_state,
        base_model=meta.base_model,
        lora_rank=meta.lora_rank,
    )


class Checkpoints:
    """The checkpoints of every run: where their folders are and what the records say."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def folder(self, run_id: str, name: str) -> Path:
        return self.settings.run_weights_dir(run_id) / name

    def resolve(self, user_id: int, value: Any) -> tuple[CheckpointRow, Path]:
        """The caller's complete checkpoint named by ``value`` and its folder."""
        run_id, name = parse_twinkle_path(value)
        row = self.store.checkpoint_row(user_id, run_id, name)
        folder = self.folder(run_id, name)
        if row is None or not is_complete(folder):
            raise NotFoundError(f"no checkpoint {twinkle_path(run_id, name)}")
        return row, folder

    def record(self, run_id: str, name: str) -> None:
        record_checkpoint(self.store, run_id, name, self.folder(run_id, name))

    def delete(self, run_id: str, name: str) -> None:
        """Delete a checkpoint, crash-safe at every point: the folder is first renamed to a hidden
        one (atomic: the checkpoint is gone for readers), then the row goes, then the files
        (``reconcile`` finishes that after a crash)."""
        folder = self.folder(run_id, name)
        trash: Path | None = None
        if folder.exists():
            trash = folder.with_name(trash_name(name))
            os.rename(folder, trash)
        self.store.delete_checkpoint(run_id, name)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def remove_run_dir(self, run_id: str) -> None:
        shutil.rmtree(self.settings.runs_dir / run_id, ignore_errors=True)


def _restore_replaced(weights: Path) -> list[str]:
    """Undo a save that crashed between ``atomic_directory``'s two renames: where checkpoint
    ``X`` is missing but a complete replaced folder of ``X`` exists, rename it back to ``X``.

    Returns the names restored.
    """
    restored: list[str] = []
    candidates: dict[str, list[Path]] = {}
    for folder in weights.iterdir():
        target = replaced_target(folder.name)
        if target is not None and folder.is_dir() and is_checkpoint_name(target):
            candidates.setdefault(target, []).append(folder)
    for name, olds in sorted(candidates.items()):
        target = weights / name
        if target.exists() or target.is_symlink():
            continue
        complete = [old for old in olds if is_complete(old, hidden_ok=True)]
        if not complete:
            continue
        newest = max(complete, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        restored.append(name)
        log.warning("restored checkpoint %s from %s (a save replacing it was interrupted)", target, newest.name)
    return restored


def reconcile(store: Store, settings: Settings) -> dict[str, int]:
    """Make the database and the checkpoint folders agree after a stop or a crash.

    First a checkpoint whose replacement crashed half-way is restored (and recorded). Then rows
    whose folder is gone or incomplete are dropped; complete folders without a row, or newer
    than their row (a crash between the atomic rename and the record), are recorded from their
    metadata; leftover hidden folders are deleted; runs left ``active`` become ``detached``.
    """
    counts = {"detached": store.detach_all_runs(), "dropped": 0, "added": 0, "removed_tmp": 0, "restored": 0,
              "refreshed": 0}
    runs = store.run_ids()
    weight_dirs = (
        [run_dir / "weights" for run_dir in sorted(settings.runs_dir.iterdir()) if (run_dir / "weights").is_dir()]
        if settings.runs_dir.is_dir() else []
    )
    for weights in weight_dirs:
        run_id = weights.parent.name
        for name in _restore_replaced(weights):
            counts["restored"] += 1
            if run_id in runs:
                record_checkpoint(store, run_id, name, weights / name)
    for run_id, name in store.all_checkpoints():
        if not is_complete(settings.run_weights_dir(run_id) / name):
            store.delete_checkpoint(run_id, name)
            counts["dropped"] += 1
    known = store.checkpoint_times()
    for weights in weight_dirs:
        run_id = weights.parent.name
        for folder in sorted(weights.iterdir()):
            if is_leftover(folder.name):
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                counts["removed_tmp"] += 1
                continue
            if not folder.is_dir():
                continue
            recorded = known.get((run_id, folder.name))
            if recorded is not None:
                # A save that replaced this checkpoint can die between its rename and its record:
                # the folder is then newer than the row, and the folder is what a load reads.
                if ckpt.CheckpointMeta.read(folder).created != recorded:
                    record_checkpoint(store, run_id, folder.name, folder)
                    counts["refreshed"] += 1
                continue
            if run_id not in runs:
                log.warning("checkpoint folder %s belongs to no known run; left alone", folder)
                continue
            if not is_complete(folder):
                continue
            record_checkpoint(store, run_id, folder.name, folder)
            counts["added"] += 1
    return counts
