"""A user's hub access is the user's own: a server reads and writes hubs for a user with that
user's token (sent by the client from the user's environment) or anonymously, never with the
operator's ``HF_TOKEN``, ``MODELSCOPE_API_TOKEN`` or stored SDK login. Names in a
``DatasetMeta`` are names, never server paths, and errors name no server path.

The server tests point a real twinkle-server at a local fake Hugging Face hub
(tests/fake_hub.py) that records the credentials of every request; the operator's token is a
reader and writer of every fake repository, so any use of it would succeed and show. The
ModelScope plumbing is tested with stand-ins for the SDK (modelscope is not installed here).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import fake_hub

from twinkle import hub
from twinkle.errors import InvalidArgumentError, NotFoundError
from twinkle.protocol import codec
from twinkle.protocol.dataset_meta import DatasetMeta
from twinkle.protocol.wire import HUB_TOKEN_HEADERS

OPERATOR = "operator-secret"
USER_A = "user-a-token"
USER_B = "user-b-token"




@pytest.fixture(autouse=True)
def _no_client_left_current() -> Any:
    """Tests here make client connections current; none is left for other tests."""
    from twinkle_client import client as client_mod

    yield
    if client_mod._current is not None:
        client_mod._current.close()
    client_mod._current = None


# =============================================================================== DatasetMeta


@pytest.mark.unit
@pytest.mark.parametrize("name", ["/some/dir", "../x", "a/b", "..", ".hidden", "a..b", "x" * 129, "", "a b",
                                  "a\\b", "~", "train[:10]"])
def test_subset_and_split_are_plain_names(name: str) -> None:
    for field in ("subset_name", "split"):
        with pytest.raises(InvalidArgumentError, match=f"{field} .* plain name"):
            DatasetMeta("ms://org/data", **{field: name})
        with pytest.raises(InvalidArgumentError, match=f"{field} .* plain name"):
            DatasetMeta.from_dict({"dataset_id": "ms://org/data", field: name})


@pytest.mark.unit
def test_usual_subset_and_split_names_pass() -> None:
    for name in ("default", "zh-CN", "20220301.en", "all_languages", "train", "validation", "v1.0"):
        meta = DatasetMeta("hf://org/data", subset_name=name, split=name)
        assert DatasetMeta.from_dict(meta.to_dict()) == meta


@pytest.mark.unit
def test_data_slice_bounds_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="step must not be zero"):
        DatasetMeta("builtin://self-cognition", data_slice=slice(0, 10, 0))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        DatasetMeta("builtin://self-cognition", data_slice=range(0, 2**70))
    with pytest.raises(InvalidArgumentError, match="row index -1"):
        DatasetMeta("builtin://self-cognition", data_slice=[0, -1])
    with pytest.raises(InvalidArgumentError, match="printable"):
        DatasetMeta("builtin://self\x00")
    # A huge range is refused without being listed first.
    meta = DatasetMeta("builtin://self-cognition", data_slice=range(0, 2**62))
    with pytest.raises(InvalidArgumentError, match="selects row"):
        meta.select_indices(10)
    assert DatasetMeta("x", data_slice=range(8, 2, -3)).select_indices(10) == [8, 5]


# =============================================================================== no server paths


@pytest.mark.unit
def test_hide_paths_keeps_urls_and_ids() -> None:
    assert hub.hide_paths("404 for url: https://hub.test/api/models/org/x.") == "404 for url: https://hub.test/api/models/org/x."
    assert hub.hide_paths("hf://org/name and org/name, train/test") == "hf://org/name and org/name, train/test"
    assert hub.hide_paths("Permission denied: '/srv/hf/hub/.locks/x.lock'") == "Permission denied: '<path>'"
    assert hub.hide_paths("see ~/.cache/x or ./a/b") == "see <path> or <path>"


@pytest.mark.unit
def test_a_missing_subset_of_a_hub_snapshot_names_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle.dataset import loading

    snapshot = tmp_path / "snapshots" / "abc"
    (snapshot / "real").mkdir(parents=True)
    (snapshot / "real" / "train.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "outside").mkdir()
    monkeypatch.setattr(hub, "snapshot_download", lambda scheme, repo, repo_type: str(snapshot))
    assert loading.load_dataset(DatasetMeta("ms://org/data", subset_name="real"))["a"] == [1]
    for subset in ("nope", "outside"):
        with pytest.raises(NotFoundError) as info:
            loading.load_dataset(DatasetMeta("ms://org/data", subset_name=subset))
        assert str(tmp_path) not in str(info.value) and "folder" not in str(info.value)
        assert info.value.message == f"dataset 'ms://org/data' has no subset {subset!r}"
    (snapshot / "real" / "train.jsonl").write_text("")
    (snapshot / "real" / "train-0.parquet").write_text("not parquet")
    with pytest.raises(InvalidArgumentError) as bad:
        loading.load_dataset(DatasetMeta("ms://org/data", subset_name="real"))
    assert str(tmp_path) not in str(bad.value)


@pytest.mark.unit
def test_a_template_error_names_no_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle.template import Template

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(hub, "resolve_model_dir", lambda model_id: tmp_path)
    with pytest.raises(NotFoundError) as info:
        Template("hf://org/no-tokenizer")
    assert str(tmp_path) not in str(info.value) and "no usable tokenizer for 'hf://org/no-tokenizer'" in str(info.value)


# =============================================================================== Hugging Face token plumbing


@pytest.mark.unit
def test_hf_token_is_the_users_or_explicitly_none() -> None:
    assert hub.hf_token_arg() == {}  # local use: the SDK's own default
    with hub.hub_credentials(hub.HubCredentials(hf="t")):
        assert hub.hf_token_arg() == {"token": "t"}
    with hub.hub_credentials(hub.HubCredentials(ms="m")):
        assert hub.hf_token_arg() == {"token": False}  # anonymous: the SDK reads no token at all
    assert repr(hub.HubCredentials(hf="t", ms="m")) == "HubCredentials(hf=set, ms=set)"


@pytest.mark.unit
def test_a_model_the_process_resolved_is_shared_without_a_hub_request(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    calls: list[Any] = []

    def fake_download(scheme: str, repo: str, *, repo_type: str) -> str:
        calls.append((scheme, repo, hub.current_credentials()))
        return str(tmp_path / repo.replace("/", "--"))

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    monkeypatch.setattr(hub, "_SHARED_MODELS", {})
    served = hub.resolve_model_dir("ms://org/served")  # the server's base model, at start-up
    with hub.hub_credentials(hub.HubCredentials()):
        assert hub.resolve_model_dir("org/served") == served
        hub.resolve_model_dir("hf://org/other")
    assert [(s, r) for s, r, _ in calls] == [("ms", "org/served"), ("hf", "org/other")]
    assert calls[1][2] == hub.HubCredentials()


# =============================================================================== ModelScope token plumbing
# Stand-ins for the ModelScope SDK: modelscope is not installed here. They have the shapes of
# the two SDK generations: ``token=`` per call (modelscope with the modelscope_hub backend) and
# ``cookies=`` per call with ``login()`` for uploads (older modelscope).


@dataclasses.dataclass
class _HubConfig:  # modelscope_hub.config.HubConfig, reduced
    config_dir: Path = Path("/nonexistent-operator-home")
    token: str | None = None


class _FakeModelScope:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, operator_home: Path, *, new_sdk: bool) -> None:
        self.seen: list[dict[str, Any]] = []
        self.operator_home = operator_home
        ms = types.ModuleType("modelscope")
        ms_hub = types.ModuleType("modelscope.hub")
        ms_api = types.ModuleType("modelscope.hub.api")
        ms_snap = types.ModuleType("modelscope.hub.snapshot_download")
        cfg_mod = types.ModuleType("modelscope_hub.config")
        cfg_pkg = types.ModuleType("modelscope_hub")
        fake = self

        class ModelScopeConfig:
            path_credential = str(operator_home / "credentials")

        cfg_mod.HubConfig = _HubConfig
        cfg_mod._default_config = _HubConfig(config_dir=operator_home, token=OPERATOR)
        cfg_mod.set_default_config = lambda c: setattr(cfg_mod, "_default_config", c)
        cfg_pkg.config = cfg_mod

        def state(**given: Any) -> dict[str, Any]:
            config = cfg_mod._default_config
            return {**given, "env": os.environ.get(hub.MS_TOKEN_ENV), "credentials": ModelScopeConfig.path_credential,
                    "config_token": getattr(config, "token", None), "config_dir": getattr(config, "config_dir", None)}

        if new_sdk:
            def snapshot_download(model_id: str, revision: str | None = None, cookies: Any = None,
                                  token: str | None = None) -> str:
                fake.seen.append(state(call="model", repo=model_id, token=token))
                return "/cache/" + model_id

            def dataset_snapshot_download(dataset_id: str, cookies: Any = None, token: str | None = None) -> str:
                fake.seen.append(state(call="dataset", repo=dataset_id, token=token))
                return "/cache/" + dataset_id

            class HubApi:
                def __init__(self, endpoint: str | None = None, token: str | None = None, timeout: float = 0) -> None:
                    self.endpoint = "https://ms.test"

                def upload_folder(self, repo_id: str, folder_path: str, token: str | None = None) -> None:
                    fake.seen.append(state(call="upload", repo=repo_id, token=token))
        else:
            def snapshot_download(model_id: str, revision: str | None = None, cookies: Any = None) -> str:
                fake.seen.append(state(call="model", repo=model_id, cookies=cookies))
                return "/cache/" + model_id

            def dataset_snapshot_download(dataset_id: str, cookies: Any = None) -> str:
                fake.seen.append(state(call="dataset", repo=dataset_id, cookies=cookies))
                return "/cache/" + dataset_id

            class HubApi:  # upload_folder takes no token: only login() does, and it stores it
                def __init__(self, endpoint: str | None = None) -> None:
                    self.endpoint = "https://ms.test"

                def login(self, access_token: str) -> None:
                    folder = Path(ModelScopeConfig.path_credential)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / "cookies").write_text(access_token)

                def upload_folder(self, repo_id: str, folder_path: str) -> None:
                    stored = Path(ModelScopeConfig.path_credential) / "cookies"
                    fake.seen.append(state(call="upload", repo=repo_id,
                                           login=stored.read_text() if stored.exists() else None))

        ms.snapshot_download = snapshot_download
        ms_snap.dataset_snapshot_download = dataset_snapshot_download
        ms_api.HubApi = HubApi
        ms_api.ModelScopeConfig = ModelScopeConfig
        ms.hub, ms_hub.api, ms_hub.snapshot_download = ms_hub, ms_api, ms_snap
        self.config_module = cfg_mod
        self.ModelScopeConfig = ModelScopeConfig
        for name, module in (("modelscope", ms), ("modelscope.hub", ms_hub), ("modelscope.hub.api", ms_api),
                             ("modelscope.hub.snapshot_download", ms_snap), ("modelscope_hub", cfg_pkg),
                             ("modelscope_hub.config", cfg_mod)):
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def operator_ms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The operator's ModelScope token in the environment and a stored login in its home."""
    home = tmp_path / "operator-home"
    (home / "credentials").mkdir(parents=True)
    (home / "credentials" / "cookies").write_text(OPERATOR)
    monkeypatch.setenv(hub.MS_TOKEN_ENV, OPERATOR)
    return home


@pytest.mark.unit
def test_modelscope_downloads_use_the_users_token_or_none(monkeypatch: pytest.MonkeyPatch, operator_ms: Path) -> None:
    fake = _FakeModelScope(monkeypatch, operator_ms, new_sdk=True)
    with hub.hub_credentials(hub.HubCredentials(ms="user-ms", hf="user-hf")):
        hub.snapshot_download("ms", "org/model", repo_type="model")
    with hub.hub_credentials(hub.HubCredentials(hf="user-hf")):
        hub.snapshot_download("ms", "org/data", repo_type="dataset")
    hub.snapshot_download("ms", "org/local-use", repo_type="model")
    user, anonymous, local = fake.seen
    assert user["token"] == "user-ms" and user["config_token"] == "user-ms"
    assert anonymous["token"] == "" and anonymous["config_token"] == "" and anonymous["call"] == "dataset"
    for seen in (user, anonymous):
        # Neither the operator's environment nor its stored login was in reach of the SDK.
        assert seen["env"] is None
        assert not str(seen["credentials"]).startswith(str(operator_ms))
        assert not str(seen["config_dir"]).startswith(str(operator_ms))
    # Outside hub_credentials (local use) the SDK keeps its defaults; afterwards all is restored.
    assert local["token"] is None and local["env"] == OPERATOR and local["config_token"] == OPERATOR
    assert os.environ[hub.MS_TOKEN_ENV] == OPERATOR
    assert fake.ModelScopeConfig.path_credential == str(operator_ms / "credentials")
    assert fake.config_module._default_config.token == OPERATOR


@pytest.mark.unit
def test_older_modelscope_gets_the_users_cookie_or_none(monkeypatch: pytest.MonkeyPatch, operator_ms: Path) -> None:
    fake = _FakeModelScope(monkeypatch, operator_ms, new_sdk=False)
    with hub.hub_credentials(hub.HubCredentials(ms="user-ms")):
        hub.snapshot_download("ms", "org/model", repo_type="model")
    with hub.hub_credentials(hub.HubCredentials()):
        hub.snapshot_download("ms", "org/model", repo_type="model")
    user, anonymous = fake.seen
    assert {(c.name, c.value, c.domain) for c in user["cookies"]} == {("m_session_id", "user-ms", "ms.test")}
    # Not None (that would read the stored login) and nothing for a real host.
    assert anonymous["cookies"] is not None and all(c.domain == "twinkle.invalid" for c in anonymous["cookies"])
    assert user["env"] is None and anonymous["env"] is None


@pytest.mark.unit
@pytest.mark.parametrize("new_sdk", [True, False])
def test_modelscope_uploads_use_the_users_token_and_leave_no_login(monkeypatch: pytest.MonkeyPatch,
                                                                    operator_ms: Path, tmp_path: Path,
                                                                    new_sdk: bool) -> None:
    fake = _FakeModelScope(monkeypatch, operator_ms, new_sdk=new_sdk)
    with hub.hub_credentials(hub.HubCredentials(ms="user-ms")):
        hub.upload_folder(tmp_path, "ms://org/model")  # no hub_token: the user's own ModelScope token
    with hub.hub_credentials(hub.HubCredentials(ms="user-ms")):
        hub.upload_folder(tmp_path, "org/model", token="given")  # an explicit hub_token wins
    first, second = fake.seen
    if new_sdk:
        assert (first["token"], second["token"]) == ("user-ms", "given")
    else:
        assert (first["login"], second["login"]) == ("user-ms", "given")
    assert first["env"] is None and second["env"] is None
    # The operator's stored login is untouched and the users' logins are gone.
    assert (operator_ms / "credentials" / "cookies").read_text() == OPERATOR
    assert not Path(first["credentials"]).exists()
    assert fake.ModelScopeConfig.path_credential == str(operator_ms / "credentials")


@pytest.mark.unit
def test_hf_uploads_inside_credentials_never_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    import huggingface_hub

    seen: list[Any] = []

    class FakeApi:
        def create_repo(self, repo_id: str, exist_ok: bool = False, **kw: Any) -> None:
            seen.append(("create", kw.get("token", "<default>")))

        def upload_folder(self, folder_path: str, repo_id: str, **kw: Any) -> None:
            seen.append(("upload", kw.get("token", "<default>")))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", OPERATOR)
    with hub.hub_credentials(hub.HubCredentials(hf=USER_A)):
        hub.upload_folder(tmp_path, "hf://org/m")
    with hub.hub_credentials(hub.HubCredentials()):
        hub.upload_folder(tmp_path, "hf://org/m")
    hub.upload_folder(tmp_path, "hf://org/m")
    assert seen == [("create", USER_A), ("upload", USER_A), ("create", False), ("upload", False),
                    ("create", "<default>"), ("upload", "<default>")]


@pytest.mark.unit
def test_an_upload_job_runs_in_the_credentials_of_the_call_that_started_it(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    from twinkle import uploads

    ran = threading.Event()
    seen: list[Any] = []

    def fake_upload(folder: Any, hub_model_id: str, *, token: str | None, timeout: float) -> str:
        seen.append((hub.current_credentials(), token))
        ran.set()
        return hub_model_id

    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    jobs = uploads.UploadJobs()
    with hub.hub_credentials(hub.HubCredentials(hf=USER_A)):
        job = jobs.start("alice", tmp_path, "label", "hf://org/m", None)
    assert ran.wait(30)
    assert seen == [(hub.HubCredentials(hf=USER_A), None)]
    assert job.credentials is None and "user-a" not in repr(job)


# =============================================================================== the client


class _Recorder:
    """An httpx transport standing in for a server: records requests, answers object routes."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.calls: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        headers = {"content-type": codec.CONTENT_TYPE}
        if request.method == "POST" and path.endswith("/objects"):
            kind = codec.unpack(request.content)["kind"]
            return httpx.Response(200, content=codec.pack({"object_id": f"obj-{kind}", "kind": kind}), headers=headers)
        if request.method == "POST" and path.endswith("/calls"):
            batch = codec.unpack(request.content)["calls"]
            self.calls.extend(batch)
            results = [{"seq": c["seq"], "ok": True, "value": "up-1" if c["method"] == "upload_to_hub" else None}
                       for c in batch]
            return httpx.Response(200, content=codec.pack({"results": results}), headers=headers)
        if request.method == "DELETE":
            return httpx.Response(200, json={})
        return httpx.Response(200, json={"status": "ok", "version": "x"})

    def hub_headers(self, request: httpx.Request) -> dict[str, str]:
        names = {h.lower() for h in HUB_TOKEN_HEADERS.values()}
        return {k.lower(): v for k, v in request.headers.items() if k.lower() in names}


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "MODELSCOPE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return _Recorder()


@pytest.mark.unit
def test_the_client_sends_the_users_env_tokens_on_object_routes_only(recorder: _Recorder,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_client import init_twinkle_client
    from twinkle_client.dataset import Dataset

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf-user")
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-user")
    monkeypatch.setenv("MODELSCOPE_TOKEN", "twinkle-key")  # the seed keeps the server key here
    client = init_twinkle_client("http://twinkle.test", "twinkle-key", http_transport=httpx.MockTransport(recorder))
    try:
        ds = Dataset(DatasetMeta("builtin://self-cognition"))
        ds.add_dataset(DatasetMeta("builtin://self-cognition"))
        ds.flush()
        client.health_check()
        client.list_training_runs_with_cursor  # noqa: B018 - management routes carry no hub token
        expected = {HUB_TOKEN_HEADERS["hf"].lower(): "hf-user", HUB_TOKEN_HEADERS["ms"].lower(): "ms-user"}
        object_requests = [r for r in recorder.requests if "/objects" in r.url.path and r.method == "POST"]
        assert len(object_requests) == 2
        assert all(recorder.hub_headers(r) == expected for r in object_requests)
        assert all(not recorder.hub_headers(r) for r in recorder.requests if r not in object_requests)
        for shown in (repr(client), repr(client.transport.hub_tokens), repr(client.transport._http.headers)):
            assert "hf-user" not in shown and "ms-user" not in shown
        assert client.hub_token("hf") == "hf-user" and client.hub_token("ms") == "ms-user"
        ds.close()
    finally:
        client.close()


@pytest.mark.unit
def test_hub_tokens_can_be_given_or_switched_off(recorder: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle_client import TwinkleClient

    monkeypatch.setenv("HF_TOKEN", "from-env")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "second-choice")
    with TwinkleClient("http://twinkle.test", "k", http_transport=httpx.MockTransport(recorder)) as c:
        assert (c.hub_token("hf"), c.hub_token("ms")) == ("from-env", None)
    with TwinkleClient("http://twinkle.test", "k", hf_token=False, ms_token="given",
                       http_transport=httpx.MockTransport(recorder)) as c:
        assert (c.hub_token("hf"), c.hub_token("ms")) == (None, "given")
        assert c.transport.hub_tokens.headers() == {HUB_TOKEN_HEADERS["ms"]: "given"}
    with pytest.raises(InvalidArgumentError) as bad:
        TwinkleClient("http://twinkle.test", "k", hf_token="line\nbreak")
    assert "line" not in str(bad.value)


@pytest.mark.unit
def test_upload_to_hub_without_a_token_uses_the_clients_token_for_that_hub(recorder: _Recorder) -> None:
    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    client = init_twinkle_client("http://twinkle.test", "k", hf_token="hf-user", ms_token="ms-user",
                                 http_transport=httpx.MockTransport(recorder))
    try:
        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        path = "twinkle://run-1/weights/s1"
        for hub_id in ("hf://org/m", "ms://org/m", "org/m"):
            assert model.upload_to_hub(checkpoint_dir=path, hub_model_id=hub_id, async_upload=True) == "up-1"
        model.upload_to_hub(path, "hf://org/m", "explicit", True)
        model.upload_to_hub(path, "not a hub id", async_upload=True)
        sent = [c.get("kwargs", {}).get("hub_token") for c in recorder.calls if c["method"] == "upload_to_hub"]
        assert sent == ["hf-user", "ms-user", "ms-user", "explicit", None]
        model.close()
    finally:
        client.close()
    with init_twinkle_client("http://twinkle.test", "k", http_transport=httpx.MockTransport(recorder)) as bare:
        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.upload_to_hub("twinkle://run-1/weights/s1", "hf://org/m", async_upload=True)
        assert "hub_token" not in recorder.calls[-1].get("kwargs", {})  # the server says it needs one
        model.close()
        assert bare.hub_token("hf") is None


# =============================================================================== a real server and a fake hub


@pytest.fixture(scope="module")
def hub_world(tmp_path_factory: pytest.TempPathFactory, start_server: Any, add_user: Any) -> Any:
    """A fake hub whose repositories the operator's token and user A's can read and write, and
    a twinkle-server whose environment holds the operator's hub tokens and points at the hub."""
    from twinkle.builtin.tiny_model import tiny_model_dir

    root = tmp_path_factory.mktemp("hub-world")
    model = root / "private-model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        (model / name).write_bytes((tiny_model_dir() / name).read_bytes())
    data = root / "private-data"
    data.mkdir()
    row = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    (data / "train.jsonl").write_text(row * 4)
    fake = fake_hub.FakeHub().start()
    fake.add_repo("model", "org/private-model", model, readers={USER_A, OPERATOR})
    fake.add_repo("dataset", "org/private-data", data, readers={USER_A, OPERATOR})
    fake.allow_create("org/a-model", root / "uploaded", writers={USER_A, OPERATOR})
    env = {
        "HF_ENDPOINT": fake.url,
        "HF_TOKEN": OPERATOR,
        "HUGGING_FACE_HUB_TOKEN": OPERATOR,
        "MODELSCOPE_API_TOKEN": OPERATOR,
        # The requests must be made (to the fake hub), not skipped as offline...
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(root / "server-hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        # ...and none may leave this machine: anything not for loopback goes to a dead proxy.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    with pytest.MonkeyPatch.context() as mp:  # the server process inherits the environment at start
        for name, value in env.items():
            mp.setenv(name, value)
        server = start_server(root / "server-data")
    world = types.SimpleNamespace(hub=fake, server=server, root=root, a=add_user(server.data_dir, "alice"),
                                  b=add_user(server.data_dir, "bob"))
    yield world
    server.stop()
    fake.stop()
    log = server.log()
    assert OPERATOR not in log and USER_A not in log and USER_B not in log


def _tokens_since(fake: Any, mark: int) -> list[str | None]:
    return [s.token for s in fake.seen[mark:]]


@pytest.fixture
def user_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test process plays the users' notebooks: no hub token of the operator's in sight."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.server
def test_hf_datasets_and_template_models_are_read_with_the_users_token(hub_world: Any, user_env: Any) -> None:
    from twinkle_client import init_twinkle_client
    from twinkle_client.dataset import Dataset

    fake = hub_world.hub
    user_env.setenv("HF_TOKEN", USER_A)  # user A's own environment
    mark = len(fake.seen)
    with init_twinkle_client(hub_world.server.url, hub_world.a):
        ds = Dataset(DatasetMeta("hf://org/private-data"))
        ds.set_template("Template", model_id="hf://org/private-model", max_length=128)
        ds.encode()
        ds.flush()
        assert len(ds) == 4
        ds.close()
    tokens = _tokens_since(fake, mark)
    assert USER_A in tokens and set(tokens) <= {USER_A, None}, tokens
    assert {"/api/datasets/org/private-data", "/api/models/org/private-model"} <= {s.path for s in fake.seen[mark:]}

    # User B, without a token or with one of their own, is refused, although A's copies are in
    # the server's cache and the operator's token could read both repositories.
    for b_token in (False, USER_B):
        mark = len(fake.seen)
        with init_twinkle_client(hub_world.server.url, hub_world.b, hf_token=b_token):
            with pytest.raises(NotFoundError, match="hf://org/private-data not found, or your hub token"):
                Dataset(DatasetMeta("hf://org/private-data"))
            ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(4)))
            ds.set_template("Template", model_id="hf://org/private-model", max_length=128)
            with pytest.raises(NotFoundError, match="hf://org/private-model not found, or your hub token"):
                ds.flush()
            ds.close()
        tokens = _tokens_since(fake, mark)
        assert tokens and set(tokens) == {USER_B if b_token else None}, tokens


@pytest.mark.server
def test_the_seeds_upload_uses_the_users_env_token(hub_world: Any, user_env: Any) -> None:
    from peft import LoraConfig

    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    fake = hub_world.hub
    user_env.setenv("HF_TOKEN", USER_A)
    user_env.setenv("MODELSCOPE_TOKEN", hub_world.a)  # as in the seed: the twinkle key, not a hub token
    mark = len(fake.seen)
    with init_twinkle_client(base_url=hub_world.server.url, api_key=os.environ["MODELSCOPE_TOKEN"]):
        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear"), gradient_accumulation_steps=2)
        twinkle_path = model.save(name="step-0")
        # The seed's last step, unchanged but for the hub id.
        model.upload_to_hub(checkpoint_dir=twinkle_path, hub_model_id="hf://org/a-model", async_upload=False)
        model.close()
    routes = [(s.method, s.path, s.token) for s in fake.seen[mark:]]
    assert ("POST", "/api/repos/create", USER_A) in routes
    assert ("POST", "/api/models/org/a-model/commit/main", USER_A) in routes
    assert {t for _, _, t in routes} <= {USER_A, None} and hub_world.a not in {t for _, _, t in routes}
    assert (hub_world.root / "uploaded" / "adapter_config.json").exists()

    # Without a token in the user's environment the server's clear refusal stays.
    user_env.delenv("HF_TOKEN")
    mark = len(fake.seen)
    with init_twinkle_client(base_url=hub_world.server.url, api_key=hub_world.b):
        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear"))
        path = model.save(name="step-0")
        with pytest.raises(InvalidArgumentError, match="needs hub_token"):
            model.upload_to_hub(checkpoint_dir=path, hub_model_id="hf://org/a-model", async_upload=False)
        model.close()
    assert not fake.seen[mark:]


@pytest.mark.server
def test_two_users_at_once_never_share_a_token(hub_world: Any, raw_client: Any) -> None:
    fake = hub_world.hub
    users = {"a": (raw_client(hub_world.server, hub_world.a), USER_A),
             "b": (raw_client(hub_world.server, hub_world.b), USER_B)}
    start = threading.Barrier(len(users) * 3)
    outcomes: dict[str, list[int]] = {"a": [], "b": []}
    mark = len(fake.seen)

    def create(who: str) -> None:
        client, token = users[who]
        start.wait(60)
        r = client.post("/objects", {"kind": "dataset", "args": [DatasetMeta("hf://org/private-data")], "kwargs": {}},
                        {HUB_TOKEN_HEADERS["hf"]: token})
        outcomes[who].append(r.status_code)
        if r.status_code == 200:
            client.delete(f"/objects/{client.body(r)['object_id']}")

    threads = [threading.Thread(target=create, args=(who,)) for who in users for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcomes["a"] == [200] * 3 and outcomes["b"] == [404] * 3, outcomes
    tokens = set(_tokens_since(fake, mark))
    assert USER_A in tokens and USER_B in tokens and tokens <= {USER_A, USER_B, None}


@pytest.mark.server
@pytest.mark.parametrize("subset", ["/some/dir", "../x", "/"])
def test_a_subset_is_never_a_server_path(hub_world: Any, raw_client: Any, subset: str) -> None:
    client = raw_client(hub_world.server, hub_world.a)
    mark = len(hub_world.hub.seen)
    r = client.post("/objects", {"kind": "dataset", "kwargs": {},
                                 "args": [{"dataset_id": "ms://org/data", "subset_name": subset}]})
    error = client.body(r)["error"]
    assert r.status_code == 400 and error["code"] == "invalid_argument", error
    assert "plain name" in error["message"] and "exist" not in error["message"]
    assert not hub_world.hub.seen[mark:]
