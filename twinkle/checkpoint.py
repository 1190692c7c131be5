"""The on-disk checkpoint format.

A checkpoint is a folder::

    adapter_config.json           PEFT's own files: plain ``PeftModel.from_pretrained``
    adapter_model.safetensors     loads them, no twinkle import needed
    training_state.pt             only with save_optimizer=True: optimizer, scheduler,
                                  accumulated gradients, RNG states
    twinkle_checkpoint.json       written last; its presence marks the folder complete

Folders are written under a temporary name and renamed into place (``atomic_directory``),
so a crash mid-save leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .paths import is_leftover

FORMAT_VERSION = 1
META_FILE = "twinkle_checkpoint.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINING_STATE = "training_state.pt"


@dataclass
class CheckpointMeta:
    """What ``twinkle_checkpoint.json`` records about a checkpoint."""

    base_model: str
    lora_rank: int
    cur_step: int
    micro_step: int
    consumed_train_samples: int
    gradient_accumulation_steps: int
    has_training_state: bool
    last_loss: float | None = None
    created: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    def write(self, folder: Path) -> None:
        (folder / META_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, folder: Path) -> CheckpointMeta:
        try:
            data = json.loads((folder / META_FILE).read_text())
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            return cls(**known)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{folder} has an unreadable {META_FILE}: {exc}") from None


def check_checkpoint_dir(path: str | Path, *, need_training_state: bool = False, leftover_ok: bool = False) -> Path:
    """Return ``path`` as a Path if it is a complete checkpoint, else raise ``CheckpointError``.

    A plain PEFT adapter folder (no twinkle metadata) is accepted for weights-only loads. A
    hidden leftover folder of ``atomic_directory`` is never a checkpoint, unless ``leftover_ok``
    (to judge a replaced checkpoint before restoring it).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint: no such folder")
    if is_leftover(folder.name) and not leftover_ok:
        raise CheckpointError(f"{path} is an unfinished save, not a checkpoint")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint: missing {', '.join(missing)}")
    if need_training_state:
        if not (folder / META_FILE).is_file() or not (folder / TRAINING_STATE).is_file():
            raise CheckpointError(
                f"{path} has no training state; it was saved without save_optimizer=True "
                "(load it with load_optimizer=False for the weights only)"
            )
    return folder


def folder_size(folder: Path) -> int:
    """Total bytes of the files in ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / TRAINING_STATE)


def load_training_state(folder: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data, never code to run.
        return torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{folder} has an unreadable {TRAINING_STATE}: {exc}") from None
