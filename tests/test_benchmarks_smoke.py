"""The benchmark scripts of benchmarks/ in their --smoke size: each runs end to end and prints
its table and figures. Timing is the scripts' business, not the tests' (these machines are
noisy): the tests check what the figures say about behaviour (the same losses remotely as
locally, every contender measured), never how fast anything was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_stress_smoke import last_json_line

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


def run_smoke(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--smoke", "--keep", str(tmp_path / script), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=840, stdin=subprocess.DEVNULL,
    )
    output = (proc.stdout + "\n" + proc.stderr[-4000:])[-6000:]
    assert proc.returncode == 0, output
    try:
        return {**last_json_line(proc.stdout), "_output": output}
    except ValueError:
        pytest.fail(f"benchmarks.{script} printed no figures:\n{output}")


@pytest.mark.timeout(900)
def test_remote_local_smoke(tmp_path: Path) -> None:
    f = run_smoke("remote_local", tmp_path, "--rtt", "0,20")
    # The same loop remotely trains exactly as locally, at every round trip.
    assert f["max_loss_diff_0ms"] == 0.0 and f["max_loss_diff_20ms"] == 0.0, f["_output"]
    assert f["local_ms"] > 0 and f["remote_0ms_ms"] > 0 and f["remote_20ms_ms"] > 0, f["_output"]


@pytest.mark.timeout(900)
def test_multi_tenant_smoke(tmp_path: Path) -> None:
    f = run_smoke("multi_tenant", tmp_path, "--tenants", "2")
    modes = [(r["mode"], r["tenants"]) for r in f["rows"]]
    assert modes == [("bound (1 tenant, batch 8)", 1), ("fused", 2), ("time-shared", 2)], f["_output"]
    assert all(r["tokens_per_s"] > 0 and r["tenant_min"] > 0 for r in f["rows"]), f["_output"]
    time_shared = f["rows"][2]
    assert time_shared["calls_per_pass"] == 1.0, f["_output"]  # --fuse-tokens 0: every call alone


@pytest.mark.timeout(900)
def test_gpu_script_smoke_on_the_cpu(tmp_path: Path) -> None:
    f = run_smoke("gpu", tmp_path, "--no-server")
    contenders = [r["contender"] for r in f["runs"]]
    assert len(contenders) == 5 and all(r["tokens_per_s"] > 0 for r in f["runs"]), f["_output"]
