"""The audio demo section runs end to end in seconds with ``--quick`` (skipped without music21), and is wired into
``modalpeft demo``."""

from __future__ import annotations

import json
import re

import pytest

from modalpeft.demo import SECTIONS, SIDE_BY_SIDE


def test_the_audio_section_is_wired() -> None:
    assert "audio" in SECTIONS and "audio" in SIDE_BY_SIDE


def test_quick_demo_runs_and_writes_its_report(tmp_path) -> None:
    pytest.importorskip("music21", reason="the audio demo reads the music21 corpus (pip install music21)")
    from rich.console import Console

    from modalpeft.audio import demo
    from modalpeft.audio.render import soundfont_missing_reason

    console = Console(record=True, width=120)
    assert demo.run(True, tmp_path / "audio", results_dir=tmp_path / "results", console=console)
    assert not (tmp_path / "results").exists()  # --quick never writes results
    report = json.loads((tmp_path / "audio" / "results.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == [name for name, _ in demo.contenders()]
    by = {r["method"]: r for r in report["results"]}
    assert by["pretrained (frozen)"]["trainable_params"] == 0
    assert 0 < by["linear adapter"]["share_of_full"] < 0.10 and by["full fine-tuning"]["share_of_full"] == 1.0
    assert by["lora (peft)"]["merge_ok"] and all(by[m]["reload_ok"] for m in methods[1:])
    variants = ["last", "uniform", "loss p=1", "loss p=10", "step p=1"]
    for method in ("linear adapter", "conv adapter", "transformer adapter", "lora (peft)"):  # checkpoint merging
        assert list(by[method]["mwa"]) == variants and by[method]["mwa"]["last"] == by[method]["bits_per_token"]
    assert not by["full fine-tuning"]["mwa"] and not by["pretrained (frozen)"]["mwa"]
    for name in ("audio.md", "audio_pianoroll.png", "audio_nll_vs_params.png", "samples/real.mid"):
        assert (tmp_path / "audio" / name).is_file()
    page = (tmp_path / "audio" / "audio.md").read_text()
    assert "## Checkpoint merging (MWA)" in page
    links = re.findall(r"\]\(([^)]+)\)", page)
    assert "audio_pianoroll.png" in links and "samples/real.mid" in links
    assert all((tmp_path / "audio" / link).is_file() for link in links), links  # relative to the page
    if soundfont_missing_reason() is None:
        assert (tmp_path / "audio" / "samples" / "conv.wav").is_file()


def test_the_learning_rate_grid_reads_only_training_tunes(tmp_path) -> None:
    pytest.importorskip("music21", reason="the audio demo reads the music21 corpus (pip install music21)")
    from rich.console import Console

    from modalpeft.audio import demo

    plain = demo.AudioDemo(demo.AudioSettings.quick())
    grid = demo.AudioDemo(demo.AudioSettings.quick(lr_grid=True))
    held_out = {tuple(line) for line in plain.test_lines}
    assert not held_out & {tuple(line) for line in grid.test_lines + grid.train_lines}  # the held-out tunes unread
    assert sorted(map(tuple, grid.test_lines + grid.train_lines)) == sorted(map(tuple, plain.train_lines))
    assert grid.test_lines and grid.train_lines
    candidates = {"linear adapter": (1e-3, 1e-2), "full fine-tuning": (1e-3,)}
    console = Console(record=True, width=120)
    assert demo.run(True, tmp_path / "audio", console=console, lr_grid=True, lr_candidates=candidates)
    report = json.loads((tmp_path / "audio" / "lr_grid.json").read_text())
    rows = {(r["method"], r["lr"]): r["bits_per_token"] for r in report["rows"]}
    assert set(rows) == {("linear adapter", 1e-3), ("linear adapter", 1e-2), ("full fine-tuning", 1e-3)}
    best = min((1e-3, 1e-2), key=lambda lr: rows["linear adapter", lr])
    assert report["picked"] == {"linear adapter": best, "full fine-tuning": 1e-3}
    page = (tmp_path / "audio" / "audio_lr_grid.md").read_text()
    assert f"**{rows['linear adapter', best]:.3f}**" in page and not (tmp_path / "audio" / "audio.md").exists()
