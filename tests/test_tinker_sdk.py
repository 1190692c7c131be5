"""The unmodified official Tinker SDK (the pinned ``tinker`` of the ``dev`` extra) against a real
twinkle server: a Tinker-driven run trains exactly like the native client, is a twinkle run
(listed, plotted, its checkpoints with ``twinkle://`` and ``tinker://`` paths), and stays its
user's. Everything goes to the loopback server (``TINKER_BASE_URL``; telemetry off); the data is
encoded with twinkle's own template, never the SDK's hub tokenizer."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.server

MODEL = "builtin://tiny-qwen2"
STEPS = 20
SAVE_AT = 10
BATCH = 8
LR = 1e-3
SEED = 42
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(n: int) -> list[dict[str, list[int]]]:
    from twinkle.dataset import Dataset, DatasetMeta

    ds = Dataset(DatasetMeta("builtin://self-cognition"))
    ds.set_template("Template", model_id=MODEL, max_length=512)
    ds.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "us"})
    ds.encode(batched=True)
    return [{"input_ids": list(ds[i]["input_ids"]), "labels": list(ds[i]["labels"])} for i in range(n)]


def _datum(row: dict[str, list[int]]) -> Any:
    """A row as the Tinker cookbook builds one: inputs and targets shifted by one, weight 1 on
    the labelled (assistant) tokens."""
    ids, labels = row["input_ids"], row["labels"]
    weights = [0.0 if label == -100 else 1.0 for label in labels[1:]]
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": weights})


def _batches(rows: list[dict[str, list[int]]]) -> list[list[dict[str, list[int]]]]:
    return [rows[i * BATCH:(i + 1) * BATCH] for i in range(STEPS)]


def _train(client: Any, batches: list[list[dict[str, list[int]]]]) -> list[float]:
    """Submit every step before reading any result (as the SDK's examples do)."""
    futures = [(client.forward_backward([_datum(r) for r in b], "cross_entropy"),
                client.optim_step(types.AdamParams(learning_rate=LR))) for b in batches]
    out = []
    for fb, opt in futures:
        out.append(fb.result().metrics["loss:sum"])
        opt.result()
    return out


@pytest.fixture(scope="module")
def run(server: Any, add_user: Any) -> Iterator[SimpleNamespace]:
    """Alice trains 20 steps through the SDK (saving at step 10) and the same 20 natively; a
    second SDK client goes on from the step-10 state; Bob is a second user."""
    alice, bob = add_user(server.data_dir, "tinker-alice"), add_user(server.data_dir, "tinker-bob")
    rows = _rows(STEPS * BATCH)
    outside: list[object] = []
    loopback: list[object] = []
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            outside.append(address)
            raise OSError(f"this test reaches no address but loopback, not {address}")
        loopback.append(address)
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", loopback_only)
        mp.setenv("TINKER_BASE_URL", server.url)
        mp.setenv("TINKER_TELEMETRY", "0")
        mp.delenv("TINKER_API_KEY", raising=False)
        service = tinker.ServiceClient(api_key=f"tml-{alice}")
        client = service.create_lora_training_client(MODEL, rank=16, seed=SEED, train_unembed=False).result()
        batches = _batches(rows)
        losses = _train(client, batches[:SAVE_AT])
        saved = client.save_state("step10").result()
        losses += _train(client, batches[SAVE_AT:])
        resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
        resumed_losses = _train(resumed, batches[SAVE_AT:])
        yield SimpleNamespace(server=server, alice=alice, bob=bob, rows=rows, service=service, client=client,
                              losses=losses, saved=saved, resumed=resumed, resumed_losses=resumed_losses,
                              run_id=saved.path.split("/")[2], outside=outside,
                              loopback=loopback)
        service.close("success").result()


def _native_losses(server: Any, key: str, batches: list[list[dict[str, list[int]]]]) -> list[float]:
    from peft import LoraConfig

    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    init_twinkle_client(base_url=server.url, api_key=key)
    model = MultiLoraTransformersModel(MODEL)
    model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
                               seed=SEED)
    model.set_loss("WeightedCrossEntropyLoss")
    model.set_optimizer("AdamW", lr=LR, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    outputs = []
    for batch in batches:
        outputs.append(model.forward_backward(inputs=batch))
        model.step()
        model.zero_grad()
    losses = [float(o) for o in outputs]
    model.close()
    return losses


def test_sdk_training_equals_the_native_client(run: SimpleNamespace) -> None:
    native = _native_losses(run.server, run.alice, _batches(run.rows))
    assert len(run.losses) == STEPS
    assert max(abs(a - b) for a, b in zip(run.losses, native, strict=True)) <= 1e-5
    per_token = [loss / sum(1 for r in b for label in r["labels"][1:] if label != -100)
                 for loss, b in zip(run.losses, _batches(run.rows), strict=True)]
    assert per_token[-1] < 0.8 * per_token[0]


def test_a_client_from_the_saved_state_continues_identically(run: SimpleNamespace) -> None:
    assert run.saved.path == f"tinker://{run.run_id}/weights/step10"
    assert max(abs(a - b) for a, b in zip(run.resumed_losses, run.losses[SAVE_AT:], strict=True)) <= 1e-5
    assert run.resumed.model_id != run.client.model_id


def test_cross_entropy_outputs_are_the_target_logprobs(run: SimpleNamespace) -> None:
    """The cookbook's mean NLL from the returned logprobs and weights is loss:sum / weights."""
    data = [_datum(r) for r in run.rows[:BATCH]]
    out = run.client.forward(data, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == BATCH
    total, weight = 0.0, 0.0
    for datum, output in zip(data, out.loss_fn_outputs, strict=True):
        logprobs = output["logprobs"].to_numpy()
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        assert logprobs.shape == (datum.model_input.length,)
        assert (logprobs <= 0).all()
        total -= float((logprobs.astype(np.float64) * weights).sum())
        weight += float(weights.sum())
    assert total == pytest.approx(out.metrics["loss:sum"], rel=1e-5)


def test_importance_sampling_is_its_formula(run: SimpleNamespace) -> None:
    rows = run.rows[:4]
    plain = [_datum(r) for r in rows]
    current = run.resumed.forward(plain, "cross_entropy").result()
    rng = np.random.default_rng(0)
    data, expected = [], 0.0
    for datum, output in zip(plain, current.loss_fn_outputs, strict=True):
        logprobs = output["logprobs"].to_numpy().astype(np.float64)
        advantages = rng.normal(size=logprobs.shape).astype(np.float32)
        sampling = (logprobs + 0.3 * rng.normal(size=logprobs.shape)).astype(np.float32)
        expected -= float((np.exp(logprobs - sampling.astype(np.float64)) * advantages).sum())
        data.append(types.Datum(model_input=datum.model_input, loss_fn_inputs={
            "target_tokens": datum.loss_fn_inputs["target_tokens"], "logprobs": sampling, "advantages": advantages}))
    out = run.resumed.forward_backward(data, "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    for before, after in zip(current.loss_fn_outputs, out.loss_fn_outputs, strict=True):
        assert np.allclose(before["logprobs"].to_numpy(), after["logprobs"].to_numpy(), atol=1e-5)


def test_a_client_side_custom_loss(run: SimpleNamespace) -> None:
    """``forward_backward_custom``: the SDK computes the loss itself and sends its gradient as
    (signed) cross-entropy weights; here the custom loss is cross entropy, so the two agree."""
    import torch

    data = [_datum(r) for r in run.rows[:4]]

    def loss_fn(data: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum() for d, lp in zip(data, logprobs, strict=True))
        return loss, {}

    plain = run.resumed.forward(data, "cross_entropy").result()
    custom = run.resumed.forward_backward_custom(data, loss_fn).result()
    assert custom.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-5)
    assert custom.metrics["surrogate_loss:sum"] == pytest.approx(plain.metrics["loss:sum"], rel=1e-5)


def test_sampling_from_saved_weights(run: SimpleNamespace) -> None:
    from twinkle.template import Template

    saved = run.client.save_weights_for_sampler("final").result()
    assert saved.path == f"tinker://{run.run_id}/sampler_weights/final"
    prompt = Template(model_id=MODEL).encode([{"role": "user", "content": "who are you?"}],
                                             add_generation_prompt=True)["input_ids"]
    greedy = types.SamplingParams(max_tokens=12, temperature=0.0)
    sampler = run.service.create_sampling_client(model_path=saved.path).result()
    result = sampler.sample(types.ModelInput.from_ints(prompt), 2, greedy).result()
    assert len(result.sequences) == 2
    for seq in result.sequences:
        assert 0 < len(seq.tokens) <= 12 and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length") and seq.sequence_id
    assert result.sequences[0].tokens == result.sequences[1].tokens  # greedy
    snapshot = run.client.save_weights_and_get_sampling_client().result()
    again = snapshot.sample(types.ModelInput.from_ints(prompt), 1, greedy).result()
    assert again.sequences[0].tokens == result.sequences[0].tokens  # the same weights
    seeded = types.SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a, b = (sampler.sample(types.ModelInput.from_ints(prompt), 1, seeded).result() for _ in range(2))
    assert a.sequences[0].tokens == b.sequences[0].tokens


def test_the_run_is_a_twinkle_run(run: SimpleNamespace) -> None:
    from twinkle_client import init_twinkle_client
    from twinkle_jupyter.poller import MetricPoller

    rest = tinker.RestClient(base_url=run.server.url, api_key=f"tml-{run.alice}")
    listed = {r.training_run_id: r for r in rest.list_training_runs(limit=100).result().training_runs}
    assert run.run_id in listed and listed[run.run_id].lora_rank == 16
    tinker_paths = {c.tinker_path for c in rest.list_checkpoints(run.run_id).result().checkpoints}
    assert run.saved.path in tinker_paths

    client = init_twinkle_client(base_url=run.server.url, api_key=run.alice)
    assert run.run_id in {r.training_run_id for r in client.list_training_runs(limit=100)}  # %twinkle runs
    record = client.get_training_run(run.run_id)
    assert record.adapter_name == "tinker" and record.cur_step >= STEPS
    checkpoints = {c.checkpoint_id: c for c in client.list_checkpoints(run.run_id)}
    assert checkpoints["step10"].twinkle_path == f"twinkle://{run.run_id}/weights/step10"
    assert checkpoints["step10"].tinker_path == run.saved.path and checkpoints["step10"].has_optimizer
    points = [p for p in client.get_metrics(run.run_id).points if not p.superseded]
    assert [p.loss for p in points[:STEPS]] == pytest.approx(run.losses, abs=1e-5)
    assert all(p.lr == pytest.approx(LR) for p in points[:STEPS])

    from twinkle_jupyter import CheckpointBrowser
    from twinkle_jupyter.resume import choose_checkpoint

    browser = CheckpointBrowser(run.run_id, client=client, namespace={})
    shown = {row[0]: row for row in browser._rows}
    assert shown["step10"][-2:] == [checkpoints["step10"].twinkle_path, run.saved.path]
    assert choose_checkpoint(browser.checkpoints, run.saved.path, run.run_id).checkpoint_id == "step10"

    poller = MetricPoller(client=client)  # what %twinkle plot and the live plot read
    poller.add_run(run.run_id)
    poller.fetch()
    assert len(poller.history(run.run_id).current) >= STEPS

    # The native client loads the Tinker checkpoint by its twinkle:// path and goes on where
    # the Tinker client went on from it.
    from peft import LoraConfig

    from twinkle_client.model import MultiLoraTransformersModel

    model = MultiLoraTransformersModel(MODEL)
    model.add_adapter_to_model("default", LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.set_loss("WeightedCrossEntropyLoss")
    model.set_optimizer("AdamW", lr=LR)
    model.load(checkpoints["step10"].twinkle_path, load_optimizer=True)
    assert float(model.forward_backward(inputs=_batches(run.rows)[SAVE_AT])) == pytest.approx(
        run.resumed_losses[0], abs=1e-5)
    model.close()


def test_another_user_cannot_see_or_load_the_run(run: SimpleNamespace) -> None:
    rest = tinker.RestClient(base_url=run.server.url, api_key=f"tml-{run.bob}")
    assert run.run_id not in {r.training_run_id for r in rest.list_training_runs().result().training_runs}
    with pytest.raises(tinker.NotFoundError):
        rest.get_training_run(run.run_id).result()
    service = tinker.ServiceClient(base_url=run.server.url, api_key=f"tml-{run.bob}")
    with pytest.raises(tinker.NotFoundError):
        service.create_training_client_from_state(run.saved.path).result()
    with pytest.raises(tinker.NotFoundError):
        service.create_sampling_client(model_path=run.saved.path).result()
    service.close("success").result()


def test_a_wrong_key_is_refused(run: SimpleNamespace) -> None:
    wrong = f"tml-{run.alice[:-4]}{'a' if run.alice[-4] != 'a' else 'b'}xyz"
    with pytest.raises(tinker.AuthenticationError, match="invalid API key"):
        tinker.ServiceClient(base_url=run.server.url, api_key=wrong).create_lora_training_client(MODEL, rank=4).result()
    with pytest.raises(tinker.AuthenticationError, match="invalid API key"):
        tinker.RestClient(base_url=run.server.url, api_key=f"tml-{run.bob}x").list_training_runs().result()


def test_data_over_one_requests_limit_is_split_to_fit(run: SimpleNamespace) -> None:
    """The client config gives the SDK the server's limit (``fwdbwd_max_chunk_bytes_count``):
    a ``forward`` of more tokens than one request may carry (``max_tokens_per_call``, 16384
    here) goes in several requests, each within it, and adds up."""
    data = [_datum(r) for r in run.rows[:BATCH]]
    copies = 16384 // sum(d.model_input.length for d in data) + 1
    one = run.resumed.forward(data, "cross_entropy").result()
    out = run.resumed.forward(data * copies, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == len(data) * copies
    assert out.metrics["loss:sum"] == pytest.approx(copies * one.metrics["loss:sum"], rel=1e-4)


def test_nothing_left_loopback(run: SimpleNamespace) -> None:
    assert run.outside == [] and run.loopback  # the guard saw the SDK's connections, all to loopback
