"""Per-kernel state of the extension: live plots, the training-event hook, Ctrl-C, finalizing.

While a cell runs, the first ``forward_backward`` of each run (a ``twinkle_client`` event,
emitted on the caller's thread) opens a live :class:`~twinkle_jupyter.plot.LossPlot` in that
cell's output, through a display handle, and installs a SIGINT handler. When the cell ends
(``post_run_cell``), however it ends, the plot is replaced in the same output by a static
picture and a one-line summary, and the SIGINT handler is put back. The event listener only
observes: it never raises into the training loop.

Ctrl-C during training: the first SIGINT asks ``twinkle_client`` to stop
(``twinkle_client.interrupt.request_stop``), and the client raises :class:`TrainingInterrupted`
(a ``KeyboardInterrupt``) at the next ``forward_backward``, before queueing it, so the loop
stops between calls with the model in a consistent state (``save`` works). A second SIGINT
interrupts at once. Every cell starts and ends without a stop request.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from twinkle_client.interrupt import TrainingInterrupted, clear_stop, request_stop, stop_requested

from .connection import one_line_error
from .settings import DEFAULTS, READ_RETRY_S

__all__ = ["TrainingInterrupted", "TwinkleSession", "get_session"]

# Deferred calls are queued and sent by a background thread, so a training loop can end
# before the server has run all of its steps. The end of the cell waits for them (the plot
# stays live meanwhile) so the final picture has the last step; Ctrl-C stops the wait.
DRAIN_POLL_S = 0.2

_SESSIONS: weakref.WeakKeyDictionary[Any, TwinkleSession] = weakref.WeakKeyDictionary()


def get_session(shell: Any = None) -> TwinkleSession | None:
    """The extension's session of ``shell`` (default: the running IPython), if it is loaded."""
    if shell is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            return None
    return _SESSIONS.get(shell) if shell is not None else None


class TwinkleSession:
    """Everything the extension hooks into one IPython shell; :meth:`close` removes all of it."""

    def __init__(self, shell: Any, settings: Any = None) -> None:
        self.shell = shell
        self.settings = settings if settings is not None else DEFAULTS
        """``TwinkleMagics`` (``%config``), else :data:`twinkle_jupyter.settings.DEFAULTS`."""
        self.plots: weakref.WeakSet[Any] = weakref.WeakSet()
        """Every plot made through the extension (stopped on unload)."""
        self._unsubscribe: Callable[[], None] | None = None
        self._prev_custom_exc: tuple[Any, Any] | None = None
        self._custom_exc_handler: Any = None
        self._started = False
        # per cell
        self._in_cell = False
        self._cell_plot: Any = None
        self._cell_runs: set[str] = set()
        self._cell_models: dict[str, Any] = {}
        self._cell_opened: list[Any] = []
        self._loaders_at_start: dict[int, tuple[Any, int]] = {}
        self.kernel_runs: set[str] = set()
        """Runs trained from this kernel (their plots are finalized when a cell ends)."""
        # SIGINT
        self._prev_sigint: Any = None
        self._sigint_installed = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        if self._started:
            return
        from twinkle_client import events

        self._unsubscribe = events.subscribe(self._on_event)
        self.shell.events.register("pre_run_cell", self._pre_run_cell)
        self.shell.events.register("post_run_cell", self._post_run_cell)
        self._install_custom_exc()
        _SESSIONS[self.shell] = self
        self._started = True

    def close(self) -> None:
        """Unsubscribe, unregister every hook, stop every plot's thread, restore Ctrl-C."""
        if not self._started:
            return
        self._started = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for name, fn in (("pre_run_cell", self._pre_run_cell), ("post_run_cell", self._post_run_cell)):
            try:
                self.shell.events.unregister(name, fn)
            except ValueError:
                pass
        self._restore_custom_exc()
        self._restore_sigint()
        for plot in list(self.plots):
            if plot.handle is not None and not plot.finalized:
                # Still live in some output: leave a picture there, not a widget that dies.
                try:
                    plot.finalize("stopped", fetch=False)
                    continue
                except Exception:
                    pass
            plot.stop(timeout=2.0)
        if _SESSIONS.get(self.shell) is self:
            del _SESSIONS[self.shell]

    # ------------------------------------------------------------------ errors from user cells

    def _install_custom_exc(self) -> None:
        from twinkle.errors import TwinkleError

        shell = self.shell
        self._prev_custom_exc = (shell.custom_exceptions, shell.CustomTB)

        def handler(sh: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
            return show_one_line(sh, etype, value)

        shell.set_custom_exc((TwinkleError, TrainingInterrupted), handler)
        self._custom_exc_handler = shell.CustomTB

    def _restore_custom_exc(self) -> None:
        shell = self.shell
        if self._prev_custom_exc is None:
            return
        # Only if nobody replaced ours in the meantime.
        if shell.CustomTB is self._custom_exc_handler:
            shell.custom_exceptions, shell.CustomTB = self._prev_custom_exc
        self._prev_custom_exc = None
        self._custom_exc_handler = None

    # ------------------------------------------------------------------ cells

    def register_plot(self, plot: Any, *, finalize_with_cell: bool = True) -> None:
        """Track ``plot`` (stopped on unload); with ``finalize_with_cell`` it is finalized when the
        current cell ends, or left live (finalizing itself later) while its runs are training."""
        self.plots.add(plot)
        if finalize_with_cell and self._in_cell:
            self._cell_opened.append(plot)

    def new_plot(self, runs: Any = None, **overrides: Any) -> Any:
        """A LossPlot with the ``%config TwinkleMagics`` settings."""
        from .plot import LossPlot

        s = self.settings
        kwargs: dict[str, Any] = {
            "poll_interval": s.poll_interval,
            "max_redraw_hz": s.max_redraw_hz,
            "max_points": s.max_points,
            "smoothing": s.smoothing,
            "x_axis": s.x_axis,
            "log_scale": s.log_scale,
            "width": s.plot_width,
            "height": s.plot_height,
            "show_controls": s.show_controls,
        }
        kwargs.update(overrides)
        plot = LossPlot(runs, **kwargs)
        self.plots.add(plot)
        return plot

    def _pre_run_cell(self, info: Any = None) -> None:
        self._in_cell = True
        self._cell_plot = None
        self._cell_runs = set()
        self._cell_models = {}
        self._cell_opened = []
        self._loaders_at_start = {}
        clear_stop()
        if "twinkle_client.dataloader" in sys.modules:
            from .resume import find_dataloaders

            try:
                for _name, loader in find_dataloaders(self.shell.user_ns):
                    self._loaders_at_start[id(loader)] = (loader, _consumed(loader))
            except Exception:  # never let bookkeeping break the user's cell
                self._loaders_at_start = {}

    def _post_run_cell(self, result: Any = None) -> None:
        try:
            self._end_cell(result)
        finally:
            self._restore_sigint()
            self._in_cell = False
            self._cell_plot = None
            self._cell_runs = set()
            self._cell_models = {}
            self._cell_opened = []
            self._loaders_at_start = {}
            clear_stop()

    def _end_cell(self, result: Any) -> None:
        err = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
        if err is None:
            status, message = "finished", None
        elif isinstance(err, KeyboardInterrupt):
            status, message = "interrupted", None
        else:
            status, message = "error", one_line_error(err)
        plot = self._cell_plot
        if plot is not None and not plot.finalized:
            if not self._drain(list(self._cell_models.values())) and status == "finished":
                status, message = "interrupted", "stopped waiting for the queued calls (they still run)"
            try:
                plot.finalize(status, message)
            except Exception as exc:  # show it, but the cell's own outcome stands
                print(f"twinkle: could not finalize the loss plot: {one_line_error(exc)}", file=sys.stderr)
        for other in self._cell_opened:
            if other is plot or other.finalized:
                continue
            try:
                if _any_active(other, ignore=self.kernel_runs):
                    other.auto_finalize = True  # keeps following a run trained elsewhere
                else:
                    other.finalize("finished")
            except Exception as exc:
                print(f"twinkle: {one_line_error(exc)}", file=sys.stderr)

    def _drain(self, models: list[Any]) -> bool:
        """Wait until the models' queued calls ran on the server; False if Ctrl-C cut it short."""
        for model in models:
            wait = getattr(model, "wait", None)
            if not callable(wait):
                continue
            try:
                while not wait(DRAIN_POLL_S):
                    if stop_requested():  # Ctrl-C while waiting
                        clear_stop()
                        return False
            except KeyboardInterrupt:
                return False
            except Exception:
                continue
        return True

    # ------------------------------------------------------------------ training events

    def _on_event(self, event: Any) -> None:
        """The per-call hook: O(1) unless this is a run's first call in the cell."""
        if event.kind != "forward_backward":
            return
        run_id = event.run_id
        if run_id is None or run_id in self._cell_runs or not self._in_cell:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a loop in a thread: no display, no signal handler from here
        self._cell_runs.add(run_id)
        self.kernel_runs.add(run_id)
        self._cell_models[run_id] = event.model
        self._begin_run(run_id)

    def _begin_run(self, run_id: str) -> None:
        if self.settings.stop_between_calls:
            self._install_sigint()
        if not self.settings.auto_plot:
            return
        hint = self._total_hint()
        for plot in self._cell_opened:
            if run_id in plot.runs and not plot.finalized:
                # %twinkle plot RUN earlier in this cell: that plot is this cell's plot.
                self._cell_plot = plot
                if hint is not None:
                    plot.add_run(run_id, total_hint=hint)
                return
        if self._cell_plot is None:
            plot = self.new_plot()
            plot.add_run(run_id, total_hint=hint)
            self._cell_plot = plot
            plot.show()
        else:
            self._cell_plot.add_run(run_id, total_hint=hint)

    def _total_hint(self) -> Callable[[Any], int | None] | None:
        """An estimate of the run's total steps from the DataLoader the cell's loop iterates.

        The loader is the one whose position moved since the cell started; the loop runs to
        the end of its current epoch. The estimate is computed in the plot's thread (it needs
        a round trip) from the run's first step in this cell.
        """
        moved = [
            (loader, start)
            for loader, start in self._loaders_at_start.values()
            if _consumed(loader) != start
        ]
        if not moved and "twinkle_client.dataloader" in sys.modules:
            # A loader made in this very cell: it started at sample 0.
            from .resume import find_dataloaders

            moved = [
                (loader, 0)
                for _name, loader in find_dataloaders(self.shell.user_ns)
                if id(loader) not in self._loaders_at_start and _consumed(loader) > 0
            ]
        if len(moved) != 1:
            return None
        loader, start = moved[0]
        return _TotalEstimate(loader, start)

    # ------------------------------------------------------------------ SIGINT

    def _install_sigint(self) -> None:
        if self._sigint_installed or threading.current_thread() is not threading.main_thread():
            return
        try:
            self._prev_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except (ValueError, OSError):  # not the main interpreter thread, or no signals here
            return
        self._sigint_installed = True

    def _restore_sigint(self) -> None:
        if not self._sigint_installed:
            return
        try:
            if signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self._prev_sigint)
        except (ValueError, OSError):
            pass
        self._sigint_installed = False
        self._prev_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if stop_requested():
            # The second Ctrl-C: the user does not want to wait for the next call.
            clear_stop()
            prev = self._prev_sigint
            if callable(prev) and prev is not self._on_sigint:
                # default_int_handler raises KeyboardInterrupt; ipykernel's async-cell handler
                # cancels the cell's task instead.
                prev(signum, frame)
                return
            raise KeyboardInterrupt
        request_stop()  # the client raises TrainingInterrupted before the next forward_backward


class _TotalEstimate:
    """Total optimizer steps of a loop over one DataLoader epoch, estimated once.

    Steps done before the loop + (batches the loop will yield) // gradient accumulation. It is
    called by the plot's thread right after its first fetch of the run, which happens within
    milliseconds of the run's first ``forward_backward`` in the cell, so the history's last
    completed step is the step the loop started from (the client's clock is never compared
    with the server's).
    """

    def __init__(self, loader: Any, consumed_at_start: int) -> None:
        self.loader = loader
        self.start = consumed_at_start

    def __call__(self, history: Any) -> int | None:
        steps_before = history.current_step
        state = self.loader.get_state()
        per_epoch = int(state.get("samples_per_epoch") or 0)
        batch_size = int(state.get("batch_size") or 0)
        if per_epoch <= 0 or batch_size <= 0:
            return None
        pos = self.start % per_epoch
        batches = math.ceil((per_epoch - pos) / batch_size)
        from .connection import current_client

        run = current_client().get_training_run(history.run_id)
        ga = max(1, int(run.gradient_accumulation_steps))
        return steps_before + max(1, batches // ga)


def _consumed(loader: Any) -> int:
    try:
        return int(loader.consumed_train_samples)
    except Exception:
        return -1


def _any_active(plot: Any, ignore: set[str]) -> bool:
    """Whether a run of ``plot`` is being trained elsewhere (``ignore``: this kernel's runs, which
    only train while one of its cells runs)."""
    from .connection import current_client

    try:
        client = current_client()
        with client.retrying_for(READ_RETRY_S):
            return any(client.get_training_run(r).status == "active" for r in plot.runs if r not in ignore)
    except Exception:
        return False


def show_one_line(shell: Any, etype: type, value: BaseException) -> list[str]:
    """Show ``Type: message`` as the cell's error, instead of a traceback. Returns the lines."""
    name = getattr(etype, "__name__", "Error")
    text = str(value) or name
    line = f"\x1b[0;31m{name}\x1b[0m: {' '.join(text.split())}"
    stb = [line]
    show = getattr(shell, "_showtraceback", None)
    if callable(show):
        show(etype, value, stb)
    else:
        print(line, file=sys.stderr)
    return stb
