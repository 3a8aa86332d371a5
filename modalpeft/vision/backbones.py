"""Vision's embedded default backbone: a small timm ViT pretrained by the project's own recipe on Fashion-MNIST.

:func:`fmnist_vit` builds it and loads the committed weights (``pretrained/vit_fmnist.safetensors``, produced by
``recipes/vision/vit_fmnist_pretrain.yaml``; ``pretrained/README.md`` gives the commands, the data source and the
measured accuracy). It runs offline on a CPU: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.state import read_verified_weights, sha256_of

FMNIST_VIT_NAME = "vit_tiny_patch16_224"
"""The timm architecture name; :data:`FMNIST_VIT_KWARGS` shrink it."""

FMNIST_VIT_KWARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "num_classes": 10,
}
"""``timm.create_model`` arguments of the pretrained model: 28 x 28 grey inputs, 49 patch tokens, 1.2M parameters,
a 10-class Fashion-MNIST head. Inputs are normalised with timm's config for the name (mean 0.5, std 0.5), which
:func:`modalpeft.vision.data.resolve_image_config` reads from the model."""

FMNIST_VIT_FILE = Path(__file__).resolve().parent / "pretrained" / "vit_fmnist.safetensors"
"""The committed weights (timm key names, fp32)."""

FMNIST_VIT_SHA256 = "72f7ba682c36c599766ec97ea06cc06ae92236f96cbf68ab9aa8fa1dc29085ec"
"""sha256 of :data:`FMNIST_VIT_FILE`, checked before every load."""


def fmnist_vit(
    num_classes: int | None = None,
    pretrained: bool = True,
    *,
    drop_path_rate: float = 0.0,
    checkpoint_path: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """The Fashion-MNIST ViT (:data:`FMNIST_VIT_NAME` with :data:`FMNIST_VIT_KWARGS`), with its pretrained weights.

    Usable as a recipe backbone: ``backbone: {class_path: modalpeft.vision.backbones.fmnist_vit, init_args:
    {num_classes: 5}}``.

    Args:
        num_classes: classifier size; ``None`` keeps the 10 Fashion-MNIST classes (and, pretrained, their trained
            head); another number replaces the head with a fresh one (timm's ``reset_classifier``); 0 removes it
            (the model returns pooled features).
        pretrained: load the committed weights; ``False`` gives the same architecture randomly initialised.
        drop_path_rate: stochastic depth for fine-tuning (0 at inference; the weights were trained with 0.05).
        checkpoint_path: the weights file to load (default :data:`FMNIST_VIT_FILE`). Its sha256 must still be
            :data:`FMNIST_VIT_SHA256`: to load other weights for this architecture, use
            :func:`modalpeft.lightning.timm_backbone` with ``checkpoint_path``.

    Raises:
        FileNotFoundError: when the weights file is missing.
        ValueError: when its sha256 differs from :data:`FMNIST_VIT_SHA256` (a corrupted or replaced file).
    """
    import timm

    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 0):
        raise ValueError(f"num_classes={num_classes!r} must be a non-negative integer (0: no head) or None.")
    model = timm.create_model(FMNIST_VIT_NAME, pretrained=False, drop_path_rate=drop_path_rate, **FMNIST_VIT_KWARGS)
    if pretrained:
        state = read_verified_weights(
            checkpoint_path if checkpoint_path is not None else FMNIST_VIT_FILE,
            FMNIST_VIT_SHA256,
            "fmnist_vit",
            "it ships with modalpeft (modalpeft/vision/pretrained/, see its README.md): reinstall or restore it, pass "
            "pretrained=False, or load other weights with modalpeft.lightning.timm_backbone(checkpoint_path=...).",
        )
        model.load_state_dict(state, strict=True)
    if num_classes is not None and num_classes != FMNIST_VIT_KWARGS["num_classes"]:
        model.reset_classifier(num_classes)
    return model


__all__ = [
    "FMNIST_VIT_FILE",
    "FMNIST_VIT_KWARGS",
    "FMNIST_VIT_NAME",
    "FMNIST_VIT_SHA256",
    "fmnist_vit",
    "sha256_of",
]
