"""The diffusion demo's quick run, the committed model it starts from, and its instance images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modalpeft.diffusion.demo import SUBJECT_FILE, DiffusionSettings, all_checks_passed, instance_views, run
from modalpeft.diffusion.tiny import (
    FMNIST_DIFFUSION_FILE,
    FMNIST_DIFFUSION_SHA256,
    FMNIST_GUIDANCE,
    IDENTIFIER,
    MAX_LENGTH,
    VOCABULARY,
    build_tokenizer,
    caption,
    fmnist_diffusion,
)


def test_tokenizer_is_word_level_with_the_identifier_outside_every_caption() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer(caption("ankle boot", IDENTIFIER), padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    words = ["<|startoftext|>", "a", "photo", "of", "a", IDENTIFIER, "ankle", "boot", "<|endoftext|>"]
    assert ids == [VOCABULARY.index(w) for w in words] + [VOCABULARY.index("<pad>")] * (MAX_LENGTH - len(words))
    assert tokenizer("a photo of a zebra")["input_ids"][5] == VOCABULARY.index("<unk>")


def test_committed_model_is_checked_and_samples_deterministically(tmp_path) -> None:
    model = fmnist_diffusion()
    first = model.sample(["a photo of a bag", "a photo of a sks bag"], seed=3, steps=2)
    assert first.shape == (2, 1, 32, 32) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, model.sample(["a photo of a bag", "a photo of a sks bag"], seed=3, steps=2))
    bad = tmp_path / FMNIST_DIFFUSION_FILE.name
    bad.write_bytes(FMNIST_DIFFUSION_FILE.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fmnist_diffusion(checkpoint_path=bad)


def test_the_default_guidance_is_the_committed_models_best() -> None:
    """``FMNIST_GUIDANCE`` (the demo's and ``sample``'s default) is the scale the pretraining recipe's ``--export``
    measured as best for the committed weights, whose digest the manifest names."""
    manifest = json.loads((FMNIST_DIFFUSION_FILE.parent / "fmnist_unet.json").read_text())
    assert manifest["file"]["sha256"] == FMNIST_DIFFUSION_SHA256
    by_guidance = manifest["metrics"]["class_accuracy_by_guidance"]
    assert manifest["metrics"]["guidance"] == FMNIST_GUIDANCE and by_guidance[f"{FMNIST_GUIDANCE:g}"] == max(
        by_guidance.values()
    )
    assert DiffusionSettings().guidance == FMNIST_GUIDANCE


def test_instance_views_are_the_photo_its_mirror_and_shifts() -> None:
    subject = torch.rand(1, 1, 32, 32) * 2 - 1
    views = instance_views(subject)
    assert views.shape == (6, 1, 32, 32)
    assert torch.equal(views[0], subject[0]) and torch.equal(views[3], subject[0].flip(-1))
    assert torch.equal(views[1][..., 1:], subject[0][..., :-1]) and (views[1][..., 0] == -1).all()
    assert SUBJECT_FILE.is_file()


def test_demo_quick_run(tmp_path) -> None:
    """The whole section on 2 steps and a few samples: every method trains, saves, reloads (and merges) exactly,
    and the report, grid and plot are written to the run folder only."""
    report = run(quick=True, out_dir=tmp_path)
    assert all_checks_passed(report)
    methods = [r["method"] for r in report["results"]]
    assert methods == [
        "base model", "DiffuseKronA (official)", "DiffuseKronA (kron)", "LoRA r=4 (peft)", "LoKr (peft)",
        "full attention",
    ]  # fmt: skip
    by = {r["method"]: r for r in report["results"]}
    assert by["DiffuseKronA (official)"]["trainable_params"] == by["DiffuseKronA (kron)"]["trainable_params"]
    assert by["DiffuseKronA (official)"]["trainable_params"] < by["LoRA r=4 (peft)"]["trainable_params"]
    assert by["full attention"]["merge_ok"] is None and by["LoRA r=4 (peft)"]["merge_ok"]
    for name in ("results.json", "diffusion.md", "diffusion_grid.png", "diffusion_fidelity_vs_params.png"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "results.json").read_text())["targets"].keys() == {
        "DiffuseKronA (official)",
        "DiffuseKronA (kron)",
    }
    assert "Environment: Python" in (tmp_path / "diffusion.md").read_text()


def test_the_target_needs_the_subject_learned_not_only_a_tie_with_lora() -> None:
    from modalpeft.diffusion.demo import LEARNED, Result, targets

    def result(method: str, fidelity: float, prompt: float, params: int) -> Result:
        return Result(method, 1e-3, params, None, None, 0.0, fidelity, 1.0, 0.8, prompt, 0.0)

    untrained = [result("base model", 0.841, 0.815, 0), result("LoRA r=4 (peft)", 0.842, 0.815, 28672)]
    tie = targets([*untrained, result("DiffuseKronA (official)", 0.842, 0.796, 7168)])["DiffuseKronA (official)"]
    assert tie["subject_vs_lora"] == pytest.approx(0) and tie["prompt_vs_lora"] >= -0.02 and not tie["met"]
    learned = targets([*untrained, result("DiffuseKronA (kron)", 0.841 + LEARNED + 1e-6, 0.8, 7168)])
    assert learned["DiffuseKronA (kron)"]["met"] and learned["DiffuseKronA (kron)"]["params_vs_lora"] == 0.25


def test_the_lr_grid_picks_the_most_faithful_rate_within_the_drift_bound() -> None:
    from modalpeft.diffusion.demo import picked

    def row(method, lr, fidelity, drift):
        return {"method": method, "lr": lr, "subject_fidelity": fidelity, "language_drift": drift}

    rows = [
        {"method": "base model", "lr": None, "subject_fidelity": 0.9, "language_drift": 0.0},
        row("a", 1e-3, 0.91, 0.0), row("a", 1e-2, 0.95, -0.04), row("a", 3e-2, 0.97, -0.10),
        row("b", 1e-3, 0.92, -0.08), row("b", 1e-2, 0.96, -0.12),  # none within: the least drift
        row("c", 1e-3, 0.92, -0.05),  # exactly at the bound counts
    ]  # fmt: skip
    assert picked(rows, 0.05) == {"a": 1e-2, "b": 1e-3, "c": 1e-3}


@pytest.mark.skipif(not Path(DiffusionSettings().fmnist_root).is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_the_lr_grid_runs_on_another_bag_and_writes_its_page(tmp_path) -> None:
    from modalpeft.diffusion.demo import SUBJECT_INDEX, validation_subject
    from modalpeft.vision.idx import read_fashion_mnist

    index, subject = validation_subject(DiffusionSettings())
    images, labels = read_fashion_mnist(DiffusionSettings().fmnist_root, "t10k")
    assert index != SUBJECT_INDEX and labels[index] == 8 and torch.equal(subject[0], torch.as_tensor(images[index]))
    candidates = {"DiffuseKronA (official)": (1e-3, 1e-2), "full attention": (1e-4,)}
    report = run(quick=True, out_dir=tmp_path, lr_grid=True, lr_candidates=candidates)
    assert report["subject_index"] == index and all_checks_passed(report)
    assert [(r["method"], r["lr"]) for r in report["rows"]] == [
        ("base model", None), ("DiffuseKronA (official)", 1e-3), ("DiffuseKronA (official)", 1e-2),
        ("full attention", 1e-4),
    ]  # fmt: skip
    assert set(report["picked"]) == {"DiffuseKronA (official)", "full attention"}
    page = (tmp_path / "diffusion_lr_grid.md").read_text()
    assert f"test image {index}" in page and not (tmp_path / "diffusion.md").exists()


def test_a_run_of_another_length_writes_its_own_page(tmp_path) -> None:
    from modalpeft.diffusion import demo

    assert demo.page_stem(DiffusionSettings()) == "diffusion" and DiffusionSettings().steps == demo.DEMO_STEPS
    assert demo.page_stem(DiffusionSettings(steps=400)) == "diffusion_400_steps"
    assert demo.page_stem(DiffusionSettings(steps=400), quick=True) == "diffusion"
    report = run(quick=True, out_dir=tmp_path / "run", results_dir=tmp_path / "pages", steps=3)
    assert report["stem"] == "diffusion"  # a --quick check keeps the demo's name
    settings = DiffusionSettings.quick(steps=3)
    page = demo.markdown([], demo.Demo(settings), {**report, "targets": {}, "stem": "diffusion_3_steps"})
    assert "`modalpeft demo --modality diffusion --steps 3 --results-dir docs/results`" in page
    assert "not searched again at 3 steps" in page and "![generations](diffusion_3_steps_grid.png)" in page


def test_a_length_trains_at_its_own_grids_picks_or_the_demos(tmp_path, monkeypatch) -> None:
    """``LRS_BY_STEPS``: a length with its own grid trains at that grid's picks and its page says so; another length
    takes the demo's; given rates are kept; a grid of another length writes ``diffusion_<N>_steps_lr_grid.md``."""
    from modalpeft.diffusion import demo
    from modalpeft.lightning.demo import run_environment

    assert DiffusionSettings().lrs == demo.LRS_BY_STEPS[demo.DEMO_STEPS] == DiffusionSettings(steps=7).lrs
    monkeypatch.setitem(demo.LRS_BY_STEPS, 3, {**demo.LRS_BY_STEPS[demo.DEMO_STEPS], "LoRA r=4 (peft)": 0.5})
    assert DiffusionSettings(steps=3).lrs["LoRA r=4 (peft)"] == 0.5
    assert DiffusionSettings(steps=3, lrs={"x": 1.0}).lrs == {"x": 1.0}
    settings = DiffusionSettings.quick(steps=3)
    meta = {"stem": "diffusion_3_steps", "load": "0", "seconds": 0, "environment": run_environment()}
    page = demo.markdown([], demo.Demo(settings), {**meta, "targets": {}, "instance_self_similarity": 1.0})
    assert "the picks of the 3-step validation grid (`diffusion_3_steps_lr_grid.md`)." in page
    rows = [{"method": "base model", "lr": None, "subject_fidelity": 0.9, "prompt_fidelity": 0.5,
             "language_drift": 0.0}]  # fmt: skip
    grid = demo.grid_markdown(rows, settings, {**meta, "subject_index": 1})
    assert "`modalpeft demo --modality diffusion --lr-grid --steps 3 --results-dir docs/results`" in grid
