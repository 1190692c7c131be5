"""The seed's training loop through a loopback proxy that cuts connections: nothing changes.

    .venv/bin/python -m stress.drop_proxy [--rows 350] [--drop 0.15] [--runs 10] [--keep DIR] [--smoke]

First the loop of tests/data/seed_example.py runs straight against the server (the built-in
model and dataset, ``--rows`` samples, batch 8, gradient accumulation 2), then ``--runs``
times through ``stress.common.LoopbackProxy``, which cuts the connection of a ``--drop``
share of the requests (seeded, one seed per run), at one of three points: before the
request reaches the server, after it reached it but before any answer, or after the server
answered. The client retries with the same bytes; the server answers calls it already ran
from its record.

Checked for each proxied run against the direct one: the loss of every micro-batch, the
optimizer updates the client saw (``step()`` returning True), the adapter's ``cur_step``, and
on the server the run's metric history (one point per micro-batch, no gap) and its checkpoint.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import (  # noqa: E402
    LoopbackProxy,
    Report,
    add_user,
    history_problems,
    max_abs_diff,
    run_points,
    seed_loop,
    start_server,
    work_dir,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="samples (default 350, the whole dataset; smoke 48)")
    p.add_argument("--drop", type=float, default=None, help="share of requests cut (default 0.15; smoke 0.3)")
    p.add_argument("--runs", type=int, default=None, help="proxied runs (default 10; smoke 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rows = args.rows if args.rows is not None else (48 if args.smoke else 350)
    drop = args.drop if args.drop is not None else (0.3 if args.smoke else 0.15)
    n_runs = args.runs if args.runs is not None else (1 if args.smoke else 10)
    report = Report("drop_proxy", args.smoke)
    work = work_dir("drop", args.keep)
    data = work / "data"
    server = start_server(data)
    key = add_user(data, "flaky")
    report.line(f"{rows} samples, batch 8, accumulation 2; {n_runs} proxied run(s) cutting {drop:.0%} of requests")

    t0 = time.monotonic()
    direct = seed_loop(server.url, key, rows=rows)
    direct_s = time.monotonic() - t0
    rows_out = [["direct", "-", "-", "-", "-", len(direct["losses"]), direct["updates"], direct["cur_step"],
                 "-", "-", f"{direct_s:.0f}"]]
    failures: list[str] = []
    totals = {"requests": 0, "dropped": 0, "before": 0, "mid": 0, "after": 0}
    worst = 0.0
    for k in range(n_runs):
        proxy = LoopbackProxy(server.url, drop_rate=drop, seed=args.seed + k)
        url = proxy.start()
        t0 = time.monotonic()
        faulthandler.dump_traceback_later(1800, exit=False)  # a run that hangs prints every thread's stack
        try:
            result = seed_loop(url, key, rows=rows)
        except Exception as exc:
            failures.append(f"proxied run {k}: {type(exc).__name__}: {exc}")
            proxy.stop()
            continue
        finally:
            faulthandler.cancel_dump_traceback_later()
            elapsed = time.monotonic() - t0
        proxy.stop()
        c = proxy.counts
        for name in ("requests", "before", "mid", "after"):
            totals[name] += c[name]
        totals["dropped"] += proxy.dropped
        diff = max_abs_diff(result["losses"], direct["losses"])
        worst = max(worst, diff)
        points = run_points(server.url, key, result["run_id"])
        problems, last = history_problems(points, 2)
        live = [pt for pt in points if not pt.superseded]
        if len(live) != len(result["losses"]):
            problems.append(f"{len(live)} metric points for {len(result['losses'])} micro-batches")
        server_losses = [pt.loss for pt in sorted(live, key=lambda pt: pt.micro_step)]
        if max_abs_diff(server_losses, result["losses"]) > 1e-6:
            problems.append("the server's recorded losses differ from the client's")
        if diff > 1e-6:
            failures.append(f"proxied run {k}: losses differ from the direct run by up to {diff:.3g}")
        if (result["updates"], result["cur_step"]) != (direct["updates"], direct["cur_step"]):
            failures.append(f"proxied run {k}: {result['updates']} updates / cur_step {result['cur_step']}, "
                            f"direct {direct['updates']} / {direct['cur_step']}")
        if last != direct["cur_step"]:
            problems.append(f"last completed step in the metrics {last}, expected {direct['cur_step']}")
        failures += [f"proxied run {k}: metrics: {x}" for x in problems]
        rows_out.append([f"proxied {k}", c["requests"], proxy.dropped,
                         f"{proxy.dropped / max(1, c['requests']):.0%}",
                         f"{c['before']}/{c['mid']}/{c['after']}", len(result["losses"]), result["updates"],
                         result["cur_step"], f"{diff:.3g}", len(problems), f"{elapsed:.0f}"])
    server.stop()
    report.table(["run", "requests", "cut", "cut share", "before/mid/after", "micro-batches", "updates",
                  "cur_step", "max |loss diff|", "metric problems", "s"], rows_out)
    share = totals["dropped"] / max(1, totals["requests"])
    report.line(f"cut {totals['dropped']} of {totals['requests']} requests ({share:.1%}): "
                f"{totals['before']} before the server, {totals['mid']} after it got the request, "
                f"{totals['after']} after it answered")
    for line in failures:
        report.line(f"FAILURE: {line}")
    report.finish(
        rows=rows, proxied_runs=n_runs, drop_rate=drop, requests=totals["requests"], cut=totals["dropped"],
        cut_share=round(share, 3), cut_before=totals["before"], cut_mid=totals["mid"], cut_after=totals["after"],
        micro_batches=len(direct["losses"]), updates=direct["updates"], max_abs_loss_diff=worst,
        failures=failures, mismatched_runs=sum(1 for f in failures if "proxied run" in f),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
