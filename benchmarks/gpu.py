"""Multi-LoRA training on a CUDA device: plain transformers + peft against twinkle, alone and
with four tenants fused or time-shared, on random-initialised Qwen2.5-shaped models.

    .venv/bin/python -m benchmarks.gpu [--sizes 0.5b,7b] [--rows 2] [--length 512] [--steps 10] [--smoke]

Models are built from their configs (no download) in bf16 and saved once to a scratch folder
(``local://``), so that every contender loads the same weights. For each size:

- ``peft alone``: one adapter, batch ``4 x rows`` (``--rows`` per tenant), forward + backward;
- ``peft time-shared``: four adapters, each its batch of ``rows`` in turn (``set_adapter``);
- ``twinkle alone``: ``MultiLoraTransformersModel.forward_backward`` on one adapter at ``4 x rows``;
- ``twinkle time-shared`` / ``fused``: four adapters, ``rows`` each, one call after another or
  all four in one ``forward_backward_many`` pass;
- ``twinkle server, fused`` (0.5B only): four client processes against ``twinkle-server``.

Printed per contender: ms per step (one micro-batch of every tenant), tokens/s, MFU (4 x
parameters x tokens per second over the device's peak bf16 rate: a frozen base skips the
weight-gradient matmuls; attention not counted) and peak memory; a table, then one JSON line.
``--smoke`` runs a tiny config on the CPU to check the script (its figures mean nothing).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import Report, add_user, client_env, last_json_line, start_server, work_dir

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5 configs (hidden size, MLP width, layers, attention heads, KV heads, vocabulary).
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TENANTS = 4


def build(size: str, folder: Path, dtype: Any) -> Path:
    """A random-initialised model of ``size`` saved to ``folder`` (with the tiny model's tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from twinkle.builtin.tiny_model import tiny_model_dir

    if (folder / "config.json").exists():
        return folder
    config = Qwen2Config(**SHAPES[size], max_position_embeddings=32768, torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model_dir() / name, folder / name)
    return folder


def batches(rows: int, length: int, vocab: int, seed: int, n: int) -> list[list[dict[str, list[int]]]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, min(vocab, 150000), (rows, length), generator=gen).tolist()
        out.append([{"input_ids": r, "labels": r} for r in ids])
    return out


def timed(fn: Any, steps: int, device: Any) -> float:
    """Seconds per call of ``fn`` (two warm-up calls first)."""
    import torch

    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def peft_runs(folder: Path, args: argparse.Namespace, device: Any, dtype: Any) -> list[dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(base, config, adapter_name="t0")
    for i in range(1, TENANTS):
        model.add_adapter(f"t{i}", config)
    model.train()
    vocab = base.config.vocab_size
    big = torch.randint(3, min(vocab, 150000), (TENANTS * args.rows, args.length), device=device)
    small = [torch.randint(3, min(vocab, 150000), (args.rows, args.length), device=device) for _ in range(TENANTS)]

    def alone() -> None:
        model.set_adapter("t0")
        model(input_ids=big, labels=big).loss.backward()

    def shared() -> None:
        for i, ids in enumerate(small):
            model.set_adapter(f"t{i}")
            model(input_ids=ids, labels=ids).loss.backward()

    out = []
    for name, fn in (("peft alone (batch 4 x rows)", alone), ("peft time-shared (4 tenants)", shared)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out.append({"contender": name, "seconds": timed(fn, args.steps, device), "peak": _peak(device)})
    return out


def twinkle_runs(folder: Path, args: argparse.Namespace, device: Any, dtype: Any) -> list[dict[str, Any]]:
    import torch
    from peft import LoraConfig

    from twinkle.model import MultiLoraTransformersModel

    model = MultiLoraTransformersModel(str(folder), max_loras=TENANTS + 1, device=str(device),
                                       dtype=str(dtype).removeprefix("torch."), output_dir=str(folder.parent / "out"))
    names = [f"t{i}" for i in range(TENANTS)]
    for name in names:
        model.add_adapter_to_model(name, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        model.set_processor("InputProcessor", pad_token_id=0, adapter_name=name)
        model.set_optimizer("AdamW", lr=1e-5, adapter_name=name)
    vocab = model.vocab_size
    big = batches(TENANTS * args.rows, args.length, vocab, 1, 1)[0]
    small = batches(args.rows, args.length, vocab, 2, TENANTS)

    def alone() -> None:
        model.forward_backward(inputs=big, adapter_name="t0")

    def shared() -> None:
        for name, batch in zip(names, small, strict=True):
            model.forward_backward(inputs=batch, adapter_name=name)

    def fused() -> None:
        for out in model.forward_backward_many(list(zip(small, names, strict=True))):
            if isinstance(out, Exception):
                raise out

    out = []
    for name, fn in (("twinkle alone (batch 4 x rows)", alone), ("twinkle time-shared (4 tenants)", shared),
                     ("twinkle fused (4 tenants)", fused)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out.append({"contender": name, "seconds": timed(fn, args.steps, device), "peak": _peak(device)})
        for state_name in names:
            model.zero_grad(adapter_name=state_name)
    return out


def server_run(folder: Path, args: argparse.Namespace, work: Path, fuse: bool) -> dict[str, Any]:
    """Four client processes train against one server; seconds per step of all four."""
    data = work / f"server-{fuse}"
    extra = ["--fuse-tokens", "32768" if fuse else "0"]
    server = start_server(data, "--model", str(folder), "--allow-local-data", "--max-loras",
                          str(TENANTS + 1), "--max-loras-per-user", "1", "--max-tokens-per-call", "65536", *extra,
                          timeout=900)
    try:
        keys = [add_user(data, f"tenant{i}") for i in range(TENANTS)]
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.multi_tenant", "--tenant", "--url", server.url,
                                   "--key", k, "--batch", str(args.rows), "--length", str(args.length), "--steps",
                                   str(args.steps), "--seed", str(i), "--ready", str(work / f"r{fuse}{i}"),
                                   "--go", str(work / f"go{fuse}"), "--model", str(folder)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
                                  cwd=str(Path(__file__).resolve().parents[1]))
                 for i, k in enumerate(keys)]
        while not all((work / f"r{fuse}{i}").exists() for i in range(TENANTS)):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a tenant failed: {[p.stderr.read()[-800:] for p in procs if p.poll() is not None]}")
            time.sleep(0.05)
        (work / f"go{fuse}").touch()
        results = [last_json_line(p.communicate(timeout=1800)[0]) for p in procs]
    finally:
        server.stop()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"contender": f"twinkle server, {'fused' if fuse else 'time-shared'} (4 client processes)",
            "seconds": span / args.steps, "peak": None}


def _peak(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="model shapes (default 0.5b,7b; smoke: a tiny one on the CPU)")
    p.add_argument("--rows", type=int, default=2, help="rows per tenant per step (default 2)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default 512; smoke 32)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    p.add_argument("--no-server", action="store_true", help="skip the server contenders")
    p.add_argument("--keep", default=None, help="keep models, data and logs in this folder")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    args.length = args.length or (32 if args.smoke else 512)
    args.steps = args.steps or (2 if args.smoke else 10)
    sizes = ["smoke"] if args.smoke else (args.sizes or "0.5b,7b").split(",")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    report = Report("gpu", args.smoke)
    report.line(f"device {name}; {TENANTS} tenants x {args.rows} rows x {args.length} tokens per step; "
                f"{args.steps} timed steps; LoRA r=16 on all linear layers")
    work = work_dir("gpu", args.keep)
    table, figures = [], []
    for size in sizes:
        folder = build(size, work / f"model-{size}", dtype)
        params = _param_count(folder)
        runs = peft_runs(folder, args, device, dtype)
        _free(device)
        runs += twinkle_runs(folder, args, device, dtype)
        _free(device)
        if not args.no_server and size in ("0.5b", "smoke"):
            runs += [server_run(folder, args, work, fuse=True), server_run(folder, args, work, fuse=False)]
        tokens = TENANTS * args.rows * args.length
        for r in runs:
            tps = tokens / r["seconds"]
            mfu = 4 * params * tps / peak if peak else None
            figures.append({"size": size, **r, "tokens_per_s": tps, "mfu": mfu})
            table.append([size, r["contender"], f"{1000 * r['seconds']:.0f}", f"{tps:.0f}",
                          "-" if mfu is None else f"{100 * mfu:.1f}%",
                          "-" if r["peak"] is None else f"{r['peak']:.1f}"])
    Report.table(["model", "contender", "ms/step", "tokens/s", "MFU", "peak GiB"], table)
    report.finish(device=name, runs=figures)
    return 0


def _param_count(folder: Path) -> int:
    """Parameters of the saved model, read from its safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
