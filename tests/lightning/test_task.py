"""The Lightning task: what trains, what checkpoints hold, exact resume, export."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import peft
import pytest
import pytorch_lightning as pl
import torch

import modalpeft as mp
from modalpeft.lightning import ClassificationTask, DigitsDataModule, timm_backbone
from modalpeft.lightning.optim import param_groups
from modalpeft.pointcloud import PointGSTConfig, PointPEFTConfig, create_backbone
from modalpeft.pointcloud.data import PointCloudDataModule
from modalpeft.pointcloud.tasks import PointCloudClassificationTask
from modalpeft.vision import SPTConfig, VPTConfig


def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm_backbone(
        "vit_tiny_patch16_224",
        num_classes=10,
        kwargs={"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2},
    )


def task(adapter=None, lr: float = 1e-2, **kwargs) -> ClassificationTask:
    adapter = mp.BitFitConfig() if adapter is None else adapter
    return ClassificationTask(backbone(), num_classes=10, adapter=adapter, modules_to_save=["head"], lr=lr, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def data() -> DigitsDataModule:
    return DigitsDataModule(train_per_class=8, batch_size=16, seed=0)


def test_baselines_and_adapters_train_what_they_should() -> None:
    full = task("full")
    assert all(p.requires_grad for p in full.model.parameters())
    linear = task("linear")
    assert {n for n, p in linear.model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    lora = task(peft.LoraConfig(r=2, target_modules=["qkv"]))
    assert isinstance(lora.model, mp.AdaptedModel)
    with pytest.raises(ValueError, match="adapter='lora'"):
        task("lora")


def test_no_weight_decay_on_vectors() -> None:
    model = task("full").model
    decayed, exempt = param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in exempt["params"])


class StopAfter(pl.Callback):
    """Interrupts a run at an epoch end (the checkpoint of that epoch is written)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_checkpoint_holds_only_what_trains(tmp_path) -> None:
    pl.seed_everything(0)
    first = task()
    trainer(tmp_path, max_epochs=4, callbacks=[StopAfter(epochs=2)]).fit(first, datamodule=data())
    saved = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    trainable = {f"model.{n}" for n, p in first.model.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable
    assert saved["optimizer_states"] and saved["lr_schedulers"]
    full_size = sum(v.numel() for v in first.state_dict().values())
    assert sum(v.numel() for v in saved["state_dict"].values()) < full_size / 20


class RandomClouds(PointCloudDataModule):
    """Seeded random clouds of 160 points in 3 classes (resampled to the tiny backbone's 128 by the base class)."""

    classes = ["a", "b", "c"]

    def load_split(self, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        count = 12 if split == "train" else 6
        return rng.standard_normal((count, 160, 3)).astype(np.float32), np.arange(count) % 3, [""] * count


def point_task(adapter) -> PointCloudClassificationTask:
    torch.manual_seed(0)
    backbone = create_backbone("point_mae_test", num_classes=3)
    return PointCloudClassificationTask(backbone, 3, adapter, ["head"], lr=1e-2, warmup_epochs=1)


RESUME_CASES = {
    # methods whose resume needs more than their trainable parameters: dropout draws from the global RNG (LoRA,
    # VPT's prompt dropout), a selection or a memory bank made from training data and held in buffers (SPT,
    # Point-PEFT), frozen BatchNorm statistics that training updates (the point transformer's)
    "bitfit": (lambda: task(), data),
    "peft_lora_dropout": (lambda: task(peft.LoraConfig(r=2, target_modules=["qkv"], lora_dropout=0.5)), data),
    "spt": (lambda: task(SPTConfig(budget=400, batches=1)), data),
    "vpt_deep": (lambda: task(VPTConfig(num_tokens=2, deep=True, dropout=0.5)), data),
    "pointgst": (lambda: point_task(PointGSTConfig(local_size=8)), lambda: RandomClouds(num_points=128, batch_size=4)),
    "point_peft": (
        lambda: point_task(PointPEFTConfig(num_anchors=8, num_neighbors=4, top_k=4)),
        lambda: RandomClouds(num_points=128, batch_size=4),
    ),
}


@pytest.mark.parametrize("method", RESUME_CASES)
def test_resume_is_exact(method, tmp_path) -> None:
    """A run interrupted after one epoch and resumed from its checkpoint ends with the same state (weights,
    buffers, BatchNorm statistics) and the same logged metrics as an uninterrupted one."""
    make_task, make_data = RESUME_CASES[method]
    pl.seed_everything(0)
    straight = make_task()
    trainer(tmp_path / "a", max_epochs=3, limit_val_batches=2).fit(straight, datamodule=make_data())
    expected = dict(straight.trainer.callback_metrics)

    pl.seed_everything(0)
    first = make_task()
    interrupted = trainer(tmp_path / "b", max_epochs=3, limit_val_batches=2, callbacks=[StopAfter(epochs=1)])
    interrupted.fit(first, datamodule=make_data())
    assert first.trainer.current_epoch == 1
    changed = [n for n, v in first.state_dict().items() if not torch.equal(v, straight.state_dict()[n])]
    assert changed  # the interrupted run is not already the final state

    pl.seed_everything(1)  # the resumed run's RNG must come from the checkpoint, not from its seed
    resumed = make_task()
    trainer(tmp_path / "c", max_epochs=3, limit_val_batches=2).fit(
        resumed, datamodule=make_data(), ckpt_path=next((tmp_path / "b").rglob("*.ckpt"))
    )
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(
            resumed.state_dict()[name], value, atol=0, rtol=0, msg=f"{name} differs after resume"
        )
    assert {k: v.item() for k, v in resumed.trainer.callback_metrics.items()} == {
        k: v.item() for k, v in expected.items()
    }


def test_resume_from_another_configuration_is_refused(tmp_path) -> None:
    pl.seed_everything(0)
    trainer(tmp_path, max_epochs=1).fit(task(), datamodule=data())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    other = task(peft.LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="does not fit this task"):
        trainer(tmp_path / "other", max_epochs=2).fit(other, datamodule=data(), ckpt_path=ckpt)


def test_fit_exports_the_adapter_for_load_adapter(tmp_path) -> None:
    pl.seed_everything(0)
    trained = task()
    trainer(tmp_path, max_epochs=1).fit(trained, datamodule=data())
    export = tmp_path / "adapter"
    assert (export / "adapter_model.safetensors").is_file()
    loaded = mp.load_adapter(backbone(), export)
    x = torch.randn(2, 1, 8, 8)
    trained.eval()
    torch.testing.assert_close(loaded.eval()(x), trained(x))


def test_prompts_and_scale_shift_are_not_decayed() -> None:
    from modalpeft.core.inject import attach
    from modalpeft.core.layers import PromptTokens, ScaleShift

    model = backbone()
    attach(model, "blocks.0", "p", PromptTokens(2, 32))
    attach(model, "blocks.0.attn.qkv", "p", ScaleShift(96))
    for p in model.parameters():
        p.requires_grad_(False)
    prompts = model.blocks[0].adapters["p"].prompts.requires_grad_(True)
    model.head.weight.requires_grad_(True)
    decayed, exempt = param_groups(model, 0.1)
    assert [id(p) for p in decayed["params"]] == [id(model.head.weight)]
    assert [id(p) for p in exempt["params"]] == [id(prompts)]


def test_methods_that_score_on_training_data_get_the_train_loader(tmp_path) -> None:
    from torch.utils.data import DataLoader

    @dataclasses.dataclass
    class NeedsData(mp.BitFitConfig):
        data_field: ClassVar[str] = "scoring_data"
        scoring_data: object = dataclasses.field(default=None, metadata={"help": "run-time", "save": False})

    pl.seed_everything(0)
    deferred = task(NeedsData())
    assert not isinstance(deferred.model, mp.AdaptedModel)  # nothing to score on yet
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(deferred, datamodule=data())
    assert isinstance(deferred.model, mp.AdaptedModel)
    assert isinstance(deferred.model.peft_config["default"].scoring_data, DataLoader)
