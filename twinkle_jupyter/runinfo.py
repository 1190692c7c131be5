"""What a run was, for people: its settings as text, a one-line summary, and how runs differ.

Pure functions of ``twinkle.protocol.wire.TrainingRun`` objects, shared by the run browser,
``%twinkle runs/show/compare`` and the ``/twinkle`` dashboard, so all three name and format
the same settings the same way. Only the standard library: the dashboard imports this in the
Jupyter server, which never loads widgets.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RunComparison", "RunSummary", "compare_runs", "config_summary", "parse_filter", "run_settings"]

NONE = "—"
"""How a setting that is not set (or not known) is shown."""

_KEY_SETTINGS: list[tuple[str, Callable[[Any], Any]]] = [
    ("name", lambda r: r.name),
    ("tags", lambda r: r.tags),
    ("base model", lambda r: r.base_model),
    ("dataset", lambda r: r.config.dataset),
    ("LoRA rank", lambda r: r.config.lora_rank),
    ("LoRA alpha", lambda r: r.config.lora_alpha),
    ("target modules", lambda r: r.config.target_modules),
    ("optimizer", lambda r: r.config.optimizer),
    ("learning rate", lambda r: r.config.learning_rate),
    ("lr scheduler", lambda r: r.config.lr_scheduler),
    ("grad accumulation", lambda r: r.config.gradient_accumulation_steps),
    ("batch size", lambda r: r.config.batch_size),
]
"""The settings every view shows, in this order."""
# What the key settings already show of the raw records (not repeated among the other settings).
_SHOWN_LORA = {"r", "lora_alpha", "target_modules"}
_SHOWN_COMPONENT_KEYS = {("optimizer", "lr")}


def text(value: Any) -> str:
    """A setting's value as shown: ``—`` for none, numbers short, lists joined."""
    if value is None or value == [] or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def run_settings(run: Any) -> dict[str, str]:
    """Every recorded setting of ``run``, as ``{label: text}``: the key settings first, then the
    other LoRA settings (``lora.<field>``) and each component with its arguments
    (``optimizer.weight_decay``, ``template``...)."""
    out = {label: text(get(run)) for label, get in _KEY_SETTINGS}
    for key in sorted(run.lora_config or {}):
        if key not in _SHOWN_LORA:
            out[f"lora.{key}"] = text(run.lora_config[key])
    for kind in sorted(run.components or {}):
        entry = run.components[kind] or {}
        if kind not in ("optimizer", "lr_scheduler"):
            out[kind] = text(entry.get("name"))
        for arg, value in sorted((entry.get("kwargs") or {}).items()):
            if (kind, arg) not in _SHOWN_COMPONENT_KEYS:
                out[f"{kind}.{arg}"] = text(value)
    return out


def config_summary(run: Any) -> str:
    """The key settings on one short line: ``r8 α16 all-linear · AdamW lr 0.001 · LinearLR ·
    accum 2 · batch 4 · ms://org/data`` (what is not known is left out)."""
    c = run.config
    lora = " ".join(p for p in (
        f"r{c.lora_rank}" if c.lora_rank is not None else "",
        f"α{text(c.lora_alpha)}" if c.lora_alpha is not None else "",
        text(c.target_modules) if c.target_modules else "",
    ) if p)
    optimizer = " ".join(p for p in (
        c.optimizer or "", f"lr {text(c.learning_rate)}" if c.learning_rate is not None else "",
    ) if p)
    parts = [lora, optimizer, c.lr_scheduler or "",
             f"accum {c.gradient_accumulation_steps}" if c.gradient_accumulation_steps != 1 else "",
             f"batch {c.batch_size}" if c.batch_size is not None else "", c.dataset or ""]
    return " · ".join(p for p in parts if p)


def parse_filter(line: str) -> tuple[str, list[str]]:
    """A filter box's text as ``(name part, tags)``: words starting with ``#`` are tags (every
    one must match), the other words a piece of the run's name (any case)."""
    words = (line or "").split()
    tags = [w[1:] for w in words if w.startswith("#") and len(w) > 1]
    name = " ".join(w for w in words if not w.startswith("#"))
    return name, list(dict.fromkeys(tags))


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "text-align:left;padding:2px 12px 2px 0;border-bottom:1px solid #ccc"
    td = "text-align:left;padding:1px 12px 1px 0;vertical-align:top"
    head = "".join(f'<th style="{th}">{html.escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td style="{td}">{html.escape(c)}</td>' for c in row) + "</tr>" for row in rows
    )
    return f'<table style="border-collapse:collapse;font-size:12px;margin:2px 0"><thead><tr>{head}</tr></thead>' \
           f"<tbody>{body}</tbody></table>"


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in (list(headers), *rows)]
    return "\n".join(lines)


class RunSummary:
    """One run's recorded settings (what ``%twinkle show RUN`` displays)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.settings = run_settings(run)

    @property
    def rows(self) -> list[list[str]]:
        return [[label, value] for label, value in self.settings.items()]

    def __repr__(self) -> str:
        return f"{self.run.training_run_id}\n" + _text_table(["setting", "value"], self.rows)

    def _repr_html_(self) -> str:
        title = f"<b>{html.escape(self.run.training_run_id)}</b>"
        return title + _html_table(["setting", "value"], self.rows)


class RunComparison:
    """The settings in which runs differ: one row per differing setting, one column per run
    (what ``%twinkle compare`` and the run browser's Compare show)."""

    def __init__(self, runs: Sequence[Any]) -> None:
        self.run_ids = [r.training_run_id for r in runs]
        settings = [run_settings(r) for r in runs]
        labels = list(dict.fromkeys(label for s in settings for label in s))
        values = {label: [s.get(label, NONE) for s in settings] for label in labels}
        self.differences: dict[str, list[str]] = {
            label: vals for label, vals in values.items() if len(set(vals)) > 1
        }
        """``{setting: [value of each run]}`` for the settings that are not the same in all runs."""

    @property
    def rows(self) -> list[list[str]]:
        return [[label, *vals] for label, vals in self.differences.items()]

    def message(self) -> str | None:
        """What to say instead of a table, when there is nothing to compare."""
        if len(self.run_ids) < 2:
            return "compare needs two runs or more"
        if not self.differences:
            return f"{', '.join(self.run_ids)}: the same settings"
        return None

    def as_json(self) -> dict[str, Any]:
        return {"runs": self.run_ids, "rows": self.rows, "message": self.message()}

    def __repr__(self) -> str:
        return self.message() or _text_table(["setting", *self.run_ids], self.rows)

    def _repr_html_(self) -> str:
        said = self.message()
        if said is not None:
            return f'<div style="font-size:12px">{html.escape(said)}</div>'
        return _html_table(["setting", *self.run_ids], self.rows)


def compare_runs(client: Any, run_ids: Sequence[str]) -> RunComparison:
    """Fetch the runs (each must be yours: ``NotFoundError`` otherwise) and compare them."""
    return RunComparison([client.get_training_run(rid) for rid in dict.fromkeys(run_ids)])
