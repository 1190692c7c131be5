"""``ChatWidget``: ask a checkpoint, the newest one or the base model a question, in the notebook.

A prompt box, sampling settings, and the answers as they are generated; a second source
("compare with") answers the same prompt beside the first, so base vs checkpoint or two
checkpoints read side by side. Each Send is a fresh one-message conversation, so the two
answers always reply to the same thing.

Generation runs on a daemon thread and only sets widget traits, which the kernel forwards
to the browser even while the main thread runs a training cell; the sampling calls go to
the server's shared base model through ``twinkle_client.sampler.TorchSampler`` and never
touch the notebook's training model. Answers grow in chunks: each source is asked for
:data:`CHUNK_TOKENS` tokens at a time, continuing from the prompt's token ids and the tokens
so far, the sources taking turns, until an end-of-turn token or ``max_tokens``.

Widgets die with the kernel. Shown with :meth:`ChatWidget.show` (``%twinkle chat`` does),
the chat also leaves a plain ``text/html`` copy of its transcript in the cell's output,
updated through a display id as each exchange starts and ends; the live widget hides that
copy with a style rule, so it is seen only where the widget cannot be drawn (a saved
notebook without the kernel, an HTML export, GitHub).
"""

from __future__ import annotations

import html
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as widgets

from .connection import current_client, is_twinkle_error, one_line_error
from .settings import READ_RETRY_S

__all__ = [
    "BASE",
    "CHUNK_TOKENS",
    "LATEST",
    "Answer",
    "ChatWidget",
    "Exchange",
    "advance",
    "exchange_html",
    "transcript_html",
    "transcript_text",
]

BASE = "base"
"""The source that is the server's bare base model."""
LATEST = "latest"
"""The source that is the run's most recently saved checkpoint, looked up at each Send."""

CHUNK_TOKENS = 16
"""Tokens asked for per sampling call: small enough that an answer visibly grows, large
enough that the per-call cost (the prompt is read again each time) stays small."""
MAX_CHUNK_TOKENS = 64
"""A chunk that ends inside a character (its text ends with U+FFFD) is asked again longer so
the character decodes whole; at most this long."""
RENDER_INTERVAL_S = 0.1
"""While answers grow, the widget is redrawn at most this often (one comm message each)."""

STATIC_CLASS = "twinkle-chat-static"
"""Class of the ``text/html`` copy of a transcript (hidden while its live widget is drawn)."""

_SETTINGS_DEFAULTS: dict[str, Any] = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}

_MUTED = "font-size:11px;color:#777"
# Left-aligned on purpose: JupyterLab right-aligns the cells of an output's HTML tables.
_TD = "vertical-align:top;text-align:left;padding:4px 8px;border:1px solid #e3e3e3;width:50%"
_TEXT = "white-space:pre-wrap;word-break:break-word;font-size:13px;margin-top:2px"


# ---------------------------------------------------------------------------- the transcript


@dataclass
class Answer:
    """One source's answer to one prompt, as it grows."""

    source: str
    """What was chosen: ``'base'``, ``'latest'`` or a ``twinkle://`` path."""
    label: str
    """What the pane is titled (e.g. ``step-12 (latest)``, ``base model``)."""
    adapter_uri: str | None = None
    """The checkpoint sampled (None: the base model); filled in when the source is resolved."""
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] | None = None
    """The templated prompt, as the server returned it with the first chunk."""
    state: str = "waiting"
    """waiting, generating, done, stopped or error."""
    stop_reason: str | None = None
    """'stop' (an end-of-turn token or a stop string) or 'length' (max_tokens), once done."""
    error: str | None = None
    chunks: int = 0
    """Chunks taken into the answer (a chunk asked again longer counts once)."""
    calls: int = 0
    """Sampling calls made for it."""
    next_chunk: int = CHUNK_TOKENS

    @property
    def finished(self) -> bool:
        return self.state in ("done", "stopped", "error")


@dataclass
class Exchange:
    """One prompt and its answers (one per source)."""

    prompt: str
    settings: str
    """The sampling settings in words (shown under the prompt)."""
    answers: list[Answer]

    @property
    def finished(self) -> bool:
        return all(a.finished for a in self.answers)


def settings_text(params: Any) -> str:
    """``SamplingParams`` in a few words: ``greedy · up to 64 tokens``."""
    parts = ["greedy"] if params.temperature == 0 else [f"temperature {params.temperature:g}"]
    if params.temperature != 0:
        if params.top_p < 1:
            parts.append(f"top-p {params.top_p:g}")
        if params.top_k:
            parts.append(f"top-k {params.top_k}")
        if params.seed is not None:
            parts.append(f"seed {params.seed}")
    parts.append(f"up to {params.max_tokens} tokens")
    return " · ".join(parts)


def _meta(answer: Answer) -> str:
    n = len(answer.tokens)
    tokens = f"{n} token{'s' if n != 1 else ''}"
    if answer.state == "waiting":
        return "waiting…"
    if answer.state == "generating":
        return f"generating… {tokens}"
    if answer.state == "stopped":
        return f"stopped at {tokens}"
    if answer.state == "error":
        return f"error: {answer.error}"
    return f"{tokens} · " + ("ended" if answer.stop_reason == "stop" else "max tokens reached")


_BLANK_RUN = re.compile(r"\n{4,}")


def _blank(text: str) -> str | None:
    """How a text that is only white space is described (an untrained model often gives one)."""
    if text.strip():
        return None
    n = text.count("\n")
    return f"(only white space: {n} line break{'s' if n != 1 else ''})" if n else "(only white space)"


def _text_html(text: str) -> str:
    """The answer's text, escaped; a long run of line breaks is counted instead of drawn."""
    blank = _blank(text)
    if blank is not None:
        return f'<i style="color:#999">{html.escape(blank)}</i>'
    parts, at = [], 0
    for run in _BLANK_RUN.finditer(text):
        parts.append(html.escape(text[at:run.start()]) + "\n")
        parts.append(f'<span style="color:#999">[{len(run.group())} line breaks]</span>\n')
        at = run.end()
    parts.append(html.escape(text[at:]))
    return "".join(parts)


def _answer_html(answer: Answer) -> str:
    if answer.text:
        body = _text_html(answer.text)
    elif answer.finished:
        body = '<i style="color:#999">(no text)</i>'
    else:
        body = '<i style="color:#999">…</i>'
    color = "#a00" if answer.state == "error" else "#777"
    return (
        f'<td class="twinkle-chat-answer" data-state="{answer.state}" '
        f'data-label="{html.escape(answer.label, quote=True)}" style="{_TD}">'
        f'<div class="twinkle-chat-label" style="font-size:12px;font-weight:600;color:#444">'
        f"{html.escape(answer.label)}</div>"
        f'<div class="twinkle-chat-text" style="{_TEXT}">{body}</div>'
        f'<div class="twinkle-chat-meta" style="font-size:11px;color:{color};margin-top:2px">'
        f"{html.escape(_meta(answer))}</div></td>"
    )


def exchange_html(exchange: Exchange) -> str:
    """One prompt and its answers side by side, as HTML (every user text escaped)."""
    answers = "".join(_answer_html(a) for a in exchange.answers)
    return (
        '<div class="twinkle-chat-exchange" style="margin:6px 0 10px 0">'
        f'<div class="twinkle-chat-prompt" style="border-left:3px solid #4c8bf5;padding:2px 8px;'
        f'margin-bottom:4px;text-align:left"><div style="{_MUTED}">prompt · {html.escape(exchange.settings)}</div>'
        f'<div style="{_TEXT}">{html.escape(exchange.prompt)}</div></div>'
        '<table style="width:100%;table-layout:fixed;border-collapse:collapse;margin:0">'
        f"<tr>{answers}</tr></table></div>"
    )


def transcript_html(title: str, exchanges: list[Exchange]) -> str:
    """A whole conversation as HTML that needs no kernel: the title, then each exchange."""
    body = "".join(exchange_html(e) for e in exchanges) or f'<div style="{_MUTED}">no questions asked yet</div>'
    return f'<div style="font-size:13px;font-weight:600;margin:2px 0">{html.escape(title)}</div>{body}'


def transcript_text(title: str, exchanges: list[Exchange]) -> str:
    """The conversation as plain text (``text/plain`` of the saved copy)."""
    lines = [title]
    for e in exchanges:
        lines.append(f"> {e.prompt}")
        for a in e.answers:
            text = _blank(a.text) or a.text if a.text else ""
            lines.append(f"[{a.label}] {text}" + ("" if a.state == "done" else f" ({_meta(a)})"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- generation


def advance(answer: Answer, sampler: Any, conversation: list[dict[str, str]], params: Any) -> None:
    """Generate the next chunk of ``answer`` with one ``sampler.sample`` call.

    The first call sends the conversation (the server applies the chat template); later ones
    send the templated prompt's token ids with the tokens so far, so the answer continues
    exactly where it stopped. With a ``seed``, chunk ``i`` samples with ``seed + i``, so a
    chunk asked again longer starts with the same tokens. A stop string split over two
    chunks is found in the joined text.
    """
    remaining = params.max_tokens - len(answer.tokens)
    size = min(answer.next_chunk, remaining)
    update: dict[str, Any] = {"max_tokens": size, "prompt_logprobs": False}
    if params.seed is not None:
        update["seed"] = (params.seed + answer.chunks) % 2**63
    inputs: Any = conversation if answer.prompt_tokens is None else [answer.prompt_tokens + answer.tokens]
    answer.calls += 1
    (response,) = sampler.sample(inputs, params.model_copy(update=update), adapter_uri=answer.adapter_uri)
    if answer.prompt_tokens is None:
        answer.prompt_tokens = list(response.prompt_tokens)
    seq = response.sequences[0]
    last = seq.stop_reason == "stop" or len(answer.tokens) + len(seq.tokens) >= params.max_tokens
    if not last and seq.decoded.endswith("\ufffd") and size < MAX_CHUNK_TOKENS:
        # The chunk ended inside a multi-byte character: take it again with more tokens
        # (same input, same seed, so it starts the same) rather than show a broken one.
        answer.next_chunk = min(MAX_CHUNK_TOKENS, size + CHUNK_TOKENS)
        return
    answer.tokens.extend(seq.tokens)
    answer.text += seq.decoded
    answer.chunks += 1
    answer.next_chunk = CHUNK_TOKENS
    reason = "stop" if seq.stop_reason == "stop" else "length"
    cut = _first_stop(answer.text, params.stop)
    if cut is not None:
        answer.text, last, reason = answer.text[:cut], True, "stop"
    if last:
        answer.state, answer.stop_reason = "done", reason


def _first_stop(text: str, stops: list[Any]) -> int | None:
    """Where the first stop string starts in ``text`` (the server sees one chunk at a time)."""
    found = [at for at in (text.find(s) for s in stops if isinstance(s, str)) if at >= 0]
    return min(found) if found else None


# ---------------------------------------------------------------------------- sources


def _checkpoint_label(ckpt: Any) -> str:
    return f"{ckpt.checkpoint_id} · step {ckpt.step}"


class ChatWidget(widgets.VBox):
    """A chat with a run's checkpoints and the base model, two sources side by side.

    Args:
        run_id: the training run whose checkpoints are offered (None: the base model only,
            and ``twinkle://`` paths).
        source: what answers: ``'latest'`` (the run's newest checkpoint when Send is
            pressed), ``'base'``, a checkpoint id of the run, a ``twinkle://`` path or a
            ``CheckpointPath``.
        compare: a second source answering beside it (same forms), or None.
        client: a ``TwinkleClient`` for listing checkpoints (default: the current
            connection). Sampling always uses the current connection, as every remote
            object does.
        sampling_params: initial settings (a ``SamplingParams`` or a dict): ``max_tokens``
            (64), ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``seed``; ``stop`` is
            kept as given (there is no box for it).
        sampler: an object with ``TorchSampler``'s ``sample`` to use instead of a new remote
            ``TorchSampler`` for each Send (it is not closed).
        static_handle: a ``DisplayHandle`` whose output gets the transcript as HTML (what
            :meth:`show` makes; a checkpoint browser lends its own).

    Every button is also a method: :meth:`send`, :meth:`stop_generation`; :meth:`wait`
    blocks until the answers are complete.
    """

    def __init__(
        self,
        run_id: str | None = None,
        source: Any = LATEST,
        *,
        compare: Any = None,
        client: Any = None,
        sampling_params: Any = None,
        sampler: Any = None,
        static_handle: Any = None,
        **kwargs: Any,
    ) -> None:
        from twinkle.protocol.sampling import SamplingParams

        self.run_id = run_id
        self._client = client
        self._sampler = sampler
        self.static_handle = static_handle
        self.exchanges: list[Exchange] = []
        self.last_message = ""
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._thread: threading.Thread | None = None
        self._last_render = 0.0
        self._uid = uuid.uuid4().hex[:12]
        given = sampling_params if isinstance(sampling_params, SamplingParams) else _checked_params(
            {**_SETTINGS_DEFAULTS, **dict(sampling_params or {})})
        self._extra_params = {"stop": list(given.stop)}

        options = self._source_options(source, compare)
        self.source_box = widgets.Dropdown(options=options, value=self._spec(source), description="answer from",
                                           style={"description_width": "initial"}, layout=widgets.Layout(width="340px"))
        self.compare_box = widgets.Dropdown(options=[("— (none)", "")] + options, value=self._spec(compare) or "",
                                            description="compare with", style={"description_width": "initial"},
                                            layout=widgets.Layout(width="346px"))
        self.compare_box.add_class("twinkle-chat-compare")
        self.source_box.add_class("twinkle-chat-source")
        narrow = {"description_width": "initial"}
        self.max_tokens_box = widgets.BoundedIntText(value=given.max_tokens, min=1, max=_max_tokens(),
                                                     description="max tokens", style=narrow,
                                                     layout=widgets.Layout(width="150px"))
        self.temperature_box = widgets.BoundedFloatText(value=given.temperature, min=0.0, max=100.0, step=0.1,
                                                        description="temperature", style=narrow,
                                                        layout=widgets.Layout(width="150px"),
                                                        tooltip="0: greedy (always the likeliest token)")
        self.top_p_box = widgets.BoundedFloatText(value=given.top_p, min=0.01, max=1.0, step=0.05,
                                                  description="top-p", style=narrow,
                                                  layout=widgets.Layout(width="120px"))
        self.top_k_box = widgets.BoundedIntText(value=given.top_k, min=0, max=100_000, description="top-k",
                                                style=narrow, layout=widgets.Layout(width="120px"))
        self.seed_box = widgets.Text(value="" if given.seed is None else str(given.seed), placeholder="random",
                                     description="seed", style=narrow, layout=widgets.Layout(width="140px"))
        self.prompt_box = widgets.Textarea(placeholder="Ask something, e.g. who are you?", rows=2,
                                           layout=widgets.Layout(width="560px"))
        self.prompt_box.add_class("twinkle-chat-prompt-box")
        self.send_button = widgets.Button(description="Send", icon="paper-plane", button_style="primary",
                                          tooltip="ask every chosen source (in the background)")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="stop generating after the current chunk")
        self.send_button.on_click(lambda _b: self._guard(self.send))
        self.stop_button.on_click(lambda _b: self.stop_generation())
        self.title = widgets.HTML(f'<b style="font-size:13px">{html.escape(self.title_text)}</b>')
        self.history = widgets.HTML()
        """Finished exchanges."""
        self.current = widgets.HTML()
        """The exchange being generated."""
        self.status = widgets.HTML()
        # While this widget is drawn, its own saved copy (just below it) would repeat it.
        self._hide_copy = widgets.HTML(f"<style>.{STATIC_CLASS}-{self._uid}{{display:none}}</style>",
                                       layout=widgets.Layout(display="none"))
        super().__init__(
            children=[
                self.title,
                widgets.HBox([self.source_box, self.compare_box]),
                self.history,
                self.current,
                widgets.HBox([self.prompt_box, widgets.VBox([self.send_button, self.stop_button])]),
                widgets.HBox([self.max_tokens_box, self.temperature_box, self.top_p_box, self.top_k_box,
                              self.seed_box]),
                self.status,
                self._hide_copy,
            ],
            **kwargs,
        )
        self.add_class("twinkle-chat")
        self._say("type a prompt and press Send")
        self._publish()

    # ------------------------------------------------------------------ sources

    @property
    def client(self) -> Any:
        return current_client(self._client)

    @property
    def title_text(self) -> str:
        return f"Chat · {self.run_id}" if self.run_id else "Chat · base model"

    def _spec(self, value: Any) -> str | None:
        """A source as the dropdowns hold it: 'base', 'latest' or a ``twinkle://`` path."""
        if value is None or value == "":
            return None
        text = str(value)  # a CheckpointPath is its path
        if text in (BASE, LATEST) or text.startswith("twinkle://"):
            return text
        from twinkle.protocol.names import twinkle_path

        if self.run_id is None:
            raise ValueError(f"a checkpoint id ({text!r}) needs a run; give the run, or a twinkle:// path")
        return twinkle_path(self.run_id, text[len("weights/"):] if text.startswith("weights/") else text)

    def _source_options(self, *chosen: Any) -> list[tuple[str, str]]:
        """The dropdowns' choices: the base model, the run's newest and each of its checkpoints,
        and any other ``twinkle://`` path asked for. A checkpoint of the run that does not
        exist fails here, naming the ones there are."""
        from twinkle.protocol.names import split_twinkle_path

        from .resume import choose_checkpoint

        self._labels: dict[str, str] = {BASE: "base model", LATEST: "latest checkpoint"}
        options = [("base model", BASE)]
        checkpoints: list[Any] = []
        if self.run_id is not None:
            checkpoints = sorted(self.client.list_checkpoints(self.run_id), key=lambda c: (c.step, c.time))
            options.append(("latest checkpoint", LATEST))
            for ckpt in checkpoints:
                self._labels[ckpt.twinkle_path] = _checkpoint_label(ckpt)
                options.append((_checkpoint_label(ckpt), ckpt.twinkle_path))
        for value in chosen:
            spec = self._spec(value)
            if spec is None or any(spec == v for _, v in options):
                continue
            if spec == LATEST:
                raise ValueError("'latest' needs a run: give the run id")
            parts = split_twinkle_path(spec)
            if parts is None:
                raise ValueError(f"not a checkpoint: {spec!r} (give a checkpoint id, a twinkle:// path, "
                                 "'latest' or 'base')")
            if parts[0] == self.run_id:
                choose_checkpoint(checkpoints, parts[1], self.run_id)  # NotFoundError naming the ones there are
            self._labels[spec] = f"{parts[0]}/{parts[1]}"
            options.append((self._labels[spec], spec))
        return options

    def _resolve(self, answer: Answer, client: Any) -> None:
        """Fill in the answer's checkpoint: 'latest' is looked up now (a newer save counts)."""
        if answer.source == BASE:
            answer.adapter_uri = None
        elif answer.source == LATEST:
            from .resume import choose_checkpoint

            if self.run_id is None:
                raise ValueError("'latest' needs a run")
            ckpt = choose_checkpoint(client.list_checkpoints(self.run_id), LATEST, self.run_id)
            answer.adapter_uri = ckpt.twinkle_path
            answer.label = f"{_checkpoint_label(ckpt)} (latest)"
        else:
            answer.adapter_uri = answer.source

    # ------------------------------------------------------------------ settings

    def sampling_params(self) -> Any:
        """The settings in the boxes as ``SamplingParams`` (``ValueError``, one line, if not valid)."""
        seed_text = self.seed_box.value.strip()
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise ValueError(f"seed must be a whole number or empty, got {seed_text!r}") from None
        return _checked_params({"max_tokens": self.max_tokens_box.value, "temperature": self.temperature_box.value,
                                "top_p": self.top_p_box.value, "top_k": self.top_k_box.value, "seed": seed,
                                **self._extra_params})

    # ------------------------------------------------------------------ sending

    @property
    def generating(self) -> bool:
        """True while answers are being generated."""
        return not self._done.is_set()

    def send(self, prompt: str | None = None) -> Exchange:
        """Ask the chosen sources ``prompt`` (default: the prompt box's text) in the background;
        returns the new exchange at once (its answers fill in as they come)."""
        text = (self.prompt_box.value if prompt is None else prompt).strip()
        if not text:
            raise ValueError("type a prompt first")
        if self.generating:
            raise ValueError("still answering the last prompt: Stop it or wait")
        params = self.sampling_params()
        sources = [s for s in (self.source_box.value, self.compare_box.value) if s]
        answers = [Answer(source=s, label=self._labels.get(s, s)) for s in sources]
        exchange = Exchange(prompt=text, settings=settings_text(params), answers=answers)
        with self._lock:
            self.exchanges.append(exchange)
            self._cancel.clear()
            self._done.clear()
        self.send_button.disabled = True
        self.stop_button.disabled = False
        self._render(force=True)
        self._publish()
        self._say("generating…")
        self._thread = threading.Thread(target=self._generate, args=(exchange, params), name="twinkle-chat",
                                        daemon=True)
        self._thread.start()
        return exchange

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current answers are complete; returns whether they are. Ctrl-C
        stops the generation and re-raises."""
        try:
            return self._done.wait(timeout)
        except KeyboardInterrupt:
            self.stop_generation()
            raise

    def stop_generation(self) -> None:
        """Stop generating after the chunk in flight (the answers keep what they have)."""
        if self.generating:
            self._cancel.set()
            self._say("stopping after the current chunk…")

    def stop(self, timeout: float = 0.5) -> None:
        """Stop generating and stop writing to the saved copy (what replaces this chat calls it)."""
        self._cancel.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.static_handle = None

    def _generate(self, exchange: Exchange, params: Any) -> None:
        """The worker: resolve the sources, then take chunks in turn until every answer ends."""
        conversation = [{"role": "user", "content": exchange.prompt}]
        sampler, own = self._sampler, False
        try:
            client = current_client()
            with client.retrying_for(READ_RETRY_S):
                for answer in exchange.answers:
                    self._fail_safe(answer, lambda a=answer: self._resolve(a, client))
                if sampler is None and not exchange.finished:
                    from twinkle_client.sampler import TorchSampler

                    sampler, own = TorchSampler(model_id=client.get_server_info().base_model), True
                while not exchange.finished and not self._cancel.is_set():
                    for answer in exchange.answers:
                        if answer.finished or self._cancel.is_set():
                            continue
                        answer.state = "generating"
                        self._fail_safe(answer, lambda a=answer: advance(a, sampler, conversation, params))
                        self._render()
        except Exception as exc:  # the thread must end cleanly whatever happened
            for answer in exchange.answers:
                if not answer.finished:
                    answer.state, answer.error = "error", one_line_error(exc)
        finally:
            for answer in exchange.answers:
                if not answer.finished:
                    answer.state = "stopped"
            if own and sampler is not None:
                try:
                    sampler.close()
                except Exception:
                    pass
            self._finish(exchange)

    def _fail_safe(self, answer: Answer, step: Callable[[], None]) -> None:
        """Run ``step`` for one answer; a failure ends that answer only, as one line."""
        try:
            step()
        except Exception as exc:
            answer.state, answer.error = "error", one_line_error(exc)

    def _finish(self, exchange: Exchange) -> None:
        with self._lock:
            self.history.value += exchange_html(exchange)
            self.current.value = ""
            self._done.set()
        self.send_button.disabled = False
        self.stop_button.disabled = True
        errors = [a.error for a in exchange.answers if a.state == "error"]
        stopped = any(a.state == "stopped" for a in exchange.answers)
        if errors:
            self._say(errors[0], error=True)
        else:
            self._say("stopped" if stopped else "done")
        self._publish()

    # ------------------------------------------------------------------ showing

    def _render(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_render < RENDER_INTERVAL_S:
            return
        with self._lock:
            if self.exchanges and not self.exchanges[-1].finished:
                self.current.value = exchange_html(self.exchanges[-1])
            self._last_render = now

    def _say(self, text: str, *, error: bool = False) -> None:
        color = "#a00" if error else "#555"
        self.status.value = f'<div style="font-size:12px;color:{color}">{html.escape(text)}</div>'
        self.last_message = text

    def _guard(self, fn: Callable[[], Any]) -> None:
        """A click: a bad setting or a twinkle error goes to the status line, never raised."""
        try:
            fn()
        except Exception as exc:
            if not isinstance(exc, ValueError) and not is_twinkle_error(exc):
                raise
            self._say(str(exc) if not is_twinkle_error(exc) else one_line_error(exc), error=True)

    def transcript_html(self) -> str:
        """The conversation so far as HTML that needs no kernel."""
        with self._lock:
            return transcript_html(self.title_text, list(self.exchanges))

    def text(self) -> str:
        """The conversation so far as plain text."""
        with self._lock:
            return transcript_text(self.title_text, list(self.exchanges))

    def static_bundle(self) -> dict[str, str]:
        """The saved copy: the transcript as ``text/html`` (hidden while this widget is drawn)
        and ``text/plain``."""
        body = self.transcript_html()
        return {
            "text/html": f'<div class="{STATIC_CLASS} {STATIC_CLASS}-{self._uid}">{body}</div>',
            "text/plain": self.text(),
        }

    def _publish(self) -> None:
        """Put the transcript into the saved copy's output (through its display id)."""
        handle = self.static_handle
        if handle is None:
            return
        try:
            handle.update(self.static_bundle(), raw=True)
        except Exception:  # a copy for later; never worth failing a chat over
            pass

    def attach(self, handle: Any) -> None:
        """Keep the transcript in the output of ``handle`` (a ``DisplayHandle``) from now on."""
        self.static_handle = handle
        self._publish()

    def show(self) -> Any:
        """Display the chat and, below it, its saved copy (a display id updated as exchanges
        start and end); returns the copy's handle."""
        from IPython.display import display

        display(self)
        self.static_handle = display(self.static_bundle(), raw=True, display_id=True)
        return self.static_handle

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs) or {}
        bundle["text/plain"] = self.text()
        return bundle

    def close(self) -> None:
        """Stop generating and close the widgets (the chat's parts too)."""
        if "_cancel" in self.__dict__:  # else the constructor failed (close runs from __del__ too)
            self.stop(timeout=0.5)
            parts = list(self.children)
            while parts:
                part = parts.pop()
                parts.extend(getattr(part, "children", ()))
                part.close()
        super().close()


def _checked_params(values: dict[str, Any]) -> Any:
    """``SamplingParams(**values)``; a bad value is a one-line ``ValueError`` naming the setting."""
    from pydantic import ValidationError

    from twinkle.protocol.sampling import SamplingParams

    try:
        return SamplingParams(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise ValueError(f"{where}: {first.get('msg', 'invalid')}") from None


def _max_tokens() -> int:
    from twinkle.protocol.limits import MAX_SAMPLE_TOKENS

    return int(MAX_SAMPLE_TOKENS)
