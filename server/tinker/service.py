"""``TinkerService``: the state behind the Tinker routes (sessions, training models, sampling
sessions, futures) and how each Tinker operation becomes the library calls a native client
would make on the same ``ModelHandle``.

A Tinker training model is a remote model object of its user (counted, expired and closed like
any other: after the server's ``idle_timeout`` without a request of its own; a session's
heartbeat does not keep it) whose one adapter trains a twinkle run, so the run, its metric
points and its checkpoints are the same records the native client leaves. Operations on a model
run in the order of their ``seq_id`` whatever order they arrive in, each once: a repeat of a
submitted ``(model, seq_id)`` gets the first submission's request id back. A gap in the seq ids
holds the operations behind it for ``ORDER_WAIT_S``; then they fail, saying which seq never came.

What waits is bounded per user: the ``forward_backward`` data waiting to run
(``QUEUED_CALLS`` x ``max_tokens_per_call`` tokens), operations per model (``MAX_WAITING``),
results not fetched yet (``FUTURE_BYTES_PER_USER``, ``FUTURES_PER_USER``). Past a bound a
submission is answered busy (429), which the SDK backs off from and sends again; never the one a
model's queue waits for (or one arriving while a gap holds it), which keeps every queue moving.

Results live in per-user futures, visible to their owner only, fetched by long polling. Each is
kept once, serialized (protobuf or JSON bytes) when it settles, off the event loop: sending one
never fails, and a fetched one goes ``FETCHED_KEPT_S`` later (the SDK fetches each result once).
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

from twinkle.errors import InvalidArgumentError, NotFoundError, StateError, TwinkleError, status_for
from twinkle.protocol.limits import MAX_BODY_BYTES, MAX_SAMPLE_SEQUENCES, ORDER_WAIT_S
from twinkle.protocol.names import (
    SAMPLER_WEIGHTS_PREFIX,
    check_checkpoint_name,
    split_twinkle_path,
    tinker_path,
    twinkle_path,
)
from twinkle.protocol.sampling import sampling_params as checked_sampling_params

from ..context import ServerContext
from ..kinds import check_model_kwargs
from ..model_handle import ModelHandle, SamplerHandle, run_together
from ..objects import RemoteObject, new_object_id
from ..store import User
from ..wire import _decode_pool
from ..worker import Fusable
from . import convert, schema

log = logging.getLogger("twinkle_server.tinker")

ADAPTER = "tinker"
"""The name of a Tinker model's one adapter (its run's ``adapter_name``)."""
LONG_POLL_S = 30.0
"""How long ``retrieve_future`` holds a request for a result before answering ``try_again``."""
MAX_AHEAD = 1024
"""How far past the next seq id of a model a submission may be."""
MAX_WAITING = 64
"""Operations of one model waiting for their turn; more are answered busy (see the module doc)."""
QUEUED_CALLS = 64
"""A user's ``forward_backward``/``forward`` data waiting to run: at most this many times
``max_tokens_per_call`` tokens; more is answered busy."""
QUEUED_HARD = 4
"""... and at most ``QUEUED_HARD`` times that even where busy is not answered (a gap holds the
queue: the SDK sends a forward_backward's first chunk only once all its others got in): past it
a request is refused, so that one ``forward_backward`` call may carry at most about
``QUEUED_HARD * QUEUED_CALLS * max_tokens_per_call`` tokens."""
BUSY_RETRY_S = 35.0
"""The SDK sends a submission answered busy again within 30 s: a gap in a model's seq ids waits
``ORDER_WAIT_S`` from this long after the model's last busy answer, at the earliest."""
SEEN_KEPT = 1024
"""Seq ids per model remembered for answering repeats."""
FUTURES_PER_USER = 4096
"""Futures of one user kept (pending, or settled and not gone yet); past it new requests are
answered busy until results are fetched."""
FUTURE_BYTES_PER_USER = 64 << 20
"""Serialized results of one user kept; past it fetched ones go first, then new requests are
answered busy until results are fetched."""
RESULT_KEPT_S = 3600.0
"""A result nobody fetched is dropped this long after it settled."""
FETCHED_KEPT_S = 60.0
"""A fetched result stays this long, for a poll repeated after its answer was lost (the SDK
fetches each result once: ``lib/api_future_impl.py`` caches it)."""
SESSIONS_PER_USER = 256
SAMPLERS_PER_USER = 1024
CREATIONS_KEPT = 64
"""Model creations per session remembered for answering repeats."""
SAMPLES_IN_FLIGHT = 64
"""Sampling requests of one user queued or running; more are answered 429 (the SDK backs off).
The client config tells the SDK (``sample_max_concurrent_requests``)."""
EPHEMERAL_KEPT = 4
"""Sampler weights a model keeps from ``save_weights_and_get_sampling_client`` (older ones are
deleted, with their sampling sessions)."""
FB_BYTES_PER_TOKEN = 64
"""A ``forward_backward`` body may hold this many bytes per token of ``max_tokens_per_call``
(plus ``BODY_SLACK``): any request within the token limit fits (a token costs at most 20 bytes:
int32 input, int64 target, two float32 inputs; a datum about 100 more, and a datum counts at
least 2 padded tokens)."""
SAMPLE_BYTES_PER_TOKEN = 16
"""An ``asample`` JSON body may hold this many bytes per token of ``max_tokens_per_call`` (plus
``BODY_SLACK``): a prompt's token ids as JSON numbers take at most 12."""
BODY_SLACK = 64 << 10
CHUNK_BYTES_PER_TOKEN = 8
"""``fwdbwd_max_chunk_bytes_count`` of the client config, per token of ``max_tokens_per_call``:
the SDK splits a ``forward_backward``'s data into requests by its own estimate of their bytes,
at least 8 per token (int32 input and target; 16 with the int64 targets and float32 weights it
builds from lists), so a request of datums of about equal length stays within the token limit
with the one extra token per datum."""


def fb_body_limit(max_tokens: int) -> int:
    return min(MAX_BODY_BYTES, FB_BYTES_PER_TOKEN * max_tokens + BODY_SLACK)


def sample_body_limit(max_tokens: int) -> int:
    return min(MAX_BODY_BYTES, SAMPLE_BYTES_PER_TOKEN * max_tokens + BODY_SLACK)


@dataclass
class Outcome:
    """A finished request: a JSON value, or a protobuf message (or what builds it), or an error."""

    json: dict[str, Any] | None = None
    proto: Any = None
    error: str | None = None
    category: str = "user"


@dataclass(frozen=True)
class Stored:
    """A settled request as it is sent: its body, and the name of its protobuf message (None:
    the body is JSON)."""

    body: bytes
    message: str | None = None


def encode(outcome: Outcome) -> Stored:
    """``outcome`` serialized (CPU work: run off the event loop)."""
    if outcome.error is not None:
        return Stored(convert.json_bytes({"error": outcome.error, "category": outcome.category}))
    if outcome.proto is not None:
        message = outcome.proto() if callable(outcome.proto) else outcome.proto
        return Stored(message.SerializeToString(), message.DESCRIPTOR.name)
    return Stored(convert.json_bytes(outcome.json))


@dataclass(eq=False)
class _Future:
    done: asyncio.Future[Stored]
    settled: float = 0.0
    fetched: float = 0.0
    size: int = 0


@dataclass
class _Results:
    """One user's futures: all of them by request id; the settled ones never fetched, in the
    order they settled; the fetched ones, in the order first fetched."""

    futures: dict[str, _Future] = field(default_factory=dict)
    unfetched: OrderedDict[str, None] = field(default_factory=OrderedDict)
    fetched: OrderedDict[str, None] = field(default_factory=OrderedDict)
    bytes: int = 0


@dataclass
class Op:
    seq: int
    request_id: str | None
    run: Callable[[], Awaitable[Outcome]] | None
    """None: a request refused when it arrived, which only takes its turn."""
    held: int = 0
    """Tokens of data it holds until it ran (counted in the user's queued tokens)."""


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
    """model_seq_id -> (fingerprint, request id) of the model's creation (a repeat gets the same);
    the newest ``CREATIONS_KEPT``, and none of a model that is gone."""
    samplers: dict[int, str] = field(default_factory=dict)
    """sampling_session_seq_id -> sampler id, of the samplers the service still holds."""


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
    busy_at: float = float("-inf")
    """When (event loop time) a submission to this model was last answered busy."""
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

    @property
    def blocked(self) -> bool:
        """Operations wait, but not the one whose turn it is: a gap holds the queue."""
        return bool(self.waiting) and self.next_seq not in self.waiting


@dataclass
class SamplerSession:
    sampler_id: str
    user_id: int
    checkpoint: str | None
    """The ``twinkle://`` path sampled from (None: the base model)."""
    session_id: str = ""
    seq: int = 0
    seen: OrderedDict[int, tuple[str, str, list[str]]] = field(default_factory=OrderedDict)


@dataclass
class FbRequest:
    """A ``forward_backward``/``forward`` request as read off the event loop: its ids and
    fingerprint, and its samples or the error that refuses it (its seq id is spent either way)."""

    model_id: Any
    seq_id: Any
    forward_only: bool
    fingerprint: str
    loss: tuple[str, dict[str, Any]] | None = None
    samples: list[dict[str, Any]] | None = None
    tokens: int = 0
    """Padded tokens (what the device computes on, as ``check_call_size`` counts them)."""
    held: int = 0
    """Tokens the samples hold."""
    error: TwinkleError | None = None


@dataclass
class SampleRequest:
    """An ``asample`` body read off the event loop: the body, its prompt's tokens (or the error
    that refuses it) and its fingerprint."""

    body: dict[str, Any]
    tokens: list[int] | None
    error: TwinkleError | None
    fingerprint: str


class Busy(Exception):
    """Too many requests of one kind at once: answered 429, which the SDK backs off from and sends again."""


def digest(data: Any) -> str:
    return hashlib.sha256(repr(data).encode()).hexdigest()


class TinkerService:
    """Everything the Tinker routes keep, on the server's event loop (no locks needed): sessions,
    training models and their ordered calls, sampling sessions, and each user's futures."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.long_poll_s = LONG_POLL_S
        self.order_wait_s = ORDER_WAIT_S
        self._results: dict[int, _Results] = {}
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, TinkerModel] = {}
        self._samplers: dict[str, SamplerSession] = {}
        self._sampler_handles: dict[int, SamplerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sampling: dict[int, int] = {}
        """Per user, sampling requests not finished yet."""
        self._queued: dict[int, int] = {}
        """Per user, tokens of the data of operations waiting to run (``Op.held``)."""

    @property
    def max_tokens(self) -> int:
        return self.ctx.settings.max_tokens_per_call

    # ------------------------------------------------------------------ futures

    def start(self, user: User, work: Callable[[], Awaitable[Outcome]], request_id: str | None = None) -> str:
        """Run ``work`` in the background; its outcome is the future ``request_id`` of ``user``."""
        request_id = request_id or self.new_future(user)
        task = asyncio.ensure_future(self._settle(user, request_id, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return request_id

    def _results_of(self, user: User) -> _Results:
        results = self._results.get(user.id)
        if results is None:
            results = self._results[user.id] = _Results()
        return results

    def _sweep(self, results: _Results) -> None:
        """Drop what is past its time, then fetched results while over the bounds, oldest first."""
        now = time.time()
        while results.unfetched:
            request_id = next(iter(results.unfetched))
            if now - results.futures[request_id].settled <= RESULT_KEPT_S:
                break
            self._forget(results, request_id)
        while results.fetched:
            request_id = next(iter(results.fetched))
            over = len(results.futures) > FUTURES_PER_USER or results.bytes > FUTURE_BYTES_PER_USER
            if not over and now - results.futures[request_id].fetched <= FETCHED_KEPT_S:
                break
            self._forget(results, request_id)

    @staticmethod
    def _forget(results: _Results, request_id: str) -> None:
        entry = results.futures.pop(request_id)
        results.unfetched.pop(request_id, None)
        results.fetched.pop(request_id, None)
        results.bytes -= entry.size

    def _results_full(self, user: User) -> str | None:
        """Why the user may not start another request now (None: they may)."""
        results = self._results_of(user)
        self._sweep(results)
        if len(results.futures) >= FUTURES_PER_USER:
            return f"you have {len(results.futures)} requests whose results were not fetched; fetch them first"
        if results.bytes >= FUTURE_BYTES_PER_USER:
            return (f"your results not fetched yet hold {results.bytes >> 20} MiB "
                    f"(at most {FUTURE_BYTES_PER_USER >> 20} MiB); fetch them first")
        return None

    def new_future(self, user: User) -> str:
        full = self._results_full(user)
        if full is not None:
            raise Busy(full)
        request_id = f"req-{secrets.token_hex(12)}"
        self._results_of(user).futures[request_id] = _Future(asyncio.get_running_loop().create_future())
        return request_id

    def _future(self, user: User, request_id: str) -> _Future:
        results = self._results_of(user)
        self._sweep(results)
        found = results.futures.get(request_id) if isinstance(request_id, str) else None
        if found is None:
            raise NotFoundError(f"no request {str(request_id)[:100]!r} (or it is not yours, or its result was "
                                "fetched a while ago)")
        return found

    async def _settle(self, user: User, request_id: str, work: Callable[[], Awaitable[Outcome]]) -> None:
        try:
            outcome = await work()
        except Exception as exc:
            outcome = self.failure(exc, request_id)
        await self._resolve(user, request_id, outcome)

    async def _resolve(self, user: User, request_id: str, outcome: Outcome) -> None:
        """Settle the future with ``outcome``, serialized on a decoding thread."""
        try:
            stored = await asyncio.wrap_future(_decode_pool().submit(encode, outcome))
        except Exception as exc:  # a result that cannot be serialized is the server's failure
            log.exception("user %s: could not serialize the result of %s", user.name, request_id)
            stored = encode(self.failure(exc, request_id))
        self._set(user, request_id, stored)

    def _set(self, user: User, request_id: str, stored: Stored) -> None:
        results = self._results_of(user)
        entry = results.futures.get(request_id)
        if entry is None or entry.done.done():
            return
        entry.done.set_result(stored)
        entry.settled, entry.size = time.time(), len(stored.body)
        results.bytes += entry.size
        results.unfetched[request_id] = None
        self._sweep(results)

    def failure(self, exc: BaseException, request_id: str) -> Outcome:
        info = self.ctx.error_info(exc, request_id)
        category = "server" if status_for(info.code) >= 500 else "user"
        return Outcome(error=f"{info.message} ({info.code})", category=category)

    def _fail(self, user: User, request_id: str, exc: BaseException) -> None:
        self._set(user, request_id, encode(self.failure(exc, request_id)))

    async def result(self, user: User, request_id: str, wait: float) -> Stored | None:
        """The settled request, waiting up to ``wait`` seconds; None if not yet. Once handed
        out it is kept ``FETCHED_KEPT_S`` more (see ``_sweep``)."""
        entry = self._future(user, request_id)
        try:
            stored = await asyncio.wait_for(asyncio.shield(entry.done), wait)
        except (TimeoutError, asyncio.TimeoutError):
            return None
        results = self._results_of(user)
        if results.futures.get(request_id) is entry and not entry.fetched:
            entry.fetched = time.time()
            results.unfetched.pop(request_id, None)
            results.fetched[request_id] = None
        return stored

    # ----------------------------------------------------------------- sessions

    def create_session(self, user: User) -> str:
        session_id = f"sess-{secrets.token_hex(8)}"
        self._sessions[session_id] = Session(session_id, user.id)
        mine = [s for s in self._sessions.values() if s.user_id == user.id]
        for old in mine[: max(0, len(mine) - SESSIONS_PER_USER)]:
            self._sessions.pop(old.session_id, None)
        self._prune(user)
        return session_id

    def session(self, user: User, session_id: Any) -> Session:
        found = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if found is None or found.user_id != user.id:
            raise NotFoundError(f"no session {str(session_id)[:100]!r}")
        return found

    def heartbeat(self, user: User, session_id: Any) -> Session:
        """A live session. It does not keep its training models: each expires after the
        server's ``idle_timeout`` without a request of its own, as any remote object does, so an
        idle client does not hold adapter slots. Models that expired are forgotten here."""
        session = self.session(user, session_id)
        self._prune(user)
        return session

    def _prune(self, user: User) -> None:
        """Forget the user's models whose object is gone (expired or closed) and that have nothing
        left to run, with the records of their creation."""
        for model in [m for m in self._models.values() if m.user.id == user.id]:
            if model.obj.closed and not model.waiting and model.runner is None:
                self._forget_model(model)
                session = self._sessions.get(model.session_id)
                if session is not None:
                    session.creations.pop(model.model_seq, None)

    def _forget_model(self, model: TinkerModel) -> None:
        if self._models.get(model.model_id) is model:
            del self._models[model.model_id]

    async def finish(self, user: User, session_id: Any) -> None:
        """End a session: its training models are closed (their runs stay, detached)."""
        session = self.session(user, session_id)
        session.finished = True
        for model in [m for m in self._models.values() if m.session_id == session.session_id]:
            await self.close_model(model, "its session finished")

    async def close_model(self, model: TinkerModel, why: str) -> None:
        self._forget_model(model)
        self._drop_waiting(model, StateError(f"not run: model {model.model_id} was closed ({why})"))
        if model.runner is not None and model.runner is not asyncio.current_task():
            await asyncio.shield(model.runner)
        obj = model.obj
        if self.ctx.objects.remove(obj):
            await asyncio.to_thread(self.ctx.close_object, obj, why)

    def _drop_waiting(self, model: TinkerModel, error: TwinkleError) -> None:
        """Fail every waiting operation of ``model`` with ``error``; its runner (waiting for a
        missing seq, maybe) wakes and ends."""
        for op in model.waiting.values():
            self._ran(model, op)
            if op.request_id is not None:
                self._fail(model.user, op.request_id, error)
        model.waiting.clear()
        model.arrived.set()

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
        self._prune(user)
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
        while len(session.creations) > CREATIONS_KEPT:
            del session.creations[next(iter(session.creations))]
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
        self._touch(model)
        base = self.ctx.model.model_id
        return {"type": "get_info", "model_id": model.model_id, "model_name": base, "is_lora": True,
                "lora_rank": model.lora_rank, "model_data": {"model_name": base, "arch": None, "tokenizer_id": None}}

    # -------------------------------------------------------------- ordered ops

    def submit(self, user: User, model_id: Any, seq_id: Any, fingerprint: str, prepare: Prepare,
               held: int = 0) -> str:
        """Queue one operation of a model under its seq id; its request id (the first one's, for a
        repeat of the same request). A request ``prepare`` refuses still spends its seq id, so
        that the requests after it do not wait for it; one answered busy does not (the SDK sends
        it again). ``held``: the tokens of data the operation holds until it ran."""
        model = self.model(user, model_id)
        if not model.ready:
            # The SDK sends nothing to a model before its create_model result (and get_info).
            raise StateError(f"model {model.model_id} is still being created; wait for the result of its creation")
        seq = convert.integer(seq_id, "seq_id", high=2**31)
        seen = model.seen.get(seq)
        if seen is not None:
            if seen[0] != fingerprint:
                raise InvalidArgumentError(f"seq_id {seq} of model {model.model_id} was already used for another "
                                           "request; a new request takes a new seq_id")
            if isinstance(seen[1], Exception):
                raise seen[1].with_traceback(None)
            return seen[1]
        if seq < model.next_seq:
            skipped = any(a <= seq <= b for a, b in model.given_up)
            raise InvalidArgumentError(
                f"seq_id {seq} of model {model.model_id} arrived after the requests behind it were given up on"
                if skipped else f"seq_id {seq} of model {model.model_id} is below the next one ({model.next_seq})"
            )
        if seq > model.next_seq + MAX_AHEAD:
            raise InvalidArgumentError(f"seq_id {seq} is more than {MAX_AHEAD} ahead of the next one ({model.next_seq})")
        self._touch(model)
        self._room(model, seq, held)
        try:
            queued, most = self._queued.get(user.id, 0), QUEUED_HARD * QUEUED_CALLS * self.max_tokens
            if seq != model.next_seq and held and queued + held > most:
                raise InvalidArgumentError(
                    f"your requests waiting to run would hold {queued + held} tokens of data, more than this server "
                    f"keeps waiting for one user ({most}); send less data per forward_backward call"
                )
            make = prepare(model)
        except TwinkleError as exc:
            self._queue(model, seq, fingerprint, Op(seq, None, None), exc)
            raise
        request_id = self.new_future(user)
        self._queue(model, seq, fingerprint, Op(seq, request_id, make(request_id), held), request_id)
        return request_id

    def _room(self, model: TinkerModel, seq: int, held: int) -> None:
        """Answer ``Busy`` (429: the SDK waits and sends the request again) while the user's
        results not fetched are over their bounds, or while the model's queue or the user's data
        waiting to run are, except for the request the model's queue waits for: its turn, or any
        while a gap holds the queue (the SDK may hold the missing one back until the others got in)."""
        why = self._results_full(model.user)
        if why is None and seq != model.next_seq and not model.blocked:
            queued, most = self._queued.get(model.user.id, 0), QUEUED_CALLS * self.max_tokens
            if len(model.waiting) >= MAX_WAITING:
                why = f"model {model.model_id} has {len(model.waiting)} requests waiting to run"
            elif held and queued + held > most:
                why = (f"your requests waiting to run hold {queued} tokens of data (at most {most}: "
                       f"{QUEUED_CALLS} x max_tokens_per_call)")
        if why is not None:
            model.busy_at = asyncio.get_running_loop().time()
            raise Busy(f"{why}; try again shortly")

    def _touch(self, model: TinkerModel) -> None:
        """A request of the model's own: it counts as used (its object's idle time starts again)."""
        self.ctx.objects.release(self._acquire(model))

    def _queue(self, model: TinkerModel, seq: int, fingerprint: str, op: Op, answer: str | Exception) -> None:
        model.waiting[seq] = op
        if op.held:
            self._queued[model.user.id] = self._queued.get(model.user.id, 0) + op.held
        model.seen[seq] = (fingerprint, answer)
        while len(model.seen) > SEEN_KEPT:
            model.seen.popitem(last=False)
        model.arrived.set()
        if model.runner is None:
            model.runner = asyncio.ensure_future(self._drive(model))

    def _ran(self, model: TinkerModel, op: Op) -> None:
        """``op`` left the queue: its data no longer counts as waiting."""
        if op.held:
            self._queued[model.user.id] -= op.held
            op.held = 0

    async def _drive(self, model: TinkerModel) -> None:
        """Run the model's waiting operations in seq order, one at a time. The model's object is
        held busy meanwhile: it does not expire with operations waiting."""
        loop = asyncio.get_running_loop()
        gap_since: float | None = None
        try:
            obj = self._acquire(model)
        except NotFoundError as exc:
            self._drop_waiting(model, exc)
            model.runner = None
            return
        try:
            while model.waiting:
                op = model.waiting.pop(model.next_seq, None)
                if op is None:
                    gap_since = gap_since if gap_since is not None else loop.time()
                    left = max(gap_since, model.busy_at + BUSY_RETRY_S) + self.order_wait_s - loop.time()
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
                finally:
                    self._ran(model, op)
                    op.run = None  # what it held (its samples) goes now
                await self._resolve(model.user, op.request_id, outcome)
        finally:
            model.runner = None
            self.ctx.objects.release(obj)

    def _give_up(self, model: TinkerModel) -> None:
        missing, last = model.next_seq, max(model.waiting)
        self._drop_waiting(model, InvalidArgumentError(
            f"not run: request seq_id {missing} of model {model.model_id} did not arrive within "
            f"{self.order_wait_s:.0f} s, and the requests after it wait for it"
        ))
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

    def read_forward_backward(self, raw: bytes | bytearray, forward_only: bool) -> FbRequest:
        """A ``forward_backward`` body parsed, fingerprinted, checked and built into samples: CPU
        work on a decoding thread, never the event loop. A request too large is refused before
        its samples are built (``convert.samples``); a malformed body raises at once, any other
        refusal is kept for ``forward_backward`` (the request spends its seq id)."""
        message = schema.ForwardBackwardRequest()
        try:
            message.ParseFromString(bytes(raw))
        except Exception:
            raise InvalidArgumentError("forward_backward body is not a valid ForwardBackwardRequest") from None
        forward_only = forward_only or message.forward_only
        fingerprint = hashlib.sha256(b"fb-only:" if forward_only else b"fb:")
        fingerprint.update(message.SerializeToString(deterministic=True))
        request = FbRequest(message.model_id, message.seq_id, forward_only, fingerprint.hexdigest())
        method = "forward_only" if forward_only else "forward_backward"
        try:
            request.loss = convert.loss_of(message.loss_fn, convert.loss_config(message))
            request.samples, request.tokens, request.held = convert.samples(
                message, message.loss_fn, self.ctx.model.vocab_size, self.max_tokens, method)
        except TwinkleError as exc:  # kept without its traceback, whose frames hold the message
            request.error, request.samples, request.held = exc.with_traceback(None), None, 0
        return request

    def forward_backward(self, user: User, request: FbRequest) -> str:
        method = "forward_only" if request.forward_only else "forward_backward"

        def prepare(model: TinkerModel) -> Callable[[str], Runner]:
            if request.error is not None:
                raise request.error
            assert request.loss is not None and request.samples is not None
            name, kwargs = request.loss
            samples, tokens = request.samples, request.tokens

            def make(request_id: str) -> Runner:
                async def run() -> Outcome:
                    loss = (name, tuple(sorted(kwargs.items())))
                    if model.loss != loss:
                        await self.call(model, "set_loss", name, request_id=request_id, **kwargs)
                        model.loss = loss
                    value = await self._pass(model, method, samples, tokens, request_id)
                    return Outcome(proto=partial(convert.forward_backward_output, value))

                return run

            return make

        return self.submit(user, request.model_id, request.seq_id, request.fingerprint, prepare, request.held)

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
        # A gradient norm that is not finite (inf from huge weights or advantages, nan) is reported
        # as it is, after the step ran (torch clips by a factor of 0 then, and the optimizer's
        # state takes the non-finite values): Tinker's metrics are floats, sent as "inf"/"nan"
        # (``convert.finite``), which the SDK reads back as floats. The step cannot be skipped
        # here (the library's accumulation window closes only with a step), and failing it
        # after it ran would read as if it had not.
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
        self._drop_sampler(sampler_id)
        ctx, user, run_id = self.ctx, model.user, model.run_id
        try:
            await ctx.run("model", user.id, lambda: ctx.book.delete_checkpoint(user.id, run_id, name))
        except Exception:  # it stays on disk, listed; nothing else depends on its going
            log.exception("user %s: could not delete sampler weights %s of run %s", user.name, name, run_id)

    # ----------------------------------------------------------------- sampling

    def _new_sampler(self, user: User, session: Session, seq: int, checkpoint: str | None) -> str:
        sampler_id = f"{session.session_id}:sample:{seq}"
        self._samplers[sampler_id] = SamplerSession(sampler_id, user.id, checkpoint, session.session_id, seq)
        session.samplers[seq] = sampler_id
        mine = [s for s in self._samplers.values() if s.user_id == user.id]
        for old in mine[: max(0, len(mine) - SAMPLERS_PER_USER)]:
            self._drop_sampler(old.sampler_id)
        return sampler_id

    def _drop_sampler(self, sampler_id: str) -> None:
        """Forget a sampling session, and its session's record of it."""
        sampler = self._samplers.pop(sampler_id, None)
        session = None if sampler is None else self._sessions.get(sampler.session_id)
        if session is not None and session.samplers.get(sampler.seq) == sampler_id:
            del session.samplers[sampler.seq]

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

    def read_sample(self, body: Any) -> SampleRequest:
        """An ``asample`` body's prompt tokens and fingerprint, on a decoding thread (a prompt
        of more than ``max_tokens_per_call`` tokens is refused before it is read)."""
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request body must be a JSON object")
        tokens, error = None, None
        try:
            tokens = convert.prompt_tokens(body.get("prompt"), self.ctx.model.vocab_size, self.max_tokens)
        except TwinkleError as exc:
            error = exc
        return SampleRequest(body, tokens, error, digest(("sample", body)))

    def sample(self, user: User, request: SampleRequest) -> tuple[str, list[str]]:
        body = request.body
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
        if request.error is not None:
            raise request.error
        tokens = request.tokens
        params = convert.sampling_params(body.get("sampling_params"))
        checked_sampling_params(params)  # refused here, in one line, before it is queued
        seq = body.get("seq_id")
        fingerprint = request.fingerprint
        if seq is not None:
            seq = convert.integer(seq, "seq_id", high=2**63 - 1)
            seen = sampler.seen.get(seq)
            if seen is not None and seen[0] == fingerprint:
                return seen[1], seen[2]
        if self._sampling.get(user.id, 0) >= SAMPLES_IN_FLIGHT:
            raise Busy(f"you have {SAMPLES_IN_FLIGHT} sampling requests waiting or running; try again shortly")
        handle = self._sampler_handle(user)
        checkpoint = sampler.checkpoint
        request_id = self.new_future(user)

        async def work() -> Outcome:
            try:
                kwargs = {"sampling_params": params, "adapter_uri": checkpoint, "num_samples": num}
                value, _ = await self.ctx.run("sampler", user.id, lambda: handle.call("sample", [tokens], kwargs))
                value = await self.ctx.finish("sampler", user.id, value)
            finally:
                self._sampling[user.id] -= 1
            return Outcome(proto=partial(convert.sample_response, value))

        self._sampling[user.id] = self._sampling.get(user.id, 0) + 1  # until work() ends
        self.start(user, work, request_id)
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
