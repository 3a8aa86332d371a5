"""MaskDropout: nn.Dropout's outputs, gradients and random stream, with a one-byte mask kept for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalpeft.core.layers import LowRankDelta, MaskDropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 33), (1000,)])
def test_same_as_nn_dropout_bit_for_bit(dtype, shape):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    grad = torch.randn(*shape, dtype=dtype)
    results = []
    for module in (nn.Dropout(0.1), MaskDropout(0.1)):
        torch.manual_seed(5)
        x.grad = None
        y = module.train()(x)
        y.backward(grad)
        results.append((y.detach(), x.grad.clone(), torch.rand(4)))  # the random stream after it, too
    for ours, torchs in zip(*results, strict=True):
        assert torch.equal(ours, torchs)


def test_backward_keeps_a_bool_mask_not_the_float_noise():
    x = torch.randn(4, 50, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaskDropout(0.3).train()(x)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]


def test_eval_and_no_grad_are_plain_dropout():
    x = torch.randn(5, 8)
    assert torch.equal(MaskDropout(0.5).eval()(x), x)
    torch.manual_seed(0)
    plain = nn.Dropout(0.5).train()(x)
    torch.manual_seed(0)
    assert torch.equal(MaskDropout(0.5).train()(x), plain)  # x needs no gradient: nn.Dropout itself


def test_adapter_layers_use_it():
    assert isinstance(LowRankDelta(8, 8, 2, dropout=0.1).drop, MaskDropout)
