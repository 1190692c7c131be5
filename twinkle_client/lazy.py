"""Lazy results of deferred remote calls.

A deferred call (``forward_backward``, ``step``, ``set_loss``...) returns at once; its value
arrives with a later round trip. The proxies here stand in for that value and fetch it
(waiting if needed) the moment it is used, so ``f"loss: {output}"`` or
``if model.step(): ...`` read naturally while calls that are never read cost no wait.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import CallFuture

Reader = Callable[["CallFuture", "float | None"], Any]


class Lazy:
    """The result of a deferred remote call. ``result()`` waits for it (or raises its error)."""

    __slots__ = ("_future", "_reader")

    def __init__(self, future: CallFuture, reader: Reader) -> None:
        object.__setattr__(self, "_future", future)
        object.__setattr__(self, "_reader", reader)

    def result(self, timeout: float | None = None) -> Any:
        """The value; raises the call's error, or ``DeadlineError`` (a ``TimeoutError``) after
        ``timeout`` seconds."""
        return self._reader(self._future, timeout)

    def done(self) -> bool:
        """True once the server has answered (reading will not wait)."""
        return self._future.done()

    def __str__(self) -> str:
        return str(self.result())

    def __repr__(self) -> str:
        return repr(self.result())

    def __format__(self, spec: str) -> str:
        return format(self.result(), spec)

    def __float__(self) -> float:
        return float(self.result())

    def __bool__(self) -> bool:
        return bool(self.result())


class LazyOutput(Lazy):
    """An object result (``forward_backward``'s output): attributes, ``str``, ``float`` resolve it."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        # Protocol probes (copy, pickle, numpy...) must not block on the network.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __getitem__(self, key: Any) -> Any:
        return self.result()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.result())

    def __len__(self) -> int:
        return len(self.result())


class LazyValue(Lazy):
    """A scalar result (a float, bool or None): usable in tests, comparisons and arithmetic."""

    __slots__ = ()

    def is_none(self) -> bool:
        """``x is None`` cannot be overloaded: this is its lazy form."""
        return self.result() is None

    def __int__(self) -> int:
        return int(self.result())

    def __hash__(self) -> int:
        return hash(self.result())

    def __round__(self, ndigits: int | None = None) -> Any:
        return round(self.result(), ndigits)

    def __neg__(self) -> Any:
        return -self.result()

    def __pos__(self) -> Any:
        return +self.result()

    def __abs__(self) -> Any:
        return abs(self.result())


def _binary(op: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def forward(self: Lazy, other: Any) -> Any:
        return op(self.result(), other)

    def reflected(self: Lazy, other: Any) -> Any:
        return op(other, self.result())

    return forward, reflected


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow)):
    _fwd, _ref = _binary(_op)
    setattr(LazyValue, f"__{_name}__", _fwd)
    setattr(LazyValue, f"__r{_name}__", _ref)

for _name, _op in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt), ("le", operator.le),
                   ("gt", operator.gt), ("ge", operator.ge)):
    setattr(LazyValue, f"__{_name}__", _binary(_op)[0])

del _name, _op, _fwd, _ref

SCALAR_ANNOTATIONS = frozenset({"None", "bool", "int", "float", "str"})


def lazy_class_for(annotation: Any) -> type[Lazy]:
    """``LazyValue`` for methods annotated with scalars (``float | None``, ``bool``, ``None``),
    ``LazyOutput`` for anything else."""
    if annotation is None or annotation is type(None):
        return LazyValue
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = {part.strip() for part in text.split("|")}
    return LazyValue if parts <= SCALAR_ANNOTATIONS else LazyOutput
