"""LoLDU: train the diagonal of an LDU decomposition (Shi et al., 2024, https://arxiv.org/abs/2410.13618).

Official code: SKDDJ/LoLDU (``minloldu/loldu.py``, ``minloldu/loldu_utils.py``). For each targeted ``nn.Linear``
with weight ``W`` (``d_out x d_in``): ``P, L, U = torch.linalg.lu(W)`` (partial pivoting), ``D = diag(U)``,
``U₁ = U / D`` (unit upper-triangular); keep the first ``r`` components ``L_r = L[:, :r]``, ``D_r = D[:r]``,
``U_r = U₁[:r]``, freeze the residual ``W_res = W − s · P L_r diag(D_r) U_r`` and train ``z ∈ R^r``:

    W' = W_res + s · P L_r diag(z) U_r,    z = D_r at the start ("lu" init: the model starts unchanged),

with ``s = alpha / r`` (the official ``scaling_factor``; ``from_linear``'s default ``lora_alpha = 1``). ``P``,
``L_r``, ``U_r`` and ``s`` are frozen (the official ``get_loldu_params`` trains names ending in ``vector_z`` only).
Implemented on :class:`~modalpeft.core.layers.FactorizedVector` (``W' = W + s · P L_r diag(z − D_r) U_r``),
which SVFit shares; ``P L_r`` is kept as one ``(d_out, r)`` matrix instead of the official dense ``(d_out, d_out)``
``P``. A pivot ``|D_i| ≈ 0`` for ``i < r`` (a rank-deficient weight) is an error, not a division by zero.

Placement: ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and
``nn.MultiheadAttention``, as the official ``add_loldu(model)`` does (its README example and ``demo.ipynb`` wrap every
``nn.Linear`` at rank 15; its default config is full rank, 768 for 768-wide models; ``add_loldu_by_name`` narrows it
to names).

Trainable count: ``r`` per targeted Linear (``rank=None``: ``r = min(d_in, d_out)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..layers.factorized import ldu_factors
from ..registry import register_method
from .svfit import attach_factorized, check_rank


@dataclass
class LoLDUConfig(AdapterConfig):
    """LoLDU (registered as ``"loldu"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    rank: int | None = field(
        default=None,
        metadata=_help("r, the number of LDU components kept per Linear; None: full rank min(d_in, d_out)."),
    )
    alpha: float = field(
        default=1.0, metadata=_help("The scale is alpha / rank (official from_linear default lora_alpha = 1).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.rank)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha == 0:
            raise ValueError(f"alpha={self.alpha!r} must be a non-zero float (official: 1.0, so the scale is 1/rank).")


@register_method("loldu", LoLDUConfig, mergeable=True, paper="https://arxiv.org/abs/2410.13618")
def apply_loldu(
    model: nn.Module, config: LoLDUConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    attach_factorized(
        model,
        config,
        adapter_name,
        lambda w, r, name: ldu_factors(w, r, where=f"loldu: {name!r}"),
        lambda r: config.alpha / r,
    )
