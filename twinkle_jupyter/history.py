"""Metric history of a training run, bounded in memory: pure Python, no IPython or widgets.

The server reports one point per ``forward_backward`` micro-batch. Here they are folded into
one record per optimizer step (token-weighted mean loss of the step's micro-batches, plus the
step's grad norm and learning rate), smoothed with a debiased EMA over the *full* stream, and
kept in a :class:`BoundedSeries` that never holds more than ``max_points`` records while always
keeping the first, the last and the extreme (min/max loss) records. Eval points (``forward_only``
batches with labels) become one eval loss per step (``twinkle.protocol.wire.eval_losses``: the
token-weighted mean of the step's eval batches), kept beside them and bounded alike.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twinkle.protocol.wire import EvalLoss, eval_losses

from .settings import DEFAULTS, MIN_POINTS, check

__all__ = [
    "EMA",
    "BoundedSeries",
    "RateMeter",
    "RunHistory",
    "StepRecord",
    "debiased_ema",
    "format_duration",
]


@dataclass(slots=True)
class StepRecord:
    """One optimizer step of a run (or the step being accumulated right now)."""

    step: int
    time: float
    """Wall time (unix seconds) of the step's last micro-batch."""
    loss: float
    """Token-weighted mean loss of the step's micro-batches."""
    num_tokens: int = 0
    micro_batches: int = 1
    grad_norm: float | None = None
    lr: float | None = None
    completed: bool = False
    smoothed: float = math.nan
    """The debiased EMA of ``loss`` over every step up to this one (NaN until computed)."""


# --------------------------------------------------------------------------- smoothing


class EMA:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider).

    ``weight`` 0 is no smoothing; 0.99 is heavy. The first values are not pulled towards 0:
    the accumulator is divided by ``1 - weight**n``.
    """

    __slots__ = ("weight", "_acc", "_n")

    def __init__(self, weight: float = DEFAULTS.smoothing) -> None:
        self.weight = check("smoothing", weight)
        self._acc = 0.0
        self._n = 0

    def peek(self, value: float) -> float:
        """The smoothed value ``value`` would get, without recording it."""
        if not math.isfinite(value):
            return self.value
        acc = self._acc * self.weight + (1.0 - self.weight) * value
        return acc / (1.0 - self.weight ** (self._n + 1)) if self.weight else value

    def update(self, value: float) -> float:
        """Record ``value``; returns the smoothed value. Non-finite values are skipped."""
        if not math.isfinite(value):
            return self.value
        self._acc = self._acc * self.weight + (1.0 - self.weight) * value
        self._n += 1
        return self.value

    @property
    def value(self) -> float:
        """The current smoothed value (NaN before the first update)."""
        if self._n == 0:
            return math.nan
        return self._acc / (1.0 - self.weight**self._n) if self.weight else self._acc

    def reset(self) -> None:
        self._acc = 0.0
        self._n = 0


def debiased_ema(values: Iterable[float], weight: float) -> list[float]:
    """The debiased EMA of ``values`` (one output per input; non-finite inputs repeat the last value)."""
    ema = EMA(weight)
    return [ema.update(v) for v in values]


# ------------------------------------------------------------------------ downsampling


class BoundedSeries:
    """An append-only series that keeps at most ``max_points`` items.

    Items are grouped in buckets of ``stride`` consecutive items; of each full bucket only the
    items with the smallest and largest ``key`` are kept (in their original order). When the
    kept items exceed the budget, the stride doubles and neighbouring buckets merge, so the
    resolution is uniform over the whole series. The very first item, the last one and the
    global minimum and maximum of ``key`` are always present (a bucket always keeps its
    extremes, and the series' extremes are the extremes of their bucket at every level).

    Appending is amortized O(1); :meth:`items` is O(max_points).
    """

    def __init__(self, max_points: int = DEFAULTS.max_points, key: Callable[[Any], float] | None = None) -> None:
        self.max_points = check("max_points", max_points)
        self._key = key or (lambda item: item)
        self._first: Any = None
        self._last: Any = None
        self._buckets: list[tuple[Any, ...]] = []  # each: 1 or 2 items, in order
        self._pending: list[Any] = []
        self._stride = 1
        self._count = 0
        self._kept = 0  # items in the buckets

    # Budget for the buckets' items: the rest is first + (min, max) of the pending bucket + last.
    @property
    def _bucket_budget(self) -> int:
        return self.max_points - 4

    def __len__(self) -> int:
        """The number of items kept (not the number appended: see :attr:`count`)."""
        return len(self.items())

    @property
    def count(self) -> int:
        """How many items were appended in total."""
        return self._count

    @property
    def stride(self) -> int:
        """How many appended items one bucket stands for now."""
        return self._stride

    @property
    def first(self) -> Any:
        return self._first

    @property
    def last(self) -> Any:
        return self._last

    def clear(self) -> None:
        self._first = None
        self._last = None
        self._buckets.clear()
        self._pending.clear()
        self._stride = 1
        self._count = 0
        self._kept = 0

    def append(self, item: Any) -> None:
        self._count += 1
        self._last = item
        if self._count == 1:
            self._first = item
            return
        self._pending.append(item)
        if len(self._pending) >= self._stride:
            bucket = self._extremes(self._pending)
            self._buckets.append(bucket)
            self._kept += len(bucket)
            self._pending = []
            if self._kept > self._bucket_budget:
                self._coarsen()

    def extend(self, items: Iterable[Any]) -> None:
        for item in items:
            self.append(item)

    def items(self) -> list[Any]:
        """The kept items, in append order."""
        out: list[Any] = [] if self._first is None else [self._first]
        for bucket in self._buckets:
            out.extend(bucket)
        if self._pending:
            out.extend(self._extremes(self._pending))
        if self._count > 1 and out[-1] is not self._last:
            # A bucket keeps only its extremes; the newest item is always shown.
            out.append(self._last)
        return out

    def _extremes(self, items: Sequence[Any]) -> tuple[Any, ...]:
        if len(items) == 1:
            return (items[0],)
        key = self._key
        lo = hi = 0
        lo_v = hi_v = _finite_key(key, items[0])
        for i in range(1, len(items)):
            v = _finite_key(key, items[i])
            if v < lo_v:
                lo, lo_v = i, v
            elif v > hi_v:
                hi, hi_v = i, v
        if lo == hi:
            return (items[lo],)
        return (items[lo], items[hi]) if lo < hi else (items[hi], items[lo])

    def _coarsen(self) -> None:
        merged: list[tuple[Any, ...]] = []
        buckets = self._buckets
        for i in range(0, len(buckets) - 1, 2):
            merged.append(self._extremes(buckets[i] + buckets[i + 1]))
        if len(buckets) % 2:
            # An odd last bucket stands for half a new bucket: it goes back to pending so the
            # next appends complete it (its extremes are what remain of its items).
            self._pending = list(buckets[-1]) + self._pending
        self._buckets = merged
        self._kept = sum(len(b) for b in merged)
        self._stride *= 2


def _finite_key(key: Callable[[Any], float], item: Any) -> float:
    v = key(item)
    # NaN never wins a comparison; make it neutral so it is dropped first.
    return v if v == v else 0.0


# ----------------------------------------------------------------------- rate and ETA


class RateMeter:
    """Steps per second and time left, from the wall times at which steps completed.

    Uses the median duration of the last ``window`` steps, so a pause (a checkpoint save, a
    kernel that sat idle between cells, a resume) does not wreck the estimate.
    """

    def __init__(self, window: int = 20) -> None:
        self._times: deque[tuple[int, float]] = deque(maxlen=window + 1)

    def add(self, step: int, time: float) -> None:
        if self._times and step <= self._times[-1][0]:
            # A resume went back in steps: older timings describe another branch.
            self._times.clear()
        self._times.append((step, time))

    def reset(self) -> None:
        self._times.clear()

    @property
    def seconds_per_step(self) -> float | None:
        t = list(self._times)
        durations = [
            (t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(t, t[1:], strict=False) if s2 > s1 and t2 >= t1
        ]
        if not durations:
            return None
        return statistics.median(durations)

    @property
    def rate(self) -> float | None:
        """Steps per second, or None until two steps were seen."""
        sps = self.seconds_per_step
        if sps is None:
            return None
        return math.inf if sps == 0 else 1.0 / sps

    def eta(self, current_step: int, total_steps: int | None) -> float | None:
        """Seconds until ``total_steps``, or None when unknown."""
        if not total_steps:
            return None
        if current_step >= total_steps:
            return 0.0
        sps = self.seconds_per_step
        return None if sps is None else (total_steps - current_step) * sps


def format_duration(seconds: float | None) -> str:
    """``75.2`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``; ``None`` -> ``'?'``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ------------------------------------------------------------------------ run history


def _get(point: Any, name: str, default: Any = None) -> Any:
    if isinstance(point, dict):
        return point.get(name, default)
    return getattr(point, name, default)


@dataclass
class _StepAcc:
    """Micro-batches of one step, folded as they arrive."""

    step: int
    loss_sum: float = 0.0
    tokens: int = 0
    count: int = 0
    plain_sum: float = 0.0
    time: float = 0.0
    grad_norm: float | None = None
    lr: float | None = None
    completed: bool = False

    def add(self, point: Any) -> None:
        # Hot path of a full refetch (every point of a run): one attribute read per field.
        if isinstance(point, dict):
            get = point.get
            loss, tokens, t = get("loss"), get("num_tokens"), get("time")
            gn, lr, done = get("grad_norm"), get("lr"), get("completed")
        else:
            loss, tokens, t = point.loss, point.num_tokens, point.time
            gn, lr, done = point.grad_norm, point.lr, point.completed
        loss = math.nan if loss is None else float(loss)
        tokens = int(tokens or 0)
        self.count += 1
        self.plain_sum += loss
        self.loss_sum += loss * tokens
        self.tokens += tokens
        if t and t > self.time:
            self.time = float(t)
        if gn is not None:
            self.grad_norm = float(gn)
        if lr is not None:
            self.lr = float(lr)
        if done:
            self.completed = True

    def record(self) -> StepRecord:
        loss = self.loss_sum / self.tokens if self.tokens else self.plain_sum / max(1, self.count)
        return StepRecord(
            step=self.step,
            time=self.time,
            loss=loss,
            num_tokens=self.tokens,
            micro_batches=self.count,
            grad_norm=self.grad_norm,
            lr=self.lr,
            completed=self.completed,
        )


def _group_by_step(points: Iterable[Any]) -> list[_StepAcc]:
    groups: list[_StepAcc] = []
    acc: _StepAcc | None = None
    for point in points:
        step = int(point["step"] if isinstance(point, dict) else point.step)
        if acc is None or acc.step != step:
            acc = _StepAcc(step)
            groups.append(acc)
        acc.add(point)
    return groups


@dataclass
class RunHistory:
    """Everything the plot needs about one run, fed from ``get_metrics`` responses.

    Usage with a ``TwinkleClient``::

        resp = client.get_metrics(run_id, since_step=history.cursor)
        if history.needs_refetch(resp.revision):
            resp = client.get_metrics(run_id, since_step=0)
        history.ingest(resp)

    ``cursor`` is the last *completed* step: the step being accumulated is fetched again in
    full each time, so its record is rebuilt rather than patched.
    """

    run_id: str
    max_points: int = DEFAULTS.max_points
    smoothing: float = DEFAULTS.smoothing
    revision: int | None = None
    total_steps: int | None = None
    current: BoundedSeries = field(init=False)
    """Steps of the live branch, each a :class:`StepRecord` (smoothed filled in)."""
    superseded: BoundedSeries = field(init=False)
    """Steps of branches abandoned by a resume from an earlier checkpoint."""
    tail: StepRecord | None = field(init=False, default=None)
    """The step being accumulated (not complete yet), if any."""
    resumed_at: list[int] = field(init=False, default_factory=list)
    """Steps from which the run was resumed (where a superseded branch starts)."""
    evals: BoundedSeries = field(init=False)
    """Eval losses (``EvalLoss``) of the live branch's steps before :attr:`cursor`: final."""
    eval_tail: list[EvalLoss] = field(init=False, default_factory=list)
    """Eval losses of the steps from :attr:`cursor` on, fetched again in full each time (the
    last completed step may still get eval points)."""
    rate: RateMeter = field(init=False, default_factory=RateMeter)
    version: int = field(init=False, default=0)
    """Bumped whenever something visible changed (the plot redraws when it moves)."""

    def __post_init__(self) -> None:
        self.current = BoundedSeries(self.max_points, key=lambda r: r.loss)
        # Abandoned branches get half the budget: they are drawn thin and grey.
        self.superseded = BoundedSeries(max(MIN_POINTS, self.max_points // 2), key=lambda r: r.loss)
        self.evals = BoundedSeries(self.max_points, key=_eval_key)
        self._ema = EMA(self.smoothing)
        self._cursor = 0
        self._loaded = False
        self._loss_min = math.inf
        self._loss_max = -math.inf
        self._first_time: float | None = None

    # -- feeding ---------------------------------------------------------------------

    @property
    def cursor(self) -> int:
        """The ``since_step`` to ask for next."""
        return self._cursor if self._loaded else 0

    @property
    def loaded(self) -> bool:
        return self._loaded

    def needs_refetch(self, revision: int) -> bool:
        """True when ``revision`` differs from the one held: the run was resumed, fetch from 0."""
        return self._loaded and revision != self.revision

    def reset(self) -> None:
        """Forget all points (the next fetch starts from step 0)."""
        self.current.clear()
        self.superseded.clear()
        self.evals.clear()
        self.eval_tail = []
        self.tail = None
        self.resumed_at = []
        self.rate.reset()
        self._ema = EMA(self.smoothing)
        self._cursor = 0
        self._loaded = False
        self._loss_min = math.inf
        self._loss_max = -math.inf
        self._first_time = None
        self.version += 1

    def set_smoothing(self, weight: float) -> None:
        """Change the EMA weight. The caller must refetch (``reset()``) to recompute it exactly."""
        self.smoothing = check("smoothing", weight)

    def ingest(self, response: Any) -> bool:
        """Fold a ``MetricsResponse`` (or an equivalent dict) in; returns whether anything changed.

        A response whose revision differs from the held one replaces everything: it must be a
        full fetch (``since_step=0``).
        """
        revision = int(_get(response, "revision", 0) or 0)
        points = list(_get(response, "points", None) or [])
        total = _get(response, "total_steps")
        changed = False
        if self._loaded and revision != self.revision:
            self.reset()
            changed = True
        full = not self._loaded
        if total is not None and total != self.total_steps:
            self.total_steps = int(total)
            changed = True
        self.revision = revision
        live = [p for p in points if not _get(p, "superseded", False)]
        if full:
            old = [p for p in points if _get(p, "superseded", False)]
            for group in _group_by_step(old):
                self.superseded.append(group.record())
            self.resumed_at = _branch_starts(old)
            changed = changed or bool(old)
        self._loaded = True
        evals = _get(response, "eval_points", None) or []
        groups = [g for g in _group_by_step(live) if g.step > self._cursor]
        if not groups and not full:
            changed = self._ingest_evals(evals) or changed
            if changed:
                self.version += 1
            return changed
        new_tail: StepRecord | None = None
        for i, group in enumerate(groups):
            rec = group.record()
            if rec.completed or i < len(groups) - 1:
                self._commit(rec)
            else:
                new_tail = rec
        if new_tail is not None:
            new_tail.smoothed = self._ema.peek(new_tail.loss)
            self._observe(new_tail)
        if new_tail != self.tail or groups:
            changed = True
        self.tail = new_tail
        changed = self._ingest_evals(evals) or changed
        if changed:
            self.version += 1
        return changed

    def _ingest_evals(self, points: Iterable[Any]) -> bool:
        """Fold a response's eval points in (after its training points moved the cursor); returns
        whether anything changed. The response holds every eval point from the cursor it was
        asked with on, so the steps before the new cursor are final (never sent again) and the
        rest replace the tail."""
        steps = eval_losses(points)
        final = [e for e in steps if e.step < self._cursor]
        tail = [e for e in steps if e.step >= self._cursor]
        self.evals.extend(final)
        changed = bool(final) or tail != self.eval_tail
        self.eval_tail = tail
        return changed

    def _commit(self, rec: StepRecord) -> None:
        rec.smoothed = self._ema.update(rec.loss)
        self._observe(rec)
        self.current.append(rec)
        self._cursor = max(self._cursor, rec.step)
        if rec.time:
            self.rate.add(rec.step, rec.time)

    def _observe(self, rec: StepRecord) -> None:
        if math.isfinite(rec.loss):
            self._loss_min = min(self._loss_min, rec.loss)
            self._loss_max = max(self._loss_max, rec.loss)
        if self._first_time is None and rec.time:
            self._first_time = rec.time

    # -- reading ---------------------------------------------------------------------

    def records(self) -> list[StepRecord]:
        """The kept records of the live branch, the step in progress last."""
        recs = self.current.items()
        if self.tail is not None:
            recs.append(self.tail)
        return recs

    def eval_records(self) -> list[EvalLoss]:
        """The kept eval losses of the live branch, by step."""
        return self.evals.items() + self.eval_tail

    @property
    def last_eval(self) -> EvalLoss | None:
        """The eval loss of the latest step that has one."""
        return self.eval_tail[-1] if self.eval_tail else self.evals.last

    @property
    def last(self) -> StepRecord | None:
        return self.tail if self.tail is not None else self.current.last

    @property
    def first(self) -> StepRecord | None:
        return self.current.first if self.current.first is not None else self.tail

    @property
    def current_step(self) -> int:
        """The last completed step (0 before the first)."""
        return self._cursor

    @property
    def start_time(self) -> float | None:
        return self._first_time

    @property
    def loss_range(self) -> tuple[float, float] | None:
        """(min, max) loss over all steps seen, or None."""
        if self._loss_min > self._loss_max:
            return None
        return self._loss_min, self._loss_max

    def progress(self) -> dict[str, Any]:
        """Numbers for the progress line: step, total, fraction, it/s, ETA (s), last and smoothed
        loss, the latest eval loss and its step."""
        last = self.last
        total = self.total_steps
        step = self.current_step
        last_eval = self.last_eval
        return {
            "run_id": self.run_id,
            "step": step,
            "total": total,
            "fraction": (min(1.0, step / total) if total else None),
            "rate": self.rate.rate,
            "eta": self.rate.eta(step, total),
            "loss": None if last is None else last.loss,
            "smoothed": None if last is None else last.smoothed,
            "elapsed": (None if last is None or self._first_time is None else last.time - self._first_time),
            "eval_loss": None if last_eval is None else last_eval.loss,
            "eval_step": None if last_eval is None else last_eval.step,
        }


def _eval_key(record: EvalLoss) -> float:
    return math.nan if record.loss is None else record.loss


def _branch_starts(superseded_points: Sequence[Any]) -> list[int]:
    """The step just before each abandoned branch: where a resume went back to."""
    starts: list[int] = []
    prev: int | None = None
    for p in superseded_points:
        step = int(_get(p, "step", 0))
        if prev is None or step < prev:
            starts.append(max(0, step - 1))
        prev = step
    return starts
