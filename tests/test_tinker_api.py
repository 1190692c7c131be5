"""The Tinker routes in process, request by request: the protobuf messages against the SDK's own
classes, keys, seq ordering and exactly-once, long polling, and one clear error per bad input."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response  # noqa: E402
from twinkle_server.tinker import PREFIX, convert, schema  # noqa: E402

pytestmark = pytest.mark.unit

ROW = list(range(5, 25))


def _datum(row: list[int] = ROW, **inputs: Any) -> Any:
    given = {"target_tokens": row[1:], "weights": [0.0] * 5 + [1.0] * (len(row) - 6), **inputs}
    return types.Datum(model_input=types.ModelInput.from_ints(row[:-1]), loss_fn_inputs=given)


def _fb_body(model_id: str, seq: int, data: list[Any], loss_fn: str = "cross_entropy",
             config: dict[str, Any] | None = None) -> bytes:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=model_id, seq_id=seq)
    return forward_backward_request_to_proto(request).SerializeToString()


# ------------------------------------------------------------------------------ protobuf


def test_requests_parse_as_the_sdk_writes_them() -> None:
    data = [_datum(), _datum(list(range(30, 40)))]
    msg = schema.ForwardBackwardRequest()
    msg.ParseFromString(_fb_body("s:train:0", 7, data, "ppo", {"clip_low_threshold": 0.7}))
    assert (msg.model_id, msg.seq_id, msg.loss_fn) == ("s:train:0", 7, "ppo")
    assert convert.loss_config(msg) == {"clip_low_threshold": 0.7}
    samples, padded, held = convert.samples(msg, "cross_entropy", 1000, 10**6)
    assert samples[0]["input_ids"].tolist() == ROW and samples[0]["labels"].tolist() == [-100] + ROW[1:]
    assert samples[0]["weights"].tolist() == [0.0] + [0.0] * 5 + [1.0] * (len(ROW) - 6)
    assert samples[1]["input_ids"].tolist() == list(range(30, 40))
    assert (padded, held) == (2 * len(ROW), len(ROW) + 10)
    # Every field we declare has the SDK schema's number and type.
    ours = schema.message("ForwardBackwardRequest").DESCRIPTOR
    for name in ("ForwardBackwardRequest", "Datum", "Chunk", "Tensor", "SparseCsr", "ForwardBackwardOutput",
                 "ArrayRecord", "BatchedTensor", "SampleResponse", "SampledSequence", "LossConfigValue"):
        mine = ours.file.message_types_by_name[name]
        theirs = sdk_pb.DESCRIPTOR.message_types_by_name[name]
        for field in mine.fields:
            other = theirs.fields_by_name[field.name]
            mine_kind = (field.number, field.type, field.is_repeated, getattr(field.message_type, "full_name", None))
            assert mine_kind == (other.number, other.type, other.is_repeated,
                                 getattr(other.message_type, "full_name", None)), (name, field.name)


def test_results_read_as_the_sdk_reads_them() -> None:
    out = SimpleNamespace(loss=12.5, logprobs=[[-1.0, -2.0, -0.5], [-3.0]])
    result = deserialize_forward_backward_output(convert.forward_backward_output(out).SerializeToString())
    assert result.metrics == {"loss:sum": 12.5}
    assert [o["logprobs"].tolist() for o in result.loss_fn_outputs] == out.logprobs
    seqs = [SimpleNamespace(tokens=[4, 5], logprobs=[-0.25, -1.5], stop_reason="stop"),
            SimpleNamespace(tokens=[6], logprobs=[-2.0], stop_reason="length")]
    sampled = deserialize_sample_response(convert.sample_response([SimpleNamespace(sequences=seqs)]).SerializeToString())
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in sampled.sequences] == [
        ([4, 5], [-0.25, -1.5], "stop"), ([6], [-2.0], "length")]


# ------------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from support.inprocess import inprocess_server
    from twinkle_server.auth import create_user

    with inprocess_server(tmp_path_factory.mktemp("tinker-api")) as srv:
        _, other = create_user(srv.ctx.store, "other")
        http = httpx.Client(transport=srv.transport, base_url=srv.base_url, timeout=120)

        def post(path: str, body: Any = None, key: str | None = None, **kw: Any) -> httpx.Response:
            headers = {"X-API-Key": f"tml-{key or srv.api_key}", **kw.pop("headers", {})}
            if isinstance(body, bytes):
                return http.post(path, content=body, headers={"Content-Type": "application/x-protobuf", **headers},
                                 **kw)
            return http.post(path, json=body or {}, headers=headers, **kw)

        yield SimpleNamespace(srv=srv, http=http, post=post, other=other, service=srv.app.state.tinker, sessions=[])
        http.close()


@pytest.fixture(autouse=True)
def _finish_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's sessions end with it, so that their models free their adapter slots."""
    yield
    if "api" in request.fixturenames:
        api = request.getfixturevalue("api")
        while api.sessions:
            session, key = api.sessions.pop()
            assert api.post(f"/api/v1/sessions/{session}/finish", {}, key=key).status_code == 200


def _result(api: SimpleNamespace, request_id: str, key: str | None = None) -> Any:
    r = api.post("/api/v1/retrieve_future", {"request_id": request_id}, key=key,
                 headers={"Accept": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("application/x-protobuf"):
        return deserialize_forward_backward_output(r.content)
    return r.json()


def _model(api: SimpleNamespace, rank: int = 4, key: str | None = None) -> str:
    session = api.post("/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "t"},
                       key=key).json()
    api.sessions.append((session["session_id"], key))
    created = api.post("/api/v1/create_model", {"session_id": session["session_id"], "model_seq_id": 0,
                                                "base_model": "builtin://tiny-qwen2",
                                                "lora_config": {"rank": rank, "seed": 1}}, key=key)
    assert created.status_code == 200, created.text
    return _result(api, created.json()["request_id"], key)["model_id"]


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_every_tinker_route_but_healthz_needs_the_key(api: SimpleNamespace) -> None:
    from twinkle_server.tinker.routes import router

    paths = [(m, PREFIX + r.path) for r in router.routes for m in r.methods]
    assert len(paths) >= 20
    for method, path in paths:
        url = "/api/v1" + path[len(PREFIX):].replace("{session_id}", "x").replace("{sampler_id}", "x")
        url = url.replace("{run_id}", "x").replace("{checkpoint_id:path}", "weights/x")
        for key in ("tml-", "tml-tk_000000000000_" + "a" * 43, "tk_nope"):
            r = api.http.request(method, url, headers={"X-API-Key": key}, json={})
            if path.endswith("/healthz"):
                assert r.status_code == 200
                continue
            assert r.status_code == 401, (method, url, key, r.text)
    # Without X-API-Key the same paths are the native ones.
    r = api.http.get("/api/v1/training_runs", headers={"Authorization": f"Bearer {api.srv.api_key}"})
    assert r.status_code == 200 and "cursor" in r.json() and "training_runs" in r.json()


def test_ops_run_in_seq_order_once(api: SimpleNamespace) -> None:
    model = _model(api)
    adam = {"adam_params": {"learning_rate": 0.05}}
    # Arrive as 3, 2, 1: forward (3) must see the update (2) of the gradients of 1.
    forward = api.post("/api/v1/forward_backward?forward_only=true", _fb_body(model, 3, [_datum()])).json()
    step = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 2, **adam}).json()
    first = api.post("/api/v1/forward_backward", _fb_body(model, 1, [_datum()])).json()
    again = api.post("/api/v1/forward_backward", _fb_body(model, 1, [_datum()])).json()
    assert again["request_id"] == first["request_id"]
    before, after = _result(api, first["request_id"]), _result(api, forward["request_id"])
    assert _result(api, step["request_id"])["metrics"] == {}
    assert after.metrics["loss:sum"] < before.metrics["loss:sum"]
    message = _error(api.post("/api/v1/forward_backward", _fb_body(model, 1, [_datum(ROW[:10])])), 400)
    assert "already used for another request" in message
    assert "below the next one" in _error(api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 0, **adam}),
                                          400)
    assert "ahead" in _error(api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 9999, **adam}), 400)


def test_a_gap_that_never_fills_fails_clearly(api: SimpleNamespace) -> None:
    model = _model(api)
    service = api.service
    service.order_wait_s, service.long_poll_s = 1.0, 0.05
    try:
        waiting = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 3, "adam_params": {}}).json()
        polled = _result(api, waiting["request_id"])
        assert polled["type"] == "try_again"
        service.long_poll_s = 30.0
        failed = _result(api, waiting["request_id"])
        assert failed["category"] == "user" and "seq_id 1" in failed["error"] and "did not arrive" in failed["error"]
        late = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 1, "adam_params": {}})
        assert "given up on" in _error(late, 400)
        assert "error" not in _result(api, api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 4,
                                                                           "adam_params": {}}).json()["request_id"])
    finally:
        service.order_wait_s, service.long_poll_s = 30.0, 30.0


def test_bad_input_is_one_clear_user_error(api: SimpleNamespace) -> None:
    model = _model(api)
    seq = iter(range(1, 100))

    def fb(data: list[Any], loss_fn: str = "cross_entropy", config: dict[str, Any] | None = None) -> httpx.Response:
        return api.post("/api/v1/forward_backward", _fb_body(model, next(seq), data, loss_fn, config))

    assert "not supported" in _error(fb([_datum()], "dro"), 400)
    assert "unknown loss_fn" in _error(fb([_datum()], "nope"), 400)
    assert "takes clip_low_threshold" in _error(fb([_datum()], "ppo", {"beta": 1.0}), 400)
    short = types.Datum(model_input=types.ModelInput.from_ints(ROW[:-1]), loss_fn_inputs={"target_tokens": ROW[1:5]})
    assert "target_tokens has 4 values but model_input has 19 tokens" in _error(fb([short]), 400)
    assert "token ids from 0" in _error(fb([_datum([5, 10**6])]), 400)
    assert "not used by cross_entropy" in _error(fb([_datum(advantages=[0.0] * 19)]), 400)
    bare = types.Datum(model_input=types.ModelInput.from_ints(ROW[:-1]), loss_fn_inputs={"target_tokens": ROW[1:]})
    assert "importance_sampling needs loss_fn_inputs advantages, logprobs" in _error(fb([bare], "importance_sampling"),
                                                                                      400)
    big = [_datum([5 + i % 200 for i in range(3000)])] * 8
    assert "max_tokens_per_call" in _error(fb(big), 400)
    session = api.post("/api/v1/create_session", {}).json()["session_id"]
    bad = {"session_id": session, "model_seq_id": 0, "base_model": "builtin://tiny-qwen2"}
    assert "rank" in _error(api.post("/api/v1/create_model", {**bad, "lora_config": {"rank": 1000}}), 400)
    assert "serves" in _error(api.post("/api/v1/create_model", {**bad, "model_seq_id": 1, "base_model": "Qwen/Qwen3-8B",
                                                                "lora_config": {"rank": 4}}), 400)
    assert "already used for another model" in _error(api.post("/api/v1/create_model", {
        **bad, "lora_config": {"rank": 4}}), 400)
    refused = api.post("/api/v1/create_model", {**bad, "lora_config": {"rank": 1000}})
    assert refused.status_code == 200 and "rank" in _result(api, refused.json()["request_id"])["error"]
    assert "only Adam" in _error(api.post("/api/v1/optim_step", {"model_id": model, "seq_id": next(seq),
                                                                 "optimizer_params": {"type": "dimuon"}}), 400)
    assert "beta1" in _error(api.post("/api/v1/optim_step", {"model_id": model, "seq_id": next(seq),
                                                             "adam_params": {"beta1": 1.5}}), 400)
    load = {"model_id": model, "path": "tinker://run-000000000000/weights/x", "optimizer": False}
    missing = api.post("/api/v1/load_weights", {**load, "seq_id": next(seq)}).json()["request_id"]
    assert "no checkpoint" in _result(api, missing)["error"]
    assert "must be a tinker:// path" in _error(api.post("/api/v1/load_weights", {
        **load, "seq_id": next(seq), "path": "/etc/passwd"}), 400)
    # Refused requests spent their seq ids: the next one runs at once.
    assert "error" not in _result(api, api.post("/api/v1/optim_step", {"model_id": model, "seq_id": next(seq),
                                                                       "adam_params": {}}).json()["request_id"])


def test_another_users_things_do_not_exist(api: SimpleNamespace) -> None:
    model = _model(api)
    submitted = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 1, "adam_params": {}}).json()
    assert "no request" in _error(api.post("/api/v1/retrieve_future", {"request_id": submitted["request_id"]},
                                           key=api.other), 404)
    assert "no model" in _error(api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 2, "adam_params": {}},
                                         key=api.other), 404)
    assert "no model" in _error(api.post("/api/v1/get_info", {"model_id": model}, key=api.other), 404)
    session = model.split(":")[0]
    assert "no session" in _error(api.post("/api/v1/session_heartbeat", {"session_id": session}, key=api.other), 404)
    assert api.post("/api/v1/session_heartbeat", {"session_id": session}).status_code == 200


def test_adam_settings_after_the_first_step(api: SimpleNamespace) -> None:
    model = _model(api)
    seq = iter(range(1, 100))

    def step(**params: float) -> Any:
        api.post("/api/v1/forward_backward", _fb_body(model, next(seq), [_datum()]))
        r = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": next(seq), "adam_params": params})
        return _result(api, r.json()["request_id"])

    assert step(learning_rate=0.01, beta2=0.99, grad_clip_norm=1.0)["metrics"]["grad_norm:mean"] > 0
    assert "error" not in step(learning_rate=0.002, beta2=0.99)
    failed = step(learning_rate=0.002, beta2=0.9)
    assert failed["category"] == "user" and "fixed by a model's first optim_step" in failed["error"]
    run_id = api.service.model(api.srv.ctx.store.user_by_name("contract"), model).run_id
    points = api.srv.ctx.store.metric_points(run_id, 0)
    assert [p.lr for p in points if p.completed][:2] == pytest.approx([0.01, 0.002])
    assert np.isfinite([p.loss for p in points]).all()


def test_sampler_weights_and_sampling_bounds(api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_server.tinker import service
    from twinkle_server.tinker.service import EPHEMERAL_KEPT

    model = _model(api)
    session = model.split(":")[0]
    samplers = []
    for n in range(EPHEMERAL_KEPT + 2):
        r = api.post("/api/v1/save_weights_for_sampler", {"model_id": model, "seq_id": n + 1,
                                                          "sampling_session_seq_id": n})
        samplers.append(_result(api, r.json()["request_id"])["sampling_session_id"])
    user = api.srv.ctx.store.user_by_name("contract")
    run_id = api.service.model(user, model).run_id
    names = [c.name for c in api.srv.ctx.store.list_checkpoints(user.id, run_id)]
    assert names == [f"sampler.session-0-{n}" for n in range(2, EPHEMERAL_KEPT + 2)]
    assert sorted(api.service._sessions[session].samplers) == list(range(2, EPHEMERAL_KEPT + 2))
    assert "no sampling session" in _error(api.http.get(f"/api/v1/samplers/{samplers[0]}",
                                                        headers={"X-API-Key": f"tml-{api.srv.api_key}"}), 404)
    info = api.http.get(f"/api/v1/samplers/{samplers[-1]}", headers={"X-API-Key": f"tml-{api.srv.api_key}"}).json()
    assert info["model_path"] == f"tinker://{run_id}/sampler_weights/session-0-{EPHEMERAL_KEPT + 1}"
    prompt = {"chunks": [{"type": "encoded_text", "tokens": ROW}]}
    sample = {"sampling_session_id": samplers[-1], "seq_id": 1, "num_samples": 1, "prompt": prompt,
              "sampling_params": {"max_tokens": 4, "temperature": 0.0}}
    ok = api.post("/api/v1/asample", sample).json()
    assert len(ok["sample_sequence_ids"]) == 1 and api.post("/api/v1/asample", sample).json() == ok
    assert "max_tokens" in _error(api.post("/api/v1/asample", {**sample, "seq_id": 2, "sampling_params": {
        "max_tokens": 10**9}}), 400)
    assert "num_samples" in _error(api.post("/api/v1/asample", {**sample, "seq_id": 3, "num_samples": 0}), 400)
    assert "prompt_logprobs is not supported" in _error(api.post("/api/v1/asample", {
        **sample, "seq_id": 4, "prompt_logprobs": True}), 400)
    assert "no sampling session" in _error(api.post("/api/v1/asample", {**sample, "seq_id": 5}, key=api.other), 404)
    monkeypatch.setattr(service, "SAMPLES_IN_FLIGHT", 0)  # the SDK backs off from a 429 and sends again
    assert api.post("/api/v1/asample", {**sample, "seq_id": 6}).status_code == 429
    assert api.post("/api/v1/session_heartbeat", {"session_id": session}).status_code == 200


# ------------------------------------------------------------------------- bounds


def test_schema_enums_match_the_sdk() -> None:
    ours = schema.message("Tensor").DESCRIPTOR.file
    for name in ("DType", "StopReason"):
        mine = [(v.name, v.number) for v in ours.enum_types_by_name[name].values]
        assert mine == [(v.name, v.number) for v in sdk_pb.DESCRIPTOR.enum_types_by_name[name].values], name
    assert (schema.DTYPE_FLOAT32, schema.DTYPE_INT64, schema.DTYPE_INT32) == (
        sdk_pb.DTYPE_FLOAT32, sdk_pb.DTYPE_INT64, sdk_pb.DTYPE_INT32)
    assert (schema.STOP_REASON_STOP, schema.STOP_REASON_LENGTH) == (sdk_pb.STOP_REASON_STOP, sdk_pb.STOP_REASON_LENGTH)


def _user(api: SimpleNamespace, name: str = "contract") -> Any:
    return api.srv.ctx.store.user_by_name(name)


def _until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition()`` (state the server's loop changes) to hold."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _on_loop(api: SimpleNamespace, coro: Any, timeout: float = 60.0) -> Any:
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, api.srv.transport._loop).result(timeout)


def test_a_non_finite_gradient_norm_is_a_metric_not_a_500(api: SimpleNamespace) -> None:
    model = _model(api)
    huge = _datum(weights=[3e38] * (len(ROW) - 1))
    fb = api.post("/api/v1/forward_backward", _fb_body(model, 1, [huge])).json()["request_id"]
    step = api.post("/api/v1/optim_step", {"model_id": model, "seq_id": 2,
                                           "adam_params": {"learning_rate": 0.01, "grad_clip_norm": 1.0}})
    r = api.post("/api/v1/retrieve_future", {"request_id": step.json()["request_id"]})
    assert r.status_code == 200, r.text
    norm = types.OptimStepResponse.model_validate(r.json()).metrics["grad_norm:mean"]  # as the SDK reads it
    assert not np.isfinite(norm)
    assert not np.isfinite(_result(api, fb).metrics["loss:sum"])
    # A client that does not take protobuf gets the same result as JSON, made when asked.
    as_json = api.post("/api/v1/retrieve_future", {"request_id": fb})
    assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["metrics"]["loss:sum"] in ("inf", "-inf", "nan")
    assert len(as_json.json()["loss_fn_outputs"][0]["logprobs"]["data"]) == len(ROW) - 1


def test_request_sizes_follow_max_tokens_per_call(api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from twinkle_server.tinker.service import fb_body_limit, sample_body_limit

    most = api.srv.ctx.settings.max_tokens_per_call
    config = api.post("/api/v1/client/config", {}).json()
    assert config["fwdbwd_max_chunk_bytes_count"] == 8 * most and config["sample_max_concurrent_requests"] == 64
    model = _model(api)
    # Past the bound a body is refused before it is read in full, saying why.
    huge = _fb_body(model, 1, [_datum([5 + i % 200 for i in range(fb_body_limit(most) // 16 + 2)])])
    assert len(huge) > fb_body_limit(most)
    assert "max_tokens_per_call" in _error(api.post("/api/v1/forward_backward", huge), 413)
    # Within it, a request over the token limit is refused before its samples are built, and
    # off the event loop.
    seen: list[str] = []
    read = api.service.read_forward_backward

    def spy(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return read(*args)

    monkeypatch.setattr(api.service, "read_forward_backward", spy)
    monkeypatch.setattr(convert, "_tensor", lambda *a: pytest.fail("samples were built"))
    over = [_datum([5 + i % 200 for i in range(most // 2 + 1)])] * 2
    assert "max_tokens_per_call" in _error(api.post("/api/v1/forward_backward", _fb_body(model, 1, over)), 400)
    assert seen and seen[0].startswith("twinkle-decode")
    # Sampling: the prompt is bounded by the token limit, the body by the bytes it takes.
    sampler = api.post("/api/v1/create_sampling_session", {"session_id": model.split(":")[0],
                                                           "sampling_session_seq_id": 0,
                                                           "base_model": "builtin://tiny-qwen2"}).json()
    sample = {"sampling_session_id": sampler["sampling_session_id"], "num_samples": 1,
              "sampling_params": {"max_tokens": 4}}
    long = {"chunks": [{"type": "encoded_text", "tokens": [5] * (most + 1)}]}
    assert "max_tokens_per_call" in _error(api.post("/api/v1/asample", {**sample, "prompt": long}), 400)
    bulky = {"chunks": [{"type": "encoded_text", "tokens": [100000] * (sample_body_limit(most) // 7)}]}
    assert "max_tokens_per_call" in _error(api.post("/api/v1/asample", {**sample, "prompt": bulky}), 413)


class _HeldDevice:
    """The device thread held by another user's call until ``release``: calls queue behind it."""

    def __init__(self, api: SimpleNamespace) -> None:
        import threading

        self.started, self.go = threading.Event(), threading.Event()
        self.done = api.srv.ctx.worker.submit(api.other, self._hold)
        assert self.started.wait(60)

    def _hold(self) -> None:
        self.started.set()
        assert self.go.wait(120)

    def release(self) -> None:
        self.go.set()
        self.done.result(60)


def test_waiting_work_is_bounded_per_user(api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_server.tinker import service

    model_id = _model(api)
    model = api.service.model(_user(api), model_id)
    step = {"model_id": model_id, "adam_params": {}}
    held = _HeldDevice(api)
    try:
        monkeypatch.setattr(service, "QUEUED_CALLS", 30 / api.srv.ctx.settings.max_tokens_per_call)
        monkeypatch.setattr(service, "MAX_WAITING", 1)
        first = api.post("/api/v1/optim_step", {**step, "seq_id": 1}).json()["request_id"]
        _until(lambda: model.next_seq == 2, "seq 1 to run")
        # Over the user's data budget (30 tokens; a datum holds 20): not the queue's next one is busy...
        ahead = api.post("/api/v1/forward_backward", _fb_body(model_id, 3, [_datum(), _datum()]))
        assert ahead.status_code == 429 and ahead.headers["retry-after"] == "1", ahead.text
        assert "tokens of data" in ahead.json()["error"]["message"] and np.isfinite(model.busy_at)
        # ... the one it waits for never is.
        second = api.post("/api/v1/forward_backward", _fb_body(model_id, 2, [_datum(), _datum()]))
        assert second.status_code == 200, second.text
        busy = api.post("/api/v1/optim_step", {**step, "seq_id": 3})  # one waiting is MAX_WAITING
        assert busy.status_code == 429 and "requests waiting" in busy.json()["error"]["message"]
    finally:
        held.release()
    assert "error" not in _result(api, first) and _result(api, second.json()["request_id"]).metrics["loss:sum"] > 0
    _until(lambda: not model.waiting and model.runner is None, "the queue to empty")
    assert api.service._queued[_user(api).id] == 0
    # A gap holds the queue: what arrives then gets in (the SDK may send the missing one last),
    # up to QUEUED_HARD times the budget; past that a request is refused, spending its seq id.
    monkeypatch.setattr(service, "QUEUED_HARD", 2)
    later = api.post("/api/v1/optim_step", {**step, "seq_id": 6}).json()["request_id"]
    assert model.blocked
    gap = api.post("/api/v1/forward_backward", _fb_body(model_id, 4, [_datum(), _datum()]))
    assert gap.status_code == 200, gap.text
    over = api.post("/api/v1/forward_backward", _fb_body(model_id, 5, [_datum(), _datum()]))
    assert "send less data per forward_backward call" in _error(over, 400)
    third = api.post("/api/v1/optim_step", {**step, "seq_id": 3}).json()["request_id"]
    for request_id in (third, gap.json()["request_id"], later):
        result = _result(api, request_id)
        assert "error" not in (result if isinstance(result, dict) else {}), result


def test_a_gap_waits_longer_after_a_busy_answer(api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_server.tinker import service

    key = api.other  # a user with no results left over from other tests

    def step(seq: int) -> httpx.Response:
        return api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": seq, "adam_params": {}}, key=key)

    model_id = _model(api, key=key)
    model = api.service.model(_user(api, "other"), model_id)
    api.service.order_wait_s, api.service.long_poll_s = 0.0, 0.2
    try:
        monkeypatch.setattr(service, "FUTURE_BYTES_PER_USER", 1)  # any result not fetched makes the user busy
        first = step(1).json()
        _until(lambda: model.next_seq == 2 and model.runner is None, "seq 1 to run")
        busy = step(2)
        assert busy.status_code == 429 and "not fetched" in busy.json()["error"]["message"]
        assert "error" not in _result(api, first["request_id"], key)
        # Fetched, it goes first when over the bound: the user is not busy any more.
        monkeypatch.setattr(service, "FETCHED_KEPT_S", -1.0)
        assert "no request" in _error(api.post("/api/v1/retrieve_future", first, key=key), 404)
        # seq 3 waits for seq 2 (answered busy just now: the SDK sends it again within 30 s)
        # although the gap's own wait (order_wait_s = 0) is over.
        waiting = step(3).json()
        assert _result(api, waiting["request_id"], key)["type"] == "try_again"
        api.service.long_poll_s = 30.0
        sent = step(2).json()
        assert "error" not in _result(api, sent["request_id"], key)
        assert "error" not in _result(api, waiting["request_id"], key)
    finally:
        api.service.order_wait_s, api.service.long_poll_s = 30.0, 30.0


def test_results_are_kept_once_as_bytes(api: SimpleNamespace) -> None:
    from twinkle_server.tinker.service import Stored

    model = _model(api)
    request_id = api.post("/api/v1/forward_backward", _fb_body(model, 1, [_datum()])).json()["request_id"]
    out = _result(api, request_id)
    stored = api.service._results_of(_user(api)).futures[request_id].done.result()
    assert isinstance(stored, Stored) and stored.message == "ForwardBackwardOutput"
    assert deserialize_forward_backward_output(stored.body).metrics == out.metrics
    assert request_id in api.service._results_of(_user(api)).fetched


def test_a_model_is_not_kept_by_the_heartbeat(api: SimpleNamespace) -> None:
    import time

    model_id = _model(api)
    session = model_id.split(":")[0]
    obj = api.service.model(_user(api), model_id).obj
    obj.last_used = time.time() - api.srv.ctx.settings.idle_timeout - 1
    assert api.post("/api/v1/session_heartbeat", {"session_id": session}).status_code == 200
    expired = api.srv.ctx.objects.pop_expired()
    assert obj in expired  # as the reaper finds it: idle since its last request
    for other in expired:
        api.srv.ctx.close_object(other, "idle")
    assert api.post("/api/v1/session_heartbeat", {"session_id": session}).status_code == 200
    assert model_id not in api.service._models and not api.service._sessions[session].creations
    assert "no model" in _error(api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 1,
                                                                "adam_params": {}}), 404)


def test_session_records_are_bounded(api: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_server.tinker import service

    monkeypatch.setattr(service, "CREATIONS_KEPT", 2)
    session = api.post("/api/v1/create_session", {}).json()["session_id"]
    api.sessions.append((session, None))
    for seq in range(4):
        api.post("/api/v1/create_model", {"session_id": session, "model_seq_id": seq, "lora_config": {"rank": 1000}})
    assert list(api.service._sessions[session].creations) == [2, 3]


def test_closing_a_model_does_not_wait_for_a_missing_seq(api: SimpleNamespace) -> None:
    model_id = _model(api)
    session, _ = api.sessions.pop()
    api.service.order_wait_s = 600.0
    try:
        waiting = api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 2, "adam_params": {}}).json()
        _on_loop(api, api.service.finish(_user(api), session), timeout=30)
    finally:
        api.service.order_wait_s = 30.0
    assert "was closed" in _result(api, waiting["request_id"])["error"]


def test_requests_wait_for_a_model_being_created(api: SimpleNamespace) -> None:
    model_id = _model(api)
    model = api.service.model(_user(api), model_id)
    model.ready = False
    try:
        refused = api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 1, "adam_params": {}})
        assert "still being created" in _error(refused, 400)
    finally:
        model.ready = True
    assert "error" not in _result(api, api.post("/api/v1/optim_step", {"model_id": model_id, "seq_id": 1,
                                                                       "adam_params": {}}).json()["request_id"])
