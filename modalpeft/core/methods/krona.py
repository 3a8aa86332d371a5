"""KronA: Kronecker adapters (Edalati et al., 2022, https://arxiv.org/abs/2212.10650).

Each targeted ``nn.Linear`` gets a parallel update ``ΔW = s · (A ⊗ B)`` with ``A ∈ R^{a1×a2}`` and
``B ∈ R^{(d_out/a1)×(d_in/a2)}``, computed without forming ``ΔW`` (see :class:`KroneckerDelta`) and merged
exactly. ``A ~ N(0, (1/a1)²)`` and ``B = 0`` at the start (DiffuseKronA's init), so the model starts
unchanged. Trainable count per layer: ``a1·a2 + (d_out/a1)·(d_in/a2)``.

Placement: ``target_modules=None`` adapts every ``nn.Linear`` of the model except the ``modules_to_save``
(e.g. the new head) and the Linears inside ``nn.MultiheadAttention`` (it reads their weights directly and never
calls them). KronA's paper adapts the attention projections and DiffuseKronA its UNet's ``to_q``, ``to_k``,
``to_v``, ``to_out.0``: pass those names (``["qkv", "proj"]`` in a timm ViT) to follow them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets
from ..layers import KroneckerDelta
from ..layers.kronecker import check_kron_factors, most_square_factor
from ..registry import register_method


@dataclass
class KronAConfig(AdapterConfig):
    """KronA. ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and attention."""

    a1: int | None = field(
        default=None,
        metadata=_help("Rows of A; must divide every target's d_out. None: the most-square factor of each d_out."),
    )
    a2: int | None = field(
        default=None,
        metadata=_help("Columns of A; must divide every target's d_in. None: the most-square factor of each d_in."),
    )
    scaling: float = field(default=1.0, metadata=_help("Scale s of the Kronecker branch."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the branch input."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("a1", "a2"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{name}={value!r} must be a positive integer that divides the layers' dims, or None for the "
                    "most-square factor."
                )
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r} must be a float (e.g. 1.0).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 for no dropout.")


@register_method("krona", KronAConfig, mergeable=True, paper="https://arxiv.org/abs/2212.10650")
def apply_krona(
    model: nn.Module, config: KronAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    attach_kronecker(model, config, adapter_name, scaling=config.scaling, dropout=config.dropout)


def attach_kronecker(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str,
    *,
    scaling: float,
    dropout: float = 0.0,
    layout: Literal["kron", "official"] = "kron",
    default: list[str] | None = None,
) -> None:
    """Attach a :class:`KroneckerDelta` to every Linear that ``config`` selects (KronA, DiffuseKronA).

    ``config.a1`` / ``config.a2`` (``None``: the most-square factor of each layer) are checked on every target
    before the model changes, so a factor that does not divide a layer raises with the model untouched.
    """
    targets = find_targets(model, config, default=default, types=(nn.Linear,))
    plans = []
    for name, module in targets:  # every factor is checked before the model changes
        a1 = config.a1 if config.a1 is not None else most_square_factor(module.out_features)
        a2 = config.a2 if config.a2 is not None else most_square_factor(module.in_features)
        check_kron_factors(module.in_features, module.out_features, a1, a2, where=name)
        plans.append((name, module.in_features, module.out_features, a1, a2))
    for name, d_in, d_out, a1, a2 in plans:
        layer = KroneckerDelta(
            d_in, d_out, a1, a2, scaling=scaling, dropout=dropout, init_weights=config.init_weights, layout=layout
        )
        attach(model, name, adapter_name, layer)
