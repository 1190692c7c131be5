"""twinkle-server: bad input gets a 4xx with one readable line; slots, expiry, and internal errors."""

from __future__ import annotations

import gzip
import json
import shutil
import time
import uuid

import numpy as np
import pytest
from peft import LoraConfig

from twinkle.protocol import codec

pytestmark = pytest.mark.server

STATUS = {"invalid_argument": 400, "unknown_component": 400, "invalid_checkpoint": 400, "not_found": 404,
          "capacity": 409, "invalid_state": 409}


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition()`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.1)


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message and "File \"" not in message, message


@pytest.fixture(scope="module")
def user(server, add_user, raw_client, raw_helpers):
    c = raw_client(server, add_user(server.data_dir, f"err-{uuid.uuid4().hex[:6]}"))
    model = raw_helpers.raw_model(c)
    yield c, model
    c.delete(f"/objects/{model}")


def call_error(c, obj: str, method: str, *args, **kwargs) -> dict:
    r = c.calls(obj, [(method, list(args), kwargs)])
    assert r.status_code == 200, r.status_code
    result = c.body(r)["results"][0]
    assert not result["ok"], result
    err = result["error"]
    assert 400 <= STATUS[err["code"]] < 500 and err["call"] == method
    one_line(err["message"])
    return err


def http_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.content[:300])
    err = (codec.unpack(r.content) if "msgpack" in r.headers["content-type"] else r.json())["error"]
    one_line(err["message"])
    assert err["request_id"] == r.headers["x-request-id"]
    return err


def test_bad_calls(user) -> None:
    c, model = user
    err = call_error(c, model, "set_loss", "NoSuchLoss")
    assert err["code"] == "unknown_component" and "NoSuchLoss" in err["message"]
    err = call_error(c, model, "set_optimizer", "Adam", lr=1e-3, bogus=1)
    assert err["code"] == "invalid_argument" and "bogus" in err["message"]
    err = call_error(c, model, "explode")
    assert err["message"] == "MultiLoraTransformersModel has no remote method 'explode'"
    for private in ("__init__", "_adapter", "_invoke", "close"):
        assert "no remote method" in call_error(c, model, private)["message"]
    err = call_error(c, model, "forward_backward")
    assert err["code"] == "invalid_argument" and "inputs" in err["message"]
    err = call_error(c, model, "step", adapter_name="nope")
    assert err["code"] == "not_found" and "nope" in err["message"]
    fresh = c.create("model", model_id="builtin://tiny-qwen2")
    c.call(fresh, "add_adapter_to_model", "mine", {"r": 4, "target_modules": "all-linear"})
    err = call_error(c, fresh, "forward_backward", [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    assert err["code"] == "invalid_state" and "adapter 'mine' has no optimizer" in err["message"], err
    c.delete(f"/objects/{fresh}")


def test_bad_batches(user) -> None:
    c, model = user
    floats = {"input_ids": np.ones((2, 5), dtype=np.float32), "labels": np.ones((2, 5), dtype=np.int64)}
    assert "integers" in call_error(c, model, "forward_backward", floats)["message"]
    flat = {"input_ids": np.ones(5, dtype=np.int64), "labels": np.ones(5, dtype=np.int64)}
    assert "2-D" in call_error(c, model, "forward_backward", flat)["message"]
    mismatched = {"input_ids": np.ones((2, 5), dtype=np.int64), "labels": np.ones((2, 4), dtype=np.int64)}
    assert "shape" in call_error(c, model, "forward_backward", mismatched)["message"]
    ragged = [{"input_ids": [1, 2, 3], "labels": [1, 2]}]
    assert "labels" in call_error(c, model, "forward_backward", ragged)["message"]
    huge = {"input_ids": np.full((1, 4), 10**6, dtype=np.int64), "labels": np.ones((1, 4), dtype=np.int64)}
    assert "vocabulary" in call_error(c, model, "forward_backward", huge)["message"]
    assert call_error(c, model, "forward_backward", "text")["code"] == "invalid_argument"


def test_adapter_limits(user, raw_client, server) -> None:
    c, _ = user
    model = c.create("model")
    err = call_error(c, model, "add_adapter_to_model", "big", LoraConfig(r=64, target_modules="all-linear"))
    assert "max_r=32" in err["message"]
    err = call_error(c, model, "add_adapter_to_model", "bad name!", LoraConfig(r=4))
    assert "adapter name" in err["message"]
    err = call_error(c, model, "add_adapter_to_model", "x", "not a config")
    assert err["code"] == "invalid_argument"
    err = call_error(c, model, "add_adapter_to_model", "x", {"r": 4, "no_such_field": 1})
    assert "LoraConfig" in err["message"]
    err = call_error(c, model, "step")
    assert err["code"] == "invalid_state" and "add_adapter_to_model" in err["message"]
    c.delete(f"/objects/{model}")


def test_bad_object_creation(user) -> None:
    c, _ = user
    r = c.post("/objects", {"kind": "model", "args": ["ms://Qwen/Qwen2.5-7B-Instruct"], "kwargs": {}})
    err = http_error(r, 400)
    assert err["message"] == "this server serves builtin://tiny-qwen2, not ms://Qwen/Qwen2.5-7B-Instruct"
    r = c.post("/objects", {"kind": "model", "args": ["Qwen/Qwen2.5-7B-Instruct"], "kwargs": {}})
    assert "not ms://Qwen/Qwen2.5-7B-Instruct" in http_error(r, 400)["message"]
    r = c.post("/objects", {"kind": "model", "args": [], "kwargs": {"max_r": 8}})
    assert "max_r" in http_error(r, 400)["message"] and "32" in http_error(r, 400)["message"]
    r = c.post("/objects", {"kind": "model", "args": [], "kwargs": {"max_loras": 2}})
    assert "max_loras=16" in http_error(r, 400)["message"]
    r = c.post("/objects", {"kind": "model", "args": [], "kwargs": {"dtype": "bfloat16"}})
    assert "dtype" in http_error(r, 400)["message"]
    r = c.post("/objects", {"kind": "model", "args": [], "kwargs": {"no_such": 1}})
    assert "no_such" in http_error(r, 400)["message"]
    # Repeating the server's own settings is fine; output_dir is ignored.
    ok = c.create("model", "builtin://tiny-qwen2", max_r=32, max_loras=16, device="cpu", dtype="float32",
                  output_dir="/somewhere/else")
    assert c.delete(f"/objects/{ok}").status_code == 200

    for local in ("/etc/passwd", "./data.jsonl", "swift/self-cognition"):
        r = c.post("/objects", {"kind": "dataset", "args": [local], "kwargs": {}})
        assert "does not read its local files" in http_error(r, 400)["message"]
    # A path as model_id is refused by policy before anything looks at the disk: existing or not, same answer.
    for local in ("/etc/passwd", "/etc/no-such-file-here"):
        r = c.post("/objects", {"kind": "model", "args": [local], "kwargs": {}})
        assert http_error(r, 400)["message"] == (f"model_id {local!r} is not a builtin://, ms:// or hf:// id; "
                                                 "this server does not read its local files")
    for bad in ("hf:///tmp/x", "hf://../../etc", "ms://a/b/c", "hf://.x/y"):
        r = c.post("/objects", {"kind": "dataset", "args": [bad], "kwargs": {}})
        assert "is not a hub id" in http_error(r, 400)["message"], bad
    dataset = c.create("dataset", "builtin://self-cognition")
    err = call_error(c, dataset, "set_template", "Template", model_id="/etc")
    assert "local files" in err["message"]
    err = call_error(c, dataset, "add_dataset", "/tmp/x.jsonl")
    assert "local files" in err["message"]
    r = c.post("/objects", {"kind": "dataloader", "args": [], "kwargs": {"dataset": {"__ref__": dataset}}})
    assert "batch_size" in http_error(r, 400)["message"]
    r = c.post("/objects", {"kind": "dataloader", "args": [], "kwargs": {"dataset": {"__ref__": "obj-nope"},
                                                                          "batch_size": 2}})
    assert http_error(r, 404)["code"] == "not_found"
    c.delete(f"/objects/{dataset}")


def test_malformed_requests(user) -> None:
    c, model = user
    headers = {"Content-Type": codec.CONTENT_TYPE}
    err = http_error(c.http.post(f"/objects/{model}/calls", content=b"\xc1\xff\x00", headers=headers), 400)
    assert err["code"] == "invalid_argument" and "msgpack" in err["message"]
    err = http_error(c.http.post("/objects", content=b"{nope", headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in err["message"]
    err = http_error(c.http.post("/objects", content=b"x", headers={"Content-Type": "text/plain"}), 400)
    assert "Content-Type" in err["message"]
    err = http_error(c.post(f"/objects/{model}/calls", {"calls": [{"seq": 0, "method": "step"}]}), 422)
    assert err["message"] == "calls.0.seq: Input should be greater than or equal to 1"
    err = http_error(c.post(f"/objects/{model}/calls", {"calls": []}), 422)
    assert err["message"].startswith("calls:")
    err = http_error(c.post("/objects", {"kind": "processor"}), 422)
    assert err["message"].startswith("kind:")
    err = http_error(c.post("/objects", [1, 2]), 422)
    err = http_error(c.http.post(f"/objects/{model}/calls", json={"calls": [{"seq": 1, "method": "x", "extra": 1}]}),
                     422)
    assert "calls.0.extra" in err["message"]
    err = http_error(c.get("/training_runs", limit=0), 422)
    assert err["message"] == "limit: Input should be greater than or equal to 1"
    err = http_error(c.get("/no/such/route"), 404)
    assert err["code"] == "not_found"
    err = http_error(c.http.put("/training_runs"), 405)


def test_call_batches_and_bodies_are_capped(user) -> None:
    c, _ = user
    dataset = c.create("dataset", "builtin://self-cognition")
    r = c.calls(dataset, [("__len__", [], {})] * 65)
    err = http_error(r, 400)
    assert err["message"] == "a request may carry at most 64 calls, got 65; send the rest in another request"
    c.seqs[dataset] -= 65
    r = c.calls(dataset, [("__len__", [], {})] * 64)
    assert r.status_code == 200 and len(c.body(r)["results"]) == 64
    # A small gzip body that inflates beyond 256 MiB.
    bomb = gzip.compress(b"\x00" * ((256 << 20) + 1), compresslevel=1)
    r = c.http.post(f"/objects/{dataset}/calls", content=bomb,
                    headers={"Content-Type": codec.CONTENT_TYPE, "Content-Encoding": "gzip"})
    err = http_error(r, 413)
    assert err["code"] == "payload_too_large" and "256 MiB" in err["message"]
    c.delete(f"/objects/{dataset}")


def test_unexpected_failure_is_internal_without_traceback(user, server, raw_helpers) -> None:
    c, _ = user
    model = raw_helpers.raw_model(c, adapter="broken")
    r = c.calls(model, [("save", ["first"], {})])
    (saved,) = c.body(r)["results"]
    assert saved["ok"], saved
    # A fault of the server's own: a file stands where the run's checkpoint folder must be.
    weights = server.data_dir / "runs" / saved["training_run_id"] / "weights"
    shutil.rmtree(weights)
    weights.write_text("not a folder")
    r = c.calls(model, [("save", ["second"], {})])
    results = c.body(r)["results"]
    assert r.status_code == 200 and [x["ok"] for x in results] == [False]
    err = results[0]["error"]
    assert err == {"code": "internal", "message": "internal server error",
                   "request_id": r.headers["x-request-id"], "call": "save", "blocked": False}
    wait_until(lambda: err["request_id"] in server.log(), 30, "the failed request was not logged")
    log = server.log()
    assert "Traceback" in log and "FileExistsError" in log
    c.delete(f"/objects/{model}")


def test_json_error_bodies_for_json_requests(user) -> None:
    c, model = user
    r = c.http.post(f"/objects/{model}/calls", content=json.dumps({"calls": [{"seq": 0, "method": "x"}]}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    r = c.http.post(f"/objects/{model}/calls", content=codec.pack({"calls": [{"seq": 0, "method": "x"}]}),
                    headers={"Content-Type": codec.CONTENT_TYPE})
    assert r.status_code == 422 and r.headers["content-type"].startswith(codec.CONTENT_TYPE)


# --------------------------------------------------------------------- one slot, short expiry
# When an object expires is checked with an explicit clock in test_server_units.py
# (ObjectRegistry.pop_expired, Reaper); here the server process really expires one. The timeout
# leaves room for the few requests that must reach the server before `first` may expire.

IDLE_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory, start_server, add_user, raw_client):
    handle = start_server(tmp_path_factory.mktemp("tight"), "--max-loras", "1", "--idle-timeout", f"{IDLE_TIMEOUT:g}")
    key = add_user(handle.data_dir, "tight")
    yield handle, raw_client(handle, key)
    handle.stop()


def test_no_free_slot_then_expiry_frees_it(tight_server, raw_helpers) -> None:
    handle, c = tight_server
    first = raw_helpers.raw_model(c)
    second = c.create("model")
    err = call_error(c, second, "add_adapter_to_model", "other", LoraConfig(r=4, target_modules="all-linear"))
    assert err["code"] == "capacity" and "max_loras=1" in err["message"]
    run = c.get("/training_runs").json()["training_runs"][0]
    assert run["status"] == "active"
    run_url = f"/training_runs/{run['training_run_id']}"
    # Nobody calls `first` any more: once it has been idle for the timeout the reaper closes it,
    # which frees its slot, detaches its run and is logged (these reads do not count as using it).

    def reaped() -> bool:
        return (c.get("/server").json()["free_slots"] == 1 and c.get(run_url).json()["status"] == "detached"
                and f"{first} expired" in handle.log())

    wait_until(reaped, IDLE_TIMEOUT + 60, "the idle object was not reaped")
    r = c.calls(first, [("get_train_state", [], {})])
    assert r.status_code == 404 and "no object" in c.body(r)["error"]["message"]
    # A new model gets the freed slot.
    third = raw_helpers.raw_model(c, adapter="again")
    assert c.call(third, "get_train_state")["cur_step"] == 0
