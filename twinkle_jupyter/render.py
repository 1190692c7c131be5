"""Loss curves as PNG bytes, with matplotlib's Agg canvas and its object-oriented API only.

No pyplot: a notebook's own ``%matplotlib`` state, figure numbering and backend are left
alone, and rendering is safe from a background thread.

Redraws are the hot path (up to twice a second while training), so a :class:`PlotRenderer`
keeps one figure and blits: axes, ticks, grid and legend are drawn once into a cached
background, and while the axis limits hold only the curves are drawn over it. Limits get
headroom (the x axis jumps to the next "nice" number, the y axis only moves when the data
leaves it or uses too little of it), so a full redraw is needed only now and then.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .history import RunHistory, StepRecord
from .settings import DEFAULTS

__all__ = ["PlotRenderer", "RenderOptions", "nice_ceil"]

# tab10, without the grey that marks abandoned branches.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
SUPERSEDED_COLOR = "#9a9a9a"


def eval_color(color: str) -> str:
    """The eval loss colour of a run drawn in ``color``: the same hue at 55 % brightness, so it
    reads as that run's while standing apart from its training curve."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(v * 0.55):02x}" for v in (r, g, b))


EVAL_COLORS = tuple(eval_color(c) for c in COLORS)
EVAL_LABEL = "eval loss"


@dataclass(frozen=True)
class RenderOptions:
    """What the picture shows. ``x_axis`` is ``'step'`` or ``'time'`` (seconds since each run's first step)."""

    x_axis: str = DEFAULTS.x_axis
    log_scale: bool = DEFAULTS.log_scale
    show_raw: bool = True
    show_smoothed: bool = True
    title: str | None = None
    tight: bool = False
    """Limits fitted to the data, without the headroom a growing live plot needs (final pictures)."""


def nice_ceil(value: float) -> float:
    """The smallest of 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten that is >= ``value``.

    Steps of at most 25 %: the x axis keeps some headroom without wasting the plot's width.
    """
    if not math.isfinite(value) or value <= 1:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if m * 10**exp >= value:
            return m * 10**exp
    return 10.0 ** (exp + 1)


class _StickyLimits:
    """Axis limits that move rarely: only when the data leaves them or fills < ``min_fill`` of them."""

    def __init__(self, min_fill: float = 0.35, pad: float = 0.08) -> None:
        self.min_fill = min_fill
        self.pad = pad
        self.limits: tuple[float, float] | None = None
        self.log: bool | None = None

    def update(self, lo: float | None, hi: float | None, log: bool) -> tuple[float, float]:
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            self.limits = None
            return (1e-3, 1.0) if log else (0.0, 1.0)
        if log:
            lo, hi = max(lo, 1e-12), max(hi, 1e-12)
            lo, hi = math.log10(lo), math.log10(hi)
        span = hi - lo
        cur = self.limits if self.log == log else None
        if cur is not None:
            cspan = cur[1] - cur[0]
            if cur[0] <= lo and hi <= cur[1] and (cspan <= 0 or span / cspan >= self.min_fill):
                return self._out(cur, log)
        if span <= 0:
            span = abs(hi) * 0.1 or 1.0
        new = (lo - span * self.pad, hi + span * self.pad)
        if not log and lo >= 0 and new[0] < 0:
            new = (0.0, new[1]) if lo < span * 0.5 else (lo - span * self.pad * 0.5, new[1])
        self.limits, self.log = new, log
        return self._out(new, log)

    @staticmethod
    def _out(limits: tuple[float, float], log: bool) -> tuple[float, float]:
        if log:
            return 10 ** limits[0], 10 ** limits[1]
        return limits


@dataclass
class _Lines:
    raw: Any
    smooth: Any
    old: Any
    lr: Any
    gn: Any
    ev: Any


def _time_unit(span_s: float) -> tuple[float, str]:
    if span_s > 2 * 3600:
        return 3600.0, "h"
    if span_s > 120:
        return 60.0, "min"
    return 1.0, "s"


def _column(records: Sequence[StepRecord], name: str) -> np.ndarray:
    return np.fromiter(
        ((math.nan if (v := getattr(r, name)) is None else v) for r in records), dtype=float, count=len(records)
    )


class PlotRenderer:
    """Draws one or several :class:`~twinkle_jupyter.history.RunHistory` into a PNG.

    The top panel has the loss (raw, thin; smoothed, bold; abandoned branches dotted grey, with
    a dashed mark where a resume went back to) and the eval loss (dashed, with a marker per
    step, in a darker shade of the run's colour), the bottom panels the learning rate and the
    gradient norm. Not thread-safe: one renderer per plot, used under the plot's lock.
    """

    def __init__(self, width_px: int = DEFAULTS.plot_width, height_px: int = DEFAULTS.plot_height, dpi: int = 80) -> None:
        self.width_px, self.height_px, self.dpi = int(width_px), int(height_px), int(dpi)
        self.full_redraws = 0
        self.blits = 0
        self._build()

    def _build(self) -> None:
        fig = Figure(figsize=(self.width_px / self.dpi, self.height_px / self.dpi), dpi=self.dpi)
        self.canvas = FigureCanvasAgg(fig)
        self.figure = fig
        # A fixed layout: tight_layout/constrained layout cost more than the whole blit.
        gs = fig.add_gridspec(
            2, 2, height_ratios=[2.3, 1.0], left=0.085, right=0.985, top=0.92, bottom=0.09, hspace=0.32, wspace=0.18
        )
        self.ax_loss = fig.add_subplot(gs[0, :])
        self.ax_lr = fig.add_subplot(gs[1, 0])
        self.ax_gn = fig.add_subplot(gs[1, 1])
        for ax in (self.ax_loss, self.ax_lr, self.ax_gn):
            ax.grid(True, alpha=0.3, linewidth=0.6)
            ax.tick_params(labelsize=8, length=3, pad=2)
            ax.xaxis.set_major_locator(MaxNLocator(6 if ax is self.ax_loss else 4))
            ax.yaxis.set_major_locator(MaxNLocator(5 if ax is self.ax_loss else 3))
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        # "5e-05" on the ticks instead of an offset text that collides with the panel title.
        self.ax_lr.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.2g}"))
        self.ax_lr.set_title("learning rate", fontsize=8, loc="left", pad=2)
        self.ax_gn.set_title("grad norm", fontsize=8, loc="left", pad=2)
        self._lines: list[_Lines] = []
        self._limits = {name: _StickyLimits() for name in ("x", "loss", "lr", "gn")}
        self._layout_key: Any = None
        self._background: Any = None
        self._decor: list[Any] = []

    def _lines_for(self, n: int) -> list[_Lines]:
        while len(self._lines) < n:
            color = COLORS[len(self._lines) % len(COLORS)]
            ev_color = EVAL_COLORS[len(self._lines) % len(EVAL_COLORS)]
            kw = {"animated": True}
            self._lines.append(
                _Lines(
                    raw=self.ax_loss.plot([], [], color=color, linewidth=0.8, alpha=0.35, **kw)[0],
                    smooth=self.ax_loss.plot([], [], color=color, linewidth=1.8, **kw)[0],
                    old=self.ax_loss.plot(
                        [], [], color=SUPERSEDED_COLOR, linewidth=1.0, linestyle=":", alpha=0.9, **kw
                    )[0],
                    lr=self.ax_lr.plot([], [], color=color, linewidth=1.2, **kw)[0],
                    gn=self.ax_gn.plot([], [], color=color, linewidth=1.0, **kw)[0],
                    # Eval points are few and far apart: markers show where each one is.
                    ev=self.ax_loss.plot([], [], color=ev_color, linewidth=1.4, linestyle="--", marker="o",
                                         markersize=4, **kw)[0],
                )
            )
        return self._lines

    def render(self, runs: Sequence[RunHistory], options: RenderOptions | None = None, *, small: bool = False) -> bytes:
        """The current picture of ``runs`` as PNG bytes (``small``: palette PNG, for saving)."""
        opts = options or RenderOptions()
        lines = self._lines_for(len(runs))
        by_time = opts.x_axis == "time"
        xs_max, loss_lo, loss_hi = 0.0, math.inf, -math.inf
        lr_lo, lr_hi, gn_lo, gn_hi = math.inf, -math.inf, math.inf, -math.inf
        spans = [
            ((h.last.time - h.start_time) if (h.last and h.start_time) else 0.0) for h in runs
        ]
        unit, unit_name = _time_unit(max(spans, default=0.0))
        data = []
        for hist in runs:
            recs = hist.records()
            old = hist.superseded.items()
            evals = hist.eval_records()
            t0 = hist.start_time or 0.0
            if by_time:
                x = (_column(recs, "time") - t0) / unit
                xo = (_column(old, "time") - t0) / unit
                xe = (_column(evals, "time") - t0) / unit
            else:
                x = _column(recs, "step")
                xo = _column(old, "step")
                xe = _column(evals, "step")
            loss, smooth = _column(recs, "loss"), _column(recs, "smoothed")
            lo_loss = _column(old, "loss")
            ev_loss = _column(evals, "loss")
            lr, gn = _column(recs, "lr"), _column(recs, "grad_norm")
            data.append((x, loss, smooth, xo, lo_loss, lr, gn, xe, ev_loss))
            for arr in (x, xo, xe):
                if arr.size:
                    xs_max = max(xs_max, float(np.nanmax(arr)))
            if not by_time and hist.total_steps:
                xs_max = max(xs_max, float(hist.total_steps))
            for arr in (loss, lo_loss, ev_loss, smooth if opts.show_smoothed else loss):
                vals = arr[np.isfinite(arr) & ((arr > 0) if opts.log_scale else True)]
                if vals.size:
                    loss_lo, loss_hi = min(loss_lo, float(vals.min())), max(loss_hi, float(vals.max()))
            for arr, kind in ((lr, "lr"), (gn, "gn")):
                vals = arr[np.isfinite(arr)]
                if vals.size:
                    if kind == "lr":
                        lr_lo, lr_hi = min(lr_lo, float(vals.min())), max(lr_hi, float(vals.max()))
                    else:
                        gn_lo, gn_hi = min(gn_lo, float(vals.min())), max(gn_hi, float(vals.max()))
        if opts.tight:
            x_hi = xs_max * 1.02 if xs_max > 0 else 1.0
            limits = {name: _StickyLimits() for name in ("loss", "lr", "gn")}  # fresh: fitted to the data
        else:
            x_hi = nice_ceil(xs_max * 1.02) if xs_max > 0 else 10.0
            if not by_time:
                x_hi = max(x_hi, 10.0)
            limits = self._limits
        x_lim = (0.0, x_hi)
        y_loss = limits["loss"].update(*_opt(loss_lo, loss_hi), opts.log_scale)
        y_lr = limits["lr"].update(*_opt(lr_lo, lr_hi), False)
        y_gn = limits["gn"].update(*_opt(gn_lo, gn_hi), False)
        labels = tuple(h.run_id for h in runs)
        markers = tuple(tuple(h.resumed_at) for h in runs) if not by_time else ()
        has_old = tuple(bool(h.superseded.count) for h in runs)
        has_eval = tuple(bool(d[7].size) for d in data)  # the legend names the eval curves
        waiting = tuple(h.run_id for h in runs if not h.records())
        key = (
            opts.x_axis, opts.log_scale, unit_name, x_lim, y_loss, y_lr, y_gn, labels, markers, has_old,
            has_eval, waiting, opts.title, opts.show_raw, opts.show_smoothed,
        )
        for i, (x, loss, smooth, xo, lo_loss, lr, gn, xe, ev_loss) in enumerate(data):
            ln = lines[i]
            ln.raw.set_data(x, loss)
            ln.raw.set_visible(opts.show_raw or not opts.show_smoothed)
            ln.raw.set_alpha(0.35 if opts.show_smoothed else 1.0)
            ln.smooth.set_data(x, smooth)
            ln.smooth.set_visible(opts.show_smoothed)
            ln.old.set_data(xo, lo_loss)
            ln.lr.set_data(x, lr)
            ln.gn.set_data(x, gn)
            ln.ev.set_data(xe, ev_loss)
        for ln in lines[len(data):]:
            for artist in (ln.raw, ln.smooth, ln.old, ln.lr, ln.gn, ln.ev):
                artist.set_data([], [])
        if key != self._layout_key or self._background is None:
            self._relayout(runs, opts, x_lim, y_loss, y_lr, y_gn, unit_name, waiting, has_eval)
            self._layout_key = key
            self.full_redraws += 1
        else:
            self.canvas.restore_region(self._background)
            self.blits += 1
        for ln in lines[: len(data)]:
            for ax, artists in (
                (self.ax_loss, (ln.old, ln.raw, ln.smooth, ln.ev)),
                (self.ax_lr, (ln.lr,)),
                (self.ax_gn, (ln.gn,)),
            ):
                for artist in artists:
                    if artist.get_visible():
                        ax.draw_artist(artist)
        return self._png(small=small)

    def _relayout(
        self,
        runs: Sequence[RunHistory],
        opts: RenderOptions,
        x_lim: tuple[float, float],
        y_loss: tuple[float, float],
        y_lr: tuple[float, float],
        y_gn: tuple[float, float],
        unit_name: str,
        waiting: tuple[str, ...],
        has_eval: tuple[bool, ...] = (),
    ) -> None:
        for artist in self._decor:
            artist.remove()
        self._decor = []
        ax = self.ax_loss
        ax.set_yscale("log" if opts.log_scale else "linear")
        if not opts.log_scale:
            ax.yaxis.set_major_locator(MaxNLocator(5))  # set_yscale put back the default locator
        for a in (ax, self.ax_lr, self.ax_gn):
            a.set_xlim(*x_lim)
            # Steps are whole numbers; time is not.
            a.xaxis.set_major_locator(MaxNLocator(6 if a is ax else 4, integer=opts.x_axis == "step"))
        ax.set_ylim(*y_loss)
        self.ax_lr.set_ylim(*y_lr)
        self.ax_gn.set_ylim(*y_gn)
        xlabel = "step" if opts.x_axis == "step" else f"time ({unit_name})"
        ax.set_xlabel("")
        self.ax_gn.set_xlabel(xlabel, fontsize=8, labelpad=1)
        self.ax_lr.set_xlabel(xlabel, fontsize=8, labelpad=1)
        ax.set_title(opts.title or ("loss · " + ", ".join(h.run_id for h in runs)), fontsize=9, loc="left")
        for hist in runs:
            if opts.x_axis == "step":
                for step in hist.resumed_at:
                    self._decor.append(ax.axvline(step, color=SUPERSEDED_COLOR, linestyle="--", linewidth=0.8))
        handles, names = [], []
        for i, hist in enumerate(runs):
            handles.append(self._lines[i].smooth if opts.show_smoothed else self._lines[i].raw)
            names.append(hist.run_id)
        for i, hist in enumerate(runs):
            if i < len(has_eval) and has_eval[i]:
                handles.append(self._lines[i].ev)
                names.append(EVAL_LABEL if len(runs) == 1 else f"{hist.run_id} {EVAL_LABEL}")
        if any(h.superseded.count for h in runs):
            handles.append(self._lines[0].old)
            names.append("abandoned after resume")
        if len(handles) > 1:
            self._decor.append(ax.legend(handles, names, fontsize=7, loc="upper right", framealpha=0.7))
        if waiting:
            self._decor.append(
                ax.text(0.5, 0.5, "waiting for the first step…", transform=ax.transAxes, ha="center",
                        va="center", fontsize=9, color="#666666")
            )
        self.canvas.draw()  # animated curves are skipped: this is the background
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)

    def _png(self, *, small: bool = False) -> bytes:
        from PIL import Image

        w, h = self.canvas.get_width_height()
        img = Image.frombuffer("RGBA", (w, h), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
        buf = io.BytesIO()
        if small:
            # Saved in the notebook: a 64-colour palette is ~4x smaller and looks the same for line
            # plots; it costs ~40 ms, fine once per cell.
            img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buf, format="png", optimize=True)
        else:
            # Live: level 1 gets most of zlib's size win at a fraction of the default's time.
            img.save(buf, format="png", compress_level=1)
        return buf.getvalue()


def _opt(lo: float, hi: float) -> tuple[float | None, float | None]:
    return (lo, hi) if lo <= hi else (None, None)
