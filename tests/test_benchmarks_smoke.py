"""The benchmark scripts of benchmarks/ in their --smoke size: each runs end to end and prints
its table and figures. Timing is the scripts' business, not the tests' (these machines are
noisy): the tests check what the figures say about behaviour (the same losses remotely as
locally, every contender measured), never how fast anything was."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import test_stress_smoke as stress_smoke

pytestmark = pytest.mark.server


def run_smoke(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    f = stress_smoke.run_smoke(script, tmp_path, *extra, package="benchmarks")
    assert f["_exit"] == 0, f["_output"]
    return f


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
