"""``InputProcessor``: pads encoded samples into the tensors a causal LM takes.

It is the last step before the model and the first place where data sent by a remote user
is checked, so every malformed input becomes one ``InvalidArgumentError`` line naming the
problem instead of a shape error deep inside the forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidArgumentError, first_line
from .registry import REGISTRY

IGNORE_INDEX = -100
TENSOR_KEYS = ("input_ids", "labels", "attention_mask")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@REGISTRY.register("processor")
class InputProcessor:
    """Collates a batch into ``{'input_ids', 'attention_mask', 'labels'}``, ``LongTensor[B, T]``.

    Args:
        padding_side: pad at the ``'right'`` (training) or the ``'left'`` (generation).
        pad_token_id: the id padding ``input_ids``; the model fills it from its tokenizer
            when left ``None``.
        label_pad_id: the label of padded positions (ignored by the loss).
    """

    def __init__(
        self, padding_side: str = "right", pad_token_id: int | None = None, label_pad_id: int = IGNORE_INDEX
    ):
        if padding_side not in ("right", "left"):
            raise InvalidArgumentError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        for label, value in (("pad_token_id", pad_token_id), ("label_pad_id", label_pad_id)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidArgumentError(f"{label} must be an int, got {value!r}")
        if pad_token_id is not None and pad_token_id < 0:
            raise InvalidArgumentError(f"pad_token_id must be >= 0, got {pad_token_id}")
        self.padding_side = padding_side
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id

    def __repr__(self) -> str:
        return f"InputProcessor(padding_side={self.padding_side!r}, pad_token_id={self.pad_token_id})"

    def __call__(self, inputs: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Pad a list of encoded samples, or check and pass on an already collated batch.

        A sample is a dict with equally long ``input_ids`` and ``labels`` (lists of ints or
        1-D integer tensors); other keys are ignored. A collated batch is a dict of 2-D
        ``input_ids`` / ``labels`` (and optionally ``attention_mask``), tensors or nested lists.
        """
        if isinstance(inputs, Mapping):
            return self._collated(inputs)
        if isinstance(inputs, str | bytes) or not isinstance(inputs, Sequence):
            raise InvalidArgumentError(
                f"inputs must be a list of samples or a dict of tensors, got {type(inputs).__name__}"
            )
        return self._pad(inputs)

    def _pad(self, samples: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(samples) == 0:
            raise InvalidArgumentError("empty batch: no samples to process")
        if self.pad_token_id is None:
            raise InvalidArgumentError(
                "pad_token_id is not set; pass pad_token_id=... or set the model's template"
            )
        rows: list[tuple[list[int], list[int]]] = []
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping):
                raise InvalidArgumentError(f"sample {i} must be a dict, got {type(sample).__name__}")
            for key in ("input_ids", "labels"):
                if key not in sample:
                    raise InvalidArgumentError(f"sample {i} is missing {key!r}")
            ids = _int_list(sample["input_ids"], f"sample {i}: input_ids")
            labels = _int_list(sample["labels"], f"sample {i}: labels")
            if len(ids) != len(labels):
                raise InvalidArgumentError(
                    f"sample {i}: input_ids has {len(ids)} tokens but labels has {len(labels)}"
                )
            if not ids:
                raise InvalidArgumentError(f"sample {i} has no tokens")
            self._check_values(torch.tensor(ids), torch.tensor(labels), f"sample {i}: ")
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, labs) in enumerate(rows):
            n = len(ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[b, cols] = torch.tensor(ids, dtype=torch.long)
            labels[b, cols] = torch.tensor(labs, dtype=torch.long)
            mask[b, cols] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def _collated(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        for key in ("input_ids", "labels"):
            if key not in batch:
                raise InvalidArgumentError(f"batch is missing {key!r}")
        out: dict[str, torch.Tensor] = {}
        for key in TENSOR_KEYS:
            if key not in batch or batch[key] is None:
                continue
            t = _as_tensor(batch[key], key)
            if t.dtype not in _INT_DTYPES:
                raise InvalidArgumentError(
                    f"{key} must be integers, got {str(t.dtype).removeprefix('torch.')}"
                )
            if t.dim() != 2:
                raise InvalidArgumentError(f"{key} must be 2-D [batch, seq], got shape {tuple(t.shape)}")
            out[key] = t.to(torch.long)
        shape = out["input_ids"].shape
        for key, t in out.items():
            if t.shape != shape:
                raise InvalidArgumentError(
                    f"{key} has shape {tuple(t.shape)} but input_ids has shape {tuple(shape)}"
                )
        if shape[0] == 0 or shape[1] == 0:
            raise InvalidArgumentError(f"empty batch: input_ids has shape {tuple(shape)}")
        self._check_values(out["input_ids"], out["labels"], "")
        if "attention_mask" in out:
            if ((out["attention_mask"] != 0) & (out["attention_mask"] != 1)).any():
                raise InvalidArgumentError("attention_mask must hold only 0 and 1")
        else:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        return {
            "input_ids": out["input_ids"],
            "attention_mask": out["attention_mask"],
            "labels": out["labels"],
        }

    def _check_values(self, input_ids: torch.Tensor, labels: torch.Tensor, where: str) -> None:
        if (input_ids < 0).any():
            bad = int(input_ids[input_ids < 0][0])
            raise InvalidArgumentError(f"{where}input_ids must be token ids >= 0, got {bad}")
        bad_labels = (labels < 0) & (labels != IGNORE_INDEX) & (labels != self.label_pad_id)
        if bad_labels.any():
            bad = int(labels[bad_labels][0])
            raise InvalidArgumentError(f"{where}labels must be token ids >= 0 or {IGNORE_INDEX}, got {bad}")


def _int_list(value: Any, where: str) -> list[int]:
    """``value`` (a list of ints or a 1-D integer tensor/array) as a list of Python ints."""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # torch tensor or numpy array
        t = torch.as_tensor(value)
        if t.dtype not in _INT_DTYPES:
            raise InvalidArgumentError(f"{where} must be integers, got {str(t.dtype).removeprefix('torch.')}")
        if t.dim() != 1:
            raise InvalidArgumentError(f"{where} must be 1-D, got shape {tuple(t.shape)}")
        return t.tolist()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"{where} must be a list of ints, got {type(value).__name__}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgumentError(f"{where} must be integers, got {type(v).__name__}")
    return list(value)


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged or non-numeric nested lists
        raise InvalidArgumentError(
            f"{key} must be a rectangular 2-D array of ints (pass a list of samples to pad ragged ones): "
            f"{first_line(exc)}"
        ) from None
