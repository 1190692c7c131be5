"""The client against small real HTTP servers on 127.0.0.1: transport, pipeline, dataloader, connection.

Two servers stand in for twinkle's: a scripted one (answers a list of canned replies, or
drops the connection) for the transport, and a small object server that speaks the wire
contract of ``twinkle_client.types`` (creation, call batches with seqs run at most once)
over fake objects, for everything built on it.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import twinkle_client
from twinkle import errors
from twinkle.dataloader import DataLoader as LocalDataLoader
from twinkle.model import ForwardBackwardOutput
from twinkle.protocol import codec, events, init_twinkle_client
from twinkle_client import client as client_mod
from twinkle_client.client import TwinkleClient
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset, DatasetMeta
from twinkle_client.model import MultiLoraTransformersModel

DROP = object()  # reply sentinel: close the connection without answering


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    raw: bytes

    @property
    def body(self) -> bytes:
        return gzip.decompress(self.raw) if self.headers.get("Content-Encoding") == "gzip" else self.raw

    def data(self) -> Any:
        if not self.raw:
            return None
        if "msgpack" in (self.headers.get("Content-Type") or ""):
            return codec.unpack(self.body)
        return json.loads(self.body)


Reply = tuple[int, Any] | object


class Loopback:
    """A threaded HTTP/1.1 server on a free port; ``handle(request)`` gives each reply."""

    def __init__(self, handle: Callable[[Request], Reply]) -> None:
        self.handle = handle
        self.requests: list[Request] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                req = Request(self.command, parts.path, parse_qs(parts.query), self.headers, raw)
                outer.requests.append(req)
                reply = outer.handle(req)
                if reply is DROP:
                    self.close_connection = True
                    return
                status, payload = reply
                if isinstance(payload, bytes):
                    ctype, data = codec.CONTENT_TYPE, payload
                else:
                    ctype, data = "application/json", json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]


def error_body(code: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


@pytest.fixture(autouse=True)
def fresh_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts without a current connection and with no twinkle env vars."""
    monkeypatch.delenv("TWINKLE_SERVER_URL", raising=False)
    monkeypatch.delenv("TWINKLE_SERVER_TOKEN", raising=False)
    client_mod._current = None
    yield
    # Objects of this test are released by threads that use the current connection: let them
    # finish here, not during the next test.
    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("twinkle-release-"):
            thread.join(30)
    if client_mod._current is not None:
        client_mod._current.close()
    client_mod._current = None


@pytest.fixture
def scripted() -> Iterator[Callable[..., Loopback]]:
    servers: list[Loopback] = []

    def make(*replies: Reply) -> Loopback:
        script = list(replies)
        server = Loopback(lambda req: script.pop(0) if script else (200, {"status": "ok", "version": "t"}))
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.close()


def fast_client(url: str, **kw: Any) -> TwinkleClient:
    return TwinkleClient(url, kw.pop("api_key", "k"), retry_timeout=kw.pop("retry_timeout", 10.0), **kw)


# =============================================================================== transport


def test_503_twice_then_ok_resends_the_same_request(scripted) -> None:
    server = scripted((503, error_body("unavailable", "busy")), (503, {}), (200, {"status": "ok", "version": "1"}))
    with fast_client(server.url) as client:
        assert client.transport.get_json("/health") == {"status": "ok", "version": "1"}
    assert len(server.requests) == 3


def test_dropped_connection_is_retried_with_identical_bytes(scripted) -> None:
    ok = codec.pack({"object_id": "o1", "kind": "dataset"})
    server = scripted(DROP, (200, ok))
    with fast_client(server.url) as client:
        reply = client.transport.post_msgpack("/objects", {"kind": "dataset", "args": [], "kwargs": {}},
                                              headers={"Idempotency-Key": "abc"})
    assert reply == {"object_id": "o1", "kind": "dataset"}
    first, second = server.requests
    assert first.raw == second.raw
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "abc"


@pytest.mark.parametrize("code", sorted(errors.ERRORS_BY_CODE))
def test_error_bodies_become_typed_errors(scripted, code: str) -> None:
    status = {"unauthenticated": 401, "not_found": 404, "internal": 500}.get(code, 400)
    server = scripted((status, error_body(code, "it went wrong", "req-42")))
    with fast_client(server.url) as client, pytest.raises(errors.ERRORS_BY_CODE[code]) as info:
        client.get_training_run("r1")
    assert type(info.value) is errors.ERRORS_BY_CODE[code]
    assert info.value.message.startswith("it went wrong") and info.value.request_id == "req-42"
    assert "(request id req-42)" in str(info.value)


def test_401_without_body_is_an_authentication_error_with_a_hint(scripted) -> None:
    server = scripted((401, {}))
    with TwinkleClient(server.url) as client, pytest.raises(errors.AuthenticationError, match="TWINKLE_SERVER_TOKEN"):
        client.list_training_runs()


def test_500_without_a_typed_body_is_a_server_error(scripted) -> None:
    server = scripted((500, {"detail": "boom"}))
    with fast_client(server.url) as client, pytest.raises(errors.ServerError, match="HTTP 500"):
        client.get_server_info()


def test_unreachable_server_is_one_transport_error_line() -> None:
    server = Loopback(lambda req: (200, {}))
    url = server.url
    server.close()  # nothing listens on that port any more
    start = time.monotonic()
    with fast_client(url, retry_timeout=1.0) as client, pytest.raises(errors.TransportError) as info:
        client.list_training_runs()
    assert time.monotonic() - start < 5
    text = str(info.value)
    assert text.startswith(f"cannot reach twinkle server at {url}: ") and "\n" not in text
    assert isinstance(info.value, ConnectionError)


def test_health_check_never_raises(scripted) -> None:
    server = scripted((200, {"status": "ok", "version": "1"}), (503, {}))
    with fast_client(server.url) as client:
        assert client.health_check() is True
        assert client.health_check() is False
    with fast_client("http://127.0.0.1:9") as client:
        assert client.health_check(timeout=1) is False


def test_env_vars_are_read_at_call_time(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = scripted(), scripted()
    monkeypatch.setenv("TWINKLE_SERVER_URL", a.url)
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "key-a")
    first = init_twinkle_client()
    assert first.health_check() and first.base_url == a.url
    monkeypatch.setenv("TWINKLE_SERVER_URL", b.url + "/api/v1/")
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "key-b")
    second = init_twinkle_client()
    second.transport.get_json("/health")
    assert second.base_url == b.url
    assert b.requests[-1].headers["Authorization"] == "Bearer key-b"
    assert first.closed and first.transport._http.is_closed


def run_json(run_id: str, **kw: Any) -> dict[str, Any]:
    return {"training_run_id": run_id, "base_model": "builtin://tiny-qwen2", "model_owner": "alice",
            "adapter_name": "default", "created": "2025-01-01T00:00:00Z", **kw}


def ckpt_json(name: str, when: str, step: int) -> dict[str, Any]:
    return {"checkpoint_id": name, "training_run_id": "r1", "twinkle_path": f"twinkle://r1/weights/{name}",
            "time": when, "size_bytes": 10, "step": step, "has_optimizer": True, "base_model": "b"}


def test_management_calls_return_the_contract_models(scripted) -> None:
    ckpts = [ckpt_json("b", "2025-01-02T00:00:00Z", 4), ckpt_json("a", "2025-01-01T00:00:00Z", 2)]
    server = scripted(
        (200, {"training_runs": [run_json("r1")], "cursor": {"limit": 5, "offset": 0, "total_count": 1}}),
        (200, {"checkpoints": ckpts}),
        (200, ckpt_json("a", "2025-01-01T00:00:00Z", 2)),
        (200, {"checkpoints": []}),
        (200, {"success": True, "message": "deleted"}),
    )
    with fast_client(server.url) as client:
        runs, cursor = client.list_training_runs_with_cursor(limit=5)
        assert runs[0].training_run_id == "r1" and cursor.total_count == 1
        assert client.get_latest_checkpoint_path("r1") == "twinkle://r1/weights/b"
        path = client.get_checkpoint_path("r1", "weights/a")
        assert str(path) == path.path == "twinkle://r1/weights/a"
        assert client.get_latest_checkpoint_path("r1") is None
        assert client.delete_checkpoint("ignored", "twinkle://r1/weights/a").success
    assert server.requests[0].query == {"limit": ["5"], "offset": ["0"]}
    assert server.paths()[2] == "/api/v1/training_runs/r1/checkpoints/a"
    assert server.requests[4].method == "DELETE" and server.paths()[4] == "/api/v1/training_runs/r1/checkpoints/a"
    with fast_client(server.url) as client, pytest.raises(errors.InvalidArgumentError):
        client.list_training_runs(limit=0)


def test_an_unexpected_reply_is_a_twinkle_error(scripted) -> None:
    server = scripted((200, {"nope": 1}))
    with fast_client(server.url) as client, pytest.raises(errors.TwinkleError, match="unexpected TrainingRun"):
        client.get_training_run("r1")


# =============================================================================== object server


class FakeModel:
    """Counts what it is asked; ``fail`` makes a named method raise once."""

    def __init__(self, model_id: str = "builtin://tiny-qwen2", **kw: Any) -> None:
        self.micro = 0
        self.fail: dict[str, errors.TwinkleError] = {}
        self.calls: list[str] = []

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)

    def add_adapter_to_model(self, adapter_name: str, config: Any, gradient_accumulation_steps: int = 1,
                             **kw: Any) -> dict[str, str]:
        self._maybe_fail("add_adapter_to_model")
        return {"training_run_id": f"run-{adapter_name}"}

    def forward_backward(self, inputs: Any, **kw: Any) -> ForwardBackwardOutput:
        self._maybe_fail("forward_backward")
        self.micro += 1
        return ForwardBackwardOutput(loss=1.0 / self.micro, num_tokens=len(inputs), batch_size=len(inputs),
                                     step=self.micro - 1, micro_step=self.micro, accumulated=1,
                                     gradient_accumulation_steps=1)

    def clip_grad_norm(self, max_grad_norm: float = 1.0, **kw: Any) -> float:
        self._maybe_fail("clip_grad_norm")
        return 0.5

    def step(self, **kw: Any) -> bool:
        self._maybe_fail("step")
        return True

    def zero_grad(self, **kw: Any) -> bool:
        self._maybe_fail("zero_grad")
        return True

    def lr_step(self, **kw: Any) -> bool:
        self._maybe_fail("lr_step")
        return True

    def set_optimizer(self, *a: Any, **kw: Any) -> None:
        self._maybe_fail("set_optimizer")

    def set_loss(self, *a: Any, **kw: Any) -> None:
        self._maybe_fail("set_loss")

    def save(self, name: str, save_optimizer: bool = False, **kw: Any) -> str:
        self._maybe_fail("save")
        if not re.fullmatch(r"[\w.-]+", name):
            raise errors.InvalidArgumentError(f"checkpoint name must be letters, got {name!r}")
        return f"twinkle://run-default/weights/{name}"

    def load(self, name: str, load_optimizer: bool = False, **kw: Any) -> None:
        self._maybe_fail("load")
        if not isinstance(name, str):
            raise errors.InvalidArgumentError("path must be a string")

    def upload_to_hub(self, checkpoint_dir: str, hub_model_id: str, **kw: Any) -> dict[str, str]:
        self._maybe_fail("upload_to_hub")
        return {"upload_id": "up-1"}


class FakeDataset:
    def __init__(self, dataset_meta: Any) -> None:
        n = len(dataset_meta.data_slice) if dataset_meta.data_slice is not None else 10
        self.rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(n)]
        self.calls: list[str] = []

    def map(self, *a: Any, **kw: Any) -> None:
        self.calls.append("map")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.rows[idx]


class FakeDataLoader:
    """The real local DataLoader behind the two iteration calls of the contract."""

    def __init__(self, dataset: Any, batch_size: int, **kw: Any) -> None:
        self.local = LocalDataLoader(dataset, batch_size, **kw)
        self.it: Iterator[Any] | None = None

    def _twinkle_start_epoch(self, consumed_train_samples: int) -> None:
        self.local.resume_from_checkpoint(consumed_train_samples)
        self.it = iter(self.local)

    def _twinkle_next(self, max_batches: int) -> dict[str, Any]:
        assert self.it is not None
        batches = []
        for batch in self.it:
            batches.append(batch)
            if len(batches) == max_batches:
                break
        else:
            return {"batches": batches, "end": True}
        return {"batches": batches, "end": False}

    def __len__(self) -> int:
        return len(self.local)

    def get_state(self) -> dict[str, Any]:
        return self.local.get_state()

    def resume_from_checkpoint(self, consumed_train_samples: int) -> None:
        self.local.resume_from_checkpoint(consumed_train_samples)


@dataclass
class Slot:
    obj: Any
    kind: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_seq: int = 0


class FakeTwinkle:
    """Speaks the object routes of the contract: seqs run in order, at most once, stop at a failure."""

    KINDS = {"model": FakeModel, "dataset": FakeDataset, "dataloader": FakeDataLoader}

    def __init__(self) -> None:
        self.objects: dict[str, Slot] = {}
        self.by_key: dict[str, str] = {}
        self.executed: list[tuple[str, int, str]] = []
        self.drop_next_reply = False
        self.uploads: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.http = Loopback(self.handle)
        self.url = self.http.url

    def close(self) -> None:
        self.http.close()

    def obj(self, remote: Any) -> Any:
        return self.objects[remote.object_id].obj

    def call_batches(self, object_id: str | None = None) -> list[list[dict[str, Any]]]:
        return [r.data()["calls"] for r in self.http.requests
                if r.path.endswith("/calls") and (object_id is None or f"/{object_id}/" in r.path)]

    def handle(self, req: Request) -> Reply:
        with self.lock:
            return self._handle(req)

    def _resolve(self, ref: str) -> Any:
        return self.objects[ref].obj

    def _handle(self, req: Request) -> Reply:
        path = req.path.removeprefix("/api/v1")
        if path == "/health":
            return 200, {"status": "ok", "version": "fake"}
        if path == "/objects" and req.method == "POST":
            key = req.headers.get("Idempotency-Key")
            if key in self.by_key:
                oid = self.by_key[key]
                return 200, codec.pack({"object_id": oid, "kind": self.objects[oid].kind})
            data = req.data()
            args = codec.from_wire(data["args"], self._resolve)
            kwargs = codec.from_wire(data["kwargs"], self._resolve)
            oid = f"obj-{uuid.uuid4().hex[:12]}"  # unique, as the real server's: a late release of an
            # object from an earlier test must not hit this one
            self.objects[oid] = Slot(self.KINDS[data["kind"]](*args, **kwargs), data["kind"])
            self.by_key[key] = oid
            return 200, codec.pack({"object_id": oid, "kind": data["kind"]})
        if m := re.fullmatch(r"/objects/([\w-]+)/calls", path):
            slot = self.objects.get(m.group(1))
            if slot is None:
                return 404, error_body("not_found", f"no object {m.group(1)}")
            results = []
            for call in req.data()["calls"]:
                seq = call["seq"]
                if seq in slot.results:
                    results.append(slot.results[seq])
                    continue
                assert seq > slot.last_seq, "a seq arrived out of order"
                slot.last_seq = seq
                self.executed.append((m.group(1), seq, call["method"]))
                try:
                    fn = getattr(slot.obj, call["method"])
                    value = fn(*codec.from_wire(call["args"], self._resolve),
                               **codec.from_wire(call["kwargs"], self._resolve))
                    result = {"seq": seq, "ok": True, "value": codec.to_wire(value)}
                except errors.TwinkleError as exc:
                    result = {"seq": seq, "ok": False,
                              "error": {"code": exc.code, "message": exc.message, "call": call["method"]}}
                slot.results[seq] = result
                results.append(result)
                if not result["ok"]:
                    break
            if self.drop_next_reply:
                self.drop_next_reply = False
                return DROP
            return 200, codec.pack({"results": results})
        if m := re.fullmatch(r"/objects/([\w-]+)", path):
            slot = self.objects.pop(m.group(1), None)
            if slot is None:
                return 404, error_body("not_found", f"no object {m.group(1)}")
            return 200, {"object_id": m.group(1), "kind": slot.kind}
        if m := re.fullmatch(r"/uploads/([\w-]+)", path):
            status = self.uploads.pop(0)
            return 200, {"upload_id": m.group(1), "hub_model_id": "me/model", **status}
        return 404, error_body("not_found", f"no route {path}")


@pytest.fixture
def fake() -> Iterator[FakeTwinkle]:
    server = FakeTwinkle()
    init_twinkle_client(server.url, "key-1", retry_timeout=10.0)
    yield server
    server.close()


BATCH = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2


def make_model() -> Any:
    model = MultiLoraTransformersModel("builtin://tiny-qwen2")
    model.add_adapter_to_model("default", {"r": 8})
    return model


def seed_step(model: Any) -> Any:
    output = model.forward_backward(inputs=BATCH)
    model.clip_grad_norm(1.0)
    model.step()
    model.zero_grad()
    model.lr_step()
    return output


def test_training_steps_are_pipelined_and_seqs_run_once_in_order(fake: FakeTwinkle) -> None:
    model = make_model()
    assert model.training_run_id == "run-default"
    outputs = [seed_step(model) for _ in range(10)]
    assert [round(o.loss, 6) for o in outputs] == [round(1 / i, 6) for i in range(1, 11)]
    model.flush()
    batches = fake.call_batches(model.object_id)
    assert len(batches) <= 2 * 10 + 1, f"{len(batches)} round trips for 10 steps"
    seqs = [c["seq"] for b in batches for c in b]
    assert seqs == list(range(1, len(seqs) + 1))
    assert fake.obj(model).calls.count("forward_backward") == 10


def test_a_deferred_failure_surfaces_at_the_next_call_once(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.obj(model).fail["step"] = errors.StateError("no optimizer set")
    output = model.forward_backward(inputs=BATCH)
    norm = model.clip_grad_norm(1.0)
    stepped = model.step()
    zeroed = model.zero_grad()
    model._twinkle_pipeline.join()  # let the batch come back without reading anything
    assert output.loss == 1.0 and norm == 0.5  # calls before the failure ran
    with pytest.raises(errors.StateError, match=r"not run: an earlier call \(step\) failed"):
        bool(zeroed)
    with pytest.raises(errors.StateError, match=r"^step\(\) failed: no optimizer set$"):
        model.lr_step()
    assert model.lr_step() == True  # noqa: E712  (once only, then usable again)
    with pytest.raises(errors.StateError, match=r"step\(\) failed"):
        stepped.result()
    assert "zero_grad" not in fake.obj(model).calls


def test_reading_the_failed_lazy_counts_as_seeing_the_error(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.obj(model).fail["forward_backward"] = errors.InvalidArgumentError("bad batch")
    output = model.forward_backward(inputs=BATCH)
    with pytest.raises(errors.InvalidArgumentError, match=r"forward_backward\(\) failed: bad batch"):
        print(f"loss {output}")
    assert model.step() == True  # noqa: E712


def test_calls_queued_behind_a_failure_are_not_sent(fake: FakeTwinkle) -> None:
    model = make_model()
    pipeline = model._twinkle_pipeline
    fake.obj(model).fail["set_loss"] = errors.UnknownComponentError("no loss named Nope")
    with fake.lock:  # hold the server so that the later calls queue up on the client
        model.set_loss("Nope")
        time.sleep(0.1)
        later = [model.set_optimizer("AdamW"), model.step()]
    pipeline.join()
    for lazy in later:
        with pytest.raises(errors.UnknownComponentError, match="not run"):
            lazy.result()
    with pytest.raises(errors.UnknownComponentError, match=r"set_loss\(\) failed"):
        model.save("x")
    assert fake.obj(model).calls[-1] == "set_loss"


def test_a_waiting_call_behind_a_failure_raises_the_real_error(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.obj(model).fail["step"] = errors.StateError("no optimizer set")
    model.step()
    with pytest.raises(errors.StateError, match=r"step\(\) failed: no optimizer set"):
        model.save("ckpt")
    assert model.save("ckpt") == "twinkle://run-default/weights/ckpt"


def test_a_waiting_call_raises_its_own_error_plainly(fake: FakeTwinkle) -> None:
    model = make_model()
    with pytest.raises(errors.InvalidArgumentError, match=r"^checkpoint name must be letters, got 'a b'$"):
        model.save("a b")
    assert model.step() == True  # noqa: E712


def test_a_reply_lost_after_the_calls_ran_is_replayed_not_rerun(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.drop_next_reply = True
    output = seed_step(model)
    assert output.loss == 1.0
    model.flush()
    executed = [(seq, m) for oid, seq, m in fake.executed if oid == model.object_id]
    assert len(executed) == len({seq for seq, _ in executed}) == 6  # adapter + one step, each once
    assert fake.obj(model).micro == 1


def test_a_reference_flushes_the_referenced_objects_queue_first(fake: FakeTwinkle) -> None:
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(12)))
    ds.map("SelfCognitionProcessor", init_args={"model_name": "a", "model_author": "b"})
    ds.map("Another")
    loader = DataLoader(dataset=ds, batch_size=4)
    assert fake.obj(ds).calls == ["map", "map"]
    assert fake.obj(loader).local.dataset is fake.obj(ds)
    assert len(loader) == 3 and len(ds) == 12 and ds[3] == {"input_ids": [3, 4], "labels": [3, 4]}


def test_a_local_object_cannot_be_sent(fake: FakeTwinkle) -> None:
    from twinkle.dataset import Dataset as LocalDataset

    local = object.__new__(LocalDataset)
    with pytest.raises(errors.InvalidArgumentError, match="local Dataset cannot be sent"):
        DataLoader(dataset=local, batch_size=2)


def test_a_token_batch_travels_in_under_40_percent_of_its_json(fake: FakeTwinkle) -> None:
    import random

    rng = random.Random(0)
    batch = []
    for _ in range(8):
        ids = [rng.randrange(259) for _ in range(512)]
        cut = rng.randrange(50, 400)
        batch.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "attention_mask": [1] * 512})
    model = make_model()
    model.forward_backward(inputs=batch).result()
    request = next(r for r in fake.http.requests if r.path.endswith("/calls") and len(r.raw) > 1000)
    as_json = json.dumps({"calls": [{"seq": 2, "method": "forward_backward", "args": [],
                                     "kwargs": {"inputs": batch}}]}).encode()
    assert len(request.raw) < 0.4 * len(as_json), (len(request.raw), len(as_json))
    packed = len(request.body)  # binary int arrays alone, before gzip
    assert packed < 0.5 * len(as_json)
    assert request.data()["calls"][0]["kwargs"]["inputs"][0]["input_ids"]["__nd__"]  # packed, not a list


def test_bodies_go_plain_to_a_server_that_refuses_gzip(fake: FakeTwinkle) -> None:
    model = make_model()
    handle = fake.http.handle

    def no_gzip(req: Request) -> Reply:
        if req.headers.get("Content-Encoding"):
            return 415, error_body("invalid_argument", "unsupported content encoding")
        return handle(req)

    fake.http.handle = no_gzip
    big = [{"input_ids": list(range(300)) * 4, "labels": list(range(300)) * 4}] * 4
    assert model.forward_backward(inputs=big).num_tokens == 4
    assert model.forward_backward(inputs=big).num_tokens == 4
    encodings = [r.headers.get("Content-Encoding") for r in fake.http.requests if r.path.endswith("/calls")][-3:]
    assert encodings == ["gzip", None, None]


def test_remote_dataloader_break_and_continue_covers_each_sample_once(fake: FakeTwinkle) -> None:
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(22)))
    loader = DataLoader(dataset=ds, batch_size=4, shuffle=True, seed=7)
    local = LocalDataLoader(fake.obj(ds), 4, shuffle=True, seed=7)
    for epoch in range(2):
        seen: list[int] = []
        for i, batch in enumerate(loader):
            seen += [row["input_ids"][0] for row in batch]
            if i == 1:
                break
        assert loader.consumed_train_samples == epoch * 22 + 8
        for batch in loader:  # continues the same epoch
            seen += [row["input_ids"][0] for row in batch]
        expected = [row["input_ids"][0] for batch in local for row in batch]
        assert seen == expected and sorted(seen) == list(range(22))
    assert loader.get_state()["consumed_train_samples"] == 44 == local.consumed_train_samples
    fetches = [c for b in fake.call_batches(loader.object_id) for c in b if c["method"] == "_twinkle_next"]
    assert len(fetches) < 2 * len(local) * 2  # several batches per round trip


def test_dataloader_state_and_resume_are_the_clients(fake: FakeTwinkle) -> None:
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(10)))
    loader = DataLoader(dataset=ds, batch_size=3)
    it = iter(loader)
    first = next(it)
    state = loader.get_state()
    assert state["consumed_train_samples"] == 3 and state["position_in_epoch"] == 3 and state["epoch"] == 0
    loader.resume_from_checkpoint(7)
    assert list(it) == []  # the old iterator's buffer is dropped
    rest = [row["input_ids"][0] for batch in loader for row in batch]
    assert rest == [7, 8, 9] and first[0]["input_ids"][0] == 0
    loader.skip_consumed_samples(1)
    assert loader.get_state()["consumed_train_samples"] == 1
    with pytest.raises(errors.InvalidArgumentError):
        loader.resume_from_checkpoint(-1)
    assert loader.consumed_train_samples == 1


def test_reinit_replaces_the_connection_under_existing_objects(fake: FakeTwinkle) -> None:
    first = client_mod._current
    model = make_model()
    seed_step(model).result()
    second = init_twinkle_client(fake.url, "key-2")
    assert first.closed and not second.closed
    # The old pool closes once its requests in flight (a release, say) have finished.
    deadline = time.monotonic() + 10
    while not first.transport._http.is_closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.transport._http.is_closed
    assert seed_step(model).loss == 0.5
    auth = [r.headers["Authorization"] for r in fake.http.requests if r.path.endswith("/calls")]
    assert auth[0] == "Bearer key-1" and auth[-1] == "Bearer key-2"
    with pytest.raises(errors.StateError, match="was closed"):
        first.list_training_runs()


def test_a_call_caught_between_clients_goes_over_the_new_one(fake: FakeTwinkle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    seed_step(model).result()
    packing, replaced = threading.Event(), threading.Event()
    real_pack = codec.pack

    def pack_after_the_swap(value: Any) -> bytes:
        # The sender has looked up the client; hold it there until the client is replaced.
        if threading.current_thread().name.startswith("twinkle-sender") and not packing.is_set():
            packing.set()
            assert replaced.wait(10)
        return real_pack(value)

    monkeypatch.setattr(codec, "pack", pack_after_the_swap)
    output = model.forward_backward(inputs=BATCH)
    assert packing.wait(10)
    init_twinkle_client(fake.url, "key-2")  # the old pool is idle, so it closes now
    replaced.set()
    assert output.loss == 0.5
    auth = [r.headers["Authorization"] for r in fake.http.requests if r.path.endswith("/calls")]
    assert auth[-1] == "Bearer key-2"


def test_an_object_stays_bound_to_its_server(fake: FakeTwinkle) -> None:
    model = make_model()
    seed_step(model).result()
    other = FakeTwinkle()
    try:
        init_twinkle_client(other.url, "key-2")
        with pytest.raises(errors.StateError, match=f"lives on {fake.url}.*connects to {other.url}"):
            seed_step(model).result()
        model.close()  # the release must not go to the other server
        assert not [r for r in other.http.requests if "/objects" in r.path]
    finally:
        other.close()


def test_an_object_made_before_init_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeTwinkle()
    try:
        monkeypatch.setenv("TWINKLE_SERVER_URL", server.url)
        monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "env-key")
        model = MultiLoraTransformersModel()
        assert model.step() == True  # noqa: E712
        assert server.http.requests[0].headers["Authorization"] == "Bearer env-key"
        assert twinkle_client.current_client().base_url == server.url
    finally:
        server.close()


def test_events_are_emitted_at_call_time(fake: FakeTwinkle) -> None:
    seen: list[events.TrainingEvent] = []

    def broken(event: events.TrainingEvent) -> None:
        raise RuntimeError("a listener bug")

    unsubscribe = events.subscribe(seen.append)
    unsubscribe_broken = events.subscribe(broken)
    try:
        model = make_model()
        with fake.lock:  # the server cannot answer: events must not wait for it
            output = model.forward_backward(inputs=BATCH)
            model.step()
            kinds = [e.kind for e in seen]
        assert kinds == ["adapter_added", "forward_backward", "step"]
        assert seen[1].value is output and seen[1].run_id == "run-default" and seen[1].model is model
        path = model.save("s1")
        model.load(path)
        assert [e.kind for e in seen[-2:]] == ["save", "load"] and seen[-2].value == path
    finally:
        unsubscribe()
        unsubscribe_broken()
    model.step()
    assert seen[-1].kind == "load"


def test_upload_to_hub_follows_the_server_upload(fake: FakeTwinkle, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_client import model as model_mod

    model = make_model()
    fake.uploads += [{"status": "queued"}, {"status": "running", "progress": "3/5 files"},
                     {"status": "completed"}]
    monkeypatch.setattr(model_mod, "UPLOAD_POLL_S", (0.01, 0.01))
    assert model.upload_to_hub("twinkle://run-default/weights/s1", "me/model") is None
    err = capsys.readouterr().err
    assert "queued" in err and "running (3/5 files)" in err and "completed" in err
    assert model.upload_to_hub("twinkle://run-default/weights/s1", "me/model", async_upload=True) == "up-1"
    fake.uploads += [{"status": "failed", "error": "hub said no"}]
    with pytest.raises(errors.HubError, match="hub said no"):
        model.upload_to_hub("twinkle://run-default/weights/s1", "me/model")


def test_close_deletes_the_server_object_and_gc_stops_the_sender(fake: FakeTwinkle) -> None:
    model = make_model()
    model.step()
    model.close()
    model.close()
    assert model.object_id not in fake.objects
    with pytest.raises(errors.StateError, match="was closed"):
        model.step()
    other = make_model()
    other.step().result()
    thread = other._twinkle_pipeline._thread
    assert thread is not None and thread.is_alive()
    del other
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_signature_binding_sends_only_what_was_given(fake: FakeTwinkle) -> None:
    model = make_model()
    model.clip_grad_norm(0.5, adapter_name="default")
    model.save("s2", True)
    model.flush()
    calls = [c for b in fake.call_batches(model.object_id) for c in b]
    assert (calls[-2]["args"], calls[-2]["kwargs"]) == ([], {"max_grad_norm": 0.5, "adapter_name": "default"})
    assert (calls[-1]["args"], calls[-1]["kwargs"]) == ([], {"name": "s2", "save_optimizer": True})


def test_no_env_means_the_default_url_and_a_bad_url_is_refused() -> None:
    client = init_twinkle_client()
    assert client.base_url == "http://127.0.0.1:8000" and os.environ.get("TWINKLE_SERVER_URL") is None
    with pytest.raises(errors.InvalidArgumentError, match="http://"):
        init_twinkle_client("localhost:8000")
    assert client_mod._current is client  # a failed init leaves the connection as it was
