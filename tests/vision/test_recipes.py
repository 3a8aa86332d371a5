"""Every vision recipe parses and trains two steps through the CLI with a tiny ViT on a tiny VTAB-1k folder;
the image classification task's own options."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from modalpeft.lightning import cli_main
from modalpeft.vision.data import ImageDataModule
from modalpeft.vision.tasks import ImageClassificationTask

from ..lightning.recipe_checks import SHORT_FIT, check_fit_outputs
from .test_data import write_fashion_mnist, write_vtab_task

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "vision").glob("*_vtab1k.yaml"))  # the VTAB-1k adaptation recipes
PRETRAIN = ROOT / "recipes" / "vision" / "vit_fmnist_pretrain.yaml"
TINY = [
    "--model.init_args.backbone.init_args.name=vit_tiny_patch16_224",
    "--model.init_args.backbone.init_args.pretrained=false",
    "--model.init_args.backbone.init_args.kwargs",
    '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--trainer.accelerator=cpu",
]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    """The CLI's default loggers write to ./outputs: keep that out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory) -> Path:
    return write_vtab_task(tmp_path_factory.mktemp("vtab") / "cifar", num_classes=5)


def test_every_recipe_is_there_and_headed_by_its_command() -> None:
    names = {p.name for p in RECIPES}  # each registered method's recipe: tests/test_coverage.py
    assert {f"vit_b16_{baseline}_vtab1k.yaml" for baseline in ("lora", "full", "linear")} <= names
    for path in RECIPES:
        header = path.read_text().split("\n# Mirrors:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/vision.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "--data.init_args.root" in header


def test_pretraining_recipe_is_headed_and_trains_two_steps(tmp_path) -> None:
    """The recipe that made the committed Fashion-MNIST ViT parses and trains on idx files in the official format."""
    header = PRETRAIN.read_text().split("\nseed_everything:")[0]
    assert header.startswith(f"# Command:  python recipes/vision.py fit --config recipes/vision/{PRETRAIN.name}")
    assert "# Runtime:" in header and "# Expected:" in header and "MEASURED" not in header
    root = write_fashion_mnist(tmp_path / "fmnist", compress=True, n_train=16, n_test=8)
    args = ["fit", "--config", str(PRETRAIN), f"--data.init_args.root={root}", "--data.init_args.val_size=4"]
    args += ["--data.init_args.batch_size=4", "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, model_class=ImageClassificationTask, datamodule_class=ImageDataModule)
    assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.patch_embed.num_patches == 49 and sum(p.numel() for p in model.parameters()) == 1_199_882
    assert all(p.requires_grad for p in model.parameters())  # full training from scratch


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_with_a_tiny_vit(recipe, vtab_task, tmp_path) -> None:
    args = ["fit", "--config", str(recipe), *TINY, *SHORT_FIT, f"--data.init_args.root={vtab_task}"]
    cli = cli_main(
        [*args, f"--trainer.default_root_dir={tmp_path}"],
        model_class=ImageClassificationTask,
        datamodule_class=ImageDataModule,
    )
    check_fit_outputs(cli)  # two of the three batches of 4 of the 9 train800val200 images
    assert cli.datamodule.transform.config.size == (32, 32)  # the model's input size, not the YAML's 224
    task = cli.model
    assert isinstance(task, ImageClassificationTask) and task.hparams.num_classes == 100
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and any("head" in n for n in trainable)


def test_recipe_script_runs_in_process(vtab_task, tmp_path, monkeypatch) -> None:
    recipe = ROOT / "recipes" / "vision" / "vit_b16_linear_vtab1k.yaml"
    argv = ["vision.py", "fit", "--config", str(recipe), *TINY, "--trainer.fast_dev_run=2"]
    argv += [f"--data.init_args.root={vtab_task}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--trainer.default_root_dir={tmp_path}"])
    runpy.run_path(str(ROOT / "recipes" / "vision.py"), run_name="__main__")


def tiny_vit(num_classes: int = 1000) -> nn.Module:
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **kwargs)


def test_vpt_head_init() -> None:
    task = ImageClassificationTask(
        tiny_vit(), num_classes=100, adapter="linear", modules_to_save=["head"], head_init="vpt"
    )
    head = task.model.head
    assert head.out_features == 100 and task.hparams.head_init == "vpt"
    assert torch.allclose(head.bias, torch.full((100,), -math.log(99.0)))
    expected_std = math.sqrt(2.0 / 100)  # kaiming normal, fan_out = out_features
    assert abs(head.weight.std().item() / expected_std - 1) < 0.1
    default = ImageClassificationTask(tiny_vit(), num_classes=100, modules_to_save=["head"])
    assert not torch.allclose(default.model.head.bias, torch.full((100,), -math.log(99.0)))
    assert {"train/acc", "train/acc_top5"} <= set(default.train_metrics.keys())


def test_head_init_errors() -> None:
    with pytest.raises(ValueError, match="head_init='kaiming' is not valid"):
        ImageClassificationTask(tiny_vit(), num_classes=3, head_init="kaiming")
    headless = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="head_init='vpt' initialises an nn.Linear classifier.*missing"):
        ImageClassificationTask(headless, num_classes=3, adapter="full", head_init="vpt")


@pytest.mark.parametrize("method", ["ssf", "spt_lora"])
def test_recipe_tests_from_its_checkpoint(method, vtab_task, tmp_path) -> None:
    """``test --ckpt_path`` rebuilds the adapter; SPT from the checkpoint's selection, without re-scoring."""
    recipe = ROOT / "recipes" / "vision" / f"vit_b16_{method}_vtab1k.yaml"
    common = ["--config", str(recipe), *TINY, f"--data.init_args.root={vtab_task}"]
    limits = ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=1"]
    fit = cli_main(
        ["fit", *common, *limits, f"--trainer.default_root_dir={tmp_path}"], ImageClassificationTask, ImageDataModule
    )
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    assert checkpoint
    test = cli_main(["test", *common, f"--ckpt_path={checkpoint}"], ImageClassificationTask, ImageDataModule)
    fitted, tested = fit.model.model.cpu().eval(), test.model.model.eval()
    assert fitted.adapter_state_dict().keys() == tested.adapter_state_dict().keys()
    for key, value in fitted.adapter_state_dict().items():
        assert torch.equal(value, tested.adapter_state_dict()[key]), key
