"""A network outage in the middle of the seed's training loop: does the loop carry on unchanged?

    .venv/bin/python -m stress.outage [--outage-s 180] [--rows 96] [--keep DIR] [--smoke]

The seed's loop (tests/data/seed_example.py: built-in model and dataset, batch 8,
gradient accumulation 2) runs through ``stress.common.LoopbackProxy``. After the loop's
``--at``-th iteration has been queued the proxy goes dark: it cuts its open connections and
resets every new one at once, so no request gets through, as when a laptop sleeps or a VPN
drops. After ``--outage-s`` seconds requests pass again.

Scenarios (each a fresh model on the same server; the reference is the loop straight
against the server):

- ``default client``: ``init_twinkle_client(url, key)`` as the seed calls it (retry budget
  ``retry_timeout``, 600 s by default);
- ``retry_timeout=T``: the same, with ``retry_timeout`` above the outage (``--long-retry``).

A loop that gets an error does what a careful notebook user would: it waits until the
server answers again and goes on with the next batch of the same dataloader (at most 3
times). Reported for each scenario: whether the loop finished without an error, the error
(class, message, seconds after the outage began), the loss sequence against the reference
(micro-batches missing or different), the optimizer updates and ``cur_step``, and the
server's metric history (one point per micro-batch the client believes ran, no gap). A call
that neither ran on the server nor raised an error would be "dropped silently": counted
apart, it must stay 0.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import threading
import time
from pathlib import Path
from typing import Any

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
    seed_setup,
    start_server,
    wait_for,
    work_dir,
)


def loop_through_outage(url: str, key: str, proxy: LoopbackProxy, *, rows: int, at: int, outage_s: float,
                        retry_timeout: float | None) -> dict[str, Any]:
    """The seed's loop; the outage starts once iteration ``at`` is queued. Errors are caught per
    iteration, then the loop waits for the server and goes on with the next batch."""

    from twinkle.errors import TwinkleError
    from twinkle_client import init_twinkle_client

    kwargs = {} if retry_timeout is None else {"retry_timeout": retry_timeout}
    client = init_twinkle_client(base_url=url, api_key=key, **kwargs)
    dataloader, model = seed_setup("twinkle_client", rows)
    model.get_train_state()

    state: dict[str, Any] = {"began": None, "ended": None}
    go = threading.Event()

    def outage() -> None:
        if not go.wait(3600):
            return
        proxy.outage_begin()
        state["began"] = time.monotonic()
        time.sleep(outage_s)  # the outage's length is the experiment's parameter, not a kill timing
        proxy.outage_end()
        state["ended"] = time.monotonic()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    outputs: list[tuple[int, Any]] = []
    steps: list[Any] = []
    errors: list[dict[str, Any]] = []
    i = -1
    finished = False
    for _attempt in range(4):
        try:
            for batch in dataloader:
                i += 1
                output = model.forward_backward(inputs=batch)
                model.clip_grad_norm(1.0)
                steps.append(model.step())
                model.zero_grad()
                model.lr_step()
                outputs.append((i, output))
                if i == at:
                    go.set()
            finished = True
            break
        except TwinkleError as exc:
            began = state["began"]
            errors.append({"type": type(exc).__name__, "message": str(exc)[:300], "iteration": i,
                           "after_outage_began_s": round(time.monotonic() - began, 1) if began else None})
            # wait for the server (bounded), then go on with the next batch
            wait_for(lambda: state["ended"] is not None and client.health_check(), outage_s + 120,
                     "the end of the outage", pause=0.5)
    thread.join(outage_s + 60)
    losses: dict[int, float] = {}
    failed_calls: list[str] = []
    for index, output in outputs:
        try:
            losses[index] = float(output)
        except TwinkleError as exc:
            failed_calls.append(f"forward_backward of iteration {index}: {type(exc).__name__}")
    updates = 0
    for s in steps:
        try:
            updates += bool(s)
        except TwinkleError:
            pass
    after: dict[str, Any] = {}
    try:
        after["cur_step"] = model.get_train_state()["cur_step"]
        path = model.save(name="after-outage", save_optimizer=True)
        after["checkpoint"] = str(path)
    except TwinkleError as exc:
        after["error"] = f"{type(exc).__name__}: {exc}"[:300]
    run_id = model.training_run_id
    try:
        model.close()
    except TwinkleError:
        pass
    return {"finished": finished, "errors": errors, "losses": losses, "iterations": i + 1,
            "failed_calls": failed_calls, "updates": updates, "run_id": run_id, **after,
            "outage_s": round((state["ended"] or 0) - (state["began"] or 0), 1) if state["began"] else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outage-s", type=float, default=None, help="default 180 (smoke: 4)")
    p.add_argument("--rows", type=int, default=None, help="samples (default 96; smoke 48)")
    p.add_argument("--at", type=int, default=2, help="the iteration after which the outage begins")
    p.add_argument("--long-retry", type=float, default=None,
                   help="the retry_timeout of the second scenario (default: the outage + 60 s)")
    p.add_argument("--short-retry", type=float, default=None,
                   help="smoke only: also run with this retry_timeout, below the outage (default 1.5)")
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    outage_s = args.outage_s if args.outage_s is not None else (4.0 if args.smoke else 180.0)
    rows = args.rows if args.rows is not None else (48 if args.smoke else 96)
    long_retry = args.long_retry if args.long_retry is not None else outage_s + 60
    report = Report("outage", args.smoke)
    work = work_dir("outage", args.keep)
    data = work / "data"
    server = start_server(data)
    key = add_user(data, "sleepy-laptop")
    import inspect

    from twinkle_client import TwinkleClient

    default_budget = float(inspect.signature(TwinkleClient).parameters["retry_timeout"].default)
    report.line(f"{rows} samples; outage of {outage_s:.0f} s after iteration {args.at}; the client's default "
                f"retry budget is {default_budget:.0f} s")
    reference = seed_loop(server.url, key, rows=rows)
    expected = reference["losses"]
    scenarios: list[tuple[str, float | None]] = [("default client", None), (f"retry_timeout={long_retry:.0f}", long_retry)]
    if args.smoke:
        short = args.short_retry if args.short_retry is not None else 1.5
        scenarios.append((f"retry_timeout={short:g} (below the outage)", short))
    rows_out = []
    figures: dict[str, Any] = {}
    failures: list[str] = []
    gaps: list[str] = []
    silent_total = 0
    for label, retry in scenarios:
        proxy = LoopbackProxy(server.url)
        url = proxy.start()
        # a scenario that hangs prints every thread's stack (the run goes on)
        faulthandler.dump_traceback_later(outage_s + 900, exit=False)
        try:
            result = loop_through_outage(url, key, proxy, rows=rows, at=args.at, outage_s=outage_s,
                                         retry_timeout=retry)
        finally:
            faulthandler.cancel_dump_traceback_later()
            proxy.stop()
        budget = retry if retry is not None else default_budget
        got = result["losses"]
        missing = [i for i in range(len(expected)) if i not in got]
        # the loss sequence as the user sees it: the batches that trained, in order
        seen = [got[i] for i in sorted(got)]
        same_positions = all(abs(got[i] - expected[i]) <= 1e-6 for i in got if i < len(expected))
        identical = not missing and len(got) == len(expected) and max_abs_diff(seen, expected) <= 1e-6
        points = run_points(server.url, key, result["run_id"])
        live = [pt for pt in points if not pt.superseded]
        problems, last = history_problems(points, 2)
        ran = len(live)
        # The server's micro-batches against the ones the client saw train, in order: one the
        # client counts as trained but the server never ran went missing silently; one the
        # server ran while the client was told it failed ran unreported.
        server_losses = [pt.loss for pt in sorted(live, key=lambda pt: pt.micro_step)]
        matched = j = 0
        for x in server_losses:
            if j < len(seen) and abs(seen[j] - x) <= 1e-6:
                matched += 1
                j += 1
        silent = len(seen) - matched
        unreported = len(server_losses) - matched
        silent_total += silent
        err = result["errors"][0] if result["errors"] else None
        rows_out.append([label, f"{budget:g}", result["outage_s"], "yes" if not result["errors"] else "no",
                         f"{err['type']} after {err['after_outage_began_s']} s" if err else "-",
                         len(result["errors"]), f"{len(got)}/{len(expected)}", len(missing),
                         "yes" if identical else ("same where trained" if same_positions else "no"),
                         result["updates"], result.get("cur_step", "-"), reference["cur_step"], ran, silent,
                         unreported, len(problems)])
        key_ = "default" if retry is None else ("long" if retry == long_retry else "short")
        figures[f"{key_}_loop_uninterrupted"] = not result["errors"]
        figures[f"{key_}_identical_losses"] = identical
        figures[f"{key_}_missing_micro_batches"] = len(missing)
        figures[f"{key_}_errors"] = result["errors"]
        figures[f"{key_}_silently_dropped"] = silent
        figures[f"{key_}_ran_but_reported_failed"] = unreported
        figures[f"{key_}_metric_problems"] = len(problems)
        if problems:
            failures += [f"{label}: metrics: {x}" for x in problems]
        if silent:
            failures.append(f"{label}: {silent} micro-batch(es) the client saw train are not on the server")
        if outage_s < budget and not identical:
            failures.append(f"{label}: an outage within the retry budget changed the losses or raised "
                            f"{result['errors'][:1]}")
        if outage_s >= budget and result["errors"]:
            gaps.append(
                f"{label}: an outage of {outage_s:g} s (retry budget {budget:g} s) raised "
                f"{err['type']} after {err['after_outage_began_s']} s at iteration {err['iteration']}: "
                f"\"{err['message']}\"; the loop went on after the outage with {len(missing)} micro-batch(es) "
                f"never trained ({missing[:5]}), {result['updates']} updates instead of {reference['updates']}, "
                f"cur_step {result.get('cur_step')} instead of {reference['cur_step']}; {unreported} micro-batch(es) ran "
                f"on the server although the client reported them failed; failed lazy values: "
                f"{result['failed_calls'][:3]}")
    server.stop()
    report.table(["scenario", "retry budget s", "outage s", "loop uninterrupted", "first error", "errors",
                  "micro-batches trained", "missing", "losses identical", "updates", "cur_step",
                  "cur_step reference", "points on server", "silently dropped", "ran, reported failed", "metric problems"], rows_out)
    for line in gaps:
        report.line(f"GAP: {line}")
    for line in failures:
        report.line(f"FAILURE: {line}")
    report.finish(outage_s=outage_s, rows=rows, default_retry_budget_s=default_budget, long_retry_s=long_retry,
                  reference_micro_batches=len(expected), silently_dropped=silent_total, gaps=gaps,
                  failures=failures, **figures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
