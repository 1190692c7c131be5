"""The server's SQLite database: users, training runs, checkpoints and metric points.

One file in the data directory, WAL mode, one connection guarded by a lock (the device
worker writes metrics while HTTP threads read). The schema is versioned with
``PRAGMA user_version`` and upgraded by the ordered ``MIGRATIONS``. Remote objects are
live state and are never stored here.

This module imports neither torch nor the model code, so ``twinkle-server users ...``
starts fast.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinkle.errors import InvalidArgumentError, NotFoundError
from twinkle.protocol.names import twinkle_path

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        key_id TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL,
        created REAL NOT NULL,
        revoked REAL
    );
    CREATE TABLE training_runs (
        run_id TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id),
        base_model TEXT NOT NULL,
        adapter_name TEXT NOT NULL,
        lora_rank INTEGER,
        lora_config TEXT NOT NULL DEFAULT '{}',
        gradient_accumulation_steps INTEGER NOT NULL DEFAULT 1,
        components TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        last_request_time REAL,
        cur_step INTEGER NOT NULL DEFAULT 0,
        consumed_train_samples INTEGER NOT NULL DEFAULT 0,
        last_loss REAL,
        status TEXT NOT NULL DEFAULT 'detached',
        revision INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER
    );
    CREATE INDEX training_runs_by_user ON training_runs(user_id);
    CREATE TABLE checkpoints (
        run_id TEXT NOT NULL REFERENCES training_runs(run_id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        time REAL NOT NULL,
        size_bytes INTEGER NOT NULL,
        step INTEGER NOT NULL,
        consumed_train_samples INTEGER NOT NULL DEFAULT 0,
        loss REAL,
        has_optimizer INTEGER NOT NULL,
        base_model TEXT NOT NULL,
        lora_rank INTEGER,
        PRIMARY KEY (run_id, name)
    );
    CREATE TABLE metric_points (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES training_runs(run_id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        micro_step INTEGER NOT NULL,
        loss REAL,
        num_tokens INTEGER NOT NULL,
        grad_norm REAL,
        lr REAL,
        completed INTEGER NOT NULL DEFAULT 0,
        time REAL NOT NULL,
        superseded INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX metric_points_by_run ON metric_points(run_id, step);
    """,
    # 2: eval points (forward_only batches with labels), beside the training points.
    """
    CREATE TABLE eval_points (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES training_runs(run_id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        loss REAL,
        num_tokens INTEGER NOT NULL,
        time REAL NOT NULL,
        superseded INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX eval_points_by_run ON eval_points(run_id, step);
    """,
    # 3: what a run was: the user's name, tags and dataset id for it, and its micro-batch rows.
    """
    ALTER TABLE training_runs ADD COLUMN name TEXT;
    ALTER TABLE training_runs ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE training_runs ADD COLUMN dataset TEXT;
    ALTER TABLE training_runs ADD COLUMN batch_size INTEGER;
    """,
]


@dataclass(frozen=True)
class User:
    """A user as the server sees it; the key itself is never kept."""

    id: int
    name: str
    created: float
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class CheckpointRow:
    """A checkpoint's row plus its owner, for resolving ``twinkle://`` paths."""

    run_id: str
    name: str
    user_id: int
    step: int
    has_optimizer: bool


@dataclass(frozen=True)
class RunRecord:
    """A training run as stored (times are unix seconds; JSON columns decoded)."""

    run_id: str
    owner_name: str
    base_model: str
    adapter_name: str
    lora_rank: int | None
    lora_config: dict[str, Any]
    gradient_accumulation_steps: int
    components: dict[str, Any]
    created: float
    last_request_time: float | None
    cur_step: int
    consumed_train_samples: int
    last_loss: float | None
    num_checkpoints: int
    last_checkpoint_name: str | None
    status: str
    revision: int
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    dataset: str | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint as stored."""

    run_id: str
    name: str
    time: float
    size_bytes: int
    step: int
    consumed_train_samples: int
    loss: float | None
    has_optimizer: bool
    base_model: str
    lora_rank: int | None


@dataclass(frozen=True)
class PointRecord:
    """A metric point as stored (see ``twinkle.protocol.wire.MetricPoint`` for the meaning)."""

    step: int
    micro_step: int
    loss: float | None
    num_tokens: int
    grad_norm: float | None
    lr: float | None
    completed: bool
    time: float
    superseded: bool


@dataclass(frozen=True)
class EvalPointRecord:
    """An eval point as stored (see ``twinkle.protocol.wire.EvalPoint`` for the meaning)."""

    step: int
    loss: float | None
    num_tokens: int
    time: float
    superseded: bool


def _finite(value: float | None) -> float | None:
    """A metric as stored: NaN and infinities become NULL (SQLite would store NaN as NULL
    anyway, and JSON has no infinity), so a diverged run is recorded instead of failing."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json(value: Any) -> str:
    # default=str: a component kwarg of an unusual type is recorded readably instead of failing the call
    return json.dumps(value, default=str, sort_keys=True)


class Store:
    """All persistent state. Every public method is atomic and thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: transactions are explicit (``_tx``), nothing is left open by accident.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this server knows ({len(MIGRATIONS)}); "
                "upgrade twinkle-server"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            # One script and its version bump commit together, so a crash never leaves half a migration.
            with self._lock:
                self._db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    # ---------------------------------------------------------------------- users

    def add_user(self, name: str, key_id: str, key_hash: str) -> User:
        """Insert a user; a taken name is an ``InvalidArgumentError``."""
        now = time.time()
        try:
            with self._tx() as db:
                cur = db.execute(
                    "INSERT INTO users (name, key_id, key_hash, created) VALUES (?, ?, ?, ?)",
                    (name, key_id, key_hash, now),
                )
        except sqlite3.IntegrityError:
            raise InvalidArgumentError(f"user {name!r} already exists") from None
        return User(id=int(cur.lastrowid or 0), name=name, created=now)

    def users(self) -> list[User]:
        rows = self._query("SELECT id, name, created, revoked FROM users ORDER BY name")
        return [User(r["id"], r["name"], r["created"], r["revoked"]) for r in rows]

    def user_by_name(self, name: str) -> User:
        rows = self._query("SELECT id, name, created, revoked FROM users WHERE name = ?", (name,))
        if not rows:
            raise NotFoundError(f"no user {name!r}")
        r = rows[0]
        return User(r["id"], r["name"], r["created"], r["revoked"])

    def key_record(self, key_id: str) -> tuple[User, str] | None:
        """The user owning ``key_id`` and the stored key hash, or None."""
        rows = self._query("SELECT id, name, created, revoked, key_hash FROM users WHERE key_id = ?", (key_id,))
        if not rows:
            return None
        r = rows[0]
        return User(r["id"], r["name"], r["created"], r["revoked"]), r["key_hash"]

    def revoke_user(self, name: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT revoked FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFoundError(f"no user {name!r}")
            if row["revoked"] is not None:
                raise InvalidArgumentError(f"user {name!r} is already revoked")
            db.execute("UPDATE users SET revoked = ? WHERE name = ?", (time.time(), name))

    # ----------------------------------------------------------------------- runs

    def create_run(
        self,
        run_id: str,
        user_id: int,
        *,
        base_model: str,
        adapter_name: str,
        lora_rank: int | None,
        lora_config: dict[str, Any],
        gradient_accumulation_steps: int,
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO training_runs (run_id, user_id, base_model, adapter_name, lora_rank, lora_config,"
                " gradient_accumulation_steps, created, last_request_time, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'active')",
                (run_id, user_id, base_model, adapter_name, lora_rank, _json(lora_config),
                 gradient_accumulation_steps, now, now),
            )

    _RUN_SELECT = """
        SELECT r.*, u.name AS owner_name,
               (SELECT COUNT(*) FROM checkpoints c WHERE c.run_id = r.run_id) AS num_checkpoints,
               (SELECT c.name FROM checkpoints c WHERE c.run_id = r.run_id
                 ORDER BY c.time DESC, c.step DESC LIMIT 1) AS last_checkpoint_name
        FROM training_runs r JOIN users u ON u.id = r.user_id
    """

    @staticmethod
    def _run(row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"],
            owner_name=row["owner_name"],
            base_model=row["base_model"],
            adapter_name=row["adapter_name"],
            lora_rank=row["lora_rank"],
            lora_config=json.loads(row["lora_config"]),
            gradient_accumulation_steps=row["gradient_accumulation_steps"],
            components=json.loads(row["components"]),
            created=row["created"],
            last_request_time=row["last_request_time"],
            cur_step=row["cur_step"],
            consumed_train_samples=row["consumed_train_samples"],
            last_loss=row["last_loss"],
            num_checkpoints=row["num_checkpoints"],
            last_checkpoint_name=row["last_checkpoint_name"],
            status=row["status"],
            revision=row["revision"],
            name=row["name"],
            tags=json.loads(row["tags"]),
            dataset=row["dataset"],
            batch_size=row["batch_size"],
        )

    def get_run(self, user_id: int, run_id: str) -> RunRecord:
        """The run, if ``user_id`` owns it; otherwise ``NotFoundError`` (never reveals other users' runs)."""
        rows = self._query(self._RUN_SELECT + " WHERE r.run_id = ? AND r.user_id = ?", (run_id, user_id))
        if not rows:
            raise NotFoundError(f"no training run {run_id!r}")
        return self._run(rows[0])

    def list_runs(
        self, user_id: int, limit: int, offset: int, *, name: str | None = None, tags: list[str] | None = None
    ) -> tuple[list[RunRecord], int]:
        """The user's runs, most recent activity first, and their total count. ``name``: only
        runs whose name contains it (any case); ``tags``: only runs carrying every one of them."""
        where, params = ["r.user_id = ?"], [user_id]
        if name:
            # instr, not LIKE: '%' and '_' in what the user typed match themselves.
            where.append("instr(lower(COALESCE(r.name, '')), lower(?)) > 0")
            params.append(name)
        for tag in tags or ():
            where.append("EXISTS (SELECT 1 FROM json_each(r.tags) t WHERE t.value = ?)")
            params.append(tag)
        clause = " WHERE " + " AND ".join(where)
        total = int(self._query("SELECT COUNT(*) FROM training_runs r" + clause, tuple(params))[0][0])
        rows = self._query(
            self._RUN_SELECT + clause
            + " ORDER BY COALESCE(r.last_request_time, r.created) DESC, r.created DESC, r.run_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [self._run(r) for r in rows], total

    def describe_run(
        self, user_id: int, run_id: str, *, name: str | None = None, tags: list[str] | None = None,
        dataset: str | None = None,
    ) -> RunRecord:
        """Set the user's description of their run (None: leave a field; ``''`` clears a name or
        dataset) and return the run; ``NotFoundError`` for a run that is not theirs. The values
        are checked by the caller (``twinkle.protocol.names``)."""
        sets, params = [], []
        for column, value in (("name", name), ("dataset", dataset)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value or None)
        if tags is not None:
            sets.append("tags = ?")
            params.append(json.dumps(tags))
        if sets:
            with self._tx() as db:
                changed = db.execute(
                    f"UPDATE training_runs SET {', '.join(sets)} WHERE run_id = ? AND user_id = ?",
                    (*params, run_id, user_id),
                ).rowcount
            if not changed:
                raise NotFoundError(f"no training run {run_id!r}")
        return self.get_run(user_id, run_id)

    def note_batch_size(self, run_id: str, rows: int) -> None:
        """A micro-batch of ``rows`` rows trained the run: keep the largest seen (a smaller last
        batch of an epoch does not change what the run's batch size was)."""
        with self._tx() as db:
            db.execute(
                "UPDATE training_runs SET batch_size = ? WHERE run_id = ? AND COALESCE(batch_size, 0) < ?",
                (rows, run_id, rows),
            )

    def run_ids(self) -> set[str]:
        return {r[0] for r in self._query("SELECT run_id FROM training_runs")}

    def update_run_progress(
        self,
        run_id: str,
        *,
        cur_step: int,
        consumed_train_samples: int,
        last_loss: float | None,
        gradient_accumulation_steps: int | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE training_runs SET cur_step = ?, consumed_train_samples = ?, last_loss = ?,"
                " last_request_time = ?,"
                " gradient_accumulation_steps = COALESCE(?, gradient_accumulation_steps) WHERE run_id = ?",
                (cur_step, consumed_train_samples, _finite(last_loss), time.time(), gradient_accumulation_steps,
                 run_id),
            )

    def set_component(self, run_id: str, kind: str, spec: dict[str, Any] | None) -> None:
        """Record how one component was set (``None`` removes it, e.g. a scheduler reset by a new optimizer)."""
        with self._tx() as db:
            row = db.execute("SELECT components FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return
            components = json.loads(row["components"])
            if spec is None:
                components.pop(kind, None)
            else:
                components[kind] = spec
            db.execute(
                "UPDATE training_runs SET components = ?, last_request_time = ? WHERE run_id = ?",
                (_json(components), time.time(), run_id),
            )

    def components(self, run_id: str) -> dict[str, Any]:
        rows = self._query("SELECT components FROM training_runs WHERE run_id = ?", (run_id,))
        return json.loads(rows[0][0]) if rows else {}

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE training_runs SET status = ? WHERE run_id = ?", (status, run_id))

    def detach_all_runs(self) -> int:
        """Mark every ``active`` run ``detached`` (at start-up no live model holds one)."""
        with self._tx() as db:
            return db.execute("UPDATE training_runs SET status = 'detached' WHERE status = 'active'").rowcount

    def reattach_run(self, run_id: str, *, after_step: int, components: dict[str, Any]) -> None:
        """A resume from the checkpoint at ``after_step``: bump the revision, supersede later points,
        merge in the live adapter's components and mark the run active."""
        with self._tx() as db:
            row = db.execute("SELECT components FROM training_runs WHERE run_id = ?", (run_id,)).fetchone()
            merged = {**json.loads(row["components"]), **components} if row else components
            self._supersede(db, run_id, after_step)
            db.execute(
                "UPDATE training_runs SET revision = revision + 1, status = 'active', components = ?,"
                " last_request_time = ? WHERE run_id = ?",
                (_json(merged), time.time(), run_id),
            )

    def supersede_after(self, run_id: str, after_step: int) -> int:
        """Supersede the points of steps after ``after_step``; bump the revision if any changed."""
        with self._tx() as db:
            n = self._supersede(db, run_id, after_step)
            if n:
                db.execute("UPDATE training_runs SET revision = revision + 1 WHERE run_id = ?", (run_id,))
            return n

    def supersede_evals_from(self, run_id: str, step: int) -> int:
        """Supersede the eval points of ``step`` and later (they measured weights that a load just
        replaced, at the same step); bump the revision if any changed."""
        with self._tx() as db:
            n = db.execute(
                "UPDATE eval_points SET superseded = 1 WHERE run_id = ? AND step >= ? AND superseded = 0",
                (run_id, step),
            ).rowcount
            if n:
                db.execute("UPDATE training_runs SET revision = revision + 1 WHERE run_id = ?", (run_id,))
            return n

    @staticmethod
    def _supersede(db: sqlite3.Connection, run_id: str, after_step: int) -> int:
        """Flag the training and eval points of steps after ``after_step`` superseded; how many.
        The same bound for both: an eval point of step ``after_step`` measured the weights the
        checkpoint holds, a training point of that step the micro-batches that led to them."""
        n = 0
        for table in ("metric_points", "eval_points"):
            n += db.execute(
                f"UPDATE {table} SET superseded = 1 WHERE run_id = ? AND step > ? AND superseded = 0",
                (run_id, after_step),
            ).rowcount
        return n

    def delete_run_if_empty(self, run_id: str) -> bool:
        """Delete a run that has neither metric or eval points nor checkpoints; returns whether it did."""
        with self._tx() as db:
            busy = db.execute(
                "SELECT (SELECT COUNT(*) FROM metric_points WHERE run_id = ?)"
                " + (SELECT COUNT(*) FROM eval_points WHERE run_id = ?)"
                " + (SELECT COUNT(*) FROM checkpoints WHERE run_id = ?)",
                (run_id, run_id, run_id),
            ).fetchone()[0]
            if busy:
                return False
            db.execute("DELETE FROM training_runs WHERE run_id = ?", (run_id,))
            return True

    # ---------------------------------------------------------------- checkpoints

    def upsert_checkpoint(
        self,
        run_id: str,
        name: str,
        *,
        time_: float,
        size_bytes: int,
        step: int,
        consumed_train_samples: int,
        loss: float | None,
        has_optimizer: bool,
        base_model: str,
        lora_rank: int | None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, name, time, size_bytes, step, consumed_train_samples,"
                " loss, has_optimizer, base_model, lora_rank) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, name, time_, size_bytes, step, consumed_train_samples, _finite(loss), int(has_optimizer),
                 base_model, lora_rank),
            )
            db.execute("UPDATE training_runs SET last_request_time = ? WHERE run_id = ?", (time.time(), run_id))

    @staticmethod
    def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
        return CheckpointRecord(
            run_id=row["run_id"],
            name=row["name"],
            time=row["time"],
            size_bytes=row["size_bytes"],
            step=row["step"],
            consumed_train_samples=row["consumed_train_samples"],
            loss=row["loss"],
            has_optimizer=bool(row["has_optimizer"]),
            base_model=row["base_model"],
            lora_rank=row["lora_rank"],
        )

    def list_checkpoints(self, user_id: int, run_id: str) -> list[CheckpointRecord]:
        """Checkpoints of the user's run, oldest first (``NotFoundError`` for another user's run)."""
        self.get_run(user_id, run_id)
        rows = self._query("SELECT * FROM checkpoints WHERE run_id = ? ORDER BY time, step", (run_id,))
        return [self._checkpoint(r) for r in rows]

    def get_checkpoint(self, user_id: int, run_id: str, name: str) -> CheckpointRecord:
        rows = self._query(
            "SELECT c.* FROM checkpoints c JOIN training_runs r ON r.run_id = c.run_id"
            " WHERE c.run_id = ? AND c.name = ? AND r.user_id = ?",
            (run_id, name, user_id),
        )
        if not rows:
            raise NotFoundError(f"no checkpoint {twinkle_path(run_id, name)}")
        return self._checkpoint(rows[0])

    def checkpoint_row(self, user_id: int, run_id: str, name: str) -> CheckpointRow | None:
        """The checkpoint if ``user_id`` owns it, else None."""
        rows = self._query(
            "SELECT c.run_id, c.name, r.user_id, c.step, c.has_optimizer FROM checkpoints c"
            " JOIN training_runs r ON r.run_id = c.run_id WHERE c.run_id = ? AND c.name = ? AND r.user_id = ?",
            (run_id, name, user_id),
        )
        if not rows:
            return None
        r = rows[0]
        return CheckpointRow(r["run_id"], r["name"], r["user_id"], r["step"], bool(r["has_optimizer"]))

    def all_checkpoints(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._query("SELECT run_id, name FROM checkpoints")]

    def checkpoint_times(self) -> dict[tuple[str, str], float]:
        """``{(run_id, name): time}`` of every checkpoint row (``time`` is the folder's creation time)."""
        return {(r[0], r[1]): r[2] for r in self._query("SELECT run_id, name, time FROM checkpoints")}

    def delete_checkpoint(self, run_id: str, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM checkpoints WHERE run_id = ? AND name = ?", (run_id, name))

    # -------------------------------------------------------------------- metrics

    def add_metric_point(
        self, run_id: str, *, step: int, micro_step: int, loss: float | None, num_tokens: int, time_: float
    ) -> None:
        """One forward_backward's point; a non-finite loss is stored as NULL (``loss=None``)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO metric_points (run_id, step, micro_step, loss, num_tokens, time)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, step, micro_step, _finite(loss), num_tokens, time_),
            )

    def complete_step(self, run_id: str, step: int, *, grad_norm: float | None, lr: float | None) -> None:
        """The optimizer update of ``step`` happened: its live points get ``grad_norm``, ``lr``, ``completed``."""
        with self._tx() as db:
            db.execute(
                "UPDATE metric_points SET completed = 1, grad_norm = ?, lr = ?"
                " WHERE run_id = ? AND step = ? AND superseded = 0 AND completed = 0",
                (_finite(grad_norm), _finite(lr), run_id, step),
            )

    def metric_points(self, run_id: str, since_step: int) -> list[PointRecord]:
        rows = self._query(
            "SELECT * FROM metric_points WHERE run_id = ? AND step > ? ORDER BY id", (run_id, since_step)
        )
        return [
            PointRecord(
                step=r["step"],
                micro_step=r["micro_step"],
                loss=r["loss"],
                num_tokens=r["num_tokens"],
                grad_norm=r["grad_norm"],
                lr=r["lr"],
                completed=bool(r["completed"]),
                time=r["time"],
                superseded=bool(r["superseded"]),
            )
            for r in rows
        ]

    def add_eval_point(self, run_id: str, *, step: int, loss: float | None, num_tokens: int, time_: float) -> None:
        """One eval batch's point under the adapter's ``step``; a non-finite loss is stored as NULL."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO eval_points (run_id, step, loss, num_tokens, time) VALUES (?, ?, ?, ?, ?)",
                (run_id, step, _finite(loss), num_tokens, time_),
            )

    def eval_points(self, run_id: str, since_step: int) -> list[EvalPointRecord]:
        """Eval points of steps ``>= since_step`` (not ``>``: a reader's cursor is its last completed
        step, and that step's eval comes after its training points), oldest first."""
        rows = self._query(
            "SELECT * FROM eval_points WHERE run_id = ? AND step >= ? ORDER BY id", (run_id, since_step)
        )
        return [
            EvalPointRecord(step=r["step"], loss=r["loss"], num_tokens=r["num_tokens"], time=r["time"],
                            superseded=bool(r["superseded"]))
            for r in rows
        ]

    def run_revision(self, run_id: str) -> tuple[int, int | None]:
        rows = self._query("SELECT revision, total_steps FROM training_runs WHERE run_id = ?", (run_id,))
        return (int(rows[0][0]), rows[0][1]) if rows else (0, None)
