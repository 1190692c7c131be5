"""The codec refuses malformed values with one line and round-trips the values it knows."""

from __future__ import annotations

import pytest
from peft import LoraConfig

from twinkle.errors import InvalidArgumentError
from twinkle.protocol import codec


def test_round_trip_of_known_values() -> None:
    from twinkle.dataset import DatasetMeta

    value = {"meta": DatasetMeta("builtin://self-cognition", data_slice=range(3)),
             "lora": LoraConfig(r=4, target_modules="all-linear"), "ids": list(range(300))}
    back = codec.from_wire(codec.unpack(codec.pack(codec.to_wire(value))))
    assert back["meta"] == value["meta"] and back["ids"] == value["ids"]
    assert back["lora"].r == 4 and back["lora"].target_modules == "all-linear"


@pytest.mark.parametrize("data, message", [
    ({"__type__": "CheckpointPath", "value": {}}, "malformed CheckpointPath value"),
    ({"__type__": "LoraConfig", "value": {"nope": 1}}, "bad LoraConfig"),
    ({"__type__": "Pickle", "value": {}}, "unknown value type"),
    ({"__nd__": "<i4", "shape": [3], "data": b"\x00"}, "malformed array"),
])
def test_malformed_values_are_one_line_errors(data, message) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        codec.from_wire(data)
    assert "\n" not in str(info.value)


def test_unknown_types_are_not_sent() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot send a value of type object"):
        codec.to_wire(object())
