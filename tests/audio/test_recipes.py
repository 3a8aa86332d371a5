"""Every audio recipe parses and trains two steps through the CLI with the tiny MusicGen, built offline, on a captioned
WAV folder the tests write; the adapter recipes' headers state the trainable count they give on MusicGen-medium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

import modalpeft as mp
from modalpeft.audio.backbones import musicgen_decoder
from modalpeft.audio.tasks import MusicGenTask
from modalpeft.lightning import cli_main

from .fixtures import write_music_folder, write_tiny_musicgen

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "audio").glob("musicgen_*.yaml"))  # the MusicGen recipes; test_symbolic: the rest
CLASSES = (pl.LightningModule, pl.LightningDataModule)
TINY_ADAPTER = {"linear": 8, "conv": 8, "transformer": 8}  # the tiny decoder is 16 wide


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("audio_recipes")
    return {"model": write_tiny_musicgen(base / "model"), "music": write_music_folder(base / "music", [1.2, 0.8, 1.0])}


def test_every_recipe_is_headed_by_its_command() -> None:
    assert {p.stem for p in RECIPES} >= {f"musicgen_medium_{k}_adapter" for k in TINY_ADAPTER} | {
        "musicgen_medium_lora"
    }
    for path in RECIPES:
        header = path.read_text().split("\nseed_everything:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/audio.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "# Mirrors:" in header
        assert "--data.init_args.data_dir" in header


@pytest.mark.parametrize("kind", sorted(TINY_ADAPTER))
def test_the_adapter_recipes_are_the_papers_40m_mid_size_on_musicgen_medium(kind: str) -> None:
    """One block of MusicGen-medium's width (1536) adapted as the recipe says, times its 48 blocks: the count the
    header states, from the designs' shapes, and about 40M."""
    recipe = ROOT / "recipes" / "audio" / f"musicgen_medium_{kind}_adapter.yaml"
    args = yaml.safe_load(recipe.read_text())["model"]["init_args"]["adapter"]["init_args"]
    config = mp.MusicAdapterConfig(**args)
    d, m = 1536, config.bottleneck
    stage = {"linear": 0, "conv": 4 * (3 * m * m + m + m * m + m) + 2 * m * (m // 4) + m // 4 + m}
    stage["transformer"] = 4 * m + 4 * m * m + 4 * m + 2 * m * 4 * m + 4 * m + m
    per_block = 2 * d * m + m + d + stage[kind]
    stated = int(re.search(r"[Tt]rainable ([\d,]+)", recipe.read_text()).group(1).replace(",", ""))
    assert stated == 48 * per_block and 35e6 < stated < 45e6
    torch.manual_seed(0)
    block = musicgen_decoder("medium", num_hidden_layers=1, ffn_dim=8, vocab_size=4, num_codebooks=1)
    assert mp.adapt(block, config).trainable_summary()["trainable"] == per_block


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_with_a_tiny_musicgen(recipe, files, tmp_path) -> None:
    args = ["fit", "--config", str(recipe), f"--model.init_args.backbone.init_args.name={files['model']}"]
    kind = next((k for k in TINY_ADAPTER if f"_{k}_" in recipe.name), None)
    if kind is not None:
        args.append(f"--model.init_args.adapter.init_args.bottleneck={TINY_ADAPTER[kind]}")
    args += [f"--data.init_args.data_dir={files['music']}", f"--data.init_args.tokenizer={files['model']}"]
    args += ["--data.init_args.clip_seconds=0.4", "--data.init_args.num_workers=0", "--data.init_args.batch_size=2"]
    args += [f"--data.init_args.cache_dir={tmp_path / 'codes'}", "--model.init_args.sample_seconds=0.05"]
    args += [f"--model.init_args.fad_reference={files['music']}"]
    args += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_epochs=1"]
    args += ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.callbacks=[]"]
    cli = cli_main([*args, f"--trainer.default_root_dir={tmp_path}"], *CLASSES)
    assert cli.trainer.global_step == 2 and isinstance(cli.model, MusicGenTask)
    assert cli.model.hparams.sample_seconds == 0.05 and cli.model.hparams.lr == 5e-5  # the task's own and the base's
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert trainable and all("text_encoder" not in n and "audio_encoder" not in n for n in trainable)
    if "_full" not in recipe.name:
        assert len(trainable) < sum(1 for _ in cli.model.model.parameters())
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "adapter" / "adapter_config.json").is_file()  # exported at the end of fit
    assert (log_dir / "samples" / "sample_0.wav").is_file()  # and the sample prompt rendered
    fad = json.loads((log_dir / "samples" / "fad.json").read_text())  # and its FAD against the reference folder
    assert np.isfinite(fad["fad"]) and fad["model"] == "codec" and fad["generated_frames"] >= 2
    assert not list(files["music"].glob(".codes_cache"))  # the cache went where the recipe was told
