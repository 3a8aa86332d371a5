"""PaCA: partial connection adaptation (Woo et al., ICLR 2025, https://arxiv.org/abs/2503.01905).

Official code: WooSunghyeon/paca (``peft/src/peft/tuners/paca/layer.py``, ``config.py``). Each targeted ``nn.Linear``
(``W ∈ R^{d_out x d_in}``) fine-tunes ``r`` randomly chosen input columns in place, instead of adding an adapter:
``idx = randperm(d_in)[:r]``, trainable ``P ∈ R^{d_out x r}``, ``s = alpha / r``, and

    y = x W'ᵀ + b,    W'[:, idx] = s · P,  the other columns of W frozen,

``P = W[:, idx] / s`` at the start (the official ``paca_init``: the model starts unchanged). The official forward
writes ``s · P`` into the weight in place and runs a custom autograd function that saves only ``x[..., idx]``; here
:class:`~modalpeft.core.layers.PartialColumns` runs the same product out of place (the base weight is never
written while training) with the same backward. Not reproduced: the official skip of the in-place write on every
``2 · grad_accum``-th training forward (a side effect of its in-place update). Merged exactly (``W[:, idx] = s · P``);
``idx`` is saved with ``P``.

Placement: ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and
``nn.MultiheadAttention``; the README adapts LLaMA's q, k, v, o, gate, up, down projections (LLaMA-2-7B MMLU script:
rank 16, alpha 64, lr 1e-4).

Trainable count: ``r · d_out`` per targeted Linear (LLaMA-2-7B, 7 projections, r = 16: 21,757,952).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets
from ..layers import PartialColumns
from ..registry import register_method


@dataclass
class PaCAConfig(AdapterConfig):
    """PaCA (registered as ``"paca"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    rank: int = field(default=8, metadata=_help("r, the input columns fine-tuned per Linear (official default: 8)."))
    alpha: float = field(default=8.0, metadata=_help("The columns are s · P with s = alpha / rank (official: 8)."))
    seed: int = field(default=0, metadata=_help("Seed of the random column choice (the chosen columns are saved)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (official default: 8).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha == 0:
            raise ValueError(f"alpha={self.alpha!r} must be a non-zero float (official default: 8.0).")


@register_method("paca", PaCAConfig, mergeable=True, paper="https://arxiv.org/abs/2503.01905")
def apply_paca(
    model: nn.Module, config: PaCAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = find_targets(model, config, types=(nn.Linear,))
    for name, linear in targets:  # checked before the model changes
        if config.rank > linear.in_features:
            raise ValueError(
                f"paca: rank={config.rank} exceeds the {linear.in_features} input columns of {name!r}; pass "
                f"rank <= {linear.in_features}, or exclude this module."
            )
    generator = torch.Generator().manual_seed(config.seed)
    for name, linear in targets:
        indices = torch.randperm(linear.in_features, generator=generator)[: config.rank]
        if state is not None and f"{name}.adapters.indices" in state:
            indices = state[f"{name}.adapters.indices"]  # the saved choice (the seed's draw, unless edited)
        layer = PartialColumns(
            linear.weight, indices, scaling=config.alpha / config.rank, init_weights=config.init_weights
        )
        attach(model, name, adapter_name, layer)
