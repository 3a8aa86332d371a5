"""The two entry points of the lifecycle: :func:`adapt` and :func:`load_adapter`."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .. import __version__
from .config import AdapterConfig
from .inject import running_statistics
from .model import AdaptedModel, class_path
from .peft_bridge import PeftAdaptedModel, is_peft_config, load_peft_adapter
from .registry import get_config_cls
from .state import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_config, read_tensors


def adapt(
    model: nn.Module, config: Any, adapter_name: str = "default", modules_to_save: list[str] | None = None
) -> AdaptedModel:
    """Adapt ``model`` in place with ``config`` and return it wrapped as an :class:`AdaptedModel`.

    Args:
        model: any ``nn.Module`` (timm, open_clip, diffusers, transformers, a modality backbone, ...).
        config: a modalpeft config (``mp.SSFConfig()``) or any ``peft.PeftConfig`` (used through peft).
        adapter_name: the name of this adapter.
        modules_to_save: extra modules trained in place and saved with the adapter (e.g. ``["head"]``).

    Everything but the adapter and ``modules_to_save`` is frozen. A bad config raises before the model
    changes.
    """
    if is_peft_config(config):
        if isinstance(model, AdaptedModel):
            raise TypeError("the model is adapted already; call model.add_adapter(name, config) instead")
        return PeftAdaptedModel(model, config, adapter_name, modules_to_save)
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"adapt() takes a modalpeft config (e.g. modalpeft.BitFitConfig()) or a peft.PeftConfig, got "
            f"{type(config).__name__}; build one with modalpeft.create_config(name, ...)."
        )
    if isinstance(model, AdaptedModel):
        raise TypeError("the model is adapted already; call model.add_adapter(name, config) instead")
    adapted = AdaptedModel(model)
    adapted.add_adapter(adapter_name, config, modules_to_save)
    return adapted


def load_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = "default", is_trainable: bool = False
) -> AdaptedModel | nn.Module:
    """Adapt ``model`` with an adapter saved by ``save_adapter`` (native or peft format).

    Every saved key and shape is checked against the model; on a mismatch a ``ValueError`` names the
    missing and unexpected keys and the shape mismatches, and the model is left as it was. Loading never
    unpickles (JSON + safetensors).

    Args:
        model: a fresh base model of the architecture the adapter was trained on, or an
            :class:`AdaptedModel` to add the adapter to.
        directory: the adapter directory (a baseline's directory, written by :func:`save_baseline`, gives back
            ``model`` itself with the saved tensors in place: a linear probe or a fully fine-tuned model has no
            adapter to wrap).
        adapter_name: the name to give the loaded adapter.
        is_trainable: ``False`` (default) freezes every parameter, for inference; ``True`` makes the adapter
            and its ``modules_to_save`` trainable, to go on training.
    """
    data = read_config(directory)
    if "baseline" in data:
        return load_baseline(model, directory, is_trainable)
    if "peft_type" in data:
        adapted: AdaptedModel = load_peft_adapter(model, directory, data, adapter_name)
    else:
        if "method" not in data:
            raise ValueError(f"{directory}/adapter_config.json has neither 'method' nor 'peft_type'; not an adapter")
        config_cls = get_config_cls(data["method"])
        config = config_cls.from_dict(data)
        filled = config_cls.missing_fields(data)
        if filled:
            warnings.warn(
                f"{directory}/adapter_config.json has no {filled}: they take their defaults "
                f"({', '.join(f'{k}={getattr(config, k)!r}' for k in filled)}), as for a file from an older version.",
                stacklevel=2,
            )
        state = read_tensors(directory)
        base = model.base_model if isinstance(model, AdaptedModel) else model
        saved_class = data.get("base_model_class")
        if saved_class and saved_class != class_path(base):
            warnings.warn(
                f"the adapter in {directory} was saved on a {saved_class}, this model is a {class_path(base)}; "
                "loading goes on if every key and shape fits.",
                stacklevel=2,
            )
        try:
            if isinstance(model, AdaptedModel):
                adapted = model
                with adapted._undone_on_error(adapter_name):
                    adapted.add_adapter(adapter_name, config, state=state)
                    adapted.load_adapter_state(state, adapter_name)
            else:
                adapted = AdaptedModel(model)
                adapted.add_adapter(adapter_name, config, state=state)
                try:
                    adapted.load_adapter_state(state, adapter_name)
                except BaseException:
                    adapted.unload()
                    raise
        except ValueError as e:
            if not filled:
                raise
            raise ValueError(
                f"{directory}/adapter_config.json lacks {filled}, so they took their defaults; most likely the adapter "
                f"was saved with other values: add them to the file (the values it was trained with). The model's "
                f"error: {e}"
            ) from e
    adapted.set_adapter(adapter_name)
    if not is_trainable:
        for p in adapted.parameters():
            p.requires_grad_(False)
    return adapted


BASELINES = ("full", "linear")
"""The reference points every recipe can run (:data:`modalpeft.lightning.task.Baseline`): ``"full"`` fine-tunes every
parameter, ``"linear"`` only the ``modules_to_save``."""


def save_baseline(model: nn.Module, directory: str | os.PathLike[str], baseline: str) -> None:
    """Write what a baseline trained as a directory :func:`load_adapter` and ``modalpeft inspect`` read.

    ``adapter_model.safetensors`` holds the trainable parameters (the head of a linear probe, every parameter of
    full fine-tuning) and the normalisation running statistics under the model's own ``state_dict`` keys;
    ``adapter_config.json`` says ``{"baseline": ..., "modalpeft_version": ..., "base_model_class": ...}``.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r} is not valid; choose from {list(BASELINES)}.")
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tensors |= {n: b.detach() for n, b in running_statistics(model.named_modules())}
    config = {"baseline": baseline, "modalpeft_version": __version__, "base_model_class": class_path(model)}
    atomic_write({WEIGHTS_NAME: tensors, CONFIG_NAME: config}, directory)


def load_baseline(model: nn.Module, directory: str | os.PathLike[str], is_trainable: bool = False) -> nn.Module:
    """Copy a baseline's saved tensors (:func:`save_baseline`) into ``model`` and return it; every key and shape is
    checked first, and the model is left as it was on a mismatch. ``is_trainable`` leaves the saved parameters
    trainable (to go on training), else everything is frozen."""
    tensors = read_tensors(directory)
    own = model.state_dict(keep_vars=True)
    unexpected = sorted(set(tensors) - set(own))
    shapes = [
        f"{k}: saved {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and v.shape != own[k].shape
    ]
    if unexpected or shapes:
        raise ValueError(
            f"the baseline in {directory} does not fit this {type(model).__name__} (saved for another architecture or "
            f"number of classes?)\n  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n  shape mismatches "
            f"({len(shapes)}): {shapes[:10]}\nLoad it into the model it was trained on."
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable and name in tensors)
    return model
