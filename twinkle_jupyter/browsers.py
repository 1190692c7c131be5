"""``RunBrowser`` and ``CheckpointBrowser``: the user's runs and a run's checkpoints, with actions.

Each browser is a small ipywidgets form: a read-only HTML table (it also goes into the
output bundle as ``text/html``, so a saved notebook or an HTML export shows it without a
kernel), a selector, action buttons and a one-line status. Every action is also a method
(``plot``, ``compare``, ``show_checkpoints``, ``set_filter``, ``resume``, ``copy_path``,
``delete``, ``try_checkpoint``) so a cell or a test can do what a click does. A twinkle error is shown in the status line as
``str(err)``, never raised out of a click.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, MutableMapping
from datetime import datetime, timezone
from typing import Any

import ipywidgets as widgets

from .connection import current_client, one_line_error
from .runinfo import RunComparison, config_summary, parse_filter, text
from .settings import DEFAULTS, check

__all__ = ["ActionError", "CheckpointBrowser", "RunBrowser"]

_TABLE_STYLE = "border-collapse:collapse;font-size:12px;margin:2px 0"
_TH = "text-align:left;padding:2px 10px 2px 0;border-bottom:1px solid #ccc"
_TD = "text-align:left;padding:1px 10px 1px 0"


def _ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "—"
    now = now or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    s = max(0.0, (now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def _when(when: datetime | None) -> str:
    if when is None:
        return "—"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def _size(n: int | None) -> str:
    if not n:
        return "—"
    k = min(4, int(math.log(max(n, 1), 1024)))
    return f"{n / 1024**k:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][k]}" if k else f"{n} B"


def _loss(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th style="{_TH}">{html.escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_TD}">{html.escape(c)}</td>' for c in row) + "</tr>" for row in rows
    )
    return f'<table style="{_TABLE_STYLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _row_table(cells: list[str], widths: list[int], *, head: bool = False) -> str:
    """One row as a table of fixed column widths (in ``ch``), so that rows drawn as separate
    widgets, each beside its own button, line up as one table."""
    tag, style = ("th", _TH) if head else ("td", _TD)
    cols = "".join(f'<col style="width:{w}ch">' for w in widths)
    body = "".join(
        f'<{tag} style="{style};overflow:hidden;text-overflow:ellipsis;white-space:nowrap" '
        f'title="{html.escape(c, quote=True)}">{html.escape(c)}</{tag}>'
        for c in cells
    )
    return (f'<table style="{_TABLE_STYLE};table-layout:fixed;width:{sum(widths)}ch">'
            f"<colgroup>{cols}</colgroup><tr>{body}</tr></table>")


def _text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _default_namespace() -> MutableMapping[str, Any] | None:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return None
    return shell.user_ns if shell is not None else None


class ActionError(ValueError):
    """A browser action that cannot run as asked (nothing selected, unknown checkpoint)."""


class _Browser(widgets.VBox):
    """Shared parts: status line, output area for what actions open, static fallback."""

    def __init__(self, client: Any, namespace: MutableMapping[str, Any] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._client = client
        self.namespace = namespace
        self.title = widgets.HTML()
        self.table = widgets.HTML()
        self.status = widgets.HTML()
        self.output = widgets.Output()
        self._opened: list[Any] = []
        self._headers: list[str] = []
        self._rows: list[list[str]] = []

    @property
    def client(self) -> Any:
        return current_client(self._client)

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#a00" if error else "#333"
        self.status.value = f'<div style="font-size:12px;color:{color}">{html.escape(text)}</div>'
        self.last_message = text

    def _guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an action; a twinkle (or connection) error goes to the status line as one line."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from .connection import is_twinkle_error

            if not is_twinkle_error(exc) and not isinstance(exc, ConnectionError | ActionError):
                raise
            self._say(str(exc) if isinstance(exc, ActionError) else one_line_error(exc), error=True)
            return None

    def _show(self, *items: Any) -> None:
        """Show what an action opened below the browser, replacing what was there."""
        for old in self._opened:
            stop = getattr(old, "stop", None)
            if callable(stop):
                stop(timeout=0.5)
        self._opened = list(items)
        self.output.clear_output(wait=True)
        with self.output:
            from IPython.display import display

            display(*items)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        # Widgets die with the kernel: the table also goes as HTML and text for saved notebooks.
        bundle["text/html"] = self.title.value + self.table.value
        bundle["text/plain"] = self.text()
        return bundle

    def text(self) -> str:
        """The current table as plain text."""
        return _text_table(self._headers, self._rows)

    def close(self) -> None:
        for old in self._opened:
            stop = getattr(old, "stop", None)
            if callable(stop):
                stop(timeout=0.5)
        super().close()


class RunBrowser(_Browser):
    """The user's training runs, a page at a time, with their names, tags and key settings, a
    filter box, and Plot, Checkpoints and Compare.

    Args:
        page_size: runs per page.
        client: a ``TwinkleClient`` (default: the current connection).
        namespace: where Resume (in a checkpoint browser opened from here) looks for the
            notebook's model and dataloaders (default: the IPython user namespace).
        filter: only the runs this filter matches (as typed into the filter box): words
            starting with ``#`` are tags the run must carry, the other words a piece of its
            name, e.g. ``"sweep #lr=1e-4"``.
    """

    HEADERS = ["run", "name", "tags", "settings", "created", "last activity", "steps", "last loss", "checkpoints",
               "status", "base model"]

    def __init__(
        self, *, page_size: int = DEFAULTS.page_size, client: Any = None, namespace: MutableMapping[str, Any] | None = None,
        filter: str = "", **kwargs: Any,
    ) -> None:
        super().__init__(client, namespace if namespace is not None else _default_namespace(), **kwargs)
        self.page_size = check("page_size", page_size)
        self.offset = 0
        self.total = 0
        self.runs: list[Any] = []
        self.last_comparison: RunComparison | None = None
        """What the last Compare showed."""
        self.filter_box = widgets.Text(
            value=filter, placeholder="filter: name words, #tag", continuous_update=False,
            layout=widgets.Layout(width="260px"),
        )
        self.filter_box.observe(lambda _c: self._guard(self.set_filter, self.filter_box.value), names="value")
        self._headers = list(self.HEADERS)
        self.selector = widgets.SelectMultiple(
            options=[], rows=min(8, self.page_size), description="runs", layout=widgets.Layout(width="420px"),
            style={"description_width": "40px"},
        )
        self.plot_button = widgets.Button(description="Plot", icon="line-chart", tooltip="live loss plot of the run")
        self.checkpoints_button = widgets.Button(description="Checkpoints", icon="archive")
        self.compare_button = widgets.Button(description="Compare", icon="clone",
                                             tooltip="the settings in which the selected runs differ, and their curves")
        self.refresh_button = widgets.Button(icon="refresh", tooltip="refresh", layout=widgets.Layout(width="36px"))
        self.prev_button = widgets.Button(icon="chevron-left", tooltip="previous page",
                                          layout=widgets.Layout(width="36px"))
        self.next_button = widgets.Button(icon="chevron-right", tooltip="next page",
                                          layout=widgets.Layout(width="36px"))
        self.page_label = widgets.HTML()
        self.plot_button.on_click(lambda _b: self._guard(self.plot))
        self.checkpoints_button.on_click(lambda _b: self._guard(self.show_checkpoints))
        self.compare_button.on_click(lambda _b: self._guard(self.compare))
        self.refresh_button.on_click(lambda _b: self._guard(self.refresh))
        self.prev_button.on_click(lambda _b: self._guard(self.page, self.offset - self.page_size))
        self.next_button.on_click(lambda _b: self._guard(self.page, self.offset + self.page_size))
        self.children = [
            widgets.HBox([self.title, self.refresh_button, self.prev_button, self.page_label, self.next_button,
                          self.filter_box]),
            self.table,
            widgets.HBox([self.selector, widgets.VBox([self.plot_button, self.checkpoints_button,
                                                       self.compare_button])]),
            self.status,
            self.output,
        ]
        self._guard(self.refresh)

    # ------------------------------------------------------------------ data

    def refresh(self) -> None:
        """Fetch the current page again."""
        self.page(self.offset)

    def set_filter(self, line: str) -> None:
        """Show only the runs ``line`` matches (see the class's ``filter``), from the first page."""
        if self.filter_box.value != line:
            self.filter_box.value = line  # its observer comes back here
            return
        self.page(0)

    def page(self, offset: int) -> None:
        """Show the page starting at run ``offset`` (clamped to the runs there are)."""
        offset = max(0, int(offset))
        client = self.client
        client.require_reachable()  # the listing would retry a down server for minutes; say so at once
        name, tags = parse_filter(self.filter_box.value)

        def fetch(at: int) -> Any:
            return client.list_training_runs_with_cursor(limit=self.page_size, offset=at, name=name or None,
                                                         tags=tags)

        runs, cursor = fetch(offset)
        if not runs and offset > 0 and cursor.total_count:
            offset = max(0, (cursor.total_count - 1) // self.page_size * self.page_size)
            runs, cursor = fetch(offset)
        self.runs, self.offset, self.total = list(runs), offset, cursor.total_count
        self._rows = [
            [
                r.training_run_id,
                text(r.name),
                text(r.tags),
                config_summary(r) or "—",
                _when(r.created),
                _ago(r.last_request_time),
                str(r.cur_step),
                _loss(r.last_loss),
                str(r.num_checkpoints),
                r.status + (f" (rev {r.revision})" if r.revision else ""),
                r.base_model,
            ]
            for r in self.runs
        ]
        filtered = bool(name or tags)
        empty = "<i>no runs match the filter</i>" if filtered else "<i>no training runs yet</i>"
        self.table.value = _table(self._headers, self._rows) if self._rows else empty
        first, last = (offset + 1, offset + len(self.runs)) if self.runs else (0, 0)
        self.page_label.value = f'<span style="font-size:12px">{first}–{last} of {self.total}</span>'
        self.title.value = '<b style="font-size:13px">Training runs</b>'
        self.prev_button.disabled = offset == 0
        self.next_button.disabled = offset + len(self.runs) >= self.total
        keep = [v for v in self.selector.value if v in {r.training_run_id for r in self.runs}]
        self.selector.options = [
            (f"{r.training_run_id}{f' {r.name}' if r.name else ''} · step {r.cur_step} · loss {_loss(r.last_loss)}",
             r.training_run_id)
            for r in self.runs
        ]
        self.selector.value = tuple(keep)
        one = self.total == 1
        self._say(f"{self.total} run{'' if one else 's'}" + ((" matches" if one else " match") + " the filter"
                                                            if filtered else ""))

    @property
    def run_ids(self) -> list[str]:
        """The run ids on the current page, newest first."""
        return [r.training_run_id for r in self.runs]

    def select(self, *run_ids: str) -> None:
        """Select runs on the current page (as clicking them would)."""
        missing = [r for r in run_ids if r not in self.run_ids]
        if missing:
            raise ActionError(f"not on this page: {', '.join(missing)}")
        self.selector.value = tuple(run_ids)

    def _selected(self, run_ids: Any, *, single: bool) -> list[str]:
        if run_ids is None:
            chosen = list(self.selector.value)
        elif isinstance(run_ids, str):
            chosen = [run_ids]
        else:
            chosen = list(run_ids)
        if not chosen:
            raise ActionError("select a run first")
        if single and len(chosen) > 1:
            raise ActionError("select one run (Compare overlays several)")
        return chosen

    # ------------------------------------------------------------------ actions

    def plot(self, run_id: str | None = None) -> Any:
        """Open a live loss plot of the run (the selected one by default)."""
        from .session import get_session

        (rid,) = self._selected(run_id, single=True)
        return self._open_plot([rid], get_session())

    def compare(self, run_ids: Any = None) -> Any:
        """Show the settings in which several runs (the selected ones by default) differ, over
        their loss curves overlaid; returns the plot (``last_comparison`` holds the table)."""
        from .session import get_session

        chosen = self._selected(run_ids, single=False)
        # Fetched first: a run that is not yours fails here, in one line.
        comparison = RunComparison([self.client.get_training_run(rid) for rid in chosen])
        self.last_comparison = comparison
        return self._open_plot(chosen, get_session(), comparison)

    def _open_plot(self, run_ids: list[str], session: Any, *above: Any) -> Any:
        if not above:
            for rid in run_ids:
                self.client.get_training_run(rid)  # one clear line for a run that is not yours
        if session is not None:
            plot = session.new_plot(run_ids, auto_finalize=True)
        else:
            from .plot import LossPlot

            plot = LossPlot(run_ids, client=self._client, auto_finalize=True)
        self._show(*above, plot)
        self._say(f"plotting {', '.join(run_ids)}")
        return plot

    def show_checkpoints(self, run_id: str | None = None) -> CheckpointBrowser:
        """Open the checkpoint browser of the run (the selected one by default)."""
        (rid,) = self._selected(run_id, single=True)
        browser = CheckpointBrowser(rid, client=self._client, namespace=self.namespace)
        self._show(browser)
        self._say(f"checkpoints of {rid}")
        return browser


class CheckpointBrowser(_Browser):
    """A run's checkpoints with Resume, Copy path and Delete (which asks first), and a Try
    button on each row.

    Resume calls :func:`twinkle_jupyter.resume.resume` with the notebook's namespace and shows
    the equivalent ``%twinkle resume RUN CKPT`` line. Try opens a
    :class:`~twinkle_jupyter.chat.ChatWidget` with that checkpoint below the browser; shown
    with :meth:`show`, the browser keeps that chat's transcript as HTML in its cell's output.
    """

    HEADERS = ["checkpoint", "step", "saved", "size", "loss at save", "optimizer", "path", "tinker path"]

    def __init__(
        self, run_id: str, *, client: Any = None, namespace: MutableMapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(client, namespace if namespace is not None else _default_namespace(), **kwargs)
        self.run_id = run_id
        self.checkpoints: list[Any] = []
        self.last_result: Any = None
        self.last_chat: Any = None
        """The chat the last Try opened."""
        self.static_handle: Any = None
        """The display handle of the output that keeps a Try chat's transcript (see :meth:`show`)."""
        self.try_buttons: dict[str, widgets.Button] = {}
        """Each checkpoint's Try button, by checkpoint id."""
        # The rows: a Try button beside each, so the table is a grid of button + one-row table.
        self.rows = widgets.GridBox(layout=widgets.Layout(grid_template_columns="auto auto", align_items="center",
                                                          justify_content="flex-start", grid_gap="0px 4px",
                                                          overflow="auto"))  # a wide table scrolls
        self._headers = list(self.HEADERS)
        self.selector = widgets.Select(options=[], rows=5, description="checkpoint",
                                       layout=widgets.Layout(width="420px"), style={"description_width": "72px"})
        self.resume_button = widgets.Button(description="Resume", icon="play", button_style="primary",
                                            tooltip="restore this checkpoint into the notebook's model and dataloader")
        self.copy_html = widgets.HTML()
        self.delete_button = widgets.Button(description="Delete", icon="trash", button_style="danger")
        self.refresh_button = widgets.Button(icon="refresh", tooltip="refresh", layout=widgets.Layout(width="36px"))
        self.confirm_button = widgets.Button(description="Yes, delete", button_style="danger")
        self.cancel_button = widgets.Button(description="Cancel")
        self.confirm_label = widgets.HTML()
        self.confirm_box = widgets.HBox([self.confirm_label, self.confirm_button, self.cancel_button],
                                        layout=widgets.Layout(display="none"))
        self.magic_line = widgets.Text(description="same as", disabled=False, layout=widgets.Layout(width="520px",
                                       display="none"), style={"description_width": "56px"})
        self.resume_button.on_click(lambda _b: self._guard(self.resume))
        self.delete_button.on_click(lambda _b: self._guard(self.delete))
        self.confirm_button.on_click(lambda _b: self._guard(self.delete, confirm=True))
        self.cancel_button.on_click(lambda _b: self._cancel_delete())
        self.refresh_button.on_click(lambda _b: self._guard(self.refresh))
        self.selector.observe(lambda _c: self._update_copy(), names="value")
        self._pending_delete: str | None = None
        self.children = [
            widgets.HBox([self.title, self.refresh_button]),
            self.rows,
            widgets.HBox([self.selector, widgets.VBox([self.resume_button, self.copy_html, self.delete_button])]),
            self.confirm_box,
            self.status,
            self.magic_line,
            self.output,
        ]
        self._guard(self.refresh)

    # ------------------------------------------------------------------ data

    def refresh(self) -> None:
        """Fetch the run's checkpoints again."""
        self.title.value = f'<b style="font-size:13px">Checkpoints of {html.escape(self.run_id)}</b>'
        client = self.client
        client.require_reachable()  # the listing would retry a down server for minutes; say so at once
        self.checkpoints = sorted(client.list_checkpoints(self.run_id), key=lambda c: (c.step, c.time))
        self._rows = [
            [c.checkpoint_id, str(c.step), _when(c.time), _size(c.size_bytes), _loss(c.loss),
             "yes" if c.has_optimizer else "no", c.twinkle_path, getattr(c, "tinker_path", None) or ""]
            for c in self.checkpoints
        ]
        self.table.value = _table(self._headers, self._rows) if self._rows else "<i>no checkpoints yet</i>"
        self._build_rows()
        current = self.selector.value
        self.selector.options = [(f"{c.checkpoint_id} · step {c.step}", c.checkpoint_id) for c in self.checkpoints]
        ids = self.checkpoint_ids
        self.selector.value = current if current in ids else (ids[-1] if ids else None)
        self._update_copy()
        for button in (self.resume_button, self.delete_button):
            button.disabled = not ids
        self._say(f"{len(ids)} checkpoint{'s' if len(ids) != 1 else ''}")

    def _build_rows(self) -> None:
        """The rows as widgets: a Try button, then the row's cells."""
        old = list(self.rows.children)
        if not self._rows:
            self.try_buttons = {}
            self.rows.children = [widgets.HTML("<i>no checkpoints yet</i>")]
        else:
            widths = [max(len(h), *(len(r[i]) for r in self._rows)) + 3 for i, h in enumerate(self._headers)]
            children: list[widgets.Widget] = [widgets.HTML(""), widgets.HTML(_row_table(self._headers, widths,
                                                                                          head=True))]
            self.try_buttons = {}
            for ckpt, row in zip(self.checkpoints, self._rows, strict=True):
                button = widgets.Button(description="Try", icon="comments", tooltip=f"chat with {ckpt.checkpoint_id}",
                                        layout=widgets.Layout(width="64px", height="26px"))
                button.add_class("twinkle-try")
                button.on_click(lambda _b, cid=ckpt.checkpoint_id: self._guard(self.try_checkpoint, cid))
                self.try_buttons[ckpt.checkpoint_id] = button
                children += [button, widgets.HTML(_row_table(row, widths))]
            self.rows.children = children
        for widget in old:  # each refresh makes new ones: free the old models
            widget.close()

    @property
    def checkpoint_ids(self) -> list[str]:
        """Checkpoint ids, oldest first."""
        return [c.checkpoint_id for c in self.checkpoints]

    def select(self, checkpoint_id: str) -> None:
        """Select a checkpoint (as clicking it would)."""
        if checkpoint_id not in self.checkpoint_ids:
            raise ActionError(f"run {self.run_id} has no checkpoint {checkpoint_id!r}")
        self.selector.value = checkpoint_id

    def _chosen(self, checkpoint_id: str | None) -> Any:
        wanted = checkpoint_id or self.selector.value
        if not wanted:
            raise ActionError("select a checkpoint first")
        for c in self.checkpoints:
            if c.checkpoint_id == wanted:
                return c
        raise ActionError(f"run {self.run_id} has no checkpoint {wanted!r}")

    def _update_copy(self) -> None:
        ckpt = next((c for c in self.checkpoints if c.checkpoint_id == self.selector.value), None)
        if ckpt is None:
            self.copy_html.value = ""
            return
        path = html.escape(ckpt.twinkle_path, quote=True)
        # The copy happens in the browser, so it works even while the kernel is busy.
        self.copy_html.value = (
            f'<button class="jupyter-button widget-button" style="width:148px" title="{path}" '
            f'data-path="{path}" onclick="navigator.clipboard &amp;&amp; '
            f'navigator.clipboard.writeText(this.dataset.path); this.textContent=\'copied ✓\'">'
            f"Copy path</button>"
        )

    # ------------------------------------------------------------------ actions

    def resume(self, checkpoint_id: str | None = None) -> Any:
        """Resume the run from the checkpoint (the selected one by default) into the notebook's
        model and dataloader; returns the :class:`~twinkle_jupyter.resume.ResumeResult`."""
        from .resume import resume

        ckpt = self._chosen(checkpoint_id)
        if self.namespace is None:
            raise ActionError("no notebook namespace to resume into (pass namespace=...)")
        self._say(f"resuming {self.run_id} from {ckpt.checkpoint_id}…")
        result = resume(self.run_id, ckpt.checkpoint_id, namespace=self.namespace, client=self._client)
        self.last_result = result
        self._say(str(result).split(" Same as:")[0])
        self.magic_line.value = result.magic
        self.magic_line.layout.display = ""
        return result

    def try_checkpoint(self, checkpoint_id: str | None = None, *, compare: Any = None) -> Any:
        """Open a chat with the checkpoint (the selected one by default) below the browser,
        replacing what was there; ``compare`` is a second source (``'base'``, ``'latest'``, a
        checkpoint id). Returns the :class:`~twinkle_jupyter.chat.ChatWidget`."""
        from .chat import ChatWidget

        ckpt = self._chosen(checkpoint_id)
        chat = ChatWidget(self.run_id, ckpt.twinkle_path, compare=compare, client=self._client)
        self._show(chat)  # stops the chat shown before: it no longer writes the saved copy
        if self.static_handle is not None:
            chat.attach(self.static_handle)
        self.last_chat = chat
        self._say(f"chat with {ckpt.checkpoint_id}")
        return chat

    def show(self) -> Any:
        """Display the browser and, below it, an output that keeps the transcript of a chat
        opened with Try as HTML (what a saved notebook shows without the kernel); returns
        that output's handle."""
        from IPython.display import display

        display(self)
        self.static_handle = display({"text/html": "", "text/plain": ""}, raw=True, display_id=True)
        return self.static_handle

    def copy_path(self, checkpoint_id: str | None = None) -> str:
        """The checkpoint's ``twinkle://`` path (the button copies it to the clipboard)."""
        ckpt = self._chosen(checkpoint_id)
        self.magic_line.value = ckpt.twinkle_path
        return ckpt.twinkle_path

    def delete(self, checkpoint_id: str | None = None, *, confirm: bool = False) -> bool:
        """Delete a checkpoint. Without ``confirm`` it only asks (shows Yes/Cancel); returns
        whether it deleted."""
        if confirm and checkpoint_id is None and self._pending_delete is not None:
            checkpoint_id = self._pending_delete
        ckpt = self._chosen(checkpoint_id)
        if not confirm:
            self._pending_delete = ckpt.checkpoint_id
            self.confirm_label.value = (
                f'<span style="font-size:12px">Delete {html.escape(ckpt.checkpoint_id)} '
                f"(step {ckpt.step})? This cannot be undone.</span>"
            )
            self.confirm_box.layout.display = ""
            return False
        self._cancel_delete()
        reply = self.client.delete_checkpoint(self.run_id, ckpt.checkpoint_id)
        self.refresh()
        self._say(reply.message or f"deleted {ckpt.checkpoint_id}", error=not reply.success)
        return bool(reply.success)

    def _cancel_delete(self) -> None:
        self._pending_delete = None
        self.confirm_box.layout.display = "none"


