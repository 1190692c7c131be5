"""The data objects (datasets, dataloaders): how each is created and how its calls run.

Calls are bound against the declarations (``twinkle.protocol.api``), whose argument kinds
say what the server must vet (dataset ids, model ids). Data objects run on the data
threads; models on the device worker (``model_handle.ModelHandle``).

Sizes are checked before any work is queued: a model call's ``inputs`` may hold at most
``max_tokens_per_call`` padded tokens (``check_call_size``, read from the call as it
travelled, before decoding). Datasets made here transform rows in the data thread itself
(``Dataset.max_num_proc = 1``): a ``num_proc`` asked for never forks server processes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch

from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.errors import CapacityError, InvalidArgumentError, NotFoundError, StateError
from twinkle.hub import canonical_model_id
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol import codec
from twinkle.protocol.api import (
    API_BY_KIND,
    DATALOADER,
    DATASET,
    MODEL,
    NEXT_BATCHES,
    START_EPOCH,
    ApiClass,
    Arg,
    Method,
)
from twinkle.protocol.limits import MAX_BATCHES_PER_CALL, MAX_BODY_BYTES
from twinkle.protocol.names import REMOTE_SCHEMES, is_hub_repo

from .policy import check_dataset_id, check_remote_id
from .settings import Settings

KINDS = tuple(API_BY_KIND)
DEVICE_KINDS = ("model", "sampler")
"""Objects whose calls run on the device worker (the rest run on data threads)."""
SERVER_NUM_PROC = 1
"""Processes a remote dataset's map/filter/encode may use: the data thread's own (a larger
``num_proc`` is accepted and lowered to it; forks of the server would escape every limit)."""
# Model settings that belong to the server: a client may repeat them, not change them.
SERVER_SETTINGS = ("max_loras", "max_r", "device", "dtype")


def check_method(kind: str, method: str) -> None:
    """Refuse a method the object's declaration does not have (a dataloader's ``__iter__`` is
    replaced by its chunked epoch protocol)."""
    if kind == "dataloader" and method in (START_EPOCH, NEXT_BATCHES):
        return
    if kind == "dataloader" and method == "__iter__":
        raise InvalidArgumentError("DataLoader has no remote method '__iter__'")
    API_BY_KIND[kind].method(method)


def _bind(label: str, sig: inspect.Signature, args: list[Any], kwargs: dict[str, Any]) -> inspect.BoundArguments:
    """``args``/``kwargs`` bound to a declared signature (its first parameter is ``self``); only the
    given arguments are in ``arguments``."""
    try:
        return sig.bind(None, *args, **kwargs)
    except TypeError as exc:
        raise InvalidArgumentError(f"{label}: {exc}") from None


def _meta(value: Any) -> Any:
    """A dataset meta as sent by any client: a ``DatasetMeta``, its dict form, or an id."""
    if isinstance(value, dict):
        return DatasetMeta.from_dict(value)
    return value


def _check_meta(value: Any, settings: Settings) -> None:
    dataset_id = value.dataset_id if isinstance(value, DatasetMeta) else value
    check_dataset_id(dataset_id, allow_local=settings.allow_local_data)


# ----------------------------------------------------------------------------- creation


def create_dataset(settings: Settings, args: list[Any], kwargs: dict[str, Any]) -> Dataset:
    bound = _bind("Dataset()", DATASET.init, args, kwargs)
    meta = _meta(bound.arguments["dataset_meta"])
    _check_meta(meta, settings)
    dataset = Dataset(meta)
    dataset.max_num_proc = SERVER_NUM_PROC
    return dataset


def create_dataloader(args: list[Any], kwargs: dict[str, Any]) -> LoaderHandle:
    bound = _bind("DataLoader()", DATALOADER.init, args, kwargs)
    return LoaderHandle(DataLoader(*bound.args[1:], **bound.kwargs))


def check_model_kwargs(
    model: MultiLoraTransformersModel, served_dtype: str, args: list[Any], kwargs: dict[str, Any],
    *, allow_local: bool = False, api: ApiClass = MODEL,
) -> None:
    """A remote model is a view of the served one: refuse arguments that ask for something else.

    ``model_id`` must name the served model (left out means the served one); ``max_loras``,
    ``max_r``, ``device`` and ``dtype`` may only repeat the server's values; ``output_dir``
    is ignored (checkpoints go where the server keeps them).
    """
    a = _bind(f"{api.name}()", api.init, args, kwargs).arguments
    if "model_id" in a:
        given = a["model_id"]
        shown = _model_id_as_named(given, model.model_id, allow_local)
        if shown != model.model_id:
            raise InvalidArgumentError(f"this server serves {model.model_id}, not {shown[:200]}")
    served = {"max_loras": model.max_loras, "max_r": model.max_r, "device": str(model.device), "dtype": served_dtype}
    for name in SERVER_SETTINGS:
        if name not in a or a[name] is None:
            continue
        if not _same_setting(name, a[name], model, served_dtype):
            raise InvalidArgumentError(
                f"{name} is a server setting: this server runs with {name}={served[name]!r} (leave it out)"
            )


def _model_id_as_named(given: Any, served: str, allow_local: bool) -> str:
    """The canonical spelling of a client's ``model_id``, found without looking at the server's
    files unless ``allow_local``: the policy check comes first, so that the answer never tells
    whether a path exists here. A bare ``org/name`` means ``ms://org/name``, as in the library."""
    if not isinstance(given, str):
        return repr(given)
    if given == served:
        return served
    if not allow_local:
        if not given.startswith(REMOTE_SCHEMES) and is_hub_repo(given):
            return f"ms://{given}"
        check_remote_id(given, "model_id", allow_local=False)
    try:
        return canonical_model_id(given)
    except NotFoundError:
        return given


def _same_setting(name: str, value: Any, model: MultiLoraTransformersModel, served_dtype: str) -> bool:
    if name in ("max_loras", "max_r"):
        return value == getattr(model, name)
    if not isinstance(value, str):
        return False
    if name == "dtype":
        return value.removeprefix("torch.") == served_dtype
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return device.type == model.device.type and device.index in (None, model.device.index or 0)


# ------------------------------------------------------------------------------- sizes


def check_call_size(kind: str, method: str, args: list[Any], kwargs: dict[str, Any], settings: Settings,
                    vocab_size: int) -> int:
    """Refuse a model call whose ``inputs`` hold more than ``max_tokens_per_call`` padded tokens
    (rows x longest row, what the device computes on), or whose reply would carry more logits
    than one message may (``return_logits``: tokens x vocabulary), before it is queued.

    Reads the arguments as they travelled (packed arrays carry their shape), so nothing is
    decoded for a call that is refused; forms it does not recognise count as nothing (the
    model's input processor refuses them). Returns the padded token count (0 when none).
    """
    if kind not in DEVICE_KINDS:
        return 0
    try:
        a = API_BY_KIND[kind].method(method).signature.bind(None, *args, **kwargs).arguments
    except (InvalidArgumentError, TypeError):
        return 0  # reported by the call itself
    if "inputs" not in a:
        return 0
    most = settings.max_tokens_per_call
    chars = _text_size(a["inputs"])
    if chars > TEXT_CHARS_PER_TOKEN * most:
        # Text is tokenized on the device thread: refuse what cannot fit before it gets there.
        raise CapacityError(
            f"{method}: the inputs hold {chars} characters of text, more than one call may carry "
            f"({TEXT_CHARS_PER_TOKEN} x max_tokens_per_call={most}); send less text per call"
        )
    rows, length = _token_shape(a["inputs"])
    tokens = rows * length
    if tokens > most:
        raise CapacityError(
            f"{method}: the inputs hold {tokens} tokens ({rows} rows x {length}, padded), more than one "
            f"call may carry (max_tokens_per_call={most}, set by twinkle-server serve --max-tokens-per-call); "
            "send fewer or shorter rows per call"
        )
    if a.get("return_logits") is True and tokens * vocab_size * 4 > MAX_BODY_BYTES:
        raise CapacityError(
            f"{method}: the logits of {tokens} tokens over a vocabulary of {vocab_size} would be "
            f"{tokens * vocab_size * 4 >> 20} MiB, more than one reply may carry ({MAX_BODY_BYTES >> 20} MiB); "
            "send fewer rows per call with return_logits=True"
        )
    return tokens


TEXT_CHARS_PER_TOKEN = 8
"""Characters of text a call may carry per token of ``max_tokens_per_call``: more than any
tokenizer packs into one token, so text under the bound may still be refused once tokenized,
and text over it never fits."""


def _text_size(value: Any, depth: int = 0) -> int:
    """Characters in all strings of ``value`` (conversations to sample from)."""
    if isinstance(value, str):
        return len(value)
    if depth > 8:
        return 0
    if isinstance(value, dict):
        return sum(_text_size(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_text_size(v, depth + 1) for v in value)
    return 0


def _shape(value: Any) -> list[int] | None:
    """The shape of a packed array as sent, or None if ``value`` is not one (or is malformed)."""
    if not isinstance(value, dict) or codec.ND_KEY not in value:
        return None
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return None
    return shape


def _row_length(value: Any) -> int:
    """Tokens of one row: a packed array, a list, or one token."""
    shape = _shape(value)
    if shape is not None:
        return math.prod(shape)
    if isinstance(value, list | tuple):
        return len(value)
    return 1 if isinstance(value, int) else 0


def _token_shape(inputs: Any) -> tuple[int, int]:
    """``(rows, longest row)`` of a model call's ``inputs`` as sent: a list of samples (each
    with ``input_ids``/``labels``) or a collated dict of 2-D ``input_ids``/``labels``."""
    if isinstance(inputs, list | tuple):
        longest = 0
        for sample in inputs:
            if isinstance(sample, dict):
                longest = max(longest, *(_row_length(sample.get(k)) for k in ("input_ids", "labels")))
        return len(inputs), longest
    if not isinstance(inputs, dict):
        return 0, 0
    rows, longest = 0, 0
    for key in ("input_ids", "labels", "attention_mask"):
        value = inputs.get(key)
        shape = _shape(value)
        if shape is not None:
            r, n = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, math.prod(shape))
        elif isinstance(value, list | tuple):
            r, n = len(value), max((_row_length(v) for v in value), default=0)
            if value and all(isinstance(v, int) for v in value):
                r, n = 1, len(value)
        else:
            continue
        rows, longest = max(rows, r), max(longest, n)
    return rows, longest


# --------------------------------------------------------------------------------- calls


class LoaderHandle:
    """A remote ``DataLoader`` and the epoch iterator its client is reading."""

    class_name = "DataLoader"

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def start_epoch(self, consumed_train_samples: int) -> None:
        """Move to ``consumed_train_samples`` and start an iterator to the end of that epoch."""
        self.loader.resume_from_checkpoint(consumed_train_samples)
        self.iterator = iter(self.loader)

    def next_batches(self, max_batches: int) -> dict[str, Any]:
        """Up to ``max_batches`` batches of the current epoch; ``end`` once the epoch is exhausted.

        ``sizes`` gives each batch's sample count (the client counts yielded samples with it).
        """
        if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
            raise InvalidArgumentError(f"max_batches must be an int >= 1, got {max_batches!r}")
        if self.iterator is None:
            raise StateError(f"no epoch in progress: call {START_EPOCH}(consumed_train_samples) first")
        batches: list[Any] = []
        sizes: list[int] = []
        end = False
        per_epoch = self.loader.samples_per_epoch
        while len(batches) < min(max_batches, MAX_BATCHES_PER_CALL):
            before = self.loader.consumed_train_samples
            try:
                batches.append(next(self.iterator))
            except StopIteration:
                end = True
                break
            sizes.append(self.loader.consumed_train_samples - before)
            # The loader counts a batch before yielding it: at an epoch boundary the epoch is done,
            # which is known without pulling (and so counting) one more batch.
            if per_epoch == 0 or self.loader.consumed_train_samples % per_epoch == 0:
                end = True
                break
        if end:
            self.iterator = None
        return {"batches": batches, "sizes": sizes, "end": end}


def _vet(spec: Method, a: dict[str, Any], settings: Settings) -> None:
    """Check the arguments whose declared kind names something the server's policy governs."""
    for param, kind in spec.args.items():
        if kind is Arg.DATASET and a.get(param) is not None:
            a[param] = _meta(a[param])
            _check_meta(a[param], settings)
        elif kind is Arg.MODEL_ID:
            check_remote_id(a.get(param, {}).get("model_id"), "template model_id", allow_local=settings.allow_local_data)


def call_data_object(kind: str, instance: Any, method: str, args: list[Any], kwargs: dict[str, Any],
                     settings: Settings) -> Any:
    """Run one call on a dataset or dataloader (on a data thread)."""
    if kind == "dataloader":
        handle: LoaderHandle = instance
        if method in (START_EPOCH, NEXT_BATCHES):
            fn = handle.start_epoch if method == START_EPOCH else handle.next_batches
            try:
                bound = inspect.signature(fn).bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArgumentError(f"{method}(): {exc}") from None
            return fn(*bound.args, **bound.kwargs)
        target: Any = handle.loader
    else:
        target = instance
    spec = API_BY_KIND[kind].method(method)
    bound = _bind(f"{method}()", spec.signature, args, kwargs)
    _vet(spec, bound.arguments, settings)
    return getattr(target, spec.name)(*bound.args[1:], **bound.kwargs)
