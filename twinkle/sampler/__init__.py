"""Sampling: generate from the base model, a checkpoint or an adapter while it trains."""

from ..protocol.sampling import SampledSequence, SampleResponse, SamplingParams
from .torch_sampler import TorchSampler

__all__ = ["SampleResponse", "SampledSequence", "SamplingParams", "TorchSampler"]
