"""twinkle-server: everything survives a restart (even a crash), and disk and database are reconciled."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig

pytestmark = pytest.mark.server


def test_restart_keeps_state_and_reconciles(tmp_path: Path, start_server, add_user, raw_client, raw_helpers) -> None:
    data = tmp_path / "data"
    first = start_server(data)
    key = add_user(data, "carol")
    revoked_key = add_user(data, "dave")
    c = raw_client(first, key)
    _, loader = raw_helpers.raw_dataloader(c, rows=8, batch_size=4)
    model = raw_helpers.raw_model(c)
    raw_helpers.train_steps(c, model, loader, 2)
    keep = c.call(model, "save", "keep", save_optimizer=True)
    c.call(model, "save", "lost")
    run_id = keep.split("/")[2]
    before_run = c.get(f"/training_runs/{run_id}").json()
    before_points = c.get(f"/training_runs/{run_id}/metrics").json()["points"]
    assert before_run["status"] == "active" and len(before_points) == 2

    first.kill()  # a crash: nothing is shut down cleanly

    revoke = subprocess.run(
        [sys.executable, "-m", "twinkle_server.cli", "users", "revoke", "dave", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60,
    )
    assert revoke.returncode == 0
    weights = data / "runs" / run_id / "weights"
    shutil.rmtree(weights / "lost")  # a folder that vanished: its row must go
    shutil.copytree(weights / "keep", weights / "copied")  # a complete folder without a row: it is added
    (weights / ".tmp-half-abc123").mkdir()  # an unfinished save: removed
    (weights / ".tmp-half-abc123" / "adapter_model.safetensors").write_bytes(b"partial")
    (weights / ".old-keep-999").mkdir()
    local_data = tmp_path / "mine.jsonl"
    local_data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}) + "\n")

    second = start_server(data, "--allow-local-data")
    c2 = raw_client(second, key)
    run = c2.get(f"/training_runs/{run_id}").json()
    assert run["status"] == "detached"
    assert {k: run[k] for k in ("cur_step", "consumed_train_samples", "last_loss", "components", "lora_config",
                                "model_owner", "created")} == \
        {k: before_run[k] for k in ("cur_step", "consumed_train_samples", "last_loss", "components",
                                    "lora_config", "model_owner", "created")}
    assert c2.get(f"/training_runs/{run_id}/metrics").json()["points"] == before_points
    names = [ck["checkpoint_id"] for ck in c2.get(f"/training_runs/{run_id}/checkpoints").json()["checkpoints"]]
    assert sorted(names) == ["copied", "keep"]
    assert sorted(p.name for p in weights.iterdir()) == ["copied", "keep"]
    assert c2.get(f"/training_runs/{run_id}/checkpoints/copied").json()["step"] == 2
    assert raw_client(second, revoked_key).get("/server").status_code == 401
    assert "reconciled" in second.log()

    # The old process's objects are gone; the answer says what to do.
    r = c2.calls(model, [("get_train_state", [], {})])
    assert r.status_code == 404 and c2.body(r)["error"]["message"] == (
        f"no object {model!r}: it expired or the server restarted; create it again "
        "(models: then resume from a twinkle:// checkpoint)")

    # Training continues from the saved checkpoint on the new process.
    model = c2.create("model")
    c2.call(model, "add_adapter_to_model", "default", LoraConfig(r=4, target_modules="all-linear"))
    r = c2.calls(model, [("resume_from_checkpoint", [keep], {})])
    result = c2.body(r)["results"][0]
    assert r.status_code == 200 and result["ok"], result
    # The run the adapter trains now travels beside the value (the value is the local one).
    assert result["value"]["cur_step"] == 2 and result["training_run_id"] == run_id
    assert c2.get(f"/training_runs/{run_id}").json()["status"] == "active"
    assert len(c2.get("/training_runs").json()["training_runs"]) == 1  # the adapter's empty run was dropped

    # --allow-local-data lets a server path be a dataset.
    dataset = c2.create("dataset", str(local_data))
    assert c2.call(dataset, "__len__") == 1

    # A clean stop closes the live objects: the run is detached in the database right away.
    assert second.stop() in (0, -15, 143)
    assert "stopped" in second.log()
    with sqlite3.connect(data / "twinkle.db") as db:
        assert db.execute("SELECT status FROM training_runs WHERE run_id = ?", (run_id,)).fetchone() == ("detached",)
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
