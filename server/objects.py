"""Live remote objects: who owns them, their call log, and their expiry.

An object belongs to the user who created it; to anyone else it does not exist. Each
object keeps the sequence number of its last call and the results of its last
``RESULTS_KEPT`` calls, which is what makes a retried call return its first result
instead of running twice. An object nobody has called for ``idle_timeout`` seconds is
closed by the reaper thread (a model's adapters leave the base model then).

A user holds at most ``max_per_user`` objects. A creation takes a ``Reservation`` first
(counted like a live object, under the registry's lock) and turns it into the object once
built, or gives it back if the build fails: concurrent creations can never exceed the cap.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twinkle.errors import CapacityError, NotFoundError
from twinkle.protocol.limits import RESULTS_KEPT
from twinkle.protocol.wire import CallResult, ObjectInfo

log = logging.getLogger("twinkle_server.objects")


def gone_message(object_id: object) -> str:
    """What a call on an object the server does not hold is told: how to get going again."""
    return (
        f"no object {str(object_id)[:100]!r}: it expired or the server restarted; create it again "
        "(models: then resume from a twinkle:// checkpoint)"
    )


def new_object_id() -> str:
    return f"obj-{secrets.token_hex(8)}"


@dataclass(eq=False)
class RemoteObject:
    """One live object of one user."""

    object_id: str
    kind: str
    user_id: int
    user_name: str
    instance: Any
    idempotency_key: str | None = None
    fingerprint: str | None = None
    """Digest of the creating request, to tell a retry from a different request reusing the key."""
    closed: bool = False
    """Set when the object leaves the registry; a request that waited for its lock then stops."""
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    last_seq: int = 0
    results: OrderedDict[int, CallResult] = field(default_factory=OrderedDict)
    calls: dict[int, tuple[str, str]] = field(default_factory=dict)
    """seq -> (method, digest of method and arguments) of each call in ``results``: a retry must
    repeat its call exactly to be answered from the record."""
    busy: int = 0
    """Requests using the object right now; the reaper never closes a busy object."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a call batch runs: one object's calls run strictly in order."""
    handled_through: int = 0
    """The last seq of the latest batch handled (run, failed or refused): a batch sent after it
    (``CallBatch.after``) may run."""
    arrived: set[int] = field(default_factory=set)
    """Last seqs of the batches that have arrived and are not handled yet: a batch whose
    predecessor is among them waits for it however long it runs."""
    failed_seqs: list[int] = field(default_factory=list)
    """Seqs of the calls of this object that failed when they ran, in order."""
    gaps: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=RESULTS_KEPT))
    """Seq ranges skipped by a later call (never run: a client's calls dropped after a failure,
    or a batch that came after its successor ran)."""
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)
    """Notified when ``handled_through`` moves (batches waiting for their predecessor)."""

    def info(self) -> ObjectInfo:
        return ObjectInfo(object_id=self.object_id, kind=self.kind)  # type: ignore[arg-type]

    def failures_through(self, seq: int) -> int:
        """How many calls up to ``seq`` failed when they ran."""
        return bisect.bisect_right(self.failed_seqs, seq)

    def never_ran(self, seq: int) -> bool:
        """Whether ``seq`` (below the last seq) was skipped rather than run."""
        return any(first <= seq <= last for first, last in self.gaps)

    def record(self, seq: int, result: CallResult, call: tuple[str, str] | None = None) -> None:
        """Remember a call's result (successful or not) and what the call was (method, digest):
        the seq is spent either way."""
        if seq > self.last_seq + 1:
            self.gaps.append((self.last_seq + 1, seq - 1))
        self.results[seq] = result
        if call is not None:
            self.calls[seq] = call
        self.last_seq = seq
        while len(self.results) > RESULTS_KEPT:
            dropped, _ = self.results.popitem(last=False)
            self.calls.pop(dropped, None)


class Reservation:
    """Room for one object of one user, held while the object is built (see ``ObjectRegistry``)."""

    def __init__(self, registry: ObjectRegistry, user_id: int) -> None:
        self._registry = registry
        self.user_id = user_id
        self.held = True

    def release(self) -> None:
        """Give the room back (a no-op once the object was added or the room released)."""
        self._registry._unreserve(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ObjectRegistry:
    """All live objects, thread-safe (HTTP handlers, data threads and the reaper use it)."""

    def __init__(self, idle_timeout: float, max_per_user: int) -> None:
        self.idle_timeout = idle_timeout
        self.max_per_user = max_per_user
        self._objects: dict[str, RemoteObject] = {}
        self._by_key: dict[tuple[int, str], str] = {}
        self._reserved: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def of_user(self, user_id: int) -> list[RemoteObject]:
        """The user's live objects (a snapshot)."""
        with self._lock:
            return [o for o in self._objects.values() if o.user_id == user_id]

    def count(self, user_id: int) -> int:
        """The user's live objects and the creations in progress."""
        with self._lock:
            return self._count(user_id)

    def _count(self, user_id: int) -> int:
        return sum(1 for o in self._objects.values() if o.user_id == user_id) + self._reserved.get(user_id, 0)

    def reserve(self, user_id: int) -> Reservation:
        """Room for one more object of ``user_id``, or a ``CapacityError`` naming the limit."""
        with self._lock:
            n = self._count(user_id)
            if n >= self.max_per_user:
                raise CapacityError(
                    f"you have {n} live objects, the most one user may hold (max_objects_per_user="
                    f"{self.max_per_user}, set by twinkle-server serve --max-objects-per-user); "
                    "delete some or let them expire"
                )
            self._reserved[user_id] = self._reserved.get(user_id, 0) + 1
            return Reservation(self, user_id)

    def _unreserve(self, reservation: Reservation) -> None:
        with self._lock:
            self._drop_reservation(reservation)

    def _drop_reservation(self, reservation: Reservation) -> None:
        if not reservation.held:
            return
        reservation.held = False
        left = self._reserved[reservation.user_id] - 1
        if left:
            self._reserved[reservation.user_id] = left
        else:
            del self._reserved[reservation.user_id]

    def add(self, obj: RemoteObject, reservation: Reservation | None = None) -> None:
        """Register ``obj``, in the room ``reservation`` held for it (if given, it must be the
        owner's and still held)."""
        with self._lock:
            if reservation is not None:
                if reservation.user_id != obj.user_id or not reservation.held:
                    raise ValueError("an object must be added in a held reservation of its owner")
                self._drop_reservation(reservation)
            self._objects[obj.object_id] = obj
            if obj.idempotency_key is not None:
                self._by_key[(obj.user_id, obj.idempotency_key)] = obj.object_id

    def by_idempotency_key(self, user_id: int, key: str) -> RemoteObject | None:
        with self._lock:
            object_id = self._by_key.get((user_id, key))
            return self._objects.get(object_id) if object_id else None

    def _get(self, user_id: int, object_id: str) -> RemoteObject:
        obj = self._objects.get(object_id)
        if obj is None or obj.user_id != user_id:
            raise NotFoundError(gone_message(object_id))
        return obj

    def acquire(self, user_id: int, object_id: str) -> RemoteObject:
        """The caller's object, marked busy until ``release``; ``NotFoundError`` otherwise."""
        with self._lock:
            obj = self._get(user_id, object_id)
            obj.busy += 1
            obj.last_used = time.time()
            return obj

    def release(self, obj: RemoteObject) -> None:
        with self._lock:
            obj.busy -= 1
            obj.last_used = time.time()

    def resolve(self, user_id: int, object_id: str) -> Any:
        """The live instance behind a ``{"__ref__": id}`` of ``user_id`` (using it counts as use)."""
        with self._lock:
            obj = self._get(user_id, object_id)
            obj.last_used = time.time()
            return obj.instance

    def remove(self, obj: RemoteObject) -> bool:
        """Take the object out of the registry; returns False if it was already gone."""
        with self._lock:
            if self._objects.get(obj.object_id) is not obj:
                return False
            self._forget(obj)
            return True

    def pop_expired(self, now: float | None = None) -> list[RemoteObject]:
        """Remove and return the objects idle for longer than ``idle_timeout`` and not in use."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [
                o for o in self._objects.values() if o.busy == 0 and now - o.last_used > self.idle_timeout
            ]
            for obj in expired:
                self._forget(obj)
            return expired

    def pop_all(self) -> list[RemoteObject]:
        with self._lock:
            objs = list(self._objects.values())
            for obj in objs:
                self._forget(obj)
            return objs

    def _forget(self, obj: RemoteObject) -> None:
        del self._objects[obj.object_id]
        obj.closed = True
        if obj.idempotency_key is not None:
            self._by_key.pop((obj.user_id, obj.idempotency_key), None)


class Reaper:
    """A thread that closes idle objects every ``interval`` seconds."""

    def __init__(self, registry: ObjectRegistry, close: Callable[[RemoteObject, str], None],
                 interval: float) -> None:
        self._registry = registry
        self._close = close
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twinkle-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for obj in self._registry.pop_expired():
                try:
                    self._close(obj, "expired")
                except Exception:  # one bad close must not stop the reaper
                    log.exception("closing expired object %s failed", obj.object_id)
