"""A trainable vector inside a fixed factorisation of a frozen weight (SVFit, LoLDU).

SVFit: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
2024, https://arxiv.org/abs/2409.05926. LoLDU: Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
Decomposition for Parameter-Efficient Fine-Tuning", 2024, https://arxiv.org/abs/2410.13618.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode


class FactorizedVector(AdapterModule):
    """``W' = W + s · F₁ diag(z − z₀) F₂`` with fixed factors ``F₁``, ``F₂`` and a trainable vector ``z``.

    A method splits the frozen weight as ``W = W_res + s · F₁ diag(z₀) F₂`` (SVFit: ``F₁ = U_r``, ``F₂ = V_rᵀ``,
    ``z₀ = σ_1..σ_r``, ``s = 1``; LoLDU: ``F₁ = P L_r``, ``F₂ = U_r``, ``z₀ = D_r``, ``s = α / r``) and trains
    ``z`` in place of ``z₀``: ``W' = W_res + s · F₁ diag(z) F₂``. The base weight stays ``W`` here, and the
    adapter adds the difference, which is the same weight and needs no copy of ``W_res``. ``z`` starts at ``z₀``,
    so the model starts unchanged. The update is materialised once per forward (``r·d_out·d_in``
    multiply-adds, independent of the number of tokens) and added to the base weight
    (:meth:`param_deltas`); merging adds it for good.

    The factors and ``z₀`` are non-persistent buffers: the method computes them from the base weight when it
    adapts (and again when an adapter is loaded onto the same base model), so a saved adapter holds ``z`` only.

    Args:
        left: ``F₁``, ``(d_out, r)``.
        right: ``F₂``, ``(r, d_in)``.
        start: ``z₀``, ``(r,)``.
        scaling: ``s``.
        init_weights: ``True``/``"identity"``: ``z = z₀`` (both papers' init); ``False``: ``z₀`` plus noise.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``z``: ``(r,)``; :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(
        self, left: Tensor, right: Tensor, start: Tensor, *, scaling: float = 1.0, init_weights: InitMode = True
    ) -> None:
        super().__init__()
        rank = start.shape[0]
        assert left.shape[1] == rank and right.shape[0] == rank and start.ndim == 1, (left.shape, right.shape)
        self.scaling = scaling
        self.register_buffer("left", left.detach().clone(), persistent=False)
        self.register_buffer("right", right.detach().clone(), persistent=False)
        self.register_buffer("start", start.detach().clone(), persistent=False)
        self.z = nn.Parameter(torch.empty_like(self.start))
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        self.z.copy_(self.start)
        if init_weights is False:
            spread = self.start.abs().mean().clamp_min(1e-3)
            self.z.add_(torch.randn_like(self.z) * 0.1 * spread)

    def delta_weight(self) -> Tensor:
        return (self.left * ((self.z - self.start) * self.scaling)) @ self.right  # (d_out, r) (r, d_in)

    def param_deltas(self, base: nn.Module) -> dict[str, Tensor]:
        return {"weight": self.delta_weight().to(base.weight.dtype)}


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` SVD of ``weight`` in float32: ``(U_r, V_rᵀ, σ_1..σ_r)``."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u[:, :rank], vh[:rank], s[:rank]


def ldu_factors(
    weight: Tensor, rank: int, *, where: str = "weight", eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """The first ``rank`` components of the LDU decomposition of ``weight`` in float32: ``(P L_r, U_r, D_r)``.

    ``P, L, U = torch.linalg.lu(W)`` (partial pivoting, ``W = P L U``), ``D = diag(U)`` and ``U₁ = U / D`` (unit
    upper-triangular), as LoLDU's official ``ldu_decomposition``; ``P L_r`` is formed once (``(d_out, r)``)
    instead of keeping the dense ``(d_out, d_out)`` permutation.

    Raises:
        ValueError: a pivot ``D_i`` (``i < rank``) is (nearly) zero, i.e. ``rank`` exceeds the weight's rank: ``U / D``
            would blow up.
    """
    p, lower, upper = torch.linalg.lu(weight.detach().float())
    diag = torch.diagonal(upper)
    small = (diag[:rank].abs() < eps * diag.abs().max().clamp_min(1e-30)).nonzero()
    if small.numel():
        i = int(small[0])
        raise ValueError(
            f"{where}: LDU pivot D[{i}] = {float(diag[i]):.3g} is (nearly) zero, so rank={rank} exceeds the numerical "
            f"rank of this weight (the first {i} pivots are usable); pass rank <= {i}, or exclude this module."
        )
    unit_upper = upper[:rank] / diag[:rank, None]
    return p @ lower[:, :rank], unit_upper, diag[:rank]
