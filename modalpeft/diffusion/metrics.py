"""Personalisation metrics of DreamBooth (Ruiz et al., CVPR 2023, https://arxiv.org/abs/2208.12242, section 4.1), as
DiffuseKronA reports them:

- **DINO**: subject fidelity, the mean cosine similarity over all (generated, real) pairs of the [CLS] embeddings of a
  self-supervised ViT-S/16 (DINO; timm ``vit_small_patch16_224.dino``);
- **CLIP-I**: the same mean over CLIP image embeddings (ViT-B/32 in the paper; ``openai/clip-vit-base-patch32``);
- **CLIP-T**: prompt fidelity, the mean cosine similarity between each generated image's CLIP embedding and its
  prompt's CLIP text embedding (give the prompts without the rare identifier: ``"a dog in the snow"``).

The encoders are the user's: :func:`load_clip` and :func:`load_dino` load them from the Hub cache or a folder (nothing
downloads when ``HF_HUB_OFFLINE=1``) and say how to get them when they are missing; :func:`personalisation_metrics`
computes whichever metrics have an encoder. Images are ``(N, 3, H, W)`` tensors in [0, 1] (or PIL images); each
encoder's own preprocessing is applied (a bicubic resize of the shorter side, a centre crop, its mean and std).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's image normalisation."""


def batches(images: Tensor | Sequence[Any]) -> list[Tensor]:
    """``(N, 3, H, W)`` float batches in [0, 1] from a tensor, or from PIL images (RGB; one batch per image when
    their sizes differ, as each is resized on its own)."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images of shape {tuple(images.shape)}: give (N, 3, H, W) in [0, 1] or PIL images.")
        return [images.float()]
    from torchvision.transforms.functional import to_tensor

    if not images:
        raise ValueError("no images given; give at least one generated and one reference image.")
    tensors = [to_tensor(image.convert("RGB")) for image in images]
    return [torch.stack(tensors)] if len({t.shape for t in tensors}) == 1 else [t[None] for t in tensors]


def preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0) -> Tensor:
    """Resize the shorter side to ``size / crop_pct`` (bicubic), centre-crop ``size``, normalise."""
    from torchvision.transforms import functional as TF

    resize = int(size / crop_pct)
    images = TF.resize(images, resize, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [size, size])
    return TF.normalize(images.clamp(0, 1), list(mean), list(std))


@torch.no_grad()
def clip_image_embeddings(images: Tensor | Sequence[Any], model: nn.Module) -> Tensor:
    """L2-normalised CLIP image embeddings ``(N, D)`` of a transformers ``CLIPModel``."""
    size = model.config.vision_config.image_size
    device = next(model.parameters()).device
    out = [
        _features(model.get_image_features(pixel_values=preprocess(x, size, CLIP_MEAN, CLIP_STD).to(device)))
        for x in batches(images)
    ]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(prompts: Sequence[str], model: nn.Module, tokenizer: Any) -> Tensor:
    """L2-normalised CLIP text embeddings ``(N, D)``."""
    device = next(model.parameters()).device
    tokens = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
    out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
    return F.normalize(_features(out).float(), dim=-1)


@torch.no_grad()
def dino_embeddings(images: Tensor | Sequence[Any], model: nn.Module) -> Tensor:
    """L2-normalised [CLS] embeddings ``(N, D)`` of a timm ViT (``num_classes=0``: its pooled features)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # the ViT's own size over its pretrained cfg
    size, crop_pct = built[-1] if built else config["input_size"][-1], config.get("crop_pct", 1.0)
    device = next(model.parameters()).device
    out = [model(preprocess(x, size, config["mean"], config["std"], crop_pct).to(device)) for x in batches(images)]
    return F.normalize(torch.cat(out).float(), dim=-1)


def _features(out: Any) -> Tensor:
    """transformers 4 returns the projected features, 5 an output whose ``pooler_output`` holds them."""
    return out if isinstance(out, Tensor) else out.pooler_output


def mean_pairwise_similarity(a: Tensor, b: Tensor) -> float:
    """The mean cosine similarity over all pairs of rows of two L2-normalised matrices."""
    return float((a @ b.T).mean())


def clip_i(generated: Tensor | Sequence[Any], references: Tensor | Sequence[Any], model: nn.Module) -> float:
    """CLIP-I: subject fidelity under CLIP's image encoder."""
    return mean_pairwise_similarity(clip_image_embeddings(generated, model), clip_image_embeddings(references, model))


def clip_t(generated: Tensor | Sequence[Any], prompts: Sequence[str] | str, model: nn.Module, tokenizer: Any) -> float:
    """CLIP-T: the mean cosine similarity of each generated image with its prompt (one prompt: the same for all)."""
    images = clip_image_embeddings(generated, model)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image, or one for all.")
    return float((images * clip_text_embeddings(prompts, model, tokenizer)).sum(-1).mean())


def dino(generated: Tensor | Sequence[Any], references: Tensor | Sequence[Any], model: nn.Module) -> float:
    """DINO: subject fidelity under a self-supervised ViT."""
    return mean_pairwise_similarity(dino_embeddings(generated, model), dino_embeddings(references, model))


def load_clip(name: str = "openai/clip-vit-base-patch32") -> tuple[nn.Module, Any]:
    """A transformers ``CLIPModel`` and its tokenizer, by Hub name (from the cache) or folder, in eval mode.

    Raises:
        ValueError: the weights are not here (offline and not cached, or a wrong path), with how to get them.
    """
    from transformers import AutoTokenizer, CLIPModel

    try:
        return CLIPModel.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ValueError(
            f"CLIP weights {name!r} are not available here ({str(e).splitlines()[0][:200]}); download them once with "
            f"`huggingface-cli download {name}` (online), or give a local folder holding a CLIPModel."
        ) from None


def load_dino(name: str = "vit_small_patch16_224.dino") -> nn.Module:
    """A timm DINO ViT with its pretrained weights (Hub cache), pooled features out (``num_classes=0``), eval mode.

    Raises:
        ValueError: the weights are not here, with how to get them.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0).eval()
    except (OSError, RuntimeError) as e:
        raise ValueError(
            f"DINO weights {name!r} are not available here ({str(e).splitlines()[0][:200]}); download them once "
            f"(online: timm.create_model({name!r}, pretrained=True)), or pass your own timm model to dino()."
        ) from None


def personalisation_metrics(
    generated: Tensor | Sequence[Any],
    references: Tensor | Sequence[Any],
    prompts: Sequence[str] | str,
    clip: tuple[nn.Module, Any] | None = None,
    dino_model: nn.Module | None = None,
) -> dict[str, float]:
    """``{"clip_i", "clip_t", "dino"}`` for the encoders given (``clip``: a model and its tokenizer)."""
    out: dict[str, float] = {}
    if clip is not None:
        model, tokenizer = clip
        out["clip_i"] = clip_i(generated, references, model)
        out["clip_t"] = clip_t(generated, prompts, model, tokenizer)
    if dino_model is not None:
        out["dino"] = dino(generated, references, dino_model)
    return out


__all__ = [
    "clip_i", "clip_t", "dino", "load_clip", "load_dino", "mean_pairwise_similarity", "personalisation_metrics",
]  # fmt: skip
