"""The distribution installs every package folder, and the server is never a bare `server`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def _package_folders() -> set[str]:
    found = set()
    for top, name in (("twinkle", "twinkle"), ("twinkle_client", "twinkle_client"),
                      ("twinkle_jupyter", "twinkle_jupyter"), ("server", "twinkle_server")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _package_folders() == listed


def test_server_imports_as_twinkle_server_only() -> None:
    spec = importlib.util.find_spec("twinkle_server")
    assert spec is not None and Path(spec.origin).parent == ROOT / "server"
    if str(ROOT) not in sys.path:
        assert importlib.util.find_spec("server") is None
