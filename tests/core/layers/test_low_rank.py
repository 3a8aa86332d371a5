"""LowRankDelta: ``y = W x + s · B A drop(x)`` against a straight transcription, at scalings other than 1, with
dropout on and off; the merged weight equals the live branch, and merge/unmerge are exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import LowRankDelta

D_IN, D_OUT, RANK = 12, 10, 3
SCALINGS = [0.5, 1.0, 2.0]


def _hosted(base: nn.Module, adapter: LowRankDelta) -> AdapterLayer:
    base.requires_grad_(False)
    host = AdapterLayer(base)
    host.add("default", adapter)
    host.active_adapter = "default"
    return host


def _reference(x: torch.Tensor, layer: LowRankDelta, scaling: float) -> torch.Tensor:
    """``s · B A x`` written out per output unit, independently of the layer's own matmul order."""
    a, b = layer.A.detach(), layer.B.detach()
    hidden = torch.einsum("rd,...d->...r", a, x)
    return scaling * torch.einsum("or,...r->...o", b, hidden)


@pytest.mark.parametrize("scaling", SCALINGS)
def test_branch_and_delta_weight_match_the_transcription(scaling: float) -> None:
    torch.manual_seed(0)
    layer = LowRankDelta(D_IN, D_OUT, RANK, scaling=scaling, init_weights=False).double()
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer.parallel(x), _reference(x, layer, scaling), atol=1e-12, rtol=1e-12)
    dense = scaling * layer.B.detach() @ layer.A.detach()
    torch.testing.assert_close(layer.delta_weight(), dense, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.parallel(x), x @ layer.delta_weight().T, atol=1e-12, rtol=1e-12)


def test_scaling_multiplies_the_branch() -> None:
    torch.manual_seed(0)
    half = LowRankDelta(D_IN, D_OUT, RANK, scaling=0.5, init_weights=False)
    double = LowRankDelta(D_IN, D_OUT, RANK, scaling=2.0)
    double.load_state_dict(half.state_dict())
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(double.parallel(x), 4 * half.parallel(x))
    torch.testing.assert_close(double.delta_weight(), 4 * half.delta_weight())


def test_shapes_count_and_bad_rank() -> None:
    layer = LowRankDelta(D_IN, D_OUT, RANK)
    assert layer.A.shape == (RANK, D_IN) and layer.B.shape == (D_OUT, RANK)
    assert sum(p.numel() for p in layer.parameters()) == RANK * (D_IN + D_OUT)
    assert layer.delta_weight().shape == (D_OUT, D_IN)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankDelta(D_IN, D_OUT, 0)


@pytest.mark.parametrize("init", [True, "identity"])
def test_init_is_loras_and_the_identity(init) -> None:
    torch.manual_seed(0)
    layer = LowRankDelta(256, 64, 8, scaling=2.0, init_weights=init)
    assert torch.count_nonzero(layer.B) == 0 and torch.count_nonzero(layer.A) == layer.A.numel()
    bound = 1 / 256**0.5  # kaiming-uniform with a=√5: U(-1/√d_in, 1/√d_in)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.parallel(torch.randn(3, 256))) == 0


def test_random_init_is_non_zero_and_reset_gives_the_identity() -> None:
    layer = LowRankDelta(D_IN, D_OUT, RANK, init_weights=False)
    assert torch.count_nonzero(layer.B) == layer.B.numel()
    layer.reset_adapter(True)
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_dropout_acts_on_the_branch_input_in_training_only() -> None:
    torch.manual_seed(0)
    layer = LowRankDelta(D_IN, D_OUT, RANK, scaling=0.5, dropout=0.5, init_weights=False)
    x = torch.randn(64, D_IN)
    layer.train()
    torch.manual_seed(7)
    out = layer.parallel(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    torch.testing.assert_close(out, _reference(dropped, layer, 0.5))
    assert not torch.allclose(out, _reference(x, layer, 0.5))
    layer.eval()
    torch.testing.assert_close(layer.parallel(x), _reference(x, layer, 0.5))
    assert isinstance(LowRankDelta(D_IN, D_OUT, RANK, dropout=0.0).drop, nn.Identity)


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hosted_live_branch_equals_merged_weight_and_unmerge_restores(scaling: float, dropout: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LowRankDelta(D_IN, D_OUT, RANK, scaling=scaling, dropout=dropout, init_weights=False)
    host = _hosted(base, layer).eval()  # eval: dropout off, so the branch is the linear map merging folds in
    x = torch.randn(3, 4, D_IN)
    live = host(x)
    expected = x @ (weight + scaling * layer.B.detach() @ layer.A.detach()).T + bias
    torch.testing.assert_close(live, expected, atol=1e-5, rtol=1e-5)
    host.merge("default")
    torch.testing.assert_close(host.base_layer.weight, weight + scaling * layer.B.detach() @ layer.A.detach())
    torch.testing.assert_close(host(x), live, atol=1e-5, rtol=1e-5)
    host.unmerge("default")
    torch.testing.assert_close(host.base_layer.weight, weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(host(x), live, atol=1e-6, rtol=1e-6)


def test_gradients_reach_a_and_b_only() -> None:
    torch.manual_seed(0)
    layer = LowRankDelta(D_IN, D_OUT, RANK, scaling=2.0, init_weights=False)
    host = _hosted(nn.Linear(D_IN, D_OUT), layer)
    host(torch.randn(5, D_IN)).square().sum().backward()
    assert layer.A.grad is not None and layer.A.grad.abs().sum() > 0
    assert layer.B.grad is not None and layer.B.grad.abs().sum() > 0
    assert host.base_layer.weight.grad is None
