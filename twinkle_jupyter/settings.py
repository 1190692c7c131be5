"""The notebook layer's settings: each default, help text and bound, once.

``TwinkleMagics`` makes its ``%config TwinkleMagics.<name>`` traits from :data:`SETTINGS`;
``TwinkleSession`` uses :data:`DEFAULTS` when no ``TwinkleMagics`` is around; ``LossPlot``,
``RunHistory``, ``EMA`` and the renderer take their defaults from :data:`DEFAULTS` and check
values with :func:`check`. Pure Python (no IPython, traitlets or widgets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from typing import Any

__all__ = ["DEFAULTS", "MIN_POINTS", "READ_RETRY_S", "SETTINGS", "X_AXES", "Defaults", "Setting", "check"]

X_AXES = ("step", "time")
"""What a plot's x axis can show: optimizer steps, or time since each run's first step."""

READ_RETRY_S = 5.0
"""How long a live plot's background reads retry a server that stopped answering (training
calls keep the client's own, longer ``retry_timeout``); the plot then shows the error and
polls again with its backoff."""

MIN_POINTS = 16
"""The fewest points a bounded series (and so ``max_points``) may keep: the first, the last,
the extremes of the bucket in progress and a few buckets."""


def _positive(name: str, value: Any) -> float:
    v = float(value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _weight(name: str, value: Any) -> float:
    v = float(value)
    if not 0 <= v < 1:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def _points(name: str, value: Any) -> int:
    v = int(value)
    if v < MIN_POINTS:
        raise ValueError(f"{name} must be >= {MIN_POINTS}, got {v}")
    return v


def _count(name: str, value: Any) -> int:
    v = int(value)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def _x_axis(name: str, value: Any) -> str:
    if value not in X_AXES:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, X_AXES))}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class Setting:
    """One setting: its name, default, help text, allowed values (if a choice) and its check."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    validate: Callable[[str, Any], Any] | None = None

    def check(self, value: Any) -> Any:
        """``value`` as the setting holds it; ``ValueError`` naming the bound if it is outside."""
        return value if self.validate is None else self.validate(self.name, value)


_ALL = (
    Setting("poll_interval", 0.5, "Seconds between metric fetches of a live plot.", validate=_positive),
    Setting("max_redraw_hz", 2.0, "At most this many plot updates per second.", validate=_positive),
    Setting("max_points", 1000, "Steps kept per run (older ones downsampled; first/last/extremes kept).",
            validate=_points),
    Setting("smoothing", 0.6, "EMA weight of the smoothed loss, in [0, 1).", validate=_weight),
    Setting("x_axis", "step", "x axis of new plots: 'step' or 'time'.", choices=X_AXES, validate=_x_axis),
    Setting("log_scale", False, "Log scale for the loss axis of new plots."),
    Setting("auto_plot", True, "Open a live plot when a twinkle model trains in a cell."),
    Setting("stop_between_calls", True, "Ctrl-C during training stops at the next model call (a second Ctrl-C at once)."),
    Setting("show_controls", True, "Show x axis / log scale / smoothing controls above plots."),
    Setting("plot_width", 720, "Plot width in pixels."),
    Setting("plot_height", 420, "Plot height in pixels."),
    Setting("page_size", 20, "Rows per page of the run browser.", validate=_count),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _ALL}
"""Every setting by name, in the order ``%config TwinkleMagics`` lists them."""


def check(name: str, value: Any) -> Any:
    """``value`` checked against setting ``name``'s bound (``ValueError`` if outside it)."""
    return SETTINGS[name].check(value)


Defaults = make_dataclass(
    "Defaults", [(s.name, type(s.default), s.default) for s in _ALL], frozen=True,
    namespace={"__doc__": "The settings' values when nobody configured them (what ``TwinkleMagics`` starts from)."},
)

DEFAULTS: Any = Defaults()
"""The defaults, as attributes: ``DEFAULTS.max_points``."""
