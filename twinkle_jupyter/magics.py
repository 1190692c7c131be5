"""``%twinkle``: connect, status, runs (name, tag, show, compare), checkpoints, plot, resume and
chat from a notebook.

Settings are ``%config TwinkleMagics.<name> = value`` (or ``c.TwinkleMagics.<name>`` in
``ipython_config.py``). A twinkle error (server down, wrong key, a run that is not yours, a
checkpoint that does not fit) prints one line, never a traceback, and the cell succeeds, so
"Run all" in a notebook is not derailed by a monitoring line. The command line is parsed by
argparse (``%twinkle help`` is its help text); wrong arguments raise IPython's ``UsageError``
(also one line). The settings' defaults, help texts and bounds are those of
:mod:`twinkle_jupyter.settings`.
"""

from __future__ import annotations

import argparse
import functools
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
from .settings import SETTINGS, X_AXES, check

__all__ = ["TwinkleMagics"]


class _HelpShown(Exception):
    """``-h``/``--help`` printed a help text: the line is done."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad line as one ``UsageError`` instead of exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:  # type: ignore[override]
        if status == 0 and not message:
            raise _HelpShown
        raise UsageError(message.strip() if message else f"{self.prog}: see %twinkle help")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, max_help_position=32, width=100)


def _setting_type(name: str, kind: type = float) -> Any:
    """An argparse ``type`` that reads a ``kind`` and checks it against setting ``name``'s bound."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        try:
            return check(name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


@functools.cache
def _parser() -> _Parser:
    """The ``%twinkle`` command line: its subcommands, their arguments and the help text."""
    parser = _Parser(
        prog="%twinkle", formatter_class=_formatter, allow_abbrev=False,
        description="twinkle from the notebook: connect, browse runs and checkpoints, plot, resume.",
        epilog="%twinkle help COMMAND (or %twinkle COMMAND -h) shows a command's arguments. "
               "Settings: %config TwinkleMagics",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)

    def command(name: str, summary: str, handler: str, *, aliases: tuple[str, ...] = ()) -> _Parser:
        sub = commands.add_parser(name, aliases=list(aliases), help=summary, description=summary,
                                  formatter_class=_formatter, allow_abbrev=False)
        sub.set_defaults(handler=handler)
        return sub

    p = command("help", "this help, or a command's", "_help")
    p.add_argument("topic", nargs="?", metavar="COMMAND", help="the command to explain")
    p = command("connect", "connect (key from $TWINKLE_SERVER_TOKEN, else a hidden prompt)", "_connect")
    p.add_argument("url", nargs="?", metavar="URL",
                   help="the server (default: TwinkleMagics.server_url, else $TWINKLE_SERVER_URL)")
    command("status", "server, user, base model, free adapter slots", "_status")
    p = command("runs", "your training runs with their settings (browser: filter, plot, checkpoints, compare)",
                "_runs")
    p.add_argument("--limit", type=_setting_type("page_size", int), default=None, metavar="N",
                   help="runs per page (default: TwinkleMagics.page_size)")
    p.add_argument("--name", default=None, metavar="TEXT", help="only runs whose name contains TEXT (any case)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG",
                   help="only runs tagged TAG (repeat: runs with every tag)")
    p = command("show", "a run's name, tags and recorded settings", "_show")
    p.add_argument("run", metavar="RUN", help="the training run id")
    p = command("compare", "the settings in which runs differ", "_compare")
    p.add_argument("runs", nargs="+", metavar="RUN", help="two training run ids or more")
    p = command("label", "name a run, tag it, record its dataset", "_label")
    p.add_argument("run", metavar="RUN", help="the training run id")
    p.add_argument("--name", default=None, metavar="NAME", help="the run's name ('' removes it)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="add a tag (repeatable)")
    p.add_argument("--untag", action="append", default=[], metavar="TAG", help="remove a tag (repeatable)")
    p.add_argument("--dataset", default=None, metavar="ID",
                   help="the dataset id it trains on, e.g. ms://org/name ('' removes it)")
    p = command("checkpoints", "a run's checkpoints (browser: resume, copy path, delete)", "_checkpoints",
                aliases=("ckpts",))
    p.add_argument("run", metavar="RUN", help="the training run id")
    p = command("plot", "a live loss plot (several runs are overlaid; default: the newest run)", "_plot")
    p.add_argument("runs", nargs="*", metavar="RUN", help="training run ids")
    p.add_argument("--x", choices=X_AXES, default=None, dest="x_axis", help="the x axis")
    p.add_argument("--log", action="store_true", default=None, dest="log_scale", help="log scale for the loss")
    p.add_argument("--smoothing", type=_setting_type("smoothing"), default=None, metavar="W",
                   help="EMA weight of the smoothed loss, in [0, 1)")
    p = command("resume", "put a checkpoint back into the notebook's model and dataloader", "_resume")
    p.add_argument("run", metavar="RUN", help="the training run id")
    p.add_argument("checkpoint", nargs="?", default="latest", metavar="CKPT",
                   help="a checkpoint id, path or 'latest' (default)")
    p.add_argument("--model", default=None, help="the variable holding the model to resume into")
    p = command("chat", "a chat widget: ask a checkpoint, the newest one or the base model; two side by side",
                "_chat")
    p.add_argument("run", nargs="?", default=None, metavar="RUN", help="the training run (default: the newest)")
    p.add_argument("checkpoint", nargs="?", default=None, metavar="CKPT|latest|base",
                   help="what answers: a checkpoint id or twinkle:// path, 'latest' (default) or 'base'")
    p.add_argument("--compare", default=None, metavar="CKPT|latest|base",
                   help="a second source answering the same prompt beside the first")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="ask this at once and wait for the answers (so Run All saves them with the notebook)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="tokens per answer at most (64)")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="0 (default): greedy")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="makes temperature sampling repeatable")
    return parser


def _trait(name: str) -> Any:
    """The ``%config`` trait of setting ``name`` (default, help text and choices from the settings)."""
    setting = SETTINGS[name]
    if setting.choices is not None:
        return Enum(list(setting.choices), setting.default, help=setting.help).tag(config=True)
    kind = {bool: Bool, int: Int, float: Float}[type(setting.default)]
    return kind(setting.default, help=setting.help).tag(config=True)


@magics_class
class TwinkleMagics(Magics):
    """The ``%twinkle`` line magic and the extension's settings."""

    server_url = Unicode(
        "", help="Default URL for %twinkle connect (else $TWINKLE_SERVER_URL, else http://127.0.0.1:8000)."
    ).tag(config=True)
    poll_interval = _trait("poll_interval")
    max_redraw_hz = _trait("max_redraw_hz")
    max_points = _trait("max_points")
    smoothing = _trait("smoothing")
    x_axis = _trait("x_axis")
    log_scale = _trait("log_scale")
    auto_plot = _trait("auto_plot")
    stop_between_calls = _trait("stop_between_calls")
    show_controls = _trait("show_controls")
    plot_width = _trait("plot_width")
    plot_height = _trait("plot_height")
    page_size = _trait("page_size")

    @validate(*(name for name, setting in SETTINGS.items() if setting.validate is not None))
    def _check_setting(self, proposal: Any) -> Any:
        try:
            return check(proposal["trait"].name, proposal["value"])
        except ValueError as exc:
            raise TraitError(str(exc)) from None

    # ------------------------------------------------------------------ dispatch

    @line_magic
    def twinkle(self, line: str = "") -> None:
        """Twinkle from the notebook. ``%twinkle help`` lists the commands."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%twinkle: {exc}") from None
        try:
            args = _parser().parse_args(words or ["help"])
        except _HelpShown:
            return None
        try:
            getattr(self, args.handler)(args)
        except UsageError:
            raise
        except Exception as exc:
            from .connection import is_twinkle_error

            if not is_twinkle_error(exc) and not isinstance(exc, ConnectionError):
                raise
            print(f"twinkle: {one_line_error(exc)}", file=sys.stderr)
        return None

    # ------------------------------------------------------------------ commands

    def _help(self, args: argparse.Namespace) -> None:
        parser = _parser()
        if args.topic is None:
            print(parser.format_help().rstrip())
            return
        try:
            parser.parse_args([args.topic, "--help"])
        except _HelpShown:
            pass

    def _connect(self, args: argparse.Namespace) -> None:
        url = args.url or self.server_url or os.environ.get("TWINKLE_SERVER_URL") or None
        key = os.environ.get("TWINKLE_SERVER_TOKEN")
        if not key:
            # getpass: typed hidden, never echoed, never part of the cell or its output.
            key = getpass.getpass("twinkle API key: ")
        from twinkle_client import TwinkleClient, init_twinkle_client

        # Check the new URL and key before replacing a connection that works.
        with TwinkleClient(base_url=url, api_key=key or None) as probe:
            probe.require_reachable()
            probe.get_server_info()
        client = init_twinkle_client(base_url=url, api_key=key or None)
        info = client.get_server_info()
        print(
            f"twinkle: connected to {client.base_url} as {info.user} "
            f"(base model {info.base_model}, {info.free_slots}/{info.max_loras} adapter slots free)"
        )

    # Each command asks the health route first (require_reachable): the calls after it retry
    # an unreachable server for minutes, a magic should say at once that it is down.

    def _status(self, args: argparse.Namespace) -> None:
        client = current_client()
        client.require_reachable()
        info = client.get_server_info()
        display(ServerStatus(client.base_url, info))

    def _runs(self, args: argparse.Namespace) -> None:
        line = self._runs_filter(args)
        current_client().require_reachable()
        from .browsers import RunBrowser

        display(RunBrowser(page_size=args.limit or self.page_size, namespace=self.shell.user_ns, filter=line))

    def _runs_filter(self, args: argparse.Namespace) -> str:
        """``--name``/``--tag`` as the browser's filter line (tags are checked here, so a bad one
        is one line before any widget is made)."""
        from twinkle.protocol.names import check_run_name, check_tag

        words = [check_run_name(args.name)] if args.name else []
        return " ".join(words + [f"#{check_tag(t)}" for t in args.tag])

    def _show(self, args: argparse.Namespace) -> None:
        client = current_client()
        client.require_reachable()
        from .runinfo import RunSummary

        display(RunSummary(client.get_training_run(args.run)))

    def _compare(self, args: argparse.Namespace) -> None:
        runs = list(dict.fromkeys(args.runs))
        if len(runs) < 2:
            raise UsageError("%twinkle compare: give two different runs or more")
        client = current_client()
        client.require_reachable()
        from .runinfo import compare_runs

        display(compare_runs(client, runs))

    def _label(self, args: argparse.Namespace) -> None:
        if args.name is None and args.dataset is None and not args.tag and not args.untag:
            raise UsageError("%twinkle label: say what to set: --name, --tag, --untag or --dataset")
        client = current_client()
        client.require_reachable()
        tags = None
        if args.tag or args.untag:
            current = client.get_training_run(args.run).tags  # a run that is not yours fails here
            drop = set(args.untag)
            tags = [t for t in dict.fromkeys([*current, *args.tag]) if t not in drop]
        run = client.update_training_run(args.run, name=args.name, tags=tags, dataset=args.dataset)
        from .runinfo import text

        print(f"twinkle: {run.training_run_id}: name {text(run.name)}; tags {text(run.tags)}; "
              f"dataset {text(run.config.dataset)}")

    def _checkpoints(self, args: argparse.Namespace) -> None:
        client = current_client()
        client.require_reachable()
        client.get_training_run(args.run)  # a run that is not yours fails here, in one line
        from .browsers import CheckpointBrowser

        CheckpointBrowser(args.run, namespace=self.shell.user_ns).show()

    def _plot(self, args: argparse.Namespace) -> None:
        client = current_client()
        client.require_reachable()
        runs = list(dict.fromkeys(args.runs))
        if not runs:
            newest = client.list_training_runs(limit=1)
            if not newest:
                print("twinkle: you have no training runs yet", file=sys.stderr)
                return
            runs = [newest[0].training_run_id]
        for run_id in runs:
            client.get_training_run(run_id)  # a run that is not yours fails here, in one line
        session = self._session()
        overrides = {k: v for k, v in (("x_axis", args.x_axis), ("log_scale", args.log_scale),
                                       ("smoothing", args.smoothing)) if v is not None}
        plot = session.new_plot(runs, **overrides)
        plot.show()
        session.register_plot(plot, finalize_with_cell=True)

    def _resume(self, args: argparse.Namespace) -> None:
        current_client().require_reachable()
        from .resume import resume

        result = resume(args.run, args.checkpoint, namespace=self.shell.user_ns, model=args.model)
        display(result)

    def _chat(self, args: argparse.Namespace) -> None:
        from twinkle.protocol.names import is_run_id, split_twinkle_path

        if args.prompt is not None and not args.prompt.strip():
            raise UsageError("%twinkle chat: --prompt is empty")

        run, source = args.run, args.checkpoint
        if run is not None and source is None and not is_run_id(run):
            run, source = None, run  # `%twinkle chat base`, `%twinkle chat twinkle://...`
        source = source or "latest"
        client = current_client()
        client.require_reachable()
        if run is None:
            parts = split_twinkle_path(source)
            if parts is not None:
                run = parts[0]
            elif source != "base" or args.compare not in (None, "base"):
                newest = client.list_training_runs(limit=1)
                if not newest:
                    print("twinkle: you have no training runs yet (`%twinkle chat base` asks the base model)",
                          file=sys.stderr)
                    return
                run = newest[0].training_run_id
        if run is not None:
            client.get_training_run(run)  # a run that is not yours fails here, in one line
        params = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                    ("seed", args.seed)) if v is not None}
        from .chat import ChatWidget

        try:
            chat = ChatWidget(run, source, compare=args.compare, sampling_params=params)
        except ValueError as exc:
            from .connection import is_twinkle_error

            if is_twinkle_error(exc):
                raise
            raise UsageError(f"%twinkle chat: {exc}") from None  # a source or setting that cannot be
        chat.show()
        if args.prompt:
            chat.prompt_box.value = args.prompt
            chat.send()
            chat.wait()

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
