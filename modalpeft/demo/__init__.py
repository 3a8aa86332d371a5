"""The embedded end-to-end demo (``make demo``, ``modalpeft demo``): each modality's offline default, in turn.

- ``vision``: the committed Fashion-MNIST ViT adapted on mini-VTAB with linear probing, full fine-tuning, peft's
  LoRA and every native vision method (one seed; ``docs/results/vision.md`` has three), with save / reload / merge
  checks
  (:mod:`modalpeft.demo.vision`); writes ``docs/results/vision.md``.
- ``deepfake``: that ViT as a frozen face encoder with LayerNorm tuning, against linear probing and full
  fine-tuning, on LFW faces with spliced eyes / nose / mouth regions grouped into pseudo-videos, including a
  held-out manipulation (:mod:`modalpeft.vision.deepfake.demo`); writes ``docs/results/deepfake.md``.
- ``pointcloud``: a small Point-MAE pretrained by masked point modelling on offline meshes (committed), adapted
  with PointGST, Point-PEFT, full fine-tuning and linear probing on ScanObjectNN-like clouds (noise, occlusion,
  background points) from those meshes (:mod:`modalpeft.pointcloud.demo`); writes ``docs/results/pointcloud.md``.

Sections run in the order of :data:`SECTIONS`; ``--modality`` picks some. Vision trains in two worker processes;
the deepfake and point-cloud sections each train in one process, so they run side by side (:data:`SIDE_BY_SIDE`),
each printing its log when it ends. Nothing is downloaded: every
backbone is pretrained by a committed recipe and ships with the package, and every dataset is built from real
images and meshes that install with pip. The whole demo stays within 20 minutes on 2 CPU cores; ``--quick``
runs the same pipelines with almost no training in seconds (the tests do).
"""

from __future__ import annotations

import io
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console

from .vision import VisionSettings, run_vision


def _vision(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    known = {f.name for f in fields(VisionSettings)}
    options = {k: v for k, v in overrides.items() if k in known and v is not None}
    options.update(out=str(out / "vision"), results_dir=None if quick else results_dir)
    settings = VisionSettings.quick(**options) if quick else VisionSettings(**options)
    rows, report = run_vision(settings, console)
    failed = [r.method for r in rows if not r.ok]
    if failed:
        console.print(f"[bold red]vision: reload or merge checks failed for: {', '.join(failed)}[/]")
    return not failed


def _deepfake(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.vision.deepfake import demo

    report = None if quick or not results_dir else Path(results_dir) / "deepfake.md"
    demo.run(quick, out / "deepfake", report_path=report, console=console)
    return True


def _pointcloud(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.pointcloud import demo

    report = None if quick or not results_dir else Path(results_dir) / "pointcloud.md"
    options = {k: overrides[k] for k in ("steps",) if overrides.get(k) is not None}
    demo.run(quick, out / "pointcloud", report_path=report, console=console, **options)
    return True


SECTIONS: dict[str, Callable[..., bool]] = {"vision": _vision, "deepfake": _deepfake, "pointcloud": _pointcloud}
"""Each modality's section: ``(quick, out, results_dir, console, **overrides) -> all checks passed``."""

SIDE_BY_SIDE: tuple[str, ...] = ("deepfake", "pointcloud")
"""Single-process sections (one torch thread each) that run in parallel worker processes when more than one of them
is selected: on 2 CPU cores this saves the shorter one's time."""


def _section_in_worker(
    name: str, quick: bool, out: Path, results_dir: str | None, width: int, overrides: dict[str, Any]
) -> tuple[bool, str, float]:
    """Run section ``name`` in a worker process; returns (checks passed, its console log, seconds)."""
    console = Console(file=io.StringIO(), record=True, width=width, force_terminal=False)
    start = time.perf_counter()
    ok = SECTIONS[name](quick, out, results_dir, console, **overrides)
    return ok, console.export_text(), time.perf_counter() - start


def run_demo(
    modalities: Sequence[str] | None = None,
    *,
    quick: bool = False,
    out: str = "outputs/demo",
    results_dir: str | None = "docs/results",
    console: Console | None = None,
    **overrides: Any,
) -> int:
    """Run the sections ``modalities`` (default: all); returns 0 when every check passed, else 1.

    ``overrides`` go to the sections that take them (for vision: ``seeds``, ``steps``, ``batch_size``,
    ``lr_grid``, ``threads``, ``tasks``, ``methods``; for point clouds: ``steps``).
    """
    console = console or Console()
    names = list(SECTIONS) if not modalities else list(modalities)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown demo modality {unknown}; choose from {list(SECTIONS)}.")
    start = time.perf_counter()
    failed = []
    side = [n for n in names if n in SIDE_BY_SIDE]
    if len(side) < 2:
        side = []
    for name in (n for n in names if n not in side):
        section_start = time.perf_counter()
        if not SECTIONS[name](quick, Path(out), results_dir, console, **overrides):
            failed.append(name)
        console.print(f"[dim]{name}: {time.perf_counter() - section_start:.0f} s[/]")
    if side:
        console.print(f"{' and '.join(side)}: running side by side (each prints its log when it ends)")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(side), mp_context=context) as pool:
            jobs = {
                name: pool.submit(_section_in_worker, name, quick, Path(out), results_dir, console.width, overrides)
                for name in side
            }
            for name, job in jobs.items():
                ok, log, seconds = job.result()
                console.print(log, end="", markup=False, highlight=False)
                if not ok:
                    failed.append(name)
                console.print(f"[dim]{name}: {seconds:.0f} s[/]")
    console.print(f"demo: {', '.join(names)} in {time.perf_counter() - start:.0f} s; outputs in {out}/")
    if failed:
        console.print(f"[bold red]checks failed in: {', '.join(failed)}[/]")
        return 1
    return 0


__all__ = ["SECTIONS", "VisionSettings", "run_demo"]
