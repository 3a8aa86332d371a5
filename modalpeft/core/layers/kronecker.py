"""Kronecker delta: ``ΔW = s · (A ⊗ B)`` beside a frozen Linear (KronA, DiffuseKronA).

KronA (Edalati et al., 2022, https://arxiv.org/abs/2212.10650) and DiffuseKronA (Marjit et al., WACV 2025)
replace LoRA's low-rank product by a Kronecker product of two small factors. The branch never forms ``ΔW``:
``(A ⊗ B) x`` is computed as ``A X Bᵀ`` on ``x`` viewed as an ``(a2, b2)`` matrix.

DiffuseKronA's official code reads the ``(a1, b1)`` result out transposed, which is ``ΔW = Q · (A ⊗ B)`` with
the fixed output perfect shuffle ``Q``: ``out[r·a1 + s] = v[s·b1 + r]`` (``layout="official"``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def most_square_factor(n: int) -> int:
    """The divisor of ``n`` closest to ``√n`` (the smaller one on a tie), e.g. 768 -> 24, 64 -> 8, 7 -> 1.

    Used for the default Kronecker factor sizes: ``a1 = most_square_factor(d_out)`` gives the most balanced
    split ``d_out = a1 · b1``.
    """
    if n < 1:
        raise ValueError(f"most_square_factor needs a positive integer, got {n}")
    below = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)  # the largest divisor <= √n
    above = n // below  # the smallest divisor >= √n
    root = math.sqrt(n)
    return below if root - below <= above - root else above


def check_kron_factors(in_features: int, out_features: int, a1: int, a2: int, where: str = "") -> None:
    """Raise a ``ValueError`` unless ``a1`` divides ``d_out`` and ``a2`` divides ``d_in``.

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        a1: rows of ``A``; must divide ``d_out``.
        a2: columns of ``A``; must divide ``d_in``.
        where: the module's name, for the message.
    """
    problems = []
    if a1 < 1 or out_features % a1:
        problems.append(f"a1={a1} does not divide d_out={out_features} (valid a1: {divisors(out_features)})")
    if a2 < 1 or in_features % a2:
        problems.append(f"a2={a2} does not divide d_in={in_features} (valid a2: {divisors(in_features)})")
    if problems:
        at = f" at {where!r}" if where else ""
        raise ValueError(
            f"Kronecker factors do not fit the layer{at} (d_in={in_features}, d_out={out_features}): "
            f"{'; '.join(problems)}. Pick a1 from the divisors of d_out and a2 from those of d_in, or leave them "
            "None for the most-square split."
        )


class KroneckerDelta(AdapterModule):
    """A parallel Kronecker update ``y = W x + s · (A ⊗ B) drop(x)``.

    With ``x`` viewed as ``X ∈ R^{a2×b2}`` (row-major, ``X[j, l] = x[j·b2 + l]``), ``(A ⊗ B) x`` is
    ``vec(A X Bᵀ)`` read row-major, since ``(A ⊗ B)[i·b1 + k, j·b2 + l] = A[i, j] B[k, l]``; this is exactly
    ``x @ torch.kron(A, B).T``. ``A X Bᵀ`` is evaluated in the cheaper order: ``(A X) Bᵀ`` costs
    ``a1·d_in + d_out·b2`` multiply-adds per token, ``A (X Bᵀ)`` costs ``b1·d_in + d_out·a2`` (DiffuseKronA's a1=64,
    a2=8 on a 1280-wide projection: 286,720 against 35,840), instead of ``d_in·d_out`` for the dense ``ΔW``. Either
    way only ``X`` is kept for the backward pass, which recomputes the intermediates it needs (autograd's two
    matmuls would also keep ``A X`` or ``X Bᵀ``).

    Args:
        in_features: ``d_in`` of the adapted Linear.
        out_features: ``d_out`` of the adapted Linear.
        a1: rows of ``A``; must divide ``d_out`` (``b1 = d_out / a1``).
        a2: columns of ``A``; must divide ``d_in`` (``b2 = d_in / a2``).
        scaling: ``s`` (1.0 in KronA's and DiffuseKronA's code).
        dropout: dropout on the branch input.
        init_weights: ``True``/``"identity"``: ``A ~ N(0, (1/a1)²)``, ``B = 0`` (DiffuseKronA's init, so
            ``ΔW = 0``); ``False``: both random.
        layout: ``"kron"``: ``ΔW = s · (A ⊗ B)``. ``"official"``: ``ΔW = s · Q · (A ⊗ B)``, DiffuseKronA's
            reshape sequence (``A X Bᵀ`` read out transposed), ``Q`` the output shuffle of the module docstring.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``A``: ``(a1, a2)``, ``B``: ``(b1, b2)``; :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a1: int,
        a2: int,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        init_weights: InitMode = True,
        layout: Literal["kron", "official"] = "kron",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_kron_factors(in_features, out_features, a1, a2)
        if layout not in ("kron", "official"):
            raise ValueError(f"layout={layout!r} is not valid; use 'kron' (A ⊗ B) or 'official' (DiffuseKronA's code).")
        self.layout = layout
        self.a1, self.a2 = a1, a2
        self.b1, self.b2 = out_features // a1, in_features // a2
        self.scaling = scaling
        self.right_first = self.b1 * in_features + out_features * a2 < a1 * in_features + out_features * self.b2
        self.A = nn.Parameter(torch.empty(a1, a2, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(self.b1, self.b2, device=device, dtype=dtype))
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        nn.init.normal_(self.A, std=1.0 / self.a1)
        if init_weights is False:
            nn.init.normal_(self.B, std=0.1)
        else:
            nn.init.zeros_(self.B)

    def parallel(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = self.drop(x).reshape(*lead, self.a2, self.b2)  # (*, a2, b2)
        # (a1, a2) @ (*, a2, b2) @ (b2, b1) -> (*, a1, b1), in the cheaper order (see the class docstring)
        y = _KroneckerProduct.apply(x, self.A, self.B, self.right_first)
        if self.layout == "official":
            y = y.transpose(-1, -2)  # (*, b1, a1): out[r·a1 + s] = y[s, r]
        return y.reshape(*lead, self.a1 * self.b1) * self.scaling

    def delta_weight(self) -> Tensor:
        delta = torch.kron(self.A, self.B) * self.scaling  # (d_out, d_in), row s·b1 + r
        if self.layout == "official":
            delta = delta.reshape(self.a1, self.b1, -1).transpose(0, 1).reshape(self.a1 * self.b1, -1)
        return delta

    def extra_repr(self) -> str:
        return f"A=({self.a1}, {self.a2}), B=({self.b1}, {self.b2}), scaling={self.scaling}, layout={self.layout!r}"


class _KroneckerProduct(torch.autograd.Function):
    """``Y = A X Bᵀ`` per token (``X``: ``(*, a2, b2)``), keeping only ``X`` (and the parameters) for backward:
    autograd's two matmuls would also keep the intermediate ``A X``, as large as the input, at every adapted layer.
    Backward recomputes what it needs in the forward's cheaper order: ``dX = Aᵀ G B``, and over tokens
    ``dA = Σ G (X Bᵀ)ᵀ = Σ (G B) Xᵀ``, ``dB = Σ Gᵀ (A X) = Σ (Aᵀ G)ᵀ X``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor, right_first: bool) -> Tensor:
        ctx.save_for_backward(x, a, b)
        ctx.right_first = right_first
        return a @ (x @ b.t()) if right_first else (a @ x) @ b.t()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        x, a, b = (t.to(grad.dtype) for t in saved)  # under autocast the forward ran in grad's dtype
        if ctx.right_first:  # the cheap products are X Bᵀ and Aᵀ G: dB = Σ (Aᵀ G)ᵀ X
            a_grad = a.t() @ grad  # (*, a2, b1)
            grad_x = a_grad @ b
            grad_a = torch.einsum("...sr,...tr->st", grad, x @ b.t())
            grad_b = torch.einsum("...tr,...tq->rq", a_grad, x)
        else:  # the cheap products are A X and G B: dA = Σ (G B) Xᵀ
            grad_b_ = grad @ b  # (*, a1, b2)
            grad_x = a.t() @ grad_b_
            grad_a = torch.einsum("...sq,...tq->st", grad_b_, x)
            grad_b = torch.einsum("...sr,...sq->rq", grad, a @ x)
        needs = ctx.needs_input_grad
        grad_x = grad_x.to(saved[0].dtype) if needs[0] else None
        grad_a = grad_a.to(saved[1].dtype) if needs[1] else None
        grad_b = grad_b.to(saved[2].dtype) if needs[2] else None
        return grad_x, grad_a, grad_b, None
