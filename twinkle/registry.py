"""One registry that resolves component names to classes.

Losses, optimizers, LR schedulers, templates, input processors and preprocessors are all
named by string in the public API (``set_loss('CrossEntropyLoss')``). Every such name is
resolved here, from code that is already imported: a name never downloads or imports
anything, so a remote user cannot make the server run code of their choosing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import InvalidArgumentError, UnknownComponentError

T = TypeVar("T")

KINDS = ("loss", "optimizer", "lr_scheduler", "template", "processor", "preprocessor", "filter")


class ComponentRegistry:
    """Maps ``(kind, name)`` to a class or factory."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Callable[..., Any]]] = {k: {} for k in KINDS}
        self._torch_loaded = False

    def register(self, kind: str, name: str | None = None) -> Callable[[T], T]:
        """Class decorator: ``@REGISTRY.register('loss')`` registers under the class name."""
        self._check_kind(kind)

        def deco(obj: T) -> T:
            self._entries[kind][name or obj.__name__] = obj  # type: ignore[attr-defined]
            return obj

        return deco

    def names(self, kind: str) -> list[str]:
        """The names known for ``kind``, sorted."""
        self._check_kind(kind)
        self._load_torch()
        return sorted(self._entries[kind])

    def resolve(self, kind: str, name: str) -> Callable[..., Any]:
        """The class registered as ``name``; raises ``UnknownComponentError`` listing the known ones."""
        self._check_kind(kind)
        self._load_torch()
        if not isinstance(name, str):
            raise InvalidArgumentError(f"{kind} name must be a string, got {type(name).__name__}")
        try:
            return self._entries[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind))
            raise UnknownComponentError(f"unknown {kind} {name!r}; known: {known}") from None

    def build(self, kind: str, name_or_obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Instantiate ``name_or_obj`` (a registered name or a class) with the given arguments.

        A wrong keyword becomes an ``InvalidArgumentError`` naming the component and the
        keyword, instead of a bare ``TypeError`` from deep inside a constructor.
        """
        if isinstance(name_or_obj, str):
            factory = self.resolve(kind, name_or_obj)
            label = name_or_obj
        elif inspect.isclass(name_or_obj) or callable(name_or_obj):
            factory = name_or_obj
            label = getattr(name_or_obj, "__name__", repr(name_or_obj))
        else:
            raise InvalidArgumentError(f"{kind} must be a name or a class, got {type(name_or_obj).__name__}")
        if kind == "optimizer":
            _check_optimizer(factory, label)
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentError(f"{kind} {label!r}: {exc}") from None
        except ValueError:  # builtins without a signature: let the call itself check
            pass
        try:
            return factory(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"{kind} {label!r}: {exc}") from None

    def _check_kind(self, kind: str) -> None:
        if kind not in self._entries:
            raise InvalidArgumentError(f"unknown component kind {kind!r}; known: {', '.join(KINDS)}")

    def _load_torch(self) -> None:
        """Register twinkle's components and every ``torch.optim`` optimizer and LR scheduler, once."""
        if self._torch_loaded:
            return
        self._torch_loaded = True
        # twinkle's own components register themselves on import.
        import torch.optim
        import torch.optim.lr_scheduler as sched

        from . import loss, preprocessor, processor, schedulers, template  # noqa: F401

        for name, obj in vars(torch.optim).items():
            if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
                self._entries["optimizer"].setdefault(name, obj)
        base = getattr(sched, "LRScheduler", None) or sched._LRScheduler
        for name, obj in vars(sched).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, base)
                and obj is not base
                and not name.startswith("_")
                and name not in ("ChainedScheduler", "SequentialLR")  # they take schedulers, not an optimizer
            ):
                self._entries["lr_scheduler"].setdefault(name, obj)
        # ReduceLROnPlateau needs a metric per step; not a fit for lr_step().
        self._entries["lr_scheduler"].pop("ReduceLROnPlateau", None)


def _check_optimizer(factory: Any, label: str) -> None:
    """Refuse, when it is set, an optimizer that ``step()`` could never run: one whose ``step``
    needs a closure that re-evaluates the loss (LBFGS), or one for sparse gradients only (LoRA
    weights get dense ones)."""
    step = getattr(factory, "step", None)
    try:
        closure = inspect.signature(step).parameters.get("closure") if step is not None else None
    except (TypeError, ValueError):
        closure = None
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise InvalidArgumentError(
            f"optimizer {label!r} needs a closure that re-evaluates the loss in step(), which step() cannot "
            "pass; use another optimizer (e.g. AdamW)"
        )
    if getattr(factory, "__name__", "") == "SparseAdam":
        raise InvalidArgumentError(
            f"optimizer {label!r} takes only sparse gradients and LoRA weights get dense ones; use Adam or AdamW"
        )


REGISTRY = ComponentRegistry()
