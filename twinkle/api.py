"""Marks the public methods that make up twinkle's API surface.

The remote client builds its classes from these marks (and the methods' signatures), so
the local class is the one definition of the API. This module only attaches metadata.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

MARK = "__twinkle_api__"


@dataclass(frozen=True)
class ApiMethod:
    """How a method behaves remotely.

    ``deferred``: a remote call returns at once, without waiting for its round trip; its
    result is a lazy value that resolves when read, and a failure surfaces at the next call
    or read on the same object. Calls that are not deferred wait for their result.
    """

    name: str
    deferred: bool = False


def api_method(*, deferred: bool = False) -> Callable[[F], F]:
    """Decorator: this method is part of the API that the remote client mirrors."""

    def deco(fn: F) -> F:
        setattr(fn, MARK, ApiMethod(name=fn.__name__, deferred=deferred))
        return fn

    return deco


def api_methods(cls: type) -> dict[str, tuple[ApiMethod, inspect.Signature]]:
    """The marked methods of ``cls`` with their signatures, in definition order."""
    found: dict[str, tuple[ApiMethod, inspect.Signature]] = {}
    for klass in reversed(cls.__mro__):
        for name, member in vars(klass).items():
            mark = getattr(member, MARK, None)
            if mark is not None:
                found[name] = (mark, inspect.signature(member))
    return found
