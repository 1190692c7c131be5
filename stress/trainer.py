"""A seed-like training loop in its own process, for the kill trials and the soak.

    python -m stress.trainer --url URL --key KEY [--resume-run RUN] [--save-every N] ...

The built-in model and dataset (``--rows`` samples, ``--batch``, gradient accumulation
``--accum``), AdamW and LinearLR, epoch after epoch. Every event is one JSON line on stdout:

- ``{"ev": "ready", "run": RUN, "start": I, "resumed_from": PATH|null}``: set up; ``I`` is the
  index of the next micro-batch in the run (its consumed samples / batch);
- ``{"ev": "loss", "i": I, "loss": X}``: micro-batch ``I`` of the run has run;
- ``{"ev": "save", "name": N}`` before a save, ``{"ev": "saved", "name": N, "path": P, "s": T}``;
- ``{"ev": "done", "micro": M, "updates": U}`` at the end (``--max-micro`` or ``--seconds``);
- ``{"ev": "error", "type": T, "msg": M}`` when a call fails (then exit 1).

With ``--resume-run`` it resumes the run's newest checkpoint (model and dataloader position);
a run without checkpoints is started afresh (the ready line names the new run).

Started with ``--wait-args`` alone, it imports everything, prints ``{"ev": "warm"}`` and reads
its arguments as one JSON list from stdin: a spare trainer is ready the moment it is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

T0 = time.monotonic()


def emit(**event) -> None:
    event["t"] = round(time.monotonic() - T0, 3)
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--wait-args"]:
        import peft  # noqa: F401  (the slow imports, before the arguments come)

        import twinkle_client.model  # noqa: F401

        emit(ev="warm")
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        argv = json.loads(line)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--resume-run", default=None)
    p.add_argument("--save-every", type=int, default=0, help="optimizer steps between saves (0: never)")
    p.add_argument("--names", choices=("step", "latest", "alternate"), default="step",
                   help="checkpoint names: step-N, always 'latest' (each save replaces it), or alternating")
    p.add_argument("--max-micro", type=int, default=10**9)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--retry-timeout", type=float, default=60.0)
    args = p.parse_args(argv)

    from peft import LoraConfig

    from twinkle.errors import TwinkleError
    from twinkle_client import init_twinkle_client
    from twinkle_client.dataloader import DataLoader
    from twinkle_client.dataset import Dataset, DatasetMeta
    from twinkle_client.model import MultiLoraTransformersModel

    try:
        client = init_twinkle_client(base_url=args.url, api_key=args.key, retry_timeout=args.retry_timeout)
        latest = client.get_latest_checkpoint_path(args.resume_run) if args.resume_run else None
        dataset = Dataset(dataset_meta=DatasetMeta("builtin://self-cognition", data_slice=range(args.rows)))
        dataset.set_template("Template", model_id="builtin://tiny-qwen2", max_length=512)
        dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle", "model_author": "stress"})
        dataset.encode(batched=True)
        loader = DataLoader(dataset=dataset, batch_size=args.batch)
        model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
        model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=args.rank),
                                   gradient_accumulation_steps=args.accum)
        model.set_template("Template")
        model.set_processor("InputProcessor", padding_side="right")
        model.set_loss("CrossEntropyLoss")
        model.set_optimizer("AdamW", lr=args.lr)
        model.set_lr_scheduler("LinearLR")
        index = 0
        if latest:
            progress = model.resume_from_checkpoint(latest)
            loader.resume_from_checkpoint(progress["consumed_train_samples"])
            index = progress["consumed_train_samples"] // args.batch
        model.get_train_state()  # the run id is known once a call has come back
        emit(ev="ready", run=model.training_run_id, start=index, resumed_from=latest)
        end = time.monotonic() + args.seconds  # the training time, from here
        done = updates = saves = 0
        while done < args.max_micro and time.monotonic() < end:
            for batch in loader:
                output = model.forward_backward(inputs=batch)
                model.clip_grad_norm(1.0)
                model.step()
                model.zero_grad()
                model.lr_step()
                emit(ev="loss", i=index, loss=float(output))
                index += 1
                done += 1
                if index % args.accum == 0:
                    updates += 1
                    opt_step = index // args.accum
                    if args.save_every and opt_step % args.save_every == 0:
                        saves += 1
                        latest_name = args.names == "latest" or (args.names == "alternate" and saves % 2 == 0)
                        name = "latest" if latest_name else f"step-{opt_step}"
                        emit(ev="save", name=name, step=opt_step)
                        t0 = time.monotonic()
                        path = model.save(name=name, save_optimizer=True)
                        emit(ev="saved", name=name, path=str(path), step=opt_step, s=round(time.monotonic() - t0, 4))
                if done >= args.max_micro or time.monotonic() >= end:
                    break
        emit(ev="done", micro=done, updates=updates, run=model.training_run_id)
        model.close()
        return 0
    except TwinkleError as exc:
        emit(ev="error", type=type(exc).__name__, msg=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
