"""``LossPlot``: a live loss plot of one or several training runs, fed from the server's history.

One widget model carries every update: :class:`PlotView`, an ``ipywidgets.HTML`` whose value
is the picture (a PNG data URI) with the progress line under it, plus synced traits with the
downsampled points, the status and a one-line summary, so a saved notebook's widget state
holds the final curve as numbers. The controls (x axis, log scale, smoothing) are separate
small widgets: they change rarely.

A daemon thread polls ``TwinkleClient.get_metrics(run_id, since_step=cursor)`` (refetching
everything when the run's ``revision`` changes, i.e. after a resume), redraws at most
``max_redraw_hz`` times a second and only sets widget traits: the kernel forwards those to
the browser even while the main thread is blocked in a training loop. It never prints.
"""

from __future__ import annotations

import base64
import html
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import ipywidgets as widgets
from traitlets import Dict, List, Unicode

from .connection import current_client, one_line_error
from .history import RunHistory, format_duration
from .render import COLORS, PlotRenderer, RenderOptions

__all__ = ["LossPlot", "PlotView"]

STATUS_MARKS = {"live": "●", "finished": "✓", "interrupted": "■", "error": "✗", "stopped": "■"}


class PlotView(widgets.HTML):
    """The single widget model a :class:`LossPlot` updates (picture + progress line as HTML)."""

    points = List(Dict(), help="Per run: downsampled step, loss, smoothed loss, lr, grad norm, time.").tag(sync=True)
    status = Unicode("live", help="live, finished, interrupted, error or stopped.").tag(sync=True)
    summary = Unicode("", help="One line: steps, first and last loss, duration, status.").tag(sync=True)


def _r(value: float | None) -> float | None:
    """6 significant digits, None for NaN: small JSON, valid JSON."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


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
    """

    def __init__(
        self,
        runs: str | Iterable[str] | None = None,
        *,
        client: Any = None,
        poll_interval: float = 0.5,
        max_redraw_hz: float = 2.0,
        max_points: int = 1000,
        smoothing: float = 0.6,
        x_axis: str = "step",
        log_scale: bool = False,
        show_controls: bool = True,
        width: int = 720,
        height: int = 420,
        title: str | None = None,
        autostart: bool = True,
        auto_finalize: bool = False,
        points_sync_interval: float = 5.0,
        **kwargs: Any,
    ) -> None:
        if x_axis not in ("step", "time"):
            raise ValueError(f"x_axis must be 'step' or 'time', got {x_axis!r}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if max_redraw_hz <= 0 or poll_interval <= 0:
            raise ValueError("max_redraw_hz and poll_interval must be > 0")
        self._client = client
        self.poll_interval = float(poll_interval)
        self.max_redraw_hz = float(max_redraw_hz)
        self.max_points = int(max_points)
        self.points_sync_interval = float(points_sync_interval)
        self.auto_finalize = auto_finalize
        self._options = RenderOptions(x_axis=x_axis, log_scale=bool(log_scale), title=title,
                                      show_smoothed=smoothing > 0)
        self._smoothing = float(smoothing)
        self._histories: dict[str, RunHistory] = {}
        self._hints: dict[str, Callable[[RunHistory], int | None]] = {}
        self._renderer = PlotRenderer(width, height)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty = True
        self._last_draw = 0.0
        self._last_points_sync = 0.0
        self._error: str | None = None
        self._reached = False  # until a fetch succeeded, a health check goes first (fails fast)
        self._status = "live"
        self._message: str | None = None
        self._last_status_check = 0.0
        self._last_change = time.monotonic()
        self.redraws = 0
        self.handle: Any = None
        """The ``DisplayHandle`` when shown with :meth:`show`; :meth:`finalize` updates it."""
        self.finalized = False
        self.on_finalize: Callable[[LossPlot, dict[str, Any]], None] | None = None

        # The class goes in at construction: add_class() later would cost one more message.
        self.view = PlotView(value=self._placeholder_html(), layout=widgets.Layout(width=f"{width + 8}px"),
                             _dom_classes=("twinkle-loss-plot",))
        children: list[widgets.Widget] = []
        self._controls: dict[str, widgets.Widget] = {}
        if show_controls:
            x_toggle = widgets.ToggleButtons(
                options=[("step", "step"), ("time", "time")], value=x_axis, description="x axis",
                style={"button_width": "56px", "description_width": "44px"},
            )
            log_box = widgets.Checkbox(value=bool(log_scale), description="log scale", indent=False,
                                       layout=widgets.Layout(width="100px"))
            smooth = widgets.FloatSlider(
                value=smoothing, min=0.0, max=0.99, step=0.01, description="smoothing",
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
    def runs(self) -> list[str]:
        """The run ids shown, in overlay order."""
        return list(self._histories)

    def history(self, run_id: str) -> RunHistory:
        """The metric history held for ``run_id``."""
        return self._histories[run_id]

    def add_run(self, run_id: str, *, total_hint: Callable[[RunHistory], int | None] | None = None) -> None:
        """Overlay another run. ``total_hint(history)`` may estimate its total steps for the ETA
        (called from the poller thread until it returns a number)."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run id must be a non-empty string, got {run_id!r}")
        with self._lock:
            if run_id not in self._histories:
                self._histories[run_id] = RunHistory(run_id, max_points=self.max_points, smoothing=self._smoothing)
                self._dirty = True
            if total_hint is not None:
                self._hints[run_id] = total_hint
        if self._status == "live" and not self.finalized:
            self._wake.set()

    @property
    def x_axis(self) -> str:
        return self._options.x_axis

    @x_axis.setter
    def x_axis(self, value: str) -> None:
        if value not in ("step", "time"):
            raise ValueError(f"x_axis must be 'step' or 'time', got {value!r}")
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
        return self._smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        if "smoothing" in self._controls:
            self._controls["smoothing"].value = float(value)
        else:
            self.set_smoothing(float(value))

    def _set_option(self, **changes: Any) -> None:
        from dataclasses import replace

        with self._lock:
            self._options = replace(self._options, **changes)
            self._dirty = True
        self._after_control_change()

    def set_smoothing(self, weight: float) -> None:
        """Change the EMA weight; the histories are fetched again so the EMA covers every step."""
        if not 0 <= weight < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {weight!r}")
        with self._lock:
            self._smoothing = weight
            from dataclasses import replace

            self._options = replace(self._options, show_smoothed=weight > 0)
            for hist in self._histories.values():
                hist.set_smoothing(weight)
                hist.reset()
            self._dirty = True
        self._after_control_change()

    def _after_control_change(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
        else:
            # Finalized or stopped: a control change redraws here (the kernel is idle then).
            try:
                self.refresh(fetch=any(not h.loaded for h in self._histories.values()))
            except Exception as exc:  # a control callback must not raise into the kernel
                self._error = one_line_error(exc)

    # ------------------------------------------------------------------ poller thread

    def start(self) -> None:
        """Start the poller thread (no-op if it runs)."""
        if self.finalized:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="twinkle-loss-plot", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the poller thread; waits up to ``timeout`` s for a fetch in flight."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        backoff = self.poll_interval
        while not self._stop.is_set():
            try:
                changed = self._poll_once()
                if self._error is not None:
                    self._error = None
                    changed = True
                backoff = self.poll_interval
            except Exception as exc:  # shown in the progress line; the thread keeps going
                message = one_line_error(exc)
                changed = message != self._error
                self._error = message
                backoff = min(max(backoff * 2, 1.0), 10.0)
            if self._stop.is_set():
                break
            now = time.monotonic()
            if changed:
                self._dirty = True
                self._last_change = now
            timeout = backoff
            if self._dirty:
                wait = 1.0 / self.max_redraw_hz - (now - self._last_draw)
                if wait <= 0:
                    try:
                        self._redraw(from_thread=True)
                    except Exception as exc:
                        self._error = f"cannot draw: {one_line_error(exc)}"
                else:
                    timeout = min(timeout, wait)
            if self.auto_finalize and self._error is None and self._runs_detached(now):
                self._finalize_from_thread()
                break
            self._wake.wait(timeout)
            self._wake.clear()

    def _runs_detached(self, now: float) -> bool:
        """True when every run is detached and nothing changed for a while (checked every 5 s)."""
        if now - self._last_status_check < 5.0 or now - self._last_change < 5.0:
            return False
        self._last_status_check = now
        try:
            client = current_client(self._client)
            return all(client.get_training_run(r).status != "active" for r in self.runs)
        except Exception:
            return False

    def _finalize_from_thread(self) -> None:
        try:
            self.finalize("finished", fetch=False, _from_thread=True)
        except Exception as exc:
            self._error = one_line_error(exc)

    def _poll_once(self) -> bool:
        """Fetch new points of every run; returns whether anything changed."""
        client = current_client(self._client)
        if (self._error is not None or not self._reached) and not client.health_check():
            # A down server makes get_metrics retry for a minute; fail fast instead.
            from twinkle.errors import TransportError

            raise TransportError(f"cannot reach the twinkle server at {client.base_url}")
        changed = False
        for run_id in self.runs:
            hist = self._histories.get(run_id)
            if hist is None:
                continue
            resp = client.get_metrics(run_id, since_step=hist.cursor)
            if hist.needs_refetch(resp.revision):
                resp = client.get_metrics(run_id, since_step=0)
            with self._lock:
                if self._histories.get(run_id) is not hist:
                    continue
                changed = hist.ingest(resp) or changed
            self._reached = True
            hint = self._hints.get(run_id)
            if hint is not None and hist.total_steps is None:
                try:
                    total = hint(hist)
                except Exception:  # an estimate only: never worth an error line
                    total = None
                if total:
                    with self._lock:
                        hist.total_steps = int(total)
                    self._hints.pop(run_id, None)
                    changed = True
        return changed

    # ------------------------------------------------------------------ drawing

    def refresh(self, *, fetch: bool = True) -> None:
        """Fetch (optionally) and redraw now, on the calling thread."""
        if fetch:
            try:
                self._poll_once()
                self._error = None
            except Exception as exc:
                self._error = one_line_error(exc)
        self._redraw()

    def _render_png(self, *, final: bool = False) -> bytes:
        with self._lock:
            histories = list(self._histories.values())
            if not final:
                return self._renderer.render(histories, self._options)
            from dataclasses import replace

            return self._renderer.render(histories, replace(self._options, tight=True), small=True)

    def _redraw(self, *, sync_points: bool | None = None, from_thread: bool = False) -> None:
        with self._lock:
            if from_thread and (self._stop.is_set() or self.finalized):
                return  # finalize() owns the last picture
            png = self._render_png()
            value = self._html(png)
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
        out = []
        with self._lock:
            for hist in self._histories.values():
                recs = hist.records()
                old = hist.superseded.items()
                t0 = hist.start_time or 0.0
                out.append(
                    {
                        "run_id": hist.run_id,
                        "revision": hist.revision,
                        "step": [r.step for r in recs],
                        "loss": [_r(r.loss) for r in recs],
                        "smoothed": [_r(r.smoothed) for r in recs],
                        "lr": [_r(r.lr) for r in recs],
                        "grad_norm": [_r(r.grad_norm) for r in recs],
                        "time": [_r(r.time - t0) for r in recs],
                        "superseded": {"step": [r.step for r in old], "loss": [_r(r.loss) for r in old]},
                        "resumed_at": list(hist.resumed_at),
                        "total_steps": hist.total_steps,
                    }
                )
        return out

    @property
    def points(self) -> list[dict[str, Any]]:
        """Same as :meth:`points_payload`."""
        return self.points_payload()

    def _placeholder_html(self) -> str:
        return '<div style="font:12px monospace;color:#666;padding:4px">twinkle: waiting for metrics…</div>'

    def _html(self, png: bytes) -> str:
        b64 = base64.b64encode(png).decode("ascii")
        img = f'<img src="data:image/png;base64,{b64}" alt="loss curve" style="max-width:100%"/>'
        return f"<div>{img}{self._progress_html()}</div>"

    def _progress_html(self) -> str:
        rows = []
        with self._lock:
            histories = list(self._histories.values())
        for i, hist in enumerate(histories):
            rows.append(self._progress_row(hist, COLORS[i % len(COLORS)]))
        if self._error:
            rows.append(f'<div style="color:#b35c00">⚠ {html.escape(self._error)}</div>')
        if self._message:
            rows.append(f'<div style="color:#a00">{html.escape(self._message)}</div>')
        return '<div style="font:12px/1.5 monospace;color:#333;padding:2px 4px">' + "".join(rows) + "</div>"

    def _progress_row(self, hist: RunHistory, color: str) -> str:
        p = hist.progress()
        mark = STATUS_MARKS.get(self._status, "●")
        parts = [f'<span style="color:{color}">{mark}</span> <b>{html.escape(hist.run_id)}</b>']
        total = p["total"]
        if total and p["step"] <= total:
            frac = p["fraction"] or 0.0
            parts.append(
                f'step {p["step"]}/{total} <progress value="{p["step"]}" max="{total}" '
                f'style="width:110px;height:0.8em;vertical-align:middle"></progress> {frac:.0%}'
            )
        else:
            parts.append(f'step {p["step"]}')
        if p["rate"] is not None and self._status == "live":
            rate = p["rate"]
            parts.append(f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/it")
            if p["eta"] is not None and total and p["step"] < total:
                parts.append(f"ETA {format_duration(p['eta'])}")
        if p["loss"] is not None:
            loss = f"loss {p['loss']:.4f}"
            if p["smoothed"] is not None and math.isfinite(p["smoothed"]) and self._smoothing > 0:
                loss += f" (smoothed {p['smoothed']:.4f})"
            parts.append(loss)
        if p["elapsed"] is not None:
            parts.append(format_duration(p["elapsed"]))
        if self._status != "live":
            parts.append(self._status)
        return "<div>" + " · ".join(parts) + "</div>"

    # ------------------------------------------------------------------ finalizing

    def summary(self) -> str:
        """One line per the whole plot: for each run steps, first → last loss (min), duration; the status."""
        parts = []
        with self._lock:
            for hist in self._histories.values():
                first, last = hist.first, hist.last
                if last is None:
                    parts.append(f"{hist.run_id}: no steps yet")
                    continue
                text = f"{hist.run_id}: step {hist.current_step}"
                if hist.total_steps:
                    text += f"/{hist.total_steps}"
                rng = hist.loss_range
                text += f", loss {first.loss:.4f} → {last.loss:.4f}" if first is not None else ""
                if rng is not None:
                    text += f" (min {rng[0]:.4f})"
                elapsed = hist.progress()["elapsed"]
                if elapsed:
                    text += f", {format_duration(elapsed)}"
                if hist.superseded.count:
                    text += f", resumed at step {', '.join(map(str, hist.resumed_at))}"
                parts.append(text)
        line = "twinkle " + "; ".join(parts) if parts else "twinkle: no runs"
        line += f" — {self._status}"
        if self._message:
            line += f": {self._message}"
        return line

    def static_bundle(self) -> dict[str, Any]:
        """A mime bundle of the current state that needs no kernel: PNG, HTML and plain text."""
        with self._lock:
            png = self._render_png(final=True)
            b64 = base64.b64encode(png).decode("ascii")
            summary = self.summary()
            html_text = (
                f'<div class="twinkle-loss-plot-static"><img src="data:image/png;base64,{b64}" '
                f'alt="{html.escape(summary, quote=True)}" style="max-width:100%"/>'
                f"{self._progress_html()}</div>"
            )
        return {"image/png": b64, "text/html": html_text, "text/plain": summary}

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
        if not _from_thread:
            self.stop(timeout=1.0)
        else:
            self._stop.set()
        if fetch and self._error is None:
            try:
                self._poll_once()
            except Exception as exc:
                self._error = one_line_error(exc)
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
        self.stop(timeout=0.5)
        for control in self._controls.values():
            control.close()
        self.view.close()
        super().close()
