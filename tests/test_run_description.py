"""What a run was: its recorded settings, the user's name, tags and dataset for it, filters,
comparing runs, and where ``twinkle.get_logger()`` writes.

The ``unit`` tests check the rules, the store, the views and the notebook's formatting in the
test process; the ``server`` tests go through a real server with two users.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from twinkle.errors import InvalidArgumentError, NotFoundError
from twinkle.protocol.wire import RunConfig, TrainingRun

# ---------------------------------------------------------------------------- rules


@pytest.mark.unit
def test_name_tag_and_dataset_rules() -> None:
    from twinkle.protocol.names import check_run_dataset, check_run_name, check_run_tags, check_tag

    assert check_run_name("  lr sweep #3 (rank 16)  ") == "lr sweep #3 (rank 16)"
    assert check_run_name("") == ""
    assert check_run_name("x" * 100) == "x" * 100
    with pytest.raises(InvalidArgumentError, match="^run name must be at most 100 characters, got 101$"):
        check_run_name("x" * 101)
    with pytest.raises(InvalidArgumentError, match="^run name must be one line of printable characters"):
        check_run_name("two\nlines")
    with pytest.raises(InvalidArgumentError, match="^run name must be a string, got int$"):
        check_run_name(3)
    assert check_tag("lr=1e-4") == "lr=1e-4" and check_tag("a:b+c_d.e-f") == "a:b+c_d.e-f"
    for bad in ("", "-x", "has space", "x" * 33, "#x", "é", "a,b", None):
        with pytest.raises(InvalidArgumentError, match="^a tag must be 1-32 letters"):
            check_tag(bad)
    assert check_run_tags(["b", "a", "b"]) == ["b", "a"]
    assert check_run_tags([]) == []
    with pytest.raises(InvalidArgumentError, match="^a run may have at most 16 tags, got 17$"):
        check_run_tags([f"t{i}" for i in range(17)])
    with pytest.raises(InvalidArgumentError, match="^tags must be a list of strings, got str$"):
        check_run_tags("a")
    assert check_run_dataset("ms://org/data") == "ms://org/data"
    with pytest.raises(InvalidArgumentError, match="^dataset must be at most 200 characters"):
        check_run_dataset("d" * 201)


# ---------------------------------------------------------------------------- store and view


@pytest.mark.unit
def test_store_describes_filters_and_keeps_the_largest_batch(tmp_path) -> None:
    from twinkle_server import views
    from twinkle_server.store import Store

    store = Store(tmp_path / "db.sqlite")
    a, b = store.add_user("a", "k" * 12, "h"), store.add_user("b", "j" * 12, "h")
    ids = ["run-00000000000a", "run-00000000000b", "run-00000000000c"]
    for rid in ids:
        store.create_run(rid, a.id, base_model="m", adapter_name="x", lora_rank=4,
                         lora_config={"r": 4, "lora_alpha": 16, "target_modules": "all-linear"},
                         gradient_accumulation_steps=2)
    store.set_component(ids[0], "optimizer", {"name": "AdamW", "kwargs": {"lr": 0.002}, "lr": 0.002})
    store.set_component(ids[0], "lr_scheduler", {"name": "CosineAnnealingLR", "kwargs": {"T_max": 10}})
    run = store.describe_run(a.id, ids[0], name="100% sweep_1", tags=["exp", "lr=2e-3"], dataset="ms://o/d")
    assert (run.name, run.tags, run.dataset) == ("100% sweep_1", ["exp", "lr=2e-3"], "ms://o/d")
    store.describe_run(a.id, ids[1], name="other", tags=["exp"])
    # None leaves a field, '' clears it, [] clears the tags.
    assert store.describe_run(a.id, ids[0]).name == "100% sweep_1"
    cleared = store.describe_run(a.id, ids[1], name="", tags=[])
    assert (cleared.name, cleared.tags) == (None, [])
    store.describe_run(a.id, ids[1], name="other", tags=["exp"])
    # Another user's run is not found, and unchanged.
    with pytest.raises(NotFoundError, match="no training run 'run-00000000000a'"):
        store.describe_run(b.id, ids[0], name="mine now")
    assert store.get_run(a.id, ids[0]).name == "100% sweep_1"

    def listed(user: int, **kw: Any) -> list[str]:
        runs, total = store.list_runs(user, 10, 0, **kw)
        assert total == len(runs)
        return sorted(r.run_id for r in runs)

    assert listed(a.id, tags=["exp"]) == ids[:2]
    assert listed(a.id, tags=["exp", "lr=2e-3"]) == ids[:1]
    assert listed(a.id, name="SWEEP") == ids[:1]
    assert listed(a.id, name="%") == ids[:1]  # matched as itself, not as a wildcard
    assert listed(a.id, name="_") == ids[:1]
    assert listed(a.id, tags=["nope"]) == []
    assert listed(b.id, tags=["exp"]) == [] and listed(b.id) == []

    for rows in (4, 2, 6, 3):
        store.note_batch_size(ids[0], rows)
    config = views.training_run(store.get_run(a.id, ids[0])).config
    assert config == RunConfig(lora_rank=4, lora_alpha=16, target_modules="all-linear", optimizer="AdamW",
                               learning_rate=0.002, lr_scheduler="CosineAnnealingLR", gradient_accumulation_steps=2,
                               batch_size=6, dataset="ms://o/d")
    # A run recorded before these fields: nothing made up.
    bare = views.training_run(store.get_run(a.id, ids[2]))
    assert bare.name is None and bare.tags == [] and bare.config.batch_size is None
    assert bare.config.optimizer is None and bare.config.learning_rate is None


@pytest.mark.unit
def test_an_older_database_gets_the_new_columns(tmp_path) -> None:
    import sqlite3

    from twinkle_server.store import MIGRATIONS, Store

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:-1], start=1):
        db.executescript(f"{script}\nPRAGMA user_version = {number};")
    db.execute("INSERT INTO users (name, key_id, key_hash, created) VALUES ('a', 'k', 'h', 0)")
    db.execute("INSERT INTO training_runs (run_id, user_id, base_model, adapter_name, created)"
               " VALUES ('run-00000000000a', 1, 'm', 'x', 0)")
    db.commit()
    db.close()
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    run = store.get_run(1, "run-00000000000a")
    assert (run.name, run.tags, run.dataset, run.batch_size) == (None, [], None, None)


# ---------------------------------------------------------------------------- notebook formatting


def _run(rid: str, **over: Any) -> TrainingRun:
    config = {"lora_rank": 8, "lora_alpha": 16, "target_modules": "all-linear", "optimizer": "AdamW",
              "learning_rate": 0.001, "lr_scheduler": "LinearLR", "gradient_accumulation_steps": 2,
              "batch_size": 4, "dataset": "ms://org/data", **over.pop("config", {})}
    fields: dict[str, Any] = {
        "training_run_id": rid, "base_model": "builtin://tiny-qwen2", "model_owner": "u", "adapter_name": "default",
        "created": datetime(2025, 1, 1, tzinfo=timezone.utc), "name": "base", "tags": ["exp"],
        "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.05},
        "components": {"optimizer": {"name": "AdamW", "kwargs": {"lr": 0.001, "weight_decay": 0.0}, "lr": 0.001},
                       "template": {"name": "Template", "kwargs": {}}},
        "config": RunConfig(**config),
    }
    fields.update(over)
    return TrainingRun(**fields)


@pytest.mark.unit
def test_settings_summary_and_comparison() -> None:
    from twinkle_jupyter.runinfo import RunComparison, RunSummary, config_summary, parse_filter, run_settings

    a = _run("run-00000000000a")
    b = _run("run-00000000000b", name="wider", tags=["exp", "r16"], config={"lora_rank": 16, "learning_rate": 2e-4},
             components={"optimizer": {"name": "AdamW", "kwargs": {"lr": 2e-4, "weight_decay": 0.1}, "lr": 2e-4},
                         "template": {"name": "Template", "kwargs": {}}})
    assert config_summary(a) == "r8 α16 all-linear · AdamW lr 0.001 · LinearLR · accum 2 · batch 4 · ms://org/data"
    settings = run_settings(a)
    assert list(settings)[:12] == ["name", "tags", "base model", "dataset", "LoRA rank", "LoRA alpha",
                                   "target modules", "optimizer", "learning rate", "lr scheduler",
                                   "grad accumulation", "batch size"]
    assert settings["lora.lora_dropout"] == "0.05" and settings["optimizer.weight_decay"] == "0"
    assert "optimizer.lr" not in settings and "lora.r" not in settings and settings["template"] == "Template"

    comparison = RunComparison([a, b])
    assert comparison.differences == {
        "name": ["base", "wider"], "tags": ["exp", "exp, r16"], "LoRA rank": ["8", "16"],
        "learning rate": ["0.001", "0.0002"], "optimizer.weight_decay": ["0", "0.1"],
    }
    text = repr(comparison).splitlines()
    assert text[0].split() == ["setting", "run-00000000000a", "run-00000000000b"]
    assert text[3].split() == ["LoRA", "rank", "8", "16"]
    assert "<th" in comparison._repr_html_() and "weight_decay" in comparison._repr_html_()
    assert repr(RunComparison([a, _run("run-00000000000c")])) == \
        "run-00000000000a, run-00000000000c: the same settings"
    assert "LoRA alpha" in repr(RunSummary(a)) and "ms://org/data" in RunSummary(a)._repr_html_()
    assert parse_filter("  lr sweep #exp #r16 #exp # ") == ("lr sweep", ["exp", "r16"])
    assert parse_filter("") == ("", [])


# ---------------------------------------------------------------------------- get_logger


@pytest.mark.unit
def test_log_lines_go_to_stdout_only_in_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinkle import get_logger
    from twinkle.log import in_kernel_output

    KernelStream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})
    assert in_kernel_output(KernelStream()) and not in_kernel_output(io.StringIO())
    logger = get_logger("twinkle.test_log")
    # In a terminal (or a script, a server): stderr.
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logger.info("loss: 1.25")
    assert (out.getvalue(), err.getvalue()) == ("", "[INFO:twinkle.test_log] loss: 1.25\n")
    # In a Jupyter kernel: stdout, even though the handler was made before.
    kout, kerr = KernelStream(), KernelStream()
    monkeypatch.setattr(sys, "stdout", kout)
    monkeypatch.setattr(sys, "stderr", kerr)
    logger.info("loss: 0.5")
    assert (kout.getvalue(), kerr.getvalue()) == ("[INFO:twinkle.test_log] loss: 0.5\n", "")
    # One handler of twinkle's own however often get_logger ran (pytest may add its capture ones).
    get_logger("twinkle.test_log")
    ours = [h for h in logging.getLogger("twinkle").handlers if type(h).__module__ == "twinkle.log"]
    assert len(ours) == 1


# ---------------------------------------------------------------------------- a real server, two users


@pytest.fixture(scope="module")
def described(server, add_user, raw_client, raw_helpers) -> SimpleNamespace:
    """User A trained two runs (batch 4, lr 1e-3 and 5e-4); user B has none."""
    from peft import LoraConfig

    from twinkle_client import TwinkleClient

    a_key = add_user(server.data_dir, f"desc-a-{uuid.uuid4().hex[:6]}")
    b_key = add_user(server.data_dir, f"desc-b-{uuid.uuid4().hex[:6]}")
    raw = raw_client(server, a_key)
    dataset, loader = raw_helpers.raw_dataloader(raw, rows=8, batch_size=4)
    first = raw_helpers.raw_model(raw)
    raw_helpers.train_steps(raw, first, loader, 1)
    second = raw.create("model", "builtin://tiny-qwen2")
    r = raw.calls(second, [
        ("add_adapter_to_model", ["default", LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])],
         {"gradient_accumulation_steps": 2}),
        ("set_processor", ["InputProcessor"], {"padding_side": "right"}),
        ("set_optimizer", ["AdamW"], {"lr": 5e-4}),
        ("set_lr_scheduler", ["LinearLR"], {}),
    ])
    assert all(x["ok"] for x in raw.body(r)["results"]), raw.body(r)
    raw_helpers.train_steps(raw, second, loader, 1)
    a, b = TwinkleClient(server.url, a_key), TwinkleClient(server.url, b_key)
    runs = {r.config.lora_rank: r.training_run_id for r in a.list_training_runs()}
    yield SimpleNamespace(server=server, a=a, b=b, raw=raw, raw_b=raw_client(server, b_key), first=runs[4],
                          second=runs[8])
    for obj in (first, second, loader, dataset):
        raw.delete(f"/objects/{obj}")
    a.close()
    b.close()


@pytest.mark.server
def test_each_run_records_its_settings(described) -> None:
    first = described.a.get_training_run(described.first)
    assert first.config == RunConfig(lora_rank=4, lora_alpha=8, target_modules="all-linear", optimizer="AdamW",
                                     learning_rate=1e-3, lr_scheduler=None, gradient_accumulation_steps=1,
                                     batch_size=4, dataset=None)
    second = described.a.get_training_run(described.second)
    # LinearLR lowered the optimizer's rate after it was set; the run keeps the rate that was set.
    assert second.config == RunConfig(lora_rank=8, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                      optimizer="AdamW", learning_rate=5e-4, lr_scheduler="LinearLR",
                                      gradient_accumulation_steps=2, batch_size=4, dataset=None)
    assert first.name is None and first.tags == []


@pytest.mark.server
def test_name_tags_and_dataset_are_the_owners_to_set(described) -> None:
    from twinkle.dataset import DatasetMeta

    a, b = described.a, described.b
    run = a.update_training_run(described.first, name="baseline r4", tags=["exp", "lr=1e-3"],
                                dataset=DatasetMeta("builtin://self-cognition"))
    assert (run.name, run.tags, run.config.dataset) == ("baseline r4", ["exp", "lr=1e-3"], "builtin://self-cognition")
    a.update_training_run(described.second, name="wide r8", tags=["exp"])
    assert a.update_training_run(described.first, tags=["exp", "lr=1e-3", "exp"]).name == "baseline r4"  # kept
    # The other user: "not found", whether reading or writing, and nothing changes.
    for call in (lambda: b.update_training_run(described.first, name="mine"),
                 lambda: b.get_training_run(described.first)):
        with pytest.raises(NotFoundError, match=f"^no training run '{described.first}'"):
            call()
    r = described.raw_b.http.patch(f"/training_runs/{described.first}", json={"name": "mine"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert a.get_training_run(described.first).name == "baseline r4"
    # Filters: A's tags never find B's runs, nor B A's.
    assert {r.training_run_id for r in a.list_training_runs(tags="exp")} == {described.first, described.second}
    assert [r.training_run_id for r in a.list_training_runs(tags=["exp", "lr=1e-3"])] == [described.first]
    assert [r.training_run_id for r in a.list_training_runs(name="WIDE")] == [described.second]
    assert b.list_training_runs(tags="exp") == [] and b.list_training_runs() == []
    runs, cursor = a.list_training_runs_with_cursor(limit=1, tags=["exp"])
    assert len(runs) == 1 and cursor.total_count == 2


@pytest.mark.server
@pytest.mark.parametrize("body, message", [
    ({"name": "n" * 101}, "run name must be at most 100 characters, got 101"),
    ({"name": "a\nb"}, "run name must be one line of printable characters"),
    ({"tags": ["ok", "not ok"]}, "a tag must be 1-32 letters"),
    ({"tags": [f"t{i}" for i in range(17)]}, "a run may have at most 16 tags, got 17"),
    ({"tags": "exp"}, "tags: Input should be a valid list"),
    ({"dataset": "d" * 201}, "dataset must be at most 200 characters, got 201"),
    ({"owner": "someone"}, "owner: Extra inputs are not permitted"),
])
def test_the_server_refuses_bad_descriptions_in_one_line(described, body: dict[str, Any], message: str) -> None:
    http = described.raw.http  # past the client's own checks
    r = http.patch(f"/training_runs/{described.first}", json=body)
    error = r.json()["error"]
    assert r.status_code in (400, 422) and error["code"] == "invalid_argument", (r.status_code, error)
    assert error["message"].startswith(message) and "\n" not in error["message"]
    assert "Traceback" not in r.text


@pytest.mark.server
def test_the_server_bounds_what_it_reads(described) -> None:
    http = described.raw.http
    big = http.patch(f"/training_runs/{described.first}", content=json.dumps({"name": "x" * 70_000}),
                     headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert "64 KiB" in big.json()["error"]["message"]
    bad = http.patch(f"/training_runs/{described.first}", content=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("request body is not valid JSON")
    listing = http.get("/training_runs", params={"tag": "has space"})
    assert listing.status_code == 400 and listing.json()["error"]["message"].startswith("a tag must be")
    too_many = http.get("/training_runs", params=[("tag", f"t{i}") for i in range(17)])
    assert too_many.status_code == 422 and too_many.json()["error"]["code"] == "invalid_argument"
    # The client refuses before sending, with the same line.
    with pytest.raises(InvalidArgumentError, match="^a tag must be 1-32 letters"):
        described.a.update_training_run(described.first, tags=["no spaces please"])
    with pytest.raises(InvalidArgumentError, match="^run name must be at most 100 characters"):
        described.a.list_training_runs(name="x" * 101)


@pytest.mark.server
def test_magics_and_browser_show_filter_and_compare(described, capsys: pytest.CaptureFixture[str]) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    import twinkle_client.client as connection
    from twinkle_jupyter import RunBrowser

    a = described.a
    a.update_training_run(described.first, name="baseline r4", tags=["exp", "lr=1e-3"])
    a.update_training_run(described.second, name="wide r8", tags=["exp"])
    saved = connection._current
    connection._current = a
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "twinkle_jupyter")
        capsys.readouterr()
        assert shell.run_cell(f"%twinkle label {described.second} --tag r8 --untag exp --dataset ms://org/d").success
        out = capsys.readouterr()
        assert out.out.strip() == f"twinkle: {described.second}: name wide r8; tags r8; dataset ms://org/d"
        assert a.get_training_run(described.second).tags == ["r8"]
        assert shell.run_cell(f"%twinkle label {described.second} --tag exp").success
        assert a.get_training_run(described.second).tags == ["r8", "exp"]
        capsys.readouterr()
        assert shell.run_cell(f"%twinkle label {described.second} --tag 'bad tag'").success
        assert capsys.readouterr().err.startswith("twinkle: a tag must be 1-32 letters")

        assert shell.run_cell(f"%twinkle show {described.second}").success
        shown = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:])
        assert {k: shown[k] for k in ("LoRA rank", "LoRA alpha", "target modules", "optimizer", "learning rate",
                                      "lr scheduler", "grad accumulation", "batch size", "dataset", "name")} == {
            "LoRA rank": "8", "LoRA alpha": "32", "target modules": "q_proj, v_proj", "optimizer": "AdamW",
            "learning rate": "0.0005", "lr scheduler": "LinearLR", "grad accumulation": "2", "batch size": "4",
            "dataset": "ms://org/d", "name": "wide r8"}

        assert shell.run_cell(f"%twinkle compare {described.first} {described.second}").success
        rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
        assert rows["LoRA rank"][-2:] == ["4", "8"] and rows["learning rate"][-2:] == ["0.001", "0.0005"]
        assert "optimizer" not in rows and "batch size" not in rows  # the same in both: not shown
        assert shell.run_cell(f"%twinkle compare {described.first} run-000000000000").success
        said = capsys.readouterr().err.strip()
        assert said.startswith("twinkle: no training run 'run-000000000000'") and "\n" not in said

        browser = RunBrowser(client=a, namespace={}, filter="#exp #lr=1e-3")
        assert browser.run_ids == [described.first] and browser.last_message == "1 run matches the filter"
        assert "baseline r4" in browser.text() and "r4 α8 all-linear · AdamW lr 0.001 · batch 4" in browser.text()
        browser.filter_box.value = "wide"  # typing in the box
        assert browser.run_ids == [described.second]
        browser.set_filter("#nothing-has-this")
        assert browser.run_ids == [] and "no runs match the filter" in browser.table.value
        browser.set_filter("")
        plot = browser.compare([described.first, described.second])
        assert set(browser.last_comparison.differences) >= {"name", "LoRA rank", "learning rate", "tags"}
        assert plot.runs == [described.first, described.second]
        plot.stop()
        browser.close()
    finally:
        shell.run_line_magic("unload_ext", "twinkle_jupyter")
        connection._current = saved
