"""A Tinker-compatible API on the twinkle server: the official ``tinker`` SDK trains here unchanged.

The SDK's requests are translated into the calls a native client makes on the same model
objects (``service``), so a Tinker-driven run is a twinkle run: same user and key, same
isolation and limits, same run records, metric points and checkpoints (``tinker://`` paths name
the same checkpoints as ``twinkle://`` ones). ``routes`` serves the HTTP side, ``convert`` maps
requests and results, ``schema`` holds the protobuf messages.

The SDK and the native client share ``/api/v1``; a few paths (``/training_runs``...) exist in
both with different bodies. A request carrying the SDK's ``X-API-Key`` header is served by the
Tinker routes (``TinkerPaths``), every other one by the native routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from twinkle.protocol.wire import API_PREFIX

from .routes import router
from .service import TinkerService

PREFIX = f"{API_PREFIX}/tinker"
"""Where the Tinker routes are mounted; SDK requests are routed there by ``TinkerPaths``."""

Scope = MutableMapping[str, Any]


class TinkerPaths:
    """Routes a request with an ``X-API-Key`` header (what the SDK sends; the native client sends
    ``Authorization``) to the Tinker routes, by its path under ``PREFIX``."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and path.startswith(API_PREFIX + "/") and not path.startswith(PREFIX + "/")
                and any(name == b"x-api-key" for name, _ in scope.get("headers") or [])):
            scope = dict(scope)
            scope["path"] = PREFIX + path[len(API_PREFIX):]
            scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    """Serve the Tinker API on ``app`` (whose ``state.ctx`` is the server context)."""
    app.state.tinker = TinkerService(app.state.ctx)
    app.include_router(router, prefix=PREFIX)
    app.add_middleware(TinkerPaths)


__all__ = ["PREFIX", "TinkerPaths", "TinkerService", "install"]
