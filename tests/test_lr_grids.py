"""The demos train at the learning rates their committed grid pages picked (``docs/results/*_lr_grid.md``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def picks(page: str) -> dict[str, float]:
    """``method -> picked rate`` from a grid page's table (the column before the last)."""
    lines = (RESULTS / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |") and "| picked |" in line)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = float(cells[-2])
    return rows


def code_rates(page: str) -> dict[str, float]:
    """The rates the demo of ``page`` trains each of its contenders at."""
    if page == "audio_lr_grid.md":
        from modalpeft.audio.demo import AudioSettings

        return dict(AudioSettings().lrs)
    diffusion = re.fullmatch(r"diffusion(?:_(\d+)_steps)?_lr_grid\.md", page)  # diffusion_400_steps_lr_grid.md
    if diffusion:
        from modalpeft.diffusion.demo import DEMO_STEPS, DiffusionSettings

        return dict(DiffusionSettings(steps=int(diffusion.group(1) or DEMO_STEPS)).lrs)
    text = re.fullmatch(r"text(_weight_space)?(?:_(\d+)_steps)?_lr_grid\.md", page)  # text_weight_space_180_steps...
    if text:
        from modalpeft.text.demo import DEMO_STEPS, TextSettings

        suite, steps = "weight-space" if text.group(1) else "adapters", int(text.group(2) or DEMO_STEPS)
        settings = TextSettings(suite=suite, steps=steps)
        return {name: settings.lrs.get(name, settings.lr) for name in settings.methods}
    from modalpeft.tracking.demo import TrackingSettings

    steps = re.fullmatch(r"tracking(?:_(\d+)_steps)?_lr_grid\.md", page).group(1)  # tracking_240_steps_lr_grid.md
    settings = TrackingSettings(steps=int(steps)) if steps else TrackingSettings()
    return {name: rates[0] for name, rates in settings.lrs.items() if len(rates) == 1}


@pytest.mark.parametrize(
    "page",
    [
        "audio_lr_grid.md",
        "diffusion_lr_grid.md",
        "diffusion_400_steps_lr_grid.md",
        "text_lr_grid.md",
        "text_180_steps_lr_grid.md",
        "text_weight_space_lr_grid.md",
        "text_weight_space_180_steps_lr_grid.md",
        "tracking_lr_grid.md",
        "tracking_240_steps_lr_grid.md",
    ],
)
def test_the_demo_trains_at_the_picked_rates(page: str) -> None:
    picked, used = picks(page), code_rates(page)
    contenders = {name: rate for name, rate in picked.items() if name in used}  # grid-only rows have no rate in use
    assert contenders, f"{page}: no contender of the demo in its table"
    assert {name: used[name] for name in contenders} == contenders
