"""Remote objects: classes derived from the local API, one ordered call pipeline per object.

``derive_remote_class(LocalClass, ...)`` builds the remote class from
``twinkle.api.api_methods(LocalClass)``: each marked method (and ``__init__``) becomes a
function with the very same signature, so calling it wrongly raises the same ``TypeError``
as the local method, and a method added locally appears remotely without another line.

Calls go through a ``Pipeline``: an ordered queue and one daemon sender thread per object.
The thread sends everything queued as one ``CallBatch``, so the calls of a training step
share one or two round trips. A ``deferred`` method returns a lazy value at once; the
others wait for their result. Each call takes the object's next ``seq`` when queued, and
the transport re-sends the same seqs on retry, so each call runs at most once.

A failed deferred call marks its object: the next call or read on it raises the error,
naming the call (``step() failed: ...``), once. Calls queued behind the failure are not run
and their lazies say so.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from twinkle.api import api_methods
from twinkle.errors import InvalidArgumentError, StateError, TwinkleError, error_from_code
from twinkle.protocol import codec
from twinkle.protocol.wire import CallBatchResult, CallResult, ErrorInfo, ObjectInfo

from .client import TwinkleClient, current_client, peek_client
from .interrupt import check_stop
from .lazy import CallFuture, lazy_class_for
from .transport import ClientClosedError, RetryPolicy

log = logging.getLogger("twinkle_client")
T = TypeVar("T")

MAX_CALLS_PER_BATCH = 64
EXIT_DRAIN_S = 10.0
GC_DRAIN_S = 60.0
CLOSE_RETRY = RetryPolicy(total_s=5.0)


class _Missing:
    """Stands in for an argument the caller left out, so that only given ones are sent."""

    def __repr__(self) -> str:
        return "<default>"


_MISSING: Any = _Missing()


def _not_run(cause: TwinkleError, failed_call: str) -> TwinkleError:
    # Same class as the cause, so that ``except CapacityError`` catches both alike.
    err = type(cause)(f"not run: an earlier call ({failed_call}) failed", request_id=cause.request_id)
    err.__cause__ = cause
    err._twinkle_not_run_cause = cause  # type: ignore[attr-defined]
    return err


def _call_error(info: ErrorInfo, method: str, deferred: bool) -> TwinkleError:
    name = info.call or method
    # A deferred call's error surfaces later, at another line: name the call that failed.
    message = f"{name}() failed: {info.message}" if deferred else info.message
    return error_from_code(info.code, message, info.request_id)


@dataclass
class _Pending:
    seq: int
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    future: CallFuture


# ---------------------------------------------------------------------------- pipeline


class Pipeline:
    """The ordered outgoing calls of one remote object and the thread that sends them.

    It holds no reference to the remote object, so the object can be garbage-collected;
    its finalizer stops the thread once everything queued has been sent.
    """

    def __init__(self, label: str, object_id: str, server: str) -> None:
        self.label = label
        self.object_id = object_id
        self.server = server
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._next_seq = 1
        self._settled_seq = 0
        self._sending = False
        self._stopping = False
        self._closed = False
        self._failure: TwinkleError | None = None
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    # --------------------------------------------------------------- caller side

    def submit(self, method: str, args: list[Any], kwargs: dict[str, Any], *, deferred: bool) -> CallFuture:
        """Encode and queue one call; raises the object's pending failure instead, once."""
        wire_args = codec.to_wire(list(args), ref_of)
        wire_kwargs = codec.to_wire(dict(kwargs), ref_of)
        with self._cond:
            if self._closed:
                raise StateError(f"{self.label} was closed")
            self._raise_failure_locked()
            seq = self._next_seq
            self._next_seq += 1
            future = CallFuture(method, seq, deferred)
            self._queue.append(_Pending(seq, method, wire_args, wire_kwargs, future))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"twinkle-sender-{self.object_id}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return future

    def read(self, future: CallFuture, timeout: float | None = None) -> Any:
        """The call's value; raises its error (consuming the object's mark if it is that error)."""
        if not future.wait(timeout):
            raise TimeoutError(f"{self.label}: {future.method}() did not finish within {timeout} s")
        error = future.error
        if error is None:
            return future.value
        with self._cond:
            if error is self._failure:
                self._failure = None
            elif (
                not future.deferred
                and getattr(error, "_twinkle_not_run_cause", None) is not None
                and error._twinkle_not_run_cause is self._failure  # type: ignore[attr-defined]
            ):
                # A caller waiting on a skipped call learns the real failure.
                error, self._failure = self._failure, None
        raise error.with_traceback(None)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every call queued so far has run; then raise a pending failure, once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._next_seq - 1
            while self._settled_seq < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.label}: queued calls did not finish within {timeout} s")
                self._cond.wait(remaining)
            self._raise_failure_locked()

    def take_failure(self) -> TwinkleError | None:
        """Remove and return the pending failure, if any (for close and exit reports)."""
        with self._cond:
            failure, self._failure = self._failure, None
            return failure

    def _raise_failure_locked(self) -> None:
        failure = self._failure
        if failure is not None:
            self._failure = None
            raise failure.with_traceback(None)

    def shutdown(self) -> None:
        """Stop the sender once the queue is empty; later submits fail."""
        with self._cond:
            self._closed = True
            self._stopping = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or in flight; True if that happened in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._sending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # --------------------------------------------------------------- sender thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    self._thread = None
                    return
                batch = self._queue[:MAX_CALLS_PER_BATCH]
                del self._queue[:MAX_CALLS_PER_BATCH]
                self._sending = True
            try:
                outcome: list[CallResult] | TwinkleError = self._send(batch)
            except TwinkleError as exc:
                outcome = exc
            except Exception as exc:  # a bug must not kill the thread and hang every reader
                log.exception("twinkle client: sending calls of %s failed", self.label)
                outcome = TwinkleError(f"the twinkle client failed to send the call: {exc!r}")
            self._settle(batch, outcome)

    def _send(self, batch: list[_Pending]) -> list[CallResult]:
        payload = {"calls": [{"seq": p.seq, "method": p.method, "args": p.args, "kwargs": p.kwargs} for p in batch]}
        path = f"/objects/{self.object_id}/calls"
        data = on_current_client(lambda c: c.transport.post_msgpack(path, payload), self.label, self.server)
        try:
            return CallBatchResult.model_validate(data).results
        except Exception as exc:
            raise TwinkleError(f"the twinkle server sent a malformed call result: {exc}") from None

    def _settle(self, batch: list[_Pending], outcome: list[CallResult] | TwinkleError) -> None:
        settled: list[tuple[CallFuture, Any, BaseException | None]] = []
        failure: TwinkleError | None = None
        failed_call = ""
        if isinstance(outcome, TwinkleError):
            # The whole request failed: whether any call ran is unknown, so every call of the
            # batch reports the same error.
            first = batch[0]
            failure = error_from_code(
                outcome.code,
                f"{first.method}() failed: {outcome.message}" if first.future.deferred else outcome.message,
                outcome.request_id,
            )
            failed_call = first.method
            settled = [(p.future, None, failure) for p in batch]
        else:
            by_seq = {r.seq: r for r in outcome}
            for p in batch:
                if failure is not None:
                    settled.append((p.future, None, _not_run(failure, failed_call)))
                    continue
                result = by_seq.get(p.seq)
                if result is None:
                    info = ErrorInfo(code="internal", message="the server returned no result for this call")
                    result = CallResult(seq=p.seq, ok=False, error=info)
                if result.ok:
                    try:
                        settled.append((p.future, codec.from_wire(result.value, _unexpected_ref), None))
                    except TwinkleError as exc:
                        settled.append((p.future, None, exc))
                    continue
                info = result.error or ErrorInfo(code="internal", message="the call failed without an error")
                failure = _call_error(info, p.method, p.future.deferred)
                failed_call = info.call or p.method
                settled.append((p.future, None, failure))
        with self._cond:
            # The mark is set before any future completes, so that a reader woken by its
            # future always finds (and consumes) it.
            if failure is not None:
                self._failure = failure
                # Calls queued behind a failure are not sent: the user has not seen it yet.
                settled.extend((p.future, None, _not_run(failure, failed_call)) for p in self._queue)
                if self._queue:
                    self._settled_seq = self._queue[-1].seq
                self._queue.clear()
            for future, value, error in settled:
                if error is None:
                    future.set_result(value)
                else:
                    future.set_error(error)
            self._settled_seq = max(self._settled_seq, batch[-1].seq)
            self._sending = False
            self._cond.notify_all()


def _unexpected_ref(ref: str) -> str:
    # No API method returns a remote object today; pass the id through rather than fail.
    return ref


_LIVE: weakref.WeakSet[Pipeline] = weakref.WeakSet()
_LIVE_OBJECTS: weakref.WeakSet[RemoteObject] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """Send what is still queued (e.g. a last ``lr_step``) and report failures nobody read."""
    deadline = time.monotonic() + EXIT_DRAIN_S
    for pipeline in list(_LIVE):
        pipeline.join(max(0.0, deadline - time.monotonic()))
        failure = pipeline.take_failure()
        if failure is not None:
            log.warning("twinkle: %s: a call failed and the error was never read: %s", pipeline.label, failure)
    # Release the server objects (adapter slots, and the runs they hold) now rather than at the
    # server's idle timeout, so that a restarted kernel can resume the same run at once.
    for obj in list(_LIVE_OBJECTS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            obj._twinkle_close(remaining)
        except Exception as exc:  # exit must go on whatever the server says
            log.info("twinkle: closing %r at exit: %s", obj, exc)


def on_current_client(send: Callable[[TwinkleClient], T], label: str, server: str | None = None) -> T:
    """Run ``send`` over the current client, which must talk to ``server`` when given.

    ``init_twinkle_client`` may replace the client between looking it up and sending; the
    old one then refuses before anything goes out, so the request is sent over the new one.
    An object id means nothing on another server, so pointing the client elsewhere strands
    the object with a clear error instead of sending its id to a stranger.
    """
    for _ in range(3):
        # An object's calls never make a client from the environment; only a creation may.
        client = current_client() if server is None else peek_client()
        if client is None:
            raise StateError(f"{label}: there is no twinkle client; call init_twinkle_client(...)")
        if server is not None and client.base_url != server:
            raise StateError(
                f"{label} lives on {server}, but the current twinkle client connects to "
                f"{client.base_url}; create it again, or init_twinkle_client({server!r}, ...)"
            )
        try:
            return send(client)
        except ClientClosedError:
            if peek_client() is client:
                raise  # closed, not replaced: the caller has to reconnect
    raise StateError(f"{label}: the twinkle client was replaced while sending; try again")


def _release_later(pipeline: Pipeline, object_id: str) -> None:
    """Finalizer: garbage collection may run anywhere, so the network part goes to a thread."""

    def run() -> None:
        pipeline.join(GC_DRAIN_S)
        _release(pipeline, object_id)

    threading.Thread(target=run, name=f"twinkle-release-{object_id}", daemon=True).start()


def _release(pipeline: Pipeline, object_id: str) -> None:
    """Stop ``pipeline``'s sender and delete the server object; never raises."""
    pipeline.shutdown()
    failure = pipeline.take_failure()
    if failure is not None:
        log.warning("twinkle: %s: a call failed and the error was never read: %s", pipeline.label, failure)
    try:
        path = f"/objects/{object_id}"
        on_current_client(lambda c: c.transport.delete_json(path, retry=CLOSE_RETRY), pipeline.label, pipeline.server)
    except Exception as exc:
        # The server may have reaped it already, or be gone; nothing is left to release here.
        log.info("twinkle: closing %s: %s", pipeline.label, exc)


def ref_of(value: Any) -> str | None:
    """``codec.to_wire`` hook: a remote object travels as its id, after its queued calls ran."""
    if isinstance(value, RemoteObject):
        value._twinkle_pipeline.flush()
        return value.object_id
    if api_methods(type(value)):  # a local twinkle Dataset, DataLoader or model
        raise InvalidArgumentError(
            f"a local {type(value).__name__} cannot be sent to the server; "
            f"create it with twinkle_client's {type(value).__name__} instead"
        )
    return None


# ---------------------------------------------------------------------------- remote objects


@dataclass
class BoundCall:
    """One call of an API method.

    ``args``/``kwargs`` hold only the arguments the caller gave (the server applies the same
    defaults); ``values`` has every parameter, defaults filled in, for client-side logic.
    """

    name: str
    method: str
    deferred: bool
    args: list[Any]
    kwargs: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)


Handler = Callable[["RemoteObject", BoundCall], Any]


class RemoteObject:
    """Base of the derived remote classes: an object that lives on the twinkle server.

    The server object is created by the constructor; its id (``object_id``) belongs to the
    user, and every request uses the current connection (``init_twinkle_client``).
    """

    _twinkle_kind: ClassVar[str] = ""
    _twinkle_local: ClassVar[type | None] = None
    _twinkle_signatures: ClassVar[dict[str, inspect.Signature]] = {}
    _twinkle_handlers: ClassVar[dict[str, Handler]] = {}
    _twinkle_pipeline: Pipeline
    _twinkle_object_id: str

    def _twinkle_setup(self) -> None:
        """Client-side state of a subclass; runs before the server object is created."""

    def _twinkle_create(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._twinkle_setup()
        payload = {
            "kind": self._twinkle_kind,
            "args": codec.to_wire(list(args), ref_of),
            "kwargs": codec.to_wire(dict(kwargs), ref_of),
        }
        # The key makes a creation retried after a lost reply return the same object.
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        server, data = on_current_client(
            lambda c: (c.base_url, c.transport.post_msgpack("/objects", payload, headers=headers)), type(self).__name__
        )
        try:
            info = ObjectInfo.model_validate(data)
        except Exception as exc:
            raise TwinkleError(f"the twinkle server sent a malformed object id: {exc}") from None
        self._twinkle_object_id = info.object_id
        label = f"{type(self).__name__} {info.object_id}"
        self._twinkle_pipeline = Pipeline(label, info.object_id, server)
        # Dropped without close() (e.g. `model = ...` run again): free the server object too,
        # or its adapter slot stays taken until the server's idle timeout.
        self._twinkle_finalizer = weakref.finalize(self, _release_later, self._twinkle_pipeline, info.object_id)
        # At exit _drain_at_exit closes live objects itself, after draining their queues.
        self._twinkle_finalizer.atexit = False
        _LIVE_OBJECTS.add(self)

    @property
    def object_id(self) -> str:
        """The server-side id of this object."""
        return self._twinkle_object_id

    def _twinkle_call(self, call: BoundCall) -> Any:
        """Send ``call``: a lazy value if it is deferred, else wait for its value."""
        pipeline = self._twinkle_pipeline
        future = pipeline.submit(call.method, call.args, call.kwargs, deferred=call.deferred)
        if not call.deferred:
            return pipeline.read(future)
        sig = self._twinkle_signatures.get(call.name)
        lazy_cls = lazy_class_for(sig.return_annotation if sig is not None else None)
        return lazy_cls(future, pipeline.read)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every call made so far has run on the server; raise a failure among them."""
        self._twinkle_pipeline.flush(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every call made so far has run on the server, without raising: a failure
        stays pending for the next call or read. True if that happened within ``timeout``."""
        return self._twinkle_pipeline.join(timeout)

    def close(self) -> None:
        """Send what is queued, stop the sender thread and delete the server object. Idempotent.

        A deferred call's failure that was never read is logged, not raised.
        """
        self._twinkle_close(None)

    def _twinkle_close(self, timeout: float | None) -> None:
        pipeline = getattr(self, "_twinkle_pipeline", None)
        if pipeline is None or self._twinkle_finalizer.detach() is None:
            return
        pipeline.join(timeout)
        _release(pipeline, self.object_id)

    def __repr__(self) -> str:
        oid = getattr(self, "_twinkle_object_id", None)
        return f"<remote {type(self).__name__} {oid or '(not created)'}>"


def _dispatch(self: RemoteObject, name: str, values: dict[str, Any]) -> Any:
    """What every generated method runs: turn the bound parameters into a call.

    Parameters go by name (the server binds them with the same signature), except
    positional-only ones and those before a non-empty ``*args``, which can only go by position.
    """
    cls = type(self)
    sig = cls._twinkle_signatures[name]
    params = list(sig.parameters.values())[1:]
    star = next((values[p.name] for p in params if p.kind is p.VAR_POSITIONAL), ())
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    filled: dict[str, Any] = {}
    for param in params:
        value = values[param.name]
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            args.extend(value)
        elif kind is param.VAR_KEYWORD:
            kwargs.update(value)
        elif value is _MISSING:
            filled[param.name] = param.default
            continue
        elif kind is param.POSITIONAL_ONLY or (star and kind is param.POSITIONAL_OR_KEYWORD):
            args.append(value)
        else:
            kwargs[param.name] = value
        filled[param.name] = value
    if name == "__init__":
        self._twinkle_create(args, kwargs)
        return None
    mark = cls._twinkle_api[name]
    if mark.name == "forward_backward":
        check_stop(mark.name)
    call = BoundCall(name=name, method=mark.name, deferred=mark.deferred, args=args, kwargs=kwargs, values=filled)
    handler = cls._twinkle_handlers.get(mark.name)
    if handler is not None:
        return handler(self, call)
    return self._twinkle_call(call)


def _make_function(owner: str, name: str, sig: inspect.Signature, local: Any, module: str) -> Callable[..., Any]:
    """A function with exactly ``sig``, calling ``_dispatch``.

    It is compiled from source (inside a class named like the local one) rather than taking
    ``*args, **kwargs``: Python itself then binds the arguments, so a wrong call raises the
    very ``TypeError`` the local method raises, message and qualified name included.
    """
    params = list(sig.parameters.values())
    reserved = {"_twinkle_dispatch_", "_twinkle_missing_"}
    last_pos_only = max((i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY), default=-1)
    parts: list[str] = []
    star = False
    for i, p in enumerate(params):
        if p.name in reserved or not p.name.isidentifier() or p.name.startswith("__"):
            raise TypeError(f"cannot mirror {owner}.{name}: parameter name {p.name!r}")
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name + ("=_twinkle_missing_" if p.default is not p.empty else ""))
        if i == last_pos_only:
            parts.append("/")
    self_name = params[0].name
    collected = ", ".join(f"{p.name!r}: {p.name}" for p in params[1:])
    src = (
        f"class {owner}:\n"
        f"    def {name}({', '.join(parts)}):\n"
        f"        return _twinkle_dispatch_({self_name}, {name!r}, {{{collected}}})\n"
    )
    namespace: dict[str, Any] = {"_twinkle_dispatch_": _dispatch, "_twinkle_missing_": _MISSING}
    exec(compile(src, f"<twinkle_client {owner}.{name}>", "exec"), namespace)  # noqa: S102 (generated from a signature)
    fn = namespace[owner].__dict__[name]
    fn.__signature__ = sig
    fn.__doc__ = getattr(local, "__doc__", None)
    fn.__annotations__ = dict(getattr(local, "__annotations__", {}))
    fn.__module__ = module
    return fn


def derive_remote_class(
    local_cls: type,
    *,
    kind: str,
    base: type[RemoteObject] = RemoteObject,
    handlers: dict[str, Handler] | None = None,
    module: str | None = None,
    doc: str | None = None,
) -> type[RemoteObject]:
    """The remote twin of ``local_cls``: its constructor and every ``@api_method``, same signatures.

    ``handlers`` maps a method name to client-side behaviour ``handler(self, call)``; the
    method keeps the local signature because the handler sits behind the generated function.
    """
    owner = local_cls.__name__
    module = module or base.__module__
    api = api_methods(local_cls)
    signatures = {"__init__": inspect.signature(local_cls.__init__)}
    namespace: dict[str, Any] = {
        "__module__": module,
        "__qualname__": owner,
        "__doc__": doc or (
            f"{owner} on a twinkle server: the API of ``{local_cls.__module__}.{owner}``, run remotely.\n\n"
            + inspect.cleandoc(local_cls.__doc__ or "")
        ),
        "_twinkle_kind": kind,
        "_twinkle_local": local_cls,
        "_twinkle_api": {name: mark for name, (mark, _) in api.items()},
        "_twinkle_handlers": dict(handlers or {}),
        "_twinkle_signatures": signatures,
        "__init__": _make_function(owner, "__init__", signatures["__init__"], local_cls.__init__, module),
    }
    for name, (_mark, sig) in api.items():
        signatures[name] = sig
        namespace[name] = _make_function(owner, name, sig, getattr(local_cls, name), module)
    return type(owner, (base,), namespace)
