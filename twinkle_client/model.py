"""``MultiLoraTransformersModel`` on a twinkle server: the declared model API, run remotely.

Same constructor, methods and signatures as ``twinkle.model.MultiLoraTransformersModel``
(both read ``twinkle.protocol.api.ModelAPI``). Training calls are deferred: they return lazy
values and are sent together, so a training step costs one or two round trips. Client-side
extras: ``training_run_id``, ``training_run_ids``, ``close()``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twinkle.protocol.api import MODEL, Effect, Returns
from twinkle.protocol.errors import HubError, InvalidArgumentError
from twinkle.protocol.names import split_hub_id

from .client import current_client, peek_client
from .derive import derive_remote_class
from .events import TrainingEvent, emit
from .pipeline import CallFuture
from .remote import BoundCall, RemoteObject

__all__ = ["MultiLoraTransformersModel"]

UPLOAD_POLL_S = (0.5, 5.0)  # first and longest wait between upload status polls


class _RemoteModel(RemoteObject):
    """Client-side state of a remote model: the training run of each of its adapters."""

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

    def _twinkle_adapter_of(self, call: BoundCall) -> str | None:
        adapter = call.values.get("adapter_name")
        return adapter if adapter is not None else self._twinkle_last_adapter

    def _twinkle_before(self, call: BoundCall) -> None:
        if call.spec.effect is Effect.UPLOAD and call.values.get("hub_token") is None:
            self._twinkle_fill_hub_token(call)

    @staticmethod
    def _twinkle_fill_hub_token(call: BoundCall) -> None:
        """``upload_to_hub`` without ``hub_token``: use your own token for the hub that
        ``hub_model_id`` names (``hf://`` Hugging Face, ``ms://`` or a bare ``org/name``
        ModelScope), as the client was given it (by default from your environment). With
        none, the call goes as it is and the server says that it needs ``hub_token``."""
        try:
            scheme, _ = split_hub_id(call.values.get("hub_model_id"), "hub_model_id")
        except InvalidArgumentError:
            return  # the server reports a malformed id
        client = peek_client()  # the client the call will go through (a call never makes one)
        token = client.hub_token(scheme) if client is not None else None
        if token:
            call.kwargs["hub_token"] = token
            call.values["hub_token"] = token

    def _twinkle_after(self, call: BoundCall, future: CallFuture, value: Any) -> Any:
        effect = call.spec.effect
        adapter = self._twinkle_adapter_of(call)
        if effect is Effect.ADAPTER_ADDED:
            self._twinkle_last_adapter = adapter
        if effect is Effect.ADAPTER_REMOVED:
            self._twinkle_runs.pop(adapter, None)
            if self._twinkle_last_adapter == adapter:
                self._twinkle_last_adapter = next(reversed(self._twinkle_runs), None)
        elif future.done() and future.training_run_id is not None and adapter is not None:
            # Adding an adapter starts a run; resuming another run's checkpoint switches to it.
            self._twinkle_runs[adapter] = future.training_run_id
        if call.spec.event is not None:
            emit(TrainingEvent(kind=call.spec.event, model=self, run_id=self._twinkle_runs.get(adapter) if adapter
                               else None, method=call.name, value=value))
        if call.spec.returns is Returns.UPLOAD_ID and not call.values.get("async_upload"):
            return self._twinkle_follow_upload(call, value)
        return value

    def _twinkle_follow_upload(self, call: BoundCall, upload_id: Any) -> None:
        """The server always uploads in the background; a synchronous call follows it to the end."""
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

    def close(self) -> None:
        """Send what is queued and release the model on the server (its runs and checkpoints stay)."""
        if getattr(self, "_twinkle_pipeline", None) is not None and self._twinkle_finalizer.alive:
            emit(TrainingEvent(kind="closed", model=self, run_id=self.training_run_id, method="close"))
        super().close()


MultiLoraTransformersModel = derive_remote_class(MODEL, _RemoteModel, module=__name__)
