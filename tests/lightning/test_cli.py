"""The recipes' LightningCLI: configs from YAML, two-step runs, DDP on two CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import yaml

import modalpeft as mp
from modalpeft.lightning import cli_main

from .recipe_checks import SHORT_FIT, check_fit_outputs

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "digits" / "vit_tiny_adapter_digits.yaml"
TINY = [
    "--model.init_args.backbone.init_args.kwargs",
    '{"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "--data.init_args.image_size=8",
    "--data.init_args.train_per_class=8",
]


def parse(tmp_path: Path, adapter: dict) -> object:
    config = yaml.safe_load(RECIPE.read_text())
    config["model"]["init_args"]["adapter"] = adapter
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return cli_main(["--config", str(path), *TINY, f"--trainer.default_root_dir={tmp_path}"], run=False)


def test_native_config_round_trips_from_yaml(tmp_path) -> None:
    adapter = {"class_path": "modalpeft.BitFitConfig", "init_args": {"target_modules": ["qkv"]}}
    cli = parse(tmp_path, adapter)
    config = cli.model.model.peft_config["default"]
    assert isinstance(config, mp.BitFitConfig) and config.target_modules == ["qkv"]
    assert cli.model.hparams["adapter"] == {
        "class_path": "modalpeft.core.methods.bitfit.BitFitConfig",
        "init_args": {
            "target_modules": ["qkv"],
            "exclude_modules": None,
            "modules_to_save": None,
            "init_weights": True,
        },
    }


def test_recipes_show_a_progress_bar_of_the_steps(tmp_path) -> None:
    from pytorch_lightning.callbacks import RichProgressBar

    trainer = parse(tmp_path, "linear").trainer
    assert isinstance(trainer.progress_bar_callback, RichProgressBar) and trainer.progress_bar_callback.is_enabled


def test_peft_config_round_trips_from_yaml(tmp_path) -> None:
    adapter = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["qkv"]}}
    cli = parse(tmp_path, adapter)
    config = cli.model.model.peft_config["default"]
    assert isinstance(config, peft.LoraConfig) and config.r == 4 and set(config.target_modules) == {"qkv"}


def test_baseline_string_from_yaml(tmp_path) -> None:
    cli = parse(tmp_path, "linear")
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}


def test_recipe_runs_two_steps_in_process(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default loggers write to ./outputs
    check_fit_outputs(
        cli_main(["fit", "--config", str(RECIPE), *TINY, *SHORT_FIT, f"--trainer.default_root_dir={tmp_path}"])
    )


def fit_recipe_script(tmp_path: Path, *trainer_args: str) -> subprocess.CompletedProcess:
    """``python recipes/digits.py fit`` with the tiny backbone for one epoch, in a subprocess."""
    script = str(ROOT / "recipes" / "digits.py")
    args = ["fit", "--config", str(RECIPE), *TINY, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, script, *args, *trainer_args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_recipe_script_and_ddp_on_two_cpu_processes(tmp_path) -> None:
    result = fit_recipe_script(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unused parameters" not in result.stderr
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1, checkpoints
    exports = list(tmp_path.rglob("adapter_model.safetensors"))
    assert len(exports) == 1, exports


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP needs a CUDA device")
def test_recipe_under_fsdp_on_gpu(tmp_path) -> None:
    devices = min(torch.cuda.device_count(), 2)
    result = fit_recipe_script(
        tmp_path, "--trainer.strategy=fsdp", "--trainer.accelerator=gpu", f"--trainer.devices={devices}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("adapter_model.safetensors"))) == 1


def test_console_script_runs_a_recipe(tmp_path) -> None:
    from modalpeft.cli import main

    args = ["fit", "--config", str(RECIPE), *TINY, "--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"]
    assert main(args) == 0
