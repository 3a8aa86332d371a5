"""The embedded tracking demo: the exact RGB patch embedding of the pretrained ViT, the sprite sequences' exact
boxes, and the ``--quick`` pipeline end to end (train, track, reload, merge, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from modalpeft.demo import SECTIONS, SIDE_BY_SIDE
from modalpeft.tracking import demo
from modalpeft.tracking.backbones import grey_patch_embed_to_rgb
from modalpeft.tracking.sprites import FASHION_MNIST_ROOT, SpriteSettings, sprite_sequences
from modalpeft.tracking.transforms import normalize

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)


def test_rgb_patch_embedding_sees_the_grey_image_it_was_trained_on() -> None:
    torch.manual_seed(0)
    grey = torch.nn.Conv2d(1, 8, 4, 4)
    rgb = grey_patch_embed_to_rgb(grey)
    image = torch.rand(2, 3, 16, 16)
    expected = grey((image.mean(1, keepdim=True) - 0.5) / 0.5)
    torch.testing.assert_close(rgb(normalize(image)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1-channel"):
        grey_patch_embed_to_rgb(rgb)


@needs_fashion_mnist
def test_sprite_sequences_have_exact_boxes_and_repeat() -> None:
    settings = SpriteSettings(num_frames=6)
    sequences, covers = sprite_sequences("test", 3, settings, seed=1)
    again, _ = sprite_sequences("test", 3, settings, seed=1)
    for sequence, cover, same in zip(sequences, covers, again, strict=True):
        assert len(sequence.frames) == len(sequence.boxes) == len(cover) == 6
        assert sequence.frames[0].shape == (120, 160, 3) and sequence.frames[0].dtype == np.uint8
        assert all((a == b).all() for a, b in zip(sequence.frames, same.frames, strict=True))
        x, y, w, h = sequence.boxes.T
        assert (w > 0).all() and (h > 0).all() and (x >= 0).all() and (x + w <= 160).all() and (y + h <= 120).all()
        assert (sequence.visible == (cover < 1)).all()
    # sequences continue a split's numbering: the validation sequences are new draws, not copies
    later, _ = sprite_sequences("test", 1, settings, seed=1, first=3)
    assert not all((a == b).all() for a, b in zip(later[0].frames, sequences[0].frames, strict=True))


def test_the_demo_wires_the_tracking_section() -> None:
    assert "tracking" in SECTIONS and "tracking" in SIDE_BY_SIDE


@pytest.mark.slow
@needs_fashion_mnist
def test_quick_demo(tmp_path) -> None:
    """Every contender trains, tracks the held-out sequences, reloads to the same outputs; LoRA merges, TMoE says
    why it cannot; the report, plot and pictures are written to the run folder and nowhere else."""
    console = Console(record=True, width=200)
    assert demo.run(quick=True, out_dir=tmp_path / "run", console=console)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["method"]: r for r in results["results"]}
    assert list(rows) == list(demo.CONTENDERS)
    assert all(r["reload_ok"] for r in rows.values())
    assert rows["lora (peft)"]["merge"].startswith("ok")
    assert rows["tmoe"]["merge"].startswith("not mergeable")
    assert rows["full fine-tuning"]["share_of_full"] == 1.0
    assert rows["tmoe"]["share_of_full"] < 0.35  # the parameter budget
    assert all(0.0 <= r["ao"] <= 1.0 and len(r["success_curve"]) == 21 for r in rows.values())
    for name in ("tracking.md", "tracking_success.png", "tracking_frames.png"):
        assert (tmp_path / "run" / name).is_file()
    page = (tmp_path / "run" / "tracking.md").read_text()
    assert "| tmoe |" in page and "Environment: Python" in page
    if demo.clip_path() is not None:
        assert (tmp_path / "run" / "tracking_clip.png").is_file() and results["clip"]["frames"] == 4


@pytest.mark.slow
@needs_fashion_mnist
def test_the_learning_rate_grid_reads_only_validation_sequences(tmp_path, monkeypatch) -> None:
    """``--lr-grid`` trains every grid contender (TMoE with B = 0 too) at each candidate rate and scores it on
    validation sequences drawn like the training ones; the held-out test sequences are never built."""
    built = []
    real = demo.sprite_sequences
    monkeypatch.setattr(demo, "sprite_sequences", lambda split, *a, **k: built.append(split) or real(split, *a, **k))
    candidates = {name: (1e-3, 2e-3) for name in (*demo.CONTENDERS, demo.TMOE_ZERO_B)}
    console = Console(record=True, width=200)
    assert demo.run(quick=True, out_dir=tmp_path / "run", console=console, lr_grid=True, lr_candidates=candidates)
    assert "test" not in built
    report = json.loads((tmp_path / "run" / "lr_grid.json").read_text())
    assert {(r["method"], r["lr"]) for r in report["rows"]} == {(n, lr) for n, v in candidates.items() for lr in v}
    assert set(report["picked"]) == set(candidates)
    page = (tmp_path / "run" / "tracking_lr_grid.md").read_text()
    assert "| tmoe (B = 0) |" in page and "Init: TMoE with every expert's B at zero" in page
    zero_b = next(line for line in page.splitlines() if line.startswith("| tmoe (B = 0) |"))
    assert zero_b.endswith("| - |")  # not a contender of the demo: no rate in use
    assert not (tmp_path / "run" / "tracking.md").exists()


def test_picked_takes_the_best_validation_ao_and_the_lower_rate_on_a_tie() -> None:
    rows = [
        {"method": "tmoe", "lr": 1e-3, "ao": 0.2},
        {"method": "tmoe", "lr": 2e-3, "ao": 0.3},
        {"method": "tmoe", "lr": 5e-3, "ao": 0.3},
        {"method": "full fine-tuning", "lr": 1e-3, "ao": 0.1},
    ]
    assert demo.picked(rows) == {"tmoe": 2e-3, "full fine-tuning": 1e-3}


def test_a_run_of_another_length_gets_a_page_of_its_own() -> None:
    """``--steps N`` (a schedule study) writes ``tracking_<N>_steps.md`` and its pictures, not over the demo's page;
    the demo's length and ``--quick`` checks keep ``tracking``."""
    assert demo.page_stem(demo.TrackingSettings()) == "tracking"
    assert demo.page_stem(demo.TrackingSettings(steps=240)) == "tracking_240_steps"
    assert demo.page_stem(demo.TrackingSettings.quick(), quick=True) == "tracking"


@pytest.mark.slow
@needs_fashion_mnist
def test_a_grid_of_another_length_gets_a_page_of_its_own(tmp_path) -> None:
    """``--lr-grid --steps N`` writes ``tracking_<N>_steps_lr_grid.md`` (the demo's grid page stays), its command in
    the header."""
    candidates = {name: (1e-3,) for name in (*demo.CONTENDERS, demo.TMOE_ZERO_B)}
    settings = demo.TrackingSettings.quick(lr_grid=True, lr_candidates=candidates, steps=3)
    assert demo.page_stem(settings) == "tracking_3_steps"
    out = tmp_path / "run"
    overrides = {k: v for k, v in vars(settings).items() if k not in ("out",)}
    assert demo.run(out_dir=out, console=Console(record=True, width=200), **overrides)
    page = (out / "tracking_3_steps_lr_grid.md").read_text()
    assert "--lr-grid --steps 3 --results-dir" in page and "as in `tracking_3_steps.md`" in page
    assert not (out / "tracking_lr_grid.md").exists()
