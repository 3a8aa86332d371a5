"""What every modality's demo section shares: a plain training loop on in-memory tensors, accuracy, the lifecycle
check helpers, the run folder, and the record of what a run's numbers depend on (:func:`run_environment`).

A demo's figures are deterministic for one environment: the same seeds, the same single torch thread, the same CPU
kernels. Float rounding differs between CPU kernel families (AVX-512 vs AVX2 GEMMs sum in another order), and a
short fine-tuning run amplifies such differences into points of accuracy; so every report says which environment
produced it (:func:`environment_note`), and :data:`NUMERIC_ENVIRONMENT` pins the kernel family where the libraries
allow.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import index_batches as batches
from .optim import build_optimizer, param_groups, warmup_cosine

__all__ = [
    "length_rates",
    "length_stem",
    "benchmark_section",
    "NUMERIC_ENVIRONMENT",
    "accuracy",
    "batches",
    "demo_trainer",
    "dir_size",
    "environment_note",
    "folder_name",
    "leftover_wrappers",
    "lr_grid_note",
    "lr_grid_picks",
    "lr_grid_table",
    "judged_length_note",
    "metric_vs_params_png",
    "mwa_table",
    "quiet_lightning",
    "run_environment",
    "run_folder",
    "train",
]

NUMERIC_ENVIRONMENT: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
"""Environment variables every demo process starts with (``modalpeft demo`` runs each section in a fresh process
that has them): one thread, and on x86 CPUs the AVX2 kernels of ATen, MKL (its conditional numerical
reproducibility mode) and oneDNN, which every x86-64 CPU of the last decade runs, so that an AVX-512 machine and an
AVX2 machine compute the same sums. A variable the user has set already is kept (and recorded)."""

EXTRAS: tuple[str, ...] = ("fpsample", "torch_cluster", "tensorboard")
"""Optional packages that change what some code runs (a faster kernel, another logger); the record says which are
installed."""

PACKAGES: tuple[str, ...] = ("torch", "numpy", "timm", "peft", "scipy", "trimesh", "scikit-learn", "scikit-image")
"""Packages whose versions a report records."""


def run_environment() -> dict[str, Any]:
    """What this process's numbers depend on: package versions, the CPU and the kernels torch uses on it, the torch
    thread count, the numeric environment variables and the optional extras installed."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "packages": {name: torch.__version__ if name == "torch" else version(name) for name in PACKAGES},
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "environment": {k: os.environ.get(k) for k in NUMERIC_ENVIRONMENT},
        "extras": {name: importlib.util.find_spec(name) is not None for name in EXTRAS},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_note(env: dict[str, Any], used_extras: Sequence[str] = ()) -> str:
    """One markdown paragraph: the environment a report's figures come from (:func:`run_environment`), and which of
    the optional extras the section uses (``used_extras``; the others do not touch its numbers)."""
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    pinned = ", ".join(f"{k}={v}" for k, v in env["environment"].items() if v) or "none"
    extras = ", ".join(f"{k} {'installed' if v else 'not installed'}" for k, v in env["extras"].items())
    used = f"used by this section: {', '.join(used_extras)}" if used_extras else "none of them is used by this section"
    return (
        f"Environment: Python {env['python']}, {packages}; {env['machine']} CPU {env['cpu']} with torch's "
        f"{env['cpu_kernels']} kernels, {env['torch_threads']} torch thread(s); numeric environment {pinned}; "
        f"optional extras: {extras} ({used}). The figures are deterministic in this environment; on another CPU "
        "kernel family or thread count, float rounding differs and short fine-tuning runs can move by points."
    )


def lr_grid_table(
    rows: Sequence[dict[str, Any]],
    choice: dict[str, float],
    in_use: dict[str, float],
    cell: Callable[[dict[str, Any]], str],
    in_use_header: str,
) -> list[str]:
    """A learning-rate grid's markdown table: a row per method of ``choice`` (in its order), a column per rate of
    ``rows`` (``{"method", "lr", ...}``; ``cell(row)`` writes a result, bold where picked), then the pick and the
    rate ``in_use`` under ``in_use_header`` (``-`` for a method that is not a contender of the demo)."""
    rates = sorted({r["lr"] for r in rows if r["lr"] is not None})
    lines = [
        "| method | " + " | ".join(f"lr {r:g}" for r in rates) + f" | picked | {in_use_header} |",
        "|---|" + "---:|" * len(rates) + "---:|---:|",
    ]
    for name, picked in choice.items():
        cells = []
        for rate in rates:
            row = next((r for r in rows if r["method"] == name and r["lr"] == rate), None)
            text = "" if row is None else cell(row)
            cells.append(f"**{text}**" if row is not None and picked == rate else text)
        used = in_use.get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {picked:g} | {'-' if used is None else f'{used:g}'} |")
    return lines


def folder_name(contender: str) -> str:
    """A contender's name as a run-folder name: each run of non-word characters one dash (``"lora (peft)"`` ->
    ``lora-peft``), so that the demos' contenders get distinct, portable folders."""
    return re.sub(r"\W+", "-", contender).strip("-")


def length_stem(stem: str, steps: int, demo_steps: int, quick: bool = False) -> str:
    """A results page's name stem for a run of ``steps``: ``stem`` for the demo's length (and ``--quick`` checks),
    ``<stem>_<steps>_steps`` for another length (a schedule study, written beside the demo's page, not over it)."""
    return stem if quick or steps == demo_steps else f"{stem}_{steps}_steps"


def judged_length_note(
    modality: str, stem: str, steps: int, demo_steps: int, judged_steps: int, why: str, options: str = ""
) -> str:
    """The sentence under a demo page's target line that says at which run length the issue's target is judged.

    A demo's default length fits its section in ``make demo``'s time; where that is too short for the methods to
    settle, the target is judged on the same benchmark at ``judged_steps`` (``modalpeft demo --modality <modality>
    <options> --steps <judged_steps>``, whose page is ``<stem>_<judged_steps>_steps.md``; ``options``: the page's
    other flags, e.g. ``"--suite weight-space"``); ``why`` says, from what was measured, why the default length does
    not settle it. ``""`` for a run of ``judged_steps`` itself.
    """
    if steps == judged_steps:
        return ""
    page = length_stem(stem, judged_steps, demo_steps)
    where = "this demo's default length" if steps == demo_steps else f"{steps} steps"
    flags = f" {options}" if options else ""
    return (
        f"The target is judged on the same benchmark at {judged_steps} steps, not at {where}: "
        f"`modalpeft demo --modality {modality}{flags} --steps {judged_steps} --results-dir docs/results` writes "
        f"[`{page}.md`]({page}.md). {why}"
    )


def length_rates(by_steps: Mapping[int, Mapping[str, Any]], steps: int, demo_steps: int) -> dict[str, Any]:
    """The learning rates a run of ``steps`` trains at: the demo length's (``by_steps[demo_steps]``), overlaid with
    the picks of the grid at ``steps`` where one ran."""
    return {**by_steps[demo_steps], **by_steps.get(steps, {})}


def benchmark_section(table: str, heading: str, intro: str) -> list[str]:
    """A results page's closing section: ``heading``, ``intro`` and the committed benchmark table
    ``benchmarks/results/<table>``; ``[]`` outside a source checkout (no such file). ``python -m benchmarks.pages``
    rewrites the section in the committed pages after a new benchmark run."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / table
    return [heading, "", intro, "", bench.read_text().strip()] if bench.is_file() else []


def lr_grid_picks(rows: Sequence[dict[str, Any]], score: str, higher_is_better: bool = True) -> dict[str, float]:
    """Per method of ``rows`` (``{"method", "lr", score, ...}``, in their order), the rate with the best ``score``;
    ties go to the smaller rate."""
    sign = 1.0 if higher_is_better else -1.0
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        held = best.get(row["method"])
        if held is None or (sign * row[score], -row["lr"]) > (sign * held[score], -held["lr"]):
            best[row["method"]] = row
    return {name: row["lr"] for name, row in best.items()}


def lr_grid_note(rows: Sequence[dict[str, Any]], choice: dict[str, float], in_use: dict[str, float], where: str) -> str:
    """The sentence under a learning-rate grid's table: whether the rates ``in_use`` (named ``where``) are the
    ``choice`` made from ``rows`` (``{"method", "lr", ...}``), and which picks sit at the edge of their grid."""
    grids = {n: [r["lr"] for r in rows if r["method"] == n] for n in choice}
    edge = [n for n, lr in choice.items() if len(grids[n]) > 1 and lr in (min(grids[n]), max(grids[n]))]
    same = all(in_use.get(n) == lr for n, lr in choice.items())
    return (
        f"When this grid ran, the demo's rates ({where}) "
        + (
            "were the picked ones."
            if same
            else "**differed from the picked ones**; the demo trains at the picks since (`tests/test_lr_grids.py` "
            "compares the code with this table)."
        )
        + (f" Picked at the edge of its grid (extend the candidates): {', '.join(edge)}." if edge else "")
    )


def mwa_table(
    scores: dict[str, dict[str, float]], loss_variant: str, higher_is_better: bool, digits: int
) -> tuple[list[str], str]:
    """A checkpoint-merging study's markdown table (a row per method, a column per variant of
    :func:`~modalpeft.lightning.mwa.variant_weights` with ``"last"`` first; the best of each row bold) and the sentence
    on ``loss_variant``: how many methods it improves over the last checkpoint and over the uniform average, and its
    largest gain over the uniform average (positive: better; the caller adds the unit)."""
    variants = list(next(iter(scores.values())))
    sign = 1.0 if higher_is_better else -1.0
    lines = ["| method | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for name, by_variant in scores.items():
        best = max(by_variant.values(), key=lambda v: sign * v)
        cells = [f"**{v:.{digits}f}**" if v == best else f"{v:.{digits}f}" for v in by_variant.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    over_last = sum(sign * (s[loss_variant] - s["last"]) > 0 for s in scores.values())
    over_uniform = sum(sign * (s[loss_variant] - s["uniform"]) > 0 for s in scores.values())
    gain = max(sign * (s[loss_variant] - s["uniform"]) for s in scores.values())
    n = len(scores)
    sentence = (
        f"Loss-weighted merging ({loss_variant}) beats the last checkpoint for {over_last} of {n} adapters and the "
        f"uniform average for {over_uniform} of {n}; its largest gain over the uniform average is {gain:+.{digits}f}"
    )
    return lines, sentence


def metric_vs_params_png(
    points: Sequence[tuple[str, int, float]],
    *,
    ylabel: str,
    title: str,
    baselines: Sequence[tuple[str, float]] = (),
    spread: Sequence[float] | None = None,
) -> bytes:
    """Every demo's summary plot as PNG bytes: one labelled point per method at (trainable parameters, metric) with
    a log-scale x axis, optional error bars (``spread``, one per point) and dashed horizontal lines for reference
    models that train nothing (``baselines``: (label, metric))."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (label, params, value) in enumerate(points):
        ax.errorbar(params, value, yerr=None if spread is None else spread[i], fmt="o", capsize=3)
        ax.annotate(label, (params, value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for label, value in baselines:
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)
    if baselines:
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def run_folder(root: str | os.PathLike[str] = "outputs/demo") -> Path:
    """A new ``<root>/<YYYYmmdd-HHMMSS>`` folder name for one run's outputs (git-ignored ``outputs/``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / stamp, 1
    while path.exists():
        path, n = Path(root) / f"{stamp}-{n}", n + 1
    return path


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    order: list[Tensor],
    lr: float,
    weight_decay: float = 0.05,
    optimizer: str = "adamw",
) -> float:
    """Train the parameters that require grad on the batches ``order`` with AdamW (or ``optimizer="sgd"``, momentum
    0.9), 10% linear warm-up and cosine decay, decaying only what the papers decay
    (:func:`modalpeft.lightning.optim.param_groups`, as the recipes do); returns the seconds taken."""
    x, y = data
    opt = build_optimizer(param_groups(model, weight_decay), optimizer, lr)
    sched = warmup_cosine(opt, len(order), max(1, len(order) // 10))
    model.train()
    start = time.perf_counter()
    for idx in order:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def leftover_wrappers(model: nn.Module) -> list[str]:
    """Modules of a merged model that still come from modalpeft or peft (there must be none)."""
    return [n for n, m in model.named_modules() if type(m).__module__.split(".")[0] in ("modalpeft", "peft")]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's banners and the task's "what trains" table, printed for every contender, are noise in a demo: its
    loggers at ERROR and stdout swallowed within the block."""
    roots = ("lightning.pytorch", "pytorch_lightning", "lightning.fabric")
    names = [n for n in logging.root.manager.loggerDict if n.startswith(roots)]  # their rank_zero loggers too
    loggers = [logging.getLogger(n) for n in {*roots, *names}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning|lightning")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def in_workers(
    run: Callable[..., Any],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    around: Callable[[tuple[Any, ...]], contextlib.AbstractContextManager[Any]] | None = None,
) -> Iterator[Any]:
    """``run(*job)`` for every job, yielded as each finishes: here, in order, when ``workers`` is 1 (each call inside
    ``around(job)`` if given, e.g. a status line), else in ``workers`` fresh spawned processes (``run`` and the jobs
    must pickle). The demos' figures do not depend on which (every job seeds itself)."""
    if workers == 1:
        for job in jobs:
            with around(job) if around is not None else contextlib.nullcontext():
                result = run(*job)
            yield result
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in as_completed([pool.submit(run, *job) for job in jobs]):
            yield future.result()


def demo_trainer(steps: int, root: str | os.PathLike[str], callbacks: Sequence[Any] = ()) -> Any:
    """A plain CPU Lightning ``Trainer`` for ``steps`` training steps: no logger, checkpoints, progress bar, summary
    or validation (the demos measure after training)."""
    import pytorch_lightning as pl

    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        default_root_dir=root,
    )
