"""Which peft ``LoraConfig`` settings an adapter on a shared base model may use.

An allow-list: every field of peft's ``LoraConfig`` is classified in ``LORA_FIELD_RULES``,
either with a check of the values it may take or as one that must stay at peft's default.
A config is accepted only when each of its fields keeps the adapter to its own low-rank
weights: nothing may read the base weights to initialise the adapter and rewrite them
(PiSSA, OLoRA, LoftQ, EVA, CorDA, ...), change the model's structure (layer replication),
train base modules (modules to save, biases, trainable tokens) or push a rank past
``max_r``. A field the table does not know (a newer peft) refuses every config until it
is classified.

Every refusal is an ``InvalidArgumentError`` with one line that names the field.
"""

from __future__ import annotations

import math
import re
import reprlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from peft import LoraConfig

try:  # the parser behind re.compile: its tree shows how a pattern backtracks
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

from ..errors import InvalidArgumentError, first_line

MAX_NAMES = 256
"""Most entries in a list of module names, layer indices or patterns."""
MAX_NAME_CHARS = 256
"""Longest module name, pattern or metadata string."""
MAX_PATTERN_ENTRIES = 64
"""Most keys in ``rank_pattern`` or ``alpha_pattern`` (each is matched against every adapted module)."""
MAX_REGEX_REPEATS = 3
"""Most repeats (``*``, ``+``, ``{m,n}``) in a target or exclude pattern: matching time grows
with their power. peft wraps rank/alpha pattern keys and layer patterns in repeats of its own
and matches them against every module, so those may hold ``MAX_REGEX_REPEATS - 1``."""
MAX_LAYER_PATTERNS = 16
"""Most entries in a ``layers_pattern`` list."""
MAX_LAYER_INDEX = 100_000
"""Highest layer index ``layers_to_transform`` may name."""

# Initialisations that leave the base weights alone: B = 0 with A random (True, 'gaussian')
# or both random (False). Every other one (pissa*, olora, loftq, eva, corda, orthogonal,
# lora_ga, mica, ...) reads the base weights, and most subtract what they put in the adapter.
SAFE_INITS = (True, False, "gaussian")


@dataclass(frozen=True)
class PolicyLimits:
    """What the serving model allows: the highest rank and the ``fan_in_fan_out`` its layers need."""

    max_r: int
    fan_in_fan_out: bool = False


Check = Callable[[str, Any, PolicyLimits], None]


@dataclass(frozen=True)
class FieldRule:
    """How one ``LoraConfig`` field is treated: ``check`` is None when it must stay at peft's default."""

    allowed: str
    why: str
    check: Check | None = None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 4


def _short(value: Any) -> str:
    """A short repr, never built in full: a hostile value may be a huge list or dict."""
    try:
        text = _REPR.repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse(name: str, value: Any, need: str, shown: str | None = None) -> InvalidArgumentError:
    return InvalidArgumentError(f"LoRA config field {name}={shown or _short(value)} is refused: {need}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite float, or an int a float holds exactly (a larger one overflows peft's arithmetic)."""
    if _is_int(value):
        return abs(value) <= 2**53
    return isinstance(value, float) and math.isfinite(value)


def _is_text(value: Any, text: str) -> bool:
    """``value`` is the string ``text`` (or a str enum member with that value)."""
    return isinstance(value, str) and str.__eq__(value, text) is True


def _is_default(value: Any, default: Any) -> bool:
    if type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # an odd value that cannot even be compared is not the default
        return False


_REPEATS = {op for op in (getattr(_sre, n, None) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")) if op}


def _repeats(items: Any, in_repeat: bool) -> int:
    """How many repeats a parsed pattern has; ``ValueError`` for the shapes that backtrack
    exponentially (a repeat or alternatives inside a repeat, back-references)."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            many = av[1] > 1
            if in_repeat and many:
                raise ValueError("a repeat inside a repeat")
            count += many + _repeats(av[2], in_repeat or many)
        elif op is _sre.SUBPATTERN:
            count += _repeats(av[-1], in_repeat)
        elif op is _sre.BRANCH:
            if in_repeat:
                raise ValueError("alternatives inside a repeat; use a character class")
            count += sum(_repeats(branch, in_repeat) for branch in av[1])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            count += _repeats(av[1], in_repeat)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise ValueError("a back-reference")
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            count += _repeats(av, in_repeat)
    return count


def _check_regex(name: str, value: str, max_repeats: int) -> None:
    """A pattern peft matches against every module name, on the device thread all users share:
    it must compile, and be one that cannot backtrack for long."""
    try:
        re.compile(value)
        repeats = _repeats(_sre.parse(value), False)
    except re.error as exc:
        raise _refuse(name, value, f"not a regular expression ({exc})") from None
    except (ValueError, RecursionError) as exc:
        raise _refuse(name, value, f"it could take very long to match ({exc})") from None
    if repeats > max_repeats:
        raise _refuse(name, value, f"here a pattern may repeat at most {max_repeats} times (*, +, {{m,n}})")


def _check_name(name: str, value: Any, *, regex: bool, max_repeats: int = MAX_REGEX_REPEATS) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise _refuse(name, value, f"names and patterns must be non-empty strings of at most {MAX_NAME_CHARS} "
                                   "characters")
    if regex:
        _check_regex(name, value, max_repeats)


def _names(*, regex_str: bool, regex_items: bool = False, most: int = MAX_NAMES,
           max_repeats: int = MAX_REGEX_REPEATS) -> Check:
    """None, one string (a regular expression when ``regex_str``) or a list of strings."""

    def check(name: str, value: Any, limits: PolicyLimits) -> None:
        if value is None:
            return
        if isinstance(value, str):
            _check_name(name, value, regex=regex_str, max_repeats=max_repeats)
            return
        if not isinstance(value, list | tuple | set | frozenset):
            raise _refuse(name, value, "use a string or a list of strings")
        if not value or len(value) > most:
            raise _refuse(name, value, f"give between 1 and {most} names")
        for item in value:
            _check_name(name, item, regex=regex_items, max_repeats=max_repeats)

    return check


def _check_rank(name: str, value: Any, limits: PolicyLimits) -> None:
    if not _is_int(value):
        raise InvalidArgumentError(f"LoRA rank {name} must be an integer, got {_short(value)}")
    if value < 1:
        raise InvalidArgumentError(f"LoRA rank {name} must be >= 1, got {value}")
    if value > limits.max_r:
        raise InvalidArgumentError(
            f"LoRA rank {name}={value} is above this model's max_r={limits.max_r} "
            "(a server sets it with twinkle-server serve --max-r)"
        )


def _check_alpha(name: str, value: Any, limits: PolicyLimits) -> None:
    if not _is_number(value) or value <= 0:
        raise _refuse(name, value, "an alpha must be a positive finite number")


def _check_dropout(name: str, value: Any, limits: PolicyLimits) -> None:
    if not _is_number(value) or not 0 <= value < 1:
        raise _refuse(name, value, "lora_dropout must be a number in [0, 1)")


def _check_bool(name: str, value: Any, limits: PolicyLimits) -> None:
    if not isinstance(value, bool):
        raise _refuse(name, value, "use True or False")


def _check_false(reason: str) -> Check:
    def check(name: str, value: Any, limits: PolicyLimits) -> None:
        if value is not False:
            raise _refuse(name, value, f"leave it False; {reason}")

    return check


def _check_fan_in_fan_out(name: str, value: Any, limits: PolicyLimits) -> None:
    if value is not limits.fan_in_fan_out:
        layers = "transformers Conv1D" if limits.fan_in_fan_out else "torch.nn.Linear"
        raise _refuse(name, value, f"this model's layers are {layers}, so it must be {limits.fan_in_fan_out}")


def _check_bias(name: str, value: Any, limits: PolicyLimits) -> None:
    if not _is_text(value, "none"):
        raise _refuse(name, value, "bias must be 'none': any other value trains the shared model's biases")


def _check_init(name: str, value: Any, limits: PolicyLimits) -> None:
    if not any(value is safe if isinstance(safe, bool) else _is_text(value, safe) for safe in SAFE_INITS):
        raise _refuse(name, value, "use True, False or 'gaussian'; other initialisations read or rewrite the "
                                   "shared base weights")


def _check_layers(name: str, value: Any, limits: PolicyLimits) -> None:
    if value is None:
        return
    items = [value] if _is_int(value) else value
    if not isinstance(items, list | tuple) or not items or len(items) > MAX_NAMES:
        raise _refuse(name, value, f"use a layer index or a list of 1 to {MAX_NAMES} layer indices")
    for item in items:
        if not _is_int(item) or not 0 <= item <= MAX_LAYER_INDEX:
            raise _refuse(name, value, f"layer indices are integers from 0 to {MAX_LAYER_INDEX}")


def _pattern(value_check: Check, what: str) -> Check:
    """A dict of regular expressions (matched against module names) to ranks or alphas."""

    def check(name: str, value: Any, limits: PolicyLimits) -> None:
        if not isinstance(value, dict):
            raise _refuse(name, value, f"use a dict of module-name patterns to {what}")
        if len(value) > MAX_PATTERN_ENTRIES:
            raise _refuse(name, value, f"at most {MAX_PATTERN_ENTRIES} entries", f"<dict of {len(value)} entries>")
        for key, item in value.items():
            _check_name(name, key, regex=True, max_repeats=MAX_REGEX_REPEATS - 1)
            value_check(f"{name}[{_short(key)}]", item, limits)

    return check


def _check_task_type(name: str, value: Any, limits: PolicyLimits) -> None:
    if value is not None and not _is_text(value, "CAUSAL_LM"):
        raise _refuse(name, value, "use None or 'CAUSAL_LM': the shared model is a causal language model")


def _check_peft_type(name: str, value: Any, limits: PolicyLimits) -> None:
    if value is not None and not _is_text(value, "LORA"):
        raise _refuse(name, value, "use None or 'LORA'")


def _check_text(name: str, value: Any, limits: PolicyLimits) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > MAX_NAME_CHARS):
        raise _refuse(name, value, f"use None or a string of at most {MAX_NAME_CHARS} characters")


_STRUCTURE = "it changes the shared model for every adapter"
_BASE_INIT = "it initialises from (and may rewrite) the shared base weights"
_NOT_SERVED = "not supported on a shared base model"

LORA_FIELD_RULES: dict[str, FieldRule] = {
    # -- metadata: describes the adapter, does not change what it trains
    "task_type": FieldRule("None or 'CAUSAL_LM'", "the base is a causal LM; other task types wrap it differently",
                           _check_task_type),
    "peft_type": FieldRule("None or 'LORA'", "peft sets it to LORA", _check_peft_type),
    "auto_mapping": FieldRule("default (None)", "names classes peft imports for custom models"),
    "peft_version": FieldRule("None or a short string", "metadata only", _check_text),
    "base_model_name_or_path": FieldRule("None or a short string", "metadata only; checkpoints record the served "
                                         "model", _check_text),
    "revision": FieldRule("None or a short string", "metadata only", _check_text),
    "inference_mode": FieldRule("False", "True freezes the adapter so that it cannot train",
                                _check_false("True freezes the adapter so that it cannot train")),
    # -- the adapter's own low-rank weights
    "r": FieldRule("integer 1..max_r", "the adapter's size", _check_rank),
    "target_modules": FieldRule("None, 'all-linear', a regex or a list of module names",
                                "which layers get the adapter's own weights", _names(regex_str=True)),
    "exclude_modules": FieldRule("None, a regex or a list of module names", "only narrows the targets",
                                 _names(regex_str=True)),
    "lora_alpha": FieldRule("positive finite number", "the adapter's own scaling", _check_alpha),
    "lora_dropout": FieldRule("number in [0, 1)", "dropout on the adapter's input only", _check_dropout),
    "fan_in_fan_out": FieldRule("the value the model's layers need", "a wrong one makes a later merge wrong",
                                _check_fan_in_fan_out),
    "bias": FieldRule("'none'", "'all' and 'lora_only' train the shared model's biases", _check_bias),
    "use_rslora": FieldRule("True or False", "only changes the adapter's scaling", _check_bool),
    "init_lora_weights": FieldRule("True, False or 'gaussian'", "the others read or rewrite the base weights",
                                   _check_init),
    "layers_to_transform": FieldRule("None, a layer index or a list of them", "only narrows the targets",
                                     _check_layers),
    "layers_pattern": FieldRule("None, a regex or a list of them", "only narrows the targets",
                                _names(regex_str=True, regex_items=True, most=MAX_LAYER_PATTERNS,
                                       max_repeats=MAX_REGEX_REPEATS - 1)),
    "rank_pattern": FieldRule(f"dict of <= {MAX_PATTERN_ENTRIES} patterns to ranks 1..max_r",
                              "per-layer ranks, each bounded like r", _pattern(_check_rank, "ranks")),
    "alpha_pattern": FieldRule(f"dict of <= {MAX_PATTERN_ENTRIES} patterns to positive finite numbers",
                               "per-layer scaling", _pattern(_check_alpha, "alphas")),
    "use_dora": FieldRule("True or False", "DoRA's magnitude vector is the adapter's own weight, initialised "
                          "from the base weight norm without writing it; merging it later is supported by peft",
                          _check_bool),
    # -- must stay at peft's default
    "modules_to_save": FieldRule("default (None)", "trains full copies of base modules wrapped for every adapter"),
    "megatron_config": FieldRule("default (None)", _NOT_SERVED),
    "megatron_core": FieldRule("default ('megatron.core')", "a module peft imports"),
    "trainable_token_indices": FieldRule("default (None)", "wraps the shared embedding layer"),
    "loftq_config": FieldRule("default ({})", _BASE_INIT),
    "eva_config": FieldRule("default (None)", _BASE_INIT),
    "corda_config": FieldRule("default (None)", _BASE_INIT + "; also names files"),
    "lora_ga_config": FieldRule("default (None)", _BASE_INIT),
    "velora_config": FieldRule("default (None)", _NOT_SERVED),
    "alora_invocation_tokens": FieldRule("default (None)", "changes the forward pass; " + _NOT_SERVED),
    "use_qalora": FieldRule("default (False)", "for quantized models; " + _NOT_SERVED),
    "qalora_group_size": FieldRule("default (16)", "for quantized models; " + _NOT_SERVED),
    "monteclora_config": FieldRule("default (None)", _NOT_SERVED),
    "layer_replication": FieldRule("default (None)", _STRUCTURE),
    "runtime_config": FieldRule("default", "moves weights between devices; " + _NOT_SERVED),
    "lora_bias": FieldRule("default (False)", _NOT_SERVED),
    "target_parameters": FieldRule("default (None)", "parametrizes base parameters in place"),
    "use_bdlora": FieldRule("default (None)", _NOT_SERVED),
    "arrow_config": FieldRule("default (None)", "routes between adapters; " + _NOT_SERVED),
    "kasa_config": FieldRule("default (None)", _BASE_INIT),
    "ensure_weight_tying": FieldRule("default (False)", "ties adapters across shared modules"),
}


def lora_field_defaults() -> dict[str, Any]:
    """Every ``LoraConfig`` field with peft's default value."""
    out: dict[str, Any] = {}
    for f in fields(LoraConfig):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = MISSING
    return out


def unclassified_fields() -> list[str]:
    """``LoraConfig`` fields of the installed peft that ``LORA_FIELD_RULES`` does not classify."""
    return [f.name for f in fields(LoraConfig) if f.name not in LORA_FIELD_RULES]


def _check_field(name: str, value: Any, default: Any, limits: PolicyLimits) -> None:
    rule = LORA_FIELD_RULES.get(name)
    if rule is None:
        raise InvalidArgumentError(
            f"LoRA config field {name} is not classified by this server's LoRA policy (a newer peft?); "
            "LoRA configs are refused until it is"
        )
    if rule.check is not None:
        rule.check(name, value, limits)
    elif not _is_default(value, default):
        raise InvalidArgumentError(
            f"LoRA config field {name}={_short(value)} is refused ({rule.why}); "
            f"leave it at peft's default ({_short(default)})"
        )


def _check_mapping(values: Mapping[str, Any], limits: PolicyLimits) -> None:
    defaults = lora_field_defaults()
    for name in unclassified_fields():
        _check_field(name, defaults[name], defaults[name], limits)
    for name, value in values.items():
        if not isinstance(name, str) or name not in defaults:
            raise InvalidArgumentError(f"LoraConfig has no field {_short(name)}")
        _check_field(name, value, defaults[name], limits)


def check_lora_config(config: Any, limits: PolicyLimits) -> LoraConfig:
    """The accepted ``LoraConfig`` (built from a dict if need be), or ``InvalidArgumentError``."""
    if isinstance(config, Mapping):
        # The raw values first: peft's own checks raise odd errors (or import things) for some.
        _check_mapping(config, limits)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = LoraConfig(**config)
        except Exception as exc:
            raise InvalidArgumentError(f"bad LoRA config: {first_line(exc)}") from None
    if not isinstance(config, LoraConfig):
        raise InvalidArgumentError(f"config must be a peft.LoraConfig or a dict, got {type(config).__name__}")
    own = [f.name for f in fields(config)]  # in peft's order: the first refused field is named
    extra = [name for name in own if name not in LORA_FIELD_RULES]
    if extra:  # a subclass's field or a newer peft's: unknown, so refused
        _check_field(extra[0], None, None, limits)
    if getattr(config, "_custom_modules", None):
        raise InvalidArgumentError("LoRA config with custom layer classes is refused on a shared base model")
    _check_mapping({name: getattr(config, name) for name in own}, limits)
    return config
