"""twinkle-server fair shares, against a real server process: no user can take all of a shared
server (adapter slots, objects, data threads, uploads), and one call cannot hold the device
with an oversized batch. Each refusal names the limit and the ``twinkle-server serve`` flag.

Slow hub work is made deterministic with a stand-in Hugging Face endpoint on 127.0.0.1: any
request naming a repository ``slow-*`` is held until the test releases it (then answered 404),
and the test learns of each such request as it arrives.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
from peft import LoraConfig

pytestmark = pytest.mark.server
WAIT = 180  # seconds: only a bound on waiting for something that is due; nothing is timed


class HoldingHub:
    """A Hugging Face endpoint that holds every request about a ``slow-*`` repository until
    ``release()`` and answers everything with 404."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.held: list[str] = []
        """Requests held now (their paths)."""
        self.most_held = 0
        self.arrived: list[str] = []
        self._open = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode(errors="replace") if length else ""
                if "slow-" in self.path or "slow-" in body:
                    hub._hold(f"{self.command} {self.path} {body[:200]}")
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_HEAD = do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _hold(self, what: str) -> None:
        with self.changed:
            self.arrived.append(what)
            self.held.append(what)
            self.most_held = max(self.most_held, len(self.held))
            self.changed.notify_all()
        self._open.wait(WAIT)
        with self.changed:
            self.held.remove(what)
            self.changed.notify_all()

    def wait_held(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.held) >= n, WAIT), self.held

    def close_gate(self) -> None:
        with self.changed:
            self._open.clear()
            self.most_held = 0
            self.arrived.clear()

    def release(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._open.set()
        self._server.shutdown()


@pytest.fixture(scope="module")
def hub():
    h = HoldingHub()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def capacity_server(tmp_path_factory, start_server, hub):
    """A server with small totals (4 adapter slots, 8 objects per user, 2 data threads, 2 uploads,
    1 upload per user) and the default shares otherwise, talking to the holding hub."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("HF_ENDPOINT", hub.url), ("HF_HUB_OFFLINE", "0"), ("HF_DATASETS_OFFLINE", "0"),
                            ("HF_HUB_ETAG_TIMEOUT", "600"), ("HF_HUB_DOWNLOAD_TIMEOUT", "600")):
            env.setenv(name, value)
        handle = start_server(
            tmp_path_factory.mktemp("capacity"), "--max-loras", "4", "--max-objects-per-user", "8",
            "--data-threads", "2", "--max-uploads", "2", "--max-uploads-per-user", "1",
        )
    yield handle
    hub.release()
    handle.stop()


@pytest.fixture
def users(capacity_server, add_user, raw_client):
    """``users(n)``: n fresh clients of the capacity server; their objects are deleted afterwards."""
    made = []

    def make(n: int) -> list:
        clients = []
        for _ in range(n):
            client = raw_client(capacity_server, add_user(capacity_server.data_dir, f"u-{uuid.uuid4().hex[:8]}"))
            client.created = []
            create = client.create

            def tracked(*args, client=client, create=create, **kwargs) -> str:
                object_id = create(*args, **kwargs)
                client.created.append(object_id)
                return object_id

            client.create = tracked
            clients.append(client)
        made.extend(clients)
        return clients

    yield make
    for client in made:  # frees the adapter slots for the next test
        for object_id in client.created:
            client.delete(f"/objects/{object_id}")


def wait_until(condition, what: str) -> None:
    """Poll ``condition()`` (a state of the server) until it holds; fail after ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {WAIT} s"
        time.sleep(0.05)


def outcome(client, response) -> dict:
    """The first call result of a call batch."""
    assert response.status_code == 200, (response.status_code, client.body(response))
    return client.body(response)["results"][0]


def add_adapter(client, model: str, name: str, **lora) -> dict:
    config = LoraConfig(**{"r": 4, "target_modules": "all-linear", **lora})
    return outcome(client, client.calls(model, [("add_adapter_to_model", [name, config], {})]))


def test_adapter_slots_are_shared_between_users(users) -> None:
    a, b, c = users(3)
    a_first, a_second = a.create("model"), a.create("model")
    assert add_adapter(a, a_first, "one")["ok"] and add_adapter(a, a_first, "two")["ok"]
    # A user's third adapter, on any of its models, is over its share (half of 4 slots).
    err = add_adapter(a, a_second, "three")["error"]
    assert err["code"] == "capacity"
    assert "max_loras_per_user=2" in err["message"] and "--max-loras-per-user" in err["message"]
    b_model = b.create("model")
    assert add_adapter(b, b_model, "one")["ok"] and add_adapter(b, b_model, "two")["ok"]
    # All 4 slots are taken now, two by each: the third user is told about the total.
    c_model = c.create("model")
    err = add_adapter(c, c_model, "one")["error"]
    assert err["code"] == "capacity" and "max_loras=4" in err["message"] and "--max-loras" in err["message"]
    # Removing an adapter gives its slot back, to anyone.
    assert outcome(a, a.calls(a_first, [("remove_adapter", ["two"], {})]))["ok"]
    assert add_adapter(c, c_model, "one")["ok"]
    err = add_adapter(a, a_second, "three")["error"]
    assert err["code"] == "capacity" and "max_loras=4" in err["message"]


def test_a_rank_pattern_above_max_r_is_refused(users) -> None:
    (a,) = users(1)
    model = a.create("model")
    for lora in ({"rank_pattern": {"q_proj": 20000}}, {"r": 20000}):
        err = add_adapter(a, model, "big", **lora)["error"]
        assert err["code"] in ("invalid_argument", "capacity"), err
        assert "max_r=32" in err["message"] and "--max-r" in err["message"], err
    assert add_adapter(a, model, "fits", rank_pattern={"q_proj": 32})["ok"]


def test_concurrent_creations_stay_within_the_object_cap(users) -> None:
    a, b = users(2)
    body = {"kind": "model", "args": [], "kwargs": {}}
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: a.post("/objects", body), range(40)))
    created = [a.body(r)["object_id"] for r in replies if r.status_code == 200]
    refused = [a.body(r)["error"] for r in replies if r.status_code != 200]
    a.created += created
    assert len(created) == 8 and len(refused) == 32
    assert {r.status_code for r in replies} == {200, 409}
    assert {e["code"] for e in refused} == {"capacity"}
    assert "max_objects_per_user=8" in refused[0]["message"] and "--max-objects-per-user" in refused[0]["message"]
    assert a.post("/objects", body).status_code == 409  # still at the cap
    assert b.create("model")  # another user has room of its own
    assert a.delete(f"/objects/{created[0]}").status_code == 200
    assert a.create("model")  # a deleted object frees its room


def test_oversized_batches_are_refused_before_the_worker(users, raw_helpers) -> None:
    (a,) = users(1)
    model = raw_helpers.raw_model(a)
    ids = np.full(8192, 7, dtype=np.int64)
    samples = [{"input_ids": ids, "labels": ids} for _ in range(4)]
    collated = {"input_ids": np.full((4, 8192), 7, dtype=np.int64), "labels": np.full((4, 8192), 7, dtype=np.int64)}
    for method, inputs in (("forward_only", samples), ("forward_backward", collated)):
        err = outcome(a, a.calls(model, [(method, [], {"inputs": inputs})]))["error"]
        assert err["code"] == "capacity" and err["call"] == method
        assert "32768 tokens" in err["message"] and "max_tokens_per_call=16384" in err["message"]
        assert "--max-tokens-per-call" in err["message"]
    small = [{"input_ids": np.full(16, 7, dtype=np.int64), "labels": np.full(16, 7, dtype=np.int64)}] * 2
    assert outcome(a, a.calls(model, [("forward_only", [], {"inputs": small})]))["ok"]


def test_slow_data_work_of_one_user_does_not_hold_up_another(users, hub) -> None:
    slow_user, other = users(2)
    hub.close_gate()
    creations = ThreadPoolExecutor(2)
    try:
        slow = [creations.submit(slow_user.post, "/objects",
                                 {"kind": "dataset", "args": [f"hf://lab/slow-{i}"], "kwargs": {}}) for i in range(2)]
        hub.wait_held(1)  # one slow creation is downloading (and stays so until released)
        # Both data threads would be the slow user's without the per-user share; with it, the
        # other user's creation and calls run while the slow one is held.
        dataset = other.create("dataset", {"dataset_id": "builtin://self-cognition", "data_slice": {"range": [0, 8, 1]}})
        assert other.call(dataset, "__len__") == 8
        assert outcome(other, other.calls(dataset, [("map", ["SelfCognitionProcessor"], {
            "init_args": {"model_name": "T", "model_author": "L"}, "num_proc": 8})]))["ok"]
        with hub.changed:
            assert len(hub.held) == 1 and len(hub.arrived) == 1, hub.arrived  # the second waits its turn
        hub.release()
        for future in slow:
            reply = future.result(WAIT)
            assert reply.status_code in (404, 502), (reply.status_code, slow_user.body(reply))
        assert hub.most_held == 1
    finally:
        hub.release()
        creations.shutdown()


def test_uploads_are_capped_per_user_and_in_total(users, raw_helpers, hub) -> None:
    a, b, c = users(3)
    checkpoints = SimpleNamespace()
    for name, client in (("a", a), ("b", b), ("c", c)):
        model = raw_helpers.raw_model(client)
        setattr(checkpoints, name, (model, client.call(model, "save", "ck")))
    hub.close_gate()

    def upload(client, name: str, repo: str):
        model, path = getattr(checkpoints, name)
        return outcome(client, client.calls(model, [("upload_to_hub", [path, f"hf://lab/{repo}"],
                                                     {"hub_token": "tok", "async_upload": True})]))

    try:
        first = upload(a, "a", "slow-a1")
        assert first["ok"]
        hub.wait_held(1)
        err = upload(a, "a", "slow-a2")["error"]  # one upload per user
        assert err["code"] == "capacity"
        assert "max_uploads_per_user=1" in err["message"] and "--max-uploads-per-user" in err["message"]
        assert upload(b, "b", "slow-b1")["ok"]
        hub.wait_held(2)
        third = upload(c, "c", "slow-c1")  # two upload at once: the third waits for a free one
        assert third["ok"]
        status = c.get(f"/uploads/{third['value']}").json()
        assert status["status"] == "queued", status
        with hub.changed:
            assert len(hub.held) == 2
        hub.release()

        def ended(client, upload_id: str) -> bool:
            return client.get(f"/uploads/{upload_id}").json()["status"] in ("completed", "failed")

        for client, result in ((a, first), (c, third)):
            wait_until(lambda client=client, result=result: ended(client, result["value"]), "the upload ended")
        assert hub.most_held == 2
    finally:
        hub.release()
