"""``MetricPoller``: the background loop that keeps run histories up to date from the server.

For each run it asks ``TwinkleClient.get_metrics(run_id, since_step=cursor)`` and folds the
answer into the run's :class:`~twinkle_jupyter.history.RunHistory`, fetching everything
again when the run's ``revision`` changed (after a resume). Until a fetch succeeded, and
after a failure, the server's health route is asked first, so a down server fails at once
instead of after a minute of retries. A failure is kept as a one-line :attr:`error` and
the next fetch backs off (1 s, doubling up to 10 s).

The thread never prints and draws nothing itself: after every fetch it calls ``on_poll``
(the plot), which decides what to draw and how soon it wants to be called again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .connection import current_client, one_line_error
from .history import RunHistory
from .settings import DEFAULTS, READ_RETRY_S, check

__all__ = ["BACKOFF_MAX_S", "BACKOFF_MIN_S", "MetricPoller", "TotalHint"]

BACKOFF_MIN_S = 1.0
"""The wait after a first failed fetch (or the poll interval, if longer)."""
BACKOFF_MAX_S = 10.0
"""The longest wait between fetches while the server keeps failing."""

TotalHint = Callable[[RunHistory], "int | None"]
"""Estimates a run's total steps from its history (for the ETA); None while it cannot tell."""


def next_backoff(current: float) -> float:
    """The wait after another failure, when the last wait was ``current`` seconds."""
    return min(max(current * 2, BACKOFF_MIN_S), BACKOFF_MAX_S)


class MetricPoller:
    """The metric histories of some runs, and the daemon thread that keeps them fresh.

    Args:
        client: a ``TwinkleClient``; default: twinkle_client's current connection, looked up
            at every fetch (so a reconnect is followed).
        interval: seconds between fetches while they succeed.
        max_points: per run, the most steps kept (see :class:`~twinkle_jupyter.history.BoundedSeries`).
        smoothing: EMA weight of the runs' smoothed loss, in [0, 1).
        on_poll: ``on_poll(changed)``, called on the thread after every fetch with whether
            anything visible changed (points, or the error line); returns the most seconds
            the thread may wait before calling it again, or None for the poll interval.
        name: the thread's name.

    :attr:`lock` guards the histories: hold it while reading them from another thread.
    """

    def __init__(
        self,
        *,
        client: Any = None,
        interval: float = DEFAULTS.poll_interval,
        max_points: int = DEFAULTS.max_points,
        smoothing: float = DEFAULTS.smoothing,
        on_poll: Callable[[bool], float | None] | None = None,
        name: str = "twinkle-loss-plot",
    ) -> None:
        self._client = client
        self.interval = check("poll_interval", interval)
        self.max_points = check("max_points", max_points)
        self._smoothing = check("smoothing", smoothing)
        self.on_poll = on_poll
        self.name = name
        self.lock = threading.RLock()
        self.error: str | None = None
        """The last fetch's failure as one line; None once a fetch succeeds."""
        self._histories: dict[str, RunHistory] = {}
        self._hints: dict[str, TotalHint] = {}
        self._reached = False  # until a fetch succeeded, a health check goes first (fails fast)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ runs

    @property
    def client(self) -> Any:
        """The client the next fetch uses."""
        return current_client(self._client)

    @property
    def runs(self) -> list[str]:
        """The run ids followed, in the order they were added."""
        return list(self._histories)

    def histories(self) -> list[RunHistory]:
        """The runs' histories, in :attr:`runs` order."""
        with self.lock:
            return list(self._histories.values())

    def history(self, run_id: str) -> RunHistory:
        return self._histories[run_id]

    def add_run(self, run_id: str, total_hint: TotalHint | None = None) -> bool:
        """Follow ``run_id`` too; returns whether it is new. ``total_hint`` is called after
        fetches (on the thread) until it returns a number, which becomes the run's total."""
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run id must be a non-empty string, got {run_id!r}")
        with self.lock:
            added = run_id not in self._histories
            if added:
                self._histories[run_id] = RunHistory(run_id, max_points=self.max_points, smoothing=self._smoothing)
            if total_hint is not None:
                self._hints[run_id] = total_hint
        return added

    @property
    def smoothing(self) -> float:
        return self._smoothing

    def set_smoothing(self, weight: float) -> None:
        """Change the EMA weight; the histories start over so the EMA covers every step."""
        weight = check("smoothing", weight)
        with self.lock:
            self._smoothing = weight
            for hist in self._histories.values():
                hist.set_smoothing(weight)
                hist.reset()

    # ------------------------------------------------------------------ fetching

    def poll_once(self) -> bool:
        """Fetch new points of every run; returns whether anything changed. Raises on failure."""
        client = self.client
        if self.error is not None or not self._reached:
            # A down server makes get_metrics retry for minutes; fail fast instead.
            client.require_reachable()
        # A server that stops answering mid-poll is shown as an error within seconds; the
        # poller's own backoff then keeps asking.
        with client.retrying_for(READ_RETRY_S):
            return self._fetch(client)

    def _fetch(self, client: Any) -> bool:
        changed = False
        for run_id in self.runs:
            hist = self._histories.get(run_id)
            if hist is None:
                continue
            resp = client.get_metrics(run_id, since_step=hist.cursor)
            if hist.needs_refetch(resp.revision):
                resp = client.get_metrics(run_id, since_step=0)
            with self.lock:
                if self._histories.get(run_id) is not hist:
                    continue
                changed = hist.ingest(resp) or changed
            self._reached = True
            changed = self._apply_hint(run_id, hist) or changed
        return changed

    def _apply_hint(self, run_id: str, hist: RunHistory) -> bool:
        hint = self._hints.get(run_id)
        if hint is None or hist.total_steps is not None:
            return False
        try:
            total = hint(hist)
        except Exception:  # an estimate only: never worth an error line
            total = None
        if not total:
            return False
        with self.lock:
            hist.total_steps = int(total)
        self._hints.pop(run_id, None)
        return True

    def fetch(self) -> bool:
        """:meth:`poll_once`, keeping a failure as :attr:`error` instead of raising; returns
        whether anything visible changed (points, or the error line appearing or going)."""
        try:
            changed = self.poll_once()
        except Exception as exc:
            message = one_line_error(exc)
            changed = message != self.error
            self.error = message
            return changed
        if self.error is not None:
            self.error = None
            changed = True
        return changed

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Start the thread (no-op if it runs)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to end after the fetch in flight (safe from the thread itself)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        """End the thread; waits up to ``timeout`` s for a fetch in flight."""
        self.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for (until the next :meth:`start`)."""
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Fetch now rather than at the end of the current wait."""
        self._wake.set()

    def _run(self) -> None:
        delay = self.interval
        while not self._stop.is_set():
            changed = self.fetch()
            delay = self.interval if self.error is None else next_backoff(delay)
            if self._stop.is_set():
                break
            timeout = delay
            if self.on_poll is not None:
                wanted = self.on_poll(changed)
                if wanted is not None:
                    timeout = min(timeout, wanted)
            if self._stop.is_set():
                break
            self._wake.wait(timeout)
            self._wake.clear()
