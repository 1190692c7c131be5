"""Warm-up LR schedulers beside torch's own (which the registry finds by name).

Both are transformers' schedules (``get_linear_schedule_with_warmup``,
``get_cosine_schedule_with_warmup``) under the names ``set_lr_scheduler`` takes, with their
step counts checked up front. Each returns a ``LambdaLR`` whose ``lr_lambda`` is a
``functools.partial`` of module-level functions, so its ``state_dict`` holds plain data and a
checkpoint resumes it exactly: the model rebuilds it by name and keywords, then loads the state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from .errors import InvalidArgumentError
from .registry import REGISTRY


def _check_steps(num_warmup_steps: int, num_training_steps: int) -> None:
    if num_warmup_steps < 0 or num_training_steps <= 0 or num_warmup_steps > num_training_steps:
        raise InvalidArgumentError(
            f"need 0 <= num_warmup_steps <= num_training_steps and num_training_steps > 0, "
            f"got {num_warmup_steps} and {num_training_steps}"
        )


@REGISTRY.register("lr_scheduler")
def LinearWarmupScheduler(optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int) -> LambdaLR:
    """Linear warm-up from 0 to the base LR, then linear decay to 0 at ``num_training_steps``
    (and 0 after it)."""
    _check_steps(num_warmup_steps, num_training_steps)
    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps)


@REGISTRY.register("lr_scheduler")
def CosineWarmupScheduler(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5
) -> LambdaLR:
    """Linear warm-up, then cosine decay over ``num_cycles`` half-waves (0.5: down to 0 once).

    The decay lasts ``num_training_steps - num_warmup_steps`` steps (at least one); after it the
    LR stays where the cosine ended (0 for the default ``num_cycles``) instead of following it
    back up.
    """
    _check_steps(num_warmup_steps, num_training_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps, num_training_steps, num_cycles)
    end = num_warmup_steps + max(1, num_training_steps - num_warmup_steps)
    # The constructor has applied step 0, which the hold does not change (0 < end).
    scheduler.lr_lambdas = [partial(_held_after, schedule=fn, end=end) for fn in scheduler.lr_lambdas]
    return scheduler


def _held_after(step: int, *, schedule: Callable[[int], float], end: int) -> float:
    """``schedule`` up to step ``end``, its value there from then on."""
    return schedule(min(step, end))


@REGISTRY.register("lr_scheduler")
class FixedLR(LRScheduler):
    """Holds every parameter group's LR at ``lr``, whatever the optimizer was built with.

    For a loop that chooses the LR itself at each update (the Tinker API's ``optim_step`` does):
    setting a new ``FixedLR`` changes the LR and keeps the optimizer's state, which a new
    optimizer would drop. Its ``state_dict`` is plain data (``lr`` included), so a checkpoint
    restores it exactly.
    """

    def __init__(self, optimizer: Optimizer, lr: float) -> None:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
            raise InvalidArgumentError(f"FixedLR lr must be a finite number >= 0, got {lr!r}")
        self.fixed_lr = float(lr)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.fixed_lr for _ in self.optimizer.param_groups]
