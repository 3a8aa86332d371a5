"""SVFit (``"svfit"``) and LoLDU (``"loldu"``): one layer, a trainable vector inside a fixed factorisation.

LoLDU is checked against a transcription of the official ``LoLDUParametrization`` (SKDDJ/LoLDU @ 4fe87a05a668,
``minloldu/loldu.py``): the residual weight and the effective weight it computes; SVFit against the paper's
``W' = U_r diag(σ') V_rᵀ + W_e``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 6))


def trained_vectors(model: mp.AdaptedModel, seed: int = 3) -> dict[str, torch.Tensor]:
    """Move every ``z`` away from its start and return the new values by host name."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for name, host in hosts(model.base_model):
            z = host.adapters["default"].z
            z.add_(torch.randn(z.shape, generator=g) * 0.3)
            out[name] = z.detach().clone()
    return out


def official_loldu_weight(weight: torch.Tensor, rank: int, alpha: float, z: torch.Tensor) -> torch.Tensor:
    """The official parametrisation: ``ldu_decomposition``, the residual ``resmat``, then ``loldu_forward``."""
    P, L, U = torch.linalg.lu(weight)
    D = torch.diagonal(U)
    U = U / D.unsqueeze(-1)
    lora_A, lora_B, vector_z = U[:rank], L[:, :rank], D[:rank]
    scaling = alpha / rank
    resmat = weight - scaling * P @ lora_B @ torch.diag(vector_z) @ lora_A
    return resmat + scaling * P @ lora_B @ torch.diag(z) @ lora_A


@pytest.mark.parametrize(("rank", "alpha"), [(3, 1.0), (6, 4.0), (None, 2.0)])
def test_loldu_matches_the_official_parametrisation(rank: int | None, alpha: float) -> None:
    base = mlp()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = mp.adapt(base, mp.LoLDUConfig(rank=rank, alpha=alpha))
    for name, host in hosts(model.base_model):
        r = rank or min(weights[name].shape)
        torch.testing.assert_close(host.adapters["default"].z, torch.diagonal(torch.linalg.lu(weights[name])[2])[:r])
    vectors = trained_vectors(model)
    x = torch.randn(5, 12)
    expected = base_with(
        weights,
        {n: official_loldu_weight(weights[n], rank or min(weights[n].shape), alpha, z) for n, z in vectors.items()},
    )(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    for name, z in vectors.items():
        r = rank or min(weights[name].shape)
        want = official_loldu_weight(weights[name], r, alpha, z)
        torch.testing.assert_close(merged.get_submodule(name).weight, want, atol=1e-5, rtol=1e-5)


def base_with(weights: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> nn.Module:
    model = mlp()
    with torch.no_grad():
        for name, w in new.items():
            model.get_submodule(name).weight.copy_(w)
    return model


@pytest.mark.parametrize("rank", [2, 6, None])
def test_svfit_trains_the_top_singular_values(rank: int | None) -> None:
    base = mlp()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = mp.adapt(base, mp.SVFitConfig(rank=rank))
    assert model.trainable_summary()["trainable"] == sum(rank or min(w.shape) for w in weights.values())
    vectors = trained_vectors(model)
    merged = model.merge_and_unload()
    for name, sigma in vectors.items():
        u, s, vh = torch.linalg.svd(weights[name], full_matrices=False)
        r = rank or min(weights[name].shape)
        w_r = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        want = u[:, :r] @ torch.diag(sigma) @ vh[:r] + (weights[name] - w_r)
        torch.testing.assert_close(merged.get_submodule(name).weight, want, atol=1e-5, rtol=1e-5)


def test_svfit_starts_at_the_singular_values() -> None:
    base = mlp()
    s = torch.linalg.svdvals(base[0].weight.detach())
    model = mp.adapt(base, mp.SVFitConfig(rank=4, target_modules=["0"]))
    ((_, host),) = hosts(model.base_model)
    torch.testing.assert_close(host.adapters["default"].z.detach(), s[:4])


def test_saved_adapter_holds_the_vector_only(tmp_path) -> None:
    model = mp.adapt(mlp(), mp.SVFitConfig(rank=3))
    trained_vectors(model)
    model.save_adapter(tmp_path / "svfit")
    keys = sorted(model.adapter_state_dict())
    assert keys == ["0.adapters.z", "2.adapters.z"]
    x = torch.randn(4, 12)
    torch.testing.assert_close(mp.load_adapter(mlp(), tmp_path / "svfit")(x), model(x))


@pytest.mark.parametrize("method", ["svfit", "loldu"])
def test_rank_above_the_weights_rank_is_refused_before_any_change(method: str) -> None:
    base = mlp()
    with pytest.raises(ValueError, match=r"rank=7 exceeds the rank of '2'.*min\(d_out, d_in\) = 6.*rank <= 6"):
        mp.adapt(base, mp.create_config(method, rank=7))
    assert not any(isinstance(m, mp.AdapterLayer) for m in base.modules())


def test_loldu_refuses_a_zero_pivot() -> None:
    base = mlp()
    with torch.no_grad():
        base[2].weight[:, 3:] = base[2].weight[:, :3] @ torch.randn(3, 17)  # rank 3
    with pytest.raises(ValueError, match=r"'2': LDU pivot D\[3\].*pass rank <= 3"):
        mp.adapt(base, mp.LoLDUConfig(rank=5))
    mp.adapt(base, mp.LoLDUConfig(rank=3))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_rank_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="rank="):
        mp.SVFitConfig(rank=bad)
    with pytest.raises(ValueError, match="rank="):
        mp.LoLDUConfig(rank=bad)
    with pytest.raises(ValueError, match="alpha="):
        mp.LoLDUConfig(alpha=0.0)


def _reference(layer, base, x):
    """Autograd through ``W + ΔW``: what the lean product must equal."""
    return torch.nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)


@pytest.mark.parametrize("producer", ["leaf", "layer_norm", "gelu"])
@pytest.mark.parametrize(("d_out", "d_in", "rank", "tokens"), [(48, 16, 3, 40), (16, 16, 16, 6), (24, 16, 16, 64)])
@pytest.mark.parametrize("base_trains", [False, True])
def test_factorized_product_matches_autograd_through_the_adapted_weight(
    producer, d_out, d_in, rank, tokens, base_trains
):
    """Outputs, ∂L/∂z, ∂L/∂x (and the base's gradients when it trains) equal autograd's through W + ΔW, in the
    factored regime (small rank, many tokens) and the weight-gradient one (full rank, few tokens), whatever made x."""
    from modalpeft.core.layers import FactorizedVector

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(base_trains)
    u, s, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    layer = FactorizedVector(u[:, :rank], vh[:rank], s[:rank], scaling=0.7, init_weights=False)
    norm = nn.LayerNorm(d_in)
    make = {"leaf": lambda t: t, "layer_norm": norm, "gelu": nn.functional.gelu}[producer]
    t = torch.randn(2, tokens // 2, d_in, requires_grad=True)
    grad = torch.randn(2, tokens // 2, d_out)
    results = []
    for lean in (True, False):
        for p in (t, layer.z, base.weight, base.bias):
            p.grad = None
        x = make(t)
        y = layer.replace_base(base, x) if lean else _reference(layer, base, x)
        (y * grad).sum().backward()
        grads = [p.grad.clone() for p in (t, layer.z) + ((base.weight, base.bias) if base_trains else ())]
        results.append((y.detach(), *grads))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_factorized_product_keeps_no_copy_of_a_normed_input():
    """After a LayerNorm, the lean backward keeps the norm's own saves and ``Δz``: nothing of ``x``'s size of its own,
    where autograd through ``W + ΔW`` keeps ``x`` and the adapted weight."""
    from modalpeft.core.layers import FactorizedVector

    torch.manual_seed(0)
    base = nn.Linear(16, 48).requires_grad_(False)
    u, s, vh = torch.linalg.svd(base.weight, full_matrices=False)
    layer = FactorizedVector(u[:, :4], vh[:4], s[:4])
    norm = nn.LayerNorm(16)
    t = torch.randn(3, 10, 16, requires_grad=True)

    def own_saves(lean: bool) -> list[int]:
        saved, phase = {}, ["norm"]
        resident = {p.data_ptr() for p in (*base.parameters(), *layer.buffers(), layer.z)}

        def pack(tensor):
            key = tensor.untyped_storage().data_ptr()
            if tensor.data_ptr() not in resident and key not in saved:
                saved[key] = (phase[0], tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            x = norm(t)
            phase[0] = "product"
            y = layer.replace_base(base, x) if lean else _reference(layer, base, x)
        y.sum().backward()
        return sorted(n for who, n in saved.values() if who == "product" and n >= t.numel())

    assert own_saves(False) == [t.numel(), 48 * 16]  # autograd keeps x for the weight's gradient, and W + ΔW
    assert own_saves(True) == []


@pytest.mark.parametrize("producer", ["leaf", "layer_norm"])
@pytest.mark.parametrize(("d_out", "d_in", "tokens"), [(48, 16, 40), (16, 16, 6), (16, 24, 64)])
def test_an_exact_factorisation_trains_through_the_factored_product_alone(producer, d_out, d_in, tokens):
    """A full-rank SVD (``W_res`` is rounding): training runs ``s ((x F₂ᵀ) ⊙ z) F₁ᵀ + b`` without ``W`` and keeps
    only ``x F₂ᵀ``; outputs and gradients equal autograd's through ``W + ΔW`` within float rounding."""
    from modalpeft.core.layers import FactorizedVector
    from modalpeft.core.layers.factorized import is_exact

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    rank = min(d_in, d_out)
    u, s, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    assert is_exact(base.weight, u, vh, s, 1.0) and not is_exact(base.weight, u[:, :-1], vh[:-1], s[:-1], 1.0)
    layer = FactorizedVector(u, vh, s, init_weights=False, exact=True)
    norm = nn.LayerNorm(d_in)
    make = {"leaf": lambda t: t, "layer_norm": norm}[producer]
    t = torch.randn(2, tokens // 2, d_in, requires_grad=True)
    grad = torch.randn(2, tokens // 2, d_out)
    results, saves = [], []
    for lean in (True, False):
        for p in (t, layer.z):
            p.grad = None
        x = make(t)
        saves.append([])
        with torch.autograd.graph.saved_tensors_hooks(lambda a: saves[-1].append(a.shape) or a, lambda a: a):
            y = layer.replace_base(base, x) if lean else _reference(layer, base, x)
        (y * grad).sum().backward()
        results.append((y.detach(), t.grad.clone(), layer.z.grad.clone()))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert torch.Size([tokens, rank]) in saves[0] and torch.Size([d_out, d_in]) not in saves[0]
    # evaluation (no autograd) uses W + ΔW: the unchanged model's output exactly at z = z₀
    layer.reset_adapter(True)
    with torch.no_grad():
        torch.testing.assert_close(layer.replace_base(base, t), base(t), rtol=0, atol=0)


def test_only_full_rank_svfit_is_marked_exact() -> None:
    def exact(config) -> list[bool]:
        model = mp.adapt(mlp(), config)
        return [m.exact for m in model.modules() if type(m).__name__ == "FactorizedVector"]

    assert all(exact(mp.SVFitConfig()))
    assert not any(exact(mp.SVFitConfig(rank=2)))
    assert not any(exact(mp.LoLDUConfig()))  # s = alpha / r: W_res = (1 - s) W
