"""twinkle-server: one user's LoraConfig cannot change the shared base model under another user.

User B trains an adapter and measures forward_only on a fixed batch; user A then sends
LoRA configs that read or rewrite the base weights (PiSSA, OLoRA), change its structure
(layer replication), get round max_r (rank_pattern) or are plain hostile values. Each is
refused with a 4xx-style call error and B's loss and logits stay bit-identical.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from peft import LoraConfig

from twinkle.errors import ERRORS_BY_CODE

pytestmark = pytest.mark.server

_rng = np.random.default_rng(0)
BATCH = [{"input_ids": ids, "labels": ids} for ids in _rng.integers(3, 250, (2, 24)).tolist()]
TARGETS = {"r": 4, "target_modules": "all-linear"}

ATTACKS = [
    # What was reported: each changed another user's results (or the server's memory) before.
    ("pissa", LoraConfig(init_lora_weights="pissa", **TARGETS), "init_lora_weights='pissa' is refused"),
    ("layer_replication", LoraConfig(layer_replication=[[0, 1]], **TARGETS), "layer_replication=[[0, 1]] is refused"),
    ("rank_pattern", LoraConfig(rank_pattern={"q_proj": 20000}, **TARGETS), "--max-r"),
    # The same and more as plain dicts, the values a client may send without peft.
    ("olora", {"init_lora_weights": "olora", **TARGETS}, "init_lora_weights='olora' is refused"),
    # (A server without scipy refuses it earlier, while peft builds the config.)
    ("loftq", {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}, **TARGETS}, ""),
    ("dict layer_replication", {"layer_replication": [[0, 1], [0, 2]], **TARGETS}, "layer_replication"),
    ("big rank_pattern", {"rank_pattern": {f"layers\\.{i}\\.q_proj": 2 for i in range(5000)}, **TARGETS},
     "rank_pattern"),
    ("r", {"r": 10**6, "target_modules": "all-linear"}, "max_r"),
    ("r as text", {"r": "8", "target_modules": "all-linear"}, "rank r must be an integer"),
    ("bias", {"bias": "all", **TARGETS}, "bias"),
    ("modules_to_save", {"modules_to_save": ["lm_head"], **TARGETS}, "modules_to_save"),
    ("corda files", {"init_lora_weights": "corda", "corda_config": {"cache_file": "/tmp/corda"}, **TARGETS},
     "corda"),
    ("bad regex", {"r": 4, "target_modules": "(("}, "target_modules"),
    # A pattern that would backtrack for ever on the device thread every user shares.
    ("slow regex", {"r": 4, "target_modules": "(.*)*x"}, "could take very long to match"),
    ("odd types", {"r": 4, "target_modules": {"q_proj": 1}}, ""),
    ("runtime_config", {"runtime_config": {"ephemeral_gpu_offload": True}, **TARGETS}, "runtime_config"),
    ("unknown field", {"r": 4, "rewrite_the_base": True}, "rewrite_the_base"),
]


def forward(client, model: str) -> tuple[float, bytes]:
    r = client.calls(model, [("forward_only", [], {"inputs": BATCH, "return_logits": True})])
    assert r.status_code == 200, r.status_code
    result = client.body(r)["results"][0]
    assert result["ok"], result["error"]
    value = result["value"]["value"]
    return value["loss"], value["logits"]["data"]


def test_one_users_lora_config_cannot_change_the_shared_model(server, add_user, raw_client) -> None:
    a = raw_client(server, add_user(server.data_dir, f"lora-a-{uuid.uuid4().hex[:6]}"))
    b = raw_client(server, add_user(server.data_dir, f"lora-b-{uuid.uuid4().hex[:6]}"))
    b_model = b.create("model")
    a_model = a.create("model")
    try:
        r = b.calls(b_model, [
            ("add_adapter_to_model", ["b", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")], {}),
            ("set_optimizer", ["AdamW"], {"lr": 1e-2}),
            *[call for _ in range(2) for call in (("forward_backward", [], {"inputs": BATCH}), ("step", [], {}),
                                                 ("zero_grad", [], {}))],
        ])
        assert r.status_code == 200 and all(x["ok"] for x in b.body(r)["results"]), b.body(r)
        loss, logits = forward(b, b_model)

        for label, config, message in ATTACKS:
            r = a.calls(a_model, [("add_adapter_to_model", ["a", config], {})])
            assert r.status_code == 200, (label, r.status_code)
            result = a.body(r)["results"][0]
            assert not result["ok"], f"{label}: accepted"
            err = result["error"]
            assert err["code"] in ("invalid_argument", "capacity"), (label, err)
            assert 400 <= ERRORS_BY_CODE[err["code"]].status < 500 and err["call"] == "add_adapter_to_model"
            assert message in err["message"] and "\n" not in err["message"], (label, err)
            assert forward(b, b_model) == (loss, logits), f"{label}: user B's forward_only changed"

        # A has no adapter; B's slot and results are as they were.
        r = a.calls(a_model, [("get_train_state", [], {})])
        assert a.body(r)["results"][0]["error"]["code"] == "invalid_state"
        assert forward(b, b_model) == (loss, logits)
        # A good config still works for A, and B is unchanged by it.
        assert a.call(a_model, "add_adapter_to_model", "a", LoraConfig(r=4, target_modules="all-linear")) is None
        assert forward(b, b_model) == (loss, logits)
    finally:
        a.delete(f"/objects/{a_model}")
        b.delete(f"/objects/{b_model}")
