"""NeuroAda: a few trainable connections per neuron (Zhang et al., EMNLP 2025, https://arxiv.org/abs/2510.18940).

Official code: FightingFighting/NeuroAda (``utils/select_para.py::select_perCell``, ``utils/utils.py::update_model``,
``merge_model``). For each targeted ``nn.Linear`` with weight ``W`` (``d_out x d_in``), every output neuron (row
``i``) gets ``k`` trainable deltas on its ``k`` input connections of largest magnitude
(``topk(|W|, k, dim=1)``, the official "mag" selection), zero at the start:

    y = x (W + scatter(δ))ᵀ + b,    δ ∈ R^{d_out·k},  δ = 0 at the start (the model starts unchanged),

stored as (indices, values) and merged exactly (``W[i, j] += δ``). Training runs on
:class:`~modalpeft.core.layers.SparseDelta` in its fused form: one product with ``W + ΔW`` as the official
``F.linear(x, W.flatten().scatter_add(0, pos, δ).view_as(W), b)``, but with a backward of its own that computes the
``d_out·k`` gradients directly, where autograd through the official forward forms the dense ``(d_out, d_in)``
gradient of the adapted weight at every step.

Placement: ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and
``nn.MultiheadAttention``; the official LLaMA scripts adapt ``q, k, v, o, gate, up, down`` of every layer, biases and
the LM head untouched. Not implemented: the "gra" selection (``|∇W|`` from a batch) and the "appr" variant.

Trainable count: ``k · d_out`` per targeted Linear (LLaMA-7B, 7 projections: ``1,359,872 · k``; ``k = 20``:
0.404%, ``k = 1``: 0.020% of the model, the README's two rows). Where the official code silently caps ``k`` at
``d_in``, a ``k`` above a layer's fan-in is an error here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets
from ..layers import SparseDelta
from ..registry import register_method


@dataclass
class NeuroAdaConfig(AdapterConfig):
    """NeuroAda (registered as ``"neuroada"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    k: int = field(
        default=1,
        metadata=_help(
            "Trainable input connections per output neuron, those of largest |W| (official times_num: 1 or 20)."
        ),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"k={self.k!r} must be a positive integer (connections per neuron; the paper uses 1 or 20)."
            )


def top_connections(weight: Tensor, k: int) -> Tensor:
    """``(2, d_out·k)`` (row, column) pairs: each row's ``k`` entries of largest magnitude, in row-major order (the
    official positions, ``nonzero`` of the selection mask, have this order)."""
    cols = torch.topk(weight.detach().abs(), k, dim=1).indices.sort(dim=1).values  # (d_out, k)
    rows = torch.arange(weight.shape[0], device=weight.device).repeat_interleave(k)
    return torch.stack([rows, cols.flatten()])


@register_method("neuroada", NeuroAdaConfig, mergeable=True, paper="https://arxiv.org/abs/2510.18940")
def apply_neuroada(
    model: nn.Module, config: NeuroAdaConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = find_targets(model, config, types=(nn.Linear,))
    for name, linear in targets:  # checked before the model changes
        if config.k > linear.in_features:
            raise ValueError(
                f"neuroada: k={config.k} exceeds the fan-in of {name!r} ({linear.in_features} inputs per neuron); "
                f"pass k <= {linear.in_features}, or exclude this module."
            )
    for name, linear in targets:
        indices = top_connections(linear.weight, config.k)
        layer = SparseDelta(
            linear.in_features, linear.out_features, indices, init_weights=config.init_weights, fused=True
        )
        attach(model, name, adapter_name, layer)
