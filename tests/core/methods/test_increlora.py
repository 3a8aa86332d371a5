"""IncreLoRA (``"increlora"``) against transcriptions of the official ``loraW``, backward-hook score,
``compute_orth_regu`` and ``RankAllocator`` (FeiyuZhang98/IncreLoRA @ 51a2d734af78, ``loralib/loralib/increlora.py``),
and the growth in a Lightning run: it grows, saves, loads and merges."""

from __future__ import annotations

import dataclasses
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.methods.increlora import RankAllocator, effective_parameters, growing_layers


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def official_w(A: list, E: list, B: list, scaling: float, ranknum: float) -> torch.Tensor:
    """``loraW.forward``: the pieces (active, then reserve) concatenated."""
    return torch.cat(list(B), 1) @ (torch.cat(list(A), 0) * torch.cat(list(E), 0)) * scaling / (ranknum + 1e-5)


def test_update_matches_the_official_pieces_with_the_reserve() -> None:
    model = mp.adapt(mlp(), mp.IncreLoRAConfig(init_rank=2, target_rank=4, max_rank=4, alpha=32.0))
    layer = growing_layers(model)[0]
    assert int(layer.rank) == 2 and int(layer.reserve) == 2  # {4: 2} pieces per growth, reserved in advance
    with torch.no_grad():
        layer.E[:2] = torch.tensor([[0.3], [-0.7]])
    # official lists: lora_A[0] (r x d_in) with E[0] (r x 1), then reserve pieces with e = 1e-5
    A = [layer.A[:2], layer.A[2:3], layer.A[3:4]]
    E = [layer.E[:2], torch.full((1, 1), 1e-5), torch.full((1, 1), 1e-5)]
    B = [layer.B[:, :2], layer.B[:, 2:3], layer.B[:, 3:4]]
    torch.testing.assert_close(layer.delta_weight(), official_w(A, E, B, 32.0, 2.0))
    layer.grow(2)  # the reserve is activated (its e trains from 1e-5) and a new reserve would follow
    assert int(layer.rank) == 4 and int(layer.reserve) == 2
    A.append(layer.A[4:6])
    E.append(torch.full((2, 1), 1e-5))
    B.append(layer.B[:, 4:6])
    torch.testing.assert_close(layer.delta_weight(), official_w(A, E, B, 32.0, 4.0))


def test_importance_score_is_the_official_backward_hook() -> None:
    torch.manual_seed(0)
    model = mp.adapt(nn.Sequential(nn.Linear(6, 10)), mp.IncreLoRAConfig(init_weights=False)).train()
    (layer,) = growing_layers(model)
    layer.tracking = True
    x = torch.randn(5, 6)
    model(x).square().sum().backward()
    dw = layer.delta_weight().detach().requires_grad_(True)  # the official loraW output, as a leaf
    with torch.no_grad():
        base = model.base_model[0].base_layer(x)
    (base + x @ dw.t()).square().sum().backward()
    expected = torch.sum((dw.detach().abs() * dw.grad).abs()) / math.sqrt(dw.numel())  # backward_hook's score
    torch.testing.assert_close(layer.score, expected)


def test_orthogonal_penalty_matches_compute_orth_regu() -> None:
    config = mp.IncreLoRAConfig(init_rank=2, target_rank=4, max_rank=6)
    model = mp.adapt(mlp(), config)
    penalty = config.training_penalty(model)
    terms = []  # compute_orth_regu over the official parameter lists: lora_A.0 (2 x d_in), lora_A.1, ... (1 x d_in)
    for layer in growing_layers(model):
        used = int(layer.rank + layer.reserve)
        pieces_a = [layer.A[:2]] + [layer.A[i : i + 1] for i in range(2, used)]
        pieces_b = [layer.B[:, :2]] + [layer.B[:, i : i + 1] for i in range(2, used)]
        for p in pieces_a:
            terms.append(torch.norm(p @ p.T - torch.eye(p.shape[0]), p="fro"))
        for p in pieces_b:
            terms.append(torch.norm(p.T @ p - torch.eye(p.shape[1]), p="fro"))
    torch.testing.assert_close(penalty, 0.1 * sum(terms) / len(terms))


def test_allocator_grows_the_most_important_modules_until_the_budget() -> None:
    config = mp.IncreLoRAConfig(target_rank=2, max_rank=4, top_h=1, incre_interval=2, init_warmup=1)
    model = mp.adapt(mlp(), config)
    allocator = RankAllocator(model, config, total_steps=20)
    layers = growing_layers(model)
    grown = []
    for step in range(1, 8):
        for layer, score in zip(layers, (1.0 + step % 2, 5.0 * step), strict=True):  # the second varies more
            layer.score = torch.tensor(score)
        grown.append(allocator.step(step))
    assert grown[:3] == [[], [1], []] and [int(layer.rank) for layer in layers][1] >= 2
    assert allocator.total == sum(int(layer.rank) for layer in layers) >= allocator.target_total == 4
    assert allocator.done and all(int(layer.reserve) == 0 and not layer.tracking for layer in layers)
    assert effective_parameters(model) == sum(int(m.rank) * (m.A.shape[1] + m.B.shape[0] + 1) for m in layers)


def test_a_schedule_longer_than_the_run_is_refused() -> None:
    config = mp.IncreLoRAConfig(target_rank=8, max_rank=8, top_h=1, incre_interval=50, init_warmup=100)
    model = mp.adapt(mlp(), config)
    with pytest.raises(ValueError, match=r"needs 300 steps .* 4 growths x incre_interval=50 .* run has 200"):
        RankAllocator(model, config, total_steps=200)
    with pytest.raises(ValueError, match="init_rank <= target_rank <= max_rank"):
        mp.IncreLoRAConfig(target_rank=6, max_rank=4)
    with pytest.raises(ValueError, match="target_rank=3 has no official incre_rank_num"):
        mp.IncreLoRAConfig(target_rank=3)


@pytest.mark.slow
def test_ranks_grow_in_a_lightning_run_and_the_grown_adapter_saves_loads_and_merges(tmp_path) -> None:
    from modalpeft.lightning import RankGrowth

    from ...lightning.test_task import backbone, data, task, trainer

    pl.seed_everything(0)
    config = mp.IncreLoRAConfig(target_rank=2, max_rank=3, top_h=2, incre_interval=2, init_warmup=1)
    trained = task(dataclasses.replace(config, target_modules=["qkv", "proj"]))
    fit = trainer(tmp_path, max_steps=8)
    fit.fit(trained, datamodule=data())
    growth = next(c for c in fit.callbacks if isinstance(c, RankGrowth))
    assert growth.history and growth.allocator.done
    ranks = [int(layer.rank) for layer in growing_layers(trained.model)]
    assert sum(ranks) >= 2 * len(ranks) and max(ranks) > 1
    trained.model.save_adapter(tmp_path / "grown")
    loaded = mp.load_adapter(backbone(), tmp_path / "grown")
    assert [int(layer.rank) for layer in growing_layers(loaded)] == ranks
    x = torch.randn(2, 1, 8, 8)
    trained.eval()
    expected = trained(x)
    torch.testing.assert_close(loaded.eval()(x), expected)
    torch.testing.assert_close(loaded.merge_and_unload()(x), expected, atol=1e-5, rtol=1e-5)
