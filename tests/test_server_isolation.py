"""twinkle-server: one user can neither see nor touch another user's runs, checkpoints, objects, uploads.

The route walk reads ``/openapi.json``, so a route added later is checked without editing
this file (and a new path parameter name makes the test fail until it is covered).
"""

from __future__ import annotations

import re
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from twinkle.protocol import codec

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def two_users(server, add_user, raw_client, raw_helpers) -> SimpleNamespace:
    """User A trained, saved and started an upload; user B has a model of its own."""
    a = raw_client(server, add_user(server.data_dir, f"a-{uuid.uuid4().hex[:6]}"))
    b = raw_client(server, add_user(server.data_dir, f"b-{uuid.uuid4().hex[:6]}"))
    dataset, loader = raw_helpers.raw_dataloader(a, rows=8, batch_size=4)
    model = raw_helpers.raw_model(a)
    raw_helpers.train_steps(a, model, loader, 1)
    path = a.call(model, "save", "ck", save_optimizer=True)
    run_id = path.split("/")[2]
    upload_id = a.call(model, "upload_to_hub", path, "org/name", hub_token="tok", async_upload=True)
    b_model = raw_helpers.raw_model(b)
    ids = {"run_id": run_id, "checkpoint_id": "ck", "object_id": model, "upload_id": upload_id}
    yield SimpleNamespace(a=a, b=b, ids=ids, path=path, dataset=dataset, loader=loader, model=model,
                          b_model=b_model, server=server)
    for client, obj in ((a, model), (a, loader), (a, dataset), (b, b_model)):
        client.delete(f"/objects/{obj}")


def test_every_route_with_ids_hides_other_users_things(two_users) -> None:
    t = two_users
    spec = httpx.get(t.server.url + "/openapi.json", timeout=60).json()
    checked = 0
    body = codec.pack({"calls": [{"seq": 10_000, "method": "get_train_state"}]})
    for path, ops in spec["paths"].items():
        params = re.findall(r"\{([^}]+)\}", path)
        if not params:
            continue
        assert set(params) <= set(t.ids), f"{path}: a path parameter this test cannot fill; add it to ids"
        url = path.removeprefix("/api/v1").format(**t.ids)
        for method in ops:
            r = t.b.http.request(method.upper(), url, content=body,
                                 headers={"Content-Type": codec.CONTENT_TYPE})
            assert r.status_code in (401, 404, 422), (method, path, r.status_code, r.content[:300])
            assert r.status_code == 404, (method, path, r.status_code)
            assert t.b.body(r)["error"]["code"] == "not_found"
            checked += 1
    assert checked >= 8
    # Nothing of A's was changed by B's attempts.
    assert t.a.get(f"/training_runs/{t.ids['run_id']}/checkpoints/ck").status_code == 200
    assert t.a.call(t.model, "get_train_state")["cur_step"] == 1
    assert t.a.get(f"/uploads/{t.ids['upload_id']}").status_code == 200


def test_listings_are_per_user(two_users) -> None:
    t = two_users
    a_runs = {r["training_run_id"] for r in t.a.get("/training_runs").json()["training_runs"]}
    b_runs = {r["training_run_id"] for r in t.b.get("/training_runs").json()["training_runs"]}
    assert t.ids["run_id"] in a_runs and not a_runs & b_runs and len(b_runs) == 1


def test_references_to_other_users_objects(two_users) -> None:
    t = two_users
    r = t.b.post("/objects", {"kind": "dataloader", "args": [], "kwargs": {"dataset": {"__ref__": t.dataset},
                                                                         "batch_size": 2}})
    assert r.status_code == 404 and t.b.body(r)["error"]["message"].startswith("no object")
    r = t.b.calls(t.b_model, [("forward_backward", [], {"inputs": {"__ref__": t.dataset}})])
    assert t.b.body(r)["results"][0]["error"]["code"] == "not_found"


def test_checkpoint_paths_only_reach_own_runs(two_users) -> None:
    t = two_users
    folder = str(t.server.data_dir / "runs" / t.ids["run_id"] / "weights" / "ck")
    cases = [
        ("load", [t.path], "not_found", f"no checkpoint {t.path}"),
        ("resume_from_checkpoint", [t.path], "not_found", f"no checkpoint {t.path}"),
        ("upload_to_hub", [t.path, "org/name"], "not_found", f"no checkpoint {t.path}"),
        ("load", ["twinkle://run-000000000000/weights/ck"], "not_found", "no checkpoint twinkle://run-000000000000"),
        ("load", ["twinkle://../../etc/passwd"], "not_found", "no checkpoint 'twinkle://../../etc/passwd'"),
        ("load", [folder], "invalid_argument", "pass a twinkle:// path; server paths are not accepted"),
        ("resume_from_checkpoint", [folder], "invalid_argument", "pass a twinkle:// path"),
        ("upload_to_hub", [folder, "org/name"], "invalid_argument", "pass a twinkle:// path"),
    ]
    for method, args, code, message in cases:
        r = t.b.calls(t.b_model, [(method, args, {})])
        err = t.b.body(r)["results"][0]["error"]
        assert err["code"] == code and err["message"].startswith(message), (method, args, err)
    # The owner can use the same path.
    assert t.a.call(t.model, "load", t.path) is None
    r = t.a.calls(t.model, [("load", [folder], {})])
    assert t.a.body(r)["results"][0]["error"]["code"] == "invalid_argument"


def test_upload_status_is_owner_checked(two_users) -> None:
    t = two_users
    assert t.b.get(f"/uploads/{t.ids['upload_id']}").status_code == 404
    deadline = time.monotonic() + 30
    while t.a.get(f"/uploads/{t.ids['upload_id']}").json()["status"] not in ("failed", "completed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
