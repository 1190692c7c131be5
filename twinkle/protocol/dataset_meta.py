"""``DatasetMeta``: which dataset to load, as a plain value that can travel as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

DataSlice = range | slice | list[int] | None


@dataclass
class DatasetMeta:
    """Names one dataset: its id, optional subset, split and row selection.

    ``dataset_id`` is ``builtin://self-cognition``, a local file (``.jsonl``, ``.json``,
    ``.csv``, ``.parquet``) or folder of such files, ``hf://org/name``, ``ms://org/name`` or a
    bare ``org/name`` (ModelScope). ``data_slice`` keeps only some rows, by position: a
    ``range``, a ``slice`` or a list of row indices; ``None`` keeps all.

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
        if self.subset_name is not None and not isinstance(self.subset_name, str):
            raise InvalidArgumentError(f"subset_name must be a string or None, got {self.subset_name!r}")
        if not isinstance(self.split, str) or not self.split:
            raise InvalidArgumentError(f"split must be a non-empty string, got {self.split!r}")
        s = self.data_slice
        if isinstance(s, tuple):  # a JSON round trip or a caller may hand a tuple; store one type
            s = self.data_slice = list(s)
        if isinstance(s, list):
            if any(isinstance(i, bool) or not isinstance(i, int) for i in s):
                raise InvalidArgumentError("data_slice as a list must hold only integer row indices")
        elif s is not None and not isinstance(s, range | slice):
            raise InvalidArgumentError(
                f"data_slice must be None, a range, a slice or a list of ints, got {type(s).__name__}"
            )
        if isinstance(s, slice) and any(
            v is not None and (isinstance(v, bool) or not isinstance(v, int))
            for v in (s.start, s.stop, s.step)
        ):
            raise InvalidArgumentError(f"data_slice {s!r} must have integer bounds")

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
        indices = list(s)
        bad = [i for i in indices if not 0 <= i < num_rows]
        if bad:
            raise InvalidArgumentError(
                f"data_slice of {self.dataset_id!r} selects row {bad[0]}, but it has {num_rows} rows"
            )
        return indices

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
