"""Shared test set-up: everything offline, caches and outputs in temporary folders."""

from __future__ import annotations

import os
import sys
import tempfile

# Helpers shared by test modules live in tests/support (pytest imports test modules by path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Set before twinkle, transformers or datasets are imported by any test module.
_ROOT = tempfile.mkdtemp(prefix="twinkle-tests-")
os.environ.setdefault("TWINKLE_CACHE_DIR", os.path.join(_ROOT, "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("HF_HOME", os.path.join(_ROOT, "hf"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_ROOT, "mpl"))
# The built-in model is tiny: one thread computes its matrices faster than two (measured: the
# demo test 39 s against 67 s), and the tests share two cores with the servers they start,
# which inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ------------------------------------------------------------------ twinkle-server fixtures
# Test modules cannot import conftest (pytest runs with --import-mode=importlib), so the
# server helpers reach tests as fixtures:
#
# - ``start_server(data_dir, *extra_args, timeout=240.0) -> ServerHandle`` (session-scoped
#   factory): runs ``python -m twinkle_server.cli serve --port 0 --data-dir DATA_DIR
#   *extra_args`` and waits for ``twinkle-server listening on http://HOST:PORT``. A handle
#   has ``url`` (``http://127.0.0.1:PORT``), ``api`` (``url + '/api/v1'``), ``process``,
#   ``data_dir``, ``stop(timeout=15) -> exit code`` (SIGTERM, then SIGKILL), ``kill()``
#   (SIGKILL, like a crash) and ``log() -> str`` (its stderr so far). Servers still running
#   at the end of the session are stopped.
# - ``add_user(data_dir, name) -> key`` (session): ``twinkle-server users add NAME``.
# - ``server`` (session): one ``ServerHandle`` with ``--max-loras 16`` shared by all modules.
#   Delete the model objects you create so that slots stay free.
# - ``server_user`` (function): ``(name, key)`` of a fresh user on ``server``.
# - ``connect`` (function): ``init_twinkle_client`` for a fresh user on ``server``, so the
#   remote classes (``twinkle_client.model``...) act as that user; dropped after the test.
# - ``raw_client(server_or_api_url, key) -> RawClient`` (session factory): httpx with msgpack
#   bodies via ``twinkle_client.codec``: ``create(kind, *args, idempotency_key=None, **kwargs)
#   -> object id``, ``calls(object_id, [(method, args, kwargs), ...]) -> httpx.Response``
#   (seqs tracked per object), ``call(object_id, method, *args, **kwargs) -> value`` (asserts
#   success), ``post(path, data, headers)``, ``get(path, **params)``, ``delete(path)``,
#   ``RawClient.body(response)`` (msgpack or JSON). Closed at the end of the session.
# - ``raw_helpers`` (session): ``raw_dataloader(client, rows=32, batch_size=4) -> (dataset id,
#   loader id)`` (built-in self-cognition, templated and encoded); ``raw_model(client,
#   adapter='default', r=4, lr=1e-3) -> model id`` (adapter, InputProcessor, AdamW set);
#   ``train_steps(client, model, loader, n) -> losses`` (n steps on a fresh epoch).

import itertools  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

SERVER_LISTENING = "twinkle-server listening on "


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinkle_server.cli", *args]


@dataclass
class ServerHandle:
    """A running ``twinkle-server serve`` subprocess."""

    url: str
    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    _log_files: list[Any] = field(default_factory=list, repr=False)

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_files()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_files()

    def _close_files(self) -> None:
        for f in self._log_files:
            f.close()
        self._log_files.clear()


_server_counter = itertools.count()


def launch_server(data_dir: str | Path, *extra_args: str, timeout: float = 240.0) -> ServerHandle:
    """Start ``twinkle-server serve --port 0`` on ``data_dir`` and wait until it listens."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    n = next(_server_counter)
    out_path = data_dir / f"server-{n}.stdout"
    log_path = data_dir / f"server-{n}.stderr"
    out, err = out_path.open("w"), log_path.open("w")
    process = subprocess.Popen(
        _server_cmd("serve", "--port", "0", "--data-dir", str(data_dir), *extra_args),
        stdout=out, stderr=err, stdin=subprocess.DEVNULL,
    )
    handle = ServerHandle("", process, data_dir, log_path, [out, err])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith(SERVER_LISTENING):
                handle.url = line[len(SERVER_LISTENING):].strip()
                return handle
        if process.poll() is not None:
            break
        time.sleep(0.05)
    handle.kill()
    raise RuntimeError(f"twinkle-server did not start (exit {process.returncode}):\n{handle.log()[-3000:]}")


def create_user(data_dir: str | Path, name: str) -> str:
    """Create a user with the CLI and return its API key (the last line of the output)."""
    proc = subprocess.run(
        _server_cmd("users", "add", name, "--data-dir", str(data_dir)),
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"users add {name} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().splitlines()[-1]


class RawClient:
    """The object and management routes over plain httpx, bodies packed with ``twinkle_client.codec``."""

    def __init__(self, api: str, key: str | None, timeout: float = 240.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=api, headers=headers, timeout=timeout)
        self.seqs: dict[str, int] = {}

    def close(self) -> None:
        self.http.close()

    def post(self, path: str, data: Any, headers: dict[str, str] | None = None) -> Any:
        from twinkle.protocol import codec

        return self.http.post(
            path, content=codec.pack(codec.to_wire(data)),
            headers={"Content-Type": codec.CONTENT_TYPE, **(headers or {})},
        )

    @staticmethod
    def body(response: Any) -> Any:
        """The decoded body of a response, msgpack or JSON."""
        from twinkle.protocol import codec

        if response.headers.get("content-type", "").startswith(codec.CONTENT_TYPE):
            return codec.unpack(response.content)
        return response.json()

    def create(self, kind: str, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> str:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        r = self.post("/objects", {"kind": kind, "args": list(args), "kwargs": kwargs}, headers)
        assert r.status_code == 200, (r.status_code, self.body(r))
        return self.body(r)["object_id"]

    def calls(self, object_id: str, calls: list[tuple[str, list[Any], dict[str, Any]]]) -> Any:
        batch = []
        for method, args, kwargs in calls:
            seq = self.seqs[object_id] = self.seqs.get(object_id, 0) + 1
            batch.append({"seq": seq, "method": method, "args": list(args), "kwargs": dict(kwargs)})
        return self.post(f"/objects/{object_id}/calls", {"calls": batch})

    def call(self, object_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        from twinkle.protocol import codec

        r = self.calls(object_id, [(method, list(args), kwargs)])
        assert r.status_code == 200, (r.status_code, self.body(r))
        result = self.body(r)["results"][0]
        assert result["ok"], result["error"]
        return codec.from_wire(result["value"], tensors=False)

    def get(self, path: str, **params: Any) -> Any:
        return self.http.get(path, params=params or None)

    def delete(self, path: str) -> Any:
        return self.http.delete(path)


def raw_dataloader(client: RawClient, rows: int = 32, batch_size: int = 4) -> tuple[str, str]:
    """A remote dataset of ``rows`` encoded samples and a dataloader over it."""
    from twinkle.dataset import DatasetMeta

    dataset = client.create("dataset", DatasetMeta("builtin://self-cognition", data_slice=range(rows)))
    r = client.calls(dataset, [
        ("set_template", ["Template"], {"model_id": "builtin://tiny-qwen2", "max_length": 256}),
        ("map", ["SelfCognitionProcessor"], {"init_args": {"model_name": "Twinkle", "model_author": "Lab"}}),
        ("encode", [], {}),
    ])
    assert r.status_code == 200 and all(x["ok"] for x in client.body(r)["results"]), client.body(r)
    loader = client.create("dataloader", dataset={"__ref__": dataset}, batch_size=batch_size)
    return dataset, loader


def raw_model(client: RawClient, adapter: str = "default", r: int = 4, lr: float = 1e-3) -> str:
    """A remote model object with one adapter, ready to train."""
    from peft import LoraConfig

    model = client.create("model", "builtin://tiny-qwen2")
    resp = client.calls(model, [
        ("add_adapter_to_model", [adapter, LoraConfig(r=r, target_modules="all-linear")], {}),
        ("set_processor", ["InputProcessor"], {"padding_side": "right"}),
        ("set_optimizer", ["AdamW"], {"lr": lr}),
    ])
    assert resp.status_code == 200 and all(x["ok"] for x in client.body(resp)["results"]), client.body(resp)
    return model


def train_steps(client: RawClient, model: str, loader: str, n: int) -> list[float]:
    """``n`` optimizer steps on the next ``n`` batches of a fresh epoch (``n`` <= batches per epoch)."""
    client.call(loader, "_twinkle_start_epoch", 0)
    batches = client.call(loader, "_twinkle_next", n)["batches"]
    losses = []
    for batch in batches:
        r = client.calls(model, [("forward_backward", [], {"inputs": batch}), ("clip_grad_norm", [1.0], {}),
                                 ("step", [], {}), ("zero_grad", [], {})])
        results = client.body(r)["results"]
        assert all(x["ok"] for x in results), results
        losses.append(results[0]["value"]["value"]["loss"])
    return losses


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., ServerHandle]]:
    """Factory ``start_server(data_dir, *extra_args, timeout=240.0) -> ServerHandle``."""
    handles: list[ServerHandle] = []

    def start(data_dir: str | Path, *extra_args: str, timeout: float = 240.0) -> ServerHandle:
        handle = launch_server(data_dir, *extra_args, timeout=timeout)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="session")
def add_user() -> Callable[[str | Path, str], str]:
    """``add_user(data_dir, name) -> key``."""
    return create_user


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, start_server: Callable[..., ServerHandle]) -> ServerHandle:
    """One twinkle-server for the whole session (``--max-loras 16``)."""
    return start_server(tmp_path_factory.mktemp("server-data"), "--max-loras", "16")


@pytest.fixture
def server_user(server: ServerHandle) -> tuple[str, str]:
    """A fresh user on the session server: ``(name, key)``."""
    name = f"user-{uuid.uuid4().hex[:8]}"
    return name, create_user(server.data_dir, name)


@pytest.fixture
def connect(server: ServerHandle, server_user: tuple[str, str]) -> Iterator[Any]:
    """``init_twinkle_client`` for a fresh user on the session server (the current client of
    the remote classes); the connection is dropped after the test."""
    from twinkle_client import client as client_mod
    from twinkle_client import init_twinkle_client

    client_mod._current = None
    client = init_twinkle_client(base_url=server.url, api_key=server_user[1])
    yield client
    client_mod.current_client().close()
    client_mod._current = None


@pytest.fixture(scope="session")
def raw_client() -> Iterator[Callable[[Any, str | None], RawClient]]:
    """Factory ``raw_client(server_or_api_url, key) -> RawClient``."""
    clients: list[RawClient] = []

    def make(target: Any, key: str | None) -> RawClient:
        client = RawClient(target.api if isinstance(target, ServerHandle) else str(target), key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module's tests: the tiny model's matrices are too small for
    intra-op threads, which on a busy machine only wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def raw_helpers() -> SimpleNamespace:
    """``raw_dataloader``, ``raw_model`` and ``train_steps`` (see the comment above)."""
    return SimpleNamespace(raw_dataloader=raw_dataloader, raw_model=raw_model, train_steps=train_steps)


# ------------------------------------------------------------------ test categories
# Every test has exactly one of four markers (registered in pyproject.toml, --strict-markers):
#
# - ``unit``: in the test process only: no server process, no Jupyter kernel, no browser.
# - ``server``: starts a twinkle-server process or uses one (the fixtures above).
# - ``notebook``: runs a real Jupyter kernel (jupyter_client, nbclient).
# - ``browser``: drives Chromium through Playwright.
#
# A module states its category with ``pytestmark = pytest.mark.unit`` (a module with tests of
# several categories marks each test instead). Modules that do not mark their tests yet get a
# category from TEST_CATEGORY_TABLE, keyed by file name (``test_x.py``) or by one test of a file
# (``test_x.py::test_name``, which wins over the file's entry). An entry only fills in for tests
# without a category marker of their own, so a module that adds its pytestmark can drop its
# entries here whenever convenient. Collection stops with an error listing every test that ends
# up with no category or more than one, and every ``unit`` test that asks for a server fixture.

TEST_CATEGORIES = ("unit", "server", "notebook", "browser")

TEST_CATEGORY_TABLE: dict[str, str] = {
    "test_browser_jupyter.py": "browser",
    "test_client_codec.py": "unit",
    "test_client_loopback.py": "unit",  # its HTTP servers are threads of the test process
    "test_data.py": "unit",
    "test_jupyter_history.py": "unit",
    "test_jupyter_ipython.py": "unit",  # an in-process IPython shell, not a kernel
    "test_jupyter_ipython.py::test_a_failed_connect_keeps_the_working_connection": "server",
    "test_jupyter_kernel.py": "notebook",
    "test_jupyter_kernel.py::test_browsers_page_compare_delete_and_resume": "server",  # no kernel
    "test_library_schedulers.py": "unit",
    "test_model.py": "unit",
    "test_remote_seed.py": "server",
    "test_server_training.py": "server",
}

# Fixtures that start or use a server process: a test that needs one (directly or through
# another fixture) cannot be a ``unit`` test.
SERVER_FIXTURES = frozenset({"start_server", "server", "server_user"})


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``pytest -m unit`` spreads over the machine's cores (pytest-xdist's ``-n auto``) unless
    ``-n`` was given: the quick loop stays quick on a small machine."""
    selected = (config.option.markexpr or "").strip()
    if (selected == "unit" and config.pluginmanager.hasplugin("xdist")
            and getattr(config.option, "numprocesses", None) is None and "PYTEST_XDIST_WORKER" not in os.environ):
        config.option.numprocesses = "auto"
        if getattr(config.option, "dist", "no") == "no":
            config.option.dist = "load"


_CATEGORY_MARK = re.compile(r"pytest\.mark\.(\w+)")


def _module_categories(path: Path) -> set[str]:
    """Every category a test of ``path`` can have: the table's entries for the file and the
    category markers its source names (a test's category comes from one or the other)."""
    listed = {cat for key, cat in TEST_CATEGORY_TABLE.items() if key == path.name or key.startswith(f"{path.name}::")}
    named = set(_CATEGORY_MARK.findall(path.read_text(encoding="utf-8")))
    return (listed | named) & set(TEST_CATEGORIES)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m <category>``, skip importing modules with no test of that category (``-m unit``
    then never imports what the server, kernel and browser tests need)."""
    selected = (config.option.markexpr or "").strip()
    if selected in TEST_CATEGORIES and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if selected not in _module_categories(collection_path):
            return True
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects tests by their markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        own = {m.name for m in item.iter_markers() if m.name in TEST_CATEGORIES}
        if not own:
            file_name = item.path.name
            test_name = getattr(item, "originalname", item.name)
            listed = TEST_CATEGORY_TABLE.get(f"{file_name}::{test_name}", TEST_CATEGORY_TABLE.get(file_name))
            if listed is not None:
                item.add_marker(listed)
                own = {listed}
        if len(own) != 1:
            found = ", ".join(sorted(own)) or "none"
            problems.append(f"{item.nodeid}: {found} (needs exactly one of {', '.join(TEST_CATEGORIES)})")
        elif own == {"unit"} and SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            problems.append(f"{item.nodeid}: unit, but it uses a server fixture (mark it server)")
    if problems:
        raise pytest.UsageError(
            "tests with a missing or wrong category marker (see 'test categories' in tests/conftest.py):\n  "
            + "\n  ".join(problems)
        )
