"""Pure parts of the notebook layer: bounded history, smoothing, rate/ETA, rendering."""

from __future__ import annotations

import math
import random

import pytest

from twinkle_jupyter.history import (
    EMA,
    BoundedSeries,
    RateMeter,
    RunHistory,
    debiased_ema,
    format_duration,
)


def _check_series(values: list[float], max_points: int) -> list[float]:
    series = BoundedSeries(max_points)
    for v in values:
        series.append(v)
    kept = series.items()
    assert len(kept) <= max_points
    assert series.count == len(values)
    assert kept[0] is values[0] or kept[0] == values[0]
    assert kept[-1] == values[-1] and series.last == values[-1]
    finite = [v for v in values if v == v]
    assert min(finite) in kept and max(finite) in kept
    return kept


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1999, 2000, 2001, 10_000, 100_000])
@pytest.mark.parametrize("max_points", [16, 101, 2000])
def test_downsampling_bounds_length_and_keeps_first_last_extremes(n: int, max_points: int) -> None:
    rng = random.Random(n * 31 + max_points)
    values = [rng.gauss(0, 1) + 3 * math.exp(-i / max(1, n / 4)) for i in range(n)]
    kept = _check_series(values, max_points)
    if n <= max_points - 4:
        assert kept == values  # nothing dropped while it fits


def test_downsampling_keeps_order_and_is_uniform() -> None:
    # Items are (index, value): the kept indices must increase, and (uniform resolution)
    # every stretch of the series keeps about the same share of points.
    n, max_points = 50_000, 1000
    rng = random.Random(1)
    series = BoundedSeries(max_points, key=lambda item: item[1])
    for i in range(n):
        series.append((i, rng.random()))
    idx = [i for i, _ in series.items()]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert idx[0] == 0 and idx[-1] == n - 1
    halves = sum(i < n // 2 for i in idx), sum(i >= n // 2 for i in idx)
    assert abs(halves[0] - halves[1]) <= 0.1 * len(idx)


def test_downsampling_spike_and_edge_cases() -> None:
    values = [1.0] * 20_000
    values[12_345] = 99.0
    values[777] = -5.0
    kept = _check_series(values, 64)
    assert 99.0 in kept and -5.0 in kept
    # Monotone, constant and NaN-containing series.
    _check_series(list(range(30_000)), 50)
    _check_series([2.0] * 5000, 50)
    nan_series = [float("nan") if i % 7 == 0 else float(i % 13) for i in range(1, 5000)]
    _check_series(nan_series, 40)
    with pytest.raises(ValueError):
        BoundedSeries(4)


def test_ema_debiased() -> None:
    assert debiased_ema([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])
    out = debiased_ema([1.0, 3.0], 0.5)
    # acc1 = 0.5 -> /0.5 = 1 ; acc2 = 0.25 + 1.5 = 1.75 -> /0.75
    assert out == pytest.approx([1.0, 1.75 / 0.75])
    assert debiased_ema([1.0, 2.0, 7.0], 0.0) == [1.0, 2.0, 7.0]
    ema = EMA(0.6)
    assert math.isnan(ema.value)
    ema.update(2.0)
    assert ema.peek(4.0) == pytest.approx(EMA_value([2.0, 4.0], 0.6))
    assert ema.value == pytest.approx(2.0)  # peek records nothing
    assert ema.update(float("nan")) == pytest.approx(2.0)  # non-finite values are skipped
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError):
            EMA(bad)


def EMA_value(values: list[float], w: float) -> float:
    return debiased_ema(values, w)[-1]


def test_rate_and_eta() -> None:
    meter = RateMeter(window=10)
    assert meter.rate is None and meter.eta(0, 100) is None
    for step in range(1, 21):
        meter.add(step, 1000.0 + step * 0.5)
    assert meter.rate == pytest.approx(2.0)
    assert meter.eta(20, 100) == pytest.approx(40.0)
    assert meter.eta(100, 100) == 0.0 and meter.eta(20, None) is None
    # A long pause (a save, an idle kernel) does not wreck the estimate: median of durations.
    meter.add(21, 1000.0 + 20 * 0.5 + 600)
    meter.add(22, 1000.0 + 20 * 0.5 + 600.5)
    assert meter.rate == pytest.approx(2.0)
    # Going back in steps (a resume) starts over.
    meter.add(5, 5000.0)
    assert meter.rate is None
    assert format_duration(75.2) == "1:15" and format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?" and format_duration(float("inf")) == "?"


def _point(step: int, micro: int, loss: float, tokens: int = 10, *, completed: bool = True,
           t: float | None = None, superseded: bool = False, gn: float | None = 1.0) -> dict:
    return {"step": step, "micro_step": micro, "loss": loss, "num_tokens": tokens,
            "grad_norm": gn if completed else None, "lr": 1e-3 if completed else None,
            "completed": completed, "time": t if t is not None else 100.0 + micro, "superseded": superseded}


def test_run_history_folds_micro_batches_and_rebuilds_the_open_step() -> None:
    h = RunHistory("run-1", max_points=100, smoothing=0.5)
    assert h.cursor == 0
    # Step 1: two micro-batches (token-weighted mean); step 2: one of two so far.
    pts = [_point(1, 1, 2.0, 10, completed=False), _point(1, 2, 4.0, 30), _point(2, 3, 1.0, 10, completed=False)]
    assert h.ingest({"revision": 0, "points": pts})
    recs = h.records()
    assert [r.step for r in recs] == [1, 2]
    assert recs[0].loss == pytest.approx((2.0 * 10 + 4.0 * 30) / 40) and recs[0].completed
    assert recs[0].micro_batches == 2 and recs[0].grad_norm == 1.0
    assert not recs[1].completed and h.tail is recs[1]
    assert h.cursor == 1 and h.current_step == 1
    # The next fetch (since_step=1) sends step 2 again, complete now.
    assert h.ingest({"revision": 0, "points": [_point(2, 3, 1.0, 10, completed=False), _point(2, 4, 3.0, 10)]})
    recs = h.records()
    assert [r.step for r in recs] == [2 - 1, 2] and recs[1].loss == pytest.approx(2.0) and h.tail is None
    assert recs[1].smoothed == pytest.approx(debiased_ema([recs[0].loss, 2.0], 0.5)[-1])
    assert h.cursor == 2
    assert not h.ingest({"revision": 0, "points": []})


def test_run_history_resume_revision_and_superseded_branch() -> None:
    h = RunHistory("run-1", max_points=100)
    h.ingest({"revision": 0, "points": [_point(s, s, 10.0 - s * 0.1) for s in range(1, 21)], "total_steps": 20})
    assert h.current_step == 20 and h.total_steps == 20
    assert h.needs_refetch(1) and not h.needs_refetch(0)
    # The server after a resume from step 10: revision 1, steps 11-20 superseded, 3 new steps.
    old = [_point(s, s, 10.0 - s * 0.1, superseded=True) for s in range(11, 21)]
    new = [_point(s, 20 + s, 9.0 - s * 0.1, t=500.0 + s) for s in range(11, 14)]
    live = [_point(s, s, 10.0 - s * 0.1) for s in range(1, 11)]
    h.ingest({"revision": 1, "points": sorted(live + old + new, key=lambda p: (p["step"], p["micro_step"]))})
    assert h.revision == 1
    assert [r.step for r in h.records()] == list(range(1, 14))
    assert [r.step for r in h.superseded.items()] == list(range(11, 21))
    assert h.resumed_at == [10]
    assert h.current_step == 13
    # Incremental fetches ignore the superseded points that come back with step > cursor.
    h.ingest({"revision": 1, "points": [p for p in old if p["step"] > 13] + [_point(14, 40, 7.0)]})
    assert h.superseded.count == 10 and h.current_step == 14


def test_run_history_progress_and_bounded_memory() -> None:
    h = RunHistory("run-1", max_points=64)
    pts = [_point(s, s, 5.0 / s, t=1000.0 + 0.25 * s) for s in range(1, 5001)]
    h.ingest({"revision": 0, "points": pts, "total_steps": 6000})
    assert len(h.records()) <= 64
    p = h.progress()
    assert p["step"] == 5000 and p["total"] == 6000
    assert p["rate"] == pytest.approx(4.0) and p["eta"] == pytest.approx(250.0)
    assert h.loss_range == (pytest.approx(5.0 / 5000), pytest.approx(5.0))
    assert h.records()[0].step == 1 and h.records()[-1].step == 5000


def test_render_png_and_blit() -> None:
    from twinkle_jupyter.render import PlotRenderer, RenderOptions, nice_ceil

    assert [nice_ceil(v) for v in (0, 1, 7, 11, 101, 2400, 2600)] == [1, 1, 8, 12, 120, 2500, 3000]
    h = RunHistory("run-1", max_points=200)
    h.ingest({"revision": 0, "points": [_point(s, s, 5.0 / s) for s in range(1, 50)]})
    r = PlotRenderer(400, 260)
    png = r.render([h])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    r.render([h])
    assert r.full_redraws == 1 and r.blits == 1  # same limits: only the curves are drawn again
    for opts in (RenderOptions(x_axis="time"), RenderOptions(log_scale=True), RenderOptions(show_smoothed=False)):
        assert r.render([h, RunHistory("run-2")], opts)[:4] == b"\x89PNG"


def _eval(step: int, loss: float | None, tokens: int, t: float = 0.0, superseded: bool = False) -> dict:
    return {"step": step, "loss": loss, "num_tokens": tokens, "time": t or 200.0 + step, "superseded": superseded}


def test_run_history_eval_loss_per_step_follows_the_cursor() -> None:
    h = RunHistory("run-1", max_points=100)
    # The server sends eval points from since_step on: step 0 (before training) and step 1's.
    ev = [_eval(0, 3.0, 10), _eval(0, 2.0, 30), _eval(1, 1.0, 5)]
    assert h.ingest({"revision": 0, "points": [_point(1, 1, 4.0)], "eval_points": ev})
    assert h.cursor == 1
    # Token-weighted per step; step 0 is final (before the cursor), step 1 can still grow.
    assert [(e.step, e.loss, e.num_tokens, e.batches) for e in h.eval_records()] == [
        (0, pytest.approx((3.0 * 10 + 2.0 * 30) / 40), 40, 2), (1, 1.0, 5, 1)]
    assert [e.step for e in h.evals.items()] == [0] and [e.step for e in h.eval_tail] == [1]
    version = h.version
    # The next fetch (since_step=1) brings step 1's eval points again, one more among them.
    assert h.ingest({"revision": 0, "points": [], "eval_points": [_eval(1, 1.0, 5), _eval(1, 4.0, 15)]})
    assert h.version == version + 1
    assert [(e.step, e.loss, e.batches) for e in h.eval_records()] == [
        (0, pytest.approx(2.25), 2), (1, pytest.approx((1.0 * 5 + 4.0 * 15) / 20), 2)]
    assert not h.ingest({"revision": 0, "points": [], "eval_points": [_eval(1, 1.0, 5), _eval(1, 4.0, 15)]})
    # Step 2 completes: step 1's eval is final now and not counted twice.
    assert h.ingest({"revision": 0, "points": [_point(2, 2, 3.0)],
                     "eval_points": [_eval(1, 1.0, 5), _eval(1, 4.0, 15), _eval(2, 0.5, 8, superseded=True)]})
    assert [e.step for e in h.evals.items()] == [0, 1] and h.eval_tail == []
    assert h.last_eval is not None and h.last_eval.step == 1
    p = h.progress()
    assert p["eval_step"] == 1 and p["eval_loss"] == pytest.approx(3.25)
    # A non-finite eval batch spoils its step's mean (shown as a gap, not as a number).
    assert h.ingest({"revision": 0, "points": [], "eval_points": [_eval(2, None, 8), _eval(2, 1.0, 8)]})
    assert h.eval_records()[-1].step == 2 and h.eval_records()[-1].loss is None
    # A resume (new revision) starts the eval curve over with the full fetch.
    assert h.ingest({"revision": 1, "points": [_point(1, 1, 4.0)], "eval_points": [_eval(0, 3.0, 10)]})
    assert [e.step for e in h.eval_records()] == [0]


def test_render_draws_the_eval_series_with_its_legend() -> None:
    from twinkle_jupyter.render import EVAL_LABEL, PlotRenderer, RenderOptions

    h = RunHistory("run-1", max_points=200)
    ev = [_eval(s, 6.0 / (s + 1), 7) for s in (0, 10, 20, 30)]
    h.ingest({"revision": 0, "points": [_point(s, s, 5.0 / s) for s in range(1, 31)], "eval_points": ev})
    r = PlotRenderer(400, 260)
    r.render([h])
    xs, ys = r._lines[0].ev.get_data()
    assert list(xs) == [0, 10, 20, 30] and list(ys) == pytest.approx([6.0, 6.0 / 11, 6.0 / 21, 6.0 / 31])
    assert [t.get_text() for t in r.ax_loss.get_legend().get_texts()] == ["run-1", EVAL_LABEL]
    # By time: eval points sit at their own wall times.
    r.render([h], RenderOptions(x_axis="time"))
    assert list(r._lines[0].ev.get_data()[0]) == pytest.approx([e["time"] - h.start_time for e in ev])
