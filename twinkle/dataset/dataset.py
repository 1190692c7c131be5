"""``Dataset``: one or more loaded datasets, preprocessed, encoded and mixed for training.

Every loaded dataset stays a separate Hugging Face ``datasets.Dataset`` (keyed by its id)
until ``mix_dataset`` merges them, so a preprocessor can target one of them. Everything is
kept in memory: no cache file is written next to the user's data, and nothing is reused
from an earlier run's cache.

How an id becomes rows (files, folders, hubs) is ``loading``'s concern.

``num_proc`` is checked and passed on to ``datasets``, up to ``max_num_proc`` when that is
set (a server sets 1: its transforms run in its data thread, never in forked processes).

Methods that change the dataset return ``None``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError, StateError, first_line
from ..preprocessor import Preprocessor
from ..protocol.api import DatasetAPI
from ..protocol.dataset_meta import DatasetMeta
from ..registry import REGISTRY
from ..template import Template
from .loading import load_dataset

if TYPE_CHECKING:
    import datasets

MIX_SEED = 42
ENCODED_COLUMNS = ("input_ids", "labels", "length")


class Dataset(DatasetAPI):
    """``DatasetAPI`` on Hugging Face ``datasets``: every added dataset is held in memory."""

    max_num_proc: int | None = None
    """The most processes ``map``/``filter``/``encode`` use; a larger ``num_proc`` is lowered to
    it (None: as asked)."""

    def __init__(self, dataset_meta: DatasetMeta | str) -> None:
        self.datasets: dict[str, datasets.Dataset] = {}
        self.template: Template | None = None
        self._mixed: datasets.Dataset | None = None
        self.add_dataset(dataset_meta)

    # --- building ---------------------------------------------------------------------------

    def add_dataset(self, dataset_meta: DatasetMeta | str) -> None:
        meta = _as_meta(dataset_meta)
        if self._mixed is not None:
            raise StateError("the datasets were already mixed; add every dataset before mix_dataset()")
        if meta.key in self.datasets:
            raise InvalidArgumentError(f"dataset {meta.key!r} was already added")
        self.datasets[meta.key] = load_dataset(meta)

    def mix_dataset(self, interleave: bool = True) -> None:
        if self._mixed is not None:
            return
        import datasets

        parts = list(self.datasets.values())
        try:
            merged = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        except ValueError as exc:
            raise InvalidArgumentError(f"cannot mix the datasets: {first_line(exc)}") from None
        if interleave and len(parts) > 1:
            merged = merged.select(_interleaved_order([len(p) for p in parts], MIX_SEED))
            merged = merged.flatten_indices(keep_in_memory=True)
        self._mixed = merged
        self.datasets = {}

    def set_template(self, name_or_cls: str | type, **kwargs: Any) -> None:
        self.template = REGISTRY.build("template", name_or_cls, **kwargs)

    # --- transforming -----------------------------------------------------------------------

    def map(
        self,
        preprocess_func: str | type | Callable[[dict[str, Any]], dict[str, Any]],
        dataset_meta: DatasetMeta | str | None = None,
        init_args: dict[str, Any] | None = None,
        *,
        num_proc: int | None = None,
    ) -> None:
        if isinstance(preprocess_func, str) or (
            isinstance(preprocess_func, type) and issubclass(preprocess_func, Preprocessor)
        ):
            func: Callable[..., Any] = REGISTRY.build("preprocessor", preprocess_func, **(init_args or {}))
        elif callable(preprocess_func):
            if init_args:
                raise InvalidArgumentError("init_args are only for a registered preprocessor name or class")
            func = preprocess_func
        else:
            raise InvalidArgumentError(
                f"map needs a preprocessor name or a callable, got {type(preprocess_func).__name__}"
            )
        batched = isinstance(func, Preprocessor)
        if not batched:
            func = _checked_row_function(func)
        for key in self._target_keys(dataset_meta):
            self._replace(
                key,
                self._get(key).map(func, batched=batched, num_proc=self._num_proc(num_proc), desc="map",
                                   **_in_memory()),
            )

    def filter(
        self,
        filter_func: str | type | Callable[[dict[str, Any]], bool],
        dataset_meta: DatasetMeta | str | None = None,
        init_args: dict[str, Any] | None = None,
        *,
        num_proc: int | None = None,
    ) -> None:
        if isinstance(filter_func, str | type):
            func = REGISTRY.build("filter", filter_func, **(init_args or {}))
        elif callable(filter_func):
            if init_args:
                raise InvalidArgumentError("init_args are only for a registered filter name or class")
            func = filter_func
        else:
            raise InvalidArgumentError(
                f"filter needs a filter name or a callable, got {type(filter_func).__name__}"
            )
        for key in self._target_keys(dataset_meta):
            self._replace(
                key, self._get(key).filter(func, num_proc=self._num_proc(num_proc), desc="filter", **_in_memory())
            )

    def encode(
        self, batched: bool = True, add_generation_prompt: bool = False, *, num_proc: int | None = None
    ) -> None:
        if self.template is None:
            raise InvalidArgumentError(
                "no template set; call set_template('Template', model_id=...) before encode()"
            )
        import datasets

        num_proc = self._num_proc(num_proc)
        template = self.template
        for key in self._target_keys(None):
            ds = self._get(key)
            if "messages" not in ds.column_names:
                raise InvalidArgumentError(
                    f"encode needs a 'messages' column, {key!r} has {', '.join(ds.column_names)}; "
                    "map a preprocessor such as 'SelfCognitionProcessor' first"
                )
            keep = [c for c in ds.column_names if c not in ENCODED_COLUMNS]

            def encode_batch(batch: dict[str, list], keep: list[str] = keep) -> dict[str, list]:
                out: dict[str, list] = {c: [] for c in (*keep, *ENCODED_COLUMNS)}
                for i, messages in enumerate(batch["messages"]):
                    encoded = template.encode(messages, add_generation_prompt=add_generation_prompt)
                    if encoded is None:  # dropped by truncation_strategy='delete'
                        continue
                    for c in keep:
                        out[c].append(batch[c][i])
                    for c in ENCODED_COLUMNS:
                        out[c].append(encoded[c])
                return out

            # Batched in datasets' sense either way: only a batched function may drop rows.
            # The schema is given so that it holds even when every row is dropped.
            features = datasets.Features(
                {
                    **{c: ds.features[c] for c in keep},
                    "input_ids": _int_list_feature(datasets),
                    "labels": _int_list_feature(datasets),
                    "length": datasets.Value("int64"),
                }
            )
            encoded = ds.map(
                encode_batch,
                batched=True,
                batch_size=1000 if batched else 1,
                remove_columns=ds.column_names,
                features=features,
                num_proc=num_proc,
                desc="encode",
                **_in_memory(),
            )
            self._replace(key, encoded)

    # --- reading ----------------------------------------------------------------------------

    @property
    def dataset(self) -> datasets.Dataset:
        """The underlying Hugging Face dataset (the mixed one, or the only one added)."""
        if self._mixed is not None:
            return self._mixed
        if len(self.datasets) == 1:
            return next(iter(self.datasets.values()))
        raise StateError(
            f"{len(self.datasets)} datasets were added ({', '.join(self.datasets)}); call mix_dataset() first"
        )

    @property
    def column_names(self) -> list[str]:
        """The columns of the rows."""
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise InvalidArgumentError(f"Dataset index must be an int, got {type(idx).__name__}")
        ds = self.dataset
        n = len(ds)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for a dataset of {n} rows")
        return ds[idx % n]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        if self._mixed is not None or len(self.datasets) == 1:
            return f"Dataset(rows={len(self)}, columns={self.column_names})"
        return f"Dataset(unmixed: {', '.join(f'{k} ({len(v)} rows)' for k, v in self.datasets.items())})"

    # --- internals --------------------------------------------------------------------------

    def _target_keys(self, dataset_meta: DatasetMeta | str | None) -> list[str]:
        if dataset_meta is None:
            return list(self.datasets) if self._mixed is None else [""]
        key = _as_meta(dataset_meta).key
        if self._mixed is not None:
            raise StateError(f"the datasets were mixed; {key!r} can no longer be addressed on its own")
        if key not in self.datasets:
            raise InvalidArgumentError(f"dataset {key!r} was not added; added: {', '.join(self.datasets)}")
        return [key]

    def _num_proc(self, num_proc: Any) -> int | None:
        """``num_proc`` checked, and lowered to ``max_num_proc`` (1 process: None, no pool)."""
        if num_proc is None:
            return None
        if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
            raise InvalidArgumentError(f"num_proc must be None or an int >= 1, got {num_proc!r}")
        if self.max_num_proc is not None:
            num_proc = min(num_proc, self.max_num_proc)
        return num_proc if num_proc > 1 else None

    def _get(self, key: str) -> datasets.Dataset:
        return self._mixed if self._mixed is not None else self.datasets[key]

    def _replace(self, key: str, ds: datasets.Dataset) -> None:
        if self._mixed is not None:
            self._mixed = ds
        else:
            self.datasets[key] = ds


def _in_memory() -> dict[str, Any]:
    """Keyword arguments for ``datasets`` transforms: results stay in memory, no cache file is
    reused, and a fresh fingerprint spares datasets from hashing the function (hashing a
    tokenizer is slow and not deterministic)."""
    return {"keep_in_memory": True, "load_from_cache_file": False, "new_fingerprint": uuid.uuid4().hex}


def _int_list_feature(datasets: Any) -> Any:
    # datasets >= 4 spells a variable-length list ``List``; older versions ``Sequence``
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    return list_type(datasets.Value("int64"))


def _as_meta(dataset_meta: DatasetMeta | str) -> DatasetMeta:
    if isinstance(dataset_meta, DatasetMeta):
        return dataset_meta
    if isinstance(dataset_meta, str):
        return DatasetMeta(dataset_meta)
    raise InvalidArgumentError(
        f"expected a DatasetMeta or a dataset id string, got {type(dataset_meta).__name__}"
    )


def _interleaved_order(sizes: list[int], seed: int) -> list[int]:
    """Row positions in the concatenation of datasets of ``sizes`` rows, merged at random.

    Each position in the result draws its source dataset at random (weighted by the rows it
    has left), then takes that dataset's next row: every row appears once, in its own order.
    """
    sources = [k for k, n in enumerate(sizes) for _ in range(n)]
    random.Random(seed).shuffle(sources)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    taken = [0] * len(sizes)
    order = []
    for k in sources:
        order.append(offsets[k] + taken[k])
        taken[k] += 1
    return order


def _checked_row_function(
    func: Callable[[dict[str, Any]], Any],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def row_function(row: dict[str, Any]) -> dict[str, Any]:
        out = func(row)
        if not isinstance(out, dict):
            name = getattr(func, "__name__", type(func).__name__)
            raise InvalidArgumentError(
                f"map function {name!r} must return a dict of columns, got {type(out).__name__}"
            )
        return out

    return row_function
