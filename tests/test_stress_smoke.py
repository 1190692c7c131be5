"""The reliability scripts of stress/ in their --smoke size, judged by the figures they print.

Each script starts its own twinkle-server processes on loopback and ends with one JSON line;
the full-size runs and their figures are in stress/RESULTS.md and the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line")


def run_smoke(script: str, tmp_path: Path, *extra: str, package: str = "stress") -> dict[str, Any]:
    """``python -m PACKAGE.SCRIPT --smoke``; its figures (the last JSON line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", f"{package}.{script}", "--smoke", "--keep", str(tmp_path / script), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840, stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + "\n" + proc.stderr[-4000:]
    try:
        figures = last_json_line(proc.stdout)
    except ValueError:
        pytest.fail(f"{package}.{script} printed no figures (exit {proc.returncode}):\n{output[-6000:]}")
    figures["_output"] = output[-6000:]
    figures["_exit"] = proc.returncode
    return figures


@pytest.mark.timeout(900)
def test_kill_trials_smoke(tmp_path: Path) -> None:
    f = run_smoke("kill_trials", tmp_path)
    out = f["_output"]
    assert f["trials"] == 2 and f["trial_errors"] == 0, out
    assert f["kills_during_training"] == 1 and f["kills_during_save"] == 1, out
    assert f["partial_checkpoints_listed"] == 0, out
    assert f["leftovers_after_restart"] == 0, out
    assert f["load_failures"] == 0 and f["checkpoints_loaded"] >= 2, out
    assert f["resume_failures"] == 0 and f["resume_sweep_checkpoints"] >= 1, out
    assert f["metric_gap_problems"] == 0 and f["checkpoints_ahead_of_metrics"] == 0, out
    assert f["loss_mismatches"] == 0, out
    assert f["failures"] == [] and f["_exit"] == 0, out


@pytest.mark.timeout(900)
def test_fuzz_api_smoke(tmp_path: Path) -> None:
    f = run_smoke("fuzz_api", tmp_path)
    out = f["_output"]
    assert f["operations"] >= 12 and f["requests"] >= 200, out
    assert f["responses_5xx"] == 0, f["first_5xx"]
    assert f["bodies_with_traceback_or_path"] == 0, f["first_leaks"]
    assert f["unauthenticated_2xx"] == 0, out
    assert f["server_alive"] and f["_exit"] == 0, out


@pytest.mark.timeout(900)
def test_soak_smoke(tmp_path: Path) -> None:
    f = run_smoke("soak", tmp_path)
    out = f["_output"]
    assert f["trainers"] == 2 and f["readers"] == 5 and f["users"] == 2, out
    assert f["trainer_failures"] == 0 and f["micro_batches"] >= 2, out
    assert f["reader_requests"] >= 10 and f["reader_errors"] == 0, out
    assert f["metric_problems"] == 0, out
    assert f["server_alive"] and f["errors"] == 0 and f["_exit"] == 0, out


@pytest.mark.timeout(900)
def test_drop_proxy_smoke(tmp_path: Path) -> None:
    f = run_smoke("drop_proxy", tmp_path)
    out = f["_output"]
    assert f["cut"] >= 1 and f["cut_share"] >= 0.1, out
    assert f["max_abs_loss_diff"] <= 1e-6, out
    assert f["failures"] == [] and f["_exit"] == 0, out


@pytest.mark.timeout(900)
def test_outage_smoke(tmp_path: Path) -> None:
    f = run_smoke("outage", tmp_path)
    out = f["_output"]
    # an outage shorter than the retry budget changes nothing
    assert f["default_loop_uninterrupted"] and f["default_identical_losses"], out
    assert f["long_loop_uninterrupted"] and f["long_identical_losses"], out
    # one longer than the budget may raise, but no call goes missing without an error
    assert f["short_loop_uninterrupted"] or f["short_errors"], out
    assert f["silently_dropped"] == 0, out
    assert f["failures"] == [] and f["_exit"] == 0, out
