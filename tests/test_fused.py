"""Fused passes are exact: every adapter trained together with others (one pass over the
shared base per micro-step) equals the same adapter trained alone, in fp32 on the CPU.

Tenants differ in rank, rows per micro-batch, sequence lengths, accumulation windows and
dropout; one of them is saved mid-window and resumed into a new adapter while the others
go on. The reference for each tenant is a model that holds only that tenant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from support.tenants import Tenant, tenants

from twinkle import errors
from twinkle.model import MultiLoraTransformersModel

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "builtin://tiny-qwen2"
MICRO_STEPS = 20
RTOL = 1e-5



def new_model(tmp_path, *adapters: Tenant) -> MultiLoraTransformersModel:
    model = MultiLoraTransformersModel(MODEL, max_loras=10, device="cpu", dtype="float32", output_dir=str(tmp_path))
    for t in adapters:
        add(model, t, t.name)
    return model


def add(model: MultiLoraTransformersModel, t: Tenant, name: str) -> None:
    config = LoraConfig(r=t.r, lora_alpha=2 * t.r, lora_dropout=t.dropout, target_modules="all-linear")
    model.add_adapter_to_model(name, config, gradient_accumulation_steps=t.gas, seed=t.seed)
    model.set_optimizer("AdamW", lr=1e-2, adapter_name=name)
    model.set_lr_scheduler("LinearLR", adapter_name=name)


@dataclass
class Trace:
    """What one tenant saw at each micro-step."""

    losses: list[float]
    grads: list[list[torch.Tensor]]
    """Accumulated gradients after each forward_backward, before clipping."""
    clipped: list[list[torch.Tensor]]
    """Gradients after clipping, at the end of each window."""
    norms: list[float]


def grads_of(model: MultiLoraTransformersModel, name: str) -> list[torch.Tensor]:
    return [torch.zeros(0) if p.grad is None else p.grad.detach().clone() for p in model._params(model._adapter(name))]


def weights_of(model: MultiLoraTransformersModel, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model._params(model._adapter(name))]


def finish_micro(model: MultiLoraTransformersModel, name: str, trace: Trace) -> None:
    trace.grads.append(grads_of(model, name))
    norm = model.clip_grad_norm(1.0, adapter_name=name)
    if norm is not None:
        trace.norms.append(norm)
        trace.clipped.append(grads_of(model, name))
    model.step(adapter_name=name)
    model.zero_grad(adapter_name=name)
    model.lr_step(adapter_name=name)


_ALONE: dict[Tenant, tuple[Trace, list[torch.Tensor]]] = {}
"""Each tenant's run alone, computed once for the module (the runs are deterministic)."""


def alone(tmp_path, t: Tenant) -> tuple[Trace, list[torch.Tensor]]:
    if t not in _ALONE:
        model = new_model(tmp_path / f"alone-{t.name}", t)
        trace = Trace([], [], [], [])
        for step in range(MICRO_STEPS):
            trace.losses.append(model.forward_backward(inputs=t.batch(step), adapter_name=t.name).loss)
            finish_micro(model, t.name, trace)
        _ALONE[t] = (trace, weights_of(model, t.name))
        _SAVED[t] = saved_weights(model, t.name)
    return _ALONE[t]


_SAVED: dict[Tenant, dict[str, torch.Tensor]] = {}
"""Each tenant's checkpoint weights after its run alone."""


def saved_weights(model: MultiLoraTransformersModel, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(model.save("final", adapter_name=name)) / "adapter_model.safetensors")


def close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, what: str) -> None:
    """Each tensor equal to within ``rtol`` relative to its size (``|a - b| <= rtol * |b|``):
    float sums in another order differ in the last bits, most visibly in elements near 0."""
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape, f"{what}: tensor {i} has shape {tuple(x.shape)}, alone {tuple(y.shape)}"
        err, size = float((x - y).norm()), float(y.norm())
        assert err <= rtol * max(size, 1e-12), f"{what}: tensor {i} differs by {err:.3g} (relative {err / max(size, 1e-12):.3g})"


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tenants_trained_together_equal_each_trained_alone(tmp_path, n: int) -> None:
    group = tenants(n)
    expected = {t.name: alone(tmp_path, t) for t in group}
    rng_before = torch.get_rng_state()

    model = new_model(tmp_path / "fused", *group)
    traces = {t.name: Trace([], [], [], []) for t in group}
    names = {t.name: t.name for t in group}  # tenant -> its adapter now (a resume makes a new one)
    resumer = group[-1] if n > 1 else None
    for step in range(MICRO_STEPS):
        if resumer is not None and step == MICRO_STEPS // 2:
            # Saved mid-run (mid-window where its window is longer than 1), removed, and
            # resumed into a new adapter while the others keep training.
            path = model.save("mid", save_optimizer=True, adapter_name=names[resumer.name])
            model.remove_adapter(names[resumer.name])
            names[resumer.name] = f"{resumer.name}-resumed"
            add(model, resumer, names[resumer.name])
            model.resume_from_checkpoint(path, adapter_name=names[resumer.name])
        outs = model.forward_backward_many([(t.batch(step), names[t.name]) for t in group])
        for t, out in zip(group, outs, strict=True):
            assert not isinstance(out, Exception), out
            traces[t.name].losses.append(out.loss)
        for t in group:
            finish_micro(model, names[t.name], traces[t.name])

    assert torch.equal(torch.get_rng_state(), rng_before), "a tenant drew from the global RNG"
    for t in group:
        ref, ref_weights = expected[t.name]
        got = traces[t.name]
        for step, (a, b) in enumerate(zip(got.losses, ref.losses, strict=True)):
            assert math.isclose(a, b, rel_tol=RTOL), f"{t.name} step {step}: loss {a} alone {b}"
        for step, (a, b) in enumerate(zip(got.grads, ref.grads, strict=True)):
            close(a, b, RTOL, f"{t.name} micro-step {step}: gradients before clipping")
        assert len(got.clipped) == len(ref.clipped) == MICRO_STEPS // t.gas
        for step, (a, b) in enumerate(zip(got.clipped, ref.clipped, strict=True)):
            close(a, b, RTOL, f"{t.name} update {step}: gradients after clipping")
        assert all(math.isclose(a, b, rel_tol=RTOL) for a, b in zip(got.norms, ref.norms, strict=True))
        close(weights_of(model, names[t.name]), ref_weights, 1e-4, f"{t.name}: weights after {MICRO_STEPS} steps")
        saved, ref_saved = saved_weights(model, names[t.name]), _SAVED[t]
        assert saved.keys() == ref_saved.keys()
        close([saved[k] for k in sorted(saved)], [ref_saved[k] for k in sorted(saved)], 1e-4, f"{t.name}: checkpoint")


def test_a_bad_call_fails_alone_and_the_others_train(tmp_path) -> None:
    a, b = tenants(2)
    model = new_model(tmp_path, a, b)
    unlabelled = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    outs = model.forward_backward_many([(unlabelled, a.name), (b.batch(0), b.name), (a.batch(0), "nobody")])
    assert isinstance(outs[0], errors.InvalidArgumentError) and "no labelled tokens" in str(outs[0])
    assert isinstance(outs[2], errors.NotFoundError)
    ref, _ = alone(tmp_path, b)
    assert math.isclose(outs[1].loss, ref.losses[0], rel_tol=RTOL)
    assert model.get_train_state(adapter_name=a.name)["micro_step"] == 0


def test_a_pass_that_fails_runs_each_call_alone(tmp_path, monkeypatch) -> None:
    group = tenants(3)
    model = new_model(tmp_path / "fused", *group)
    real = model._pass
    fused_tries = []

    def too_big(parts, train):
        if len(parts) > 1:
            fused_tries.append(len(parts))
            raise torch.OutOfMemoryError("fake: the fused pass does not fit")
        return real(parts, train)

    monkeypatch.setattr(model, "_pass", too_big)
    outs = model.forward_backward_many([(t.batch(0), t.name) for t in group])
    assert fused_tries == [3]
    for t, out in zip(group, outs, strict=True):
        ref, _ = alone(tmp_path, t)
        assert math.isclose(out.loss, ref.losses[0], rel_tol=RTOL)
        close(grads_of(model, t.name), ref.grads[0], RTOL, f"{t.name}: gradients after the fallback")


def test_two_calls_of_one_adapter_run_in_order(tmp_path) -> None:
    t = tenants(3)[2]  # an accumulation window of 3
    ref = new_model(tmp_path / "ref", t)
    expected = [ref.forward_backward(inputs=t.batch(i), adapter_name=t.name).loss for i in range(2)]
    model = new_model(tmp_path / "twice", t)
    outs = model.forward_backward_many([(t.batch(0), t.name), (t.batch(1), t.name)])
    assert [o.loss for o in outs] == pytest.approx(expected, rel=RTOL)
    assert [o.accumulated for o in outs] == [1, 2]
    close(grads_of(model, t.name), grads_of(ref, t.name), RTOL, "gradients of two micro-batches")


def test_forward_only_of_several_adapters_in_one_pass(tmp_path) -> None:
    group = tenants(3)
    model = new_model(tmp_path, *group)
    together = model.forward_only_many([(t.batch(3), t.name, True) for t in group])
    for t, out in zip(group, together, strict=True):
        one = model.forward_only(inputs=t.batch(3), adapter_name=t.name, return_logits=True)
        assert math.isclose(out.loss, one.loss, rel_tol=RTOL) and out.num_tokens == one.num_tokens
        torch.testing.assert_close(out.logits, one.logits, rtol=RTOL, atol=1e-5)


def test_adapters_come_and_go_between_passes(tmp_path) -> None:
    a, b, c = tenants(3)
    model = new_model(tmp_path, a, b)
    model.remove_adapter(a.name)  # the adapter peft had active
    outs = model.forward_backward_many([(b.batch(0), b.name)])
    assert not isinstance(outs[0], Exception), outs[0]
    model.remove_adapter(b.name)
    add(model, c, c.name)
    ref, _ = alone(tmp_path, c)
    assert math.isclose(model.forward_backward(inputs=c.batch(0), adapter_name=c.name).loss, ref.losses[0], rel_tol=RTOL)


def test_a_refused_adapter_leaves_the_others_trainable(tmp_path) -> None:
    a, b = tenants(2)
    model = new_model(tmp_path, a, b)
    # peft injects q_proj into every layer before the policy refuses the norm layers.
    with pytest.raises(errors.InvalidArgumentError):
        model.add_adapter_to_model("refused", LoraConfig(r=4, target_modules=["q_proj", "norm"]))
    assert all(p.requires_grad for t in (a, b) for p in model._params(model._adapter(t.name)))
    outs = model.forward_backward_many([(a.batch(0), a.name), (b.batch(0), b.name)])
    assert not any(isinstance(o, Exception) for o in outs), outs


def test_labels_only_on_first_tokens_are_no_labels_after_left_padding(tmp_path) -> None:
    (t,) = tenants(1)
    model = new_model(tmp_path, t)
    model.set_processor("InputProcessor", padding_side="left", adapter_name=t.name)
    # The short row's only label sits on its first real token (never a target); left padding
    # moves that token off column 0 of the padded batch.
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100] * 5}, {"input_ids": [5, 6, 7], "labels": [6, -100, -100]}]
    with pytest.raises(errors.InvalidArgumentError, match="no labelled tokens"):
        model.forward_backward(inputs=rows, adapter_name=t.name)
    assert model.get_train_state(adapter_name=t.name)["micro_step"] == 0
