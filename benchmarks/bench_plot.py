"""How long a live-plot redraw and the extension's per-step hook take (not a test).

    .venv/bin/python benchmarks/bench_plot.py [--repeat N]

Redraw: a run history of 1k, 10k and 100k steps is fed to a ``RunHistory`` (bounded to
``max_points``), then the figure is drawn to PNG bytes the way the live plot does it:

- ``blit``: the usual redraw (axes and ticks cached, only the curves drawn); goal <= 50 ms;
- ``full``: a redraw after the axis limits moved (everything drawn);
- ``final``: the picture saved in the notebook (tight limits, palette PNG), once per cell;
- ``ingest``: folding the whole history in (one full fetch after a resume or a restart).

Hook: the cost per training step in the kernel of what the extension adds, with the
extension loaded in an IPython shell: one ``forward_backward`` and one ``step`` event through
``twinkle_client.events`` (emit included); goal <= 0.5 ms.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="twinkle-bench-mpl-"))


def _points(n: int) -> list[dict]:
    rng = random.Random(n)
    t0 = 1_700_000_000.0
    return [
        {
            "step": s, "micro_step": s, "loss": 2.5 * math.exp(-s / (n / 3)) + 0.4 + rng.random() * 0.2,
            "num_tokens": 512, "grad_norm": 1 + rng.random(), "lr": 1e-4 * (1 - s / (n + 1)),
            "completed": True, "time": t0 + 0.25 * s, "superseded": False,
        }
        for s in range(1, n + 1)
    ]


def _ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:7.1f} ms (min {min(samples) * 1e3:.1f})"


def bench_redraw(repeat: int) -> None:
    from twinkle_jupyter.history import RunHistory
    from twinkle_jupyter.render import PlotRenderer, RenderOptions

    print("redraw (720x420 px, max_points=1000)")
    for n in (1_000, 10_000, 100_000):
        pts = {"revision": 0, "points": _points(n), "total_steps": n}
        t = time.perf_counter()
        hist = RunHistory("run-bench", max_points=1000)
        hist.ingest(pts)
        ingest = time.perf_counter() - t
        renderer = PlotRenderer()
        renderer.render([hist])
        blit, full, final = [], [], []
        for _ in range(repeat):
            t = time.perf_counter()
            renderer.render([hist])
            blit.append(time.perf_counter() - t)
            renderer._layout_key = None  # as after an axis-limit change
            t = time.perf_counter()
            renderer.render([hist])
            full.append(time.perf_counter() - t)
        for _ in range(max(1, repeat // 3)):
            t = time.perf_counter()
            png = renderer.render([hist], RenderOptions(tight=True), small=True)
            final.append(time.perf_counter() - t)
        print(
            f"  {n:>7,} steps ({len(hist.records()):4d} kept): blit {_ms(blit)} | full {_ms(full)} | "
            f"final {_ms(final)}, {len(png) / 1024:.0f} KiB | ingest {ingest * 1e3:.0f} ms"
        )


def bench_hook(n: int) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    from twinkle_client.events import TrainingEvent, emit
    from twinkle_jupyter.session import get_session

    class Model:
        training_run_id = "run-bench"

    shell = InteractiveShell.instance()
    model = Model()
    fb = TrainingEvent(kind="forward_backward", model=model, run_id="run-bench", method="forward_backward")
    step = TrainingEvent(kind="step", model=model, run_id="run-bench", method="step")

    def per_step() -> float:
        t = time.perf_counter()
        for _ in range(n):
            emit(fb)
            emit(step)
        return (time.perf_counter() - t) / n

    base = min(per_step() for _ in range(3))
    shell.run_line_magic("load_ext", "twinkle_jupyter")
    session = get_session(shell)
    # Steady state of a training cell: the run's plot is open (its first call opened it).
    session._in_cell = True
    session._cell_runs.add("run-bench")
    loaded = min(per_step() for _ in range(3))
    session._in_cell = False
    t = time.perf_counter()
    for _ in range(200):
        session._pre_run_cell(None)
        session._post_run_cell(None)
    cell = (time.perf_counter() - t) / 200
    shell.run_line_magic("unload_ext", "twinkle_jupyter")
    print("hooks")
    print(f"  per training step (forward_backward + step events): {(loaded - base) * 1e3:.4f} ms "
          f"added by the extension ({loaded * 1e3:.4f} ms with, {base * 1e3:.4f} ms without)")
    print(f"  per cell (pre_run_cell + post_run_cell, no training): {cell * 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="redraws per size")
    parser.add_argument("--steps", type=int, default=50_000, help="events for the hook measurement")
    args = parser.parse_args()
    bench_redraw(args.repeat)
    bench_hook(args.steps)


if __name__ == "__main__":
    main()
