"""MTLoRA (``"mtlora"``) against a transcription of the official ``Linear.forward`` of each structure
(YaoLiang2023/MTLoRA @ 178cbb3e0eb4, ``transformation_matrix/{SHIM,ICFM,CTCM,DTSM}/xtuning_layers.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts


def official_branch(x, structure: str, A, B, C, D, scaling: float) -> torch.Tensor:
    """``result_r`` of the official ``Linear.forward`` (dropout off)."""
    if structure == "SHIM":
        return (x @ A.transpose(0, 1) @ C.transpose(0, 1) @ B.transpose(0, 1)) * scaling
    if structure == "ICFM":
        return (x @ A.transpose(0, 1) @ (C @ C.transpose(0, 1)).transpose(0, 1) @ B.transpose(0, 1)) * scaling
    if structure == "CTCM":
        return (x @ A.transpose(0, 1) @ (C @ D).transpose(0, 1) @ B.transpose(0, 1)) * scaling
    return (x @ A.transpose(0, 1) @ (C + D).transpose(0, 1) @ B.transpose(0, 1)) * scaling


@pytest.mark.parametrize("structure", ["SHIM", "ICFM", "CTCM", "DTSM"])
def test_matches_the_official_linear_and_merges_exactly(structure: str) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 14))
    w, b = base[0].weight.detach().clone(), base[0].bias.detach().clone()
    model = mp.adapt(base, mp.MTLoRAConfig(structure=structure, rank=4, alpha=6.0, init_weights=False)).eval()
    ((_, host),) = hosts(model.base_model)
    layer = host.adapters["default"]
    assert (layer.D is not None) == (structure in ("CTCM", "DTSM"))
    x = torch.randn(3, 5, 10)
    A, B, C, D = (None if p is None else p.detach() for p in (layer.A, layer.B, layer.C, layer.D))
    expected = nn.functional.linear(x, w, b) + official_branch(x, structure, A, B, C, D, 6.0 / 4)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_initialisation_follows_the_official_reset_parameters() -> None:
    model = mp.adapt(nn.Sequential(nn.Linear(10, 14)), mp.MTLoRAConfig(structure="CTCM", rank=4))
    ((_, host),) = hosts(model.base_model)
    layer = host.adapters["default"]
    assert torch.count_nonzero(layer.B) == 0  # B = 0: the model starts unchanged
    bound = 1 / 4**0.5  # kaiming_uniform(a=√5) on an (r, r) matrix: U(-1/√r, 1/√r)
    for m in (layer.C, layer.D):
        assert m.abs().max() <= bound and torch.count_nonzero(m) == 16


def test_count_and_bad_input() -> None:
    model = mp.adapt(nn.Sequential(nn.Linear(10, 14), nn.Linear(14, 6)), mp.MTLoRAConfig(structure="DTSM", rank=3))
    assert model.trainable_summary()["trainable"] == 3 * (10 + 14) + 3 * (14 + 6) + 2 * 2 * 9
    with pytest.raises(ValueError, match=r"structure='shim' is not one of \['SHIM', 'ICFM', 'CTCM', 'DTSM'\]"):
        mp.MTLoRAConfig(structure="shim")
    with pytest.raises(ValueError, match="rank=0"):
        mp.MTLoRAConfig(rank=0)
