import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modalpeft.core.layer import AdapterLayer
from modalpeft.core.layers import SparseDelta
from modalpeft.core.layers import sparse as sparse_module

OUT, IN = 6, 5
INDICES = torch.tensor([[0, 0, 2, 5, 3, 1, 4], [0, 4, 1, 2, 3, 0, 4]])


def _hosted(base: nn.Module, adapter: SparseDelta) -> AdapterLayer:
    base.requires_grad_(False)
    host = AdapterLayer(base)
    host.add("default", adapter)
    host.active_adapter = "default"
    return host


def _dense_reference(values: torch.Tensor, indices: torch.Tensor = INDICES) -> torch.Tensor:
    mask = torch.zeros(OUT, IN, dtype=values.dtype)
    mask[indices[0], indices[1]] = 1
    dense = torch.zeros(OUT, IN, dtype=values.dtype).index_put((indices[0], indices[1]), values)
    return dense * mask


def test_delta_weight_and_parallel_match_dense():
    torch.manual_seed(0)
    layer = SparseDelta(IN, OUT, INDICES, init_weights=False)
    delta = layer.delta_weight()
    assert delta.shape == (OUT, IN)
    assert torch.count_nonzero(delta) == INDICES.shape[1]
    torch.testing.assert_close(delta[INDICES[0], INDICES[1]], layer.values)
    x = torch.randn(2, 3, IN)
    torch.testing.assert_close(layer.parallel(x), x @ delta.t())


def test_init_modes_and_state():
    assert torch.equal(SparseDelta(IN, OUT, INDICES).values, torch.zeros(7))
    assert torch.equal(SparseDelta(IN, OUT, INDICES, init_weights="identity").values, torch.zeros(7))
    assert torch.all(SparseDelta(IN, OUT, INDICES, init_weights=False).values != 0)
    state = SparseDelta(IN, OUT, INDICES.int()).state_dict()
    assert set(state) == {"indices", "values"} and state["indices"].dtype == torch.long
    assert torch.equal(state["indices"], INDICES)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7])
def test_gradients_match_dense_reference(monkeypatch, chunk_elements):
    # 7 elements per chunk with 12 positions leaves one entry per chunk: the chunked path runs.
    monkeypatch.setattr(sparse_module, "_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    layer = SparseDelta(IN, OUT, INDICES, init_weights=False)
    x = torch.randn(3, 4, IN, requires_grad=True)
    grad_y = torch.randn(3, 4, OUT)
    layer.parallel(x).backward(grad_y)

    values = layer.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ _dense_reference(values).t()).backward(grad_y)
    torch.testing.assert_close(layer.values.grad, values.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, IN, dtype=torch.float64, requires_grad=True)
    values = torch.randn(INDICES.shape[1], dtype=torch.float64, requires_grad=True)
    fn = sparse_module._SparseDeltaMatmul.apply
    groups = SparseDelta(IN, OUT, INDICES).groups()
    assert torch.autograd.gradcheck(lambda x, v: fn(x, v, INDICES, OUT, groups), (x, values))


class _MatmulShapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_hosted_backward_never_forms_dense_weight_gradient():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = SparseDelta(IN, OUT, INDICES, init_weights=False)
    host = _hosted(base, layer)
    x = torch.randn(7, IN)  # 7 positions: no shape coincides with (OUT, IN)
    loss = host(x).square().sum()
    with _MatmulShapes() as mode:
        loss.backward()
    assert (OUT, IN) not in mode.shapes and (IN, OUT) not in mode.shapes
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.values.grad.shape == (INDICES.shape[1],) and layer.values.grad.abs().sum() > 0


def test_identity_at_init_and_exact_merge():
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    x = torch.randn(3, IN)
    y_base = base(x)
    torch.testing.assert_close(_hosted(base, SparseDelta(IN, OUT, INDICES))(x), y_base, atol=0, rtol=0)

    layer = SparseDelta(IN, OUT, INDICES, init_weights=False)
    host = _hosted(nn.Linear(IN, OUT), layer)
    weight = host.base_layer.weight.detach().clone()
    y = host(x)
    torch.testing.assert_close(y, host.base_layer(x) + x @ layer.delta_weight().t())
    host.merge("default")
    torch.testing.assert_close(host.base_layer.weight, weight + layer.delta_weight())
    torch.testing.assert_close(host(x), y, atol=1e-5, rtol=1e-5)
    host.unmerge("default")
    torch.testing.assert_close(host.base_layer.weight, weight, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        (torch.tensor([[0, 6], [0, 1]]), r"\(6, 1\) of indices lies outside the weight of shape \(6, 5\)"),
        (torch.tensor([[0, 1], [5, 1]]), r"\(0, 5\) of indices lies outside the weight of shape \(6, 5\)"),
        (torch.tensor([[-1], [0]]), r"outside the weight of shape \(6, 5\)"),
        (torch.tensor([[1, 2, 1], [3, 0, 3]]), "1 repeated entries"),
        (torch.tensor([3, 7]), r"shape \(2, n\)"),
        (torch.tensor([[0.0], [1.0]]), r"integer tensor of shape \(2, n\)"),
    ],
)
def test_bad_indices_raise(indices, match):
    with pytest.raises(ValueError, match=match):
        SparseDelta(IN, OUT, indices)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("columns", [3, 40])
def test_backward_keeps_only_the_used_columns_of_x(fused, columns):
    """With entries in few input columns, the backward keeps those columns of ``x`` (a ``(u, T)`` copy), not ``x``;
    with many, it keeps ``x`` itself (no copy). The gradients match the dense reference either way."""
    torch.manual_seed(0)
    d_in, d_out, tokens = 64, 16, 10
    cols = torch.randperm(d_in)[:columns]
    k = torch.arange(columns + 5)  # every used column, five of them twice; distinct (row, column) pairs
    indices = torch.stack([k % d_out, cols[k % columns]])
    layer = SparseDelta(d_in, d_out, indices, init_weights=False, fused=fused)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    x = torch.randn(2, tokens // 2, d_in, requires_grad=True)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = layer.replace_base(base, x) if fused else base(x) + layer.parallel(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    activations = [t for t in saved if t.dtype.is_floating_point and t.data_ptr() != base.weight.data_ptr()]
    if columns < d_in // 2:  # the used columns only, and nothing as large as x
        assert [t.shape for t in activations if t.numel() > d_out] == [(columns, tokens)]
    else:
        assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy

    values = layer.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    dense = torch.zeros(d_out, d_in).index_put((indices[0], indices[1]), values, accumulate=True)
    nn.functional.linear(x_ref, base.weight + dense, base.bias).backward(grad_y)
    torch.testing.assert_close(layer.values.grad, values.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_the_entry_grouping_is_computed_once_and_follows_the_indices(monkeypatch):
    """The ``unique`` over the indices runs when the layer first computes, not at every step; writing new indices
    into the buffer (``load_state_dict``) or building another layer recomputes it, and the gradients follow."""
    torch.manual_seed(0)
    layer = SparseDelta(16, 8, torch.tensor([[0, 3, 5], [1, 1, 7]]), init_weights=False)
    calls = []
    real = torch.Tensor.unique
    monkeypatch.setattr(torch.Tensor, "unique", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(4, 16)
    for _ in range(3):
        layer.parallel(x).sum().backward()
    assert len(calls) == 2  # columns and rows, once
    other = torch.tensor([[2, 6, 7], [0, 9, 15]])
    layer.load_state_dict({"values": layer.values.detach(), "indices": other})
    layer.values.grad = None
    layer.parallel(x).pow(2).sum().backward()
    assert len(calls) == 4
    dense = torch.zeros(8, 16).index_put((other[0], other[1]), layer.values.detach()).requires_grad_(True)
    (x @ dense.t()).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.grad[other[0], other[1]])
