"""``RunBook``: what all model handles share: records, checkpoints, uploads and which runs are held.

A run is *held* while a live model object trains it; another object may not resume it then.
The book also counts each user's adapters on the base model (``max_loras_per_user``).
"""

from __future__ import annotations

import threading

from twinkle.errors import StateError
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol.names import twinkle_path
from twinkle.uploads import UploadJobs

from .checkpoints import Checkpoints
from .settings import Settings
from .store import Store


class RunBook:
    """Shared by all model handles: the store, the checkpoints, the uploads, which runs are held."""

    def __init__(self, store: Store, settings: Settings, model: MultiLoraTransformersModel,
                 uploads: UploadJobs) -> None:
        self.store = store
        self.settings = settings
        self.model = model
        self.uploads = uploads
        self.checkpoints = Checkpoints(store, settings)
        self._holders: dict[str, str] = {}  # run_id -> object id of the live model training it
        self._adapters: dict[int, int] = {}  # user id -> adapters of the user's live models
        self._lock = threading.Lock()

    def adapters_of(self, user_id: int) -> int:
        """How many adapters ``user_id``'s live models have on the base model."""
        with self._lock:
            return self._adapters.get(user_id, 0)

    def adapter_added(self, user_id: int) -> None:
        with self._lock:
            self._adapters[user_id] = self._adapters.get(user_id, 0) + 1

    def adapter_removed(self, user_id: int) -> None:
        with self._lock:
            left = self._adapters.get(user_id, 0) - 1
            if left > 0:
                self._adapters[user_id] = left
            else:
                self._adapters.pop(user_id, None)

    def hold(self, run_id: str, object_id: str) -> None:
        with self._lock:
            self._holders[run_id] = object_id

    def release(self, run_id: str) -> None:
        with self._lock:
            self._holders.pop(run_id, None)

    def holder(self, run_id: str) -> str | None:
        with self._lock:
            return self._holders.get(run_id)

    def check_not_uploading(self, run_id: str, name: str) -> None:
        """Refuse to delete or replace a checkpoint folder an upload is reading."""
        path = twinkle_path(run_id, name)
        if self.uploads.busy(path):
            raise StateError(f"checkpoint {path} is being uploaded; try again when the upload ends")

    def delete_checkpoint(self, user_id: int, run_id: str, name: str) -> str:
        """Delete the caller's checkpoint (on the device worker, so no save races it)."""
        self.store.get_checkpoint(user_id, run_id, name)
        self.check_not_uploading(run_id, name)
        self.checkpoints.delete(run_id, name)
        return twinkle_path(run_id, name)
