"""PHMLinear: H = Σ A_i ⊗ W_i against the official Kronecker code (transcribed), counts, sharing, errors."""

from __future__ import annotations

import pytest
import torch

from modalpeft.core.layers import Bottleneck
from modalpeft.core.layers.phm import PHMLinear


def official_kronecker_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """compacter ``seq2seq/hypercomplex/kronecker.py::kronecker_product`` (transcribed)."""
    siz1 = torch.Size(torch.tensor(a.shape[-2:]) * torch.tensor(b.shape[-2:]))
    res = a.unsqueeze(-1).unsqueeze(-3) * b.unsqueeze(-2).unsqueeze(-4)
    return res.reshape(res.shape[:-4] + siz1)


@pytest.mark.parametrize("rank", [1, 2, None])
def test_forward_equals_the_official_matvec_product(rank) -> None:
    torch.manual_seed(0)
    layer = PHMLinear(8, 12, 4, rank=rank)
    with torch.no_grad():
        layer.phm_rule.normal_()
        layer.bias.normal_()
    x = torch.randn(3, 5, 8)
    w = layer.W if rank is None else torch.bmm(layer.W_left, layer.W_right)
    h = official_kronecker_product(layer.phm_rule, w).sum(0)  # matvec_product(kronecker_prod=True)
    torch.testing.assert_close(layer(x), torch.matmul(x, h) + layer.bias)
    torch.testing.assert_close(layer.weight_matrix(), sum(torch.kron(layer.phm_rule[i], w[i]) for i in range(4)))


def test_parameter_counts() -> None:
    """Spec §9f, t5-base d = 768, r = 24, n = 4: down 768 + 24 + 24, up 24 + 768 + 768, plus an owned rule 64."""
    down = PHMLinear(768, 24, 4, device="meta")
    up = PHMLinear(24, 768, 4, rule=down.phm_rule, device="meta")
    assert sum(p.numel() for p in down.parameters()) == 816 + 64
    assert sum(p.numel() for p in up.parameters()) == 1_560
    full = PHMLinear(768, 24, 4, rank=None, device="meta")
    assert sum(p.numel() for p in full.parameters()) == 768 * 24 // 4 + 24 + 64


def test_shared_rule_is_referenced_not_registered() -> None:
    owner = PHMLinear(8, 4, 2)
    other = PHMLinear(4, 8, 2, rule=owner.phm_rule)
    assert other.rule is owner.phm_rule and "phm_rule" not in dict(other.named_parameters())
    other(torch.randn(2, 4)).sum().backward()
    assert owner.phm_rule.grad is not None


def test_bottleneck_with_phm_projections() -> None:
    adapter = Bottleneck(8, 4, phm_n=2, act="gelu_tanh", init_weights="identity")
    x = torch.randn(3, 8)
    torch.testing.assert_close(adapter.post(x), x)
    assert adapter.up.rule is adapter.down.phm_rule


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n=3 does not divide in_features=8"):
        PHMLinear(8, 6, 3)
    with pytest.raises(ValueError, match=r"shared rule has shape \(2, 2, 2\), expected \(4, 4, 4\)"):
        PHMLinear(8, 8, 4, rule=torch.nn.Parameter(torch.zeros(2, 2, 2)))
    with pytest.raises(ValueError, match="conv=True"):
        Bottleneck(8, 4, phm_n=2, conv=True)
