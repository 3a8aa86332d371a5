"""A trainable vector inside a fixed factorisation of a frozen weight (SVFit, LoLDU).

SVFit: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
2024, https://arxiv.org/abs/2409.05926. LoLDU: Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
Decomposition for Parameter-Efficient Fine-Tuning", 2024, https://arxiv.org/abs/2410.13618.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .recompute import recompute_source


class FactorizedVector(AdapterModule):
    """``W' = W + s · F₁ diag(z − z₀) F₂`` with fixed factors ``F₁``, ``F₂`` and a trainable vector ``z``.

    A method splits the frozen weight as ``W = W_res + s · F₁ diag(z₀) F₂`` (SVFit: ``F₁ = U_r``, ``F₂ = V_rᵀ``,
    ``z₀ = σ_1..σ_r``, ``s = 1``; LoLDU: ``F₁ = P L_r``, ``F₂ = U_r``, ``z₀ = D_r``, ``s = α / r``) and trains
    ``z`` in place of ``z₀``: ``W' = W_res + s · F₁ diag(z) F₂``. The base weight stays ``W`` here, and the
    adapter adds the difference, which is the same weight and needs no copy of ``W_res``. ``z`` starts at ``z₀``,
    so the model starts unchanged. The adapted Linear is one product with ``W' = W + ΔW``, the update materialised
    once per forward (``r·d_out·d_in`` multiply-adds, independent of the number of tokens); merging adds it for good.

    Training cost. Autograd through ``W + ΔW`` would form the weight's gradient ``∂L/∂W' = gᵀx`` (a
    ``tokens·d_out·d_in`` product, full fine-tuning's) and keep ``x``. The backward here gives ``z`` its gradient
    directly, ``∂L/∂z_k = s Σ_t (g F₁)[t, k] · (x F₂ᵀ)[t, k]``, and ``∂L/∂x = g W + s ((g F₁) ⊙ Δz) F₂``, each in
    whichever form costs fewer multiply-adds for the layer and the batch (the factored one, ``tokens·r·(d_out +
    d_in)``, for LoLDU's small ranks; for a full-rank SVFit on a square Linear the weight-gradient form), and keeps
    of ``x`` only what recomputes it where the op before keeps that anyway
    (:func:`~modalpeft.core.layers.recompute.recompute_source`: a LayerNorm's or a GELU's input). Outputs and
    gradients equal autograd's through ``W + ΔW`` up to float rounding (tested).

    Exact factorisations (``exact=True``: ``W = s · F₁ diag(z₀) F₂`` up to float rounding, i.e. ``W_res ≈ 0``, as a
    full-rank SVFit has): in training, where it costs fewer multiply-adds, the layer runs the factored product alone,
    ``y = s ((x F₂ᵀ) ⊙ z) F₁ᵀ + b``, without ``W``: ``tokens·r·(d_in + d_out)`` each way instead of the frozen
    product's ``tokens·d_in·d_out`` plus the weight-sized materialisation and gradient, i.e. about 1.3x a frozen
    Linear's forward and backward on a ViT's ``qkv`` at full rank instead of about 2x. It keeps ``x F₂ᵀ``
    (``tokens x r``) for ``∂L/∂z = s Σ_t (g F₁) ⊙ (x F₂ᵀ)``. The output leaves out ``W_res`` (rounding: at most
    1e-5 of the largest weight when the method marks the layer exact), so a training forward can differ from the
    merged model's in the last float digits; evaluation and merging use ``W + ΔW``.

    The factors and ``z₀`` are non-persistent buffers: the method computes them from the base weight when it
    adapts (and again when an adapter is loaded onto the same base model), so a saved adapter holds ``z`` only.

    Args:
        left: ``F₁``, ``(d_out, r)``.
        right: ``F₂``, ``(r, d_in)``.
        start: ``z₀``, ``(r,)``.
        scaling: ``s``.
        init_weights: ``True``/``"identity"``: ``z = z₀`` (both papers' init); ``False``: ``z₀`` plus noise.
        exact: the factorisation reproduces the whole weight (see above; :func:`is_exact` decides it).

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``z``: ``(r,)``; :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(
        self,
        left: Tensor,
        right: Tensor,
        start: Tensor,
        *,
        scaling: float = 1.0,
        init_weights: InitMode = True,
        exact: bool = False,
    ) -> None:
        super().__init__()
        rank = start.shape[0]
        assert left.shape[1] == rank and right.shape[0] == rank and start.ndim == 1, (left.shape, right.shape)
        self.scaling = scaling
        self.exact = exact
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

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        """``x (W + ΔW)ᵀ + b`` with the lean backward (class docstring); on ``x`` flattened to ``(tokens, d_in)``."""
        tokens = x.numel() // max(x.shape[-1], 1)
        if (
            self.exact
            and torch.is_grad_enabled()
            and self.z.requires_grad
            and not base.weight.requires_grad
            and _factored_alone_is_cheaper(tokens, *base.weight.shape, self.z.shape[0])
        ):
            out = _FactorizedOnly.apply(x.reshape(-1, x.shape[-1]), base.bias, self.z, self)
            return out.view(*x.shape[:-1], out.shape[-1])
        tensors, recompute = recompute_source(x) or ((x,), None)
        out = _FactorizedLinear.apply(
            x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.z, self, recompute, *tensors
        )
        return out.view(*x.shape[:-1], out.shape[-1])


class _FactorizedLinear(torch.autograd.Function):
    """``x (W + s F₁ diag(z − z₀) F₂)ᵀ + b``; backward: ``∂L/∂z`` without the weight's gradient (``W``, ``b``
    frozen)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        z: Tensor,
        layer: FactorizedVector,
        recompute: Callable[..., Tensor] | None,
        *source: Tensor,
    ) -> Tensor:
        dz = (z - layer.start) * layer.scaling
        out = nn.functional.linear(x, _adapted_weight(weight, layer, dz), bias)
        ctx.layer, ctx.recompute, ctx.n = layer, recompute, len(source)
        ctx.save_for_backward(weight, dz, *source)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, dz, *source = ctx.saved_tensors
        layer = ctx.layer
        left, right = layer.left.to(grad.dtype), layer.right.to(grad.dtype)
        tokens, (d_out, d_in), rank = grad.shape[0], weight.shape, dz.shape[0]
        # extra multiply-adds over the frozen Linear's backward: (g F₁), (g F₁ ⊙ Δz) F₂ and x F₂ᵀ, against
        # W' again, gᵀx and F₁ᵀ (gᵀx)
        factored_cost, weight_cost = _backward_costs(tokens, d_out, d_in, rank)
        factored = factored_cost <= weight_cost
        grad_x = grad_weight = grad_bias = grad_z = None
        g_left = grad @ left if factored else None  # (T, r)
        if ctx.needs_input_grad[0]:
            if factored:
                grad_x = grad @ weight.to(grad.dtype) + (g_left * dz.to(grad.dtype)) @ right
            else:
                grad_x = grad @ _adapted_weight(weight, layer, dz).to(grad.dtype)
        x = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            x = ctx.recompute(*source) if ctx.recompute is not None else source[0]
            x = x.reshape(-1, x.shape[-1]).to(grad.dtype)
        if ctx.needs_input_grad[1]:  # a base weight that trains too (not the methods' setting)
            grad_weight = (grad.t() @ x).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        if ctx.needs_input_grad[3]:
            # Σ_t (g F₁)[t] ⊙ (x F₂ᵀ)[t], or diag(F₁ᵀ (gᵀ x) F₂ᵀ) through the weight-sized gradient when cheaper
            grad_z = (g_left * (x @ right.t())).sum(0) if factored else ((left.t() @ (grad.t() @ x)) * right).sum(1)
            grad_z = (grad_z * layer.scaling).to(dz.dtype)
        return grad_x, grad_weight, grad_bias, grad_z, None, None, *([None] * ctx.n)


class _FactorizedOnly(torch.autograd.Function):
    """``s ((x F₂ᵀ) ⊙ z) F₁ᵀ + b`` for an exact factorisation (``W_res ≈ 0``); keeps ``x F₂ᵀ``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, z: Tensor, layer: FactorizedVector) -> Tensor:
        left, right = layer.left.to(x.dtype), layer.right.to(x.dtype)
        projected = x @ right.t()  # (T, r)
        out = (projected * (z * layer.scaling).to(x.dtype)) @ left.t()
        if bias is not None:
            out = out + bias.to(out.dtype)
        ctx.layer = layer
        ctx.save_for_backward(projected, z)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        projected, z = ctx.saved_tensors
        layer = ctx.layer
        g_left = grad @ layer.left.to(grad.dtype)  # (T, r)
        grad_x = grad_bias = grad_z = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_left * (z * layer.scaling).to(grad.dtype)) @ layer.right.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.sum(0)
        if ctx.needs_input_grad[2]:
            grad_z = ((g_left * projected.to(grad.dtype)).sum(0) * layer.scaling).to(z.dtype)
        return grad_x, grad_bias, grad_z, None


def _factored_alone_is_cheaper(tokens: int, d_out: int, d_in: int, rank: int) -> bool:
    """Multiply-adds over a frozen Linear's forward and backward: the factored product alone (both ways
    ``tokens·r·(d_in + d_out)`` against the frozen ``tokens·d_in·d_out``) against :class:`_FactorizedLinear` (the
    materialised ``ΔW``, then the cheaper of its two backward forms)."""
    alone = 2 * tokens * (rank * (d_in + d_out) - d_in * d_out)
    return alone < rank * d_out * d_in + min(_backward_costs(tokens, d_out, d_in, rank))


def _backward_costs(tokens: int, d_out: int, d_in: int, rank: int) -> tuple[int, int]:
    """Extra multiply-adds of :class:`_FactorizedLinear`'s backward over the frozen Linear's: the factored form
    (``g F₁``, ``(g F₁ ⊙ Δz) F₂``, ``x F₂ᵀ``) and the weight-gradient form (``gᵀx``, ``F₁ᵀ (gᵀx)``, ``W'`` again)."""
    return tokens * rank * (d_out + 2 * d_in), tokens * d_out * d_in + 2 * rank * d_out * d_in


def is_exact(weight: Tensor, left: Tensor, right: Tensor, start: Tensor, scaling: float, tol: float = 1e-5) -> bool:
    """Whether ``s F₁ diag(z₀) F₂`` reproduces ``weight`` (largest difference at most ``tol`` of its largest
    entry): the factorisation keeps the whole weight, so the frozen rest ``W_res`` is rounding."""
    if weight.is_meta:
        return False
    w = weight.detach().float()
    rebuilt = (left.float() * (start.float() * scaling)) @ right.float()
    return bool((w - rebuilt).abs().max() <= tol * w.abs().max().clamp_min(1e-30))


def _adapted_weight(weight: Tensor, layer: FactorizedVector, dz: Tensor) -> Tensor:
    """``W + F₁ diag(Δz) F₂`` (``Δz`` already scaled)."""
    return weight + ((layer.left * dz) @ layer.right).to(weight.dtype)


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
