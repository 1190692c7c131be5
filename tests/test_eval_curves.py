"""Evaluation curves against a real twinkle server: the documented eval loop (``forward_only``
over a held-out split every few steps) records eval points under the adapter's step, the metric
history gives each step's token-weighted eval loss, a resume supersedes the later ones, and the
live plot's finalized image draws them beside the training loss."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from peft import LoraConfig
from PIL import Image

import twinkle_client.dataloader
import twinkle_client.dataset
import twinkle_client.model
from twinkle.dataset import DatasetMeta

pytestmark = pytest.mark.server

MODEL = "builtin://tiny-qwen2"
DATA = "builtin://self-cognition"
EVAL_EVERY = 2



def loader(rows: range, batch_size: int) -> Any:
    dataset = twinkle_client.dataset.Dataset(dataset_meta=DatasetMeta(DATA, data_slice=rows))
    dataset.set_template("Template", model_id=MODEL, max_length=256)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "us"})
    dataset.encode(batched=True)
    return twinkle_client.dataloader.DataLoader(dataset=dataset, batch_size=batch_size)


def evaluate(model: Any, eval_loader: Any) -> list[tuple[float, int]]:
    """The README's eval loop; each batch's (loss, labelled tokens) as forward_only returned them."""
    return [(out.loss, out.num_tokens) for out in (model.forward_only(inputs=b) for b in eval_loader)]


def weighted(batches: list[tuple[float, int]]) -> float:
    return sum(loss * n for loss, n in batches) / sum(n for _, n in batches)


def eval_pixels(png: bytes, color: str) -> int:
    """Pixels of ``png`` within a small distance of ``color`` (the PNG is palette-quantized)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).max(axis=2) <= 24).sum())


def test_eval_points_reach_the_history_and_the_final_plot(connect: Any, tmp_path: Path) -> None:
    from twinkle_jupyter.plot import LossPlot
    from twinkle_jupyter.render import EVAL_COLORS, EVAL_LABEL

    train_loader = loader(range(0, 24), batch_size=4)
    eval_loader = loader(range(300, 320), batch_size=8)  # held out: rows training never sees (3 batches)
    model = twinkle_client.model.MultiLoraTransformersModel(model_id=MODEL, output_dir=str(tmp_path))
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4))
    model.set_processor("InputProcessor", padding_side="right")
    model.set_optimizer("AdamW", lr=5e-3)

    evals = {0: evaluate(model, eval_loader)}  # before training: the base model's eval loss
    # A batch without labelled tokens (logits only) evaluates nothing: no point.
    unlabelled = model.forward_only(inputs=[{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}],
                                    return_logits=True)
    assert unlabelled.loss is None and unlabelled.num_tokens == 0
    checkpoint = None
    for step, batch in enumerate(train_loader, start=1):
        model.forward_backward(inputs=batch)
        model.clip_grad_norm(1.0)
        model.step()
        model.zero_grad()
        if step % EVAL_EVERY == 0:
            evals[step] = evaluate(model, eval_loader)
        if step == 2:
            checkpoint = model.save(name="step-2", save_optimizer=True)
        if step == 4:
            break
    run_id = model.training_run_id
    assert [len(b) for b in evals.values()] == [3, 3, 3] and all(n > 0 for b in evals.values() for _, n in b)
    expected = {step: weighted(batches) for step, batches in evals.items()}
    assert expected[4] < expected[0]  # training on the same kind of rows lowers the held-out loss

    # The history: every labelled eval batch as a point under the step it evaluated, in order...
    metrics = connect.get_metrics(run_id)
    assert [(p.step, p.loss, p.num_tokens) for p in metrics.eval_points] == [
        (step, loss, n) for step, batches in evals.items() for loss, n in batches
    ]
    assert [p.step for p in metrics.points] == [1, 2, 3, 4]
    # ...and per step the token-weighted mean of them (not the plain mean of the batch losses).
    assert [(e.step, e.num_tokens, e.batches) for e in metrics.eval_loss] == [
        (s, sum(n for _, n in b), 3) for s, b in evals.items()
    ]
    assert [e.loss for e in metrics.eval_loss] == pytest.approx(list(expected.values()), rel=1e-12)
    plain = {s: sum(loss for loss, _ in b) / len(b) for s, b in evals.items()}
    assert any(abs(plain[s] - expected[s]) > 1e-9 for s in expected)  # the weighting shows
    # A reader at cursor 2 (its last completed step) gets step 2's eval points again, not step 0's.
    assert sorted({p.step for p in connect.get_metrics(run_id, since_step=2).eval_points}) == [2, 4]

    # Resuming the step-2 checkpoint supersedes the eval points of later steps, as the training ones.
    model.resume_from_checkpoint(checkpoint)
    resumed = connect.get_metrics(run_id)
    assert resumed.revision == metrics.revision + 1
    assert [(p.step, p.superseded) for p in resumed.eval_points if p.step == 4] == [(4, True)] * 3
    assert [e.step for e in resumed.eval_loss] == [0, 2]
    resumed_expected = [expected[0], expected[2]]

    # The plot (what `%twinkle plot RUN` shows): the eval series beside the training loss, and
    # in the finalized static image.
    plot = LossPlot(run_id, autostart=False, show_controls=False)
    try:
        bundle = plot.finalize("finished")
        hist = plot.history(run_id)
        assert [e.step for e in hist.eval_records()] == [0, 2]
        drawn = plot._renderer._lines[0].ev
        xs, ys = drawn.get_data()
        assert list(xs) == [0, 2] and list(ys) == pytest.approx(resumed_expected, rel=1e-12)
        legend = plot._renderer.ax_loss.get_legend()
        assert legend is not None and EVAL_LABEL in [t.get_text() for t in legend.get_texts()]
        assert eval_pixels(base64.b64decode(bundle["image/png"]), EVAL_COLORS[0]) > 50
        assert f"eval loss {resumed_expected[1]:.4f} at step 2" in bundle["text/plain"]
        assert plot.view.points[0]["eval"]["step"] == [0, 2]
    finally:
        plot.close()
    model.close()
