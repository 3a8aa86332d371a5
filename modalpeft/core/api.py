"""The two entry points of the lifecycle: :func:`adapt` and :func:`load_adapter`."""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from .config import AdapterConfig
from .model import AdaptedModel, class_path
from .peft_bridge import PeftAdaptedModel, is_peft_config, load_peft_adapter
from .registry import get_config_cls
from .state import read_config, read_tensors


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
) -> AdaptedModel:
    """Adapt ``model`` with an adapter saved by ``save_adapter`` (native or peft format).

    Every saved key and shape is checked against the model; on a mismatch a ``ValueError`` names the
    missing and unexpected keys and the shape mismatches, and the model is left as it was. Loading never
    unpickles (JSON + safetensors).

    Args:
        model: a fresh base model of the architecture the adapter was trained on, or an
            :class:`AdaptedModel` to add the adapter to.
        directory: the adapter directory.
        adapter_name: the name to give the loaded adapter.
        is_trainable: ``False`` (default) freezes every parameter, for inference; ``True`` makes the adapter
            and its ``modules_to_save`` trainable, to go on training.
    """
    data = read_config(directory)
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
        adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
        try:
            adapted.add_adapter(adapter_name, config, state=state)
            try:
                adapted.load_adapter_state(state, adapter_name)
            except BaseException:
                if adapted is model:
                    adapted.delete_adapter(adapter_name)
                else:
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
