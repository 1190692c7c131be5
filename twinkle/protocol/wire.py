"""The wire contract between ``twinkle_client`` and ``twinkle_server``: pydantic models only.

Management routes (JSON, all under ``/api/v1``)::

    GET    /health                                               -> HealthResponse (no auth)
    GET    /server                                               -> ServerInfo
    GET    /training_runs?limit=&offset=&name=&tag=              -> TrainingRunsResponse
    GET    /training_runs/{run_id}                               -> TrainingRun
    PATCH  /training_runs/{run_id}          TrainingRunUpdate    -> TrainingRun
    GET    /training_runs/{run_id}/checkpoints                   -> CheckpointsListResponse
    GET    /training_runs/{run_id}/checkpoints/{checkpoint_id}   -> Checkpoint
    DELETE /training_runs/{run_id}/checkpoints/{checkpoint_id}   -> DeleteCheckpointResponse
    GET    /training_runs/{run_id}/metrics?since_step=           -> MetricsResponse (training and eval points)
    GET    /uploads/{upload_id}                                  -> UploadStatus

Remote objects (bodies in msgpack, see ``codec``; JSON also accepted)::

    POST   /objects                       CreateObjectRequest -> ObjectInfo
    POST   /objects/{object_id}/calls     CallBatch           -> CallBatchResult
    DELETE /objects/{object_id}                               -> ObjectInfo

Request bodies may be gzipped (``Content-Encoding: gzip``: the client sends large call
batches so); a server that cannot inflate them answers 415 and gets plain bodies after.
A call's ``value`` is what the local method returns (``twinkle.protocol.api`` declares the
few that are spelled differently remotely); a model call's ``training_run_id`` says which
run its adapter trains afterwards (the client keeps it as ``model.training_run_id``).
A dataloader's ``_twinkle_next`` answers ``{"batches": [...], "sizes": [samples per batch], "end"}``.

Every error body is ``ErrorResponse``. Checkpoints are named by ``twinkle://`` paths
(``twinkle://<run_id>/weights/<name>``); the server never reveals or accepts its own paths.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .limits import MAX_SEQ

API_PREFIX = "/api/v1"
HUB_TOKEN_HEADERS = {"hf": "X-Twinkle-HF-Token", "ms": "X-Twinkle-MS-Token"}
"""Request headers that carry the user's own hub tokens to the server, which does every hub
read and write for that request with them (and anonymously without them); never stored."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------- errors


class ErrorInfo(_Model):
    """One failure: a stable code (see ``twinkle.errors``), a one-line message, and where it came from."""

    code: str
    message: str
    request_id: str | None = None
    call: str | None = None
    """For a failed remote call: the method that failed, e.g. ``'step'``."""
    blocked: bool = False
    """The call did not run because an earlier call of the same object failed (or never came)."""


class ErrorResponse(_Model):
    error: ErrorInfo


# ------------------------------------------------------------ server, health


class HealthResponse(_Model):
    status: Literal["ok"] = "ok"
    version: str


class ServerInfo(_Model):
    version: str
    base_model: str
    """The one model this server trains adapters on, e.g. ``builtin://tiny-qwen2``."""
    max_loras: int
    max_r: int
    used_slots: int
    """Adapter slots the caller's own adapters hold (other users' use is not shown)."""
    free_slots: int
    """Adapter slots free on the server now."""
    device: str
    idle_timeout_s: float
    user: str
    """The name of the user the key belongs to."""
    fuse_tokens: int = 0
    """Tokens one device pass may gather from several users' calls (0: each call runs alone)."""
    fused_passes: int = 0
    """Device passes that ran forward_backward/forward_only calls since the server started."""
    fused_calls: int = 0
    """The calls those passes ran (over ``fused_passes``: how many calls share a pass)."""


# ------------------------------------------------------------ runs, checkpoints


class Cursor(_Model):
    limit: int
    offset: int
    total_count: int


class RunConfig(_Model):
    """The settings that tell one run from another, read from what the server recorded (None:
    not set, or not known for a run recorded before the field existed)."""

    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: str | list[str] | None = None
    """``'all-linear'``, the module names, or None for peft's per-model default."""
    optimizer: str | None = None
    learning_rate: float | None = None
    """The optimizer's learning rate when it was set (a scheduler changes it afterwards)."""
    lr_scheduler: str | None = None
    gradient_accumulation_steps: int = 1
    batch_size: int | None = None
    """Rows of the largest ``forward_backward`` micro-batch so far (None before the first)."""
    dataset: str | None = None
    """The dataset id the user recorded for the run (``update_training_run``): the server cannot
    tell which dataset a batch came from."""


class TrainingRunUpdate(_Model):
    """``PATCH /training_runs/{run_id}``: the user's own description of a run. A field left out
    (or null) stays as it is; ``""`` clears a name or dataset, ``[]`` the tags. The rules are
    ``names.check_run_name``, ``check_run_tags`` and ``check_run_dataset``."""

    name: str | None = None
    tags: list[str] | None = None
    dataset: str | None = None


class TrainingRun(_Model):
    """One adapter's training history on the server."""

    training_run_id: str
    name: str | None = None
    """The name the user gave the run (``update_training_run``), if any."""
    tags: list[str] = Field(default_factory=list)
    config: RunConfig = Field(default_factory=RunConfig)
    """The run's key settings, gathered from ``lora_config``, ``components`` and its batches."""
    base_model: str
    model_owner: str
    """The owning user's *name* (never a key)."""
    adapter_name: str
    is_lora: bool = True
    lora_rank: int | None = None
    lora_config: dict[str, Any] = Field(default_factory=dict)
    gradient_accumulation_steps: int = 1
    components: dict[str, Any] = Field(default_factory=dict)
    """How template, processor, loss, optimizer and scheduler were set: ``{kind: {name, kwargs}}``."""
    created: datetime
    last_request_time: datetime | None = None
    cur_step: int = 0
    consumed_train_samples: int = 0
    last_loss: float | None = None
    num_checkpoints: int = 0
    last_checkpoint: str | None = None
    """The newest checkpoint's ``twinkle://`` path."""
    status: Literal["active", "detached"] = "detached"
    """``active`` while a live remote model trains it."""
    revision: int = 0
    """Bumped when the run is resumed from an earlier checkpoint (its later metrics are superseded)."""


class TrainingRunsResponse(_Model):
    training_runs: list[TrainingRun]
    cursor: Cursor


class Checkpoint(_Model):
    checkpoint_id: str
    """The name given to ``save`` (e.g. ``step-10``)."""
    checkpoint_type: Literal["training"] = "training"
    training_run_id: str
    twinkle_path: str
    tinker_path: str | None = None
    """The same checkpoint as the Tinker SDK names it (``tinker://<run>/weights/<name>``, or
    ``.../sampler_weights/<rest>`` for a ``sampler.<rest>`` checkpoint)."""
    time: datetime
    size_bytes: int
    step: int
    consumed_train_samples: int = 0
    loss: float | None = None
    """The last micro-batch loss before the save."""
    has_optimizer: bool
    base_model: str
    is_lora: bool = True
    lora_rank: int | None = None


class CheckpointsListResponse(_Model):
    checkpoints: list[Checkpoint]


class DeleteCheckpointResponse(_Model):
    success: bool
    message: str


class CheckpointPath(_Model):
    """What ``get_checkpoint_path`` returns; ``str()`` is the ``twinkle://`` path."""

    twinkle_path: str
    training_run_id: str
    checkpoint_id: str
    checkpoint_type: Literal["training"] = "training"

    @property
    def path(self) -> str:
        return self.twinkle_path

    def __str__(self) -> str:
        return self.twinkle_path


# ------------------------------------------------------------------ metrics


class MetricPoint(_Model):
    """One forward_backward micro-batch of a run.

    ``step`` is the optimizer step the micro-batch contributes to (1-based). When that
    step's update happens, ``grad_norm`` and ``lr`` are filled in and ``completed`` is true.
    """

    step: int
    micro_step: int
    loss: float | None
    num_tokens: int
    grad_norm: float | None = None
    lr: float | None = None
    completed: bool = False
    time: float
    """Wall time (unix seconds) of the forward_backward."""
    superseded: bool = False
    """True for points of a branch abandoned by a resume from an earlier checkpoint."""


class EvalPoint(_Model):
    """One ``forward_only`` call on a batch with labels (an eval batch) of a run.

    ``step`` is the adapter's optimizer updates done when the batch was evaluated (0: before
    any), so eval points after step ``s`` measure the weights that step ``s`` produced.
    """

    step: int
    loss: float | None
    """The batch's loss (None where it was not finite)."""
    num_tokens: int
    """The labelled tokens the loss is the mean over."""
    time: float
    """Wall time (unix seconds) of the forward_only."""
    superseded: bool = False
    """True for points of a branch abandoned by a resume from an earlier checkpoint."""


class EvalLoss(_Model):
    """A step's eval loss: the token-weighted mean loss of its live eval points."""

    step: int
    loss: float | None
    """None when one of the step's points had no finite loss."""
    num_tokens: int
    batches: int
    time: float
    """Wall time of the step's last eval point."""


def _field(point: Any, name: str) -> Any:
    return point.get(name) if isinstance(point, Mapping) else getattr(point, name, None)


def eval_losses(points: Iterable[Any]) -> list[EvalLoss]:
    """Per step, ascending, the eval loss of ``points`` (``EvalPoint`` objects or their dicts);
    superseded points are left out. The one definition of a step's eval loss (the dashboard's
    page repeats it in its script)."""
    by_step: dict[int, list[float]] = {}  # step -> [loss * tokens, tokens, batches, plain sum, time]
    for p in points:
        if _field(p, "superseded"):
            continue
        loss, tokens = _field(p, "loss"), int(_field(p, "num_tokens") or 0)
        value = math.nan if loss is None else float(loss)  # a diverged batch makes its step's mean None
        acc = by_step.setdefault(int(_field(p, "step")), [0.0, 0, 0, 0.0, 0.0])
        acc[0] += value * tokens
        acc[1] += tokens
        acc[2] += 1
        acc[3] += value
        acc[4] = max(acc[4], float(_field(p, "time") or 0.0))
    out = []
    for step in sorted(by_step):
        weighted, tokens, batches, plain, last = by_step[step]
        mean = weighted / tokens if tokens else plain / batches
        out.append(EvalLoss(step=step, loss=mean if math.isfinite(mean) else None, num_tokens=int(tokens),
                            batches=int(batches), time=last))
    return out


class MetricsResponse(_Model):
    training_run_id: str
    revision: int
    """The run's resume counter: when it changes, refetch from ``since_step=0``."""
    points: list[MetricPoint]
    """Points with ``step > since_step``, oldest first; superseded ones included."""
    total_steps: int | None = None
    """Planned optimizer steps, when the client announced them."""
    eval_points: list[EvalPoint] = Field(default_factory=list)
    """Eval points with ``step >= since_step``, oldest first; superseded ones included. The
    step ``since_step`` itself is sent again: its eval runs after its training points completed."""

    @property
    def eval_loss(self) -> list[EvalLoss]:
        """The eval loss per step of the live branch, ascending (see ``eval_losses``)."""
        return eval_losses(self.eval_points)


# ------------------------------------------------------------ remote objects


class CreateObjectRequest(_Model):
    kind: Literal["dataset", "dataloader", "model", "sampler"]
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ObjectInfo(_Model):
    object_id: str
    kind: Literal["dataset", "dataloader", "model", "sampler"]


class Call(_Model):
    seq: int = Field(ge=1, le=MAX_SEQ)
    """Per-object sequence number. The server runs each seq at most once and in order; a
    retried seq gets the stored result back if it repeats the call exactly (same method and
    arguments), else a ``conflict`` error (409)."""
    method: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class CallBatch(_Model):
    calls: list[Call] = Field(min_length=1)
    after: int | None = Field(default=None, ge=0, le=MAX_SEQ)
    """For a client with several batches of one object in flight: the last seq of the batch it
    sent before this one. The server runs this batch only once that one was handled (it waits
    for it up to ``ORDER_WAIT_S``; then these calls are refused, not run)."""
    failures: int | None = Field(default=None, ge=0, le=MAX_SEQ)
    """With ``after``: how many failed calls of this object the client had seen (the server's
    ``CallBatchResult.failures``) when it sent the batch. If the object has failed since, the
    batch was sent before the client knew, and its calls are refused (``blocked``), not run."""


class CallResult(_Model):
    seq: int
    ok: bool
    value: Any = None
    """The method's return value: the same value the local method returns."""
    error: ErrorInfo | None = None
    training_run_id: str | None = None
    """For a model call: the training run the call's adapter trains once the call ran (None
    when it has no adapter). It travels beside the value so that the value stays the local one."""


class CallBatchResult(_Model):
    results: list[CallResult]
    """One per executed (or failed) call, in order. Calls after a failure are not run and not listed."""
    failures: int = 0
    """Failed calls of this object so far (what the client sends back as ``CallBatch.failures``)."""


# ------------------------------------------------------------------ uploads


class UploadStatus(_Model):
    upload_id: str
    status: Literal["queued", "running", "completed", "failed"]
    hub_model_id: str
    error: str | None = None
    progress: str | None = None
