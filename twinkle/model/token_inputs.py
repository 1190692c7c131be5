"""Per-token inputs of a loss (``Loss.token_inputs``: weights, advantages, sampling
log-probabilities): read from the samples beside ``input_ids`` and ``labels``, checked, and
padded to the collated batch's layout.

A list of samples carries each as a list of floats (or a 1-D array) as long as the sample's
``input_ids``; a collated batch as a 2-D float array of ``input_ids``' shape. Padding is 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError


def collate(inputs: Any, keys: Sequence[str], required: Sequence[str], batch: Mapping[str, torch.Tensor],
            padding_side: str) -> dict[str, torch.Tensor]:
    """The per-token inputs ``keys`` of ``inputs`` as ``float32`` tensors shaped like
    ``batch['input_ids']`` (those no sample carries are left out; ``required`` ones must be in
    every sample)."""
    shape = tuple(batch["input_ids"].shape)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if isinstance(inputs, Mapping):
            value = inputs.get(key)
            if value is None:
                _check_given(key, required, "the batch")
                continue
            tensor = _floats(value, key)
            if tuple(tensor.shape) != shape:
                raise InvalidArgumentError(f"{key} has shape {tuple(tensor.shape)} but input_ids has shape {shape}")
            out[key] = tensor
            continue
        values = [sample.get(key) if isinstance(sample, Mapping) else None for sample in inputs]
        given = [v is not None for v in values]
        if not any(given):
            _check_given(key, required, "the samples")
            continue
        if not all(given):
            raise InvalidArgumentError(f"sample {given.index(False)} is missing {key!r} (other samples have it)")
        padded = torch.zeros(shape, dtype=torch.float32)
        for i, (sample, value) in enumerate(zip(inputs, values, strict=True)):
            row = _floats(value, f"sample {i}: {key}")
            n = len(sample["input_ids"])
            if row.dim() != 1 or row.numel() != n:
                raise InvalidArgumentError(
                    f"sample {i}: {key} has {row.numel()} values but input_ids has {n} tokens"
                )
            cols = slice(0, n) if padding_side != "left" else slice(shape[1] - n, shape[1])
            padded[i, cols] = row
        out[key] = padded
    return out


def _check_given(key: str, required: Sequence[str], where: str) -> None:
    if key in required:
        raise InvalidArgumentError(f"this loss needs {key!r} in {where}")


def _floats(value: Any, where: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidArgumentError(f"{where} must be numbers") from None
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidArgumentError(f"{where} must be finite numbers")
    return tensor
