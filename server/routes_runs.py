"""Management routes: health, server info, training runs, checkpoints, metrics, uploads (JSON).

Every id in a path is looked up among the caller's own records only, so another user's
run, checkpoint or upload is answered exactly like one that does not exist: 404.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from twinkle.protocol.limits import MAX_SEQ, MAX_SMALL_BODY_BYTES
from twinkle.protocol.names import (
    MAX_RUN_NAME,
    MAX_RUN_TAGS,
    check_run_dataset,
    check_run_name,
    check_run_tags,
)
from twinkle.protocol.wire import (
    Checkpoint,
    CheckpointsListResponse,
    Cursor,
    DeleteCheckpointResponse,
    HealthResponse,
    MetricsResponse,
    ServerInfo,
    TrainingRun,
    TrainingRunsResponse,
    TrainingRunUpdate,
    UploadStatus,
)

from . import __version__, views
from .context import ServerContext
from .deps import Ctx, CurrentUser
from .model_handle import ModelHandle
from .wire import read_body

router = APIRouter()
_ERRORS = {401: {"description": "missing or invalid API key"}, 404: {"description": "not found (or not yours)"}}


@router.get("/health", response_model=HealthResponse, tags=["server"])
async def health() -> HealthResponse:
    """Liveness; the only API route that needs no key. Answered on the event loop itself (no
    thread pool), so it answers while every worker thread is busy."""
    return HealthResponse(version=__version__)


def _slots_held(ctx: ServerContext, user_id: int) -> int:
    """Adapter slots the user's live models hold."""
    return sum(len(obj.instance.links) for obj in ctx.objects.of_user(user_id) if isinstance(obj.instance, ModelHandle))


@router.get("/server", response_model=ServerInfo, tags=["server"], responses=_ERRORS)
def server_info(user: CurrentUser, ctx: Ctx) -> ServerInfo:
    """The served model and its limits; of the adapter slots, the caller's own and the free ones
    (never what other users hold)."""
    model = ctx.model
    return ServerInfo(
        version=__version__,
        base_model=model.model_id,
        max_loras=model.max_loras,
        max_r=model.max_r,
        used_slots=_slots_held(ctx, user.id),
        free_slots=model.free_slots,
        device=ctx.device,
        idle_timeout_s=ctx.settings.idle_timeout,
        user=user.name,
        fuse_tokens=ctx.worker.fuse_tokens,
        fused_passes=ctx.worker.passes,
        fused_calls=ctx.worker.fused_calls,
    )


@router.get("/training_runs", response_model=TrainingRunsResponse, tags=["runs"], responses=_ERRORS)
def list_training_runs(
    user: CurrentUser,
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    name: Annotated[str | None, Query(max_length=MAX_RUN_NAME)] = None,
    tag: Annotated[list[str] | None, Query(max_length=MAX_RUN_TAGS)] = None,
) -> TrainingRunsResponse:
    """The caller's runs, most recent activity first; with ``name``, those whose name contains
    it (any case); with ``tag`` (repeatable), those that carry every one of the tags."""
    runs, total = ctx.store.list_runs(user.id, limit, offset, name=check_run_name(name or ""),
                                      tags=check_run_tags(tag or []))
    return TrainingRunsResponse(training_runs=[views.training_run(r) for r in runs], cursor=Cursor(limit=limit, offset=offset, total_count=total))


@router.get("/training_runs/{run_id}", response_model=TrainingRun, tags=["runs"], responses=_ERRORS)
def get_training_run(run_id: str, user: CurrentUser,
                     ctx: Ctx) -> TrainingRun:
    return views.training_run(ctx.store.get_run(user.id, run_id))


@router.patch("/training_runs/{run_id}", response_model=TrainingRun, tags=["runs"],
              responses={**_ERRORS, 400: {"description": "a name, tag or dataset the rules refuse"}})
async def describe_training_run(run_id: str, request: Request, user: CurrentUser, ctx: Ctx) -> TrainingRun:
    """Set the run's name, tags and dataset id (``TrainingRunUpdate``); a field left out stays."""
    # Whose run it is comes first: another user's run is "not found" whatever the body holds.
    await run_in_threadpool(ctx.store.get_run, user.id, run_id)
    update = await read_body(request, _description, limit=MAX_SMALL_BODY_BYTES)
    run = await run_in_threadpool(ctx.store.describe_run, user.id, run_id, **update)
    return views.training_run(run)


def _description(data: object) -> dict[str, object]:
    """A ``TrainingRunUpdate`` body as checked values for ``Store.describe_run`` (decoding thread)."""
    try:
        update = TrainingRunUpdate.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None
    return {
        "name": None if update.name is None else check_run_name(update.name),
        "tags": None if update.tags is None else check_run_tags(update.tags),
        "dataset": None if update.dataset is None else check_run_dataset(update.dataset),
    }


@router.get("/training_runs/{run_id}/checkpoints", response_model=CheckpointsListResponse, tags=["runs"],
            responses=_ERRORS)
def list_checkpoints(run_id: str, user: CurrentUser,
                     ctx: Ctx) -> CheckpointsListResponse:
    """The run's checkpoints, oldest first."""
    return CheckpointsListResponse(checkpoints=[views.checkpoint(c) for c in ctx.store.list_checkpoints(user.id, run_id)])


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id}", response_model=Checkpoint, tags=["runs"],
            responses=_ERRORS)
def get_checkpoint(run_id: str, checkpoint_id: str, user: CurrentUser,
                   ctx: Ctx) -> Checkpoint:
    return views.checkpoint(ctx.store.get_checkpoint(user.id, run_id, checkpoint_id))


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id}", response_model=DeleteCheckpointResponse,
               tags=["runs"], responses=_ERRORS)
async def delete_checkpoint(run_id: str, checkpoint_id: str, user: CurrentUser,
                            ctx: Ctx) -> DeleteCheckpointResponse:
    """Delete the folder, then the record. Runs on the device worker, in line with saves."""
    path = await asyncio.wrap_future(
        ctx.worker.submit(user.id, lambda: ctx.book.delete_checkpoint(user.id, run_id, checkpoint_id))
    )
    return DeleteCheckpointResponse(success=True, message=f"deleted {path}")


@router.get("/training_runs/{run_id}/metrics", response_model=MetricsResponse, tags=["runs"], responses=_ERRORS)
def get_metrics(
    run_id: str,
    user: CurrentUser,
    ctx: Ctx,
    since_step: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
) -> MetricsResponse:
    """Training points of steps after ``since_step`` and eval points from ``since_step`` on,
    oldest first, superseded ones included (flagged)."""
    ctx.store.get_run(user.id, run_id)
    revision, total_steps = ctx.store.run_revision(run_id)
    return MetricsResponse(
        training_run_id=run_id,
        revision=revision,
        points=[views.metric_point(p) for p in ctx.store.metric_points(run_id, since_step)],
        total_steps=total_steps,
        eval_points=[views.eval_point(p) for p in ctx.store.eval_points(run_id, since_step)],
    )


@router.get("/uploads/{upload_id}", response_model=UploadStatus, tags=["uploads"], responses=_ERRORS)
def get_upload(upload_id: str, user: CurrentUser,
               ctx: Ctx) -> UploadStatus:
    return ctx.uploads.get(user.id, upload_id)
