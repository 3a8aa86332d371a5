import pytest
import torch
from torch import nn

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import LowRankExperts

IN, OUT, RANK, EXPERTS = 6, 5, 3, 4


def _hosted(base: nn.Module, adapter: LowRankExperts) -> AdapterLayer:
    base.requires_grad_(False)
    host = AdapterLayer(base)
    host.add("default", adapter)
    host.active_adapter = "default"
    return host


def _naive(layer: LowRankExperts, x: torch.Tensor) -> torch.Tensor:
    gates = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    out = 0
    for i in range(layer.B.shape[0]):
        out = out + gates[..., i : i + 1] * (x @ layer.A.t() @ layer.B[i].t())
    return out * layer.scaling


@pytest.mark.parametrize("alpha", [None, 6.0])
def test_matches_naive_loop_over_experts(alpha):
    torch.manual_seed(0)
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS, alpha=alpha, init_weights=False)
    assert layer.scaling == (1.0 if alpha is None else 2.0)
    x = torch.randn(2, 7, IN)
    torch.testing.assert_close(layer.parallel(x), _naive(layer, x))


def test_parameter_count():
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS)
    assert sum(p.numel() for p in layer.parameters()) == RANK * IN + EXPERTS * OUT * RANK + IN * EXPERTS
    # SPMTrack's ViT-B q/k/v/proj: r = 64, E = 4, C = 768.
    big = LowRankExperts(768, 768, 64, 4, device="meta")
    assert sum(p.numel() for p in big.parameters()) == 248_832


def test_init_modes():
    torch.manual_seed(0)
    paper = LowRankExperts(256, 128, 64, 4)
    for param in (paper.A, paper.B):
        assert abs(param.std().item() - 0.02) < 2e-3 and param.abs().max() < 2
    bound = 1 / 256**0.5  # PyTorch's default Linear init: uniform(±1/√d_in)
    assert paper.router.weight.abs().max() <= bound and paper.router.weight.abs().max() > 0.9 * bound
    identity = LowRankExperts(256, 128, 64, 4, init_weights="identity")
    assert torch.equal(identity.B, torch.zeros_like(identity.B)) and abs(identity.A.std().item() - 0.02) < 2e-3
    rand = LowRankExperts(256, 128, 64, 4, init_weights=False)
    assert rand.A.std() > 0.05 and rand.B.std() > 0.05


def test_identity_and_paper_init_hosted():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    x = torch.randn(3, IN)
    host = _hosted(base, LowRankExperts(IN, OUT, RANK, EXPERTS, init_weights="identity"))
    torch.testing.assert_close(host(x), base(x), atol=0, rtol=0)
    paper = _hosted(base, LowRankExperts(IN, OUT, RANK, EXPERTS))
    assert not torch.equal(paper(x), base(x))


def test_hosted_output_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS, init_weights=False)
    host = _hosted(base, layer)
    x = torch.randn(2, 3, IN)
    y = host(x)
    torch.testing.assert_close(y, base(x) + _naive(layer, x))
    y.square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_dropout_acts_on_the_expert_input_only():
    torch.manual_seed(0)
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS, dropout=1.0, init_weights=False)
    x = torch.randn(2, IN)
    assert torch.equal(layer.parallel(x), torch.zeros(2, OUT))
    layer.eval()
    torch.testing.assert_close(layer.parallel(x), _naive(layer, x))


def test_not_mergeable():
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS)
    host = _hosted(nn.Linear(IN, OUT), layer)
    with pytest.raises(ValueError, match="LowRankExperts cannot be merged"):
        host.merge("default")
    assert host.merged == []
    with pytest.raises(NotImplementedError):
        layer.delta_weight()


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="rank=0"):
        LowRankExperts(IN, OUT, 0, EXPERTS)
    with pytest.raises(ValueError, match="num_experts=0"):
        LowRankExperts(IN, OUT, RANK, 0)


def test_shared_expert_is_ungated_and_initialised_like_the_experts():
    torch.manual_seed(0)
    layer = LowRankExperts(IN, OUT, RANK, EXPERTS, alpha=6.0, init_weights=False, shared_expert=True)
    assert layer.B_s.shape == (OUT, RANK)
    assert sum(p.numel() for p in layer.parameters()) == RANK * IN + (EXPERTS + 1) * OUT * RANK + IN * EXPERTS
    x = torch.randn(2, 7, IN)
    shared = (x @ layer.A.t() @ layer.B_s.t()) * layer.scaling
    torch.testing.assert_close(layer.parallel(x), _naive(layer, x) + shared)
    identity = LowRankExperts(IN, OUT, RANK, EXPERTS, init_weights="identity", shared_expert=True)
    assert not identity.B_s.any() and identity.parallel(x).abs().max() == 0
    paper = LowRankExperts(256, 128, 64, 4, shared_expert=True)
    assert abs(paper.B_s.std().item() - 0.02) < 2e-3
