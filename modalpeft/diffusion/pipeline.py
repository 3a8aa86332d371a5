"""Adapters in diffusers pipelines: load a saved adapter into ``pipe.unet``, switch its scale, fuse it.

    adapted = modalpeft.diffusion.load_into_pipeline(pipe, "runs/dog/adapter", scale=0.8)
    images = pipe("a photo of sks dog").images
    set_scale(adapted, 0.5)        # switch the strength
    adapted.merge_adapter()        # fuse into the UNet's weights (unmerge_adapter() undoes it)

The UNet is adapted in place, so the pipeline keeps calling the same ``pipe.unet`` object; the returned
:class:`~modalpeft.core.AdaptedModel` is the handle for the scale, fusing and unloading. :func:`generate` does it all
from names and paths (``python recipes/diffusion.py generate``): base model + adapter + prompts -> PNGs.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import AdaptedModel, load_adapter
from ..core.inject import hosts
from ..core.state import atomic_write


def load_pipeline(name: str, revision: str | None = None, variant: str | None = None) -> Any:
    """A diffusers text-to-image pipeline by Hub name or local path, with a UNet, a scheduler and text encoder(s)."""
    from diffusers import DiffusionPipeline

    kwargs = {"revision": revision, "variant": variant}
    pipe = DiffusionPipeline.from_pretrained(name, **{k: v for k, v in kwargs.items() if v is not None})
    missing = [c for c in ("unet", "scheduler", "text_encoder", "tokenizer") if getattr(pipe, c, None) is None]
    if missing:
        raise ValueError(
            f"pipeline={name!r} ({type(pipe).__name__}) has no {missing}: DreamBooth needs a text-to-image UNet "
            "pipeline (Stable Diffusion 1.x/2.x or SDXL)."
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_into_pipeline(
    pipe: Any, directory: str | os.PathLike[str], scale: float | None = None, adapter_name: str = "default"
) -> AdaptedModel:
    """Load an adapter saved by ``save_adapter`` into ``pipe.unet`` (in place) and return its handle.

    Args:
        pipe: a diffusers pipeline with a ``unet`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ...).
        directory: the adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
        scale: the strength of the adapter's branch (``None``: the scale it was saved with).
        adapter_name: the name of the loaded adapter.

    Raises:
        TypeError: ``pipe`` has no ``unet`` module.
        ValueError: the adapter does not fit the UNet (the message names the mismatching layers); ``pipe.unet``
            is left as it was.
    """
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"load_into_pipeline needs a diffusers pipeline with a `unet` module, got {type(pipe).__name__}; "
            "for a bare UNet use modalpeft.load_adapter(unet, directory)."
        )
    if isinstance(unet, AdaptedModel) or any(True for _ in hosts(unet)):
        raise ValueError(
            f"{type(pipe).__name__}.unet carries an adapter already; add another with adapted.add_adapter(...) "
            "or unload it first (adapted.unload())."
        )
    adapted = load_adapter(unet, directory, adapter_name=adapter_name)
    if scale is not None:
        set_scale(adapted, scale, adapter_name)
    return adapted


def set_scale(model: AdaptedModel, scale: float, adapter_name: str | None = None) -> None:
    """Set the branch scale of an adapter whose layers have a ``scaling`` (DiffuseKronA, KronA, ...).

    A merged adapter is unmerged, rescaled and merged again, so the fused weights follow the new scale.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale={scale!r} must be a float (0: the base model, 1: the adapter as trained).")
    name = adapter_name or model.active_adapter
    layers = [host.adapters[name] for _, host in hosts(model.base_model) if name in host.adapters]
    if not layers or not all(hasattr(layer, "scaling") for layer in layers):
        raise ValueError(
            f"adapter {name!r} has no scalable layers (a `scaling` on each); adapters: {model.adapter_names}"
        )
    merged = [host for _, host in hosts(model.base_model) if name in host.merged]
    for host in merged:
        host.unmerge(name)
    for layer in layers:
        layer.scaling = float(scale)
    config = model.peft_config[name]
    if hasattr(config, "scale"):
        config.scale = float(scale)
    elif hasattr(config, "scaling"):
        config.scaling = float(scale)
    for host in merged:
        host.merge(name)


def png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(
    pipeline: str,
    prompts: list[str],
    out_dir: str,
    adapter: str | None = None,
    scale: float | None = None,
    images_per_prompt: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
) -> list[Path]:
    """Render ``prompts`` with a pipeline (and an adapter) into PNGs; returns their paths.

    Args:
        pipeline: the base pipeline's Hub name or folder (the one the adapter was trained on).
        prompts: the prompts (``"a photo of sks dog in the snow"``).
        out_dir: the folder the PNGs go to, ``<prompt number>_<prompt>_<image number>.png``, all written at once
            (atomically: a failure leaves none).
        adapter: a folder written by ``save_adapter`` (a DreamBooth run's ``<run folder>/adapter``); ``None``: the base.
        scale: the adapter's strength (``None``: as trained).
        images_per_prompt: images per prompt.
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        seed: the seed of the first prompt's noise (prompt ``i`` uses ``seed + i``).
        height: image height (``None``: the pipeline's default).
        width: image width (``None``: the pipeline's default).
        negative_prompt: the negative prompt.
        device: ``"cuda"``, ``"cpu"``, ... (``None``: the GPU when there is one).
    """
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt, e.g. --prompts '[\"a photo of sks dog\"]'.")
    if images_per_prompt < 1 or steps < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt} and steps={steps} must be >= 1.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(pipeline)
    if adapter is not None:
        load_into_pipeline(pipe, adapter, scale=scale)
    pipe.to(device)
    files: dict[str, bytes] = {}
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        with torch.no_grad():
            images = pipe(
                prompt, negative_prompt=negative_prompt, num_images_per_prompt=images_per_prompt,
                num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=height, width=width,
            ).images  # fmt: skip
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:60] or "prompt"
        files.update({f"{i:03d}_{slug}_{k}.png": png_bytes(image) for k, image in enumerate(images)})
    atomic_write(files, out_dir)
    return [Path(out_dir) / name for name in files]
