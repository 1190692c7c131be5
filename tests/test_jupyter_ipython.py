"""The extension in a real IPython ``InteractiveShell``: loading, settings, errors, Ctrl-C."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

EXT = "twinkle_jupyter"


def _twinkle_threads(wait_s: float = 0.0) -> list[str]:
    """The plot threads alive, after waiting up to ``wait_s`` for them to end."""
    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():
        if thread.name.startswith("twinkle-loss-plot"):
            thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t.name.startswith("twinkle-loss-plot") and t.is_alive()]


@pytest.fixture
def ip(monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    # A port nothing listens on: "server down" answers at once.
    monkeypatch.setenv("TWINKLE_SERVER_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TWINKLE_SERVER_TOKEN", "tk_not_a_real_key")
    import twinkle_client.client as connection

    saved = connection._current  # these tests point the current connection at a dead port
    connection._current = None
    shell = InteractiveShell.instance()
    yield shell
    if EXT in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", EXT)
    shell.config.pop("TwinkleMagics", None)
    connection._current = saved


def _listeners() -> list[Any]:
    from twinkle_client import events

    return list(events._listeners)


def test_load_reload_unload_leave_nothing_behind(ip: InteractiveShell) -> None:
    before = {
        "pre": list(ip.events.callbacks["pre_run_cell"]),
        "post": list(ip.events.callbacks["post_run_cell"]),
        "exc": ip.custom_exceptions,
        "tb": ip.CustomTB,
        "listeners": _listeners(),
        "sigint": signal.getsignal(signal.SIGINT),
    }
    ip.run_line_magic("load_ext", EXT)
    ip.run_line_magic("load_ext", EXT)  # a second load is a no-op
    assert "twinkle" in ip.magics_manager.magics["line"]
    assert len(_listeners()) == len(before["listeners"]) + 1
    assert len(ip.events.callbacks["post_run_cell"]) == len(before["post"]) + 1
    # A plot made through the extension runs a thread; unload must stop it.
    from twinkle_jupyter.session import get_session

    get_session(ip).new_plot(["run-x"], poll_interval=0.05)
    assert _twinkle_threads()
    ip.run_line_magic("reload_ext", EXT)
    assert len(_listeners()) == len(before["listeners"]) + 1
    assert len(ip.events.callbacks["post_run_cell"]) == len(before["post"]) + 1
    assert not _twinkle_threads(wait_s=10)  # a poll in progress ends first
    ip.run_line_magic("unload_ext", EXT)
    assert "twinkle" not in ip.magics_manager.magics["line"]
    assert ip.events.callbacks["pre_run_cell"] == before["pre"]
    assert ip.events.callbacks["post_run_cell"] == before["post"]
    assert ip.custom_exceptions == before["exc"] and ip.CustomTB == before["tb"]
    assert not [c for c in ip.configurables if type(c).__name__ == "TwinkleMagics"]
    assert _listeners() == before["listeners"]
    assert signal.getsignal(signal.SIGINT) == before["sigint"]
    assert not _twinkle_threads(wait_s=10)  # a poll in progress ends first


def test_config_lists_and_validates_traits(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("load_ext", EXT)
    ip.run_cell("%config TwinkleMagics")
    out = capsys.readouterr().out
    for trait in ("poll_interval", "max_redraw_hz", "max_points", "smoothing", "x_axis", "log_scale", "auto_plot"):
        assert f"TwinkleMagics.{trait}" in out
    assert "Current: 2.0" in out  # max_redraw_hz
    ip.run_cell("%config TwinkleMagics.smoothing = 0.9")
    from twinkle_jupyter.session import get_session

    assert get_session(ip).settings.smoothing == 0.9
    ip.run_cell("%config TwinkleMagics.smoothing = 1.5")  # rejected by the validator
    assert get_session(ip).settings.smoothing == 0.9
    # The rejected value stays in the shell's config; a reload must still work.
    ip.run_line_magic("reload_ext", EXT)
    assert get_session(ip).settings.smoothing == 0.6


@pytest.mark.parametrize(
    "line, expected",
    [
        ("%twinkle frobnicate", "invalid choice: 'frobnicate'"),
        ("%twinkle plot --x sideways", "invalid choice"),
        ("%twinkle resume", "the following arguments are required: RUN"),
        ("%twinkle checkpoints a b", "unrecognized arguments"),
        ("%twinkle runs --limit 0", "argument --limit: page_size must be >= 1"),
        ("%twinkle plot --smoothing 1.5", "smoothing must be in [0, 1)"),
        ('%twinkle plot "unclosed', "No closing quotation"),
        ("%twinkle compare", "the following arguments are required: RUN"),
        ("%twinkle compare run-x run-x", "give two different runs or more"),
        ("%twinkle label run-x", "say what to set: --name, --tag, --untag or --dataset"),
        ("%twinkle runs --tag", "argument --tag: expected one argument"),
        ("%twinkle chat run-x --prompt ''", "%twinkle chat: --prompt is empty"),
        ("%twinkle chat --max-tokens many", "argument --max-tokens: invalid int value: 'many'"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(
    ip: InteractiveShell, capsys: pytest.CaptureFixture[str], line: str, expected: str
) -> None:
    ip.run_line_magic("load_ext", EXT)
    result = ip.run_cell(line)
    err = capsys.readouterr().err
    assert not result.success
    assert "UsageError" in err and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("line", ["%twinkle status", "%twinkle runs", "%twinkle checkpoints run-x",
                                  "%twinkle plot run-x", "%twinkle resume run-x latest", "%twinkle show run-x",
                                  "%twinkle compare run-x run-y", "%twinkle label run-x --name n",
                                  "%twinkle runs --tag exp", "%twinkle chat", "%twinkle chat base",
                                  "%twinkle chat run-x step-2 --compare base --prompt hi"])
def test_server_down_is_one_line(ip: InteractiveShell, capsys: pytest.CaptureFixture[str], line: str) -> None:
    ip.run_line_magic("load_ext", EXT)
    ip.run_cell("from twinkle_client import init_twinkle_client; init_twinkle_client()")
    result = ip.run_cell(line)
    captured = capsys.readouterr()
    assert result.success  # a monitoring line must not stop "Run all"
    # The health check's message (at once), not that of a call that retried for a minute.
    assert captured.err.strip() == "twinkle: cannot reach the twinkle server at http://127.0.0.1:9"


def test_twinkle_errors_from_user_code_show_one_line(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("load_ext", EXT)
    result = ip.run_cell("from twinkle.errors import NotFoundError\nraise NotFoundError('run run-x is not yours')")
    out = capsys.readouterr()
    text = out.out + out.err
    assert not result.success and isinstance(result.error_in_exec, Exception)
    assert "NotFoundError" in text and "run run-x is not yours" in text and "Traceback" not in text
    ip.run_line_magic("unload_ext", EXT)
    ip.run_cell("from twinkle.errors import NotFoundError\nraise NotFoundError('again')")
    out = capsys.readouterr()
    assert "Traceback" in out.out + out.err  # the normal display is back after unload


class _FakeModel:
    training_run_id = "run-fake"


def _emit(kind: str = "forward_backward", run_id: str = "run-fake") -> None:
    from twinkle_client.events import TrainingEvent, emit

    emit(TrainingEvent(kind=kind, model=_FakeModel(), run_id=run_id, method=kind))


def _forward_backward(run_id: str = "run-fake") -> None:
    """A remote model's forward_backward without a server: the client honours a stop request
    right before it queues the call, then emits the event."""
    from twinkle_client.interrupt import check_stop

    check_stop("forward_backward")
    _emit("forward_backward", run_id)


def test_ctrl_c_stops_at_the_next_model_call_and_restores_the_handler(ip: InteractiveShell) -> None:
    ip.run_line_magic("load_ext", EXT)
    ip.run_cell("%config TwinkleMagics.auto_plot = False")
    ip.user_ns["_forward_backward"] = _forward_backward
    before = signal.getsignal(signal.SIGINT)
    cell = (
        "import os, signal\n"
        "calls = 0\n"
        "for i in range(5):\n"
        "    _forward_backward()\n"
        "    calls += 1\n"
        "    if i == 1:\n"
        "        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while 'training'\n"
    )
    result = ip.run_cell(cell)
    from twinkle_jupyter.session import TrainingInterrupted

    assert isinstance(result.error_in_exec, TrainingInterrupted)
    assert ip.user_ns["calls"] == 2  # stopped at the call after the Ctrl-C, not inside one
    assert signal.getsignal(signal.SIGINT) == before
    # A second Ctrl-C interrupts at once, without waiting for a model call.
    cell2 = (
        "import os, signal\n"
        "_forward_backward()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "reached = False\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "reached = True\n"
    )
    result = ip.run_cell(cell2)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert not isinstance(result.error_in_exec, TrainingInterrupted)
    assert ip.user_ns["reached"] is False
    assert signal.getsignal(signal.SIGINT) == before
    # Without training in the cell, the handler is never touched.
    result = ip.run_cell("import signal\nh = signal.getsignal(signal.SIGINT)")
    assert ip.user_ns["h"] == before


def test_hook_does_no_work_once_the_run_has_its_plot(ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch) -> None:
    # What it costs per step is measured by benchmarks/bench_plot.py; here: that it does nothing.
    ip.run_line_magic("load_ext", EXT)
    from twinkle_client.events import TrainingEvent
    from twinkle_jupyter.session import get_session

    session = get_session(ip)
    monkeypatch.setattr(session, "_begin_run", lambda run_id: pytest.fail(f"a plot opened again for {run_id}"))
    monkeypatch.setattr(session, "_install_sigint", lambda: pytest.fail("the SIGINT handler installed again"))
    session._in_cell = True
    session._cell_runs.add("run-fake")  # steady state: the run's plot exists
    before = (set(session.kernel_runs), dict(session._cell_models), list(session.plots))
    for kind in ("forward_backward", "step", "save"):
        session._on_event(TrainingEvent(kind=kind, model=_FakeModel(), run_id="run-fake", method=kind))
    assert (set(session.kernel_runs), dict(session._cell_models), list(session.plots)) == before
    session._in_cell = False


def test_the_hook_never_raises_into_training_and_a_stop_request_ends_with_its_cell(ip: InteractiveShell) -> None:
    import twinkle_client.interrupt as interrupt
    import twinkle_jupyter
    from twinkle_jupyter.session import TrainingInterrupted

    assert TrainingInterrupted is interrupt.TrainingInterrupted is twinkle_jupyter.TrainingInterrupted
    ip.run_line_magic("load_ext", EXT)
    ip.run_cell("%config TwinkleMagics.auto_plot = False")
    ip.user_ns.update(_emit=_emit, _forward_backward=_forward_backward)
    # A stop request does not make the event listener raise: only the client's check does.
    result = ip.run_cell("import twinkle_client.interrupt as i\ni.request_stop()\n_emit()\nstill = i.stop_requested()")
    assert result.success and ip.user_ns["still"] is True
    assert not interrupt.stop_requested()  # the cell's end withdrew it
    interrupt.request_stop()  # left by code outside any cell: the next cell starts without it
    result = ip.run_cell("_forward_backward()\n_forward_backward()")
    assert result.success
    interrupt.clear_stop()


def test_help_is_generated_from_the_parser(ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("load_ext", EXT)
    for line in ("%twinkle", "%twinkle help", "%twinkle --help"):
        assert ip.run_cell(line).success
        out = capsys.readouterr().out
        assert out.startswith("usage: %twinkle")
        listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.strip()}
        assert {"help", "connect", "status", "runs", "show", "compare", "label", "checkpoints", "plot",
                "resume", "chat"} <= listed, out
        assert "checkpoints (ckpts)" in out
    for line in ("%twinkle help plot", "%twinkle plot -h"):
        assert ip.run_cell(line).success
        out = capsys.readouterr().out
        assert out.startswith("usage: %twinkle plot") and "--smoothing W" in out and "--x {step,time}" in out
    assert ip.run_cell("%twinkle help resume").success
    assert "--model MODEL" in capsys.readouterr().out
    assert ip.run_cell("%twinkle help chat").success
    out = capsys.readouterr().out
    assert out.startswith("usage: %twinkle chat") and "--compare CKPT|latest|base" in out and "--prompt TEXT" in out


def test_plain_import_names() -> None:
    import twinkle_jupyter

    for name in ("LossPlot", "RunBrowser", "CheckpointBrowser", "ChatWidget", "TwinkleMagics", "ResumeResult"):
        assert isinstance(getattr(twinkle_jupyter, name), type)
    from twinkle_jupyter.resume import resume

    assert callable(resume)
    with pytest.raises(AttributeError):
        twinkle_jupyter.nope  # noqa: B018


def test_plot_widget_without_server_reports_error_in_its_line() -> None:
    from twinkle_client import TwinkleClient
    from twinkle_jupyter import LossPlot

    plot = LossPlot("run-x", poll_interval=0.05, autostart=False, client=TwinkleClient("http://127.0.0.1:9"))
    plot.refresh()
    assert "cannot reach" in plot.view.value or "unreachable" in plot.view.value or "refused" in plot.view.value
    bundle = plot.finalize("error", "boom")
    assert set(bundle) == {"image/png", "text/html", "text/plain"}
    assert bundle["text/plain"].endswith("error: boom")
    assert plot.view.status == "error" and not plot.polling
    plot.close()


def test_connect_asks_for_the_key_without_echoing_it(
    ip: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import getpass

    asked: list[str] = []
    monkeypatch.delenv("TWINKLE_SERVER_TOKEN")
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": asked.append(prompt) or "tk_secret_typed")
    ip.run_line_magic("load_ext", EXT)
    result = ip.run_cell("%twinkle connect http://127.0.0.1:9")
    out = capsys.readouterr()
    assert result.success and asked == ["twinkle API key: "]
    assert "tk_secret_typed" not in out.out + out.err
    assert out.err.strip() == "twinkle: cannot reach the twinkle server at http://127.0.0.1:9"
    assert "tk_secret_typed" not in "\n".join(str(h) for h in ip.history_manager.input_hist_raw)


def test_a_failed_connect_keeps_the_working_connection(ip: InteractiveShell, server, add_user, capsys) -> None:
    from twinkle_client import current_client, init_twinkle_client

    key = add_user(server.data_dir, "connects")
    working = init_twinkle_client(base_url=server.url, api_key=key)
    ip.run_line_magic("load_ext", EXT)
    result = ip.run_cell(f"%twinkle connect {server.url}")  # the env key is a wrong one
    assert result.success and "invalid API key" in capsys.readouterr().err
    assert current_client() is working and working.get_server_info().user == "connects"


def test_resume_refuses_a_model_of_another_base_model() -> None:
    from types import SimpleNamespace

    from twinkle.errors import InvalidArgumentError, NotFoundError
    from twinkle_client.model import MultiLoraTransformersModel
    from twinkle_jupyter.resume import choose_checkpoint, resume

    def run(rid: str, base: str) -> SimpleNamespace:
        return SimpleNamespace(training_run_id=rid, base_model=base, status="detached")

    ckpt = SimpleNamespace(checkpoint_id="step-10", twinkle_path="twinkle://run-a/weights/step-10", step=10,
                           time=1.0, has_optimizer=True, consumed_train_samples=40)

    class FakeClient:
        def get_training_run(self, rid: str) -> SimpleNamespace:
            return {"run-a": run("run-a", "builtin://tiny-qwen2"), "run-b": run("run-b", "hf://other/model")}[rid]

        def list_checkpoints(self, rid: str) -> list[SimpleNamespace]:
            return [ckpt]

    # A model object as the notebook would hold it, without a server behind it.
    other = MultiLoraTransformersModel.__new__(MultiLoraTransformersModel)
    other._twinkle_runs, other._twinkle_last_adapter = {"default": "run-b"}, "default"
    with pytest.raises(InvalidArgumentError, match="`other` is a model of hf://other/model, but run run-a"):
        resume("run-a", "step-10", namespace={"other": other, "_": other}, client=FakeClient())
    with pytest.raises(InvalidArgumentError, match="is a dict, not a twinkle model"):
        resume("run-a", "latest", namespace={"model": {}}, client=FakeClient())
    assert choose_checkpoint([ckpt], "latest", "run-a") is ckpt
    assert choose_checkpoint([ckpt], "weights/step-10", "run-a") is ckpt
    with pytest.raises(NotFoundError, match="has no checkpoint 'step-9' \\(it has: step-10\\)"):
        choose_checkpoint([ckpt], "step-9", "run-a")
    with pytest.raises(NotFoundError, match="no checkpoints yet"):
        choose_checkpoint([], "latest", "run-a")


def test_browsers_without_server_say_so_in_their_status_line() -> None:
    from twinkle_client import TwinkleClient
    from twinkle_jupyter import CheckpointBrowser, RunBrowser

    dead = TwinkleClient("http://127.0.0.1:9")
    rb = RunBrowser(client=dead, namespace={})
    cb = CheckpointBrowser("run-x", client=dead, namespace={})
    # The health check's message (at once), not that of a call that retried for a minute.
    for browser in (rb, cb):
        assert browser.last_message == "cannot reach the twinkle server at http://127.0.0.1:9"
        browser.close()
