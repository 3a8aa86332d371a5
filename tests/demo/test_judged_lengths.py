"""Demos whose default length is too short to settle their issue's target point to the run where it is judged."""

from __future__ import annotations

from pathlib import Path

import pytest

from modalpeft.lightning.demo import judged_length_note

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def test_the_note_names_the_command_and_the_page_and_is_empty_at_the_judged_length() -> None:
    note = judged_length_note("tracking", "tracking", 80, 80, 240, "Why.")
    assert "`modalpeft demo --modality tracking --steps 240 --results-dir docs/results`" in note
    assert "[`tracking_240_steps.md`](tracking_240_steps.md)" in note
    assert "this demo's default length" in note and note.endswith("Why.")
    assert "not at 120 steps" in judged_length_note("tracking", "tracking", 120, 80, 240, "Why.")
    assert judged_length_note("tracking", "tracking", 240, 80, 240, "Why.") == ""


def test_the_note_carries_the_pages_other_flags() -> None:
    note = judged_length_note("text", "text_weight_space", 36, 36, 180, "Why.", "--suite weight-space")
    assert "`modalpeft demo --modality text --suite weight-space --steps 180 --results-dir docs/results`" in note
    assert "[`text_weight_space_180_steps.md`](text_weight_space_180_steps.md)" in note


@pytest.mark.parametrize(
    ("modality", "stem", "contenders"),
    [
        ("tracking", "tracking", None),
        ("text", "text", "adapters"),
        ("text", "text_weight_space", "weight-space"),
    ],
)
def test_the_judged_length_has_its_own_grid_and_a_committed_page(modality: str, stem: str, contenders: str) -> None:
    import importlib

    demo = importlib.import_module(f"modalpeft.{modality}.demo")
    steps = demo.JUDGED_STEPS
    assert steps != demo.DEMO_STEPS
    assert steps in demo.LRS_BY_STEPS, f"{modality}: the target is judged at {steps} steps, where no grid picked rates"
    if contenders is not None:  # the text suites: each has its own grid at that length
        assert contenders in demo.GRIDS_BY_STEPS[steps], f"{stem}: no validation grid at {steps} steps"
    assert (RESULTS / f"{stem}_{steps}_steps.md").is_file()
    assert (RESULTS / f"{stem}_{steps}_steps_lr_grid.md").is_file()
    assert f"--steps {steps}" in (RESULTS / f"{stem}.md").read_text(), "the demo's page does not point to it"
