"""Methods that Hugging Face peft implements, used through peft behind the :class:`AdaptedModel` interface.

Nothing of peft is re-implemented: injection, merging and the file format are peft's own, so a saved
directory loads with ``peft.PeftModel.from_pretrained``. One difference, on purpose: ``modules_to_save``
train *in place* (peft would keep a frozen copy of each, which costs memory and confuses DDP); they are
still written under peft's keys (``base_model.model.<name>.<param>``) and listed in the saved config, so
peft loads them as usual. The base model's BatchNorm running statistics are saved the same way (training mode
updates them in frozen layers; see :func:`~modalpeft.core.inject.running_statistics`), and new peft layers take
the train/eval mode of the layer they wrap (peft leaves them in training mode, so an adapter loaded into an eval
model ran its dropout).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .inject import guard_torch_fastpath, modules_to_save_modules, release_fastpath_guards, running_statistics
from .model import AdaptedModel
from .state import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_tensors

_PEFT_PREFIX = "base_model.model."


def _is_peft_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def is_peft_config(config: Any) -> bool:
    try:
        from peft import PeftConfig
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(config, PeftConfig)


def _follow_base_mode(model: nn.Module) -> None:
    """Give every peft layer the train/eval mode of the layer it wraps."""
    for module in model.modules():
        if _is_peft_layer(module):
            module.train(module.get_base_layer().training)


def _split_modules_to_save(config: Any, extra: list[str] | None) -> tuple[Any, list[str]]:
    """A copy of the peft config without ``modules_to_save``, and those names (ours to train in place)."""
    names = list(dict.fromkeys([*(config.modules_to_save or []), *(extra or [])]))
    config = copy.deepcopy(config)
    config.modules_to_save = None
    return config, names


class PeftAdaptedModel(AdaptedModel):
    """An :class:`AdaptedModel` whose adapters are peft's; ``base_model`` is a ``peft.PeftModel``."""

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, modules_to_save: list[str] | None) -> None:
        from peft import get_peft_model

        config, names = _split_modules_to_save(config, modules_to_save)
        modules_to_save_modules(model, names)
        super().__init__(get_peft_model(model, config, adapter_name=adapter_name))
        _follow_base_mode(self.base_model)
        self._modules_to_save: dict[str, list[str]] = {adapter_name: names}
        self._active = adapter_name
        guard_torch_fastpath(self.base_model, _is_peft_layer)
        self._refresh_trainable()

    @property
    def peft_config(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: Any) -> None:  # the base __init__ assigns {}; peft owns the real one
        pass

    def _refresh_trainable(self) -> None:
        for _, module in modules_to_save_modules(self._inner, self._modules_to_save.get(self._active, [])):
            for p in module.parameters():
                p.requires_grad_(True)

    @property
    def _inner(self) -> nn.Module:
        """The user's model inside the peft wrappers."""
        return self.base_model.base_model.model

    def add_adapter(
        self,
        adapter_name: str,
        config: Any,
        modules_to_save: list[str] | None = None,
        *,
        state: Mapping[str, Tensor] | None = None,
    ) -> None:
        if not is_peft_config(config):
            raise TypeError(
                f"{type(config).__name__} is not a peft config; a model adapted through peft takes peft configs only."
            )
        if adapter_name in self.peft_config:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already (adapters: {self.adapter_names}); pick another "
                "name or delete_adapter() it first."
            )
        config, names = _split_modules_to_save(config, modules_to_save)
        modules_to_save_modules(self._inner, names)
        self.base_model.add_adapter(adapter_name, config)
        _follow_base_mode(self.base_model)
        guard_torch_fastpath(self.base_model, _is_peft_layer)
        self._modules_to_save[adapter_name] = names
        self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        self.base_model.set_adapter(adapter_name)
        self._active = adapter_name
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(f".{adapter_name}." in name or name.endswith(f".{adapter_name}"))
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        self.base_model.delete_adapter(adapter_name)
        self._modules_to_save.pop(adapter_name, None)
        if self._active == adapter_name:
            self._active = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self) -> None:
        self.base_model.merge_adapter()

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self) -> nn.Module:
        release_fastpath_guards(self.base_model)
        return self.base_model.merge_and_unload()

    def unload(self) -> nn.Module:
        release_fastpath_guards(self.base_model)
        return self.base_model.unload()

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        name = adapter_name or self._active
        self._check_name(name)
        state = dict(get_peft_model_state_dict(self.base_model, adapter_name=name))
        state.update(self._own_state(name))
        return state

    def _own_state(self, adapter_name: str) -> dict[str, Tensor]:
        """What modalpeft saves beside peft's adapter tensors, under peft's keys: the ``modules_to_save`` and the
        base model's BatchNorm running statistics."""
        state = {}
        for mod_name, module in modules_to_save_modules(self._inner, self._modules_to_save.get(adapter_name, [])):
            for k, v in module.state_dict().items():
                state[f"{_PEFT_PREFIX}{mod_name}.{k}"] = v.detach()
        for k, v in running_statistics(self._inner.named_modules()):
            state.setdefault(f"{_PEFT_PREFIX}{k}", v.detach())
        return state

    def save_adapter(self, save_directory: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Write peft's own files (loadable by ``peft.PeftModel.from_pretrained``), atomically."""
        name = adapter_name or self._active
        self._check_name(name)
        with tempfile.TemporaryDirectory() as tmp:
            self.base_model.save_pretrained(tmp, selected_adapters=[name])
            out = Path(tmp) if name == "default" else Path(tmp) / name
            files: dict[str, Any] = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        import json

        config = json.loads(files[CONFIG_NAME])
        config["modules_to_save"] = self._modules_to_save.get(name) or None
        files[CONFIG_NAME] = (json.dumps(config, indent=2) + "\n").encode()
        files[WEIGHTS_NAME] = self.adapter_state_dict(name)
        atomic_write(files, save_directory)

    def load_adapter_state(self, state: Mapping[str, Tensor], adapter_name: str) -> None:
        expected = self.adapter_state_dict(adapter_name)
        # peft may save keys with or without the adapter name depending on the method; normalise ours
        state = {k: v for k, v in state.items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                "the peft adapter does not fit this model"
                f"\n  missing keys ({len(missing)}): {missing[:10]}\n  unexpected keys ({len(unexpected)}): "
                f"{unexpected[:10]}\n  shape mismatches: {sorted(shapes)[:10]}\nLoad it into the model it was "
                "trained on."
            )
        from peft import set_peft_model_state_dict

        own = set(self._own_state(adapter_name))
        set_peft_model_state_dict(self.base_model, {k: v for k, v in state.items() if k not in own}, adapter_name)
        with torch.no_grad():
            for k in own:
                expected[k].copy_(state[k])


def load_peft_adapter(
    model: nn.Module, directory: str | os.PathLike[str], config_dict: dict[str, Any], adapter_name: str
) -> PeftAdaptedModel:
    """Adapt ``model`` (plain or already peft-adapted) with a saved peft adapter."""
    from peft import PeftConfig

    config = PeftConfig.from_peft_type(**{k: v for k, v in config_dict.items() if k != "modalpeft_version"})
    config.inference_mode = False
    state = read_tensors(directory)
    if isinstance(model, PeftAdaptedModel):
        with model._undone_on_error(adapter_name):
            model.add_adapter(adapter_name, config)
            model.load_adapter_state(state, adapter_name)
        return model
    if isinstance(model, AdaptedModel):
        raise TypeError("a model adapted with native methods cannot also take a peft adapter; use a fresh model")
    adapted = PeftAdaptedModel(model, config, adapter_name, None)
    try:
        adapted.load_adapter_state(state, adapter_name)
    except BaseException:
        adapted.unload()
        raise
    return adapted


def adalora_tuner(model: nn.Module) -> Any | None:
    """peft's ``AdaLoraModel`` inside a :class:`PeftAdaptedModel` (``None`` for any other model)."""
    tuner = (
        getattr(getattr(model, "base_model", None), "base_model", None) if isinstance(model, PeftAdaptedModel) else None
    )
    return tuner if hasattr(tuner, "update_and_allocate") and hasattr(tuner, "rankallocator") else None


def adalora_orthogonal_penalty(tuner: Any) -> Tensor:
    """``orth_reg_weight · mean ‖P Pᵀ − I‖_F`` over the active adapter's ``lora_A`` / ``lora_B`` (``Pᵀ P`` for B), as
    ``AdaLoraModel.forward`` adds it to a loss the model itself returns; tasks that compute their loss outside the
    model add it with this."""
    name = tuner.trainable_adapter_name
    weight = tuner.peft_config[name].orth_reg_weight
    terms = []
    for key, p in tuner.model.named_parameters():
        if ("lora_A" in key or "lora_B" in key) and name in key:
            cov = p @ p.T if "lora_A" in key else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro"))
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


def kasa_penalty(model: nn.Module) -> Tensor | None:
    """peft's KaSA regulariser of the active adapter, ``β·Σ lora_diag² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)`` summed over
    its layers (``LoraModel._get_kasa_loss``; the paper's Eq. 9-12), which peft leaves to the training loop; ``None``
    for a model without a KaSA adapter (``LoraConfig(kasa_config=KasaConfig(...))``)."""
    if not isinstance(model, PeftAdaptedModel):
        return None
    config = model.peft_config.get(model.active_adapter)
    tuner = model.base_model.base_model
    if getattr(config, "kasa_config", None) is None or not hasattr(tuner, "_get_kasa_loss"):
        return None
    loss = tuner._get_kasa_loss()
    return loss if isinstance(loss, Tensor) else torch.zeros(())
