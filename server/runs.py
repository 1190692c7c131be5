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
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinkle import checkpoint as ckpt
from twinkle.api import api_methods
from twinkle.errors import CheckpointError, InvalidArgumentError, NotFoundError, StateError, TwinkleError
from twinkle.model import MultiLoraTransformersModel
from twinkle_client.codec import from_wire, to_wire
from twinkle_client.types import TWINKLE_SCHEME, CheckpointPath

from .policy import check_remote_id
from .settings import Settings
from .store import CheckpointRow, Store, User, twinkle_path
from .uploads import UploadManager

log = logging.getLogger("twinkle_server.runs")

_RUN_ID = re.compile(r"run-[0-9a-f]{12}")
_CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,127}")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")

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
    parts = value[len(TWINKLE_SCHEME):].split("/")
    if (
        len(parts) != 3
        or parts[1] != "weights"
        or not _RUN_ID.fullmatch(parts[0])
        or not _CHECKPOINT_NAME.fullmatch(parts[2])
    ):
        shown = value[:200].replace("\n", " ").replace("\r", " ")
        raise NotFoundError(f"no checkpoint {shown}")
    return parts[0], parts[2]


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
        if row is None or not (folder / ckpt.META_FILE).is_file():
            raise NotFoundError(f"no checkpoint {twinkle_path(run_id, name)}")
        return row, folder

    def record_checkpoint(self, run_id: str, name: str, folder: Path) -> None:
        """Insert (or replace) the row of a checkpoint folder that is complete on disk."""
        record_checkpoint(self.store, run_id, name, folder, ckpt.CheckpointMeta.read(folder))

    def delete_checkpoint(self, user_id: int, run_id: str, name: str) -> str:
        """Remove a checkpoint's folder, then its row (run on the device worker, so no save races it)."""
        self.store.get_checkpoint(user_id, run_id, name)
        folder = self.checkpoint_dir(run_id, name)
        if folder.exists():
            shutil.rmtree(folder)
        self.store.delete_checkpoint(run_id, name)
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


def reconcile(store: Store, settings: Settings) -> dict[str, int]:
    """Make the database and the checkpoint folders agree after a stop or a crash.

    Rows whose folder is gone are dropped; complete folders without a row (a crash between
    the atomic rename and the insert) are added from their metadata; unfinished ``.tmp-*``
    and ``.old-*`` folders are deleted; runs left ``active`` become ``detached``.
    """
    counts = {"detached": store.detach_all_runs(), "dropped": 0, "added": 0, "removed_tmp": 0}
    for run_id, name in store.all_checkpoints():
        if not (settings.run_weights_dir(run_id) / name / ckpt.META_FILE).is_file():
            store.delete_checkpoint(run_id, name)
            counts["dropped"] += 1
    known = set(store.all_checkpoints())
    runs = store.run_ids()
    if settings.runs_dir.is_dir():
        for run_dir in sorted(settings.runs_dir.iterdir()):
            weights = run_dir / "weights"
            if not weights.is_dir():
                continue
            for folder in sorted(weights.iterdir()):
                if folder.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(folder, ignore_errors=True)
                    counts["removed_tmp"] += 1
                    continue
                if not folder.is_dir() or (run_dir.name, folder.name) in known:
                    continue
                if run_dir.name not in runs:
                    log.warning("checkpoint folder %s belongs to no known run; left alone", folder)
                    continue
                if not (folder / ckpt.META_FILE).is_file():
                    continue
                try:
                    meta = ckpt.CheckpointMeta.read(folder)
                except CheckpointError as exc:
                    log.warning("skipping checkpoint folder %s: %s", folder, exc)
                    continue
                record_checkpoint(store, run_dir.name, folder.name, folder, meta)
                counts["added"] += 1
    return counts


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

    @property
    def model(self) -> MultiLoraTransformersModel:
        return self.book.model

    @property
    def store(self) -> Store:
        return self.book.store

    # ------------------------------------------------------------------ dispatch

    def call(self, method: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Run one remote call (already known to be an API method) and record its effects."""
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
            self._sync(link)
        return result

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
        if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
            raise InvalidArgumentError(
                "adapter name must be 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit; "
                f"got {name!r}"
            )
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
        self._sync(link)
        return {"training_run_id": run_id}

    def _do_remove_adapter(self, link: AdapterLink, bound: inspect.BoundArguments) -> None:
        self._invoke("remove_adapter", bound)
        self._detach(link)

    def _detach(self, link: AdapterLink) -> None:
        self.links.pop(link.name, None)
        self.book.release(link.run_id)
        self.store.set_run_status(link.run_id, "detached")

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
        self.store.set_component(link.run_id, kind, {"name": name, "kwargs": _plain(extra)})
        if method == "set_optimizer":
            # The library drops the scheduler with a new optimizer; the record follows.
            self.store.set_component(link.run_id, "lr_scheduler", None)

    # ------------------------------------------------------------------ training

    def _do_forward_backward(self, link: AdapterLink, bound: inspect.BoundArguments) -> Any:
        out = self._invoke("forward_backward", bound)
        self.store.add_metric_point(
            link.run_id,
            step=out.step + 1,
            micro_step=out.micro_step,
            loss=float(out.loss),
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
            self.store.complete_step(link.run_id, self._state(link)["cur_step"], grad_norm=link.grad_norm, lr=lr)
            link.grad_norm = None
        return stepped

    def _do_clip_grad_and_step(self, link: AdapterLink, bound: inspect.BoundArguments) -> float | None:
        before = self._state(link)
        norm = self._invoke("clip_grad_and_step", bound)
        after = self._state(link)["cur_step"]
        if after > before["cur_step"]:
            self.store.complete_step(
                link.run_id, after, grad_norm=None if norm is None else float(norm), lr=before["lr"]
            )
            link.grad_norm = None
        return norm

    # --------------------------------------------------------------- checkpoints

    def _do_save(self, link: AdapterLink, bound: inspect.BoundArguments) -> str:
        a = bound.arguments
        if a.get("save_dir") is not None:
            raise InvalidArgumentError(
                "save_dir is chosen by the server; save(name) returns the checkpoint's twinkle:// path"
            )
        name = a["name"]
        a["save_dir"] = str(self.book.settings.run_weights_dir(link.run_id))
        folder = Path(self._invoke("save", bound))
        # Only now, after the library's atomic rename, does the checkpoint exist for clients.
        self.book.record_checkpoint(link.run_id, name, folder)
        return twinkle_path(link.run_id, name)

    def _do_load(self, link: AdapterLink, bound: inspect.BoundArguments) -> None:
        a = bound.arguments
        _, folder = self.book.resolve(self.user.id, a["name"])
        a["name"] = str(folder)
        self._invoke("load", bound)
        if a.get("load_optimizer"):
            # The counters went back to the checkpoint's: later points of this run are history.
            self.store.supersede_after(link.run_id, self._state(link)["cur_step"])

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
        result = self._invoke("resume_from_checkpoint", bound)
        old = link.run_id
        components = self.store.components(old) if old != target else {}
        self.store.reattach_run(target, after_step=row.step, components=components)
        if old != target:
            self.book.release(old)
            if self.store.delete_run_if_empty(old):
                self.book.remove_run_dir(old)
            else:
                self.store.set_run_status(old, "detached")
            link.run_id = target
            self.book.hold(target, self.object_id)
            log.info("user %s: adapter %r of %s resumed run %s", self.user.name, link.name, self.object_id, target)
        link.grad_norm = None
        # The adapter now trains the checkpoint's run: tell the client (an extra key of the dict).
        return {**result, "training_run_id": target}

    def _upload_to_hub(self, bound: inspect.BoundArguments) -> dict[str, str]:
        a = bound.arguments
        row, folder = self.book.resolve(self.user.id, a["checkpoint_dir"])
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
