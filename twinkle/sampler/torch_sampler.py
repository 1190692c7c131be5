"""``TorchSampler``: generation with transformers on a base model, plain or with a checkpoint's adapter."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError, NotFoundError
from ..model.multi_lora import MultiLoraTransformersModel, Sampling
from ..protocol.api import SamplerAPI
from ..protocol.names import check_adapter_name
from ..protocol.sampling import SamplingParams
from ..registry import REGISTRY
from ..template import Template


class TorchSampler(SamplerAPI):
    """``SamplerAPI`` over a ``MultiLoraTransformersModel``: its own, or one it shares (``over``),
    so that a server samples on the base model it trains on, without a second copy."""

    def __init__(self, model_id: str = "builtin://tiny-qwen2", *, device: str | None = None,
                 dtype: str | None = None) -> None:
        self._engine = MultiLoraTransformersModel(model_id, max_loras=1, device=device, dtype=dtype)
        self._named: dict[str, str] = {}
        self._template: Template | None = None

    @classmethod
    def over(cls, model: MultiLoraTransformersModel) -> TorchSampler:
        """A sampler sharing ``model``'s base (and device); its adapters are not touched."""
        sampler = cls.__new__(cls)
        sampler._engine, sampler._named, sampler._template = model, {}, None
        return sampler

    @property
    def model_id(self) -> str:
        return self._engine.model_id

    def set_template(self, template_cls: str = "Template", **kwargs: Any) -> None:
        kwargs.setdefault("model_id", str(self._engine.model_dir))
        self._template = REGISTRY.build("template", template_cls, **kwargs)

    def add_adapter_to_sampler(self, adapter_name: str, adapter_uri: str) -> None:
        check_adapter_name(adapter_name)
        self._engine.checkpoint_adapter(adapter_uri)  # checked (and loaded) now, not at the first sample
        self._named[adapter_name] = str(adapter_uri)

    def sample_stepwise(
        self,
        inputs: Any,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        adapter_name: str = "",
        adapter_uri: str | None = None,
        num_samples: int = 1,
    ) -> Sampling:
        """``sample`` a few tokens at a time (see ``Stepwise``)."""
        if adapter_name and adapter_uri is not None:
            raise InvalidArgumentError("pass adapter_name or adapter_uri, not both")
        if adapter_name:
            if not isinstance(adapter_name, str) or adapter_name not in self._named:
                raise NotFoundError(
                    f"no adapter named {str(adapter_name)[:100]!r} on this sampler (add it with add_adapter_to_sampler)"
                )
            adapter_uri = self._named[adapter_name]
        engine, uri = self._engine, adapter_uri
        if uri is None:
            return engine.generation(lambda: None, self._template, inputs, sampling_params, num_samples)
        engine.checkpoint_adapter(uri)  # a bad checkpoint fails the call now, before anything runs
        # Looked up at every step: another sampler may have unloaded it in between (same weights).
        return engine.generation(lambda: engine.checkpoint_adapter(uri), self._template, inputs, sampling_params,
                                 num_samples)
