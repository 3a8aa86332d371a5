"""Deepfake detection by LayerNorm tuning of a frozen CLIP visual encoder.

Yermakov, Cech, Matas, "Unlocking the Hidden Potential of CLIP in Generalizable Deepfake Detection"
(arXiv 2503.19683, https://arxiv.org/abs/2503.19683; code yermandy/deepfake-detection). The model:

- the CLIP visual tower (ViT-L/14 in the paper), frozen but for the affine parameters of *every* LayerNorm
  (pre-LN, both LNs of every block, post-LN), tuned through peft's ``LNTuningConfig``;
- the feature is the post-norm class token (HF ``pooler_output``; the visual projection is not used),
  L2-normalised, then a linear head to real/fake logits (the official ``LinearNorm`` head);
- training only: within each class of the batch, every feature is replaced by a spherical interpolation (slerp)
  towards a random partner of the same class, with ``t ~ U[t0, t1]`` (``[0, 1]`` by default);
- loss: ``ce * CE + alignment * E_{i<j, y_i = y_j} ||f_i - f_j||^2 + uniformity * log E_{i<j} exp(-2 ||f_i -
  f_j||^2)`` on the unit features (Wang & Isola's alignment and uniformity; the official example trains with CE
  only, GenD's "LN+L2+UnAl" uses uniformity 0.5, alignment 0.1).

:class:`DeepfakeModel` wraps any of three encoders behind one small interface (:func:`encoder_kind`): an
open_clip visual tower, a transformers ``CLIPVisionModel``, or a timm ViT (any model with timm's
``forward_features`` / ``forward_head``), so that LayerNorm tuning runs on the project's small offline ViT too.

Differences from the official code, on purpose:

- the class-token feature of open_clip is its ``visual(x)`` output with the projection removed (``proj=None``),
  and a timm encoder's classifier is removed (``reset_classifier(0)``): both are unused by the method, and unused
  parameters would break full fine-tuning under DDP;
- peft's LN tuning keeps a frozen copy of each LayerNorm and trains a deep copy of it; for open_clip's
  ``LayerNorm`` subclass (which casts its output back to the input dtype) peft warns "unsupported layer type"
  only because it cannot read ``in_features`` from a LayerNorm: the copy keeps open_clip's class and forward, so
  the warning is silenced here for LayerNorm subclasses only (the tests check every LayerNorm trains and the
  output is unchanged at initialisation);
- the LayerNorms are targeted by their exact module names (a full-match regex) instead of the official suffix
  list, so the same code serves open_clip (``ln_pre``/``ln_1``/``ln_2``/``ln_post``), HF CLIP
  (``pre_layrnorm``/``layer_norm1``/``layer_norm2``/``post_layernorm``) and timm (``norm1``/``norm2``/``norm``),
  and no parameter-free module that happens to share a suffix (timm's ``attn.norm`` Identity) is matched.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LNTuningConfig, PeftConfig
from torch import Tensor, nn

from ...core.config import AdapterConfig
from ...lightning.optim import OptimizerName, SchedulerName
from ...lightning.task import AdapterTask
from .metrics import DeepfakeMetrics

EncoderKind = Literal["open_clip", "hf_clip", "timm"]
DetectorAdapter = Literal["ln_tuning", "linear", "full"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- encoders ---------------------------------------------------------------------------------------------------


def encoder_kind(encoder: nn.Module) -> EncoderKind:
    """Which of the supported encoder families ``encoder`` is.

    Raises:
        TypeError: for anything else, naming what is supported.
    """
    module = type(encoder).__module__
    if module.startswith("open_clip") and hasattr(encoder, "transformer") and hasattr(encoder, "ln_post"):
        return "open_clip"
    if module.startswith("transformers") and hasattr(encoder, "config") and hasattr(encoder.config, "hidden_size"):
        return "hf_clip"
    if hasattr(encoder, "forward_features") and hasattr(encoder, "forward_head"):
        return "timm"
    raise TypeError(
        f"{type(encoder).__name__} ({module}) is not a supported encoder: give an open_clip visual tower "
        "(open_clip_visual(...) or model.visual), a transformers CLIPVisionModel, or a timm ViT (any model with "
        "forward_features/forward_head, e.g. modalpeft.lightning.timm_backbone or fmnist_vit)."
    )


def open_clip_visual(
    name: str = "ViT-L-14-quickgelu",
    pretrained: str | None = "openai",
    vision_cfg: dict[str, Any] | None = None,
    text_cfg: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> nn.Module:
    """The visual tower of an open_clip model (``open_clip.create_model(name, pretrained=...)``).

    Args:
        name: an open_clip model name (``ViT-L-14-quickgelu``: the paper's CLIP ViT-L/14 with the QuickGELU the
            OpenAI weights were trained with, as the official code's transformers ``CLIPVisionModel`` has; open_clip's
            ``ViT-L-14`` uses ``nn.GELU``, which moves the OpenAI tower's activations by up to about 0.02 per unit
            and which open_clip only warns about, so ``pretrained="openai"`` with such a config is an error here).
        pretrained: an open_clip pretrained tag (``openai``), a local checkpoint path, or ``None`` (also ``""`` or
            ``"none"``, as a command line gives it) for random weights (works offline).
        vision_cfg: overrides of the model config's ``vision_cfg`` (tiny towers for tests).
        text_cfg: overrides of ``text_cfg`` (a tiny text tower makes building faster; the text tower is dropped).
        cache_dir: open_clip's download cache.
    """
    import open_clip

    base = open_clip.get_model_config(name)
    if base is None:
        raise ValueError(f"open_clip has no model config {name!r}; choose one of open_clip.list_models().")
    overrides: dict[str, Any] = {}
    if vision_cfg:
        overrides["vision_cfg"] = {**base["vision_cfg"], **vision_cfg}
    if text_cfg:
        overrides["text_cfg"] = {**base["text_cfg"], **text_cfg}
    if pretrained is not None and pretrained.strip().lower() in ("", "none", "null"):
        pretrained = None
    if pretrained == "openai" and not base.get("quick_gelu", False):
        quick = f"{name}-quickgelu"
        hint = f"use name={quick!r}" if open_clip.get_model_config(quick) else "use a '-quickgelu' model name"
        raise ValueError(
            f"open_clip model {name!r} uses nn.GELU, but the OpenAI weights (pretrained='openai') were trained with "
            f"QuickGELU; {hint} (the architecture the weights belong to)."
        )
    model = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir, **overrides)
    return model.visual


def hf_clip_vision(
    name_or_path: str = "openai/clip-vit-large-patch14", config: dict[str, Any] | None = None
) -> nn.Module:
    """A transformers ``CLIPVisionModel``: ``from_pretrained(name_or_path)``, or built from ``config`` (a
    ``CLIPVisionConfig`` dict; random weights, for tests) when given."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if config is not None:
        return CLIPVisionModel(CLIPVisionConfig(**config))
    return CLIPVisionModel.from_pretrained(name_or_path)


def layernorm_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Names of every ``nn.LayerNorm`` (subclasses included) with affine parameters inside ``module``."""
    return [
        f"{prefix}{name}"
        for name, m in module.named_modules()
        if isinstance(m, nn.LayerNorm) and any(True for _ in m.parameters(recurse=False))
    ]


# -- the model --------------------------------------------------------------------------------------------------


class LinearNormHead(nn.Module):
    """The official ``LinearNorm`` head: ``logits = W (f / ||f||_2) + b``.

    Shapes:
        - input: ``(B, D)`` features; output: ``(B, num_classes)`` logits.
    """

    def __init__(self, in_features: int, num_classes: int = 2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(F.normalize(features, dim=-1))


class DeepfakeModel(nn.Module):
    """An encoder's post-norm class-token feature followed by :class:`LinearNormHead` (real = 0, fake = 1).

    Args:
        encoder: an open_clip visual tower, a transformers ``CLIPVisionModel`` or a timm ViT (see
            :func:`encoder_kind`). Its unused output layers are removed in place (open_clip's ``proj``, timm's
            classifier).
        num_classes: head outputs (2: real, fake).

    Shapes:
        - input: ``(B, C, H, W)`` images; :meth:`forward_features`: ``(B, D)``; output: ``(B, num_classes)``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.kind = encoder_kind(encoder)
        if self.kind == "open_clip":
            encoder.proj = None  # the method uses the feature before the projection
            encoder.output_tokens = False
            width = encoder.ln_post.normalized_shape[0]
        elif self.kind == "hf_clip":
            width = encoder.config.hidden_size
        else:
            if getattr(encoder, "num_classes", 0):
                encoder.reset_classifier(0)
            width = encoder.num_features
        self.encoder = encoder
        self.num_features = int(width)
        self.head = LinearNormHead(self.num_features, num_classes)

    def forward_features(self, images: Tensor) -> Tensor:
        """The post-norm class token (not normalised)."""
        if self.kind == "open_clip":
            return self.encoder(images)
        if self.kind == "hf_clip":
            return self.encoder(pixel_values=images).pooler_output
        return self.encoder.forward_head(self.encoder.forward_features(images), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))

    def image_config(self) -> dict[str, Any]:
        """What the encoder expects: ``{"size", "channels", "mean", "std", "interpolation"}`` (CLIP's statistics
        for CLIP encoders, timm's data config for timm)."""
        if self.kind == "open_clip":
            size = self.encoder.image_size
            return {
                "size": tuple(size) if isinstance(size, (tuple, list)) else (size, size),
                "channels": self.encoder.conv1.in_channels,
                "mean": tuple(getattr(self.encoder, "image_mean", None) or OPENAI_CLIP_MEAN),
                "std": tuple(getattr(self.encoder, "image_std", None) or OPENAI_CLIP_STD),
                "interpolation": "bicubic",
            }
        if self.kind == "hf_clip":
            size = self.encoder.config.image_size
            return {
                "size": (size, size),
                "channels": self.encoder.config.num_channels,
                "mean": OPENAI_CLIP_MEAN,
                "std": OPENAI_CLIP_STD,
                "interpolation": "bicubic",
            }
        from ..transforms import resolve_image_config

        config = resolve_image_config(self.encoder)
        return {
            "size": config.size,
            "channels": config.channels,
            "mean": config.mean,
            "std": config.std,
            "interpolation": config.interpolation,
        }


def ln_tuning_config(model: DeepfakeModel) -> LNTuningConfig:
    """peft's LN tuning on every LayerNorm of ``model.encoder``, matched by exact name."""
    names = layernorm_names(model.encoder, "encoder.")
    if not names:
        raise ValueError(
            f"the {model.kind} encoder {type(model.encoder).__name__} has no LayerNorm with affine parameters; "
            "LayerNorm tuning needs a transformer with LayerNorms (use adapter='linear' or 'full' otherwise)."
        )
    return LNTuningConfig(target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")")


@contextlib.contextmanager
def _quiet_layernorm_subclasses() -> Iterator[None]:
    """Silence peft's "unsupported layer type" warning for LayerNorm subclasses (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Unsupported layer type '<class '[\w.]*LayerNorm'>'")
        yield


# -- augmentation and losses ------------------------------------------------------------------------------------


def slerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    """Spherical interpolation between the directions of ``a`` and ``b``: ``sin((1-t)θ)/sinθ â + sin(tθ)/sinθ b̂``
    with ``cos θ = â·b̂`` clamped to ``±(1 - 1e-7)`` (as the official code).

    Shapes:
        - a, b: ``(N, D)``; t: ``(N, 1)`` or a float; output: ``(N, D)``, unit rows.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    dot = (a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin * a + torch.sin(t * theta) / sin * b


def slerp_augment(
    features: Tensor,
    labels: Tensor,
    t_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """The official slerp feature augmentation: within each class with at least two samples, each feature becomes
    the slerp towards a random (permuted) feature of the same class, ``t ~ U[t0, t1]`` per sample. A class with one
    sample keeps it as it is (not normalised, as the official code).

    Shapes:
        - features: ``(B, D)``; labels: ``(B,)``; output: ``(B, D)``.
    """
    out = features.clone()
    t0, t1 = t_range
    for label in torch.unique(labels):
        index = (labels == label).nonzero().flatten()
        if len(index) < 2:
            continue
        group = features[index]
        partner = group[torch.randperm(len(index), generator=generator).to(features.device)]
        t = torch.rand((len(index), 1), generator=generator).to(features) * (t1 - t0) + t0
        out[index] = slerp(group, partner, t).to(features.dtype)
    return out


def alignment_loss(embeddings: Tensor, labels: Tensor, alpha: float = 2.0) -> Tensor:
    """Label-aware alignment (Wang & Isola 2020): ``mean_{i<j, y_i = y_j} ||e_i - e_j||^alpha``; 0 without pairs."""
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1).nonzero()
    if len(same) == 0:
        return embeddings.sum() * 0.0
    return (embeddings[same[:, 0]] - embeddings[same[:, 1]]).norm(dim=1).pow(alpha).mean()


def uniformity_loss(embeddings: Tensor, t: float = 2.0, clamp: float = 1e-6) -> Tensor:
    """Uniformity (Wang & Isola 2020): ``log max(mean_{i<j} exp(-t ||e_i - e_j||^2), clamp)``; 0 for one sample."""
    if len(embeddings) < 2:
        return embeddings.sum() * 0.0
    return torch.pdist(embeddings, p=2).pow(2).mul(-t).exp().mean().clamp(min=clamp).log()


def feature_loss(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    slerp_augmentation: bool = True,
    slerp_range: tuple[float, float] = (0.0, 1.0),
    ce_weight: float = 1.0,
    alignment_weight: float = 0.0,
    uniformity_weight: float = 0.0,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The training loss from encoder features: optional slerp augmentation, unit features, ``head``, then
    ``ce_weight * CE + alignment_weight * alignment + uniformity_weight * uniformity``.

    Returns:
        ``(loss, parts, logits)`` with ``parts`` holding the unweighted ``ce``, ``alignment`` and ``uniformity``.
    """
    if slerp_augmentation:
        features = slerp_augment(features, labels, slerp_range, generator)
    unit = F.normalize(features, dim=-1)
    logits = head(unit)
    parts = {
        "ce": F.cross_entropy(logits, labels, label_smoothing=label_smoothing),
        "alignment": alignment_loss(unit, labels),
        "uniformity": uniformity_loss(unit),
    }
    loss = ce_weight * parts["ce"]
    if alignment_weight:
        loss = loss + alignment_weight * parts["alignment"]
    if uniformity_weight:
        loss = loss + uniformity_weight * parts["uniformity"]
    return loss, parts, logits


def detection_loss(model: nn.Module, images: Tensor, labels: Tensor, **kwargs: Any) -> tuple[Tensor, dict, Tensor]:
    """:func:`feature_loss` of a :class:`DeepfakeModel` (plain or adapted) on a batch of images."""
    return feature_loss(model.head, model.forward_features(images), labels, **kwargs)


def resolve_adapter(
    model: DeepfakeModel, adapter: AdapterConfig | PeftConfig | DetectorAdapter
) -> AdapterConfig | PeftConfig | Literal["linear", "full"]:
    """``"ln_tuning"``, or an ``LNTuningConfig`` without ``target_modules``, becomes LN tuning of every LayerNorm
    of the encoder (:func:`ln_tuning_config`); anything else is checked and returned as it is."""
    if adapter == "ln_tuning" or (isinstance(adapter, LNTuningConfig) and adapter.target_modules is None):
        return ln_tuning_config(model)
    if isinstance(adapter, str) and adapter not in ("linear", "full"):
        raise ValueError(f"adapter={adapter!r} is not valid; choose 'ln_tuning', 'linear', 'full' or a method config.")
    return adapter


def prepare_detector(model: DeepfakeModel, adapter: AdapterConfig | PeftConfig | DetectorAdapter) -> nn.Module:
    """``model`` set up to train ``adapter`` (see :func:`resolve_adapter`; ``"linear"``: the head alone,
    ``"full"``: everything); the head always trains and is saved with the adapter."""
    from ...lightning.task import prepare_backbone

    with _quiet_layernorm_subclasses():
        return prepare_backbone(model, resolve_adapter(model, adapter), ["head"])


# -- the Lightning system ---------------------------------------------------------------------------------------


class DeepfakeDetector(AdapterTask):
    """Real/fake classification of face frames, evaluated per frame and per video.

    Batches are ``(images, labels, video_ids)`` (labels 0 real, 1 fake), as the data modules of
    :mod:`modalpeft.vision.deepfake.data` give them. Validation and test log ``{stage}/auroc_video`` (the paper's
    metric), ``ap_video``, ``eer_video`` and the same at frame level (:class:`DeepfakeMetrics`). ``predict``
    returns fake probabilities with video ids; :class:`~modalpeft.vision.deepfake.predict.VideoPredictionWriter`
    writes them per video as CSV.

    Args:
        backbone: the encoder: an open_clip visual tower (:func:`open_clip_visual`), a transformers
            ``CLIPVisionModel`` (:func:`hf_clip_vision`) or a timm ViT. In YAML: ``class_path`` + ``init_args``.
        adapter: ``"ln_tuning"`` (the paper: every LayerNorm of the encoder, through peft's ``LNTuningConfig``),
            ``"linear"`` (linear probe), ``"full"`` (full fine-tuning), or any modalpeft / peft config. The head
            always trains.
        slerp_augmentation: the within-class slerp feature augmentation (training only).
        slerp_range: ``(t0, t1)``, the range of the interpolation weight.
        ce_weight: weight of the cross-entropy.
        alignment_weight: weight of the label-aware alignment loss (0: off).
        uniformity_weight: weight of the uniformity loss (0: off).
        label_smoothing: cross-entropy label smoothing.
        predictions_path: where ``predict`` writes per-video CSV (``None``: ``<log dir>/predictions.csv``).
        optimizer, lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr: as :class:`AdapterTask`; the
            defaults are the official recipe (AdamW, lr 8e-5, no decay, per-step cosine to 5e-5, no warm-up).
    """

    def __init__(
        self,
        backbone: nn.Module,
        adapter: AdapterConfig | PeftConfig | DetectorAdapter = "ln_tuning",
        slerp_augmentation: bool = True,
        slerp_range: tuple[float, float] = (0.0, 1.0),
        ce_weight: float = 1.0,
        alignment_weight: float = 0.0,
        uniformity_weight: float = 0.0,
        label_smoothing: float = 0.0,
        predictions_path: str | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 8e-5,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0,
        min_lr: float = 5e-5,
    ) -> None:
        t0, t1 = slerp_range
        if not 0.0 <= t0 <= t1 <= 1.0:
            raise ValueError(f"slerp_range={slerp_range!r} must satisfy 0 <= t0 <= t1 <= 1 (the paper uses (0, 1)).")
        for name, value in (("ce_weight", ce_weight), ("alignment_weight", alignment_weight)):
            if value < 0:
                raise ValueError(f"{name}={value} must be non-negative.")
        if ce_weight == alignment_weight == uniformity_weight == 0:
            raise ValueError("ce_weight, alignment_weight and uniformity_weight are all 0: nothing would train.")
        model = DeepfakeModel(backbone)
        adapter = resolve_adapter(model, adapter)
        with _quiet_layernorm_subclasses():
            super().__init__(
                model, adapter, ["head"], optimizer, lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr
            )
        # an output location, not a hyper-parameter: kept out of checkpoints, since LightningCLI's ``--ckpt_path``
        # would otherwise replace the value given on the command line with the one saved by ``fit``
        self.hparams.pop("predictions_path", None)
        self.predictions_path = predictions_path
        self.val_metrics = DeepfakeMetrics()
        self.test_metrics = DeepfakeMetrics()

    @property
    def detector(self) -> nn.Module:
        """The (adapted) :class:`DeepfakeModel`."""
        return self.model

    def step(self, batch: Any, stage: str) -> Tensor:
        images, labels, videos = batch
        hp = self.hparams
        if stage == "train":
            loss, parts, _ = detection_loss(
                self.model,
                images,
                labels,
                slerp_augmentation=hp.slerp_augmentation,
                slerp_range=tuple(hp.slerp_range),
                ce_weight=hp.ce_weight,
                alignment_weight=hp.alignment_weight,
                uniformity_weight=hp.uniformity_weight,
                label_smoothing=hp.label_smoothing,
            )
            self.log("train/loss", loss, prog_bar=True)
            self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()})
            return loss
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=stage == "val")
        getattr(self, f"{stage}_metrics").update(logits.softmax(-1)[:, 1], labels, videos)
        return loss

    def _log_metrics(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        metrics.reset()
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, _, videos = batch
        return {"probs": self.model(images).softmax(-1)[:, 1], "videos": videos}

    def configure_callbacks(self) -> list:
        from .predict import VideoPredictionWriter

        return [*super().configure_callbacks(), VideoPredictionWriter(self.predictions_path)]


__all__ = [
    "DeepfakeDetector",
    "DeepfakeModel",
    "LinearNormHead",
    "alignment_loss",
    "detection_loss",
    "encoder_kind",
    "feature_loss",
    "hf_clip_vision",
    "layernorm_names",
    "ln_tuning_config",
    "open_clip_visual",
    "prepare_detector",
    "resolve_adapter",
    "slerp",
    "slerp_augment",
    "uniformity_loss",
]
