"""The seed's training loop locally and against a real server at 0, 20 and 50 ms round trip.

    .venv/bin/python -m benchmarks.remote_local [--rows 176] [--rtt 0,20,50] [--smoke]

The loop is the seed's (tests/data/seed_example.py: the built-in model and dataset, batch 8,
gradient accumulation 2, AdamW, LinearLR) with the same code for both sides: only the import
changes (``twinkle`` or ``twinkle_client``). Each run is a child process; the local run and
the server are pinned to the same core (``taskset``; one torch thread) and the remote client
to another, so the remote figure pays for the network and the server, not for less compute.
Remote runs go through ``stress.common.LoopbackProxy``, which adds half the round trip before
a request goes on and half before its reply. Timed: from the third micro-batch (the first two
warm up) until every loss is read, per micro-batch; printed as a table, then one JSON line.
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

from stress.common import (
    LoopbackProxy,
    Report,
    add_user,
    client_env,
    last_json_line,
    seed_setup,
    start_server,
    work_dir,
)

WARMUP = 2


def seed_loop(side: str, rows: int, url: str | None, key: str | None, output_dir: str) -> dict[str, Any]:
    """The seed loop with ``twinkle`` (local) or ``twinkle_client`` (remote); per-micro-batch ms."""
    if side == "remote":
        from twinkle_client import init_twinkle_client

        init_twinkle_client(base_url=url, api_key=key)
    package = "twinkle" if side == "local" else "twinkle_client"
    dataloader, model = seed_setup(package, rows, **({"output_dir": output_dir} if side == "local" else {}))
    outputs = []
    start = 0.0
    for i, batch in enumerate(dataloader):
        if i == WARMUP:
            [float(o.loss) for o in outputs]  # the warm-up is over on both sides
            start = time.perf_counter()
        outputs.append(model.forward_backward(inputs=batch))
        model.clip_grad_norm(1.0)
        model.step()
        model.zero_grad()
        model.lr_step()
    losses = [float(o.loss) for o in outputs]
    elapsed = time.perf_counter() - start
    timed = len(outputs) - WARMUP
    return {"side": side, "micro_batches": timed, "ms_per_micro_batch": 1000 * elapsed / timed, "losses": losses}


def _child(args: list[str], cores: str | None) -> dict[str, Any]:
    pin = ["taskset", "-c", cores] if cores else []
    env = {**client_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*pin, sys.executable, "-m", "benchmarks.remote_local", *args], capture_output=True,
                          text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]), timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{args[:2]} failed: {done.stderr[-1500:]}")
    return last_json_line(done.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["local", "remote"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=None, help="samples (default 176: 22 micro-batches; smoke 48)")
    p.add_argument("--rtt", default=None, help="round trips in ms (default 0,20,50; smoke 0,20)")
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    rows = args.rows or (48 if args.smoke else 176)
    if args.side:
        print(json.dumps(seed_loop(args.side, rows, args.url, args.key, args.out or "twinkle_output")))
        return 0
    rtts = [float(x) for x in (args.rtt or ("0,20" if args.smoke else "0,20,50")).split(",")]
    cpus = os.cpu_count() or 1
    pinned = cpus >= 2 and shutil.which("taskset") is not None
    compute, client = ("0", "1") if pinned else (None, None)
    report = Report("remote_local", args.smoke)
    report.line(f"seed loop, {rows} samples (batch 8, accumulation 2), first {WARMUP} micro-batches warm up; "
                f"{'server and local run on core 0, remote client on core 1' if pinned else 'not pinned'}")
    work = work_dir("remote-local", args.keep)
    local = _child(["--side", "local", "--rows", str(rows), "--out", str(work / "local")], compute)
    rows_out = [["local", "-", f"{local['ms_per_micro_batch']:.0f}", "1.00", "-"]]
    figures: dict[str, Any] = {"local_ms": local["ms_per_micro_batch"]}
    os.environ["OMP_NUM_THREADS"] = "1"
    data = work / "data"
    server = start_server(data)
    try:
        if pinned:
            subprocess.run(["taskset", "-a", "-pc", compute, str(server.process.pid)], check=True,
                           stdout=subprocess.DEVNULL)
        key = add_user(data, "bench")
        for rtt in rtts:
            proxy = LoopbackProxy(server.url, rtt_s=rtt / 1000)
            proxy.start()
            try:
                remote = _child(["--side", "remote", "--rows", str(rows), "--url", proxy.url, "--key", key], client)
            finally:
                proxy.stop()
            ratio = local["ms_per_micro_batch"] / remote["ms_per_micro_batch"]
            same = max(abs(a - b) for a, b in zip(remote["losses"], local["losses"], strict=True))
            rows_out.append([f"remote, {rtt:.0f} ms RTT", f"{rtt:.0f}", f"{remote['ms_per_micro_batch']:.0f}",
                             f"{ratio:.2f}", f"{same:.1e}"])
            figures[f"remote_{rtt:.0f}ms_ms"] = remote["ms_per_micro_batch"]
            figures[f"ratio_{rtt:.0f}ms"] = ratio
            figures[f"max_loss_diff_{rtt:.0f}ms"] = same
    finally:
        server.stop()
    Report.table(["run", "RTT ms", "ms per micro-batch", "local / remote", "max |loss - local loss|"], rows_out)
    report.finish(rows=rows, **figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
