"""Every text recipe parses and trains two steps through the CLI with a tiny model of the same architecture, built
offline, on GLUE-layout files the tests write."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

from modalpeft.core.model import AdaptedModel
from modalpeft.lightning import cli_main
from modalpeft.text.tasks import CausalLMTask, TextClassificationTask

from .fixtures import write_glue_sst, write_tiny_model

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "text").glob("*.yaml"))
CLASSES = (pl.LightningModule, pl.LightningDataModule)
TINY_ADAPTER = {"compacter": ["--model.init_args.adapter.init_args.reduction_factor=4"]}  # width 32: r = 8
TINY_ADAPTER["dept"] = ["--model.init_args.adapter.init_args.num_tokens=8"]  # tiny RoBERTa: 64 positions


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("text_recipes")
    mrpc = base / "MRPC"
    mrpc.mkdir()
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    lines += [f"{i % 2}\t{i}\t{i + 100}\tthe cat sat on the mat\tthe dog {'sat' if i % 2 else 'ran'}" for i in range(8)]
    for split in ("train", "dev"):
        (mrpc / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return {
        "roberta": write_tiny_model(base / "roberta", "roberta"),
        "t5": write_tiny_model(base / "t5", "t5"),
        "llama": write_tiny_model(base / "llama", "llama"),
        "sst2": write_glue_sst(base / "SST-2", n=8),
        "mrpc": mrpc,
        "math10k": write_instructions(base / "math10k"),
    }


def write_instructions(folder: Path) -> Path:
    """LLM-Adapters' math_10k columns (instruction, input, output, answer), as JSONL train/dev files."""
    folder.mkdir()
    rows = [
        {"instruction": f"{i} plus 1", "input": "", "output": f"the answer is {i + 1}", "answer": i + 1}
        for i in range(8)
    ]
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_every_recipe_is_headed_by_its_command() -> None:
    assert {p.stem.split("_")[0] for p in RECIPES} == {"roberta", "t5", "llama"}
    for path in RECIPES:
        header = path.read_text().split("\nseed_everything:")[0]
        first = header.splitlines()[0]
        assert first.startswith("# Command:  python recipes/text.py fit --config") and path.name in first
        assert "# Runtime:" in header and "# Expected:" in header and "# Mirrors:" in header
        assert "--data.init_args.data_dir" in header


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_with_a_tiny_model(recipe, files, tmp_path) -> None:
    arch = recipe.stem.split("_")[0]
    data = files.get(recipe.stem.split("_")[-1], files["sst2"])
    method = next((m for m in TINY_ADAPTER if m in recipe.stem), None)
    args = ["fit", "--config", str(recipe), *TINY_ADAPTER.get(method, [])]
    args += [f"--model.init_args.backbone.init_args.name={files[arch]}", f"--data.init_args.tokenizer={files[arch]}"]
    args += [f"--data.init_args.data_dir={data}", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"]
    args += ["--data.init_args.max_length=32", "--trainer.accelerator=cpu", "--trainer.fast_dev_run=2"]
    args += ["--trainer.precision=32-true"]  # the LLaMA recipes train in bf16 on a GPU
    if method == "dept":  # its text init reads the model's tokenizer
        args += [f"--model.init_args.adapter.init_args.tokenizer={files[arch]}"]
    causal = "class_path: modalpeft.text.tasks.CausalLMTask" in recipe.read_text()
    if causal:
        args += ["--model.init_args.generate_max_new_tokens=4"]
    cli = cli_main([*args, f"--trainer.default_root_dir={tmp_path}"], *CLASSES)
    assert cli.trainer.global_step == 2 and isinstance(cli.model, CausalLMTask if causal else TextClassificationTask)
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    total = {n for n, _ in cli.model.model.named_parameters()}
    if "_full_" in recipe.name:
        assert trainable == total
    elif "_linear_" in recipe.name:
        assert trainable == {"head.weight", "head.bias"}
    else:
        assert (causal or any("head" in n for n in trainable)) and len(trainable) < len(total)
        assert isinstance(cli.model.model, AdaptedModel) or "lora" in recipe.name


def test_recipe_script_runs_in_process(files, tmp_path, monkeypatch) -> None:
    recipe = ROOT / "recipes" / "text" / "roberta_base_linear_sst2.yaml"
    argv = ["text.py", "fit", "--config", str(recipe), f"--model.init_args.backbone.init_args.name={files['roberta']}"]
    argv += [f"--data.init_args.tokenizer={files['roberta']}", f"--data.init_args.data_dir={files['sst2']}"]
    argv += ["--data.init_args.num_workers=0", "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--trainer.default_root_dir={tmp_path}"])
    runpy.run_path(str(ROOT / "recipes" / "text.py"), run_name="__main__")
