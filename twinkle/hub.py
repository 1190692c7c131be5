"""Resolving ids: ``builtin://``, ``ms://`` (ModelScope), ``hf://`` (Hugging Face), local paths.

A bare ``org/name`` that is not a local path means ModelScope, as upstream. Hub SDKs are
imported only when a hub id is used, so offline work never touches them.

Whose hub account
-----------------
Outside ``hub_credentials`` (plain local use) every hub call keeps the SDKs' own defaults:
the user's ``HF_TOKEN``, ``MODELSCOPE_API_TOKEN`` or stored login.

Inside ``hub_credentials(creds)`` (a server runs each user's work in one) a hub call uses
exactly that user's token for that hub, or none at all, and never the process's environment
or an SDK's stored login, which belong to the operator:

- Hugging Face: every SDK call gets ``token=<the user's>`` or ``token=False`` (anonymous).
  The hub must also confirm the user's access (``repo_info`` with their token) before a
  download: ``huggingface_hub`` and ``datasets`` otherwise fall back to the local cache when
  the hub refuses, which would hand one user what another (or the operator) downloaded.
- ModelScope: the SDK takes ``token=`` per call (modelscope with the ``modelscope_hub``
  backend) or ``cookies=`` (older versions), but falls back to ``MODELSCOPE_API_TOKEN`` and
  the stored login when given none, and older versions only upload through ``login()``,
  which stores the token. So ModelScope calls for a user run one at a time
  (``_MS_LOCK``) in ``_ms_isolated``: the process's ModelScope token is hidden from the
  environment and the SDK's credential store points at an empty private folder for the
  duration (a login made inside lands there and is discarded), then both are restored.
- A model the process resolved outside any user's credentials (the server's own base model)
  is open to every user: whoever may train on it may use its tokenizer.

Tokens are never logged or stored; ``HubCredentials`` does not show them in its repr.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HubError, NotFoundError, TwinkleError, first_line
from .protocol.names import split_hub_id

BUILTIN_MODELS = ("builtin://tiny-qwen2",)
BUILTIN_DATASETS = ("builtin://self-cognition",)
MS_TOKEN_ENV = "MODELSCOPE_API_TOKEN"
"""The environment variable the ModelScope SDK reads its token from."""

_MS_LOCK = threading.Lock()
_SHARED_MODELS: dict[str, Path] = {}
"""Model folders resolved outside any user's credentials (canonical id -> folder)."""
_SHARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class HubCredentials:
    """The hub tokens of the user a piece of work is done for; None means anonymous."""

    hf: str | None = None
    ms: str | None = None

    def for_scheme(self, scheme: str) -> str | None:
        return self.hf if scheme == "hf" else self.ms

    def __repr__(self) -> str:  # never show a token (logs, tracebacks)
        return f"HubCredentials(hf={'set' if self.hf else None}, ms={'set' if self.ms else None})"


_CREDENTIALS: ContextVar[HubCredentials | None] = ContextVar("twinkle_hub_credentials", default=None)


@contextmanager
def hub_credentials(credentials: HubCredentials) -> Iterator[None]:
    """Within the block, every hub read and write uses exactly ``credentials`` (a missing token
    means anonymous), never the process's environment or an SDK login. A server runs each
    user's work inside it; outside it, local use keeps the hub SDKs' own defaults."""
    reset = _CREDENTIALS.set(credentials)
    try:
        yield
    finally:
        _CREDENTIALS.reset(reset)


def current_credentials() -> HubCredentials | None:
    """The credentials of the work running now (None outside ``hub_credentials``)."""
    return _CREDENTIALS.get()


def hf_token_arg() -> dict[str, Any]:
    """The ``token`` keyword for a ``huggingface_hub``/``datasets``/``transformers`` call made
    now: ``{}`` outside ``hub_credentials`` (the SDK's default), else the user's token or
    ``False`` (anonymous, explicitly: the SDK then reads no token from anywhere)."""
    creds = current_credentials()
    if creds is None:
        return {}
    return {"token": creds.hf or False}


# A path as the SDKs quote them: absolute, not part of a URL or of an ``org/name`` id.
_LOCAL_PATH = re.compile(r"(?<![\w:/.~>-])(?:~|\.{1,2})?/(?:[^\s'\"/,;:()\[\]<>]+/?)+")


def hide_paths(text: str) -> str:
    """``text`` with every file path replaced by ``<path>``: a reason quoted from a hub SDK
    (a cache folder, a lock file) names this machine's files, which a remote user must not
    learn. URLs and ``org/name`` ids are kept."""
    return _LOCAL_PATH.sub("<path>", text)


def split_id(resource_id: str) -> tuple[str, str]:
    """``'ms://Qwen/X'`` → ``('ms', 'Qwen/X')``; a local path → ``('local', path)``."""
    if not isinstance(resource_id, str) or not resource_id.strip():
        raise NotFoundError(f"an id must be a non-empty string, got {resource_id!r}")
    for scheme in ("builtin", "ms", "hf"):
        prefix = f"{scheme}://"
        if resource_id.startswith(prefix):
            return scheme, resource_id[len(prefix):]
    if os.path.exists(os.path.expanduser(resource_id)):
        return "local", os.path.expanduser(resource_id)
    if "://" in resource_id:
        raise NotFoundError(f"unknown id scheme in {resource_id!r}; use builtin://, ms://, hf:// or a local path")
    return "ms", resource_id


def canonical_model_id(model_id: str) -> str:
    """The one spelling of a model id used to compare ids (``Qwen/X`` and ``ms://Qwen/X`` match)."""
    scheme, rest = split_id(model_id)
    if scheme == "local":
        return str(Path(rest).resolve())
    return f"{scheme}://{rest}"


def resolve_model_dir(model_id: str) -> Path:
    """A local folder with the model's config, weights and tokenizer for ``model_id``."""
    scheme, rest = split_id(model_id)
    if scheme == "builtin":
        if f"builtin://{rest}" not in BUILTIN_MODELS:
            raise NotFoundError(f"unknown built-in model {model_id!r}; built-in: {', '.join(BUILTIN_MODELS)}")
        from .builtin.tiny_model import tiny_model_dir

        return tiny_model_dir()
    if scheme == "local":
        path = Path(rest)
        if not (path / "config.json").exists():
            raise NotFoundError(f"{model_id!r} is not a model folder (no config.json)")
        return path
    key = f"{scheme}://{rest}"
    if current_credentials() is not None:
        with _SHARED_LOCK:
            shared = _SHARED_MODELS.get(key)
        if shared is not None:
            return shared
        return Path(snapshot_download(scheme, rest, repo_type="model"))
    folder = Path(snapshot_download(scheme, rest, repo_type="model"))
    with _SHARED_LOCK:
        _SHARED_MODELS[key] = folder
    return folder


def snapshot_download(scheme: str, repo_id: str, *, repo_type: str) -> str:
    """Download (or reuse the local cache of) a hub repository, with a clear offline error.

    Inside ``hub_credentials`` it is done with the user's token for that hub or anonymously
    (see the module's docs)."""
    split_hub_id(f"{scheme}://{repo_id}")
    try:
        if scheme == "ms":
            from modelscope import snapshot_download as ms_download

            fn: Callable[..., str] = ms_download
            if repo_type == "dataset":
                from modelscope.hub.snapshot_download import dataset_snapshot_download

                fn = dataset_snapshot_download
            return ms_call(fn, repo_id)
        from huggingface_hub import snapshot_download as hf_download

        revision = hf_check_access(repo_id, repo_type=repo_type)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        return hf_download(repo_id, repo_type=repo_type, **kwargs, **hf_token_arg())
    except ImportError as exc:
        sdk = "modelscope" if scheme == "ms" else "huggingface_hub"
        raise HubError(f"{scheme}://{repo_id} needs the {sdk} package: pip install 'twinkle-notebook[hub]'") from exc
    except TwinkleError:
        raise
    except Exception as exc:  # the SDKs raise many types for "not there" and "no network"
        reason = hide_paths(first_line(exc))
        raise HubError(
            f"could not fetch {scheme}://{repo_id} ({reason}); offline, use builtin:// ids or a local path"
        ) from exc


def hf_check_access(repo_id: str, *, repo_type: str) -> str | None:
    """Inside ``hub_credentials``: ask the hub, with the user's token or none, whether the user
    may read ``repo_id``, and return the commit to read (None outside: the SDK decides).

    ``huggingface_hub`` and ``datasets`` read a cached copy when the hub refuses a request
    (a private repository, a missing token) or cannot be reached, so without this check one
    user would get what another user, or the operator, downloaded before. A refusal or an
    unreachable hub therefore ends the request here."""
    if current_credentials() is None:
        return None
    from huggingface_hub import HfApi

    scheme_id = f"hf://{repo_id}"
    what = "dataset" if repo_type == "dataset" else "model"
    try:
        info = HfApi().repo_info(repo_id, repo_type=repo_type, **hf_token_arg())
    except Exception as exc:
        reason = hide_paths(first_line(exc))
        if _http_status(exc) in (401, 403, 404) or type(exc).__name__ in (
            "RepositoryNotFoundError", "GatedRepoError",
        ):
            raise NotFoundError(
                f"{what} {scheme_id} not found, or your hub token may not read it ({reason})"
            ) from None
        raise HubError(f"could not reach the hub for {scheme_id} ({reason})") from None
    return getattr(info, "sha", None) or None


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


# ----------------------------------------------------------------------------- ModelScope


def ms_auth_kwargs(fn: Callable[..., Any], token: str | None) -> dict[str, Any]:
    """The keywords that make the ModelScope SDK function ``fn`` use exactly ``token`` (None:
    anonymous) instead of its own defaults.

    modelscope with the ``modelscope_hub`` backend takes ``token=`` (an empty string means
    none); older versions take ``cookies=``, where None would mean the stored login, so an
    anonymous call gets a jar that holds no cookie for any real host (an empty jar may read as
    "none given" in some versions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "token" in params:
        return {"token": token or ""}
    if "cookies" in params:
        from requests.cookies import RequestsCookieJar

        jar = RequestsCookieJar()
        if token:
            jar.set("m_session_id", token, domain=_ms_domain(), path="/")
        else:
            jar.set("twinkle_anonymous", "1", domain="twinkle.invalid", path="/")
        return {"cookies": jar}
    raise HubError("this modelscope version cannot take a user's token per call; upgrade modelscope")


def _ms_domain() -> str:
    from urllib.parse import urlparse

    try:
        from modelscope.hub.api import HubApi

        endpoint = getattr(HubApi(), "endpoint", None)
    except Exception:  # an SDK without it: the public hub
        endpoint = None
    return urlparse(endpoint).netloc if endpoint else "www.modelscope.cn"


@contextmanager
def _ms_isolated(token: str | None) -> Iterator[None]:
    """Run a ModelScope SDK call for a user: alone (``_MS_LOCK``), with the process's own
    ModelScope token hidden from the environment and the SDK's credential store pointed at an
    empty private folder, so that the SDK cannot fall back to the operator's credentials and a
    login made inside is discarded. Everything is restored afterwards."""
    with _MS_LOCK:
        saved_env = os.environ.pop(MS_TOKEN_ENV, None)
        private = tempfile.mkdtemp(prefix="twinkle-ms-")
        restore: list[Callable[[], None]] = []
        try:
            try:
                from modelscope.hub.api import ModelScopeConfig

                old_path = ModelScopeConfig.path_credential
                ModelScopeConfig.path_credential = os.path.join(private, "credentials")
                restore.append(lambda: setattr(ModelScopeConfig, "path_credential", old_path))
            except (ImportError, AttributeError):
                pass
            try:
                import dataclasses

                from modelscope_hub import config as ms_config

                old_config = ms_config._default_config
                base = old_config or ms_config.HubConfig()
                ms_config.set_default_config(
                    dataclasses.replace(base, config_dir=Path(private), token=token or "")
                )
                restore.append(lambda: ms_config.set_default_config(old_config))
            except (ImportError, AttributeError, TypeError):
                pass
            yield
        finally:
            for undo in reversed(restore):
                undo()
            if saved_env is not None:
                os.environ[MS_TOKEN_ENV] = saved_env
            shutil.rmtree(private, ignore_errors=True)


def ms_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a ModelScope SDK function: inside ``hub_credentials`` with the user's ModelScope
    token or anonymously, isolated from the process's own ModelScope credentials; outside,
    as it is."""
    creds = current_credentials()
    if creds is None:
        return fn(*args, **kwargs)
    with _ms_isolated(creds.ms):
        return fn(*args, **kwargs, **ms_auth_kwargs(fn, creds.ms))


# ----------------------------------------------------------------------------- uploads


def upload_folder(folder: str | os.PathLike[str], hub_model_id: str, *, token: str | None = None,
                  timeout: float = 30.0) -> str:
    """Upload ``folder`` as a model repository; returns the repository id.

    ``hf://org/name`` goes to Hugging Face, ``ms://org/name`` or a bare ``org/name`` to
    ModelScope. ``token`` is used when given; otherwise, inside ``hub_credentials``, the
    user's token for that hub (or none: the hub refuses), and outside it the SDK's default.
    Network failures surface as ``HubError`` within about ``timeout`` seconds.
    """
    scheme, repo_id = split_hub_id(hub_model_id, "hub_model_id")
    creds = current_credentials()
    if creds is not None and not token:
        token = creds.for_scheme(scheme)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    try:
        if scheme == "hf":
            from huggingface_hub import HfApi

            hf_token: dict[str, Any] = {"token": token} if token else hf_token_arg()
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True, **hf_token)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, **hf_token)
        else:
            _ms_upload(folder, repo_id, token, timeout, isolated=creds is not None)
    except ImportError as exc:
        sdk = "modelscope" if scheme == "ms" else "huggingface_hub"
        raise HubError(f"uploading to {scheme}:// needs the {sdk} package: pip install 'twinkle-notebook[hub]'") from exc
    except Exception as exc:
        reason = hide_paths(first_line(exc))
        raise HubError(f"upload of {folder} to {hub_model_id} failed: {reason}") from exc
    return repo_id


def _ms_upload(folder: str | os.PathLike[str], repo_id: str, token: str | None, timeout: float, *,
               isolated: bool) -> None:
    from modelscope.hub.api import HubApi

    def upload() -> None:
        api = HubApi(timeout=timeout) if "timeout" in _params(HubApi) else HubApi()
        if "token" in _params(api.upload_folder):
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token)
            return
        # Older SDKs only take a token through login(), which stores it: inside _ms_isolated
        # it is stored in a private folder that is discarded afterwards.
        if token:
            api.login(token)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))

    if isolated or token:
        with _ms_isolated(token):
            upload()
    else:
        upload()


def _params(fn: Callable[..., Any]) -> Any:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
