"""Data pipeline: template labels and truncation, preprocessors, Dataset, InputProcessor, DataLoader."""

from __future__ import annotations

import json
import os

import pytest
import torch

from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.errors import InvalidArgumentError, NotFoundError, StateError
from twinkle.preprocessor import LanguageFilter, SelfCognitionProcessor
from twinkle.processor import InputProcessor
from twinkle.template import Template

TINY = "builtin://tiny-qwen2"
END = "<|im_end|>"


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """One cache folder for the module, so the built-in model is built once."""
    old = os.environ.get("TWINKLE_CACHE_DIR")
    os.environ["TWINKLE_CACHE_DIR"] = str(tmp_path_factory.mktemp("twinkle-cache"))
    yield
    if old is None:
        os.environ.pop("TWINKLE_CACHE_DIR", None)
    else:
        os.environ["TWINKLE_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def template(cache_dir) -> Template:
    return Template(TINY, max_length=512)


def labelled_spans(encoded: dict, tokenizer) -> list[str]:
    """The decoded runs of labelled (non -100) tokens, in order."""
    ids, labels = encoded["input_ids"], encoded["labels"]
    spans, current = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != -100:
            assert lab == tok, "a label must copy the token at its position"
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(s) for s in spans]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "我是小星。"},
    {"role": "user", "content": "And in English?"},
    {"role": "assistant", "content": "I am Little Star."},
]


# --- Template ----------------------------------------------------------------------------------------


def test_labels_cover_only_assistant_tokens(template):
    enc = template.encode(CONVERSATION)
    tok = template.tokenizer
    assert labelled_spans(enc, tok) == ["我是小星。" + END, "I am Little Star." + END]
    assert enc["length"] == len(enc["input_ids"]) == len(enc["labels"])
    # the full text is the chat template's rendering
    assert tok.decode(enc["input_ids"]) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # user and system text is never learnt
    unlabelled = tok.decode(
        [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab == -100]
    )
    assert "你是谁？" in unlabelled and "Be brief." in unlabelled and "Little Star" not in unlabelled


def test_default_system_and_generation_prompt(cache_dir):
    tpl = Template(TINY, default_system="You are Twinkle.")
    enc = tpl.encode([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    text = tpl.tokenizer.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are Twinkle.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert set(enc["labels"]) == {-100}


def test_plain_format_for_models_without_chat_template(cache_dir):
    tpl = Template(TINY, use_chat_template=False)
    enc = tpl.encode(CONVERSATION[1:3])
    assert tpl.tokenizer.decode(enc["input_ids"]).startswith("User:\n你是谁？\nAssistant:\n")
    assert labelled_spans(enc, tpl.tokenizer) == ["我是小星。" + END]


def test_no_assistant_turn_is_an_error(template):
    with pytest.raises(InvalidArgumentError, match="no assistant turn"):
        template.encode([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidArgumentError, match="role"):
        template.encode([{"role": "robot", "content": "hi"}])


def test_prefix_mismatch_is_a_clear_error(cache_dir):
    tpl = Template(TINY)
    # a template whose output starts with the message count: earlier turns render differently
    tpl.tokenizer.chat_template = "{{ messages | length }}" + tpl.tokenizer.chat_template
    with pytest.raises(InvalidArgumentError, match="token prefixes do not match"):
        tpl.encode(CONVERSATION[1:3])


def test_truncation_policies(template):
    full = template.encode(CONVERSATION)
    n = full["length"]
    limit = n - 10
    with pytest.raises(InvalidArgumentError) as err:
        Template(TINY, max_length=limit).encode(CONVERSATION)
    assert (
        str(err.value) == f"sample has {n} tokens, more than max_length={limit} (truncation_strategy='raise')"
    )

    right = Template(TINY, max_length=limit, truncation_strategy="right").encode(CONVERSATION)
    assert right["input_ids"] == full["input_ids"][:limit] and right["labels"] == full["labels"][:limit]
    assert right["length"] == limit

    left = Template(TINY, max_length=limit, truncation_strategy="left").encode(CONVERSATION)
    assert left["input_ids"] == full["input_ids"][-limit:] and left["labels"] == full["labels"][-limit:]
    assert left["length"] == limit

    assert Template(TINY, max_length=limit, truncation_strategy="delete").encode(CONVERSATION) is None
    # exactly max_length tokens is not truncated
    assert Template(TINY, max_length=n, truncation_strategy="delete").encode(CONVERSATION) == full


def test_unknown_truncation_strategy_lists_the_four(cache_dir):
    with pytest.raises(InvalidArgumentError, match="'raise', 'right', 'left', 'delete'"):
        Template(TINY, truncation_strategy="middle")


# --- SelfCognitionProcessor --------------------------------------------------------------------------


def test_self_cognition_processor_fills_zh_and_en():
    proc = SelfCognitionProcessor(model_name="小星", model_author="星光实验室", system="sys")
    batch = {
        "query": ["你是谁？", "Who made you?"],
        "response": ["我是{{NAME}}，由{{AUTHOR}}开发。", "{{AUTHOR}} built me, {{NAME}}."],
        "lang": ["zh", "en"],
    }
    out = proc(batch)
    assert out["response"] == ["我是小星，由星光实验室开发。", "星光实验室 built me, 小星."]
    assert out["messages"][0] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "你是谁？"},
        {"role": "assistant", "content": "我是小星，由星光实验室开发。"},
    ]
    assert [m["role"] for m in out["messages"][1]] == ["system", "user", "assistant"]
    no_system = SelfCognitionProcessor()({"query": ["q {{NAME}}"], "response": ["{{NAME}}/{{AUTHOR}}"]})
    assert no_system["messages"][0] == [
        {"role": "user", "content": "q twinkle robot"},
        {"role": "assistant", "content": "twinkle robot/twinkle lab"},
    ]
    with pytest.raises(InvalidArgumentError, match="needs column"):
        SelfCognitionProcessor()({"text": ["x"]})


# --- Dataset: loading --------------------------------------------------------------------------------


def test_builtin_self_cognition_rows():
    ds = Dataset(DatasetMeta("builtin://self-cognition"))
    assert 300 <= len(ds) <= 400
    assert set(ds.column_names) == {"query", "response", "lang"}
    langs = ds.dataset["lang"]
    assert set(langs) == {"zh", "en"} and abs(langs.count("zh") - langs.count("en")) <= len(ds) // 10
    responses = ds.dataset["response"]
    assert all("{{NAME}}" in r or "{{AUTHOR}}" in r for r in responses)
    assert max(len(r) for r in responses) <= 200
    assert len(set(zip(ds.dataset["query"], responses, strict=True))) == len(ds)


def test_builtin_pipeline_encodes(template):
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(0, 350, 7)))
    ds.set_template("Template", model_id=TINY, max_length=512)
    ds.map("SelfCognitionProcessor", init_args={"model_name": "小星", "model_author": "Star Lab"})
    ds.encode(batched=True)
    assert len(ds) == 50
    assert {"input_ids", "labels", "length", "messages", "lang"} <= set(ds.column_names)
    row = ds[3]
    assert row["length"] == len(row["input_ids"]) == len(row["labels"])
    [span] = labelled_spans(row, template.tokenizer)
    assert span == row["messages"][-1]["content"] + END
    assert "{{" not in span and ("小星" in span or "Star Lab" in span)


def test_local_jsonl_json_csv_parquet(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(5)
    ]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = Dataset(DatasetMeta(str(jsonl)))
    assert len(ds) == 5 and ds[4]["messages"][1]["content"] == "a4" and ds[-1] == ds[4]

    as_json = tmp_path / "chat.json"
    as_json.write_text(json.dumps(rows))
    assert len(Dataset(str(as_json))) == 5

    csv = tmp_path / "sc.csv"
    csv.write_text(
        "query,response,lang\n你是谁,我是{{NAME}},zh\nwho are you,I am {{NAME}},en\n", encoding="utf-8"
    )
    ds = Dataset(DatasetMeta(str(csv)))
    assert ds.column_names == ["query", "response", "lang"] and ds[0]["query"] == "你是谁"
    ds.map("SelfCognitionProcessor", init_args={"model_name": "N"})
    assert ds[1]["response"] == "I am N"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "t.parquet")
    assert Dataset(str(tmp_path / "t.parquet"))[2] == {"x": 3}
    # no cache file was written next to the user's data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "chat.jsonl", "sc.csv", "t.parquet"]


def test_local_folder_with_splits(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    (tmp_path / "test.jsonl").write_text('{"x": 3}\n')
    (tmp_path / "configuration.json").write_text('{"framework": "x"}')
    assert Dataset(str(tmp_path)).dataset["x"] == [1, 2]
    assert Dataset(DatasetMeta(str(tmp_path), split="test")).dataset["x"] == [3]
    with pytest.raises(NotFoundError, match="no split 'dev'"):
        Dataset(DatasetMeta(str(tmp_path), split="dev"))


@pytest.mark.parametrize("missing", ["missing.jsonl", "./data/nope.csv", "no_such_folder", "/abs/path/x"])
def test_nonexistent_dataset_is_not_found(missing):
    with pytest.raises(NotFoundError) as err:
        Dataset(DatasetMeta(missing))
    assert str(err.value) == f"dataset {missing!r} not found: no such file or folder"


def test_unknown_builtin_lists_builtins():
    with pytest.raises(NotFoundError, match="built-in: builtin://self-cognition"):
        Dataset("builtin://nope")


def test_dataset_meta_roundtrip_and_slices():
    for data_slice in (None, range(2, 10, 3), slice(1, None, 2), [5, 1, 3]):
        meta = DatasetMeta("builtin://self-cognition", subset_name="s", split="train", data_slice=data_slice)
        assert DatasetMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    import pydantic

    class Request(pydantic.BaseModel):
        meta: DatasetMeta

    sent = Request(meta=DatasetMeta("ms://org/name", subset_name="s", data_slice=range(0, 10, 2)))
    assert Request.model_validate_json(sent.model_dump_json()).meta == sent.meta
    assert Request(meta="builtin://self-cognition").meta == DatasetMeta("builtin://self-cognition")
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=[5, 1, 3]))
    full = Dataset("builtin://self-cognition")
    assert [ds[i] for i in range(3)] == [full[5], full[1], full[3]]
    assert len(Dataset(DatasetMeta("builtin://self-cognition", data_slice=slice(None, 20, 2)))) == 10
    with pytest.raises(InvalidArgumentError, match="selects row 1000"):
        Dataset(DatasetMeta("builtin://self-cognition", data_slice=[1000]))
    with pytest.raises(InvalidArgumentError):
        DatasetMeta("x", data_slice="0:10")


def test_getitem_bounds():
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(3)))
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-4]


# --- Dataset: transforms and mixing ------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_add_and_mix_datasets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"src": "a", "i": i} for i in range(7)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"src": "b", "i": i} for i in range(3)])

    ds = Dataset(a)
    ds.add_dataset(DatasetMeta(b))
    with pytest.raises(StateError, match="mix_dataset"):
        len(ds)
    # a map on one sub-dataset leaves the other alone
    ds.map(lambda row: {"tag": row["src"] * 2}, dataset_meta=b)
    ds.mix_dataset(interleave=True)
    assert len(ds) == 10
    rows = list(ds)
    assert [r["i"] for r in rows if r["src"] == "a"] == list(range(7))  # each source keeps its order
    assert [r["i"] for r in rows if r["src"] == "b"] == list(range(3))
    assert [r["src"] for r in rows] != ["a"] * 7 + ["b"] * 3  # actually interleaved
    assert {r["tag"] for r in rows if r["src"] == "b"} == {"bb"} and {
        r["tag"] for r in rows if r["src"] == "a"
    } == {None}

    again = Dataset(a)
    again.add_dataset(b)
    again.map(lambda row: {"tag": row["src"] * 2}, dataset_meta=b)
    again.mix_dataset()
    assert list(again) == rows  # the interleaving seed is fixed

    concat = Dataset(a)
    concat.add_dataset(b)
    concat.mix_dataset(interleave=False)
    assert [r["src"] for r in concat] == ["a"] * 7 + ["b"] * 3
    with pytest.raises(StateError):
        concat.add_dataset(DatasetMeta(b, split="test"))
    with pytest.raises(InvalidArgumentError, match="already added"):
        Dataset(a).add_dataset(a)


def test_filter_by_name_and_callable():
    ds = Dataset("builtin://self-cognition")
    n = len(ds)
    ds.filter("LanguageFilter", init_args={"lang": "zh"})
    assert 0 < len(ds) < n and set(ds.dataset["lang"]) == {"zh"}
    ds.filter(lambda row: "？" in row["query"])
    assert all("？" in q for q in ds.dataset["query"])
    assert LanguageFilter(["en", "zh"])({"lang": "en"})


def test_encode_needs_template_and_messages(tmp_path):
    ds = Dataset("builtin://self-cognition")
    with pytest.raises(InvalidArgumentError, match="no template set"):
        ds.encode()
    ds.set_template("Template", model_id=TINY)
    with pytest.raises(InvalidArgumentError, match="'messages' column"):
        ds.encode()


def test_encode_delete_drops_long_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * n}], "n": n}
        for n in (1, 200, 2, 300)
    ]
    ds = Dataset(write_jsonl(tmp_path / "long.jsonl", rows))
    ds.set_template("Template", model_id=TINY, max_length=100, truncation_strategy="delete")
    ds.encode(batched=False)
    assert ds.dataset["n"] == [1, 2]
    assert all(length <= 100 for length in ds.dataset["length"])
    shortest = min(ds.dataset["length"])
    ds.filter("LengthFilter", init_args={"max_length": shortest})
    assert ds.dataset["n"] == [1]


# --- InputProcessor ----------------------------------------------------------------------------------


SAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "extra": "ignored"},
    {"input_ids": [8], "labels": [8]},
]


def test_input_processor_pads_right_and_left():
    right = InputProcessor(padding_side="right", pad_token_id=0)(SAMPLES)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in right.values())

    left = InputProcessor(padding_side="left", pad_token_id=9)(SAMPLES)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


def test_input_processor_passes_collated_batches():
    out = InputProcessor()({"input_ids": [[1, 2], [3, 4]], "labels": torch.tensor([[1, -100], [3, 4]])})
    assert out["attention_mask"].tolist() == [[1, 1], [1, 1]] and out["labels"][0, 1] == -100
    mask = torch.tensor([[1, 0], [1, 1]])
    assert InputProcessor()(
        {
            "input_ids": torch.ones(2, 2, dtype=torch.int32),
            "labels": torch.ones(2, 2, dtype=torch.long),
            "attention_mask": mask,
        }
    )["attention_mask"].equal(mask)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "empty batch"),
        ([{"labels": [1]}], "sample 0 is missing 'input_ids'"),
        ([{"input_ids": [1]}], "sample 0 is missing 'labels'"),
        ([{"input_ids": [1, 2], "labels": [1]}], "sample 0: input_ids has 2 tokens but labels has 1"),
        ([{"input_ids": [1.0, 2.0], "labels": [1, 2]}], "sample 0: input_ids must be integers, got float"),
        (
            [{"input_ids": torch.tensor([1.0]), "labels": [1]}],
            "sample 0: input_ids must be integers, got float32",
        ),
        ([{"input_ids": [1, -3], "labels": [1, 2]}], "sample 0: input_ids must be token ids >= 0, got -3"),
        (
            [{"input_ids": [1, 2], "labels": [1, -5]}],
            "sample 0: labels must be token ids >= 0 or -100, got -5",
        ),
        ({"labels": torch.ones(2, 2, dtype=torch.long)}, "batch is missing 'input_ids'"),
        ({"input_ids": torch.ones(2, 2, dtype=torch.long)}, "batch is missing 'labels'"),
        (
            {"input_ids": torch.ones(2, 2), "labels": torch.ones(2, 2, dtype=torch.long)},
            "input_ids must be integers, got float32",
        ),
        (
            {"input_ids": torch.ones(5, dtype=torch.long), "labels": torch.ones(5, dtype=torch.long)},
            r"input_ids must be 2-D \[batch, seq\], got shape \(5,\)",
        ),
        (
            {
                "input_ids": torch.ones(1, 2, 3, dtype=torch.long),
                "labels": torch.ones(1, 2, 3, dtype=torch.long),
            },
            r"input_ids must be 2-D \[batch, seq\], got shape \(1, 2, 3\)",
        ),
        (
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 2, dtype=torch.long)},
            r"labels has shape \(2, 2\) but input_ids has shape \(2, 3\)",
        ),
        ({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [3]]}, "input_ids must be a rectangular 2-D array"),
        ({"input_ids": [[1, -2]], "labels": [[1, 2]]}, "input_ids must be token ids >= 0, got -2"),
    ],
)
def test_input_processor_rejects_bad_inputs(inputs, message):
    with pytest.raises(InvalidArgumentError, match=f"^{message}"):
        InputProcessor(pad_token_id=0)(inputs)


def test_input_processor_settings_are_checked():
    with pytest.raises(InvalidArgumentError, match="padding_side must be 'right' or 'left'"):
        InputProcessor(padding_side="middle")
    with pytest.raises(InvalidArgumentError, match="pad_token_id is not set"):
        InputProcessor()(SAMPLES)


# --- DataLoader --------------------------------------------------------------------------------------


def rows(n: int) -> list[dict]:
    return [{"idx": i} for i in range(n)]


def ids(batches) -> list[int]:
    return [row["idx"] for batch in batches for row in batch]


def test_each_epoch_covers_every_sample_once():
    dl = DataLoader(rows(10), batch_size=3, shuffle=True, seed=1)
    assert len(dl) == 4
    first = list(dl)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    second = list(dl)
    assert sorted(ids(first)) == sorted(ids(second)) == list(range(10))
    assert ids(first) != ids(second)  # a new order each epoch
    assert dl.get_state()["epoch"] == 2 and dl.consumed_train_samples == 20
    assert ids(DataLoader(rows(10), batch_size=4)) == list(range(10))  # no shuffle: identity order


def test_shuffle_depends_only_on_seed():
    def run(seed: int) -> list[int]:
        torch.manual_seed(seed * 1000 + 7)  # the global RNG must not matter
        dl = DataLoader(rows(20), batch_size=5, shuffle=True, seed=seed)
        return ids(dl) + ids(dl)

    assert run(3) == run(3)
    assert run(3) != run(4)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert run(3)[20:] == expected


@pytest.mark.parametrize("consumed", [0, 1, 7, 9, 10, 13, 25, 30])
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_yields_the_remaining_samples(consumed, drop_last):
    n, bs, epochs = 10, 4, 4
    fresh = DataLoader(rows(n), batch_size=bs, shuffle=True, seed=5, drop_last=drop_last)
    uninterrupted = [i for _ in range(epochs) for i in ids(fresh)]
    per_epoch = len(uninterrupted) // epochs

    resumed = DataLoader(rows(n), batch_size=bs, shuffle=True, seed=5, drop_last=drop_last)
    resumed.resume_from_checkpoint(consumed)
    rest = []
    while resumed.consumed_train_samples < per_epoch * epochs:
        rest += ids(resumed)
    assert rest == uninterrupted[consumed:]


def test_break_mid_epoch_continues_where_it_stopped():
    dl = DataLoader(rows(10), batch_size=2)
    seen = []
    for batch in dl:
        seen += ids([batch])
        if len(seen) == 4:
            break
    assert dl.get_state()["consumed_train_samples"] == 4
    seen += ids(dl)
    assert seen == list(range(10))
    skip = DataLoader(rows(10), batch_size=2)
    skip.skip_consumed_samples(3)
    assert ids(skip) == list(range(3, 10))


def test_drop_last():
    dl = DataLoader(rows(10), batch_size=4, shuffle=True, drop_last=True)
    assert len(dl) == 2
    batches = list(dl)
    assert [len(b) for b in batches] == [4, 4]
    assert dl.consumed_train_samples == 8 and dl.get_state()["epoch"] == 1
    assert list(DataLoader(rows(3), batch_size=4, drop_last=True)) == []


def test_dataloader_validates_arguments():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InvalidArgumentError, match="batch_size"):
            DataLoader(rows(3), batch_size=bad)
    dl = DataLoader(rows(3), batch_size=1)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(InvalidArgumentError, match="consumed_train_samples"):
            dl.resume_from_checkpoint(bad)


def test_dataloader_on_encoded_dataset_with_processor(template):
    ds = Dataset(DatasetMeta("builtin://self-cognition", data_slice=range(6)))
    ds.set_template("Template", model_id=TINY, max_length=512)
    ds.map("SelfCognitionProcessor")
    ds.encode()
    dl = DataLoader(ds, batch_size=4)
    batch = next(iter(dl))
    assert set(batch[0]) == {"input_ids", "labels"}  # only what the model takes
    dl.set_processor("InputProcessor", padding_side="right")
    dl.resume_from_checkpoint(0)
    batch = next(iter(dl))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    pad = template.pad_token_id
    short = int(batch["attention_mask"].sum(1).argmin())
    assert batch["input_ids"][short, -1] == pad and batch["labels"][short, -1] == -100


@pytest.mark.parametrize("dataset_id", ["hf:///etc", "hf://../x/y", "hf://tmp/../../etc", "ms:///etc/passwd", "hf://a/b/c"])
def test_hub_ids_are_never_local_paths(dataset_id) -> None:
    from twinkle.errors import InvalidArgumentError

    # A malformed hub id is a bad argument everywhere (library, server, uploads), never "not found".
    with pytest.raises(InvalidArgumentError, match="is not a hub id"):
        Dataset(DatasetMeta(dataset_id))
