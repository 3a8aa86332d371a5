"""UNet configs for the diffusion tests: the real SDXL / SD-2.1-base ones (written out from their public
``unet/config.json``, built on the meta device: no weights, no download) and a tiny one that runs on CPU."""

from __future__ import annotations

import torch
from torch import nn

SDXL = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
"""stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (fields at their defaults left out)."""

SD21_BASE = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}
"""stabilityai/stable-diffusion-2-1-base, unet/config.json (fields at their defaults left out)."""

TINY = {
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 24,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
"""A tiny SD-style UNet (cross-attention width 24, two levels) for CPU tests."""


def meta_unet(config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def tiny_unet(seed: int = 0, **overrides) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-initialises some biases / output convs; make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def unet_inputs(seed: int = 1, text_dim: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 500]), torch.randn(2, 5, text_dim, generator=g)
