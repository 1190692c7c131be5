"""Warm-up LR schedulers beside torch's own (which the registry finds by name)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .errors import InvalidArgumentError
from .registry import REGISTRY


def _check_steps(num_warmup_steps: int, num_training_steps: int) -> None:
    if num_warmup_steps < 0 or num_training_steps <= 0 or num_warmup_steps > num_training_steps:
        raise InvalidArgumentError(
            f"need 0 <= num_warmup_steps <= num_training_steps and num_training_steps > 0, "
            f"got {num_warmup_steps} and {num_training_steps}"
        )


@REGISTRY.register("lr_scheduler")
class LinearWarmupScheduler(LambdaLR):
    """Linear warm-up from 0 to the base LR, then linear decay to 0 at ``num_training_steps``."""

    def __init__(self, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int) -> None:
        _check_steps(num_warmup_steps, num_training_steps)
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return step / max(1, self.num_warmup_steps)
        remaining = self.num_training_steps - step
        return max(0.0, remaining / max(1, self.num_training_steps - self.num_warmup_steps))


@REGISTRY.register("lr_scheduler")
class CosineWarmupScheduler(LambdaLR):
    """Linear warm-up, then cosine decay over ``num_cycles`` half-waves (0.5: down to 0 once)."""

    def __init__(
        self, optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
    ) -> None:
        _check_steps(num_warmup_steps, num_training_steps)
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.num_cycles = num_cycles
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return step / max(1, self.num_warmup_steps)
        progress = (step - self.num_warmup_steps) / max(1, self.num_training_steps - self.num_warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * min(progress, 1.0))))
