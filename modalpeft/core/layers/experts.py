"""Routed mixture of low-rank experts beside a frozen Linear (TMoE, SPMTrack).

SPMTrack: Cai et al., "SPMTrack: Spatio-Temporal Parameter-Efficient Fine-Tuning with Mixture of Experts for
Scalable Visual Tracking", CVPR 2025, https://arxiv.org/abs/2503.18338.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout


class LowRankExperts(AdapterModule):
    """A parallel branch ``y = W x + s · Σ_i g_i(x) · B_i A drop(x)`` with ``g(x) = softmax(W_g x)``.

    With ``shared_expert=True`` an always-on up-projection ``B_s`` is added without a gate:
    ``y = W x + s · (B_s + Σ_i g_i(x) · B_i) A drop(x)``.

    One down-projection ``A`` is shared by all experts; each expert ``i`` has its own up-projection ``B_i``. The
    router ``W_g`` weighs the experts per token with a softmax: dense soft routing, no top-k, no balance loss.
    The gates depend on the input, so the branch has no fixed weight delta and cannot be merged.

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        rank: ``r``, the width of ``A``.
        num_experts: ``E``.
        alpha: the scaling is ``s = alpha / r`` (default: ``alpha = r``, so ``s = 1``; SPMTrack: r = α = 64).
        dropout: dropout on the input of ``A`` (the router sees the undropped input).
        init_weights: ``True``: SPMTrack's ``'bert'`` init, ``trunc_normal(std=0.02)`` for ``A`` and every
            ``B_i`` (not the identity); ``"identity"``: the same ``A``, ``B = 0``; ``False``: ``A`` and ``B``
            ``N(0, 0.1²)``. The router always gets PyTorch's default Linear init. ``B_s`` is initialised as ``B``.
        shared_expert: add SPMTrack's ungated shared expert ``B_s`` (off in its config).

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``A``: ``(r, d_in)``, ``B``: ``(E, d_out, r)``, ``router.weight``: ``(E, d_in)``, ``B_s``: ``(d_out, r)``
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_experts: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        init_weights: InitMode = True,
        shared_expert: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        self.scaling = (rank if alpha is None else alpha) / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(num_experts, out_features, rank, device=device, dtype=dtype))
        self.B_s = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype)) if shared_expert else None
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        self.router.reset_parameters()
        ups = [self.B] if self.B_s is None else [self.B, self.B_s]
        if init_weights is False:
            for param in (self.A, *ups):
                nn.init.normal_(param, std=0.1)
            return
        nn.init.trunc_normal_(self.A, std=0.02)
        for param in ups:
            if init_weights == "identity":
                nn.init.zeros_(param)
            else:
                nn.init.trunc_normal_(param, std=0.02)

    def merge_hint(self) -> str:
        shared = (
            "; the shared expert's s·B_s·A alone is a fixed update, but the gated experts are not, so nothing is merged"
            if self.B_s is not None
            else ""
        )
        return (
            "the expert gates softmax(W_g x) depend on the input, so the experts add no fixed weight delta"
            f"{shared}; for a mergeable low-rank update train LoRA (peft.LoraConfig) instead"
        )

    def parallel(self, x: Tensor) -> Tensor:
        num_experts, out_features, rank = self.B.shape
        gates = self.router(x).softmax(dim=-1)  # (*, E)
        h = self.drop(x) @ self.A.t()  # (*, r)
        # Gate-weighted copies of h side by side, (*, E·r), against all B_i side by side, (d_out, E·r):
        # one matmul sums g_i · B_i h over the experts.
        z = (gates.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        b_cat = self.B.permute(1, 0, 2).reshape(out_features, num_experts * rank)
        if self.B_s is not None:  # the ungated shared expert: one more block with gate 1
            z = torch.cat([h, z], dim=-1)
            b_cat = torch.cat([self.B_s, b_cat], dim=1)
        return (z @ b_cat.t()) * self.scaling
