"""``TinkerService``: the state behind the Tinker routes (sessions, training models, sampling
sessions, futures) and how each Tinker operation becomes the library calls a native client
would make on the same ``ModelHandle``.

A Tinker training model is a remote model object of its user (counted, expired and closed like
any other) whose one adapter trains a twinkle run, so the run, its metric points and its
checkpoints are the same records the native client leaves. Operations on a model run in the
order of their ``seq_id`` whatever order they arrive in, each once: a repeat of a submitted
``(model, seq_id)`` gets the first submission's request id back. A gap in the seq ids holds the
operations behind it for ``ORDER_WAIT_S``; then they fail, saying which seq never came.

Results live in per-user futures, visible to their owner only, fetched by long polling.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pydantic import ValidationError

from twinkle.errors import InvalidArgumentError, NotFoundError, StateError, TwinkleError, status_for
from twinkle.protocol.limits import MAX_SAMPLE_SEQUENCES, ORDER_WAIT_S
from twinkle.protocol.names import (
    SAMPLER_WEIGHTS_PREFIX,
    check_checkpoint_name,
    split_twinkle_path,
    tinker_path,
    twinkle_path,
)
from twinkle.protocol.sampling import SamplingParams

from ..context import ServerContext
from ..kinds import check_call_size, check_model_kwargs
from ..model_handle import ModelHandle, SamplerHandle, run_together
from ..objects import RemoteObject, new_object_id
from ..store import User
from ..worker import Fusable
from . import convert

log = logging.getLogger("twinkle_server.tinker")

ADAPTER = "tinker"
"""The name of a Tinker model's one adapter (its run's ``adapter_name``)."""
LONG_POLL_S = 30.0
"""How long ``retrieve_future`` holds a request for a result before answering ``try_again``."""
MAX_AHEAD = 1024
"""How far past the next seq id of a model a submission may be."""
MAX_WAITING = 256
"""Operations of one model waiting for their turn."""
SEEN_KEPT = 4096
"""Seq ids per model remembered for answering repeats."""
FUTURES_PER_USER = 4096
SESSIONS_PER_USER = 256
SAMPLERS_PER_USER = 1024
SAMPLES_IN_FLIGHT = 64
"""Sampling requests of one user queued or running; more are answered 429 (the SDK backs off)."""
EPHEMERAL_KEPT = 4
"""Sampler weights a model keeps from ``save_weights_and_get_sampling_client`` (older ones are
deleted, with their sampling sessions)."""


@dataclass
class Outcome:
    """A finished request: a JSON value, or a protobuf message (with its JSON form), or an error."""

    json: dict[str, Any] | None = None
    proto: Any = None
    error: str | None = None
    category: str = "user"


@dataclass
class _Future:
    user_id: int
    done: asyncio.Future[Outcome]
    created: float = field(default_factory=time.time)


@dataclass
class Op:
    seq: int
    request_id: str | None
    run: Callable[[], Awaitable[Outcome]] | None
    """None: a request refused when it arrived, which only takes its turn."""


Runner = Callable[[], Awaitable[Outcome]]
Prepare = Callable[["TinkerModel"], Callable[[str], Runner]]
"""Checks a request against its model (raising: refused, seq spent) and returns what runs it."""


@dataclass
class Session:
    session_id: str
    user_id: int
    created: float = field(default_factory=time.time)
    finished: bool = False
    creations: dict[int, tuple[str, str]] = field(default_factory=dict)
    """model_seq_id -> (fingerprint, request id) of the model's creation (a repeat gets the same)."""
    samplers: dict[int, str] = field(default_factory=dict)
    """sampling_session_seq_id -> sampler id."""


@dataclass(eq=False)
class TinkerModel:
    model_id: str
    user: User
    session_id: str
    model_seq: int
    obj: RemoteObject
    lora_rank: int = 0
    adam: dict[str, float] | None = None
    """The AdamW settings in effect (None: restored from a checkpoint, not known here)."""
    lr: float | None = None
    fresh: bool = True
    """The optimizer has made no update: building it anew changes nothing but its settings."""
    loss: tuple[str, tuple[tuple[str, Any], ...]] | None = None
    next_seq: int = 1
    waiting: dict[int, Op] = field(default_factory=dict)
    seen: OrderedDict[int, tuple[str, str | Exception]] = field(default_factory=OrderedDict)
    """seq -> (fingerprint, request id or the error it was refused with)."""
    given_up: list[tuple[int, int]] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    ephemeral: list[tuple[str, str]] = field(default_factory=list)
    """(checkpoint name, sampler id) of the sampler weights saved without a name, oldest first."""

    @property
    def handle(self) -> ModelHandle:
        return self.obj.instance

    @property
    def run_id(self) -> str:
        link = self.handle.links.get(ADAPTER)
        if link is None:
            raise StateError(f"model {self.model_id} has no adapter (it was closed)")
        return link.run_id


@dataclass
class SamplerSession:
    sampler_id: str
    user_id: int
    checkpoint: str | None
    """The ``twinkle://`` path sampled from (None: the base model)."""
    seen: OrderedDict[int, tuple[str, str, list[str]]] = field(default_factory=OrderedDict)


class Busy(Exception):
    """Too many requests of one kind at once: answered 429, which the SDK's sampling backs off from."""


def digest(data: Any) -> str:
    return hashlib.sha256(repr(data).encode()).hexdigest()


class TinkerService:
    """Everything the Tinker routes keep, on the server's event loop (no locks needed): sessions,
    training models and their ordered calls, sampling sessions, and each user's futures."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.long_poll_s = LONG_POLL_S
        self.order_wait_s = ORDER_WAIT_S
        self._futures: dict[int, OrderedDict[str, _Future]] = {}
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, TinkerModel] = {}
        self._samplers: dict[str, SamplerSession] = {}
        self._sampler_handles: dict[int, SamplerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sampling: dict[int, int] = {}
        """Per user, sampling requests not finished yet."""

    # ------------------------------------------------------------------ futures

    def start(self, user: User, work: Callable[[], Awaitable[Outcome]], request_id: str | None = None) -> str:
        """Run ``work`` in the background; its outcome is the future ``request_id`` of ``user``."""
        request_id = request_id or self.new_future(user)
        task = asyncio.ensure_future(self._settle(user, request_id, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return request_id

    def new_future(self, user: User) -> str:
        request_id = f"req-{secrets.token_hex(12)}"
        futures = self._futures.setdefault(user.id, OrderedDict())
        futures[request_id] = _Future(user.id, asyncio.get_running_loop().create_future())
        if len(futures) > FUTURES_PER_USER:
            for old in [rid for rid, f in futures.items() if f.done.done()][: len(futures) - FUTURES_PER_USER]:
                del futures[old]
        return request_id

    def _future(self, user: User, request_id: str) -> _Future:
        found = self._futures.get(user.id, {}).get(request_id) if isinstance(request_id, str) else None
        if found is None:
            raise NotFoundError(f"no request {str(request_id)[:100]!r} (or it is not yours)")
        return found

    async def _settle(self, user: User, request_id: str, work: Callable[[], Awaitable[Outcome]]) -> None:
        try:
            outcome = await work()
        except Exception as exc:
            outcome = self.failure(exc, request_id)
        entry = self._futures.get(user.id, {}).get(request_id)
        if entry is not None and not entry.done.done():
            entry.done.set_result(outcome)

    def failure(self, exc: BaseException, request_id: str) -> Outcome:
        info = self.ctx.error_info(exc, request_id)
        category = "server" if status_for(info.code) >= 500 else "user"
        return Outcome(error=f"{info.message} ({info.code})", category=category)

    async def result(self, user: User, request_id: str, wait: float) -> Outcome | None:
        """The outcome of the user's request, waiting up to ``wait`` seconds; None if not yet."""
        entry = self._future(user, request_id)
        try:
            return await asyncio.wait_for(asyncio.shield(entry.done), wait)
        except (TimeoutError, asyncio.TimeoutError):
            return None

    # ----------------------------------------------------------------- sessions

    def create_session(self, user: User) -> str:
        session_id = f"sess-{secrets.token_hex(8)}"
        self._sessions[session_id] = Session(session_id, user.id)
        mine = [s for s in self._sessions.values() if s.user_id == user.id]
        for old in mine[: max(0, len(mine) - SESSIONS_PER_USER)]:
            self._sessions.pop(old.session_id, None)
        return session_id

    def session(self, user: User, session_id: Any) -> Session:
        found = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if found is None or found.user_id != user.id:
            raise NotFoundError(f"no session {str(session_id)[:100]!r}")
        return found

    def heartbeat(self, user: User, session_id: Any) -> Session:
        """A live session: its training models count as used (they do not expire while it lives)."""
        session = self.session(user, session_id)
        for model in [m for m in self._models.values() if m.session_id == session.session_id]:
            try:
                self.ctx.objects.release(self.ctx.objects.acquire(user.id, model.obj.object_id))
            except NotFoundError:
                self._models.pop(model.model_id, None)
        return session

    async def finish(self, user: User, session_id: Any) -> None:
        """End a session: its training models are closed (their runs stay, detached)."""
        session = self.session(user, session_id)
        session.finished = True
        for model in [m for m in self._models.values() if m.session_id == session.session_id]:
            await self.close_model(model, "its session finished")

    async def close_model(self, model: TinkerModel, why: str) -> None:
        self._models.pop(model.model_id, None)
        for op in model.waiting.values():
            if op.request_id is not None:
                self._fail(model.user, op.request_id, StateError(f"not run: model {model.model_id} was closed ({why})"))
        model.waiting.clear()
        if model.runner is not None and model.runner is not asyncio.current_task():
            await asyncio.shield(model.runner)
        obj = model.obj
        if self.ctx.objects.remove(obj):
            await asyncio.to_thread(self.ctx.close_object, obj, why)

    def _fail(self, user: User, request_id: str, exc: BaseException) -> None:
        entry = self._futures.get(user.id, {}).get(request_id)
        if entry is not None and not entry.done.done():
            entry.done.set_result(self.failure(exc, request_id))

    # ------------------------------------------------------------------- models

    def model(self, user: User, model_id: Any) -> TinkerModel:
        found = self._models.get(model_id) if isinstance(model_id, str) else None
        if found is None or found.user.id != user.id:
            raise NotFoundError(f"no model {str(model_id)[:100]!r} (it was closed, it expired, or it is not yours)")
        return found

    async def _check_base(self, base_model: Any) -> None:
        if base_model is None:
            return
        convert.text(base_model, "base_model", 500)
        ctx = self.ctx
        await asyncio.to_thread(check_model_kwargs, ctx.model, ctx.dtype, [], {"model_id": base_model},
                                allow_local=ctx.settings.allow_local_data)

    def _new_model(self, user: User, session: Session, model_seq: int) -> TinkerModel:
        model_id = f"{session.session_id}:train:{model_seq}"
        room = self.ctx.objects.reserve(user.id)
        try:
            object_id = new_object_id()
            handle = ModelHandle(self.ctx.book, user, object_id)
            obj = RemoteObject(object_id, "model", user.id, user.name, handle)
            self.ctx.objects.add(obj, room)
        finally:
            room.release()
        model = TinkerModel(model_id, user, session.session_id, model_seq, obj)
        self._models[model_id] = model
        return model

    async def _creation(self, user: User, body: dict[str, Any],
                        prepare: Callable[[Session, int], Awaitable[Runner]]) -> str:
        """A model's creation, once per ``(session, model_seq_id)``: a repeat gets the first
        request's id, also while that one is still being checked (and its refusal if it was)."""
        session = self.session(user, body.get("session_id"))
        model_seq = convert.integer(body.get("model_seq_id"), "model_seq_id", high=2**31)
        fingerprint = digest(("create", body))
        if model_seq in session.creations:
            first, request_id = session.creations[model_seq]
            if first != fingerprint:
                raise InvalidArgumentError(f"model_seq_id {model_seq} of session {session.session_id} was already "
                                           "used for another model")
            return request_id
        request_id = self.new_future(user)
        session.creations[model_seq] = (fingerprint, request_id)
        try:
            work = await prepare(session, model_seq)
        except Exception as exc:
            self._fail(user, request_id, exc)
            raise
        return self.start(user, work, request_id)

    async def create_model(self, user: User, body: dict[str, Any]) -> str:
        return await self._creation(user, body, partial(self._prepare_create, user, body))

    async def _prepare_create(self, user: User, body: dict[str, Any], session: Session, model_seq: int) -> Runner:
        await self._check_base(body.get("base_model"))
        lora, seed = convert.lora_config(body.get("lora_config"), self.ctx.model.max_r)
        optimizer = body.get("optimizer_config") or {"type": "adamw"}
        if not isinstance(optimizer, dict) or optimizer.get("type", "adamw") != "adamw":
            raise InvalidArgumentError("optimizer_config: only Adam (type 'adamw') is supported here")
        model = self._new_model(user, session, model_seq)
        seed = secrets.randbelow(2**31) if seed is None else seed

        async def work() -> Outcome:
            try:
                await self.call(model, "add_adapter_to_model", ADAPTER, lora, 1, seed=seed)
                await self._set_adam(model, dict(convert.ADAM_DEFAULTS))
            except Exception:
                await self.close_model(model, "its creation failed")
                raise
            model.lora_rank = lora["r"]
            model.ready = True
            log.info("user %s: Tinker model %s trains run %s", user.name, model.model_id, model.run_id)
            return Outcome(json={"type": "create_model", "model_id": model.model_id})

        return work

    async def load_as_new_model(self, user: User, body: dict[str, Any]) -> str:
        """``load_weights`` that creates the model: a new run from a checkpoint's weights (and,
        with ``optimizer``, its optimizer state and counters)."""
        return await self._creation(user, body, partial(self._prepare_load, user, body))

    async def _prepare_load(self, user: User, body: dict[str, Any], session: Session, model_seq: int) -> Runner:
        await self._check_base(body.get("base_model"))
        optimizer = convert.flag(body.get("optimizer"), "optimizer")
        path = convert.checkpoint_path(body.get("path"))
        row, _ = await asyncio.to_thread(self.ctx.book.checkpoints.resolve, user.id, path)
        run = await asyncio.to_thread(self.ctx.store.get_run, user.id, row.run_id)
        model = self._new_model(user, session, model_seq)

        async def work() -> Outcome:
            try:
                await self.call(model, "add_adapter_to_model", ADAPTER, dict(run.lora_config), 1, seed=0)
                await self._set_adam(model, dict(convert.ADAM_DEFAULTS))
                await self.call(model, "load", path, optimizer)
            except Exception:
                await self.close_model(model, "its creation failed")
                raise
            model.lora_rank = int(run.lora_rank or 0)
            if optimizer:
                model.fresh, model.adam, model.lr = False, None, None
            model.ready = True
            log.info("user %s: Tinker model %s trains run %s from %s", user.name, model.model_id, model.run_id, path)
            return Outcome(json={"type": "load_weights", "model_id": model.model_id,
                                 "path": tinker_path(*_parts(path))})

        return work

    def info(self, user: User, model_id: Any) -> dict[str, Any]:
        model = self.model(user, model_id)
        if not model.ready:
            raise NotFoundError(f"model {model.model_id} is still being created")
        base = self.ctx.model.model_id
        return {"type": "get_info", "model_id": model.model_id, "model_name": base, "is_lora": True,
                "lora_rank": model.lora_rank, "model_data": {"model_name": base, "arch": None, "tokenizer_id": None}}

    # -------------------------------------------------------------- ordered ops

    def submit(self, user: User, model_id: Any, seq_id: Any, fingerprint: str, prepare: Prepare) -> str:
        """Queue one operation of a model under its seq id; its request id (the first one's, for a
        repeat of the same request). A request ``prepare`` refuses still spends its seq id, so
        that the requests after it do not wait for it."""
        model = self.model(user, model_id)
        seq = convert.integer(seq_id, "seq_id", high=2**31)
        seen = model.seen.get(seq)
        if seen is not None:
            if seen[0] != fingerprint:
                raise InvalidArgumentError(f"seq_id {seq} of model {model.model_id} was already used for another "
                                           "request; a new request takes a new seq_id")
            if isinstance(seen[1], Exception):
                raise seen[1]
            return seen[1]
        if seq < model.next_seq:
            skipped = any(a <= seq <= b for a, b in model.given_up)
            raise InvalidArgumentError(
                f"seq_id {seq} of model {model.model_id} arrived after the requests behind it were given up on"
                if skipped else f"seq_id {seq} of model {model.model_id} is below the next one ({model.next_seq})"
            )
        if seq > model.next_seq + MAX_AHEAD:
            raise InvalidArgumentError(f"seq_id {seq} is more than {MAX_AHEAD} ahead of the next one ({model.next_seq})")
        if len(model.waiting) >= MAX_WAITING:
            raise InvalidArgumentError(f"model {model.model_id} has {MAX_WAITING} requests waiting; wait for results")
        try:
            make = prepare(model)
        except TwinkleError as exc:
            self._queue(model, seq, fingerprint, Op(seq, None, None), exc)
            raise
        request_id = self.new_future(user)
        self._queue(model, seq, fingerprint, Op(seq, request_id, make(request_id)), request_id)
        return request_id

    def _queue(self, model: TinkerModel, seq: int, fingerprint: str, op: Op, answer: str | Exception) -> None:
        model.waiting[seq] = op
        model.seen[seq] = (fingerprint, answer)
        while len(model.seen) > SEEN_KEPT:
            model.seen.popitem(last=False)
        model.arrived.set()
        if model.runner is None:
            model.runner = asyncio.ensure_future(self._drive(model))

    async def _drive(self, model: TinkerModel) -> None:
        """Run the model's waiting operations in seq order, one at a time."""
        loop = asyncio.get_running_loop()
        gap_since: float | None = None
        try:
            while model.waiting:
                op = model.waiting.pop(model.next_seq, None)
                if op is None:
                    gap_since = gap_since if gap_since is not None else loop.time()
                    left = gap_since + self.order_wait_s - loop.time()
                    model.arrived.clear()
                    if left > 0:
                        try:
                            await asyncio.wait_for(model.arrived.wait(), left)
                        except (TimeoutError, asyncio.TimeoutError):
                            pass
                        continue
                    self._give_up(model)
                    gap_since = None
                    continue
                gap_since = None
                model.next_seq += 1
                if op.run is None or op.request_id is None:
                    continue
                try:
                    outcome = await op.run()
                except Exception as exc:
                    outcome = self.failure(exc, op.request_id)
                entry = self._futures.get(model.user.id, {}).get(op.request_id)
                if entry is not None and not entry.done.done():
                    entry.done.set_result(outcome)
        finally:
            model.runner = None

    def _give_up(self, model: TinkerModel) -> None:
        missing, last = model.next_seq, max(model.waiting)
        error = InvalidArgumentError(
            f"not run: request seq_id {missing} of model {model.model_id} did not arrive within "
            f"{self.order_wait_s:.0f} s, and the requests after it wait for it"
        )
        for op in model.waiting.values():
            if op.request_id is not None:
                self._fail(model.user, op.request_id, error)
        model.waiting.clear()
        model.given_up.append((missing, last))
        del model.given_up[:-64]
        model.next_seq = last + 1

    # ------------------------------------------------------------- device calls

    async def call(self, model: TinkerModel, method: str, *args: Any, request_id: str | None = None,
                   **kwargs: Any) -> Any:
        """One declared call on the model's handle, on the device worker (as the native route runs it)."""
        obj = self._acquire(model)
        try:
            value, _ = await self.ctx.run("model", model.user.id,
                                          lambda: obj.instance.call(method, list(args), kwargs, request_id=request_id))
            return value
        finally:
            self.ctx.objects.release(obj)

    def _acquire(self, model: TinkerModel) -> RemoteObject:
        try:
            return self.ctx.objects.acquire(model.user.id, model.obj.object_id)
        except NotFoundError:
            self._models.pop(model.model_id, None)
            raise NotFoundError(
                f"model {model.model_id} expired or was closed; create a training client from one of its "
                "checkpoints (tinker:// path) to go on"
            ) from None

    async def _pass(self, model: TinkerModel, method: str, samples: list[dict[str, Any]], tokens: int,
                    request_id: str) -> Any:
        """``forward_backward``/``forward_only`` that may share a device pass with other users'."""
        obj = self._acquire(model)
        handle = obj.instance
        try:
            fusable = Fusable(
                group=method, tokens=tokens,
                begin=lambda: handle.begin(method, [samples], {}, request_id=request_id),
                end=handle.end,
                together=partial(run_together, self.ctx.model),
            )
            value, _ = await self.ctx.run_fusable(model.user.id, fusable)
            return value
        finally:
            self.ctx.objects.release(obj)

    async def _set_adam(self, model: TinkerModel, params: dict[str, float]) -> None:
        await self.call(model, "set_optimizer", "AdamW", **convert.adamw_kwargs(params))
        model.adam = {k: v for k, v in params.items() if k != "grad_clip_norm"}
        model.lr = params["learning_rate"]

    # -------------------------------------------------------------- operations
    # Each takes the request, checks what it can before anything is queued (``prepare``: a
    # refused request spends its seq id) and returns the request id of its future.

    def forward_backward(self, user: User, request: Any, forward_only: bool) -> str:
        method = "forward_only" if forward_only else "forward_backward"
        fingerprint = digest(("fb", forward_only, request.SerializeToString(deterministic=True)))

        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            name, kwargs = convert.loss_of(request.loss_fn, convert.loss_config(request))
            samples = convert.samples(request, request.loss_fn, self.ctx.model.vocab_size)
            tokens = check_call_size("model", method, [samples], {}, self.ctx.settings, self.ctx.model.vocab_size)

            def make(request_id: str) -> Runner:
                async def run() -> Outcome:
                    loss = (name, tuple(sorted(kwargs.items())))
                    if model.loss != loss:
                        await self.call(model, "set_loss", name, request_id=request_id, **kwargs)
                        model.loss = loss
                    value = await self._pass(model, method, samples, tokens, request_id)
                    return Outcome(json=convert.forward_backward_json(value),
                                   proto=convert.forward_backward_output(value))

                return run

            return make

        return self.submit(user, request.model_id, request.seq_id, fingerprint, prepare)

    def optim_step(self, user: User, body: dict[str, Any]) -> str:
        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            params = convert.adam_params(body)
            return lambda request_id: partial(self._optim_step, model, params, request_id)

        return self.submit(user, body.get("model_id"), body.get("seq_id"), digest(("optim", body)), prepare)

    async def _optim_step(self, model: TinkerModel, params: dict[str, float], request_id: str) -> Outcome:
        """AdamW with ``params``: built anew while it has made no update (exactly as if built so
        from the start), after that its LR moved with ``FixedLR`` (its state kept)."""
        settings = {k: v for k, v in params.items() if k != "grad_clip_norm"}
        if model.fresh:
            if model.adam != settings:
                await self._set_adam(model, params)
        else:
            fixed = ("beta1", "beta2", "eps", "weight_decay")
            if model.adam is not None and any(model.adam[k] != params[k] for k in fixed):
                raise InvalidArgumentError(
                    "beta1, beta2, eps and weight_decay are fixed by a model's first optim_step "
                    f"({', '.join(f'{k}={model.adam[k]}' for k in fixed)}); only learning_rate and "
                    "grad_clip_norm may change from step to step"
                )
            if model.lr != params["learning_rate"]:
                await self.call(model, "set_lr_scheduler", "FixedLR", lr=params["learning_rate"],
                                request_id=request_id)
                model.lr = params["learning_rate"]
        metrics: dict[str, float] = {}
        if params["grad_clip_norm"] > 0:
            norm = await self.call(model, "clip_grad_norm", params["grad_clip_norm"], request_id=request_id)
            if norm is not None:
                metrics["grad_norm:mean"] = float(norm)
        if await self.call(model, "step", request_id=request_id):
            model.fresh = False
        await self.call(model, "zero_grad", request_id=request_id)
        return Outcome(json={"type": "optim_step", "metrics": metrics})

    async def _exists(self, user: User, run_id: str, name: str) -> bool:
        return await asyncio.to_thread(self.ctx.store.checkpoint_row, user.id, run_id, name) is not None

    def save_state(self, user: User, body: dict[str, Any]) -> str:
        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            overwrite = convert.flag(body.get("overwrite", False), "overwrite")
            name = body.get("path")
            if name is None:
                name = f"state-{model.model_seq}-{body.get('seq_id')}"
            check_checkpoint_name(name)
            if name.startswith(SAMPLER_WEIGHTS_PREFIX):
                raise InvalidArgumentError(f"checkpoint names starting with {SAMPLER_WEIGHTS_PREFIX!r} are for "
                                           "save_weights_for_sampler")

            def make(request_id: str) -> Runner:
                async def run() -> Outcome:
                    run_id = model.run_id
                    if not overwrite and await self._exists(model.user, run_id, name):
                        raise InvalidArgumentError(f"checkpoint {tinker_path(run_id, name)} exists; pass "
                                                   "overwrite=True to replace it")
                    await self.call(model, "save", name, True, request_id=request_id)
                    return Outcome(json={"type": "save_weights", "path": tinker_path(run_id, name)})

                return run

            return make

        return self.submit(user, body.get("model_id"), body.get("seq_id"), digest(("save", body)), prepare)

    def load_into(self, user: User, body: dict[str, Any]) -> str:
        """``load_weights`` on an existing model (``load_state``): same LoRA rank needed."""
        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            optimizer = convert.flag(body.get("optimizer"), "optimizer")
            path = convert.checkpoint_path(body.get("path"))

            def make(request_id: str) -> Runner:
                async def run() -> Outcome:
                    await self.call(model, "load", path, optimizer, request_id=request_id)
                    if optimizer:
                        model.fresh, model.adam, model.lr = False, None, None
                    return Outcome(json={"type": "load_weights", "model_id": model.model_id,
                                         "path": tinker_path(*_parts(path))})

                return run

            return make

        return self.submit(user, body.get("model_id"), body.get("seq_id"), digest(("load", body)), prepare)

    def save_for_sampler(self, user: User, body: dict[str, Any]) -> str:
        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            given, ephemeral = body.get("path"), body.get("sampling_session_seq_id")
            if given is None and ephemeral is None:
                raise InvalidArgumentError("save_weights_for_sampler needs path or sampling_session_seq_id")
            if given is not None:
                check_checkpoint_name(given)
                name = check_checkpoint_name(SAMPLER_WEIGHTS_PREFIX + given)
            else:
                ephemeral = convert.integer(ephemeral, "sampling_session_seq_id", high=2**31)
                name = f"{SAMPLER_WEIGHTS_PREFIX}session-{model.model_seq}-{ephemeral}"

            def make(request_id: str) -> Runner:
                async def run() -> Outcome:
                    run_id = model.run_id
                    await self.call(model, "save", name, False, request_id=request_id)
                    if given is not None:
                        return Outcome(json={"type": "save_weights_for_sampler", "path": tinker_path(run_id, name)})
                    session = self._sessions.get(model.session_id)
                    if session is None:
                        raise NotFoundError(f"session {model.session_id} is gone")
                    sampler_id = self._new_sampler(model.user, session, ephemeral, twinkle_path(run_id, name))
                    model.ephemeral.append((name, sampler_id))
                    while len(model.ephemeral) > EPHEMERAL_KEPT:
                        await self._drop_ephemeral(model, *model.ephemeral.pop(0))
                    return Outcome(json={"type": "save_weights_for_sampler", "sampling_session_id": sampler_id})

                return run

            return make

        return self.submit(user, body.get("model_id"), body.get("seq_id"), digest(("sampler", body)), prepare)

    async def _drop_ephemeral(self, model: TinkerModel, name: str, sampler_id: str) -> None:
        self._samplers.pop(sampler_id, None)
        ctx, user, run_id = self.ctx, model.user, model.run_id
        try:
            await ctx.run("model", user.id, lambda: ctx.book.delete_checkpoint(user.id, run_id, name))
        except Exception:  # it stays on disk, listed; nothing else depends on its going
            log.exception("user %s: could not delete sampler weights %s of run %s", user.name, name, run_id)

    # ----------------------------------------------------------------- sampling

    def _new_sampler(self, user: User, session: Session, seq: int, checkpoint: str | None) -> str:
        sampler_id = f"{session.session_id}:sample:{seq}"
        self._samplers[sampler_id] = SamplerSession(sampler_id, user.id, checkpoint)
        session.samplers[seq] = sampler_id
        mine = [s for s in self._samplers.values() if s.user_id == user.id]
        for old in mine[: max(0, len(mine) - SAMPLERS_PER_USER)]:
            self._samplers.pop(old.sampler_id, None)
        return sampler_id

    async def create_sampler(self, user: User, body: dict[str, Any]) -> str:
        session = self.session(user, body.get("session_id"))
        seq = convert.integer(body.get("sampling_session_seq_id"), "sampling_session_seq_id", high=2**31)
        if seq in session.samplers and session.samplers[seq] in self._samplers:
            return session.samplers[seq]
        path = body.get("model_path")
        checkpoint = None
        if path is not None:
            checkpoint = convert.checkpoint_path(path, "model_path")
            await asyncio.to_thread(self.ctx.book.checkpoints.resolve, user.id, checkpoint)  # yours, and complete
        else:
            await self._check_base(convert.text(body.get("base_model"), "base_model", 500))
        return self._new_sampler(user, session, seq, checkpoint)

    def sampler(self, user: User, sampler_id: Any) -> SamplerSession:
        found = self._samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if found is None or found.user_id != user.id:
            raise NotFoundError(f"no sampling session {str(sampler_id)[:100]!r}")
        return found

    def sampler_info(self, user: User, sampler_id: Any) -> dict[str, Any]:
        sampler = self.sampler(user, sampler_id)
        path = None if sampler.checkpoint is None else tinker_path(*_parts(sampler.checkpoint))
        return {"sampler_id": sampler.sampler_id, "base_model": self.ctx.model.model_id, "model_path": path}

    def sample(self, user: User, body: dict[str, Any]) -> tuple[str, list[str]]:
        sampler = self.sampler(user, body.get("sampling_session_id"))
        for key in ("prompt_logprobs", "record_stability_info"):
            if body.get(key):
                raise InvalidArgumentError(f"{key} is not supported by this server")
        for key in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if body.get(key):
                raise InvalidArgumentError(f"{key} is not supported by this server")
        for key in ("target_prompt_logprobs", "prompt_logprobs_last_n"):
            if body.get(key) is not None:
                raise InvalidArgumentError(f"{key} is not supported by this server")
        num = convert.integer(body.get("num_samples", 1), "num_samples", low=1, high=MAX_SAMPLE_SEQUENCES)
        tokens = convert.prompt_tokens(body.get("prompt"), self.ctx.model.vocab_size)
        params = convert.sampling_params(body.get("sampling_params"))
        try:
            SamplingParams(**params)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "sampling_params"
            raise InvalidArgumentError(f"sampling_params.{where}: {err['msg']}") from None
        seq = body.get("seq_id")
        fingerprint = digest(("sample", body))
        if seq is not None:
            seq = convert.integer(seq, "seq_id", high=2**63 - 1)
            seen = sampler.seen.get(seq)
            if seen is not None and seen[0] == fingerprint:
                return seen[1], seen[2]
        if self._sampling.get(user.id, 0) >= SAMPLES_IN_FLIGHT:
            raise Busy(f"you have {SAMPLES_IN_FLIGHT} sampling requests waiting or running; try again shortly")
        handle = self._sampler_handle(user)
        checkpoint = sampler.checkpoint

        async def work() -> Outcome:
            try:
                kwargs = {"sampling_params": params, "adapter_uri": checkpoint, "num_samples": num}
                value, _ = await self.ctx.run("sampler", user.id, lambda: handle.call("sample", [tokens], kwargs))
                value = await self.ctx.finish("sampler", user.id, value)
            finally:
                self._sampling[user.id] -= 1
            return Outcome(json=convert.sample_json(value), proto=convert.sample_response(value))

        self._sampling[user.id] = self._sampling.get(user.id, 0) + 1  # until work() ends
        request_id = self.start(user, work)
        ids = [f"{request_id}:{i}" for i in range(num)]
        if seq is not None:
            sampler.seen[seq] = (fingerprint, request_id, ids)
            while len(sampler.seen) > SEEN_KEPT:
                sampler.seen.popitem(last=False)
        return request_id, ids

    def _sampler_handle(self, user: User) -> SamplerHandle:
        handle = self._sampler_handles.get(user.id)
        if handle is None:
            handle = self._sampler_handles[user.id] = SamplerHandle(self.ctx.book, user, f"tinker-sampler-{user.id}")
        return handle


def _parts(path: str) -> tuple[str, str]:
    parts = split_twinkle_path(path)
    assert parts is not None
    return parts
