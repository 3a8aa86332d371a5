"""UNet configurations of the real models (written out from their public ``unet/config.json``: nothing downloads)
and a test-size one, for the benchmarks and the tests; :func:`build_unet` builds any of them (on the meta device:
the shapes without the memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SDXL_UNET = {
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

SD21_BASE_UNET = {
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

TEST_UNET = {
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
"""A test-size SD-style UNet (widths 64 and 128, text width 64: DiffuseKronA's official a1=64, a2=8 divide every
attention projection)."""

UNETS: dict[str, dict[str, Any]] = {"sdxl": SDXL_UNET, "sd21_base": SD21_BASE_UNET, "test": TEST_UNET}


def build_unet(config: str | dict[str, Any], meta: bool = False, **overrides: Any) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` with random weights from a name in :data:`UNETS` or a config dict."""
    from diffusers import UNet2DConditionModel

    if isinstance(config, str):
        if config not in UNETS:
            raise ValueError(f"unet config {config!r} is unknown; choose one of {list(UNETS)} or pass a dict.")
        config = UNETS[config]
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**{**config, **overrides})
    return UNet2DConditionModel(**{**config, **overrides})
