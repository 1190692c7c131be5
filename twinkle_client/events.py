"""A tiny synchronous observer hook for the notebook layer.

Remote models emit a ``TrainingEvent`` on the caller's thread when a method is called:
deferred ones (``forward_backward``, ``step``) as soon as they are queued, without waiting
for the server; the others (``save``, ``load``, ``resume``, ``adapter_added``) once their
reply is in, so that ``run_id`` and ``value`` are known. A listener that raises is logged
and ignored: observing never breaks training.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("twinkle_client.events")

KINDS = ("adapter_added", "forward_backward", "step", "save", "load", "resume", "upload", "closed")


@dataclass(frozen=True)
class TrainingEvent:
    """Something a remote model was asked to do.

    ``kind``: one of ``KINDS``. ``model``: the remote model. ``run_id``: its training run
    (None before an adapter exists). ``method``: the API method called (``clip_grad_and_step``
    is a ``step``). ``value``: the call's result: a lazy output for ``forward_backward``, the
    ``twinkle://`` path for ``save``, the progress dict for ``resume``, else None.
    """

    kind: str
    model: Any
    run_id: str | None
    method: str
    value: Any = None


Listener = Callable[[TrainingEvent], None]

_lock = threading.Lock()
_listeners: list[Listener] = []


def subscribe(fn: Listener) -> Callable[[], None]:
    """Call ``fn(event)`` for every training event; returns a function that unsubscribes."""
    if not callable(fn):
        raise TypeError(f"subscribe needs a callable, got {type(fn).__name__}")
    with _lock:
        _listeners.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return unsubscribe


def emit(event: TrainingEvent) -> None:
    """Deliver ``event`` to every listener, in subscription order, on this thread."""
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        try:
            fn(event)
        except Exception:
            log.exception("twinkle event listener %r failed on %s; ignored", fn, event.kind)
