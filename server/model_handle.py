"""``ModelHandle``: what a remote model object is on the server.

A handle is a view of the one served base model that holds only its own adapters (named
``<object id>.<n>`` on the base model) and records every call's effect in the database.
Every remote call is bound against the method's declaration (``twinkle.protocol.api``) and
handled by what that declaration says: which parameters name an adapter, a checkpoint or
something the server chooses, and which ``Effect`` to record. There is no per-method code
here, only one recorder per kind of effect (``_EFFECTS``). Its methods run on the device
worker only, so the model and the records never race, and a limit checked before a call
still holds when the call runs (adapter slots: ``max_loras`` in all, ``max_loras_per_user``
per user; the library's LoRA policy bounds ranks by ``max_r``).
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twinkle.errors import CapacityError, InvalidArgumentError, NotFoundError, StateError, TwinkleError
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol import codec
from twinkle.protocol.api import MODEL, SAMPLER, ApiClass, Arg, Effect, Method
from twinkle.protocol.names import check_adapter_name, is_checkpoint_name, twinkle_path
from twinkle.sampler import TorchSampler

from .policy import check_remote_id
from .runs import RunBook
from .store import CheckpointRow, Store, User

log = logging.getLogger("twinkle_server.runs")


def new_run_id() -> str:
    return f"run-{secrets.token_hex(6)}"


@dataclass
class AdapterLink:
    """One of a handle's adapters: the user's name, its name on the base model, its run."""

    name: str
    base_name: str
    run_id: str


@dataclass
class _Call:
    """One call being handled: its declaration, bound arguments and what the handle learned."""

    spec: Method
    bound: inspect.BoundArguments
    link: AdapterLink | None
    aliases: dict[str, str]
    before: dict[str, Any] | None = None
    """The adapter's train state before the call, for effects that compare."""
    checkpoint: CheckpointRow | None = None
    """The record of the checkpoint the call names, if it names one."""

    @property
    def a(self) -> dict[str, Any]:
        return self.bound.arguments


def _lora_record(config: Any) -> dict[str, Any]:
    """A LoraConfig as the run records it: the codec's form (the fields that differ from peft's
    defaults), plus rank, alpha and target modules always, so that a reader without peft (the
    client, the notebook) sees them even where they are peft's defaults."""
    record = codec.to_wire(config)["value"]
    targets = config.target_modules
    record.setdefault("r", int(config.r))
    record.setdefault("lora_alpha", config.lora_alpha)
    record.setdefault("target_modules", sorted(targets) if isinstance(targets, set) else targets)
    return record


def _plain(value: Any) -> Any:
    """Component kwargs as JSON-friendly data for the run record."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


class ModelHandle:
    """A remote ``MultiLoraTransformersModel``: this object's adapters on the shared base model."""

    class_name = "MultiLoraTransformersModel"
    api: ApiClass = MODEL

    def __init__(self, book: RunBook, user: User, object_id: str) -> None:
        self.book = book
        self.user = user
        self.object_id = object_id
        self.links: dict[str, AdapterLink] = {}
        self._added = 0
        self._batch_rows: dict[str, int] = {}
        """Per run, the most rows of a micro-batch recorded by this handle."""
        self.request_id: str | None = None
        """The request of the call running now, for the log."""

    @property
    def model(self) -> MultiLoraTransformersModel:
        return self.book.model

    @property
    def target(self) -> Any:
        """The library object this handle's calls run on."""
        return self.model

    @property
    def store(self) -> Store:
        return self.book.store

    # ------------------------------------------------------------------ dispatch

    def call(self, method: str, args: list[Any], kwargs: dict[str, Any], *,
             request_id: str | None = None) -> tuple[Any, str | None]:
        """Run one remote call and record its effects; returns its value and the run its adapter
        trains afterwards."""
        call = self.begin(method, args, kwargs, request_id=request_id)
        run = _EFFECTS.get(call.spec.effect, _PLAIN)[1]
        try:
            outcome = run(self, call)
        except TwinkleError as err:
            outcome = err  # ``end`` raises it, with the user's names
        return self.end(call, outcome)

    def begin(self, method: str, args: list[Any], kwargs: dict[str, Any], *,
              request_id: str | None = None) -> _Call:
        """A call bound, translated to the server's names and prepared, not run yet."""
        self.request_id = request_id
        spec = self.api.method(method)
        call = _Call(spec, spec.bind(args, kwargs), None, {})
        try:
            self._translate(call)
            _EFFECTS.get(spec.effect, _PLAIN)[0](self, call)
        except TwinkleError as err:
            err.aliases.update(call.aliases)  # the scrubber shows the user's names
            raise
        return call

    def end(self, call: _Call, outcome: Any) -> tuple[Any, str | None]:
        """Record what a call that ran did; returns its value as the caller gets it and the run
        its adapter trains afterwards (``outcome``: the library's value, or its exception)."""
        if isinstance(outcome, BaseException):
            if isinstance(outcome, TwinkleError):
                outcome.aliases.update(call.aliases)
            raise outcome
        value = outcome
        _EFFECTS.get(call.spec.effect, _PLAIN)[2](self, call, value)
        link = call.link
        if link is not None and self.links.get(link.name) is link:
            self._record(f"the progress of run {link.run_id}", self._sync, link)
            return _returned(self, call, value), link.run_id
        return _returned(self, call, value), None

    def _translate(self, call: _Call) -> None:
        """Turn the declared kinds of argument into what the library takes on this server."""
        a = call.a
        for param, kind in call.spec.args.items():
            if kind is Arg.ADAPTER and call.spec.effect is not Effect.ADAPTER_ADDED:
                call.link = self._link(a[param])
                a[param] = call.link.base_name
                call.aliases[call.link.base_name] = call.link.name
            elif kind is Arg.SERVER_CHOSEN:
                if a[param] is not None:
                    raise InvalidArgumentError(f"{param} is chosen by the server; leave it out")
            elif kind is Arg.CHECKPOINT:
                if a[param] is None and call.spec.signature.parameters[param].default is None:
                    continue  # an optional checkpoint left out
                row, folder = self.book.checkpoints.resolve(self.user.id, a[param])
                call.checkpoint = row
                a[param] = str(folder)
                call.aliases[str(folder)] = twinkle_path(row.run_id, row.name)
            elif kind is Arg.MODEL_ID:
                check_remote_id(a[param].get("model_id"), "template model_id",
                                allow_local=self.book.settings.allow_local_data)
            elif kind is Arg.LORA_CONFIG and isinstance(a[param], dict):
                a[param] = codec.from_wire({"__type__": "LoraConfig", "value": a[param]})

    def _invoke(self, call: _Call) -> Any:
        # A stepwise method runs a step per turn of the device (the route drives the steps).
        name = f"{call.spec.name}_stepwise" if call.spec.stepwise else call.spec.name
        return getattr(self.target, name)(*call.bound.args[1:], **call.bound.kwargs)

    def _record(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Bookkeeping after a library call that ran (metric rows, run progress, component
        records): a failure here is logged under the request id and otherwise swallowed, so
        that a call that ran is never reported as failed (its retry would run it twice)."""
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception(
                "request %s: %s: recording %s failed; the call ran and its result is returned",
                self.request_id, self.object_id, what,
            )

    def _link(self, name: Any) -> AdapterLink:
        if name is None:
            if len(self.links) == 1:
                return next(iter(self.links.values()))
            if not self.links:
                raise StateError(
                    "this model has no adapter yet: call add_adapter_to_model(name, LoraConfig(...)) first"
                )
            raise InvalidArgumentError(f"this model has several adapters ({', '.join(self.links)}); pass adapter_name")
        if not isinstance(name, str) or name not in self.links:
            raise NotFoundError(f"no adapter named {str(name)[:100]!r} on this model")
        return self.links[name]

    def _state(self, link: AdapterLink) -> dict[str, Any]:
        return self.model.get_train_state(adapter_name=link.base_name)

    def _sync(self, link: AdapterLink) -> None:
        state = self._state(link)
        self.store.update_run_progress(
            link.run_id,
            cur_step=state["cur_step"],
            consumed_train_samples=state["consumed_train_samples"],
            last_loss=state["last_loss"],
            gradient_accumulation_steps=state["gradient_accumulation_steps"],
        )

    def _detach(self, link: AdapterLink) -> None:
        if self.links.pop(link.name, None) is link:
            self.book.adapter_removed(self.user.id)
        self.book.release(link.run_id)
        self._record(f"run {link.run_id} as detached", self.store.set_run_status, link.run_id, "detached")

    def close(self) -> None:
        """Remove this object's adapters from the base model and detach their runs."""
        for link in list(self.links.values()):
            try:
                self.model.remove_adapter(link.base_name)
            except Exception:  # the slot must be freed even if the record is odd; log and go on
                log.exception("could not remove adapter %s", link.base_name)
            self._detach(link)

    # ------------------------------------------------------------- effects

    def _prepare_add(self, call: _Call) -> None:
        name = check_adapter_name(call.a["adapter_name"])
        if name in self.links:
            raise InvalidArgumentError(f"adapter {name!r} already exists on this model")
        self._check_slots()
        self._added += 1
        base_name = f"{self.object_id}.{self._added}"
        call.a["adapter_name"] = base_name
        call.aliases[base_name] = name
        call.link = AdapterLink(name, base_name, new_run_id())

    def _check_slots(self) -> None:
        """Refuse a new adapter when the base model has no free slot, or when this user already
        holds its share of them (on the worker: nothing adds an adapter in between)."""
        model = self.model
        if model.free_slots <= 0:
            raise CapacityError(
                f"all {model.max_loras} adapter slots are in use (max_loras={model.max_loras}, set by "
                "twinkle-server serve --max-loras); try again when another model object is deleted"
            )
        held, most = self.book.adapters_of(self.user.id), self.book.settings.loras_per_user
        if held >= most:
            raise CapacityError(
                f"you have {held} adapters on this server, the most one user may hold (max_loras_per_user="
                f"{most}, set by twinkle-server serve --max-loras-per-user); remove an adapter or delete "
                "a model object first"
            )

    def _record_add(self, call: _Call, value: Any) -> None:
        link = call.link
        assert link is not None
        config = call.a["config"]
        try:
            self.store.create_run(
                link.run_id,
                self.user.id,
                base_model=self.model.model_id,
                adapter_name=link.name,
                lora_rank=int(config.r),
                lora_config=_lora_record(config),
                gradient_accumulation_steps=int(call.a["gradient_accumulation_steps"]),
            )
        except BaseException:
            self.model.remove_adapter(link.base_name)
            raise
        self.links[link.name] = link
        self.book.adapter_added(self.user.id)
        self.book.hold(link.run_id, self.object_id)
        log.info("user %s: adapter %r of %s trains run %s", self.user.name, link.name, self.object_id, link.run_id)

    def _record_remove(self, call: _Call, value: Any) -> None:
        assert call.link is not None
        self._detach(call.link)

    def _record_component(self, call: _Call, value: Any) -> None:
        link, spec = call.link, call.spec
        assert link is not None and spec.component is not None
        name = call.a[spec.parameters[0].name]
        kind = spec.component

        def record() -> None:
            entry: dict[str, Any] = {"name": name, "kwargs": _plain(dict(call.a.get("kwargs", {})))}
            if kind == "optimizer":
                # The learning rate in effect, also where the optimizer's own default was used.
                entry["lr"] = self._state(link)["lr"]
            self.store.set_component(link.run_id, kind, entry)

        self._record(f"the {kind} of run {link.run_id}", record)
        if kind == "optimizer":
            # The library drops the scheduler with a new optimizer (declared); the record follows.
            self._record(f"the lr_scheduler of run {link.run_id}", self.store.set_component, link.run_id,
                         "lr_scheduler", None)

    def _record_micro_batch(self, call: _Call, value: Any) -> None:
        link = call.link
        assert link is not None
        self._record(
            f"a metric point of run {link.run_id}",
            self.store.add_metric_point,
            link.run_id,
            step=value.step + 1,
            micro_step=value.micro_step,
            loss=None if value.loss is None else float(value.loss),
            num_tokens=int(value.num_tokens),
            time_=time.time(),
        )

        def note_rows() -> None:
            rows = int(value.batch_size)
            if rows > self._batch_rows.get(link.run_id, 0):
                # Written only when it grows: one database write per run, not one per micro-batch.
                self.store.note_batch_size(link.run_id, rows)
                self._batch_rows[link.run_id] = rows

        self._record(f"the batch size of run {link.run_id}", note_rows)

    def _record_eval(self, call: _Call, value: Any) -> None:
        link = call.link
        assert link is not None
        if value.loss is None or value.reduction != "mean":
            # No labelled tokens (logits only), or a token-summed objective (a policy-gradient
            # loss, Tinker's cross_entropy): not a per-token eval loss to plot.
            return

        def add() -> None:
            # The step whose weights were evaluated: the updates done so far (forward_only changes none).
            self.store.add_eval_point(link.run_id, step=int(self._state(link)["cur_step"]), loss=float(value.loss),
                                      num_tokens=int(value.num_tokens), time_=time.time())

        self._record(f"an eval point of run {link.run_id}", add)

    def _prepare_state(self, call: _Call) -> None:
        assert call.link is not None
        call.before = self._state(call.link)

    def _record_step(self, call: _Call, value: Any) -> None:
        link, before = call.link, call.before
        assert link is not None and before is not None

        def complete() -> None:
            after = self._state(link)
            if after["cur_step"] > before["cur_step"]:
                # The LR the update used is the one before the call (lr_step comes after).
                self.store.complete_step(link.run_id, after["cur_step"], grad_norm=after["window_grad_norm"],
                                         lr=before["lr"])

        self._record(f"the step of run {link.run_id}", complete)

    def _prepare_save(self, call: _Call) -> None:
        assert call.link is not None
        name = call.a["name"]
        if is_checkpoint_name(name):
            self.book.check_not_uploading(call.link.run_id, name)
        call.a["save_dir"] = str(self.book.settings.run_weights_dir(call.link.run_id))

    def _record_save(self, call: _Call, value: Any) -> None:
        # Only now, after the library's atomic rename, does the checkpoint exist for clients.
        assert call.link is not None
        self.book.checkpoints.record(call.link.run_id, call.a["name"])

    def _record_load(self, call: _Call, value: Any) -> None:
        link = call.link
        assert link is not None
        if call.a["load_optimizer"]:
            # The counters went back to the checkpoint's: later points of this run are history.
            self._record(f"superseded points of run {link.run_id}",
                         lambda: self.store.supersede_after(link.run_id, self._state(link)["cur_step"]))
        else:
            # New weights at the same step: that step's eval points measured the old ones.
            self._record(f"superseded eval points of run {link.run_id}",
                         lambda: self.store.supersede_evals_from(link.run_id, self._state(link)["cur_step"]))

    def _prepare_resume(self, call: _Call) -> None:
        link = call.link
        assert link is not None
        target = _checkpoint_of(call)[0]
        holder = self.book.holder(target)
        if target != link.run_id and holder is not None:
            raise StateError(
                f"run {target} is being trained by live model object {holder}; delete that object "
                "(or let it expire) before resuming its run elsewhere"
            )

    def _record_resume(self, call: _Call, value: Any) -> None:
        link = call.link
        assert link is not None
        target, _name, step = _checkpoint_of(call)
        old = link.run_id
        if old != target:
            self.book.release(old)
            link.run_id = target
            self.book.hold(target, self.object_id)
            log.info("user %s: adapter %r of %s resumed run %s", self.user.name, link.name, self.object_id, target)
        self._record(f"the resume of run {target}", self._reattach, old, target, step)

    def _reattach(self, old: str, target: str, after_step: int) -> None:
        """The records of a resume: ``target`` is active again (its later points superseded),
        with the components of ``old``, which is dropped if empty, else detached."""
        components = self.store.components(old) if old != target else {}
        self.store.reattach_run(target, after_step=after_step, components=components)
        if old != target:
            if self.store.delete_run_if_empty(old):
                self.book.checkpoints.remove_run_dir(old)
            else:
                self.store.set_run_status(old, "detached")

    def _run_upload(self, call: _Call) -> str:
        """Uploads run in the background on the server (never on the device worker); the client
        follows a synchronous one to its end."""
        a = call.a
        folder = a["checkpoint_dir"]
        label = call.aliases[folder]
        if not a["hub_token"]:
            # Without it the hub SDK would fall back to the server operator's own login.
            raise InvalidArgumentError(
                "upload_to_hub on a twinkle server needs hub_token=<your ModelScope or Hugging Face token>"
            )
        job = self.book.uploads.start(self.user.id, folder, label, a["hub_model_id"], a["hub_token"])
        return job.upload_id


class SamplerHandle(ModelHandle):
    """A remote ``TorchSampler``: samples on the served base model (no second copy), from the
    bare base or from this user's own checkpoints (a ``twinkle://`` path of another user is not
    found). It holds no adapter slot and records nothing."""

    class_name = "TorchSampler"
    api = SAMPLER

    def __init__(self, book: RunBook, user: User, object_id: str) -> None:
        super().__init__(book, user, object_id)
        self.sampler = TorchSampler.over(book.model)

    @property
    def target(self) -> Any:
        return self.sampler


def run_together(model: MultiLoraTransformersModel, calls: list[_Call]) -> list[Any]:
    """Begun calls of one fused method (several handles' adapters) as the library's fused
    passes; each call's value or exception, in order."""
    spec = calls[0].spec
    assert spec.fused and all(c.spec is spec for c in calls)
    many = getattr(model, f"{spec.name}_many")
    return many([tuple(c.a[p.name] for p in spec.parameters) for c in calls])


def _checkpoint_of(call: _Call) -> tuple[str, str, int]:
    """``(run_id, name, step)`` of the checkpoint a call names (already resolved)."""
    row = call.checkpoint
    assert row is not None
    return row.run_id, row.name, row.step


def _returned(handle: ModelHandle, call: _Call, value: Any) -> Any:
    """The value as the declaration says a remote caller gets it."""
    if call.spec.effect is Effect.CHECKPOINT_SAVED:
        assert call.link is not None
        return twinkle_path(call.link.run_id, call.a["name"])
    return value


def _nothing(handle: ModelHandle, call: _Call, *rest: Any) -> None:
    return None


_PLAIN = (_nothing, ModelHandle._invoke, _nothing)
_EFFECTS: dict[Effect, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
    # effect: (before the call, the call itself, what is recorded after it)
    Effect.ADAPTER_ADDED: (ModelHandle._prepare_add, ModelHandle._invoke, ModelHandle._record_add),
    Effect.ADAPTER_REMOVED: (_nothing, ModelHandle._invoke, ModelHandle._record_remove),
    Effect.COMPONENT: (_nothing, ModelHandle._invoke, ModelHandle._record_component),
    Effect.MICRO_BATCH: (_nothing, ModelHandle._invoke, ModelHandle._record_micro_batch),
    Effect.EVAL: (_nothing, ModelHandle._invoke, ModelHandle._record_eval),
    Effect.STEP: (ModelHandle._prepare_state, ModelHandle._invoke, ModelHandle._record_step),
    Effect.CHECKPOINT_SAVED: (ModelHandle._prepare_save, ModelHandle._invoke, ModelHandle._record_save),
    Effect.WEIGHTS_LOADED: (_nothing, ModelHandle._invoke, ModelHandle._record_load),
    Effect.RESUMED: (ModelHandle._prepare_resume, ModelHandle._invoke, ModelHandle._record_resume),
    Effect.UPLOAD: (_nothing, ModelHandle._run_upload, _nothing),
}
"""One recorder per kind of effect; ``Effect.NONE`` methods just run (``_PLAIN``)."""
