"""The device worker: the one thread that touches the base model.

All adapters share one model on one device, so model calls run one at a time. To keep one
busy user from starving the others, each user has a FIFO queue and the worker serves the
users round-robin: one call from the user at the head of the line, then that user goes to
the back if it has more work. A user's own calls keep their order.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

from twinkle.errors import TransportError

T = TypeVar("T")
log = logging.getLogger("twinkle_server.worker")


class WorkerStopped(TransportError):
    """The worker was shut down; no more calls are accepted (the client may retry elsewhere)."""


class DeviceWorker:
    """A single thread running submitted functions, fair across queue keys (users)."""

    def __init__(self, name: str = "twinkle-device") -> None:
        self._queues: dict[Hashable, deque[tuple[Future[Any], Callable[[], Any]]]] = {}
        self._order: deque[Hashable] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def on_worker(self) -> bool:
        """True when called from the worker thread itself."""
        return threading.current_thread() is self._thread

    def submit(self, key: Hashable, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn`` behind ``key``'s earlier calls; the future holds its result or exception."""
        future: Future[T] = Future()
        with self._cv:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._order.append(key)
            queue.append((future, fn))
            self._cv.notify()
        return future

    def call(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it (runs inline when already on the worker)."""
        if self.on_worker():
            return fn()
        return self.submit(key, fn).result()

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the call in progress, cancel the queued ones, end the thread."""
        with self._cv:
            self._stopping = True
            dropped = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._order.clear()
            self._cv.notify_all()
        for future, _ in dropped:
            future.cancel()
        self._thread.join(timeout)

    def _next(self) -> tuple[Future[Any], Callable[[], Any]] | None:
        with self._cv:
            while not self._order and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            key = self._order.popleft()
            queue = self._queues[key]
            item = queue.popleft()
            if queue:
                self._order.append(key)  # round-robin: back of the line
            else:
                del self._queues[key]
            return item

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to the waiter, which decides how to report it
                future.set_exception(exc)
            else:
                future.set_result(result)
