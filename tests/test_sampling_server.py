"""Sampling through a real twinkle server: ``model.sample`` on an adapter while it trains,
``TorchSampler`` on the base model and on checkpoints, each compared with an independent
computation (the local library, a forward pass, the same call again)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from peft import LoraConfig

import twinkle.model
import twinkle.sampler
import twinkle_client.model
import twinkle_client.sampler
from twinkle import errors
from twinkle_client import client as client_mod
from twinkle_client import init_twinkle_client

pytestmark = pytest.mark.server

MODEL = "builtin://tiny-qwen2"
QUESTION = [{"role": "user", "content": "who are you?"}]
GREEDY = {"max_tokens": 24, "temperature": 0}

LOCAL = SimpleNamespace(Model=twinkle.model.MultiLoraTransformersModel, Sampler=twinkle.sampler.TorchSampler)
REMOTE = SimpleNamespace(Model=twinkle_client.model.MultiLoraTransformersModel,
                         Sampler=twinkle_client.sampler.TorchSampler)


def _connect(server: Any, key: str) -> Any:
    client_mod._current = None
    return init_twinkle_client(base_url=server.url, api_key=key)


def _answer_rows() -> list[dict[str, Any]]:
    """A few conversations teaching one fixed answer (what a self-cognition run does)."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Twinkle."}]}
            for q in ("who are you?", "what are you?", "your name?", "who made you?")]


def _trained(ns: SimpleNamespace, tmp: Any, steps: int = 20) -> Any:
    """A model whose adapter has learned the fixed answer (same data, same seed, either side)."""
    from twinkle.template import Template

    model = ns.Model(model_id=MODEL, output_dir=str(tmp))
    model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), seed=7)
    model.set_template("Template")
    model.set_processor("InputProcessor", padding_side="right")
    model.set_optimizer("AdamW", lr=1e-2)
    template = Template(model_id=str(twinkle.hub.resolve_model_dir(MODEL)))
    batch = [template.encode(r["messages"]) for r in _answer_rows()]
    for _ in range(steps):
        model.forward_backward(inputs=batch)
        model.clip_grad_and_step(1.0)
    return model


def _tokens(responses: list[Any]) -> list[list[int]]:
    return [s.tokens for r in responses for s in r.sequences]


def test_greedy_sampling_from_a_training_adapter_matches_local(connect: Any, tmp_path: Any) -> None:
    local = _trained(LOCAL, tmp_path / "local")
    served = _trained(REMOTE, tmp_path / "remote")
    want = local.sample([QUESTION, QUESTION[0:1]], GREEDY)
    got = served.sample([QUESTION, QUESTION[0:1]], GREEDY)
    assert _tokens(got) == _tokens(want)
    assert got[0].sequences[0].decoded == want[0].sequences[0].decoded
    np.testing.assert_allclose(got[0].sequences[0].logprobs, want[0].sequences[0].logprobs, atol=1e-5)
    assert "Twinkle" in got[0].sequences[0].decoded  # the adapter learned its answer
    # Sampling did not change the adapter: training goes on exactly as locally.
    assert float(served.get_train_state()["cur_step"]) == float(local.get_train_state()["cur_step"])


def test_checkpoint_base_and_adapter_samples(connect: Any, tmp_path: Any) -> None:
    model = _trained(REMOTE, tmp_path)
    path = model.save("answer")
    sampler = REMOTE.Sampler(MODEL)
    in_memory = model.sample(QUESTION, GREEDY)[0].sequences[0]
    from_checkpoint = sampler.sample(QUESTION, GREEDY, adapter_uri=path)[0].sequences[0]
    assert from_checkpoint.tokens == in_memory.tokens
    assert from_checkpoint.logprobs == pytest.approx(in_memory.logprobs, abs=1e-6)
    sampler.add_adapter_to_sampler("answer", path)
    assert sampler.sample(QUESTION, GREEDY, adapter_name="answer")[0].sequences[0].tokens == in_memory.tokens
    base = sampler.sample(QUESTION, GREEDY)[0].sequences[0]
    assert base.tokens != in_memory.tokens
    assert "Twinkle" not in base.decoded
    # The base answer is the library's own base answer.
    local_base = LOCAL.Sampler(MODEL).sample(QUESTION, GREEDY)[0].sequences[0]
    assert base.tokens == local_base.tokens


def test_logprobs_equal_an_independent_forward_pass(connect: Any, tmp_path: Any) -> None:
    import torch

    model = _trained(REMOTE, tmp_path, steps=3)
    out = model.sample([QUESTION, [5, 6, 7, 8, 9]], {"max_tokens": 16, "temperature": 1.0, "seed": 11,
                                                     "prompt_logprobs": True}, num_samples=2)
    for response in out:
        prompt = response.prompt_tokens
        for seq in response.sequences:
            ids = prompt + seq.tokens
            fwd = model.forward_only(inputs={"input_ids": [ids], "labels": [ids]}, return_logits=True)
            logp = torch.log_softmax(torch.as_tensor(np.asarray(fwd.logits), dtype=torch.float32)[0], dim=-1)
            expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq.tokens)]
            np.testing.assert_allclose(seq.logprobs, expected, atol=1e-4)
            expected_prompt = [float(logp[i - 1, t]) for i, t in enumerate(prompt) if i]
            assert response.prompt_logprobs[0] is None
            np.testing.assert_allclose(response.prompt_logprobs[1:], expected_prompt, atol=1e-4)


def test_seed_stop_and_max_tokens(connect: Any) -> None:
    sampler = REMOTE.Sampler(MODEL)
    hot = {"max_tokens": 20, "temperature": 1.5, "seed": 1234}
    first = sampler.sample(QUESTION, hot, num_samples=3)
    again = sampler.sample(QUESTION, hot, num_samples=3)
    other = sampler.sample(QUESTION, {**hot, "seed": 99}, num_samples=3)
    assert _tokens(first) == _tokens(again)
    assert _tokens(first) != _tokens(other)
    assert len({tuple(t) for t in _tokens(first)}) > 1  # the samples of one prompt differ
    assert _tokens(first) == _tokens(LOCAL.Sampler(MODEL).sample(QUESTION, hot, num_samples=3))

    long = sampler.sample(QUESTION, {**hot, "max_tokens": 7})[0].sequences[0]
    assert long.stop_reason == "length" and len(long.tokens) == 7

    full = sampler.sample(QUESTION, {**hot, "max_tokens": 20})[0].sequences[0]
    stop_id = full.tokens[4]
    by_id = sampler.sample(QUESTION, {**hot, "max_tokens": 20, "stop": [stop_id]})[0].sequences[0]
    assert by_id.stop_reason == "stop"
    assert by_id.tokens == full.tokens[:full.tokens.index(stop_id) + 1]



def test_stop_string_ends_the_answer(connect: Any, tmp_path: Any) -> None:
    model = _trained(REMOTE, tmp_path)
    answer = model.sample(QUESTION, GREEDY)[0].sequences[0]
    assert answer.decoded == "Twinkle." and answer.stop_reason == "stop"  # at the end-of-turn token
    cut = model.sample(QUESTION, {**GREEDY, "stop": ["nk", "zz"]})[0].sequences[0]
    assert cut.stop_reason == "stop"
    assert cut.decoded == "Twi"
    assert cut.tokens == answer.tokens[:5]  # T w i n k: the token completing the stop string ends it
    short = model.sample(QUESTION, {**GREEDY, "max_tokens": 3})[0].sequences[0]
    assert (short.decoded, short.stop_reason) == ("Twi", "length")


def test_another_users_checkpoint_is_not_found(server: Any, add_user: Any, tmp_path: Any) -> None:
    alice = _connect(server, add_user(server.data_dir, "sampling-alice"))
    model = _trained(REMOTE, tmp_path, steps=1)
    path = model.save("private")
    assert REMOTE.Sampler(MODEL).sample(QUESTION, GREEDY, adapter_uri=path)[0].sequences
    alice.close()
    bob = _connect(server, add_user(server.data_dir, "sampling-bob"))
    try:
        sampler = REMOTE.Sampler(MODEL)
        with pytest.raises(errors.NotFoundError) as caught:
            sampler.sample(QUESTION, GREEDY, adapter_uri=path)
        assert "\n" not in str(caught.value)
        with pytest.raises(errors.NotFoundError):
            sampler.add_adapter_to_sampler("theirs", path)
    finally:
        bob.close()
        client_mod._current = None


def test_bad_sampling_input_is_one_clear_line(connect: Any) -> None:
    sampler = REMOTE.Sampler(MODEL)
    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"bogus": 1}, "bogus"),
        ({"max_tokens": 10**9}, "max_tokens"),
    ]
    for params, word in cases:
        with pytest.raises(errors.InvalidArgumentError) as caught:
            sampler.sample(QUESTION, params)
        assert word in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(errors.InvalidArgumentError, match="vocabulary"):
        sampler.sample([10**7], GREEDY)
    with pytest.raises(errors.InvalidArgumentError, match="sequences"):
        sampler.sample(QUESTION, GREEDY, num_samples=1000)
    with pytest.raises(errors.InvalidArgumentError, match="context of 2048 tokens less max_tokens=2000"):
        sampler.sample(QUESTION, {"max_tokens": 2000})
    with pytest.raises(errors.CapacityError, match="max_tokens"):  # the server's bound on one call's work
        sampler.sample([QUESTION] * 64, {"max_tokens": 1000})
    with pytest.raises(errors.NotFoundError):
        sampler.sample(QUESTION, GREEDY, adapter_name="nothing")
    with pytest.raises(errors.CapacityError, match="characters"):  # refused before it is tokenized
        sampler.sample([{"role": "user", "content": "x" * 400_000}], GREEDY)
    with pytest.raises(errors.InvalidArgumentError, match="temperature"):
        sampler.sample(QUESTION, {"temperature": 1e-30})
    # The sampler still works afterwards.
    assert sampler.sample(QUESTION, GREEDY)[0].sequences[0].tokens


SNIPPET = """
from twinkle.sampler import TorchSampler

sampler = TorchSampler('builtin://tiny-qwen2')
out = sampler.sample([{'role': 'user', 'content': 'who are you?'}],
                     {'max_tokens': 16, 'temperature': 0.8, 'seed': 5}, num_samples=2)
RESULT = [(s.tokens, s.decoded, s.stop_reason) for s in out[0].sequences]
"""


def test_the_import_swap_works_for_sampling(connect: Any) -> None:
    local: dict[str, Any] = {}
    exec(SNIPPET, local)
    swapped: dict[str, Any] = {}
    exec(SNIPPET.replace("from twinkle.", "from twinkle_client."), swapped)
    assert type(swapped["sampler"]).__module__ == "twinkle_client.sampler"
    assert swapped["RESULT"] == local["RESULT"]
