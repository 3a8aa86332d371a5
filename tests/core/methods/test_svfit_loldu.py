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
