"""Training losses, resolved by name through the registry (``set_loss('CrossEntropyLoss')``)."""

from __future__ import annotations

import math
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
    logprobs: torch.Tensor | None = None
    """For a loss with ``returns_logprobs``: the log-probability of each shifted label,
    ``[batch, seq - 1]`` (0 where the label is ignored); the model hands each row's back."""


class Loss:
    """Base class: ``__call__(logits, labels) -> LossValue``.

    ``normalize_by_tokens`` tells the model to divide gradients by the window's token count
    (a per-token mean); ``False`` keeps the plain sum.
    """

    normalize_by_tokens: bool = True
    token_inputs: tuple[str, ...] = ()
    """Per-token float inputs a sample may carry beside ``input_ids`` and ``labels`` (aligned with
    ``labels``: entry ``t`` belongs to the label at ``t``). The model pads and packs them like
    the labels and passes them to ``__call__`` as keywords; one a sample leaves out is None."""
    required_inputs: tuple[str, ...] = ()
    """The ``token_inputs`` every sample must carry."""
    returns_logprobs: bool = False
    """Whether ``LossValue.logprobs`` is filled (each call's output then carries each row's)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, **token_inputs: torch.Tensor | None) -> LossValue:  # pragma: no cover
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


def _label_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, mask)``: the log-probability each position gives the next label, ``[batch,
    seq - 1]`` (0 where that label is ``ignore_index``), and where the label is not ignored."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return -nll.view(shift_labels.shape), shift_labels != ignore_index


def _shifted(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-token input aligned with the labels, shifted like them (``[:, 1:]``)."""
    return None if value is None else value[:, 1:].to(like.device, like.dtype)


def _threshold(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


class TokenSumLoss(Loss):
    """Base of the token-summed losses below (the loss functions of the Tinker API): the total is
    a plain sum over tokens (gradients are not divided by a token count) and each row's label
    log-probabilities come back with the output."""

    normalize_by_tokens = False
    returns_logprobs = True

    def __init__(self, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise InvalidArgumentError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index


@REGISTRY.register("loss")
class WeightedCrossEntropyLoss(TokenSumLoss):
    """``-sum(weights * logprob(label))`` over the labelled tokens: cross entropy with a weight per
    token (Tinker's ``cross_entropy``). A sample without ``weights`` weighs each labelled token 1,
    which is ``CrossEntropyLoss(reduction='sum')``. Weights may be any finite numbers (negative
    ones too). ``num_tokens`` counts the tokens of non-zero weight; the loss reported is the sum."""

    token_inputs = ("weights",)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor | None = None, **_: torch.Tensor | None) -> LossValue:
        logprobs, mask = _label_logprobs(logits, labels, self.ignore_index)
        w = mask.to(logprobs.dtype)
        given = _shifted(weights, logprobs)
        if given is not None:
            w = given * w
        total = -(logprobs * w).sum()
        return LossValue(total=total, num_tokens=int((w != 0).sum()), logprobs=logprobs)


class _PolicyLoss(TokenSumLoss):
    token_inputs = ("advantages", "sampling_logprobs")
    required_inputs = ("advantages", "sampling_logprobs")

    def _ratio(self, logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor | None,
               sampling_logprobs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprobs, ratio, advantages, mask)``, each ``[batch, seq - 1]``, zero where ignored."""
        logprobs, mask = _label_logprobs(logits, labels, self.ignore_index)
        advantages = _shifted(advantages, logprobs)
        sampling = _shifted(sampling_logprobs, logprobs)
        if advantages is None or sampling is None:
            raise InvalidArgumentError(f"{type(self).__name__} needs 'advantages' and 'sampling_logprobs' in every sample")
        m = mask.to(logprobs.dtype)
        ratio = torch.exp(logprobs - sampling * m) * m
        return logprobs, ratio, advantages * m, mask


@REGISTRY.register("loss")
class ImportanceSamplingLoss(_PolicyLoss):
    """``-sum(p(label) / q(label) * advantage)``: REINFORCE with an importance weight, ``q`` the
    sampler's probability (``sampling_logprobs``) (Tinker's ``importance_sampling``)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor | None = None,
                 sampling_logprobs: torch.Tensor | None = None, **_: torch.Tensor | None) -> LossValue:
        logprobs, ratio, adv, mask = self._ratio(logits, labels, advantages, sampling_logprobs)
        return LossValue(total=-(ratio * adv).sum(), num_tokens=int(mask.sum()), logprobs=logprobs)


class _ClippedLoss(_PolicyLoss):
    def __init__(self, clip_low_threshold: float = 0.8, clip_high_threshold: float = 1.2,
                 ignore_index: int = -100) -> None:
        super().__init__(ignore_index)
        self.clip_low_threshold = _threshold(clip_low_threshold, "clip_low_threshold")
        self.clip_high_threshold = _threshold(clip_high_threshold, "clip_high_threshold")
        if self.clip_low_threshold > self.clip_high_threshold:
            raise InvalidArgumentError(
                f"clip_low_threshold ({clip_low_threshold}) must not exceed clip_high_threshold ({clip_high_threshold})"
            )


@REGISTRY.register("loss")
class PPOLoss(_ClippedLoss):
    """``-sum(min(r * A, clip(r, low, high) * A))`` per token, ``r = p(label) / q(label)`` (Tinker's
    ``ppo``; thresholds are bounds on the ratio, 0.8 and 1.2 by default)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor | None = None,
                 sampling_logprobs: torch.Tensor | None = None, **_: torch.Tensor | None) -> LossValue:
        logprobs, ratio, adv, mask = self._ratio(logits, labels, advantages, sampling_logprobs)
        clipped = torch.clamp(ratio, self.clip_low_threshold, self.clip_high_threshold)
        total = -torch.minimum(ratio * adv, clipped * adv).sum()
        return LossValue(total=total, num_tokens=int(mask.sum()), logprobs=logprobs)


@REGISTRY.register("loss")
class CISPOLoss(_ClippedLoss):
    """``-sum(sg(clip(r, low, high)) * logprob(label) * A)`` (Tinker's ``cispo``): the clipped
    ratio weighs the policy gradient and gets no gradient itself."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, advantages: torch.Tensor | None = None,
                 sampling_logprobs: torch.Tensor | None = None, **_: torch.Tensor | None) -> LossValue:
        logprobs, ratio, adv, mask = self._ratio(logits, labels, advantages, sampling_logprobs)
        clipped = torch.clamp(ratio, self.clip_low_threshold, self.clip_high_threshold).detach()
        total = -(clipped * logprobs * adv).sum()
        return LossValue(total=total, num_tokens=int(mask.sum()), logprobs=logprobs)
