"""Every diffusion recipe parses and trains two steps through the CLI on a tiny pipeline of the same kind (SD or SDXL),
built offline, with its adapter settings unchanged; the exported adapter renders through ``generate``."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from modalpeft.diffusion import load_into_pipeline
from modalpeft.diffusion.pipeline import load_pipeline
from modalpeft.diffusion.tasks import DreamBoothTask
from modalpeft.lightning import cli_main

from .pipelines import save_tiny_pipeline, write_images

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "diffusion").glob("*.yaml"))
CLASSES = (pl.LightningModule, pl.LightningDataModule)
TINY = ["--data.init_args.resolution=16", "--data.init_args.num_workers=0", "--trainer.max_steps=2"]
TINY += ["--trainer.accumulate_grad_batches=1", "--trainer.precision=32-true", "--trainer.accelerator=cpu"]
TINY += ["--model.init_args.validation_every_n_steps=2", "--model.init_args.validation_inference_steps=2"]
TINY += ["--model.init_args.validation_resolution=16"]


def krona_count(a1: int, a2: int) -> int:
    """DiffuseKronA's count on the tiny UNet, from the spec: a1·a2 + (d_out/a1)(d_in/a2) per projection. Widths 64
    (3 transformer blocks) and 128 (4); self-attention q/k/v/o and cross-attention q/o are d x d, cross-attention k/v
    d x 64 (the text width)."""

    def layer(d_out: int, d_in: int) -> int:
        return a1 * a2 + (d_out // a1) * (d_in // a2)

    return sum(n * (6 * layer(d, d) + 2 * layer(d, 64)) for d, n in ((64, 3), (128, 4)))


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("diffusion_recipes")
    return {
        "sd": save_tiny_pipeline(base / "sd"),
        "sdxl": save_tiny_pipeline(base / "sdxl", sdxl=True),
        "photos": write_images(base / "photos", 3, size=24),
    }


def test_every_recipe_is_headed_by_its_command() -> None:
    assert {p.name for p in RECIPES} >= {
        "sdxl_diffusekrona_dreambooth.yaml", "sd21_diffusekrona_dreambooth.yaml", "sd21_lora_dreambooth.yaml",
        "sdxl_lokr_dreambooth.yaml",
    }  # fmt: skip
    for path in RECIPES:
        header = path.read_text().split("\nseed_everything:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/diffusion.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "# Mirrors:" in header
        assert "--data.init_args.instance_dir" in header


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_on_a_tiny_pipeline(recipe, files, tmp_path) -> None:
    kind = "sdxl" if recipe.name.startswith("sdxl") else "sd"
    args = ["fit", "--config", str(recipe), f"--model.init_args.pipeline={files[kind]}", *TINY]
    args += [f"--data.init_args.instance_dir={files['photos']}", f"--trainer.default_root_dir={tmp_path}"]
    cli = cli_main(args, *CLASSES)
    task = cli.model
    assert isinstance(task, DreamBoothTask) and task.sdxl == (kind == "sdxl") and cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    run = Path(cli.trainer.log_dir)
    assert (run / "validation" / "step_000002.png").is_file()
    trainable = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    if "diffusekrona" in recipe.name:  # the official a1=64, a2=8, unchanged
        assert trainable == krona_count(64, 8)
    fresh = load_pipeline(str(files[kind]))
    adapted = load_into_pipeline(fresh, run / "adapter")
    batch = next(iter(cli.datamodule.train_dataloader()))
    torch.manual_seed(0)
    latents, embeds, added = task.encode(batch)
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    with torch.no_grad():
        expected = task.model.eval()(latents, torch.tensor([500]), encoder_hidden_states=embeds, **kwargs).sample
        got = adapted.eval()(latents, torch.tensor([500]), encoder_hidden_states=embeds, **kwargs).sample
    torch.testing.assert_close(got, expected)


def test_generate_subcommand_writes_pngs(files, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "generated"
    argv = ["diffusion.py", "generate", "--pipeline", str(files["sd"]), "--prompts", '["a sks dog", "a dog"]']
    argv += ["--out_dir", str(out), "--steps", "2", "--height", "16", "--width", "16", "--images_per_prompt", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--device", "cpu"])
    runpy.run_path(str(ROOT / "recipes" / "diffusion.py"), run_name="__main__")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a_sks_dog_0.png", "000_a_sks_dog_1.png", "001_a_dog_0.png", "001_a_dog_1.png"]
    assert f"wrote 4 images to {out}/" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["diffusion.py", "generate", "--pipeline", str(files["sd"]), "--prompts", "[]"])
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--out_dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "recipes" / "diffusion.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "prompts is empty" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_generate_renders_an_adapter_at_its_scale(files, tmp_path, monkeypatch) -> None:
    """``generate --adapter DIR --scale S``: at scale 0 the images are the base model's, at 1 they are the adapter's."""
    import numpy as np
    from PIL import Image

    import modalpeft as mp

    pipe = load_pipeline(str(files["sd"]))
    mp.adapt(pipe.unet, mp.DiffuseKronAConfig(a1=8, a2=8, init_weights=False)).save_adapter(tmp_path / "adapter")
    script = str(ROOT / "recipes" / "diffusion.py")

    def render(out: str, *extra: str) -> list:
        argv = ["diffusion.py", "generate", "--pipeline", str(files["sd"]), "--prompts", '["a sks dog"]', "--out_dir"]
        monkeypatch.setattr(sys, "argv", [*argv, out, "--steps", "2", "--height", "16", "--width", "16", *extra])
        runpy.run_path(script, run_name="__main__")
        return [np.asarray(Image.open(p)) for p in sorted((tmp_path / out).iterdir())]

    base = render("base")
    off = render("off", "--adapter", str(tmp_path / "adapter"), "--scale", "0")
    on = render("on", "--adapter", str(tmp_path / "adapter"))
    assert len(base) == len(on) == 1 and (off[0] == base[0]).all()
    assert np.abs(on[0].astype(int) - base[0].astype(int)).max() > 0
