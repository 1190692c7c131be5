"""The LoRA config allow-list: every peft LoraConfig field, accepted values leave the shared model alone.

For each field of peft's ``LoraConfig`` (enumerated, so a new peft field fails here until
it is classified and given cases), accepted values are added as a second adapter next to
another user's trained adapter, trained a few steps and removed; the base model's
parameters and buffers and the other adapter's weights and forward_only logits on a fixed
batch must stay bit-identical throughout. Refused values must raise one line and change
nothing: no adapter, no leftover weights, the slot still free.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import LoraRuntimeConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from twinkle import errors
from twinkle.model import MultiLoraTransformersModel
from twinkle.model import multi_lora as multi_lora_module
from twinkle.model.lora_policy import (
    LORA_FIELD_RULES,
    MAX_PATTERN_ENTRIES,
    PolicyLimits,
    check_lora_config,
    unclassified_fields,
)
from twinkle.protocol import codec

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

MODEL = "builtin://tiny-qwen2"
MAX_R = 8
BASE = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
LORA_FIELDS = [f.name for f in fields(LoraConfig)]
_gen = torch.Generator().manual_seed(0)
BATCH = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 250, (2, 24), generator=_gen).tolist()]


def one(field: str, *values: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{field: value, **extra} for value in values]


# Patterns peft would match against every module name for minutes or forever (the device
# thread all users share would hang): nested or alternating repeats, back-references, many repeats.
REDOS = ["(.*)*x", "(.|.)*x", "(a+)+b", r"(\w)\1", ".*.*.*.*x"]

# field -> (accepted, refused): each entry is what is added to BASE.
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "task_type": (one("task_type", None, "CAUSAL_LM"), one("task_type", "SEQ_CLS", "SEQ_2_SEQ_LM", 3)),
    "peft_type": (one("peft_type", None, "LORA"), one("peft_type", "IA3", 1)),
    "auto_mapping": (one("auto_mapping", None), one("auto_mapping", {"base_model_class": "X", "parent_library": "y"})),
    "peft_version": (one("peft_version", None, "0.21.2"), one("peft_version", 5, "x" * 300)),
    "base_model_name_or_path": (one("base_model_name_or_path", None, "Qwen/Qwen2.5-0.5B"),
                                one("base_model_name_or_path", ["a"], "x" * 300)),
    "revision": (one("revision", None, "main"), one("revision", 1)),
    "inference_mode": (one("inference_mode", False), one("inference_mode", True, 1)),
    "r": (one("r", 1, MAX_R), one("r", 0, -1, MAX_R + 1, 20000, 2**70, "x", 4.0, True)),
    "target_modules": (
        one("target_modules", None, "all-linear", ["q_proj"], r".*\.mlp\..*_proj", ["embed_tokens"], ["lm_head"],
            r"model\.layers\.[0-9]+\.self_attn\.(q|v)_proj"),
        one("target_modules", 5, [], [""], ["x" * 300], "(", [1], ["norm"], ["q_proj", "norm"], ["no_such_layer"],
            [f"m{i}" for i in range(300)], *REDOS),
    ),
    "exclude_modules": (one("exclude_modules", None, ["v_proj"], r".*\.0\..*"),
                        one("exclude_modules", 5, "(", [None], *REDOS)),
    "lora_alpha": (one("lora_alpha", 16, 0.5, 1000),
                   one("lora_alpha", 0, -1, math.nan, math.inf, "x", True, 2**2000, -(2**2000))),
    "lora_dropout": (one("lora_dropout", 0.0, 0.1), one("lora_dropout", -0.1, 1.0, math.nan, "x")),
    "fan_in_fan_out": (one("fan_in_fan_out", False), one("fan_in_fan_out", True, "no")),
    "bias": (one("bias", "none"), one("bias", "all", "lora_only", None)),
    "use_rslora": (one("use_rslora", False, True), one("use_rslora", "yes", 1)),
    "modules_to_save": (one("modules_to_save", None), one("modules_to_save", ["lm_head"], ["embed_tokens"])),
    "init_lora_weights": (
        one("init_lora_weights", True, False, "gaussian"),
        one("init_lora_weights", "pissa", "pissa_niter_4", "olora", "loftq", "eva", "corda", "orthogonal",
            "lora_ga", "mica", "x", 1, None),
    ),
    "layers_to_transform": (one("layers_to_transform", None, [0], 1),
                            one("layers_to_transform", [-1], ["x"], [True], [], list(range(300)), "0")),
    "layers_pattern": (one("layers_pattern", None, "layers", ["layers"], layers_to_transform=[0]),
                       one("layers_pattern", 5, "(", [""], ".*.*.*x", ["layers"] * 17, *REDOS,
                           layers_to_transform=[0])),
    "rank_pattern": (
        one("rank_pattern", {}, {"q_proj": 2}, {"v_proj": MAX_R}, {r"layers\.0\.self_attn\.q_proj": 1}),
        one("rank_pattern", {"q_proj": 20000}, {"q_proj": MAX_R + 1}, {"q_proj": 0}, {"q_proj": "x"},
            {"q_proj": 2.0}, {"q_proj": True}, {"": 2}, {"x" * 300: 2}, {"(": 2}, [1, 2], 5, {REDOS[0]: 2},
            {".*_.*_.*x": 2},
            {f"k{i}": 2 for i in range(MAX_PATTERN_ENTRIES + 1)}),
    ),
    "alpha_pattern": (
        one("alpha_pattern", {}, {"q_proj": 32}, {"v_proj": 0.5}),
        one("alpha_pattern", {"q_proj": math.nan}, {"q_proj": -1}, {"q_proj": "x"}, {"(": 2}, 5,
            {f"k{i}": 2 for i in range(MAX_PATTERN_ENTRIES + 1)}),
    ),
    "megatron_config": (one("megatron_config", None), one("megatron_config", {"a": 1})),
    "megatron_core": (one("megatron_core", "megatron.core"), one("megatron_core", "os")),
    "trainable_token_indices": (one("trainable_token_indices", None),
                                one("trainable_token_indices", [0, 1], {"embed_tokens": [0]})),
    "loftq_config": (one("loftq_config", {}), one("loftq_config", {"loftq_bits": 4}, init_lora_weights="loftq")),
    "eva_config": (one("eva_config", None), one("eva_config", {"rho": 2.0}, {})),
    "corda_config": (one("corda_config", None), one("corda_config", {}, {"cache_file": "/tmp/x"})),
    "lora_ga_config": (one("lora_ga_config", None), one("lora_ga_config", {})),
    "use_dora": (one("use_dora", False, True), one("use_dora", "yes")),
    "velora_config": (one("velora_config", None), one("velora_config", {})),
    "alora_invocation_tokens": (one("alora_invocation_tokens", None), one("alora_invocation_tokens", [1, 2])),
    "use_qalora": (one("use_qalora", False), one("use_qalora", True)),
    "qalora_group_size": (one("qalora_group_size", 16), one("qalora_group_size", 32)),
    "monteclora_config": (one("monteclora_config", None), one("monteclora_config", {})),
    "layer_replication": (one("layer_replication", None), one("layer_replication", [[0, 1]], [(0, 2), (1, 2)])),
    "runtime_config": (one("runtime_config", LoraRuntimeConfig()),
                       one("runtime_config", LoraRuntimeConfig(ephemeral_gpu_offload=True),
                           {"ephemeral_gpu_offload": True})),
    "lora_bias": (one("lora_bias", False), one("lora_bias", True)),
    "target_parameters": (one("target_parameters", None), one("target_parameters", ["mlp.down_proj.weight"])),
    "use_bdlora": (one("use_bdlora", None), one("use_bdlora", {})),
    "arrow_config": (one("arrow_config", None), one("arrow_config", {})),
    "kasa_config": (one("kasa_config", None), one("kasa_config", {})),
    "ensure_weight_tying": (one("ensure_weight_tying", False), one("ensure_weight_tying", True)),
}


def _cases(kind: int) -> list[Any]:
    return [
        pytest.param(field, {**BASE, **extra}, id=f"{field}-{i}")
        for field, pair in CASES.items()
        for i, extra in enumerate(pair[kind])
    ]


# ------------------------------------------------------------------ snapshots


def _is_lora(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_state(model: MultiLoraTransformersModel) -> dict[str, torch.Tensor]:
    """Every non-LoRA parameter and buffer of the shared model, by its name without peft's wrapper."""
    out = {}
    for name, tensor in itertools.chain(model._base.named_parameters(), model._base.named_buffers()):
        if not _is_lora(name):
            out[name.replace(".base_layer", "")] = tensor.detach().clone()
    return out


def adapter_weights(model: MultiLoraTransformersModel, adapter: str) -> dict[str, torch.Tensor]:
    peft_name = model._adapter(adapter).peft_name
    return {n: p.detach().clone() for n, p in model._peft.named_parameters() if peft_name in n.split(".")}


def peft_adapters(model: MultiLoraTransformersModel) -> set[str]:
    """Every adapter name any peft layer or config holds (leftovers of a failed add included)."""
    names = set(model._peft.peft_config) if model._peft is not None else set()
    for module in model._base.modules():
        if isinstance(module, BaseTunerLayer):
            names.update(module._all_available_adapter_names())
    return names


@dataclass
class Snapshot:
    base: dict[str, torch.Tensor]
    other: dict[str, torch.Tensor]
    logits: torch.Tensor
    loss: float

    @classmethod
    def take(cls, model: MultiLoraTransformersModel) -> Snapshot:
        out = model.forward_only(inputs=BATCH, adapter_name="other", return_logits=True)
        return cls(base_state(model), adapter_weights(model, "other"), out.logits, out.loss)

    def assert_same(self, model: MultiLoraTransformersModel, when: str) -> None:
        now = Snapshot.take(model)
        assert now.base.keys() == self.base.keys(), f"{when}: the base model's structure changed"
        changed = [n for n, t in self.base.items() if not (t.dtype == now.base[n].dtype and torch.equal(t, now.base[n]))]
        assert not changed, f"{when}: base tensors changed: {changed[:5]}"
        assert all(torch.equal(t, now.other[n]) for n, t in self.other.items()), f"{when}: the other adapter changed"
        assert torch.equal(self.logits, now.logits) and self.loss == now.loss, (
            f"{when}: the other adapter's forward_only changed ({self.loss!r} -> {now.loss!r})"
        )



@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiLoraTransformersModel, Snapshot]:
    """One model, fp32 on the CPU, with another user's adapter trained a few steps."""
    model = MultiLoraTransformersModel(MODEL, max_loras=3, max_r=MAX_R, device="cpu", dtype="float32",
                                       output_dir=str(tmp_path_factory.mktemp("lora-policy")))
    model.add_adapter_to_model("other", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-2, adapter_name="other")
    for _ in range(3):
        model.forward_backward(inputs=BATCH, adapter_name="other")
        model.step(adapter_name="other")
        model.zero_grad(adapter_name="other")
    snap = Snapshot.take(model)
    assert all(t.abs().sum() > 0 for n, t in snap.other.items() if "lora_B" in n)  # trained: B is no longer 0
    return model, snap


def _wire(config: LoraConfig) -> LoraConfig:
    """``config`` as the server rebuilds it from what a client sends."""
    return codec.from_wire(codec.unpack(codec.pack(codec.to_wire(config))))


def _build(values: dict[str, Any]) -> LoraConfig | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return LoraConfig(**values)
        except Exception:
            return None


# ------------------------------------------------------------------ the classification


def test_every_lora_config_field_is_classified_and_exercised() -> None:
    assert unclassified_fields() == [], (
        f"peft's LoraConfig has fields the LoRA policy does not classify: {unclassified_fields()}; "
        "add them to twinkle.model.lora_policy.LORA_FIELD_RULES"
    )
    assert set(LORA_FIELD_RULES) == set(LORA_FIELDS), sorted(set(LORA_FIELD_RULES) ^ set(LORA_FIELDS))
    assert set(CASES) == set(LORA_FIELDS), f"fields without cases: {sorted(set(LORA_FIELDS) ^ set(CASES))}"
    for field, (accepted, refused) in CASES.items():
        assert accepted and refused, field


def test_an_unclassified_field_refuses_every_config(monkeypatch) -> None:
    limits = PolicyLimits(max_r=MAX_R)
    monkeypatch.delitem(LORA_FIELD_RULES, "use_dora")
    for config in (LoraConfig(**BASE), dict(BASE)):
        with pytest.raises(errors.InvalidArgumentError, match=r"^LoRA config field use_dora is not "
                                                              "classified by this server's LoRA policy"):
            check_lora_config(config, limits)


def test_a_subclass_field_is_refused() -> None:
    @dataclass
    class Wider(LoraConfig):
        rewrite_base: bool = False

    with pytest.raises(errors.InvalidArgumentError, match="field rewrite_base"):
        check_lora_config(Wider(**BASE), PolicyLimits(max_r=MAX_R))


# ------------------------------------------------------------------ accepted values


@pytest.mark.parametrize(("field", "values"), _cases(0))
def test_accepted_value_leaves_the_shared_model_alone(shared, field: str, values: dict[str, Any]) -> None:
    model, before = shared
    limits = model._lora_limits
    config = _build(values)
    assert config is not None, f"{field}: an accepted case must build a LoraConfig"
    # The same verdict for a dict, the object and what the server rebuilds from the wire.
    check_lora_config(dict(values), limits)
    check_lora_config(config, limits)
    sent = _wire(config)
    slots = model.free_slots

    model.add_adapter_to_model("probe", sent)
    try:
        before.assert_same(model, "after add")
        start = adapter_weights(model, "probe")
        assert start, f"{field}: the adapter has no weights"
        model.set_optimizer("AdamW", lr=1e-2, adapter_name="probe")
        for _ in range(2):  # the second step is the first with a nonzero B in every layer
            out = model.forward_backward(inputs=BATCH, adapter_name="probe")
            assert math.isfinite(out.loss)
            model.step(adapter_name="probe")
            model.zero_grad(adapter_name="probe")
        trained = adapter_weights(model, "probe")
        assert any(not torch.equal(start[n], t) for n, t in trained.items()), f"{field}: the adapter did not train"
        before.assert_same(model, "after training the adapter")
    finally:
        model.remove_adapter("probe")
    before.assert_same(model, "after remove")
    assert model.adapters == ["other"] and model.free_slots == slots
    assert peft_adapters(model) == {model._adapter("other").peft_name}


# ------------------------------------------------------------------ refused values


def _assert_refused(model: MultiLoraTransformersModel, config: Any, field: str) -> None:
    slots, held = model.free_slots, peft_adapters(model)
    try:
        model.add_adapter_to_model("probe", config)
    except errors.InvalidArgumentError as exc:
        message = str(exc)
    else:
        model.remove_adapter("probe")  # so that the next cases start clean
        pytest.fail(f"{field}: {_short_repr(config)} was accepted")
    assert "\n" not in message and len(message) < 400, message
    assert field in message or message.startswith(("LoRA config does not fit", "LoraConfig has no field")), message
    assert model.adapters == ["other"] and model.free_slots == slots
    assert peft_adapters(model) == held, "a refused adapter left weights behind"


@pytest.mark.parametrize(("field", "values"), _cases(1))
def test_refused_value_changes_nothing(shared, field: str, values: dict[str, Any]) -> None:
    model, before = shared
    # A dict, as a caller in process may pass it.
    _assert_refused(model, dict(values), field)
    # What the server decodes from a client's dict: refused while decoding, or by the model.
    try:
        wire_dict = codec.unpack(codec.pack(codec.to_wire({"__type__": "LoraConfig", "value": values})))
    except (errors.InvalidArgumentError, OverflowError):
        wire_dict = None  # not something a client can send
    if wire_dict is not None:
        try:
            decoded = codec.from_wire(wire_dict)
        except errors.InvalidArgumentError:
            pass
        else:
            if _holds(decoded, values):
                _assert_refused(model, decoded, field)
    # A LoraConfig object and its wire form, where peft builds one that still holds the values.
    config = _build(values)
    if config is not None and _holds(config, values):
        _assert_refused(model, config, field)
        try:
            sent = _wire(config)
        except (errors.InvalidArgumentError, OverflowError):
            sent = None  # not something a client can send
        if sent is not None and _holds(sent, values):  # the codec sends only what differs from peft's defaults
            _assert_refused(model, sent, field)
    # Once for all the forms refused above: the shared model and the other adapter are as they were.
    before.assert_same(model, f"after refusing {field}")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def _holds(config: LoraConfig, values: dict[str, Any]) -> bool:
    """Whether peft kept every value given (peft_type, for one, is always set to LORA)."""
    return all(_kept(getattr(config, k), v) for k, v in values.items())


def _kept(built: Any, given: Any) -> bool:
    """Whether peft's LoraConfig kept the value given (a list as a set, a dict as its config class)."""
    if isinstance(given, dict) and is_dataclass(built):
        return True
    try:
        return (type(built) is type(given) and bool(built == given)) or (isinstance(built, set) and set(given) == built)
    except Exception:
        return False


def test_refusals_name_the_limit_and_the_field(shared) -> None:
    model, before = shared
    cases = [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is refused: use True, False or 'gaussian'"),
        ({"layer_replication": [[0, 1]]}, "layer_replication=[[0, 1]] is refused (it changes the shared model"),
        ({"rank_pattern": {"q_proj": 20000}}, "LoRA rank rank_pattern['q_proj']=20000 is above this model's "
                                              f"max_r={MAX_R} (a server sets it with twinkle-server serve --max-r)"),
        ({"r": 16}, f"LoRA rank r=16 is above this model's max_r={MAX_R}"),
        ({"bias": "all"}, "bias='all' is refused: bias must be 'none'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head'] is refused (trains full copies"),
        ({"no_such_field": 1}, "LoraConfig has no field 'no_such_field'"),
    ]
    for extra, message in cases:
        with pytest.raises(errors.InvalidArgumentError) as info:
            model.add_adapter_to_model("probe", {**BASE, **extra})
        assert message in str(info.value), (extra, str(info.value))
    with pytest.raises(errors.InvalidArgumentError, match="peft.LoraConfig or a dict, got str"):
        model.add_adapter_to_model("probe", "r=4")
    before.assert_same(model, "after the refusals")


def test_a_refused_first_adapter_leaves_the_base_unwrapped(tmp_path) -> None:
    model = MultiLoraTransformersModel(MODEL, max_r=MAX_R, device="cpu", dtype="float32", output_dir=str(tmp_path))
    before = base_state(model)
    for extra in ({"init_lora_weights": "pissa"}, {"layer_replication": [[0, 1]]}, {"target_modules": ["q_proj",
                                                                                                        "norm"]}):
        with pytest.raises(errors.InvalidArgumentError):
            model.add_adapter_to_model("a", {**BASE, **extra})
    assert model.adapters == [] and peft_adapters(model) == set()
    after = base_state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, after[n]) for n, t in before.items())
    model.add_adapter_to_model("a", dict(BASE))  # the model still takes a good config
    assert model.adapters == ["a"]


def test_adapter_layers_outside_the_allowed_kinds_are_taken_out_again(shared, monkeypatch) -> None:
    """A config whose targets land in a layer kind that writes to the base (as peft's
    MultiheadAttention does) is removed again; shown here by allowing Embedding layers only."""
    model, before = shared
    from peft.tuners import lora

    monkeypatch.setattr(multi_lora_module, "_ALLOWED_LORA_LAYERS", (lora.Embedding,))
    slots, held = model.free_slots, peft_adapters(model)
    with pytest.raises(errors.InvalidArgumentError, match=r"LoRA on model\.layers\.0\.self_attn\.q_proj \(Linear\) "
                                                          "is not supported on a shared base model"):
        model.add_adapter_to_model("probe", dict(BASE))
    assert model.free_slots == slots and peft_adapters(model) == held
    before.assert_same(model, "after the layer check")
