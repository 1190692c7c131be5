"""One remote object's outgoing calls: an ordered queue and the thread that sends it.

The sender thread sends everything queued as one ``CallBatch``, so the calls of a training
step share one or two round trips. Each call takes the object's next ``seq`` when queued,
and the transport re-sends the same seqs on retry, so each call runs at most once.

A failed call marks the pipeline: the next call or read on the object raises the error
(``step() failed: ...`` for a deferred call, whose failure surfaces at another line), once.
Calls queued behind the failure are not run; their futures hold an error of the same class
whose ``blocked_by`` is the failure.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from twinkle.protocol import codec
from twinkle.protocol.errors import DeadlineError, ServerError, StateError, TwinkleError, error_from_code
from twinkle.protocol.limits import MAX_CALLS_PER_BATCH
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
        self._sending = False
        self._stopping = False
        self._closed = False
        self._failure: TwinkleError | None = None
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
            while self._settled_seq < target:
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
        data = self._send_batch(payload)
        try:
            return CallBatchResult.model_validate(data).results
        except Exception as exc:
            raise ServerError(f"the twinkle server sent a malformed call result: {exc}") from None

    def _settle(self, batch: list[_Pending], outcome: list[CallResult] | TwinkleError) -> None:
        settled: list[tuple[CallFuture, Any, TwinkleError | None]] = []
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
                call=first.method,
            )
            failed_call = first.method
            settled = [(p.future, None, failure) for p in batch]
        else:
            by_seq = {r.seq: r for r in outcome}
            for p in batch:
                if failure is not None:
                    settled.append((p.future, None, _blocked(failure, failed_call)))
                    continue
                result = by_seq.get(p.seq)
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
            self._sending = False
            self._cond.notify_all()
