"""Lazy results of deferred calls: what resolves them and how they behave once resolved."""

from __future__ import annotations

import threading

import pytest

from twinkle.errors import StateError
from twinkle.model import ForwardBackwardOutput
from twinkle_client.lazy import LazyOutput, LazyValue, lazy_class_for
from twinkle_client.pipeline import CallFuture

pytestmark = pytest.mark.unit


def _read(future: CallFuture, timeout: float | None) -> object:
    return future.result(timeout)  # raises the call's error, or TimeoutError


def _lazy(cls: type, value: object = None, *, error: Exception | None = None):
    future = CallFuture("m", 1, True)
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return cls(future, _read)


def test_scalar_lazy_behaves_like_its_value() -> None:
    norm = _lazy(LazyValue, 2.5)
    assert float(norm) == 2.5 and int(norm) == 2
    assert norm > 1 and norm < 3 and norm >= 2.5 and norm <= 2.5 and norm == 2.5 and norm != 1
    assert norm + 1 == 3.5 and 1 + norm == 3.5 and norm * 2 == 5.0 and 10 / norm == 4.0 and norm - 0.5 == 2.0
    assert -norm == -2.5 and abs(-norm) == 2.5 and round(norm) == 2
    assert str(norm) == "2.5" and repr(norm) == "2.5" and f"{norm:.2f}" == "2.50"
    assert not norm.is_none() and bool(norm)
    assert hash(norm) == hash(2.5) and norm.result() == 2.5 and norm.done()


def test_bool_and_none_lazies() -> None:
    stepped, skipped, nothing = _lazy(LazyValue, True), _lazy(LazyValue, False), _lazy(LazyValue, None)
    assert stepped and not skipped
    assert nothing.is_none() and nothing == None and str(nothing) == "None"  # noqa: E711
    assert not nothing
    assert _lazy(LazyValue, 1.0) + _lazy(LazyValue, 2.0) == 3.0


def test_output_lazy_resolves_on_attribute_str_format_float() -> None:
    out = ForwardBackwardOutput(loss=0.123456, num_tokens=10, batch_size=2, step=0, micro_step=1,
                                accumulated=1, gradient_accumulation_steps=1)
    lazy = _lazy(LazyOutput, out)
    assert lazy.loss == 0.123456 and lazy.num_tokens == 10
    assert str(lazy) == "0.1235" and f"{lazy:.2f}" == "0.12" and float(lazy) == 0.123456
    assert repr(lazy) == repr(out)
    with pytest.raises(AttributeError):
        _ = lazy.no_such_field


def test_lazy_waits_for_its_value_and_times_out() -> None:
    future = CallFuture("step", 3, True)
    reading = threading.Event()

    def read(future: CallFuture, timeout: float | None) -> object:
        reading.set()
        return _read(future, timeout)

    lazy = LazyValue(future, read)
    assert not lazy.done()
    with pytest.raises(TimeoutError):
        lazy.result(timeout=0.05)  # nothing will settle it
    reading.clear()
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(lazy.result(timeout=60)))
    reader.start()
    assert reading.wait(60)  # the read started before the value exists ...
    assert not lazy.done() and got == []
    future.set_result(True)  # ... and ends when it arrives
    reader.join(60)
    assert got == [True] and lazy.done()


def test_failed_lazy_raises_on_every_read() -> None:
    lazy = _lazy(LazyValue, error=StateError("step() failed: no optimizer"))
    for read in (bool, float, str, repr, lambda x: x + 1, lambda x: x.is_none()):
        with pytest.raises(StateError, match="step\\(\\) failed"):
            read(lazy)


def test_protocol_probes_do_not_block() -> None:
    lazy = LazyOutput(CallFuture("forward_backward", 1, True), _read)  # never settled
    assert not hasattr(lazy, "__array_interface__")


@pytest.mark.parametrize(
    ("annotation", "cls"),
    [("None", LazyValue), ("bool", LazyValue), ("float | None", LazyValue), (None, LazyValue),
     (float, LazyValue), ("ForwardBackwardOutput", LazyOutput), ("dict[str, Any]", LazyOutput)],
)
def test_lazy_class_follows_the_return_annotation(annotation: object, cls: type) -> None:
    assert lazy_class_for(annotation) is cls
