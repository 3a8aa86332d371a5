"""``AdaptedModel``: the wrapper that :func:`adapt` returns, and the adapter lifecycle on it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from .config import AdapterConfig
from .inject import (
    adapter_parameters,
    base_modules,
    guard_torch_fastpath,
    hosts,
    modules_to_save_modules,
    release_fastpath_guards,
    running_statistics,
    set_requires_grad,
    unwrap_all,
    unwrap_empty,
)
from .layer import AdapterLayer
from .registry import get_method
from .state import CONFIG_NAME, WEIGHTS_NAME, atomic_write


def class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of any module, each shared parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class AdaptedModel(nn.Module):
    """A base model with one or more named adapters; behaves like the base model.

    Attribute access and ``forward`` pass through to the base model, so timm's ``forward_features``,
    open_clip's ``encode_image`` or a diffusers UNet's ``config`` keep working. The base model is
    ``self.base_model`` (adapted in place: hosts wrap its adapted modules).

    Do not build it directly: use :func:`modalpeft.adapt` or :func:`modalpeft.load_adapter`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, Any] = {}
        self._active: str | None = None
        self.training = model.training

    # -- pass-through ------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def train(self, mode: bool = True) -> AdaptedModel:
        """Set train/eval mode. When the active config has ``frozen_eval=True`` (VPT does), the frozen base model
        stays in eval mode (no dropout, no batch-norm updates) while adapters and ``modules_to_save`` train."""
        super().train(mode)
        config = self.peft_config.get(self._active) if self._active else None
        if mode and getattr(config, "frozen_eval", False):
            self.base_model.eval()
            for _, host in hosts(self.base_model):
                host.adapters.train(True)
            for _, module in modules_to_save_modules(self.base_model, config.modules_to_save or []):
                module.train(True)
        return self

    # -- adapters ----------------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str | None:
        """The name of the adapter that runs in ``forward``."""
        return self._active

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config)

    def add_adapter(
        self,
        adapter_name: str,
        config: AdapterConfig,
        modules_to_save: list[str] | None = None,
        *,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Place a new adapter named ``adapter_name`` in the model and make it the active one.

        On any error the model is left exactly as it was.
        """
        if not isinstance(config, AdapterConfig):
            raise TypeError(
                f"{type(config).__name__} is not a modalpeft AdapterConfig; a model adapted with native methods "
                "takes native configs only (peft configs go to a model adapted with a peft config)."
            )
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already (adapters: {self.adapter_names}); pick another "
                "name or delete_adapter() it first."
            )
        if modules_to_save:
            merged = list(dict.fromkeys([*(config.modules_to_save or []), *modules_to_save]))
            config = dataclasses.replace(config, modules_to_save=merged)
        modules_to_save_modules(self.base_model, config.modules_to_save or [])  # validates the names
        info = get_method(config.method)
        try:
            info.apply(self.base_model, config, adapter_name, state)
        except BaseException:
            self._drop(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        guard_torch_fastpath(self.base_model, lambda m: isinstance(m, AdapterLayer))
        self.set_adapter(adapter_name)
        if not any(p.numel() for _, p in adapter_parameters(self.base_model, adapter_name) if p.requires_grad):
            warnings.warn(
                f"{config.method}: adapter {adapter_name!r} placed no trainable parameter in this "
                f"{type(self.base_model).__name__}; only modules_to_save {config.modules_to_save or []} train, as in "
                "linear probing. Check target_modules against the model's layers (print(model)).",
                stacklevel=2,
            )

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active (and trainable) adapter."""
        self._check_name(adapter_name)
        for _, host in hosts(self.base_model):
            host.active_adapter = adapter_name if adapter_name in host.adapters else None
        self._active = adapter_name
        set_requires_grad(self.base_model, adapter_name, self.peft_config[adapter_name].modules_to_save or [])

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging it first if needed)."""
        self._check_name(adapter_name)
        self._drop(adapter_name)
        del self.peft_config[adapter_name]
        if self._active == adapter_name:
            self._active = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def _undone_on_error(self, adapter_name: str) -> Iterator[None]:
        """Within the block an adapter ``adapter_name`` is added; on any error it is deleted again and the active
        adapter and every parameter's ``requires_grad`` are put back as they were (a failed ``load_adapter`` into
        an adapted model leaves it unchanged)."""
        active = self._active
        flags = [(p, p.requires_grad) for p in self.parameters()]
        try:
            yield
        except BaseException:
            if adapter_name in self.peft_config:
                self.delete_adapter(adapter_name)
            if active is not None:
                self.set_adapter(active)
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    def _drop(self, adapter_name: str) -> None:
        for _, host in list(hosts(self.base_model)):
            if adapter_name in host.adapters:
                host.remove(adapter_name)
        unwrap_empty(self.base_model)

    def _check_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {self.adapter_names}")

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block, the model computes as the base model (merged adapters are unmerged meanwhile).

        ``modules_to_save`` are trained in place, so they keep their trained values here.
        """
        was_merged = [(host, list(host.merged)) for _, host in hosts(self.base_model)]
        for host, names in was_merged:
            for name in names:
                host.unmerge(name)
            host.disabled = True
        try:
            yield
        finally:
            for host, names in was_merged:
                host.disabled = False
                for name in names:
                    host.merge(name)

    # -- merging -----------------------------------------------------------------------------------------
    def _check_mergeable(self, adapter_name: str) -> None:
        method = self.peft_config[adapter_name].method
        for name, host in hosts(self.base_model):
            if adapter_name not in host.adapters:
                continue
            adapter = host.adapters[adapter_name]
            if not adapter.mergeable:
                hint = adapter.merge_hint()
                raise ValueError(
                    f"adapter {adapter_name!r} (method {method!r}) cannot be merged: its layer at {name!r} "
                    f"({type(adapter).__name__}) is not a linear update of the weights{f' ({hint})' if hint else ''}. "
                    "Keep the model unmerged, or call unload() to get the base model back without the adapter."
                )

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (exactly); ``unmerge_adapter`` undoes it."""
        if self._active is None:
            raise ValueError("no active adapter to merge")
        self._check_mergeable(self._active)
        for _, host in hosts(self.base_model):
            if self._active in host.adapters:
                host.merge(self._active)

    def unmerge_adapter(self) -> None:
        """Take every merged adapter back out of the base weights."""
        for _, host in hosts(self.base_model):
            for name in list(host.merged):
                host.unmerge(name)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain base model: its own module types, no overhead.

        Other adapters are dropped; ``modules_to_save`` keep their trained values.
        """
        self.merge_adapter()
        return self._release()

    def unload(self) -> nn.Module:
        """Return the base model without any adapter (merged ones are taken out first)."""
        self.unmerge_adapter()
        return self._release()

    def _release(self) -> nn.Module:
        release_fastpath_guards(self.base_model)
        model = unwrap_all(self.base_model)
        self.peft_config.clear()
        self._active = None
        return model

    # -- parameters and files ----------------------------------------------------------------------------
    def trainable_summary(self) -> dict[str, float]:
        """``{"trainable": int, "total": int, "percent": float}`` over unique parameters."""
        trainable, total = parameter_counts(self)
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    def print_trainable_parameters(self) -> None:
        s = self.trainable_summary()
        print(f"trainable: {s['trainable']:,} | total: {s['total']:,} | {s['percent']:.4g}%")

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        """The tensors ``save_adapter`` writes: adapter parameters and buffers (keys without the adapter name),
        the ``modules_to_save`` and the base model's normalisation running statistics (their base-model keys:
        training mode updates them even in frozen layers, see :func:`~modalpeft.core.inject.running_statistics`)."""
        name = adapter_name or self._active
        if name is None:
            raise ValueError("no adapter to save")
        self._check_name(name)
        state = {k: v.detach() for k, v in adapter_parameters(self.base_model, name)}
        for mod_name, module in modules_to_save_modules(self.base_model, self.peft_config[name].modules_to_save or []):
            for k, v in module.state_dict().items():
                state[f"{mod_name}.{k}"] = v.detach()
        for k, v in running_statistics(base_modules(self.base_model)):
            state.setdefault(k, v.detach())
        return state

    def save_adapter(self, save_directory: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``save_directory``, atomically."""
        name = adapter_name or self._active
        state = self.adapter_state_dict(name)
        config = self.peft_config[name].to_dict()
        config.update(modalpeft_version=__version__, base_model_class=class_path(self.base_model))
        atomic_write({WEIGHTS_NAME: state, CONFIG_NAME: config}, save_directory)

    def load_adapter_state(self, state: Mapping[str, Tensor], adapter_name: str) -> None:
        """Copy saved tensors into the adapter ``adapter_name``; every key and shape is checked first."""
        expected = self.adapter_state_dict(adapter_name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [
            f"{k}: saved {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(expected) & set(state))
            if state[k].shape != expected[k].shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                "the adapter does not fit this model (was it saved for another architecture or configuration?)"
                f"\n  missing keys ({len(missing)}): {missing[:10]}"
                f"\n  unexpected keys ({len(unexpected)}): {unexpected[:10]}"
                f"\n  shape mismatches ({len(shapes)}): {shapes[:10]}"
                "\nLoad it into the model it was trained on, or adapt this model anew."
            )
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value.to(expected[key].dtype))

    def modules_to_save_names(self) -> list[str]:
        names = self.peft_config[self._active].modules_to_save if self._active else None
        return [n for n, _ in modules_to_save_modules(self.base_model, names or [])]

    def base_module_names(self) -> list[str]:
        return [n for n, _ in base_modules(self.base_model) if n]
