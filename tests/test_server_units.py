"""twinkle-server internals that need no server process: the fair device worker, the schema."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from twinkle_server.store import MIGRATIONS, Store
from twinkle_server.worker import DeviceWorker, WorkerStopped


def test_worker_serves_users_round_robin_and_in_order() -> None:
    worker = DeviceWorker()
    gate = threading.Event()
    order: list[str] = []
    try:
        # Hold the worker so that every later call is queued before any runs.
        blocker = worker.submit("x", gate.wait)
        futures = [worker.submit("a", lambda i=i: order.append(f"a{i}")) for i in range(4)]
        futures += [worker.submit("b", lambda i=i: order.append(f"b{i}")) for i in range(2)]
        futures += [worker.submit("c", lambda: order.append("c0"))]
        gate.set()
        blocker.result(5)
        for f in futures:
            f.result(5)
        assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
        assert worker.call("a", threading.current_thread) is worker.thread
        failing = worker.submit("a", lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(5)
        assert worker.submit("a", lambda: 42).result(5) == 42  # a failure does not stop the worker
    finally:
        worker.stop()
    with pytest.raises(WorkerStopped):
        worker.submit("a", lambda: None)


def test_schema_is_versioned(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.db")
    assert store.schema_version == len(MIGRATIONS)
    store.close()
    with sqlite3.connect(tmp_path / "t.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "training_runs", "checkpoints", "metric_points"} <= tables
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this server"):
        Store(tmp_path / "t.db")
