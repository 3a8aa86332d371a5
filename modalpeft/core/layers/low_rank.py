"""Low-rank delta: ``ΔW = s · B A`` beside a frozen Linear (LoRA's form, for native methods), optionally gated
``ΔW = s · B diag(g) A`` (SoRA) or with an ``r x r`` transformation ``ΔW = s · B T A`` (MTLoRA)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout, dropout_rate, dropped_product

Transform = Literal["SHIM", "ICFM", "CTCM", "DTSM"]
TRANSFORMS: tuple[str, ...] = ("SHIM", "ICFM", "CTCM", "DTSM")
"""MTLoRA's structures of ``T`` from ``C`` (and ``D``): ``C``, ``C Cᵀ``, ``C D``, ``C + D``."""


class LowRankDelta(AdapterModule):
    """A parallel low-rank update ``y = W x + s · B A drop(x)``, or ``s · B (g ⊙ A drop(x))`` with a gate, or
    ``s · B T A drop(x)`` with a transformation ``T ∈ R^{r x r}`` built from trainable ``C`` (and ``D``): SHIM
    ``T = C``, ICFM ``T = C Cᵀ``, CTCM ``T = C D``, DTSM ``T = C + D`` (MTLoRA).

    Used by SPT's structured tuning, TMoE-like experts and text methods (SoRA's gated form); peft's LoRA is used
    through peft.

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        rank: ``r``.
        scaling: ``s`` (SPT uses 1.0, i.e. no ``alpha / r``).
        dropout: dropout on the branch input.
        gated: a trainable gate ``g`` between the factors (SoRA; drawn ``N(0, 1)`` as the official code does).
        transform: MTLoRA's structure of ``T`` (``None``: no transformation); ``C``, ``D`` kaiming-uniform (a=√5)
            as the official code.
        init_weights: ``True``/``"identity"``: ``A`` kaiming-uniform (a=√5), ``B = 0`` (LoRA's init, the
            identity); ``False``: both random.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``A``: ``(r, d_in)``, ``B``: ``(d_out, r)``, ``gate``: ``(1, r)``, ``C``, ``D``: ``(r, r)``;
          :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        gated: bool = False,
        transform: Transform | None = None,
        init_weights: InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.empty(1, rank, device=device, dtype=dtype)) if gated else None
        if transform is not None and transform not in TRANSFORMS:
            raise ValueError(f"transform={transform!r} is not one of {TRANSFORMS} (or None)")
        self.transform = transform
        self.C = self.D = None
        if transform is not None:
            self.C = nn.Parameter(torch.empty(rank, rank, device=device, dtype=dtype))
        if transform in ("CTCM", "DTSM"):
            self.D = nn.Parameter(torch.empty(rank, rank, device=device, dtype=dtype))
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if self.gate is not None:
            nn.init.normal_(self.gate)
        for m in (self.C, self.D):
            if m is not None:
                nn.init.kaiming_uniform_(m, a=math.sqrt(5))
        if init_weights is False:
            nn.init.normal_(self.B, std=0.1)
        else:
            nn.init.zeros_(self.B)

    def parallel(self, x: Tensor) -> Tensor:
        return self.up(dropped_product(x, self.A, dropout_rate(self.drop), self.training))  # A drop(x): (*, r)

    def up(self, h: Tensor) -> Tensor:
        """The branch after ``A``: ``s · B (g ⊙ T h)`` for ``h = A drop(x)`` of shape ``(*, r)``."""
        if self.gate is not None:
            h = h * self.gate
        if self.transform is not None:
            h = h @ self.matrix_t().t()  # (*, r): T acts on A x
        return (h @ self.B.t()) * self.scaling

    def matrix_t(self) -> Tensor:
        """MTLoRA's ``T`` (``(r, r)``)."""
        C, D = self.C, self.D
        if self.transform == "SHIM":
            return C
        if self.transform == "ICFM":
            return C @ C.t()
        return C @ D if self.transform == "CTCM" else C + D

    def delta_weight(self) -> Tensor:
        A = self.A if self.gate is None else self.A * self.gate.t()  # diag(g) A: (r, d_in)
        if self.transform is not None:
            A = self.matrix_t() @ A  # T A: (r, d_in)
        return (self.B @ A) * self.scaling
