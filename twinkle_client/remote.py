"""``RemoteObject``: an object that lives on the twinkle server, called through its pipeline.

The remote classes (``twinkle_client.model``, ``.dataset``, ``.dataloader``) are derived
from the API declarations (``twinkle_client.derive``); every generated method lands in
``RemoteObject._twinkle_dispatch``, which applies what the declaration says: a stop request
ends the loop before an interruptible call, ``CheckpointPath`` arguments travel as their
``twinkle://`` string, a deferred call returns a lazy value at once, and a subclass sees
each call's outcome (``_twinkle_after``) to keep its client-side state and raise events.
"""

from __future__ import annotations

import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twinkle.protocol import codec
from twinkle.protocol.api import ApiClass, Arg, Method, has_api
from twinkle.protocol.errors import InvalidArgumentError, ServerError
from twinkle.protocol.wire import CheckpointPath, ObjectInfo

from .client import on_current_client
from .derive import MISSING
from .interrupt import check_stop
from .lazy import lazy_class_for
from .lifecycle import LIVE_OBJECTS, release, release_later
from .pipeline import CallFuture, Pipeline


@dataclass
class BoundCall:
    """One call of a declared method.

    ``args``/``kwargs`` hold only the arguments the caller gave (the server applies the same
    defaults); ``values`` has every parameter, defaults filled in, for client-side logic.
    """

    spec: Method
    args: list[Any]
    kwargs: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


def ref_of(value: Any) -> str | None:
    """``codec.to_wire`` hook: a remote object travels as its id, after its queued calls ran."""
    if isinstance(value, RemoteObject):
        value._twinkle_pipeline.flush()
        return value.object_id
    if has_api(value):  # a local twinkle Dataset, DataLoader or model
        raise InvalidArgumentError(
            f"a local {type(value).__name__} cannot be sent to the server; "
            f"create it with twinkle_client's {type(value).__name__} instead"
        )
    return None


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, CheckpointPath) else value


def _split(sig_params: list[Any], values: dict[str, Any]) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The given arguments as ``(args, kwargs)`` and every parameter's value (defaults filled).

    Parameters go by name (the server binds them with the same signature), except
    positional-only ones and those before a non-empty ``*args``, which can only go by position.
    """
    star = next((values[p.name] for p in sig_params if p.kind is p.VAR_POSITIONAL), ())
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    filled: dict[str, Any] = {}
    for param in sig_params:
        value = values[param.name]
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            args.extend(value)
        elif kind is param.VAR_KEYWORD:
            kwargs.update(value)
        elif value is MISSING:
            filled[param.name] = param.default
            continue
        elif kind is param.POSITIONAL_ONLY or (star and kind is param.POSITIONAL_OR_KEYWORD):
            args.append(value)
        else:
            kwargs[param.name] = value
        filled[param.name] = value
    return args, kwargs, filled


class RemoteObject:
    """Base of the derived remote classes: an object that lives on the twinkle server.

    The server object is created by the constructor; its id (``object_id``) belongs to the
    user, and it stays bound to the server that holds it (``init_twinkle_client`` may change
    the key or options, not the server, under a live object).
    """

    __twinkle_api__: ClassVar[ApiClass]
    _twinkle_pipeline: Pipeline
    _twinkle_object_id: str
    _twinkle_server: str

    def _twinkle_setup(self) -> None:
        """Client-side state of a subclass; runs before the server object is created."""

    def _twinkle_before(self, call: BoundCall) -> None:
        """A subclass may complete a call's arguments here, before it is sent (a value the
        client knows and the caller left out)."""

    def _twinkle_after(self, call: BoundCall, future: CallFuture, value: Any) -> Any:
        """A subclass's view of a call's outcome (for a deferred call: as soon as it is queued,
        with its lazy value); returns what the caller gets."""
        return value

    # ----------------------------------------------------------------- dispatch

    def _twinkle_dispatch(self, name: str, values: dict[str, Any]) -> Any:
        api = type(self).__twinkle_api__
        if name == "__init__":
            args, kwargs, _ = _split(list(api.init.parameters.values())[1:], values)
            self._twinkle_create(args, kwargs)
            return None
        spec = api.methods[name]
        if spec.interruptible:
            check_stop(spec.name)
        args, kwargs, filled = _split(spec.parameters, values)
        if spec.args_of(Arg.CHECKPOINT):
            args = [_as_text(a) for a in args]
            kwargs = {k: _as_text(v) for k, v in kwargs.items()}
        call = BoundCall(spec, args, kwargs, filled)
        self._twinkle_before(call)
        return self._twinkle_invoke(call)

    def _twinkle_invoke(self, call: BoundCall) -> Any:
        """Send ``call``: a lazy value if it is deferred, else wait for its value."""
        pipeline = self._twinkle_pipeline
        future = pipeline.submit(call.name, call.args, call.kwargs, deferred=call.spec.deferred, ref_of=ref_of)
        if call.spec.deferred:
            lazy_cls = lazy_class_for(call.spec.signature.return_annotation)
            return self._twinkle_after(call, future, lazy_cls(future, pipeline.read))
        return self._twinkle_after(call, future, pipeline.read(future))

    # ---------------------------------------------------------------- life cycle

    def _twinkle_create(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self._twinkle_setup()
        kind = type(self).__twinkle_api__.kind
        payload = {"kind": kind, "args": codec.to_wire(list(args), ref_of), "kwargs": codec.to_wire(dict(kwargs), ref_of)}
        # The key makes a creation retried after a lost reply return the same object.
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        server, data = on_current_client(
            lambda c: (c.base_url, c.transport.post_msgpack("/objects", payload, headers=headers, hub=True)),
            type(self).__name__,
        )
        try:
            info = ObjectInfo.model_validate(data)
        except Exception as exc:
            raise ServerError(f"the twinkle server sent a malformed object id: {exc}") from None
        self._twinkle_object_id = info.object_id
        self._twinkle_server = server
        label = f"{type(self).__name__} {info.object_id}"
        path = f"/objects/{info.object_id}/calls"
        self._twinkle_pipeline = Pipeline(
            label, lambda body: on_current_client(lambda c: c.transport.post_msgpack(path, body, hub=True), label, server)
        )
        # Dropped without close() (e.g. `model = ...` run again): free the server object too,
        # or its adapter slot stays taken until the server's idle timeout.
        self._twinkle_finalizer = weakref.finalize(self, release_later, self._twinkle_pipeline, info.object_id, server)
        # At exit the lifecycle module closes live objects itself, after draining their queues.
        self._twinkle_finalizer.atexit = False
        LIVE_OBJECTS.add(self)

    @property
    def object_id(self) -> str:
        """The server-side id of this object."""
        return self._twinkle_object_id

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
        release(pipeline, self.object_id, self._twinkle_server)

    def __repr__(self) -> str:
        oid = getattr(self, "_twinkle_object_id", None)
        return f"<remote {type(self).__name__} {oid or '(not created)'}>"
