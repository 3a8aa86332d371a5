"""The VPT-deep study behind ``docs/results/vision_vpt.md``: variants of VPT-deep on one mini-VTAB task.

Each variant trains the committed Fashion-MNIST ViT with VPT-deep (fresh head, head seed 1000, batch order 2000, as
seed 0 of ``modalpeft demo --modality vision``) and prints training and evaluation accuracy::

    python -m benchmarks.vpt_study count '[{"lr": 0.1}, {"lr": 0.1, "tokens": 50}, {"opt": "sgd", "lr": 1.0}]'

Variant keys: ``lr``; ``tokens`` (prompts per block, default 10); ``steps`` (default 150); ``opt`` (``adamw`` or
``sgd`` with momentum 0.9, default ``adamw``); ``wd`` (weight decay on matrices, default 0.05); ``val`` (true:
train on train800 and evaluate on val200, VTAB's protocol for choices; default: train800val200 and test).
"""

from __future__ import annotations

import json
import sys

import torch

import modalpeft as mp
from modalpeft.core.compare import logits_of
from modalpeft.lightning.demo import accuracy, batches, train
from modalpeft.vision.demo import MEAN, STD, fresh_model
from modalpeft.vision.minivtab import load_minivtab

KEYS = {"lr", "tokens", "steps", "opt", "wd", "val"}


def run_variant(task, variant: dict) -> dict:
    unknown = set(variant) - KEYS
    if unknown or "lr" not in variant:
        raise ValueError(f"variant {variant} has unknown keys {sorted(unknown)} or no 'lr'; keys: {sorted(KEYS)}.")
    model = fresh_model(task.num_classes, 1000)
    config = mp.create_config("vpt", num_tokens=variant.get("tokens", 10), deep=True)
    model = mp.adapt(model, config, modules_to_save=["head"])
    (x, y), evaluation = (task.train, task.val) if variant.get("val") else (task.train_val, task.test)
    order = batches(len(y), 32, variant.get("steps", 150), 2000)
    seconds = train(model, (x, y), order, variant["lr"], variant.get("wd", 0.05), variant.get("opt", "adamw"))
    return {
        **variant,
        "train_accuracy": accuracy(logits_of(model, x), y),
        "eval_split": "val200" if variant.get("val") else "test",
        "eval_accuracy": accuracy(logits_of(model, evaluation[0]), evaluation[1]),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    task = next(iter(load_minivtab(0, [argv[0]]))).normalised(MEAN, STD)
    for variant in json.loads(argv[1]):
        print(json.dumps(run_variant(task, variant)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
