"""Remote classes derived from the API declarations in ``twinkle.protocol.api``.

``derive_remote_class(api, base)`` builds a class whose constructor and methods have exactly
the declared signatures and docstrings, so calling one wrongly raises the same ``TypeError``
as the local method, and a method declared once appears locally and remotely alike. Every
generated method hands its bound parameters to ``base._twinkle_dispatch``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twinkle.protocol.api import ApiClass

MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<default>"})()
"""Stands in for an argument the caller left out, so that only given ones are sent."""


def _make_function(owner: str, name: str, sig: inspect.Signature, doc: str, module: str) -> Callable[..., Any]:
    """A function with exactly ``sig``, calling ``self._twinkle_dispatch(name, values)``.

    It is compiled from source (inside a class named like the local one) rather than taking
    ``*args, **kwargs``: Python itself then binds the arguments, so a wrong call raises the
    very ``TypeError`` the local method raises, message and qualified name included.
    """
    params = list(sig.parameters.values())
    reserved = {"_twinkle_missing_"}
    last_pos_only = max((i for i, p in enumerate(params) if p.kind is p.POSITIONAL_ONLY), default=-1)
    parts: list[str] = []
    star = False
    for i, p in enumerate(params):
        if p.name in reserved or not p.name.isidentifier() or p.name.startswith("__"):
            raise TypeError(f"cannot mirror {owner}.{name}: parameter name {p.name!r}")
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            parts.append(p.name + ("=_twinkle_missing_" if p.default is not p.empty else ""))
        if i == last_pos_only:
            parts.append("/")
    self_name = params[0].name
    collected = ", ".join(f"{p.name!r}: {p.name}" for p in params[1:])
    src = (
        f"class {owner}:\n"
        f"    def {name}({', '.join(parts)}):\n"
        f"        return {self_name}._twinkle_dispatch({name!r}, {{{collected}}})\n"
    )
    namespace: dict[str, Any] = {"_twinkle_missing_": MISSING}
    exec(compile(src, f"<twinkle_client {owner}.{name}>", "exec"), namespace)  # noqa: S102 (generated from a signature)
    fn = namespace[owner].__dict__[name]
    fn.__signature__ = sig
    fn.__doc__ = doc
    fn.__module__ = module
    return fn


def derive_remote_class(api: ApiClass, base: type, *, module: str, doc: str | None = None) -> type:
    """The remote twin of the declared ``api``: its constructor and every method, same signatures."""
    owner = api.name
    namespace: dict[str, Any] = {
        "__module__": module,
        "__qualname__": owner,
        "__doc__": doc or f"{owner} on a twinkle server: the declared API, run remotely.\n\n{api.doc}",
        "__twinkle_api__": api,
        "__init__": _make_function(owner, "__init__", api.init, api.doc, module),
    }
    for name, spec in api.methods.items():
        own = vars(base).get(name)
        if own is None:
            namespace[name] = _make_function(owner, name, spec.signature, spec.doc, module)
            continue
        # The base implements it client-side (a dataloader's iteration and position): it
        # must take exactly the declared parameters.
        if list(inspect.signature(own).parameters) != list(spec.signature.parameters):
            raise TypeError(f"{base.__name__}.{name} must take the declared parameters {spec.signature}")
        own.__doc__ = spec.doc
    return type(owner, (base,), namespace)
