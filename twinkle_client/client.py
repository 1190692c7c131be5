"""``TwinkleClient`` (management calls) and the current connection that remote objects use.

``init_twinkle_client`` makes a client the *current connection*. Remote objects do not keep
a client: they look the current one up at every request, because their ids belong to the
user, not to a connection. Re-running ``init_twinkle_client`` in a notebook therefore swaps
the connection under every existing model, dataset and dataloader, and closes the old one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from twinkle.errors import InvalidArgumentError, StateError, TransportError, TwinkleError
from twinkle.protocol.names import (
    TWINKLE_SCHEME,
    check_run_dataset,
    check_run_name,
    check_run_tags,
    split_twinkle_path,
)
from twinkle.protocol.wire import (
    Checkpoint,
    CheckpointPath,
    CheckpointsListResponse,
    Cursor,
    DeleteCheckpointResponse,
    HealthResponse,
    MetricsResponse,
    ServerInfo,
    TrainingRun,
    TrainingRunsResponse,
    UploadStatus,
)

from .transport import DEFAULT_URL, NO_RETRY, ClientClosedError, HubTokens, RetryPolicy, Transport

ENV_URL = "TWINKLE_SERVER_URL"
ENV_TOKEN = "TWINKLE_SERVER_TOKEN"
ENV_HUB_TOKENS = {"hf": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "ms": ("MODELSCOPE_API_TOKEN",)}
"""Where the user's own hub tokens are read from by default (the hub SDKs' own variables).
``MODELSCOPE_TOKEN`` is not one of them: the ModelScope examples keep the twinkle server key
there, which must never reach a hub."""


def _hub_token(scheme: str, given: str | bool | None) -> str | None:
    """``given`` as a hub token: None reads the user's environment, False or '' means none."""
    if given is None:
        return next((os.environ[name] for name in ENV_HUB_TOKENS[scheme] if os.environ.get(name)), None)
    if given is False or given == "":
        return None
    if not isinstance(given, str):
        raise InvalidArgumentError(f"{scheme}_token must be a string, False or None, got {type(given).__name__}")
    return given


class TwinkleClient:
    """A connection to one twinkle server, with the management calls of ModelScope's client.

    Args:
        base_url: ``http(s)://host:port`` of the server; default ``$TWINKLE_SERVER_URL``, else
            ``http://127.0.0.1:8000``. Read when the client is made, not at import.
        api_key: the bearer key; default ``$TWINKLE_SERVER_TOKEN``.
        timeout: seconds to wait for a reply (a training call may take long).
        connect_timeout: seconds to wait for a connection.
        retry_timeout: how long to keep retrying a server that is unreachable or answers
            502/503/504 before raising ``TransportError``. The default (10 minutes) rides out
            a server restart or a network outage: every training call is exactly-once (the
            server answers a resent call from its record), so a loop carries on where it was.
            The first failed try of a request logs one warning; Ctrl-C stops the wait.
        compress: gzip large request bodies (token batches).
        http_transport: an ``httpx`` transport to use instead of the network (tests).
        hf_token, ms_token: your own Hugging Face and ModelScope tokens. The server reads and
            writes hubs for you with these (private datasets and models, ``upload_to_hub``)
            and never with its own; without one it goes anonymously. Default: your
            environment, read now: ``$HF_TOKEN`` (else ``$HUGGING_FACE_HUB_TOKEN``) and
            ``$MODELSCOPE_API_TOKEN``. ``False`` sends none. They travel as request headers
            of object creations and calls only, and are never logged or shown.

    Use it as a context manager, or call ``close()``, to release its connections.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retry_timeout: float = 600.0,
        compress: bool = True,
        http_transport: httpx.BaseTransport | None = None,
        hf_token: str | bool | None = None,
        ms_token: str | bool | None = None,
    ) -> None:
        url = base_url or os.environ.get(ENV_URL) or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get(ENV_TOKEN)
        self._transport = Transport(
            url,
            key or None,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retry=RetryPolicy(total_s=retry_timeout),
            compress=compress,
            http_transport=http_transport,
            hub_tokens=HubTokens(hf=_hub_token("hf", hf_token), ms=_hub_token("ms", ms_token)),
        )

    # ------------------------------------------------------------------ basics

    @property
    def base_url(self) -> str:
        """The server's URL, without ``/api/v1``."""
        return self._transport.base_url

    @property
    def closed(self) -> bool:
        return self._transport.closed

    @property
    def transport(self) -> Transport:
        """The HTTP layer (used by remote objects)."""
        return self._transport

    def hub_token(self, scheme: str) -> str | None:
        """Your token for the hub ``scheme`` (``'hf'`` or ``'ms'``) that this client sends, or None."""
        return self._transport.hub_tokens.get(scheme)

    def close(self) -> None:
        """Release the connections (after any request in flight). Idempotent."""
        self._transport.close()

    def __enter__(self) -> TwinkleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("current" if _current is self else "open")
        return f"TwinkleClient({self.base_url!r}, {state})"

    # ------------------------------------------------------------------ server

    def health_check(self, timeout: float = 5.0) -> bool:
        """True when the server answers its health route; never raises (a down server is False)."""
        try:
            response = self._transport.request("GET", "/health", retry=NO_RETRY, timeout=timeout)
            HealthResponse.model_validate(response.json())
            return True
        except Exception:  # any failure at all means "not healthy"
            return False

    def require_reachable(self, timeout: float = 5.0) -> None:
        """Raise ``TransportError`` at once unless the server answers its health route.

        Calls retry an unreachable server for ``retry_timeout``; an interactive caller (a
        magic, a browser, a live plot) should learn at once that it is down.
        """
        if not self.health_check(timeout):
            raise TransportError(f"cannot reach the twinkle server at {self.base_url}")

    def retrying_for(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        """A block in which this thread's calls retry an unreachable server for at most ``seconds``.

        For readers that should give up soon (a live plot's poller, a widget's refresh) while
        training calls keep the client's longer ``retry_timeout``::

            with client.retrying_for(5):
                runs = client.list_training_runs()
        """
        return self._transport.retrying_for(seconds)

    def get_server_info(self) -> ServerInfo:
        """The server's base model, adapter capacity, device and the user the key belongs to."""
        return self._get(ServerInfo, "/server")

    # ------------------------------------------------------------------ runs

    def list_training_runs(
        self, limit: int = 20, offset: int = 0, *, name: str | None = None, tags: str | list[str] | None = None
    ) -> list[TrainingRun]:
        """The current user's training runs, newest first; ``name``: only those whose name
        contains it (any case); ``tags``: only those carrying every one of the tags."""
        return self.list_training_runs_with_cursor(limit=limit, offset=offset, name=name, tags=tags)[0]

    def list_training_runs_with_cursor(
        self, limit: int = 20, offset: int = 0, *, name: str | None = None, tags: str | list[str] | None = None
    ) -> tuple[list[TrainingRun], Cursor]:
        """``(runs, cursor)``; the cursor tells the total count (of the runs that match) for paging."""
        _check_count("limit", limit, minimum=1)
        _check_count("offset", offset, minimum=0)
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if name:
            params["name"] = check_run_name(name)
        wanted = check_run_tags([tags] if isinstance(tags, str) else list(tags or []))
        if wanted:
            params["tag"] = wanted
        page = self._get(TrainingRunsResponse, "/training_runs", params=params)
        return page.training_runs, page.cursor

    def get_training_run(self, run_id: str) -> TrainingRun:
        """One run's details (``NotFoundError`` if it is not yours)."""
        return self._get(TrainingRun, f"/training_runs/{_seg(run_id, 'run_id')}")

    def update_training_run(
        self, run_id: str, *, name: str | None = None, tags: list[str] | None = None, dataset: Any = None
    ) -> TrainingRun:
        """Describe one of your runs; returns it as updated.

        Args:
            run_id: the run (``NotFoundError`` if it is not yours).
            name: a name of at most 100 printable characters (``""`` removes it).
            tags: the run's tags, replacing the ones it had (``[]`` removes them): at most 16,
                each 1-32 letters, digits, ``_ . : = + -``, e.g. ``["sweep", "lr=1e-4"]``.
            dataset: the id of the dataset it trains on, e.g. ``"ms://org/name"`` or a
                ``DatasetMeta`` (``""`` removes it). The server records every other setting by
                itself, but it cannot tell which dataset a batch came from.

        A value left at None stays as it was. A refused value is an ``InvalidArgumentError``
        saying what is allowed, raised before anything is sent.
        """
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = check_run_name(name)
        if tags is not None:
            body["tags"] = check_run_tags([tags] if isinstance(tags, str) else tags)
        if dataset is not None:
            body["dataset"] = check_run_dataset(getattr(dataset, "dataset_id", dataset))
        data = self._transport.patch_json(f"/training_runs/{_seg(run_id, 'run_id')}", body)
        return _parse(TrainingRun, data)

    def get_metrics(self, run_id: str, since_step: int = 0) -> MetricsResponse:
        """The run's per-micro-batch metrics with ``step > since_step``, oldest first, and its eval
        points (``forward_only`` batches with labels) with ``step >= since_step``; ``.eval_loss``
        is the eval loss per step."""
        _check_count("since_step", since_step, minimum=0)
        return self._get(
            MetricsResponse, f"/training_runs/{_seg(run_id, 'run_id')}/metrics", params={"since_step": since_step}
        )

    # ------------------------------------------------------------------ checkpoints

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        """A run's checkpoints, oldest first."""
        return self._get(CheckpointsListResponse, f"/training_runs/{_seg(run_id, 'run_id')}/checkpoints").checkpoints

    def get_checkpoint(self, run_id: str, checkpoint_id: str) -> Checkpoint:
        """One checkpoint's details."""
        run_id, checkpoint_id = _checkpoint_ref(run_id, checkpoint_id)
        return self._get(Checkpoint, f"/training_runs/{_seg(run_id, 'run_id')}/checkpoints/{_seg(checkpoint_id)}")

    def get_checkpoint_path(self, run_id: str, checkpoint_id: str) -> CheckpointPath:
        """The checkpoint's ``twinkle://`` path (``str()`` of the result) to pass to ``load``."""
        ckpt = self.get_checkpoint(run_id, checkpoint_id)
        return CheckpointPath(
            twinkle_path=ckpt.twinkle_path,
            training_run_id=ckpt.training_run_id,
            checkpoint_id=ckpt.checkpoint_id,
        )

    def get_latest_checkpoint_path(self, run_id: str) -> str | None:
        """The ``twinkle://`` path of the run's newest checkpoint, or None if it has none."""
        newest = newest_checkpoint(self.list_checkpoints(run_id))
        return newest.twinkle_path if newest is not None else None

    def delete_checkpoint(self, run_id: str, checkpoint_id: str) -> DeleteCheckpointResponse:
        """Delete one checkpoint of a run."""
        run_id, checkpoint_id = _checkpoint_ref(run_id, checkpoint_id)
        data = self._transport.delete_json(
            f"/training_runs/{_seg(run_id, 'run_id')}/checkpoints/{_seg(checkpoint_id)}"
        )
        return _parse(DeleteCheckpointResponse, data)

    # ------------------------------------------------------------------ uploads

    def get_upload_status(self, upload_id: str) -> UploadStatus:
        """Where a hub upload started by ``model.upload_to_hub`` stands."""
        return self._get(UploadStatus, f"/uploads/{_seg(upload_id, 'upload_id')}")

    # ------------------------------------------------------------------ internals

    def _get(self, model: type[_M], path: str, params: dict[str, Any] | None = None) -> _M:
        return _parse(model, self._transport.get_json(path, params=params))


_M = TypeVar("_M", bound=BaseModel)
T = TypeVar("T")


def _parse(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise TwinkleError(
            f"the twinkle server sent an unexpected {model.__name__} ({where}: {first.get('msg')}); "
            "are client and server the same version?"
        ) from None


def _seg(value: Any, label: str = "checkpoint_id") -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{label} must be a non-empty string, got {value!r}")
    return quote(value, safe="")


def _checkpoint_ref(run_id: str, checkpoint_id: str) -> tuple[str, str]:
    """Accept ``step-10``, upstream's ``weights/step-10`` or a whole ``twinkle://`` path."""
    ckpt = str(checkpoint_id) if isinstance(checkpoint_id, CheckpointPath) else checkpoint_id
    if isinstance(ckpt, str) and ckpt.startswith(TWINKLE_SCHEME):
        parts = split_twinkle_path(ckpt)
        if parts is None:
            raise InvalidArgumentError(f"not a twinkle checkpoint path: {ckpt!r}")
        return parts
    if isinstance(ckpt, str) and ckpt.startswith("weights/"):
        ckpt = ckpt[len("weights/"):]
    return run_id, ckpt


def _check_count(label: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{label} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------- current connection

_lock = threading.Lock()
_current: TwinkleClient | None = None


def init_twinkle_client(base_url: str | None = None, api_key: str | None = None, **kwargs: Any) -> TwinkleClient:
    """Connect to a twinkle server and make it the connection every remote object uses.

    ``base_url`` and ``api_key`` default to ``$TWINKLE_SERVER_URL`` (else
    ``http://127.0.0.1:8000``) and ``$TWINKLE_SERVER_TOKEN``, read now. Your own hub tokens
    (``hf_token=``, ``ms_token=``) default to ``$HF_TOKEN``/``$HUGGING_FACE_HUB_TOKEN`` and
    ``$MODELSCOPE_API_TOKEN``: the server uses them, never its own, for your hub reads and
    uploads (see ``TwinkleClient``). Calling it again
    replaces the connection: the previous client is closed (after requests in flight) and
    existing remote objects carry on over the new one when it points at the same server
    (objects on another server raise ``StateError`` on their next call). ``kwargs`` go to ``TwinkleClient``;
    upstream's ``session_heartbeat_interval`` is accepted and ignored (no sessions here).
    """
    kwargs.pop("session_heartbeat_interval", None)
    client = TwinkleClient(base_url, api_key, **kwargs)
    _set_current(client)
    return client


def _set_current(client: TwinkleClient) -> None:
    global _current
    with _lock:
        old, _current = _current, client
    if old is not None and old is not client:
        old.close()


def current_client() -> TwinkleClient:
    """The connection remote objects use: the last ``init_twinkle_client``, else one made from
    the environment (and kept as current)."""
    global _current
    with _lock:
        if _current is None:
            _current = TwinkleClient()
        client = _current
    if client.closed:
        raise StateError(
            f"the current twinkle client ({client.base_url}) was closed; call init_twinkle_client(...) to reconnect"
        )
    return client


def peek_client() -> TwinkleClient | None:
    """The current client as it is, without making one from the environment."""
    with _lock:
        return _current


def on_current_client(send: Callable[[TwinkleClient], T], label: str, server: str | None = None) -> T:
    """Run ``send`` over the current client, which must talk to ``server`` when given.

    ``init_twinkle_client`` may replace the client between looking it up and sending; the
    old one then refuses before anything goes out, so the request is sent over the new one.
    An object id means nothing on another server, so pointing the client elsewhere strands
    the object with a clear error instead of sending its id to a stranger.
    """
    for _ in range(3):
        # An object's calls never make a client from the environment; only a creation may.
        client = current_client() if server is None else peek_client()
        if client is None:
            raise StateError(f"{label}: there is no twinkle client; call init_twinkle_client(...)")
        if server is not None and client.base_url != server:
            raise StateError(
                f"{label} lives on {server}, but the current twinkle client connects to "
                f"{client.base_url}; create it again, or init_twinkle_client({server!r}, ...)"
            )
        try:
            return send(client)
        except ClientClosedError:
            if peek_client() is client:
                raise  # closed, not replaced: the caller has to reconnect
    raise StateError(f"{label}: the twinkle client was replaced while sending; try again")



def newest_checkpoint(checkpoints: list[Checkpoint]) -> Checkpoint | None:
    """The most recently saved checkpoint: after a resume from an earlier step, that is the one
    on the live branch, not the highest step of the abandoned one."""
    return max(checkpoints, key=lambda c: (c.time, c.step), default=None)
