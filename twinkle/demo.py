"""``make demo``: the seed's training loop, local form, on the built-in model and dataset.

Run as ``python -m twinkle.demo [--epochs N]``. It prints the loss as it falls and the
path of the saved checkpoint.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from peft import LoraConfig

from twinkle import get_logger
from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset, DatasetMeta
from twinkle.model import MultiLoraTransformersModel

MODEL_ID = "builtin://tiny-qwen2"
DATASET_ID = "builtin://self-cognition"


@dataclass
class DemoResult:
    losses: list[float] = field(default_factory=list)
    checkpoint: str = ""


def run(epochs: int = 4, *, lr: float = 5e-3, output_dir: str = "twinkle_output", quiet: bool = False) -> DemoResult:
    """Train a LoRA adapter on the built-in self-cognition data; return the losses and checkpoint path."""
    logger = get_logger()
    dataset = Dataset(dataset_meta=DatasetMeta(DATASET_ID))
    dataset.set_template("Template", model_id=MODEL_ID, max_length=512)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle模型", "model_author": "twinkle团队"})
    dataset.encode(batched=True)
    dataloader = DataLoader(dataset=dataset, batch_size=8, shuffle=True, seed=42)

    model = MultiLoraTransformersModel(model_id=MODEL_ID, output_dir=output_dir)
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=8, lora_alpha=32),
                               gradient_accumulation_steps=2)
    model.set_template("Template")
    model.set_processor("InputProcessor", padding_side="right")
    model.set_loss("CrossEntropyLoss")
    model.set_optimizer("AdamW", lr=lr)
    model.set_lr_scheduler("LinearLR")

    result = DemoResult()
    step = 0
    for epoch in range(epochs):
        for step, batch in enumerate(dataloader):
            output = model.forward_backward(inputs=batch)
            result.losses.append(output.loss)
            if step % 2 == 0 and not quiet:
                logger.info(f"Epoch {epoch}, step {step // 2}, loss: {output}")
            model.clip_grad_norm(1.0)
            model.step()
            model.zero_grad()
            model.lr_step()
    result.checkpoint = model.save(name=f"step-{step}", save_optimizer=True)
    if not quiet:
        logger.info(f"Saved checkpoint: {result.checkpoint}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--output-dir", default=os.environ.get("TWINKLE_OUTPUT_DIR", "twinkle_output"))
    args = parser.parse_args()
    result = run(args.epochs, lr=args.lr, output_dir=args.output_dir)
    first, last = result.losses[:10], result.losses[-10:]
    print(f"mean loss of the first 10 micro-batches: {sum(first) / len(first):.4f}")
    print(f"mean loss of the last 10 micro-batches:  {sum(last) / len(last):.4f}")
    print(f"checkpoint: {result.checkpoint}")


if __name__ == "__main__":
    main()
