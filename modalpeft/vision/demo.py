"""The vision section of ``make demo``: the committed Fashion-MNIST ViT adapted on mini-VTAB with every method.

1. *Backbone.* :func:`modalpeft.vision.backbones.fmnist_vit`, a 1.2M-parameter timm ViT pretrained on
   Fashion-MNIST by ``recipes/vision/vit_fmnist_pretrain.yaml`` (committed, sha256-checked).
2. *Tasks.* :mod:`modalpeft.vision.minivtab`: digits (natural), LFW faces vs background (specialised), digit
   counting (structured), VTAB-1k's protocol at a smaller scale.
3. *Contenders*, each from the same backbone with a fresh head, trained on ``train800val200`` with the same
   batches, steps, AdamW, warm-up and cosine decay (only the learning rate is per method: the papers tune it
   per method, and prompts and scale-shift vectors want a larger one than full fine-tuning does): linear
   probe, full fine-tuning, peft's LoRA, BitFit, the bottleneck adapter (AdaptFormer), KronA, VPT-deep, SSF and
   SPT-LoRA (KronA with ``--methods``). With ``lr_grid``, each method's learning rate is picked per task on
   ``val200`` after training on ``train800`` (VTAB's protocol); the defaults in :data:`LRS` were picked that way
   on digits.
4. *Seeds.* Every contender runs with ``seeds`` seeds (head init and batch order; ``make demo`` runs one, the
   committed ``docs/results/vision.md`` three: ``modalpeft demo --modality vision --seeds 3 --results-dir
   docs/results``); the table gives
   the mean test accuracy per task, the mean over tasks, and its spread over seeds.
5. *Lifecycle checks* on the seed-0 model of every task: ``save_adapter`` (``save_baseline`` for the linear
   probe and full fine-tuning); ``load_adapter`` into a fresh
   backbone whose head starts elsewhere; ``merge_and_unload`` for mergeable methods. Reloaded and merged
   models must predict what the trained one predicts (logits within float32 rounding), and a merged model
   must hold no modalpeft or peft module.

The table goes to the console, and ``results.json`` and ``vision.md`` (with an accuracy-vs-parameters plot) to the
run folder ``out``; ``vision.md`` and the plot also to ``results_dir`` when given (the committed pages).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ..core.api import adapt, load_adapter, save_baseline
from ..core.compare import delta, logits_of, same_outputs
from ..core.model import parameter_counts
from ..core.registry import create_config, get_method
from ..core.state import atomic_write
from ..lightning.demo import (
    accuracy,
    batches,
    benchmark_section,
    dir_size,
    environment_note,
    folder_name,
    in_workers,
    leftover_wrappers,
    metric_vs_params_png,
    run_environment,
    train,
)
from .backbones import FMNIST_VIT_FILE, FMNIST_VIT_SHA256, fmnist_vit
from .minivtab import TASKS, MiniVTabTask, load_minivtab

MEAN, STD = 0.5, 0.5
"""The Fashion-MNIST ViT's input normalisation (timm's config for its architecture, used in pretraining)."""


@dataclass(frozen=True)
class Contender:
    """A row of the table: how to set the pretrained model up for training."""

    name: str
    kind: str  # "reference" (linear probe, full fine-tuning), "native" or "peft"
    config: Callable[[], Any] | None = None


def _lora() -> Any:
    import peft

    return peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"])


CONTENDERS: tuple[Contender, ...] = (
    Contender("linear probe", "reference"),
    Contender("full fine-tuning", "reference"),
    Contender("lora (peft)", "peft", _lora),
    Contender("bitfit", "native", lambda: create_config("bitfit")),
    Contender("adapter", "native", lambda: create_config("adapter", style="adaptformer", bottleneck_dim=8)),
    Contender("krona", "native", lambda: create_config("krona", target_modules=["qkv", "proj"], a1=8, a2=8)),
    Contender("vpt", "native", lambda: create_config("vpt", num_tokens=10, deep=True)),
    Contender("ssf", "native", lambda: create_config("ssf")),
    Contender("spt", "native", lambda: create_config("spt", budget=20_000, structured="lora", rank=8)),
)
"""Linear probe and full fine-tuning, then peft's LoRA and the native methods (VPT-deep with 10 prompts per
block, AdaptFormer with an 8-wide bottleneck, SPT-LoRA with a 20k-parameter budget, KronA on the attention
projections as in its paper)."""

LRS: dict[str, float] = {
    "linear probe": 1e-1,
    "full fine-tuning": 1e-3,
    "lora (peft)": 1e-2,
    "bitfit": 1e-1,
    "adapter": 1e-2,
    "krona": 3e-3,
    "vpt": 1e-1,
    "ssf": 3e-2,
    "spt": 1e-2,
}
"""AdamW learning rate per contender: the best on digits' val200 after training on train800 (one seed, 150 steps)
over 1e-3, 3e-3, 1e-2, 3e-2 (``modalpeft demo --modality vision --lr-grid --tasks digits --seeds 1``), and 1e-1
for the contenders whose best was 3e-2 or that had not collapsed there (linear probe, BitFit, AdaptFormer, VPT,
SSF); linear probe, BitFit and VPT picked 1e-1, the top of what was tried. KronA (not in the default set) was not
tuned. The validation accuracies are in ``docs/results/vision_lr_grid.md``."""

TARGETED = ("lora (peft)", "vpt", "ssf", "spt")
"""The contenders the issue sets targets for (the others are baselines)."""

SHORTFALL_NOTES: dict[str, str] = {"vpt": "vision_vpt.md"}
"""Pages in ``docs/results`` that investigate a contender's miss of its target; the report links them."""

LR_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class VisionSettings:
    """What the vision section runs; the defaults take a few minutes on 2 CPU cores."""

    out: str = "outputs/demo/vision"
    results_dir: str | None = None
    """Where ``vision.md`` and its plot go (``None``: only ``out``); ``docs/results`` regenerates the committed page."""
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = tuple(c.name for c in CONTENDERS if c.name != "krona")
    """The issue's eight contenders; KronA (a core method) runs with ``--methods``."""
    seeds: int = 1
    steps: int = 300
    """About 10 epochs of train800val200 at batch 32. At 150 steps (5 epochs) every adapter still gained from
    training longer (on ``count``, seed 0, 150 -> 450 steps: full fine-tuning 95.5 -> 96.8, SSF 90.7 -> 96.2,
    SPT 85.0 -> 94.2, VPT-deep 57.2 -> 76.7); 300 keeps ``make demo`` within its time budget."""
    max_epochs: int = 40
    """A task runs ``min(steps, ceil(max_epochs * train images / batch_size))`` steps: ``faces`` (80 images) 100 steps,
    40 epochs, where 300 steps were 120 epochs of the same 80 images for a third of the section's time (at 300 steps
    every contender scored 93.6-95.8% on faces, the linear probe 95.8%: nothing left to gain; the 100-step figures
    are in ``docs/results/vision.md``); ``digits`` and ``count`` (1,000 images) keep ``steps``."""
    batch_size: int = 32
    lr_grid: bool = False
    threads: int = 1
    """torch CPU threads: the model is so small that a second thread gains little, and threads that wait on each
    other stall badly when other processes share the cores."""
    workers: int = 2
    """Processes that train contenders side by side (each with ``threads`` threads): on a 2-core machine two
    single-thread workers do about twice the work of one."""
    limit: int | None = None
    """Use at most this many images of each split (``None``: all); for quick runs."""

    def steps_for(self, task: MiniVTabTask) -> int:
        """The training steps on ``task``: ``steps``, capped at ``max_epochs`` epochs of its train+val images."""
        return min(self.steps, math.ceil(self.max_epochs * len(task.train_val[1]) / self.batch_size))

    @classmethod
    def quick(cls, **overrides: Any) -> VisionSettings:
        """A few seconds for tests: the same pipeline with almost no training, no report in the repository."""
        return cls(**{"seeds": 1, "steps": 3, "limit": 64, "workers": 1, "results_dir": None, **overrides})


@dataclass
class Run:
    """One contender on one task with one seed."""

    task: str
    seed: int
    lr: float
    accuracy: float
    train_seconds: float


@dataclass
class Row:
    """One contender over every task and seed, and its lifecycle checks."""

    method: str
    kind: str
    trainable_params: int = 0
    total_params: int = 0
    file_size: int = 0
    runs: list[Run] = field(default_factory=list)
    reload_max_abs_diff: float = 0.0
    reload_ok: bool = True
    mergeable: bool | None = None
    merge_max_abs_diff: float | None = None
    merge_ok: bool | None = None
    lr_scores: dict[str, float] = field(default_factory=dict)
    """Validation accuracy per ``"<task> <lr>"`` when the learning rate was picked on val200."""

    def task_mean(self, task: str) -> float:
        return statistics.fmean(r.accuracy for r in self.runs if r.task == task)

    def seed_means(self) -> list[float]:
        """The mean accuracy over tasks, per seed."""
        seeds = sorted({r.seed for r in self.runs})
        return [statistics.fmean(r.accuracy for r in self.runs if r.seed == s) for s in seeds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seed_means())

    @property
    def spread(self) -> float:
        """Standard deviation of the task-mean accuracy over seeds (0 with one seed)."""
        means = self.seed_means()
        return statistics.stdev(means) if len(means) > 1 else 0.0

    @property
    def train_seconds(self) -> float:
        """Mean seconds per training run."""
        return statistics.fmean(r.train_seconds for r in self.runs)

    @property
    def ok(self) -> bool:
        return self.reload_ok and self.merge_ok is not False


def steps_note(settings: VisionSettings, tasks: list[MiniVTabTask]) -> str:
    """``"300"``, or ``"300 (faces: 100, 40 epochs)"`` where the epoch cap shortens a task."""
    capped = [f"{t.name}: {settings.steps_for(t)}" for t in tasks if settings.steps_for(t) < settings.steps]
    return f"{settings.steps}" + (f" ({', '.join(capped)}, {settings.max_epochs} epochs)" if capped else "")


def fresh_model(num_classes: int, head_seed: int) -> nn.Module:
    """The pretrained ViT with a new ``num_classes`` head initialised from ``head_seed``."""
    torch.manual_seed(head_seed)
    return fmnist_vit(num_classes=num_classes).eval()


def prepare(
    contender: Contender, model: nn.Module, train_data: tuple[torch.Tensor, torch.Tensor], batch_size: int
) -> nn.Module:
    """Set ``model`` up for ``contender``: freeze for the references, ``mp.adapt`` for the others (a method that
    scores parameters on training data, SPT, gets the task's training batches)."""
    if contender.config is None:
        head_only = contender.name == "linear probe"
        for name, p in model.named_parameters():
            p.requires_grad_(not head_only or name.startswith("head."))
        return model
    config = contender.config()
    if getattr(config, "data_field", None) and getattr(config, config.data_field) is None:
        x, y = train_data
        setattr(
            config,
            config.data_field,
            [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)],
        )
    return adapt(model, config, modules_to_save=["head"])


_TASKS: dict[tuple[tuple[str, ...], int | None], dict[str, MiniVTabTask]] = {}
"""The tasks per (names, limit), built once per process (workers build their own)."""


def tasks_for(settings: VisionSettings) -> dict[str, MiniVTabTask]:
    key = (tuple(settings.tasks), settings.limit)
    if key not in _TASKS:
        _TASKS[key] = {t.name: t.normalised(MEAN, STD).head(settings.limit) for t in load_minivtab(0, settings.tasks)}
    return _TASKS[key]


class Job:
    """One contender on one task: the learning-rate pick, every seed, and the lifecycle checks of seed 0."""

    def __init__(self, settings: VisionSettings, contender: Contender, task: MiniVTabTask) -> None:
        self.s, self.contender, self.task = settings, contender, task

    def fit(self, data: tuple[torch.Tensor, torch.Tensor], seed: int, lr: float) -> tuple[nn.Module, float]:
        model = prepare(self.contender, fresh_model(self.task.num_classes, 1000 + seed), data, self.s.batch_size)
        order = batches(len(data[1]), self.s.batch_size, self.s.steps_for(self.task), 2000 + seed)
        return model, train(model, data, order, lr)

    def pick_lr(self, row: Row) -> float:
        """VTAB's protocol: train on train800 at each grid value, keep the best on val200."""
        if not self.s.lr_grid:
            return LRS[self.contender.name]
        for lr in LR_GRID:
            model, _ = self.fit(self.task.train, 0, lr)
            row.lr_scores[f"{self.task.name} {lr:g}"] = accuracy(logits_of(model, self.task.val[0]), self.task.val[1])
        scores = {lr: row.lr_scores[f"{self.task.name} {lr:g}"] for lr in LR_GRID}
        return max(scores, key=lambda lr: (scores[lr], -lr))

    def check_lifecycle(self, row: Row, model: nn.Module, logits: torch.Tensor) -> None:
        """Save the model, reload it into a fresh backbone, merge it; record the largest differences from ``logits``,
        the trained model's on the test images."""
        contender, x = self.contender, self.task.test[0]
        path = Path(self.s.out) / "adapters" / self.task.name / folder_name(contender.name)
        fresh = fresh_model(self.task.num_classes, 999)
        if contender.config is None:  # references: what they trained (the head, or every parameter)
            save_baseline(model, path, "linear" if contender.name == "linear probe" else "full")
        else:
            model.save_adapter(path)
        reloaded = load_adapter(fresh, path)
        row.file_size = dir_size(path)
        row.reload_max_abs_diff, row.reload_ok = same_outputs(logits, logits_of(reloaded, x))
        if contender.config is not None:
            method = None if contender.kind == "peft" else model.peft_config[model.active_adapter].method
            row.mergeable = method is None or get_method(method).mergeable
            if row.mergeable:
                merged = reloaded.merge_and_unload()
                row.merge_max_abs_diff, same = same_outputs(logits, logits_of(merged, x))
                row.merge_ok = same and not leftover_wrappers(merged)

    def run(self) -> Row:
        torch.set_num_threads(self.s.threads)
        row = Row(self.contender.name, self.contender.kind)
        lr = self.pick_lr(row)
        data = self.task.train_val
        for seed in range(self.s.seeds):
            model, seconds = self.fit(data, seed, lr)
            logits = logits_of(model, self.task.test[0])
            row.runs.append(Run(self.task.name, seed, lr, accuracy(logits, self.task.test[1]), seconds))
            if seed == 0:
                row.trainable_params, row.total_params = parameter_counts(model)
                self.check_lifecycle(row, model, logits)
        return row


def run_job(settings: VisionSettings, contender_name: str, task_name: str) -> Row:
    """A :class:`Job` by names (what worker processes receive)."""
    contender = next(c for c in CONTENDERS if c.name == contender_name)
    return Job(settings, contender, tasks_for(settings)[task_name]).run()


def combine(parts: list[Row]) -> Row:
    """One contender's rows per task as one row: every run; counts and file size of the first task; the worst
    reload and merge differences."""
    first = parts[0]
    row = Row(
        first.method, first.kind, first.trainable_params, first.total_params, first.file_size, mergeable=first.mergeable
    )
    for part in parts:
        row.runs += part.runs
        row.lr_scores.update(part.lr_scores)
        row.reload_max_abs_diff = max(row.reload_max_abs_diff, part.reload_max_abs_diff)
        row.reload_ok = row.reload_ok and part.reload_ok
        if part.merge_ok is not None:
            row.merge_max_abs_diff = max(row.merge_max_abs_diff or 0.0, part.merge_max_abs_diff or 0.0)
            row.merge_ok = (row.merge_ok is not False) and part.merge_ok
    return row


class VisionDemo:
    def __init__(self, settings: VisionSettings, console: Console) -> None:
        unknown = [m for m in settings.methods if m not in LRS]
        if unknown:
            raise ValueError(f"unknown vision demo method(s) {unknown}; choose from {list(LRS)}.")
        if min(settings.seeds, settings.steps, settings.workers, settings.max_epochs) < 1:
            raise ValueError(
                f"seeds={settings.seeds}, steps={settings.steps}, max_epochs={settings.max_epochs} and "
                f"workers={settings.workers} must be at least 1."
            )
        self.s = settings
        self.console = console
        self.out = Path(settings.out)
        self.tasks = list(tasks_for(settings).values())
        self.contenders = [c for c in CONTENDERS if c.name in settings.methods]

    def run(self) -> list[Row]:
        self.console.print(
            f"[bold]vision[/]: the Fashion-MNIST ViT ({parameter_counts(fmnist_vit())[1]:,} parameters, "
            f"sha256 {FMNIST_VIT_SHA256[:12]}...) on mini-VTAB: "
            + ", ".join(
                f"{t.name} ({t.group}, {t.num_classes} classes, {t.sizes()} train/val/test)" for t in self.tasks
            )
        )
        self.console.print(
            f"  every contender: {steps_note(self.s, self.tasks)} AdamW steps of batch {self.s.batch_size} on "
            "train800val200, "
            f"{self.s.seeds} seed(s)"
            + (", learning rate picked on val200" if self.s.lr_grid else "")
            + f"; {self.s.workers} worker process(es) of {self.s.threads} thread(s)"
        )
        # the longest first (more steps, then the contenders that cost most per step, at the end of CONTENDERS), so
        # that no worker is left alone with a long job at the end; the table's order does not depend on it
        jobs = [
            (c.name, t.name)
            for t in sorted(self.tasks, key=self.s.steps_for, reverse=True)
            for c in reversed(self.contenders)
        ]
        parts: dict[str, list[Row]] = {c.name: [] for c in self.contenders}

        def status(job: tuple[Any, ...]) -> Any:
            return self.console.status(f"training {job[1]} on {job[2]}")

        for part in in_workers(run_job, [(self.s, *job) for job in jobs], self.s.workers, status):
            parts[part.method].append(part)
            self._report(part)
        order = [t.name for t in self.tasks]
        return [combine(sorted(parts[c.name], key=lambda r: order.index(r.runs[0].task))) for c in self.contenders]

    def _report(self, part: Row) -> None:
        task = part.runs[0].task
        accs = ", ".join(f"{100 * r.accuracy:.1f}" for r in part.runs)
        grid = {k.split()[1]: v for k, v in part.lr_scores.items()}
        picked = (" (val200: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in grid.items()) + ")") if grid else ""
        self.console.print(
            f"  {part.method} on {task}: lr {part.runs[0].lr:g}{picked}, test accuracy per seed {accs} "
            f"({statistics.fmean(r.train_seconds for r in part.runs):.1f} s per run)"
        )


def results_table(rows: list[Row], tasks: list[str], seeds: int) -> Table:
    table = Table(
        title=f"mini-VTAB: the Fashion-MNIST ViT adapted with each method (test accuracy, mean of {seeds} seed(s))",
        caption="Δ = max |logit difference| from the trained model after reload / merge",
    )
    columns = ["method", "trainable", "% of full", *tasks, "mean", "± seeds", "train s", "reload", "merge"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "reload", "merge") else "right")
    for r in rows:
        table.add_row(*_cells(r, tasks, full_trainable(rows)))
    return table


def full_trainable(rows: list[Row]) -> int | None:
    """Full fine-tuning's trainable count, the denominator of every "% of full" (table and verdicts alike)."""
    return next((r.trainable_params for r in rows if r.method == "full fine-tuning"), None)


def share_of_full(r: Row, full: int | None) -> float:
    """``r``'s trainable parameters in % of full fine-tuning's (of the model's total without a full row)."""
    return 100 * r.trainable_params / (full or r.total_params)


def _cells(r: Row, tasks: list[str], full: int | None) -> list[str]:
    if r.kind == "reference":
        merge = "-"
    elif not r.mergeable:
        merge = "not mergeable"
    else:
        merge = f"{'ok' if r.merge_ok else 'FAILED'} (Δ {delta(r.merge_max_abs_diff or 0.0)})"
    return [
        r.method,
        f"{r.trainable_params:,}",
        f"{share_of_full(r, full):.2f}",
        *(f"{100 * r.task_mean(t):.1f}" for t in tasks),
        f"{100 * r.mean:.1f}",
        f"{100 * r.spread:.1f}",
        f"{r.train_seconds:.1f}",
        f"{'ok' if r.reload_ok else 'FAILED'} (Δ {delta(r.reload_max_abs_diff)})",
        merge,
    ]


def markdown_table(rows: list[Row], tasks: list[str]) -> str:
    header = ["method", "trainable", "% of full", *tasks, "mean", "± over seeds", "train s / run", "reload", "merge"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 3) + ["---"] * 2) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r, tasks, full_trainable(rows))) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Mean accuracy against trainable parameters (log scale), one point per method, the seeds' spread as bars."""
    png = metric_vs_params_png(
        [(r.method, r.trainable_params, 100 * r.mean) for r in rows],
        ylabel="mini-VTAB mean test accuracy (%)",
        title="Fashion-MNIST ViT on mini-VTAB",
        spread=[100 * r.spread for r in rows],
    )
    atomic_write({path.name: png}, path.parent)


def run_vision(settings: VisionSettings, console: Console) -> tuple[list[Row], dict[str, Any]]:
    """Run the section, print its table, write ``results.json``, ``vision.md`` and its plot to ``settings.out`` (and
    the page and plot to ``results_dir`` too when given)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        environment = run_environment()
        demo = VisionDemo(settings, console)
        rows = demo.run()
    finally:
        torch.set_num_threads(threads)
    tasks = [t.name for t in demo.tasks]
    console.print(results_table(rows, tasks, settings.seeds))
    seconds = time.perf_counter() - start
    report = {
        "settings": asdict(settings),
        "backbone": {"file": FMNIST_VIT_FILE.name, "sha256": FMNIST_VIT_SHA256},
        "tasks": {
            t.name: {"group": t.group, "classes": t.num_classes, "train/val/test": t.sizes()} for t in demo.tasks
        },
        "rows": [{**asdict(r), "mean": r.mean, "spread": r.spread} for r in rows],
        "all_checks_passed": all(r.ok for r in rows),
        "seconds": seconds,
        "environment": environment,
    }
    atomic_write({"results.json": report}, demo.out)
    for directory in (demo.out, settings.results_dir):
        if directory is not None:
            write_markdown(rows, demo.tasks, settings, seconds, environment, Path(directory))
    return rows, report


def write_markdown(
    rows: list[Row],
    tasks: list[MiniVTabTask],
    s: VisionSettings,
    seconds: float,
    environment: dict[str, Any],
    results_dir: Path,
) -> None:
    plot(rows, results_dir / "vision_accuracy_vs_params.png")
    full = next((r for r in rows if r.method == "full fine-tuning"), None)
    linear = next((r for r in rows if r.method == "linear probe"), None)
    verdicts = []
    for r in rows:
        if r.kind == "reference" or full is None or linear is None:
            continue
        share = share_of_full(r, full.trainable_params) / 100
        gap, over_linear = 100 * (r.mean - full.mean), 100 * (r.mean - linear.mean)
        met = gap >= -2 and over_linear > 2 and share < 0.05
        verdicts.append(
            f"- {r.method}: {over_linear:+.1f} points over linear probing, {gap:+.1f} against full "
            f"fine-tuning, with {100 * share:.2f}% of its trainable parameters"
            + (f": {'met' if met else 'NOT met'}" if r.method in TARGETED else " (a baseline; no target)")
        )
        if not met and r.method in SHORTFALL_NOTES:
            verdicts.append(f"  (what was checked before accepting the shortfall: `{SHORTFALL_NOTES[r.method]}`)")
    lines = [
        "# Vision results",
        "",
        f"Generated by `modalpeft demo --modality vision --seeds {s.seeds} --results-dir docs/results` (`make demo` "
        "runs the same with one seed and writes its reports to its run folder); every number below was measured in "
        f"that run ({seconds / 60:.1f} minutes on this machine, {s.workers} worker process(es) of {s.threads} torch "
        "thread(s)).",
        "",
        environment_note(environment),
        "",
        "## Mini-VTAB",
        "",
        "The Fashion-MNIST ViT (`modalpeft.vision.backbones.fmnist_vit`: timm ViT, 28 x 28 grey, patch 4, width 128, "
        "6 blocks; pretrained by `recipes/vision/vit_fmnist_pretrain.yaml`, see "
        "`modalpeft/vision/pretrained/README.md`) adapted on three offline tasks (`modalpeft.vision.minivtab`):",
        "",
        *(f"- `{t.name}` ({t.group}): {t.num_classes} classes, {t.sizes()} train/val/test images" for t in tasks),
        "",
        f"Every contender: a fresh head, {steps_note(s, tasks)} AdamW steps of batch {s.batch_size} on train+val "
        "(VTAB-1k's "
        "`train800val200`), 10% warm-up then cosine decay, weight decay 0.05 on matrices only; test accuracy, mean of "
        f"{s.seeds} seed(s) (head init and batch order). Learning rates per method were picked on val200 "
        + (
            "in this run."
            if s.lr_grid
            else "on digits (`--lr-grid --tasks digits --seeds 1`, see `modalpeft.vision.demo.LRS`) and fixed: "
            + ", ".join(f"{k} {v:g}" for k, v in LRS.items() if k in s.methods)
            + "."
        ),
        "",
        markdown_table(rows, [t.name for t in tasks]),
        "",
        "Reload: the saved adapter loaded with `mp.load_adapter` into a fresh backbone; merge: `merge_and_unload()`; "
        "Δ is the largest logit difference from the trained model over the test images of every task.",
        "",
        "![accuracy vs trainable parameters](vision_accuracy_vs_params.png)",
        "",
        "Against the targets (within 2 points of full fine-tuning or better, clearly above linear probing, under 5% "
        "of its trainable parameters):",
        "",
        *verdicts,
        "",
    ]
    section = cost_section()
    lines += [*section, ""] if section else []
    atomic_write({"vision.md": "\n".join(lines).encode()}, results_dir)


COST_HEADING = "## Cost on ViT-B/16 (`make bench`)"


def cost_section() -> list[str]:
    """The page's last section: the committed ViT-B/16 benchmark
    (:func:`~modalpeft.lightning.demo.benchmark_section`)."""
    return benchmark_section(
        "vit_base_patch16_224_b8_cpu.md",
        COST_HEADING,
        "Training step time and peak memory relative to full fine-tuning, the head-only floor and peft's LoRA in "
        "the same run; `merged infer` is the forward time after `merge_and_unload()` (SSF's merged model is "
        "plain timm and runs at the plain model's speed). From `benchmarks/results/vit_base_patch16_224_b8_cpu.md`:",
    )
