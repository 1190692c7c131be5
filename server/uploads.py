"""Background uploads of checkpoints to a model hub, with a status a client can poll.

Jobs live in memory (an upload does not survive a restart, and its status is of no use
after one). A hub token is handed to the upload and otherwise neither kept nor logged.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from twinkle.errors import NotFoundError, first_line
from twinkle.protocol.names import split_hub_id
from twinkle.protocol.wire import UploadStatus

log = logging.getLogger("twinkle_server.uploads")
UPLOAD_TIMEOUT_S = 30.0
MAX_JOBS_KEPT = 1000


@dataclass
class UploadJob:
    upload_id: str
    user_id: int
    hub_model_id: str
    twinkle_path: str
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


class UploadManager:
    """Starts upload threads and answers status queries, owner-checked."""

    def __init__(self) -> None:
        self._jobs: dict[str, UploadJob] = {}
        self._lock = threading.Lock()

    def start(
        self, user_id: int, folder: Path, twinkle_path: str, hub_model_id: str, hub_token: str | None
    ) -> UploadJob:
        split_hub_id(hub_model_id, "hub_model_id")
        job = UploadJob(f"up-{secrets.token_hex(8)}", user_id, hub_model_id, twinkle_path)
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

    def busy(self, twinkle_path: str) -> bool:
        """Whether an upload of the checkpoint ``twinkle_path`` is queued or running (its folder
        must then be neither deleted nor replaced)."""
        with self._lock:
            return any(
                j.twinkle_path == twinkle_path and j.status in ("queued", "running") for j in self._jobs.values()
            )

    def get(self, user_id: int, upload_id: str) -> UploadStatus:
        with self._lock:
            job = self._jobs.get(upload_id)
            if job is None or job.user_id != user_id:
                raise NotFoundError(f"no upload {upload_id!r}")
            return job.view()

    def _run(self, job: UploadJob, folder: Path, hub_token: str | None) -> None:
        from twinkle.hub import upload_folder

        job.status = "running"
        job.progress = f"uploading {job.twinkle_path}"
        try:
            upload_folder(folder, job.hub_model_id, token=hub_token, timeout=UPLOAD_TIMEOUT_S)
        except Exception as exc:  # every failure ends the job with one readable line
            message = first_line(exc)
            # The hub helpers name the local folder; clients only ever see twinkle:// paths.
            job.error = message.replace(str(folder), job.twinkle_path)
            job.status = "failed"
            job.progress = None
            log.info("upload %s of %s failed: %s", job.upload_id, job.twinkle_path, job.error)
        else:
            job.status = "completed"
            job.progress = None
            log.info("upload %s of %s to %s completed", job.upload_id, job.twinkle_path, job.hub_model_id)
