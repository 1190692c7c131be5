"""The token-summed losses (the Tinker API's loss functions, in the library): per-token weights,
advantages and sampling log-probabilities travel with the samples; each row's label
log-probabilities come back; each loss equals its formula computed independently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from twinkle.errors import InvalidArgumentError
from twinkle.model import MultiLoraTransformersModel

pytestmark = pytest.mark.unit

ROWS = [[3, 40, 41, 42, 43, 44, 45, 46], [3, 50, 51, 52, 53]]
PROMPT = [3, 2]  # tokens of each row before its first label


def _model(tmp_path: Path, *adapters: str) -> MultiLoraTransformersModel:
    model = MultiLoraTransformersModel(output_dir=str(tmp_path), device="cpu", dtype="float32")
    for name in adapters:
        model.add_adapter_to_model(name, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False), seed=3)
        model.set_optimizer("AdamW", lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, adapter_name=name)
    return model


def _native() -> list[dict[str, list[int]]]:
    """Labels -100 on the prompt, as a template makes them."""
    return [{"input_ids": row, "labels": [-100] * p + row[p:]} for row, p in zip(ROWS, PROMPT, strict=True)]


def _shifted(weights: bool = True) -> list[dict[str, list]]:
    """The same rows in the Tinker layout: every position has a target, weights 0 on the prompt."""
    out = []
    for row, p in zip(ROWS, PROMPT, strict=True):
        sample: dict[str, list] = {"input_ids": row, "labels": [-100] + row[1:]}
        if weights:
            sample["weights"] = [0.0] + [0.0 if i < p else 1.0 for i in range(1, len(row))]
        out.append(sample)
    return out


def test_weighted_cross_entropy_is_the_summed_cross_entropy_bit_for_bit(tmp_path: Path) -> None:
    model = _model(tmp_path, "sum", "native", "weighted")
    model.set_loss("CrossEntropyLoss", reduction="sum", adapter_name="sum")
    model.set_loss("WeightedCrossEntropyLoss", adapter_name="native")
    model.set_loss("WeightedCrossEntropyLoss", adapter_name="weighted")
    for _ in range(3):
        outs = {name: model.forward_backward(batch, adapter_name=name)
                for name, batch in (("sum", _native()), ("native", _native()), ("weighted", _shifted()))}
        for name in outs:
            model.step(adapter_name=name)
            model.zero_grad(adapter_name=name)
        assert outs["native"].loss == outs["weighted"].loss
        assert outs["native"].num_tokens == outs["weighted"].num_tokens == sum(len(r) - p for r, p in zip(ROWS, PROMPT, strict=True))
        assert outs["sum"].loss == pytest.approx(outs["native"].loss, rel=1e-6)
        assert outs["sum"].logprobs is None
        assert [len(lp) for lp in outs["weighted"].logprobs] == [len(r) - 1 for r in ROWS]
    native, weighted = (model._adapter(n).params for n in ("native", "weighted"))
    assert all(torch.equal(a, b) for a, b in zip(native, weighted, strict=True))


def test_logprobs_are_those_of_the_logits(tmp_path: Path) -> None:
    model = _model(tmp_path, "a")
    model.set_loss("WeightedCrossEntropyLoss")
    out = model.forward_only(_shifted(), return_logits=True)
    for r, row in enumerate(ROWS):
        n = len(row)
        expected = torch.log_softmax(out.logits[r, :n - 1].double(), -1).gather(-1, torch.tensor(row[1:])[:, None])
        assert torch.allclose(torch.tensor(out.logprobs[r], dtype=torch.float64), expected[:, 0], atol=1e-5)


def _policy_batch(advantages: list[list[float]], sampling: list[list[float]]) -> list[dict[str, list]]:
    return [{"input_ids": row, "labels": [-100] + row[1:], "advantages": [0.0] + a, "sampling_logprobs": [0.0] + q}
            for row, a, q in zip(ROWS, advantages, sampling, strict=True)]


@pytest.mark.parametrize("loss", ["ImportanceSamplingLoss", "PPOLoss", "CISPOLoss"])
def test_policy_losses_equal_their_formulas(tmp_path: Path, loss: str) -> None:
    model = _model(tmp_path, "a")
    model.set_loss("WeightedCrossEntropyLoss")
    current = model.forward_only(_shifted(weights=False)).logprobs
    gen = torch.Generator().manual_seed(0)
    advantages = [torch.randn(len(r) - 1, generator=gen).tolist() for r in ROWS]
    # Sampling log-probabilities near the current ones, so that some ratios clip and some do not.
    sampling = [(torch.tensor(lp) + 0.4 * torch.randn(len(lp), generator=gen)).tolist() for lp in current]
    model.set_loss(loss)
    out = model.forward_backward(_policy_batch(advantages, sampling))
    expected = 0.0
    for lp, q, a in zip(out.logprobs, sampling, advantages, strict=True):
        lp, q, a = (torch.tensor(x, dtype=torch.float64) for x in (lp, q, a))
        ratio = torch.exp(lp - q)
        if loss == "ImportanceSamplingLoss":
            expected += float(-(ratio * a).sum())
        elif loss == "PPOLoss":
            expected += float(-torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a).sum())
        else:
            expected += float(-(ratio.clamp(0.8, 1.2) * lp * a).sum())
    assert out.loss == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert out.num_tokens == sum(len(r) - 1 for r in ROWS)


def test_policy_losses_need_their_inputs(tmp_path: Path) -> None:
    model = _model(tmp_path, "a")
    model.set_loss("ImportanceSamplingLoss")
    with pytest.raises(InvalidArgumentError, match="advantages"):
        model.forward_backward(_shifted())
    batch = _policy_batch([[1.0] * (len(r) - 1) for r in ROWS], [[0.0] * (len(r) - 1) for r in ROWS])
    batch[0]["advantages"] = batch[0]["advantages"][:-1]
    with pytest.raises(InvalidArgumentError, match="advantages has 7 values"):
        model.forward_backward(batch)
    batch = _policy_batch([[float("nan")] * (len(r) - 1) for r in ROWS], [[0.0] * (len(r) - 1) for r in ROWS])
    with pytest.raises(InvalidArgumentError, match="finite"):
        model.forward_backward(batch)
    with pytest.raises(InvalidArgumentError, match="clip_low_threshold"):
        model.set_loss("PPOLoss", clip_low_threshold=1.5, clip_high_threshold=1.2)


def test_fixed_lr_changes_the_lr_and_keeps_the_optimizer_state(tmp_path: Path) -> None:
    model = _model(tmp_path, "a")
    model.set_loss("WeightedCrossEntropyLoss")
    model.forward_backward(_native())
    model.step()
    model.zero_grad()
    state = model._adapter("a").optimizer.state_dict()["state"]
    model.set_lr_scheduler("FixedLR", lr=3e-3)
    assert model.get_train_state()["lr"] == 3e-3
    after = model._adapter("a").optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], after[k]["exp_avg"]) for k in state)
    path = model.save("ck", save_optimizer=True)
    model.set_lr_scheduler("FixedLR", lr=1e-4)
    model.load(path, load_optimizer=True)
    assert model.get_train_state()["lr"] == 3e-3
