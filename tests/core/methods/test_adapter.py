"""Bottleneck adapters (``"adapter"``): default placements per style on timm ViTs and torch Transformers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.layers import Bottleneck
from modalpeft.core.methods.adapter import apply_adapter

from ..toy_models import perturb

D = 192  # vit_tiny's width


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    )
    return perturb(model).eval()


def encoder(batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    return perturb(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tokens() -> torch.Tensor:
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))


def adapters(model: nn.Module) -> dict[str, Bottleneck]:
    return {name.removeprefix("base_model."): host.adapters["default"] for name, host in hosts(model)}


def count(d: int, m: int, d_out: int | None = None) -> int:
    d_out = d if d_out is None else d_out
    return d * m + m + m * d_out + d_out


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    types = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    return types, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list[str], dict[str, torch.Tensor]]) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


@pytest.mark.parametrize(
    ("style", "placed", "mode"),
    [
        ("houlsby", ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"], "sequential"),
        ("pfeiffer", ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"], "sequential"),
        ("adaptformer", ["blocks.0.mlp", "blocks.1.mlp"], "parallel"),
    ],
)
def test_default_placement_on_a_timm_vit(style: str, placed: list[str], mode: str) -> None:
    base = vit()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.BottleneckConfig(style=style, bottleneck_dim=8), modules_to_save=["head"])
    layers = adapters(model)
    assert sorted(layers) == placed
    assert {a.mode for a in layers.values()} == {mode}
    head = 3 * D + 3
    assert model.trainable_summary()["trainable"] == len(placed) * count(D, 8) + head
    x = images()
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)  # identity at init


def test_adaptformer_defaults_and_parallel_math() -> None:
    config = mp.BottleneckConfig(style="adaptformer", bottleneck_dim=4, init_weights=False)
    assert config.scaling == 0.1 and config.act == "relu"
    model = mp.adapt(vit(), config)
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 17, D)
    torch.testing.assert_close(mlp(x), mlp.base_layer(x) + mlp.adapters["default"].branch(x))
    assert mlp.adapters["default"].scaling == 0.1


def test_style_defaults_are_resolved_and_saved() -> None:
    houlsby = mp.BottleneckConfig()
    assert (houlsby.style, houlsby.scaling, houlsby.act, houlsby.bottleneck_dim) == ("houlsby", 1.0, "gelu", 64)
    assert mp.BottleneckConfig(style="pfeiffer").act == "relu"
    custom = mp.BottleneckConfig(style="adaptformer", scaling="learnable", act="silu")
    assert (custom.scaling, custom.act) == ("learnable", "silu")
    assert mp.BottleneckConfig.from_dict(custom.to_dict()) == custom
    assert custom.to_dict()["method"] == "adapter"


def test_random_init_changes_outputs_and_training_moves_only_adapters() -> None:
    base = vit()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.BottleneckConfig(bottleneck_dim=4, init_weights=False))
    x = images()
    assert not torch.allclose(model(x), reference(x), atol=1e-4)
    with model.disable_adapters():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)


def test_houlsby_on_torch_transformer_targets_the_attention_module() -> None:
    base = encoder()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.BottleneckConfig(style="houlsby", bottleneck_dim=4, init_weights=False))
    assert sorted(adapters(model)) == [
        "layers.0.linear2",
        "layers.0.self_attn",
        "layers.1.linear2",
        "layers.1.self_attn",
    ]
    assert model.trainable_summary()["trainable"] == 4 * count(32, 4)
    x = tokens()
    assert not torch.allclose(model(x), reference(x), atol=1e-4)
    # Only the attention adapter: the layer equals the base one with out + f(out) on the MHA's output.
    for block in model.layers:
        block.linear2.disabled = True
    attn = model.layers[0].self_attn
    out = attn.base_layer(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], out + attn.adapters["default"].branch(out))


@pytest.mark.parametrize("batch_first", [True, False])
def test_pfeiffer_on_torch_transformer(batch_first: bool) -> None:
    base = encoder(batch_first)
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.BottleneckConfig(style="pfeiffer", bottleneck_dim=4))
    assert sorted(adapters(model)) == ["layers.0.linear2", "layers.1.linear2"]
    assert model.trainable_summary()["trainable"] == 2 * count(32, 4)
    x = tokens() if batch_first else tokens().transpose(0, 1)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    for adapter in adapters(model).values():
        adapter.reset_adapter(False)
    assert not torch.allclose(model(x), reference(x), atol=1e-4)
    with torch.no_grad():  # eval + no grad: torch's fast path must not skip the adapters
        assert not torch.allclose(model(x), reference(x), atol=1e-4)


def test_adaptformer_has_no_default_in_torch_layers_and_names_the_fix() -> None:
    model = encoder()
    before = snapshot(model)
    with pytest.raises(ValueError, match="linear2"):
        mp.adapt(model, mp.BottleneckConfig(style="adaptformer"))
    assert_unchanged(model, before)


def test_parallel_adapter_on_a_linear_with_other_dims() -> None:
    model = mp.adapt(vit(), mp.BottleneckConfig(style="adaptformer", bottleneck_dim=4, target_modules=["fc1"]))
    layers = adapters(model)
    assert sorted(layers) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert {(a.dim, a.out_dim) for a in layers.values()} == {(D, 4 * D)}
    assert model.trainable_summary()["trainable"] == 2 * count(D, 4, 4 * D)
    model(images())


def test_conv_targets_get_the_conv1d_form() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    reference = copy.deepcopy(base)
    model = mp.adapt(base, mp.BottleneckConfig(bottleneck_dim=2, target_modules=["0", "2"], init_weights=False))
    assert {n: a.conv for n, a in adapters(model).items()} == {"0": True, "2": True}
    assert model.trainable_summary()["trainable"] == count(8, 2) + count(6, 2)
    x = torch.randn(2, 3, 5, 5)
    assert model(x).shape == reference(x).shape == (2, 6, 5, 5)
    assert not torch.allclose(model(x), reference(x), atol=1e-4)


def test_layer_norm_and_learnable_scaling_counts() -> None:
    config = mp.BottleneckConfig(style="pfeiffer", bottleneck_dim=4, layer_norm="in", scaling="learnable")
    model = mp.adapt(vit(), config)
    assert model.trainable_summary()["trainable"] == 2 * (count(D, 4) + 2 * D + 1)


def test_not_mergeable() -> None:
    assert mp.get_method("adapter").mergeable is False
    model = mp.adapt(vit(), mp.BottleneckConfig(bottleneck_dim=4))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (["out_proj"], "inside an nn.MultiheadAttention"),
        (["dropout1"], "'layers.0.dropout1' \\(Dropout\\).*feature dim"),
        (["nothing_like_this"], "matched no module"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_unchanged(target: list[str], match: str) -> None:
    model = encoder()
    before = snapshot(model)
    config = mp.BottleneckConfig(bottleneck_dim=4, target_modules=target)
    with pytest.raises(ValueError, match=match):
        apply_adapter(model, config, "default")  # the method itself checks before changing anything
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=match):
        mp.adapt(model, config)
    assert_unchanged(model, before)


def test_models_without_a_default_placement_need_target_modules() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        mp.adapt(nn.Sequential(nn.Linear(4, 4)), mp.BottleneckConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"style": "lora"}, "style='lora'.*houlsby"),
        ({"bottleneck_dim": 0}, "bottleneck_dim=0"),
        ({"bottleneck_dim": 2.5}, "bottleneck_dim=2.5"),
        ({"scaling": "big"}, "scaling='big'"),
        ({"act": "sigmoid"}, "act='sigmoid'.*quick_gelu"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"layer_norm": "both"}, "layer_norm='both'"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mp.BottleneckConfig(**kwargs)
