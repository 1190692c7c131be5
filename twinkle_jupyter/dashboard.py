"""The ``/twinkle`` dashboard: a Jupyter server extension.

It serves one page and three read-only JSON routes under the Jupyter server's own auth
(its token or login cookie). The routes ask the configured twinkle server through
``twinkle_client``, so the browser never holds the twinkle API key and never needs to
reach the twinkle server: it works behind JupyterHub and remote proxies, where an iframe
to another port does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from importlib import resources
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from traitlets import Float, Unicode

from twinkle.errors import TwinkleError

_RUN_ID = r"(?P<run_id>[A-Za-z0-9][\w.-]{0,127})"
_STATUS = {"not_found": 404, "invalid_argument": 400, "unauthenticated": 502, "unavailable": 502}


class TwinkleDashboardApp(ExtensionApp):
    """Adds ``/twinkle`` to a Jupyter server. Settings: ``c.TwinkleDashboardApp.server_url``
    and ``api_key``, else ``TWINKLE_SERVER_URL`` / ``TWINKLE_SERVER_TOKEN`` of the Jupyter
    server's environment."""

    name = "twinkle_jupyter"
    load_other_extensions = True

    server_url = Unicode("", help="URL of the twinkle server (default: $TWINKLE_SERVER_URL).").tag(config=True)
    api_key = Unicode("", help="API key for the twinkle server (default: $TWINKLE_SERVER_TOKEN).").tag(config=True)
    timeout = Float(30.0, help="Seconds to wait for the twinkle server.").tag(config=True)

    def initialize_settings(self) -> None:
        self.settings["twinkle_dashboard"] = self

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (r"/twinkle/?", DashboardPage),
                (r"/twinkle/api/runs", RunsHandler),
                (rf"/twinkle/api/runs/{_RUN_ID}/metrics", MetricsHandler),
                (rf"/twinkle/api/runs/{_RUN_ID}/checkpoints", CheckpointsHandler),
            ]
        )

    def make_client(self) -> Any:
        from twinkle_client import TwinkleClient

        return TwinkleClient(
            base_url=self.server_url or os.environ.get("TWINKLE_SERVER_URL") or None,
            api_key=self.api_key or os.environ.get("TWINKLE_SERVER_TOKEN") or None,
        )


class _Base(ExtensionHandlerMixin, JupyterHandler):
    @property
    def dashboard(self) -> TwinkleDashboardApp:
        return self.settings["twinkle_dashboard"]


class DashboardPage(_Base):
    @web.authenticated
    def get(self) -> None:
        page = resources.files("twinkle_jupyter").joinpath("static/dashboard.html").read_text(encoding="utf-8")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


class _Api(ExtensionHandlerMixin, APIHandler):
    async def ask(self, fn_name: str, *args: Any, **kwargs: Any) -> None:
        """Run one twinkle_client call off the event loop and answer with its JSON."""
        app: TwinkleDashboardApp = self.settings["twinkle_dashboard"]

        def call() -> Any:
            with app.make_client() as client:
                return getattr(client, fn_name)(*args, **kwargs)

        try:
            result = await asyncio.to_thread(call)
        except TwinkleError as err:
            self.set_status(_STATUS.get(err.code, 502))
            self.finish(json.dumps({"error": str(err)}))
            return
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(_plain(result)))


class RunsHandler(_Api):
    @web.authenticated
    async def get(self) -> None:
        limit = _int_arg(self, "limit", 50)
        offset = _int_arg(self, "offset", 0)
        await self.ask("list_training_runs", limit=limit, offset=offset)


class MetricsHandler(_Api):
    @web.authenticated
    async def get(self, run_id: str) -> None:
        await self.ask("get_metrics", run_id, since_step=_int_arg(self, "since_step", 0))


class CheckpointsHandler(_Api):
    @web.authenticated
    async def get(self, run_id: str) -> None:
        await self.ask("list_checkpoints", run_id)


def _int_arg(handler: web.RequestHandler, name: str, default: int) -> int:
    raw = handler.get_argument(name, str(default))
    if not re.fullmatch(r"\d{1,9}", raw):
        raise web.HTTPError(400, f"{name} must be a non-negative integer")
    return int(raw)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
