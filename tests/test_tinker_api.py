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
    samples = convert.samples(msg, "cross_entropy", 1000)
    assert samples[0]["input_ids"] == ROW and samples[0]["labels"] == [-100] + ROW[1:]
    assert samples[0]["weights"] == [0.0] + [0.0] * 5 + [1.0] * (len(ROW) - 6)
    assert samples[1]["input_ids"] == list(range(30, 40))
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
            assert api.post(f"/api/v1/sessions/{api.sessions.pop()}/finish", {}).status_code == 200


def _result(api: SimpleNamespace, request_id: str, key: str | None = None) -> Any:
    r = api.post("/api/v1/retrieve_future", {"request_id": request_id}, key=key,
                 headers={"Accept": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    if r.headers["content-type"].startswith("application/x-protobuf"):
        return deserialize_forward_backward_output(r.content)
    return r.json()


def _model(api: SimpleNamespace, rank: int = 4) -> str:
    session = api.post("/api/v1/create_session", {"tags": [], "user_metadata": {}, "sdk_version": "t"}).json()
    api.sessions.append(session["session_id"])
    created = api.post("/api/v1/create_model", {"session_id": session["session_id"], "model_seq_id": 0,
                                                "base_model": "builtin://tiny-qwen2",
                                                "lora_config": {"rank": rank, "seed": 1}})
    assert created.status_code == 200, created.text
    return _result(api, created.json()["request_id"])["model_id"]


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
