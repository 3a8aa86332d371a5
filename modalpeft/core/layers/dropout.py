"""Dropout whose backward keeps a one-byte mask on the CPU (the adapter layers' input dropout)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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


__all__ = ["MaskDropout"]
