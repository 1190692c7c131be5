"""Sampling in the library: generation leaves training untouched, and its parameters mean
what they say (checked against greedy decoding, the same call again, and plain counting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from twinkle.errors import CheckpointError, InvalidArgumentError, NotFoundError
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol.limits import MAX_SAMPLING_ADAPTERS
from twinkle.sampler import SamplingParams, TorchSampler

pytestmark = pytest.mark.unit

QUESTION = [{"role": "user", "content": "who are you?"}]
ROWS = [[3, 40, 41, 42, 43, 44, 45, 46], [3, 50, 51, 52, 53]]


def _model(tmp_path: Path, **adapter: int) -> MultiLoraTransformersModel:
    model = MultiLoraTransformersModel(output_dir=str(tmp_path), device="cpu", dtype="float32")
    model.add_adapter_to_model("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear",
                                               init_lora_weights=False), **adapter)
    model.set_optimizer("AdamW", lr=1e-2)
    return model


def _batch() -> list[dict[str, list[int]]]:
    return [{"input_ids": row, "labels": row} for row in ROWS]


def _weights(model: MultiLoraTransformersModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model._adapter("a").params]


def test_sampling_mid_window_changes_nothing_of_the_adapter(tmp_path: Path) -> None:
    plain, sampled = _model(tmp_path / "p", gradient_accumulation_steps=2), _model(tmp_path / "s",
                                                                                   gradient_accumulation_steps=2)
    for step in range(3):
        plain.forward_backward(_batch())
        sampled.forward_backward(_batch())
        generator = sampled._adapter("a").generator.get_state().clone()
        grads = [p.grad.clone() for p in sampled._adapter("a").params]
        before = _weights(sampled)
        sampled.sample([QUESTION, [5, 6, 7]], {"max_tokens": 6, "temperature": 1.0, "seed": step})
        assert torch.equal(sampled._adapter("a").generator.get_state(), generator)
        assert all(torch.equal(p.grad, g) for p, g in zip(sampled._adapter("a").params, grads, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(_weights(sampled), before, strict=True))
        for model in (plain, sampled):
            model.forward_backward(_batch())
            model.clip_grad_and_step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain), _weights(sampled), strict=True))
    assert plain.get_train_state() == sampled.get_train_state()


def test_top_k_one_and_a_tiny_top_p_are_greedy(tmp_path: Path) -> None:
    model = _model(tmp_path)
    greedy = model.sample(QUESTION, {"max_tokens": 12, "temperature": 0})[0].sequences[0].tokens
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        hot = model.sample(QUESTION, {"max_tokens": 12, "temperature": 5.0, "seed": 1, **params}, num_samples=3)
        assert [s.tokens for s in hot[0].sequences] == [greedy] * 3


def test_seeded_calls_repeat_and_neighbouring_seeds_share_nothing(tmp_path: Path) -> None:
    model = _model(tmp_path)
    hot = {"max_tokens": 10, "temperature": 2.0}
    two = [s.tokens for s in model.sample(QUESTION, {**hot, "seed": 40}, num_samples=2)[0].sequences]
    assert two == [s.tokens for s in model.sample(QUESTION, {**hot, "seed": 40}, num_samples=2)[0].sequences]
    assert two[0] != two[1]
    # seed=step in a loop: the next call's sequences are not this call's shifted by one
    nxt = [s.tokens for s in model.sample(QUESTION, {**hot, "seed": 41}, num_samples=2)[0].sequences]
    assert not set(map(tuple, two)) & set(map(tuple, nxt))
    unseeded = [model.sample(QUESTION, hot)[0].sequences[0].tokens for _ in range(3)]
    assert len({tuple(t) for t in unseeded}) > 1  # without a seed, calls differ
    # A temperature too small to divide by is refused in one line, as is no room for a prompt.
    with pytest.raises(InvalidArgumentError, match="temperature must be 0"):
        model.sample(QUESTION, {"temperature": 1e-30})
    with pytest.raises(InvalidArgumentError, match="no room for a prompt"):
        model.sample([5], {"max_tokens": 2048})


def test_sampling_works_after_the_last_training_adapter_is_removed(tmp_path: Path) -> None:
    model = _model(tmp_path)
    path = model.save("c")
    sampler = TorchSampler.over(model)
    before = sampler.sample(QUESTION, {"max_tokens": 6, "temperature": 0}, adapter_uri=path)
    base = sampler.sample(QUESTION, {"max_tokens": 6, "temperature": 0})
    model.remove_adapter("a")
    assert sampler.sample(QUESTION, {"max_tokens": 6, "temperature": 0}) == base
    assert sampler.sample(QUESTION, {"max_tokens": 6, "temperature": 0}, adapter_uri=path) == before


def test_inputs_forms_and_errors(tmp_path: Path) -> None:
    model = _model(tmp_path)
    greedy = {"max_tokens": 4, "temperature": 0}
    one = model.sample(QUESTION, greedy)
    assert len(one) == 1
    assert model.sample({"messages": QUESTION}, greedy)[0].sequences == one[0].sequences
    assert model.sample([one[0].prompt_tokens], greedy)[0].sequences == one[0].sequences
    assert model.sample({"input_ids": one[0].prompt_tokens}, greedy)[0].sequences == one[0].sequences
    assert len(model.sample([QUESTION, [5, 6], {"messages": QUESTION}], greedy)) == 3
    assert model.sample(QUESTION, SamplingParams(max_tokens=4, temperature=0))[0].sequences == one[0].sequences
    bad = [([], "non-empty"), (["hi"], "conversation"), ({"text": "hi"}, "'messages' or 'input_ids'"),
           ([[{"role": "robot", "content": "x"}]], "role")]
    for inputs, words in bad:
        with pytest.raises(InvalidArgumentError, match=words):
            model.sample(inputs, greedy)
    for params, words in [({"max_tokens": -1}, "max_tokens"), ({"stop": [""]}, "stop"), ("fast", "dict"),
                          ({"top_k": -2}, "top_k")]:
        with pytest.raises(InvalidArgumentError, match=words) as caught:
            model.sample(QUESTION, params)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidArgumentError, match="num_samples"):
        model.sample(QUESTION, greedy, num_samples=0)
    with pytest.raises(NotFoundError):
        model.sample(QUESTION, greedy, adapter_name="nobody")


def test_checkpoints_for_sampling_are_frozen_bounded_and_fresh(tmp_path: Path) -> None:
    model = _model(tmp_path)
    sampler = TorchSampler.over(model)
    greedy = {"max_tokens": 8, "temperature": 0}
    first = model.save("c")
    rng = torch.random.get_rng_state()
    answer = sampler.sample(QUESTION, greedy, adapter_uri=first)[0].sequences[0].tokens
    sampler.sample(QUESTION, {"max_tokens": 4, "temperature": 1.0, "seed": 3}, adapter_uri=first)
    assert torch.equal(torch.random.get_rng_state(), rng)  # torch's global RNG is every tenant's
    assert answer == model.sample(QUESTION, greedy)[0].sequences[0].tokens
    # Re-saving under the same name is seen (the loaded copy is keyed by the file's time).
    for _ in range(3):
        model.forward_backward(_batch())
        model.clip_grad_and_step(1.0)
    model.save("c")
    answer_now = model.sample(QUESTION, greedy)[0].sequences[0].tokens
    assert sampler.sample(QUESTION, greedy, adapter_uri=first)[0].sequences[0].tokens == answer_now
    for i in range(MAX_SAMPLING_ADAPTERS + 2):
        sampler.sample([5, 6], {"max_tokens": 1}, adapter_uri=model.save(f"k{i}"))
    assert len(model._frozen) == MAX_SAMPLING_ADAPTERS
    frozen = [n for n, p in model._peft.named_parameters() if "frozen" in n]
    assert frozen and not any(p.requires_grad for n, p in model._peft.named_parameters() if "frozen" in n)
    assert model.free_slots == model.max_loras - 1 and model.adapters == ["a"]
    assert all(p.requires_grad for p in model._adapter("a").params)
    with pytest.raises(InvalidArgumentError, match="not both"):
        sampler.sample(QUESTION, greedy, adapter_name="x", adapter_uri=first)
    with pytest.raises(CheckpointError):
        sampler.sample(QUESTION, greedy, adapter_uri=str(tmp_path / "missing"))
    # Weights that do not fit their own config: refused, and nothing of the half-loaded adapter stays.
    import json

    bad = Path(model.save("bad"))
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    loaded = set(model._peft.peft_config)
    with pytest.raises(CheckpointError, match=r"has shape \(4, 128\), expected \(8, 128\)"):
        sampler.sample(QUESTION, greedy, adapter_uri=str(bad))
    assert set(model._peft.peft_config) <= loaded  # (the least recently used may have made room)
    assert sampler.sample(QUESTION, greedy, adapter_uri=first)[0].sequences[0].tokens == answer_now


def test_a_fresh_sampler_samples_the_bare_base_model() -> None:
    sampler = TorchSampler(device="cpu")
    out = sampler.sample([QUESTION, [7, 8, 9]], {"max_tokens": 5, "temperature": 0, "prompt_logprobs": True})
    assert [len(r.sequences[0].tokens) for r in out] == [5, 5]
    assert out[1].prompt_logprobs[0] is None and len(out[1].prompt_logprobs) == 3


def test_a_long_generation_gives_the_device_to_other_users_between_steps(tmp_path: Path, monkeypatch) -> None:
    """Alice samples 64 tokens (4 steps); Bob's training call, queued during her first step,
    runs right after it, not after her whole generation (in-process server, both users' calls
    over HTTP)."""
    import threading

    import httpx
    from support.inprocess import inprocess_server
    from twinkle_server.auth import create_user

    from twinkle.model import multi_lora
    from twinkle.model.generation import DECODE_STEPS_PER_TURN
    from twinkle.protocol import codec

    events: list[str] = []
    started = threading.Event()
    original_step, original_train = multi_lora.Sampling.step, MultiLoraTransformersModel.forward_backward_many

    with inprocess_server(tmp_path / "server") as srv:
        worker = srv.ctx.worker

        def step(self: multi_lora.Sampling) -> bool:
            events.append("sample")
            if len(events) == 1:
                started.set()
                # Hold the first step until Bob's call waits for the device.
                deadline = threading.Event()
                for _ in range(6000):
                    if worker.pending():
                        break
                    deadline.wait(0.01)
            return original_step(self)

        def train(self: MultiLoraTransformersModel, calls: Any) -> Any:
            events.append("train")
            return original_train(self, calls)

        monkeypatch.setattr(multi_lora.Sampling, "step", step)
        monkeypatch.setattr(MultiLoraTransformersModel, "forward_backward_many", train)
        _, bob_key = create_user(srv.ctx.store, "bob")

        def client(key: str) -> httpx.Client:
            return httpx.Client(base_url=srv.base_url + "/api/v1", transport=srv.transport, timeout=300,
                                headers={"Authorization": f"Bearer {key}", "Content-Type": codec.CONTENT_TYPE})

        def post(http: httpx.Client, path: str, data: Any) -> Any:
            reply = http.post(path, content=codec.pack(codec.to_wire(data)))
            assert reply.status_code == 200, reply.text
            return codec.from_wire(codec.unpack(reply.content))

        alice, bob = client(srv.api_key), client(bob_key)
        sampler = post(alice, "/objects", {"kind": "sampler", "args": [], "kwargs": {}})["object_id"]
        model = post(bob, "/objects", {"kind": "model", "args": [], "kwargs": {}})["object_id"]
        config = {"r": 4, "target_modules": "all-linear"}
        post(bob, f"/objects/{model}/calls", {"calls": [
            {"seq": 1, "method": "add_adapter_to_model", "args": ["b", config], "kwargs": {}},
            {"seq": 2, "method": "set_optimizer", "args": ["AdamW"], "kwargs": {"lr": 1e-3}},
        ]})
        answer: list[Any] = []
        params = {"max_tokens": 4 * DECODE_STEPS_PER_TURN, "temperature": 1.0, "seed": 1}
        sampling = threading.Thread(target=lambda: answer.append(post(alice, f"/objects/{sampler}/calls", {
            "calls": [{"seq": 1, "method": "sample", "args": [[5, 6, 7], params], "kwargs": {}}]})))
        sampling.start()
        assert started.wait(120)
        trained = post(bob, f"/objects/{model}/calls", {"calls": [
            {"seq": 3, "method": "forward_backward", "args": [[{"input_ids": ROWS[0], "labels": ROWS[0]}]],
             "kwargs": {}}]})
        sampling.join(300)
        alice.close()
        bob.close()
        order = list(events)
        alone = TorchSampler.over(srv.ctx.model).sample([5, 6, 7], params)
    assert trained["results"][0]["ok"], trained
    result = answer[0]["results"][0]
    assert result["ok"], result
    assert result["value"] == alone  # interleaving changed nothing of the answer
    assert len(alone[0].sequences[0].tokens) > DECODE_STEPS_PER_TURN  # (so it took several steps)
    assert order[:3] == ["sample", "train", "sample"]
