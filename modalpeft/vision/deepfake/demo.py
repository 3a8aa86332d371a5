"""The offline deepfake demo: LayerNorm tuning vs linear probe vs full fine-tuning on spliced LFW faces.

No CLIP weights exist offline, so the frozen encoder is the project's small ViT pretrained on Fashion-MNIST
(:func:`modalpeft.vision.backbones.fmnist_vit`; LayerNorm tuning applies to any ViT). The data are real faces
(``skimage.data.lfw_subset``) with deterministic partial manipulations (a region spliced from another face,
re-rendered at a low resolution and blended in, as a crude face swap does), grouped into pseudo-videos
(:class:`~modalpeft.vision.deepfake.data.LFWSplicedDataModule`).
Two splits, each with disjoint train/val/test faces:

- *all regions*: eyes, nose and mouth manipulations in training and test;
- *held-out region*: training on eyes and nose, testing on mouth manipulations (a small generalisation check).

Every contender starts from the same pretrained encoder and the same head initialisation, trains on the same
batches for the same number of steps (AdamW, cosine decay to ``min_lr_ratio`` x lr as the official recipe, CE with
the slerp feature augmentation), and has its learning rate picked on validation video AUROC from its grid. The test
metrics are video-level AUROC (frame probabilities averaged per video; the paper's metric), frame AUROC, video AP
and video EER. Every number printed comes from the run.

``modalpeft demo --modality deepfake [--quick] [--out DIR]`` (``make demo MODALITY=deepfake``)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from ...core.model import parameter_counts
from ...core.state import atomic_write
from ...lightning.data import index_batches as batches
from ...lightning.demo import environment_note, run_environment
from ...lightning.optim import param_groups, warmup_cosine
from .data import LFWSplicedDataModule, stack_split
from .detector import DeepfakeModel, feature_loss, prepare_detector
from .metrics import DeepfakeMetrics

CONTENDERS = {"ln_tuning": "LN tuning (peft)", "linear": "linear probe", "full": "full fine-tuning"}
SPLITS: dict[str, tuple[list[str] | None, list[str] | None]] = {
    "all regions": (None, None),
    "held-out region": (["eyes", "nose"], ["mouth"]),
}
"""Split name -> (training regions, test regions); ``None``: every region."""


@dataclass
class DemoSettings:
    """What the demo runs; the defaults take about three minutes on one CPU thread."""

    seed: int = 0
    steps: int = 240
    batch_size: int = 32
    split: tuple[int, int, int] = (60, 10, 30)
    videos_per_face: int = 2
    frames_per_video: int = 8
    render_scale: float = 0.04
    """Resolution at which a spliced region is re-rendered, as a fraction of the working scale (see ``Splice``). The
    faces are 25 px, upscaled 4x for the edit and box-downsampled to 28 px, so the working scale holds no detail
    beyond the native 25 px: a render scale of 0.15 (0.6 of native) survived the downsampling as a barely softer
    region, and every contender stayed at chance. At 0.04 the region loses most of its fine detail at 28 px (the
    generator's low-resolution output), which ``tests/deepfake/test_demo.py`` checks."""
    feather: float = 0.05
    """The blending ramp of the splice, as a fraction of the region's size on each side."""
    colour_match: bool = False
    """Match the spliced region's intensity mean and std to the target's (off: a crude swap's tone mismatch)."""
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"ln_tuning": (1e-2,), "linear": (1e-2, 3e-2, 1e-1), "full": (1e-4,)}
    )
    """Learning-rate grids, picked on validation video AUROC (one value for the costly contenders: a LayerNorm-tuning
    step costs nearly a full step, since gradients flow through the whole encoder)."""
    min_lr_ratio: float = 5e-5 / 8e-5
    """The official recipe's cosine floor (5e-5 of a base 8e-5)."""
    threads: int = 1
    """CPU threads for torch: on a shared 2-core machine a second thread stalls more than it helps."""
    pretrained: bool | None = None
    """Load the committed Fashion-MNIST weights; ``None``: when the file is there (else random initialisation, and
    the report says so)."""

    @classmethod
    def quick(cls, **overrides: Any) -> DemoSettings:
        """Seconds, for tests: the same pipeline on a few faces with almost no training."""
        base = {
            "steps": 3,
            "batch_size": 16,
            "split": (6, 4, 6),
            "videos_per_face": 1,
            "frames_per_video": 2,
            "lrs": {"ln_tuning": (1e-2,), "linear": (3e-2,), "full": (1e-4,)},
        }
        return cls(**{**base, **overrides})


@dataclass
class Result:
    """One contender on one split."""

    split: str
    method: str
    trainable_params: int
    total_params: int
    lr: float
    val_auroc_video: float
    auroc_video: float
    auroc_frame: float
    ap_video: float
    eer_video: float
    train_seconds: float


def make_encoder(pretrained: bool) -> nn.Module:
    from ..backbones import fmnist_vit

    return fmnist_vit(num_classes=0, pretrained=pretrained)


def weights_available() -> bool:
    from ..backbones import FMNIST_VIT_FILE

    return FMNIST_VIT_FILE.is_file()


@torch.no_grad()
def features_of(model: nn.Module, images: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model.forward_features(images[i : i + 256]) for i in range(0, len(images), 256)])


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    images, labels, videos = data
    model.eval()
    metrics = DeepfakeMetrics()
    for i in range(0, len(images), 256):
        probs = model(images[i : i + 256]).softmax(-1)[:, 1]
        metrics.update(probs, labels[i : i + 256], videos[i : i + 256])
    return metrics.compute()


class Demo:
    """The demo's state: settings, the pretrained encoder's weights and the console."""

    def __init__(self, settings: DemoSettings, console: Console) -> None:
        self.s = settings
        self.console = console
        self.pretrained = weights_available() if settings.pretrained is None else settings.pretrained
        self.encoder_state = make_encoder(self.pretrained).state_dict()
        self._features: dict[int, tuple[Tensor, Tensor, float]] = {}

    def fresh_model(self) -> DeepfakeModel:
        """The pretrained encoder and a head initialised from the seed (the same for every contender)."""
        encoder = make_encoder(False)
        encoder.load_state_dict(self.encoder_state)
        torch.manual_seed(self.s.seed + 7)
        return DeepfakeModel(encoder)

    def data(self, train_regions: list[str] | None, test_regions: list[str] | None) -> dict[str, tuple]:
        s = self.s
        module = LFWSplicedDataModule(
            train_regions=train_regions,
            test_regions=test_regions,
            split=s.split,
            videos_per_face=s.videos_per_face,
            frames_per_video=s.frames_per_video,
            render_scale=s.render_scale,
            feather=s.feather,
            colour_match=s.colour_match,
            seed=s.seed,
            backbone=self.fresh_model(),
        )
        module.setup("fit")
        module.setup("test")
        return {name: stack_split(module.datasets[name]) for name in ("train", "val", "test")}

    def frozen_features(self, model: nn.Module, images: Tensor) -> tuple[Tensor, float]:
        """The frozen pretrained encoder's features of ``images`` and the seconds they took, computed once per
        tensor (every learning rate of the linear probe trains on the same features)."""
        key = id(images)
        if self._features.get(key, (None,))[0] is not images:
            start = time.perf_counter()
            self._features = {key: (images, features_of(model, images), time.perf_counter() - start)}
        _, features, seconds = self._features[key]
        return features, seconds

    def train(self, method: str, lr: float, data: dict[str, tuple]) -> tuple[nn.Module, float]:
        """A fresh model trained with ``method`` at ``lr``; returns it and the seconds taken. The linear probe trains
        on the frozen encoder's features, computed once per split (the same result, without repeating the forward
        pass; its seconds include that computation)."""
        s = self.s
        model = prepare_detector(self.fresh_model(), method)
        images, labels, _ = data["train"]
        optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=lr, betas=(0.9, 0.999))
        schedule = warmup_cosine(optimizer, s.steps, 0, s.min_lr_ratio)
        generator = torch.Generator().manual_seed(s.seed + 11)
        start = time.perf_counter()
        cached = None
        if method == "linear":
            cached, seconds = self.frozen_features(model, images)
            start -= seconds
        model.train()
        for index in batches(len(images), s.batch_size, s.steps, s.seed + 3):
            features = cached[index] if cached is not None else model.forward_features(images[index])
            loss, _, _ = feature_loss(model.head, features, labels[index], generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        return model, time.perf_counter() - start

    def run_split(self, name: str) -> list[Result]:
        train_regions, test_regions = SPLITS[name]
        data = self.data(train_regions, test_regions)
        results = []
        for method, label in CONTENDERS.items():
            best: tuple[float, float, nn.Module, float] | None = None
            for lr in self.s.lrs[method]:
                with self.console.status(f"{name}: training {label} at lr {lr:g}"):
                    model, seconds = self.train(method, lr, data)
                val = evaluate(model, data["val"])["auroc_video"]
                if best is None or val > best[0] or (math.isnan(best[0]) and not math.isnan(val)):
                    best = (val, lr, model, seconds)
            assert best is not None
            val, lr, model, seconds = best
            test = evaluate(model, data["test"])
            trainable, total = parameter_counts(model)
            result = Result(
                split=name,
                method=label,
                trainable_params=trainable,
                total_params=total,
                lr=lr,
                val_auroc_video=val,
                auroc_video=test["auroc_video"],
                auroc_frame=test["auroc_frame"],
                ap_video=test["ap_video"],
                eer_video=test["eer_video"],
                train_seconds=seconds,
            )
            self.console.print(
                f"  {name} / {label}: lr {lr:g}, validation video AUROC {val:.3f}, test video AUROC "
                f"{result.auroc_video:.3f} ({trainable:,} trainable, {seconds:.0f} s)"
            )
            results.append(result)
        return results


def results_table(results: list[Result]) -> Table:
    table = Table(title="deepfake detection on spliced LFW faces (test faces unseen in training)")
    for col in ("split", "method", "trainable", "%", "lr", "video AUROC", "frame AUROC", "video AP", "video EER"):
        table.add_column(col, justify="left" if col in ("split", "method") else "right")
    for r in results:
        table.add_row(
            r.split,
            r.method,
            f"{r.trainable_params:,}",
            f"{100 * r.trainable_params / r.total_params:.2f}",
            f"{r.lr:g}",
            f"{r.auroc_video:.3f}",
            f"{r.auroc_frame:.3f}",
            f"{r.ap_video:.3f}",
            f"{r.eer_video:.3f}",
        )
    return table


def markdown_report(
    settings: DemoSettings, results: list[Result], pretrained: bool, seconds: float, environment: dict[str, Any]
) -> str:
    """The results as the markdown page ``docs/results/deepfake.md``."""
    s = settings
    n_train, n_val, n_test = s.split
    encoder = (
        "the project's Fashion-MNIST ViT (`fmnist_vit`, committed weights)"
        if pretrained
        else "the Fashion-MNIST ViT architecture with **random weights** (the committed weights file was missing)"
    )
    lines = [
        "# Deepfake detection: LayerNorm tuning on spliced LFW faces",
        "",
        "Generated by `modalpeft demo --modality deepfake --results-dir docs/results` (`make demo MODALITY=deepfake` "
        f"runs the same and writes to its run folder) ({seconds:.0f} s on this machine, {s.threads} CPU threads); "
        "every number comes from that run.",
        "",
        environment_note(environment),
        "",
        "The method is the LayerNorm tuning of Yermakov et al., *Unlocking the Hidden Potential of CLIP in "
        "Generalizable Deepfake Detection* (arXiv 2503.19683): only the encoder's LayerNorms and an L2-normalised "
        "linear head train, with the slerp feature augmentation. No CLIP weights exist offline, so the frozen "
        f"encoder is {encoder}, a 6-block ViT on 28 x 28 grey images.",
        "",
        f"Data: the 100 real faces of `skimage.data.lfw_subset()`, split by face into {n_train} train, {n_val} "
        f"validation and {n_test} test faces. Per face, {s.videos_per_face} real and {s.videos_per_face} fake "
        f"pseudo-videos of {s.frames_per_video} frames (small random motion, brightness and noise); a fake has its "
        "eyes, nose or mouth region spliced from another face of the same split (re-rendered at "
        f"{s.render_scale:g} of the 4x working scale, {'colour-matched, ' if s.colour_match else ''}blended with a "
        f"mask feathered over {s.feather:g} of the region). The *held-out region* split trains on eyes and nose "
        "manipulations and tests on mouth manipulations only.",
        "",
        f"Training: {s.steps} steps of batch {s.batch_size}, AdamW, cosine decay to {s.min_lr_ratio:.3g} x lr, "
        "cross-entropy with slerp augmentation; each contender's learning rate picked on validation video AUROC "
        "from " + "; ".join(f"{CONTENDERS[m]}: {', '.join(f'{lr:g}' for lr in lrs)}" for m, lrs in s.lrs.items()) + ".",
        "",
        "| split | method | trainable | % of total | lr | video AUROC | frame AUROC | video AP | video EER |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.split} | {r.method} | {r.trainable_params:,} | {100 * r.trainable_params / r.total_params:.2f} | "
            f"{r.lr:g} | {r.auroc_video:.3f} | {r.auroc_frame:.3f} | {r.ap_video:.3f} | {r.eer_video:.3f} |"
        )
    lines += [
        "",
        "Video AUROC averages the frame fake-probabilities per video, as the paper and its code do. The test "
        f"sets are small ({n_test} faces, {2 * n_test * s.videos_per_face} videos): differences of a few hundredths "
        "are within the noise of one seed. Trainable counts: LN tuning trains 13 LayerNorms x 2 x 128 = 3,328 "
        "parameters plus the 258-parameter head; the total includes peft's frozen copies of the LayerNorms.",
        "",
    ]
    return "\n".join(lines)


def run(
    quick: bool = False,
    out_dir: str | Path = "outputs/demo/deepfake",
    report_path: str | Path | None = None,
    console: Console | None = None,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo, print its table, write ``results.json`` and ``deepfake.md`` to ``out_dir`` (and the markdown to
    ``report_path`` when given); returns the results as a dict."""
    console = console or Console()
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        environment = run_environment()
        demo = Demo(settings, console)
        if not demo.pretrained:
            console.print("[yellow]fmnist_vit weights not found: the encoder starts from random weights[/]")
        console.print(
            f"deepfake demo: LN tuning vs linear probe vs full fine-tuning, {settings.steps} steps each, "
            f"{len(SPLITS)} splits"
        )
        results = [r for name in SPLITS for r in demo.run_split(name)]
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    console.print(results_table(results))
    report = {
        "settings": asdict(settings),
        "pretrained_encoder": demo.pretrained,
        "results": [asdict(r) for r in results],
        "seconds": seconds,
        "environment": environment,
    }
    markdown = markdown_report(settings, results, demo.pretrained, seconds, environment)
    out_dir = Path(out_dir)
    atomic_write(
        {"results.json": json.loads(json.dumps(report, default=str)), "deepfake.md": markdown.encode()}, out_dir
    )
    if report_path is not None:
        report_path = Path(report_path)
        atomic_write({report_path.name: markdown.encode()}, report_path.parent)
    console.print(f"wrote {out_dir}/results.json and deepfake.md ({seconds:.0f} s)")
    return report
