"""Training losses, resolved by name through the registry (``set_loss('CrossEntropyLoss')``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError
from .registry import REGISTRY


@dataclass
class LossValue:
    """A micro-batch's loss as a *sum* over its tokens, and the token count.

    Keeping the sum (not the mean) is what makes gradient accumulation exact: the model
    divides the accumulated gradients by the tokens of the whole window, which equals the
    gradient of one big batch made of all the window's micro-batches.
    """

    total: torch.Tensor
    num_tokens: int


class Loss:
    """Base class: ``__call__(logits, labels) -> LossValue``.

    ``normalize_by_tokens`` tells the model to divide gradients by the window's token count
    (a per-token mean); ``False`` keeps the plain sum.
    """

    normalize_by_tokens: bool = True

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> LossValue:  # pragma: no cover
        raise NotImplementedError

    def report(self, value: LossValue) -> float:
        """The number shown to the user for one micro-batch."""
        total = float(value.total.detach())
        if self.normalize_by_tokens:
            return total / max(value.num_tokens, 1)
        return total


@REGISTRY.register("loss")
class CrossEntropyLoss(Loss):
    """Next-token cross entropy over the labelled (non ``ignore_index``) tokens.

    ``reduction='mean'`` (default) reports and optimises the per-token mean over the
    accumulation window; ``'sum'`` the token sum.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise InvalidArgumentError(f"CrossEntropyLoss reduction must be 'mean' or 'sum', got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize_by_tokens = reduction == "mean"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> LossValue:
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:].to(shift_logits.device)
        total = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        num_tokens = int((shift_labels != self.ignore_index).sum())
        return LossValue(total=total, num_tokens=num_tokens)
