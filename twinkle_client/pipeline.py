"""One remote object's outgoing calls: an ordered queue and the thread that sends it.

The sender thread sends everything queued as one ``CallBatch``, so the calls of a training
step share one or two round trips, and keeps up to ``MAX_BATCHES_IN_FLIGHT`` batches in
flight: while the server runs one, the next is already there. Each batch names the one sent
before it (``after``), and the server runs them in that order. Each call takes the object's
next ``seq`` when queued, and the transport re-sends the same bytes on retry, so each call
runs at most once.

A failed call marks the pipeline: the next call or read on the object raises the error
(``step() failed: ...`` for a deferred call, whose failure surfaces at another line), once.
Calls queued behind the failure are not run; their futures hold an error of the same class
whose ``blocked_by`` is the failure. A batch already in flight when a call failed is refused
by the server (it carries the count of failures the client had seen), with the same errors.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from twinkle.protocol import codec
from twinkle.protocol.errors import DeadlineError, ServerError, StateError, TwinkleError, error_from_code
from twinkle.protocol.limits import MAX_BATCHES_IN_FLIGHT, MAX_CALLS_PER_BATCH
from twinkle.protocol.wire import CallBatchResult, CallResult, ErrorInfo

from .interrupt import TrainingInterrupted

log = logging.getLogger("twinkle_client")

Send = Callable[[dict[str, Any]], Any]
"""Posts a ``CallBatch`` body for the object and returns the decoded reply."""


class CallFuture(Future):
    """The outcome of one queued call, settled once by the sender thread.

    ``training_run_id``: for a model call, the run its adapter trains once the call ran.
    """

    def __init__(self, method: str, seq: int, deferred: bool) -> None:
        super().__init__()
        self.method = method
        self.seq = seq
        self.deferred = deferred
        self.training_run_id: str | None = None


@dataclass
class _Pending:
    seq: int
    method: str
    args: Any
    kwargs: Any
    future: CallFuture


def _blocked(cause: TwinkleError, failed_call: str) -> TwinkleError:
    # Same class as the cause, so that ``except CapacityError`` catches both alike.
    return type(cause)(f"not run: an earlier call ({failed_call}) failed", request_id=cause.request_id,
                       blocked_by=cause)


def _call_error(info: ErrorInfo, method: str, deferred: bool) -> TwinkleError:
    name = info.call or method
    # A deferred call's error surfaces later, at another line: name the call that failed.
    message = f"{name}() failed: {info.message}" if deferred else info.message
    return error_from_code(info.code, message, info.request_id, call=name)


LIVE: weakref.WeakSet[Pipeline] = weakref.WeakSet()
"""Every pipeline not yet garbage-collected (drained at interpreter exit)."""


class Pipeline:
    """The ordered outgoing calls of one remote object and the thread that sends them.

    It holds no reference to the remote object, so the object can be garbage-collected.
    """

    def __init__(self, label: str, send: Send) -> None:
        self.label = label
        self._send_batch = send
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._next_seq = 1
        self._settled_seq = 0
        self._in_flight = 0
        self._last_sent_seq = 0
        self._last_answered_seq = 0
        """The last seq of the latest batch the server answered call by call."""
        self._server_failures = 0
        """The object's failed calls as the server last reported them (sent with each batch)."""
        self._stopping = False
        self._closed = False
        self._failure: TwinkleError | None = None
        self._cause: tuple[TwinkleError, str] | None = None
        """The latest failure and the call that failed, kept after the mark is consumed: calls
        the server refused because of it are reported as blocked by it."""
        self._thread: threading.Thread | None = None
        LIVE.add(self)

    # --------------------------------------------------------------- caller side

    def submit(self, method: str, args: list[Any], kwargs: dict[str, Any], *, deferred: bool,
               ref_of: Callable[[Any], str | None] | None = None) -> CallFuture:
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
                self._thread = threading.Thread(target=self._run, name=f"twinkle-sender-{self.label}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return future

    def read(self, future: CallFuture, timeout: float | None = None) -> Any:
        """The call's value; raises its error (consuming the object's mark if it is that error).

        Ctrl-C while waiting stops the wait, not the call: it still runs on the server in
        order, and its outcome stays with the future (and the object's mark) for a later read.
        """
        try:
            error = future.exception(timeout)
        except TimeoutError:
            raise DeadlineError(
                f"{self.label}: {future.method}() did not finish within {timeout} s (it may still run)"
            ) from None
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"stopped waiting for {future.method}(); it still runs on the server, in order"
            ) from None
        if error is None:
            return future.result()
        assert isinstance(error, TwinkleError)
        with self._cond:
            if error is self._failure:
                self._failure = None
            elif not future.deferred and error.blocked_by is not None and error.blocked_by is self._failure:
                # A caller waiting on a skipped call learns the real failure.
                error, self._failure = self._failure, None
        raise error.with_traceback(None)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every call queued so far has run; then raise a pending failure, once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._next_seq - 1
            while self._settled_seq < target or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineError(f"{self.label}: queued calls did not finish within {timeout} s")
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
            while self._queue or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    # --------------------------------------------------------------- sender thread

    def _run(self) -> None:
        in_flight: deque[tuple[list[_Pending], Future[tuple[list[CallResult], int] | TwinkleError]]] = deque()
        while True:
            with self._cond:
                while True:
                    if in_flight and in_flight[0][1].done():
                        payload = None
                        break
                    if self._queue and len(in_flight) < MAX_BATCHES_IN_FLIGHT:
                        batch = self._queue[:MAX_CALLS_PER_BATCH]
                        del self._queue[:MAX_CALLS_PER_BATCH]
                        payload = {
                            "calls": [{"seq": p.seq, "method": p.method, "args": p.args, "kwargs": p.kwargs}
                                      for p in batch],
                            "after": self._last_sent_seq,
                            "failures": self._server_failures,
                        }
                        self._last_sent_seq = batch[-1].seq
                        self._in_flight += 1
                        break
                    if not in_flight and not self._queue and self._stopping:
                        self._thread = None
                        return
                    self._cond.wait()
            if payload is not None:
                in_flight.append((batch, self._start_post(payload)))
                continue
            done, future = in_flight.popleft()
            self._settle(done, future.result())

    def _start_post(self, payload: dict[str, Any]) -> Future[tuple[list[CallResult], int] | TwinkleError]:
        """Post a batch on its own daemon thread (an executor's threads would be joined at
        interpreter exit, before the exit drain, and refuse new work there)."""
        future: Future[tuple[list[CallResult], int] | TwinkleError] = Future()

        def post() -> None:
            future.set_result(self._post(payload))
            with self._cond:
                self._cond.notify_all()

        try:
            threading.Thread(target=post, name=f"twinkle-post-{self.label}", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had: the batch fails, its futures settle
            future.set_result(TwinkleError(f"the twinkle client could not send the calls: {exc}"))
        return future

    def _post(self, payload: dict[str, Any]) -> tuple[list[CallResult], int] | TwinkleError:
        try:
            data = self._send_batch(payload)
            try:
                reply = CallBatchResult.model_validate(data)
            except Exception as exc:
                raise ServerError(f"the twinkle server sent a malformed call result: {exc}") from None
            return reply.results, reply.failures
        except TwinkleError as exc:
            return exc
        except Exception as exc:  # a bug must not kill the thread and hang every reader
            log.exception("twinkle client: sending calls of %s failed", self.label)
            return TwinkleError(f"the twinkle client failed to send the call: {exc!r}")

    def _settle(self, batch: list[_Pending], outcome: tuple[list[CallResult], int] | TwinkleError) -> None:
        settled: list[tuple[CallFuture, Any, TwinkleError | None]] = []
        failure: TwinkleError | None = None
        failed_call = ""
        blocked_by = self._cause
        if isinstance(outcome, TwinkleError):
            # The whole request failed: whether any call ran is unknown, so every call of the
            # batch reports the same error.
            first = batch[0]
            failure = error_from_code(
                outcome.code,
                f"{first.method}() failed: {outcome.message}" if first.future.deferred else outcome.message,
                outcome.request_id,
                call=first.method,
            )
            failed_call = first.method
            settled = [(p.future, None, failure) for p in batch]
            with self._cond:
                # The server may never have seen this batch: the next one must not wait for it.
                # (A batch sent after it and still in flight is then answered as never run.)
                self._last_sent_seq = self._last_answered_seq
        else:
            results, server_failures = outcome
            by_seq = {r.seq: r for r in results}
            # A reply that lists every call, or stops at a failure, shows the server handled
            # the batch; one without the calls' results (a proxy, a bug) does not, and then the
            # next batch must not wait for it either.
            handled = all(p.seq in by_seq for p in batch) or not all(r.ok for r in results)
            with self._cond:
                self._server_failures = max(self._server_failures, server_failures)
                if handled:
                    self._last_answered_seq = max(self._last_answered_seq, batch[-1].seq)
                else:
                    self._last_sent_seq = self._last_answered_seq
            for p in batch:
                if failure is not None:
                    settled.append((p.future, None, _blocked(failure, failed_call)))
                    continue
                result = by_seq.get(p.seq)
                if result is not None and result.error is not None and result.error.blocked and blocked_by:
                    # Sent before the client saw an earlier failure; the server did not run it.
                    settled.append((p.future, None, _blocked(*blocked_by)))
                    continue
                if result is None:
                    info = ErrorInfo(code="internal", message="the server returned no result for this call")
                    result = CallResult(seq=p.seq, ok=False, error=info)
                p.future.training_run_id = result.training_run_id
                if result.ok:
                    try:
                        settled.append((p.future, codec.from_wire(result.value), None))
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
                self._cause = (failure, failed_call)
                # Calls queued behind a failure are not sent: the user has not seen it yet.
                settled.extend((p.future, None, _blocked(failure, failed_call)) for p in self._queue)
                if self._queue:
                    self._settled_seq = self._queue[-1].seq
                self._queue.clear()
            for future, value, error in settled:
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
            self._settled_seq = max(self._settled_seq, batch[-1].seq)
            self._in_flight -= 1
            self._cond.notify_all()
