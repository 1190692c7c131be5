"""Loading a dataset: the rows a ``DatasetMeta`` names, as an in-memory Hugging Face dataset.

Ids are ``builtin://<name>``, a local file or folder (``local``), ``hf://org/name`` (read with
``datasets``) or ``ms://org/name`` / a bare ``org/name`` (a ModelScope snapshot, read as a
folder). Files are read directly, never through ``datasets.load_dataset``'s cache: nothing is
written next to the user's data, and nothing is reused from an earlier run.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import hub
from ..errors import HubError, InvalidArgumentError, NotFoundError, first_line
from ..protocol.dataset_meta import DatasetMeta
from ..protocol.names import is_hub_repo, split_hub_id

if TYPE_CHECKING:
    import datasets

__all__ = ["BUILTIN_FILES", "DATA_SUFFIXES", "NOT_DATA", "load_dataset", "split_dataset_id"]

# importlib.resources names of the files behind builtin:// dataset ids
BUILTIN_FILES = {"self-cognition": "self_cognition.jsonl"}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# JSON files a hub repository keeps beside its data (ModelScope, HF dataset cards)
NOT_DATA = {
    "configuration.json",
    "dataset_infos.json",
    "dataset_info.json",
    "dataset_dict.json",
    "state.json",
}
# A file or folder name that starts with one of these names a split (``train-0000.parquet``).
_SPLIT_NAME = re.compile(r"^(train|validation|valid|dev|test)(?![a-z])")


def load_dataset(meta: DatasetMeta) -> datasets.Dataset:
    """Load the rows ``meta`` names into an in-memory Hugging Face dataset."""
    scheme, rest = split_dataset_id(meta.dataset_id)
    if scheme == "builtin":
        ds = _load_builtin(meta.dataset_id, rest)
    elif scheme == "local":
        ds = _load_local(meta, Path(rest))
    elif scheme == "hf":
        split_hub_id(meta.dataset_id, "dataset")
        ds = _load_hf(meta, rest)
    else:
        folder = Path(hub.snapshot_download("ms", rest, repo_type="dataset"))
        ds = _load_folder(meta, folder)
    indices = meta.select_indices(len(ds))
    if indices is not None:
        ds = ds.select(indices, keep_in_memory=True).flatten_indices(keep_in_memory=True)
    return ds


def split_dataset_id(dataset_id: str) -> tuple[str, str]:
    """Like ``hub.split_id``, but an id that is neither an existing path nor shaped like a hub
    id (``org/name``) is a missing local file, not a ModelScope id to try to download."""
    scheme, rest = hub.split_id(dataset_id)
    if scheme == "ms" and not dataset_id.startswith("ms://"):
        looks_local = (
            not is_hub_repo(dataset_id)
            or dataset_id.startswith((".", "~"))
            or dataset_id.lower().endswith(DATA_SUFFIXES)
        )
        if looks_local:
            raise NotFoundError(f"dataset {dataset_id!r} not found: no such file or folder")
    return scheme, rest


def _load_builtin(dataset_id: str, name: str) -> datasets.Dataset:
    if name not in BUILTIN_FILES:
        raise NotFoundError(
            f"unknown built-in dataset {dataset_id!r}; built-in: {', '.join(hub.BUILTIN_DATASETS)}"
        )
    resource = resources.files("twinkle.builtin").joinpath("data", BUILTIN_FILES[name])
    with resources.as_file(resource) as path:
        return _read_file(Path(path), dataset_id)


def _load_local(meta: DatasetMeta, path: Path) -> datasets.Dataset:
    if path.is_dir():
        return _load_folder(meta, path)
    # A single file has one table: subset and split do not apply to it.
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise InvalidArgumentError(
            f"dataset {meta.dataset_id!r}: unsupported file type {path.suffix!r}; "
            f"use {', '.join(DATA_SUFFIXES)}"
        )
    return _read_file(path, meta.dataset_id)


def _load_folder(meta: DatasetMeta, folder: Path) -> datasets.Dataset:
    """The data files of a folder (a local one or a hub snapshot), narrowed by subset and split.

    ``subset_name`` picks a sub-folder of that name. ``split`` picks the files whose name or
    folder starts with it (``train.jsonl``, ``train-0000.parquet``, ``test/x.csv``); when no
    file names a split, all files are the ``train`` split.
    """
    root = folder
    if meta.subset_name:
        # DatasetMeta allows only plain names; check again that the subset stays inside.
        root = folder / meta.subset_name
        inside = root.resolve().is_relative_to(folder.resolve())
        if not inside or not root.is_dir():
            raise NotFoundError(f"dataset {meta.dataset_id!r} has no subset {meta.subset_name!r}")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and p.name not in NOT_DATA
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        where = f" (subset {meta.subset_name!r})" if meta.subset_name else ""
        raise NotFoundError(
            f"dataset {meta.dataset_id!r} not found: no {'/'.join(DATA_SUFFIXES)} files{where}"
        )

    def split_of(p: Path) -> str | None:
        for part in p.relative_to(root).parts:
            m = _SPLIT_NAME.match(part.lower())
            if m:
                return m.group(1)
        return None

    named = {p: split_of(p) for p in files}
    if any(named.values()):
        files = [p for p in files if named[p] == meta.split.lower()]
        if not files:
            splits = sorted({s for s in named.values() if s})
            raise NotFoundError(
                f"dataset {meta.dataset_id!r} has no split {meta.split!r}; found: {', '.join(splits)}"
            )
    elif meta.split != "train":
        raise NotFoundError(
            f"dataset {meta.dataset_id!r} has no split {meta.split!r}; its files are all 'train'"
        )
    import datasets

    parts = [_read_file(p, meta.dataset_id) for p in files]
    try:
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except ValueError as exc:
        raise InvalidArgumentError(
            f"dataset {meta.dataset_id!r}: its files have different columns ({hub.hide_paths(first_line(exc))})"
        ) from None


def _read_file(path: Path, dataset_id: str) -> datasets.Dataset:
    """One data file as an in-memory dataset (read directly: ``datasets.load_dataset`` would
    write an Arrow cache)."""
    import datasets

    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows = _read_json_rows(path)
            return datasets.Dataset.from_list(rows)
        if suffix == ".csv":
            import pyarrow.csv

            return datasets.Dataset(pyarrow.csv.read_csv(path))
        import pyarrow.parquet

        return datasets.Dataset(pyarrow.parquet.read_table(path))
    except InvalidArgumentError:
        raise
    except Exception as exc:  # pyarrow/json raise many types for a malformed file
        raise InvalidArgumentError(
            f"dataset {dataset_id!r}: cannot read {path.name} ({hub.hide_paths(first_line(exc))})"
        ) from None


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path.name} line {lineno} is not JSON ({exc.msg})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise InvalidArgumentError(f"{path.name} must hold JSON objects, one per row")
    return rows


def _load_hf(meta: DatasetMeta, name: str) -> datasets.Dataset:
    """An ``hf://`` dataset through ``datasets``; inside ``hub.hub_credentials`` with the
    user's token or anonymously, after the hub confirmed the user may read it (``datasets``
    would otherwise fall back to a copy cached for someone else)."""
    import datasets

    revision = hub.hf_check_access(name, repo_type="dataset")
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        ds = datasets.load_dataset(
            name, meta.subset_name, split=meta.split, keep_in_memory=True, **kwargs, **hub.hf_token_arg()
        )
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise NotFoundError(f"dataset hf://{name} not found ({hub.hide_paths(first_line(exc))})") from None
    except Exception as exc:  # network, auth, bad subset/split: one line for the user
        raise HubError(f"could not load hf://{name} ({hub.hide_paths(first_line(exc))})") from exc
    return ds
