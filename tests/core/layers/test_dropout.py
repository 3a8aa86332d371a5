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


# -- dropped_product: drop(x) @ Aᵀ keeping a mask and what recomputes x ---------------------------------------------

D_IN, RANK = 24, 4


def _producers():
    """``name -> f(t)``: how the adapter's input ``x`` is made from a leaf ``t``."""
    norm = nn.LayerNorm(D_IN)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2), norm.bias.normal_(0.0, 0.2)
    bare = nn.LayerNorm(D_IN, elementwise_affine=False)
    return {
        "leaf": lambda t: t,
        "gelu": nn.functional.gelu,
        "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh"),
        "layer_norm": norm,
        "layer_norm_no_affine": bare,
        "other op": torch.tanh,  # not recomputed: x itself is kept
    }


@pytest.mark.parametrize("producer", list(_producers()))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_dropped_product_matches_dropout_then_product(producer, p):
    """Outputs bit for bit (the same noise from the same random stream) and the gradients of x, A and everything
    before x within float rounding, against ``MaskDropout(p)(x) @ A.t()``."""
    from modalpeft.core.layers.dropout import dropped_product

    make = _producers()[producer]
    torch.manual_seed(0)
    t = torch.randn(3, 5, D_IN, requires_grad=True)
    weight = torch.randn(RANK, D_IN, requires_grad=True)
    grad = torch.randn(3, 5, RANK)
    results = []
    for lean in (False, True):
        t.grad = weight.grad = None
        torch.manual_seed(7)
        x = make(t)
        y = dropped_product(x, weight, p, True) if lean else MaskDropout(p).train()(x) @ weight.t()
        (y * grad).sum().backward()
        results.append((y.detach(), t.grad.clone(), weight.grad.clone(), torch.rand(3)))
    (y0, gt0, gw0, r0), (y1, gt1, gw1, r1) = results
    assert torch.equal(y0, y1) and torch.equal(r0, r1)
    torch.testing.assert_close(gt1, gt0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("producer", ["gelu", "layer_norm"])
def test_dropped_product_keeps_no_new_copy_of_its_input(producer):
    """After a GELU or a LayerNorm, what the product keeps is what that op keeps anyway, plus a one-byte mask: no
    float tensor of its own (the plain form keeps the dropped input, x's size)."""
    from modalpeft.core.layers.dropout import dropped_product

    make = _producers()[producer]
    t = torch.randn(2, 6, D_IN, requires_grad=True)
    weight = torch.randn(RANK, D_IN, requires_grad=True)

    def own_saves(lean: bool) -> list[tuple[torch.dtype, int]]:
        """What the product keeps beyond the producer's own saves: (dtype, elements) per storage."""
        saved: dict[int, tuple[str, torch.dtype, int]] = {}
        phase = ["producer"]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = tensor.untyped_storage().data_ptr()
            if tensor.data_ptr() != weight.data_ptr() and key not in saved:
                saved[key] = (phase[0], tensor.dtype, tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            x = make(t)
            phase[0] = "product"
            y = dropped_product(x, weight, 0.1, True) if lean else MaskDropout(0.1).train()(x) @ weight.t()
        y.sum().backward()
        return sorted(((dtype, n) for who, dtype, n in saved.values() if who == "product"), key=str)

    assert own_saves(False) == [(torch.bool, t.numel()), (torch.float32, t.numel())]  # mask and dropped input
    assert own_saves(True) == [(torch.bool, t.numel())]  # the mask alone


def test_dropped_product_eval_and_no_grad_are_the_plain_product():
    from modalpeft.core.layers.dropout import dropped_product

    x, weight = torch.randn(4, D_IN), torch.randn(RANK, D_IN)
    assert torch.equal(dropped_product(x, weight, 0.5, False), x @ weight.t())
    with torch.no_grad():
        torch.manual_seed(1)
        ours = dropped_product(x, weight, 0.5, True)
        torch.manual_seed(1)
        assert torch.equal(ours, nn.functional.dropout(x, 0.5, True) @ weight.t())
