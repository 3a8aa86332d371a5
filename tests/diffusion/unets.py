"""UNets for the diffusion tests: the real SDXL / SD-2.1-base configs (``modalpeft.diffusion.backbones``, built on the
meta device: no weights, no download) and a tiny one that runs on CPU."""

from __future__ import annotations

import torch
from torch import nn

from modalpeft.diffusion.backbones import SD21_BASE_UNET as SD21_BASE  # noqa: F401  (re-exported for the tests)
from modalpeft.diffusion.backbones import SDXL_UNET as SDXL  # noqa: F401
from modalpeft.diffusion.backbones import build_unet

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
    return build_unet(config, meta=True)


def tiny_unet(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    unet = build_unet(TINY, **overrides).eval()
    with torch.no_grad():  # diffusers zero-initialises some biases / output convs; make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


def unet_inputs(seed: int = 1, text_dim: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 500]), torch.randn(2, 5, text_dim, generator=g)


def tiny_pipeline(seed: int = 0):
    """A tiny StableDiffusionPipeline built offline (ENVIRONMENT.md): the TINY-style UNet with a 32-wide text
    encoder, a two-level VAE, a character-level CLIP tokenizer and DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c + "</w>": i + 2 for i, c in enumerate(letters)})
    vocab.update({c: i + 28 for i, c in enumerate(letters)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=tiny_unet(seed, cross_attention_dim=32),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    out = pipe(
        "a photo of sks",
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images
