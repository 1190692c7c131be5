"""Stopping a training loop between calls: a request to stop, honoured where calls are made.

A notebook's Ctrl-C handler (or any other code) calls ``request_stop()``; the next training
call of any remote model (``forward_backward``) then raises ``TrainingInterrupted`` before
it is queued, so the loop ends between calls with every queued call still run in order and
the model in a consistent state. A Ctrl-C that arrives while a call waits for its reply
stops the wait, not the call: the call still runs on the server and its result is kept for
the object's next read.
"""

from __future__ import annotations

import threading

__all__ = ["TrainingInterrupted", "clear_stop", "request_stop", "stop_requested"]

_stop = threading.Event()


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the next training call after ``request_stop()`` (e.g. Ctrl-C in a notebook)."""


def request_stop() -> None:
    """Ask the training loop to stop at its next training call."""
    _stop.set()


def clear_stop() -> None:
    """Withdraw a stop request (a new cell starts with none)."""
    _stop.clear()


def stop_requested() -> bool:
    return _stop.is_set()


def check_stop(method: str) -> None:
    """Raise ``TrainingInterrupted`` (consuming the request) if a stop was requested."""
    if _stop.is_set():
        _stop.clear()
        raise TrainingInterrupted(
            f"training stopped before {method}(); every earlier call ran and the model is usable "
            "(e.g. model.save(...))"
        )
