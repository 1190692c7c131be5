"""Remote objects release their server side when dropped or when the interpreter exits, so a
restarted kernel can resume its run at once and re-run cells do not fill the adapter slots."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import pytest
from peft import LoraConfig

pytestmark = pytest.mark.server

SCRIPT = """
import os
from peft import LoraConfig
from twinkle_client import init_twinkle_client
from twinkle_client.model import MultiLoraTransformersModel
init_twinkle_client(base_url=os.environ["URL"], api_key=os.environ["KEY"])
model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
model.add_adapter_to_model("default", LoraConfig(r=4, target_modules="all-linear"))
model.set_optimizer("AdamW", lr=1e-3)
print(model.training_run_id)
"""


def _status(client, run_id: str, want: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    status = client.get_training_run(run_id).status
    while status != want and time.monotonic() < deadline:
        time.sleep(0.1)
        status = client.get_training_run(run_id).status
    return status


def test_exit_releases_the_objects(server, add_user) -> None:
    from twinkle_client import TwinkleClient

    key = add_user(server.data_dir, "exits")
    env = {**os.environ, "URL": server.url, "KEY": key}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    with TwinkleClient(base_url=server.url, api_key=key) as client:
        assert _status(client, run_id, "detached", timeout=5) == "detached"


def test_dropped_model_frees_its_slot(server, add_user) -> None:
    from twinkle_client import TwinkleClient, init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    key = add_user(server.data_dir, "drops")
    init_twinkle_client(base_url=server.url, api_key=key)
    model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
    model.add_adapter_to_model("default", LoraConfig(r=4, target_modules="all-linear"))
    run_id = model.training_run_id
    with TwinkleClient(base_url=server.url, api_key=key) as client:
        assert client.get_training_run(run_id).status == "active"
        del model
        gc.collect()
        assert _status(client, run_id, "detached") == "detached"
