"""What a loss plot shows besides the curves: the progress line, the summary, the points as data.

Pure functions of :class:`~twinkle_jupyter.history.RunHistory` objects (the caller holds
their lock): the HTML progress line under the picture (step, progress bar, it/s, ETA,
loss, duration, status per run), the one-line summary a finished plot leaves as its plain
text, the HTML around the picture, and the downsampled curves as JSON-able data (what the
widget's ``points`` trait carries, so a saved notebook holds the final curve as numbers).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .history import RunHistory, format_duration
from .render import COLORS

__all__ = [
    "PLACEHOLDER_HTML",
    "STATUS_MARKS",
    "live_html",
    "points_payload",
    "progress_html",
    "static_html",
    "summary_line",
]

STATUS_MARKS = {"live": "●", "finished": "✓", "interrupted": "■", "error": "✗", "stopped": "■"}

PLACEHOLDER_HTML = '<div style="font:12px monospace;color:#666;padding:4px">twinkle: waiting for metrics…</div>'
"""What a plot shows before its first picture."""


def _r(value: float | None) -> float | None:
    """6 significant digits, None for NaN: small JSON, valid JSON."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def points_payload(histories: Iterable[RunHistory]) -> list[dict[str, Any]]:
    """Per run: the kept steps with loss, smoothed loss, lr, grad norm and time, the eval loss
    per step, the superseded branch, the resume steps and the total."""
    out = []
    for hist in histories:
        recs = hist.records()
        old = hist.superseded.items()
        evals = hist.eval_records()
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
                "eval": {"step": [e.step for e in evals], "loss": [_r(e.loss) for e in evals]},
                "superseded": {"step": [r.step for r in old], "loss": [_r(r.loss) for r in old]},
                "resumed_at": list(hist.resumed_at),
                "total_steps": hist.total_steps,
            }
        )
    return out


def progress_html(
    histories: Sequence[RunHistory],
    *,
    status: str,
    smoothing: float,
    warnings: Iterable[str] = (),
    message: str | None = None,
) -> str:
    """The progress line: one row per run, then a row per warning (a failed fetch or draw) and
    the message the plot was finalized with."""
    rows = [_progress_row(hist, COLORS[i % len(COLORS)], status, smoothing) for i, hist in enumerate(histories)]
    rows += [f'<div style="color:#b35c00">⚠ {html.escape(w)}</div>' for w in warnings]
    if message:
        rows.append(f'<div style="color:#a00">{html.escape(message)}</div>')
    return '<div style="font:12px/1.5 monospace;color:#333;padding:2px 4px">' + "".join(rows) + "</div>"


def _progress_row(hist: RunHistory, color: str, status: str, smoothing: float) -> str:
    p = hist.progress()
    mark = STATUS_MARKS.get(status, "●")
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
    if p["rate"] is not None and status == "live":
        rate = p["rate"]
        parts.append(f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/it")
        if p["eta"] is not None and total and p["step"] < total:
            parts.append(f"ETA {format_duration(p['eta'])}")
    if p["loss"] is not None:
        loss = f"loss {p['loss']:.4f}"
        if p["smoothed"] is not None and math.isfinite(p["smoothed"]) and smoothing > 0:
            loss += f" (smoothed {p['smoothed']:.4f})"
        parts.append(loss)
    if p["eval_loss"] is not None:
        parts.append(f"eval loss {p['eval_loss']:.4f} (step {p['eval_step']})")
    if p["elapsed"] is not None:
        parts.append(format_duration(p["elapsed"]))
    if status != "live":
        parts.append(status)
    return "<div>" + " · ".join(parts) + "</div>"


def summary_line(histories: Iterable[RunHistory], *, status: str, message: str | None = None) -> str:
    """One line for the whole plot: per run steps, first → last loss (min), the latest eval loss,
    duration, resumes; then the status and the message."""
    parts = []
    for hist in histories:
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
        last_eval = hist.last_eval
        if last_eval is not None and last_eval.loss is not None:
            text += f", eval loss {last_eval.loss:.4f} at step {last_eval.step}"
        elapsed = hist.progress()["elapsed"]
        if elapsed:
            text += f", {format_duration(elapsed)}"
        if hist.superseded.count:
            text += f", resumed at step {', '.join(map(str, hist.resumed_at))}"
        parts.append(text)
    line = "twinkle " + "; ".join(parts) if parts else "twinkle: no runs"
    line += f" — {status}"
    if message:
        line += f": {message}"
    return line


def live_html(png: bytes, progress: str) -> str:
    """The live widget's content: the picture with the progress line under it."""
    b64 = base64.b64encode(png).decode("ascii")
    img = f'<img src="data:image/png;base64,{b64}" alt="loss curve" style="max-width:100%"/>'
    return f"<div>{img}{progress}</div>"


def static_html(png_b64: str, summary: str, progress: str) -> str:
    """A finalized plot's HTML: the picture (the summary as its alt text) and the progress line."""
    return (
        f'<div class="twinkle-loss-plot-static"><img src="data:image/png;base64,{png_b64}" '
        f'alt="{html.escape(summary, quote=True)}" style="max-width:100%"/>'
        f"{progress}</div>"
    )
