"""Fair executors: the device worker (the one thread that touches the base model) and the
data threads (dataset and dataloader work).

All adapters share one model on one device, so model calls run one at a time. To keep one
busy user from starving the others, each user has a FIFO queue and the worker serves the
users round-robin: one call from the user at the head of the line, then that user goes to
the back if it has more work. A user's own calls keep their order.

The data threads are served the same way, with one more rule: a user may run at most
``per_key`` calls at once (``--data-threads-per-user``). A slow dataset build of one user
(a hub download) then holds only that user's share of the threads; the others keep serving
everybody else.
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


class FairExecutor:
    """``threads`` threads running submitted functions, round-robin across queue keys (users),
    with at most ``per_key`` functions of one key running at once (None: no such cap)."""

    def __init__(self, threads: int = 1, per_key: int | None = None, name: str = "twinkle-worker") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if per_key is not None and per_key < 1:
            raise ValueError(f"per_key must be >= 1 or None, got {per_key}")
        self.per_key = per_key
        self._queues: dict[Hashable, deque[tuple[Future[Any], Callable[[], Any]]]] = {}
        self._order: deque[Hashable] = deque()
        """Keys with queued calls, in the order they are served."""
        self._running: dict[Hashable, int] = {}
        self._cv = threading.Condition()
        self._stopping = False
        suffixes = [""] if threads == 1 else [f"-{i}" for i in range(threads)]
        self._threads = [threading.Thread(target=self._run, name=f"{name}{s}", daemon=True) for s in suffixes]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def on_worker(self) -> bool:
        """True when called from one of this executor's threads."""
        return threading.current_thread() in self._threads

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
            self._cv.notify_all()
        return future

    def pending(self) -> int:
        """Calls queued and not started yet."""
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    def running(self, key: Hashable | None = None) -> int:
        """Calls running now (of ``key``, or of everyone)."""
        with self._cv:
            if key is None:
                return sum(self._running.values())
            return self._running.get(key, 0)

    def stop(self, timeout: float = 10.0) -> None:
        """Let the calls in progress finish, cancel the queued ones, end the threads (waiting at
        most ``timeout`` seconds for them)."""
        with self._cv:
            self._stopping = True
            dropped = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._order.clear()
            self._cv.notify_all()
        for future, _ in dropped:
            future.cancel()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _eligible(self) -> int | None:
        """The position in ``_order`` of the first key that may start a call now."""
        for i, key in enumerate(self._order):
            if self.per_key is None or self._running.get(key, 0) < self.per_key:
                return i
        return None

    def _next(self) -> tuple[Hashable, Future[Any], Callable[[], Any]] | None:
        with self._cv:
            while True:
                if self._stopping:
                    return None
                i = self._eligible()
                if i is not None:
                    break
                self._cv.wait()
            key = self._order[i]
            del self._order[i]
            queue = self._queues[key]
            future, fn = queue.popleft()
            if queue:
                self._order.append(key)  # round-robin: back of the line
            else:
                del self._queues[key]
            self._running[key] = self._running.get(key, 0) + 1
            return key, future, fn

    def _done(self, key: Hashable) -> None:
        with self._cv:
            left = self._running[key] - 1
            if left:
                self._running[key] = left
            else:
                del self._running[key]
            self._cv.notify_all()  # the key may be eligible again

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            key, future, fn = item
            try:
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    result = fn()
                except BaseException as exc:  # handed to the waiter, which decides how to report it
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            finally:
                self._done(key)


class DeviceWorker(FairExecutor):
    """The single thread that runs model calls, fair across users."""

    def __init__(self, name: str = "twinkle-device") -> None:
        super().__init__(threads=1, per_key=None, name=name)

    @property
    def thread(self) -> threading.Thread:
        return self._threads[0]

    def call(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it (runs inline when already on the worker)."""
        if self.on_worker():
            return fn()
        return self.submit(key, fn).result()
