"""Remote object routes: create an object, run a batch of calls on it, delete it.

Bodies are msgpack (or JSON, see ``wire``), decoded and validated off the event loop. A call
batch runs exactly once per call sequence number: a retried batch gets the stored results
back, and a retry that arrives while the first attempt still runs waits for it (the object's
lock) and then does the same. A retry must repeat its calls exactly (method and a digest of
the arguments): a different call under a spent seq is a ``ConflictError`` (409), never
answered from the record of another call.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from twinkle.errors import ConflictError, InvalidArgumentError, NotFoundError, ServerError, TwinkleError
from twinkle.hub import HubCredentials
from twinkle.protocol import codec
from twinkle.protocol.api import API_BY_KIND, MODEL, NEXT_BATCHES, START_EPOCH, Stepwise
from twinkle.protocol.limits import MAX_CALLS_PER_BATCH, ORDER_WAIT_S
from twinkle.protocol.wire import (
    Call,
    CallBatch,
    CallBatchResult,
    CallResult,
    CreateObjectRequest,
    ErrorInfo,
    ObjectInfo,
)

from .context import ServerContext
from .deps import Ctx, CurrentUser, Hub
from .kinds import (
    DEVICE_KINDS,
    call_data_object,
    check_call_size,
    check_method,
    check_model_kwargs,
    create_dataloader,
    create_dataset,
)
from .model_handle import ModelHandle, SamplerHandle, run_together
from .objects import RemoteObject, new_object_id
from .store import User
from .wire import read_body, respond, respond_off_loop
from .worker import Fusable

router = APIRouter(tags=["objects"])
log = logging.getLogger("twinkle_server.objects")
_ERRORS = {
    400: {"description": "malformed body or invalid arguments"},
    401: {"description": "missing or invalid API key"},
    404: {"description": "no such object (or not yours)"},
}
MAX_IDEMPOTENCY_KEY = 200
_KEY_REUSED = "this Idempotency-Key was already used for a different request"


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) from None


def _parse_create(data: Any, with_fingerprint: bool) -> tuple[CreateObjectRequest, str | None]:
    """The validated creation request and, for an Idempotency-Key, its fingerprint (decoding thread)."""
    req = _validate(CreateObjectRequest, data)
    return req, codec.digest(data) if with_fingerprint else None


def _parse_batch(data: Any) -> tuple[CallBatch, list[tuple[str, str]]]:
    """The validated batch and what each call is (method, digest), for matching retries (decoding thread)."""
    calls = data.get("calls") if isinstance(data, dict) else None
    if isinstance(calls, list) and len(calls) > MAX_CALLS_PER_BATCH:
        raise InvalidArgumentError(
            f"a request may carry at most {MAX_CALLS_PER_BATCH} calls, got {len(calls)}; "
            "send the rest in another request"
        )
    batch: CallBatch = _validate(CallBatch, data)
    for before, after in zip(batch.calls, batch.calls[1:], strict=False):
        if after.seq <= before.seq:
            raise InvalidArgumentError(f"seqs must increase within a request: {after.seq} follows {before.seq}")
    return batch, [(c.method, codec.digest([c.method, c.args, c.kwargs])) for c in batch.calls]


_PLAIN_TYPES: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "dict": (dict,)}


def _check_plain_types(label: str, signature: inspect.Signature, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse an argument whose declared type is a plain ``bool``, ``int`` or ``dict`` (maybe
    ``| None``) when the value sent is something else (a list, an array, a string...): passed
    on, it would fail deep inside the library or the run records as if the server were at fault."""
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return  # the call's own binding reports it
    for name, value in list(bound.arguments.items())[1:]:
        annotation = signature.parameters[name].annotation
        if not isinstance(annotation, str):
            continue
        parts = [part.strip() for part in annotation.split("|")]
        if value is None and "None" in parts:
            continue
        kinds = [_PLAIN_TYPES.get(part.split("[", 1)[0]) for part in parts if part != "None"]
        if len(kinds) != 1 or kinds[0] is None:
            continue
        allowed = kinds[0]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise InvalidArgumentError(
                f"{label}: {name} must be {annotation.replace('dict[str, Any]', 'a dict')}, "
                f"got {type(value).__name__}"
            )


def _check_call_types(kind: str, method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    if kind == "dataloader" and method in (START_EPOCH, NEXT_BATCHES):
        return
    _check_plain_types(f"{method}()", API_BY_KIND[kind].method(method).signature, args, kwargs)


def _pending(request: Request) -> dict[tuple[int, str], tuple[str, asyncio.Future[ObjectInfo]]]:
    """Creations in progress under an Idempotency-Key: (user id, key) -> (body fingerprint, outcome)."""
    state = request.app.state
    if not hasattr(state, "pending_creations"):
        state.pending_creations = {}
    return state.pending_creations


@router.post("/objects", response_model=ObjectInfo, responses=_ERRORS)
async def create_object(request: Request, user: CurrentUser, ctx: Ctx, hub: Hub) -> Response:
    """Create a remote dataset, dataloader or model. With an ``Idempotency-Key`` header, a repeat
    of the same request (same user and key, while the object lives) returns the same object."""
    key = request.headers.get("idempotency-key")
    req, fingerprint = await read_body(request, lambda data: _parse_create(data, key is not None))
    if key is None:
        return respond(request, await _create(ctx, user, req, None, None, hub))
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidArgumentError(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters")
    assert fingerprint is not None
    pending = _pending(request)
    slot = (user.id, key)
    existing = ctx.objects.by_idempotency_key(user.id, key)
    if existing is not None:
        if existing.fingerprint != fingerprint:
            raise InvalidArgumentError(_KEY_REUSED)
        return respond(request, existing.info())
    if slot in pending:
        # The first request with this key is still creating the object: share its outcome,
        # if this is the same request.
        first_fingerprint, first = pending[slot]
        if first_fingerprint != fingerprint:
            raise InvalidArgumentError(_KEY_REUSED)
        return respond(request, await asyncio.shield(first))
    future: asyncio.Future[ObjectInfo] = asyncio.get_running_loop().create_future()
    pending[slot] = (fingerprint, future)
    try:
        info = await _create(ctx, user, req, key, fingerprint, hub)
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # mark retrieved: nobody may be waiting
        raise
    else:
        future.set_result(info)
    finally:
        pending.pop(slot, None)
    return respond(request, info)


async def _create(ctx: ServerContext, user: User, req: CreateObjectRequest, key: str | None,
                  fingerprint: str | None, hub: HubCredentials) -> ObjectInfo:
    room = ctx.objects.reserve(user.id)  # counted against the user's cap from now on
    object_id = new_object_id()

    def resolve(ref: str) -> Any:
        return ctx.objects.resolve(user.id, ref)

    def build() -> Any:
        args = codec.from_wire(req.args, resolve)
        kwargs = codec.from_wire(req.kwargs, resolve)
        api = API_BY_KIND[req.kind]
        _check_plain_types(f"{api.name}()", api.init, args, kwargs)
        if req.kind == "model":
            check_model_kwargs(ctx.model, ctx.dtype, args, kwargs, allow_local=ctx.settings.allow_local_data)
            return ModelHandle(ctx.book, user, object_id)
        if req.kind == "sampler":
            check_model_kwargs(ctx.model, ctx.dtype, args, kwargs, allow_local=ctx.settings.allow_local_data,
                               api=api)
            return SamplerHandle(ctx.book, user, object_id)
        if req.kind == "dataset":
            return create_dataset(ctx.settings, args, kwargs)
        return create_dataloader(args, kwargs)

    try:
        # Loading a dataset can take a while: never on the event loop.
        instance = await ctx.run("data", user.id, build, hub)
        obj = RemoteObject(object_id, req.kind, user.id, user.name, instance, idempotency_key=key,
                           fingerprint=fingerprint)
        ctx.objects.add(obj, room)
    finally:
        room.release()  # a failed build gives the room back (a no-op once added)
    log.info("user %s: created %s %s", user.name, req.kind, object_id)
    return obj.info()


@router.post("/objects/{object_id}/calls", response_model=CallBatchResult, responses=_ERRORS)
async def call_object(object_id: str, request: Request, user: CurrentUser, ctx: Ctx, hub: Hub) -> Response:
    """Run calls in order; stop at the first failure. Per-call errors keep the status 200."""
    batch, identities = await read_body(request, _parse_batch)
    # Shielded: once started, a batch finishes and records its results even if the client goes away,
    # so that the retry finds them instead of running a call a second time.
    task = asyncio.ensure_future(_run_batch(ctx, user, object_id, batch, identities, _request_id(request), hub))
    return await respond_off_loop(request, await asyncio.shield(task))


async def _run_batch(ctx: ServerContext, user: User, object_id: str, batch: CallBatch,
                     identities: list[tuple[str, str]], request_id: str | None,
                     hub: HubCredentials) -> CallBatchResult:
    obj = ctx.objects.acquire(user.id, object_id)
    last = batch.calls[-1].seq
    obj.arrived.add(last)
    try:
        arrived_in_time = await _wait_for_predecessor(obj, batch)
        async with obj.lock:
            if obj.closed:
                raise NotFoundError(f"no object {object_id!r} (it was deleted)")
            try:
                results = await _run_calls(ctx, user, obj, batch, identities, request_id, hub, arrived_in_time)
            finally:
                async with obj.turn:
                    obj.handled_through = max(obj.handled_through, last)
                    obj.turn.notify_all()
            # The failures up to this batch's last call, not later ones: a reply to a resent
            # batch must not tell its client about a failure it has not been shown.
            return CallBatchResult(results=results, failures=obj.failures_through(last))
    finally:
        obj.arrived.discard(last)
        ctx.objects.release(obj)


async def _wait_for_predecessor(obj: RemoteObject, batch: CallBatch) -> bool:
    """Hold a pipelined batch until the one its client sent before it was handled (requests of
    one client may arrive out of order); False if that one did not even arrive within
    ``ORDER_WAIT_S`` (one that arrived is waited for however long its calls run)."""
    after = batch.after
    if after is None or obj.handled_through >= after:
        return True
    deadline = asyncio.get_running_loop().time() + ORDER_WAIT_S
    async with obj.turn:
        # In slices: a deleted object (closed from another thread) must not hold a request.
        while obj.handled_through < after and not obj.closed:
            left = deadline - asyncio.get_running_loop().time()
            if after in obj.arrived:
                left = 1.0  # it is here and running (or queued): wait for it
            elif left <= 0:
                return False
            try:
                await asyncio.wait_for(obj.turn.wait(), min(left, 1.0))
            except (TimeoutError, asyncio.TimeoutError):
                pass
    return True


async def _run_calls(ctx: ServerContext, user: User, obj: RemoteObject, batch: CallBatch,
                     identities: list[tuple[str, str]], request_id: str | None, hub: HubCredentials,
                     arrived_in_time: bool) -> list[CallResult]:
    # Seqs increase within a batch, so every retried call comes before the first new one:
    # a mismatch is refused before anything runs.
    for call, identity in zip(batch.calls, identities, strict=True):
        if call.seq <= obj.last_seq:
            _check_retry(obj, call, identity)
    refusal = _refusal(obj, batch, arrived_in_time)
    results: list[CallResult] = []
    for call, identity in zip(batch.calls, identities, strict=True):
        if call.seq <= obj.last_seq:
            result = obj.results.get(call.seq) or CallResult(
                seq=call.seq,
                ok=False,
                error=ErrorInfo(code="invalid_state", message=_stale_message(obj, call.seq),
                                request_id=request_id, call=call.method, blocked=obj.never_ran(call.seq)),
            )
        elif refusal is not None:
            # Recorded like a result, so that a retry of this batch gets the same answer.
            result = CallResult(seq=call.seq, ok=False, error=ErrorInfo(
                code="invalid_state", message=refusal, request_id=request_id, call=call.method, blocked=True))
            obj.record(call.seq, result, identity)
            results.append(result)
            continue
        else:
            result = await _execute(ctx, user, obj, call, request_id, hub)
            obj.record(call.seq, result, identity)
            if not result.ok:
                obj.failed_seqs.append(call.seq)
        results.append(result)
        if not result.ok:
            break
    return results


def _refusal(obj: RemoteObject, batch: CallBatch, arrived_in_time: bool) -> str | None:
    """Why the new calls of a pipelined batch must not run, if they must not."""
    if batch.after is None:
        return None
    if not arrived_in_time:
        return (f"not run: the calls sent before it (up to seq {batch.after}) did not arrive "
                f"within {ORDER_WAIT_S:.0f} s")
    # Every seq below the batch's first call was sent before it (even where ``after`` was set
    # back after a request the client gave up on).
    if batch.failures is not None and batch.failures < obj.failures_through(max(batch.after, batch.calls[0].seq - 1)):
        return "not run: an earlier call of this object failed"
    return None


def _check_retry(obj: RemoteObject, call: Call, identity: tuple[str, str]) -> None:
    """A call under a seq that already ran must be that call again (method and arguments)."""
    recorded = obj.calls.get(call.seq)
    if recorded is None or recorded == identity:
        return
    what = "other arguments" if recorded[0] == call.method else f"method {recorded[0]!r}"
    raise ConflictError(
        f"call {call.seq} already ran with {what}; a retry must repeat the call exactly, "
        f"a new call takes the next seq ({obj.last_seq + 1})"
    )


def _stale_message(obj: RemoteObject, seq: int) -> str:
    """Why a seq at or below the last one gets no result: it ran long ago, or it was skipped."""
    oldest_kept = next(iter(obj.results), obj.last_seq)
    if seq < oldest_kept and not obj.never_ran(seq):
        return f"call {seq} already ran"
    return f"call {seq} is below the last call's seq {obj.last_seq} and never ran; seqs must increase"


async def _execute(ctx: ServerContext, user: User, obj: RemoteObject, call: Call,
                   request_id: str | None, hub: HubCredentials) -> CallResult:
    method = call.method

    def decode() -> tuple[list[Any], dict[str, Any]]:
        def resolve(ref: str) -> Any:
            return ctx.objects.resolve(user.id, ref)

        args = codec.from_wire(call.args, resolve)
        kwargs = codec.from_wire(call.kwargs, resolve)
        _check_call_types(obj.kind, method, args, kwargs)
        return args, kwargs

    def encode(value: Any, run_id: str | None) -> tuple[Any, str | None]:
        try:
            return codec.to_wire(value), run_id
        except TwinkleError as exc:
            # The call ran; a result we cannot send is our bug, not the caller's bad argument.
            raise ServerError(f"result of {method} cannot be sent: {exc}") from exc

    def work() -> Any:
        args, kwargs = decode()
        if obj.kind in DEVICE_KINDS:
            value, run_id = obj.instance.call(method, args, kwargs, request_id=request_id)
            return (value, run_id) if isinstance(value, Stepwise) else encode(value, run_id)
        return encode(call_data_object(obj.kind, obj.instance, method, args, kwargs, ctx.settings), None)

    def begin() -> Any:
        args, kwargs = decode()
        return obj.instance.begin(method, args, kwargs, request_id=request_id)

    def end(prepared: Any, outcome: Any) -> Any:
        return encode(*obj.instance.end(prepared, outcome))

    try:
        check_method(obj.kind, method)
        tokens = check_call_size(obj.kind, method, call.args, call.kwargs, ctx.settings,
                                 ctx.model.vocab_size)  # before it is queued
        if obj.kind == "model" and MODEL.method(method).fused:
            # Calls of several users may share one device pass (see server.worker).
            fusable = Fusable(group=method, tokens=tokens, begin=begin, end=end,
                              together=partial(run_together, ctx.model))
            value, run_id = await ctx.run_fusable(user.id, fusable, hub)
        else:
            value, run_id = await ctx.run(obj.kind, user.id, work, hub)
            if isinstance(value, Stepwise):
                done = await ctx.finish(obj.kind, user.id, value, hub)
                value, run_id = await ctx.run(obj.kind, user.id, partial(encode, done, run_id), hub)
    except Exception as exc:
        return CallResult(seq=call.seq, ok=False, error=ctx.error_info(exc, request_id, call=method))
    return CallResult(seq=call.seq, ok=True, value=value, training_run_id=run_id)


@router.delete("/objects/{object_id}", response_model=ObjectInfo, responses=_ERRORS)
async def delete_object(object_id: str, request: Request, user: CurrentUser,
                        ctx: Ctx) -> Response:
    """Close the object now (a model's adapters leave the base model; their runs stay, detached)."""
    obj = ctx.objects.acquire(user.id, object_id)
    try:
        async with obj.lock:  # after any batch in progress
            if not ctx.objects.remove(obj):
                raise NotFoundError(f"no object {object_id!r}")
            await asyncio.to_thread(ctx.close_object, obj, "deleted")
    finally:
        ctx.objects.release(obj)
    return respond(request, obj.info())
