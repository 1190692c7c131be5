"""Background uploads of checkpoints to a model hub, with a status that can be polled.

``upload_to_hub(..., async_upload=True)`` starts a job here and returns its id, locally and
on a server alike. Each job has an ``owner`` (None locally, the user on a server): only the
owner can see it. Jobs live in memory (an upload does not survive a restart, and its status
is of no use after one). A hub token is handed to the upload and otherwise neither kept nor
logged.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from twinkle.errors import NotFoundError, first_line
from twinkle.protocol.names import split_hub_id
from twinkle.protocol.wire import UploadStatus

log = logging.getLogger("twinkle.uploads")
UPLOAD_TIMEOUT_S = 30.0
MAX_JOBS_KEPT = 1000


@dataclass
class UploadJob:
    upload_id: str
    owner: Hashable
    hub_model_id: str
    label: str
    """How the checkpoint is named to the owner (its folder locally, its twinkle:// path remotely)."""
    status: str = "queued"
    error: str | None = None
    progress: str | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> UploadStatus:
        return UploadStatus(
            upload_id=self.upload_id,
            status=self.status,  # type: ignore[arg-type]
            hub_model_id=self.hub_model_id,
            error=self.error,
            progress=self.progress,
        )


class UploadJobs:
    """Starts upload threads and answers status queries, owner-checked."""

    def __init__(self) -> None:
        self._jobs: dict[str, UploadJob] = {}
        self._lock = threading.Lock()

    def start(
        self, owner: Hashable, folder: Path, label: str, hub_model_id: str, hub_token: str | None
    ) -> UploadJob:
        split_hub_id(hub_model_id, "hub_model_id")
        job = UploadJob(f"up-{secrets.token_hex(8)}", owner, hub_model_id, label)
        with self._lock:
            self._jobs[job.upload_id] = job
            if len(self._jobs) > MAX_JOBS_KEPT:
                finished = [j for j in self._jobs.values() if j.status in ("completed", "failed")]
                for old in sorted(finished, key=lambda j: j.created)[: len(self._jobs) - MAX_JOBS_KEPT]:
                    del self._jobs[old.upload_id]
        thread = threading.Thread(
            target=self._run, args=(job, folder, hub_token), name=f"twinkle-upload-{job.upload_id}", daemon=True
        )
        thread.start()
        return job

    def busy(self, label: str) -> bool:
        """Whether an upload of the checkpoint ``label`` is queued or running (its folder must
        then be neither deleted nor replaced)."""
        with self._lock:
            return any(j.label == label and j.status in ("queued", "running") for j in self._jobs.values())

    def get(self, owner: Hashable, upload_id: str) -> UploadStatus:
        with self._lock:
            job = self._jobs.get(upload_id) if isinstance(upload_id, str) else None
            if job is None or job.owner != owner:
                raise NotFoundError(f"no upload {upload_id!r}")
            return job.view()

    def _run(self, job: UploadJob, folder: Path, hub_token: str | None) -> None:
        from .hub import upload_folder

        job.status = "running"
        job.progress = f"uploading {job.label}"
        try:
            upload_folder(folder, job.hub_model_id, token=hub_token, timeout=UPLOAD_TIMEOUT_S)
        except Exception as exc:  # every failure ends the job with one readable line
            message = first_line(exc)
            # The hub helpers name the folder; the owner knows the checkpoint by its label.
            job.error = message.replace(str(folder), job.label)
            job.status = "failed"
            job.progress = None
            log.info("upload %s of %s failed: %s", job.upload_id, job.label, job.error)
        else:
            job.status = "completed"
            job.progress = None
            log.info("upload %s of %s to %s completed", job.upload_id, job.label, job.hub_model_id)


LOCAL = UploadJobs()
"""The uploads of local models (owner None)."""


def upload_status(upload_id: str) -> UploadStatus:
    """The status of a local ``upload_to_hub(..., async_upload=True)``."""
    return LOCAL.get(None, upload_id)
