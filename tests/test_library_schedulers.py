"""Warm-up LR schedulers: the schedule itself, how they are named and built, and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from peft import LoraConfig

from twinkle.errors import InvalidArgumentError
from twinkle.registry import REGISTRY

BASE_LRS = (1e-3, 5e-4)


def linear_factor(step: int, warmup: int, total: int) -> float:
    """Rises along a straight line from 0 (step 0) to 1 (step ``warmup``), then falls along a
    straight line to 0 (step ``total``); 0 from then on."""
    if step < warmup:
        return step / warmup
    if step >= total:
        return 0.0
    return 1.0 - (step - warmup) / (total - warmup)


def cosine_factor(step: int, warmup: int, total: int, cycles: float) -> float:
    """Rises along a straight line from 0 to 1 over the warm-up, then follows ``cycles`` periods of
    (1 + cos) / 2 over the next ``total - warmup`` steps (at least one), clipped at 0; after those
    it holds its last value."""
    if step < warmup:
        return step / warmup
    length = max(1, total - warmup)
    fraction = min(step - warmup, length) / length
    return max(0.0, (1.0 + math.cos(2.0 * math.pi * cycles * fraction)) / 2.0)


def optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    return torch.optim.SGD([{"params": [params[0]], "lr": BASE_LRS[0]}, {"params": [params[1]], "lr": BASE_LRS[1]}])


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in opt.param_groups]


def run(name: str, steps: int, **kwargs) -> list[list[float]]:
    """The LRs of both parameter groups at steps 0..steps."""
    opt = optimizer()
    scheduler = REGISTRY.build("lr_scheduler", name, opt, **kwargs)
    seen = [lrs(opt)]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        seen.append(lrs(opt))
        assert scheduler.get_last_lr() == seen[-1]
    return seen


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (1, 2), (10, 10), (5, 37)])
def test_linear_warmup_schedule(warmup, total) -> None:
    steps = total + 5  # past the end too
    expected = [[base * linear_factor(t, warmup, total) for base in BASE_LRS] for t in range(steps + 1)]
    got = run("LinearWarmupScheduler", steps, num_warmup_steps=warmup, num_training_steps=total)
    assert got == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected]


@pytest.mark.parametrize(
    "warmup,total,cycles",
    [(0, 10, 0.5), (3, 12, 0.5), (2, 9, 1.0), (4, 20, 0.25), (6, 6, 0.5), (1, 15, 1.5)],
)
def test_cosine_warmup_schedule(warmup, total, cycles) -> None:
    steps = total + 7  # past the end the LR holds
    expected = [[base * cosine_factor(t, warmup, total, cycles) for base in BASE_LRS] for t in range(steps + 1)]
    got = run("CosineWarmupScheduler", steps, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
    assert got == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected]


def test_cosine_default_cycles_is_a_half_wave_to_zero() -> None:
    got = run("CosineWarmupScheduler", 14, num_warmup_steps=2, num_training_steps=10)
    assert got[2] == pytest.approx(list(BASE_LRS))
    assert got[6] == pytest.approx([b / 2 for b in BASE_LRS])
    assert all(row == pytest.approx([0.0, 0.0], abs=1e-15) for row in got[10:])


@pytest.mark.parametrize("name", ["LinearWarmupScheduler", "CosineWarmupScheduler"])
@pytest.mark.parametrize("warmup,total", [(-1, 10), (11, 10), (0, 0)])
def test_bad_step_counts_are_invalid_argument_errors(name, warmup, total) -> None:
    with pytest.raises(InvalidArgumentError, match="num_warmup_steps <= num_training_steps"):
        REGISTRY.build("lr_scheduler", name, optimizer(), num_warmup_steps=warmup, num_training_steps=total)


@pytest.mark.parametrize("name", ["LinearWarmupScheduler", "CosineWarmupScheduler"])
@pytest.mark.parametrize("kwargs", [{"num_warmup_steps": 0, "num_training_step": 10}, {"num_warmup_steps": 0}])
def test_wrong_keywords_are_invalid_argument_errors(name, kwargs) -> None:
    with pytest.raises(InvalidArgumentError, match=f"lr_scheduler '{name}'.*num_training_step"):
        REGISTRY.build("lr_scheduler", name, optimizer(), **kwargs)


def test_linear_takes_no_num_cycles() -> None:
    with pytest.raises(InvalidArgumentError, match="num_cycles"):
        REGISTRY.build("lr_scheduler", "LinearWarmupScheduler", optimizer(),
                       num_warmup_steps=1, num_training_steps=5, num_cycles=0.5)


def test_registered_and_listed() -> None:
    names = REGISTRY.names("lr_scheduler")
    assert "LinearWarmupScheduler" in names and "CosineWarmupScheduler" in names


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("LinearWarmupScheduler", {"num_warmup_steps": 3, "num_training_steps": 12}),
        ("CosineWarmupScheduler", {"num_warmup_steps": 3, "num_training_steps": 12, "num_cycles": 0.5}),
        ("CosineWarmupScheduler", {"num_warmup_steps": 0, "num_training_steps": 7}),
    ],
)
@pytest.mark.parametrize("cut", [0, 2, 5, 12, 14])
def test_state_dict_round_trip_resumes_exactly(name, kwargs, cut) -> None:
    """As a checkpoint does it: save both state dicts, load them ``weights_only``, rebuild the
    scheduler by name and keywords before loading the optimizer state, then load its state."""
    steps = 16
    expected = run(name, steps, **kwargs)

    opt = optimizer()
    scheduler = REGISTRY.build("lr_scheduler", name, opt, **kwargs)
    for _ in range(cut):
        opt.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)

    opt = optimizer()
    scheduler = REGISTRY.build("lr_scheduler", name, opt, **kwargs)
    opt.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    got = expected[:cut] + [lrs(opt)]
    for _ in range(steps - cut):
        opt.step()
        scheduler.step()
        got.append(lrs(opt))
    assert got == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected]


def test_model_checkpoint_resumes_the_schedule(tmp_path) -> None:
    """Through the model's save(save_optimizer=True) and resume_from_checkpoint."""
    from twinkle.dataset import Dataset, DatasetMeta
    from twinkle.model import MultiLoraTransformersModel

    model_id = "builtin://tiny-qwen2"
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(4)))
    ds.set_template("Template", model_id=model_id, max_length=256)
    ds.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "team"})
    ds.encode()
    batch = [ds[i] for i in range(len(ds))]
    warmup, total, lr = 2, 6, 1e-3

    def make(folder: str) -> MultiLoraTransformersModel:
        model = MultiLoraTransformersModel(model_id, output_dir=str(tmp_path / folder))
        model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4))
        return model

    def step(model: MultiLoraTransformersModel) -> float:
        model.forward_backward(inputs=batch)
        model.step()
        model.zero_grad()
        model.lr_step()
        return model._adapter("default").optimizer.param_groups[0]["lr"]

    first = make("first")
    first.set_optimizer("AdamW", lr=lr)
    first.set_lr_scheduler("CosineWarmupScheduler", num_warmup_steps=warmup, num_training_steps=total)
    got = [step(first) for _ in range(3)]
    path = first.save("mid", save_optimizer=True)

    resumed = make("resumed")
    resumed.resume_from_checkpoint(path)
    state = resumed._adapter("default")
    assert state.scheduler_spec.name == "CosineWarmupScheduler"
    assert state.optimizer.param_groups[0]["lr"] == got[-1]
    got += [step(resumed) for _ in range(5)]
    expected = [lr * cosine_factor(t, warmup, total, 0.5) for t in range(1, 9)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
