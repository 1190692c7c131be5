"""How values cross the wire: msgpack, with numbers in raw binary and a closed set of types.

Integer lists (token ids, labels) travel as packed arrays of the narrowest integer type
that holds them, tensors and arrays as raw buffers. Beyond plain data, only the types in
``_VALUE_TYPES`` are sent, by name, as their field values; nothing is ever pickled and no
string is ever re-parsed, so a value arrives exactly as it was sent.

A server reads request bodies with ``unpack_request``: besides the byte limit of the body,
the decoded value is bounded (``Bounds``: values, nesting, packed array elements), and
refused while it is being built once it exceeds them, so a small body cannot expand into
millions of objects.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np

from .errors import InvalidArgumentError, PayloadTooLargeError, TwinkleError, first_line
from .limits import MAX_ARRAY_DIMS, MAX_WIRE_DEPTH, MAX_WIRE_ELEMENTS, MAX_WIRE_VALUES

CONTENT_TYPE = "application/msgpack"
ND_KEY = "__nd__"
"""The key that marks a packed array in the wire form."""
_ND = ND_KEY
_TYPE = "__type__"
_REF = "__ref__"
_MIN_PACKED = 8  # shorter int lists are smaller as plain msgpack ints
_ARRAY_KEYS = frozenset({_ND, "shape", "data", "list"})
_ARRAY_KINDS = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}
"""dtype kind -> item sizes a packed array may have: booleans, integers, floats. Nothing else
(objects, complex, datetimes, strings, void) is ever sent."""
_WIRE_TYPES = frozenset({type(None), bool, int, float, str, bytes, list, dict})
_STR = frozenset({str})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack carries


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
    from .sampling import SampledSequence, SampleResponse, SamplingParams
    from .wire import CheckpointPath

    table: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], Callable[[Any], Any]]] = {
        "DatasetMeta": (lambda v: type(v) is DatasetMeta, lambda m: m.to_dict(), DatasetMeta.from_dict),
        "LoraConfig": (_is_lora_config, _lora_to_dict, _lora_from_dict),
    }
    for cls in (ForwardBackwardOutput, ForwardOutput, CheckpointPath, SamplingParams, SampleResponse, SampledSequence):
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
    if arr.dtype.itemsize not in _ARRAY_KINDS.get(arr.dtype.kind, ()) or arr.dtype.names is not None:
        raise InvalidArgumentError(
            f"cannot send an array of dtype {arr.dtype}: arrays must hold booleans, integers or floats"
        )
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


def _array_dtype(spec: Any) -> np.dtype:
    """The dtype a packed array names, if it is one the wire carries (native byte order)."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise InvalidArgumentError(f"malformed array in request: dtype {str(spec)[:20]!r} is not a dtype name")
    try:
        dtype = np.dtype(spec)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"malformed array in request: dtype {spec!r} is not a dtype name") from None
    if dtype.itemsize not in _ARRAY_KINDS.get(dtype.kind, ()) or dtype.names is not None or dtype.shape:
        raise InvalidArgumentError(
            f"unsupported array dtype {spec!r}: arrays must hold booleans, integers or floats"
        )
    return dtype


def _array_size(data: dict[str, Any]) -> int:
    """The number of elements of a packed array, after checking its form: a known dtype, a shape
    of non-negative integers and exactly as many bytes as the shape and dtype say."""
    extra = set(data) - _ARRAY_KEYS
    if extra:
        raise InvalidArgumentError(f"malformed array in request: unexpected field {sorted(map(str, extra))[0]!r}")
    dtype = _array_dtype(data.get(_ND))
    shape, raw = data.get("shape"), data.get("data")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_ARRAY_DIMS
        or any(type(n) is not int or n < 0 for n in shape)
    ):
        raise InvalidArgumentError(
            f"malformed array in request: shape must be a list of at most {MAX_ARRAY_DIMS} non-negative integers"
        )
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidArgumentError("malformed array in request: data must be bytes")
    if not isinstance(data.get("list", False), bool):
        raise InvalidArgumentError("malformed array in request: list must be true or false")
    size = math.prod(shape)
    if size * dtype.itemsize != len(raw):
        raise InvalidArgumentError(
            f"malformed array in request: shape {list(shape)} of {dtype.str} needs {size * dtype.itemsize} bytes, "
            f"got {len(raw)}"
        )
    return size


def _array_from(data: dict[str, Any]) -> np.ndarray:
    _array_size(data)
    arr = np.frombuffer(data["data"], dtype=_array_dtype(data[_ND])).reshape(data["shape"])
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def from_wire(data: Any, resolve_ref: Callable[[str], Any] | None = None, *, tensors: bool = True) -> Any:
    """Inverse of ``to_wire``. Arrays come back as torch tensors (``tensors``) or numpy arrays."""
    if isinstance(data, list):
        return [from_wire(v, resolve_ref, tensors=tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if _ND in data:
        arr = _array_from(data)
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
            raise InvalidArgumentError(f"unknown value type {str(data[_TYPE])[:100]!r}")
        value = from_wire(data.get("value"), resolve_ref, tensors=tensors)
        try:
            return entry[2](value)
        except TwinkleError:
            raise
        except Exception as exc:  # whatever the sent fields made the constructor raise: the sender's mistake
            raise InvalidArgumentError(f"malformed {data[_TYPE]} value: {first_line(exc)}") from None
    return {k: from_wire(v, resolve_ref, tensors=tensors) for k, v in data.items()}


@dataclass(frozen=True)
class Bounds:
    """How large a decoded request body may be (see ``twinkle.protocol.limits``)."""

    values: int = MAX_WIRE_VALUES
    """List items plus map keys and values, all containers together."""
    depth: int = MAX_WIRE_DEPTH
    """Nesting of lists and maps."""
    elements: int = MAX_WIRE_ELEMENTS
    """Elements of all packed arrays together."""


def _too_many_values(bounds: Bounds) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request body holds more than {bounds.values} values (list items, map keys and values); "
        "send the data in smaller requests, integer lists as packed arrays"
    )


def check_wire(data: Any, bounds: Bounds = Bounds()) -> None:
    """Check a decoded request body against ``bounds`` and the wire's types: plain data (None,
    booleans, 64-bit integers, floats, strings, bytes, lists, maps with string keys) and
    well-formed packed arrays. Raises ``InvalidArgumentError`` (``PayloadTooLargeError`` for
    the counts). Iterative, so any nesting is reported rather than overflowing the stack; each
    container's items are checked by their set of types (C speed), so that a million plain
    values cost milliseconds, not a second of the interpreter."""
    values = elements = 0
    stack: list[tuple[Any, int]] = []
    push, pop = stack.append, stack.pop
    items: Any = [data]
    depth = 0
    while True:
        kinds = set(map(type, items))
        if not kinds <= _WIRE_TYPES:
            odd = next(iter(kinds - _WIRE_TYPES))
            raise InvalidArgumentError(f"request body holds a value of unsupported type {odd.__name__}")
        if int in kinds:
            ints = items if len(kinds) == 1 else [item for item in items if type(item) is int]
            if not (_INT_MIN <= min(ints) and max(ints) <= _INT_MAX):
                raise InvalidArgumentError("request body holds an integer beyond 64 bits")
        if dict in kinds or list in kinds:
            for item in items:
                if type(item) is dict or type(item) is list:
                    push((item, depth + 1))
        if not stack:
            return
        value, depth = pop()
        if depth > bounds.depth:
            raise InvalidArgumentError(f"request body nests lists and maps more than {bounds.depth} deep")
        if type(value) is dict:
            values += 2 * len(value)  # as ``_Counter`` counts
            if _ND in value:
                elements += _array_size(value)
                if elements > bounds.elements:
                    raise PayloadTooLargeError(
                        f"request body holds more than {bounds.elements} packed array elements; "
                        "send the data in smaller requests"
                    )
                items = ()
                continue
            if not set(map(type, value)) <= _STR:
                raise InvalidArgumentError("map keys in a request body must be strings")
            items = value.values()
        else:
            values += len(value)
            items = value
        if values > bounds.values:
            raise _too_many_values(bounds)


class _Counter:
    """msgpack hooks that count container items while the body is parsed, so that a body whose
    values exceed the bound stops being built when it does, not after it filled memory."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.values = 0

    def add(self, n: int) -> None:
        self.values += n
        if self.values > self.bounds.values:
            raise _too_many_values(self.bounds)

    def list_hook(self, items: list[Any]) -> list[Any]:
        self.add(len(items))
        return items

    def object_hook(self, mapping: dict[str, Any]) -> dict[str, Any]:
        self.add(2 * len(mapping))
        return mapping


def _no_ext(code: int, data: bytes) -> Any:
    raise InvalidArgumentError(f"request body holds a msgpack extension type ({code}); only plain data is accepted")


def pack(data: Any) -> bytes:
    """msgpack bytes of already wire-ready ``data``."""
    return msgpack.packb(data, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """Parse msgpack bytes; malformed input is an ``InvalidArgumentError``."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidArgumentError(f"request body is not valid msgpack: {exc}") from None


def unpack_request(body: bytes | bytearray, bounds: Bounds = Bounds()) -> Any:
    """Parse a request body that nobody vouches for: like ``unpack``, but no list or map may
    exceed ``bounds.values`` items, the values together may not either (counted while parsing),
    and the result passes ``check_wire``. CPU-bound: servers call it off their event loop."""
    counter = _Counter(bounds)
    try:
        data = msgpack.unpackb(
            body, raw=False, strict_map_key=True, max_array_len=bounds.values, max_map_len=bounds.values // 2,
            list_hook=counter.list_hook, object_hook=counter.object_hook, ext_hook=_no_ext,
        )
    except TwinkleError:
        raise
    except msgpack.StackError:
        raise InvalidArgumentError(f"request body nests lists and maps more than {bounds.depth} deep") from None
    except ValueError as exc:
        if "exceeds max_" in str(exc):  # a container longer than the bound, refused at its header
            raise _too_many_values(bounds) from None
        raise InvalidArgumentError(f"request body is not valid msgpack: {first_line(exc)}") from None
    except Exception as exc:  # msgpack raises several unrelated types
        raise InvalidArgumentError(f"request body is not valid msgpack: {first_line(exc)}") from None
    check_wire(data, bounds)
    return data


def digest(data: Any) -> str:
    """The SHA-256 of ``pack(data)`` (already wire-ready data): equal data, equal digest. Hashed
    from the packer's own buffer, so the packed bytes are never copied once more."""
    import hashlib

    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    packer.pack(data)
    return hashlib.sha256(packer.getbuffer()).hexdigest()
