"""``MultiLoraTransformersModel`` on a twinkle server: the local class's API, run remotely.

Derived from ``twinkle.model.MultiLoraTransformersModel``: same constructor, same methods,
same signatures. Training calls (``forward_backward``, ``clip_grad_norm``, ``step``,
``zero_grad``, ``lr_step``, ``set_*``) are deferred: they return lazy values and are sent
together, so a training step costs one or two round trips. Client-side extras:
``training_run_id``, ``close()``; ``save`` returns the ``twinkle://`` path;
``upload_to_hub`` follows the server-side upload and prints its progress.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twinkle.errors import HubError, TwinkleError
from twinkle.model import MultiLoraTransformersModel as _LocalModel
from twinkle.protocol.wire import CheckpointPath

from .client import current_client
from .events import TrainingEvent, emit
from .remote import BoundCall, RemoteObject, derive_remote_class

__all__ = ["MultiLoraTransformersModel"]

UPLOAD_POLL_S = (0.5, 5.0)  # first and longest wait between upload status polls


class _RemoteModel(RemoteObject):
    """Client-side state of a remote model: its adapters' training runs."""

    def _twinkle_setup(self) -> None:
        self._twinkle_runs: dict[str, str | None] = {}
        self._twinkle_last_adapter: str | None = None

    @property
    def training_run_id(self) -> str | None:
        """The training run of the adapter added last (None before ``add_adapter_to_model``)."""
        if self._twinkle_last_adapter is None:
            return None
        return self._twinkle_runs.get(self._twinkle_last_adapter)

    @property
    def training_run_ids(self) -> dict[str, str | None]:
        """``{adapter_name: training_run_id}`` for every adapter added through this object."""
        return dict(self._twinkle_runs)

    def _twinkle_run_of(self, call: BoundCall) -> str | None:
        adapter = call.values.get("adapter_name")
        if adapter is not None:
            return self._twinkle_runs.get(adapter)
        return self.training_run_id

    def _twinkle_emit(self, kind: str, call: BoundCall, value: Any = None) -> None:
        emit(TrainingEvent(kind=kind, model=self, run_id=self._twinkle_run_of(call), method=call.name, value=value))

    def close(self) -> None:
        """Send what is queued and release the model on the server (its runs and checkpoints stay)."""
        if getattr(self, "_twinkle_pipeline", None) is not None and self._twinkle_finalizer.alive:
            emit(TrainingEvent(kind="closed", model=self, run_id=self.training_run_id, method="close"))
        super().close()


def _paths_as_text(call: BoundCall) -> BoundCall:
    """``CheckpointPath`` results of ``get_checkpoint_path`` go as their ``twinkle://`` string."""
    call.args = [str(a) if isinstance(a, CheckpointPath) else a for a in call.args]
    call.kwargs = {k: str(v) if isinstance(v, CheckpointPath) else v for k, v in call.kwargs.items()}
    return call


def _add_adapter(self: _RemoteModel, call: BoundCall) -> None:
    reply = self._twinkle_call(call)
    # The server answers with the adapter's training run (see types.py); the local method
    # returns None and so does this one.
    run_id = reply.get("training_run_id") if isinstance(reply, dict) else None
    adapter = call.values["adapter_name"]
    self._twinkle_runs[adapter] = run_id
    self._twinkle_last_adapter = adapter
    self._twinkle_emit("adapter_added", call)
    return None


def _emitting(kind: str):
    def handler(self: _RemoteModel, call: BoundCall) -> Any:
        value = self._twinkle_call(call)
        self._twinkle_emit(kind, call, value)
        return value

    return handler


def _save(self: _RemoteModel, call: BoundCall) -> str:
    path = str(self._twinkle_call(call))
    self._twinkle_emit("save", call, path)
    return path


def _load(self: _RemoteModel, call: BoundCall) -> Any:
    value = self._twinkle_call(_paths_as_text(call))
    self._twinkle_emit("load", call)
    return value


def _resume(self: _RemoteModel, call: BoundCall) -> Any:
    value = self._twinkle_call(_paths_as_text(call))
    # Resuming another run's checkpoint makes the adapter train that run (the server says which).
    if isinstance(value, dict) and isinstance(value.get("training_run_id"), str):
        adapter = call.values.get("adapter_name") or self._twinkle_last_adapter
        if adapter is not None:
            self._twinkle_runs[adapter] = value["training_run_id"]
    self._twinkle_emit("resume", call, value)
    return value


def _remove_adapter(self: _RemoteModel, call: BoundCall) -> None:
    self._twinkle_call(call)
    adapter = call.values["adapter_name"]
    self._twinkle_runs.pop(adapter, None)
    if self._twinkle_last_adapter == adapter:
        self._twinkle_last_adapter = next(reversed(self._twinkle_runs), None)
    return None


def _upload(self: _RemoteModel, call: BoundCall) -> str | None:
    """Start the server-side upload; with ``async_upload`` return its id, else follow it to the end."""
    reply = self._twinkle_call(_paths_as_text(call))
    upload_id = reply.get("upload_id") if isinstance(reply, dict) else reply
    if not isinstance(upload_id, str):
        raise TwinkleError(f"the twinkle server did not return an upload id (got {reply!r})")
    self._twinkle_emit("upload", call, upload_id)
    if call.values.get("async_upload"):
        return upload_id
    hub_id = call.values["hub_model_id"]
    wait, last = UPLOAD_POLL_S[0], None
    while True:
        status = current_client().get_upload_status(upload_id)
        line = f"upload to {hub_id}: {status.status}" + (f" ({status.progress})" if status.progress else "")
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line
        if status.status == "completed":
            return None
        if status.status == "failed":
            raise HubError(f"upload of {call.values['checkpoint_dir']} to {hub_id} failed: {status.error}")
        time.sleep(wait)
        wait = min(UPLOAD_POLL_S[1], wait * 1.5)


MultiLoraTransformersModel = derive_remote_class(
    _LocalModel,
    kind="model",
    base=_RemoteModel,
    module=__name__,
    handlers={
        "add_adapter_to_model": _add_adapter,
        "remove_adapter": _remove_adapter,
        "forward_backward": _emitting("forward_backward"),
        "step": _emitting("step"),
        "clip_grad_and_step": _emitting("step"),
        "save": _save,
        "load": _load,
        "resume_from_checkpoint": _resume,
        "upload_to_hub": _upload,
    },
)
