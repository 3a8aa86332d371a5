"""The one registry of native methods: one ``@register_method`` per method file.

Methods that Hugging Face peft implements are not registered here; :func:`get_config_cls` and
:func:`create_config` still find them by peft's name (``"lora"``, ``"lokr"``, ``"ln_tuning"``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .config import AdapterConfig

ApplyFn = Callable[[nn.Module, Any, str, Mapping[str, Tensor] | None], None]
"""``apply(model, config, adapter_name, state)`` places a method's adapter layers in ``model``.

``state`` is ``None`` when adapting, and the saved adapter tensors when loading: methods whose layer
shapes depend on data (SPT's selection) read them from there."""


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of a method."""

    name: str
    config_cls: type[AdapterConfig]
    apply: ApplyFn
    modality: str
    mergeable: bool
    paper: str


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(
    name: str, config_cls: type[AdapterConfig], *, modality: str = "core", mergeable: bool, paper: str
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorate a method's ``apply`` function to register it under ``name``.

    Args:
        name: the public method name (``"ssf"``); also written to ``adapter_config.json``.
        config_cls: the method's :class:`AdapterConfig` subclass; its ``method`` is set to ``name``.
        modality: ``"core"`` or the modality package that owns the method.
        mergeable: whether ``merge_and_unload`` can fold the method into the base weights.
        paper: a link to the paper.
    """

    def decorator(apply: ApplyFn) -> ApplyFn:
        if name in _REGISTRY and _REGISTRY[name].apply is not apply:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].apply.__module__}")
        config_cls.method = name
        _REGISTRY[name] = MethodInfo(name, config_cls, apply, modality, mergeable, paper)
        return apply

    return decorator


def list_methods(modality: str | None = None) -> list[str]:
    """Names of the registered native methods, optionally of one modality."""
    return sorted(n for n, info in _REGISTRY.items() if modality is None or info.modality == modality)


def _peft_config_cls(name: str) -> type | None:
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(name.upper())]
    except (ValueError, KeyError):
        return None


def get_method(name: str) -> MethodInfo:
    """The registry entry of a native method; an unknown name lists the choices."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {list_methods()}. Import the modality package that "
            "defines it (e.g. `import modalpeft.vision`), or use a peft config for peft's methods."
        )
    return _REGISTRY[name]


def get_config_cls(name: str) -> type:
    """The config class of a native method, or of a peft method by peft's name (``"lora"``)."""
    if name in _REGISTRY:
        return _REGISTRY[name].config_cls
    peft_cls = _peft_config_cls(name)
    if peft_cls is not None:
        return peft_cls
    raise ValueError(
        f"unknown method {name!r}; native methods: {list_methods()}; peft's methods are named as in "
        "peft.PeftType, lower case (e.g. 'lora', 'lokr', 'ln_tuning')."
    )


def create_config(name: str, **kwargs: Any) -> Any:
    """``get_config_cls(name)(**kwargs)``; a keyword the config does not have is a ``TypeError`` that lists the
    valid fields."""
    cls = get_config_cls(name)
    if dataclasses.is_dataclass(cls):
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(
                f"{cls.__name__} (method {name!r}) has no field(s) {unknown}; valid fields: {valid}. "
                f"help(modalpeft.get_config_cls({name!r})) describes each."
            )
    return cls(**kwargs)
