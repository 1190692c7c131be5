"""The multi-LoRA model and what its calls return."""

from ..protocol.outputs import ForwardBackwardOutput, ForwardOutput
from .multi_lora import MultiLoraTransformersModel

__all__ = ["ForwardBackwardOutput", "ForwardOutput", "MultiLoraTransformersModel"]
