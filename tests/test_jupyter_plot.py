"""The live plot's parts without a server: settings, the metric poller, the redraw limit, the
dashboard's statuses. A fake client stands in for the twinkle server; tests wait for what the
poller thread did (its fetches, the widget's value), never for time."""

from __future__ import annotations

import contextlib
import inspect
import re
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from twinkle_jupyter.settings import DEFAULTS, MIN_POINTS, READ_RETRY_S, SETTINGS, check

pytestmark = pytest.mark.unit

WAIT_S = 60.0


class FakeServer:
    """What the poller asks of a ``TwinkleClient``, for one run whose steps a test adds."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []
        self.eval_points: list[dict[str, Any]] = []
        self.revision = 0
        self.fail: Exception | None = None
        self.health_checks = 0
        self.retry_budgets: list[float] = []
        self.since: list[int] = []
        self.status = "active"
        self._fetches = threading.Condition()
        self.base_url = "http://fake"

    def add_steps(self, n: int) -> None:
        start = max((p["step"] for p in self.points), default=0)
        for step in range(start + 1, start + n + 1):
            self.points.append({"step": step, "loss": 5.0 / step, "num_tokens": 10, "time": 1000.0 + step,
                                "grad_norm": 1.0, "lr": 1e-3, "completed": True, "superseded": False})

    @contextlib.contextmanager
    def retrying_for(self, seconds: float) -> Iterator[None]:
        self.retry_budgets.append(seconds)
        yield

    def require_reachable(self) -> None:
        self.health_checks += 1
        if self.fail is not None:
            raise self.fail

    def get_metrics(self, run_id: str, since_step: int = 0) -> Any:
        with self._fetches:
            self.since.append(since_step)
            self._fetches.notify_all()
        if self.fail is not None:
            raise self.fail
        points = [p for p in self.points if p["step"] > since_step]
        evals = [p for p in self.eval_points if p["step"] >= since_step]  # as the server: from since_step on
        return SimpleNamespace(revision=self.revision, points=points, total_steps=None, eval_points=evals)

    def get_training_run(self, run_id: str) -> Any:
        return SimpleNamespace(status=self.status)

    @property
    def fetches(self) -> int:
        return len(self.since)

    def wait_fetches(self, n: int) -> None:
        """Wait until ``n`` fetches have started (so everything the poller did before them is done)."""
        with self._fetches:
            assert self._fetches.wait_for(lambda: len(self.since) >= n, WAIT_S), (len(self.since), n)


# ---------------------------------------------------------------------------- settings


def test_each_default_and_bound_comes_from_the_settings() -> None:
    from twinkle_jupyter.history import BoundedSeries, RunHistory
    from twinkle_jupyter.magics import TwinkleMagics
    from twinkle_jupyter.plot import LossPlot
    from twinkle_jupyter.session import TwinkleSession

    traits = TwinkleMagics.class_traits(config=True)
    for name, setting in SETTINGS.items():
        assert traits[name].default_value == setting.default == getattr(DEFAULTS, name), name
        assert traits[name].help == setting.help
    params = inspect.signature(LossPlot).parameters
    for name in ("poll_interval", "max_redraw_hz", "max_points", "smoothing", "x_axis", "log_scale", "show_controls"):
        assert params[name].default == getattr(DEFAULTS, name), name
    assert params["width"].default == DEFAULTS.plot_width and params["height"].default == DEFAULTS.plot_height
    assert TwinkleSession(shell=None).settings is DEFAULTS
    assert RunHistory("run-a").max_points == DEFAULTS.max_points

    # One floor for max_points, wherever it is given.
    assert MIN_POINTS == 16
    for make in (BoundedSeries, lambda n: RunHistory("run-a", max_points=n),
                 lambda n: LossPlot("run-a", max_points=n, autostart=False, show_controls=False)):
        with pytest.raises(ValueError, match=f"max_points must be >= {MIN_POINTS}"):
            make(MIN_POINTS - 1)
    # Superseded branches get half the budget, never below the floor.
    assert RunHistory("run-a", max_points=MIN_POINTS).superseded.max_points == MIN_POINTS
    assert RunHistory("run-a", max_points=200).superseded.max_points == 100

    for name, bad in (("smoothing", 1.0), ("poll_interval", 0), ("max_redraw_hz", -1), ("x_axis", "sideways")):
        with pytest.raises(ValueError, match=name):
            check(name, bad)
        with pytest.raises(ValueError, match=name):
            LossPlot("run-a", autostart=False, show_controls=False, **{name: bad})


# ---------------------------------------------------------------------------- poller


def test_poller_follows_the_cursor_refetches_after_a_resume_and_fails_fast() -> None:
    from twinkle.errors import TransportError
    from twinkle_jupyter.poller import BACKOFF_MAX_S, BACKOFF_MIN_S, MetricPoller, next_backoff

    server = FakeServer()
    server.add_steps(2)
    poller = MetricPoller(client=server, max_points=MIN_POINTS)
    assert poller.add_run("run-a") and not poller.add_run("run-a")
    assert poller.fetch() and poller.error is None and server.health_checks == 1
    server.add_steps(1)
    assert poller.fetch() and server.health_checks == 1  # reached once: no health check per fetch
    assert not poller.fetch()  # nothing new
    assert server.since == [0, 2, 3] and poller.history("run-a").current_step == 3

    # A resume from step 1: the revision moves, the poller fetches everything again.
    server.revision = 1
    for p in server.points[1:]:
        p["superseded"] = True
    server.points.append({**server.points[1], "superseded": False, "loss": 9.0})
    assert poller.fetch()
    assert server.since[-2:] == [3, 0]
    hist = poller.history("run-a")
    assert hist.revision == 1 and hist.current_step == 2 and hist.resumed_at == [1]

    # A failure is one line; the next fetch asks the health route first.
    server.fail = TransportError("cannot reach the twinkle server at http://fake")
    assert poller.fetch() and poller.error == "cannot reach the twinkle server at http://fake"
    assert not poller.fetch()  # the same error again: nothing visible changed
    checks = server.health_checks
    server.fail = None
    assert poller.fetch() and poller.error is None and server.health_checks == checks + 1

    # Every fetch ran under the notebook layer's short retry budget, not the client's long one.
    assert server.retry_budgets and set(server.retry_budgets) == {READ_RETRY_S}

    assert next_backoff(0.5) == BACKOFF_MIN_S and next_backoff(2.0) == 4.0
    assert next_backoff(BACKOFF_MAX_S) == BACKOFF_MAX_S


# ---------------------------------------------------------------------------- plot


def _shown_step(html_text: str) -> int | None:
    found = re.search(r"step (\d+)", html_text)
    return int(found.group(1)) if found else None


def test_redraws_are_rate_limited_and_the_final_picture_has_the_last_step() -> None:
    from twinkle_jupyter.plot import LossPlot

    server = FakeServer()
    server.add_steps(3)
    # One redraw per 1000 s: after the first picture, only finalize() may draw again.
    plot = LossPlot("run-a", client=server, poll_interval=0.01, max_redraw_hz=0.001, autostart=False,
                    show_controls=False)
    drawn = threading.Event()
    plot.view.observe(lambda _change: drawn.set(), names="value")
    try:
        plot.start()
        assert drawn.wait(WAIT_S), "no first picture"
        assert plot.redraws == 1 and _shown_step(plot.view.value) == 3
        server.add_steps(3)
        server.wait_fetches(server.fetches + 2)  # a fetch got steps 4-6 and its redraw decision is made
        assert plot.history("run-a").current_step == 6
        assert plot.redraws == 1 and _shown_step(plot.view.value) == 3
        bundle = plot.finalize("finished")
        assert not plot.polling
        assert bundle["text/plain"].startswith("twinkle run-a: step 6,") and bundle["text/plain"].endswith("finished")
        assert plot.view.points[0]["step"] == [1, 2, 3, 4, 5, 6] and plot.view.status == "finished"
    finally:
        plot.close()


def test_auto_finalize_once_the_runs_are_detached(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_jupyter import plot as plot_module
    from twinkle_jupyter.plot import LossPlot

    server = FakeServer()
    server.add_steps(2)
    server.status = "detached"
    monkeypatch.setattr(plot_module, "DETACHED_CHECK_S", 0.0)  # ask for the runs' status at every poll
    finalized = threading.Event()
    plot = LossPlot("run-a", client=server, poll_interval=0.01, auto_finalize=True, autostart=False,
                    show_controls=False)
    plot.on_finalize = lambda _plot, _bundle: finalized.set()
    try:
        plot.start()
        assert finalized.wait(WAIT_S), "the plot did not finalize itself"
        assert plot.finalized and plot.view.status == "finished"
        assert plot.summary().startswith("twinkle run-a: step 2,")
    finally:
        plot.close()


def _pixels_near(png_b64: str, color: str, tolerance: int = 24) -> int:
    import base64
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")).astype(int)
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= tolerance).sum())


def test_the_final_picture_draws_the_eval_loss_beside_the_training_loss() -> None:
    from twinkle_jupyter.plot import LossPlot
    from twinkle_jupyter.render import EVAL_COLORS

    bundles = {}
    for with_eval in (False, True):
        server = FakeServer()
        server.add_steps(6)
        if with_eval:
            # Two eval batches at steps 0, 3 and 6: per step their token-weighted mean is drawn.
            for step in (0, 3, 6):
                server.eval_points += [
                    {"step": step, "loss": 4.0 / (step + 1), "num_tokens": 10, "time": 1000.5 + step, "superseded": False},
                    {"step": step, "loss": 2.0 / (step + 1), "num_tokens": 30, "time": 1000.6 + step, "superseded": False},
                ]
        plot = LossPlot("run-a", client=server, autostart=False, show_controls=False)
        try:
            bundles[with_eval] = plot.finalize("finished")
            if with_eval:
                assert plot.view.points[0]["eval"] == {
                    "step": [0, 3, 6], "loss": [pytest.approx(2.5 / (s + 1)) for s in (0, 3, 6)]}
        finally:
            plot.close()
    # The eval curve's colour is in the saved picture only when there are eval points.
    assert _pixels_near(bundles[True]["image/png"], EVAL_COLORS[0]) > 50
    assert _pixels_near(bundles[False]["image/png"], EVAL_COLORS[0]) == 0
    assert "eval loss 0.3571 at step 6" in bundles[True]["text/plain"]
    assert "eval" not in bundles[False]["text/plain"]


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_status_of_a_twinkle_error() -> None:
    pytest.importorskip("jupyter_server")
    from twinkle import errors
    from twinkle_jupyter.dashboard import answer_status

    # What the browser asked for keeps its status; the rest is the twinkle server's or the
    # Jupyter server's problem: a refused key is 502, never 401 (the Jupyter login is fine).
    assert answer_status(errors.NotFoundError("no run")) == 404
    assert answer_status(errors.InvalidArgumentError("bad")) == 400
    for cls in (errors.AuthenticationError, errors.TransportError, errors.ServerError, errors.StateError,
                errors.CapacityError, errors.DeadlineError, errors.TwinkleError):
        assert answer_status(cls("x")) == 502, cls
