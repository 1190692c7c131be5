"""The multi-LoRA model and what its calls return."""

from .multi_lora import MultiLoraTransformersModel
from .output import ForwardBackwardOutput, ForwardOutput

__all__ = ["ForwardBackwardOutput", "ForwardOutput", "MultiLoraTransformersModel"]
