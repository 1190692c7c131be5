"""How values cross the wire: msgpack, with numbers in raw binary and a closed set of types.

Integer lists (token ids, labels) travel as packed arrays of the narrowest integer type
that holds them, tensors and arrays as raw buffers. Beyond plain data, only the types in
``_VALUE_TYPES`` are sent, by name, as their field values; nothing is ever pickled and no
string is ever re-parsed, so a value arrives exactly as it was sent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import msgpack
import numpy as np

from .errors import InvalidArgumentError, first_line

CONTENT_TYPE = "application/msgpack"
_ND = "__nd__"
_TYPE = "__type__"
_REF = "__ref__"
_MIN_PACKED = 8  # shorter int lists are smaller as plain msgpack ints


def _lora_to_dict(config: Any) -> dict[str, Any]:
    from peft import LoraConfig

    default = LoraConfig()
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name.startswith("_") or value == getattr(default, f.name):
            continue
        out[f.name] = sorted(value) if isinstance(value, set) else value
    return out


def _lora_from_dict(data: dict[str, Any]) -> Any:
    from peft import LoraConfig

    try:
        return LoraConfig(**data)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"bad LoraConfig: {exc}") from None


def _is_lora_config(value: Any) -> bool:
    # Recognised without importing peft (and torch): the client never needs either.
    return any(c.__name__ == "LoraConfig" and c.__module__.startswith("peft") for c in type(value).__mro__)


def _value_types() -> dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], Callable[[Any], Any]]]:
    """name -> (is one, to plain data, from plain data)."""
    from .dataset_meta import DatasetMeta
    from .outputs import ForwardBackwardOutput, ForwardOutput
    from .wire import CheckpointPath

    table: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], Callable[[Any], Any]]] = {
        "DatasetMeta": (lambda v: type(v) is DatasetMeta, lambda m: m.to_dict(), DatasetMeta.from_dict),
        "LoraConfig": (_is_lora_config, _lora_to_dict, _lora_from_dict),
    }
    for cls in (ForwardBackwardOutput, ForwardOutput, CheckpointPath):
        table[cls.__name__] = (
            lambda v, cls=cls: type(v) is cls,
            lambda m: {k: getattr(m, k) for k in type(m).model_fields},
            cls.model_validate,
        )
    return table


_TABLE: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], Callable[[Any], Any]]] | None = None


def _table() -> dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], Callable[[Any], Any]]]:
    global _TABLE
    if _TABLE is None:
        _TABLE = _value_types()
    return _TABLE


def _narrowest_int(values: list[int]) -> np.dtype:
    lo, hi = min(values), max(values)
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    raise InvalidArgumentError("an integer is too large to send (beyond 64 bits)")


def _array(arr: np.ndarray, *, as_list: bool = False) -> dict[str, Any]:
    arr = np.ascontiguousarray(arr)
    return {_ND: arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes(), "list": as_list}


def to_wire(value: Any, ref_of: Callable[[Any], str | None] | None = None) -> Any:
    """Plain msgpack-able data for ``value``. ``ref_of`` names remote objects (their id)."""
    if value is None or isinstance(value, bool | str | float | bytes):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"dictionary keys sent to the server must be strings, got {key!r}")
            out[key] = to_wire(item, ref_of)
        return out
    if isinstance(value, list | tuple):
        if (
            len(value) >= _MIN_PACKED
            and all(type(v) is int for v in value)
        ):
            return _array(np.asarray(value, dtype=_narrowest_int(list(value))), as_list=True)
        return [to_wire(v, ref_of) for v in value]
    if isinstance(value, np.ndarray):
        return _array(value)
    if isinstance(value, np.generic):
        return value.item()
    if ref_of is not None:
        ref = ref_of(value)
        if ref is not None:
            return {_REF: ref}
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return _array(tensor.numpy())
    for name, (is_one, dump, _) in _table().items():
        if is_one(value):
            return {_TYPE: name, "value": to_wire(dump(value), ref_of)}
    raise InvalidArgumentError(f"cannot send a value of type {type(value).__name__} to the server")


def from_wire(data: Any, resolve_ref: Callable[[str], Any] | None = None, *, tensors: bool = True) -> Any:
    """Inverse of ``to_wire``. Arrays come back as torch tensors (``tensors``) or numpy arrays."""
    if isinstance(data, list):
        return [from_wire(v, resolve_ref, tensors=tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if _ND in data:
        try:
            arr = np.frombuffer(data["data"], dtype=np.dtype(data[_ND])).reshape(data["shape"])
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidArgumentError(f"malformed array in request: {exc}") from None
        if data.get("list"):
            return arr.tolist()
        if tensors:
            import torch

            return torch.from_numpy(arr.copy())
        return arr.copy()
    if _REF in data:
        if resolve_ref is None:
            raise InvalidArgumentError("object references are not accepted here")
        return resolve_ref(str(data[_REF]))
    if _TYPE in data:
        entry = _table().get(str(data[_TYPE]))
        if entry is None:
            raise InvalidArgumentError(f"unknown value type {data[_TYPE]!r}")
        value = from_wire(data.get("value"), resolve_ref, tensors=tensors)
        try:
            return entry[2](value)
        except InvalidArgumentError:
            raise
        except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise InvalidArgumentError(f"malformed {data[_TYPE]} value: {first_line(exc)}") from None
    return {k: from_wire(v, resolve_ref, tensors=tensors) for k, v in data.items()}


def pack(data: Any) -> bytes:
    """msgpack bytes of already wire-ready ``data``."""
    return msgpack.packb(data, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """Parse msgpack bytes; malformed input is an ``InvalidArgumentError``."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidArgumentError(f"request body is not valid msgpack: {exc}") from None
