"""``MultiLoraTransformersModel``: one frozen base model, several independent LoRA adapters."""

from __future__ import annotations

import contextlib
import copy
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt
from ..errors import (
    CapacityError,
    CheckpointError,
    InvalidArgumentError,
    NotFoundError,
    StateError,
    first_line,
)
from ..hub import canonical_model_id, resolve_model_dir, split_id
from ..loss import Loss, LossValue
from ..paths import atomic_directory
from ..processor import InputProcessor
from ..protocol.api import ModelAPI
from ..protocol.limits import MAX_SAMPLE_SEQUENCES, MAX_SAMPLING_ADAPTERS
from ..protocol.names import check_adapter_name, check_checkpoint_name
from ..protocol.outputs import ForwardBackwardOutput, ForwardOutput
from ..protocol.sampling import SampleResponse, SamplingParams
from ..protocol.sampling import sampling_params as sampling_params_of
from ..registry import REGISTRY
from ..template import Template
from . import fused, generation, token_inputs
from .adapter import AdapterState, ComponentSpec
from .lora_policy import PolicyLimits, check_lora_config

# The peft layer classes an adapter may live in: the base layer's forward runs untouched and
# the adapter's own weights add to its output. (peft's MultiheadAttention merges into the
# base weights around every forward; ParamWrapper parametrizes base parameters.)
_ALLOWED_LORA_LAYERS = (lora.Linear, lora.Embedding)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MultiLoraTransformersModel(ModelAPI):
    """``ModelAPI`` on transformers and peft: adapters are peft LoRA adapters of one frozen base model."""

    def __init__(
        self,
        model_id: str = "builtin://tiny-qwen2",
        *,
        max_loras: int = 5,
        max_r: int = 32,
        device: str | None = None,
        dtype: str | None = None,
        output_dir: str = "twinkle_output",
    ) -> None:
        if not isinstance(max_loras, int) or max_loras < 1:
            raise InvalidArgumentError(f"max_loras must be a positive integer, got {max_loras!r}")
        if not isinstance(max_r, int) or max_r < 1:
            raise InvalidArgumentError(f"max_r must be a positive integer, got {max_r!r}")
        from transformers import AutoModelForCausalLM

        self.model_id = canonical_model_id(model_id)
        self.max_loras = max_loras
        self.max_r = max_r
        self.output_dir = Path(output_dir)
        self.device = torch.device(device) if device else _default_device()
        if dtype is None:
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise InvalidArgumentError(f"dtype must be a torch dtype name such as 'bfloat16', got {dtype!r}")
        self.model_dir = resolve_model_dir(model_id)
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype)
        base.to(self.device)
        fused.use_rows_attention(base)
        for param in base.parameters():
            param.requires_grad_(False)
        self.vocab_size = int(base.get_input_embeddings().num_embeddings)
        self._lora_limits = PolicyLimits(max_r=max_r, fan_in_fan_out=_uses_conv1d(base))
        self._base = base
        self._peft: PeftModel | None = None
        self._adapters: dict[str, AdapterState] = {}
        self._next_slot = 0
        self._lock = threading.RLock()
        self._frozen: OrderedDict[tuple[str, int], str] = OrderedDict()
        """Checkpoints loaded for sampling, (folder, weights mtime) -> their peft name; least
        recently used first."""
        self._default_template: Template | None = None
        self.sample_token_budget: int | None = None
        """The most tokens one ``sample`` call may compute (sequences x (prompt + max_tokens));
        None: no bound. A server sets it from its ``max_tokens_per_call``."""

    # ----------------------------------------------------------------- adapters

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters on the model."""
        return list(self._adapters)

    @property
    def lock(self) -> threading.RLock:
        """Taken by every call on the model (re-entrant): hold it to make several calls one."""
        return self._lock

    @property
    def dtype(self) -> torch.dtype:
        """The base model's dtype (bfloat16 on CUDA, float32 on CPU unless chosen)."""
        return self._base.dtype

    @property
    def free_slots(self) -> int:
        """How many more adapters fit (``max_loras`` minus those in use)."""
        return self.max_loras - len(self._adapters)

    def add_adapter_to_model(
        self,
        adapter_name: str,
        config: LoraConfig | dict[str, Any],
        gradient_accumulation_steps: int = 1,
        *,
        seed: int = 42,
    ) -> None:
        check_adapter_name(adapter_name)
        config = self._check_lora_config(config)
        if not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
            raise InvalidArgumentError(
                f"gradient_accumulation_steps must be an integer >= 1, got {gradient_accumulation_steps!r}"
            )
        with self._lock:
            if adapter_name in self._adapters:
                raise InvalidArgumentError(f"adapter {adapter_name!r} already exists on this model")
            if self.free_slots <= 0:
                raise CapacityError(
                    f"all {self.max_loras} adapter slots are in use (max_loras={self.max_loras}); "
                    "remove an adapter first"
                )
            peft_name = f"slot{self._next_slot}"
            self._next_slot += 1
            try:
                self._inject(peft_name, config, seed)
            except torch.OutOfMemoryError:
                self._discard_partial_adapter(peft_name)
                raise CapacityError(f"adapter {adapter_name!r} does not fit in device memory") from None
            except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, re.error) as exc:
                self._discard_partial_adapter(peft_name)
                raise InvalidArgumentError(f"LoRA config does not fit {self.model_id}: {first_line(exc)}") from None
            except BaseException:
                self._discard_partial_adapter(peft_name)
                raise
            finally:
                # peft turned every other adapter's weights untrainable while it injected
                # this one, whether or not the add went through.
                self._settle_modes()
            self._peft.to(self.device)
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            fused.install(self._peft, peft_name, generator)
            state = AdapterState(
                name=adapter_name,
                peft_name=peft_name,
                config=config,
                gradient_accumulation_steps=gradient_accumulation_steps,
                generator=generator,
            )
            state.params = self._find_params(peft_name)
            self._adapters[adapter_name] = state
            self._settle_modes()

    def remove_adapter(self, adapter_name: str) -> None:
        with self._lock:
            state = self._adapter(adapter_name)
            assert self._peft is not None
            with warnings.catch_warnings():  # peft's note that another adapter is now "active"
                warnings.simplefilter("ignore")
                self._peft.delete_adapter(state.peft_name)
            del self._adapters[state.name]
            self._settle_modes()

    def _check_lora_config(self, config: LoraConfig | dict[str, Any]) -> LoraConfig:
        """The accepted config (see ``lora_policy``): it keeps the adapter to its own low-rank weights."""
        return check_lora_config(config, self._lora_limits)

    def _inject(self, peft_name: str, config: LoraConfig, seed: int) -> None:
        """Add peft adapter ``peft_name``, its initial weights drawn from ``seed``: torch's global
        RNG, which every tenant shares, is left as it was."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            if self._peft is None:
                self._peft = get_peft_model(self._base, copy.deepcopy(config), adapter_name=peft_name)
            else:
                self._peft.add_adapter(peft_name, copy.deepcopy(config))
            self._check_adapter_layers(peft_name)

    def _check_adapter_layers(self, peft_name: str) -> None:
        for module_name, module in self._base.named_modules():
            if isinstance(module, BaseTunerLayer) and peft_name in module._all_available_adapter_names():
                if not isinstance(module, _ALLOWED_LORA_LAYERS):
                    base_layer = type(module.get_base_layer()).__name__
                    raise ValueError(
                        f"LoRA on {module_name} ({base_layer}) is not supported on a shared base model; "
                        "target Linear or Embedding layers"
                    )

    def _discard_partial_adapter(self, peft_name: str) -> None:
        """Remove what a failed add left behind: its weights in the layers it reached, its config."""
        for module in self._base.modules():
            if isinstance(module, BaseTunerLayer) and peft_name in module._all_available_adapter_names():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module.delete_adapter(peft_name)
        if self._peft is not None:
            self._peft.peft_config.pop(peft_name, None)

    def _adapter(self, adapter_name: str | None) -> AdapterState:
        if adapter_name is None:
            if len(self._adapters) == 1:
                return next(iter(self._adapters.values()))
            if not self._adapters:
                raise StateError("the model has no adapter yet: call add_adapter_to_model(name, LoraConfig(...)) first")
            raise InvalidArgumentError(f"the model has several adapters ({', '.join(self._adapters)}); pass adapter_name")
        try:
            return self._adapters[adapter_name]
        except KeyError:
            raise NotFoundError(f"no adapter named {adapter_name!r} on this model") from None

    def _settle_modes(self) -> None:
        """After peft added or removed an adapter: every adapter trainable, the base in eval mode.

        peft marks only its *active* adapter trainable; passes here train several at once. The
        base model's own dropout stays off: it would draw from torch's global RNG, which every
        tenant shares (adapters' dropout uses their own generators, see ``fused``).
        """
        if self._peft is None:
            return
        if self._peft.peft_config and self._peft.active_adapter not in self._peft.peft_config:
            # peft keeps naming a removed adapter active, and its forward looks that name up.
            self._peft.set_adapter(next(iter(self._peft.peft_config)))
        for state in self._adapters.values():
            for param in state.params:
                param.requires_grad_(True)
        self._peft.eval()

    def _find_params(self, peft_name: str) -> list[torch.nn.Parameter]:
        assert self._peft is not None
        # ".slot0." in a Linear layer's names, a trailing ".slot0" in an Embedding layer's
        # (lora_embedding_A is a ParameterDict).
        return [p for n, p in self._peft.named_parameters() if peft_name in n.split(".")]

    def _params(self, state: AdapterState) -> list[torch.nn.Parameter]:
        return state.params

    # -------------------------------------------------------------- components

    def set_template(self, template_cls: str = "Template", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("model_id", str(self.model_dir) if split_id(self.model_id)[0] == "builtin" else self.model_id)
        template = REGISTRY.build("template", template_cls, **kwargs)
        with self._lock:
            self._adapter(adapter_name).template = template

    def set_processor(
        self, processor_cls: str = "InputProcessor", *, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        processor = REGISTRY.build("processor", processor_cls, **kwargs)
        with self._lock:
            self._adapter(adapter_name).processor = processor

    def set_loss(self, loss_cls: str = "CrossEntropyLoss", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        loss = REGISTRY.build("loss", loss_cls, **kwargs)
        if not isinstance(loss, Loss):
            raise InvalidArgumentError(f"{loss_cls!r} is not a twinkle loss")
        with self._lock:
            self._adapter(adapter_name).loss = loss

    def set_optimizer(self, optimizer_cls: str = "AdamW", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        with self._lock:
            state = self._adapter(adapter_name)
            state.optimizer = REGISTRY.build("optimizer", optimizer_cls, self._params(state), **kwargs)
            state.optimizer_spec = ComponentSpec(_spec_name(optimizer_cls), dict(kwargs))
            state.scheduler = None
            state.scheduler_spec = None

    def set_lr_scheduler(
        self, scheduler_cls: str = "LinearLR", *, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        with self._lock:
            state = self._adapter(adapter_name)
            if state.optimizer is None:
                raise StateError("set_lr_scheduler needs an optimizer: call set_optimizer(...) first")
            state.scheduler = REGISTRY.build("lr_scheduler", scheduler_cls, state.optimizer, **kwargs)
            state.scheduler_spec = ComponentSpec(_spec_name(scheduler_cls), dict(kwargs))

    # ---------------------------------------------------------------- training

    def _collate(self, state: AdapterState, inputs: Any, need_labels: bool = False) -> dict[str, torch.Tensor]:
        if state.processor is None:
            state.processor = InputProcessor()
        if state.processor.pad_token_id is None:
            state.processor.pad_token_id = self._pad_token_id(state)
        batch = state.processor(inputs)
        top = int(batch["input_ids"].max())
        if top >= self.vocab_size:
            raise InvalidArgumentError(f"input_ids contain token id {top}, outside the vocabulary of {self.vocab_size}")
        # Checked here, on the CPU: on CUDA an out-of-range target is a device-side assert that
        # breaks the device for every adapter on it.
        labels = batch["labels"]
        bad = labels[(labels != state.loss_ignore_index) & ((labels < 0) | (labels >= self.vocab_size))]
        if bad.numel():
            raise InvalidArgumentError(
                f"labels contain {int(bad[0])}, outside the vocabulary of {self.vocab_size} (use -100 to ignore a token)"
            )
        # A row's first real token is never a target (each token predicts the next one), and
        # padding is dropped when rows are packed: count what the loss will see.
        if need_labels:
            real = batch["attention_mask"].bool()
            if not any(bool((labels[r][real[r]][1:] != state.loss_ignore_index).any()) for r in range(len(labels))):
                raise InvalidArgumentError("the batch has no labelled tokens (all labels are -100)")
        loss = state.loss
        if loss.token_inputs:
            batch.update(token_inputs.collate(inputs, loss.token_inputs, loss.required_inputs, batch,
                                              state.processor.padding_side))
        return batch

    def _pad_token_id(self, state: AdapterState) -> int:
        if state.template is None:
            state.template = Template(model_id=str(self.model_dir))
        return int(state.template.pad_token_id)

    def forward_backward(self, inputs: Any, *, adapter_name: str | None = None) -> ForwardBackwardOutput:
        return _one(self.forward_backward_many([(inputs, adapter_name)]))

    def forward_only(
        self, inputs: Any, *, adapter_name: str | None = None, return_logits: bool = False
    ) -> ForwardOutput:
        return _one(self.forward_only_many([(inputs, adapter_name, return_logits)]))

    # ---------------------------------------------------------- fused passes

    def forward_backward_many(
        self, calls: Sequence[tuple[Any, str | None]]
    ) -> list[ForwardBackwardOutput | Exception]:
        """``forward_backward`` of several adapters' micro-batches in fused passes.

        Returns, in order, each call's output or the exception it alone raised. Each adapter's
        loss, gradients and counters are exactly those of the same call run alone; a call
        whose input is bad fails alone, and a pass that fails changes no adapter's gradients.
        """
        with self._lock:
            results: list[Any] = [None] * len(calls)
            parts = []
            for i, (inputs, adapter_name) in enumerate(calls):
                try:
                    state = self._adapter(adapter_name)
                    if state.optimizer is None:
                        raise StateError(
                            f"adapter {state.name!r} has no optimizer: call set_optimizer(...) before forward_backward"
                        )
                    parts.append(_Part(i, state, self._collate(state, inputs, need_labels=True)))
                except Exception as exc:
                    results[i] = exc
            for group in _passes(parts):
                self._run_passes(group, train=True, results=results)
            return results

    def forward_only_many(
        self, calls: Sequence[tuple[Any, str | None, bool]]
    ) -> list[ForwardOutput | Exception]:
        """``forward_only`` of several adapters' micro-batches (``(inputs, adapter_name,
        return_logits)``) in fused passes; each call's output or exception, in order."""
        with self._lock:
            results: list[Any] = [None] * len(calls)
            parts = []
            for i, (inputs, adapter_name, return_logits) in enumerate(calls):
                try:
                    state = self._adapter(adapter_name)
                    parts.append(_Part(i, state, self._collate(state, inputs), bool(return_logits)))
                except Exception as exc:
                    results[i] = exc
            for group in _passes(parts):
                self._run_passes(group, train=False, results=results)
            return results

    def _run_passes(self, parts: list[_Part], *, train: bool, results: list[Any]) -> None:
        """One pass for ``parts``; if it fails, each part alone (so one part's trouble, such as
        a batch too big for the device, is that part's error only)."""
        drawn = [p.state.generator.get_state() for p in parts]
        try:
            outputs = self._pass(parts, train)
        except Exception as exc:
            # The parts run again (alone) or fail: either way as if this pass never drew.
            for p, state in zip(parts, drawn, strict=True):
                p.state.generator.set_state(state)
            if len(parts) > 1:
                for part in parts:
                    self._run_passes([part], train=train, results=results)
                return
            if isinstance(exc, torch.OutOfMemoryError):
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                exc = CapacityError(
                    "the batch does not fit in device memory; use a smaller batch or max_length "
                    "(nothing was added to the accumulation window)"
                )
            results[parts[0].index] = exc
            return
        for part, output in zip(parts, outputs, strict=True):
            results[part.index] = output

    def _pass(self, parts: list[_Part], train: bool) -> list[Any]:
        assert self._peft is not None
        packed = fused.pack([(p.state.peft_name, p.batch, p.state.loss_ignore_index) for p in parts], self.device)
        spans = [(seg.start, seg.end) for seg in packed.segments]
        with contextlib.ExitStack() as stack:
            stack.enter_context(fused.segments(packed, dropout=train))
            if not train:
                stack.enter_context(torch.no_grad())
            logits = self._peft(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
            values = [_loss_of(p, logits, packed, a, b) for p, (a, b) in zip(parts, spans, strict=True)]
        logprobs = [_row_logprobs(v, rows, a) for v, rows, (a, _) in zip(values, packed.rows, spans, strict=True)]
        if not train:
            return [
                ForwardOutput(
                    loss=p.state.loss.report(v) if v.num_tokens else None,
                    reduction="mean" if p.state.loss.normalize_by_tokens else "sum",
                    num_tokens=v.num_tokens,
                    logits=_unpack_logits(logits, rows, p.batch) if p.return_logits else None,
                    logprobs=lp,
                )
                for p, v, rows, lp in zip(parts, values, packed.rows, logprobs, strict=True)
            ]
        params = [param for p in parts for param in p.state.params]
        total = values[0].total
        for v in values[1:]:
            total = total + v.total
        # Gradients are computed first and added to the adapters' own only once all exist: a
        # pass that fails half way leaves every accumulation window as it was.
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for param, grad in zip(params, grads, strict=True):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        return [self._count(p, v, lp) for p, v, lp in zip(parts, values, logprobs, strict=True)]

    def _count(self, part: _Part, value: LossValue, logprobs: list[list[float]] | None = None) -> ForwardBackwardOutput:
        state = part.state
        if state.micro_in_window == 0:
            state.window_grad_norm = None
        step_before = state.cur_step
        rows = int(part.batch["input_ids"].shape[0])
        state.micro_step += 1
        state.micro_in_window += 1
        state.tokens_in_window += value.num_tokens
        state.consumed_train_samples += rows
        state.last_loss = state.loss.report(value)
        return ForwardBackwardOutput(
            loss=state.last_loss,
            num_tokens=value.num_tokens,
            batch_size=rows,
            step=step_before,
            micro_step=state.micro_step,
            accumulated=state.micro_in_window,
            gradient_accumulation_steps=state.gradient_accumulation_steps,
            logprobs=logprobs,
        )

    def _normalize_grads(self, state: AdapterState) -> None:
        if state.grads_normalized:
            return
        if state.loss.normalize_by_tokens and state.tokens_in_window:
            scale = 1.0 / state.tokens_in_window
            for param in self._params(state):
                if param.grad is not None:
                    param.grad.mul_(scale)
        state.grads_normalized = True

    def clip_grad_norm(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None
    ) -> float | None:
        with self._lock:
            state = self._adapter(adapter_name)
            if not state.window_complete:
                return None
            self._normalize_grads(state)
            grads = [p for p in self._params(state) if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm, norm_type=norm_type)
            state.last_grad_norm = state.window_grad_norm = float(norm)
            return state.last_grad_norm

    def step(self, *, adapter_name: str | None = None) -> bool:
        with self._lock:
            state = self._adapter(adapter_name)
            if state.optimizer is None:
                raise StateError(f"adapter {state.name!r} has no optimizer: call set_optimizer(...) first")
            if not state.window_complete:
                return False
            self._normalize_grads(state)
            state.optimizer.step()
            state.cur_step += 1
            state.micro_in_window = 0
            state.tokens_in_window = 0
            state.pending_lr_steps += 1
            return True

    def zero_grad(self, *, adapter_name: str | None = None) -> bool:
        with self._lock:
            state = self._adapter(adapter_name)
            if state.micro_in_window:
                return False
            for param in self._params(state):
                param.grad = None
            state.grads_normalized = False
            return True

    def lr_step(self, *, adapter_name: str | None = None) -> bool:
        with self._lock:
            state = self._adapter(adapter_name)
            if state.scheduler is None or state.pending_lr_steps == 0:
                return False
            state.scheduler.step()
            state.pending_lr_steps = 0
            return True

    def clip_grad_and_step(self, max_grad_norm: float = 1.0, *, adapter_name: str | None = None) -> float | None:
        with self._lock:
            norm = self.clip_grad_norm(max_grad_norm, adapter_name=adapter_name)
            self.step(adapter_name=adapter_name)
            self.zero_grad(adapter_name=adapter_name)
            self.lr_step(adapter_name=adapter_name)
            return norm

    def get_train_state(self, *, adapter_name: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._adapter(adapter_name).progress()

    # ---------------------------------------------------------------- sampling

    def sample_stepwise(
        self,
        inputs: Any,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        num_samples: int = 1,
        *,
        adapter_name: str | None = None,
    ) -> Sampling:
        """``sample`` a few tokens at a time (see ``Stepwise``)."""
        with self._lock:
            state = self._adapter(adapter_name)
            if state.template is None:
                state.template = Template(model_id=str(self.model_dir))
            name = state.name
            return self.generation(lambda: self._adapter(name).peft_name, state.template, inputs, sampling_params,
                                   num_samples)

    def generation(
        self,
        adapter: Callable[[], str | None],
        template: Template | None,
        inputs: Any,
        sampling_params: SamplingParams | dict[str, Any] | None,
        num_samples: int,
    ) -> Sampling:
        """A generation with the base model plus the adapter ``adapter()`` names at each step
        (None: the bare base model), encoding conversations with ``template`` (None: the
        model's own chat template). Checked and encoded now; nothing is computed until its
        first step. No adapter changes: no gradients, no dropout, no adapter's generator drawn."""
        params = sampling_params_of(sampling_params)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidArgumentError(f"num_samples must be a positive integer, got {num_samples!r}")
        with self._lock:
            template = template or self._template()
            limit = int(getattr(self._base.config, "max_position_embeddings", 0) or template.max_length)
            if params.max_tokens >= limit:
                raise InvalidArgumentError(
                    f"max_tokens={params.max_tokens} leaves no room for a prompt in the model's context of "
                    f"{limit} tokens; ask for fewer"
                )
            prompts = generation.prompts_of(
                inputs,
                lambda messages: template.encode(messages, add_generation_prompt=True)["input_ids"],
                self.vocab_size,
                min(template.max_length, limit - params.max_tokens),
                f" (the model's context of {limit} tokens less max_tokens={params.max_tokens})"
                if limit - params.max_tokens < template.max_length else " (the template's max_length)",
            )
            rows = len(prompts) * num_samples
            if rows > MAX_SAMPLE_SEQUENCES:
                raise InvalidArgumentError(
                    f"{len(prompts)} prompts x num_samples={num_samples} is more than {MAX_SAMPLE_SEQUENCES} "
                    "sequences in one call; split it"
                )
            work = rows * (max(len(p) for p in prompts) + params.max_tokens)
            if self.sample_token_budget is not None and work > self.sample_token_budget:
                raise CapacityError(
                    f"sampling {rows} sequences of up to {max(len(p) for p in prompts)} + {params.max_tokens} "
                    f"tokens is {work} tokens, more than one call may compute here ({self.sample_token_budget}); "
                    "use fewer prompts, num_samples or max_tokens"
                )
            tokenizer = template.tokenizer
            return Sampling(self, adapter, generation.Generation(
                # The base model itself (peft's LoRA layers are inside it): ``fused.only`` picks
                # the adapter, so peft's notion of an "active" adapter plays no part.
                self._base,
                prompts,
                params,
                num_samples,
                device=self.device,
                pad_token_id=int(template.pad_token_id),
                stop_token_ids=self._stop_token_ids(tokenizer),
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                new_cache=self._new_cache,
                cache_kw=generation.cache_keyword(type(self._base)),
            ))

    def checkpoint_adapter(self, folder: str | Path) -> str:
        """The peft name of the checkpoint at ``folder`` loaded (frozen) for sampling; the
        ``MAX_SAMPLING_ADAPTERS`` most recently used stay loaded."""
        path = ckpt.check_checkpoint_dir(folder)
        key = (str(path.resolve()), (path / ckpt.ADAPTER_WEIGHTS).stat().st_mtime_ns)
        with self._lock:
            if key in self._frozen:
                self._frozen.move_to_end(key)
                return self._frozen[key]
            meta = ckpt.CheckpointMeta.read(path) if (path / ckpt.META_FILE).exists() else None
            if meta is not None and meta.base_model != self.model_id:
                raise CheckpointError(f"checkpoint was trained on {meta.base_model}; this model is {self.model_id}")
            try:
                config = LoraConfig.from_pretrained(str(path))
            except (ValueError, TypeError, OSError) as exc:
                raise CheckpointError(f"checkpoint's adapter_config.json cannot be read: {first_line(exc)}") from None
            config = self._check_lora_config(config)
            weights = load_file(path / ckpt.ADAPTER_WEIGHTS)
            while len(self._frozen) >= MAX_SAMPLING_ADAPTERS:
                _, old = self._frozen.popitem(last=False)
                self._drop_frozen(old)
            peft_name = f"frozen{self._next_slot}"
            self._next_slot += 1
            config.inference_mode = True
            try:
                self._inject(peft_name, config, seed=0)  # its weights are the checkpoint's
                self._check_weights(peft_name, weights, "its own adapter_config.json")
                set_peft_model_state_dict(self._peft, weights, adapter_name=peft_name)
            except CheckpointError:
                self._discard_partial_adapter(peft_name)
                raise
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
                self._discard_partial_adapter(peft_name)
                raise CheckpointError(f"checkpoint does not fit {self.model_id}: {first_line(exc)}") from None
            finally:
                self._settle_modes()
            self._peft.to(self.device)
            for param in self._find_params(peft_name):
                param.requires_grad_(False)
            fused.install(self._peft, peft_name, torch.Generator(device=self.device))
            self._frozen[key] = peft_name
            return peft_name

    def _drop_frozen(self, peft_name: str) -> None:
        assert self._peft is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(peft_name)
        self._settle_modes()

    def _template(self) -> Template:
        if self._default_template is None:
            self._default_template = Template(model_id=str(self.model_dir))
        return self._default_template

    def _stop_token_ids(self, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        eos = getattr(getattr(self._base, "generation_config", None), "eos_token_id", None)
        for value in (eos, tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._base.config)

    @contextlib.contextmanager
    def _attention_for_generation(self) -> Any:
        """Padded batches need a mask-aware attention: the model's own sdpa while generating
        (the packed-rows implementation serves passes without padding)."""
        config = self._base.config
        before = getattr(config, "_attn_implementation", None)
        if before != fused.ROWS_ATTENTION:
            yield
            return
        self._base.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            self._base.set_attn_implementation(before)

    # ------------------------------------------------------------- checkpoints

    def save(
        self,
        name: str,
        save_optimizer: bool = False,
        *,
        adapter_name: str | None = None,
        save_dir: str | None = None,
    ) -> str:
        check_checkpoint_name(name)
        with self._lock:
            state = self._adapter(adapter_name)
            if save_optimizer and state.optimizer is None:
                raise StateError("save_optimizer=True needs an optimizer: call set_optimizer(...) first")
            target = Path(save_dir) if save_dir else self.output_dir / state.name
            target = target / name
            with atomic_directory(target) as tmp:
                self._write_checkpoint(state, tmp, save_optimizer)
            return str(target)

    def _write_checkpoint(self, state: AdapterState, folder: Path, save_optimizer: bool) -> None:
        assert self._peft is not None
        weights = get_peft_model_state_dict(self._peft, adapter_name=state.peft_name)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, folder / ckpt.ADAPTER_WEIGHTS,
                  metadata={"format": "pt"})
        config = copy.deepcopy(self._peft.peft_config[state.peft_name])
        scheme, rest = split_id(self.model_id)
        config.base_model_name_or_path = str(self.model_dir) if scheme in ("builtin", "local") else rest
        config.save_pretrained(folder)
        if save_optimizer:
            assert state.optimizer is not None and state.optimizer_spec is not None
            training_state: dict[str, Any] = {
                "optimizer": state.optimizer.state_dict(),
                "optimizer_spec": {"name": state.optimizer_spec.name, "kwargs": state.optimizer_spec.kwargs},
                "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
                "scheduler_spec": (
                    {"name": state.scheduler_spec.name, "kwargs": state.scheduler_spec.kwargs}
                    if state.scheduler_spec
                    else None
                ),
                "counters": {
                    "micro_in_window": state.micro_in_window,
                    "tokens_in_window": state.tokens_in_window,
                    "pending_lr_steps": state.pending_lr_steps,
                    "grads_normalized": state.grads_normalized,
                },
                # A save in the middle of a window must carry the gradients gathered so far.
                "grads": (
                    [None if p.grad is None else p.grad.detach().cpu() for p in self._params(state)]
                    if state.micro_in_window
                    else None
                ),
                # The adapter's own generator (its dropout); torch's global RNG is every tenant's.
                "generator": state.generator.get_state(),
            }
            ckpt.save_training_state(folder, training_state)
        ckpt.CheckpointMeta(
            base_model=self.model_id,
            lora_rank=int(state.config.r),
            cur_step=state.cur_step,
            micro_step=state.micro_step,
            consumed_train_samples=state.consumed_train_samples,
            gradient_accumulation_steps=state.gradient_accumulation_steps,
            has_training_state=save_optimizer,
            last_loss=state.last_loss,
        ).write(folder)

    def load(self, name: str, load_optimizer: bool = False, *, adapter_name: str | None = None) -> None:
        with self._lock:
            state = self._adapter(adapter_name)
            folder = ckpt.check_checkpoint_dir(name, need_training_state=load_optimizer)
            meta = ckpt.CheckpointMeta.read(folder) if (folder / ckpt.META_FILE).exists() else None
            if meta is not None and meta.base_model != self.model_id:
                raise CheckpointError(f"checkpoint was trained on {meta.base_model}; this model is {self.model_id}")
            saved_config = LoraConfig.from_pretrained(str(folder))
            if saved_config.r != state.config.r:
                raise CheckpointError(
                    f"checkpoint has LoRA rank {saved_config.r}; adapter {state.name!r} has rank {state.config.r}"
                )
            weights = load_file(folder / ckpt.ADAPTER_WEIGHTS)
            self._check_weights(state.peft_name, weights, f"adapter {state.name!r}")
            training_state = ckpt.load_training_state(folder) if load_optimizer else None
            generator_state = None if training_state is None else training_state.get("generator")
            if generator_state is not None and generator_state.numel() != state.generator.get_state().numel():
                generator_state = None  # saved on another kind of device: this adapter's stream goes on
            optimizer, scheduler = (None, None)
            if training_state is not None:
                optimizer, scheduler = self._rebuild_optimizer(state, training_state)
            # Everything is validated; from here on, apply.
            assert self._peft is not None
            set_peft_model_state_dict(self._peft, weights, adapter_name=state.peft_name)
            if training_state is None:
                return
            assert meta is not None
            state.optimizer, state.scheduler = optimizer, scheduler
            state.optimizer_spec = ComponentSpec(**training_state["optimizer_spec"])
            spec = training_state["scheduler_spec"]
            state.scheduler_spec = ComponentSpec(**spec) if spec else None
            counters = training_state["counters"]
            state.cur_step = meta.cur_step
            state.micro_step = meta.micro_step
            state.consumed_train_samples = meta.consumed_train_samples
            state.gradient_accumulation_steps = meta.gradient_accumulation_steps
            state.last_loss = meta.last_loss
            state.micro_in_window = counters["micro_in_window"]
            state.tokens_in_window = counters["tokens_in_window"]
            state.pending_lr_steps = counters["pending_lr_steps"]
            state.grads_normalized = counters["grads_normalized"]
            state.window_grad_norm = None
            grads = training_state["grads"]
            for param, grad in zip(self._params(state), grads or [None] * len(self._params(state)), strict=True):
                param.grad = None if grad is None else grad.to(param.device, param.dtype)
            if generator_state is not None:
                state.generator.set_state(generator_state)

    def _check_weights(self, peft_name: str, weights: dict[str, torch.Tensor], what: str) -> None:
        """``weights`` are exactly the weights of peft adapter ``peft_name`` (``what``, for the error)."""
        assert self._peft is not None
        expected = get_peft_model_state_dict(self._peft, adapter_name=peft_name)
        if set(expected) != set(weights):
            diff = sorted(set(expected) ^ set(weights))
            raise CheckpointError(
                f"checkpoint does not fit {what}: {len(diff)} weights differ (first: {diff[0]})"
            )
        for key, tensor in expected.items():
            if tuple(weights[key].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint weight {key} has shape {tuple(weights[key].shape)}, expected {tuple(tensor.shape)}"
                )

    def _rebuild_optimizer(self, state: AdapterState, training_state: dict[str, Any]) -> tuple[Any, Any]:
        spec = training_state["optimizer_spec"]
        try:
            optimizer = REGISTRY.build("optimizer", spec["name"], self._params(state), **spec["kwargs"])
            scheduler = None
            sspec = training_state["scheduler_spec"]
            if sspec:
                # Built before the optimizer state is loaded: a scheduler's constructor rewrites the LR.
                scheduler = REGISTRY.build("lr_scheduler", sspec["name"], optimizer, **sspec["kwargs"])
            optimizer.load_state_dict(training_state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(training_state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint's optimizer state does not fit adapter {state.name!r}: {exc}") from None
        return optimizer, scheduler

    def resume_from_checkpoint(
        self, name: str, *, resume_only_model: bool = False, adapter_name: str | None = None
    ) -> dict[str, int]:
        self.load(name, load_optimizer=not resume_only_model, adapter_name=adapter_name)
        with self._lock:
            state = self._adapter(adapter_name)
            if resume_only_model:
                meta_path = Path(name)
                if (meta_path / ckpt.META_FILE).exists():
                    meta = ckpt.CheckpointMeta.read(meta_path)
                    return {
                        "cur_step": meta.cur_step,
                        "consumed_train_samples": meta.consumed_train_samples,
                        "gradient_accumulation_steps": meta.gradient_accumulation_steps,
                    }
            return {
                "cur_step": state.cur_step,
                "consumed_train_samples": state.consumed_train_samples,
                "gradient_accumulation_steps": state.gradient_accumulation_steps,
            }

    def upload_to_hub(
        self, checkpoint_dir: str, hub_model_id: str, hub_token: str | None = None, async_upload: bool = False
    ) -> str | None:
        from ..hub import upload_folder
        from ..uploads import LOCAL

        folder = ckpt.check_checkpoint_dir(checkpoint_dir)
        if async_upload:
            return LOCAL.start(None, folder, str(folder), hub_model_id, hub_token).upload_id
        upload_folder(folder, hub_model_id, token=hub_token)
        return None


T = TypeVar("T")


class Sampling:
    """A generation on a ``MultiLoraTransformersModel``, one ``step`` at a time (``Stepwise``):
    each step holds the model only while it decodes ``DECODE_STEPS_PER_TURN`` tokens, and
    looks its adapter up again (it may have been unloaded, or removed, in between)."""

    def __init__(self, model: MultiLoraTransformersModel, adapter: Callable[[], str | None],
                 work: generation.Generation) -> None:
        self._model, self._adapter, self._work = model, adapter, work

    def step(self) -> bool:
        """Decode the next few tokens; True when the generation is complete."""
        model = self._model
        with model.lock:
            peft_name = self._adapter()
            try:
                with model._attention_for_generation(), fused.only(peft_name or ""), torch.no_grad():
                    return self._work.advance(generation.DECODE_STEPS_PER_TURN)
            except torch.OutOfMemoryError:
                self._work.close()
                if model.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise CapacityError(
                    "sampling does not fit in device memory; use fewer prompts, num_samples or max_tokens"
                ) from None

    def result(self) -> list[SampleResponse]:
        return self._work.result()

    def close(self) -> None:
        self._work.close()


@dataclass
class _Part:
    """One call's micro-batch in a pass: its place in the caller's list, adapter, rows."""

    index: int
    state: AdapterState
    batch: dict[str, torch.Tensor]
    return_logits: bool = False


def _passes(parts: list[_Part]) -> list[list[_Part]]:
    """Parts in passes that hold each adapter once (two micro-batches of one adapter run in
    order: the first may end its accumulation window)."""
    passes: list[list[_Part]] = []
    for part in parts:
        for group in passes:
            if all(p.state is not part.state for p in group):
                group.append(part)
                break
        else:
            passes.append([part])
    # A later pass may only take an adapter's second call after its first: keep passes in order.
    return passes


def _one(results: list[T | Exception]) -> T:
    (result,) = results
    if isinstance(result, Exception):
        raise result
    return result


def _loss_of(part: _Part, logits: torch.Tensor, packed: fused.Packed, start: int, end: int) -> LossValue:
    """A part's loss on its tokens ``[start, end)`` of the pass, with the per-token inputs its
    own batch carries (``Loss.token_inputs``)."""
    loss = part.state.loss
    extra = {k: packed.extras[k][:, start:end] for k in loss.token_inputs if k in part.batch}
    return loss(logits[:, start:end], packed.labels[:, start:end], **extra)


def _row_logprobs(value: LossValue, rows: list[tuple[int, int]], start: int) -> list[list[float]] | None:
    """Each row's label log-probabilities (its tokens 1..n-1) out of a segment's, or None."""
    if value.logprobs is None:
        return None
    flat = value.logprobs.detach()[0].float().cpu()
    return [flat[offset - start:offset - start + n - 1].tolist() for offset, n in rows]


def _unpack_logits(logits: torch.Tensor, rows: list[tuple[int, int]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A part's logits in its batch's padded layout (padding positions hold 0: never computed)."""
    mask = batch["attention_mask"].bool()
    out = torch.zeros((*mask.shape, logits.shape[-1]), dtype=torch.float32)
    for r, (offset, n) in enumerate(rows):
        out[r, mask[r]] = logits[0, offset:offset + n].detach().float().cpu()
    return out


def _uses_conv1d(model: torch.nn.Module) -> bool:
    """Whether the model's projections are transformers ``Conv1D`` (GPT-2 style), which need fan_in_fan_out."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _spec_name(name_or_cls: Any) -> str:
    return name_or_cls if isinstance(name_or_cls, str) else getattr(name_or_cls, "__name__", str(name_or_cls))
