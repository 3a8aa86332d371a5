"""The embedded diffusion demo: DreamBooth personalisation of the small Fashion-MNIST text-to-image model with
DiffuseKronA (both layouts), peft LoRA, peft LoKr and full fine-tuning of the attention.

Runs offline on a CPU (``modalpeft demo --modality diffusion``; ``--quick`` for a few seconds' check):

1. *Model* (:func:`modalpeft.diffusion.tiny.fmnist_diffusion`): the committed pixel-space UNet (1.69M parameters)
   and CLIP-style text encoder pretrained on the Fashion-MNIST training images with captions ``"a photo of a
   {class}"`` (``recipes/diffusion/pretrain_fmnist_unet.py``).
2. *Subject* (``pretrained/subject.png``): a bag from the Fashion-MNIST *test* set (never seen in pretraining), the
   one least like the training bags under the Fashion-MNIST ViT; Fashion-MNIST has one photo per item, so the
   instance images are that photo, its mirror image and 1-pixel shifts of both. Instance prompt ``"a photo of a sks
   bag"``; prior preservation on class images the frozen model generates for ``"a photo of a bag"``.
3. *Personalisation*: every method starts from the same weights and trains the UNet's attention projections
   (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and ``attn2``: DiffuseKronA's placement) on the same
   batches for the same number of steps (AdamW, constant learning rate, ε-prediction with Min-SNR-5 and prior
   loss weight 1); the text encoder stays frozen.
4. *Evaluation*: the same seeds render, per method, the identifier prompt, the class prompt and every other class's
   prompt (DDIM, classifier-free guidance). Two frozen judges trained offline: the self-supervised Fashion-MNIST
   encoder (:func:`modalpeft.diffusion.tiny.fmnist_subject_encoder`, SimCLR's instance discrimination: DreamBooth
   uses a self-supervised DINO ViT because it tells one item of a class from another) measures **subject
   fidelity** (the mean cosine similarity of its features over all (identifier generation, instance image) pairs:
   DreamBooth's DINO metric with this encoder); the committed Fashion-MNIST ViT classifier
   (:func:`modalpeft.vision.backbones.fmnist_vit`) measures **prompt fidelity** (its accuracy on the other classes'
   generations) and **language drift** (that accuracy's change from the base model).

Every adapter is saved, reloaded into a fresh model (Δ: the largest |UNet output difference|) and merged where the
method allows. Reported per method: trainable parameters, adapter file size, median step time, the metrics. The
table, an image grid and a fidelity-vs-parameters plot go to ``<out>/`` and, with ``results_dir``, to
``docs/results/diffusion.md``.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.compare import delta, same_outputs
from ..core.model import AdaptedModel, parameter_counts
from ..core.state import atomic_write
from ..lightning.demo import (
    dir_size,
    environment_note,
    folder_name,
    leftover_wrappers,
    length_rates,
    length_stem,
    lr_grid_note,
    lr_grid_table,
    metric_vs_params_png,
    run_environment,
)
from .methods.diffusekrona import UNET_ATTENTION_TARGETS
from .metrics import mean_pairwise_similarity
from .pipeline import png_bytes
from .tiny import (
    CLASS_NAMES,
    FMNIST_GUIDANCE,
    IDENTIFIER,
    TinyTextToImage,
    caption,
    fmnist_diffusion,
    fmnist_subject_encoder,
    to_classifier,
    to_model,
)

SUBJECT_FILE = Path(__file__).resolve().parent / "pretrained" / "subject.png"
SUBJECT_INDEX = 5342
"""The demo's subject: Fashion-MNIST test image 5342, a bag (28x28 grey; chosen by the pretraining recipe's
``pick_subject``)."""

PEFT_TARGETS = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
"""DiffuseKronA's placement as a peft ``target_modules`` pattern."""


@dataclass
class DiffusionSettings:
    """What the demo runs; the defaults take a few minutes on 2 CPU cores."""

    out: str = "outputs/demo/diffusion"
    seed: int = 0
    subject_class: str = "bag"
    steps: int = 100
    instance_batch: int = 4
    class_batch: int = 4
    num_class_images: int = 8
    snr_gamma: float = 5.0
    prior_loss_weight: float = 1.0
    a1: int = 8
    a2: int = 8
    """DiffuseKronA's factors. The official a1=64, a2=8 were chosen for SD's 320-1280 wide layers; on this UNet's
    64-wide projections a1=64 leaves B a 1x8 row (ΔW of rank <= 8 from 520 numbers), while a1=a2=8 gives 8x8
    factors whose Kronecker product can have full rank 64 from 128 numbers, 4x fewer than LoRA r=4."""
    lora_rank: int = 4
    lokr_rank: int = 4
    lrs: dict[str, float] | None = None
    """Constant learning rates; ``None``: :data:`LRS_BY_STEPS` for this run's ``steps`` (the demo's where that length
    has no grid of its own), each the pick of the validation-subject grid (``lr_grid``,
    ``docs/results/diffusion_lr_grid.md``): the highest subject fidelity (under the self-supervised encoder) within 5
    points of language drift (else the least drifting). Since the base model samples well (81% prompt fidelity on
    the grid's prompts), every method drifts 4-6 points even at its lowest candidate rate, where its weights barely
    move: a few of the 90 generations flip, mostly from right to wrong, so the picks are the lowest candidates. The
    metric is noisy at this size (one of the grid's 90 prompt-fidelity generations is 1.1 points)."""
    lr_grid: bool = False
    """Instead of the demo: train every method at each of ``lr_candidates`` on a *validation subject* (another bag
    of the Fashion-MNIST test set, :func:`validation_subject`; the demo's subject is not used) and pick, per method,
    the rate with the highest subject fidelity whose language drift stays within ``max_drift`` (else the one with
    the least drift); writes ``diffusion_lr_grid.md`` (``diffusion_<N>_steps_lr_grid.md`` for a run of another
    length, whose picks then go in :data:`LRS_BY_STEPS`). Needs the Fashion-MNIST files (``fmnist_root``)."""
    lr_candidates: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "DiffuseKronA (official)": (3e-4, 1e-3, 3e-3, 1e-2),
            "DiffuseKronA (kron)": (3e-4, 1e-3, 3e-3, 1e-2),
            "LoRA r=4 (peft)": (3e-5, 1e-4, 3e-4),
            "LoKr (peft)": (1e-4, 3e-4, 1e-3),
            "full attention": (1e-5, 3e-5, 1e-4, 3e-4),
        }
    )
    max_drift: float = 0.05
    fmnist_root: str = "/usr/share/datasets/fashion-mnist"
    sample_steps: int = 10
    guidance: float = FMNIST_GUIDANCE
    """Classifier-free guidance of every generation (the base model's best scale, :data:`FMNIST_GUIDANCE`)."""
    identifier_samples: int = 8
    class_samples: int = 4
    other_samples_per_class: int = 6
    threads: int = 1
    pretrained: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DiffusionSettings:
        """A run of a few seconds for tests: the same pipeline with 2 steps and a handful of samples."""
        quick = {"steps": 2, "num_class_images": 2, "sample_steps": 2, "identifier_samples": 2, "class_samples": 1,
                 "other_samples_per_class": 1, "instance_batch": 2, "class_batch": 2}  # fmt: skip
        return cls(**{**quick, **overrides})

    def __post_init__(self) -> None:
        if self.lrs is None:
            self.lrs = length_rates(LRS_BY_STEPS, self.steps, DEMO_STEPS)


DEMO_STEPS = DiffusionSettings.steps
LRS_BY_STEPS: dict[int, dict[str, float]] = {
    DEMO_STEPS: {
        "DiffuseKronA (official)": 3e-4,
        "DiffuseKronA (kron)": 3e-4,
        "LoRA r=4 (peft)": 3e-5,
        "LoKr (peft)": 1e-4,
        "full attention": 1e-5,
    },
    400: {
        "DiffuseKronA (official)": 3e-4,
        "DiffuseKronA (kron)": 3e-4,
        "LoRA r=4 (peft)": 3e-5,
        "LoKr (peft)": 1e-4,
        "full attention": 1e-5,
    },
}
"""The rates of a run of each length that has its own validation grid (``--lr-grid --steps N`` writes
``diffusion_<N>_steps_lr_grid.md``); a run of another length takes the demo's."""


def _steps_option(stem: str, steps: int) -> str:
    """The ``--steps`` part of the command that writes the page named ``stem`` (none for the demo's length)."""
    return "" if stem == "diffusion" else f" --steps {steps}"


def page_stem(settings: DiffusionSettings, quick: bool = False) -> str:
    """The page's and pictures' name stem: ``diffusion``, or ``diffusion_<N>_steps`` for a run of another length than
    the demo's (a schedule study, written beside the demo's page instead of over it); ``--quick`` checks keep
    ``diffusion``."""
    return length_stem("diffusion", settings.steps, DEMO_STEPS, quick)


@dataclass
class Result:
    method: str
    lr: float | None
    trainable_params: int
    file_bytes: int | None
    step_time: float | None
    train_seconds: float
    subject_fidelity: float
    identifier_class_accuracy: float
    class_prompt_subject_similarity: float
    prompt_fidelity: float
    language_drift: float
    reload_max_abs_diff: float | None = None
    reload_ok: bool | None = None
    merge_max_abs_diff: float | None = None
    merge_ok: bool | None = None


class Demo:
    """The base model, the frozen judge, the subject and its prompts, and the methods."""

    def __init__(self, settings: DiffusionSettings, subject: Tensor | None = None) -> None:
        """``subject``: a ``(1, 28, 28)`` uint8 image (default: the demo's, ``pretrained/subject.png``)."""
        from PIL import Image

        from ..vision.backbones import fmnist_vit

        self.s = settings
        torch.manual_seed(settings.seed)
        self.base = fmnist_diffusion(pretrained=settings.pretrained)
        self.judge = fmnist_vit().eval().requires_grad_(False)
        self.encoder = fmnist_subject_encoder(pretrained=settings.pretrained)
        if subject is None:
            with Image.open(SUBJECT_FILE) as image:
                subject = torch.as_tensor(list(image.convert("L").getdata()), dtype=torch.uint8).view(1, 28, 28)
        self.instances = instance_views(to_model(subject))
        self.label = CLASS_NAMES.index(settings.subject_class)
        self.instance_prompt = caption(settings.subject_class, IDENTIFIER)
        self.class_prompt = caption(settings.subject_class)
        with torch.no_grad():
            self.instance_embeds = self.base.encode([self.instance_prompt])
            self.class_embeds = self.base.encode([self.class_prompt])
            prompts = [self.class_prompt] * settings.num_class_images
            self.class_images = self.base.sample(prompts, settings.seed + 1, settings.sample_steps, settings.guidance)
        self.class_images = self.class_images * 2 - 1  # the model's range
        self.others = [i for i in range(len(CLASS_NAMES)) if i != self.label]
        self.reference = self.embed((self.instances + 1) / 2)
        self.probe = (  # fixed UNet inputs for the reload and merge checks
            torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(7)),
            torch.tensor([50, 300, 600, 900]),
            torch.cat([self.instance_embeds, self.class_embeds, self.instance_embeds, self.class_embeds]),
        )

    # -- the frozen judges ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised features of the self-supervised encoder for images ``(N, 1, 32, 32)`` in [0, 1]."""
        return nn.functional.normalize(self.encoder(images), dim=-1)

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        return self.judge(to_classifier(images)).argmax(-1)

    # -- generation and metrics ---------------------------------------------------------------------------------
    def prompts(self) -> list[str]:
        s = self.s
        out = [self.instance_prompt] * s.identifier_samples + [self.class_prompt] * s.class_samples
        return out + [caption(CLASS_NAMES[i]) for i in self.others for _ in range(s.other_samples_per_class)]

    def generate(self, model: TinyTextToImage) -> Tensor:
        """The same prompts from the same noise for every method."""
        model.eval()
        return model.sample(self.prompts(), self.s.seed + 2, self.s.sample_steps, self.s.guidance)

    def metrics(self, images: Tensor) -> dict[str, float]:
        s = self.s
        n_id, n_cls = s.identifier_samples, s.class_samples
        identifier, cls, others = images[:n_id], images[n_id : n_id + n_cls], images[n_id + n_cls :]
        target = torch.tensor(self.others).repeat_interleave(s.other_samples_per_class)
        return {
            "subject_fidelity": mean_pairwise_similarity(self.embed(identifier), self.reference),
            "identifier_class_accuracy": (self.classify(identifier) == self.label).float().mean().item(),
            "class_prompt_subject_similarity": mean_pairwise_similarity(self.embed(cls), self.reference),
            "prompt_fidelity": (self.classify(others) == target).float().mean().item(),
        }

    # -- the methods ----------------------------------------------------------------------------------------------
    def methods(self) -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
        from peft import LoKrConfig, LoraConfig

        from ..core.api import adapt
        from .methods import DiffuseKronAConfig

        s = self.s

        def krona(layout: str) -> Callable[[nn.Module], nn.Module]:
            return lambda unet: adapt(unet, DiffuseKronAConfig(a1=s.a1, a2=s.a2, layout=layout))

        # diffusers' DreamBooth-LoRA settings: alpha = r, Gaussian init of A
        lora = LoraConfig(
            r=s.lora_rank, lora_alpha=s.lora_rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS
        )
        lokr = LoKrConfig(r=s.lokr_rank, alpha=s.lokr_rank, target_modules=PEFT_TARGETS)
        return [
            ("DiffuseKronA (official)", krona("official")),
            ("DiffuseKronA (kron)", krona("kron")),
            (f"LoRA r={s.lora_rank} (peft)", lambda unet: adapt(unet, copy.deepcopy(lora))),
            ("LoKr (peft)", lambda unet: adapt(unet, copy.deepcopy(lokr))),
            ("full attention", attention_only),
        ]

    def fresh(self) -> TinyTextToImage:
        return copy.deepcopy(self.base)

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        """``steps`` batches of (instance indices, class-image indices), the same for every method."""
        g = torch.Generator().manual_seed(self.s.seed + 3)
        return [
            (torch.randint(0, len(self.instances), (self.s.instance_batch,), generator=g),
             torch.randint(0, len(self.class_images), (self.s.class_batch,), generator=g))
            for _ in range(self.s.steps)
        ]  # fmt: skip

    def train(self, model: TinyTextToImage, lr: float) -> tuple[float, list[float]]:
        """DreamBooth with prior preservation: AdamW at a constant ``lr`` (as the official scripts)."""
        s = self.s
        trainable = [p for p in model.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-2)
        generator = torch.Generator().manual_seed(s.seed + 4)
        n = s.instance_batch
        embeds = torch.cat([self.instance_embeds.expand(n, -1, -1), self.class_embeds.expand(s.class_batch, -1, -1)])
        model.unet.train()
        times = []
        start = time.perf_counter()
        for instance, prior in self.batches():
            t0 = time.perf_counter()
            images = torch.cat([self.instances[instance], self.class_images[prior]])
            per_image = model.loss(images, [], generator, s.snr_gamma, embeds=embeds)
            loss = per_image[:n].mean() + s.prior_loss_weight * per_image[n:].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        model.unet.eval()
        return time.perf_counter() - start, times

    @torch.no_grad()
    def unet_output(self, unet: nn.Module) -> Tensor:
        x, t, embeds = self.probe
        return unet(x, t, encoder_hidden_states=embeds).sample.flatten(1)

    def lifecycle(self, name: str, unet: nn.Module) -> dict[str, Any]:
        """Save, reload into a fresh UNet (Δ), merge a reloaded copy where the method allows (Δ, no wrappers left)."""
        from ..core.api import load_adapter, save_baseline

        path = Path(self.s.out) / "adapters" / folder_name(name)
        reference = self.unet_output(unet)
        if isinstance(unet, AdaptedModel):
            unet.save_adapter(path)
        else:
            save_baseline(unet, path, "full")
        reloaded = load_adapter(self.fresh().unet, path)
        out: dict[str, Any] = {"file_bytes": dir_size(path)}
        out["reload_max_abs_diff"], out["reload_ok"] = same_outputs(reference, self.unet_output(reloaded))
        if isinstance(reloaded, AdaptedModel):
            merged = reloaded.merge_and_unload()
            diff, ok = same_outputs(reference, self.unet_output(merged))
            out["merge_max_abs_diff"], out["merge_ok"] = diff, ok and not leftover_wrappers(merged)
        return out

    def run(self, log: Callable[[str], None]) -> tuple[list[Result], dict[str, Tensor]]:
        base_images = self.generate(self.base)
        base = self.metrics(base_images)
        results = [Result("base model", None, 0, None, None, 0.0, language_drift=0.0, **base)]
        images = {"base model": base_images}
        log(
            f"  base model: subject fidelity {base['subject_fidelity']:.3f}, prompt fidelity "
            f"{base['prompt_fidelity']:.1%}"
        )
        for name, prepare in self.methods():
            model = self.fresh()
            torch.manual_seed(self.s.seed)  # the adapter's random init: the same draw whatever ran before
            model.unet = prepare(model.unet)
            lr = self.s.lrs[name]
            trainable, _ = parameter_counts(model.unet)
            seconds, times = self.train(model, lr)
            generated = self.generate(model)
            scores = self.metrics(generated)
            checks = self.lifecycle(name, model.unet)
            drift = scores["prompt_fidelity"] - base["prompt_fidelity"]
            step = statistics.median(times[1:] or times)
            results.append(Result(name, lr, trainable, train_seconds=seconds, step_time=step, language_drift=drift,
                                  **scores, **checks))  # fmt: skip
            images[name] = generated
            log(
                f"  {name}: {trainable:,} trainable, lr {lr:g}, {seconds:.0f} s: subject fidelity "
                f"{scores['subject_fidelity']:.3f}, prompt fidelity {scores['prompt_fidelity']:.1%} "
                f"(drift {100 * drift:+.1f}), reload {'ok' if checks['reload_ok'] else 'FAILED'}"
            )
        return results, images


def validation_subject(settings: DiffusionSettings) -> tuple[int, Tensor]:
    """The learning-rate grid's subject: a seeded random bag of the Fashion-MNIST test set other than the demo's
    (its test index and ``(1, 28, 28)`` uint8 image)."""
    from ..vision.idx import read_fashion_mnist

    images, labels = read_fashion_mnist(settings.fmnist_root, "t10k")
    bags = [
        i for i in (labels == CLASS_NAMES.index(settings.subject_class)).nonzero()[0].tolist() if i != SUBJECT_INDEX
    ]
    index = bags[int(torch.randint(len(bags), (1,), generator=torch.Generator().manual_seed(settings.seed)))]
    return index, torch.as_tensor(images[index]).view(1, 28, 28)


def lr_grid(demo: Demo, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every method at each of its candidate rates on ``demo``'s subject: the metrics and the language drift."""
    base = demo.metrics(demo.generate(demo.base))
    rows = [{"method": "base model", "lr": None, **base, "language_drift": 0.0}]
    for name, prepare in demo.methods():
        for lr in demo.s.lr_candidates.get(name, ()):
            model = demo.fresh()
            torch.manual_seed(demo.s.seed)  # as the demo: the init does not depend on the runs before
            model.unet = prepare(model.unet)
            seconds, _ = demo.train(model, lr)
            scores = demo.metrics(demo.generate(model))
            drift = scores["prompt_fidelity"] - base["prompt_fidelity"]
            rows.append({"method": name, "lr": lr, **scores, "language_drift": drift, "seconds": seconds})
            log(
                f"  {name} at lr {lr:g}: subject fidelity {scores['subject_fidelity']:.3f}, prompt fidelity "
                f"{scores['prompt_fidelity']:.1%} (drift {100 * drift:+.1f}) ({seconds:.0f} s)"
            )
    return rows


def picked(rows: list[dict[str, Any]], max_drift: float) -> dict[str, float]:
    """Per method, the rate with the highest subject fidelity among those whose language drift is at least
    ``-max_drift``; when none is, the rate with the least drift."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows if r["lr"] is not None):
        mine = [r for r in rows if r["method"] == name]
        within = [r for r in mine if r["language_drift"] >= -max_drift - 1e-9]
        best = (
            max(within, key=lambda r: r["subject_fidelity"]) if within else max(mine, key=lambda r: r["language_drift"])
        )
        out[name] = best["lr"]
    return out


def grid_markdown(rows: list[dict[str, Any]], settings: DiffusionSettings, meta: dict[str, Any]) -> str:
    choice = picked(rows, settings.max_drift)
    base = rows[0]
    s = settings
    length = _steps_option(meta.get("stem", "diffusion"), s.steps)
    lines = [
        "# Diffusion: the learning rates of the demo, picked on a validation subject",
        "",
        f"Generated by `modalpeft demo --modality diffusion --lr-grid{length} --results-dir docs/results`. "
        "DreamBooth as the",
        f"demo runs it ({s.steps} steps, the same batches and prompts for every run), on a *validation subject*: "
        f"Fashion-MNIST test image {meta['subject_index']}, another bag (a seeded random pick; the demo's subject, "
        f"test image {SUBJECT_INDEX}, is not used here). Per run: {s.identifier_samples} generations of the "
        f"identifier prompt and {s.other_samples_per_class} of each other class's prompt (more than the demo's, for "
        f"less sampling noise). Cells: subject fidelity / prompt fidelity (language drift from the base model's "
        f"{100 * base['prompt_fidelity']:.1f}%, in points); base model subject fidelity "
        f"{base['subject_fidelity']:.3f}.",
        "",
        f"Rule: per method, the rate with the highest subject fidelity among those whose drift is at least "
        f"-{100 * s.max_drift:g} points (else the least drift). **Bold**: picked.",
        "",
    ]

    def cell(r: dict[str, Any]) -> str:
        return f"{r['subject_fidelity']:.3f} / {100 * r['prompt_fidelity']:.1f}% ({100 * r['language_drift']:+.1f})"

    defaults = DiffusionSettings(steps=s.steps).lrs  # the rates a run of this length trains at
    lines += lr_grid_table(rows, choice, defaults, cell, "in `DiffusionSettings.lrs`")
    lines += [
        "",
        lr_grid_note(rows, choice, defaults, "`DiffusionSettings.lrs`"),
        "",
        f"Device: CPU, {s.threads} thread(s), load average {meta['load']} at the start; total {meta['seconds']:.0f} s.",
        environment_note(meta["environment"]),
        "",
    ]
    return "\n".join(lines)


def instance_views(subject: Tensor) -> Tensor:
    """The instance images ``(6, 1, 32, 32)``: the photo and its mirror image, each as is and shifted by one pixel
    (left or right; the padding's background fills in)."""
    views = []
    for image in (subject, subject.flip(-1)):
        views += [image, shift(image, 1), shift(image, -1)]
    return torch.cat(views)


def shift(image: Tensor, dx: int) -> Tensor:
    """``image`` moved ``dx`` pixels right (left when negative), filled with the background (-1)."""
    out = torch.full_like(image, -1.0)
    if dx > 0:
        out[..., dx:] = image[..., :-dx]
    else:
        out[..., :dx] = image[..., -dx:]
    return out


def attention_only(unet: nn.Module) -> nn.Module:
    """Full fine-tuning of DiffuseKronA's targets: only the attention projections train."""
    unet.requires_grad_(False)
    suffixes = tuple(f".{t}" for t in UNET_ATTENTION_TARGETS)
    for name, module in unet.named_modules():
        if name.endswith(suffixes):
            module.requires_grad_(True)
    return unet


# -- the report -------------------------------------------------------------------------------------------------

GRID_CLASSES = ("t-shirt", "trouser", "dress", "sneaker", "ankle boot")
"""Other classes shown in the picture grid (one sample each)."""


def grid(demo: Demo, images: dict[str, Tensor], scale: int = 3) -> bytes:
    """A PNG: one row per method (the base model first), columns: two identifier-prompt samples, the class prompt,
    and one sample of each of :data:`GRID_CLASSES`; above them, the instance images."""
    from PIL import Image, ImageDraw

    s, cell, label_w, head_h = demo.s, 32 * scale + 4, 170, 16
    picks = [0, min(1, s.identifier_samples - 1), s.identifier_samples]
    first_other = s.identifier_samples + s.class_samples
    picks += [first_other + demo.others.index(CLASS_NAMES.index(c)) * s.other_samples_per_class for c in GRID_CLASSES
              if CLASS_NAMES.index(c) in demo.others]  # fmt: skip
    others = [c for c in GRID_CLASSES if CLASS_NAMES.index(c) != demo.label]
    titles = [f"{IDENTIFIER} {s.subject_class} #1", f"{IDENTIFIER} {s.subject_class} #2", s.subject_class, *others]
    rows = list(images)
    top = cell + head_h  # the instance images, then the column titles
    canvas = Image.new(
        "L", (label_w + cell * max(len(picks), len(demo.instances)), top + head_h + cell * len(rows)), 255
    )
    draw = ImageDraw.Draw(canvas)

    def paste(image: Tensor, y: int, j: int) -> None:
        pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        tile = Image.fromarray(pixels).resize((32 * scale, 32 * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + j * cell + 2, y + 2))

    draw.text((4, cell // 2 - 6), "instance images", fill=0)
    for j, image in enumerate((demo.instances + 1) / 2):
        paste(image, 0, j)
    for j, title in enumerate(titles):
        draw.text((label_w + j * cell + 2, top + 2), title, fill=0)
    for i, row in enumerate(rows):
        y = top + head_h + i * cell
        draw.text((4, y + cell // 2 - 6), row, fill=0)
        for j, k in enumerate(picks):
            paste(images[row][k], y, j)
    buffer = png_bytes(canvas)
    return buffer


def plot(results: list[Result]) -> bytes:
    """Subject fidelity against trainable parameters (log scale), one point per method; the base model as a line."""
    return metric_vs_params_png(
        [(r.method, r.trainable_params, r.subject_fidelity) for r in results[1:]],
        ylabel="subject fidelity (self-supervised encoder, cosine)",
        title="DreamBooth on the Fashion-MNIST diffusion model",
        baselines=[("base model", results[0].subject_fidelity)],
    )


LEARNED = 0.01
"""The least gain in subject fidelity over the base model that counts as having learned the subject (the base
model's generations score about 0.84-0.89, the instance images among themselves 0.997)."""


def targets(results: list[Result]) -> dict[str, Any]:
    """The issue's target on this run: DiffuseKronA's subject fidelity at least LoRA's, its prompt fidelity within
    2 points of LoRA's, and (so that a tie of two untrained models does not count) DiffuseKronA's subject fidelity at
    least :data:`LEARNED` over the base model's."""
    base = next(r for r in results if r.method == "base model")
    lora = next(r for r in results if r.method.startswith("LoRA"))
    out = {}
    for r in results:
        if r.method.startswith("DiffuseKronA"):
            fidelity, prompt = r.subject_fidelity - lora.subject_fidelity, r.prompt_fidelity - lora.prompt_fidelity
            learned = r.subject_fidelity - base.subject_fidelity
            out[r.method] = {"subject_vs_lora": fidelity, "prompt_vs_lora": prompt, "subject_vs_base": learned,
                             "params_vs_lora": r.trainable_params / lora.trainable_params,
                             "met": fidelity >= 0 and prompt >= -0.02 and learned >= LEARNED}  # fmt: skip
    return out


def check_cell(ok: bool | None, diff: float | None) -> str:
    if ok is None:
        return "n/a"
    return f"{'ok' if ok else 'FAILED'} (Δ {delta(diff or 0.0)})"


def markdown(results: list[Result], demo: Demo, meta: dict[str, Any]) -> str:
    s = demo.s
    stem = meta.get("stem", "diffusion")
    length = _steps_option(stem, s.steps)
    lines = [
        "# Diffusion: the offline demo",
        "",
        f"Generated by `modalpeft demo --modality diffusion{length} --results-dir docs/results`; every number comes",
        "from that run. The model is the committed pixel-space text-to-image model pretrained on Fashion-MNIST (a",
        "diffusers `UNet2DConditionModel`, 32x32 grey, 1.69M parameters, and a CLIP-style text encoder;",
        "`modalpeft/diffusion/pretrained/README.md`). It is personalised by DreamBooth on one bag from the",
        f"Fashion-MNIST test set (never seen in pretraining): {len(demo.instances)} instance images (the photo, its",
        f"mirror image, 1-pixel shifts), prompt `{demo.instance_prompt}`, prior preservation on {s.num_class_images}",
        f"class images the frozen model generated for `{demo.class_prompt}`. Every method trains DiffuseKronA's",
        f"targets (q/k/v/out of self- and cross-attention) for {s.steps} steps of {s.instance_batch} instance +",
        f"{s.class_batch} class images (AdamW, constant lr, Min-SNR-{s.snr_gamma:g}), on the same batches.",
        "",
        "| method | trainable | file (KiB) | lr | subject fidelity | sks → bag | class prompt ~ subject "
        "| prompt fidelity | language drift | step (s) | reload | merge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | {f'{r.file_bytes / 1024:.0f}' if r.file_bytes else '-'} | "
            f"{f'{r.lr:g}' if r.lr else '-'} | {r.subject_fidelity:.3f} | {100 * r.identifier_class_accuracy:.0f}% | "
            f"{r.class_prompt_subject_similarity:.3f} | {100 * r.prompt_fidelity:.1f}% | "
            f"{100 * r.language_drift:+.1f} | {f'{r.step_time:.3f}' if r.step_time else '-'} | "
            f"{check_cell(r.reload_ok, r.reload_max_abs_diff)} | {check_cell(r.merge_ok, r.merge_max_abs_diff)} |"
        )
    n_other = len(demo.others) * s.other_samples_per_class
    lines += [
        "",
        f"- **subject fidelity**: the mean cosine similarity over all pairs of ({s.identifier_samples} generations of "
        f"`{demo.instance_prompt}`, {len(demo.instances)} instance images) of the features of the committed "
        "self-supervised Fashion-MNIST encoder (`fmnist_subject_encoder`: SimCLR on the training images, "
        "`modalpeft/diffusion/pretrained/fmnist_ssl_encoder.md`; DreamBooth's DINO metric with an encoder trained "
        f"offline); the instance images among themselves score {meta['instance_self_similarity']:.3f}, an upper bound.",
        "- **sks → bag**: the share of those generations the Fashion-MNIST ViT (a classifier) classifies as a bag.",
        f"- **class prompt ~ subject**: the same similarity for {s.class_samples} generations of `{demo.class_prompt}`"
        " (the subject leaking into its class raises it).",
        f"- **prompt fidelity**: the ViT's accuracy on {n_other} generations of the other nine classes' prompts; "
        "**language drift**: its change from the base model, in points.",
        f"- Sampling: DDIM, {s.sample_steps} steps, guidance {s.guidance:g}, the same noise for every method. "
        "DiffuseKronA: "
        f"a1={s.a1}, a2={s.a2} (see `DiffusionSettings.a1`); LoRA r={s.lora_rank}, alpha={s.lora_rank}, Gaussian "
        f"init (diffusers' DreamBooth-LoRA); LoKr r={s.lokr_rank}, alpha={s.lokr_rank} (peft defaults otherwise).",
        "- Learning rates (column lr): "
        + (
            f"the picks of the {s.steps}-step validation grid (`{stem}_lr_grid.md`)."
            if s.steps in LRS_BY_STEPS
            else f"the picks of the {DEMO_STEPS}-step validation grid (`diffusion_lr_grid.md`); not searched again at "
            f"{s.steps} steps."
        ),
        "- Reload: the adapter saved, loaded into a fresh model and Δ = the largest |UNet output difference| on fixed "
        "inputs; merge: a reloaded copy merged into the weights (no wrapper left). File: the saved adapter folder.",
        "",
        f"Device: cpu, {s.threads} thread(s), load average {meta['load']} at the start; total {meta['seconds']:.0f} s. "
        "Step times compare methods within this run only (the machine may be shared).",
        environment_note(meta["environment"]),
        "",
        "Target (issue 14: DiffuseKronA's subject fidelity at least LoRA's, prompt fidelity within 2 points of it; "
        f"and, so that two methods that learned nothing do not pass by a tie, its subject fidelity at least "
        f"{LEARNED:g} over the base model's):",
        "",
    ]
    for name, t in meta["targets"].items():
        lines.append(
            f"- {name}: subject fidelity {t['subject_vs_lora']:+.3f} vs LoRA ({t['subject_vs_base']:+.3f} vs the base "
            f"model), prompt fidelity {100 * t['prompt_vs_lora']:+.1f} points, {t['params_vs_lora']:.2f}x its "
            f"parameters: {'met' if t['met'] else 'NOT met'}."
        )
    lines += [
        "",
        "Rows: the instance images, then each method; columns: two generations of the identifier prompt, one of the",
        "class prompt and one of five other classes' prompts (the same noise in every row).",
        "",
        f"![generations]({stem}_grid.png)",
        "",
        f"![subject fidelity vs trainable parameters]({stem}_fidelity_vs_params.png)",
    ]
    return "\n".join(lines) + "\n"


def run(
    quick: bool = False,
    out_dir: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    console: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the demo, print the table, write ``results.json``, ``diffusion.md``, ``diffusion_grid.png`` and
    ``diffusion_fidelity_vs_params.png`` to ``out_dir``, and the page and pictures to ``results_dir`` when given.
    Returns the report."""
    from rich.console import Console
    from rich.table import Table

    settings = DiffusionSettings.quick(**overrides) if quick else DiffusionSettings(**overrides)
    if out_dir is not None:
        settings.out = str(out_dir)
    console = console or Console()
    if settings.lr_grid:
        return _run_lr_grid(settings, results_dir if not quick else None, console, quick)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        environment = run_environment()
        demo = Demo(settings)
        console.print(
            f"diffusion: DreamBooth on a Fashion-MNIST bag ({len(demo.instances)} instance images), {settings.steps} "
            f"steps per method"
        )
        results, images = demo.run(console.print)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    stem = page_stem(settings, quick)
    meta = {
        "stem": stem,
        "load": f"{load:.1f}" if load is not None else "n/a",
        "seconds": seconds,
        "targets": targets(results),
        "environment": environment,
        "instance_self_similarity": mean_pairwise_similarity(demo.reference, demo.reference),
    }
    table = Table(title="diffusion: DreamBooth on the Fashion-MNIST text-to-image model")
    for col in ("method", "trainable", "subject fid.", "sks→bag", "prompt fid.", "drift", "step s", "reload", "merge"):
        table.add_column(col, justify="left" if col in ("method", "reload", "merge") else "right")
    for r in results:
        table.add_row(
            r.method, f"{r.trainable_params:,}", f"{r.subject_fidelity:.3f}", f"{r.identifier_class_accuracy:.0%}",
            f"{r.prompt_fidelity:.1%}", f"{100 * r.language_drift:+.1f}", f"{r.step_time:.3f}" if r.step_time else "-",
            check_cell(r.reload_ok, r.reload_max_abs_diff), check_cell(r.merge_ok, r.merge_max_abs_diff),
        )  # fmt: skip
    console.print(table)
    report = {"settings": asdict(settings), "results": [asdict(r) for r in results], **meta}
    pictures = {f"{stem}_grid.png": grid(demo, images), f"{stem}_fidelity_vs_params.png": plot(results)}
    text = markdown(results, demo, meta).encode()
    atomic_write({"results.json": report, f"{stem}.md": text, **pictures}, settings.out)
    if results_dir is not None:
        atomic_write({f"{stem}.md": text, **pictures}, results_dir)
    console.print(f"wrote {settings.out}/{f' and {results_dir}/{stem}.md' if results_dir else ''} ({seconds:.0f} s)")
    return report


GRID_SAMPLES = {"identifier_samples": 16, "other_samples_per_class": 10}
"""The grid's generations per run: more than the demo's 8 and 6 (the demo stays within 5 minutes), for less sampling
noise in the picks."""


def _run_lr_grid(settings: DiffusionSettings, results_dir: Any, console: Any, quick: bool) -> dict[str, Any]:
    if not quick:
        settings = replace(settings, **GRID_SAMPLES)
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        environment = run_environment()
        index, subject = validation_subject(settings)
        demo = Demo(settings, subject)
        console.print(f"diffusion: learning-rate grid on a validation subject (Fashion-MNIST test image {index})")
        rows = lr_grid(demo, console.print)
    finally:
        torch.set_num_threads(threads)
    stem = page_stem(settings, quick)
    meta = {
        "stem": stem,
        "subject_index": index,
        "load": f"{load:.1f}" if load is not None else "n/a",
        "seconds": time.perf_counter() - start,
        "environment": environment,
    }
    text = grid_markdown(rows, settings, meta).encode()
    choice = picked(rows, settings.max_drift)
    report = {"settings": asdict(settings), "rows": rows, "picked": choice, "results": [], **meta}
    page = f"{stem}_lr_grid.md"
    atomic_write({"lr_grid.json": report, page: text}, settings.out)
    if results_dir is not None:
        atomic_write({page: text}, results_dir)
    console.print(f"diffusion: wrote {settings.out}/{page}; picked {choice} ({meta['seconds']:.0f} s)")
    return report


def all_checks_passed(report: dict[str, Any]) -> bool:
    """Every reload (and merge, where run) reproduced the trained model."""
    return all(r["reload_ok"] is not False and r["merge_ok"] is not False for r in report["results"])


__all__ = ["DiffusionSettings", "Result", "all_checks_passed", "run"]
