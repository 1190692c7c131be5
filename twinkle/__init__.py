"""twinkle: multi-LoRA training of chat models, the library behind twinkle's server.

The public names follow ModelScope's Twinkle: ``twinkle.dataset.Dataset``,
``twinkle.dataloader.DataLoader``, ``twinkle.model.MultiLoraTransformersModel``.
"""

from .errors import TwinkleError
from .log import get_logger

__version__ = "0.1.0"

__all__ = ["TwinkleError", "get_logger", "__version__"]
