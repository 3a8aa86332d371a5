"""Tiny text-to-image pipelines for the DreamBooth tests, built offline and saved to a folder (loaded back by path, as
a user's pipeline is): SD-style (one CLIP text encoder) and SDXL-style (two, micro-conditioning). Widths 64 / 128 and
a cross-attention width of 64, so that DiffuseKronA's official a1=64, a2=8 divide every attention projection and the
recipes run unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer(max_length: int = 16):
    """A character-level CLIP tokenizer built from its vocabulary (no files, no download)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c + "</w>": i + 2 for i, c in enumerate(LETTERS)})
    vocab.update({c: i + 28 for i, c in enumerate(LETTERS)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip():
    """A tiny random transformers ``CLIPModel`` (32 px images, :func:`tiny_tokenizer`'s vocabulary), eval mode."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {"vocab_size": 54, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config={**text, "pad_token_id": 1}, vision_config=vision, projection_dim=16)
    return CLIPModel(config).eval()


def tiny_dino():
    """A tiny random timm DINO ViT (32 px, pooled features out), eval mode."""
    import timm

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    return timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, **kwargs).eval()


def _text_config(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra,
    )  # fmt: skip


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )


def _unet(sdxl: bool):
    from modalpeft.diffusion.backbones import TEST_UNET, build_unet

    extra = {"use_linear_projection": sdxl}
    if sdxl:  # text_embeds (the second encoder's projection, 32) + 6 time ids x 8
        extra |= {"addition_embed_type": "text_time", "addition_time_embed_dim": 8}
        extra["projection_class_embeddings_input_dim"] = 32 + 6 * 8
    return build_unet(TEST_UNET, **extra)


def tiny_pipeline(sdxl: bool = False, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) with random weights and DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )  # fmt: skip  (Stable Diffusion's)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(32)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(32, projection=32)),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=_unet(sdxl=True),
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(64)),
            tokenizer=tiny_tokenizer(),
            unet=_unet(sdxl=False),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    with torch.no_grad():  # diffusers zero-initialises the output convs; make every weight matter
        for p in pipe.unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: str | Path, sdxl: bool = False, **kwargs) -> Path:
    directory = Path(directory)
    tiny_pipeline(sdxl, **kwargs).save_pretrained(directory)
    return directory


def write_images(directory: str | Path, n: int = 3, size: int = 20, seed: int = 0, mode: str = "RGB") -> Path:
    """``n`` random PNGs of ``size`` px (a subject's photos, for the tests)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(directory / f"{i:02d}.png")
    return directory
