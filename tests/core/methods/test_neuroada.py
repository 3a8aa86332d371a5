"""NeuroAda (``"neuroada"``) against a transcription of the official selection and forward
(FightingFighting/NeuroAda @ e084f0bf86e1: ``select_perCell`` with "mag", ``update_model``'s ``scatter_add`` forward,
``merge_model``), and the promise that training builds no dense weight-sized gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modalpeft as mp
from modalpeft.core.inject import hosts


def official_positions(weight: torch.Tensor, k: int) -> torch.Tensor:
    """``select_perCell`` (mag) then ``update_model``: flat positions ``i·d_in + j`` of each row's top-k |W|."""
    topk_indices = torch.topk(abs(weight), min(k, weight.size(1)), dim=1, largest=True).indices
    mask = torch.ones_like(weight)
    mask.scatter_(1, topk_indices, 0)
    pos = torch.nonzero(mask == 0, as_tuple=False)
    return pos[:, 0] * weight.size(1) + pos[:, 1]


def official_forward(x, weight, bias, positions, new_weight):
    return nn.functional.linear(x, weight.flatten().scatter_add(0, positions, new_weight).view_as(weight), bias)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 10))


@pytest.mark.parametrize("k", [1, 5, 24])
def test_matches_the_official_selection_forward_gradient_and_merge(k: int) -> None:
    base = model()
    weights = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in base.named_children() if n != "1"}
    adapted = mp.adapt(base, mp.NeuroAdaConfig(k=k))
    layers = {name: host.adapters["default"] for name, host in hosts(adapted.base_model)}
    x = torch.randn(3, 7, 24)
    for name, layer in layers.items():
        w, _ = weights[name]
        rows, cols = layer.indices
        torch.testing.assert_close(rows * w.shape[1] + cols, official_positions(w, k), rtol=0, atol=0)
        with torch.no_grad():
            layer.values.normal_(std=0.2)
    # the official model: each Linear's forward replaced by the scatter_add one, the same delta vectors
    official = {n: layers[n].values.detach().clone().requires_grad_(True) for n in layers}

    def official_model(x):
        h = official_forward(x, *weights["0"], official_positions(weights["0"][0], k), official["0"])
        return official_forward(torch.tanh(h), *weights["2"], official_positions(weights["2"][0], k), official["2"])

    target = torch.randn(3, 7, 10)
    ours = adapted(x)
    theirs = official_model(x)
    torch.testing.assert_close(ours, theirs)
    nn.functional.mse_loss(ours, target).backward()
    nn.functional.mse_loss(theirs, target).backward()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.values.grad, official[name].grad, rtol=1e-5, atol=1e-6)
    merged = adapted.merge_and_unload()
    for name in layers:
        w = weights[name][0]
        want = w.flatten().scatter_add(0, official_positions(w, k), official[name].detach()).view_as(w)  # merge_model
        torch.testing.assert_close(merged.get_submodule(name).weight, want)


class ProductShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_training_forms_no_dense_weight_gradient() -> None:
    adapted = mp.adapt(model(), mp.NeuroAdaConfig(k=3, target_modules=["0"]))
    loss = adapted(torch.randn(5, 24)).square().sum()
    with ProductShapes() as products:
        loss.backward()
    assert (40, 24) not in products.shapes and (24, 40) not in products.shapes, products.shapes
    ((_, host),) = hosts(adapted.base_model)
    assert host.adapters["default"].values.grad.shape == (40 * 3,)
    assert host.base_layer.weight.grad is None


def test_k_above_the_fan_in_is_refused_before_any_change() -> None:
    base = model()
    with pytest.raises(ValueError, match=r"k=25 exceeds the fan-in of '0' \(24 inputs per neuron\); pass k <= 24"):
        mp.adapt(base, mp.NeuroAdaConfig(k=25))
    assert not any(isinstance(m, mp.AdapterLayer) for m in base.modules())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k="):
            mp.NeuroAdaConfig(k=bad)


def test_count_is_k_per_neuron_and_the_adapter_saves_indices_and_values(tmp_path) -> None:
    adapted = mp.adapt(model(), mp.NeuroAdaConfig(k=2))
    assert adapted.trainable_summary()["trainable"] == 2 * 40 + 2 * 10
    assert sorted(adapted.adapter_state_dict()) == [f"{n}.adapters.{t}" for n in "02" for t in ("indices", "values")]
    x = torch.randn(4, 24)
    with torch.no_grad():
        for _, host in hosts(adapted.base_model):
            host.adapters["default"].values.normal_()
    adapted.save_adapter(tmp_path / "neuroada")
    torch.testing.assert_close(mp.load_adapter(model(), tmp_path / "neuroada")(x), adapted(x))
