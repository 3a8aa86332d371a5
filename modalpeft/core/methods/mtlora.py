"""MTLoRA: LoRA with a transformation in its low-rank subspace (Liang, Wang, Li & Zeng, Neural Networks 2026,
https://arxiv.org/abs/2403.07440).

Official code: YaoLiang2023/MTLoRA (``transformation_matrix/{SHIM,ICFM,CTCM,DTSM}/xtuning_layers.py``, class
``Linear``; ``NLU/src/xtuninglib/xtuning_layers.py`` for GLUE). Each targeted ``nn.Linear`` gets

    y = W x + s · B T A drop(x),    s = alpha / r,

``A ∈ R^{r x d_in}``, ``B ∈ R^{d_out x r}`` and ``T ∈ R^{r x r}`` built from trainable ``C`` (and ``D``) in one of
four structures: **SHIM** ``T = C``, **ICFM** ``T = C Cᵀ``, **CTCM** ``T = C D``, **DTSM** ``T = C + D`` (LoRA is
``T = I``). ``A``, ``C``, ``D`` kaiming-uniform (a=√5), ``B = 0``: the model starts unchanged. Merged exactly
(``W += s · B T A``, as the official ``train()``/``eval()``). Built on :class:`~modalpeft.core.layers.LowRankDelta`.
(The official ICFM ``Embedding`` class applies ``Cᵀ C`` instead; its ``Linear``, used here, applies ``C Cᵀ``.)

Placement: ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and
``nn.MultiheadAttention``; the official GLUE runs adapt RoBERTa's query, value, intermediate and output dense, and
DeBERTaV3's query/key/value projections, attention output, intermediate and output dense.

Trainable count per Linear: ``r·(d_in + d_out) + r²`` (SHIM, ICFM) or ``+ 2r²`` (CTCM, DTSM).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets
from ..layers import LowRankDelta
from ..layers.low_rank import TRANSFORMS, Transform
from ..registry import register_method


@dataclass
class MTLoRAConfig(AdapterConfig):
    """MTLoRA (registered as ``"mtlora"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    structure: Transform = field(
        default="ICFM",
        metadata=_help(
            "T from C (and D): 'SHIM' T = C, 'ICFM' T = C Cᵀ (the official GLUE code's), 'CTCM' T = C D, "
            "'DTSM' T = C + D."
        ),
    )
    rank: int = field(default=8, metadata=_help("r, the rank of A and B (official GLUE: 8)."))
    alpha: float = field(default=16.0, metadata=_help("The branch is scaled by alpha / rank (official GLUE: 16)."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the branch input (official xtuning_dropout)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.structure not in TRANSFORMS:
            raise ValueError(f"structure={self.structure!r} is not one of {list(TRANSFORMS)}; pick one (upper case).")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (official: 8).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha={self.alpha!r} must be a float (official: 16.0).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 for no dropout.")


@register_method("mtlora", MTLoRAConfig, mergeable=True, paper="https://arxiv.org/abs/2403.07440")
def apply_mtlora(
    model: nn.Module, config: MTLoRAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    for name, linear in find_targets(model, config, types=(nn.Linear,)):
        layer = LowRankDelta(
            linear.in_features,
            linear.out_features,
            config.rank,
            scaling=config.alpha / config.rank,
            dropout=config.dropout,
            transform=config.structure,
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)
