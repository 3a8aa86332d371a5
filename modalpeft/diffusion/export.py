r"""Export Kronecker adapters as LyCORIS / kohya LoKr ``.safetensors`` (the format A1111, ComfyUI and kohya read).

Per adapted Linear at module path ``p`` (dots become underscores): ``lora_unet_<p>.lokr_w1``,
``lora_unet_<p>.lokr_w2`` (or their low-rank ``_a``/``_b`` halves for peft LoKr) and ``lora_unet_<p>.alpha``;
those tools rebuild ``ΔW = (α / r) · (w1 ⊗ w2)``, with the scale taken as 1 when both factors are full.

- DiffuseKronA ``layout="kron"`` and KronA: ``w1 = s · A``, ``w2 = B``, ``alpha = 1`` (both full).
- peft LoKr: its factors, with peft's ``scaling`` folded into ``w1`` (or ``w1_a``) and ``alpha = r`` (``r``: the
  low-rank width, 1 when both factors are full), so that ``α / r = 1``. (Written as ``alpha = scaling · r``
  instead, LyCORIS 4.1.3's ``LokrModule.get_diff_weight`` applies the scale twice: measured 1.5² vs 1.5.)
- DiffuseKronA ``layout="official"`` cannot be written as LoKr: its ``ΔW = Q · (A ⊗ B)`` has entry
  ``[r·a1 + s, j·b2 + l] = A[s, j] B[r, l]``, whose row index nests ``B`` outside ``A`` while the column index
  nests ``A`` outside ``B``; no ``w1 ⊗ w2`` equals it unless ``a1 = 1`` or ``d_out = a1``. Export the merged
  weights instead (``adapted.merge_and_unload()`` then the UNet's own ``save_pretrained``) or keep modalpeft's
  own adapter files (``save_adapter`` / :func:`~modalpeft.diffusion.load_into_pipeline`).

Shapes:
    - ``lokr_w1``: ``(a1, a2)``; ``lokr_w2``: ``(d_out/a1, d_in/a2)``; ``alpha``: scalar
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core import AdaptedModel, adapt
from ..core.inject import hosts
from ..core.layers import KroneckerDelta
from ..core.state import atomic_write

PREFIX = "lora_unet"


def export_lokr(model: AdaptedModel, path: str | os.PathLike[str], adapter_name: str | None = None) -> None:
    """Write ``model``'s Kronecker adapter (modalpeft ``kron`` layout or peft LoKr) as a LoKr ``.safetensors``.

    Args:
        model: a UNet (or any model) adapted with DiffuseKronA ``layout="kron"``, KronA, or peft LoKr.
        path: the ``.safetensors`` file to write (atomically).
        adapter_name: the adapter to export (default: the active one).

    Raises:
        ValueError: the adapter is DiffuseKronA's ``official`` layout (see the module docstring), is merged, or
            is not a Kronecker adapter; nothing is written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in .safetensors (the LoKr file format).")
    name = adapter_name or model.active_adapter
    tensors = _peft_lokr(model, name) if hasattr(model, "_inner") else _native(model, name)
    if not tensors:
        raise ValueError(
            f"adapter {name!r} has no Kronecker layers to export as LoKr; export works for DiffuseKronA "
            "(layout='kron'), KronA and peft LoKr adapters."
        )
    atomic_write({path.name: tensors}, path.parent)


def load_lokr(model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default") -> AdaptedModel:
    """Adapt ``model`` with a LoKr file of full factors (what :func:`export_lokr` writes for the ``kron`` layout)
    as a DiffuseKronA ``layout="kron"`` adapter, exactly.

    Every key is checked before the model changes: keys of modules the model does not have, factors whose
    ``w1 ⊗ w2`` does not match the layer's weight, and low-rank factors (load those with LyCORIS or
    diffusers' ``load_lora_adapter``) raise a ``ValueError`` that names them.
    """
    from safetensors.torch import load_file

    from .methods.diffusekrona import DiffuseKronAConfig

    state = load_file(str(path))
    linears = {_key(name): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        module, _, part = key.partition(".")
        groups.setdefault(module, {})[part] = value
    unknown = sorted(m for m in groups if m not in linears)
    bad, factors = [], set()
    for module, parts in sorted(groups.items()):
        if module in unknown:
            continue
        if set(parts) != {"lokr_w1", "lokr_w2", "alpha"}:
            bad.append(f"{module}: parts {sorted(parts)} (only full lokr_w1 / lokr_w2 / alpha load here)")
            continue
        weight = linears[module][1].weight
        (a1, a2), (b1, b2) = parts["lokr_w1"].shape, parts["lokr_w2"].shape
        if (a1 * b1, a2 * b2) != tuple(weight.shape):
            bad.append(f"{module}: w1 ⊗ w2 is {(a1 * b1, a2 * b2)}, the layer's weight {tuple(weight.shape)}")
        factors.add((a1, a2))
    if unknown or bad or len(factors) > 1:
        raise ValueError(
            f"{path} does not fit this {type(model).__name__} (a file for another model?)"
            f"\n  modules it does not have ({len(unknown)}): {unknown[:10]}"
            f"\n  factors that do not fit ({len(bad)}): {bad[:10]}"
            + (f"\n  differing w1 shapes {sorted(factors)}: one (a1, a2) per file" if len(factors) > 1 else "")
        )
    if not groups:
        raise ValueError(f"{path} holds no LoKr keys ('lora_unet_<module>.lokr_w1', ...).")
    (a1, a2) = factors.pop()
    names = [linears[m][0] for m in groups]
    config = DiffuseKronAConfig(a1=a1, a2=a2, layout="kron", target_modules=names, scale=1.0)
    adapted = adapt(model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for module, parts in groups.items():
            layer = adapted.base_model.get_submodule(linears[module][0]).adapters[adapter_name]
            layer.A.copy_(parts["lokr_w1"])
            layer.B.copy_(parts["lokr_w2"])
    for p in adapted.parameters():
        p.requires_grad_(False)
    return adapted


def _key(module_path: str) -> str:
    return f"{PREFIX}_{module_path}".replace(".", "_")


def _native(model: AdaptedModel, name: str) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for path, host in hosts(model.base_model):
        if name not in host.adapters:
            continue
        layer = host.adapters[name]
        if not isinstance(layer, KroneckerDelta):
            raise ValueError(f"{path}: {type(layer).__name__} is not a Kronecker adapter and has no LoKr form.")
        if name in host.merged:
            raise ValueError(f"{path}: adapter {name!r} is merged; call unmerge_adapter() before exporting.")
        if layer.layout != "kron":
            raise ValueError(
                f"{path}: layout={layer.layout!r} cannot be written as LoKr (its fixed output permutation Q makes "
                "ΔW = Q·(A ⊗ B) no Kronecker product); train with layout='kron' to export LoKr, or export the merged "
                "weights (merge_and_unload) or modalpeft's own files (save_adapter)."
            )
        key = _key(path)
        tensors[f"{key}.lokr_w1"] = (layer.A.detach() * layer.scaling).float()
        tensors[f"{key}.lokr_w2"] = layer.B.detach().float()
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    return tensors


def _peft_lokr(model: AdaptedModel, name: str) -> dict[str, Tensor]:
    from peft.tuners.lokr.layer import LoKrLayer

    tensors: dict[str, Tensor] = {}
    for path, module in model._inner.named_modules():
        if not isinstance(module, LoKrLayer) or name not in module.lokr_w1 and name not in module.lokr_w1_a:
            continue
        if not isinstance(module.get_base_layer(), nn.Linear) or name in getattr(module, "lokr_t2", {}):
            raise ValueError(f"{path}: only Linear peft LoKr layers without Tucker cores export as LoKr.")
        if name in module.merged_adapters:
            raise ValueError(f"{path}: adapter {name!r} is merged; call unmerge_adapter() before exporting.")
        key, scaling = _key(path), float(module.scaling[name])
        factors = {}
        for part in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            if name in getattr(module, part):
                factors[part] = getattr(module, part)[name].detach().float()
        first = "lokr_w1" if "lokr_w1" in factors else "lokr_w1_a"
        factors[first] = factors[first] * scaling  # the scale lives in w1, so alpha / r = 1 in every reader
        rank = next((factors[p].shape[1] for p in ("lokr_w1_a", "lokr_w2_a") if p in factors), 1)
        tensors.update({f"{key}.{part}": value for part, value in factors.items()})
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    return tensors
