"""Resolving ids: ``builtin://``, ``ms://`` (ModelScope), ``hf://`` (Hugging Face), local paths.

A bare ``org/name`` that is not a local path means ModelScope, as upstream. Hub SDKs are
imported only when a hub id is used, so offline work never touches them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError, NotFoundError, first_line
from .protocol.names import split_hub_id

BUILTIN_MODELS = ("builtin://tiny-qwen2",)
_MS_LOGIN_LOCK = threading.Lock()
BUILTIN_DATASETS = ("builtin://self-cognition",)


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
    return Path(snapshot_download(scheme, rest, repo_type="model"))


def snapshot_download(scheme: str, repo_id: str, *, repo_type: str) -> str:
    """Download (or reuse the local cache of) a hub repository, with a clear offline error."""
    split_hub_id(f"{scheme}://{repo_id}")
    try:
        if scheme == "ms":
            from modelscope import snapshot_download as ms_download

            if repo_type == "dataset":
                from modelscope.hub.snapshot_download import dataset_snapshot_download

                return dataset_snapshot_download(repo_id)
            return ms_download(repo_id)
        from huggingface_hub import snapshot_download as hf_download

        return hf_download(repo_id, repo_type=repo_type)
    except ImportError as exc:
        sdk = "modelscope" if scheme == "ms" else "huggingface_hub"
        raise HubError(f"{scheme}://{repo_id} needs the {sdk} package: pip install 'twinkle-notebook[hub]'") from exc
    except Exception as exc:  # the SDKs raise many types for "not there" and "no network"
        reason = first_line(exc)
        raise HubError(
            f"could not fetch {scheme}://{repo_id} ({reason}); offline, use builtin:// ids or a local path"
        ) from exc


def upload_folder(folder: str | os.PathLike[str], hub_model_id: str, *, token: str | None = None,
                  timeout: float = 30.0) -> str:
    """Upload ``folder`` as a model repository; returns the repository id.

    ``hf://org/name`` goes to Hugging Face, ``ms://org/name`` or a bare ``org/name`` to
    ModelScope. Network failures surface as ``HubError`` within about ``timeout`` seconds.
    """
    scheme, repo_id = split_hub_id(hub_model_id, "hub_model_id")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    try:
        if scheme == "hf":
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        else:
            import inspect

            from modelscope.hub.api import HubApi

            api = HubApi(timeout=timeout)
            if "token" in inspect.signature(api.upload_folder).parameters:
                api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token)
            else:
                # Older SDKs only take a token through login(), which is process-wide state:
                # one upload at a time, so no upload runs under another caller's login.
                with _MS_LOGIN_LOCK:
                    if token:
                        api.login(token)
                    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    except ImportError as exc:
        sdk = "modelscope" if scheme == "ms" else "huggingface_hub"
        raise HubError(f"uploading to {scheme}:// needs the {sdk} package: pip install 'twinkle-notebook[hub]'") from exc
    except Exception as exc:
        reason = first_line(exc)
        raise HubError(f"upload of {folder} to {hub_model_id} failed: {reason}") from exc
    return repo_id
