"""The HTTP routes the Tinker SDK calls, under ``/api/v1`` (see ``server.tinker``).

Authentication: the SDK sends ``X-API-Key: tml-<twinkle key>``; the prefix is dropped and the
rest is checked exactly as a native ``Authorization: Bearer <twinkle key>`` is, so a Tinker
client is the same user with the same runs, checkpoints and limits.

Errors: a request the server refuses answers 400 (401 for the key, 404 for what does not exist
or is not yours, 413 for a body too large), never a status the SDK retries (408, 409, 429, 5xx)
unless retrying can help: a request answered busy (``Busy``: too much of the user's work waiting)
gets 429 with ``Retry-After: 1``, and the SDK sends it again. An operation that fails after it
was accepted fails its future with ``category: user`` (the caller's input) or ``server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from twinkle.errors import (
    AuthenticationError,
    InvalidArgumentError,
    NotFoundError,
    PayloadTooLargeError,
    TwinkleError,
    status_for,
)
from twinkle.protocol.limits import MAX_SEQ, MAX_SMALL_BODY_BYTES
from twinkle.protocol.names import SAMPLER_WEIGHTS_PREFIX, check_checkpoint_name, tinker_path

from ..auth import authenticate
from ..store import CheckpointRecord, RunRecord, User
from ..wire import _decode_pool, _read_capped, read_body
from . import convert
from .service import (
    CHUNK_BYTES_PER_TOKEN,
    FB_BYTES_PER_TOKEN,
    SAMPLE_BYTES_PER_TOKEN,
    SAMPLES_IN_FLIGHT,
    Busy,
    TinkerService,
    fb_body_limit,
    sample_body_limit,
)

KEY_PREFIX = "tml-"
PROTOBUF = "application/x-protobuf"
_RETRIED = {408, 409, 429}


class TinkerRoute(APIRoute):
    """Answers a refused request in a status the SDK does not retry (it retries 409 and 429 for
    minutes), with the same one-line error body as every other route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except Busy as exc:
                return JSONResponse({"error": {"code": "busy", "message": str(exc)}}, status_code=429,
                                    headers={"Retry-After": "1"})
            except TwinkleError as exc:
                ctx = request.app.state.ctx
                request_id = request.scope.get("state", {}).get("request_id")
                info = ctx.error_info(exc, request_id)
                status = status_for(info.code)
                if status in _RETRIED:
                    status = 400
                return JSONResponse({"error": info.model_dump()}, status_code=status)

        return guarded


router = APIRouter(route_class=TinkerRoute, include_in_schema=False)


def tinker_user(request: Request) -> User:
    """The user whose key is in ``X-API-Key: tml-<twinkle key>`` (a sync dependency: the lookup
    runs off the event loop)."""
    key = request.headers.get("x-api-key") or ""
    if not key.startswith(KEY_PREFIX):
        raise AuthenticationError("missing API key: send X-API-Key: tml-<your twinkle key>")
    return authenticate(request.app.state.ctx.store, f"Bearer {key[len(KEY_PREFIX):]}")


TinkerUser = Annotated[User, Depends(tinker_user)]


def service(request: Request) -> TinkerService:
    return request.app.state.tinker


async def body(request: Request, limit: int = MAX_SMALL_BODY_BYTES) -> dict[str, Any]:
    data = await read_body(request, limit=limit)
    if not isinstance(data, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return data


def future(request_id: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, **extra}


# ---------------------------------------------------------------------------- session


@router.post("/client/config")
async def client_config(request: Request, user: TinkerUser) -> dict[str, Any]:
    """Feature flags: API keys (no token exchange), httpx, uncompressed protobuf, one
    ``retrieve_future`` poll per request; and the server's limits: the SDK splits a
    ``forward_backward``'s data into requests of at most ``fwdbwd_max_chunk_bytes_count``
    estimated bytes (``CHUNK_BYTES_PER_TOKEN`` per token of ``max_tokens_per_call``), and a
    sampling client keeps at most ``sample_max_concurrent_requests`` requests in flight (the
    server's per-user bound, ``SAMPLES_IN_FLIGHT``)."""
    max_tokens = request.app.state.ctx.settings.max_tokens_per_call
    return {
        "fwdbwd_max_chunk_bytes_count": CHUNK_BYTES_PER_TOKEN * max_tokens,
        "sample_max_concurrent_requests": SAMPLES_IN_FLIGHT,
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "use_pyqwest_transport": False,
        "proto_compress_fwdbwd": False,
        "parallel_fwdbwd_chunks": True,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
    }


@router.post("/client/dynamic_config")
async def client_dynamic_config(user: TinkerUser) -> dict[str, Any]:
    return {"sample_cancel_enabled": False}


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request, user: TinkerUser) -> dict[str, Any]:
    ctx = request.app.state.ctx
    return {"supported_models": [{"model_name": ctx.model.model_id, "trainable": True, "sampleable": True}]}


@router.post("/create_session")
async def create_session(request: Request, user: TinkerUser) -> dict[str, Any]:
    await body(request)
    return {"type": "create_session", "session_id": service(request).create_session(user)}


@router.post("/session_heartbeat")
async def heartbeat(request: Request, user: TinkerUser) -> Response:
    session = service(request).heartbeat(user, (await body(request)).get("session_id"))
    if session.finished:
        return JSONResponse({"error": {"code": "gone", "message": "the session has finished"}}, status_code=410)
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request, user: TinkerUser) -> dict[str, Any]:
    await body(request)
    await service(request).finish(user, session_id)
    return {}


@router.post("/telemetry")
async def telemetry(request: Request, user: TinkerUser) -> dict[str, Any]:
    """Accepted and dropped: this server keeps no client telemetry."""
    await _read_capped(request, MAX_SMALL_BODY_BYTES)
    return {"status": "accepted"}


# ----------------------------------------------------------------------------- models


@router.post("/create_model")
async def create_model(request: Request, user: TinkerUser) -> dict[str, Any]:
    return future(await service(request).create_model(user, await body(request)))


@router.post("/get_info")
async def get_info(request: Request, user: TinkerUser) -> dict[str, Any]:
    return service(request).info(user, (await body(request)).get("model_id"))


@router.post("/forward_backward")
async def forward_backward(request: Request, user: TinkerUser) -> dict[str, Any]:
    media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media != PROTOBUF:
        raise InvalidArgumentError(f"forward_backward takes a protobuf body ({PROTOBUF}); upgrade the tinker SDK")
    if (request.headers.get("content-encoding") or "identity").strip().lower() != "identity":
        raise InvalidArgumentError("forward_backward bodies must not be compressed here")
    forward_only = request.query_params.get("forward_only", "false").lower() == "true"
    svc = service(request)
    raw = await _read_limited(request, fb_body_limit(svc.max_tokens), FB_BYTES_PER_TOKEN, svc.max_tokens)
    parsed = await asyncio.wrap_future(_decode_pool().submit(svc.read_forward_backward, raw, forward_only))
    del raw
    return future(svc.forward_backward(user, parsed))


async def _read_limited(request: Request, limit: int, per_token: int, max_tokens: int) -> bytearray:
    """The raw body, refused (413) past ``limit``: ``per_token`` bytes per token of the
    server's ``max_tokens_per_call`` (and a little more), so that no more is read than the
    largest request the token limit admits."""
    try:
        return await _read_capped(request, limit)
    except PayloadTooLargeError:
        raise PayloadTooLargeError(
            f"request body is more than {limit >> 10} KiB, the most one request may carry here ({per_token} bytes "
            f"per token of max_tokens_per_call={max_tokens}); send less data per request"
        ) from None


@router.post("/optim_step")
async def optim_step(request: Request, user: TinkerUser) -> dict[str, Any]:
    return future(service(request).optim_step(user, await body(request)))


@router.post("/save_weights")
async def save_weights(request: Request, user: TinkerUser) -> dict[str, Any]:
    return future(service(request).save_state(user, await body(request)))


@router.post("/load_weights")
async def load_weights(request: Request, user: TinkerUser) -> dict[str, Any]:
    data = await body(request)
    svc = service(request)
    if data.get("session_id") is not None:
        return future(await svc.load_as_new_model(user, data))
    return future(svc.load_into(user, data))


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request, user: TinkerUser) -> dict[str, Any]:
    return future(service(request).save_for_sampler(user, await body(request)))


@router.post("/retrieve_future")
async def retrieve_future(request: Request, user: TinkerUser) -> Response:
    svc = service(request)
    request_id = (await body(request)).get("request_id")
    stored = await svc.result(user, request_id, svc.long_poll_s)
    if stored is None:
        return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    if stored.message is None:
        return Response(stored.body, media_type="application/json")
    if PROTOBUF in (request.headers.get("accept") or ""):
        return Response(stored.body, media_type=PROTOBUF)
    as_json = convert.PROTO_AS_JSON[stored.message]
    data = await asyncio.wrap_future(_decode_pool().submit(lambda: convert.json_bytes(as_json(stored.body))))
    return Response(data, media_type="application/json")


# ---------------------------------------------------------------------------- sampling


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, user: TinkerUser) -> dict[str, Any]:
    sampler_id = await service(request).create_sampler(user, await body(request))
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request, user: TinkerUser) -> dict[str, Any]:
    return service(request).sampler_info(user, sampler_id)


@router.post("/asample")
async def asample(request: Request, user: TinkerUser) -> Response:
    svc = service(request)
    limit = sample_body_limit(svc.max_tokens)
    try:
        parsed = await read_body(request, svc.read_sample, limit=limit)
    except PayloadTooLargeError:
        raise PayloadTooLargeError(
            f"request body is more than {limit >> 10} KiB, the most one sampling request may carry here "
            f"({SAMPLE_BYTES_PER_TOKEN} bytes per token of max_tokens_per_call={svc.max_tokens})"
        ) from None
    request_id, ids = svc.sample(user, parsed)
    return JSONResponse(future(request_id, sample_sequence_ids=ids))


# ------------------------------------------------------------------ runs and checkpoints


def _time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts or 0.0, tz=timezone.utc).isoformat()


def _checkpoint(c: CheckpointRecord) -> dict[str, Any]:
    sampler = c.name.startswith(SAMPLER_WEIGHTS_PREFIX)
    path = tinker_path(c.run_id, c.name)
    return {
        "checkpoint_id": path.split("/", 3)[3],
        "checkpoint_type": "sampler" if sampler else "training",
        "time": _time(c.time),
        "tinker_path": path,
        "size_bytes": c.size_bytes,
        "public": False,
    }


def _run(r: RunRecord, last: CheckpointRecord | None) -> dict[str, Any]:
    return {
        "training_run_id": r.run_id,
        "base_model": r.base_model,
        "model_owner": r.owner_name,
        "is_lora": True,
        "corrupted": False,
        "lora_rank": r.lora_rank,
        "last_request_time": _time(r.last_request_time or r.created),
        "last_checkpoint": None if last is None else _checkpoint(last),
        "user_metadata": None,
    }


def _run_view(ctx: Any, user: User, run: RunRecord) -> dict[str, Any]:
    checkpoints = ctx.store.list_checkpoints(user.id, run.run_id)
    training = [c for c in checkpoints if not c.name.startswith(SAMPLER_WEIGHTS_PREFIX)]
    view = _run(run, training[-1] if training else None)
    sampler = [c for c in checkpoints if c.name.startswith(SAMPLER_WEIGHTS_PREFIX)]
    view["last_sampler_checkpoint"] = _checkpoint(sampler[-1]) if sampler else None
    return view


@router.get("/training_runs")
def list_training_runs(
    request: Request, user: TinkerUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
) -> dict[str, Any]:
    """The caller's runs (native and Tinker-driven alike), most recent activity first."""
    ctx = request.app.state.ctx
    runs, total = ctx.store.list_runs(user.id, limit, offset)
    return {"training_runs": [_run_view(ctx, user, r) for r in runs],
            "cursor": {"offset": offset, "limit": limit, "total_count": total}}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, request: Request, user: TinkerUser) -> dict[str, Any]:
    ctx = request.app.state.ctx
    return _run_view(ctx, user, ctx.store.get_run(user.id, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, request: Request, user: TinkerUser) -> dict[str, Any]:
    ctx = request.app.state.ctx
    ctx.store.get_run(user.id, run_id)
    return {"checkpoints": [_checkpoint(c) for c in ctx.store.list_checkpoints(user.id, run_id)], "cursor": None}


def _checkpoint_name(checkpoint_id: str) -> str:
    kind, _, name = checkpoint_id.partition("/")
    if kind not in ("weights", "sampler_weights") or not name:
        raise NotFoundError(f"no checkpoint {checkpoint_id[:200]!r}")
    check_checkpoint_name(name)
    return name if kind == "weights" else SAMPLER_WEIGHTS_PREFIX + name


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request, user: TinkerUser) -> dict[str, Any]:
    ctx = request.app.state.ctx
    name = _checkpoint_name(checkpoint_id)
    await asyncio.wrap_future(ctx.worker.submit(user.id, lambda: ctx.book.delete_checkpoint(user.id, run_id, name)))
    return {}


@router.post("/weights_info")
async def weights_info(request: Request, user: TinkerUser) -> dict[str, Any]:
    ctx = request.app.state.ctx
    path = convert.checkpoint_path((await body(request)).get("tinker_path"), "tinker_path")
    row, _ = await asyncio.to_thread(ctx.book.checkpoints.resolve, user.id, path)
    run = await asyncio.to_thread(ctx.store.get_run, user.id, row.run_id)
    targets = run.lora_config.get("target_modules")
    names = set(targets) if isinstance(targets, list) else set()
    info: dict[str, Any] = {"base_model": run.base_model, "is_lora": True, "lora_rank": run.lora_rank}
    if names:
        info.update(train_attn=bool(names & set(convert.ATTENTION_MODULES)),
                    train_mlp=bool(names & set(convert.MLP_MODULES)),
                    train_unembed=bool(names & set(convert.UNEMBED_MODULES)))
    return info

