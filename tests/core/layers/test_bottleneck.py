"""Bottleneck: the adapter math, both modes, Conv1d form, identity at init, counts, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import Bottleneck

ACTS = {
    "gelu": nn.functional.gelu,
    "relu": torch.relu,
    "silu": nn.functional.silu,
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
}


def hosted(base: nn.Module, adapter: Bottleneck) -> AdapterLayer:
    host = AdapterLayer(base)
    host.add("default", adapter)
    host.active_adapter = "default"
    return host


def reference(layer: Bottleneck, h: torch.Tensor, act: str, scale: float) -> torch.Tensor:
    hidden = ACTS[act](h @ layer.down.weight.T + layer.down.bias)
    return scale * (hidden @ layer.up.weight.T + layer.up.bias)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_sequential_math(act: str) -> None:
    torch.manual_seed(0)
    layer = Bottleneck(16, 4, act=act, scaling=0.5, init_weights=False)
    out = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer.post(out), out + reference(layer, out, act, 0.5))


def test_parallel_math_with_other_output_dim() -> None:
    torch.manual_seed(0)
    layer = Bottleneck(16, 4, mode="parallel", out_dim=24, act="relu", scaling=0.1, init_weights=False)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer.parallel(x), reference(layer, x, "relu", 0.1))
    assert layer.parallel(x).shape == (5, 24)


def test_hooks_follow_the_mode() -> None:
    assert Bottleneck(8, 2).has_post and not Bottleneck(8, 2).has_parallel
    assert Bottleneck(8, 2, mode="parallel").has_parallel and not Bottleneck(8, 2, mode="parallel").has_post


def test_hosts_run_the_right_hook() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    x = torch.randn(4, 8)
    seq = hosted(base, Bottleneck(12, 3, init_weights=False))
    torch.testing.assert_close(seq(x), base(x) + seq.adapters["default"].branch(base(x)))
    par = hosted(nn.Linear(8, 12), Bottleneck(8, 3, mode="parallel", out_dim=12, init_weights=False))
    torch.testing.assert_close(par(x), par.base_layer(x) + par.adapters["default"].branch(x))


def test_post_acts_on_the_first_element_of_a_tuple_output() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    out, weights = mha(x, x, x)
    host = hosted(mha, Bottleneck(8, 2, init_weights=False))
    adapted, adapted_weights = host(x, x, x)
    torch.testing.assert_close(adapted, out + host.adapters["default"].branch(out))
    torch.testing.assert_close(adapted_weights, weights)


@pytest.mark.parametrize("init", [True, "identity"])
def test_identity_at_init(init) -> None:
    torch.manual_seed(0)
    out = torch.randn(3, 16)
    seq = Bottleneck(16, 4, init_weights=init, layer_norm="in", scaling="learnable")
    torch.testing.assert_close(seq.post(out), out, atol=0, rtol=0)
    par = Bottleneck(16, 4, mode="parallel", out_dim=8, init_weights=init, layer_norm="out")
    assert torch.count_nonzero(par.parallel(out)) == 0


def test_init_is_lora_style() -> None:
    torch.manual_seed(0)
    layer = Bottleneck(64, 8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) bound: sqrt(6 / ((1 + 5) · fan_in))
    assert layer.down.weight.abs().max() <= bound
    assert layer.down.weight.abs().max() > 0.8 * bound
    for tensor in (layer.down.bias, layer.up.weight, layer.up.bias):
        assert torch.count_nonzero(tensor) == 0
    random = Bottleneck(64, 8, init_weights=False)
    assert torch.count_nonzero(random.up.weight) == random.up.weight.numel()
    assert torch.count_nonzero(random.up.bias) == random.up.bias.numel()


@pytest.mark.parametrize(
    ("kwargs", "extra"),
    [({}, 0), ({"layer_norm": "in"}, 2 * 16), ({"layer_norm": "out"}, 2 * 24), ({"scaling": "learnable"}, 1)],
)
def test_parameter_count(kwargs: dict, extra: int) -> None:
    d, m, d_out = 16, 4, 24
    layer = Bottleneck(d, m, mode="parallel", out_dim=d_out, **kwargs)
    assert sum(p.numel() for p in layer.parameters()) == d * m + m + m * d_out + d_out + extra
    conv = Bottleneck(d, m, mode="parallel", out_dim=d_out, conv=True, **kwargs)
    assert sum(p.numel() for p in conv.parameters()) == d * m + m + m * d_out + d_out + extra


@pytest.mark.parametrize("layer_norm", ["none", "in", "out"])
@pytest.mark.parametrize("shape", [(2, 16, 7), (2, 16, 3, 5)])
def test_conv_form_equals_linear_form_over_channels(layer_norm: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = Bottleneck(16, 4, layer_norm=layer_norm, init_weights=False)
    conv = Bottleneck(16, 4, layer_norm=layer_norm, conv=True)
    with torch.no_grad():
        for name, p in conv.named_parameters():
            p.copy_(linear.get_parameter(name).reshape(p.shape))
    h = torch.randn(*shape)
    expected = linear.post(h.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(conv.post(h), expected, atol=1e-6, rtol=1e-5)


def test_layer_norm_out_comes_before_the_scaling() -> None:
    torch.manual_seed(0)
    layer = Bottleneck(16, 4, layer_norm="out", scaling=0.1, init_weights=False)
    with torch.no_grad():
        layer.norm.reset_parameters()
    h = torch.randn(3, 16)
    up = layer.up(layer.act(layer.down(h)))
    torch.testing.assert_close(layer.branch(h), 0.1 * nn.functional.layer_norm(up, (16,)))


def test_learnable_scaling_is_a_trained_parameter() -> None:
    layer = Bottleneck(8, 2, scaling="learnable", init_weights=False)
    assert layer.scale.shape == (1,)
    layer.post(torch.randn(4, 8)).sum().backward()
    assert layer.scale.grad is not None and layer.scale.grad.abs().item() > 0


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    layer = Bottleneck(16, 8, dropout=0.5, init_weights=False)
    h = torch.randn(32, 16)
    layer.eval()
    torch.testing.assert_close(layer.branch(h), layer.branch(h))
    first = layer.branch(h)
    layer.train()
    assert not torch.allclose(layer.branch(h), first)


def test_not_mergeable() -> None:
    host = hosted(nn.Linear(8, 8), Bottleneck(8, 2))
    with pytest.raises(ValueError, match="cannot be merged"):
        host.merge("default")


def test_device_and_dtype() -> None:
    layer = Bottleneck(8, 2, dtype=torch.float64, device="cpu", layer_norm="in", scaling="learnable")
    assert {p.dtype for p in layer.parameters()} == {torch.float64}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "serial"}, "mode='serial'"),
        ({"act": "sigmoid"}, "act='sigmoid'.*'quick_gelu'"),
        ({"layer_norm": "pre"}, "layer_norm='pre'"),
        ({"scaling": "fixed"}, "scaling='fixed'"),
        ({"out_dim": 12}, "out_dim=12.*mode='parallel'"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Bottleneck(8, 2, **kwargs)
    with pytest.raises(ValueError, match="bottleneck_dim=0"):
        Bottleneck(8, 0)


def test_input_mode_transforms_the_chosen_host_input() -> None:
    """``mode="input"`` runs ``x + f(x)`` on the host's input ``input_arg`` before the host (LLM-Adapters'
    mh_adapter with 0; BERT's ``output(inter, residual)`` with 1)."""

    class TwoInputs(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * 2 + b

    for arg in (0, 1):
        adapter = Bottleneck(4, 2, mode="input", input_arg=arg, init_weights=False)
        host = AdapterLayer(TwoInputs())
        host.add("x", adapter)
        host.active_adapter = "x"
        a, b = torch.randn(3, 4), torch.randn(3, 4)
        expected = (a + adapter.branch(a)) * 2 + b if arg == 0 else a * 2 + b + adapter.branch(b)
        torch.testing.assert_close(host(a, b), expected)
    with pytest.raises(TypeError, match="positional input 1"):
        host(a=a, b=b)


def test_bert_init_and_no_bias() -> None:
    torch.manual_seed(0)
    adapter = Bottleneck(64, 32, proj_init="bert", bias=False)
    assert adapter.down.bias is None and adapter.up.bias is None
    assert abs(float(adapter.up.weight.std()) - 0.02) < 0.005
