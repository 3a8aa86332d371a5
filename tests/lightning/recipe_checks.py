"""What a recipe's ``fit`` through the CLI promises, checked on its result: finite metrics logged, a checkpoint and
the adapter export written, and the export loaded into a freshly built backbone giving the trained model's outputs."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI
from safetensors.torch import load_file
from torch import nn

import modalpeft as mp

SHORT_FIT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
SHORT_FIT += ["--trainer.check_val_every_n_epoch=1"]
"""Two training steps and one validation batch, with the checkpointing and export a real run does (``fast_dev_run``
writes neither)."""


def rebuild_backbone(cli: LightningCLI) -> nn.Module:
    """The backbone built again as the recipe built it (same class, arguments and seed, the classifier resized as
    the task resizes it): the frozen weights an exported adapter is loaded into."""
    config = cli.config[cli.subcommand]
    spec = config.model.init_args.backbone
    module, _, name = spec.class_path.rpartition(".")
    pl.seed_everything(config.seed_everything)
    backbone = getattr(importlib.import_module(module), name)(**spec.init_args.as_dict())
    num_classes = config.model.init_args.num_classes
    if getattr(backbone, "num_classes", num_classes) != num_classes:
        backbone.reset_classifier(num_classes)
    return backbone


def check_fit_outputs(cli: LightningCLI) -> None:
    trainer = cli.trainer
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert "train/loss" in metrics and "val/loss" in metrics and "val/acc" in metrics, sorted(metrics)
    assert all(torch.isfinite(value).all() for value in metrics.values()), metrics
    checkpoint = Path(trainer.checkpoint_callback.best_model_path)
    assert checkpoint.is_file() and torch.load(checkpoint, weights_only=True)["state_dict"]
    export = Path(trainer.log_dir) / "adapter"
    trained = cli.model.model.cpu().eval()
    fresh = rebuild_backbone(cli)
    loaded = mp.load_adapter(fresh, export)  # a baseline's export (mp.save_baseline) loads through the same call
    if not isinstance(trained, mp.AdaptedModel):  # ... and holds every tensor the baseline trained
        saved = load_file(export / "adapter_model.safetensors")
        assert {n for n, p in trained.named_parameters() if p.requires_grad} <= set(saved)
    batch = next(iter(cli.datamodule.val_dataloader()))
    inputs = cli.datamodule.on_after_batch_transfer(batch, 0)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(inputs), trained(inputs))
