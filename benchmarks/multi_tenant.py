"""Several tenants training at once on one server: fused passes against time-sharing.

    .venv/bin/python -m benchmarks.multi_tenant [--tenants 1,2,4,8] [--steps 20] [--length 256] [--smoke]

For each count of tenants N, N client processes (one user each) train their own adapter on
the built-in model at batch 2 (rows of ``--length`` tokens) against one ``twinkle-server``,
first with fused passes (``--fuse-tokens 32768``) and then time-shared (``--fuse-tokens 0``); one tenant
at batch 8 is the fused bound (the same rows in one call). Each tenant warms up, waits until
every tenant is ready, then runs ``--steps`` micro-steps (forward_backward and an optimizer
step, sent without waiting for replies) and reads its losses at the end. Printed: aggregate
tokens/s (real tokens over the span from the first start to the last end), per-tenant
tokens/s (min/max, and min over mean), and the ratio to the bound; a table, then one JSON
line. The server is pinned to the first half of the cores and the clients to the rest
(``taskset``) where there are at least two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import Report, add_user, client_env, last_json_line, machine, start_server, work_dir


def tenant_main(args: argparse.Namespace) -> None:
    """One tenant (a child process): train, report tokens and times as one JSON line."""
    import torch
    from peft import LoraConfig

    from twinkle_client import init_twinkle_client
    from twinkle_client.model import MultiLoraTransformersModel

    init_twinkle_client(base_url=args.url, api_key=args.key)
    model = MultiLoraTransformersModel(model_id=args.model)
    model.add_adapter_to_model("bench", LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.set_optimizer("AdamW", lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)

    def batch() -> list[dict[str, list[int]]]:
        rows = torch.randint(3, 250, (args.batch, args.length), generator=gen).tolist()
        return [{"input_ids": r, "labels": r} for r in rows]

    for _ in range(2):  # warm-up: the first calls build the template and the optimizer state
        float(model.forward_backward(inputs=batch()).loss)
        model.clip_grad_and_step()
    model.get_train_state()
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.01)
    start = time.time()
    outs = []
    for _ in range(args.steps):
        outs.append(model.forward_backward(inputs=batch()))
        model.clip_grad_and_step()
    losses = [float(o.loss) for o in outs]
    end = time.time()
    print(json.dumps({"start": start, "end": end, "tokens": args.steps * args.batch * args.length,
                      "last_loss": losses[-1]}))


def _passes(url: str, key: str) -> tuple[int, int]:
    from twinkle_client import TwinkleClient

    with TwinkleClient(url, key) as client:
        info = client.get_server_info()
    return info.fused_passes, info.fused_calls


def run_group(url: str, keys: list[str], batch: int, args: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    passes_before, calls_before = _passes(url, keys[0])
    go = work / f"go-{label}"
    ready = [work / f"ready-{label}-{i}" for i in range(len(keys))]
    cpus = os.cpu_count() or 1
    pin = ["taskset", "-c", f"{cpus // 2}-{cpus - 1}"] if cpus >= 2 and shutil.which("taskset") else []
    procs = [
        subprocess.Popen(
            [*pin, sys.executable, "-m", "benchmarks.multi_tenant", "--tenant", "--url", url, "--key", key,
             "--batch", str(batch), "--length", str(args.length), "--steps", str(args.steps),
             "--seed", str(i), "--ready", str(ready[i]), "--go", str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**client_env(), "OMP_NUM_THREADS": "1"},
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        for i, key in enumerate(keys)
    ]
    deadline = time.monotonic() + 600
    while not all(r.exists() for r in ready):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            errs = [p.stderr.read()[-500:] for p in procs if p.poll() is not None and p.stderr]
            raise RuntimeError(f"{label}: a tenant did not get ready: {errs}")
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        if p.returncode:
            raise RuntimeError(f"{label}: a tenant failed: {err[-800:]}")
        results.append(last_json_line(out))
    passes, calls = _passes(url, keys[0])
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    each = [r["tokens"] / (r["end"] - r["start"]) for r in results]
    mean = sum(each) / len(each)
    return {"tenants": len(keys), "batch": batch, "tokens_per_s": sum(r["tokens"] for r in results) / span,
            "tenant_min": min(each), "tenant_max": max(each), "fairness": min(each) / mean,
            "calls_per_pass": (calls - calls_before) / max(passes - passes_before, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenant", action="store_true", help=argparse.SUPPRESS)
    for name in ("--url", "--key", "--ready", "--go"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", default="builtin://tiny-qwen2", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--tenants", default=None, help="counts of tenants (default 1,2,4,8; smoke 1,2)")
    p.add_argument("--steps", type=int, default=None, help="measured micro-steps per tenant (default 20; smoke 3)")
    p.add_argument("--length", type=int, default=None, help="tokens per row (default 256; smoke 32)")
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.tenant:
        tenant_main(args)
        return 0
    args.steps = args.steps or (3 if args.smoke else 20)
    args.length = args.length or (32 if args.smoke else 256)
    counts = [int(x) for x in (args.tenants or ("1,2" if args.smoke else "1,2,4,8")).split(",")]

    report = Report("multi_tenant", args.smoke)
    report.line(f"tenants {counts} at batch 2 x {args.length} tokens, {args.steps} measured micro-steps each; "
                f"machine {json.dumps(machine())}")
    work = work_dir("multi-tenant", args.keep)
    rows: list[dict[str, Any]] = []
    cpus = os.cpu_count() or 1
    pin = cpus >= 2 and shutil.which("taskset") is not None
    # torch's threads in the server: as many as the cores it is pinned to (more only spin).
    os.environ["OMP_NUM_THREADS"] = str(max(cpus // 2, 1) if pin else cpus)
    for mode, extra in (("fused", ["--fuse-tokens", "32768"]), ("time-shared", ["--fuse-tokens", "0"])):
        data = work / f"data-{mode}"
        server = start_server(data, "--max-loras", str(max(counts) + 1), "--max-loras-per-user", "1", *extra)
        if pin:  # every thread of the server on the first half of the cores, the clients on the rest
            subprocess.run(["taskset", "-a", "-pc", f"0-{max(cpus // 2 - 1, 0)}", str(server.process.pid)],
                           check=True, stdout=subprocess.DEVNULL)
        try:
            keys = [add_user(data, f"tenant{i}") for i in range(max(counts))]
            if mode == "fused":
                bound = run_group(server.url, keys[:1], 8, args, work, "bound")
                bound["mode"] = "bound (1 tenant, batch 8)"
                rows.append(bound)
            for n in counts:
                row = run_group(server.url, keys[:n], 2, args, work, f"{mode}-{n}")
                row["mode"] = mode
                rows.append(row)
        finally:
            server.stop()
    bound_tps = rows[0]["tokens_per_s"]
    for row in rows:
        row["of_bound"] = row["tokens_per_s"] / bound_tps
    Report.table(["mode", "tenants", "batch", "tokens/s", "x bound", "tenant min", "tenant max", "min/mean",
                  "calls per pass"],
                 [[r["mode"], r["tenants"], r["batch"], f"{r['tokens_per_s']:.0f}", f"{r['of_bound']:.2f}",
                   f"{r['tenant_min']:.0f}", f"{r['tenant_max']:.0f}", f"{r['fairness']:.2f}",
                   f"{r['calls_per_pass']:.2f}"] for r in rows])
    report.finish(rows=rows, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
