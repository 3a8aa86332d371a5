import copy

import pytest
import timm.layers
import torch
from torch import nn

from modalpeft.core import layers
from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import ScaleShift


def _hosted(base: nn.Module, adapter: ScaleShift) -> AdapterLayer:
    base.requires_grad_(False)
    host = AdapterLayer(base)
    host.add("default", adapter)
    host.active_adapter = "default"
    return host


# (base module, channel_dim, input shape): every module type the merge folds into.
FOLDABLE = [
    pytest.param(lambda: nn.Linear(5, 6), -1, (2, 3, 5), id="Linear"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3), 1, (2, 4, 7), id="Conv1d"),
    pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2), 1, (2, 4, 5, 5), id="Conv2d-groups"),
    pytest.param(lambda: nn.Conv3d(2, 6, 2), 1, (1, 2, 3, 3, 3), id="Conv3d"),
    pytest.param(lambda: nn.LayerNorm(6), -1, (2, 3, 6), id="LayerNorm"),
    pytest.param(lambda: timm.layers.LayerNorm(6), -1, (2, 3, 6), id="timm-LayerNorm"),
    pytest.param(lambda: timm.layers.LayerNorm2d(6), 1, (2, 6, 3, 3), id="timm-LayerNorm2d"),
    pytest.param(lambda: nn.GroupNorm(3, 6), 1, (2, 6, 4), id="GroupNorm"),
]


def _randomise_affine(base: nn.Module) -> None:
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()


def test_post_is_per_channel_affine():
    torch.manual_seed(0)
    ssf = ScaleShift(4, init_weights=False)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ssf.post(x), x * ssf.scale + ssf.shift)
    conv = ScaleShift(4, channel_dim=1, init_weights=False)
    x = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(conv.post(x), x * conv.scale[:, None, None] + conv.shift[:, None, None])


def test_post_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="dim=4.*5 channels"):
        ScaleShift(4).post(torch.randn(2, 5))


def test_init_modes():
    torch.manual_seed(0)
    paper = ScaleShift(4096)
    assert abs(paper.scale.mean().item() - 1) < 2e-3 and abs(paper.scale.std().item() - 0.02) < 2e-3
    assert abs(paper.shift.mean().item()) < 2e-3 and abs(paper.shift.std().item() - 0.02) < 2e-3
    identity = ScaleShift(8, init_weights="identity")
    assert torch.equal(identity.scale, torch.ones(8)) and torch.equal(identity.shift, torch.zeros(8))
    rand = ScaleShift(4096, init_weights=False)
    assert rand.shift.std().item() > 0.05 and (rand.scale - 1).std().item() > 0.05


@pytest.mark.parametrize(("make", "channel_dim", "shape"), FOLDABLE)
def test_hosted_output_and_exact_merge(make, channel_dim, shape):
    torch.manual_seed(0)
    base = make()
    _randomise_affine(base)
    x = torch.randn(shape)
    y_base = base(x)
    ssf = ScaleShift(6, channel_dim=channel_dim, init_weights=False)
    host = _hosted(base, ssf)
    y = host(x)
    view = [1] * y.ndim
    view[channel_dim] = 6
    torch.testing.assert_close(y, y_base * ssf.scale.view(view) + ssf.shift.view(view))

    before = {k: v.clone() for k, v in base.state_dict().items()}
    host.merge("default")
    assert not torch.equal(base.weight, before["weight"])
    torch.testing.assert_close(host(x), y, atol=1e-5, rtol=1e-5)
    host.unmerge("default")
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(host(x), y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("make", "channel_dim", "shape"), FOLDABLE)
def test_identity_init_leaves_output_unchanged(make, channel_dim, shape):
    base = make()
    x = torch.randn(shape)
    host = _hosted(base, ScaleShift(6, channel_dim=channel_dim, init_weights="identity"))
    torch.testing.assert_close(host(x), base(x), atol=0, rtol=0)


def test_paper_init_is_not_identity():
    base = nn.Linear(5, 6)
    x = torch.randn(3, 5)
    assert not torch.allclose(_hosted(base, ScaleShift(6))(x), base(x))


def test_gradients_reach_scale_and_shift_only():
    base = nn.Linear(5, 6)
    ssf = ScaleShift(6)
    host = _hosted(base, ssf)
    x = torch.randn(4, 5)
    host(x).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    torch.testing.assert_close(ssf.shift.grad, 2 * host(x).sum(0).detach())
    assert ssf.scale.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (nn.Linear(5, 6, bias=False), "Linear: it has no bias"),
        (nn.Conv2d(3, 6, 1, bias=False), "Conv2d: it has no bias"),
        (nn.LayerNorm(6, elementwise_affine=False), "LayerNorm: it has no affine weight"),
        (nn.LayerNorm(6, bias=False), "LayerNorm: it has no bias"),
        (nn.GroupNorm(3, 6, affine=False), "GroupNorm: it has no affine"),
        (nn.LayerNorm((4, 6)), "normalises over 2 axes"),
        (nn.GELU(), "GELU: only nn.Linear"),
        (nn.Sequential(nn.Linear(5, 6)), "Sequential: only nn.Linear"),
    ],
)
def test_unfoldable_bases_raise(base, match):
    assert not ScaleShift.can_fold(base)
    host = _hosted(base, ScaleShift(6))
    with pytest.raises(ValueError, match=match):
        host.merge("default")
    assert host.merged == []


def test_can_fold_accepts_foldable():
    assert all(ScaleShift.can_fold(param.values[0]()) for param in FOLDABLE)


def test_merge_checks_channel_axis_and_count():
    with pytest.raises(ValueError, match="set channel_dim=1"):
        ScaleShift(6).merge(nn.Conv2d(3, 6, 1))
    with pytest.raises(ValueError, match="set channel_dim=-1"):
        ScaleShift(6, channel_dim=1).merge(nn.Linear(3, 6))
    with pytest.raises(ValueError, match="set dim=7"):
        ScaleShift(6).merge(nn.Linear(3, 7))


def test_unmerge_with_zero_scale_raises():
    base = nn.Linear(3, 4)
    ssf = ScaleShift(4)
    with torch.no_grad():
        ssf.scale[1] = 0
    host = _hosted(base, ssf)
    host.merge("default")
    with pytest.raises(ValueError, match="scales γ are 0"):
        host.unmerge("default")


def test_low_precision_output_keeps_dtype():
    base = nn.Linear(5, 6).to(torch.bfloat16)
    host = _hosted(base, ScaleShift(6, init_weights=False))
    assert host(torch.randn(2, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- the lean training paths: same outputs and gradients as the plain affine, fewer saved activations ----------
LEAN = [
    *FOLDABLE,
    pytest.param(lambda: nn.BatchNorm2d(6), 1, (4, 6, 3, 3), id="BatchNorm2d-train"),
]


def _saved_bytes(fn, *modules: nn.Module) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes autograd saves while it runs (each storage once), the ``modules``' parameters left
    out (as ``benchmarks.harness.saved_activation_bytes`` counts)."""
    resident = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in resident:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize(("make", "channel_dim", "shape"), LEAN)
def test_lean_path_matches_the_plain_affine_in_outputs_and_gradients(make, channel_dim, shape):
    torch.manual_seed(0)
    base = make()
    _randomise_affine(base)
    if isinstance(base, nn.modules.batchnorm._BatchNorm):
        base.running_mean.normal_(), base.running_var.uniform_(0.5, 2.0)
    plain_base = copy.deepcopy(base)
    dim = 6
    adapter = layers.scale_shift_for(base, dim, channel_dim=channel_dim, init_weights=False)
    host = _hosted(base, adapter)
    x = torch.randn(*shape, requires_grad=True)

    # the straightforward reference: base output, then out * γ + β with autograd keeping what it keeps
    scale = adapter.scale.detach().clone().requires_grad_()
    shift = adapter.shift.detach().clone().requires_grad_()
    view = [1] * len(shape)
    view[channel_dim] = dim
    x_ref = x.detach().clone().requires_grad_()
    plain_base.requires_grad_(False)
    expected = plain_base(x_ref) * scale.view(view) + shift.view(view)
    g = torch.randn(expected.shape)
    expected.backward(g)

    out = host(x)
    out.backward(g)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.scale.grad, scale.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.shift.grad, shift.grad, rtol=1e-5, atol=1e-5)
    if isinstance(base, nn.modules.batchnorm._BatchNorm):  # the running statistics moved as the plain base's did
        torch.testing.assert_close(base.running_mean, plain_base.running_mean)
        torch.testing.assert_close(base.running_var, plain_base.running_var)


def test_after_a_norm_the_scale_shift_folds_into_it_and_keeps_nothing_more():
    norm = nn.LayerNorm(8)
    assert type(layers.scale_shift_for(norm, 8)) is layers.FoldedScaleShift
    assert type(layers.scale_shift_for(nn.Linear(4, 8), 8)) is ScaleShift
    assert type(layers.scale_shift_for(nn.LayerNorm(8, bias=False), 8)) is ScaleShift  # nothing to fold β into
    x = torch.randn(3, 5, 8, requires_grad=True)
    frozen_norm = nn.LayerNorm(8).requires_grad_(False)
    _, frozen = _saved_bytes(lambda: frozen_norm(x), frozen_norm)
    host = _hosted(norm, layers.scale_shift_for(norm, 8, init_weights=False))
    _, adapted = _saved_bytes(lambda: host(x), host)
    # the input and its statistics, kept by the norm either way, and the folded affine itself (C-sized, not per token)
    assert adapted - frozen <= 2 * 8 * 4


def test_after_a_linear_the_output_is_kept_instead_of_the_input():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, requires_grad=True)
    lin = nn.Linear(4, 8)
    host = _hosted(lin, ScaleShift(8, init_weights=False))
    out, lean = _saved_bytes(lambda: nn.functional.gelu(host(x)), host)
    assert lean == out.untyped_storage().nbytes() == 3 * 5 * 8 * 4  # one tensor, shared with the GELU
    ScaleShift.recompute_from_output = False
    try:
        _, plain = _saved_bytes(lambda: nn.functional.gelu(host(x)), host)
    finally:
        ScaleShift.recompute_from_output = True
    assert plain == 2 * lean  # the pre-scale features besides the GELU's input


def test_a_zero_scale_falls_back_to_the_plain_path():
    lin = nn.Linear(4, 3)
    adapter = ScaleShift(3, init_weights=False)
    with torch.no_grad():
        adapter.scale[1] = 0.0
    host = _hosted(lin, adapter)
    x = torch.randn(2, 4)
    host(x).sum().backward()
    expected = lin(x).detach().sum(0)
    torch.testing.assert_close(adapter.scale.grad, expected)  # d/dγ Σ (γ out + β) = Σ out, γ_1 = 0 included


def test_an_in_place_change_of_the_kept_output_is_a_clear_error():
    host = _hosted(nn.Linear(4, 3), ScaleShift(3, init_weights=False))
    out = torch.relu_(host(torch.randn(2, 4)))
    with pytest.raises(RuntimeError, match="recompute_from_output = False"):
        out.sum().backward()


# -- RecomputingScaleShift: nothing of a frozen Linear's output kept; the output rebuilt from its input's producer --
def _attention_output(x: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """timm's attention up to ``attn.proj``'s input: q, k, v from ``x``, the fused kernel, heads merged."""
    b, n, c = x.shape
    q, k, v = ((x * s).reshape(b, n, 2, c // 2).permute(0, 2, 1, 3) for s in (1.0, 0.5, -1.0))
    out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return out.reshape(b, n, c) if contiguous else out.permute(0, 1, 3, 2).clone().reshape(b, n, c)


PRODUCERS = [
    pytest.param(lambda x: nn.functional.gelu(x), id="after-GELU"),
    pytest.param(lambda x: nn.functional.layer_norm(x, (8,), torch.linspace(0.5, 2, 8), torch.ones(8)), id="after-LN"),
    pytest.param(lambda x: _attention_output(x, True), id="after-attention"),
    pytest.param(lambda x: _attention_output(x, False), id="after-attention-clone"),
]


@pytest.mark.parametrize("producer", PRODUCERS)
def test_recomputing_scale_shift_matches_the_plain_one_and_keeps_nothing_of_the_output(producer):
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    adapter = layers.scale_shift_for(lin, 6, init_weights=False, recompute=True)
    assert type(adapter) is layers.RecomputingScaleShift and not adapter.has_post and adapter.has_replace_base
    plain = ScaleShift(6, init_weights=False)
    plain.load_state_dict(adapter.state_dict())
    plain_host, host = _hosted(copy.deepcopy(lin), plain), _hosted(lin, adapter)
    x = torch.randn(2, 5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, 6)

    expected, kept_plain = _saved_bytes(lambda: plain_host(producer(x_ref)) + 1.0, plain_host)
    expected.backward(g)
    out, kept = _saved_bytes(lambda: host(producer(x)) + 1.0, host)
    out.backward(g)
    frozen = copy.deepcopy(lin).requires_grad_(False)
    _, kept_frozen = _saved_bytes(lambda: frozen(producer(x.detach().requires_grad_())) + 1.0, frozen)

    assert torch.equal(out, expected)  # the same operations in the same order
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.scale.grad, plain.scale.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adapter.shift.grad, plain.shift.grad, rtol=1e-5, atol=1e-6)
    assert kept == kept_frozen  # what the frozen Linear's graph keeps (its input's producer), nothing more
    assert kept_plain >= kept + out.numel() * 4  # the plain one keeps the output besides


def test_recomputing_scale_shift_falls_back_where_the_input_cannot_be_rebuilt_or_the_linear_trains():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    adapter = layers.RecomputingScaleShift(3, init_weights=False)
    host = _hosted(lin, adapter)
    x = torch.randn(2, 4, requires_grad=True)  # a leaf: nothing rebuilds it
    host(x).sum().backward()
    torch.testing.assert_close(adapter.scale.grad, lin(x).detach().sum(0))
    assert type(host(x).grad_fn).__name__ == "_ScaleShiftKeepsOutputBackward"  # the output-keeping path
    lin.weight.requires_grad_(True)
    out = host(nn.functional.gelu(x))
    assert type(out.grad_fn).__name__ != "_LinearScaleShiftBackward"
    out.sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(host(x), lin(x) * adapter.scale + adapter.shift)


def test_only_a_linear_takes_a_recomputing_scale_shift():
    with pytest.raises(ValueError, match="after an nn.Linear, not a Conv2d"):
        layers.scale_shift_for(nn.Conv2d(2, 4, 3), 4, channel_dim=1, recompute=True)
    assert type(layers.scale_shift_for(nn.LayerNorm(4), 4, recompute=True)) is layers.FoldedScaleShift


# -- ResidualScaleShift: the output of a residual branch's last Linear read back from the residual stream --
class _PreNormBlock(nn.Module):
    """``x = x + proj(gelu(norm1(x))); x = x + fc2(gelu(norm2(x)))``: two residual branches, each ending in a Linear."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.norm1, self.proj = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.norm2, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(nn.functional.gelu(self.norm1(x)))
        return x + self.fc2(nn.functional.gelu(self.norm2(x)))


def _block_with(cls: type[ScaleShift]) -> tuple[_PreNormBlock, list[ScaleShift]]:
    torch.manual_seed(0)
    block = _PreNormBlock().requires_grad_(False)
    adapters = []
    for name in ("proj", "fc2"):
        adapter = cls(6, init_weights=False)
        setattr(block, name, _hosted(getattr(block, name), adapter))
        adapters.append(adapter)
    return block, adapters


def test_residual_scale_shift_reads_the_output_back_from_the_residual_stream():
    """Bound to a pre-norm block, the scale-shifts that end its branches keep nothing of their outputs: ``γ``'s
    gradient reads ``out = (after - before - β) / γ`` from the stream the norms keep (the same bytes as the frozen
    block's); outputs bit for bit and gradients within float rounding of the output-keeping path."""
    plain, plain_adapters = _block_with(ScaleShift)
    block, adapters = _block_with(layers.ResidualScaleShift)
    for a, b in zip(adapters, plain_adapters, strict=True):
        a.load_state_dict(b.state_dict())
    layers.PreNormResidualTaps.bind(block, block.norm2, *adapters)
    frozen = _PreNormBlock().requires_grad_(False)
    x = torch.randn(2, 5, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(2, 5, 6)

    expected, kept_plain = _saved_bytes(lambda: plain(x_ref), plain)
    out, kept = _saved_bytes(lambda: block(x), block)
    _, kept_frozen = _saved_bytes(lambda: frozen(x.detach().requires_grad_()), frozen)
    assert torch.equal(out, expected)
    assert kept == kept_frozen and kept_plain == kept + 2 * out.numel() * 4  # the two branch outputs
    out.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    for a, b in zip(adapters, plain_adapters, strict=True):
        torch.testing.assert_close(a.scale.grad, b.scale.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.shift.grad, b.shift.grad, rtol=1e-5, atol=1e-6)
    assert all(a.tap.current is None for a in adapters)  # the block holds nothing after its forward


def test_residual_scale_shift_outside_its_block_keeps_its_output():
    block, (first, _) = _block_with(layers.ResidualScaleShift)  # never bound: no residual step to read
    out = block(torch.randn(2, 5, 6))
    assert type(out.grad_fn.next_functions[1][0]).__name__ == "_ScaleShiftKeepsOutputBackward"
    out.sum().backward()
    assert first.scale.grad is not None
