"""Trackers on the project's own pretrained ViTs (offline; nothing is downloaded).

:func:`fmnist_tracker` is the embedded demo's tracker: a :class:`~modalpeft.tracking.models.OneStreamTracker` on
vision's committed Fashion-MNIST ViT (:func:`modalpeft.vision.backbones.fmnist_vit`: 6 blocks, width 128, 4 x 4
patches, pretrained on 28 x 28 grey images normalised with mean 0.5, std 0.5). Trackers read ImageNet-normalised
RGB crops, so :func:`grey_patch_embed_to_rgb` turns the ViT's one-channel patch embedding into a three-channel one
that computes, on any RGB crop, exactly what the pretrained one computes on its grey version (the mean of R, G, B):
the pretrained features are kept, not re-learnt.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import OneStreamTracker
from .transforms import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def grey_patch_embed_to_rgb(
    proj: nn.Conv2d,
    grey_mean: float = 0.5,
    grey_std: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> nn.Conv2d:
    """A 3-channel copy of a 1-channel patch projection ``proj`` (trained on ``(g - grey_mean) / grey_std``): on
    ``(x_c - mean_c) / std_c`` it gives the same output as ``proj`` on ``g = (x_R + x_G + x_B) / 3``.

    With ``W'_c = W · std_c / (3 · grey_std)`` the sum over channels is ``W · (g - mean(mean_c)) / grey_std``; the
    bias absorbs the rest: ``b' = b + ΣW · (mean(mean_c) - grey_mean) / grey_std`` (``ΣW`` summed over each output
    channel's kernel). Exact, since a patch embedding has no padding.
    """
    if proj.in_channels != 1:
        raise ValueError(f"the patch projection has {proj.in_channels} input channels; this converts a 1-channel one.")
    out = nn.Conv2d(3, proj.out_channels, proj.kernel_size, proj.stride, proj.padding, bias=True)
    scale = torch.tensor(std, dtype=proj.weight.dtype) / (3 * grey_std)
    out.weight.copy_(proj.weight * scale.view(1, 3, 1, 1))
    bias = proj.bias if proj.bias is not None else torch.zeros(proj.out_channels)
    shift = (sum(mean) / 3 - grey_mean) / grey_std
    out.bias.copy_(bias + proj.weight.sum(dim=(1, 2, 3)) * shift)
    return out


def fmnist_tracker(
    template_size: int = 24, search_size: int = 48, num_templates: int = 3, pretrained: bool = True
) -> OneStreamTracker:
    """SPMTrack's one-stream tracker on vision's committed Fashion-MNIST ViT (see the module docstring).

    Usable as a recipe backbone: ``backbone: {class_path: modalpeft.tracking.backbones.fmnist_tracker}``. Sizes are
    multiples of the ViT's 4-pixel patches; the 7 x 7 pretrained position embedding is resampled to the search grid.

    Args:
        template_size, search_size: crop sizes in pixels (24 and 48: 6 x 6 and 12 x 12 tokens).
        num_templates: templates per sample (SPMTrack: 3).
        pretrained: load the committed weights (sha256-checked); ``False`` only for tests of the plumbing.
    """
    from ..vision.backbones import fmnist_vit

    vit = fmnist_vit(num_classes=0, pretrained=pretrained)
    vit.patch_embed.proj = grey_patch_embed_to_rgb(vit.patch_embed.proj)
    return OneStreamTracker(vit, template_size=template_size, search_size=search_size, num_templates=num_templates)


__all__ = ["fmnist_tracker", "grey_patch_embed_to_rgb"]
