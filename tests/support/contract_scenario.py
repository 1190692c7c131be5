"""One training scenario, written once against the declared API, and how to compare its values.

``run_scenario(classes, ...)`` builds a dataset, a dataloader and a model from ``classes``
(the local library's or ``twinkle_client``'s), trains, checkpoints, reloads, resumes and
trains on, and records every value a declared method returned (``Record``), each batch the
dataloader yielded included. Calls go through ``Traced`` proxies, so nothing is left out:
``None`` returns and the lazy values of deferred remote calls are recorded too (resolved at
the end with ``result()``).

``compare(local, remote)`` lists the differences between two records, deciding how to compare
each value from the method's declaration (``twinkle.protocol.api``: ``Method.returns``), not
from its name. ``missing_methods(record)`` lists declared methods the scenario never called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.protocol.api import DATALOADER, DATASET, MODEL, SAMPLER, ApiClass, Returns
from twinkle.protocol.names import TWINKLE_SCHEME, split_twinkle_path

MODEL_ID = "builtin://tiny-qwen2"
DATASET_ID = "builtin://self-cognition"
BUILTIN_ROWS = 24
EXTRA_ROWS = range(24, 32)
"""Rows of the built-in dataset copied into a local file, loaded with ``add_dataset``."""
REL_TOL = 1e-5
APIS: tuple[ApiClass, ...] = (MODEL, DATASET, DATALOADER, SAMPLER)

NOT_IN_SCENARIO: dict[tuple[str, str], str] = {
    ("model", "upload_to_hub"): "needs a model hub and a token of it",
}
"""Declared methods the scenario leaves out, with the reason."""


# ----------------------------------------------------------------------------- recording


@dataclass
class Entry:
    """One value returned by a declared method."""

    kind: str
    method: str
    index: int
    """How many calls of ``kind.method`` came before this one in the scenario."""
    value: Any
    call: str
    """The call, spelled for messages."""
    lazy: bool = False
    """The call returned a lazy value (a deferred remote call), resolved by ``Record.resolve``."""

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.method}#{self.index}"


@dataclass
class Record:
    """Every value a scenario run got back, in call order."""

    entries: list[Entry] = field(default_factory=list)
    _counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, kind: str, method: str, value: Any, call: str) -> Any:
        from twinkle_client.lazy import Lazy

        n = self._counts.get((kind, method), 0)
        self._counts[(kind, method)] = n + 1
        self.entries.append(Entry(kind, method, n, value, call, isinstance(value, Lazy)))
        return value

    def resolve(self) -> None:
        """Replace lazy values (deferred remote calls) by what they resolve to; a failed call's
        by ``Failed`` (the scenario has raised its error already, or will at its next call)."""
        from twinkle_client.lazy import Lazy

        for entry in self.entries:
            if isinstance(entry.value, Lazy):
                try:
                    entry.value = entry.value.result()
                except Exception as exc:
                    entry.value = Failed(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Failed:
    """Stands for the value of a deferred call that failed."""

    error: str


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Traced:
    """Proxy for a dataset, dataloader or model: every declared method it calls is recorded."""

    def __init__(self, obj: Any, api: ApiClass, record: Record) -> None:
        self.obj = obj
        self.api = api
        self.record = record

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        shown = ", ".join([*(_short(a) for a in args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
        value = getattr(self.obj, method)(*args, **kwargs)
        return self.record.add(self.api.kind, method, value, f"{self.api.name}.{method}({shown})")

    def __getattr__(self, name: str) -> Callable[..., Any]:
        api = self.__dict__.get("api")
        if api is None or name not in api.methods:
            raise AttributeError(f"the scenario calls declared methods only; {name!r} is not one")
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    def __len__(self) -> int:
        return self._call("__len__")

    def __getitem__(self, idx: int) -> Any:
        return self._call("__getitem__", idx)

    def __iter__(self) -> Iterator[Any]:
        """Each batch is a value of ``__iter__`` (the call that yields it)."""
        kind, name = self.api.kind, self.api.name
        for batch in self.obj:
            yield self.record.add(kind, "__iter__", batch, f"{name}.__iter__() batch")


def first(loader: Traced, n: int) -> list[Any]:
    """The next ``n`` batches of ``loader``, leaving the loop early (as a training loop may)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------- the scenario


@dataclass
class Classes:
    """The classes a scenario run uses: the local library's or the remote client's."""

    Dataset: Any
    DataLoader: Any
    Model: Any
    Sampler: Any
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments the model takes on this side only (the local ``output_dir``: a
    server chooses where checkpoints go)."""


def write_extra_data(folder: Path) -> Path:
    """A local JSONL file with rows of the built-in dataset (the second dataset of the scenario)."""
    source = resources.files("twinkle.builtin").joinpath("data", "self_cognition.jsonl")
    lines = source.read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "extra.jsonl"
    rows = [json.loads(lines[i]) for i in EXTRA_ROWS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train(model: Traced, batches: list[Any], *, fused: bool = False) -> None:
    for batch in batches:
        model.forward_backward(inputs=batch)
        if fused:
            model.clip_grad_and_step(1.0)
        else:
            model.clip_grad_norm(1.0)
            model.step()
            model.zero_grad()
            model.lr_step()


def run_scenario(classes: Classes, extra_data: Path) -> tuple[Record, list[Any]]:
    """Run the scenario; returns its record and the objects it created (remote ones need
    closing). An exception leaves the record as far as it got in ``exc.record``."""
    from peft import LoraConfig

    from twinkle.protocol.dataset_meta import DatasetMeta

    record = Record()
    objects: list[Any] = []

    def make(cls: Any, api: ApiClass, *args: Any, **kwargs: Any) -> Traced:
        obj = cls(*args, **kwargs)
        objects.append(obj)
        return Traced(obj, api, record)

    try:
        _scenario(classes, extra_data, make, LoraConfig, DatasetMeta)
        record.resolve()
        failed = [f"{e.label}: {e.value.error}" for e in record.entries if isinstance(e.value, Failed)]
        if failed:
            raise RuntimeError(f"deferred calls failed: {'; '.join(failed)}")
    except BaseException as exc:
        record.resolve()
        exc.record = record  # type: ignore[attr-defined]
        exc.objects = objects  # type: ignore[attr-defined]
        raise
    return record, objects


def _scenario(classes: Classes, extra_data: Path, make: Callable[..., Traced], LoraConfig: Any,
              DatasetMeta: Any) -> None:
    # --- data: two datasets mixed, filtered, templated, preprocessed, encoded
    ds = make(classes.Dataset, DATASET, DatasetMeta(DATASET_ID, data_slice=range(BUILTIN_ROWS)))
    ds.add_dataset(DatasetMeta(str(extra_data)))
    ds.mix_dataset(interleave=True)
    ds.filter("LanguageFilter", init_args={"lang": "en"})
    ds.set_template("Template", model_id=MODEL_ID, max_length=256)
    ds.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "us"})
    ds.encode()
    len(ds)
    ds[0]
    ds[-1]

    loader = make(classes.DataLoader, DATALOADER, ds.obj, batch_size=4, shuffle=True, seed=7)
    len(loader)
    loader.get_state()

    # --- model: one adapter with every component set
    model = make(classes.Model, MODEL, MODEL_ID, device="cpu", dtype="float32", **classes.model_kwargs)
    model.add_adapter_to_model("default", LoraConfig(r=4, target_modules="all-linear"),
                               gradient_accumulation_steps=2)
    model.set_template("Template", model_id=MODEL_ID, max_length=256)
    model.set_processor("InputProcessor", padding_side="right")
    model.set_loss("CrossEntropyLoss")
    model.set_optimizer("AdamW", lr=1e-3)
    model.set_lr_scheduler("LinearLR")

    # --- train an epoch (2 optimizer steps of 2 micro-batches), then checkpoint
    epoch = [batch for batch in loader]  # noqa: C416 (list() would call len() too)
    train(model, epoch)
    model.get_train_state()
    saved_position = loader.get_state()
    checkpoint = model.save("ck", save_optimizer=True)
    model.forward_only(epoch[0])
    model.forward_only(epoch[1], return_logits=True)

    # --- sampling: the adapter as it trains, then its checkpoint and the base on a sampler
    question = [{"role": "user", "content": "who are you?"}]
    model.sample(question, {"max_tokens": 8, "temperature": 0})
    model.sample([question, [5, 6, 7]], {"max_tokens": 6, "temperature": 0.9, "seed": 5, "prompt_logprobs": True},
                 num_samples=2)
    sampler = make(classes.Sampler, SAMPLER, MODEL_ID, device="cpu", dtype="float32")
    sampler.set_template("Template", model_id=MODEL_ID, max_length=256)
    sampler.add_adapter_to_sampler("ck", checkpoint)
    sampler.sample(question, {"max_tokens": 8, "temperature": 0}, adapter_name="ck")
    sampler.sample(question, {"max_tokens": 8, "temperature": 0, "stop": ["a"]}, adapter_uri=checkpoint)
    sampler.sample([question, [5, 6, 7]], {"max_tokens": 6, "temperature": 1.0, "seed": 3}, num_samples=2)

    # --- train on into the next epoch with the fused step
    train(model, first(loader, 2), fused=True)
    model.get_train_state()
    loader.get_state()

    # --- back to the checkpoint: weights and training state, then a resume
    model.load(checkpoint, load_optimizer=True)
    model.get_train_state()
    resumed = model.resume_from_checkpoint(checkpoint)
    loader.resume_from_checkpoint(resumed["consumed_train_samples"])
    loader.get_state()
    train(model, first(loader, 3))
    model.get_train_state()
    loader.skip_consumed_samples(saved_position["consumed_train_samples"] + 2 * 4)
    train(model, first(loader, 1))
    model.get_train_state()
    loader.get_state()

    # --- a second dataloader that collates batches into tensors itself
    collating = make(classes.DataLoader, DATALOADER, ds.obj, batch_size=2)
    collating.set_processor("InputProcessor", padding_side="right")
    len(collating)
    model.forward_only(first(collating, 1)[0])
    collating.get_state()

    model.remove_adapter("default")


# ----------------------------------------------------------------------------- checks


def missing_methods(record: Record) -> list[str]:
    """Declared methods (``MODEL``, ``DATASET``, ``DATALOADER``) the record has no value of,
    apart from ``NOT_IN_SCENARIO``; also exclusions that name no declared method."""
    called = {(e.kind, e.method) for e in record.entries}
    declared = {(api.kind, name) for api in APIS for name in api.methods}
    problems = [f"{kind}.{name} is declared but not in the scenario"
                for kind, name in sorted(declared - called - set(NOT_IN_SCENARIO))]
    problems += [f"{kind}.{name} is excluded from the scenario but not declared"
                 for kind, name in sorted(set(NOT_IN_SCENARIO) - declared)]
    return problems


def check_laziness(record: Record, *, remote: bool, side: str) -> list[str]:
    """A deferred method returns a lazy value remotely (at once), every other call its value."""
    problems = []
    for entry in record.entries:
        deferred = remote and entry.method != "__iter__" and _api(entry.kind).methods[entry.method].deferred
        if entry.lazy != deferred:
            problems.append(f"{side}: {entry.label} {entry.call}: returned {'a' if entry.lazy else 'no'} lazy value "
                            f"(declared deferred: {_api(entry.kind).methods[entry.method].deferred})")
    return problems


def _api(kind: str) -> ApiClass:
    return next(api for api in APIS if api.kind == kind)


def compare(local: Record, remote: Record, side: str) -> list[str]:
    """Differences between the local record and a remote one, entry by entry."""
    problems = []
    for i, (a, b) in enumerate(zip(local.entries, remote.entries, strict=False)):
        if a.label != b.label:
            problems.append(f"{side}: call {i} is {b.label} remotely but {a.label} locally; stopped comparing")
            return problems
        for problem in compare_value(_api(a.kind).methods[a.method].returns, a.value, b.value):
            problems.append(f"{side}: {a.label} {a.call}: {problem}")
    if len(local.entries) != len(remote.entries):
        problems.append(f"{side}: {len(remote.entries)} values remotely, {len(local.entries)} locally")
    return problems


def compare_value(returns: Returns, local: Any, remote: Any) -> list[str]:
    """How ``returns`` says to compare a method's local and remote value."""
    if returns is Returns.VALUE:
        return same(local, remote)
    if returns is Returns.CHECKPOINT:
        # The checkpoint's folder locally, its twinkle://<run>/weights/<name> path remotely.
        problems = []
        if not isinstance(local, str) or not Path(local).is_dir():
            problems.append(f"local checkpoint {local!r} is not a folder")
        parsed = split_twinkle_path(remote)
        if parsed is None:
            return [*problems, f"remote checkpoint {remote!r} is not a {TWINKLE_SCHEME}<run>/weights/<name> path"]
        if isinstance(local, str) and Path(local).name != parsed[1]:
            problems.append(f"checkpoint names differ: {Path(local).name!r} locally, {parsed[1]!r} remotely")
        return problems
    if returns is Returns.UPLOAD_ID:
        if (local is None) != (remote is None) or not isinstance(remote, str | type(None)):
            return [f"upload id {local!r} locally, {remote!r} remotely"]
        return []
    return [f"no comparison rule for {returns!r}: teach compare_value() how its values relate"]


def same(a: Any, b: Any, path: str = "value") -> list[str]:
    """``a`` (local) and ``b`` (remote) are the same value: floats to ``REL_TOL`` relative,
    everything else exactly; containers and pydantic models element by element."""
    import torch
    from pydantic import BaseModel

    if isinstance(a, bool) or a is None or isinstance(a, str | bytes):
        return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} locally, {b!r} remotely"]
    if isinstance(a, int):
        return [] if type(b) is int and a == b else [f"{path}: {a!r} locally, {b!r} remotely"]
    if isinstance(a, float):
        if not isinstance(b, float):
            return [f"{path}: {a!r} locally, {b!r} ({type(b).__name__}) remotely"]
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12) else [f"{path}: {a!r} locally, {b!r} remotely"]
    if isinstance(a, BaseModel):
        if type(a) is not type(b):
            return [f"{path}: {type(a).__name__} locally, {type(b).__name__} remotely"]
        return [p for name in type(a).model_fields for p in same(getattr(a, name), getattr(b, name), f"{path}.{name}")]
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return [f"{path}: a dict locally, {type(b).__name__} remotely"]
        if set(a) != set(b):
            return [f"{path}: keys {sorted(a)} locally, {sorted(b)} remotely"]
        return [p for key in a for p in same(a[key], b[key], f"{path}[{key!r}]")]
    if isinstance(a, list | tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path}: {type(a).__name__} of {len(a)} locally, {_short(b)} remotely"]
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in same(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor | np.ndarray):
        if type(a) is not type(b):
            return [f"{path}: {type(a).__name__} locally, {type(b).__name__} remotely"]
        x, y = (np.asarray(v.detach().cpu()) if isinstance(v, torch.Tensor) else v for v in (a, b))
        if x.dtype != y.dtype or x.shape != y.shape:
            return [f"{path}: {x.dtype}{list(x.shape)} locally, {y.dtype}{list(y.shape)} remotely"]
        if np.issubdtype(x.dtype, np.floating):
            scale = float(np.abs(x).max()) if x.size else 0.0
            ok = np.allclose(x, y, rtol=REL_TOL, atol=REL_TOL * scale)
        else:
            ok = np.array_equal(x, y)
        return [] if ok else [f"{path}: tensors differ (max |diff| {float(np.abs(x - y).max()):.3g})"]
    return [] if type(a) is type(b) and a == b else [f"{path}: {a!r} locally, {b!r} remotely"]
