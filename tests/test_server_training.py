"""twinkle-server: training through raw /objects calls, and what the server records about it."""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from peft import LoraConfig

from twinkle.protocol import codec


@pytest.fixture(scope="module")
def flow(server, add_user, raw_client, raw_helpers) -> SimpleNamespace:
    """One user who trained 4 steps on a remote dataloader and saved checkpoint ``first``."""
    name = f"trainer-{uuid.uuid4().hex[:6]}"
    c = raw_client(server, add_user(server.data_dir, name))
    dataset, loader = raw_helpers.raw_dataloader(c, rows=32, batch_size=4)
    model = c.create("model", "builtin://tiny-qwen2")
    r = c.calls(model, [
        ("add_adapter_to_model", ["default", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")],
         {"gradient_accumulation_steps": 1}),
        ("set_template", ["Template"], {}),
        ("set_processor", ["InputProcessor"], {"padding_side": "right"}),
        ("set_loss", ["CrossEntropyLoss"], {}),
        ("set_optimizer", ["AdamW"], {"lr": 2e-3}),
        ("set_lr_scheduler", ["LinearLR"], {}),
    ])
    results = c.body(r)["results"]
    assert all(x["ok"] for x in results), results
    run_id = results[0]["training_run_id"]
    losses = raw_helpers.train_steps(c, model, loader, 4)
    path = c.call(model, "save", "first", save_optimizer=True)
    return SimpleNamespace(name=name, client=c, dataset=dataset, loader=loader, model=model, run_id=run_id,
                           losses=losses, path=path, helpers=raw_helpers, server=server)


def state(flow: SimpleNamespace, model: str | None = None) -> dict:
    return flow.client.call(model or flow.model, "get_train_state")


def test_run_checkpoint_and_metrics_are_recorded(flow) -> None:
    c = flow.client
    assert flow.path == f"twinkle://{flow.run_id}/weights/first"
    run = c.get(f"/training_runs/{flow.run_id}").json()
    assert run["model_owner"] == flow.name and run["adapter_name"] == "default"
    assert run["base_model"] == "builtin://tiny-qwen2" and run["status"] == "active"
    assert run["lora_rank"] == 4 and run["lora_config"]["r"] == 4 and run["lora_config"]["lora_alpha"] == 16
    assert run["cur_step"] == 4 and run["consumed_train_samples"] == 16 and run["last_loss"] == flow.losses[-1]
    assert run["num_checkpoints"] == 1 and run["last_checkpoint"] == flow.path
    comps = run["components"]
    assert {k: v["name"] for k, v in comps.items()} == {
        "template": "Template", "processor": "InputProcessor", "loss": "CrossEntropyLoss",
        "optimizer": "AdamW", "lr_scheduler": "LinearLR",
    }
    assert comps["optimizer"]["kwargs"] == {"lr": 2e-3} and comps["processor"]["kwargs"] == {"padding_side": "right"}

    listing = c.get("/training_runs").json()
    assert [r["training_run_id"] for r in listing["training_runs"]] == [flow.run_id]
    assert listing["cursor"] == {"limit": 20, "offset": 0, "total_count": 1}

    ckpts = c.get(f"/training_runs/{flow.run_id}/checkpoints").json()["checkpoints"]
    assert len(ckpts) == 1
    ck = ckpts[0]
    assert ck["checkpoint_id"] == "first" and ck["twinkle_path"] == flow.path and ck["step"] == 4
    assert ck["has_optimizer"] and ck["size_bytes"] > 10_000 and ck["consumed_train_samples"] == 16
    assert ck["loss"] == pytest.approx(flow.losses[-1])
    assert c.get(f"/training_runs/{flow.run_id}/checkpoints/first").json() == ck
    folder = flow.server.data_dir / "runs" / flow.run_id / "weights" / "first"
    assert (folder / "twinkle_checkpoint.json").is_file()

    metrics = c.get(f"/training_runs/{flow.run_id}/metrics").json()
    assert metrics["training_run_id"] == flow.run_id and metrics["revision"] == 0
    points = metrics["points"]
    assert [p["step"] for p in points] == [1, 2, 3, 4] and [p["micro_step"] for p in points] == [1, 2, 3, 4]
    assert [p["loss"] for p in points] == flow.losses
    assert all(p["completed"] and p["grad_norm"] > 0 and p["lr"] > 0 and p["num_tokens"] > 0 for p in points)
    assert not any(p["superseded"] for p in points)
    # LinearLR raises the LR each lr_step; lr_step was never called here, so the LR stays the first one.
    assert len({p["lr"] for p in points}) == 1
    later = c.get(f"/training_runs/{flow.run_id}/metrics", since_step=2).json()["points"]
    assert [p["step"] for p in later] == [3, 4]

    info = c.get("/server").json()
    assert info["user"] == flow.name and info["used_slots"] >= 1 and info["free_slots"] <= 15


def test_same_batch_twice_runs_once(flow) -> None:
    c = flow.client
    c.call(flow.loader, "_twinkle_start_epoch", 0)
    batch = c.call(flow.loader, "_twinkle_next", 1)["batches"][0]
    before = state(flow)["cur_step"]
    seq = c.seqs[flow.model]
    payload = {"calls": [
        {"seq": seq + 1, "method": "forward_backward", "kwargs": {"inputs": batch}},
        {"seq": seq + 2, "method": "clip_grad_norm", "args": [1.0]},
        {"seq": seq + 3, "method": "step"},
        {"seq": seq + 4, "method": "zero_grad"},
    ]}
    c.seqs[flow.model] = seq + 4
    first = c.post(f"/objects/{flow.model}/calls", payload)
    second = c.post(f"/objects/{flow.model}/calls", payload)
    assert first.status_code == second.status_code == 200
    assert c.body(first) == c.body(second) and all(r["ok"] for r in c.body(first)["results"])
    assert state(flow)["cur_step"] == before + 1
    points = c.get(f"/training_runs/{flow.run_id}/metrics", since_step=before).json()["points"]
    assert len(points) == 1 and points[0]["completed"]


def test_retry_during_the_original_waits_for_its_result(flow) -> None:
    c = flow.client
    c.call(flow.loader, "_twinkle_start_epoch", 0)
    batches = c.call(flow.loader, "_twinkle_next", 3)["batches"]
    before = state(flow)["cur_step"]
    seq = c.seqs[flow.model]
    calls = []
    for b in batches:
        calls += [{"method": "forward_backward", "kwargs": {"inputs": b}}, {"method": "step"}, {"method": "zero_grad"}]
    payload = {"calls": [{**call, "seq": seq + i + 1} for i, call in enumerate(calls)]}
    c.seqs[flow.model] = seq + len(calls)
    replies: list = []
    start = threading.Barrier(3)

    def send() -> None:
        start.wait(60)  # the three copies go out together, in whatever order the server sees them
        replies.append(c.post(f"/objects/{flow.model}/calls", payload))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bodies = [c.body(r) for r in replies]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert state(flow)["cur_step"] == before + 3


def test_failure_stops_the_batch(flow) -> None:
    c = flow.client
    before = state(flow)
    seq = c.seqs[flow.model]
    payload = {"calls": [
        {"seq": seq + 1, "method": "zero_grad"},
        {"seq": seq + 2, "method": "set_loss", "args": ["NoSuchLoss"]},
        {"seq": seq + 3, "method": "step"},
        {"seq": seq + 4, "method": "save", "args": ["never"]},
    ]}
    r = c.post(f"/objects/{flow.model}/calls", payload)
    assert r.status_code == 200
    results = c.body(r)["results"]
    assert [x["ok"] for x in results] == [True, False]
    err = results[1]["error"]
    assert err["code"] == "unknown_component" and err["call"] == "set_loss"
    assert "NoSuchLoss" in err["message"] and "\n" not in err["message"] and err["request_id"]
    # A retry of the whole batch replays the same outcome and runs nothing more.
    assert c.body(c.post(f"/objects/{flow.model}/calls", payload)) == c.body(r)
    # The seqs after the failure were never used: the next call may take them.
    c.seqs[flow.model] = seq + 2
    assert state(flow)["cur_step"] == before["cur_step"]
    names = [ck["checkpoint_id"] for ck in c.get(f"/training_runs/{flow.run_id}/checkpoints").json()["checkpoints"]]
    assert "never" not in names


def test_old_results_and_gaps(flow, raw_client) -> None:
    c = flow.client
    seq = c.seqs[flow.dataset]
    for start in range(1, 301, 60):  # 300 calls, at most 64 per request
        many = {"calls": [{"seq": seq + i, "method": "__len__"} for i in range(start, start + 60)]}
        results = c.body(c.post(f"/objects/{flow.dataset}/calls", many))["results"]
        assert len(results) == 60 and all(x["ok"] and x["value"] == 32 for x in results)
    # A seq whose result is still kept comes back; one whose result was dropped is refused.
    kept = c.body(c.post(f"/objects/{flow.dataset}/calls", {"calls": [{"seq": seq + 300, "method": "__len__"}]}))
    assert kept["results"][0]["ok"]
    gone = c.body(c.post(f"/objects/{flow.dataset}/calls", {"calls": [{"seq": seq + 1, "method": "__len__"}]}))
    assert gone["results"][0]["error"]["message"] == f"call {seq + 1} already ran"
    # Gaps are allowed.
    jump = c.body(c.post(f"/objects/{flow.dataset}/calls", {"calls": [{"seq": seq + 1000, "method": "__len__"}]}))
    assert jump["results"][0]["ok"]
    c.seqs[flow.dataset] = seq + 1000
    # A skipped seq below the last one is refused, not run late.
    skipped = c.body(c.post(f"/objects/{flow.dataset}/calls", {"calls": [{"seq": seq + 500, "method": "__len__"}]}))
    assert "never ran" in skipped["results"][0]["error"]["message"]


def test_dataloader_protocol(flow) -> None:
    c = flow.client
    assert c.call(flow.loader, "__len__") == 8
    c.call(flow.loader, "_twinkle_start_epoch", 0)
    seen, ends = 0, []
    while True:
        reply = c.call(flow.loader, "_twinkle_next", 3)
        assert reply["sizes"] == [len(b) for b in reply["batches"]]
        seen += len(reply["batches"])
        ends.append(reply["end"])
        if reply["end"]:
            break
    assert seen == 8 and ends == [False, False, True]
    r = c.calls(flow.loader, [("_twinkle_next", [1], {})])
    assert c.body(r)["results"][0]["error"]["code"] == "invalid_state"
    # Mid-epoch resume: 28 of 32 samples consumed leaves one batch.
    c.call(flow.loader, "_twinkle_start_epoch", 28)
    reply = c.call(flow.loader, "_twinkle_next", 5)
    assert len(reply["batches"]) == 1 and reply["end"] and len(reply["batches"][0]) == 4
    assert c.call(flow.loader, "get_state")["consumed_train_samples"] == 32
    r = c.calls(flow.loader, [("__iter__", [], {})])
    assert c.body(r)["results"][0]["error"]["message"] == "DataLoader has no remote method '__iter__'"


def test_json_and_gzip_bodies(flow) -> None:
    c = flow.client
    seq = c.seqs[flow.dataset] + 1
    c.seqs[flow.dataset] = seq
    r = c.http.post(f"/objects/{flow.dataset}/calls", content=json.dumps(
        {"calls": [{"seq": seq, "method": "__getitem__", "args": [0]}]}), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    row = r.json()["results"][0]["value"]
    assert isinstance(row["input_ids"], list) and all(isinstance(t, int) for t in row["input_ids"])

    created = c.http.post("/objects", json={"kind": "dataset", "args": ["builtin://self-cognition"]})
    assert created.status_code == 200 and created.json()["kind"] == "dataset"
    assert c.delete(f"/objects/{created.json()['object_id']}").status_code == 200

    seq += 1
    c.seqs[flow.dataset] = seq
    body = gzip.compress(codec.pack({"calls": [{"seq": seq, "method": "__len__"}]}))
    r = c.http.post(f"/objects/{flow.dataset}/calls", content=body,
                    headers={"Content-Type": codec.CONTENT_TYPE, "Content-Encoding": "gzip"})
    assert r.status_code == 200 and codec.unpack(r.content)["results"][0]["value"] == 32
    r = c.http.post(f"/objects/{flow.dataset}/calls", content=body,
                    headers={"Content-Type": codec.CONTENT_TYPE, "Content-Encoding": "br"})
    assert r.status_code == 415


def test_idempotent_creation(flow) -> None:
    c = flow.client
    key = uuid.uuid4().hex
    a = c.create("model", "builtin://tiny-qwen2", idempotency_key=key)
    b = c.create("model", "builtin://tiny-qwen2", idempotency_key=key)
    other = c.create("model", "builtin://tiny-qwen2", idempotency_key=uuid.uuid4().hex)
    assert a == b != other
    r = c.post("/objects", {"kind": "model", "args": [], "kwargs": {}}, {"Idempotency-Key": key})
    assert r.status_code == 400 and "different request" in c.body(r)["error"]["message"]
    for oid in (a, other):
        assert c.delete(f"/objects/{oid}").json() == {"object_id": oid, "kind": "model"}
    assert c.delete(f"/objects/{a}").status_code == 404


def test_save_replace_and_delete_checkpoint(flow) -> None:
    c = flow.client
    path = c.call(flow.model, "save", "again")
    first_time = c.get(f"/training_runs/{flow.run_id}/checkpoints/again").json()
    assert not first_time["has_optimizer"]
    assert c.call(flow.model, "save", "again", save_optimizer=True) == path
    ckpts = [ck for ck in c.get(f"/training_runs/{flow.run_id}/checkpoints").json()["checkpoints"]
             if ck["checkpoint_id"] == "again"]
    assert len(ckpts) == 1 and ckpts[0]["has_optimizer"]
    weights: Path = flow.server.data_dir / "runs" / flow.run_id / "weights"
    assert (weights / "again").is_dir() and not [p for p in weights.iterdir() if p.name.startswith(".")]
    r = c.delete(f"/training_runs/{flow.run_id}/checkpoints/again")
    assert r.status_code == 200 and r.json()["success"] and path in r.json()["message"]
    assert not (weights / "again").exists()
    assert c.get(f"/training_runs/{flow.run_id}/checkpoints/again").status_code == 404
    assert c.delete(f"/training_runs/{flow.run_id}/checkpoints/again").status_code == 404
    r = c.calls(flow.model, [("save", ["x"], {"save_dir": "/tmp"})])
    assert c.body(r)["results"][0]["error"]["code"] == "invalid_argument"


def test_checkpoint_errors_name_twinkle_paths_only(flow) -> None:
    c = flow.client
    path = c.call(flow.model, "save", "weights-only")
    for method, kwargs in (("resume_from_checkpoint", {}), ("load", {"load_optimizer": True})):
        r = c.calls(flow.model, [(method, [path], kwargs)])
        err = c.body(r)["results"][0]["error"]
        assert err["code"] == "invalid_checkpoint" and err["message"].startswith(f"{path} has no training state"), err
        assert str(flow.server.data_dir) not in err["message"] and "/runs/" not in err["message"]
    assert c.delete(f"/training_runs/{flow.run_id}/checkpoints/weights-only").status_code == 200


def test_diverged_training_is_recorded(server, server_user, raw_client, raw_helpers) -> None:
    """Losses become NaN: every call still succeeds, and the points say so (loss null)."""
    c = raw_client(server, server_user[1])
    dataset, loader = raw_helpers.raw_dataloader(c, rows=16, batch_size=4)
    model = c.create("model")
    r = c.calls(model, [
        ("add_adapter_to_model", ["nan", LoraConfig(r=4, target_modules="all-linear")], {}),
        ("set_processor", ["InputProcessor"], {"padding_side": "right"}),
        ("set_optimizer", ["SGD"], {"lr": 1e38}),
    ])
    results = c.body(r)["results"]
    assert all(x["ok"] for x in results), results
    run_id = results[0]["training_run_id"]
    losses = raw_helpers.train_steps(c, model, loader, 3)
    assert losses[0] == losses[0] and all(x != x for x in losses[1:]), losses  # NaN != NaN
    points = c.get(f"/training_runs/{run_id}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1, 2, 3] and points[0]["loss"] is not None
    assert [p["loss"] for p in points[1:]] == [None, None] and all(p["completed"] for p in points)
    run = c.get(f"/training_runs/{run_id}").json()
    assert run["cur_step"] == 3 and run["last_loss"] is None
    path = c.call(model, "save", "diverged")
    assert c.get(f"/training_runs/{run_id}/checkpoints/diverged").json()["loss"] is None
    assert c.call(model, "get_train_state")["cur_step"] == 3
    assert c.delete(f"/training_runs/{run_id}/checkpoints/diverged").status_code == 200
    assert path.endswith("/diverged")
    for obj in (model, loader, dataset):
        c.delete(f"/objects/{obj}")


def test_resume_supersedes_and_reattaches(flow) -> None:
    c, h = flow.client, flow.helpers
    mark = c.call(flow.model, "save", "mark", save_optimizer=True)
    mark_step = state(flow)["cur_step"]
    h.train_steps(c, flow.model, flow.loader, 2)
    result = c.body(c.calls(flow.model, [("resume_from_checkpoint", [mark], {})]))["results"][0]
    assert result["value"]["cur_step"] == mark_step and result["training_run_id"] == flow.run_id
    metrics = c.get(f"/training_runs/{flow.run_id}/metrics").json()
    assert metrics["revision"] == 1
    superseded = [p["step"] for p in metrics["points"] if p["superseded"]]
    assert superseded == [mark_step + 1, mark_step + 2]
    h.train_steps(c, flow.model, flow.loader, 1)
    live = [p for p in c.get(f"/training_runs/{flow.run_id}/metrics", since_step=mark_step).json()["points"]
            if not p["superseded"]]
    assert [p["step"] for p in live] == [mark_step + 1] and live[0]["completed"]

    # load keeps the run; weights only, counters untouched.
    c.call(flow.model, "load", mark)
    assert state(flow)["cur_step"] == mark_step + 1

    # A second model may not take over a run another live model trains...
    other = h.raw_model(c)
    r = c.calls(other, [("resume_from_checkpoint", [mark], {})])
    assert c.body(r)["results"][0]["error"]["code"] == "invalid_state"
    other_run = [run for run in c.get("/training_runs").json()["training_runs"] if run["training_run_id"] != flow.run_id]
    assert len(other_run) == 1
    # ... until that model is gone; then the run continues and the empty run of the new adapter is dropped.
    c.delete(f"/objects/{flow.model}")
    assert c.get(f"/training_runs/{flow.run_id}").json()["status"] == "detached"
    result = c.body(c.calls(other, [("resume_from_checkpoint", [], {"name": mark})]))["results"][0]
    assert result["ok"] and result["training_run_id"] == flow.run_id
    run = c.get(f"/training_runs/{flow.run_id}").json()
    assert run["status"] == "active" and run["revision"] == 2
    assert c.get(f"/training_runs/{other_run[0]['training_run_id']}").status_code == 404
    h.train_steps(c, other, flow.loader, 1)
    assert c.get(f"/training_runs/{flow.run_id}").json()["cur_step"] == mark_step + 1
    flow.model = other  # later tests continue with the model that now trains the run


def test_upload_offline_fails_with_one_line(flow) -> None:
    c = flow.client
    r = c.calls(flow.model, [("upload_to_hub", [flow.path, "someone/some-model"], {})])
    err = c.body(r)["results"][0]["error"]
    assert err["code"] == "invalid_argument" and "needs hub_token" in err["message"]
    reply = c.call(flow.model, "upload_to_hub", flow.path, "someone/some-model", hub_token="tok", async_upload=True)
    upload_id = reply  # the declared return: the upload id, as locally
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = c.get(f"/uploads/{upload_id}").json()
        if status["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert status["status"] == "failed" and status["hub_model_id"] == "someone/some-model"
    assert status["error"] and "\n" not in status["error"] and str(flow.server.data_dir) not in status["error"]
    r = c.calls(flow.model, [("upload_to_hub", [flow.path, "not a repo id"], {"hub_token": "tok"})])
    assert c.body(r)["results"][0]["error"]["code"] == "invalid_argument"


def test_object_delete_frees_the_slot_and_detaches(flow, raw_client) -> None:
    c = flow.client
    used = c.get("/server").json()["used_slots"]
    model = flow.helpers.raw_model(c, adapter="extra")
    run_id = [r for r in c.get("/training_runs").json()["training_runs"] if r["adapter_name"] == "extra"][0]
    assert c.get("/server").json()["used_slots"] == used + 1 and run_id["status"] == "active"
    assert c.delete(f"/objects/{model}").status_code == 200
    assert c.get("/server").json()["used_slots"] == used
    assert c.get(f"/training_runs/{run_id['training_run_id']}").json()["status"] == "detached"
    r = c.calls(model, [("get_train_state", [], {})])
    assert r.status_code == 404 and c.body(r)["error"]["code"] == "not_found"
    assert httpx.get(flow.server.api + "/health", timeout=60).status_code == 200
