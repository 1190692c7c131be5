"""One-click resume: put a run's checkpoint back into the notebook's model and dataloader.

:func:`resume` is the one implementation behind the checkpoint browser's Resume button and
``%twinkle resume RUN [CKPT|latest]``. It restores adapter weights, optimizer, scheduler,
step counter and RNG state through ``model.resume_from_checkpoint`` (the server re-attaches
the adapter to the checkpoint's run, so the *same run* continues and its later points are
marked superseded), then moves the notebook's DataLoader(s) to the checkpoint's sample
position. Re-running the training cell continues from the checkpoint step: step numbers do
not restart and no sample is repeated or skipped.
"""

from __future__ import annotations

import html
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from twinkle.errors import InvalidArgumentError, NotFoundError, StateError
from twinkle_client.client import newest_checkpoint

from .connection import current_client

__all__ = ["ResumeResult", "resume", "find_models", "find_dataloaders", "choose_checkpoint"]

# DataLoaders under these names are left alone: evaluation loaders restart every time.
_EVAL_NAMES = ("eval", "val", "valid", "test")
_COMPONENT_ORDER = ("template", "processor", "loss", "optimizer", "lr_scheduler")


@dataclass
class ResumeResult:
    """What :func:`resume` did. ``str()`` is one line; ``magic`` reproduces it."""

    run_id: str
    checkpoint_id: str
    twinkle_path: str
    cur_step: int
    consumed_train_samples: int
    model_name: str | None
    created_model: bool
    dataloaders: list[str] = field(default_factory=list)
    skipped_dataloaders: list[str] = field(default_factory=list)

    @property
    def magic(self) -> str:
        """The line magic that does the same."""
        return f"%twinkle resume {self.run_id} {self.checkpoint_id}"

    def __str__(self) -> str:
        model = f"`{self.model_name}`" if self.model_name else "the model"
        how = " (created from the run's configuration)" if self.created_model else ""
        text = (
            f"resumed run {self.run_id} from {self.checkpoint_id}: step {self.cur_step}, "
            f"{self.consumed_train_samples} samples consumed; {model}{how}"
        )
        if self.dataloaders:
            text += f", {', '.join(f'`{n}`' for n in self.dataloaders)} at sample {self.consumed_train_samples}"
        else:
            text += (
                f"; no DataLoader found: call dataloader.resume_from_checkpoint({self.consumed_train_samples})"
            )
        return text + f". Re-run the training cell to continue. Same as: {self.magic}"

    def _repr_html_(self) -> str:
        return (
            '<div style="font:13px/1.5 var(--jp-ui-font-family, sans-serif)">'
            f"✓ {html.escape(str(self).split('. Re-run')[0])}.<br/>Re-run the training cell to continue. "
            f"Same as: <code>{html.escape(self.magic)}</code></div>"
        )


def _model_class() -> type | None:
    mod = sys.modules.get("twinkle_client.model")
    return getattr(mod, "MultiLoraTransformersModel", None) if mod else None


def _loader_classes() -> tuple[type, ...]:
    classes = []
    for name in ("twinkle_client.dataloader", "twinkle.dataloader"):
        mod = sys.modules.get(name)
        cls = getattr(mod, "DataLoader", None) if mod else None
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)


def _named(namespace: MutableMapping[str, Any], classes: tuple[type, ...]) -> list[tuple[str, Any]]:
    """``(name, obj)`` of the user's variables that are instances of ``classes``, one per object.

    Names starting with ``_`` are IPython's output cache (``_``, ``_3``): an object seen there
    and under a real name is reported under the real name.
    """
    if not classes:
        return []
    found: dict[int, tuple[str, Any]] = {}
    for name, value in list(namespace.items()):
        if not isinstance(value, classes):
            continue
        prev = found.get(id(value))
        if prev is None or (prev[0].startswith("_") and not name.startswith("_")):
            found[id(value)] = (name, value)
    return [v for v in found.values() if not v[0].startswith("_")] or list(found.values())


def find_models(namespace: MutableMapping[str, Any]) -> list[tuple[str, Any]]:
    """The twinkle_client models in ``namespace`` as ``(name, model)``."""
    cls = _model_class()
    return _named(namespace, (cls,) if cls else ())


def find_dataloaders(namespace: MutableMapping[str, Any]) -> list[tuple[str, Any]]:
    """The DataLoaders (twinkle_client's, and local twinkle ones) in ``namespace`` as ``(name, loader)``."""
    return _named(namespace, _loader_classes())


def _runs_of(model: Any) -> list[str]:
    runs = getattr(model, "training_run_ids", None)
    if isinstance(runs, dict):
        return [r for r in runs.values() if r]
    rid = getattr(model, "training_run_id", None)
    return [rid] if rid else []


def choose_checkpoint(checkpoints: list[Any], checkpoint: str | None, run_id: str) -> Any:
    """The checkpoint named ``checkpoint`` (id, ``weights/<id>``, ``twinkle://`` or ``tinker://``
    path), or the most recently saved for ``None``/``'latest'`` (as ``get_latest_checkpoint_path``)."""
    if not checkpoints:
        raise NotFoundError(f"run {run_id} has no checkpoints yet: save one with model.save(name, save_optimizer=True)")
    if checkpoint in (None, "", "latest"):
        return newest_checkpoint(checkpoints)
    wanted = str(checkpoint)
    if wanted.startswith("weights/"):
        wanted = wanted[len("weights/"):]
    for ckpt in checkpoints:
        if wanted in (ckpt.checkpoint_id, ckpt.twinkle_path, getattr(ckpt, "tinker_path", None)):
            return ckpt
    names = ", ".join(c.checkpoint_id for c in checkpoints)
    raise NotFoundError(f"run {run_id} has no checkpoint {checkpoint!r} (it has: {names})")


def resume(
    run_id: str,
    checkpoint: str | None = "latest",
    *,
    namespace: MutableMapping[str, Any],
    model: Any = None,
    model_name: str = "model",
    client: Any = None,
) -> ResumeResult:
    """Resume ``run_id`` from ``checkpoint`` into the notebook's model and dataloader(s).

    The model is, in order: ``model`` if given (an object or a name in ``namespace``); the
    twinkle_client model in ``namespace`` that trains ``run_id``; the one model of the same
    base model. If there is none, a model is created from the run's stored configuration
    (LoRA config, gradient accumulation, template/processor/loss/optimizer/scheduler) and bound
    to ``model_name`` in ``namespace``. Every DataLoader in ``namespace`` (except ones named
    like ``eval``/``val``/``test``) is moved to the checkpoint's sample position.

    Raises ``twinkle.errors.TwinkleError`` subclasses with one-line messages: an unknown run
    or checkpoint, a model of another base model, a LoRA rank that does not fit.
    """
    client = current_client(client)
    run = client.get_training_run(run_id)
    ckpt = choose_checkpoint(client.list_checkpoints(run_id), checkpoint, run_id)
    if not ckpt.has_optimizer:
        raise StateError(
            f"checkpoint {ckpt.checkpoint_id} of run {run_id} was saved without optimizer state; "
            "save with save_optimizer=True to resume training from it"
        )

    name, target = _pick_model(run, namespace, model, client)
    created = False
    if target is None:
        if run.status == "active":
            # Checked before making a model (a slot, a round trip) the server would refuse.
            raise StateError(
                f"run {run_id} is still held by a live model object (another kernel, or one the server "
                "has not expired yet); close it there (model.close()) or wait for the server's idle timeout"
            )
        name, target = _create_model(run, namespace, model_name)
        created = True
    try:
        progress = target.resume_from_checkpoint(ckpt.twinkle_path)
    except BaseException:
        if created:
            _close_quietly(target)  # a failed resume must not leave a half-made model behind
        raise
    if created:
        namespace[name] = target
    cur_step = int(_get(progress, "cur_step", ckpt.step))
    consumed = int(_get(progress, "consumed_train_samples", ckpt.consumed_train_samples))

    moved, skipped = [], []
    for loader_name, loader in find_dataloaders(namespace):
        if any(tag in loader_name.lower() for tag in _EVAL_NAMES):
            skipped.append(loader_name)
            continue
        loader.resume_from_checkpoint(consumed)
        moved.append(loader_name)
    return ResumeResult(
        run_id=run_id,
        checkpoint_id=ckpt.checkpoint_id,
        twinkle_path=ckpt.twinkle_path,
        cur_step=cur_step,
        consumed_train_samples=consumed,
        model_name=name,
        created_model=created,
        dataloaders=moved,
        skipped_dataloaders=skipped,
    )


def _get(obj: Any, key: str, default: Any) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _pick_model(run: Any, namespace: MutableMapping[str, Any], model: Any, client: Any) -> tuple[str | None, Any]:
    models = find_models(namespace)
    if model is not None:
        if isinstance(model, str):
            if model not in namespace:
                raise NotFoundError(f"no variable named {model!r} in the notebook")
            return model, namespace[model]
        return next((n for n, m in models if m is model), None), model
    for name, obj in models:
        if run.training_run_id in _runs_of(obj):
            return name, obj
    if not models:
        return None, None
    same, other = [], []
    for name, obj in models:
        base = _base_model_of(obj, client)
        (same if base is None or base == run.base_model else other).append((name, obj, base))
    if len(same) == 1:
        return same[0][0], same[0][1]
    if len(same) > 1:
        names = ", ".join(f"`{n}`" for n, _, _ in same)
        raise InvalidArgumentError(
            f"several models in the notebook could take run {run.training_run_id} ({names}); "
            f"say which: %twinkle resume {run.training_run_id} CKPT --model NAME"
        )
    name, _, base = other[0]
    raise InvalidArgumentError(
        f"`{name}` is a model of {base}, but run {run.training_run_id} was trained on {run.base_model}"
    )


def _base_model_of(model: Any, client: Any) -> str | None:
    """A remote model's base model: that of one of its runs, else None (unknown, no adapter yet)."""
    for rid in _runs_of(model):
        try:
            return client.get_training_run(rid).base_model
        except NotFoundError:
            continue  # a run that was emptied by an earlier resume
    return None


def _create_model(run: Any, namespace: MutableMapping[str, Any], model_name: str) -> tuple[str, Any]:
    existing = namespace.get(model_name)
    if existing is not None and not (_model_class() and isinstance(existing, _model_class())):
        raise InvalidArgumentError(
            f"`{model_name}` in the notebook is a {type(existing).__name__}, not a twinkle model; "
            "pass another model_name to create the model under"
        )
    from twinkle_client.model import MultiLoraTransformersModel

    model = MultiLoraTransformersModel(model_id=run.base_model)
    try:
        _configure(model, run)
    except BaseException:
        _close_quietly(model)
        raise
    return model_name, model


def _configure(model: Any, run: Any) -> None:
    """Adapter and components as the run recorded them (the server checks them all)."""
    model.add_adapter_to_model(
        run.adapter_name, dict(run.lora_config), gradient_accumulation_steps=int(run.gradient_accumulation_steps)
    )
    components = run.components or {}
    for kind in _COMPONENT_ORDER:
        spec = components.get(kind)
        if not spec:
            continue
        setter = getattr(model, f"set_{kind}")
        setter(spec["name"], **dict(spec.get("kwargs") or {}))
    model.flush()  # the set_* calls are deferred: a bad component fails here, not later


def _close_quietly(model: Any) -> None:
    try:
        model.close()
    except Exception:
        pass
