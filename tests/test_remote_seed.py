"""The seed's full example runs unchanged against a real twinkle-server, and its remote loss
sequence equals the same loop run locally with the `twinkle` library."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peft import LoraConfig

from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import MultiLoraTransformersModel

SEED = Path(__file__).parent / "data" / "seed_example.py"


def local_seed_losses(output_dir: Path) -> list[float]:
    """The seed's steps 3-6 with `twinkle` imports: the independent local computation."""
    dataset = Dataset(dataset_meta=DatasetMeta("builtin://self-cognition"))
    dataset.set_template("Template", model_id="builtin://tiny-qwen2", max_length=512)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle模型", "model_author": "twinkle团队"})
    dataset.encode(batched=True)
    dataloader = DataLoader(dataset=dataset, batch_size=8)
    model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2", output_dir=str(output_dir))
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear"), gradient_accumulation_steps=2)
    model.set_template("Template")
    model.set_processor("InputProcessor", padding_side="right")
    model.set_loss("CrossEntropyLoss")
    model.set_optimizer("AdamW", lr=1e-4)
    model.set_lr_scheduler("LinearLR")
    losses = []
    for _, batch in enumerate(dataloader):
        losses.append(model.forward_backward(inputs=batch).loss)
        model.clip_grad_norm(1.0)
        model.step()
        model.zero_grad()
        model.lr_step()
    return losses


def test_seed_example_runs_remotely_and_matches_local(server, add_user, tmp_path) -> None:
    from twinkle_client import TwinkleClient

    key = add_user(server.data_dir, "seed-user")
    env = {**os.environ, "TWINKLE_SERVER_URL": server.url, "MODELSCOPE_TOKEN": key}
    # Only the test's credentials: a developer's own hub tokens must not travel to this server.
    for name in ("TWINKLE_SERVER_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN"):
        env.pop(name, None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(SEED)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stderr

    # Steps 1-7 ran: the loss was logged every second micro-batch and a checkpoint was saved.
    logged = [float(x) for x in re.findall(r"Step \d+, loss: ([0-9.]+)", log)]
    assert len(logged) == 22, log[-3000:]
    assert sum(logged[-5:]) < sum(logged[:5]), logged
    saved = re.search(r"Saved checkpoint: (twinkle://\S+)", log)
    assert saved, log[-3000:]

    # Step 8 (upload to the ModelScope hub) passes no hub token: the server will not lend the
    # operator's hub login, so it fails at once with one clear line.
    assert proc.returncode != 0
    last = log.strip().splitlines()[-1]
    assert "InvalidArgumentError" in last and "needs hub_token" in last, last
    assert time.monotonic() - started < 600

    with TwinkleClient(base_url=server.url, api_key=key) as client:
        runs = client.list_training_runs()
        assert len(runs) == 1
        run = runs[0]
        assert client.get_latest_checkpoint_path(run.training_run_id) == saved.group(1)
        points = client.get_metrics(run.training_run_id).points
    remote = [p.loss for p in sorted(points, key=lambda p: p.micro_step)]
    local = local_seed_losses(tmp_path / "local")
    assert remote == pytest.approx(local, abs=1e-6)
    assert [round(x, 4) for x in local[::2]] == logged
