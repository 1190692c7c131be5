"""MultiLoraTransformersModel: training, accumulation, checkpoints, isolation, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from twinkle import errors
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import MultiLoraTransformersModel

MODEL = "builtin://tiny-qwen2"


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(96)))
    ds.set_template("Template", model_id=MODEL, max_length=512)
    ds.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "team"})
    ds.encode()
    return ds


def make_model(tmp_path, k: int = 1, lr: float = 1e-3, r: int = 8, **kw) -> MultiLoraTransformersModel:
    model = MultiLoraTransformersModel(MODEL, output_dir=str(tmp_path), **kw)
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=r), gradient_accumulation_steps=k)
    model.set_optimizer("AdamW", lr=lr)
    model.set_lr_scheduler("LinearLR")
    return model


def train_step(model: MultiLoraTransformersModel, batch) -> float:
    out = model.forward_backward(inputs=batch)
    model.clip_grad_norm(1.0)
    model.step()
    model.zero_grad()
    model.lr_step()
    return out.loss


def lora_weights(model: MultiLoraTransformersModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    state = model._adapter(adapter)
    return {n: p.detach().clone() for n, p in model._peft.named_parameters() if f".{state.peft_name}." in n}


def test_demo_loss_falls(tmp_path) -> None:
    from twinkle.demo import run

    # One epoch of the demo's four (``make demo`` runs them all): enough to see it learn.
    result = run(epochs=1, output_dir=str(tmp_path), quiet=True)
    first, last = result.losses[:10], result.losses[-10:]
    assert sum(last) / 10 < 0.75 * sum(first) / 10, (first, last)
    assert (tmp_path / "default").is_dir() and result.checkpoint.startswith(str(tmp_path))


def test_output_formats_as_loss(tmp_path, dataset) -> None:
    model = make_model(tmp_path)
    out = model.forward_backward(inputs=[dataset[0], dataset[1]])
    assert str(out) == f"{out.loss:.4f}" and f"{out:.2f}" == f"{out.loss:.2f}"
    assert out.num_tokens > 0 and out.batch_size == 2 and out.step == 0 and out.micro_step == 1


def test_accumulation_is_exact(tmp_path, dataset) -> None:
    batches = [[dataset[i] for i in range(j * 4, j * 4 + 4)] for j in range(10)]
    acc = make_model(tmp_path / "a", k=2)
    updates = 0
    for batch in batches:
        acc.forward_backward(inputs=batch)
        norm = acc.clip_grad_norm(1.0)
        stepped = acc.step()
        assert (norm is not None) == stepped
        updates += stepped
        acc.zero_grad()
        acc.lr_step()
    assert updates == 5 and acc.get_train_state()["cur_step"] == 5

    merged = make_model(tmp_path / "m", k=1)
    for j in range(5):
        train_step(merged, batches[2 * j] + batches[2 * j + 1])
    a, m = lora_weights(acc), lora_weights(merged)
    for name in a:
        torch.testing.assert_close(a[name], m[name], rtol=1e-4, atol=1e-6)


def test_step_mid_window_is_a_noop(tmp_path, dataset) -> None:
    model = make_model(tmp_path, k=3)
    before = lora_weights(model)
    model.forward_backward(inputs=[dataset[0]])
    assert model.clip_grad_norm(1.0) is None
    assert model.step() is False and model.zero_grad() is False and model.lr_step() is False
    assert all(torch.equal(before[n], p) for n, p in lora_weights(model).items())
    # the gradients of the window survived the no-op zero_grad
    assert any(p.grad is not None for p in model._params(model._adapter(None)))


def test_save_load_gives_identical_logits(tmp_path, dataset) -> None:
    model = make_model(tmp_path)
    batch = [dataset[i] for i in range(4)]
    for _ in range(3):
        train_step(model, batch)
    path = model.save("ckpt")
    expected = model.forward_only(inputs=batch, return_logits=True).logits

    other = make_model(tmp_path / "other")
    assert not torch.equal(other.forward_only(inputs=batch, return_logits=True).logits, expected)
    other.load(path)
    assert torch.equal(other.forward_only(inputs=batch, return_logits=True).logits, expected)


def test_checkpoint_loads_with_plain_peft(tmp_path, dataset) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = make_model(tmp_path)
    batch = [dataset[i] for i in range(2)]
    train_step(model, batch)
    path = model.save("plain")
    files = sorted(p.name for p in (tmp_path / "default" / "plain").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "twinkle_checkpoint.json"]

    base = AutoModelForCausalLM.from_pretrained(model.model_dir)
    peft_model = PeftModel.from_pretrained(base, path).eval()
    collated = model._collate(model._adapter(None), batch)
    with torch.no_grad():
        logits = peft_model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"]).logits
    # twinkle packs rows without padding: the real tokens' logits equal plain peft's padded
    # forward, and padding positions (never computed) hold 0.
    ours = model.forward_only(inputs=batch, return_logits=True).logits
    real = collated["attention_mask"].bool()
    assert not real.all(), "the batch should have padding for this check"
    torch.testing.assert_close(ours[real], logits[real], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(ours[~real]) == 0


@pytest.mark.parametrize("k", [1, 2])
def test_resume_reproduces_uninterrupted_run(tmp_path, dataset, k) -> None:
    def loader() -> DataLoader:
        return DataLoader(dataset, batch_size=4, shuffle=True, seed=7)

    total, cut = 12, 6
    full = make_model(tmp_path / "full", k=k)
    dl = loader()
    expected = [train_step(full, b) for b, _ in zip(_forever(dl), range(total), strict=False)]

    first = make_model(tmp_path / "first", k=k)
    dl = loader()
    got = [train_step(first, b) for b, _ in zip(_forever(dl), range(cut), strict=False)]
    path = first.save("mid", save_optimizer=True)

    resumed = MultiLoraTransformersModel(MODEL, output_dir=str(tmp_path / "resumed"))
    resumed.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=8),
                                 gradient_accumulation_steps=k)
    progress = resumed.resume_from_checkpoint(path)
    assert progress["cur_step"] == cut // k and progress["consumed_train_samples"] == cut * 4
    dl = loader()
    dl.resume_from_checkpoint(progress["consumed_train_samples"])
    got += [train_step(resumed, b) for b, _ in zip(_forever(dl), range(total - cut), strict=False)]
    assert got == pytest.approx(expected, abs=1e-6)


def _forever(dl: DataLoader):
    while True:
        yield from dl


def test_adapters_are_isolated(tmp_path, dataset) -> None:
    batches = [[dataset[i] for i in range(j * 2, j * 2 + 2)] for j in range(4)]
    alone = make_model(tmp_path / "alone")
    expected = [train_step(alone, b) for b in batches]

    shared = MultiLoraTransformersModel(MODEL, output_dir=str(tmp_path / "shared"))
    for name, lr in (("a", 1e-3), ("b", 5e-2)):
        shared.add_adapter_to_model(name, LoraConfig(target_modules="all-linear", r=8))
        shared.set_optimizer("AdamW", lr=lr, adapter_name=name)
        shared.set_lr_scheduler("LinearLR", adapter_name=name)
    got = []
    for batch in batches:
        out = shared.forward_backward(inputs=batch, adapter_name="a")
        shared.forward_backward(inputs=batches[0], adapter_name="b")
        for name in ("b", "a"):
            shared.clip_grad_norm(1.0, adapter_name=name)
            shared.step(adapter_name=name)
            shared.zero_grad(adapter_name=name)
            shared.lr_step(adapter_name=name)
        got.append(out.loss)
    assert got == pytest.approx(expected, abs=1e-6)
    with pytest.raises(errors.InvalidArgumentError, match="several adapters"):
        shared.step()


def test_atomic_save_leaves_no_checkpoint_on_crash(tmp_path, dataset, monkeypatch) -> None:
    model = make_model(tmp_path)
    train_step(model, [dataset[0]])
    import twinkle.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_training_state", boom)
    with pytest.raises(OSError):
        model.save("crash", save_optimizer=True)
    assert not (tmp_path / "default" / "crash").exists()
    assert list((tmp_path / "default").glob(".tmp-*")) == []


class TestBadInput:
    def test_unknown_component(self, tmp_path) -> None:
        model = make_model(tmp_path)
        with pytest.raises(errors.UnknownComponentError, match="unknown optimizer 'Adamm'; known: .*AdamW"):
            model.set_optimizer("Adamm")
        with pytest.raises(errors.UnknownComponentError, match="unknown loss"):
            model.set_loss("NoSuchLoss")
        with pytest.raises(errors.InvalidArgumentError, match="optimizer 'AdamW'.*lrr"):
            model.set_optimizer("AdamW", lrr=1.0)
        assert model._adapter(None).optimizer_spec.name == "AdamW"  # the old optimizer is kept

    def test_rank_above_max_r(self, tmp_path) -> None:
        model = MultiLoraTransformersModel(MODEL, max_r=8, output_dir=str(tmp_path))
        with pytest.raises(errors.InvalidArgumentError, match="r=16 is above this model's max_r=8"):
            model.add_adapter_to_model("x", LoraConfig(target_modules="all-linear", r=16))
        assert model.adapters == [] and model.free_slots == model.max_loras

    def test_too_many_adapters(self, tmp_path) -> None:
        model = MultiLoraTransformersModel(MODEL, max_loras=1, output_dir=str(tmp_path))
        model.add_adapter_to_model("a", LoraConfig(target_modules="all-linear", r=4))
        with pytest.raises(errors.CapacityError, match="all 1 adapter slots are in use"):
            model.add_adapter_to_model("b", LoraConfig(target_modules="all-linear", r=4))
        assert model.adapters == ["a"]
        model.remove_adapter("a")
        model.add_adapter_to_model("b", LoraConfig(target_modules="all-linear", r=4))

    def test_forward_backward_before_set_optimizer(self, tmp_path, dataset) -> None:
        model = MultiLoraTransformersModel(MODEL, output_dir=str(tmp_path))
        model.add_adapter_to_model("a", LoraConfig(target_modules="all-linear", r=4))
        with pytest.raises(errors.StateError, match="call set_optimizer"):
            model.forward_backward(inputs=[dataset[0]])
        assert model.get_train_state()["micro_step"] == 0

    def test_bad_batches_change_nothing(self, tmp_path, dataset) -> None:
        model = make_model(tmp_path)
        before = lora_weights(model)
        bad = [
            ([], "empty"),
            ({"input_ids": torch.ones(5, dtype=torch.long), "labels": torch.ones(5, dtype=torch.long)}, "2-D"),
            ({"input_ids": torch.ones(2, 5), "labels": torch.ones(2, 5)}, "integer"),
            ([{"input_ids": [1, 2, 10_000], "labels": [1, 2, 3]}], "outside the vocabulary"),
        ]
        for inputs, message in bad:
            with pytest.raises(errors.InvalidArgumentError, match=message):
                model.forward_backward(inputs=inputs)
        assert model.get_train_state()["micro_step"] == 0
        assert all(torch.equal(before[n], p) for n, p in lora_weights(model).items())

    def test_load_of_a_non_checkpoint(self, tmp_path, dataset) -> None:
        model = make_model(tmp_path)
        (tmp_path / "empty").mkdir()
        for path, message in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "missing adapter_config")):
            with pytest.raises(errors.CheckpointError, match=message):
                model.load(str(path))
        weights_only = model.save("weights")
        with pytest.raises(errors.CheckpointError, match="save_optimizer=True"):
            model.load(weights_only, load_optimizer=True)

    def test_load_of_another_rank_or_base(self, tmp_path, dataset) -> None:
        small = make_model(tmp_path / "small", r=4)
        path = small.save("r4")
        model = make_model(tmp_path)
        before = lora_weights(model)
        with pytest.raises(errors.CheckpointError, match="LoRA rank 4"):
            model.load(path)
        meta = tmp_path / "small" / "default" / "r4" / "twinkle_checkpoint.json"
        data = json.loads(meta.read_text())
        data["base_model"] = "ms://Qwen/Qwen2.5-7B-Instruct"
        meta.write_text(json.dumps(data))
        other = make_model(tmp_path / "o", r=4)
        with pytest.raises(errors.CheckpointError, match="trained on ms://Qwen"):
            other.load(path)
        assert all(torch.equal(before[n], p) for n, p in lora_weights(model).items())

    def test_bad_names(self, tmp_path) -> None:
        model = make_model(tmp_path)
        with pytest.raises(errors.InvalidArgumentError, match="checkpoint name"):
            model.save("../escape")
        with pytest.raises(errors.NotFoundError, match="no adapter named 'zzz'"):
            model.step(adapter_name="zzz")


def test_labels_outside_the_vocabulary_are_refused(tmp_path, dataset) -> None:
    model = make_model(tmp_path)
    sample = dict(dataset[0])
    sample["labels"] = [10_000 if x != -100 else x for x in sample["labels"]]
    with pytest.raises(errors.InvalidArgumentError, match="labels contain 10000, outside the vocabulary"):
        model.forward_backward(inputs=[sample])
    assert model.get_train_state()["micro_step"] == 0


def test_a_failed_backward_leaves_the_window_as_it_was(tmp_path, dataset, monkeypatch) -> None:
    model = make_model(tmp_path, k=2)
    model.forward_backward(inputs=[dataset[0]])
    state = model._adapter(None)
    assert state.micro_in_window == 1
    grads = [p.grad.clone() for p in model._params(state)]

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(torch.autograd, "grad", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        model.forward_backward(inputs=[dataset[1]])
    monkeypatch.undo()
    # Nothing of the failed call was added: the window still holds the first micro-batch only.
    assert state.micro_in_window == 1 and state.micro_step == 1
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model._params(state), strict=True))
    model.forward_backward(inputs=[dataset[2]])
    assert model.step() is True


def test_bad_lora_config_values(tmp_path) -> None:
    model = MultiLoraTransformersModel(MODEL, output_dir=str(tmp_path))
    for config, message in (({"r": "x"}, "rank r must be an integer"), ({"lora_dropout": "x", "r": 4}, "")):
        with pytest.raises(errors.InvalidArgumentError, match=message):
            model.add_adapter_to_model("a", config)
    assert model.adapters == []
