"""twinkle_client against a real twinkle server (the ``server`` fixture of conftest.py).

The promise under test: the seed's training code, with ``from twinkle_client`` imports,
runs on the server and computes exactly what the same code computes locally.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from peft import LoraConfig

import twinkle.dataloader
import twinkle.dataset
import twinkle.model
import twinkle_client
import twinkle_client.dataloader
import twinkle_client.dataset
import twinkle_client.model
from twinkle import errors
from twinkle.dataset import DatasetMeta
from twinkle_client import client as client_mod
from twinkle_client import init_twinkle_client

pytestmark = pytest.mark.server

MODEL = "builtin://tiny-qwen2"
DATA = "builtin://self-cognition"

LOCAL = SimpleNamespace(DataLoader=twinkle.dataloader.DataLoader, Dataset=twinkle.dataset.Dataset,
                        Model=twinkle.model.MultiLoraTransformersModel)
REMOTE = SimpleNamespace(DataLoader=twinkle_client.dataloader.DataLoader, Dataset=twinkle_client.dataset.Dataset,
                         Model=twinkle_client.model.MultiLoraTransformersModel)



def make_data(ns: SimpleNamespace, rows: int, batch_size: int = 8, shuffle: bool = False) -> Any:
    dataset = ns.Dataset(dataset_meta=DatasetMeta(DATA, data_slice=range(rows)))
    dataset.set_template("Template", model_id=MODEL, max_length=256)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle模型", "model_author": "twinkle团队"})
    dataset.encode(batched=True)
    return ns.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=shuffle, seed=3)


def make_model(ns: SimpleNamespace, output_dir: Path, optimizer: bool = True) -> Any:
    model = ns.Model(model_id=MODEL, output_dir=str(output_dir))
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=8), gradient_accumulation_steps=2)
    model.set_template("Template")
    model.set_processor("InputProcessor", padding_side="right")
    model.set_loss("CrossEntropyLoss")
    if optimizer:
        model.set_optimizer("AdamW", lr=2e-3)
        model.set_lr_scheduler("LinearLR")
    return model


def train(model: Any, dataloader: Any, epochs: int = 1) -> list[Any]:
    """The seed's loop; the outputs are kept as returned (lazy remotely)."""
    outputs = []
    for _ in range(epochs):
        for _step, batch in enumerate(dataloader):
            output = model.forward_backward(inputs=batch)
            outputs.append(output)
            model.clip_grad_norm(1.0)
            model.step()
            model.zero_grad()
            model.lr_step()
    return outputs


def test_pipelined_training_matches_a_local_run(connect: Any, tmp_path: Path) -> None:
    local_model = make_model(LOCAL, tmp_path / "local")
    local_losses = [o.loss for o in train(local_model, make_data(LOCAL, 24, shuffle=True), epochs=2)]

    model = make_model(REMOTE, tmp_path / "remote")
    loader = make_data(REMOTE, 24, shuffle=True)
    outputs = train(model, loader, epochs=2)
    remote_losses = [o.loss for o in outputs]
    assert remote_losses == pytest.approx(local_losses, abs=1e-6)
    assert local_losses[-1] < local_losses[0]

    path = model.save(name="final", save_optimizer=True)
    run_id = model.training_run_id
    assert path == f"twinkle://{run_id}/weights/final"
    assert connect.get_latest_checkpoint_path(run_id) == path
    assert [c.twinkle_path for c in connect.list_checkpoints(run_id)] == [path]
    assert run_id in [r.training_run_id for r in connect.list_training_runs(limit=50)]
    metrics = connect.get_metrics(run_id)
    assert [p.loss for p in metrics.points] == pytest.approx(local_losses, abs=1e-6)
    assert loader.get_state()["consumed_train_samples"] == 48
    model.close()


def test_a_failing_deferred_call_surfaces_at_the_next_call(connect: Any, tmp_path: Path) -> None:
    model = make_model(REMOTE, tmp_path, optimizer=False)
    model.set_loss("NoSuchLoss")  # deferred: returns at once
    # A call that waits is the first to learn of the failure; it raises it, naming the call.
    with pytest.raises(errors.UnknownComponentError, match=r"^set_loss\(\) failed: ") as info:
        model.get_train_state()
    assert "NoSuchLoss" in str(info.value)
    assert model.set_optimizer("AdamW", lr=1e-3).is_none()  # usable again, and that call ran
    stepped = model.step()  # nothing accumulated: the server says False, no error
    assert not stepped
    batch = [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}]  # no labelled token: the call fails
    output = model.forward_backward(inputs=batch)
    later = model.clip_grad_norm(1.0)
    with pytest.raises(errors.InvalidArgumentError, match=r"^forward_backward\(\) failed: .*no labelled tokens"):
        print(f"loss: {output}")
    with pytest.raises(errors.InvalidArgumentError, match=r"not run: an earlier call \(forward_backward\) failed"):
        float(later)
    assert model.zero_grad() == True  # noqa: E712  (the failure was seen when its output was read)
    model.close()


def test_remote_dataloader_break_and_continue_sees_each_sample_once(connect: Any) -> None:
    remote = make_data(REMOTE, 20, batch_size=3, shuffle=True)
    local = make_data(LOCAL, 20, batch_size=3, shuffle=True)
    for _epoch in range(2):
        got: list[list[int]] = []
        for i, batch in enumerate(remote):
            got += [row["input_ids"] for row in batch]
            if i == 2:
                break
        assert remote.get_state()["position_in_epoch"] == 9
        got += [row["input_ids"] for batch in remote for row in batch]
        expected = [row["input_ids"] for batch in local for row in batch]
        assert got == expected and len(got) == 20
    assert remote.get_state() == local.get_state()
    remote.resume_from_checkpoint(38)
    assert [len(b) for b in remote] == [2]


def test_reconnecting_mid_training_keeps_the_model_working(connect: Any, server: Any,
                                                           server_user: tuple[str, str], tmp_path: Path) -> None:
    model = make_model(REMOTE, tmp_path)
    loader = make_data(REMOTE, 16)
    batches = iter(loader)
    first = model.forward_backward(inputs=next(batches))
    model.clip_grad_norm(1.0)
    init_twinkle_client(base_url=server.url, api_key=server_user[1])  # a notebook cell run again
    assert connect.closed
    second = model.forward_backward(inputs=next(batches))  # the same model and iterator carry on
    assert model.step() == True  # noqa: E712  (second micro-batch of the window: the update happens)
    assert first.loss > 0 and second.micro_step == 2
    run = client_mod.current_client().get_training_run(model.training_run_id)
    assert run.status == "active" and run.cur_step == 1
    model.close()
    assert client_mod.current_client().get_training_run(run.training_run_id).status == "detached"


def test_resume_moves_the_adapter_to_the_checkpoints_run(connect: Any, tmp_path: Path) -> None:
    model = make_model(REMOTE, tmp_path)
    loader = make_data(REMOTE, 16)
    train(model, loader)
    path = model.save("ckpt", save_optimizer=True)
    first_run = model.training_run_id
    model.close()

    again = make_model(REMOTE, tmp_path)
    assert again.training_run_id != first_run
    progress = again.resume_from_checkpoint(path)
    assert again.training_run_id == first_run
    assert progress["consumed_train_samples"] == 16 and progress["cur_step"] == 1
    loader.resume_from_checkpoint(progress["consumed_train_samples"])
    assert loader.get_state()["epoch"] == 1
    again.close()
