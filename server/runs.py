"""Training-run bookkeeping around the shared model: runs, checkpoints, metric history.

``ModelHandle`` is what a remote model object is on the server: a view of the one base
model that holds only this object's adapters (named ``<object id>.<name>`` on the base
model) and records every call's effect in the database. Its methods run on the device
worker only, so the model and the records never race.

``twinkle://<run_id>/weights/<name>`` is the only way a client names a checkpoint; it is
resolved here, against the caller's own runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twinkle import checkpoint as ckpt
from twinkle.api import api_methods
from twinkle.errors import CheckpointError, InvalidArgumentError, NotFoundError, StateError, TwinkleError
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol.codec import from_wire, to_wire
from twinkle.protocol.names import (
    TWINKLE_SCHEME,
    check_adapter_name,
    is_checkpoint_name,
    split_twinkle_path,
    twinkle_path,
)
from twinkle.protocol.wire import CheckpointPath

from .policy import check_remote_id
from .settings import Settings
from .store import CheckpointRow, Store, User
from .uploads import UploadManager

log = logging.getLogger("twinkle_server.runs")
E = TypeVar("E", bound=TwinkleError)
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".del-")
"""Hidden folders beside checkpoints: an unfinished save, a replaced one, one being deleted."""


MODEL_METHODS: dict[str, inspect.Signature] = {
    name: sig for name, (_, sig) in api_methods(MultiLoraTransformersModel).items()
}
# set_* method -> the key it is recorded under in TrainingRun.components, and its name parameter
COMPONENT_SETTERS = {
    "set_template": ("template", "template_cls"),
    "set_processor": ("processor", "processor_cls"),
    "set_loss": ("loss", "loss_cls"),
    "set_optimizer": ("optimizer", "optimizer_cls"),
    "set_lr_scheduler": ("lr_scheduler", "scheduler_cls"),
}


def new_run_id() -> str:
    return f"run-{secrets.token_hex(6)}"


def parse_twinkle_path(value: Any) -> tuple[str, str]:
    """``(run_id, name)`` of a ``twinkle://<run_id>/weights/<name>`` path.

    Anything else that starts with ``twinkle://`` is a checkpoint that does not exist (404);
    anything not starting with it is refused (400): clients never name server paths.
    """
    if isinstance(value, CheckpointPath):
        value = value.twinkle_path
    if not isinstance(value, str):
        raise InvalidArgumentError(f"a checkpoint is named by a twinkle:// path, got {type(value).__name__}")
    if not value.startswith(TWINKLE_SCHEME):
        raise InvalidArgumentError("pass a twinkle:// path; server paths are not accepted")
    parts = split_twinkle_path(value)
    if parts is None:
        shown = value[:200].replace("\n", " ").replace("\r", " ")
        raise NotFoundError(f"no checkpoint {shown}")
    return parts


@dataclass
class AdapterLink:
    """One of an object's adapters: the user's name, its name on the base model, its run."""

    name: str
    base_name: str
    run_id: str
    grad_norm: float | None = None
    """The norm returned by the last ``clip_grad_norm`` of the current window."""


class RunBook:
    """Shared by all model handles: the store, where checkpoints live, which runs are held."""

    def __init__(self, store: Store, settings: Settings, model: MultiLoraTransformersModel,
                 uploads: UploadManager) -> None:
        self.store = store
        self.settings = settings
        self.model = model
        self.uploads = uploads
        self._holders: dict[str, str] = {}  # run_id -> object id of the live model training it
        self._lock = threading.Lock()

    def hold(self, run_id: str, object_id: str) -> None:
        with self._lock:
            self._holders[run_id] = object_id

    def release(self, run_id: str) -> None:
        with self._lock:
            self._holders.pop(run_id, None)

    def holder(self, run_id: str) -> str | None:
        with self._lock:
            return self._holders.get(run_id)

    def checkpoint_dir(self, run_id: str, name: str) -> Path:
        return self.settings.run_weights_dir(run_id) / name

    def resolve(self, user_id: int, value: Any) -> tuple[CheckpointRow, Path]:
        """The caller's complete checkpoint named by ``value`` and its folder."""
        run_id, name = parse_twinkle_path(value)
        row = self.store.checkpoint_row(user_id, run_id, name)
        folder = self.checkpoint_dir(run_id, name)
        if row is None or not is_complete(folder):
            raise NotFoundError(f"no checkpoint {twinkle_path(run_id, name)}")
        return row, folder

    def check_not_uploading(self, run_id: str, name: str) -> None:
        """Refuse to delete or replace a checkpoint folder an upload is reading."""
        path = twinkle_path(run_id, name)
        if self.uploads.busy(path):
            raise StateError(f"checkpoint {path} is being uploaded; try again when the upload ends")

    def record_checkpoint(self, run_id: str, name: str, folder: Path) -> None:
        """Insert (or replace) the row of a checkpoint folder that is complete on disk."""
        record_checkpoint(self.store, run_id, name, folder, ckpt.CheckpointMeta.read(folder))

    def delete_checkpoint(self, user_id: int, run_id: str, name: str) -> str:
        """Delete a checkpoint (on the device worker, so no save races it), crash-safe at every point:
        the folder is first renamed to a hidden ``.del-*`` one (atomic: the checkpoint is gone
        for readers), then the row goes, then the folder's files (``reconcile`` finishes that
        after a crash)."""
        self.store.get_checkpoint(user_id, run_id, name)
        self.check_not_uploading(run_id, name)
        folder = self.checkpoint_dir(run_id, name)
        trash: Path | None = None
        if folder.exists():
            trash = folder.with_name(f".del-{name}-{secrets.token_hex(4)}")
            os.rename(folder, trash)
        self.store.delete_checkpoint(run_id, name)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return twinkle_path(run_id, name)

    def remove_run_dir(self, run_id: str) -> None:
        shutil.rmtree(self.settings.runs_dir / run_id, ignore_errors=True)


def record_checkpoint(store: Store, run_id: str, name: str, folder: Path, meta: ckpt.CheckpointMeta) -> None:
    """The checkpoint row for a complete folder, from its ``twinkle_checkpoint.json``."""
    store.upsert_checkpoint(
        run_id,
        name,
        time_=meta.created,
        size_bytes=ckpt.folder_size(folder),
        step=meta.cur_step,
        consumed_train_samples=meta.consumed_train_samples,
        loss=meta.last_loss,
        has_optimizer=meta.has_training_state,
        base_model=meta.base_model,
        lora_rank=meta.lora_rank,
    )


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a whole twinkle checkpoint: its metadata, the adapter files
    (``check_checkpoint_dir``) and, if the metadata says it has one, the training state.
    The metadata file alone proves nothing once a deletion or a crash has removed files."""
    if not (folder / ckpt.META_FILE).is_file():
        return False
    try:
        meta = ckpt.CheckpointMeta.read(folder)
        ckpt.check_checkpoint_dir(folder, need_training_state=bool(meta.has_training_state))
    except CheckpointError:
        return False
    return True


def _replaced_is_complete(old: Path) -> bool:
    """``is_complete`` for a hidden ``.old-*`` folder (which ``check_checkpoint_dir`` refuses by
    its name alone): the same files must be there."""
    try:
        meta = ckpt.CheckpointMeta.read(old)
    except CheckpointError:
        return False
    needed = [ckpt.ADAPTER_CONFIG, ckpt.ADAPTER_WEIGHTS] + ([ckpt.TRAINING_STATE] if meta.has_training_state else [])
    return all((old / name).is_file() for name in needed)


_OLD_FOLDER = re.compile(r"\.old-(.+)-\d+")


def _restore_replaced(weights: Path) -> list[str]:
    """Undo a save that crashed between ``atomic_directory``'s two renames: where checkpoint
    ``X`` is missing but a complete ``.old-X-<pid>`` exists, rename it back to ``X``.

    Returns the names restored.
    """
    restored: list[str] = []
    candidates: dict[str, list[Path]] = {}
    for folder in weights.iterdir():
        match = _OLD_FOLDER.fullmatch(folder.name)
        if match and folder.is_dir() and is_checkpoint_name(match.group(1)):
            candidates.setdefault(match.group(1), []).append(folder)
    for name, olds in sorted(candidates.items()):
        target = weights / name
        if target.exists() or target.is_symlink():
            continue
        complete = [old for old in olds if _replaced_is_complete(old)]
        if not complete:
            continue
        newest = max(complete, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        restored.append(name)
        log.warning("restored checkpoint %s from %s (a save replacing it was interrupted)", target, newest.name)
    return restored


def reconcile(store: Store, settings: Settings) -> dict[str, int]:
    """Make the database and the checkpoint folders agree after a stop or a crash.

    First a checkpoint whose replacement crashed half-way is restored from its ``.old-*``
    folder (and recorded). Then rows whose folder is gone or incomplete are dropped; complete
    folders without a row (a crash between the atomic rename and the insert) are added from
    their metadata; leftover ``.tmp-*``, ``.old-*`` and ``.del-*`` folders are deleted; runs
    left ``active`` become ``detached``.
    """
    counts = {"detached": store.detach_all_runs(), "dropped": 0, "added": 0, "removed_tmp": 0, "restored": 0}
    runs = store.run_ids()
    weight_dirs = (
        [run_dir / "weights" for run_dir in sorted(settings.runs_dir.iterdir()) if (run_dir / "weights").is_dir()]
        if settings.runs_dir.is_dir() else []
    )
    for weights in weight_dirs:
        run_id = weights.parent.name
        for name in _restore_replaced(weights):
            counts["restored"] += 1
            if run_id in runs:
                folder = weights / name
                record_checkpoint(store, run_id, name, folder, ckpt.CheckpointMeta.read(folder))
    for run_id, name in store.all_checkpoints():
        if not is_complete(settings.run_weights_dir(run_id) / name):
            store.delete_checkpoint(run_id, name)
            counts["dropped"] += 1
    known = set(store.all_checkpoints())
    for weights in weight_dirs:
        run_id = weights.parent.name
        for folder in sorted(weights.iterdir()):
            if folder.name.startswith(LEFTOVER_PREFIXES):
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                counts["removed_tmp"] += 1
                continue
            if not folder.is_dir() or (run_id, folder.name) in known:
                continue
            if run_id not in runs:
                log.warning("checkpoint folder %s belongs to no known run; left alone", folder)
                continue
            if not is_complete(folder):
                continue
            try:
                meta = ckpt.CheckpointMeta.read(folder)
            except CheckpointError as exc:
                log.warning("skipping checkpoint folder %s: %s", folder, exc)
                continue
            record_checkpoint(store, run_id, folder.name, folder, meta)
            counts["added"] += 1
    return counts


def _hide_folder(err: E, folder: Path, path: str) -> E:
    """``err`` with the checkpoint's server folder replaced by its ``twinkle://`` path (same class)."""
    if str(folder) not in err.message:
        return err
    return type(err)(err.message.replace(str(folder), path))


class ModelHandle:
    """A remote ``MultiLoraTransformersModel``: this object's adapters on the shared base model.

    Every method must run on the device worker.
    """

    class_name = "MultiLoraTransformersModel"

    def __init__(self, book: RunBook, user: User, object_id: str) -> None:
        self.book = book
        self.user = user
        self.object_id = object_id
        self.links: dict[str, AdapterLink] = {}
        self.request_id: str | None = None
        """The request of the call running now, for the log."""

    @property
    def model(self) -> MultiLoraTransformersModel:
        return self.book.model

    @property
    def store(self) -> Store:
        return self.book.store

    # ------------------------------------------------------------------ dispatch

    def call(self, method: str, args: list[Any], kwargs: dict[str, Any], *, request_id: str | None = None) -> Any:
        """Run one remote call (already known to be an API method) and record its effects."""
        self.request_id = request_id
        sig = MODEL_METHODS[method]
        try:
            bound = sig.bind(None, *args, **kwargs)  # None stands for self
        except TypeError as exc:
            raise InvalidArgumentError(f"{method}(): {exc}") from None
        if method == "add_adapter_to_model":
            return self._add_adapter(bound)
        if method == "upload_to_hub":
            return self._upload_to_hub(bound)
        link = self._link(bound.arguments.get("adapter_name"))
        bound.arguments["adapter_name"] = link.base_name
        handler = getattr(self, f"_do_{method}", None)
        try:
            if handler is not None:
                result = handler(link, bound)
            elif method in COMPONENT_SETTERS:
                result = self._set_component(method, link, bound)
            else:
                result = self._invoke(method, bound)
        except TwinkleError as err:
            # The library names the adapter by its name on the shared base model; the user
            # knows it by their own name.
            if link.base_name in err.message:
                raise type(err)(err.message.replace(link.base_name, link.name)) from None
            raise
        if self.links.get(link.name) is link:
            self._record(f"the progress of run {link.run_id}", self._sync, link)
        return result

    def _record(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Bookkeeping after a library call that ran (metric rows, run progress, component
        records): a failure here is logged under the request id and otherwise swallowed, so
        that a call that ran is never reported as failed (its retry would run it twice)."""
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception(
                "request %s: %s: recording %s failed; the call ran and its result is returned",
                self.request_id, self.object_id, what,
            )

    def _invoke(self, method: str, bound: inspect.BoundArguments) -> Any:
        return getattr(self.model, method)(*bound.args[1:], **bound.kwargs)

    def _link(self, name: Any) -> AdapterLink:
        if name is None:
            if len(self.links) == 1:
                return next(iter(self.links.values()))
            if not self.links:
                raise StateError(
                    "this model has no adapter yet: call add_adapter_to_model(name, LoraConfig(...)) first"
                )
            raise InvalidArgumentError(f"this model has several adapters ({', '.join(self.links)}); pass adapter_name")
        if not isinstance(name, str) or name not in self.links:
            raise NotFoundError(f"no adapter named {name!r} on this model")
        return self.links[name]

    def _sync(self, link: AdapterLink) -> None:
        state = self.model.get_train_state(adapter_name=link.base_name)
        self.store.update_run_progress(
            link.run_id,
            cur_step=state["cur_step"],
            consumed_train_samples=state["consumed_train_samples"],
            last_loss=state["last_loss"],
            gradient_accumulation_steps=state["gradient_accumulation_steps"],
        )

    def _state(self, link: AdapterLink) -> dict[str, Any]:
        return self.model.get_train_state(adapter_name=link.base_name)

    # ------------------------------------------------------------------ adapters

    def _add_adapter(self, bound: inspect.BoundArguments) -> dict[str, str]:
        """Returns ``{"training_run_id": ...}`` (the contract in ``twinkle_client.types``)."""
        a = bound.arguments
        name = a["adapter_name"]
        check_adapter_name(name)
        if name in self.links:
            raise InvalidArgumentError(f"adapter {name!r} already exists on this model")
        config = a["config"]
        if isinstance(config, dict):
            config = from_wire({"__type__": "LoraConfig", "value": config})
        a["config"] = config
        base_name = a["adapter_name"] = f"{self.object_id}.{name}"
        self._invoke("add_adapter_to_model", bound)  # validates the config, rank and free slots
        run_id = new_run_id()
        try:
            # The codec's LoraConfig form: only the fields that differ from peft's defaults.
            lora = from_wire(to_wire(config)["value"], tensors=False)
            self.store.create_run(
                run_id,
                self.user.id,
                base_model=self.model.model_id,
                adapter_name=name,
                lora_rank=int(config.r),
                lora_config=lora,
                gradient_accumulation_steps=int(a.get("gradient_accumulation_steps", 1)),
            )
        except BaseException:
            self.model.remove_adapter(base_name)
            raise
        link = self.links[name] = AdapterLink(name, base_name, run_id)
        self.book.hold(run_id, self.object_id)
        log.info("user %s: adapter %r of %s trains run %s", self.user.name, name, self.object_id, run_id)
        self._record(f"the progress of run {run_id}", self._sync, link)
        return {"training_run_id": run_id}

    def _do_remove_adapter(self, link: AdapterLink, bound: inspect.BoundArguments) -> None:
        self._invoke("remove_adapter", bound)
        self._detach(link)

    def _detach(self, link: AdapterLink) -> None:
        self.links.pop(link.name, None)
        self.book.release(link.run_id)
        self._record(f"run {link.run_id} as detached", self.store.set_run_status, link.run_id, "detached")

    def close(self) -> None:
        """Remove this object's adapters from the base model and detach their runs."""
        for link in list(self.links.values()):
            try:
                self.model.remove_adapter(link.base_name)
            except Exception:  # the slot must be freed even if the record is odd; log and go on
                log.exception("could not remove adapter %s", link.base_name)
            self._detach(link)

    # ---------------------------------------------------------------- components

    def _set_component(self, method: str, link: AdapterLink, bound: inspect.BoundArguments) -> None:
        kind, param = COMPONENT_SETTERS[method]
        a = bound.arguments
        extra = dict(a.get("kwargs", {}))
        if method == "set_template" and "model_id" in extra:
            check_remote_id(extra["model_id"], "template model_id", allow_local=self.book.settings.allow_local_data)
        self._invoke(method, bound)
        name = a.get(param, bound.signature.parameters[param].default)
        self._record(f"the {kind} of run {link.run_id}", self.store.set_component, link.run_id, kind,
                     {"name": name, "kwargs": _plain(extra)})
        if method == "set_optimizer":
            # The library drops the scheduler with a new optimizer; the record follows.
            self._record(f"the lr_scheduler of run {link.run_id}", self.store.set_component, link.run_id,
                         "lr_scheduler", None)

    # ------------------------------------------------------------------ training

    def _do_forward_backward(self, link: AdapterLink, bound: inspect.BoundArguments) -> Any:
        out = self._invoke("forward_backward", bound)
        self._record(
            f"a metric point of run {link.run_id}",
            self.store.add_metric_point,
            link.run_id,
            step=out.step + 1,
            micro_step=out.micro_step,
            loss=None if out.loss is None else float(out.loss),
            num_tokens=int(out.num_tokens),
            time_=time.time(),
        )
        return out

    def _do_clip_grad_norm(self, link: AdapterLink, bound: inspect.BoundArguments) -> float | None:
        norm = self._invoke("clip_grad_norm", bound)
        if norm is not None:
            link.grad_norm = float(norm)
        return norm

    def _do_step(self, link: AdapterLink, bound: inspect.BoundArguments) -> bool:
        lr = self._state(link)["lr"]  # the LR the update uses (lr_step comes after)
        stepped = self._invoke("step", bound)
        if stepped:
            grad_norm, link.grad_norm = link.grad_norm, None

            def complete() -> None:
                self.store.complete_step(link.run_id, self._state(link)["cur_step"], grad_norm=grad_norm, lr=lr)

            self._record(f"the step of run {link.run_id}", complete)
        return stepped

    def _do_clip_grad_and_step(self, link: AdapterLink, bound: inspect.BoundArguments) -> float | None:
        before = self._state(link)
        norm = self._invoke("clip_grad_and_step", bound)
        after = self._state(link)["cur_step"]
        if after > before["cur_step"]:
            link.grad_norm = None
            self._record(
                f"the step of run {link.run_id}",
                self.store.complete_step,
                link.run_id, after, grad_norm=None if norm is None else float(norm), lr=before["lr"],
            )
        return norm

    # --------------------------------------------------------------- checkpoints

    def _do_save(self, link: AdapterLink, bound: inspect.BoundArguments) -> str:
        a = bound.arguments
        if a.get("save_dir") is not None:
            raise InvalidArgumentError(
                "save_dir is chosen by the server; save(name) returns the checkpoint's twinkle:// path"
            )
        name = a["name"]
        if is_checkpoint_name(name):
            self.book.check_not_uploading(link.run_id, name)
        a["save_dir"] = str(self.book.settings.run_weights_dir(link.run_id))
        folder = Path(self._invoke("save", bound))
        # Only now, after the library's atomic rename, does the checkpoint exist for clients.
        self.book.record_checkpoint(link.run_id, name, folder)
        return twinkle_path(link.run_id, name)

    def _do_load(self, link: AdapterLink, bound: inspect.BoundArguments) -> None:
        a = bound.arguments
        row, folder = self.book.resolve(self.user.id, a["name"])
        a["name"] = str(folder)
        try:
            self._invoke("load", bound)
        except TwinkleError as err:
            raise _hide_folder(err, folder, twinkle_path(row.run_id, row.name)) from None
        if a.get("load_optimizer"):
            # The counters went back to the checkpoint's: later points of this run are history.
            self._record(
                f"superseded points of run {link.run_id}",
                lambda: self.store.supersede_after(link.run_id, self._state(link)["cur_step"]),
            )

    def _do_resume_from_checkpoint(self, link: AdapterLink, bound: inspect.BoundArguments) -> dict[str, Any]:
        a = bound.arguments
        row, folder = self.book.resolve(self.user.id, a["name"])
        target = row.run_id
        holder = self.book.holder(target)
        if target != link.run_id and holder is not None:
            raise StateError(
                f"run {target} is being trained by live model object {holder}; delete that object "
                "(or let it expire) before resuming its run elsewhere"
            )
        a["name"] = str(folder)
        try:
            result = self._invoke("resume_from_checkpoint", bound)
        except TwinkleError as err:
            raise _hide_folder(err, folder, twinkle_path(row.run_id, row.name)) from None
        old = link.run_id
        if old != target:
            self.book.release(old)
            link.run_id = target
            self.book.hold(target, self.object_id)
            log.info("user %s: adapter %r of %s resumed run %s", self.user.name, link.name, self.object_id, target)
        link.grad_norm = None
        self._record(f"the resume of run {target}", self._reattach, old, target, row.step)
        # The adapter now trains the checkpoint's run: tell the client (an extra key of the dict).
        return {**result, "training_run_id": target}

    def _reattach(self, old: str, target: str, after_step: int) -> None:
        """The records of a resume: ``target`` is active again (its later points superseded),
        with the components of ``old``, which is dropped if empty, else detached."""
        components = self.store.components(old) if old != target else {}
        self.store.reattach_run(target, after_step=after_step, components=components)
        if old != target:
            if self.store.delete_run_if_empty(old):
                self.book.remove_run_dir(old)
            else:
                self.store.set_run_status(old, "detached")

    def _upload_to_hub(self, bound: inspect.BoundArguments) -> dict[str, str]:
        a = bound.arguments
        row, folder = self.book.resolve(self.user.id, a["checkpoint_dir"])
        if not a.get("hub_token"):
            # Without it the hub SDK would fall back to the server operator's own login.
            raise InvalidArgumentError(
                "upload_to_hub on a twinkle server needs hub_token=<your ModelScope or Hugging Face token>"
            )
        job = self.book.uploads.start(
            self.user.id, folder, twinkle_path(row.run_id, row.name), a["hub_model_id"], a.get("hub_token")
        )
        return {"upload_id": job.upload_id}


def _plain(value: Any) -> Any:
    """Component kwargs as JSON-friendly data for the run record."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)
