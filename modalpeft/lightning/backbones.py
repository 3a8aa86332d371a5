"""Backbone factories for YAML recipes (``backbone: {class_path: modalpeft.lightning.timm_backbone, ...}``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def timm_backbone(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str = "",
    num_classes: int | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model(name, pretrained=..., num_classes=..., **kwargs)``, optionally from a local file.

    Args:
        name: a timm model name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        pretrained: load timm's pretrained weights (from the Hugging Face cache or hub).
        checkpoint_path: a local weights file (safetensors preferred) to load instead.
        num_classes: size of the new classifier (``None``: the model's default).
        kwargs: more ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...).
    """
    import timm

    extra = dict(kwargs or {})
    if num_classes is not None:
        extra["num_classes"] = num_classes
    return timm.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, **extra)
