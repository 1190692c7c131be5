"""The ``/twinkle`` dashboard: a Jupyter server extension.

It serves one page and four read-only JSON routes under the Jupyter server's own auth
(its token or login cookie). The routes ask the configured twinkle server through
``twinkle_client``, so the browser never holds the twinkle API key and never needs to
reach the twinkle server: it works behind JupyterHub and remote proxies, where an iframe
to another port does not.

Enabled in every Jupyter server of an environment it is installed into (the wheel carries
``etc/jupyter/jupyter_server_config.d/twinkle_jupyter.json``); by hand:
``jupyter server extension enable --sys-prefix twinkle_jupyter``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from traitlets import Float, Unicode

_RUN_ID = r"(?P<run_id>[A-Za-z0-9][\w.-]{0,127})"
_NOT_CONFIGURED = (
    "no twinkle server configured for this Jupyter server: set c.TwinkleDashboardApp.server_url "
    "(or TWINKLE_SERVER_URL in the Jupyter server's environment) and restart it"
)


class TwinkleDashboardApp(ExtensionApp):
    """Adds ``/twinkle`` to a Jupyter server. Settings: ``c.TwinkleDashboardApp.server_url``
    and ``api_key_file`` (a file holding the key), else ``TWINKLE_SERVER_URL`` /
    ``TWINKLE_SERVER_TOKEN`` of the Jupyter server's environment. The key is used by the
    Jupyter server only; pages, JSON answers and logs never contain it.

    The key itself is deliberately not a config value: traitlets logs every loaded config value
    at ``--debug`` ("Config changed: ..."), so a key in ``jupyter_server_config.py`` would land
    in the Jupyter server's log. A ``c.TwinkleDashboardApp.api_key`` found in the config is
    therefore not used, and a warning says what to do instead."""

    name = "twinkle_jupyter"
    load_other_extensions = True

    server_url = Unicode("", help="URL of the twinkle server (default: $TWINKLE_SERVER_URL).").tag(config=True)
    api_key_file = Unicode(
        "", help="A file holding the API key for the twinkle server (default: the key in $TWINKLE_SERVER_TOKEN). "
        "The key itself is not a setting: config values appear in the Jupyter server's debug log."
    ).tag(config=True)
    api_key = Unicode("", help="The API key, set from code only (never from a config file).")
    timeout = Float(30.0, help="Seconds to wait for the twinkle server.").tag(config=True)

    _client: Any = None
    _client_lock = threading.Lock()

    def initialize_settings(self) -> None:
        self.settings["twinkle_dashboard"] = self
        if "api_key" in self.config.get(type(self).__name__, {}):
            self.log.warning(
                "twinkle dashboard: c.%s.api_key is not used (config values can reach the Jupyter server's "
                "log); put the key in a file named by c.%s.api_key_file, or in TWINKLE_SERVER_TOKEN",
                type(self).__name__, type(self).__name__,
            )

    def initialize_handlers(self) -> None:
        self.handlers.extend(
            [
                (r"/twinkle/?", DashboardPage),
                (r"/twinkle/api/runs", RunsHandler),
                (r"/twinkle/api/compare", CompareHandler),
                (rf"/twinkle/api/runs/{_RUN_ID}/metrics", MetricsHandler),
                (rf"/twinkle/api/runs/{_RUN_ID}/checkpoints", CheckpointsHandler),
            ]
        )

    def settings_in_use(self) -> tuple[str, str | None]:
        """``(url, key)``: the configured ones, else the Jupyter server's environment."""
        url = self.server_url or os.environ.get("TWINKLE_SERVER_URL") or ""
        key = self.api_key or self._key_from_file() or os.environ.get("TWINKLE_SERVER_TOKEN") or None
        return url.strip(), key

    def _key_from_file(self) -> str | None:
        if not self.api_key_file:
            return None
        try:
            with open(os.path.expanduser(self.api_key_file), encoding="utf-8") as f:
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError) as err:
            from twinkle.errors import StateError

            raise StateError(
                f"cannot read the twinkle API key from c.{type(self).__name__}.api_key_file: {type(err).__name__}"
            ) from None

    def client(self) -> Any:
        """One ``TwinkleClient`` for every request (httpx pools its connections), made on first use.

        Only the configured server is ever asked: without a URL there is no default to fall back to.
        """
        with self._client_lock:
            if self._client is None or self._client.closed:
                url, key = self.settings_in_use()
                if not url:
                    from twinkle.errors import StateError

                    raise StateError(_NOT_CONFIGURED)
                from twinkle_client import TwinkleClient

                # No retries: the page polls every second or so and shows the error itself.
                self._client = TwinkleClient(
                    base_url=url, api_key=key, timeout=self.timeout,
                    connect_timeout=min(5.0, self.timeout), retry_timeout=0.0,
                )
            return self._client

    def scrub(self, text: str) -> str:
        """``text`` without the key or the twinkle server's URL (error messages go to the browser)."""
        from twinkle.errors import TwinkleError

        try:
            url, key = self.settings_in_use()
        except TwinkleError:  # an unreadable key file: there is no key to find in the text
            url, key = (self.server_url or os.environ.get("TWINKLE_SERVER_URL") or "").strip(), None
        if key:
            text = text.replace(key, "***")
        client = self._client
        for known in (getattr(client, "base_url", None), url.rstrip("/")):
            if known:
                text = text.replace(known, "<the configured URL>")
        return text

    async def stop_extension(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class DashboardPage(ExtensionHandlerMixin, JupyterHandler):
    """The page. Its script only talks to this Jupyter server (same origin, the login cookie)."""

    @web.authenticated
    def get(self) -> None:
        page = resources.files("twinkle_jupyter").joinpath("static/dashboard.html").read_text(encoding="utf-8")
        nonce = base64.b64encode(secrets.token_bytes(16)).decode("ascii")
        page = page.replace("{{nonce}}", nonce)
        # Only this page's own script and style run, and it can only fetch from this server.
        self.set_header(
            "Content-Security-Policy",
            "; ".join(
                [
                    self.content_security_policy,
                    "default-src 'none'",
                    f"script-src 'nonce-{nonce}'",
                    f"style-src 'nonce-{nonce}'",
                    "connect-src 'self'",
                    "img-src 'self' data:",
                    "base-uri 'none'",
                    "form-action 'none'",
                ]
            ),
        )
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


class _NotConfigured(Exception):
    pass


def answer_status(err: Exception) -> int:
    """The HTTP status of the dashboard's answer when asking the twinkle server raised ``err``.

    Only errors about what the browser asked for keep the twinkle server's status: a run that
    is not there (or not the key's: 404) and a bad argument (400). Anything else is the twinkle
    server's or the Jupyter server's problem, so 502 Bad Gateway: a key the twinkle server
    refuses is the Jupyter server's configuration, never a 401/403 (which would look like the
    Jupyter login failing), and a twinkle server that is down is a gateway failure too.
    """
    from twinkle.errors import InvalidArgumentError, NotFoundError

    if isinstance(err, NotFoundError | InvalidArgumentError) and err.status in (400, 404):
        return err.status
    return 502


class _Api(ExtensionHandlerMixin, APIHandler):
    """Read-only JSON over one twinkle_client call. There are no write routes (POST etc.: 405)."""

    async def ask(self, fn: str | Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run one twinkle_client call (a method name, or a function given the client first) off
        the event loop and answer with its JSON."""
        from twinkle.errors import TwinkleError

        app: TwinkleDashboardApp = self.settings["twinkle_dashboard"]
        fn_name = fn if isinstance(fn, str) else fn.__name__

        def call() -> Any:
            try:
                client = app.client()
            except TwinkleError as err:  # no URL, or not a usable one: the Jupyter server's setup
                raise _NotConfigured(str(err)) from None
            if isinstance(fn, str):
                return getattr(client, fn)(*args, **kwargs)
            return fn(client, *args, **kwargs)

        self.set_header("Cache-Control", "no-store")
        try:
            result = await asyncio.to_thread(call)
        except _NotConfigured as err:
            self.set_status(503)
            self.finish(json.dumps({"error": app.scrub(str(err))}))
            return
        except TwinkleError as err:
            self.set_status(answer_status(err))
            self.finish(json.dumps({"error": app.scrub(str(err))}))
            return
        except Exception as err:  # a bug or a broken reply: logged here, one line there
            self.log.exception("twinkle dashboard: %s failed", fn_name)
            self.set_status(502)
            self.finish(json.dumps({"error": app.scrub(f"the twinkle server's answer failed: {type(err).__name__}")}))
            return
        self.finish(json.dumps(_plain(result)))


class RunsHandler(_Api):
    """The runs, each with ``summary`` (its key settings on one line). ``filter`` is the filter
    box's text: words starting with ``#`` are tags a run must carry, the others a piece of its
    name (``runinfo.parse_filter``; a malformed tag or name answers 400)."""

    @web.authenticated
    async def get(self) -> None:
        from .runinfo import parse_filter

        limit = _int_arg(self, "limit", 50)
        offset = _int_arg(self, "offset", 0)
        if not 1 <= limit <= 500:
            raise web.HTTPError(400, "limit must be between 1 and 500")
        name, tags = parse_filter(self.get_argument("filter", "")[:1000])
        await self.ask(_runs_with_summaries, limit=limit, offset=offset, name=name or None, tags=tags)


class CompareHandler(_Api):
    """``?run=A&run=B...``: the settings in which the runs differ (``runinfo.RunComparison``)."""

    @web.authenticated
    async def get(self) -> None:
        runs = list(dict.fromkeys(self.get_arguments("run")))
        if not 2 <= len(runs) <= 8 or not all(re.fullmatch(_RUN_ID, r) for r in runs):
            raise web.HTTPError(400, "give 2 to 8 run ids as run=...")
        await self.ask(_comparison, runs)


def _runs_with_summaries(client: Any, **kwargs: Any) -> list[dict[str, Any]]:
    from .runinfo import config_summary

    return [{**r.model_dump(mode="json"), "summary": config_summary(r)}
            for r in client.list_training_runs(**kwargs)]


def _comparison(client: Any, run_ids: list[str]) -> dict[str, Any]:
    from .runinfo import compare_runs

    return compare_runs(client, run_ids).as_json()


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
