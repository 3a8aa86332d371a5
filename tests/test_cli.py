"""The ``modalpeft`` console script: ``methods``, ``inspect DIR``, ``demo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
from torch import nn

import modalpeft as mp
from modalpeft.cli import main


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def test_methods_lists_every_registered_method(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in mp.list_methods():
        info = mp.get_method(name)
        assert name in out and info.paper in out
    assert "bitfit" in out and "2106.10199" in out
    assert "lora" in out  # peft's methods are named too


def test_inspect_native_adapter(tmp_path, capsys) -> None:
    model = mp.adapt(Tiny(), mp.BitFitConfig(), modules_to_save=["head"])
    model.save_adapter(tmp_path / "a")
    n_saved = sum(t.numel() for t in model.adapter_state_dict().values())
    assert main(["inspect", str(tmp_path / "a"), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "bitfit" in out and "mergeable" in out
    assert f"{__name__}.Tiny" in out  # the base model's class
    assert f"{n_saved:,}" in out  # 16 + 16 biases of fc and norm, and the head's 51
    assert "modules_to_save" in out and "head.weight" in out and mp.__version__ in out


def test_inspect_peft_adapter(tmp_path, capsys) -> None:
    model = mp.adapt(Tiny(), peft.LoraConfig(r=2, target_modules=["fc"]), modules_to_save=["head"])
    model.save_adapter(tmp_path / "lora")
    assert main(["inspect", str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "peft" in out and "LORA" in out
    assert f"{2 * 8 + 16 * 2 + 3 * 16 + 3:,}" in out  # A, B and the head
    assert "lora_alpha" in out


def test_inspect_missing_directory_exits_2_with_one_line(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_inspect_corrupt_files_exit_2(tmp_path, capsys) -> None:
    mp.adapt(Tiny(), mp.BitFitConfig()).save_adapter(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "corrupted" in capsys.readouterr().err

    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_python_dash_m_reports_errors_without_traceback(tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "modalpeft", "inspect", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nowhere" in proc.stderr


def test_demo_quick_runs_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    everything = ["linear probe", "full fine-tuning", "lora (peft)", "bitfit", "adapter", "krona", "vpt", "ssf", "spt"]
    argv = ["demo", "--quick", "--modality", "vision", "--out", str(out), "--tasks", "faces", "--methods"]
    assert main([*argv, *everything]) == 0  # the default set plus KronA
    printed = capsys.readouterr().out
    report = json.loads((out / "vision" / "results.json").read_text())
    assert [r["method"] for r in report["rows"]] == everything
    assert report["all_checks_passed"] and report["settings"]["results_dir"] is None  # --quick writes no report
    for r in report["rows"]:
        assert r["method"] in printed and r["reload_ok"]
        assert 0 < r["trainable_params"] <= r["total_params"]
        assert all(0.0 <= run["accuracy"] <= 1.0 and run["task"] == "faces" for run in r["runs"])
        assert r["merge_ok"] is (True if r["mergeable"] else None)
    assert (out / "vision" / "adapters" / "faces" / "bitfit" / "adapter_config.json").is_file()
    assert main(["inspect", str(out / "vision" / "adapters" / "faces" / "bitfit")]) == 0


def test_demo_runs_the_other_sections_quickly(tmp_path, capsys) -> None:
    """``make demo`` wires the deepfake and point-cloud sections in; quick runs write no report in the repo."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--modality", "deepfake", "pointcloud", "--out", str(out)]) == 0
    assert (out / "deepfake" / "results.json").is_file() and (out / "pointcloud" / "results.json").is_file()
    printed = capsys.readouterr().out
    assert "LN tuning" in printed and "pointgst" in printed


def test_demo_methods_pick_the_text_contenders(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--modality", "text", "--out", str(out), "--methods", "linear probe", "bitfit"]
    assert main(argv) == 2  # bitfit is a vision contender, not a text one
    assert "unknown text --methods ['bitfit']" in capsys.readouterr().err
    assert main(argv[:-1]) == 0
    report = out / "text" / "results.json"
    if not report.is_file():  # the offline text model or data is not installed: the section says so and skips
        pytest.skip("the text demo's offline data is not installed")
    assert {r["method"] for r in json.loads(report.read_text())["rows"]} == {"linear probe"}


def test_demo_seed_starts_the_text_seeds(monkeypatch) -> None:
    import modalpeft.demo

    calls = []
    monkeypatch.setattr(modalpeft.demo, "run_demo", lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
    assert main(["demo", "--modality", "text", "--suite", "weight-space", "--seed", "3", "--seeds", "4"]) == 0
    assert calls[0][0] == (["text"],)
    assert {k: calls[0][1][k] for k in ("seed", "seeds", "suite")} == {"seed": 3, "seeds": 4, "suite": "weight-space"}


@pytest.mark.parametrize("modalities", [["pointcloud"], []])
def test_demo_methods_need_a_section_that_takes_them(modalities, capsys) -> None:
    assert main(["demo", "--quick", *(["--modality", *modalities] if modalities else []), "--methods", "ssf"]) == 2
    assert "--methods picks the contenders of the vision and text sections" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [[], ["inspect"], ["demo", "--steps", "many"], ["demo", "--seeds"], ["demo", "--modality", "sound"]]
)
def test_bad_arguments_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


DIGITS = Path(__file__).resolve().parents[1] / "recipes" / "digits" / "vit_tiny_adapter_digits.yaml"
TINY_DIGITS = [
    "--config",
    str(DIGITS),
    "--model.init_args.backbone.init_args.kwargs",
    '{"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "--data.init_args.image_size=8",
    "--data.init_args.train_per_class=8",
]


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        (["--ckpt_path=missing.ckpt"], "--ckpt_path='missing.ckpt' is not a file; give the .ckpt that fit wrote"),
        (["--model.init_args.adapter.init_args.bottleneck_dim=0"], "bottleneck_dim=0 must be an integer >= 1"),
    ],
)
def test_fit_with_bad_input_prints_one_line_and_leaves_nothing(extra, cause, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", *TINY_DIGITS, "--trainer.max_epochs=1", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"modalpeft: error: {cause}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no outputs/lightning_logs/version_0/config.yaml


def test_fit_of_a_baseline_exports_what_load_adapter_and_inspect_read(tmp_path, monkeypatch, capsys) -> None:
    """The console script: no LightningCLI 'args' warning, no Lightning tips, the run folder printed at the end; the
    linear probe's export loads with mp.load_adapter and reads with modalpeft inspect."""
    import warnings

    import torch

    monkeypatch.chdir(tmp_path)
    argv = ["fit", *TINY_DIGITS, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"]
    argv += ["--trainer.limit_val_batches=1", "--model.init_args.adapter=linear"]
    monkeypatch.setattr(sys, "argv", ["modalpeft", *argv])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main() == 0
    assert not [w for w in caught if "args parameter" in str(w.message)]
    out = capsys.readouterr().out
    folder = "outputs/lightning_logs/version_0"
    assert f"modalpeft fit: run folder {folder}/" in out and "💡" not in out
    assert f"checkpoint: {folder}/checkpoints/" in out and f"adapter: {folder}/adapter/" in out
    config = json.loads((tmp_path / folder / "adapter" / "adapter_config.json").read_text())
    assert config["baseline"] == "linear"
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
    loaded = mp.load_adapter(fresh, tmp_path / folder / "adapter")
    saved = mp.core.state.read_tensors(tmp_path / folder / "adapter")
    assert set(saved) == {"head.weight", "head.bias"}
    torch.testing.assert_close(loaded.head.weight, saved["head.weight"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert main(["inspect", str(tmp_path / folder / "adapter")]) == 0
    assert "baseline" in capsys.readouterr().out
