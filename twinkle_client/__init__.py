"""twinkle_client: run twinkle training code on a remote twinkle server.

Change ``from twinkle...`` to ``from twinkle_client...`` and the same code trains remotely::

    from twinkle_client import init_twinkle_client
    from twinkle_client.dataloader import DataLoader
    from twinkle_client.dataset import Dataset, DatasetMeta
    from twinkle_client.model import MultiLoraTransformersModel

    client = init_twinkle_client(base_url="http://127.0.0.1:8000", api_key="...")

``twinkle_client.model``, ``.dataset`` and ``.dataloader`` import the local library (torch,
transformers) to mirror its API; importing this package alone does not.
"""

from twinkle.errors import TwinkleError
from twinkle.protocol.wire import (
    Checkpoint,
    CheckpointPath,
    Cursor,
    EvalLoss,
    EvalPoint,
    MetricsResponse,
    ServerInfo,
    TrainingRun,
    UploadStatus,
)

from .client import TwinkleClient, current_client, init_twinkle_client
from .events import TrainingEvent, subscribe
from .lazy import Lazy, LazyOutput, LazyValue

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointPath",
    "Cursor",
    "EvalLoss",
    "EvalPoint",
    "Lazy",
    "LazyOutput",
    "LazyValue",
    "MetricsResponse",
    "ServerInfo",
    "TrainingEvent",
    "TrainingRun",
    "TwinkleClient",
    "TwinkleError",
    "UploadStatus",
    "__version__",
    "current_client",
    "init_twinkle_client",
    "subscribe",
]
