"""When remote objects end: ``close()``, garbage collection and interpreter exit.

A server object holds capacity (a model holds adapter slots and its runs), so the client
releases it as soon as the user is done with it: on ``close()``, when the remote object is
garbage-collected (``model = ...`` run again in a notebook) and at interpreter exit, after
the calls still queued (a last ``lr_step``) have been sent. A restarted kernel can then
resume its run at once instead of waiting for the server's idle timeout.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

from .client import on_current_client
from .pipeline import LIVE, Pipeline
from .transport import RetryPolicy

log = logging.getLogger("twinkle_client")

EXIT_DRAIN_S = 10.0
GC_DRAIN_S = 60.0
CLOSE_RETRY = RetryPolicy(total_s=5.0)

LIVE_OBJECTS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Remote objects not yet closed (closed at interpreter exit)."""


def _report_unread(pipeline: Pipeline) -> None:
    failure = pipeline.take_failure()
    if failure is not None:
        log.warning("twinkle: %s: a call failed and the error was never read: %s", pipeline.label, failure)


def release(pipeline: Pipeline, object_id: str, server: str) -> None:
    """Stop ``pipeline``'s sender and delete the server object; never raises."""
    pipeline.shutdown()
    _report_unread(pipeline)
    try:
        path = f"/objects/{object_id}"
        on_current_client(lambda c: c.transport.delete_json(path, retry=CLOSE_RETRY), pipeline.label, server)
    except Exception as exc:
        # The server may have reaped it already, or be gone; nothing is left to release here.
        log.info("twinkle: closing %s: %s", pipeline.label, exc)


def release_later(pipeline: Pipeline, object_id: str, server: str) -> None:
    """Finalizer: garbage collection may run anywhere, so the network part goes to a thread."""

    def run() -> None:
        pipeline.join(GC_DRAIN_S)
        release(pipeline, object_id, server)

    threading.Thread(target=run, name=f"twinkle-release-{object_id}", daemon=True).start()


@atexit.register
def _drain_at_exit() -> None:
    """Send what is still queued and report failures nobody read, then release the objects."""
    deadline = time.monotonic() + EXIT_DRAIN_S
    for pipeline in list(LIVE):
        pipeline.join(max(0.0, deadline - time.monotonic()))
        _report_unread(pipeline)
    for obj in list(LIVE_OBJECTS):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            obj._twinkle_close(remaining)
        except Exception as exc:  # exit must go on whatever the server says
            log.info("twinkle: closing %r at exit: %s", obj, exc)
