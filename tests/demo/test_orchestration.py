"""``modalpeft demo``: every section reproduces its tables exactly, and a run leaves the checkout as it was."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from modalpeft.cli import main
from modalpeft.demo import SECTIONS, run_demo
from modalpeft.lightning.demo import NUMERIC_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]
MEASURED = {"seconds", "train_seconds", "step_time", "peak_memory", "track_fps", "load", "out"}
"""Fields that measure the machine (time, speed, memory, load) or name the run folder: they differ between runs."""


def figures(value: Any) -> Any:
    """A section's ``results.json`` without the :data:`MEASURED` fields."""
    if isinstance(value, dict):
        return {k: figures(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


@pytest.mark.slow
def test_each_section_gives_identical_tables_twice(tmp_path) -> None:
    """A short run of every section, twice, in fresh processes: the same figures to the last digit, and each report
    records the environment they depend on."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        methods = ("linear probe", "full fine-tuning", "lora (peft)", "ssf", "spt")
        assert run_demo(quick=True, out=out, tasks=("faces",), methods=methods) == 0
        runs.append({s: json.loads((out / s / "results.json").read_text()) for s in SECTIONS})
    for section in runs[0]:
        first, second = (figures(run[section]) for run in runs)
        assert first == second, section
        environment = runs[0][section]["environment"]
        assert environment["torch_threads"] == 1
        assert set(environment["environment"]) == set(NUMERIC_ENVIRONMENT)
        assert all(environment["environment"].values())  # set in the section's process (a user's value is kept)
        if environment["machine"] in ("x86_64", "AMD64"):  # the pinned kernel family is the one in use
            assert environment["cpu_kernels"] == "AVX2", environment
        assert "fpsample" in environment["extras"]
    page = (tmp_path / "a" / "pointcloud" / "pointcloud.md").read_text()
    assert "Environment: Python" in page and "optional extras: fpsample" in page


def test_a_quick_demo_leaves_the_checkout_clean(monkeypatch, capsys) -> None:
    """User runs write to a run folder under the git-ignored outputs/; the committed pages change only with
    --results-dir."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def status() -> str:
        return subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
        ).stdout

    before = status()
    monkeypatch.chdir(ROOT)
    assert main(["demo", "--quick", "--modality", "pointcloud"]) == 0
    printed = capsys.readouterr().out
    folder = ROOT / re.search(r"run folder (outputs/demo/[0-9-]+)/", printed).group(1)
    try:
        assert (folder / "pointcloud" / "pointcloud.md").is_file()
        assert status() == before
    finally:
        shutil.rmtree(folder)


def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path) -> None:
    """A section that raises is named with its error, the side-by-side sections still write their results, and the
    run returns 1."""
    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200)
    code = run_demo(["vision", "deepfake", "pointcloud"], quick=True, out=tmp_path, console=console, seeds=0)
    printed = console.file.getvalue()
    assert code == 1
    assert "vision: failed with ValueError" in printed and "seeds=0" in printed
    assert "checks failed in: vision" in printed
    for section in ("deepfake", "pointcloud"):
        assert json.loads((tmp_path / section / "results.json").read_text())["environment"]["torch_threads"] == 1
        assert f"{section}: " in printed
