"""Size of a Lightning training checkpoint (adapter + head + optimiser state) against the full model's state.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.checkpoint_size [--model vit_base_patch16_224]

Trains one step of each method on scikit-learn's digits (resized to the model's input) with the
``ClassificationTask``, lets Lightning write its checkpoint, and prints the file size next to the size of the
task's whole state dict (what a checkpoint of every weight would hold, before optimiser state).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import peft
import pytorch_lightning as pl

import modalpeft as mp
from modalpeft.lightning import ClassificationTask, DigitsDataModule, timm_backbone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args(argv)
    methods = {
        "lora r=8 (qkv)": peft.LoraConfig(r=8, target_modules=["qkv"]),
        "bitfit": mp.BitFitConfig(),
        "adapter (adaptformer, 64)": mp.create_config("adapter", style="adaptformer", bottleneck_dim=64),
        "ssf": mp.SSFConfig(),
    }
    print(f"{'method':28} {'checkpoint':>12} {'full state':>12}")
    for name, adapter in methods.items():
        backbone = timm_backbone(args.model, num_classes=10)
        size = backbone.default_cfg["input_size"][-1]
        task = ClassificationTask(backbone, num_classes=10, adapter=adapter, modules_to_save=["head"])
        data = DigitsDataModule(image_size=size, channels=3, batch_size=2, train_per_class=2)
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(
                default_root_dir=root, accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                enable_progress_bar=False, enable_model_summary=False,
            )  # fmt: skip
            trainer.fit(task, datamodule=data)
            checkpoint = next(Path(root).rglob("*.ckpt")).stat().st_size
        full = sum(v.numel() * v.element_size() for v in task.state_dict().values())
        print(f"{name:28} {checkpoint / 2**20:9.2f} MiB {full / 2**20:9.1f} MiB")


if __name__ == "__main__":
    main()
