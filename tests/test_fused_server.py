"""Fused passes through a real server: three users in three client processes train at once
(the server gathers their waiting micro-batches into shared passes), and each one's losses,
gradient norms and final weights equal the same adapter trained alone in this process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peft import LoraConfig
from support.tenants import Tenant, tenants

from twinkle.model import MultiLoraTransformersModel

pytestmark = pytest.mark.server

STEPS = 8
RTOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]

CLIENT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from peft import LoraConfig
    from support.tenants import Tenant
    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    url, key, spec, steps = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
    t = Tenant(**spec)
    init_twinkle_client(base_url=url, api_key=key)
    model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
    model.add_adapter_to_model(t.name, LoraConfig(r=t.r, lora_alpha=2 * t.r, lora_dropout=t.dropout,
                                                  target_modules="all-linear"),
                               gradient_accumulation_steps=t.gas, seed=t.seed)
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_lr_scheduler("LinearLR")
    model.get_train_state()
    print("ready", flush=True)
    sys.stdin.readline()  # "go": every client holds its adapter
    outs, norms = [], []
    for step in range(steps):
        outs.append(model.forward_backward(inputs=t.batch(step)))
        norms.append(model.clip_grad_norm(1.0))
        model.step()
        model.zero_grad()
        model.lr_step()
    probe = model.forward_only(inputs=t.batch(1000))
    print(json.dumps({"losses": [float(o.loss) for o in outs],
                      "norms": [n.result() for n in norms],  # clip_grad_norm is deferred: a lazy value
                      "probe": float(probe.loss)}))
''')


def alone(tmp_path: Path, t: Tenant) -> dict[str, list[float] | float]:
    model = MultiLoraTransformersModel("builtin://tiny-qwen2", device="cpu", dtype="float32",
                                       output_dir=str(tmp_path / t.name))
    config = LoraConfig(r=t.r, lora_alpha=2 * t.r, lora_dropout=t.dropout, target_modules="all-linear")
    model.add_adapter_to_model(t.name, config, gradient_accumulation_steps=t.gas, seed=t.seed)
    model.set_optimizer("AdamW", lr=1e-2)
    model.set_lr_scheduler("LinearLR")
    losses, norms = [], []
    for step in range(STEPS):
        losses.append(model.forward_backward(inputs=t.batch(step)).loss)
        norms.append(model.clip_grad_norm(1.0))
        model.step()
        model.zero_grad()
        model.lr_step()
    return {"losses": losses, "norms": norms, "probe": model.forward_only(inputs=t.batch(1000)).loss}


def test_three_users_training_at_once_each_get_their_alone_results(tmp_path, start_server, add_user) -> None:
    from twinkle_client import TwinkleClient

    group = tenants(3)
    data = tmp_path / "data"
    server = start_server(data, "--max-loras", "4", "--max-loras-per-user", "1", "--dtype", "float32",
                          "--fuse-tokens", "32768")  # on by default on CUDA only
    procs = []
    try:
        keys = []
        for i, t in enumerate(group):
            key = add_user(data, f"user{i}")
            keys.append(key)
            spec = json.dumps({"name": t.name, "r": t.r, "rows": t.rows, "gas": t.gas, "dropout": t.dropout,
                               "seed": t.seed})
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(ROOT / "tests"), server.url, key, spec, str(STEPS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
            ))
        expected = {t.name: alone(tmp_path / "alone", t) for t in group}
        for p in procs:  # each says when it holds its adapter; then all start together
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.communicate()[1][-2000:]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        got = {}
        for t, p in zip(group, procs, strict=True):
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-2000:]
            got[t.name] = json.loads(out.strip().splitlines()[-1])
        with TwinkleClient(server.url, keys[0]) as observer:
            info = observer.get_server_info()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert info.fuse_tokens > 0 and info.fused_passes > 0 and info.fused_calls >= info.fused_passes
    for t in group:
        ref, mine = expected[t.name], got[t.name]
        for step, (a, b) in enumerate(zip(mine["losses"], ref["losses"], strict=True)):
            assert math.isclose(a, b, rel_tol=RTOL), f"{t.name} step {step}: loss {a}, alone {b}"
        for step, (a, b) in enumerate(zip(mine["norms"], ref["norms"], strict=True)):
            assert (a is None) == (b is None) and (a is None or math.isclose(a, b, rel_tol=RTOL)), (t.name, step, a, b)
        assert math.isclose(mine["probe"], ref["probe"], rel_tol=RTOL), f"{t.name}: weights after {STEPS} steps"
