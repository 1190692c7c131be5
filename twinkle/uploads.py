"""Background uploads of checkpoints to a model hub, with a status that can be polled.

``upload_to_hub(..., async_upload=True)`` starts a job here and returns its id, locally and
on a server alike. Each job has an ``owner`` (None locally, the user on a server): only the
owner can see it. Jobs live in memory (an upload does not survive a restart, and its status
is of no use after one). A hub token is handed to the upload and otherwise neither kept nor
logged (a queued job holds it until its upload starts). A job also keeps the hub
credentials of the call that started it (``twinkle.hub.current_credentials``, the user's on a
server) until it starts, and uploads inside them: with ``hub_token`` when given, else with
the user's own token for that hub, never with the process's credentials.

At most ``max_running`` uploads run at once (the rest wait, status ``queued``), and one owner
may have at most ``max_per_owner`` jobs queued or running (more are refused with a
``CapacityError``): a server bounds its upload threads, and no user fills the queue.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Hashable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinkle.errors import CapacityError, NotFoundError, first_line
from twinkle.protocol.names import split_hub_id
from twinkle.protocol.wire import UploadStatus

log = logging.getLogger("twinkle.uploads")
UPLOAD_TIMEOUT_S = 30.0
MAX_JOBS_KEPT = 1000
MAX_RUNNING = 4
"""Uploads running at once by default (locally, too)."""


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
    credentials: Any = field(default=None, repr=False)
    """The ``HubCredentials`` the upload runs with (None: the SDKs' defaults); dropped when it starts."""

    def view(self) -> UploadStatus:
        return UploadStatus(
            upload_id=self.upload_id,
            status=self.status,  # type: ignore[arg-type]
            hub_model_id=self.hub_model_id,
            error=self.error,
            progress=self.progress,
        )


class UploadJobs:
    """Starts upload threads (at most ``max_running`` at once) and answers status queries,
    owner-checked. ``limit_note`` follows the per-owner limit in its refusal (how to change it)."""

    def __init__(self, max_running: int = MAX_RUNNING, max_per_owner: int | None = None, *,
                 limit_note: str = "") -> None:
        if max_running < 1 or (max_per_owner is not None and max_per_owner < 1):
            raise ValueError("upload limits must be >= 1")
        self.max_running = max_running
        self.max_per_owner = max_per_owner
        self.limit_note = limit_note
        self._jobs: dict[str, UploadJob] = {}
        self._waiting: deque[tuple[UploadJob, Path, str | None]] = deque()
        self._running = 0
        self._lock = threading.Lock()

    def start(
        self, owner: Hashable, folder: Path, label: str, hub_model_id: str, hub_token: str | None
    ) -> UploadJob:
        from .hub import current_credentials

        split_hub_id(hub_model_id, "hub_model_id")
        job = UploadJob(f"up-{secrets.token_hex(8)}", owner, hub_model_id, label,
                        credentials=current_credentials())
        with self._lock:
            if self.max_per_owner is not None:
                active = sum(1 for j in self._jobs.values() if j.owner == owner and j.status in ("queued", "running"))
                if active >= self.max_per_owner:
                    raise CapacityError(
                        f"you have {active} uploads queued or running, the most allowed "
                        f"(max_uploads_per_user={self.max_per_owner}{self.limit_note}); "
                        "start this one when one of them has ended"
                    )
            self._jobs[job.upload_id] = job
            if len(self._jobs) > MAX_JOBS_KEPT:
                finished = [j for j in self._jobs.values() if j.status in ("completed", "failed")]
                for old in sorted(finished, key=lambda j: j.created)[: len(self._jobs) - MAX_JOBS_KEPT]:
                    del self._jobs[old.upload_id]
            if self._running >= self.max_running:
                job.progress = "waiting for another upload to end"
                self._waiting.append((job, folder, hub_token))
                return job
            self._running += 1
        thread = threading.Thread(
            target=self._work, args=(job, folder, hub_token), name=f"twinkle-upload-{job.upload_id}", daemon=True
        )
        thread.start()
        return job

    def running(self) -> int:
        """Uploads running now."""
        with self._lock:
            return self._running

    def _work(self, job: UploadJob, folder: Path, hub_token: str | None) -> None:
        """Run ``job``, then the waiting jobs in order, until none is left (one upload slot)."""
        next_job: tuple[UploadJob, Path, str | None] | None = (job, folder, hub_token)
        while next_job is not None:
            self._run(*next_job)
            with self._lock:
                if self._waiting:
                    next_job = self._waiting.popleft()
                else:
                    next_job = None
                    self._running -= 1

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
        from .hub import hub_credentials, upload_folder

        credentials, job.credentials = job.credentials, None
        job.status = "running"
        job.progress = f"uploading {job.label}"
        try:
            # This thread may be another job's: run in this job's own credentials.
            with hub_credentials(credentials) if credentials is not None else nullcontext():
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
