"""``DataLoader`` on a twinkle server, iterated with prefetch.

Derived from the declaration ``twinkle.protocol.api.DataLoaderAPI`` that
``twinkle.dataloader.DataLoader`` implements (same constructor and methods, same epoch
semantics: each ``iter()`` runs to the end of the current epoch). Iteration asks the server
for several batches per round trip and keeps up to ``prefetch`` of them buffered while the
loop works. The position that counts is the client's: the samples it has *yielded*
(``consumed_train_samples``). Each ``iter()`` tells the server to start from there, so a loop
left mid-epoch continues with the next unyielded sample: none repeated, none skipped, even
though the server had already sent more.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from twinkle.protocol.api import DATALOADER, NEXT_BATCHES, START_EPOCH
from twinkle.protocol.errors import ServerError

from .derive import derive_remote_class
from .pipeline import CallFuture
from .remote import RemoteObject

__all__ = ["DataLoader"]

PREFETCH_BATCHES = 4


class _RemoteDataLoader(RemoteObject):
    """Client-side state of a remote dataloader: the yielded-sample count and the prefetch buffer."""

    prefetch: int = PREFETCH_BATCHES
    """Batches to keep buffered ahead of the loop (set per object to tune)."""

    def _twinkle_setup(self) -> None:
        self._twinkle_consumed = 0
        # Bumped by every iter() and resume: an older iterator sees it changed and stops,
        # so two iterators never both advance the count.
        self._twinkle_generation = 0

    @property
    def consumed_train_samples(self) -> int:
        """Samples yielded so far (over all epochs): the position to save with a checkpoint."""
        return self._twinkle_consumed

    def __iter__(self) -> Iterator[Any]:
        self._twinkle_pipeline.flush()  # a pending failure surfaces here, not inside the loop
        return self._twinkle_iterate()

    def get_state(self) -> dict[str, Any]:
        state = dict(self._twinkle_call("get_state"))
        # The server has run ahead by the prefetched batches; the position is what was yielded.
        consumed = self._twinkle_consumed
        per_epoch = state.get("samples_per_epoch") or 0
        state["consumed_train_samples"] = consumed
        state["epoch"] = consumed // per_epoch if per_epoch else 0
        state["position_in_epoch"] = consumed % per_epoch if per_epoch else 0
        return state

    def resume_from_checkpoint(self, consumed_train_samples: int) -> None:
        # The server checks the value as the local method does.
        self._twinkle_call("resume_from_checkpoint", consumed_train_samples=consumed_train_samples)
        self._twinkle_consumed = consumed_train_samples
        self._twinkle_generation += 1  # drops a running iterator's buffer

    def skip_consumed_samples(self, consumed_train_samples: int) -> None:
        self.resume_from_checkpoint(consumed_train_samples)

    def _twinkle_call(self, method: str, **kwargs: Any) -> Any:
        pipeline = self._twinkle_pipeline
        return pipeline.read(pipeline.submit(method, [], kwargs, deferred=False))

    def _twinkle_iterate(self) -> Iterator[Any]:
        self._twinkle_generation += 1
        generation = self._twinkle_generation
        pipeline = self._twinkle_pipeline
        depth = max(1, int(self.prefetch))
        # Start and first fetch are queued together: one round trip before the first batch.
        start = pipeline.submit(START_EPOCH, [], {"consumed_train_samples": self._twinkle_consumed}, deferred=False)
        pending: deque[CallFuture] = deque([pipeline.submit(NEXT_BATCHES, [], {"max_batches": depth}, deferred=False)])
        buffer: deque[tuple[Any, int]] = deque()
        ended = False
        pipeline.read(start)
        while True:
            if not buffer:
                if not pending:
                    return
                reply = pipeline.read(pending.popleft())
                batches, ended = _parse_next(reply)
                buffer.extend(batches)
                if not buffer:
                    return
            if not ended and not pending and len(buffer) <= depth // 2:
                pending.append(pipeline.submit(NEXT_BATCHES, [], {"max_batches": depth - len(buffer)}, deferred=False))
            if generation != self._twinkle_generation:
                return
            batch, size = buffer.popleft()
            # Counted before it is handed out, as the local DataLoader does, so that a loop
            # left right after this batch resumes after it.
            self._twinkle_consumed += size
            yield batch
            if generation != self._twinkle_generation:
                return


def _parse_next(reply: Any) -> tuple[list[tuple[Any, int]], bool]:
    if not isinstance(reply, dict) or not isinstance(reply.get("batches"), list):
        raise ServerError(f"the twinkle server sent a malformed batch reply: {type(reply).__name__}")
    batches = reply["batches"]
    sizes = reply.get("sizes")
    if not isinstance(sizes, list) or len(sizes) != len(batches):
        sizes = [_batch_size(b) for b in batches]
    return list(zip(batches, sizes, strict=True)), bool(reply.get("end"))


def _batch_size(batch: Any) -> int:
    """Samples in a batch: rows of a list, or the first dimension of a collated dict."""
    if isinstance(batch, list | tuple):
        return len(batch)
    if isinstance(batch, dict) and batch:
        first = next(iter(batch.values()))
        shape = getattr(first, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
        if isinstance(first, list | tuple):
            return len(first)
    return 1


DataLoader = derive_remote_class(DATALOADER, _RemoteDataLoader, module=__name__)
