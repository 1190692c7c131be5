"""twinkle-server internals that need no server process: worker, schema, records, checkpoints, policy."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from twinkle_server.store import MIGRATIONS, Store
from twinkle_server.worker import DeviceWorker, Fusable, WorkerStopped

from twinkle.protocol import codec

pytestmark = pytest.mark.unit


def test_worker_serves_users_round_robin_and_in_order() -> None:
    worker = DeviceWorker()
    gate = threading.Event()
    order: list[str] = []
    try:
        # Hold the worker so that every later call is queued before any runs.
        blocker = worker.submit("x", gate.wait)
        futures = [worker.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(4)]
        futures += [worker.submit("b", lambda i=i: order.append(f"b{i}")) for i in range(2)]
        futures += [worker.submit("c", lambda: order.append("c0"))]
        gate.set()
        blocker.result(5)
        for f in futures:
            f.result(5)
        assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
        assert worker.call("a", threading.current_thread) is worker.thread
        failing = worker.submit("a", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert worker.submit("a", lambda: 42).result(5) == 42  # a failure does not stop the worker
    finally:
        worker.stop()
    with pytest.raises(WorkerStopped):
        worker.submit("a", lambda: None)


def test_worker_fuses_one_waiting_call_per_user_within_the_token_budget() -> None:
    worker = DeviceWorker(fuse_tokens=100)
    gate = threading.Event()
    passes: list[list[str]] = []
    order: list[str] = []

    def fusable(label: str, tokens: int, group: str = "forward_backward", fail: bool = False) -> Fusable:
        def begin() -> str:
            if fail:
                raise ValueError(f"{label}: bad input")
            return label

        def together(prepared: list[str]) -> list[object]:
            passes.append(list(prepared))
            return [f"ran {p}" for p in prepared]

        return Fusable(group=group, tokens=tokens, begin=begin, together=together,
                       end=lambda prepared, outcome: (order.append(prepared), outcome)[1])

    try:
        blocker = worker.submit("x", gate.wait)
        futures = {
            "a1": worker.submit("a", fusable=fusable("a1", 40)),
            "a2": worker.submit("a", fusable=fusable("a2", 40)),
            "b1": worker.submit("b", fusable=fusable("b1", 40)),
            "c1": worker.submit("c", fusable=fusable("c1", 40)),  # over the budget with a1 + b1
            "d1": worker.submit("d", fusable=fusable("d1", 10, group="forward_only")),
            "e1": worker.submit("e", fusable=fusable("e1", 10, fail=True)),
            "f1": worker.submit("f", lambda: order.append("f1") or "plain"),
        }
        gate.set()
        blocker.result(5)
        results = {k: f.exception(5) or f.result(5) for k, f in futures.items()}
    finally:
        worker.stop()
    # The first pass takes a1, then the next users in line whose waiting call is of the same
    # kind while it fits: b1 (80 tokens), not c1 (120), not d1 (another kind). e1 fails alone.
    assert passes[0] == ["a1", "b1"]
    assert sorted(map(sorted, passes)) == sorted(map(sorted, [["a1", "b1"], ["c1", "a2"], ["d1"]]))
    assert results["a1"] == "ran a1" and results["c1"] == "ran c1" and results["f1"] == "plain"
    assert isinstance(results["e1"], ValueError)
    assert order.index("a1") < order.index("a2")  # one user's calls keep their order
    assert worker.passes == 3 and worker.fused_calls == 5


def test_an_object_knows_which_seqs_never_ran_and_counts_failures_by_seq() -> None:
    from twinkle_server.objects import RemoteObject

    from twinkle.protocol.wire import CallResult

    obj = RemoteObject("obj-1", "model", 1, "u", None)
    obj.record(1, CallResult(seq=1, ok=True))
    obj.record(4, CallResult(seq=4, ok=True))  # 2 and 3 were skipped
    assert [s for s in range(1, 5) if obj.never_ran(s)] == [2, 3]
    obj.failed_seqs += [4, 9]
    assert [obj.failures_through(s) for s in (3, 4, 8, 9)] == [0, 1, 1, 2]


def test_schema_is_versioned(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.db")
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "training_runs", "checkpoints", "metric_points"} <= tables
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this server"):
        Store(tmp_path / "t.db")


# ------------------------------------------------------------------ review fixes, without a server


def _store_with_run(tmp_path: Path):
    from twinkle_server.auth import create_user

    store = Store(tmp_path / "t.db")
    user, _ = create_user(store, "u")
    store.create_run("run-0123456789ab", user.id, base_model="builtin://tiny-qwen2", adapter_name="default",
                     lora_rank=4, lora_config={}, gradient_accumulation_steps=1)
    return store, user, "run-0123456789ab"


def test_non_finite_metrics_are_stored_as_null(tmp_path: Path) -> None:
    store, user, run = _store_with_run(tmp_path)
    try:
        store.add_metric_point(run, step=1, micro_step=1, loss=0.5, num_tokens=3, time_=1.0)
        store.add_metric_point(run, step=2, micro_step=2, loss=float("nan"), num_tokens=3, time_=2.0)
        store.add_metric_point(run, step=3, micro_step=3, loss=float("inf"), num_tokens=3, time_=3.0)
        store.complete_step(run, 2, grad_norm=float("inf"), lr=float("nan"))
        store.update_run_progress(run, cur_step=3, consumed_train_samples=3, last_loss=float("-inf"))
        store.upsert_checkpoint(run, "ck", time_=4.0, size_bytes=1, step=3, consumed_train_samples=3,
                                loss=float("nan"), has_optimizer=False, base_model="b", lora_rank=4)
        points = store.metric_points(run, 0)
        assert [p.loss for p in points] == [0.5, None, None]
        assert points[1].completed and points[1].grad_norm is None and points[1].lr is None
        assert store.get_run(user.id, run).last_loss is None
        assert store.get_checkpoint(user.id, run, "ck").loss is None
        # Everything is JSON-safe (no NaN or Infinity reaches a response).
        from twinkle_server import views

        shown = [*map(views.metric_point, points), views.training_run(store.get_run(user.id, run)),
                 views.checkpoint(store.get_checkpoint(user.id, run, "ck"))]
        for model in shown:
            model.model_dump_json()
    finally:
        store.close()


class _FakeModel:
    """Just enough of MultiLoraTransformersModel for ModelHandle's bookkeeping."""

    model_id = "builtin://tiny-qwen2"

    def __init__(self) -> None:
        self.saved: list[str] = []

    def get_train_state(self, *, adapter_name=None):
        return {"cur_step": 1, "consumed_train_samples": 4, "last_loss": float("nan"),
                "gradient_accumulation_steps": 1, "lr": 0.1}

    def forward_backward(self, inputs, *, adapter_name=None):
        from types import SimpleNamespace

        return SimpleNamespace(step=0, micro_step=1, loss=float("nan"), num_tokens=3)

    def step(self, *, adapter_name=None):
        return True

    def save(self, name, save_optimizer=False, *, adapter_name=None, save_dir=None):
        self.saved.append(name)
        folder = Path(save_dir) / name
        _write_checkpoint(folder)
        return str(folder)


def _write_checkpoint(folder: Path, *, training_state: bool = False, step: int = 1) -> None:
    from twinkle import checkpoint as ckpt

    folder.mkdir(parents=True)
    (folder / ckpt.ADAPTER_CONFIG).write_text("{}")
    (folder / ckpt.ADAPTER_WEIGHTS).write_bytes(b"w" * 16)
    if training_state:
        (folder / ckpt.TRAINING_STATE).write_bytes(b"t")
    ckpt.CheckpointMeta(base_model="builtin://tiny-qwen2", lora_rank=4, cur_step=step, micro_step=step,
                        consumed_train_samples=4 * step, gradient_accumulation_steps=1,
                        has_training_state=training_state).write(folder)


def _book(tmp_path: Path, model=None):
    from twinkle_server.runs import RunBook
    from twinkle_server.settings import Settings

    from twinkle.uploads import UploadJobs

    store, user, run = _store_with_run(tmp_path)
    settings = Settings(data_dir=tmp_path / "data")
    return RunBook(store, settings, model, UploadJobs()), user, run


def _handle(book, user, run):
    from twinkle_server.model_handle import AdapterLink, ModelHandle

    handle = ModelHandle(book, user, "obj-test")
    handle.links["default"] = AdapterLink("default", "obj-test.default", run)
    return handle


def test_bookkeeping_failure_does_not_fail_a_call_that_ran(tmp_path: Path, caplog) -> None:
    import logging

    book, user, run = _book(tmp_path, _FakeModel())
    handle = _handle(book, user, run)

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    for name in ("add_metric_point", "update_run_progress", "complete_step"):
        setattr(book.store, name, broken)
    with caplog.at_level(logging.ERROR, logger="twinkle_server"):
        out, _ = handle.call("forward_backward", [[{"input_ids": [1, 2]}]], {}, request_id="req-abc123")
        assert out.micro_step == 1
        assert handle.call("step", [], {}, request_id="req-def456")[0] is True
    logged = caplog.text
    assert "req-abc123" in logged and "req-def456" in logged and "disk I/O error" in logged
    book.store.close()


class _EvalModel(_FakeModel):
    """forward_only: each row counts 3 labelled tokens; an empty batch has none (loss None)."""

    def forward_only(self, inputs, *, adapter_name=None, return_logits=False):
        return self.forward_only_many([(inputs, adapter_name, return_logits)])[0]

    def forward_only_many(self, calls):
        from twinkle.protocol.outputs import ForwardOutput

        return [ForwardOutput(loss=float(len(rows)) if rows else None, num_tokens=3 * len(rows))
                for rows, _name, _logits in calls]

    def load(self, name, load_optimizer=False, *, adapter_name=None):
        return None


def test_forward_only_records_eval_points_alone_and_fused(tmp_path: Path) -> None:
    from twinkle_server.model_handle import run_together

    model = _EvalModel()
    book, user, run = _book(tmp_path, model)
    handle = _handle(book, user, run)
    store = book.store
    try:
        row = {"input_ids": [1, 2]}
        handle.call("forward_only", [[row, row]], {})  # alone: begin, invoke, end
        call = handle.begin("forward_only", [[row]], {"return_logits": True})  # fused: the worker's path
        handle.end(call, run_together(model, [call])[0])
        handle.call("forward_only", [[]], {})  # no labelled tokens: not an eval point
        # Under the adapter's current step (the fake's cur_step is 1), from since_step on.
        assert [(p.step, p.loss, p.num_tokens, p.superseded) for p in store.eval_points(run, 0)] == [
            (1, 2.0, 6, False), (1, 1.0, 3, False)]
        assert len(store.eval_points(run, 1)) == 2 and store.eval_points(run, 2) == []
        assert store.metric_points(run, 0) == []  # eval points are not training points
        # New weights (not the training state) at the same step: that step's eval points are history.
        path, _ = handle.call("save", ["ck"], {})
        handle.call("load", [path], {})
        assert [p.superseded for p in store.eval_points(run, 0)] == [True, True]
        assert store.run_revision(run)[0] == 1
        handle.call("forward_only", [[row]], {})
        assert [p.superseded for p in store.eval_points(run, 0)] == [True, True, False]
        # A load or resume to step 0 supersedes them with the training points after it.
        assert store.supersede_after(run, 0) == 1
        assert [p.superseded for p in store.eval_points(run, 0)] == [True, True, True]
        assert store.run_revision(run)[0] == 2
        assert not store.delete_run_if_empty(run)  # eval points are history too
    finally:
        store.close()


def test_checkpoint_delete_is_atomic(tmp_path: Path, monkeypatch) -> None:
    from twinkle_server import checkpoints

    from twinkle.errors import NotFoundError
    from twinkle.protocol.names import twinkle_path

    book, user, run = _book(tmp_path)
    weights = book.settings.run_weights_dir(run)
    for name in ("ck", "other"):
        _write_checkpoint(weights / name)
        book.checkpoints.record(run, name)
    real_rmtree = checkpoints.shutil.rmtree

    def crash(path, ignore_errors=False):
        (Path(path) / "adapter_model.safetensors").unlink()  # a part of the folder is gone...
        raise KeyboardInterrupt  # ... and the server dies

    monkeypatch.setattr(checkpoints.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        book.delete_checkpoint(user.id, run, "ck")
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    # The checkpoint is gone for readers; nothing half-deleted looks like a checkpoint.
    assert not (weights / "ck").exists()
    with pytest.raises(NotFoundError):
        book.checkpoints.resolve(user.id, twinkle_path(run, "ck"))
    assert [p.name.startswith(".del-ck-") for p in weights.iterdir() if p.name != "other"] == [True]
    # A folder with its metadata but without its weights is not a checkpoint either.
    (weights / "other" / "adapter_model.safetensors").unlink()
    with pytest.raises(NotFoundError):
        book.checkpoints.resolve(user.id, twinkle_path(run, "other"))
    counts = checkpoints.reconcile(book.store, book.settings)
    assert counts["removed_tmp"] == 1 and counts["dropped"] == 1
    assert [p.name for p in weights.iterdir()] == ["other"] and book.store.all_checkpoints() == []
    book.store.close()


def test_reconcile_restores_a_checkpoint_whose_overwrite_crashed(tmp_path: Path) -> None:
    from twinkle_server import checkpoints

    from twinkle.protocol.names import twinkle_path

    book, user, run = _book(tmp_path)
    weights = book.settings.run_weights_dir(run)
    # The crash came between atomic_directory's renames: only `.old-<name>-<pid>` is left.
    _write_checkpoint(weights / "ck", training_state=True)
    book.checkpoints.record(run, "ck")
    (weights / "ck").rename(weights / ".old-ck-4242")
    _write_checkpoint(weights / ".old-my-ck-17")  # no row: restored and recorded
    _write_checkpoint(weights / ".old-half-5")  # incomplete: removed, never restored
    (weights / ".old-half-5" / "adapter_model.safetensors").unlink()
    _write_checkpoint(weights / "kept")
    book.checkpoints.record(run, "kept")
    _write_checkpoint(weights / ".old-kept-9")  # the new folder is in place: the old one goes
    counts = checkpoints.reconcile(book.store, book.settings)
    assert counts["restored"] == 2 and counts["removed_tmp"] == 2 and counts["dropped"] == 0
    assert sorted(p.name for p in weights.iterdir()) == ["ck", "kept", "my-ck"]
    assert sorted(book.store.all_checkpoints()) == [(run, "ck"), (run, "kept"), (run, "my-ck")]
    row, folder = book.checkpoints.resolve(user.id, twinkle_path(run, "ck"))
    assert folder == weights / "ck" and row.has_optimizer
    book.store.close()


def test_reconcile_renews_a_record_older_than_its_folder(tmp_path: Path) -> None:
    """A save that replaced checkpoint ``latest`` was killed after its rename, before its record:
    the row still describes the old folder. After reconcile the row is the folder's."""
    import shutil

    from twinkle_server import checkpoints

    book, user, run = _book(tmp_path)
    weights = book.settings.run_weights_dir(run)
    _write_checkpoint(weights / "latest", training_state=True, step=4)
    book.checkpoints.record(run, "latest")
    _write_checkpoint(weights / "same", step=2)
    book.checkpoints.record(run, "same")
    shutil.rmtree(weights / "latest")
    _write_checkpoint(weights / "latest", training_state=True, step=6)  # the replacement, unrecorded
    assert book.store.get_checkpoint(user.id, run, "latest").step == 4
    counts = checkpoints.reconcile(book.store, book.settings)
    assert counts["refreshed"] == 1 and counts["added"] == 0 and counts["dropped"] == 0
    renewed = book.store.get_checkpoint(user.id, run, "latest")
    assert renewed.step == 6 and renewed.consumed_train_samples == 24
    assert book.store.get_checkpoint(user.id, run, "same").step == 2
    assert checkpoints.reconcile(book.store, book.settings)["refreshed"] == 0  # settled
    book.store.close()


def test_no_delete_or_overwrite_while_uploading(tmp_path: Path) -> None:
    from twinkle.errors import StateError
    from twinkle.protocol.names import twinkle_path
    from twinkle.uploads import UploadJob

    model = _FakeModel()
    book, user, run = _book(tmp_path, model)
    handle = _handle(book, user, run)
    assert handle.call("save", ["ck"], {})[0] == twinkle_path(run, "ck")
    job = UploadJob("up-1", user.id, "org/name", twinkle_path(run, "ck"), status="running")
    book.uploads._jobs[job.upload_id] = job
    message = f"checkpoint {twinkle_path(run, 'ck')} is being uploaded; try again when the upload ends"
    with pytest.raises(StateError) as err:
        book.delete_checkpoint(user.id, run, "ck")
    assert err.value.message == message
    with pytest.raises(StateError) as err:
        handle.call("save", ["ck"], {"save_optimizer": False})
    assert err.value.message == message and model.saved == ["ck"]
    assert handle.call("save", ["another"], {})[0] == twinkle_path(run, "another")  # other names are fine
    job.status = "failed"
    assert book.delete_checkpoint(user.id, run, "ck") == twinkle_path(run, "ck")
    book.store.close()


def test_hub_ids_must_be_org_slash_name(tmp_path: Path, monkeypatch) -> None:
    from twinkle_server.policy import check_dataset_id, check_remote_id

    from twinkle.errors import InvalidArgumentError

    for bad in ("hf:///tmp/x", "hf://../etc", "hf://a/b/c", "ms://.hidden/x", "hf://org/..", "hf://a..b/c",
                "ms://org", "hf://org/name\nx", "hf://", "ms://org/na me", "hf://org//name"):
        for allow_local in (False, True):
            with pytest.raises(InvalidArgumentError) as err:
                check_remote_id(bad, "dataset", allow_local=allow_local)
            assert "is not a hub id" in err.value.message and "\n" not in err.value.message, bad
    for good in ("hf://org/name", "ms://Qwen/Qwen2.5-0.5B", "hf://a_b-c/d.e", "builtin://self-cognition"):
        check_remote_id(good, "dataset", allow_local=False)
    # An hf:// id that is also a folder where the server runs: the HF loader would read that folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twinkle_data" / "runs").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="local folder"):
        check_dataset_id("hf://twinkle_data/runs", allow_local=False)
    check_dataset_id("hf://twinkle_data/other", allow_local=False)


def test_model_id_policy_comes_before_any_file_lookup(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from twinkle_server.kinds import check_model_kwargs

    from twinkle.errors import InvalidArgumentError

    served = SimpleNamespace(model_id="builtin://tiny-qwen2", max_loras=2, max_r=8, device=None)
    (tmp_path / "exists").write_text("secret")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()

    def refusal(model_id: str) -> str:
        with pytest.raises(InvalidArgumentError) as err:
            check_model_kwargs(served, "float32", [model_id], {})  # type: ignore[arg-type]
        return err.value.message

    present, missing = refusal(str(tmp_path / "exists")), refusal(str(tmp_path / "missing"))
    assert "local files" in present and present.replace("exists", "missing") == missing
    assert refusal("org/name") == refusal("org/other").replace("other", "name") == \
        "this server serves builtin://tiny-qwen2, not ms://org/name"
    assert "is not a hub id" in refusal("hf:///etc/passwd")
    check_model_kwargs(served, "float32", ["builtin://tiny-qwen2"], {})  # type: ignore[arg-type]


def test_request_bodies_are_capped(monkeypatch) -> None:
    import asyncio
    import gzip

    from starlette.requests import Request
    from twinkle_server import wire

    from twinkle.protocol.errors import status_for

    monkeypatch.setattr(wire, "MAX_BODY_BYTES", 1000)

    def request(body: bytes, **headers: str) -> Request:
        chunks = [body[i:i + 300] for i in range(0, len(body), 300)] or [b""]

        async def receive():
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "method": "POST", "path": "/", "headers": raw}, receive)

    def read(req: Request):
        return asyncio.run(wire.read_body(req))

    packed = codec.pack({"calls": [{"seq": 1, "method": "x" * 500}]})
    assert read(request(packed))["calls"][0]["seq"] == 1
    cases = [
        request(b"\x00" * 1001),  # streamed, no length given
        request(b"\x00" * 10, content_length="5000"),  # refused before reading
        request(gzip.compress(b"\x00" * 1001), content_encoding="gzip"),  # a small body that inflates
    ]
    for req in cases:
        with pytest.raises(wire.PayloadTooLargeError) as err:
            read(req)
        assert status_for(err.value.code) == 413 and "MiB" in err.value.message
    assert read(request(gzip.compress(packed), content_encoding="gzip"))["calls"][0]["seq"] == 1


def test_in_flight_idempotent_duplicate_must_be_the_same_request(tmp_path: Path) -> None:
    import asyncio

    import httpx
    from twinkle_server.app import create_app
    from twinkle_server.auth import create_user
    from twinkle_server.errors import ErrorScrubber
    from twinkle_server.objects import ObjectRegistry
    from twinkle_server.settings import Settings

    store = Store(tmp_path / "t.db")
    _, key = create_user(store, "u")

    class Ctx:
        """The parts of ServerContext that object creation uses; creation waits for ``release``."""

        settings = Settings(data_dir=tmp_path)
        objects = ObjectRegistry(60.0, 10)

        def __init__(self) -> None:
            self.store = store
            self.release = asyncio.Event()

        async def run(self, kind, user_id, fn, hub=None):
            await self.release.wait()
            return object()

        def error_info(self, exc, request_id, *, call=None):
            return ErrorScrubber().info(exc, request_id, call=call)

    class Pending(dict):
        """The app's creations in progress, telling the test when a request reaches them: ``added``
        when the first request registers its creation, ``found`` when a later one finds it (that
        request then waits for the first one's outcome before it yields to the event loop)."""

        def __init__(self) -> None:
            super().__init__()
            self.added, self.found = asyncio.Event(), asyncio.Event()

        def __setitem__(self, key, value) -> None:
            super().__setitem__(key, value)
            self.added.set()

        def __contains__(self, key) -> bool:
            hit = super().__contains__(key)
            if hit:
                self.found.set()
            return hit

    async def main() -> None:
        ctx = Ctx()
        app = create_app(ctx)  # type: ignore[arg-type]
        pending = app.state.pending_creations = Pending()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": codec.CONTENT_TYPE, "Idempotency-Key": "k1"}
        body = codec.pack({"kind": "dataset", "args": ["builtin://self-cognition"], "kwargs": {}})
        other = codec.pack({"kind": "dataset", "args": ["hf://org/name"], "kwargs": {}})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t/api/v1") as client:
            first = asyncio.create_task(client.post("/objects", content=body, headers=headers))
            await asyncio.wait_for(pending.added.wait(), 5)  # the first creation runs (and waits)
            # While the first still runs: a different body under the same key is refused at once...
            different = await asyncio.wait_for(client.post("/objects", content=other, headers=headers), 5)
            assert different.status_code == 400
            assert codec.unpack(different.content)["error"]["message"] == \
                "this Idempotency-Key was already used for a different request"
            # ... and the same body shares the first one's outcome.
            pending.found.clear()
            same = asyncio.create_task(client.post("/objects", content=body, headers=headers))
            await asyncio.wait_for(pending.found.wait(), 5)  # `same` now waits for `first`
            assert not first.done() and not same.done()
            ctx.release.set()
            a, b = await asyncio.wait_for(first, 5), await asyncio.wait_for(same, 5)
            assert a.status_code == b.status_code == 200
            assert codec.unpack(a.content)["object_id"] == codec.unpack(b.content)["object_id"]
            assert len(ctx.objects) == 1

    try:
        asyncio.run(main())
    finally:
        store.close()


# ------------------------------------------------------------------ idle expiry, on an explicit clock


def _remote(object_id: str, last_used: float, **kwargs):
    from twinkle_server.objects import RemoteObject

    return RemoteObject(object_id, "dataset", 1, "u", object(), last_used=last_used, **kwargs)


def test_objects_expire_after_the_idle_timeout_unless_in_use() -> None:
    from twinkle_server.objects import ObjectRegistry

    from twinkle.errors import NotFoundError

    registry = ObjectRegistry(idle_timeout=60.0, max_per_user=10)
    idle, later = _remote("obj-idle", 1000.0), _remote("obj-later", 1030.0, idempotency_key="k")
    busy = _remote("obj-busy", 1000.0, busy=1)
    for obj in (idle, later, busy):
        registry.add(obj)
    assert registry.pop_expired(now=1000.0 + 60.0) == []  # idle for exactly the timeout: kept
    assert registry.pop_expired(now=1000.0 + 60.5) == [idle] and idle.closed and len(registry) == 2
    with pytest.raises(NotFoundError, match="it expired or the server restarted"):
        registry.acquire(1, "obj-idle")
    assert registry.pop_expired(now=1e12) == [later]  # a busy object never expires
    assert registry.by_idempotency_key(1, "k") is None and not busy.closed
    # A use restarts the clock: the end of a call (release) ...
    registry.release(busy)
    assert busy.last_used > 1000.0 and registry.pop_expired(now=busy.last_used + 60.0) == []
    # ... and a reference to the object in another object's call.
    busy.last_used = 1000.0
    registry.resolve(1, "obj-busy")
    assert busy.last_used > 1000.0 and registry.pop_expired(now=1000.0 + 61.0) == []
    assert registry.pop_expired(now=busy.last_used + 60.5) == [busy] and len(registry) == 0


def test_reaper_closes_expired_objects_and_survives_a_failing_close() -> None:
    from twinkle_server.objects import ObjectRegistry, Reaper

    registry = ObjectRegistry(idle_timeout=60.0, max_per_user=10)
    closed: list[tuple[str, str]] = []
    changed = threading.Condition()

    def close(obj, why: str) -> None:
        with changed:
            closed.append((obj.object_id, why))
            changed.notify_all()
        raise RuntimeError("closing failed")  # logged; the reaper goes on

    def closed_ids(n: int) -> list[str]:
        with changed:
            assert changed.wait_for(lambda: len(closed) >= n, timeout=30), closed
            return sorted(object_id for object_id, _ in closed)

    registry.add(_remote("obj-a", 0.0))  # idle since 1970
    registry.add(_remote("obj-b", 0.0))
    registry.add(_remote("obj-fresh", 1e12))  # used in the far future: never idle here
    reaper = Reaper(registry, close, interval=0.01)
    reaper.start()
    try:
        assert closed_ids(2) == ["obj-a", "obj-b"]
        registry.add(_remote("obj-c", 0.0))  # a later round still runs after the failures
        assert closed_ids(3) == ["obj-a", "obj-b", "obj-c"]
    finally:
        reaper.stop()
    assert {why for _, why in closed} == {"expired"} and len(registry) == 1
