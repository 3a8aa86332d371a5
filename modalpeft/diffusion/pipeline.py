"""Adapters in diffusers pipelines: load a saved adapter into ``pipe.unet``, switch its scale, fuse it.

    adapted = modalpeft.diffusion.load_into_pipeline(pipe, "runs/dog/adapter", scale=0.8)
    images = pipe("a photo of sks dog").images
    set_scale(adapted, 0.5)        # switch the strength
    adapted.merge_adapter()        # fuse into the UNet's weights (unmerge_adapter() undoes it)

The UNet is adapted in place, so the pipeline keeps calling the same ``pipe.unet`` object; the returned
:class:`~modalpeft.core.AdaptedModel` is the handle for the scale, fusing and unloading.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..core import AdaptedModel, load_adapter
from ..core.inject import hosts


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
