"""``%twinkle``: connect, status, runs, checkpoints, plot and resume from a notebook.

Settings are ``%config TwinkleMagics.<name> = value`` (or ``c.TwinkleMagics.<name>`` in
``ipython_config.py``). A twinkle error (server down, wrong key, a run that is not yours, a
checkpoint that does not fit) prints one line, never a traceback, and the cell succeeds, so
"Run all" in a notebook is not derailed by a monitoring line. Wrong arguments raise
IPython's ``UsageError`` (also one line).
"""

from __future__ import annotations

import argparse
import getpass
import html
import os
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.display import display
from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, validate

from .connection import current_client, one_line_error

__all__ = ["TwinkleMagics"]

HELP = """\
%twinkle connect [URL]             connect (key from $TWINKLE_SERVER_TOKEN, else a hidden prompt)
%twinkle status                    server, user, base model, free adapter slots
%twinkle runs [--limit N]          your training runs (browser: plot, checkpoints, compare)
%twinkle checkpoints RUN           a run's checkpoints (browser: resume, copy path, delete)
%twinkle plot [RUN ...]            a live loss plot (several runs are overlaid; default: the newest run)
%twinkle resume RUN [CKPT|latest]  put a checkpoint back into the notebook's model and dataloader
Settings: %config TwinkleMagics"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad line as one ``UsageError`` instead of exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"%twinkle {self.prog.split()[-1]}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        raise UsageError(message.strip() if message else "%twinkle: see %twinkle help")


def _parser(name: str) -> _Parser:
    return _Parser(prog=f"%twinkle {name}", add_help=False, allow_abbrev=False)


@magics_class
class TwinkleMagics(Magics):
    """The ``%twinkle`` line magic and the extension's settings."""

    server_url = Unicode(
        "", help="Default URL for %twinkle connect (else $TWINKLE_SERVER_URL, else http://127.0.0.1:8000)."
    ).tag(config=True)
    poll_interval = Float(0.5, help="Seconds between metric fetches of a live plot.").tag(config=True)
    max_redraw_hz = Float(2.0, help="At most this many plot updates per second.").tag(config=True)
    max_points = Int(1000, help="Steps kept per run (older ones downsampled; first/last/extremes kept).").tag(
        config=True
    )
    smoothing = Float(0.6, help="EMA weight of the smoothed loss, in [0, 1).").tag(config=True)
    x_axis = Enum(["step", "time"], "step", help="x axis of new plots: 'step' or 'time'.").tag(config=True)
    log_scale = Bool(False, help="Log scale for the loss axis of new plots.").tag(config=True)
    auto_plot = Bool(True, help="Open a live plot when a twinkle model trains in a cell.").tag(config=True)
    stop_between_calls = Bool(
        True, help="Ctrl-C during training stops at the next model call (a second Ctrl-C at once)."
    ).tag(config=True)
    show_controls = Bool(True, help="Show x axis / log scale / smoothing controls above plots.").tag(config=True)
    plot_width = Int(720, help="Plot width in pixels.").tag(config=True)
    plot_height = Int(420, help="Plot height in pixels.").tag(config=True)
    page_size = Int(20, help="Rows per page of the run browser.").tag(config=True)

    @validate("smoothing")
    def _check_smoothing(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0 <= value < 1:
            raise TraitError(f"smoothing must be in [0, 1), got {value}")
        return value

    @validate("poll_interval", "max_redraw_hz")
    def _check_positive(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if value <= 0:
            raise TraitError(f"{proposal['trait'].name} must be > 0, got {value}")
        return value

    @validate("max_points")
    def _check_points(self, proposal: Any) -> int:
        value = int(proposal["value"])
        if value < 16:
            raise TraitError(f"max_points must be >= 16, got {value}")
        return value

    # ------------------------------------------------------------------ dispatch

    @line_magic
    def twinkle(self, line: str = "") -> None:
        """Twinkle from the notebook. ``%twinkle help`` lists the commands."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%twinkle: {exc}") from None
        if not words or words[0] in ("help", "-h", "--help"):
            print(HELP)
            return None
        command, args = words[0], words[1:]
        handler = {
            "connect": self._connect,
            "status": self._status,
            "runs": self._runs,
            "checkpoints": self._checkpoints,
            "ckpts": self._checkpoints,
            "plot": self._plot,
            "resume": self._resume,
        }.get(command)
        if handler is None:
            raise UsageError(f"%twinkle: unknown command {command!r}; try %twinkle help")
        try:
            handler(args)
        except UsageError:
            raise
        except Exception as exc:
            from .connection import is_twinkle_error

            if not is_twinkle_error(exc) and not isinstance(exc, ConnectionError):
                raise
            print(f"twinkle: {one_line_error(exc)}", file=sys.stderr)
        return None

    # ------------------------------------------------------------------ commands

    def _reachable(self, client: Any) -> None:
        # get_* retry an unreachable server for a minute; a down server should answer now.
        if not client.health_check():
            from twinkle.errors import TransportError

            raise TransportError(f"cannot reach the twinkle server at {client.base_url}")

    def _connect(self, args: list[str]) -> None:
        p = _parser("connect")
        p.add_argument("url", nargs="?")
        ns = p.parse_args(args)
        url = ns.url or self.server_url or os.environ.get("TWINKLE_SERVER_URL") or None
        key = os.environ.get("TWINKLE_SERVER_TOKEN")
        if not key:
            # getpass: typed hidden, never echoed, never part of the cell or its output.
            key = getpass.getpass("twinkle API key: ")
        from twinkle_client import TwinkleClient, init_twinkle_client

        # Check the new URL and key before replacing a connection that works.
        with TwinkleClient(base_url=url, api_key=key or None) as probe:
            self._reachable(probe)
            probe.get_server_info()
        client = init_twinkle_client(base_url=url, api_key=key or None)
        info = client.get_server_info()
        print(
            f"twinkle: connected to {client.base_url} as {info.user} "
            f"(base model {info.base_model}, {info.free_slots}/{info.max_loras} adapter slots free)"
        )

    def _status(self, args: list[str]) -> None:
        _parser("status").parse_args(args)
        client = current_client()
        self._reachable(client)
        info = client.get_server_info()
        display(ServerStatus(client.base_url, info))

    def _runs(self, args: list[str]) -> None:
        p = _parser("runs")
        p.add_argument("--limit", type=int, default=None)
        ns = p.parse_args(args)
        if ns.limit is not None and ns.limit < 1:
            raise UsageError("%twinkle runs: --limit must be >= 1")
        client = current_client()
        self._reachable(client)
        from .browsers import RunBrowser

        browser = RunBrowser(page_size=ns.limit or self.page_size, namespace=self.shell.user_ns)
        display(browser)

    def _checkpoints(self, args: list[str]) -> None:
        p = _parser("checkpoints")
        p.add_argument("run")
        ns = p.parse_args(args)
        client = current_client()
        self._reachable(client)
        client.get_training_run(ns.run)  # a run that is not yours fails here, in one line
        from .browsers import CheckpointBrowser

        display(CheckpointBrowser(ns.run, namespace=self.shell.user_ns))

    def _plot(self, args: list[str]) -> None:
        p = _parser("plot")
        p.add_argument("runs", nargs="*")
        p.add_argument("--x", choices=["step", "time"], default=None, dest="x_axis")
        p.add_argument("--log", action="store_true", default=None, dest="log_scale")
        p.add_argument("--smoothing", type=float, default=None)
        ns = p.parse_args(args)
        if ns.smoothing is not None and not 0 <= ns.smoothing < 1:
            raise UsageError("%twinkle plot: --smoothing must be in [0, 1)")
        client = current_client()
        self._reachable(client)
        runs = list(dict.fromkeys(ns.runs))
        if not runs:
            newest = client.list_training_runs(limit=1)
            if not newest:
                print("twinkle: you have no training runs yet", file=sys.stderr)
                return
            runs = [newest[0].training_run_id]
        for run_id in runs:
            client.get_training_run(run_id)  # a run that is not yours fails here, in one line
        session = self._session()
        overrides = {k: v for k, v in (("x_axis", ns.x_axis), ("log_scale", ns.log_scale),
                                       ("smoothing", ns.smoothing)) if v is not None}
        plot = session.new_plot(runs, **overrides)
        plot.show()
        session.register_plot(plot, finalize_with_cell=True)

    def _resume(self, args: list[str]) -> None:
        p = _parser("resume")
        p.add_argument("run")
        p.add_argument("checkpoint", nargs="?", default="latest")
        p.add_argument("--model", default=None, help="the variable holding the model to resume into")
        ns = p.parse_args(args)
        client = current_client()
        self._reachable(client)
        from .resume import resume

        result = resume(ns.run, ns.checkpoint, namespace=self.shell.user_ns, model=ns.model)
        display(result)

    def _session(self) -> Any:
        from .session import TwinkleSession, get_session

        session = get_session(self.shell)
        if session is None:  # the magics registered without the extension (tests, embedding)
            session = TwinkleSession(self.shell, self)
        return session


class ServerStatus:
    """What ``%twinkle status`` shows: plain text and a small HTML table."""

    def __init__(self, url: str, info: Any) -> None:
        self.url = url
        self.info = info

    def rows(self) -> list[tuple[str, str]]:
        i = self.info
        return [
            ("server", f"{self.url} (twinkle {i.version})"),
            ("user", i.user),
            ("base model", i.base_model),
            ("adapter slots", f"{i.free_slots} free of {i.max_loras} (max LoRA rank {i.max_r})"),
            ("device", i.device),
        ]

    def __repr__(self) -> str:
        return "\n".join(f"{k:>13}: {v}" for k, v in self.rows())

    def _repr_html_(self) -> str:
        cells = "".join(
            f'<tr><th style="text-align:right;padding-right:1em">{html.escape(k)}</th>'
            f'<td style="text-align:left">{html.escape(v)}</td></tr>'
            for k, v in self.rows()
        )
        return f"<table>{cells}</table>"
