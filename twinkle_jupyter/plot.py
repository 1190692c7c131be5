"""``LossPlot``: a live loss plot of one or several training runs, fed from the server's history.

One widget model carries every update: :class:`PlotView`, an ``ipywidgets.HTML`` whose value
is the picture (a PNG data URI) with the progress line under it, plus synced traits with the
downsampled points, the status and a one-line summary, so a saved notebook's widget state
holds the final curve as numbers. The controls (x axis, log scale, smoothing) are separate
small widgets: they change rarely.

The data comes from a :class:`~twinkle_jupyter.poller.MetricPoller` (a daemon thread); after
each of its fetches the plot redraws, at most ``max_redraw_hz`` times a second, and only
sets widget traits: the kernel forwards those to the browser even while the main thread is
blocked in a training loop. Nothing here prints. The picture is drawn by
:mod:`~twinkle_jupyter.render`, the text around it made by :mod:`~twinkle_jupyter.formatting`.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import ipywidgets as widgets
from traitlets import Dict, List, Unicode

from .connection import one_line_error
from .formatting import (
    PLACEHOLDER_HTML,
    STATUS_MARKS,
    live_html,
    points_payload,
    progress_html,
    static_html,
    summary_line,
)
from .history import RunHistory
from .poller import MetricPoller
from .render import PlotRenderer, RenderOptions
from .settings import DEFAULTS, READ_RETRY_S, X_AXES, check

__all__ = ["STATUS_MARKS", "LossPlot", "PlotView"]

POINTS_SYNC_INTERVAL_S = 5.0
"""While live, the ``points`` trait (the curves as numbers) is sent at most this often."""
DETACHED_CHECK_S = 5.0
"""With ``auto_finalize``: how often the runs' status is asked, once nothing changed for as long."""


class PlotView(widgets.HTML):
    """The single widget model a :class:`LossPlot` updates (picture + progress line as HTML)."""

    points = List(Dict(), help="Per run: downsampled step, loss, smoothed loss, lr, grad norm, time; eval loss.").tag(
        sync=True)
    status = Unicode("live", help="live, finished, interrupted, error or stopped.").tag(sync=True)
    summary = Unicode("", help="One line: steps, first and last loss, duration, status.").tag(sync=True)


class LossPlot(widgets.VBox):
    """Live loss curves of training runs, polled from the twinkle server.

    Args:
        runs: a run id or several (overlaid); more can be added with :meth:`add_run`.
        client: a ``TwinkleClient``; default: twinkle_client's current connection, looked up
            at every poll (so a reconnect is followed).
        poll_interval: seconds between metric fetches.
        max_redraw_hz: at most this many redraws (and widget messages) per second.
        max_points: per run, the most steps kept in memory and sent to the browser; older
            steps are downsampled, keeping the first, last and extreme losses.
        smoothing: EMA weight of the smoothed curve, in [0, 1).
        x_axis: ``'step'`` or ``'time'`` (seconds/minutes/hours since each run's first step).
        log_scale: log y axis for the loss.
        show_controls: show the x axis / log scale / smoothing controls above the picture.
        autostart: start the poller thread now.
        auto_finalize: finalize by itself (from the poller thread) once every run is detached
            on the server and no new points arrive.

    Defaults are those of :mod:`twinkle_jupyter.settings` (``%config TwinkleMagics``).
    """

    def __init__(
        self,
        runs: str | Iterable[str] | None = None,
        *,
        client: Any = None,
        poll_interval: float = DEFAULTS.poll_interval,
        max_redraw_hz: float = DEFAULTS.max_redraw_hz,
        max_points: int = DEFAULTS.max_points,
        smoothing: float = DEFAULTS.smoothing,
        x_axis: str = DEFAULTS.x_axis,
        log_scale: bool = DEFAULTS.log_scale,
        show_controls: bool = DEFAULTS.show_controls,
        width: int = DEFAULTS.plot_width,
        height: int = DEFAULTS.plot_height,
        title: str | None = None,
        autostart: bool = True,
        auto_finalize: bool = False,
        points_sync_interval: float = POINTS_SYNC_INTERVAL_S,
        **kwargs: Any,
    ) -> None:
        x_axis = check("x_axis", x_axis)
        self.max_redraw_hz = check("max_redraw_hz", max_redraw_hz)
        self._poller = MetricPoller(client=client, interval=poll_interval, max_points=max_points,
                                    smoothing=smoothing, on_poll=self._on_poll)
        self.points_sync_interval = float(points_sync_interval)
        self.auto_finalize = auto_finalize
        self._options = RenderOptions(x_axis=x_axis, log_scale=bool(log_scale), title=title,
                                      show_smoothed=self._poller.smoothing > 0)
        self._renderer = PlotRenderer(width, height)
        self._lock = self._poller.lock
        self._dirty = True
        self._last_draw = -math.inf  # the first picture is never held back
        self._last_points_sync = -math.inf
        self._draw_error: str | None = None
        self._status = "live"
        self._message: str | None = None
        self._last_status_check = -math.inf
        self._last_change = time.monotonic()
        self.redraws = 0
        self.handle: Any = None
        """The ``DisplayHandle`` when shown with :meth:`show`; :meth:`finalize` updates it."""
        self.finalized = False
        self.on_finalize: Callable[[LossPlot, dict[str, Any]], None] | None = None

        # The class goes in at construction: add_class() later would cost one more message.
        self.view = PlotView(value=PLACEHOLDER_HTML, layout=widgets.Layout(width=f"{width + 8}px"),
                             _dom_classes=("twinkle-loss-plot",))
        children: list[widgets.Widget] = []
        self._controls: dict[str, widgets.Widget] = {}
        if show_controls:
            x_toggle = widgets.ToggleButtons(
                options=[(x, x) for x in X_AXES], value=x_axis, description="x axis",
                style={"button_width": "56px", "description_width": "44px"},
            )
            log_box = widgets.Checkbox(value=bool(log_scale), description="log scale", indent=False,
                                       layout=widgets.Layout(width="100px"))
            smooth = widgets.FloatSlider(
                value=self._poller.smoothing, min=0.0, max=0.99, step=0.01, description="smoothing",
                continuous_update=False, readout_format=".2f", style={"description_width": "64px"},
                layout=widgets.Layout(width="260px"),
            )
            x_toggle.observe(lambda ch: self._set_option(x_axis=ch["new"]), names="value")
            log_box.observe(lambda ch: self._set_option(log_scale=bool(ch["new"])), names="value")
            smooth.observe(lambda ch: self.set_smoothing(float(ch["new"])), names="value")
            self._controls = {"x_axis": x_toggle, "log_scale": log_box, "smoothing": smooth}
            children.append(widgets.HBox([x_toggle, log_box, smooth]))
        children.append(self.view)
        super().__init__(children=children, **kwargs)
        for run_id in [runs] if isinstance(runs, str) else list(runs or []):
            self.add_run(run_id)
        if autostart:
            self.start()

    # ------------------------------------------------------------------ runs and options

    @property
    def poll_interval(self) -> float:
        """Seconds between metric fetches (takes effect at the next one)."""
        return self._poller.interval

    @poll_interval.setter
    def poll_interval(self, value: float) -> None:
        self._poller.interval = check("poll_interval", value)

    @property
    def max_points(self) -> int:
        """Per run, the most steps kept (fixed when the plot is made)."""
        return self._poller.max_points

    @property
    def runs(self) -> list[str]:
        """The run ids shown, in overlay order."""
        return self._poller.runs

    def history(self, run_id: str) -> RunHistory:
        """The metric history held for ``run_id``."""
        return self._poller.history(run_id)

    def add_run(self, run_id: str, *, total_hint: Callable[[RunHistory], int | None] | None = None) -> None:
        """Overlay another run. ``total_hint(history)`` may estimate its total steps for the ETA
        (called from the poller thread until it returns a number)."""
        if self._poller.add_run(run_id, total_hint):
            self._dirty = True
        if self._status == "live" and not self.finalized:
            self._poller.wake()

    @property
    def x_axis(self) -> str:
        return self._options.x_axis

    @x_axis.setter
    def x_axis(self, value: str) -> None:
        value = check("x_axis", value)
        if "x_axis" in self._controls:
            self._controls["x_axis"].value = value
        else:
            self._set_option(x_axis=value)

    @property
    def log_scale(self) -> bool:
        return self._options.log_scale

    @log_scale.setter
    def log_scale(self, value: bool) -> None:
        if "log_scale" in self._controls:
            self._controls["log_scale"].value = bool(value)
        else:
            self._set_option(log_scale=bool(value))

    @property
    def smoothing(self) -> float:
        return self._poller.smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        if "smoothing" in self._controls:
            self._controls["smoothing"].value = float(value)
        else:
            self.set_smoothing(float(value))

    def _set_option(self, **changes: Any) -> None:
        with self._lock:
            self._options = replace(self._options, **changes)
            self._dirty = True
        self._after_control_change()

    def set_smoothing(self, weight: float) -> None:
        """Change the EMA weight; the histories are fetched again so the EMA covers every step."""
        weight = check("smoothing", weight)
        with self._lock:
            self._poller.set_smoothing(weight)
            self._options = replace(self._options, show_smoothed=weight > 0)
            self._dirty = True
        self._after_control_change()

    def _after_control_change(self) -> None:
        if self._poller.running:
            self._poller.wake()
        else:
            # Finalized or stopped: a control change redraws here (the kernel is idle then).
            try:
                self.refresh(fetch=any(not h.loaded for h in self._poller.histories()))
            except Exception as exc:  # a control callback must not raise into the kernel
                self._draw_error = one_line_error(exc)

    # ------------------------------------------------------------------ polling

    def start(self) -> None:
        """Start the poller thread (no-op if it runs, or once finalized)."""
        if not self.finalized:
            self._poller.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the poller thread; waits up to ``timeout`` s for a fetch in flight."""
        self._poller.stop(timeout)

    @property
    def polling(self) -> bool:
        return self._poller.running

    def _on_poll(self, changed: bool) -> float | None:
        """After each fetch, on the poller thread: redraw if due; returns how soon to come back."""
        now = time.monotonic()
        if changed:
            self._dirty = True
            self._last_change = now
        wait = None
        if self._dirty:
            due = 1.0 / self.max_redraw_hz - (now - self._last_draw)
            if due <= 0:
                try:
                    self._redraw(from_thread=True)
                except Exception as exc:
                    self._draw_error = f"cannot draw: {one_line_error(exc)}"
            else:
                wait = due
        if self.auto_finalize and self._poller.error is None and self._runs_detached(now):
            try:
                self.finalize("finished", fetch=False, _from_thread=True)
            except Exception as exc:
                self._draw_error = one_line_error(exc)
        return wait

    def _runs_detached(self, now: float) -> bool:
        """True when every run is detached and nothing changed for a while (checked every 5 s)."""
        if now - self._last_status_check < DETACHED_CHECK_S or now - self._last_change < DETACHED_CHECK_S:
            return False
        self._last_status_check = now
        try:
            client = self._poller.client
            with client.retrying_for(READ_RETRY_S):
                return all(client.get_training_run(r).status != "active" for r in self.runs)
        except Exception:
            return False

    # ------------------------------------------------------------------ drawing

    def refresh(self, *, fetch: bool = True) -> None:
        """Fetch (optionally) and redraw now, on the calling thread."""
        if fetch:
            self._poller.fetch()
        self._redraw()

    def _render_png(self, *, final: bool = False) -> bytes:
        with self._lock:
            histories = self._poller.histories()
            if not final:
                return self._renderer.render(histories, self._options)
            return self._renderer.render(histories, replace(self._options, tight=True), small=True)

    def _progress_html(self) -> str:
        with self._lock:
            warnings = [e for e in (self._poller.error, self._draw_error) if e]
            return progress_html(self._poller.histories(), status=self._status, smoothing=self.smoothing,
                                 warnings=warnings, message=self._message)

    def _redraw(self, *, sync_points: bool | None = None, from_thread: bool = False) -> None:
        with self._lock:
            if from_thread and (self._poller.stopping or self.finalized):
                return  # finalize() owns the last picture
            png = self._render_png()
            self._draw_error = None
            value = live_html(png, self._progress_html())
            now = time.monotonic()
            if sync_points is None:
                sync_points = now - self._last_points_sync >= self.points_sync_interval
            with self.view.hold_sync():
                self.view.value = value
                if sync_points:
                    self.view.points = self.points_payload()
                    self._last_points_sync = now
            self._dirty = False
            self._last_draw = now
            self.redraws += 1

    def points_payload(self) -> list[dict[str, Any]]:
        """The downsampled curves as JSON-able data (what the ``points`` trait carries)."""
        with self._lock:
            return points_payload(self._poller.histories())

    @property
    def points(self) -> list[dict[str, Any]]:
        """Same as :meth:`points_payload`."""
        return self.points_payload()

    # ------------------------------------------------------------------ finalizing

    def summary(self) -> str:
        """One line per the whole plot: for each run steps, first → last loss (min), duration; the status."""
        with self._lock:
            return summary_line(self._poller.histories(), status=self._status, message=self._message)

    def static_bundle(self) -> dict[str, Any]:
        """A mime bundle of the current state that needs no kernel: PNG, HTML and plain text."""
        with self._lock:
            b64 = base64.b64encode(self._render_png(final=True)).decode("ascii")
            summary = self.summary()
            return {"image/png": b64, "text/html": static_html(b64, summary, self._progress_html()),
                    "text/plain": summary}

    def finalize(
        self, status: str = "finished", message: str | None = None, *, fetch: bool = True, _from_thread: bool = False
    ) -> dict[str, Any]:
        """Stop polling, draw the final state and return it as a static mime bundle.

        If the plot was shown with :meth:`show`, its output is replaced by that bundle (so the
        saved notebook, an HTML export and a restarted kernel all show the picture). The widget
        keeps the final picture and points. Idempotent: later calls return the same bundle.
        """
        if self.finalized:
            return self._final_bundle
        if _from_thread:
            self._poller.request_stop()
        else:
            self._poller.stop(timeout=1.0)
        if fetch and self._poller.error is None:
            self._poller.fetch()
        # The last update counts towards the rate limit too.
        wait = 1.0 / self.max_redraw_hz - (time.monotonic() - self._last_draw)
        if 0 < wait <= 1.0:
            time.sleep(wait)
        with self._lock:
            self._status = status
            self._message = message
            bundle = self.static_bundle()
            with self.view.hold_sync():
                # Shown through a handle, the output becomes the static bundle and the widget is
                # no longer on screen: keep the picture once in the notebook, not twice.
                self.view.value = bundle["text/html"] if self.handle is None else self._progress_html()
                self.view.points = self.points_payload()
                self.view.status = status
                self.view.summary = bundle["text/plain"]
            self.finalized = True
            self._final_bundle = bundle
        if self.handle is not None:
            self.handle.update(bundle, raw=True)
        if self.on_finalize is not None:
            self.on_finalize(self, bundle)
        return bundle

    def show(self) -> Any:
        """Display the plot with a display id (so :meth:`finalize` can replace it); returns the handle."""
        from IPython.display import display

        self.handle = display(self, display_id=True)
        return self.handle

    def close(self) -> None:
        """Stop the poller and close the widgets."""
        if "view" in self.__dict__:  # else the constructor failed (close runs from __del__ too)
            self.stop(timeout=0.5)
            for control in self._controls.values():
                control.close()
            self.view.close()
        super().close()
