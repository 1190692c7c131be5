"""A twinkle server inside the test process: the FastAPI app behind a synchronous httpx transport.

``twinkle_client`` is synchronous (an ``httpx.Client``, used from the caller's thread and from
each remote object's sender thread) while the server is an ASGI app. ``ASGIThreadTransport``
bridges the two with httpx's own ``ASGITransport``: every request is handed to one event loop
that runs in a dedicated background thread (``asyncio.run_coroutine_threadsafe``), and the
whole response body is read there before the calling thread gets it. One loop serves every
request, so the app's asyncio primitives always see the same loop, as under uvicorn.

``inprocess_server(data_dir)`` builds the server as ``twinkle-server serve`` does (settings,
store, model, context), starts the context, creates a user, and yields an ``InProcessServer``
with the app, the key and the transport to pass to ``init_twinkle_client(http_transport=...)``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BASE_URL = "http://twinkle-inprocess.test"


class ASGIThreadTransport(httpx.BaseTransport):
    """A synchronous httpx transport that runs an ASGI app on a background event loop."""

    def __init__(self, app: Any, *, timeout: float = 900.0) -> None:
        self._asgi = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="asgi-loop", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        # A fresh request whose body is a plain byte stream, which the ASGI transport can read.
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, stream=httpx.ByteStream(body),
            extensions=request.extensions,
        )
        future = asyncio.run_coroutine_threadsafe(self._send(forwarded), self._loop)
        status, headers, raw = future.result(self._timeout)
        # The raw (still encoded) body: the calling httpx.Client decodes it as for a network reply.
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(raw), request=request)

    async def _send(self, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        response = await self._asgi.handle_async_request(request)
        try:
            chunks = [chunk async for chunk in response.stream]  # type: ignore[union-attr]
        finally:
            await response.aclose()
        return response.status_code, response.headers.raw, b"".join(chunks)

    def close(self) -> None:
        """Called by every ``httpx.Client`` that used the transport; the loop outlives them
        (``init_twinkle_client`` closes the previous client): ``stop()`` ends it."""

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@dataclass
class InProcessServer:
    """A started server context, its app, a user's key and the transport that reaches the app."""

    ctx: Any
    app: Any
    api_key: str
    transport: ASGIThreadTransport
    base_url: str = BASE_URL


@contextmanager
def inprocess_server(
    data_dir: str | Path,
    *,
    model: str = "builtin://tiny-qwen2",
    device: str | None = "cpu",
    dtype: str | None = "float32",
    allow_local_data: bool = False,
    max_loras: int = 5,
    user: str = "contract",
) -> Iterator[InProcessServer]:
    """Build, start and finally shut down an in-process server on ``data_dir``."""
    from twinkle_server.app import create_app
    from twinkle_server.auth import create_user
    from twinkle_server.context import ServerContext
    from twinkle_server.settings import Settings
    from twinkle_server.store import Store

    from twinkle.model import MultiLoraTransformersModel

    settings = Settings(
        model=model, data_dir=Path(data_dir), max_loras=max_loras, allow_local_data=allow_local_data,
        device=device, dtype=dtype,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path)
    try:
        served = MultiLoraTransformersModel(
            settings.model, max_loras=settings.max_loras, max_r=settings.max_r, device=settings.device,
            dtype=settings.dtype, output_dir=str(settings.scratch_dir),
        )
    except BaseException:
        store.close()
        raise
    ctx = ServerContext(settings=settings, store=store, model=served, dtype=str(served.dtype).removeprefix("torch."))
    _, key = create_user(store, user)
    app = create_app(ctx)
    ctx.start()
    transport = ASGIThreadTransport(app)
    try:
        yield InProcessServer(ctx=ctx, app=app, api_key=key, transport=transport)
    finally:
        try:
            ctx.shutdown()
        finally:
            transport.stop()
