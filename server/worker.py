"""Fair executors: the device worker (the one thread that touches the base model) and the
data threads (dataset and dataloader work).

All adapters share one model on one device, so model calls run one at a time. To keep one
busy user from starving the others, each user has a FIFO queue and the worker serves the
users round-robin: one call from the user at the head of the line, then that user goes to
the back if it has more work. A user's own calls keep their order.

Calls that can share a device pass (``Fusable``: forward_backward or forward_only of
different users' adapters) are gathered when the worker takes one: the call of the user at
the head of the line, then the first waiting call of each next user in line whose call is
of the same kind, while the pass stays within ``fuse_tokens``. Each user adds at most one
call to a pass and goes to the back of the line like any other, so fusing keeps the round
robin; nothing waits for company (a lone tenant runs at once).

The data threads are served the same way, with one more rule: a user may run at most
``per_key`` calls at once (``--data-threads-per-user``). A slow dataset build of one user
(a hub download) then holds only that user's share of the threads; the others keep serving
everybody else.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from twinkle.errors import TransportError

T = TypeVar("T")
log = logging.getLogger("twinkle_server.worker")


class WorkerStopped(TransportError):
    """The worker was shut down; no more calls are accepted (the client may retry elsewhere)."""


@dataclass
class Fusable:
    """A call that may share one device pass with others of the same ``group``.

    ``begin()`` prepares it (raising: this call's error); ``together(prepared)`` runs several
    prepared calls as one pass and returns each one's value or exception; ``end(prepared,
    outcome)`` records it and gives the call's result (raising: its error).
    """

    group: Hashable
    tokens: int
    begin: Callable[[], Any]
    together: Callable[[list[Any]], list[Any]]
    end: Callable[[Any, Any], Any]


_Item = tuple[Future[Any], Callable[[], Any] | None, Fusable | None]


class FairExecutor:
    """``threads`` threads running submitted functions, round-robin across queue keys (users),
    with at most ``per_key`` functions of one key running at once (None: no such cap)."""

    def __init__(self, threads: int = 1, per_key: int | None = None, name: str = "twinkle-worker",
                 fuse_tokens: int = 0) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if per_key is not None and per_key < 1:
            raise ValueError(f"per_key must be >= 1 or None, got {per_key}")
        self.per_key = per_key
        self.fuse_tokens = fuse_tokens
        """Most tokens one fused pass gathers (0: every call runs alone)."""
        self.passes = 0
        self.fused_calls = 0
        """Device passes that ran fusable calls, and the calls they ran (for ``/server`` and benchmarks)."""
        self._queues: dict[Hashable, deque[_Item]] = {}
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

    def submit(self, key: Hashable, fn: Callable[[], T] | None = None, *, fusable: Fusable | None = None) -> Future[T]:
        """Queue ``fn`` (or a ``fusable`` call) behind ``key``'s earlier calls; the future holds
        its result or exception."""
        if (fn is None) == (fusable is None):
            raise ValueError("submit takes fn or fusable, not both")
        future: Future[T] = Future()
        with self._cv:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = deque()
                self._order.append(key)
            queue.append((future, fn, fusable))
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
        for future, _, _ in dropped:
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

    def _take(self, i: int) -> tuple[Hashable, _Item]:
        """Pop the head call of the key at ``_order[i]``; the key goes to the back of the line."""
        key = self._order[i]
        del self._order[i]
        queue = self._queues[key]
        item = queue.popleft()
        if queue:
            self._order.append(key)  # round-robin: back of the line
        else:
            del self._queues[key]
        self._running[key] = self._running.get(key, 0) + 1
        return key, item

    def _next(self) -> list[tuple[Hashable, _Item]] | None:
        with self._cv:
            while True:
                if self._stopping:
                    return None
                i = self._eligible()
                if i is not None:
                    break
                self._cv.wait()
            taken = [self._take(i)]
            first = taken[0][1][2]
            if first is None or not self.fuse_tokens:
                return taken
            tokens = first.tokens
            j = 0
            while j < len(self._order):
                key = self._order[j]
                head = self._queues[key][0][2]
                # A key already taken may be back in line (it had more calls): one call per user.
                joins = (
                    head is not None and head.group == first.group
                    and tokens + head.tokens <= self.fuse_tokens
                    and all(key != k for k, _ in taken)
                    and (self.per_key is None or self._running.get(key, 0) < self.per_key)
                )
                if joins:
                    tokens += head.tokens
                    taken.append(self._take(j))  # removes _order[j]; the same j is the next key
                else:
                    j += 1
            return taken

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
            taken = self._next()
            if taken is None:
                return
            try:
                live = [item for _, item in taken if item[0].set_running_or_notify_cancel()]
                if len(live) == 1 and live[0][1] is not None:
                    _settle(live[0][0], live[0][1])
                elif live:
                    self._run_fused(live)
            finally:
                for key, _ in taken:
                    self._done(key)

    def _run_fused(self, items: list[_Item]) -> None:
        begun: list[tuple[Future[Any], Fusable, Any]] = []
        for future, _, fusable in items:
            assert fusable is not None
            try:
                begun.append((future, fusable, fusable.begin()))
            except BaseException as exc:  # this call's own error (bad argument, unknown adapter)
                future.set_exception(exc)
        if not begun:
            return
        try:
            outcomes = begun[0][1].together([prepared for _, _, prepared in begun])
        except BaseException as exc:  # the pass itself failed: every call in it gets the error
            # Each its own copy: ending a call adds that user's names to its error.
            outcomes = [_own_copy(exc) for _ in begun]
        self.passes += 1
        self.fused_calls += len(begun)
        for (future, fusable, prepared), outcome in zip(begun, outcomes, strict=True):
            _settle(future, lambda fusable=fusable, prepared=prepared, outcome=outcome: fusable.end(prepared, outcome))


def _own_copy(exc: BaseException) -> BaseException:
    try:
        twin = copy.copy(exc).with_traceback(exc.__traceback__)
        twin.__cause__, twin.__context__ = exc.__cause__, exc.__context__
    except Exception:  # an exception that cannot be copied: share it rather than fail
        return exc
    if isinstance(getattr(twin, "aliases", None), dict):
        twin.aliases = dict(twin.aliases)  # type: ignore[attr-defined]
    return twin


def _settle(future: Future[Any], fn: Callable[[], Any]) -> None:
    try:
        result = fn()
    except BaseException as exc:  # handed to the waiter, which decides how to report it
        future.set_exception(exc)
    else:
        future.set_result(result)


class DeviceWorker(FairExecutor):
    """The single thread that runs model calls, fair across users."""

    def __init__(self, name: str = "twinkle-device", fuse_tokens: int = 0) -> None:
        super().__init__(threads=1, per_key=None, name=name, fuse_tokens=fuse_tokens)

    @property
    def thread(self) -> threading.Thread:
        return self._threads[0]

    def call(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it (runs inline when already on the worker)."""
        if self.on_worker():
            return fn()
        return self.submit(key, fn).result()
