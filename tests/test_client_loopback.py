"""The client over its own transport seam: transport, pipeline, failures, connections, dataloader.

No socket is opened. The client gets its network from ``init_twinkle_client(...,
http_transport=...)``, and every test hands it a ``Wire``: an ``httpx.MockTransport`` that
records each request, can hold requests until the test releases them (a
``threading.Event``), and injects failures (``Fault``) before the server sees a request or
after it ran it (a dropped connection, a lost reply, a bare status, a malformed reply).
Behind the wire is one of:

- scripted replies, for the transport and the management calls;
- ``FakeTwinkle``, a stand-in for the server's object routes over small fake objects
  (creation, call batches whose seqs run at most once and in order, deletion, uploads), for
  pipelining, ordering, failures, retries, events and connections;
- the real server app in this process (``tests/inprocess.py``), where real server behaviour
  matters: dataloader iteration and position, training runs, releasing objects, a replayed
  call batch.

Nothing waits on time to order events: the tests wait for requests to arrive, be held or be
answered, each wait with a deadline.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import inprocess

import twinkle_client
from twinkle import errors
from twinkle.protocol import codec
from twinkle.protocol.api import API_BY_KIND, NEXT_BATCHES
from twinkle.protocol.limits import MAX_CALLS_PER_BATCH
from twinkle.protocol.outputs import ForwardBackwardOutput
from twinkle.protocol.wire import API_PREFIX, CheckpointPath
from twinkle_client import client as client_mod
from twinkle_client import events, init_twinkle_client
from twinkle_client.client import TwinkleClient
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset, DatasetMeta
from twinkle_client.model import MultiLoraTransformersModel

pytestmark = pytest.mark.unit

URL = "http://twinkle.test"
OTHER_URL = "http://other.test"
KEY = "tk_x"
DEADLINE = 30.0  # seconds any wait of a test may take before it counts as a failure




# =============================================================================== the wire


def json_reply(status: int, payload: Any) -> httpx.Response:
    return httpx.Response(status, json=payload)


def msgpack_reply(status: int, payload: Any) -> httpx.Response:
    return httpx.Response(status, content=codec.pack(payload), headers={"Content-Type": codec.CONTENT_TYPE})


def error_reply(status: int, code: str, message: str, request_id: str | None = None) -> httpx.Response:
    return json_reply(status, {"error": {"code": code, "message": message, "request_id": request_id}})


HEALTHY = {"status": "ok", "version": "t"}


@dataclass
class Seen:
    """One request as it reached the wire.

    ``served``: the server behind the wire ran it. ``reply``: what reached the client (None:
    nothing did, e.g. the connection dropped).
    """

    method: str
    url: httpx.URL
    headers: httpx.Headers
    raw: bytes
    served: bool = False
    reply: httpx.Response | None = None

    @classmethod
    def of(cls, request: httpx.Request) -> Seen:
        return cls(request.method, request.url, request.headers, request.read())

    @property
    def path(self) -> str:
        return self.url.path.removeprefix(API_PREFIX)

    @property
    def route(self) -> str:
        """``create``, ``calls``, ``delete`` for the object routes, else the path."""
        if self.path == "/objects" and self.method == "POST":
            return "create"
        if re.fullmatch(r"/objects/[\w-]+/calls", self.path):
            return "calls"
        if re.fullmatch(r"/objects/[\w-]+", self.path) and self.method == "DELETE":
            return "delete"
        return self.path

    @property
    def object_id(self) -> str | None:
        m = re.fullmatch(r"/objects/([\w-]+)(/calls)?", self.path)
        return m.group(1) if m else None

    @property
    def body(self) -> bytes:
        return gzip.decompress(self.raw) if self.headers.get("Content-Encoding") == "gzip" else self.raw

    def data(self) -> Any:
        if not self.raw:
            return None
        if "msgpack" in self.headers.get("Content-Type", ""):
            return codec.unpack(self.body)
        return json.loads(self.body)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.data()["calls"] if self.route == "calls" else []

    @property
    def methods(self) -> list[str]:
        return [c["method"] for c in self.calls]

    def results(self) -> list[dict[str, Any]]:
        """The call results the server answered (for a calls request that got a reply)."""
        assert self.reply is not None
        return codec.unpack(self.reply.content)["results"]


@dataclass
class Fault:
    """What goes wrong with the next request on ``route`` (that ``match`` accepts), once.

    ``action``: an exception to raise (a connection that fails or drops) or a reply to give.
    ``after``: the server runs the request first, then the reply is lost or replaced.
    """

    route: str
    action: BaseException | httpx.Response
    after: bool = False
    match: Callable[[Seen], bool] | None = None

    def applies(self, seen: Seen) -> bool:
        return seen.route == self.route and (self.match is None or self.match(seen))

    def act(self) -> httpx.Response:
        if isinstance(self.action, BaseException):
            raise self.action
        return self.action


class Wire:
    """The client's network: records requests, holds them on request, injects faults.

    ``serve(request) -> response`` is the server behind it. ``hold(route)`` makes requests on
    that route wait (before the server sees them) until ``release()``.
    """

    def __init__(self, serve: Callable[[httpx.Request], httpx.Response]) -> None:
        self._serve = serve
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self._cond = threading.Condition()
        self._open = threading.Event()
        self._open.set()
        self._held_route: str | None = None
        self._holding = 0
        self.transport = httpx.MockTransport(self._handle)

    # ------------------------------------------------------------------ test side

    def hold(self, route: str = "calls") -> None:
        with self._cond:
            self._held_route = route
            self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def holding(self) -> int:
        """Requests waiting at the wire right now."""
        with self._cond:
            return self._holding

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, DEADLINE), f"timed out waiting for {what}"

    def wait_held(self, n: int = 1) -> None:
        self.wait_for(lambda: self._holding >= n, f"{n} held request(s)")

    def requests(self, route: str | None = None, object_id: str | None = None) -> list[Seen]:
        with self._cond:
            seen = list(self.seen)
        return [s for s in seen if (route is None or s.route == route)
                and (object_id is None or s.object_id == object_id)]

    def call_batches(self, object_id: str) -> list[list[dict[str, Any]]]:
        return [s.calls for s in self.requests("calls", object_id)]

    # ------------------------------------------------------------------ transport side

    def _handle(self, request: httpx.Request) -> httpx.Response:
        seen = Seen.of(request)
        with self._cond:
            self.seen.append(seen)
            fault = next((f for f in self.faults if f.applies(seen)), None)
            if fault is not None:
                self.faults.remove(fault)
            held = seen.route == self._held_route and not self._open.is_set()
            if held:
                self._holding += 1
            self._cond.notify_all()
        if held:
            released = self._open.wait(DEADLINE)
            with self._cond:
                self._holding -= 1
                self._cond.notify_all()
            if not released:
                raise httpx.ConnectError("the test never released this request")
        try:
            if fault is not None and not fault.after:
                response = fault.act()
            else:
                response = self._serve(request)
                response.read()
                seen.served = True
                if fault is not None:
                    response = fault.act()
            seen.reply = response
            return response
        finally:
            with self._cond:
                self._cond.notify_all()


def scripted(*replies: httpx.Response | BaseException) -> Wire:
    """A wire whose server gives ``replies`` in turn (an exception is raised), then health replies."""
    script = list(replies)

    def serve(request: httpx.Request) -> httpx.Response:
        if not script:
            return json_reply(200, HEALTHY)
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return Wire(serve)


def unreachable() -> Wire:
    def serve(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    return Wire(serve)


def client_over(wire: Wire, url: str = URL, **kw: Any) -> TwinkleClient:
    return TwinkleClient(url, kw.pop("api_key", KEY), retry_timeout=kw.pop("retry_timeout", 10.0),
                         http_transport=wire.transport, **kw)


@pytest.fixture(scope="module", autouse=True)
def frozen_heap() -> Iterator[None]:
    """What existed before this module (torch, transformers, earlier tests) is never this module's
    garbage: frozen, the full collection after each test walks only what the tests made."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def fresh_connection(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts without a current connection and with no twinkle env vars."""
    monkeypatch.delenv("TWINKLE_SERVER_URL", raising=False)
    monkeypatch.delenv("TWINKLE_SERVER_TOKEN", raising=False)
    client_mod._current = None
    yield
    # Objects of this test are released by threads that use the current connection: let them
    # finish here, not during the next test.
    gc.collect()
    for thread in threading.enumerate():
        if thread.name.startswith("twinkle-release-"):
            thread.join(DEADLINE)
    if client_mod._current is not None:
        client_mod._current.close()
    client_mod._current = None


# =============================================================================== transport


def test_503_twice_then_ok_resends_the_same_request() -> None:
    wire = scripted(error_reply(503, "unavailable", "busy"), json_reply(503, {}), json_reply(200, HEALTHY))
    with client_over(wire) as client:
        assert client.transport.get_json("/health") == HEALTHY
    assert len(wire.seen) == 3 and {s.url for s in wire.seen} == {httpx.URL(URL + "/api/v1/health")}


def test_a_typed_error_from_the_server_itself_is_not_retried() -> None:
    wire = scripted(error_reply(502, "hub_error", "the hub said no", "req-1"))
    with client_over(wire) as client, pytest.raises(errors.HubError, match="the hub said no"):
        client.get_training_run("r1")
    assert len(wire.seen) == 1


@pytest.mark.parametrize("failure", [
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ConnectError("[Errno 111] Connection refused"),
    httpx.ReadTimeout("timed out"),
], ids=lambda exc: type(exc).__name__)
def test_a_failed_connection_is_retried_with_identical_bytes(failure: Exception) -> None:
    wire = scripted(failure, msgpack_reply(200, {"object_id": "o1", "kind": "dataset"}))
    with client_over(wire) as client:
        reply = client.transport.post_msgpack("/objects", {"kind": "dataset", "args": [], "kwargs": {}},
                                              headers={"Idempotency-Key": "abc"})
    assert reply == {"object_id": "o1", "kind": "dataset"}
    first, second = wire.seen
    assert first.raw == second.raw
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "abc"


@pytest.mark.parametrize("code", sorted(errors.ERRORS_BY_CODE))
def test_error_bodies_become_typed_errors(code: str) -> None:
    cls = errors.ERRORS_BY_CODE[code]
    status = 400 if cls is errors.TransportError else cls.status  # a 503 would be retried
    wire = scripted(error_reply(status, code, "it went wrong", "req-42"))
    with client_over(wire) as client, pytest.raises(cls) as info:
        client.get_training_run("r1")
    assert type(info.value) is cls
    assert info.value.message == "it went wrong" and info.value.request_id == "req-42"
    assert str(info.value) == "it went wrong (request id req-42)"


def test_401_without_body_is_an_authentication_error_with_a_hint() -> None:
    wire = scripted(httpx.Response(401))
    with client_over(wire, api_key=None) as client, \
            pytest.raises(errors.AuthenticationError, match="TWINKLE_SERVER_TOKEN"):
        client.list_training_runs()
    assert "Authorization" not in wire.seen[0].headers


@pytest.mark.parametrize(("status", "cls"), [
    (400, errors.InvalidArgumentError), (403, errors.AuthenticationError), (404, errors.NotFoundError),
    (405, errors.MethodNotAllowedError), (409, errors.HttpError), (413, errors.PayloadTooLargeError),
    (415, errors.UnsupportedMediaTypeError), (422, errors.InvalidArgumentError), (500, errors.ServerError),
])
def test_a_bare_status_becomes_the_error_of_its_class(status: int, cls: type[errors.TwinkleError]) -> None:
    wire = scripted(httpx.Response(status, json={"detail": "boom"}, headers={"x-request-id": "req-7"}))
    with client_over(wire) as client, pytest.raises(cls) as info:
        client.get_server_info()
    assert type(info.value) is cls and info.value.request_id == "req-7"
    assert info.value.message.startswith(f"HTTP {status} ") and info.value.message.endswith(
        f"from {URL}/api/v1/server")


def test_a_bare_502_that_persists_is_a_transport_error() -> None:
    wire = Wire(lambda request: httpx.Response(502, text="<html>bad gateway</html>"))
    with client_over(wire, retry_timeout=2.0) as client, pytest.raises(errors.TransportError) as info:
        client.get_server_info()
    assert str(info.value).startswith(f"cannot reach twinkle server at {URL}: HTTP 502 Bad Gateway (gave up after ")
    assert len(wire.seen) >= 2


def test_unreachable_server_is_one_transport_error_line() -> None:
    wire = unreachable()
    start = time.monotonic()
    with client_over(wire, retry_timeout=1.0) as client, pytest.raises(errors.TransportError) as info:
        client.list_training_runs()
    assert time.monotonic() - start < 5  # the retry budget is respected
    text = str(info.value)
    assert text.startswith(f"cannot reach twinkle server at {URL}: connection refused (gave up after ")
    assert "\n" not in text and isinstance(info.value, ConnectionError)
    assert len(wire.seen) >= 2


def test_retrying_for_shortens_this_threads_budget_only() -> None:
    wire = unreachable()
    with client_over(wire, retry_timeout=120.0) as client:
        assert client._transport.retry.total_s == 120.0
        start = time.monotonic()
        with client.retrying_for(0.5), pytest.raises(errors.TransportError, match="gave up after"):
            client.list_training_runs()
        assert time.monotonic() - start < 60  # far below the client's own 120 s budget
        seen: list[float] = []
        with client.retrying_for(0.5):
            other = threading.Thread(target=lambda: seen.append(
                getattr(client._transport._local, "retry", client._transport.retry).total_s))
            other.start()
            other.join()
        assert seen == [120.0]  # another thread (a model's sender) keeps the long budget


def test_a_retried_request_warns_once_and_says_when_the_server_is_back(caplog: pytest.LogCaptureFixture) -> None:
    wire = scripted(httpx.Response(503), httpx.Response(503), json_reply(200, {"training_runs": [], "cursor": {
        "limit": 20, "offset": 0, "total_count": 0}}))
    with caplog.at_level("INFO", logger="twinkle_client.transport"), client_over(wire) as client:
        assert client.list_training_runs() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "HTTP 503" in warnings[0] and "retrying for up to 10 s (Ctrl-C stops waiting)" in warnings[0]
    assert warnings[1].startswith(f"twinkle server at {URL} answered again after ")
    assert len(wire.seen) == 3


def test_the_default_retry_budget_outlasts_a_server_restart() -> None:
    import inspect

    # Training calls are exactly-once, so the default waits out a restart of several minutes.
    assert inspect.signature(TwinkleClient).parameters["retry_timeout"].default >= 300


def test_health_check_never_raises() -> None:
    wire = scripted(json_reply(200, HEALTHY), json_reply(503, {}), json_reply(200, {"nope": 1}),
                    httpx.Response(200, text="<html>hello</html>"), httpx.RemoteProtocolError("dropped"))
    with client_over(wire) as client:
        assert client.health_check() is True
        assert [client.health_check() for _ in range(4)] == [False] * 4
    assert len(wire.seen) == 5  # one try each: a health check does not retry
    with client_over(unreachable()) as client:
        assert client.health_check(timeout=1) is False
        with pytest.raises(errors.TransportError, match="cannot reach the twinkle server"):
            client.require_reachable()


def test_env_vars_are_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = scripted()
    monkeypatch.setenv("TWINKLE_SERVER_URL", "http://a.test")
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "key-a")
    first = init_twinkle_client(http_transport=wire.transport)
    assert first.health_check() and first.base_url == "http://a.test"
    monkeypatch.setenv("TWINKLE_SERVER_URL", "http://b.test/api/v1/")
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "key-b")
    second = init_twinkle_client(http_transport=wire.transport)
    second.transport.get_json("/health")
    assert second.base_url == "http://b.test"
    assert [s.url.host for s in wire.seen] == ["a.test", "b.test"]
    assert wire.seen[-1].url.path == "/api/v1/health"
    assert wire.seen[-1].headers["Authorization"] == "Bearer key-b"
    assert first.closed and first.transport._http.is_closed


RUN = "run-0123456789ab"  # run ids look like this on the wire


def run_json(run_id: str, **kw: Any) -> dict[str, Any]:
    return {"training_run_id": run_id, "base_model": "builtin://tiny-qwen2", "model_owner": "alice",
            "adapter_name": "default", "created": "2025-01-01T00:00:00Z", **kw}


def ckpt_json(name: str, when: str, step: int) -> dict[str, Any]:
    return {"checkpoint_id": name, "training_run_id": RUN, "twinkle_path": f"twinkle://{RUN}/weights/{name}",
            "time": when, "size_bytes": 10, "step": step, "has_optimizer": True, "base_model": "b"}


def test_management_calls_return_the_contract_models() -> None:
    ckpts = [ckpt_json("b", "2025-01-02T00:00:00Z", 4), ckpt_json("a", "2025-01-01T00:00:00Z", 2)]
    wire = scripted(
        json_reply(200, {"training_runs": [run_json(RUN)], "cursor": {"limit": 5, "offset": 0, "total_count": 1}}),
        json_reply(200, {"checkpoints": ckpts}),
        json_reply(200, ckpt_json("a", "2025-01-01T00:00:00Z", 2)),
        json_reply(200, {"checkpoints": []}),
        json_reply(200, {"success": True, "message": "deleted"}),
    )
    with client_over(wire) as client:
        runs, cursor = client.list_training_runs_with_cursor(limit=5)
        assert runs[0].training_run_id == RUN and cursor.total_count == 1
        assert client.get_latest_checkpoint_path(RUN) == f"twinkle://{RUN}/weights/b"
        path = client.get_checkpoint_path(RUN, "weights/a")
        assert str(path) == path.path == f"twinkle://{RUN}/weights/a"
        assert client.get_latest_checkpoint_path(RUN) is None
        assert client.delete_checkpoint("ignored", f"twinkle://{RUN}/weights/a").success
        with pytest.raises(errors.InvalidArgumentError):
            client.list_training_runs(limit=0)  # refused before anything is sent
    assert dict(wire.seen[0].url.params) == {"limit": "5", "offset": "0"}
    assert wire.seen[2].path == f"/training_runs/{RUN}/checkpoints/a"
    assert wire.seen[4].method == "DELETE" and wire.seen[4].path == f"/training_runs/{RUN}/checkpoints/a"
    assert len(wire.seen) == 5


def test_an_unexpected_reply_is_a_twinkle_error() -> None:
    wire = scripted(json_reply(200, {"nope": 1}), httpx.Response(200, text="<html>a proxy page</html>"))
    with client_over(wire) as client:
        with pytest.raises(errors.TwinkleError, match="unexpected TrainingRun"):
            client.get_training_run("r1")
        with pytest.raises(errors.TwinkleError, match="sent a reply that is not JSON"):
            client.get_training_run("r1")


def test_a_reply_that_is_not_msgpack_is_the_servers_fault() -> None:
    wire = scripted(httpx.Response(200, content=b"\xc1 not msgpack", headers={"Content-Type": codec.CONTENT_TYPE}))
    with client_over(wire) as client, pytest.raises(errors.TwinkleError) as info:
        client.transport.post_msgpack("/objects", {"kind": "dataset", "args": [], "kwargs": {}})
    assert not isinstance(info.value, errors.InvalidArgumentError), info.value
    assert "not valid msgpack" in str(info.value)


# =============================================================================== object server stand-in


def fake_run(adapter: str) -> str:
    """The run id the stand-in gives an adapter (well-formed, as the server's)."""
    return "run-" + adapter.encode().hex()[:12].ljust(12, "0")


RUN_DEFAULT = fake_run("default")
OLD_RUN = "run-0000000000aa"


class FakeModel:
    """Answers the model calls with fixed values; tracks the run of each adapter."""

    def __init__(self, model_id: str = "builtin://tiny-qwen2", **kw: Any) -> None:
        self.micro = 0
        self.runs: dict[str, str] = {}
        self.adapter: str | None = None

    def run_of(self, kwargs: dict[str, Any]) -> str | None:
        return self.runs.get(kwargs.get("adapter_name") or self.adapter)

    def add_adapter_to_model(self, adapter_name: str, config: Any, gradient_accumulation_steps: int = 1,
                             **kw: Any) -> None:
        self.runs[adapter_name] = fake_run(adapter_name)
        self.adapter = adapter_name

    def forward_backward(self, inputs: Any, **kw: Any) -> ForwardBackwardOutput:
        self.micro += 1
        return ForwardBackwardOutput(loss=1.0 / self.micro, num_tokens=len(inputs), batch_size=len(inputs),
                                     step=self.micro - 1, micro_step=self.micro, accumulated=1,
                                     gradient_accumulation_steps=1)

    def clip_grad_norm(self, max_grad_norm: float = 1.0, **kw: Any) -> float:
        return 0.5

    def step(self, **kw: Any) -> bool:
        return True

    def zero_grad(self, **kw: Any) -> bool:
        return True

    def lr_step(self, **kw: Any) -> bool:
        return True

    def set_optimizer(self, optimizer_cls: str = "AdamW", **kw: Any) -> None:
        pass

    def set_loss(self, loss_cls: str = "CrossEntropyLoss", **kw: Any) -> None:
        pass

    def save(self, name: str, save_optimizer: bool = False, **kw: Any) -> str:
        if not re.fullmatch(r"[\w.-]+", name):
            raise errors.InvalidArgumentError(f"checkpoint name must be letters, got {name!r}")
        return f"twinkle://{self.runs[self.adapter]}/weights/{name}"

    def load(self, name: str, load_optimizer: bool = False, **kw: Any) -> None:
        if not isinstance(name, str):
            raise errors.InvalidArgumentError("path must be a string")

    def resume_from_checkpoint(self, name: str, **kw: Any) -> dict[str, int]:
        run, _, _ = name.removeprefix("twinkle://").partition("/weights/")
        self.runs[kw.get("adapter_name") or self.adapter] = run  # the adapter trains that run now
        return {"cur_step": 3, "consumed_train_samples": 12, "gradient_accumulation_steps": 1}

    def upload_to_hub(self, checkpoint_dir: str, hub_model_id: str, hub_token: str | None = None,
                      async_upload: bool = False) -> str:
        return "up-1"


class FakeDataset:
    def __init__(self, dataset_meta: Any) -> None:
        n = len(dataset_meta.data_slice) if dataset_meta.data_slice is not None else 10
        self.rows = [{"input_ids": [i, i + 1], "labels": [i, i + 1]} for i in range(n)]

    def map(self, *a: Any, **kw: Any) -> None:
        pass

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.rows[idx]


class FakeDataLoader:
    def __init__(self, dataset: Any, batch_size: int, **kw: Any) -> None:
        self.dataset = dataset
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)


@dataclass
class Slot:
    obj: Any
    kind: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    last_seq: int = 0
    calls: list[str] = field(default_factory=list)
    """Methods run, in order."""
    fail: dict[str, errors.TwinkleError] = field(default_factory=dict)
    """Method -> the error its next run raises (once)."""
    handled_through: int = 0
    failures: int = 0


class FakeTwinkle:
    """The object routes of the wire contract over fake objects, behind a ``Wire``.

    Creation honours the Idempotency-Key; a call batch waits for the batch its client sent
    before it (``after``), binds each call against the declared API, runs new seqs in order and
    at most once, replays the stored result of a seq it has seen, stops at the first failure
    (later calls are neither run nor listed), and refuses a batch sent before its client saw
    the object's latest failure (``failures``), as the server does.
    """

    KINDS = {"model": FakeModel, "dataset": FakeDataset, "dataloader": FakeDataLoader}

    def __init__(self, base_url: str = URL) -> None:
        self.base_url = base_url
        self.objects: dict[str, Slot] = {}
        self.by_key: dict[str, str] = {}
        self.log: list[tuple[str, int, str]] = []
        """``(object_id, seq, what)`` in the order things happened; creation and deletion have seq 0."""
        self.violations: list[str] = []
        self.uploads: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self.wire = Wire(self.serve)
        self.transport = self.wire.transport

    def slot(self, remote: Any) -> Slot:
        return self.objects[remote.object_id]

    def obj(self, remote: Any) -> Any:
        return self.slot(remote).obj

    def executed(self, remote: Any) -> list[tuple[int, str]]:
        return [(seq, what) for oid, seq, what in self.log if oid == remote.object_id and seq > 0]

    def _resolve(self, ref: str) -> Any:
        return self.objects[ref].obj

    def serve(self, request: httpx.Request) -> httpx.Response:
        seen = Seen.of(request)
        with self._lock:
            if seen.route == "calls" and (slot := self.objects.get(seen.object_id or "")) is not None:
                after = seen.data().get("after") or 0
                assert self._turn.wait_for(lambda: slot.handled_through >= after, DEADLINE), "predecessor never came"
            return self._serve(seen)

    def _serve(self, req: Seen) -> httpx.Response:
        if req.path == "/health":
            return json_reply(200, {"status": "ok", "version": "fake"})
        if req.route == "create":
            key = req.headers.get("Idempotency-Key")
            if key in self.by_key:
                oid = self.by_key[key]
                return msgpack_reply(200, {"object_id": oid, "kind": self.objects[oid].kind})
            data = req.data()
            args = codec.from_wire(data["args"], self._resolve, tensors=False)
            kwargs = codec.from_wire(data["kwargs"], self._resolve, tensors=False)
            oid = f"obj-{uuid.uuid4().hex[:12]}"  # unique, as the real server's
            self.objects[oid] = Slot(self.KINDS[data["kind"]](*args, **kwargs), data["kind"])
            self.by_key[key] = oid
            self.log.append((oid, 0, f"create {data['kind']}"))
            return msgpack_reply(200, {"object_id": oid, "kind": data["kind"]})
        if req.route == "calls":
            slot = self.objects.get(req.object_id or "")
            if slot is None:
                return error_reply(404, "not_found", f"no object {req.object_id}")
            results = []
            data = req.data()
            stale = data.get("after") is not None and (data.get("failures") or 0) < slot.failures
            for call in req.calls:
                if stale and call["seq"] > slot.last_seq:
                    results.append({"seq": call["seq"], "ok": False, "error": {
                        "code": "invalid_state", "message": "not run: an earlier call failed", "blocked": True}})
                    slot.results[call["seq"]] = results[-1]
                    slot.last_seq = call["seq"]
                    continue
                results.append(self._run(req.object_id or "", slot, call, data.get("after") is not None))
                if not results[-1]["ok"]:
                    break  # later calls are neither run nor listed
            slot.handled_through = max(slot.handled_through, req.calls[-1]["seq"])
            self._turn.notify_all()
            return msgpack_reply(200, {"results": results, "failures": slot.failures})
        if req.route == "delete":
            slot = self.objects.pop(req.object_id or "", None)
            if slot is None:
                return error_reply(404, "not_found", f"no object {req.object_id}")
            self.log.append((req.object_id or "", 0, "delete"))
            return json_reply(200, {"object_id": req.object_id, "kind": slot.kind})
        if m := re.fullmatch(r"/uploads/([\w-]+)", req.path):
            return json_reply(200, {"upload_id": m.group(1), "hub_model_id": "me/model", **self.uploads.pop(0)})
        return error_reply(404, "not_found", f"no route {req.path}")

    def _run(self, oid: str, slot: Slot, call: dict[str, Any], pipelined: bool = False) -> dict[str, Any]:
        seq, method = call["seq"], call["method"]
        if seq in slot.results:
            return slot.results[seq]
        if seq <= slot.last_seq:
            if pipelined:  # overtaken by a batch its client sent after a failure: never run, as the server
                return {"seq": seq, "ok": False, "error": {"code": "invalid_state", "message": "never ran",
                                                           "blocked": True}}
            self.violations.append(f"{oid}: seq {seq} arrived after seq {slot.last_seq}")
            return {"seq": seq, "ok": False, "error": {"code": "conflict", "message": "seq out of order"}}
        slot.last_seq = seq
        slot.calls.append(method)
        self.log.append((oid, seq, method))
        try:
            args = codec.from_wire(call["args"], self._resolve, tensors=False)
            kwargs = codec.from_wire(call["kwargs"], self._resolve, tensors=False)
            spec = API_BY_KIND[slot.kind].methods.get(method)
            if spec is not None:
                spec.bind(args, kwargs)  # as the server does: a call must fit the declaration
            if method in slot.fail:
                raise slot.fail.pop(method)
            value = getattr(slot.obj, method)(*args, **kwargs)
            result = {"seq": seq, "ok": True, "value": codec.to_wire(value),
                      "training_run_id": slot.obj.run_of(kwargs) if slot.kind == "model" else None}
        except errors.TwinkleError as exc:
            result = {"seq": seq, "ok": False, "error": {"code": exc.code, "message": exc.message, "call": method}}
            slot.failures += 1
        slot.results[seq] = result
        return result


@pytest.fixture
def fake() -> Iterator[FakeTwinkle]:
    server = FakeTwinkle()
    init_twinkle_client(URL, KEY, http_transport=server.transport, retry_timeout=10.0)
    yield server
    server.wire.release()  # never leave a sender waiting at the wire
    assert not server.violations


BATCH = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2


def make_model() -> Any:
    model = MultiLoraTransformersModel("builtin://tiny-qwen2")
    assert model.add_adapter_to_model("default", {"r": 8}) is None
    return model


def seed_step(model: Any) -> Any:
    output = model.forward_backward(inputs=BATCH)
    model.clip_grad_norm(1.0)
    model.step()
    model.zero_grad()
    model.lr_step()
    return output


# =============================================================================== pipeline


def test_training_steps_are_pipelined_and_seqs_run_once_in_order(fake: FakeTwinkle) -> None:
    model = make_model()
    assert model.training_run_id == RUN_DEFAULT
    fake.wire.hold()
    outputs = [seed_step(model) for _ in range(10)]  # none of these waits for the server
    fake.wire.wait_held()
    assert not any(o.done() for o in outputs)
    fake.wire.release()
    assert [round(o.loss, 6) for o in outputs] == [round(1 / i, 6) for i in range(1, 11)]
    model.flush()
    batches = fake.wire.call_batches(model.object_id)
    # The adapter; the batch the server held; everything queued meanwhile, in one batch.
    assert 2 <= len(batches) <= 3, [len(b) for b in batches]
    seqs = [c["seq"] for b in batches for c in b]
    assert seqs == list(range(1, 52))
    assert fake.executed(model) == [(c["seq"], c["method"]) for b in batches for c in b]
    assert fake.slot(model).calls.count("forward_backward") == 10


def test_a_long_queue_goes_in_batches_of_the_contracts_size(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.wire.hold()
    first = model.zero_grad()
    fake.wire.wait_held()
    queued = [model.zero_grad() for _ in range(2 * MAX_CALLS_PER_BATCH + 5)]
    fake.wire.release()
    assert first == True and all(q == True for q in queued)  # noqa: E712
    sizes = [len(b) for b in fake.wire.call_batches(model.object_id)[1:]]
    assert sizes[1:] == [MAX_CALLS_PER_BATCH, MAX_CALLS_PER_BATCH, 5]


def test_a_deferred_failure_surfaces_at_the_next_call_once(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.slot(model).fail["step"] = errors.StateError("no optimizer set")
    fake.wire.hold()  # all four are queued before any of them can run
    output = model.forward_backward(inputs=BATCH)
    norm = model.clip_grad_norm(1.0)
    stepped = model.step()
    zeroed = model.zero_grad()
    fake.wire.release()
    assert model.wait(DEADLINE)  # let the batches come back without reading anything
    assert output.loss == 1.0 and norm == 0.5  # the calls before the failure ran
    failure = stepped._future.exception()
    assert type(failure) is errors.StateError and failure.call == "step"
    assert str(failure) == "step() failed: no optimizer set"
    with pytest.raises(errors.StateError, match=r"^not run: an earlier call \(step\) failed$") as skipped:
        bool(zeroed)
    assert type(skipped.value) is errors.StateError and skipped.value.blocked_by is failure
    with pytest.raises(errors.StateError) as surfaced:
        model.lr_step()  # the next call on the object raises the failure ...
    assert surfaced.value is failure
    assert model.lr_step() == True  # noqa: E712  ... once only; then the object is usable again
    with pytest.raises(errors.StateError, match=r"^step\(\) failed: no optimizer set$"):
        stepped.result()
    assert "zero_grad" not in fake.slot(model).calls


def test_reading_the_failed_lazy_counts_as_seeing_the_error(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.slot(model).fail["forward_backward"] = errors.InvalidArgumentError("bad batch")
    output = model.forward_backward(inputs=BATCH)
    with pytest.raises(errors.InvalidArgumentError, match=r"^forward_backward\(\) failed: bad batch$"):
        f"loss {output}"  # noqa: B018
    assert model.step() == True  # noqa: E712


def test_calls_queued_behind_a_failure_are_not_sent(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.slot(model).fail["set_loss"] = errors.UnknownComponentError("no loss named Nope")
    fake.wire.hold()  # the server holds set_loss while the later calls queue up on the client
    failing = model.set_loss("Nope")
    fake.wire.wait_held()
    later = [model.set_optimizer("AdamW"), model.step()]
    fake.wire.release()
    assert model.wait(DEADLINE)
    failure = failing._future.exception()
    for lazy in later:
        with pytest.raises(errors.UnknownComponentError, match=r"^not run: an earlier call \(set_loss\) failed$") \
                as info:
            lazy.result()
        assert type(info.value) is errors.UnknownComponentError and info.value.blocked_by is failure
    with pytest.raises(errors.UnknownComponentError, match=r"^set_loss\(\) failed: no loss named Nope$"):
        model.save("x")
    # They may have gone out in the batch in flight behind set_loss (pipelining); none ran.
    assert fake.slot(model).calls == ["add_adapter_to_model", "set_loss"]


def test_a_waiting_call_behind_a_failure_raises_the_real_error(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.slot(model).fail["step"] = errors.StateError("no optimizer set")
    fake.wire.hold()
    stepped = model.step()
    fake.wire.wait_held()
    outcome: dict[str, Any] = {}

    def save() -> None:
        try:
            outcome["value"] = model.save("ckpt")
        except errors.TwinkleError as exc:
            outcome["error"] = exc

    saver = threading.Thread(target=save)
    saver.start()
    # save goes out behind the held step (the second batch in flight) and waits there too
    fake.wire.wait_for(lambda: any("save" in r.methods for r in fake.wire.requests("calls", model.object_id)),
                       "save sent")
    fake.wire.release()
    saver.join(DEADLINE)
    error = outcome["error"]
    assert error is stepped._future.exception() and error.blocked_by is None
    assert type(error) is errors.StateError and str(error) == "step() failed: no optimizer set"
    assert model.save("ckpt") == f"twinkle://{RUN_DEFAULT}/weights/ckpt"  # the failure was seen once
    assert fake.slot(model).calls == ["add_adapter_to_model", "step", "save"]


def test_a_call_after_a_settled_failure_raises_it_before_it_is_sent(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.slot(model).fail["step"] = errors.StateError("no optimizer set")
    model.step()
    assert model.wait(DEADLINE)
    with pytest.raises(errors.StateError, match=r"^step\(\) failed: no optimizer set$"):
        model.save("ckpt")
    assert model.save("ckpt") == f"twinkle://{RUN_DEFAULT}/weights/ckpt"
    assert fake.slot(model).calls == ["add_adapter_to_model", "step", "save"]


def test_a_waiting_call_raises_its_own_error_plainly(fake: FakeTwinkle) -> None:
    model = make_model()
    with pytest.raises(errors.InvalidArgumentError, match=r"^checkpoint name must be letters, got 'a b'$") as info:
        model.save("a b")
    assert info.value.call == "save" and info.value.blocked_by is None
    assert model.step() == True  # noqa: E712


def test_a_batch_refused_as_a_whole_fails_each_of_its_calls(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.wire.faults.append(Fault("calls", error_reply(404, "not_found", "no object: it expired", "req-9"),
                                  match=lambda s: "forward_backward" in s.methods))
    fake.wire.hold()
    model.zero_grad()
    fake.wire.wait_held()  # the next two go out together
    output, stepped = model.forward_backward(inputs=BATCH), model.step()
    fake.wire.release()
    assert model.wait(DEADLINE)
    assert fake.wire.call_batches(model.object_id)[-1] == [
        {"seq": 3, "method": "forward_backward", "args": [], "kwargs": {"inputs": BATCH}},
        {"seq": 4, "method": "step", "args": [], "kwargs": {}},
    ]
    with pytest.raises(errors.NotFoundError, match=r"^forward_backward\(\) failed: no object: it expired") as info:
        output.result()
    assert info.value.request_id == "req-9" and info.value.blocked_by is None
    with pytest.raises(errors.NotFoundError) as same:
        stepped.result()  # whether step ran is unknown: it reports the same error
    assert same.value is info.value
    assert model.zero_grad() == True  # noqa: E712  (the error was read: the object goes on)


@pytest.mark.parametrize(("reply", "message"), [
    (msgpack_reply(200, {"results": "nope"}), r"^step\(\) failed: the twinkle server sent a malformed call result"),
    (msgpack_reply(200, {"results": []}), r"^step\(\) failed: the server returned no result for this call$"),
    (httpx.Response(500, text="Internal Server Error"), r"^step\(\) failed: HTTP 500 Internal Server Error from "),
], ids=["not-a-result", "no-result", "bare-500"])
def test_a_malformed_call_reply_fails_the_call_not_the_object(fake: FakeTwinkle, reply: httpx.Response,
                                                              message: str) -> None:
    model = make_model()
    fake.wire.faults.append(Fault("calls", reply))
    with pytest.raises(errors.ServerError, match=message):
        model.step().result()
    assert model.step() == True  # noqa: E712


def test_a_malformed_creation_reply_is_a_server_error(fake: FakeTwinkle) -> None:
    fake.wire.faults.append(Fault("create", msgpack_reply(200, {"id": 1})))
    with pytest.raises(errors.ServerError, match="sent a malformed object id"):
        MultiLoraTransformersModel("builtin://tiny-qwen2")


def test_a_reply_lost_after_the_calls_ran_is_replayed_not_rerun(fake: FakeTwinkle) -> None:
    model = make_model()
    fake.wire.faults += [
        Fault("calls", httpx.ConnectError("[Errno 111] Connection refused")),  # never reached the server
        Fault("calls", httpx.RemoteProtocolError("Server disconnected"), after=True),  # ran; reply lost
        Fault("calls", httpx.Response(503), after=True),  # replayed; a proxy answered 503
    ]
    fake.wire.hold()
    output = seed_step(model)
    fake.wire.release()
    assert output.loss == 1.0
    model.flush()
    requests = fake.wire.requests("calls", model.object_id)[1:]
    assert len(requests) >= 4
    assert requests[0].raw == requests[1].raw == requests[2].raw == requests[3].raw  # the same seqs, resent
    executed = fake.executed(model)
    assert len(executed) == len({seq for seq, _ in executed}) == 6  # adapter + one step, each once
    assert fake.obj(model).micro == 1


def test_a_reference_flushes_the_referenced_objects_queue_first(fake: FakeTwinkle,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(12)))
    fake.wire.hold()
    ds.map("SelfCognitionProcessor", init_args={"model_name": "a", "model_author": "b"})
    ds.map("Another")
    fake.wire.wait_held()
    flushing = threading.Event()
    pipeline = ds._twinkle_pipeline
    real_flush = pipeline.flush

    def flush(timeout: float | None = None) -> None:
        flushing.set()
        real_flush(timeout)

    monkeypatch.setattr(pipeline, "flush", flush)
    made: list[Any] = []
    maker = threading.Thread(target=lambda: made.append(DataLoader(dataset=ds, batch_size=4)))
    maker.start()
    assert flushing.wait(DEADLINE)  # sending the dataset waits for its queued calls ...
    assert not [s for s in fake.wire.requests("create") if s.data()["kind"] == "dataloader"]
    fake.wire.release()
    maker.join(DEADLINE)
    (loader,) = made
    # ... so the server ran both maps before it made the dataloader.
    assert [what for oid, _, what in fake.log if oid in (ds.object_id, loader.object_id)] == [
        "create dataset", "map", "map", "create dataloader"]
    assert fake.obj(loader).dataset is fake.obj(ds)
    assert fake.wire.requests("create")[-1].data()["kwargs"]["dataset"] == {"__ref__": ds.object_id}
    assert len(loader) == 3 and len(ds) == 12 and ds[3] == {"input_ids": [3, 4], "labels": [3, 4]}


def test_a_local_object_cannot_be_sent(fake: FakeTwinkle) -> None:
    from twinkle.dataset import Dataset as LocalDataset

    local = object.__new__(LocalDataset)
    with pytest.raises(errors.InvalidArgumentError, match="local Dataset cannot be sent"):
        DataLoader(dataset=local, batch_size=2)
    assert not fake.wire.seen


def test_a_token_batch_travels_in_under_40_percent_of_its_json(fake: FakeTwinkle) -> None:
    import random

    rng = random.Random(0)
    batch = []
    for _ in range(8):
        ids = [rng.randrange(259) for _ in range(512)]
        cut = rng.randrange(50, 400)
        batch.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "attention_mask": [1] * 512})
    model = make_model()
    model.forward_backward(inputs=batch).result()
    request = next(s for s in fake.wire.requests("calls") if len(s.raw) > 1000)
    assert request.headers["Content-Encoding"] == "gzip"
    as_json = json.dumps({"calls": [{"seq": 2, "method": "forward_backward", "args": [],
                                     "kwargs": {"inputs": batch}}]}).encode()
    assert len(request.raw) < 0.4 * len(as_json), (len(request.raw), len(as_json))
    packed = len(request.body)  # binary int arrays alone, before gzip
    assert packed < 0.5 * len(as_json)
    assert request.data()["calls"][0]["kwargs"]["inputs"][0]["input_ids"]["__nd__"]  # packed, not a list


@pytest.mark.parametrize("refusal", [
    error_reply(415, "unsupported_media_type", "Content-Encoding gzip is not supported"),
    httpx.Response(415),
], ids=["typed", "bare"])
def test_bodies_go_plain_to_a_server_that_refuses_gzip(fake: FakeTwinkle, refusal: httpx.Response) -> None:
    model = make_model()
    fake.wire.faults.append(Fault("calls", refusal, match=lambda s: s.headers.get("Content-Encoding") == "gzip"))
    big = [{"input_ids": list(range(300)) * 4, "labels": list(range(300)) * 4}] * 4
    assert model.forward_backward(inputs=big).num_tokens == 4
    assert model.forward_backward(inputs=big).num_tokens == 4
    requests = fake.wire.requests("calls", model.object_id)[-3:]
    assert [s.headers.get("Content-Encoding") for s in requests] == ["gzip", None, None]
    assert requests[0].body == requests[1].body  # the refused batch went again, plain
    assert fake.obj(model).micro == 2


# =============================================================================== connections


def test_reinit_replaces_the_connection_under_existing_objects(fake: FakeTwinkle) -> None:
    first = client_mod._current
    model = make_model()
    seed_step(model)
    model.flush()
    second = init_twinkle_client(URL, "key-2", http_transport=fake.transport)
    assert first.closed and not second.closed
    assert first.transport._http.is_closed  # nothing was in flight: the old pool closed at once
    assert seed_step(model).loss == 0.5
    auth = [s.headers["Authorization"] for s in fake.wire.requests("calls")]
    assert auth[0] == f"Bearer {KEY}" and auth[-1] == "Bearer key-2"
    with pytest.raises(errors.StateError, match="was closed"):
        first.list_training_runs()


def test_the_old_connection_closes_after_its_request_in_flight(fake: FakeTwinkle) -> None:
    first = client_mod._current
    model = make_model()
    fake.wire.hold()
    output = model.forward_backward(inputs=BATCH)
    fake.wire.wait_held()
    init_twinkle_client(URL, "key-2", http_transport=fake.transport)
    assert first.closed and not first.transport._http.is_closed  # a batch is still on its way
    fake.wire.release()
    assert output.loss == 1.0  # the batch in flight finished over the old connection ...
    assert first.transport._http.is_closed  # ... which closed behind it
    assert fake.wire.requests("calls")[-1].headers["Authorization"] == f"Bearer {KEY}"
    assert model.step() == True  # noqa: E712
    assert fake.wire.requests("calls")[-1].headers["Authorization"] == "Bearer key-2"


def test_a_call_caught_between_clients_goes_over_the_new_one(fake: FakeTwinkle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    seed_step(model).result()
    model.flush()
    packing, replaced = threading.Event(), threading.Event()
    real_pack = codec.pack

    def pack_after_the_swap(value: Any) -> bytes:
        # The sender has looked up the client; hold it there until the client is replaced.
        if threading.current_thread().name.startswith(("twinkle-sender", "twinkle-post")) and not packing.is_set():
            packing.set()
            assert replaced.wait(DEADLINE)
        return real_pack(value)

    monkeypatch.setattr(codec, "pack", pack_after_the_swap)
    output = model.forward_backward(inputs=BATCH)
    assert packing.wait(DEADLINE)
    init_twinkle_client(URL, "key-2", http_transport=fake.transport)  # the old pool is idle: it closes now
    replaced.set()
    assert output.loss == 0.5
    calls = fake.wire.requests("calls", model.object_id)
    assert calls[-1].headers["Authorization"] == "Bearer key-2" and calls[-1].methods == ["forward_backward"]
    assert all(s.headers["Authorization"] == f"Bearer {KEY}" for s in calls[:-1])


def test_an_object_stays_bound_to_its_server(fake: FakeTwinkle) -> None:
    model = make_model()
    seed_step(model).result()
    model.flush()
    other = FakeTwinkle(OTHER_URL)
    init_twinkle_client(OTHER_URL, "key-2", http_transport=other.transport)
    with pytest.raises(errors.StateError, match=f"lives on {URL}.*connects to {OTHER_URL}"):
        model.forward_backward(inputs=BATCH).result()
    assert not other.wire.seen  # its id never went to the other server
    init_twinkle_client(URL, KEY, http_transport=fake.transport)  # pointed back, it carries on
    assert model.step() == True  # noqa: E712
    init_twinkle_client(OTHER_URL, "key-2", http_transport=other.transport)
    model.close()  # the release must not go to the other server either
    assert not other.wire.seen
    assert model.object_id in fake.objects  # (it stays until the first server's idle timeout)


def test_an_object_made_before_init_uses_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeTwinkle()

    class EnvClient(TwinkleClient):
        """The connection made from the environment, over the test's wire."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, http_transport=server.transport, **kwargs)

    monkeypatch.setattr(client_mod, "TwinkleClient", EnvClient)
    monkeypatch.setenv("TWINKLE_SERVER_URL", URL)
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "env-key")
    model = MultiLoraTransformersModel()
    assert model.step() == True  # noqa: E712
    assert server.wire.seen[0].route == "create"
    assert {s.headers["Authorization"] for s in server.wire.seen} == {"Bearer env-key"}
    assert twinkle_client.current_client().base_url == URL


def test_no_env_means_the_default_url_and_a_bad_url_is_refused() -> None:
    client = init_twinkle_client()
    assert client.base_url == "http://127.0.0.1:8000" and os.environ.get("TWINKLE_SERVER_URL") is None
    with pytest.raises(errors.InvalidArgumentError, match="http://"):
        init_twinkle_client("localhost:8000")
    assert client_mod._current is client  # a failed init leaves the connection as it was


# =============================================================================== model, events, release


def test_the_run_id_travels_beside_the_value(fake: FakeTwinkle) -> None:
    model = make_model()
    (added,) = fake.wire.requests("calls", model.object_id)[0].results()
    assert added["value"] is None and added["training_run_id"] == RUN_DEFAULT
    assert model.training_run_id == RUN_DEFAULT and model.training_run_ids == {"default": RUN_DEFAULT}
    progress = model.resume_from_checkpoint(f"twinkle://{OLD_RUN}/weights/step-3")
    assert type(progress) is dict and progress == {"cur_step": 3, "consumed_train_samples": 12,
                                                   "gradient_accumulation_steps": 1}
    assert model.training_run_id == OLD_RUN and model.training_run_ids == {"default": OLD_RUN}
    (resumed,) = fake.wire.requests("calls", model.object_id)[-1].results()
    assert resumed["training_run_id"] == OLD_RUN and codec.from_wire(resumed["value"]) == progress


def test_events_are_emitted_at_call_time(fake: FakeTwinkle) -> None:
    seen: list[events.TrainingEvent] = []

    def broken(event: events.TrainingEvent) -> None:
        raise RuntimeError("a listener bug")

    unsubscribe = events.subscribe(seen.append)
    unsubscribe_broken = events.subscribe(broken)
    try:
        model = make_model()
        fake.wire.hold()  # the server cannot answer: events must not wait for it
        output = model.forward_backward(inputs=BATCH)
        model.step()
        kinds = [e.kind for e in seen]
        assert not output.done()
        fake.wire.release()
        assert kinds == ["adapter_added", "forward_backward", "step"]
        assert seen[1].value is output and seen[1].run_id == RUN_DEFAULT and seen[1].model is model
        assert seen[2].method == "step" and seen[2].value.result() is True
        path = model.save("s1")
        model.load(path)
        assert [e.kind for e in seen[-2:]] == ["save", "load"] and seen[-2].value == path
        model.close()
        assert seen[-1].kind == "closed" and seen[-1].run_id == RUN_DEFAULT
    finally:
        unsubscribe()
        unsubscribe_broken()
    other = make_model()
    other.step()
    assert seen[-1].kind == "closed"


def test_upload_to_hub_follows_the_server_upload(fake: FakeTwinkle, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_client import model as model_mod

    model = make_model()
    fake.uploads += [{"status": "queued"}, {"status": "running", "progress": "3/5 files"},
                     {"status": "completed"}]
    monkeypatch.setattr(model_mod, "UPLOAD_POLL_S", (0.0, 0.0))
    assert model.upload_to_hub(f"twinkle://{RUN_DEFAULT}/weights/s1", "me/model") is None
    err = capsys.readouterr().err
    assert "queued" in err and "running (3/5 files)" in err and "completed" in err
    assert [s.path for s in fake.wire.requests() if s.path.startswith("/uploads/")] == ["/uploads/up-1"] * 3
    assert model.upload_to_hub(f"twinkle://{RUN_DEFAULT}/weights/s1", "me/model", async_upload=True) == "up-1"
    fake.uploads += [{"status": "failed", "error": "hub said no"}]
    with pytest.raises(errors.HubError, match="hub said no"):
        model.upload_to_hub(f"twinkle://{RUN_DEFAULT}/weights/s1", "me/model")


def test_close_deletes_the_server_object_and_gc_stops_the_sender(fake: FakeTwinkle) -> None:
    model = make_model()
    model.step()
    model.close()  # sends what is queued first
    model.close()
    assert model.object_id not in fake.objects
    assert [what for oid, _, what in fake.log if oid == model.object_id][-2:] == ["step", "delete"]
    assert len(fake.wire.requests("delete", model.object_id)) == 1
    with pytest.raises(errors.StateError, match="was closed"):
        model.step()
    other = make_model()
    other.step().result()
    thread = other._twinkle_pipeline._thread
    oid = other.object_id
    assert thread is not None and thread.is_alive()
    del other
    gc.collect()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    for releaser in [t for t in threading.enumerate() if t.name == f"twinkle-release-{oid}"]:
        releaser.join(DEADLINE)
    assert oid not in fake.objects and len(fake.wire.requests("delete", oid)) == 1


def test_signature_binding_sends_only_what_was_given(fake: FakeTwinkle) -> None:
    model = make_model()
    model.clip_grad_norm(0.5, adapter_name="default")
    model.save("s2", True)
    model.load(CheckpointPath(twinkle_path=f"twinkle://{RUN_DEFAULT}/weights/s2", training_run_id=RUN_DEFAULT,
                              checkpoint_id="s2"))
    model.flush()
    calls = [c for b in fake.wire.call_batches(model.object_id) for c in b]
    assert calls[0] == {"seq": 1, "method": "add_adapter_to_model", "args": [],
                        "kwargs": {"adapter_name": "default", "config": {"r": 8}}}
    assert (calls[-3]["args"], calls[-3]["kwargs"]) == ([], {"max_grad_norm": 0.5, "adapter_name": "default"})
    assert (calls[-2]["args"], calls[-2]["kwargs"]) == ([], {"name": "s2", "save_optimizer": True})
    assert (calls[-1]["args"], calls[-1]["kwargs"]) == ([], {"name": f"twinkle://{RUN_DEFAULT}/weights/s2"})
    sent = len(fake.wire.seen)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        model.step(nope=1)  # refused as the local method refuses it, before anything is sent
    model.flush()
    assert len(fake.wire.seen) == sent


# =============================================================================== the real server app


@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real server app in this process, for the module."""
    with inprocess.inprocess_server(tmp_path_factory.mktemp("inprocess-data")) as srv:
        yield srv


@dataclass
class Real:
    wire: Wire
    server: Any


@pytest.fixture
def real(app_server: Any) -> Iterator[Real]:
    """The current connection goes to the real app, through a ``Wire``."""
    wire = Wire(app_server.transport.handle_request)
    init_twinkle_client(app_server.base_url, app_server.api_key, http_transport=wire.transport, retry_timeout=10.0)
    yield Real(wire, app_server)
    wire.release()


LORA = {"r": 4, "target_modules": "all-linear"}
TOKENS = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}]


def test_real_server_run_id_comes_with_the_call_result_and_close_releases_it(real: Real) -> None:
    model = MultiLoraTransformersModel("builtin://tiny-qwen2")
    assert model.add_adapter_to_model("default", LORA) is None
    (added,) = real.wire.requests("calls", model.object_id)[-1].results()
    assert added["ok"] and added["value"] is None
    run_id = model.training_run_id
    assert run_id is not None and added["training_run_id"] == run_id
    client = twinkle_client.current_client()
    assert client.get_training_run(run_id).status == "active"
    model.close()
    model.close()
    assert len(real.wire.requests("delete", model.object_id)) == 1
    assert client.get_training_run(run_id).status == "detached"
    with pytest.raises(errors.StateError, match="was closed"):
        model.step()


def test_real_server_replays_a_batch_whose_reply_was_lost(real: Real) -> None:
    model = MultiLoraTransformersModel("builtin://tiny-qwen2")
    try:
        model.add_adapter_to_model("default", LORA)
        model.set_processor("InputProcessor", padding_side="right")
        model.set_optimizer("AdamW", lr=1e-3)
        real.wire.faults.append(Fault("calls", httpx.RemoteProtocolError("Server disconnected"), after=True,
                                      match=lambda s: "forward_backward" in s.methods))
        first = model.forward_backward(inputs=TOKENS)
        assert first.micro_step == 1
        lost, replayed = real.wire.requests("calls", model.object_id)[-2:]
        assert lost.raw == replayed.raw and lost.served and lost.reply is None  # it ran; its reply was lost
        assert model.forward_backward(inputs=TOKENS).micro_step == 2  # not 3: the batch ran once
        assert model.get_train_state()["micro_step"] == 2
    finally:
        model.close()


def _row_index(meta: DatasetMeta) -> tuple[Any, dict[str, int]]:
    """The local dataset of ``meta`` and each of its rows' index (rows are told apart by content)."""
    from twinkle.dataset import Dataset as LocalDataset

    local = LocalDataset(meta)
    index = {json.dumps(local[i], sort_keys=True): i for i in range(len(local))}
    assert len(index) == len(local)
    return local, index


def test_remote_dataloader_break_and_continue_covers_each_sample_once(real: Real) -> None:
    from twinkle.dataloader import DataLoader as LocalDataLoader

    meta = DatasetMeta("builtin://self-cognition", data_slice=range(22))
    local_ds, index = _row_index(meta)
    ds = Dataset(meta)
    loader = DataLoader(dataset=ds, batch_size=4, shuffle=True, seed=7)
    local = LocalDataLoader(local_ds, 4, shuffle=True, seed=7)
    for epoch in range(2):
        seen: list[int] = []
        for i, batch in enumerate(loader):
            seen += [index[json.dumps(row, sort_keys=True)] for row in batch]
            if i == 1:
                break
        assert loader.consumed_train_samples == epoch * 22 + 8
        for batch in loader:  # continues the same epoch
            seen += [index[json.dumps(row, sort_keys=True)] for row in batch]
        expected = [index[json.dumps(row, sort_keys=True)] for batch in local for row in batch]
        assert seen == expected and sorted(seen) == list(range(22))
    assert loader.get_state()["consumed_train_samples"] == 44 == local.consumed_train_samples
    fetches = [c for b in real.wire.call_batches(loader.object_id) for c in b if c["method"] == NEXT_BATCHES]
    assert len(fetches) < 2 * len(local) * 2  # several batches per round trip
    loader.close()
    ds.close()


def test_dataloader_state_and_resume_are_the_clients(real: Real) -> None:
    meta = DatasetMeta("builtin://self-cognition", data_slice=range(10))
    _, index = _row_index(meta)
    ds = Dataset(meta)
    loader = DataLoader(dataset=ds, batch_size=3)
    it = iter(loader)
    first = next(it)
    state = loader.get_state()
    assert state["consumed_train_samples"] == 3 and state["position_in_epoch"] == 3 and state["epoch"] == 0
    loader.resume_from_checkpoint(7)
    assert list(it) == []  # the old iterator's buffer is dropped
    rest = [index[json.dumps(row, sort_keys=True)] for batch in loader for row in batch]
    assert rest == [7, 8, 9] and index[json.dumps(first[0], sort_keys=True)] == 0
    loader.skip_consumed_samples(1)
    assert loader.get_state()["consumed_train_samples"] == 1
    with pytest.raises(errors.InvalidArgumentError):
        loader.resume_from_checkpoint(-1)
    assert loader.consumed_train_samples == 1
    loader.close()
    ds.close()
