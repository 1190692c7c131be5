"""``DataLoader``: batches of a dataset, in a reproducible order, from a resumable position.

The position is one number, ``consumed_train_samples``: every epoch has the same number of
samples and epoch ``e``'s order depends only on ``seed + e``, so that number fixes the epoch
and the place in it. Saving it with a checkpoint and passing it to
``resume_from_checkpoint`` continues with exactly the samples an uninterrupted run would
have seen next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import processor as _processor  # noqa: F401  (registers 'InputProcessor' for set_processor)
from .errors import InvalidArgumentError
from .protocol.api import DataLoaderAPI
from .registry import REGISTRY

# The columns a model takes; rows that have them are sent with only these (the rest,
# such as the source text, would only cost bandwidth on the way to a remote model).
MODEL_COLUMNS = ("input_ids", "labels", "attention_mask")


class DataLoader(DataLoaderAPI):
    """Iterates a dataset in batches; each ``iter()`` runs to the end of the current epoch.

    ``for batch in loader`` twice is two epochs. A loop left early continues where it
    stopped on the next ``iter()``. Batches are lists of row dicts (only ``input_ids``,
    ``labels`` and ``attention_mask`` when rows have ``input_ids``) unless ``set_processor``
    was called, then they are the processor's output.

    Args:
        dataset: anything with ``__len__`` and integer ``__getitem__`` (a twinkle ``Dataset``).
        batch_size: samples per batch.
        shuffle: a new random order each epoch, from ``seed + epoch`` (global RNG untouched).
        seed: the base seed of the shuffle.
        drop_last: leave out the last, incomplete batch of each epoch.
        num_workers: accepted for API compatibility; rows are in memory, so batches are built
            in the calling process.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 42,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise InvalidArgumentError(
                f"dataset must support len() and indexing, got {type(dataset).__name__}"
            )
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("seed", seed, minimum=None)
        _check_int("num_workers", num_workers, minimum=0)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.num_workers = num_workers
        self.processor: Callable[[list[dict[str, Any]]], Any] | None = None
        self.consumed_train_samples = 0
        self._order_cache: tuple[int, int, list[int]] | None = None  # (epoch, n, order)

    def set_processor(self, name_or_cls: str | type, **kwargs: Any) -> None:
        proc = REGISTRY.build("processor", name_or_cls, **kwargs)
        template = getattr(self.dataset, "template", None)
        if getattr(proc, "pad_token_id", 0) is None and getattr(template, "pad_token_id", None) is not None:
            proc.pad_token_id = template.pad_token_id
        self.processor = proc

    # --- position ----------------------------------------------------------------------------

    @property
    def samples_per_epoch(self) -> int:
        """Samples yielded per epoch: the dataset size, or whole batches only with ``drop_last``."""
        n = len(self.dataset)
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        per_epoch = self.samples_per_epoch
        return self.consumed_train_samples // per_epoch if per_epoch else 0

    def __len__(self) -> int:
        return -(-self.samples_per_epoch // self.batch_size)

    def get_state(self) -> dict[str, Any]:
        per_epoch = self.samples_per_epoch
        return {
            "consumed_train_samples": self.consumed_train_samples,
            "epoch": self.epoch,
            "position_in_epoch": self.consumed_train_samples % per_epoch if per_epoch else 0,
            "samples_per_epoch": per_epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
        }

    def resume_from_checkpoint(self, consumed_train_samples: int) -> None:
        _check_int("consumed_train_samples", consumed_train_samples, minimum=0)
        self.consumed_train_samples = consumed_train_samples

    skip_consumed_samples = resume_from_checkpoint

    # --- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        per_epoch = self.samples_per_epoch
        if per_epoch == 0:
            return
        while True:
            epoch, pos = divmod(self.consumed_train_samples, per_epoch)
            indices = self._order(epoch)[pos : min(pos + self.batch_size, per_epoch)]
            batch = self._make_batch(indices)
            # Count the batch before handing it out, so that a loop left right after the
            # epoch's last batch still finds the next iter() at the start of the next epoch.
            self.consumed_train_samples += len(indices)
            yield batch
            if pos + len(indices) >= per_epoch:
                return

    def _order(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if self._order_cache and self._order_cache[:2] == (epoch, n):
            return self._order_cache[2]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        self._order_cache = (epoch, n, order)
        return order

    def _make_batch(self, indices: list[int]) -> Any:
        rows = [self.dataset[i] for i in indices]
        if self.processor is not None:
            return self.processor(rows)
        return [_model_view(row) for row in rows]

    def __repr__(self) -> str:
        return (
            f"DataLoader(batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed}, "
            f"drop_last={self.drop_last}, consumed_train_samples={self.consumed_train_samples})"
        )


def _model_view(row: Any) -> Any:
    if isinstance(row, dict) and "input_ids" in row:
        return {k: row[k] for k in MODEL_COLUMNS if k in row}
    return row


def _check_int(label: str, value: Any, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{label} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{label} must be >= {minimum}, got {value}")
