"""Stored records as the wire models a client reads (``twinkle.protocol.wire``).

The database layer knows nothing of the wire contract; the routes show its records through
these functions, so either side can change its shape without the other noticing.
"""

from __future__ import annotations

from datetime import datetime, timezone

from twinkle.protocol.names import tinker_path, twinkle_path
from twinkle.protocol.wire import Checkpoint, EvalPoint, MetricPoint, RunConfig, TrainingRun

from .store import CheckpointRecord, EvalPointRecord, PointRecord, RunRecord


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def run_config(r: RunRecord) -> RunConfig:
    """The run's key settings from its records; anything unrecorded stays None."""
    lora, components = r.lora_config, r.components
    optimizer = components.get("optimizer") or {}
    scheduler = components.get("lr_scheduler") or {}
    lr = optimizer.get("lr", (optimizer.get("kwargs") or {}).get("lr"))
    alpha, targets = lora.get("lora_alpha"), lora.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        targets = None  # peft's per-model default, or a form this view does not show
    return RunConfig(
        lora_rank=r.lora_rank,
        lora_alpha=alpha if isinstance(alpha, int | float) else None,
        target_modules=targets,
        optimizer=optimizer.get("name"),
        learning_rate=lr if isinstance(lr, int | float) and not isinstance(lr, bool) else None,
        lr_scheduler=scheduler.get("name"),
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        batch_size=r.batch_size,
        dataset=r.dataset,
    )


def training_run(r: RunRecord) -> TrainingRun:
    return TrainingRun(
        training_run_id=r.run_id,
        name=r.name,
        tags=r.tags,
        config=run_config(r),
        base_model=r.base_model,
        model_owner=r.owner_name,
        adapter_name=r.adapter_name,
        lora_rank=r.lora_rank,
        lora_config=r.lora_config,
        gradient_accumulation_steps=r.gradient_accumulation_steps,
        components=r.components,
        created=_dt(r.created),
        last_request_time=_dt(r.last_request_time),
        cur_step=r.cur_step,
        consumed_train_samples=r.consumed_train_samples,
        last_loss=r.last_loss,
        num_checkpoints=r.num_checkpoints,
        last_checkpoint=twinkle_path(r.run_id, r.last_checkpoint_name) if r.last_checkpoint_name else None,
        status=r.status,  # type: ignore[arg-type]
        revision=r.revision,
    )


def checkpoint(c: CheckpointRecord) -> Checkpoint:
    return Checkpoint(
        checkpoint_id=c.name,
        training_run_id=c.run_id,
        twinkle_path=twinkle_path(c.run_id, c.name),
        tinker_path=tinker_path(c.run_id, c.name),
        time=_dt(c.time),
        size_bytes=c.size_bytes,
        step=c.step,
        consumed_train_samples=c.consumed_train_samples,
        loss=c.loss,
        has_optimizer=c.has_optimizer,
        base_model=c.base_model,
        lora_rank=c.lora_rank,
    )


def eval_point(p: EvalPointRecord) -> EvalPoint:
    return EvalPoint(step=p.step, loss=p.loss, num_tokens=p.num_tokens, time=p.time, superseded=p.superseded)


def metric_point(p: PointRecord) -> MetricPoint:
    return MetricPoint(
        step=p.step,
        micro_step=p.micro_step,
        loss=p.loss,
        num_tokens=p.num_tokens,
        grad_norm=p.grad_norm,
        lr=p.lr,
        completed=p.completed,
        time=p.time,
        superseded=p.superseded,
    )
