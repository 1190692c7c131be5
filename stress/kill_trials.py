"""SIGKILL the server during training and during checkpoint saves, restart it, check what survived.

    .venv/bin/python -m stress.kill_trials [--trials 20] [--seed 0] [--keep DIR] [--smoke]

One server data directory and one training run for every trial. A trial starts a trainer
(``stress.trainer``) that resumes the run's newest checkpoint and saves every 2 optimizer
steps, then kills the server (SIGKILL) on an event, never after a fixed sleep:

- ``train``: after N micro-batches have come back to the trainer (N drawn from 1..6);
- ``save``: when the save's hidden ``.tmp-`` folder appears in the run's weights folder
  (inotify), at once or after a random part of a typical save's duration;
- ``replace``: a save that replaces checkpoint ``latest``, when the old folder is renamed
  aside (``.old-``), the moment between the two renames of an atomic replace.

Then the server is restarted on the same data directory and the trial checks: no partial
checkpoint is listed (each listed folder is complete on disk), no hidden leftover remains,
every listed checkpoint loads with its optimizer state (``load(..., load_optimizer=True)``,
what ``resume_from_checkpoint`` does), the run's metric history has no gap (every optimizer
step up to the last completed one, each micro-batch once) and no checkpoint is ahead of it.

At the end every listed checkpoint is resumed (``resume_from_checkpoint``), and every loss
the trainers saw is compared with an uninterrupted run of the same length.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import (  # noqa: E402
    DirWatch,
    Report,
    Server,
    Trainer,
    add_user,
    history_problems,
    start_server,
    wait_for,
    work_dir,
)

ACCUM = 2
SAVE_EVERY = 2  # optimizer steps
TRAINER_TIMEOUT = 600.0


def trainer_args(server: Server, key: str, run_id: str | None, names: str) -> list[str]:
    args = ["--url", server.url, "--key", key, "--accum", str(ACCUM), "--save-every", str(SAVE_EVERY),
            "--names", names, "--retry-timeout", "5"]
    return args + (["--resume-run", run_id] if run_id else [])


class Checker:
    """The checks after a restart, from a client in this process."""

    def __init__(self, server: Server, key: str) -> None:
        from twinkle_client import init_twinkle_client

        self.server = server
        self.client = init_twinkle_client(base_url=server.url, api_key=key)

    def checkpoints(self, run_id: str) -> list[Any]:
        return list(self.client.list_checkpoints(run_id))

    def new_model(self) -> Any:
        from peft import LoraConfig

        from twinkle_client.model import MultiLoraTransformersModel

        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4),
                                   gradient_accumulation_steps=ACCUM)
        model.set_optimizer("AdamW", lr=1e-3)
        model.set_lr_scheduler("LinearLR")
        return model

    def load_all(self, ckpts: list[Any], *, resume: bool = False) -> list[str]:
        """Load (or resume) every checkpoint into one model; the failures, one line each."""
        from twinkle.errors import TwinkleError

        failures = []
        model = self.new_model()
        try:
            for c in ckpts:
                try:
                    if resume:
                        progress = model.resume_from_checkpoint(c.twinkle_path)
                        if progress["cur_step"] != c.step:
                            failures.append(f"{c.twinkle_path}: resumed at step {progress['cur_step']}, listed {c.step}")
                    else:
                        model.load(c.twinkle_path, load_optimizer=True)
                        model.get_train_state()
                except TwinkleError as exc:
                    failures.append(f"{c.twinkle_path}: {type(exc).__name__}: {exc}")
        finally:
            model.close()
        return failures

    def metrics(self, run_id: str) -> tuple[list[str], int]:
        return history_problems(list(self.client.get_metrics(run_id).points), ACCUM)


def disk_problems(data_dir: Path, run_id: str, ckpts: list[Any]) -> tuple[list[str], list[str], list[str]]:
    """(listed checkpoints whose folder is not complete, hidden leftovers in the weights folder,
    listed checkpoints whose record disagrees with the folder's own metadata: step, samples)."""
    from twinkle_server.checkpoints import is_complete

    from twinkle.checkpoint import CheckpointMeta
    from twinkle.errors import CheckpointError
    from twinkle.paths import is_leftover

    weights = data_dir / "runs" / run_id / "weights"
    partial = [c.checkpoint_id for c in ckpts if not is_complete(weights / c.checkpoint_id)]
    leftovers = sorted(n for n in os.listdir(weights) if is_leftover(n)) if weights.is_dir() else []
    stale = []
    for c in ckpts:
        try:
            meta = CheckpointMeta.read(weights / c.checkpoint_id)
        except CheckpointError:
            continue  # counted as partial
        if (meta.cur_step, meta.consumed_train_samples) != (c.step, c.consumed_train_samples):
            stale.append(f"{c.checkpoint_id}: listed at step {c.step} ({c.consumed_train_samples} samples), "
                         f"the folder holds step {meta.cur_step} ({meta.consumed_train_samples} samples)")
    return partial, leftovers, stale


def leftovers_now(weights: Path) -> list[str]:
    from twinkle.paths import is_leftover

    try:
        return sorted(n for n in os.listdir(weights) if is_leftover(n))
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="default 20 (smoke: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true", help="2 trials, one of each kind; no reference run")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help="compare every loss with an uninterrupted run (default: yes, not with --smoke)")
    args = p.parse_args(argv)
    reference_run = args.reference if args.reference is not None else not args.smoke
    trials = args.trials if args.trials is not None else (2 if args.smoke else 20)
    report = Report("kill_trials", args.smoke)
    rng = random.Random(args.seed)
    work = work_dir("kill", args.keep)
    data = work / "data"
    report.line(f"work folder: {work}; {trials} trials")

    server = start_server(data)
    key = add_user(data, "kill-trials")
    spare = Trainer(None, work / "trainer-0.log")
    run_id: str | None = None
    runs: list[str] = []
    seen_losses: list[tuple[str, int, float]] = []  # (run, micro-batch index, loss)
    save_durations: list[float] = []
    restart_s: list[float] = []
    rows: list[list[Any]] = []
    totals = {"partial_listed": 0, "leftovers_after_restart": 0, "checkpoints_loaded": 0, "load_failures": 0,
              "metric_problems": 0, "checkpoints_ahead_of_metrics": 0, "kills_mid_save": 0, "trial_errors": 0,
              "stale_records": 0}
    gap_trials = 0
    distinct_gaps: set[str] = set()
    reported_gaps: set[str] = set()
    failures: list[str] = []

    for trial in range(trials):
        kind = ("train", "save", "replace")[trial % 3] if trial else "train"
        if args.smoke:
            kind = ("train", "save")[trial % 2]
        names = "latest" if kind == "replace" else "step"
        trainer = spare
        trainer.go(trainer_args(server, key, run_id, names))
        spare = Trainer(None, work / f"trainer-{trial + 1}.log")
        trigger = "?"
        leftovers_at_kill: list[str] = []
        try:
            ready = trainer.wait_event(lambda e: e["ev"] == "ready", TRAINER_TIMEOUT)
            run = trainer.events[ready]["run"]
            if run != run_id:
                runs.append(run)
                run_id = run
            weights = data / "runs" / run_id / "weights"
            if kind == "train":
                if not weights.is_dir():  # the first trial: let one checkpoint exist first
                    ready = trainer.wait_event(lambda e: e["ev"] == "saved", TRAINER_TIMEOUT, ready)
                n = rng.randint(1, 6)
                count = [0]

                def nth_loss(e: dict[str, Any], n: int = n, count: list[int] = count) -> bool:
                    if e["ev"] == "loss":
                        count[0] += 1
                    return count[0] >= n

                trainer.wait_event(nth_loss, TRAINER_TIMEOUT, ready + 1)
                server.kill()
                trigger = f"after {n} micro-batches"
            else:
                wait_for(weights.is_dir, TRAINER_TIMEOUT, "the run's weights folder")
                watch = DirWatch(weights)
                try:
                    prefix = ".old-" if kind == "replace" else ".tmp-"
                    jitter = kind == "save" and (trial // 3) % 2 == 1
                    if kind == "replace" and not (weights / "latest").exists():
                        # the first save to 'latest' creates it; the next one replaces it
                        trainer.wait_event(lambda e: e["ev"] == "saved", TRAINER_TIMEOUT, ready)
                    name = watch.next_name(lambda n, prefix=prefix: n.startswith(prefix), TRAINER_TIMEOUT)
                    if name is None:
                        raise RuntimeError(f"no {prefix} folder appeared: {trainer.tail()}")
                    delay = 0.0
                    if jitter:
                        typical = statistics.median(save_durations) if save_durations else 0.1
                        delay = rng.uniform(0.0, typical)
                        time.sleep(delay)  # a random point inside the save, counted from its start
                    server.kill()
                    trigger = f"{name.rsplit('-', 1)[0]}- appeared" + (f", +{delay * 1000:.0f} ms" if jitter else "")
                finally:
                    watch.close()
            leftovers_at_kill = leftovers_now(weights)
            if leftovers_at_kill:
                totals["kills_mid_save"] += 1
        except Exception as exc:
            totals["trial_errors"] += 1
            failures.append(f"trial {trial} ({kind}): {exc}")
            server.kill()
        finally:
            trainer.kill()
        save_durations += [e["s"] for e in trainer.of("saved")]
        seen_losses += [(run_id or "", e["i"], e["loss"]) for e in trainer.of("loss")]

        t0 = time.monotonic()
        server = start_server(data)
        restart_s.append(time.monotonic() - t0)
        row: list[Any] = [trial, kind, trigger, ", ".join(leftovers_at_kill) or "-"]
        try:
            assert run_id is not None
            checker = Checker(server, key)
            ckpts = checker.checkpoints(run_id)
            partial, leftovers, stale = disk_problems(data, run_id, ckpts)
            load_failed = checker.load_all(ckpts)
            problems, last = checker.metrics(run_id)
            ahead = [c.checkpoint_id for c in ckpts if c.step > last]
            totals["partial_listed"] += len(partial)
            totals["stale_records"] += len(stale)
            gap_trials += bool(problems)
            distinct_gaps.update(problems)
            totals["leftovers_after_restart"] += len(leftovers)
            totals["checkpoints_loaded"] += len(ckpts) - len(load_failed)
            totals["load_failures"] += len(load_failed)
            totals["metric_problems"] += len(problems)
            totals["checkpoints_ahead_of_metrics"] += len(ahead)
            failures += [f"trial {trial}: partial checkpoint listed: {x}" for x in partial]
            failures += [f"trial {trial}: leftover after restart: {x}" for x in leftovers]
            failures += [f"trial {trial}: load failed: {x}" for x in load_failed]
            failures += [f"trial {trial}: checkpoint record differs from its folder: {x}" for x in stale]
            failures += [f"trial {trial}: metrics: {x}" for x in problems if x not in reported_gaps]
            reported_gaps.update(problems)
            failures += [f"trial {trial}: checkpoint ahead of the metrics (last completed step {last}): {x}"
                         for x in ahead]
            row += [len(ckpts), len(partial), len(stale), len(leftovers), f"{len(ckpts) - len(load_failed)}/{len(ckpts)}",
                    last, len(problems), len(ahead), f"{restart_s[-1]:.1f}"]
        except Exception as exc:
            totals["trial_errors"] += 1
            failures.append(f"trial {trial} ({kind}) checks: {type(exc).__name__}: {exc}")
            row += ["error"] * 8 + [f"{restart_s[-1]:.1f}"]
        rows.append(row)
        report.line(f"trial {trial}: {row}")

    # Every listed checkpoint resumes, and every loss seen equals an uninterrupted run's.
    sweep_failures: list[str] = []
    sweep_count = 0
    mismatches: list[str] = []
    compared = repeated = 0
    max_diff = 0.0
    try:
        checker = Checker(server, key)
        for run in runs:
            ckpts = sorted(checker.checkpoints(run), key=lambda c: (c.time, c.step))
            sweep_count += len(ckpts)
            sweep_failures += checker.load_all(ckpts, resume=True)
        # A micro-batch run again after a resume gives the loss it gave before the kill.
        by_index: dict[int, list[float]] = {}
        for _run, i, loss in seen_losses:
            by_index.setdefault(i, []).append(loss)
        for i, values in sorted(by_index.items()):
            for loss in values[1:]:
                repeated += 1
                if abs(loss - values[0]) > 1e-6:
                    mismatches.append(f"micro-batch {i}: {loss!r} after a resume, {values[0]!r} before")
        if reference_run:
            last_index = max(by_index, default=-1)
            spare.go(["--url", server.url, "--key", key, "--accum", str(ACCUM), "--max-micro", str(last_index + 1)])
            if spare.wait(TRAINER_TIMEOUT * 3) != 0:
                raise RuntimeError(f"the reference run failed: {spare.tail()}")
            reference = {e["i"]: e["loss"] for e in spare.of("loss")}
            for run, i, loss in seen_losses:
                compared += 1
                diff = abs(loss - reference[i])
                max_diff = max(max_diff, diff)
                if diff > 1e-6:
                    mismatches.append(f"run {run} micro-batch {i}: {loss!r} vs uninterrupted {reference[i]!r}")
        else:
            spare.kill()
    except Exception as exc:
        totals["trial_errors"] += 1
        failures.append(f"final checks: {type(exc).__name__}: {exc}")
        spare.kill()
    failures += [f"resume sweep: {x}" for x in sweep_failures]
    failures += [f"losses: {x}" for x in mismatches[:20]]
    server.stop()

    report.table(
        ["trial", "kill", "trigger", "leftovers at kill", "checkpoints listed", "partial listed",
         "record differs from folder", "leftovers after restart", "loaded", "last completed step", "metric gaps", "ckpt ahead", "restart s"],
        rows,
    )
    kills_train = sum(1 for r in rows if r[1] == "train")
    report.line(f"kills: {kills_train} during training, {len(rows) - kills_train} during saves "
                f"({totals['kills_mid_save']} left a save half-done on disk); runs used: {len(runs)}")
    report.line(f"resume sweep: {sweep_count - len(sweep_failures)}/{sweep_count} checkpoints resumed; "
                f"micro-batches run again after a resume: {repeated}; losses compared with an uninterrupted "
                f"run: {compared if reference_run else 'not run'}; mismatches {len(mismatches)}, "
                f"max |diff| {max_diff:.3g}")
    report.line(f"restart: median {statistics.median(restart_s):.1f} s" if restart_s else "no restart")
    for line in failures:
        report.line(f"FAILURE: {line}")
    report.finish(
        trials=len(rows), kills_during_training=kills_train, kills_during_save=len(rows) - kills_train,
        kills_left_save_half_done=totals["kills_mid_save"], runs=len(runs),
        partial_checkpoints_listed=totals["partial_listed"], leftovers_after_restart=totals["leftovers_after_restart"],
        checkpoints_loaded=totals["checkpoints_loaded"], load_failures=totals["load_failures"],
        resume_sweep_checkpoints=sweep_count, resume_failures=len(sweep_failures),
        checkpoint_records_differing_from_folder=totals["stale_records"],
        metric_gap_problems=len(distinct_gaps), trials_with_metric_gaps=gap_trials,
        checkpoints_ahead_of_metrics=totals["checkpoints_ahead_of_metrics"],
        losses_repeated_after_resume=repeated, losses_compared_with_uninterrupted=compared,
        loss_mismatches=len(mismatches), max_abs_loss_diff=max_diff,
        trial_errors=totals["trial_errors"],
        restart_s_median=round(statistics.median(restart_s), 1) if restart_s else None,
        failures=failures[:50],
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
