"""KronA (``"krona"``): placement, factor defaults, counts, exact merge, and checks before any change."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.layers import KroneckerDelta
from modalpeft.core.layers.kronecker import most_square_factor
from modalpeft.core.methods.krona import apply_krona

from ..toy_models import perturb

VIT_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    )
    return perturb(model).eval()


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return perturb(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def adapters(model: nn.Module) -> dict[str, KroneckerDelta]:
    return {name.removeprefix("base_model."): host.adapters["default"] for name, host in hosts(model)}


def krona_count(linears: list[nn.Linear], a1: int | None = None, a2: int | None = None) -> int:
    total = 0
    for t in linears:
        f1 = a1 or most_square_factor(t.out_features)
        f2 = a2 or most_square_factor(t.in_features)
        total += f1 * f2 + (t.out_features // f1) * (t.in_features // f2)
    return total


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    types = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def test_default_targets_every_linear_but_the_saved_head() -> None:
    base = vit()
    reference = copy.deepcopy(base)
    linears = [m for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    model = mp.adapt(base, mp.KronAConfig(), modules_to_save=["head"])
    layers = adapters(model)
    assert sorted(layers) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in VIT_LINEARS)
    qkv = layers["blocks.0.attn.qkv"]  # 576 = 24 · 24, 192 = 12 · 16
    assert (qkv.a1, qkv.a2, qkv.b1, qkv.b2) == (24, 12, 24, 16)
    assert model.trainable_summary()["trainable"] == krona_count(linears) + 3 * 192 + 3
    x = images()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)  # B = 0: identity at init


def test_explicit_factors_and_targets() -> None:
    base = vit()
    linears = [m for n, m in base.named_modules() if n.endswith(("qkv", "fc1"))]
    config = mp.KronAConfig(a1=8, a2=4, scaling=2.0, target_modules=["qkv", "fc1"])
    model = mp.adapt(base, config)
    assert sorted(adapters(model)) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    assert {(a.a1, a.a2, a.scaling) for a in adapters(model).values()} == {(8, 4, 2.0)}
    assert model.trainable_summary()["trainable"] == krona_count(linears, 8, 4) == 2 * (32 + 72 * 48 + 32 + 96 * 48)


def test_torch_transformer_skips_the_linears_inside_attention() -> None:
    base = encoder()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.KronAConfig(a1=4, a2=4, init_weights=False))
    assert sorted(adapters(model)) == ["layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"]
    linears = [m for n, m in reference.named_modules() if n.endswith(("linear1", "linear2"))]
    assert model.trainable_summary()["trainable"] == krona_count(linears, 4, 4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # eval + no grad: torch's fast path must not skip the adapters
        assert not torch.allclose(model(x), reference(x), atol=1e-4)
        with model.disable_adapters():
            torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


def test_merge_is_exact_and_gives_back_the_base_modules() -> None:
    base = vit()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.KronAConfig(init_weights=False, scaling=0.5), modules_to_save=["head"])
    x = images()
    expected = model(x)
    assert not torch.allclose(expected, reference(x), atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert [type(m) for m in merged.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    assert mp.get_method("krona").mergeable is True


def test_config_round_trip() -> None:
    config = mp.KronAConfig(a1=4, a2=None, scaling=0.5, dropout=0.1, target_modules=["qkv"])
    assert config.to_dict()["method"] == "krona"
    assert mp.KronAConfig.from_dict(config.to_dict()) == config


def test_bad_factor_raises_before_any_module_changes() -> None:
    # a1 = 64 divides qkv (576), proj (192), fc1 (768) and fc2 (192) but not the head (3), the last target.
    model = vit()
    before = snapshot(model)
    config = mp.KronAConfig(a1=64, a2=4)
    with pytest.raises(ValueError, match=r"'head'.*a1=64 does not divide d_out=3 \(valid a1: \[1, 3\]\)"):
        apply_krona(model, config, "default")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="a1=64"):
        mp.adapt(model, config)
    assert_unchanged(model, before)


def test_bad_a2_names_d_in_and_its_divisors() -> None:
    model = encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"a2=5 does not divide d_in=32 \(valid a2: \[1, 2, 4, 8, 16, 32\]\)"):
        apply_krona(model, mp.KronAConfig(a1=4, a2=5), "default")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("target", "match"), [(["out_proj"], "inside an nn.MultiheadAttention"), (["norm1"], "matched no module")]
)
def test_bad_targets_raise_and_leave_the_model_unchanged(target: list[str], match: str) -> None:
    model = encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        apply_krona(model, mp.KronAConfig(target_modules=target), "default")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"a1": 0}, "a1=0"),
        ({"a2": 2.5}, "a2=2.5"),
        ({"a1": True}, "a1=True"),
        ({"scaling": "big"}, "scaling='big'"),
        ({"dropout": -0.1}, "dropout=-0.1"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mp.KronAConfig(**kwargs)
