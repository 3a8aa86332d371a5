"""Partial connections: ``r`` input columns of a frozen Linear weight replaced by trainable ones (PaCA).

PaCA: Woo et al., "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning", ICLR 2025,
https://arxiv.org/abs/2503.01905.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode


class PartialColumns(AdapterModule):
    """``y = x W'ᵀ + b`` where ``W'[:, idx] = s · P`` and the other columns are the frozen ``W``.

    The adapted Linear runs as one product (:meth:`replace_base`) whose backward keeps only the selected input
    features ``x[..., idx]`` (``(*, r)``): ``∂L/∂P = s · (∂L/∂y)ᵀ x[..., idx]`` and ``∂L/∂x = ∂L/∂y W'``. A frozen
    ``nn.Linear`` keeps no activation for its own backward and LoRA keeps ``x`` and ``A x``, so this is PaCA's
    activation-memory saving. ``W'`` is rebuilt in the backward (a weight-sized copy, no weight gradient).

    Args:
        weight: the frozen ``W`` (``(d_out, d_in)``); its selected columns are kept (``columns``, non-persistent)
            for :meth:`delta_weight`.
        indices: ``idx``, the ``r`` distinct input columns (``(r,)``, a persistent buffer: saved with ``P``).
        scaling: ``s`` (PaCA: ``paca_alpha / r``).
        init_weights: ``True``/``"identity"``: ``P = W[:, idx] / s`` (the official ``paca_init``, the identity);
            ``False``: that plus noise.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``P``: ``(d_out, r)``; :meth:`delta_weight`: ``(d_out, d_in)``
    """

    mergeable = True

    def __init__(self, weight: Tensor, indices: Tensor, *, scaling: float, init_weights: InitMode = True) -> None:
        super().__init__()
        self.scaling = scaling
        self.in_features = weight.shape[1]
        self.register_buffer("indices", indices.detach().to(device=weight.device, dtype=torch.long).clone())
        self.register_buffer("columns", weight.detach()[:, self.indices].clone(), persistent=False)
        self.P = nn.Parameter(torch.empty_like(self.columns))
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        self.P.copy_(self.columns / self.scaling)
        if init_weights is False:
            self.P.add_(torch.randn_like(self.P) * 0.1 * self.P.abs().mean().clamp_min(1e-3))

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        return _PartialLinear.apply(x, base.weight, base.bias, self.P, self.indices, self.scaling)

    def delta_weight(self) -> Tensor:
        delta = self.P.new_zeros(self.P.shape[0], self.in_features)
        return delta.index_copy(1, self.indices, self.P * self.scaling - self.columns)


class _PartialLinear(torch.autograd.Function):
    """``x W'ᵀ + b`` with ``W'[:, idx] = s · P``; saves ``x[..., idx]`` only (``W``, ``b`` frozen)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, P: Tensor, indices: Tensor, scaling: float
    ) -> Tensor:
        ctx.save_for_backward(x.index_select(-1, indices), weight, P, indices)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return nn.functional.linear(x, _adapted_weight(weight, P, indices, scaling), bias)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x_idx, weight, P, indices = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise RuntimeError("PaCA keeps only the selected input features; it cannot train the whole base weight")
        grad_x = grad_bias = grad_P = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _adapted_weight(weight, P, indices, ctx.scaling)
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])  # (T, d_out)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        if ctx.needs_input_grad[3]:
            grad_P = (grad_2d.t() @ x_idx.reshape(-1, x_idx.shape[-1]).to(grad_2d.dtype)) * ctx.scaling  # (d_out, r)
        return grad_x, None, grad_bias, grad_P.to(P.dtype) if grad_P is not None else None, None, None


def _adapted_weight(weight: Tensor, P: Tensor, indices: Tensor, scaling: float) -> Tensor:
    return weight.index_copy(1, indices, (P * scaling).to(weight.dtype))
