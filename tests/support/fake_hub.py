"""A Hugging Face hub stand-in on 127.0.0.1 that records the credentials of every request.

It answers the few routes ``huggingface_hub`` and ``datasets`` use to read a repository
(repo info, tree listing, paths-info, file resolve) and to upload a folder (create repo,
preupload, commit), from folders on disk. Every repository is private: a request is served
only with ``Authorization: Bearer <token>`` for a token listed as a reader (or writer) of that
repository; otherwise it gets the hub's 401 ``RepoNotFound``. Unknown routes get 404.

Point a process at it with ``HF_ENDPOINT=<hub.url>`` in its environment (read when
``huggingface_hub`` is imported), and leave ``HF_HUB_OFFLINE`` unset or ``0``.

Used by tests/test_hub_credentials.py; not a test module itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class Seen:
    """One request the hub received."""

    method: str
    path: str
    authorization: str | None

    @property
    def token(self) -> str | None:
        """The bearer token sent, or None."""
        if self.authorization and self.authorization.startswith("Bearer "):
            return self.authorization[len("Bearer "):]
        return self.authorization


@dataclass
class Repo:
    kind: str  # "model" or "dataset"
    repo_id: str
    folder: Path
    readers: set[str]
    writers: set[str]

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.kind}:{self.repo_id}".encode()).hexdigest()

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


class FakeHub:
    """Start with ``with FakeHub() as hub:`` (or ``start()``/``stop()``); ``hub.url`` is its
    endpoint and ``hub.seen`` the requests received, in order."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.seen: list[Seen] = []
        self.commits: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- set-up

    def add_repo(self, kind: str, repo_id: str, folder: Path, *, readers: set[str] = frozenset(),
                 writers: set[str] = frozenset()) -> Repo:
        repo = Repo(kind, repo_id, Path(folder), set(readers) | set(writers), set(writers))
        self.repos[(kind, repo_id)] = repo
        return repo

    def allow_create(self, repo_id: str, folder: Path, *, writers: set[str]) -> None:
        """Let ``writers`` create the model repository ``repo_id`` (its files land in ``folder``)."""
        self.add_repo("model", repo_id, folder, writers=writers)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _serve(self) -> None:
                with hub._lock:
                    hub.seen.append(Seen(self.command, urlsplit(self.path).path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, payload = hub._answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def tokens(self) -> set[str | None]:
        """Every distinct token received (None: a request without one)."""
        with self._lock:
            return {s.token for s in self.seen}

    # ---------------------------------------------------------------- routes

    def _answer(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        token = _bearer(headers.get("Authorization"))
        segs = [s for s in path.split("/") if s]

        if method == "POST" and segs == ["api", "repos", "create"]:
            data = json.loads(body or b"{}")
            repo_id = f"{data.get('organization') or ''}/{data.get('name')}".lstrip("/")
            kind = data.get("type") or "model"
            repo = self.repos.get((kind, repo_id))
            if repo is None or token not in repo.writers:
                return _unauthorized()
            return _json({"url": f"{self.url}/{repo_id}", "name": repo_id})

        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets"):
            kind = segs[1][:-1]
            repo = self.repos.get((kind, f"{segs[2]}/{segs[3]}"))
            if repo is None or token not in repo.readers:
                return _unauthorized()
            rest = segs[4:]
            if not rest or rest[0] == "revision":
                return _json(self._info(repo))
            if rest[0] == "tree":
                return _json(self._tree(repo, "/".join(rest[2:]), "recursive" in query))
            if rest[0] == "paths-info":
                wanted = _paths_from(body, headers)
                return _json([e for e in self._tree(repo, "", True) if e["path"] in wanted])
            if rest[0] == "preupload" and method == "POST":
                if token not in repo.writers:
                    return _unauthorized()
                files = json.loads(body or b"{}").get("files", [])
                return _json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                        for f in files], "commitOid": repo.sha})
            if rest[0] == "commit" and method == "POST":
                if token not in repo.writers:
                    return _unauthorized()
                self._commit(repo, body)
                return _json({"commitUrl": f"{self.url}/{repo.repo_id}/commit/{repo.sha}",
                              "commitOid": repo.sha, "pullRequestUrl": None})
            return _not_found("EntryNotFound")

        # file downloads: /{org}/{name}/resolve/{rev}/{path} or /datasets/{org}/{name}/resolve/...
        kind = "model"
        if segs[:1] == ["datasets"]:
            kind, segs = "dataset", segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve":
            repo = self.repos.get((kind, f"{segs[0]}/{segs[1]}"))
            if repo is None or token not in repo.readers:
                return _unauthorized()
            file = repo.folder / "/".join(segs[4:])
            if not file.is_file():
                return _not_found("EntryNotFound")
            data = file.read_bytes()
            etag = hashlib.sha1(data).hexdigest()
            meta = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream",
                    "Accept-Ranges": "bytes"}
            ranged = headers.get("Range")
            if ranged and ranged.startswith("bytes=") and method == "GET":
                start_s, _, end_s = ranged[len("bytes="):].partition("-")
                start = int(start_s or 0)
                end = int(end_s) if end_s else len(data) - 1
                chunk = data[start:end + 1]
                return 206, {**meta, "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"}, chunk
            return 200, meta, data
        return _not_found("RepoNotFound")

    def _info(self, repo: Repo) -> dict[str, Any]:
        files = [str(p.relative_to(repo.folder)) for p in repo.files()]
        return {"id": repo.repo_id, "_id": repo.sha[:24], "sha": repo.sha, "private": True, "gated": False,
                "disabled": False, "siblings": [{"rfilename": f} for f in files], "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z", "cardData": {}}

    def _tree(self, repo: Repo, under: str, recursive: bool) -> list[dict[str, Any]]:
        base = repo.folder / under if under else repo.folder
        if not base.is_dir():
            return []
        entries: list[dict[str, Any]] = []
        for p in sorted(base.rglob("*") if recursive else base.iterdir()):
            rel = str(p.relative_to(repo.folder))
            if p.is_dir():
                entries.append({"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "size": 0,
                                "path": rel})
            else:
                data = p.read_bytes()
                entries.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data),
                                "path": rel})
        return entries

    def _commit(self, repo: Repo, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with self._lock:
            self.commits.append({"repo": repo.repo_id, "lines": lines})
        for line in lines:
            if line.get("key") == "file":
                value = line["value"]
                target = repo.folder / value["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))


def _bearer(value: str | None) -> str | None:
    if value and value.startswith("Bearer "):
        return value[len("Bearer "):]
    return None


def _paths_from(body: bytes, headers: Any) -> set[str]:
    ctype = headers.get("Content-Type", "")
    if "json" in ctype:
        return set(json.loads(body or b"{}").get("paths", []))
    return set(parse_qs(body.decode()).get("paths", []))


def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _unauthorized() -> tuple[int, dict[str, str], bytes]:
    return 401, {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound",
                 "X-Error-Message": "Repository not found"}, b'{"error": "Repository not found"}'


def _not_found(code: str) -> tuple[int, dict[str, str], bytes]:
    return 404, {"Content-Type": "application/json", "X-Error-Code": code}, b'{"error": "not found"}'
