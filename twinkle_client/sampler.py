"""``TorchSampler`` on a twinkle server: generate from its base model or your checkpoints.

Derived from the declaration ``twinkle.protocol.api.SamplerAPI`` that
``twinkle.sampler.TorchSampler`` implements (same constructor and methods). The sampler runs
on the server's one copy of the base model; ``adapter_uri`` takes the ``twinkle://`` path that
``model.save`` returns (or a ``CheckpointPath`` from ``client.list_checkpoints``). To sample
from an adapter while it trains, call the remote model's own ``sample``.
"""

from __future__ import annotations

from twinkle.protocol.api import SAMPLER
from twinkle.protocol.sampling import SampledSequence, SampleResponse, SamplingParams

from .derive import derive_remote_class
from .remote import RemoteObject

__all__ = ["SampleResponse", "SampledSequence", "SamplingParams", "TorchSampler"]

TorchSampler = derive_remote_class(SAMPLER, RemoteObject, module=__name__)
