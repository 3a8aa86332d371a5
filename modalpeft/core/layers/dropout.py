"""Dropout whose backward keeps a one-byte mask on the CPU (the adapter layers' input dropout), and the product of a
dropped input with an adapter's down-projection that keeps neither the dropped input nor, where the layer before
keeps what recomputes it, the input itself (:func:`dropped_product`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recompute import recompute_source


class MaskDropout(nn.Dropout):
    """``nn.Dropout`` with the same outputs, gradients and random draws, and a cheaper backward on the CPU.

    On the CPU, PyTorch's dropout multiplies by a float noise tensor (``bernoulli(1 - p) / (1 - p)``) and autograd
    keeps that noise for backward: 4 bytes per element of the input (CUDA's fused kernel keeps a one-byte mask).
    Here the same noise is drawn the same way (one ``bernoulli_`` on a tensor like the input, so the random stream
    and the output match ``nn.Dropout`` bit for bit) and backward keeps it as a ``bool`` mask, rebuilding the scale
    from it: a quarter of the bytes. An adapter's input dropout sits on a block's widest activations (SPT's LoRA on
    ``fc2`` drops its 3,072-wide input), so the difference shows in the activation-memory figure. Elsewhere (eval,
    ``p`` of 0 or 1, other devices, no gradient) it is ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        lean = (
            self.training
            and 0 < self.p < 1
            and not self.inplace
            and x.device.type == "cpu"
            and x.requires_grad
            and torch.is_grad_enabled()
        )
        return _DropoutKeepsMask.apply(x, self.p) if lean else super().forward(x)


class _DropoutKeepsMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)  # as ATen's CPU dropout draws it
        ctx.save_for_backward(noise.bool())
        ctx.p = p
        return x * noise.div_(1 - p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype).div_(1 - ctx.p), None


def dropped_product(x: Tensor, weight: Tensor, p: float, training: bool) -> Tensor:
    """``dropout(x, p) @ weightᵀ`` (an adapter's down-projection ``A`` of ``(r, d_in)`` on its dropped input), with the
    outputs and gradients of ``MaskDropout(p)(x) @ weight.t()`` and a leaner backward.

    The plain form keeps the dropped input (4 bytes per element of ``x``, a new tensor) for ``A``'s gradient. Here
    backward keeps a one-byte mask and recomputes the dropped input from ``x``; and ``x`` itself is not kept where the
    operation that made it keeps what recomputes it anyway (:func:`recompute_source`: a GELU keeps its input, a
    LayerNorm its input and statistics), so an adapter on ``fc2`` (after the MLP's GELU) or after a norm (``qkv``,
    ``fc1``) adds only the mask to what the frozen model saves. Where ``x`` is kept by the op after it (attention
    outputs), keeping ``x`` costs nothing either. The dropout draws its noise as :class:`MaskDropout` does (same
    random stream, same output bit for bit); a recomputed LayerNorm output equals the original up to float rounding
    (gradients within 1e-6 relative, tested). In eval mode, without gradients or on inputs that need none, it is the
    plain product."""
    lean = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and 0 <= p < 1
    if not lean:
        return F.dropout(x, p, training) @ weight.t()
    tensors, recompute = recompute_source(x) or ((x,), None)
    return _DroppedProduct.apply(x, weight, p if training else 0.0, recompute, *tensors)


def dropout_rate(drop: nn.Module) -> float:
    """The rate of an adapter's input dropout module (:class:`MaskDropout`, or ``nn.Identity`` when it has none)."""
    return drop.p if isinstance(drop, nn.Dropout) else 0.0


class _DroppedProduct(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, p: float, recompute: Callable[..., Tensor] | None, *source: Tensor
    ) -> Tensor:
        if p > 0:
            noise = torch.empty_like(x).bernoulli_(1 - p)  # as MaskDropout (and ATen's CPU dropout) draws it
            mask = noise.bool()
            out = (x * noise.div_(1 - p)) @ weight.t()
        else:
            mask, out = None, x @ weight.t()
        ctx.p, ctx.recompute, ctx.n = p, recompute, len(source)
        ctx.save_for_backward(weight, *source, *((mask,) if mask is not None else ()))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, *rest = ctx.saved_tensors
        source, mask = rest[: ctx.n], rest[ctx.n] if ctx.p > 0 else None
        scale = mask.to(grad.dtype).div_(1 - ctx.p) if mask is not None else None
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(grad.dtype)
            if scale is not None:
                grad_x = grad_x * scale
        if ctx.needs_input_grad[1]:
            x = ctx.recompute(*source) if ctx.recompute is not None else source[0]
            dropped = x * scale if scale is not None else x
            grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])
        return grad_x, grad_weight, None, None, *([None] * ctx.n)


__all__ = ["MaskDropout", "dropout_rate", "dropped_product"]
