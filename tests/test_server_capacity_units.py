"""Fair shares of a twinkle server, checked without a server process: the data threads'
scheduler, the atomic object cap, the per-call token count, num_proc on a server, the upload
caps, the default shares and the cost of refusing a huge data_slice."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from twinkle.errors import CapacityError, InvalidArgumentError
from twinkle.protocol import codec

pytestmark = pytest.mark.unit
WAIT = 60  # seconds: only a bound on waiting for an event that is due; nothing is timed


# ------------------------------------------------------------------ data threads


def test_one_user_holds_at_most_its_share_of_the_data_threads() -> None:
    from twinkle_server.worker import FairExecutor

    pool = FairExecutor(threads=2, per_key=1, name="test-data")
    gate = threading.Event()
    started = {"a1": threading.Event(), "a2": threading.Event()}

    def slow(name: str) -> str:
        started[name].set()
        gate.wait(WAIT)
        return name

    try:
        a1 = pool.submit("a", lambda: slow("a1"))
        a2 = pool.submit("a", lambda: slow("a2"))
        assert started["a1"].wait(WAIT)
        # User a's second call waits for its first, though a thread is free: that thread is b's.
        assert pool.submit("b", lambda: "b1").result(WAIT) == "b1"
        assert not started["a2"].is_set() and not a2.done()
        assert pool.running("a") == 1 and pool.pending() == 1
        gate.set()
        assert (a1.result(WAIT), a2.result(WAIT)) == ("a1", "a2")
    finally:
        gate.set()
        pool.stop()


def test_data_threads_serve_users_round_robin_within_their_shares() -> None:
    from twinkle_server.worker import FairExecutor, WorkerStopped

    pool = FairExecutor(threads=1, per_key=1, name="test-data")
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = pool.submit("x", lambda: gate.wait(WAIT))
        futures = [pool.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(3)]
        futures += [pool.submit("b", lambda: order.append("b0"))]
        gate.set()
        for f in [blocker, *futures]:
            f.result(WAIT)
        assert order == ["a0", "b0", "a1", "a2"]
        failing = pool.submit("a", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(WAIT)
        assert pool.submit("a", lambda: 7).result(WAIT) == 7  # a failure frees the user's share
    finally:
        pool.stop()
    with pytest.raises(WorkerStopped):
        pool.submit("a", lambda: None)


# ------------------------------------------------------------------ objects per user


def test_concurrent_creations_never_exceed_the_object_cap() -> None:
    from twinkle_server.objects import ObjectRegistry, RemoteObject

    registry = ObjectRegistry(idle_timeout=60.0, max_per_user=5)
    start = threading.Barrier(40)
    built = threading.Event()  # every build waits here, so all 40 overlap
    outcomes: list[str] = []
    changed = threading.Condition()

    def create(i: int) -> None:
        start.wait(WAIT)
        try:
            room = registry.reserve(1)
        except CapacityError as exc:
            outcome = str(exc)
        else:
            with room:
                built.wait(WAIT)
                registry.add(RemoteObject(f"obj-{i}", "dataset", 1, "u", object()), room)
            outcome = "created"
        with changed:
            outcomes.append(outcome)
            changed.notify_all()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    with changed:  # the refused 35 answer while the 5 admitted builds are still running
        assert changed.wait_for(lambda: len(outcomes) >= 35, WAIT)
        assert "created" not in outcomes
    built.set()
    for t in threads:
        t.join(WAIT)
    assert outcomes.count("created") == 5 and len(registry) == 5 and registry.count(1) == 5
    message = next(o for o in outcomes if o != "created")
    assert "max_objects_per_user=5" in message and "--max-objects-per-user" in message
    # Another user has its own room; a failed build gives its room back.
    with registry.reserve(2) as room:
        assert registry.count(2) == 1
    assert registry.count(2) == 0
    room.release()  # twice is harmless
    assert registry.count(2) == 0
    with pytest.raises(ValueError):
        registry.add(RemoteObject("obj-x", "dataset", 2, "v", object()), room)  # released room


# ------------------------------------------------------------------ tokens per call


VOCAB = 1000


def _settings(tmp_path: Path, **kwargs):
    from twinkle_server.settings import Settings

    return Settings(data_dir=tmp_path, **kwargs)


def test_tokens_are_counted_as_sent_and_capped(tmp_path: Path) -> None:
    from twinkle_server.kinds import check_call_size

    settings = _settings(tmp_path, max_tokens_per_call=1000)

    def check(inputs, method="forward_only", as_kwarg=True) -> None:
        wire = codec.to_wire(inputs)
        args, kwargs = ([], {"inputs": wire}) if as_kwarg else ([wire], {})
        check_call_size("model", method, args, kwargs, settings, VOCAB)

    samples = [{"input_ids": list(range(100)), "labels": list(range(100))} for _ in range(10)]
    check(samples)  # 10 x 100: exactly the cap
    ragged = [*samples[:9], {"input_ids": list(range(101)), "labels": list(range(101))}]
    with pytest.raises(CapacityError) as err:
        check(ragged, method="forward_backward", as_kwarg=False)  # padded: 10 x 101
    message = str(err.value)
    assert "1010 tokens (10 rows x 101, padded)" in message
    assert "max_tokens_per_call=1000" in message and "--max-tokens-per-call" in message
    collated = {"input_ids": np.ones((4, 8192), dtype=np.int64), "labels": np.ones((4, 8192), dtype=np.int64)}
    with pytest.raises(CapacityError, match="32768 tokens"):
        check(collated)
    with pytest.raises(CapacityError, match="2002 tokens"):
        check({"input_ids": [[1] * 1001, [2, 3]], "labels": [[1] * 1001, [2, 3]]})  # nested lists
    check({"input_ids": np.ones((2, 500), dtype=np.int64)})
    check("not inputs at all")  # left to the model's input processor
    check_call_size("model", "set_optimizer", ["AdamW"], {"lr": 1e-4}, settings, VOCAB)  # no inputs
    check_call_size("dataset", "map", [samples * 100], {}, settings, VOCAB)  # data objects: not model calls


def test_logits_that_would_not_fit_in_a_reply_are_refused_before_the_call(tmp_path: Path) -> None:
    from twinkle_server.kinds import check_call_size

    from twinkle.protocol.limits import MAX_BODY_BYTES

    settings = _settings(tmp_path, max_tokens_per_call=10**6)
    vocab = 150_000
    fits = MAX_BODY_BYTES // (4 * vocab)  # tokens whose float32 logits fit in one reply
    inputs = {"input_ids": np.ones((1, fits), dtype=np.int64)}
    check_call_size("model", "forward_only", [], {"inputs": codec.to_wire(inputs), "return_logits": True},
                    settings, vocab)
    inputs = {"input_ids": np.ones((1, fits + 1), dtype=np.int64)}
    with pytest.raises(CapacityError, match="more than one reply may carry"):
        check_call_size("model", "forward_only", [], {"inputs": codec.to_wire(inputs), "return_logits": True},
                        settings, vocab)
    # Without logits the same call is only a token count.
    check_call_size("model", "forward_only", [], {"inputs": codec.to_wire(inputs)}, settings, vocab)


# ------------------------------------------------------------------ num_proc


def test_num_proc_is_lowered_to_one_on_a_server_and_kept_locally(tmp_path: Path, monkeypatch) -> None:
    import datasets
    from twinkle_server.kinds import call_data_object, create_dataset

    from twinkle.dataset import Dataset, DatasetMeta

    seen: list[object] = []
    original = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        if kwargs.get("desc") == "map":  # Dataset.map's own call (datasets maps internally, too)
            seen.append(kwargs.get("num_proc"))
        kwargs["num_proc"] = None  # the spy never forks, whatever was asked
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    meta = DatasetMeta("builtin://self-cognition", data_slice=range(8)).to_dict()
    settings = _settings(tmp_path)
    remote = create_dataset(settings, [meta], {})
    init = {"model_name": "Twinkle", "model_author": "Lab"}
    call_data_object("dataset", remote, "map", ["SelfCognitionProcessor"], {"init_args": init, "num_proc": 8},
                     settings)
    assert seen == [None] and len(remote) == 8  # one process: datasets makes no pool
    local = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(8)))
    local.map("SelfCognitionProcessor", init_args=init, num_proc=2)
    assert seen == [None, 2]
    for bad in (0, True, "4"):
        with pytest.raises(InvalidArgumentError, match="num_proc"):
            local.map("SelfCognitionProcessor", init_args=init, num_proc=bad)


# ------------------------------------------------------------------ uploads


def test_uploads_are_capped_per_user_and_in_total(tmp_path: Path, monkeypatch) -> None:
    from twinkle import hub
    from twinkle.uploads import UploadJobs

    release: dict[str, threading.Event] = {}
    arrived: dict[str, threading.Event] = {}
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def fake_upload(folder, hub_model_id, *, token=None, timeout=30.0) -> str:
        with lock:
            running[0] += 1
            running[1] = max(running)
        arrived[hub_model_id].set()
        release[hub_model_id].wait(WAIT)
        with lock:
            running[0] -= 1
        raise RuntimeError("the hub said no")

    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    jobs = UploadJobs(max_running=2, max_per_owner=2, limit_note=", set by --max-uploads-per-user")
    ended: list[str] = []
    changed = threading.Condition()
    run = jobs._run

    def run_and_tell(job, *args) -> None:  # tells the test when an upload has ended
        run(job, *args)
        with changed:
            ended.append(job.upload_id)
            changed.notify_all()

    jobs._run = run_and_tell  # type: ignore[method-assign]
    for name in ("org/a1", "org/a2", "org/b1", "org/a3"):
        release[name], arrived[name] = threading.Event(), threading.Event()
    ids = {}
    for owner, name in (("a", "org/a1"), ("a", "org/a2"), ("b", "org/b1")):
        ids[name] = jobs.start(owner, tmp_path, f"ck-{name}", name, "tok").upload_id
    with pytest.raises(CapacityError) as err:
        jobs.start("a", tmp_path, "ck-a3", "org/a3", "tok")
    assert "max_uploads_per_user=2" in str(err.value) and "--max-uploads-per-user" in str(err.value)
    assert arrived["org/a1"].wait(WAIT) and arrived["org/a2"].wait(WAIT)
    assert jobs.get("b", ids["org/b1"]).status == "queued" and jobs.running() == 2
    release["org/a1"].set()
    assert arrived["org/b1"].wait(WAIT)  # b's upload takes the freed slot
    for event in release.values():
        event.set()
    with changed:
        assert changed.wait_for(lambda: len(ended) == 3, WAIT)
    assert running[1] == 2  # never more than max_running at once
    assert {jobs.get(o, ids[n]).status for o, n in (("a", "org/a1"), ("a", "org/a2"), ("b", "org/b1"))} == {"failed"}
    assert "the hub said no" in (jobs.get("a", ids["org/a1"]).error or "")
    last = jobs.start("a", tmp_path, "ck-a3", "org/a3", "tok")  # ended uploads no longer count
    with changed:
        assert changed.wait_for(lambda: last.upload_id in ended, WAIT)


# ------------------------------------------------------------------ defaults


def test_default_shares(tmp_path: Path) -> None:
    from twinkle_server.settings import Settings, default_loras_per_user

    assert [default_loras_per_user(n) for n in (1, 2, 5, 16)] == [1, 1, 2, 8]
    s = Settings(data_dir=tmp_path)
    assert (s.max_loras, s.loras_per_user, s.data_threads, s.data_threads_per_user) == (5, 2, 4, 1)
    assert (s.max_tokens_per_call, s.max_uploads, s.max_uploads_per_user, s.max_objects_per_user) == \
        (16384, 4, 2, 64)
    assert Settings(data_dir=tmp_path, max_loras=3, max_loras_per_user=3).loras_per_user == 3


def test_cli_refuses_a_share_above_its_total() -> None:
    from twinkle_server.cli import CliError, _check_shares, build_parser

    args = build_parser().parse_args(["serve", "--data-threads", "2", "--data-threads-per-user", "3"])
    with pytest.raises(CliError, match="--data-threads-per-user 3 is more than --data-threads 2"):
        _check_shares(args)
    _check_shares(build_parser().parse_args(["serve", "--max-loras", "3", "--max-loras-per-user", "3"]))


# ------------------------------------------------------------------ data_slice


def test_a_huge_range_is_refused_without_listing_it() -> None:
    from twinkle.dataset import Dataset, DatasetMeta

    meta = DatasetMeta.from_dict({"dataset_id": "builtin://self-cognition", "data_slice": {"range": [0, 10**12, 1]}})
    Dataset("builtin://self-cognition")  # loaded once, so that only the selection is measured below
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgumentError, match=r"selects row 999999999999, but it has \d+ rows"):
            Dataset(meta)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, peak
    picked = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(9, 0, -4)))
    whole = Dataset("builtin://self-cognition")
    assert [picked[i] for i in range(len(picked))] == [whole[9], whole[5], whole[1]]
