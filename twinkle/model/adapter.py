"""Everything one adapter owns: its LoRA config, components and training counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from ..loss import CrossEntropyLoss, Loss
from ..processor import InputProcessor
from ..template import Template


@dataclass
class ComponentSpec:
    """How a component was built: registry name and keyword arguments (kept for checkpoints)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterState:
    """One tenant's adapter. Nothing here is shared with another adapter."""

    name: str
    peft_name: str
    config: LoraConfig
    gradient_accumulation_steps: int
    generator: torch.Generator
    """The adapter's own random numbers (its LoRA dropout), saved with its training state."""
    template: Template | None = None
    processor: InputProcessor | None = None
    loss: Loss = field(default_factory=CrossEntropyLoss)
    optimizer: torch.optim.Optimizer | None = None
    optimizer_spec: ComponentSpec | None = None
    scheduler: Any = None
    scheduler_spec: ComponentSpec | None = None
    cur_step: int = 0
    """Optimizer updates done."""
    micro_step: int = 0
    """forward_backward calls done."""
    micro_in_window: int = 0
    tokens_in_window: int = 0
    grads_normalized: bool = False
    pending_lr_steps: int = 0
    consumed_train_samples: int = 0
    last_loss: float | None = None
    last_grad_norm: float | None = None
    window_grad_norm: float | None = None
    """The gradient norm ``clip_grad_norm`` measured in the current (or just stepped) window."""
    params: list[torch.nn.Parameter] = field(default_factory=list)
    """The adapter's trainable weights, in a fixed order (optimizer, checkpoints)."""

    @property
    def loss_ignore_index(self) -> int:
        """The label value the loss skips (-100 unless the loss says otherwise)."""
        return int(getattr(self.loss, "ignore_index", -100))

    @property
    def window_complete(self) -> bool:
        return self.micro_in_window >= self.gradient_accumulation_steps

    @property
    def lr(self) -> float | None:
        if self.optimizer is None:
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    def progress(self) -> dict[str, Any]:
        """Counters a caller may show or record."""
        return {
            "cur_step": self.cur_step,
            "micro_step": self.micro_step,
            "consumed_train_samples": self.consumed_train_samples,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "accumulated": self.micro_in_window,
            "lr": self.lr,
            "last_loss": self.last_loss,
            "last_grad_norm": self.last_grad_norm,
            "window_grad_norm": self.window_grad_norm,
        }
