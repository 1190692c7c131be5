"""twinkle-server: the users CLI, API keys, and authentication on every route."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from twinkle.protocol import codec

pytestmark = pytest.mark.server

KEY = re.compile(r"tk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinkle_server.cli", *args], capture_output=True, text=True, timeout=120
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def db_bytes(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in data_dir.glob("twinkle.db*"))


def test_users_cli(tmp_path: Path, add_user) -> None:
    key = add_user(tmp_path, "alice")
    assert KEY.fullmatch(key), key
    second = add_user(tmp_path, "bob")
    assert second != key

    one_line_error(cli("users", "add", "alice", "--data-dir", str(tmp_path)), "already exists")
    one_line_error(cli("users", "add", "bad name!", "--data-dir", str(tmp_path)), "user name")
    one_line_error(cli("users", "revoke", "carol", "--data-dir", str(tmp_path)), "no user 'carol'")

    listing = cli("users", "list", "--data-dir", str(tmp_path))
    assert listing.returncode == 0
    assert "alice" in listing.stdout and "bob" in listing.stdout and "active" in listing.stdout
    assert "tk_" not in listing.stdout and key not in listing.stdout

    assert cli("users", "revoke", "bob", "--data-dir", str(tmp_path)).returncode == 0
    one_line_error(cli("users", "revoke", "bob", "--data-dir", str(tmp_path)), "already revoked")
    assert re.search(r"bob\s+revoked", cli("users", "list", "--data-dir", str(tmp_path)).stdout)

    # Only hashes are stored: neither key nor its secret part appears anywhere in the database files.
    raw = db_bytes(tmp_path)
    for k in (key, second):
        assert k.encode() not in raw and k.split("_", 2)[2].encode() not in raw


def test_data_dir_from_environment(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twinkle_server.cli", "users", "add", "envuser"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TWINKLE_DATA_DIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "twinkle.db").exists()


def test_health_needs_no_key(server) -> None:
    r = httpx.get(server.api + "/health", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["version"]
    assert r.headers["x-request-id"]


def _routes(server) -> list[tuple[str, str]]:
    spec = httpx.get(server.url + "/openapi.json", timeout=60).json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def test_every_route_but_health_needs_a_key(server) -> None:
    routes = _routes(server)
    assert ("GET", "/api/v1/health") in routes and len(routes) >= 12
    body = codec.pack({"calls": [{"seq": 1, "method": "__len__"}]})
    for method, path in routes:
        if path == "/api/v1/health":
            continue
        url = server.url + re.sub(r"\{[^}]+\}", "x", path)
        for headers, message in (
            ({}, "missing API key"),
            ({"Authorization": "Bearer tk_000000000000_" + "a" * 43}, "invalid API key"),
            ({"Authorization": "Bearer not-a-key"}, "invalid API key"),
            ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing API key"),
        ):
            r = httpx.request(method, url, headers={"Content-Type": "application/msgpack", **headers}, content=body, timeout=60)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            error = RawBody.error(r)
            assert error["code"] == "unauthenticated" and error["message"] == message, (method, path, error)
            assert r.headers["x-request-id"] == error["request_id"]


class RawBody:
    @staticmethod
    def error(r: httpx.Response) -> dict:
        if r.headers["content-type"].startswith(codec.CONTENT_TYPE):
            return codec.unpack(r.content)["error"]
        return r.json()["error"]


def test_key_identifies_user_and_revocation_is_immediate(server, add_user) -> None:
    name = f"rev-{uuid.uuid4().hex[:6]}"
    key = add_user(server.data_dir, name)
    headers = {"Authorization": f"Bearer {key}"}
    info = httpx.get(server.api + "/server", headers=headers, timeout=60)
    assert info.status_code == 200 and info.json()["user"] == name
    assert info.json()["base_model"] == "builtin://tiny-qwen2" and info.json()["max_loras"] == 16
    # A key with one character changed is refused.
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert httpx.get(server.api + "/server", headers={"Authorization": f"Bearer {wrong}"}, timeout=60).status_code == 401
    assert cli("users", "revoke", name, "--data-dir", str(server.data_dir)).returncode == 0
    r = httpx.get(server.api + "/server", headers=headers, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"


def test_keys_are_not_stored_in_plain_text(server, server_user: tuple[str, str]) -> None:
    _, key = server_user
    assert httpx.get(server.api + "/server", headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
    raw = db_bytes(server.data_dir)
    assert key.encode() not in raw and key.split("_", 2)[2].encode() not in raw
    # ... and never in the server's log either.
    assert key not in server.log()


@pytest.mark.parametrize("path", ["/openapi.json", "/docs"])
def test_schema_is_public(server, path: str) -> None:
    assert httpx.get(server.url + path, timeout=60).status_code == 200
