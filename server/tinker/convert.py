"""Tinker requests as the arguments of the library's calls, and the library's results as Tinker
replies. Every value here comes from the network: each is checked (type, range, size) and a bad
one is an ``InvalidArgumentError`` naming the field.

The mappings (documented in the README):

- a ``Datum`` of N input tokens and N targets becomes one sample of N + 1 tokens,
  ``input_ids = model_input + [target_tokens[-1]]`` and ``labels = [-100] + target_tokens``:
  the library's next-token shift then pairs input position i with target i, and the last
  token's own prediction is never used. Per-token inputs get a leading 0 the same way.
- ``cross_entropy`` -> ``WeightedCrossEntropyLoss`` (``weights``), ``importance_sampling`` ->
  ``ImportanceSamplingLoss``, ``ppo`` -> ``PPOLoss``, ``cispo`` -> ``CISPOLoss`` (``advantages``,
  ``logprobs`` as ``sampling_logprobs``; ``clip_low_threshold``/``clip_high_threshold``).
- a LoRA config -> ``LoraConfig(r=rank, lora_alpha=32, lora_dropout=0, target_modules=...)``
  (``train_attn``: q/k/v/o projections, ``train_mlp``: gate/up/down, ``train_unembed``: lm_head).
- ``AdamParams`` -> ``torch.optim.AdamW(lr, betas=(beta1, beta2), eps, weight_decay)``;
  ``grad_clip_norm > 0`` -> ``clip_grad_norm(grad_clip_norm)`` before the step.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from twinkle.errors import CapacityError, InvalidArgumentError, NotFoundError
from twinkle.protocol.names import (
    TINKER_SCHEME,
    TWINKLE_SCHEME,
    shown,
    split_tinker_path,
    split_twinkle_path,
    twinkle_path,
)

from . import schema

LORA_ALPHA = 32
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
IGNORE = -100
MAX_SEED = 2**63 - 1

LOSSES: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
    # Tinker loss: (library loss, Tinker input -> sample key, loss_fn_config keys)
    "cross_entropy": ("WeightedCrossEntropyLoss", {"weights": "weights"}, ()),
    "importance_sampling": ("ImportanceSamplingLoss", {"advantages": "advantages", "logprobs": "sampling_logprobs"}, ()),
    "ppo": ("PPOLoss", {"advantages": "advantages", "logprobs": "sampling_logprobs"},
            ("clip_low_threshold", "clip_high_threshold")),
    "cispo": ("CISPOLoss", {"advantages": "advantages", "logprobs": "sampling_logprobs"},
              ("clip_low_threshold", "clip_high_threshold")),
}
UNSUPPORTED_LOSSES = ("dro", "gspo", "stable_reinforce", "custom")


def number(value: Any, what: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within bounds, or an error naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{what} must be a finite number, got {shown(value, 60)}")
    if low is not None and (value < low or (low_open and value == low)):
        raise InvalidArgumentError(f"{what} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise InvalidArgumentError(f"{what} must be {'<' if high_open else '<='} {high}, got {value}")
    return float(value)


def integer(value: Any, what: str, *, low: int = 0, high: int = 2**53 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{what} must be an integer from {low} to {high}, got {shown(value, 60)}")
    return value


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be true or false, got {shown(value, 60)}")
    return value


def text(value: Any, what: str, most: int = 1000) -> str:
    if not isinstance(value, str) or not value or len(value) > most:
        raise InvalidArgumentError(f"{what} must be a non-empty string of at most {most} characters")
    return value


# ------------------------------------------------------------------------------ LoRA, Adam


def lora_config(value: Any, max_r: int) -> tuple[dict[str, Any], int | None]:
    """``(LoraConfig fields, seed or None)`` of a Tinker ``lora_config``."""
    if value is None:
        value = {"rank": 32}
    if not isinstance(value, dict):
        raise InvalidArgumentError("lora_config must be an object")
    unknown = set(value) - {"rank", "seed", "train_unembed", "train_mlp", "train_attn"}
    if unknown:
        raise InvalidArgumentError(f"lora_config has unknown fields: {', '.join(sorted(unknown))}")
    rank = integer(value.get("rank"), "lora_config.rank", low=1, high=max_r)
    seed = value.get("seed")
    if seed is not None:
        seed = integer(seed, "lora_config.seed", high=MAX_SEED)
    modules: list[str] = []
    for key, names in (("train_attn", ATTENTION_MODULES), ("train_mlp", MLP_MODULES),
                       ("train_unembed", UNEMBED_MODULES)):
        if flag(value.get(key, True), f"lora_config.{key}"):
            modules.extend(names)
    if not modules:
        raise InvalidArgumentError("lora_config: at least one of train_mlp, train_attn or train_unembed must be true")
    return {"r": rank, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": modules}, seed


ADAM_DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                 "grad_clip_norm": 0.0}


def adam_params(body: dict[str, Any]) -> dict[str, float]:
    """The ``AdamParams`` of an ``optim_step`` body, checked (defaults for the fields left out)."""
    params = body.get("adam_params")
    if params is None:
        other = body.get("optimizer_params") or body.get("optim_params")
        kind = other.get("type") if isinstance(other, dict) else None
        if kind is not None and kind != "adamw":
            raise InvalidArgumentError(f"optimizer {shown(kind, 40)} is not supported here: only Adam (AdamParams)")
        params = other
    if not isinstance(params, dict):
        raise InvalidArgumentError("optim_step needs adam_params")
    unknown = set(params) - set(ADAM_DEFAULTS) - {"type"}
    if unknown:
        raise InvalidArgumentError(f"adam_params has unknown fields: {', '.join(sorted(unknown))}")
    p = {**ADAM_DEFAULTS, **{k: v for k, v in params.items() if k != "type"}}
    return {
        "learning_rate": number(p["learning_rate"], "adam_params.learning_rate", low=0.0, high=1e3),
        "beta1": number(p["beta1"], "adam_params.beta1", low=0.0, high=1.0, high_open=True),
        "beta2": number(p["beta2"], "adam_params.beta2", low=0.0, high=1.0, high_open=True),
        "eps": number(p["eps"], "adam_params.eps", low=0.0, high=1.0),
        "weight_decay": number(p["weight_decay"], "adam_params.weight_decay", low=0.0, high=1e3),
        "grad_clip_norm": number(p["grad_clip_norm"], "adam_params.grad_clip_norm", low=0.0, high=1e9),
    }


def adamw_kwargs(params: dict[str, float]) -> dict[str, Any]:
    """``set_optimizer('AdamW', **kwargs)`` for ``params``."""
    return {"lr": params["learning_rate"], "betas": (params["beta1"], params["beta2"]), "eps": params["eps"],
            "weight_decay": params["weight_decay"]}


# -------------------------------------------------------------------------- paths


def checkpoint_path(value: Any, what: str = "path") -> str:
    """The ``twinkle://`` path of a checkpoint named by a ``tinker://`` (or ``twinkle://``) path;
    a malformed one of either scheme names nothing (``NotFoundError``)."""
    if not isinstance(value, str) or not value.startswith((TINKER_SCHEME, TWINKLE_SCHEME)):
        raise InvalidArgumentError(f"{what} must be a tinker:// path, got {shown(value, 100)}")
    parts = split_tinker_path(value) if value.startswith(TINKER_SCHEME) else split_twinkle_path(value)
    if parts is None:
        raise NotFoundError(f"no checkpoint {shown(value, 200)}")
    return twinkle_path(*parts)


# --------------------------------------------------------------------- forward_backward


def _tensor(msg: Any, what: str, n: int) -> np.ndarray:
    """A 1-D tensor of ``n`` values from a ``tinker_public.Tensor``."""
    dtype = {schema.DTYPE_FLOAT32: np.float32, schema.DTYPE_INT64: np.int64, schema.DTYPE_INT32: np.int32}.get(msg.dtype)
    if dtype is None:
        raise InvalidArgumentError(f"{what}: dtype {msg.dtype} is not supported (float32 or int64)")
    shape = list(msg.shape)
    if msg.WhichOneof("encoding") == "sparse_csr":
        raise InvalidArgumentError(f"{what}: sparse tensors are not supported here; send a dense 1-D tensor")
    data = msg.dense
    if len(data) % np.dtype(dtype).itemsize:
        raise InvalidArgumentError(f"{what}: {len(data)} bytes is not a whole number of {np.dtype(dtype).name} values")
    arr = np.frombuffer(data, dtype=dtype)
    if shape and (len(shape) != 1 or shape[0] != arr.size):
        raise InvalidArgumentError(f"{what}: shape {shape} does not match its {arr.size} values (1-D tensors only)")
    if arr.size != n:
        raise InvalidArgumentError(f"{what} has {arr.size} values but model_input has {n} tokens")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{what} must be finite numbers")
    return arr


def token_counts(request: Any) -> list[int]:
    """The number of input tokens of each datum of a ``ForwardBackwardRequest``, read from the
    chunks' byte lengths (nothing is decoded): what a request costs is known before it is built."""
    if not request.data:
        raise InvalidArgumentError("forward_backward: data is empty")
    counts = []
    for i, datum in enumerate(request.data):
        n = 0
        for chunk in datum.model_input:
            kind = chunk.WhichOneof("chunk")
            if kind != "encoded_text":
                raise InvalidArgumentError(f"data[{i}]: model_input chunks of kind {kind or 'unknown'} are not "
                                           "supported (token chunks only)")
            size = len(chunk.encoded_text.tokens)
            if size % 4:
                raise InvalidArgumentError(f"data[{i}]: encoded tokens are not whole int32 values")
            n += size // 4
        if not n:
            raise InvalidArgumentError(f"data[{i}]: model_input has no tokens")
        counts.append(n)
    return counts


def _tokens(datum: Any, where: str) -> np.ndarray:
    tokens = np.concatenate([np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32)
                             for chunk in datum.model_input])
    if tokens.min() < 0:
        raise InvalidArgumentError(f"{where}: token ids must be >= 0")
    return tokens


def loss_of(loss_fn: Any, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(library loss name, its keyword arguments)`` of a Tinker ``loss_fn`` and ``loss_fn_config``."""
    if loss_fn in UNSUPPORTED_LOSSES:
        raise InvalidArgumentError(f"loss_fn {loss_fn!r} is not supported by this server; supported: "
                                   f"{', '.join(LOSSES)}")
    if not isinstance(loss_fn, str) or loss_fn not in LOSSES:
        raise InvalidArgumentError(f"unknown loss_fn {shown(loss_fn, 60)}; supported: {', '.join(LOSSES)}")
    name, _, keys = LOSSES[loss_fn]
    unknown = set(config) - set(keys)
    if unknown:
        raise InvalidArgumentError(f"loss_fn_config for {loss_fn} takes {', '.join(keys) or 'nothing'}; "
                                   f"got {', '.join(sorted(unknown))[:200]}")
    return name, {k: number(v, f"loss_fn_config.{k}") for k, v in config.items()}


def loss_config(request: Any) -> dict[str, Any]:
    """The ``loss_fn_config`` of a ``ForwardBackwardRequest`` (the v2 map wins, as the SDK asks)."""
    if request.loss_fn_config_v2:
        out: dict[str, Any] = {}
        for key, value in request.loss_fn_config_v2.items():
            out[key] = value.number if value.WhichOneof("value") == "number" else value.text
        return out
    return dict(request.loss_fn_config)


def samples(request: Any, loss_fn: str, vocab_size: int, max_tokens: int,
            method: str = "forward_backward") -> tuple[list[dict[str, Any]], int, int]:
    """``(library samples, padded tokens, tokens held)`` of a ``ForwardBackwardRequest``'s data
    (see the module doc). A request of more than ``max_tokens`` padded tokens (rows x longest
    row, as ``check_call_size`` counts a native call) is refused before any sample is built.
    The samples hold tensors (int64 ids, float32 per-token inputs), as a native call's packed
    arrays arrive, not Python lists."""
    _, inputs, _ = LOSSES[loss_fn]
    counts = token_counts(request)
    rows, length = len(counts), max(counts) + 1
    if rows * length > max_tokens:
        raise CapacityError(
            f"{method}: the data hold {rows * length} tokens ({rows} datums x {length}, padded, one more than the "
            f"longest model_input), more than one request may carry (max_tokens_per_call={max_tokens}); send "
            "fewer or shorter datums per request (the SDK splits its data by the server's client config: "
            "datums of very different lengths may still exceed it)"
        )
    out = []
    for i, datum in enumerate(request.data):
        where = f"data[{i}]"
        tokens = _tokens(datum, where)
        n = tokens.size
        given = dict(datum.loss_fn_inputs)
        unknown = set(given) - set(inputs) - {"target_tokens"}
        if unknown:
            raise InvalidArgumentError(f"{where}: loss_fn_inputs {', '.join(sorted(unknown))[:200]} are not used by "
                                       f"{loss_fn} (it takes target_tokens, {', '.join(inputs)})")
        needed = ["target_tokens"] + ([] if loss_fn == "cross_entropy" else list(inputs))
        missing = [k for k in needed if k not in given]
        if missing:
            raise InvalidArgumentError(f"{where}: {loss_fn} needs loss_fn_inputs {', '.join(missing)}")
        targets = _tensor(given["target_tokens"], f"{where}.target_tokens", n)
        if targets.dtype.kind != "i":
            raise InvalidArgumentError(f"{where}.target_tokens must be integers")
        if targets.min() < 0 or targets.max() >= vocab_size:
            raise InvalidArgumentError(f"{where}.target_tokens must be token ids from 0 to {vocab_size - 1}")
        ids = np.empty(n + 1, dtype=np.int64)
        ids[:n], ids[n] = tokens, targets[-1]
        labels = np.empty(n + 1, dtype=np.int64)
        labels[0], labels[1:] = IGNORE, targets
        sample: dict[str, Any] = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        for key, name in inputs.items():
            if key in given:
                values = _tensor(given[key], f"{where}.{key}", n)
                if values.dtype.kind != "f":
                    raise InvalidArgumentError(f"{where}.{key} must be float32")
                row = np.zeros(n + 1, dtype=np.float32)
                row[1:] = values
                sample[name] = torch.from_numpy(row)
        out.append(sample)
    return out, rows * length, sum(counts) + rows


def forward_backward_output(value: Any) -> Any:
    """A library ``ForwardBackwardOutput``/``ForwardOutput`` as a ``tinker_public.ForwardBackwardOutput``:
    each datum's ``logprobs`` (one per target) and ``loss:sum``."""
    msg = schema.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    msg.metrics["loss:sum"] = float(value.loss or 0.0)
    rows = value.logprobs or []
    record = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(rows))
    arrays = [np.asarray(r, dtype=np.float32) for r in rows]
    field = record.fields["logprobs"]
    field.dtype = schema.DTYPE_FLOAT32
    field.data = b"".join(a.tobytes() for a in arrays)
    field.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64).tobytes()
    return msg


def forward_backward_json(body: bytes) -> dict[str, Any]:
    """The JSON form of a serialized ``forward_backward_output`` (for a client that did not ask
    for protobuf; built when asked, from the one form a result is kept in)."""
    msg = schema.ForwardBackwardOutput()
    msg.ParseFromString(body)
    rows: list[list[float]] = []
    for record in msg.loss_fn_outputs:
        field = record.fields["logprobs"]
        data = np.frombuffer(field.data, dtype=np.float32)
        offsets = np.frombuffer(field.offsets, dtype=np.int64) // 4
        rows.extend(data[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    return {
        "loss_fn_output_type": msg.loss_fn_output_type,
        "loss_fn_outputs": [{"logprobs": {"data": row, "dtype": "float32", "shape": [len(row)]}} for row in rows],
        "metrics": dict(msg.metrics),
    }


# ------------------------------------------------------------------------------ sampling


def prompt_tokens(prompt: Any, vocab_size: int, max_tokens: int) -> list[int]:
    """The token ids of a sampling prompt: at most ``max_tokens`` (the server's
    ``max_tokens_per_call``, which also bounds prompt + completion), counted before any is read."""
    if not isinstance(prompt, dict) or not isinstance(prompt.get("chunks"), list):
        raise InvalidArgumentError("prompt must be {chunks: [...]}")
    chunks = prompt["chunks"]
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidArgumentError(f"prompt.chunks[{i}]: only encoded_text chunks are supported")
        if not isinstance(chunk.get("tokens"), list):
            raise InvalidArgumentError(f"prompt.chunks[{i}].tokens must be a list of token ids")
    count = sum(len(chunk["tokens"]) for chunk in chunks)
    if count > max_tokens:
        raise CapacityError(f"prompt has {count} tokens, more than one sampling call may compute here "
                            f"(max_tokens_per_call={max_tokens}, prompt and completion together)")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        for t in chunk["tokens"]:
            tokens.append(integer(t, f"prompt.chunks[{i}].tokens", high=vocab_size - 1))
    if not tokens:
        raise InvalidArgumentError("prompt has no tokens")
    return tokens


def sampling_params(value: Any) -> dict[str, Any]:
    """The library's ``SamplingParams`` fields of Tinker ``sampling_params`` (the library checks
    the ranges)."""
    if not isinstance(value, dict):
        raise InvalidArgumentError("sampling_params must be an object")
    unknown = set(value) - {"max_tokens", "seed", "stop", "temperature", "top_k", "top_p"}
    if unknown:
        raise InvalidArgumentError(f"sampling_params has unknown fields: {', '.join(sorted(unknown))[:200]}")
    out: dict[str, Any] = {}
    if value.get("max_tokens") is not None:
        out["max_tokens"] = value["max_tokens"]
    if value.get("seed") is not None:
        out["seed"] = value["seed"]
    if "temperature" in value:
        out["temperature"] = value["temperature"]
    if "top_p" in value:
        out["top_p"] = value["top_p"]
    top_k = value.get("top_k", -1)
    out["top_k"] = 0 if top_k == -1 else top_k
    stop = value.get("stop")
    if stop is not None:
        out["stop"] = stop
    return out


def sample_response(responses: list[Any]) -> Any:
    """The library's ``SampleResponse`` of one prompt as a ``tinker_public.SampleResponse``."""
    msg = schema.SampleResponse()
    for response in responses:
        for seq in response.sequences:
            out = msg.sequences.add()
            out.tokens = np.asarray(seq.tokens, dtype=np.int32).tobytes()
            out.logprobs = np.asarray(seq.logprobs, dtype=np.float32).tobytes()
            out.stop_reason = schema.STOP_REASON_LENGTH if seq.stop_reason == "length" else schema.STOP_REASON_STOP
    return msg


def sample_json(body: bytes) -> dict[str, Any]:
    """The JSON form of a serialized ``sample_response`` (built when asked, as for
    ``forward_backward_json``)."""
    msg = schema.SampleResponse()
    msg.ParseFromString(body)
    return {"type": "sample", "sequences": [
        {"tokens": np.frombuffer(seq.tokens, dtype=np.int32).tolist(),
         "logprobs": np.frombuffer(seq.logprobs, dtype=np.float32).tolist(),
         "stop_reason": "length" if seq.stop_reason == schema.STOP_REASON_LENGTH else "stop"}
        for seq in msg.sequences
    ]}


PROTO_AS_JSON = {"ForwardBackwardOutput": forward_backward_json, "SampleResponse": sample_json}
"""The JSON form of each protobuf result, by message name."""


# ------------------------------------------------------------------------------ JSON


def finite(value: Any) -> Any:
    """``value`` with every non-finite float spelled ``"nan"``, ``"inf"`` or ``"-inf"``.

    JSON has no such numbers (and the SDK parses with orjson, which refuses the ``NaN`` and
    ``Infinity`` that Python's ``json`` would write), while a Tinker metric is a float that may
    well be one (a gradient norm of inf). The SDK's pydantic float fields read these strings
    back as the float they name, so a metric keeps its value instead of failing the result
    (``server.wire.jsonable``'s ``None`` would fail it: metrics are ``Dict[str, float]``)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """``value`` as JSON that never fails to encode (see ``finite``)."""
    return json.dumps(finite(value), separators=(",", ":"), allow_nan=False).encode()
