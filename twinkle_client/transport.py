"""HTTP transport: one pooled ``httpx.Client``, bearer auth, retries that re-send the same bytes.

Everything that can go wrong on the wire comes out as a ``twinkle.errors.TwinkleError``:
an error body becomes its typed error (``error_from_code``), a server that stays
unreachable becomes one ``TransportError`` line. No httpx exception escapes.

Retries re-send the *identical* request (same call seqs, same ``Idempotency-Key``), so the
server's at-most-once bookkeeping turns a retry after a dropped connection into a replay of
the stored result rather than a second execution.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx

from twinkle.errors import (
    AuthenticationError,
    InvalidArgumentError,
    ServerError,
    StateError,
    TransportError,
    TwinkleError,
    UnsupportedMediaTypeError,
    error_for_status,
    error_from_code,
    first_line,
)
from twinkle.protocol import codec
from twinkle.protocol.limits import COMPRESS_MIN_BYTES
from twinkle.protocol.wire import API_PREFIX, HUB_TOKEN_HEADERS, ErrorResponse

log = logging.getLogger("twinkle_client.transport")

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a request the network or a proxy failed.

    Backoff doubles from ``initial_backoff_s`` up to ``max_backoff_s`` (with jitter, so that
    many clients do not retry in lock step) until ``total_s`` have passed since the first try.
    """

    total_s: float = 60.0
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * (2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)


NO_RETRY = RetryPolicy(total_s=0.0)


def normalize_base_url(url: str) -> str:
    """``http://host:port`` without a trailing slash or ``/api/v1`` (routes add the prefix)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgumentError(f"the twinkle server URL must be a non-empty string, got {url!r}")
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InvalidArgumentError(f"the twinkle server URL must start with http:// or https://, got {url!r}")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)]
    return url


class HubTokens:
    """The user's own hub tokens, sent to the server on object requests only (as the
    ``HUB_TOKEN_HEADERS`` headers), so that its hub reads and writes for that user use them.

    Its repr never shows a token, and nothing here logs one.
    """

    __slots__ = ("_tokens",)

    def __init__(self, hf: str | None = None, ms: str | None = None) -> None:
        tokens = {}
        for scheme, value in (("hf", hf), ("ms", ms)):
            if value is None or value == "":
                continue
            if not isinstance(value, str) or not value.isascii() or not value.isprintable() or any(
                c.isspace() for c in value
            ):
                # Say which, never what: the value is a secret.
                raise InvalidArgumentError(f"the {scheme} hub token must be printable ASCII without spaces")
            tokens[scheme] = value
        self._tokens: dict[str, str] = tokens

    def get(self, scheme: str) -> str | None:
        """The token for ``'hf'`` or ``'ms'``, or None."""
        return self._tokens.get(scheme)

    def headers(self) -> dict[str, str]:
        return {HUB_TOKEN_HEADERS[scheme]: token for scheme, token in self._tokens.items()}

    def __repr__(self) -> str:
        shown = ", ".join(f"{s}={'set' if s in self._tokens else None}" for s in ("hf", "ms"))
        return f"HubTokens({shown})"


class ClientClosedError(StateError):
    """The client was closed before this request went out: nothing was sent."""


class Transport:
    """Sends requests to one twinkle server over one connection pool.

    ``close()`` waits for requests already in flight (a remote object's sender thread may be
    in the middle of one when ``init_twinkle_client`` replaces the connection) and closes the
    pool when the last of them finishes.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        compress: bool = True,
        http_transport: httpx.BaseTransport | None = None,
        hub_tokens: HubTokens | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.has_api_key = bool(api_key)
        self.hub_tokens = hub_tokens or HubTokens()
        self.retry = retry or RetryPolicy()
        self._compress = compress
        headers = {"User-Agent": "twinkle-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers=headers,
            # Writes of a large batch and reads of a training call can both take a while;
            # only connecting should fail fast.
            timeout=httpx.Timeout(timeout, connect=connect_timeout, pool=connect_timeout),
            transport=http_transport,
            follow_redirects=False,
        )
        self._lock = threading.Lock()
        self._inflight = 0
        self._closing = False
        self._local = threading.local()

    # ------------------------------------------------------------------ life cycle

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close the pool now, or as soon as the requests in flight have finished."""
        with self._lock:
            self._closing = True
            idle = self._inflight == 0
        if idle:
            self._http.close()

    def _enter(self) -> None:
        with self._lock:
            if self._closing:
                raise ClientClosedError(
                    f"this TwinkleClient for {self.base_url} was closed; call init_twinkle_client(...) to reconnect"
                )
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            close_now = self._closing and self._inflight == 0
        if close_now:
            self._http.close()

    @contextlib.contextmanager
    def retrying_for(self, seconds: float) -> Iterator[None]:
        """Within the block, requests made by this thread retry for at most ``seconds``."""
        previous = getattr(self._local, "retry", None)
        base = previous or self.retry
        self._local.retry = replace(base, total_s=min(seconds, base.total_s))
        try:
            yield
        finally:
            self._local.retry = previous

    # ------------------------------------------------------------------ requests

    def get_json(self, path: str, *, params: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> Any:
        """GET a management route and return its parsed JSON."""
        return _decode(self.request("GET", path, params=params, retry=retry))

    def delete_json(self, path: str, *, retry: RetryPolicy | None = None) -> Any:
        return _decode(self.request("DELETE", path, retry=retry))

    def patch_json(self, path: str, payload: Any, *, retry: RetryPolicy | None = None) -> Any:
        """PATCH a management route with a JSON body (a set of values: sending it again is harmless)."""
        body = json.dumps(payload).encode()
        return _decode(self.request("PATCH", path, content=body, headers={"Content-Type": "application/json"},
                                    retry=retry))

    def post_msgpack(
        self, path: str, payload: Any, *, headers: dict[str, str] | None = None, retry: RetryPolicy | None = None,
        hub: bool = False,
    ) -> Any:
        """POST wire-ready ``payload`` as msgpack and return the decoded reply. With ``hub``
        (object creations and calls, which may read or write a hub for the user) the user's
        hub tokens go along as headers; per request, never as default headers of the pool."""
        body = codec.pack(payload)
        hdrs = {"Content-Type": codec.CONTENT_TYPE, "Accept": codec.CONTENT_TYPE, **(headers or {})}
        if hub:
            hdrs.update(self.hub_tokens.headers())
        if self._compress and len(body) >= COMPRESS_MIN_BYTES:
            try:
                return _decode(
                    self.request("POST", path, content=gzip.compress(body, compresslevel=1),
                                 headers={**hdrs, "Content-Encoding": "gzip"}, retry=retry)
                )
            except TwinkleError as exc:
                if not isinstance(exc, UnsupportedMediaTypeError):
                    raise
                # A server without request decompression: send plain bodies from now on.
                log.info("twinkle server at %s does not accept gzip bodies; sending them uncompressed", self.base_url)
                self._compress = False
        return _decode(self.request("POST", path, content=body, headers=hdrs, retry=retry))

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send one request, retrying network failures and 502/503/504; return a 2xx response."""
        policy = retry or getattr(self._local, "retry", None) or self.retry
        self._enter()
        try:
            return self._request_with_retries(method, path, params, content, headers, policy, timeout)
        finally:
            self._leave()

    def _request_with_retries(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None,
        content: bytes | None,
        headers: dict[str, str] | None,
        policy: RetryPolicy,
        timeout: float | None,
    ) -> httpx.Response:
        start = time.monotonic()
        attempt = 0
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        while True:
            attempt += 1
            reason: str
            try:
                response = self._http.request(method, path, params=params, content=content, headers=headers, **extra)
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                # Connect failures, resets, a connection closed before the reply, timeouts:
                # the request may or may not have run; re-sending the same bytes is safe.
                reason = _describe(exc)
                response = None
            except httpx.HTTPError as exc:
                raise TransportError(f"cannot reach twinkle server at {self.base_url}: {_describe(exc)}") from None
            except RuntimeError as exc:  # httpx: "the client has been closed"
                raise StateError(f"the connection to {self.base_url} was closed: {exc}") from None
            if response is not None:
                if response.status_code not in RETRY_STATUSES:
                    if response.is_success:
                        if attempt > 1:
                            log.warning("twinkle server at %s answered again after %.0f s",
                                        self.base_url, time.monotonic() - start)
                        return response
                    raise self._error(response)
                typed = self._typed_error(response)
                if typed is not None and typed.code != TransportError.code:
                    # The twinkle server itself answered (e.g. a hub it asked failed): a definite
                    # outcome, not a proxy or a restart in between, so sending it again won't help.
                    raise typed
                reason = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
            delay = policy.delay(attempt)
            elapsed = time.monotonic() - start
            if elapsed + delay > policy.total_s:
                raise TransportError(
                    f"cannot reach twinkle server at {self.base_url}: {reason} "
                    f"(gave up after {attempt} attempt{'s' if attempt > 1 else ''} in {elapsed:.0f} s)"
                )
            if attempt == 1:
                # Said once per request at WARNING (shown in a notebook without any logging
                # set-up), so a long wait for a restarting server is never silent.
                log.warning("twinkle server at %s: %s; retrying for up to %.0f s (Ctrl-C stops waiting)",
                            self.base_url, reason, policy.total_s)
            else:
                log.info("twinkle server at %s: %s; retrying in %.1f s", self.base_url, reason, delay)
            time.sleep(delay)

    def _typed_error(self, response: httpx.Response) -> TwinkleError | None:
        try:
            data = _decode(response)
            info = ErrorResponse.model_validate(data).error
        except Exception:
            return None
        request_id = info.request_id or response.headers.get("x-request-id")
        return error_from_code(info.code, info.message, request_id, call=info.call)

    def _error(self, response: httpx.Response) -> TwinkleError:
        err = self._typed_error(response)
        status = response.status_code
        if err is None:
            # No twinkle error body (a proxy, another server): the status says what it was.
            request_id = response.headers.get("x-request-id")
            text = f"HTTP {status} {response.reason_phrase} from {self.base_url}{response.request.url.path}"
            err = error_for_status(status)(text, request_id=request_id)
        if status == 401 and not isinstance(err, AuthenticationError):
            err = AuthenticationError(err.message, request_id=err.request_id)
        if isinstance(err, AuthenticationError) and not self.has_api_key:
            err.message += " (no API key was given: pass api_key=... or set TWINKLE_SERVER_TOKEN)"
        return err


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    ctype = response.headers.get("content-type", "")
    if "msgpack" in ctype:
        try:
            return codec.unpack(response.content)
        except InvalidArgumentError:
            # The reply is the server's (or a proxy's) fault, never the caller's argument.
            raise ServerError("the twinkle server sent a reply that is not valid msgpack") from None
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServerError(f"the twinkle server sent a reply that is not JSON: {first_line(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return "no reply before the read timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else first_line(exc)
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed the connection without replying"
    return first_line(exc)
