"""PaCA (``"paca"``): gradients equal a dense reference and the official ``pacalinear`` (WooSunghyeon/paca @
be9a806fda56, ``peft/src/peft/tuners/paca/layer.py``), and only the selected input features are kept for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 12))


def only_layer(model: mp.AdaptedModel):
    ((_, host),) = hosts(model.base_model)
    return host.adapters["default"]


def official_step(x, weight, bias, paca_w, indices, scaling, grad_output):
    """The official forward (``paca_update`` writes ``s · P`` into the weight, then ``pacalinear``) and backward
    (``grad_input = grad_output @ weight``; ``grad_paca_w = grad_outputᵀ @ x[..., idx]``, times ``s`` by autograd
    through ``paca_w * scaling``)."""
    weight = weight.clone()
    weight[:, indices] = scaling * paca_w
    output = x.matmul(weight.t()) + bias
    grad_input = grad_output.matmul(weight)
    pruned_input = x[:, :, indices]
    grad_paca_w = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(pruned_input.reshape(-1, len(indices)))
    return output, grad_input, grad_paca_w * scaling


@pytest.mark.parametrize(("rank", "alpha"), [(1, 8.0), (4, 2.0), (20, 20.0)])
def test_forward_and_gradients_match_the_official_layer_and_a_dense_reference(rank: int, alpha: float) -> None:
    base = linear_model()
    w, b = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    model = mp.adapt(base, mp.PaCAConfig(rank=rank, alpha=alpha, init_weights=False))
    layer = only_layer(model)
    idx, s = layer.indices, alpha / rank
    assert idx.shape == (rank,) and idx.unique().numel() == rank
    x = torch.randn(3, 6, 20, requires_grad=True)
    grad_out = torch.randn(3, 6, 12)
    y = model(x)
    y.backward(grad_out)
    out, grad_in, grad_p = official_step(x.detach(), w, b, layer.P.detach(), idx, s, grad_out)
    torch.testing.assert_close(y, out)
    torch.testing.assert_close(x.grad, grad_in)
    torch.testing.assert_close(layer.P.grad, grad_p)
    # dense reference: autograd through the full adapted weight
    P = layer.P.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, w.index_copy(1, idx, P * s), b).backward(grad_out)
    torch.testing.assert_close(layer.P.grad, P.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_starts_unchanged_and_merges_into_the_columns() -> None:
    base = linear_model()
    w = base[0].weight.detach().clone()
    model = mp.adapt(base, mp.PaCAConfig(rank=5, alpha=16.0))
    layer = only_layer(model)
    torch.testing.assert_close(layer.P * (16.0 / 5), w[:, layer.indices])  # paca_init: P = W[:, idx] / s
    with torch.no_grad():
        layer.P.add_(1.0)
    merged = model.merge_and_unload()[0].weight
    others = torch.ones(20, dtype=torch.bool).index_fill(0, layer.indices, False)
    torch.testing.assert_close(merged[:, layer.indices], layer.P.detach() * (16.0 / 5))
    assert torch.equal(merged[:, others], w[:, others])


def saved_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return shapes


def test_only_the_selected_input_features_are_kept_for_backward() -> None:
    import peft

    x = torch.randn(4, 9, 20, requires_grad=True)

    def per_token(shapes: list[tuple[int, ...]]) -> list[int]:  # widths of the saved tensors with one row per token
        return sorted(s[-1] for s in shapes if len(s) > 1 and torch.Size(s).numel() == 36 * s[-1])

    assert per_token(saved_shapes(mp.adapt(linear_model(), mp.PaCAConfig(rank=3)), x)) == [3]
    lora = saved_shapes(peft.get_peft_model(linear_model(), peft.LoraConfig(r=3, target_modules=["0"])), x)
    assert per_token(lora) == [3, 20]  # LoRA keeps the whole input for A's gradient, and A x


def test_indices_are_seeded_saved_and_reloaded(tmp_path) -> None:
    first = only_layer(mp.adapt(linear_model(), mp.PaCAConfig(rank=6, seed=1))).indices
    assert torch.equal(first, only_layer(mp.adapt(linear_model(), mp.PaCAConfig(rank=6, seed=1))).indices)
    assert not torch.equal(first, only_layer(mp.adapt(linear_model(), mp.PaCAConfig(rank=6, seed=2))).indices)
    model = mp.adapt(linear_model(), mp.PaCAConfig(rank=6, seed=1, init_weights=False))
    with torch.no_grad():
        only_layer(model).indices.copy_(torch.arange(6))  # an adapter whose columns differ from its seed's draw
        only_layer(model).columns.copy_(model.base_model[0].weight[:, :6])
    model.save_adapter(tmp_path / "paca")
    loaded = mp.load_adapter(linear_model(), tmp_path / "paca")
    x = torch.randn(2, 20)
    torch.testing.assert_close(loaded(x), model(x))
    assert torch.equal(only_layer(loaded).indices, torch.arange(6))


def test_rank_above_the_fan_in_is_refused() -> None:
    base = linear_model()
    with pytest.raises(ValueError, match=r"rank=21 exceeds the 20 input columns of '0'; pass rank <= 20"):
        mp.adapt(base, mp.PaCAConfig(rank=21))
    assert not any(isinstance(m, mp.AdapterLayer) for m in base.modules())
