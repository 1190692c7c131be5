"""``DatasetMeta``: which dataset to load, as a plain value that can travel as JSON."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

DataSlice = range | slice | list[int] | None

MAX_ID_LENGTH = 4096
"""The longest ``dataset_id`` (a hub id, or a local path in local use)."""
MAX_NAME_LENGTH = 128
"""The longest ``subset_name`` or ``split``."""
MAX_ROW_INDEX = 2**63 - 1
"""The largest row position (and slice bound) a ``data_slice`` may name."""
MAX_LISTED_ROWS = 10_000_000
"""The most row indices a ``data_slice`` list may hold."""
# A subset or split is a name, never a path: letters, digits, '_', '-' and '.', starting
# with a letter or digit (so neither '..' nor a hidden name), and no '..' anywhere.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_name(value: Any, field: str) -> str:
    """``value`` as a subset or split name, or ``InvalidArgumentError``."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{field} must be a string, got {type(value).__name__}")
    shown = value if len(value) <= 100 else value[:100] + "..."
    if not value or len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value) or ".." in value:
        raise InvalidArgumentError(
            f"{field} {shown!r} must be a plain name of 1-{MAX_NAME_LENGTH} letters, digits, '_', '-' or '.' "
            "(starting with a letter or digit, no '..'; not a path)"
        )
    return value


def _check_bound(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"data_slice {what} must be an integer, got {value!r}")
    if abs(value) > MAX_ROW_INDEX:
        raise InvalidArgumentError(f"data_slice {what} {value} is out of range (at most {MAX_ROW_INDEX})")


@dataclass
class DatasetMeta:
    """Names one dataset: its id, optional subset, split and row selection.

    ``dataset_id`` is ``builtin://self-cognition``, a local file (``.jsonl``, ``.json``,
    ``.csv``, ``.parquet``) or folder of such files, ``hf://org/name``, ``ms://org/name`` or a
    bare ``org/name`` (ModelScope). ``data_slice`` keeps only some rows, by position: a
    ``range``, a ``slice`` or a list of row indices; ``None`` keeps all. ``subset_name`` and
    ``split`` are plain names (letters, digits, ``_``, ``-``, ``.``; never a path), and every
    field is checked when the meta is made, so a meta from a remote user names nothing else.

    It is a plain value: ``to_dict()`` gives JSON-safe data and ``from_dict()`` rebuilds an
    equal object, which is how a meta crosses the client/server boundary. Pydantic models may
    declare a ``DatasetMeta`` field: it validates from a meta, a dict or an id string and
    serialises as ``to_dict()``.
    """

    dataset_id: str
    subset_name: str | None = None
    split: str = "train"
    data_slice: DataSlice = None

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_id, str) or not self.dataset_id.strip():
            raise InvalidArgumentError(f"dataset_id must be a non-empty string, got {self.dataset_id!r}")
        if len(self.dataset_id) > MAX_ID_LENGTH or not self.dataset_id.isprintable():
            raise InvalidArgumentError(
                f"dataset_id {self.dataset_id[:100]!r} must be at most {MAX_ID_LENGTH} printable characters"
            )
        if self.subset_name is not None:
            check_name(self.subset_name, "subset_name")
        check_name(self.split, "split")
        s = self.data_slice
        if isinstance(s, tuple):  # a JSON round trip or a caller may hand a tuple; store one type
            s = self.data_slice = list(s)
        if isinstance(s, list):
            if len(s) > MAX_LISTED_ROWS:
                raise InvalidArgumentError(f"data_slice lists {len(s)} rows; at most {MAX_LISTED_ROWS}")
            if any(isinstance(i, bool) or not isinstance(i, int) for i in s):
                raise InvalidArgumentError("data_slice as a list must hold only integer row indices")
            bad = next((i for i in s if not 0 <= i <= MAX_ROW_INDEX), None)
            if bad is not None:
                raise InvalidArgumentError(f"data_slice row index {bad} must be between 0 and {MAX_ROW_INDEX}")
        elif isinstance(s, range):
            for what in ("start", "stop", "step"):
                _check_bound(getattr(s, what), what)
        elif isinstance(s, slice):
            for what in ("start", "stop", "step"):
                _check_bound(getattr(s, what), what)
            if s.step == 0:
                raise InvalidArgumentError("data_slice step must not be zero")
        elif s is not None:
            raise InvalidArgumentError(
                f"data_slice must be None, a range, a slice or a list of ints, got {type(s).__name__}"
            )

    @property
    def key(self) -> str:
        """The name this dataset goes by inside a ``Dataset``: the id, plus subset/split when set."""
        key = self.dataset_id
        if self.subset_name:
            key += f":{self.subset_name}"
        if self.split != "train":
            key += f"@{self.split}"
        return key

    def select_indices(self, num_rows: int) -> list[int] | None:
        """The row positions ``data_slice`` keeps from ``num_rows`` rows (``None``: all of them)."""
        s = self.data_slice
        if s is None:
            return None
        if isinstance(s, slice):
            return list(range(*s.indices(num_rows)))
        if isinstance(s, range):
            # Checked before listing: a huge range must not be materialised to find out.
            bad = next((i for i in (s[0], s[-1]) if not 0 <= i < num_rows), None) if s else None
        else:
            bad = next((i for i in s if not 0 <= i < num_rows), None)
        if bad is not None:
            raise InvalidArgumentError(
                f"data_slice of {self.dataset_id!r} selects row {bad}, but it has {num_rows} rows"
            )
        return list(s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``range`` and ``slice`` become ``{'range'|'slice': [start, stop, step]}``."""
        s = self.data_slice
        if isinstance(s, range):
            data_slice: Any = {"range": [s.start, s.stop, s.step]}
        elif isinstance(s, slice):
            data_slice = {"slice": [s.start, s.stop, s.step]}
        elif isinstance(s, list):
            data_slice = list(s)
        else:
            data_slice = None
        return {
            "dataset_id": self.dataset_id,
            "subset_name": self.subset_name,
            "split": self.split,
            "data_slice": data_slice,
        }

    @classmethod
    def coerce(cls, value: DatasetMeta | dict[str, Any] | str) -> DatasetMeta:
        """``value`` as a meta: a meta itself, ``to_dict()`` output, or a dataset id."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        return cls.from_dict(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        # range and slice have no pydantic schema; travel as to_dict() instead
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.coerce,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda meta: meta.to_dict()),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict[str, Any]:
        return {
            "title": "DatasetMeta",
            "type": "object",
            "properties": {
                "dataset_id": {"type": "string"},
                "subset_name": {"type": ["string", "null"]},
                "split": {"type": "string", "default": "train"},
                "data_slice": {
                    "description": "null, a list of row indices, or {'range'|'slice': [start, stop, step]}"
                },
            },
            "required": ["dataset_id"],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetMeta:
        """Rebuild a meta from ``to_dict()`` output."""
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"DatasetMeta.from_dict needs a dict, got {type(data).__name__}")
        unknown = set(data) - {"dataset_id", "subset_name", "split", "data_slice"}
        if unknown:
            raise InvalidArgumentError(f"DatasetMeta has no field(s) {', '.join(sorted(unknown))}")
        if "dataset_id" not in data:
            raise InvalidArgumentError("DatasetMeta needs a dataset_id")
        s = data.get("data_slice")
        if isinstance(s, dict):
            if len(s) != 1 or next(iter(s)) not in ("range", "slice"):
                raise InvalidArgumentError(
                    f"data_slice {s!r} must be {{'range' or 'slice': [start, stop, step]}}"
                )
            kind, bounds = next(iter(s.items()))
            if not isinstance(bounds, list | tuple) or len(bounds) != 3:
                raise InvalidArgumentError(f"data_slice {s!r} needs [start, stop, step]")
            if kind == "range":
                if any(isinstance(v, bool) or not isinstance(v, int) for v in bounds):
                    raise InvalidArgumentError(f"data_slice {s!r}: range bounds must be integers")
                try:
                    s = range(*bounds)
                except ValueError as exc:  # step 0
                    raise InvalidArgumentError(f"data_slice {s!r}: {exc}") from None
            else:
                s = slice(*bounds)
        return cls(
            dataset_id=data["dataset_id"],
            subset_name=data.get("subset_name"),
            split=data.get("split", "train"),
            data_slice=s,
        )
