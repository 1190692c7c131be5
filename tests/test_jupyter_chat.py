"""The chat widget: chunked generation, two sources side by side, the saved copy, the Try
button and ``%twinkle chat``; with a scripted sampler in process, and against a real server."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any

import pytest

from twinkle.protocol.sampling import SampledSequence, SampleResponse, SamplingParams
from twinkle.protocol.wire import Checkpoint

RUN = "run-0123456789ab"
PROMPT_IDS = [101, 102, 103]


def _path(name: str, run: str = RUN) -> str:
    return f"twinkle://{run}/weights/{name}"


class ScriptedSampler:
    """Answers with a fixed text per source, byte by byte (one token per UTF-8 byte, as a
    byte-level tokenizer may split a character), obeying ``max_tokens``."""

    def __init__(self, answers: dict[str | None, str], gate: threading.Event | None = None) -> None:
        self.answers = {k: v.encode() for k, v in answers.items()}
        self.calls: list[dict[str, Any]] = []
        self.gate = gate
        self.closed = False

    def sample(self, inputs: Any, sampling_params: Any = None, adapter_name: str = "",
               adapter_uri: str | None = None, num_samples: int = 1) -> list[SampleResponse]:
        if self.gate is not None:
            assert self.gate.wait(10)
        params = SamplingParams.model_validate(sampling_params)
        self.calls.append({"inputs": inputs, "params": params, "adapter_uri": adapter_uri})
        script = self.answers[adapter_uri]
        if isinstance(inputs[0], dict):  # a conversation: the "template" makes it PROMPT_IDS
            done = 0
        else:
            (ids,) = inputs
            assert ids[:len(PROMPT_IDS)] == PROMPT_IDS
            done = len(ids) - len(PROMPT_IDS)
            assert bytes(ids[len(PROMPT_IDS):]) == script[:done]  # continues exactly where it stopped
        chunk = script[done:done + params.max_tokens]
        ended = done + len(chunk) >= len(script)
        seq = SampledSequence(tokens=list(chunk), logprobs=[0.0] * len(chunk),
                              decoded=chunk.decode("utf-8", errors="replace"),
                              stop_reason="stop" if ended else "length")
        return [SampleResponse(sequences=[seq], prompt_tokens=PROMPT_IDS)]


class FakeClient:
    """What the chat and the checkpoint browser ask of a client."""

    def __init__(self, names: list[str]) -> None:
        now = datetime.now(timezone.utc)
        self.checkpoints = [
            Checkpoint(checkpoint_id=n, training_run_id=RUN, twinkle_path=_path(n), time=now.replace(second=i),
                       size_bytes=1000, step=2 * (i + 1), has_optimizer=True, base_model="builtin://tiny-qwen2")
            for i, n in enumerate(names)
        ]

    def require_reachable(self) -> None:
        pass

    def list_checkpoints(self, run_id: str) -> list[Checkpoint]:
        assert run_id == RUN
        return list(self.checkpoints)

    def retrying_for(self, seconds: float) -> Any:
        import contextlib

        return contextlib.nullcontext()


class Handle:
    """A display handle that keeps what it was updated with."""

    def __init__(self) -> None:
        self.updates: list[dict[str, str]] = []

    def update(self, obj: Any, raw: bool = False) -> None:
        assert raw
        self.updates.append(obj)


@pytest.fixture
def fake_connection(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient(["step-2", "step-4"])
    import twinkle_jupyter.chat as chat_mod

    monkeypatch.setattr(chat_mod, "current_client", lambda explicit=None: explicit or client)
    return client


def _chat(client: FakeClient, sampler: ScriptedSampler, **kwargs: Any) -> Any:
    from twinkle_jupyter.chat import ChatWidget

    return ChatWidget(RUN, kwargs.pop("source", "latest"), client=client, sampler=sampler, **kwargs)


# ---------------------------------------------------------------------------- in process


@pytest.mark.unit
def test_an_answer_grows_in_chunks_and_ends_at_the_end_of_turn(fake_connection: FakeClient,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import twinkle_jupyter.chat as chat_mod
    from twinkle_jupyter.chat import CHUNK_TOKENS

    monkeypatch.setattr(chat_mod, "RENDER_INTERVAL_S", 0.0)  # every chunk drawn

    text = "I am twinkle, a small model trained by the twinkle team. Ask me anything!"
    gate = threading.Event()
    sampler = ScriptedSampler({_path("step-4"): text}, gate=gate)
    chat = _chat(fake_connection, sampler, sampling_params={"max_tokens": 200})
    seen: list[str] = []
    chat.current.observe(lambda ch: seen.append(ch["new"]), names="value")
    exchange = chat.send("who are you?")
    assert chat.generating and chat.send_button.disabled and not chat.stop_button.disabled
    assert not chat.wait(0.05)
    gate.set()
    assert chat.wait(10)
    (answer,) = exchange.answers
    assert answer.text == text and answer.state == "done" and answer.stop_reason == "stop"
    assert answer.label == "step-4 · step 4 (latest)" and answer.adapter_uri == _path("step-4")
    # The first call sends the conversation, the next ones the prompt's ids and the tokens so far.
    first, *rest = sampler.calls
    assert first["inputs"] == [{"role": "user", "content": "who are you?"}]
    assert all(c["params"].max_tokens == CHUNK_TOKENS and not c["params"].prompt_logprobs for c in sampler.calls)
    assert len(rest) == len(text.encode()) // CHUNK_TOKENS
    assert not chat.send_button.disabled and chat.stop_button.disabled and chat.last_message == "done"
    assert chat.current.value == "" and "who are you?" in chat.history.value and "twinkle team" in chat.history.value
    # The answer was shown while it grew: a chunk more each time.
    assert [v.count("generating…") for v in seen if "generating…" in v] and "I am twinkle, a" in seen[1]
    assert chat.prompt_box.value == ""  # the box was not used; send() took the prompt as an argument


@pytest.mark.unit
def test_a_chunk_ending_inside_a_character_is_asked_again_longer(fake_connection: FakeClient) -> None:
    from twinkle_jupyter.chat import CHUNK_TOKENS

    # 15 ASCII bytes, then a 3-byte character across the first chunk's end.
    text = "abcdefghijklmno你是谁？我是twinkle模型"
    assert len(text[:15].encode()) == 15 and CHUNK_TOKENS == 16
    sampler = ScriptedSampler({None: text})
    chat = _chat(fake_connection, sampler, source="base")
    (answer,) = chat.send("你是谁？").answers
    assert chat.wait(10)
    assert answer.text == text and "\ufffd" not in answer.text
    sizes = [c["params"].max_tokens for c in sampler.calls]
    assert sizes[:2] == [CHUNK_TOKENS, 2 * CHUNK_TOKENS]  # the split chunk, then the same start longer
    assert sampler.calls[1]["inputs"] == [PROMPT_IDS]


@pytest.mark.unit
def test_two_sources_answer_side_by_side_and_the_saved_copy_follows(fake_connection: FakeClient) -> None:
    sampler = ScriptedSampler({_path("step-2"): "Checkpoint <b>answer</b> & more. " * 3, None: "Base answer."})
    handle = Handle()
    chat = _chat(fake_connection, sampler, source="step-2", compare="base",
                 sampling_params={"max_tokens": 40, "temperature": 0.8, "seed": 5}, static_handle=handle)
    assert chat.source_box.value == _path("step-2") and chat.compare_box.value == "base"
    exchange = chat.send("<script>alert(1)</script> who?")
    assert chat.wait(10)
    ckpt, base = exchange.answers
    assert (ckpt.label, base.label) == ("step-2 · step 2", "base model")
    assert ckpt.text == ("Checkpoint <b>answer</b> & more. " * 3)[:40] and ckpt.stop_reason == "length"
    assert base.text == "Base answer." and base.stop_reason == "stop"
    # The sources took turns, each chunk seeded seed + its index.
    sources = [c["adapter_uri"] for c in sampler.calls]
    assert sources[:4] == [_path("step-2"), None, _path("step-2"), _path("step-2")]
    assert [c["params"].seed for c in sampler.calls if c["adapter_uri"] is None] == [5]
    assert [c["params"].seed for c in sampler.calls if c["adapter_uri"]] == [5, 6, 7]
    assert exchange.settings == "temperature 0.8 · seed 5 · up to 40 tokens"

    # The copy for the saved notebook: updated when the exchange started and when it ended,
    # every user text escaped, the two answers in one row.
    assert len(handle.updates) == 3  # on creation, send, finish
    last = handle.updates[-1]["text/html"]
    assert "<script>" not in last and "&lt;script&gt;alert(1)&lt;/script&gt; who?" in last
    assert "Checkpoint &lt;b&gt;answer&lt;/b&gt; &amp; more." in last and "<b>answer</b>" not in last
    assert last.count('class="twinkle-chat-answer"') == 2 and last.count("<tr>") == 1
    assert f"twinkle-chat-static-{chat._uid}" in last and f".twinkle-chat-static-{chat._uid}" in chat._hide_copy.value
    assert "[base model] Base answer." in handle.updates[-1]["text/plain"]
    assert chat._repr_mimebundle_()["text/plain"] == handle.updates[-1]["text/plain"]


@pytest.mark.unit
def test_the_widget_stays_usable_while_it_generates_and_stop_ends_it(fake_connection: FakeClient) -> None:
    gate = threading.Event()
    sampler = ScriptedSampler({_path("step-4"): "x" * 200}, gate=gate)
    chat = _chat(fake_connection, sampler, sampling_params={"max_tokens": 200})
    chat.prompt_box.value = "hello"
    chat.send_button.click()
    assert chat.generating
    chat.send_button.click()  # a second Send while it answers: one line, nothing raised
    assert chat.last_message == "still answering the last prompt: Stop it or wait"
    chat.compare_box.value = "base"  # settings and sources stay editable; they apply to the next Send
    chat.temperature_box.value = 0.5
    chat.stop_button.click()
    gate.set()
    assert chat.wait(10)
    (answer,) = chat.exchanges[-1].answers
    assert answer.state == "stopped" and 0 < len(answer.text) < 200 and chat.last_message == "stopped"
    assert chat.prompt_box.value == "hello"  # kept, to ask again (e.g. with a second source)


@pytest.mark.unit
def test_errors_are_one_line_in_the_pane_and_the_status(fake_connection: FakeClient) -> None:
    from twinkle.errors import NotFoundError

    class Failing(ScriptedSampler):
        def sample(self, inputs: Any, sampling_params: Any = None, adapter_name: str = "",
                   adapter_uri: str | None = None, num_samples: int = 1) -> list[SampleResponse]:
            if adapter_uri is not None:
                raise NotFoundError("no checkpoint step-4 of run-0123456789ab")
            return super().sample(inputs, sampling_params, adapter_name, adapter_uri, num_samples)

    chat = _chat(fake_connection, Failing({None: "fine"}), compare="base")
    ckpt, base = chat.send("hi").answers
    assert chat.wait(10)
    assert ckpt.state == "error" and ckpt.error == "no checkpoint step-4 of run-0123456789ab"
    assert base.state == "done" and base.text == "fine"  # the other source still answers
    assert chat.last_message == ckpt.error and "error: no checkpoint" in chat.history.value

    # Bad settings and an empty prompt: one line in the status, no exchange.
    chat.seed_box.value = "abc"
    chat.prompt_box.value = "hi"
    chat.send_button.click()
    assert chat.last_message == "seed must be a whole number or empty, got 'abc'"
    chat.seed_box.value = ""
    chat.prompt_box.value = "  "
    chat.send_button.click()
    assert chat.last_message == "type a prompt first" and len(chat.exchanges) == 1


@pytest.mark.unit
def test_sources_are_checked_when_the_chat_opens(fake_connection: FakeClient) -> None:
    from twinkle.errors import NotFoundError
    from twinkle_jupyter.chat import ChatWidget

    sampler = ScriptedSampler({})
    with pytest.raises(NotFoundError, match=r"has no checkpoint 'step-9' \(it has: step-2, step-4\)"):
        _chat(fake_connection, sampler, source="step-9")
    other = _path("ck", run="run-ffffffffffff")
    chat = _chat(fake_connection, sampler, source=other)
    assert chat.source_box.value == other and chat._labels[other] == "run-ffffffffffff/ck"
    assert [v for _, v in chat.source_box.options] == ["base", "latest", _path("step-2"), _path("step-4"), other]
    with pytest.raises(ValueError, match="needs a run"):
        ChatWidget(None, "step-2", sampler=sampler)
    base_only = ChatWidget(None, "base", sampler=sampler)
    assert [v for _, v in base_only.source_box.options] == ["base"] and base_only.title_text == "Chat · base model"


@pytest.mark.unit
def test_a_stop_string_split_over_two_chunks_ends_the_answer(fake_connection: FakeClient) -> None:
    sampler = ScriptedSampler({None: "0123456789abcdeXYZ and more text after it"})
    chat = _chat(fake_connection, sampler, source="base", sampling_params={"stop": ["XYZ"]})
    (answer,) = chat.send("count").answers
    assert chat.wait(10)
    assert answer.text == "0123456789abcde" and answer.stop_reason == "stop"


@pytest.mark.unit
def test_blank_answers_are_described_not_drawn(fake_connection: FakeClient) -> None:
    sampler = ScriptedSampler({None: "\n" * 40, _path("step-4"): "a\n\n\n\n\n\nb"})
    chat = _chat(fake_connection, sampler, compare="base")
    chat.send("who are you?")
    assert chat.wait(10)
    assert "(only white space: 40 line breaks)" in chat.history.value
    assert "a\n" in chat.history.value and "[6 line breaks]" in chat.history.value
    assert "[base model] (only white space: 40 line breaks)" in chat.text()


@pytest.mark.unit
def test_try_on_a_checkpoint_row_opens_the_chat_below_the_browser(fake_connection: FakeClient) -> None:
    from twinkle_jupyter import ChatWidget, CheckpointBrowser

    browser = CheckpointBrowser(RUN, client=fake_connection, namespace={})
    assert list(browser.try_buttons) == ["step-2", "step-4"]
    assert all(b.description == "Try" for b in browser.try_buttons.values())
    handle = Handle()
    browser.static_handle = handle
    browser.try_buttons["step-2"].click()
    chat = browser.last_chat
    assert isinstance(chat, ChatWidget) and chat.source_box.value == _path("step-2") and chat.compare_box.value == ""
    assert chat.static_handle is handle and browser.last_message == "chat with step-2"
    # Another Try replaces it: the old chat stops writing to the saved copy.
    browser.try_checkpoint("step-4")
    assert chat.static_handle is None and browser.last_chat.source_box.value == _path("step-4")
    # The rows are also in the static table of the browser's bundle.
    assert "step-4" in browser._repr_mimebundle_()["text/html"]


# ---------------------------------------------------------------------------- a real server


@pytest.mark.server
def test_chunked_answers_equal_one_call_and_compare_base_with_a_checkpoint(
    server: Any, server_user: tuple[str, str], tmp_path: Any
) -> None:
    from peft import LoraConfig

    import twinkle_client.client as client_mod
    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel
    from twinkle_client.sampler import TorchSampler
    from twinkle_jupyter.chat import ChatWidget

    saved = client_mod._current
    client_mod._current = None
    client = init_twinkle_client(base_url=server.url, api_key=server_user[1])
    try:
        import twinkle.hub
        from twinkle.template import Template

        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), seed=7)
        model.set_template("Template")
        model.set_processor("InputProcessor", padding_side="right")
        model.set_optimizer("AdamW", lr=1e-2)
        template = Template(model_id=str(twinkle.hub.resolve_model_dir("builtin://tiny-qwen2")))
        batch = [template.encode([{"role": "user", "content": q}, {"role": "assistant", "content": "Twinkle."}])
                 for q in ("who are you?", "your name?")]
        for _ in range(5):
            model.forward_backward(inputs=batch)
            model.clip_grad_and_step(1.0)
        path = model.save("chat")
        run_id = model.training_run_id

        params = {"max_tokens": 40, "temperature": 0}
        question = [{"role": "user", "content": "who are you?"}]
        sampler = TorchSampler("builtin://tiny-qwen2")
        whole = {uri: sampler.sample(question, params, adapter_uri=uri)[0].sequences[0] for uri in (path, None)}
        sampler.close()

        chat = ChatWidget(run_id, "latest", compare="base", sampling_params=params)
        handle = Handle()
        chat.static_handle = handle
        exchange = chat.send("who are you?")
        assert chat.wait(120)
        ckpt, base = exchange.answers
        for answer, uri in ((ckpt, path), (base, None)):
            assert answer.state == "done", answer.error
            assert answer.adapter_uri == uri and answer.calls > 1
            assert answer.tokens == whole[uri].tokens and answer.text == whole[uri].decoded
        assert ckpt.label == "chat · step 5 (latest)" and base.label == "base model"
        saved_copy = handle.updates[-1]["text/html"]
        assert "who are you?" in saved_copy and saved_copy.count('data-state="done"') == 2
        model.close()
    finally:
        client.close()
        client_mod._current = saved
