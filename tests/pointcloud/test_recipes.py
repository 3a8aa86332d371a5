"""Every point-cloud recipe parses and trains two steps through the CLI with the tiny ``point_mae_test`` backbone
on tiny files written in the official formats; the pretraining recipe on a few offline mesh clouds."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI

import modalpeft as mp
from modalpeft.lightning import cli_main
from modalpeft.pointcloud.pretrain import MaskedPointModel
from modalpeft.pointcloud.tasks import PointCloudClassificationTask

from ..lightning.recipe_checks import SHORT_FIT, check_fit_outputs
from .test_data import write_modelnet_text, write_scanobjectnn

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "pointcloud").glob("point_mae_*_*.yaml"))
ADAPTATION = [p for p in RECIPES if "pretrain" not in p.name]
PRETRAIN = ROOT / "recipes" / "pointcloud" / "point_mae_pretrain_meshes.yaml"
METHODS = (*mp.list_methods("pointcloud"), "full", "linear")  # every registered point-cloud method, two baselines
DATASETS = ("modelnet40", "scanobjectnn_pb_t50_rs")
TINY = [
    "--model.init_args.backbone.init_args.name=point_mae_test",
    "--model.init_args.backbone.init_args.checkpoint_path=",
    "--data.init_args.num_points=128",
    "--data.init_args.num_workers=0",
    "--data.init_args.batch_size=4",
    "--trainer.accelerator=cpu",
]
TINY_ADAPTER = {
    # the tiny backbone has 16 groups: PointGST's local chunks and Point-PEFT's anchors must fit in them
    "pointgst": ["--model.init_args.adapter.init_args.local_size=8"],
    "point_peft": [
        "--model.init_args.adapter.init_args.num_anchors=8",
        "--model.init_args.adapter.init_args.num_neighbors=4",
        "--model.init_args.adapter.init_args.top_k=4",  # the tiny training sets have 6 and 9 clouds
    ],
}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    """The CLI's default loggers write to ./outputs: keep that out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pointcloud_data")
    return {
        "modelnet40": write_modelnet_text(base / "modelnet40_normal_resampled", num_points=200),
        "scanobjectnn_pb_t50_rs": write_scanobjectnn(base / "h5_files", per_file=(6, 4), num_points=160),
    }


def test_every_recipe_is_there_and_headed_by_its_command() -> None:
    names = {p.name for p in ADAPTATION}
    assert names == {f"point_mae_{m}_{d}.yaml" for m in METHODS for d in DATASETS}
    for path in [*ADAPTATION, PRETRAIN]:
        header = path.read_text().split("\nseed_everything:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/pointcloud.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "# Mirrors:" in header
    for path in ADAPTATION:
        header = path.read_text().split("\nseed_everything:")[0]
        assert "--data.init_args.root" in header and "accuracy" in header


@pytest.mark.parametrize("recipe", ADAPTATION, ids=[p.stem for p in ADAPTATION])
def test_recipe_trains_two_steps_with_the_tiny_backbone(recipe, roots, tmp_path) -> None:
    method = next(m for m in METHODS if f"point_mae_{m}_" in recipe.name)
    dataset = next(d for d in DATASETS if recipe.stem.endswith(d))
    extra = ["--data.init_args.cache_points=160"] if dataset == "modelnet40" else []
    args = ["fit", "--config", str(recipe), *TINY, *SHORT_FIT, *TINY_ADAPTER.get(method, []), *extra]
    args += [f"--data.init_args.root={roots[dataset]}", f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
    check_fit_outputs(cli)
    task = cli.model
    assert isinstance(task, PointCloudClassificationTask)
    assert task.hparams.num_classes == (40 if dataset == "modelnet40" else 15)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    total = {n for n, _ in task.model.named_parameters()}
    assert any("head" in n for n in trainable)
    if method == "full":
        assert trainable == total
    elif method == "linear":
        assert all(".head." in f".{n}" or n.startswith("head.") for n in trainable)
    else:
        modules = {type(m).__module__.replace("_", "") for m in task.model.modules()}
        assert trainable != total and any(method.replace("_", "") in name for name in modules)


def test_recipe_script_runs_in_process(roots, tmp_path, monkeypatch) -> None:
    recipe = ROOT / "recipes" / "pointcloud" / "point_mae_linear_scanobjectnn_pb_t50_rs.yaml"
    argv = ["pointcloud.py", "fit", "--config", str(recipe), *TINY, "--trainer.fast_dev_run=2"]
    argv += [f"--data.init_args.root={roots['scanobjectnn_pb_t50_rs']}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--trainer.default_root_dir={tmp_path}"])
    runpy.run_path(str(ROOT / "recipes" / "pointcloud.py"), run_name="__main__")


CLASSES = (pl.LightningModule, pl.LightningDataModule)


def fit_one_epoch(method: str, roots, tmp_path) -> tuple[LightningCLI, list[str]]:
    """Fit the PB_T50_RS recipe of ``method`` for one tiny epoch; returns the CLI and the arguments a ``test``
    run of the same recipe takes."""
    recipe = ROOT / "recipes" / "pointcloud" / f"point_mae_{method}_scanobjectnn_pb_t50_rs.yaml"
    common = ["--config", str(recipe), *TINY, *TINY_ADAPTER[method]]
    common += [f"--data.init_args.root={roots['scanobjectnn_pb_t50_rs']}"]
    limits = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    fit = cli_main(["fit", *common, *limits, f"--trainer.default_root_dir={tmp_path}"], *CLASSES)
    assert fit.trainer.checkpoint_callback.best_model_path
    return fit, common


def test_recipe_tests_with_voting_from_its_checkpoint(roots, tmp_path) -> None:
    fit, common = fit_one_epoch("pointgst", roots, tmp_path)
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    test = cli_main(["test", *common, "--data.init_args.vote=2", f"--ckpt_path={checkpoint}"], *CLASSES)
    metrics = test.trainer.callback_metrics
    assert {"test/acc", "test/macc", "test/acc_vote", "test/macc_vote"} <= set(metrics)


def test_pretraining_recipe_trains_two_steps(tmp_path) -> None:
    args = ["fit", "--config", str(PRETRAIN), "--data.init_args.num_clouds=10", "--data.init_args.val_size=2"]
    args += ["--data.init_args.batch_size=4", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    args += ["--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule)
    assert isinstance(cli.model, MaskedPointModel) and cli.trainer.global_step == 2
    encoder = cli.model.model
    assert (encoder.embed_dim, len(encoder.blocks), encoder.num_group, encoder.group_size) == (192, 6, 32, 16)


def test_point_peft_tests_from_its_checkpoint_without_the_training_clouds(roots, tmp_path) -> None:
    """``test --ckpt_path`` rebuilds Point-PEFT from the checkpoint's memory bank (the test run sets up no training
    clouds): the same bank and the same predictions as the model fit left; without a checkpoint, a clear error."""
    fit, common = fit_one_epoch("point_peft", roots, tmp_path)
    checkpoint = fit.trainer.checkpoint_callback.best_model_path
    fitted = fit.model.model.eval()
    test = cli_main(["test", *common, f"--ckpt_path={checkpoint}"], *CLASSES)
    assert "train" not in test.datamodule.datasets
    tested = test.model.model.eval()
    bank = "base_model.group_divider.adapters.default.bank"
    assert torch.equal(tested.state_dict()[bank], fitted.state_dict()[bank].cpu())
    points = next(iter(test.datamodule.test_dataloader()))[0][:2]
    with torch.no_grad():
        assert torch.allclose(tested(points), fitted.cpu()(points), atol=1e-5)
    with pytest.raises(ValueError, match="point_peft.*--ckpt_path"):
        cli_main(["test", *common], *CLASSES)
