"""What the model's calls return. Plain pydantic models: the same objects travel over the wire."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ForwardBackwardOutput(BaseModel):
    """The result of one ``forward_backward`` micro-batch.

    ``str(output)`` (and ``f"{output:.3f}"``) is the loss, so the seed's
    ``logger.info(f'loss: {output}')`` prints a number.
    """

    loss: float
    num_tokens: int
    batch_size: int
    step: int
    """Optimizer updates done before this micro-batch."""
    micro_step: int
    """Micro-batches done, this one included."""
    accumulated: int
    """Micro-batches in the current accumulation window, this one included."""
    gradient_accumulation_steps: int
    logprobs: list[list[float]] | None = None
    """Under a loss that returns them (``Loss.returns_logprobs``): for each row, the
    log-probability of each of its labels after the first (row length - 1 values, 0 where the
    label is ignored). None otherwise."""

    @property
    def window_complete(self) -> bool:
        """True when the next ``step()`` will update the weights."""
        return self.accumulated >= self.gradient_accumulation_steps

    def __str__(self) -> str:
        return f"{self.loss:.4f}"

    def __format__(self, spec: str) -> str:
        return format(self.loss, spec) if spec else str(self)

    def __float__(self) -> float:
        return self.loss


class ForwardOutput(BaseModel):
    """The result of ``forward_only``: the loss where labels were given, and optionally the logits."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    loss: float | None = None
    num_tokens: int = 0
    reduction: Literal["mean", "sum"] = "mean"
    """How ``loss`` is reduced over the batch's tokens: a per-token mean (the cross-entropy
    default) or a sum (token-summed losses such as the policy-gradient ones)."""
    logits: Any = None
    logprobs: list[list[float]] | None = None
    """As ``ForwardBackwardOutput.logprobs``."""
