"""KroneckerDelta: the reshape trick equals ``x @ kron(A, B)ᵀ``, init, factor checks, exact merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import KroneckerDelta
from modalpeft.core.layers.kronecker import check_kron_factors, divisors, most_square_factor


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 1), (2, 1), (6, 2), (7, 1), (12, 3), (64, 8), (192, 12), (768, 24), (3072, 48)]
)
def test_most_square_factor(n: int, expected: int) -> None:
    assert most_square_factor(n) == expected
    assert n % expected == 0


def test_most_square_factor_is_the_closest_divisor() -> None:
    for n in range(1, 300):
        best = most_square_factor(n)
        assert min(abs(d - n**0.5) for d in divisors(n)) == pytest.approx(abs(best - n**0.5))


def test_divisors() -> None:
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(16) == [1, 2, 4, 8, 16]
    assert divisors(1) == [1]


@pytest.mark.parametrize(("d_in", "d_out", "a1", "a2"), [(12, 6, 2, 3), (12, 6, 6, 12), (12, 6, 1, 1), (8, 20, 5, 2)])
def test_parallel_equals_dense_kron(d_in: int, d_out: int, a1: int, a2: int) -> None:
    torch.manual_seed(0)
    layer = KroneckerDelta(d_in, d_out, a1, a2, scaling=0.7, init_weights=False).double()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    dense = 0.7 * torch.kron(layer.A, layer.B)
    assert dense.shape == (d_out, d_in)
    torch.testing.assert_close(layer.delta_weight(), dense, atol=0, rtol=0)
    torch.testing.assert_close(layer.parallel(x), x @ dense.T, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.parallel(x[0, 0]), x[0, 0] @ dense.T, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("d_in", "d_out", "a1", "a2", "right_first"),
    [(1280, 1280, 64, 8, True), (1024, 320, 64, 8, True), (12, 6, 2, 3, False), (12, 6, 1, 1, True)],
)
def test_the_cheaper_order_is_taken(d_in: int, d_out: int, a1: int, a2: int, right_first: bool) -> None:
    """(A X) Bᵀ costs a1·d_in + d_out·b2 per token, A (X Bᵀ) b1·d_in + d_out·a2: for DiffuseKronA's a1=64, a2=8 on
    SD's 1280-wide projections 286,720 against 35,840 (and on a 320-wide one fed 1024-wide text, 106,496 / 7,680)."""
    layer = KroneckerDelta(d_in, d_out, a1, a2)
    b1, b2 = d_out // a1, d_in // a2
    assert (b1 * d_in + d_out * a2 < a1 * d_in + d_out * b2) == right_first == layer.right_first


def test_shapes_and_parameter_count() -> None:
    layer = KroneckerDelta(48, 32, 4, 6)
    assert layer.A.shape == (4, 6)
    assert layer.B.shape == (8, 8)
    assert sum(p.numel() for p in layer.parameters()) == 4 * 6 + (32 // 4) * (48 // 6)


@pytest.mark.parametrize("init", [True, "identity"])
def test_init_is_zero_delta(init) -> None:
    torch.manual_seed(0)
    layer = KroneckerDelta(256, 256, 16, 64, init_weights=init)
    assert torch.count_nonzero(layer.B) == 0
    assert torch.count_nonzero(layer.parallel(torch.randn(4, 256))) == 0
    assert layer.A.std().item() == pytest.approx(1 / 16, rel=0.1)  # A ~ N(0, (1/a1)^2)


def test_random_init_is_non_zero_and_reset_restores_identity() -> None:
    layer = KroneckerDelta(16, 16, 4, 4, init_weights=False)
    assert torch.count_nonzero(layer.A) == layer.A.numel()
    assert torch.count_nonzero(layer.B) == layer.B.numel()
    layer.reset_adapter(True)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize(("a1", "a2", "bad"), [(5, 4, "a1=5"), (4, 7, "a2=7"), (0, 4, "a1=0")])
def test_bad_factors_name_the_dims_and_the_divisors(a1: int, a2: int, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as info:
        KroneckerDelta(16, 12, a1, a2)
    message = str(info.value)
    assert "d_in=16" in message and "d_out=12" in message
    assert "[1, 2, 3, 4, 6, 12]" in message if bad.startswith("a1") else "[1, 2, 4, 8, 16]" in message


def test_check_names_the_module() -> None:
    with pytest.raises(ValueError, match="'blocks.0.qkv'"):
        check_kron_factors(16, 12, 5, 4, where="blocks.0.qkv")
    check_kron_factors(16, 12, 3, 8)


def test_gradients_reach_both_factors() -> None:
    layer = KroneckerDelta(12, 8, 2, 3, init_weights=False)
    layer.parallel(torch.randn(4, 12)).square().sum().backward()
    assert layer.A.grad is not None and layer.A.grad.abs().sum() > 0
    assert layer.B.grad is not None and layer.B.grad.abs().sum() > 0


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    layer = KroneckerDelta(16, 16, 4, 4, dropout=0.5, init_weights=False)
    x = torch.randn(8, 16)
    layer.eval()
    torch.testing.assert_close(layer.parallel(x), x @ layer.delta_weight().T)
    layer.train()
    assert not torch.allclose(layer.parallel(x), x @ layer.delta_weight().T)


def test_device_and_dtype() -> None:
    layer = KroneckerDelta(8, 8, 2, 2, dtype=torch.float64, device="cpu")
    assert layer.A.dtype == layer.B.dtype == torch.float64


def test_host_merge_is_exact_and_unmerge_restores() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 8)
    weight = base.weight.detach().clone()
    host = AdapterLayer(base)
    host.add("default", KroneckerDelta(12, 8, 4, 3, scaling=0.5, init_weights=False))
    host.active_adapter = "default"
    x = torch.randn(5, 12)
    expected = host(x)
    torch.testing.assert_close(expected, base(x) + x @ host.adapters["default"].delta_weight().T)
    host.merge("default")
    assert not torch.equal(base.weight, weight)
    torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base(x), expected, atol=1e-6, rtol=1e-6)
    host.unmerge("default")
    torch.testing.assert_close(base.weight, weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(host(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("a1, a2", [(3, 4), (6, 2)])  # (A X) Bᵀ and A (X Bᵀ) orders
@pytest.mark.parametrize("layout", ["kron", "official"])
def test_lean_backward_equals_autograd_through_the_dense_kron(layout: str, a1: int, a2: int) -> None:
    torch.manual_seed(0)
    layer = KroneckerDelta(12, 18, a1=a1, a2=a2, scaling=0.7, init_weights=False, layout=layout)
    assert layer.right_first == (a1 == 6)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    layer.double()
    g = torch.randn(2, 5, 18, dtype=torch.float64)
    layer.parallel(x).backward(g)
    grads = [x.grad, layer.A.grad, layer.B.grad]
    x_ref = x.detach().clone().requires_grad_()
    a, b = (t.detach().clone().requires_grad_() for t in (layer.A, layer.B))
    delta = torch.kron(a, b) * 0.7
    if layout == "official":  # the output perfect shuffle of the official reshape sequence
        delta = delta.reshape(a1, 18 // a1, -1).transpose(0, 1).reshape(18, -1)
    (x_ref @ delta.t()).backward(g)
    for got, want in zip(grads, [x_ref.grad, a.grad, b.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_branch_keeps_only_its_input_for_backward() -> None:
    layer = KroneckerDelta(12, 18, a1=3, a2=4, init_weights=False)
    x = torch.randn(7, 12, requires_grad=True)
    resident = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in resident:
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.parallel(x)
    assert kept == {x.untyped_storage().data_ptr()}  # not the intermediate A X
