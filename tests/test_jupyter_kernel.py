"""The notebook layer in real kernels (jupyter_client, nbclient) against a real twinkle server.

One server for the module; each notebook and the kernel tests run as their own user, so
``%twinkle runs`` can be checked to list exactly that user's runs.
"""

from __future__ import annotations

import json
import os
import queue
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN_ID = re.compile(r"\brun-[0-9a-f]{12}\b")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def twinkle_server(tmp_path_factory: pytest.TempPathFactory, start_server: Callable[..., Any]) -> Any:
    """A server of this module's own, so its adapter slots are not shared with other tests."""
    return start_server(tmp_path_factory.mktemp("jupyter-server-data"), "--max-loras", "8")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for kernels: Jupyter, IPython and matplotlib state in temporary folders."""
    root = tmp_path_factory.mktemp("jupyter-home")
    env = dict(os.environ)
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_CONFIG_DIR", "config"),
                     ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl")):
        (root / sub).mkdir()
        env[var] = str(root / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def _env_for(base: dict[str, str], server: Any, key: str) -> dict[str, str]:
    return {**base, "TWINKLE_SERVER_URL": server.url, "TWINKLE_SERVER_TOKEN": key}


def _client(server: Any, key: str) -> Any:
    from twinkle_client import TwinkleClient

    return TwinkleClient(server.url, key)


@pytest.fixture(scope="module")
def other_users_run(twinkle_server: Any, add_user: Callable[..., str], raw_client: Callable[..., Any],
                    raw_helpers: Any) -> str:
    """A run of another user (it must never show up in our listings, nor be reachable)."""
    other = raw_client(twinkle_server, add_user(twinkle_server.data_dir, "someone-else"))
    model = raw_helpers.raw_model(other)
    (run,) = other.get("/training_runs").json()["training_runs"]
    other.delete(f"/objects/{model}")  # frees the slot; the run stays
    return run["training_run_id"]


# ---------------------------------------------------------------------------- notebooks


def _execute_notebook(name: str, env: dict[str, str], workdir: Path) -> Any:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", store_widget_state=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, workdir / f"{name}.executed.ipynb")
    return nb


def _cell(nb: Any, starts: str) -> Any:
    matches = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)]
    assert matches, f"no cell starting with {starts!r}"
    return matches


def _widget_states(nb: Any) -> dict[str, Any]:
    return nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]


def _plot_states(nb: Any) -> list[dict[str, Any]]:
    """Saved states of the loss plots' view models (HTML models with a ``points`` trait)."""
    return [w["state"] for w in _widget_states(nb).values() if "points" in w["state"]]


def _step_losses(client: Any, run_id: str) -> dict[int, float]:
    """Token-weighted mean loss per step of the live branch, as the plot computes it."""
    sums: dict[int, list[float]] = {}
    for p in client.get_metrics(run_id).points:
        if not p.superseded:
            acc = sums.setdefault(p.step, [0.0, 0.0])
            acc[0] += p.loss * p.num_tokens
            acc[1] += p.num_tokens
    return {s: a / t for s, (a, t) in sums.items()}


def _static_outputs(cell: Any) -> list[Any]:
    return [o for o in cell.outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def test_quickstart_notebook(
    twinkle_server: Any, add_user: Callable[..., str], kernel_env: dict[str, str], other_users_run: str,
    tmp_path: Path,
) -> None:
    key = add_user(twinkle_server.data_dir, "quickstart-user")
    nb = _execute_notebook("quickstart", _env_for(kernel_env, twinkle_server, key), tmp_path)
    client = _client(twinkle_server, key)
    runs = client.list_training_runs(limit=100)
    assert len(runs) == 1
    run_id = runs[0].training_run_id

    # The training cell ends with the finalized static picture, not a widget.
    (train,) = _cell(nb, "for step, batch in enumerate(dataloader)")
    static = _static_outputs(train)
    assert len(static) == 1
    data = static[0].data
    assert set(data) >= {"image/png", "text/html", "text/plain"}
    assert data["text/plain"].startswith(f"twinkle {run_id}: step 6/6,")  # total from the DataLoader
    assert data["text/plain"].endswith("finished")
    assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in train.outputs)

    # The saved widget state carries the final loss points.
    losses = _step_losses(client, run_id)
    (state,) = [s for s in _plot_states(nb) if s["points"] and s["points"][0]["run_id"] == run_id]
    points = state["points"][0]
    assert points["step"][-1] == max(losses)
    assert points["loss"][-1] == pytest.approx(losses[max(losses)], rel=1e-5)
    assert points["step"][0] == 1 and len(points["step"]) == len(losses)
    assert state["status"] == "finished"

    # %twinkle runs lists exactly this user's runs.
    (runs_cell,) = _cell(nb, "%twinkle runs")
    listed = set(RUN_ID.findall("".join(o.data["text/plain"] for o in runs_cell.outputs if "data" in o)))
    assert listed == {run_id}
    assert other_users_run not in listed

    # It ends with "who are you?" answered by the trained adapter and by the base model side by
    # side, in the chat widget and as plain HTML in the cell's output (for the saved notebook).
    (chat_cell,) = _cell(nb, "%twinkle chat")
    (saved,) = [o.data["text/html"] for o in chat_cell.outputs
                if o.output_type == "display_data" and "twinkle-chat-static" in o.get("data", {}).get("text/html", "")]
    (ckpt,) = client.list_checkpoints(run_id)
    assert "who are you?" in saved and saved.count('data-state="done"') == 2
    assert f'data-label="{ckpt.checkpoint_id} · step {ckpt.step} (latest)"' in saved
    assert 'data-label="base model"' in saved
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in chat_cell.outputs)
    # A saved notebook stays small, and its HTML export shows the picture without a kernel.
    assert len(json.dumps(nb)) < 1_000_000
    from nbconvert import HTMLExporter

    exported, _ = HTMLExporter().from_notebook_node(nb)
    assert data["image/png"][:200] in exported
    client.close()


def test_resume_notebook(
    twinkle_server: Any, add_user: Callable[..., str], kernel_env: dict[str, str], tmp_path: Path
) -> None:
    key = add_user(twinkle_server.data_dir, "resume-user")
    nb = _execute_notebook("resume", _env_for(kernel_env, twinkle_server, key), tmp_path)
    client = _client(twinkle_server, key)
    (run,) = client.list_training_runs(limit=100)
    run_id = run.training_run_id

    # Steps 11-20 after the resume repeat the first pass's loss sequence.
    (compare,) = _cell(nb, "import json")
    text = "".join(o.text for o in compare.outputs if o.output_type == "stream")
    found = json.loads(text.split("LOSSES ", 1)[1].splitlines()[0])
    first = {int(k): v for k, v in found["first"].items()}
    second = {int(k): v for k, v in found["second"].items()}
    assert sorted(first) == list(range(1, 21)) and sorted(second) == list(range(11, 21))
    for step in range(11, 21):
        assert second[step] == pytest.approx(first[step], abs=1e-6)

    # The run's history is one continued curve: steps 1-20 once each, the old 11-20 superseded.
    metrics = client.get_metrics(run_id)
    assert metrics.revision >= 1
    live = [p.step for p in metrics.points if not p.superseded]
    old = [p.step for p in metrics.points if p.superseded]
    assert live == list(range(1, 21)) and old == list(range(11, 21))
    assert client.get_training_run(run_id).cur_step == 20

    # The resume went through the browser's button and showed the equivalent magic.
    (click,) = _cell(nb, "browser.select('step-10')")
    said = "".join(o.text for o in click.outputs if o.output_type == "stream")
    assert f"%twinkle resume {run_id} step-10" in said and "`dataloader` at sample 40" in said

    # The second training cell's final picture marks the resume; its saved points continue.
    train_cells = _cell(nb, "losses = {}")
    assert len(train_cells) == 2
    for cell in train_cells:
        (static,) = _static_outputs(cell)
        assert static.data["text/plain"].endswith("finished")
    second_summary = _static_outputs(train_cells[1])[0].data["text/plain"]
    assert "step 20/20" in second_summary and "resumed at step 10" in second_summary
    final = [s for s in _plot_states(nb) if s["points"] and s["points"][0]["superseded"]["step"]]
    assert final and final[-1]["points"][0]["step"] == list(range(1, 21))
    assert final[-1]["points"][0]["superseded"]["step"] == list(range(11, 21))

    # Bad states are one line each, not tracebacks.
    for starts, expected in (("%twinkle checkpoints run-000000000000", "twinkle: no training run"),
                             ("%twinkle resume {run_id} step-99", "has no checkpoint 'step-99'")):
        (cell,) = _cell(nb, starts)
        (out,) = cell.outputs
        assert out.output_type == "stream" and out.name == "stderr"
        assert expected in out.text and len(out.text.strip().splitlines()) == 1
    client.close()


# ---------------------------------------------------------------------------- one live kernel


@dataclass
class Execution:
    reply: dict[str, Any]
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """(seconds since the request, IOPub message) until the kernel went idle."""

    def of_type(self, *types: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.messages if m["msg_type"] in types]

    def stream(self, name: str | None = None) -> str:
        return "".join(
            m["content"]["text"] for _, m in self.of_type("stream") if name is None or m["content"]["name"] == name
        )

    @property
    def idle_at(self) -> float:
        return self.messages[-1][0]


class Kernel:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def execute(self, code: str, timeout: float = 240, on_message: Callable[[float, dict], None] | None = None
                ) -> Execution:
        msg_id = self.kc.execute(code)
        start = time.monotonic()
        out = Execution(reply={})
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no idle within {timeout} s for {code[:60]!r}") from None
            t = time.monotonic() - start
            out.messages.append((t, msg))
            if on_message is not None:
                on_message(t, msg)
            if (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                    and msg["parent_header"].get("msg_id") == msg_id):
                break
        while True:
            # Only this request's reply: wait_for_ready may have left kernel_info replies before it.
            reply = self.kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        out.reply = reply["content"]
        return out

    def ok(self, code: str, **kw: Any) -> Execution:
        result = self.execute(code, **kw)
        errors = [m["content"] for _, m in result.of_type("error")]
        assert result.reply["status"] == "ok" and not errors, (errors, result.stream())
        return result

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


SETUP = """
%load_ext twinkle_jupyter
%twinkle connect
from peft import LoraConfig
from twinkle.dataset import DatasetMeta
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset
from twinkle_client.model import MultiLoraTransformersModel
dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition', data_slice=range(48)))
dataset.set_template('Template', model_id='builtin://tiny-qwen2', max_length=256)
dataset.map('SelfCognitionProcessor', init_args={'model_name': 'twinkle', 'model_author': 'team'})
dataset.encode(batched=True)
dataloader = DataLoader(dataset=dataset, batch_size=2)
model = MultiLoraTransformersModel(model_id='builtin://tiny-qwen2')
model.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=8))
model.set_processor('InputProcessor', padding_side='right')
model.set_optimizer('AdamW', lr=1e-3)
"""

# Each step waits for its loss (as a loop that logs every step does): the cell blocks.
BLOCKING_LOOP = """
seen = []
for epoch in range({epochs}):
    for batch in dataloader:
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step(1.0)
        seen.append(float(out))
        {extra}
"""


@pytest.fixture(scope="module")
def kernel(twinkle_server: Any, add_user: Callable[..., str], kernel_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kernel, Any]]:
    key = add_user(twinkle_server.data_dir, "kernel-user")
    k = Kernel(_env_for(kernel_env, twinkle_server, key), tmp_path_factory.mktemp("kernel-cwd"))
    try:
        k.ok(SETUP)
        yield k, _client(twinkle_server, key)
    finally:
        k.shutdown()


def _plot_comm(result: Execution) -> str:
    opens = [m for _, m in result.of_type("comm_open") if "points" in m["content"]["data"]["state"]]
    assert len(opens) == 1, "one plot view per training cell"
    return opens[0]["content"]["comm_id"]


# The loop stops at step HALT until the live plot has drawn that step, so a picture is sent
# while the cell is blocked in training, whatever the machine's speed.
HALT = 6
WATCHED_LOOP = f"""
import re, threading
from twinkle_jupyter.session import get_session
drawn = threading.Event()

def _watch(change):
    shown = re.search(r"step (\\d+)", change["new"])
    if shown and int(shown.group(1)) >= {HALT}:
        drawn.set()

seen = []
for batch in dataloader:
    out = model.forward_backward(inputs=batch)
    model.clip_grad_and_step(1.0)
    seen.append(float(out))
    if len(seen) == {HALT}:
        (plot,) = [p for p in get_session().plots if model.training_run_id in p.runs and not p.finalized]
        plot.view.observe(_watch, names="value")
        _watch({{"new": plot.view.value}})
        assert drawn.wait(120), "the live plot never drew step {HALT}"
"""

STEP = re.compile(r"step (\d+)")


def _shown_step(html_or_text: str) -> int | None:
    """The step a plot's progress line (or summary) shows, if any."""
    found = STEP.search(html_or_text)
    return int(found.group(1)) if found else None


def test_plot_updates_arrive_while_the_cell_blocks(kernel: tuple[Kernel, Any]) -> None:
    k, client = kernel
    result = k.ok(WATCHED_LOOP)
    comm = _plot_comm(result)
    (final_at, final), = [(i, m) for i, (_, m) in enumerate(result.messages)
                          if m["msg_type"] == "update_display_data"]
    updates = [(i, m["content"]["data"]["state"]) for i, (_, m) in enumerate(result.messages)
               if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm
               and m["content"]["data"].get("method") == "update"]
    pictures = [(i, state["value"]) for i, state in updates if "value" in state]
    final_text = final["content"]["data"]["text/plain"]
    last_step = _shown_step(final_text)
    assert last_step is not None and last_step > HALT, final_text
    # A picture of training in progress went out while the loop was blocked, before the end.
    during = [_shown_step(v) for i, v in pictures if i < final_at]
    assert any(s is not None and HALT <= s < last_step for s in during), during
    # The final picture replaces the plot; the widget's last update carries the final step.
    assert "image/png" in final["content"]["data"]
    assert final_text.endswith("finished")
    (last_points,) = [state["points"] for _, state in updates if "points" in state][-1:]
    assert last_points[0]["step"][-1] == last_step == client.get_training_run(last_points[0]["run_id"]).cur_step
    # Nothing is printed from the plot's thread, in this cell or later: it has ended.
    assert not result.stream()
    later = k.ok(
        "import threading\n"
        "for t in threading.enumerate():\n"
        "    if t.name.startswith('twinkle-loss-plot'):\n"
        "        t.join(60)\n"
        "assert not [t for t in threading.enumerate() if t.name.startswith('twinkle-loss-plot')]\n"
    )
    assert not later.of_type("stream", "display_data", "update_display_data", "error")


def test_interrupt_stops_between_calls_and_the_model_stays_usable(kernel: tuple[Kernel, Any]) -> None:
    k, client = kernel
    interrupted = {"sent": False}

    def interrupt_once_training(t: float, msg: dict) -> None:
        # Interrupt once the live plot shows training under way (a few steps done).
        if interrupted["sent"] or msg["msg_type"] != "comm_msg":
            return
        shown = _shown_step(msg["content"]["data"].get("state", {}).get("value", ""))
        if shown is not None and shown >= 2:
            k.km.interrupt_kernel()
            interrupted["sent"] = True

    result = k.execute(BLOCKING_LOOP.format(epochs=40, extra=""), on_message=interrupt_once_training)
    assert interrupted["sent"]
    assert result.reply["status"] == "error" and result.reply["ename"] == "TrainingInterrupted"
    (_, error), = result.of_type("error")
    tb = [ANSI.sub("", line) for line in error["content"]["traceback"]]
    assert len(tb) == 1 and tb[0].startswith("TrainingInterrupted: training stopped before forward_backward()")
    (_, final), = result.of_type("update_display_data")
    assert final["content"]["data"]["text/plain"].endswith("interrupted")
    check = k.ok(
        "import signal\n"
        "print(len(seen) < 24 * 40, signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "print(model.save('after-interrupt', save_optimizer=True))\n"
    )
    lines = check.stream("stdout").split()
    assert lines[:2] == ["True", "True"]
    assert lines[2].startswith("twinkle://") and lines[2].endswith("/weights/after-interrupt")


def test_bad_states_give_one_line(kernel: tuple[Kernel, Any], other_users_run: str, twinkle_server: Any) -> None:
    k, client = kernel

    def one_line(code: str, expected: str) -> None:
        result = k.execute(code)
        text = ANSI.sub("", result.stream("stderr"))
        errors = [m["content"] for _, m in result.of_type("error")]
        assert result.reply["status"] == "ok" and not errors, errors
        assert expected in text, text
        assert len(text.strip().splitlines()) == 1 and "Traceback" not in text

    # A run that is not this user's.
    one_line(f"%twinkle checkpoints {other_users_run}", "twinkle: no training run")
    one_line(f"%twinkle plot {other_users_run}", "twinkle: no training run")
    one_line(f"%twinkle resume {other_users_run}", "twinkle: no training run")
    # Resume into a model whose LoRA rank does not fit the checkpoint.
    k.ok("model16 = MultiLoraTransformersModel(model_id='builtin://tiny-qwen2')\n"
         "model16.add_adapter_to_model('default', LoraConfig(target_modules='all-linear', r=16))\n"
         "model16.set_optimizer('AdamW', lr=1e-3)")
    run_id = k.ok("print(model.training_run_id)\nmodel.close()  # releases the run").stream("stdout").strip()
    one_line(f"%twinkle resume {run_id} after-interrupt --model model16", "LoRA rank 8")
    k.ok("model16.close()")
    # Server down, then a wrong key; then connect again.
    one_line("%twinkle connect http://127.0.0.1:9", "twinkle: cannot reach the twinkle server at http://127.0.0.1:9")
    one_line("import os\nos.environ['TWINKLE_SERVER_TOKEN'], _key = 'tk_wrong', os.environ['TWINKLE_SERVER_TOKEN']\n"
             "%twinkle connect", "twinkle: ")
    k.ok("os.environ['TWINKLE_SERVER_TOKEN'] = _key\n%twinkle connect")
    # A twinkle error raised by the user's own code: one line too (the cell still fails).
    result = k.execute("from twinkle_client import current_client\ncurrent_client().get_training_run('run-000000000000')")
    assert result.reply["status"] == "error"
    (_, error), = result.of_type("error")
    tb = [ANSI.sub("", line) for line in error["content"]["traceback"]]
    assert len(tb) == 1 and tb[0].startswith("NotFoundError: no training run")
    # Status, and a plot of the newest run (not training: it is finalized when the cell ends).
    status = k.ok("%twinkle status")
    (_, shown), = status.of_type("display_data")
    assert "kernel-user" in shown["content"]["data"]["text/plain"]
    assert "adapter slots" in shown["content"]["data"]["text/plain"]
    plotted = k.ok("%twinkle plot --x time --log")
    (_, final), = plotted.of_type("update_display_data")
    assert final["content"]["data"]["text/plain"].startswith("twinkle run-")
    assert final["content"]["data"]["text/plain"].endswith("finished")
    # The run browser lists exactly this user's runs.
    listed = k.ok("from twinkle_jupyter import RunBrowser\nprint(RunBrowser().text())").stream("stdout")
    assert set(RUN_ID.findall(listed)) == {r.training_run_id for r in client.list_training_runs(limit=100)}
    assert other_users_run not in listed


# ---------------------------------------------------------------------------- browsers, in this process


def namespace_untouched(ns: dict[str, Any]) -> bool:
    return not ns


def test_browsers_page_compare_delete_and_resume(
    twinkle_server: Any, add_user: Callable[..., str], raw_client: Callable[..., Any], raw_helpers: Any
) -> None:
    from twinkle_client import TwinkleClient
    from twinkle_jupyter import CheckpointBrowser, LossPlot, RunBrowser

    key = add_user(twinkle_server.data_dir, "browser-user")
    raw = raw_client(twinkle_server, key)
    objects = [raw_helpers.raw_model(raw) for _ in range(3)]
    raw.call(objects[0], "save", "ck-a", save_optimizer=True)
    raw.call(objects[0], "save", "ck-b")
    client = TwinkleClient(twinkle_server.url, key)
    runs = [r.training_run_id for r in client.list_training_runs(limit=10)]
    assert len(runs) == 3
    held = [r for r in runs if client.get_training_run(r).num_checkpoints == 2][0]

    rb = RunBrowser(page_size=2, client=client, namespace={})
    assert rb.total == 3 and rb.run_ids == runs[:2] and rb.prev_button.disabled
    rb.next_button.click()
    assert rb.run_ids == runs[2:] and rb.next_button.disabled
    rb.prev_button.click()
    bundle = rb._repr_mimebundle_()
    assert set(RUN_ID.findall(bundle["text/plain"])) == set(runs[:2])
    assert "<table" in bundle["text/html"] and "application/vnd.jupyter.widget-view+json" in bundle
    rb.selector.value = ()
    rb.compare_button.click()
    assert rb.last_message == "select a run first"
    rb.select(*runs[:2])
    plot = rb.compare()
    assert isinstance(plot, LossPlot) and plot.runs == runs[:2]
    plot.stop()

    cb = rb.show_checkpoints(held)
    assert isinstance(cb, CheckpointBrowser) and cb.checkpoint_ids == ["ck-a", "ck-b"]
    assert cb.copy_path("ck-a") == f"twinkle://{held}/weights/ck-a"
    assert f'data-path="twinkle://{held}/weights/ck-b"' in cb.copy_html.value
    cb.select("ck-b")
    cb.delete_button.click()  # asks first
    assert cb.confirm_box.layout.display == "" and len(client.list_checkpoints(held)) == 2
    cb.cancel_button.click()
    assert cb.confirm_box.layout.display == "none" and len(client.list_checkpoints(held)) == 2
    cb.delete_button.click()
    cb.confirm_button.click()
    assert [c.checkpoint_id for c in client.list_checkpoints(held)] == ["ck-a"] == cb.checkpoint_ids

    import twinkle_client.client as connection

    saved = connection._current
    connection._current = client  # remote models use the current connection
    try:
        # Resume while another live object trains the run: one line in the status, no exception.
        cb.namespace = {}
        cb.resume_button.click()
        assert cb.last_message.startswith(f"run {held} is still held by a live model object")
        assert namespace_untouched(cb.namespace)
        # With that object gone and no model in the notebook, Resume builds one from the run's record.
        raw.delete(f"/objects/{objects[0]}")
        namespace: dict[str, Any] = {}
        cb.namespace = namespace
        result = cb.resume("ck-a")
        model = namespace["model"]
        assert result.created_model and result.model_name == "model" and result.cur_step == 0
        assert model.training_run_id == held
        assert client.get_training_run(held).status == "active"
        assert cb.magic_line.value == f"%twinkle resume {held} ck-a"
        model.close()
    finally:
        connection._current = saved
    for obj in objects[1:]:
        raw.delete(f"/objects/{obj}")
    client.close()


# ---------------------------------------------------------------------------- log lines


def test_get_logger_lines_are_plain_output_in_a_kernel(kernel_env: dict[str, str], tmp_path: Path) -> None:
    """A kernel shows stderr as a red block: the training loop's log lines go to stdout there."""
    k = Kernel(kernel_env, tmp_path)
    try:
        # Before the extension is loaded, and after: both are plain output.
        before = k.ok("from twinkle import get_logger\nlogger = get_logger()\nlogger.info('loss: 1.2500')")
        k.ok("%load_ext twinkle_jupyter")
        after = k.ok("get_logger('twinkle.loop').warning('step %d done', 3)")
        for result, line in ((before, "[INFO:twinkle] loss: 1.2500\n"), (after, "[WARNING:twinkle.loop] step 3 done\n")):
            streams = [(m["content"]["name"], m["content"]["text"]) for _, m in result.of_type("stream")]
            assert streams == [("stdout", line)], streams
        # What a cell prints to stderr itself is still stderr: only the log lines moved.
        own = k.ok("import sys\nprint('real error', file=sys.stderr)")
        assert [m["content"]["name"] for _, m in own.of_type("stream")] == ["stderr"]
    finally:
        k.shutdown()
