"""Server settings (from the command line) and the layout of the data directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "builtin://tiny-qwen2"
DEFAULT_IDLE_TIMEOUT = 1800.0
DB_FILE = "twinkle.db"


def default_loras_per_user(max_loras: int) -> int:
    """Half the adapter slots (at least one): one user never holds more than half the server,
    so a small group always finds slots free."""
    return max(1, max_loras // 2)


def default_data_dir() -> Path:
    """``$TWINKLE_DATA_DIR``, else ``./twinkle_data`` (read at call time)."""
    return Path(os.environ.get("TWINKLE_DATA_DIR") or "twinkle_data")


FUSE_TOKENS = 32768
"""The default ``fuse_tokens`` on a CUDA device."""


@dataclass
class Settings:
    """Everything ``twinkle-server serve`` is configured with."""

    model: str = DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    max_loras: int = 5
    max_r: int = 32
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    allow_local_data: bool = False
    device: str | None = None
    dtype: str | None = None
    max_loras_per_user: int | None = None
    """Adapter slots one user may hold at once; None: ``default_loras_per_user(max_loras)``."""
    max_objects_per_user: int = 64
    """Live remote objects one user may hold; a cap so that one key cannot exhaust memory."""
    data_threads: int = 4
    """Threads for dataset and dataloader calls (model calls have their own single thread)."""
    data_threads_per_user: int = 1
    """Data threads one user may occupy at once: the others keep serving the other users."""
    max_tokens_per_call: int = 16384
    """Padded tokens (batch rows x longest row) one forward_backward/forward_only may carry."""
    fuse_tokens: int | None = None
    """Most (padded) tokens one fused device pass gathers from several users' calls; 0 runs
    every call alone (time-sharing). None: ``FUSE_TOKENS`` on a CUDA device, 0 on the CPU,
    where a fused pass computes as many small matmuls as separate ones and measured slower
    (README, benchmarks/multi_tenant.py)."""
    max_uploads: int = 4
    """Hub uploads running at once on the server; later ones wait (status 'queued')."""
    max_uploads_per_user: int = 2
    """Hub uploads one user may have queued or running at once; more are refused."""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if self.max_loras_per_user is None:
            self.max_loras_per_user = default_loras_per_user(self.max_loras)
        self.max_loras_per_user = min(self.max_loras_per_user, self.max_loras)
        self.data_threads_per_user = min(self.data_threads_per_user, self.data_threads)
        self.max_uploads_per_user = min(self.max_uploads_per_user, self.max_uploads)

    @property
    def loras_per_user(self) -> int:
        """``max_loras_per_user``, resolved."""
        assert self.max_loras_per_user is not None
        return self.max_loras_per_user

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILE

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def scratch_dir(self) -> Path:
        return self.data_dir / "scratch"

    def run_weights_dir(self, run_id: str) -> Path:
        """Where the checkpoints of ``run_id`` live: ``<data-dir>/runs/<run_id>/weights``."""
        return self.runs_dir / run_id / "weights"
