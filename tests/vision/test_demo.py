"""The vision demo's settings: the per-task epoch cap and its validation."""

from __future__ import annotations

import pytest
from rich.console import Console

from modalpeft.vision.demo import VisionDemo, VisionSettings, steps_note, tasks_for


def test_the_epoch_cap_shortens_only_the_small_task():
    settings = VisionSettings()
    tasks = list(tasks_for(settings).values())
    steps = {t.name: settings.steps_for(t) for t in tasks}
    assert steps == {"digits": 300, "faces": 100, "count": 300}  # faces: 40 epochs of 80 images at batch 32
    assert steps_note(settings, tasks) == "300 (faces: 100, 40 epochs)"
    uncapped = VisionSettings(max_epochs=1000)
    assert {t.name: uncapped.steps_for(t) for t in tasks} == {"digits": 300, "faces": 300, "count": 300}
    assert steps_note(uncapped, tasks) == "300"


def test_a_cap_below_one_epoch_is_refused():
    with pytest.raises(ValueError, match="max_epochs=0"):
        VisionDemo(VisionSettings(max_epochs=0), Console(quiet=True))
