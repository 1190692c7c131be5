"""One pass over the shared base model for the micro-batches of several adapters.

Rows are packed into one sequence without padding: each row's position ids start at 0, and
the model's attention (``ROWS_ATTENTION``, registered with transformers) runs causal sdpa on
each row alone, so no row sees another, no padding token is computed, and a row's result
does not depend on which rows share its pass (float sums keep their order). The rows of one
adapter are contiguous (a *segment*); every LoRA layer runs the frozen base layer once over
the whole pass and adds each segment's own low-rank update, so there is no ``set_adapter``
switching and no weight copy. An adapter's dropout draws from its own generator
(``AdapterDropout``), never from torch's global RNG that other tenants share.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners import lora
from torch import nn

__all__ = ["ROWS_ATTENTION", "AdapterDropout", "Packed", "Segment", "install", "only", "pack", "segments"]

ROWS_ATTENTION = "twinkle_rows"
"""The attention implementation a served model uses (see ``use_rows_attention``)."""


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of a pass belong to the adapter named ``adapter`` (peft's name)."""

    start: int
    end: int
    adapter: str


class _Active(threading.local):
    segments: tuple[Segment, ...] | None = None
    rows: tuple[tuple[int, int], ...] = ()
    dropout: bool = False


_ACTIVE = _Active()


@contextlib.contextmanager
def segments(packed: Packed, *, dropout: bool) -> Iterator[None]:
    """Within the block, LoRA layers apply each segment's adapter to its tokens only (with the
    adapters' dropout on for training), and attention keeps to each row."""
    previous = (_ACTIVE.segments, _ACTIVE.rows, _ACTIVE.dropout)
    _ACTIVE.segments = tuple(packed.segments)
    _ACTIVE.rows = tuple(span for spans in packed.rows for span in spans if span[1])
    _ACTIVE.dropout = dropout
    try:
        yield
    finally:
        _ACTIVE.segments, _ACTIVE.rows, _ACTIVE.dropout = previous


@contextlib.contextmanager
def only(adapter: str) -> Iterator[None]:
    """Within the block every token goes through ``adapter`` alone (``""``: the bare base
    model), whatever peft calls its active adapter; no dropout, and attention is the model's
    own (for generation, whose batches are padded and cached)."""
    previous = (_ACTIVE.segments, _ACTIVE.rows, _ACTIVE.dropout)
    _ACTIVE.segments = (Segment(0, sys.maxsize, adapter),)
    _ACTIVE.rows = ()
    _ACTIVE.dropout = False
    try:
        yield
    finally:
        _ACTIVE.segments, _ACTIVE.rows, _ACTIVE.dropout = previous


def _rows_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal sdpa on each packed row alone (outside a pass: over the whole sequence)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = _ACTIVE.rows if _ACTIVE.segments is not None else ()
    if not rows:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outs = [
        sdpa_attention_forward(module, query[:, :, a:a + n], key[:, :, a:a + n], value[:, :, a:a + n], None, **kwargs)[0]
        for a, n in rows
    ]
    return torch.cat(outs, dim=1), None


def use_rows_attention(model: nn.Module) -> None:
    """Make ``model`` attend row by row in twinkle passes (registers the implementation once).

    A model with sliding-window attention keeps its own implementation: transformers then
    builds a block-diagonal mask from the position ids that also applies the window (exact,
    though a row's float sums then depend on the length of the pass)."""
    from transformers import AttentionInterface

    config = getattr(model, "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return
    if ROWS_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROWS_ATTENTION, _rows_attention)
    model.set_attn_implementation(ROWS_ATTENTION)


class AdapterDropout(nn.Module):
    """peft's LoRA dropout with the adapter's own generator; on only inside a training pass."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p = float(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _ACTIVE.dropout or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep / (1.0 - self.p)


def install(model: nn.Module, adapter: str, generator: torch.Generator) -> None:
    """Give ``adapter``'s layers its generator-driven dropout, and route every LoRA layer's
    forward through the segment-wise one (idempotent; call after each adapter is added)."""
    for module in model.modules():
        if isinstance(module, lora.Linear) and adapter in module.lora_dropout:
            old = module.lora_dropout[adapter]
            p = old.p if isinstance(old, nn.Dropout) else 0.0
            module.lora_dropout[adapter] = AdapterDropout(p, generator)
        if isinstance(module, lora.Linear | lora.Embedding) and "forward" not in module.__dict__:
            forward = _linear_forward if isinstance(module, lora.Linear) else _embedding_forward
            module.forward = forward.__get__(module)  # an instance attribute: nn.Module calls it


def _linear_forward(self: lora.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _ACTIVE.segments is None:  # outside a twinkle pass (e.g. plain peft use of the same model)
        return type(self).forward(self, x, *args, **kwargs)

    def cast(name: str, xs: torch.Tensor) -> torch.Tensor:
        return self._cast_input_dtype(xs, self.lora_A[name].weight.dtype)

    def update(name: str, xs: torch.Tensor) -> torch.Tensor:
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](xs))) * self.scaling[name]

    return _segmentwise(self, x, self.base_layer(x, *args, **kwargs), self.lora_A, update, cast)


def _embedding_forward(self: lora.Embedding, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if _ACTIVE.segments is None:
        return type(self).forward(self, x, *args, **kwargs)
    scale = self._get_embed_scale()

    def update(name: str, xs: torch.Tensor) -> torch.Tensor:
        delta = (self._embed(xs, self.lora_embedding_A[name].T) @ self.lora_embedding_B[name].T) * self.scaling[name]
        return delta if scale is None else delta * scale.to(delta.dtype)

    return _segmentwise(self, x, self.base_layer(x, *args, **kwargs), self.lora_embedding_A, update)


def _segmentwise(layer: Any, x: torch.Tensor, result: torch.Tensor, own: Any,
                 update: Callable[[str, torch.Tensor], torch.Tensor],
                 cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The base layer's ``result`` plus, on each segment's tokens, that segment's adapter's
    update (``own``: the adapters this layer holds; DoRA and other variants run peft's code)."""
    pieces = []
    for seg in _ACTIVE.segments or ():
        base = result[:, seg.start:seg.end]
        if seg.adapter not in own:
            pieces.append(base)
            continue
        xs = x[:, seg.start:seg.end]
        if cast is not None:
            xs = cast(seg.adapter, xs)
        if seg.adapter in layer.lora_variant:
            pieces.append(layer.lora_variant[seg.adapter].forward(layer, active_adapter=seg.adapter, x=xs, result=base))
        else:
            pieces.append(base + update(seg.adapter, xs))
    return _join(pieces, result).to(result.dtype)


def _join(pieces: list[torch.Tensor], whole: torch.Tensor) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 and pieces[0].shape == whole.shape else torch.cat(pieces, dim=1)


@dataclass
class Packed:
    """The rows of several micro-batches as one unpadded sequence (batch dimension 1)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    """Each row's labels, its first one set to the ignore index: the loss's shift by one then
    never pairs the last token of a row with the first of the next."""
    segments: list[Segment]
    rows: list[list[tuple[int, int]]]
    """For each micro-batch, its rows as (offset in the pass, length)."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """The batches' other per-token tensors (a loss's ``token_inputs``), packed like the labels
    (``float32``; 0 for a batch without one)."""


def pack(batches: Sequence[tuple[str, dict[str, torch.Tensor], int]], device: torch.device) -> Packed:
    """Pack ``(peft adapter name, collated batch, ignore index)`` micro-batches, in order."""
    ids, pos, labels, segs, rows = [], [], [], [], []
    keys = sorted({k for _, batch, _ in batches for k in batch} - {"input_ids", "labels", "attention_mask"})
    extras: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    offset = 0
    for adapter, batch, ignore in batches:
        start = offset
        spans = []
        mask = batch["attention_mask"].bool()
        for r in range(batch["input_ids"].shape[0]):
            keep = mask[r]
            row_ids = batch["input_ids"][r][keep]
            row_labels = batch["labels"][r][keep].clone()
            n = int(row_ids.numel())
            row_labels[:1] = ignore
            ids.append(row_ids)
            labels.append(row_labels)
            pos.append(torch.arange(n, device=row_ids.device))
            for key in keys:
                extras[key].append(batch[key][r][keep].float() if key in batch else torch.zeros(n))
            spans.append((offset, n))
            offset += n
        segs.append(Segment(start, offset, adapter))
        rows.append(spans)
    return Packed(
        input_ids=torch.cat(ids).unsqueeze(0).to(device),
        position_ids=torch.cat(pos).unsqueeze(0).to(device),
        labels=torch.cat(labels).unsqueeze(0).to(device),
        segments=segs,
        rows=rows,
        extras={k: torch.cat(v).unsqueeze(0).to(device) for k, v in extras.items()},
    )
