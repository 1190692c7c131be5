"""``create_app``: the FastAPI application, its error handling and request ids.

Every response carries ``X-Request-ID``. Errors are always an ``ErrorResponse`` with one
line of text: a ``TwinkleError`` by its code's status, a malformed request 422 naming the
field, anything else 500 ``internal`` with only the request id (the traceback goes to
the server log under that id).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from twinkle.errors import (
    MethodNotAllowedError,
    NotFoundError,
    TwinkleError,
    error_for_status,
    one_line,
    status_for,
)
from twinkle.protocol.wire import (
    API_PREFIX,
    CallBatch,
    CreateObjectRequest,
    ErrorInfo,
    ErrorResponse,
    TrainingRunUpdate,
)

from . import __version__
from .context import ServerContext
from .errors import INTERNAL_MESSAGE
from .routes_objects import router as objects_router
from .routes_runs import router as runs_router
from .tinker import install as install_tinker
from .wire import respond

log = logging.getLogger("twinkle_server")
REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9][\w.:-]{0,63}")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


class RequestIdMiddleware:
    """Gives each request an id (a sane client-sent ``X-Request-ID`` is kept, for correlation),
    puts it on the response, and turns an exception nobody handled into a bare 500.

    A plain ASGI middleware rather than ``BaseHTTPMiddleware``: that one would cancel a
    handler when the client disconnects, and a call half-recorded is worse than a slow one.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if _CLIENT_REQUEST_ID.fullmatch(sent) else f"req-{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", request_id, scope.get("method"), scope.get("path"))
            if started:
                raise
            body = json.dumps(
                ErrorResponse(error=ErrorInfo(code="internal", message=INTERNAL_MESSAGE, request_id=request_id))
                .model_dump()
            ).encode()
            await send({
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode())],
            })
            await send({"type": "http.response.body", "body": body})


def error_response(request: Request, status: int, code: str, message: str) -> Response:
    info = ErrorInfo(code=code, message=message, request_id=request_id_of(request))
    return respond(request, ErrorResponse(error=info), status)


def validation_message(errors: list[Any]) -> str:
    """``"calls.0.seq: Input should be ..."``: the first problem, its field path without the
    ``body``/``query``/``path`` prefix, on one line."""
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    text = one_line(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{'.'.join(loc)}: {text}{more}" if loc else f"{text}{more}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TwinkleError)
    async def twinkle_error(request: Request, exc: TwinkleError) -> Response:
        info = request.app.state.ctx.error_info(exc, request_id_of(request))
        return respond(request, ErrorResponse(error=info), status_for(info.code))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, "invalid_argument", validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        cls = error_for_status(exc.status_code)
        if cls is NotFoundError:
            message = f"no route {request.method} {request.url.path}"
        elif cls is MethodNotAllowedError:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = one_line(str(exc.detail)) or f"HTTP {exc.status_code}"
        return error_response(request, exc.status_code, cls.code, message)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The default schema, plus the msgpack/JSON request bodies the routes read by hand."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        ref = "#/components/schemas/{model}"
        for model in (CreateObjectRequest, CallBatch, TrainingRunUpdate):
            body = model.model_json_schema(ref_template=ref)
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        for path, method, model in ((f"{API_PREFIX}/objects", "post", CreateObjectRequest),
                                    (f"{API_PREFIX}/objects/{{object_id}}/calls", "post", CallBatch),
                                    (f"{API_PREFIX}/training_runs/{{run_id}}", "patch", TrainingRunUpdate)):
            op = schema["paths"].get(path, {}).get(method)
            if op is not None:
                content = {"$ref": ref.format(model=model.__name__)}
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/msgpack": {"schema": content}, "application/json": {"schema": content}},
                }
        app.openapi_schema = schema
        return schema

    return build


def create_app(ctx: ServerContext) -> FastAPI:
    """The HTTP application serving ``ctx``. The caller starts and shuts down ``ctx``.

    ``/openapi.json``, ``/docs`` and ``/redoc`` need no key on purpose: they describe the routes
    and bodies (what the source shows anyway) and hold no user data, key or server path, and a
    browser could not send a key to ``/docs`` anyway."""
    app = FastAPI(
        title="twinkle-server",
        version=__version__,
        description="Remote LoRA training on one shared base model. Authenticate with `Authorization: Bearer <key>`.",
    )
    app.state.ctx = ctx
    _install_error_handlers(app)
    app.include_router(runs_router, prefix=API_PREFIX)
    app.include_router(objects_router, prefix=API_PREFIX)
    install_tinker(app)  # the Tinker SDK's routes (server/tinker)
    app.add_middleware(RequestIdMiddleware)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    return app
