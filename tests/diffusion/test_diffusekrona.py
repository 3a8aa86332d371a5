"""DiffuseKronA (``"diffusekrona"``): the official reshape sequence, the plain layout, init, merge, placement,
counts on the real SDXL / SD-2.1-base UNet configs, and factors that do not divide."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.layers import KroneckerDelta
from modalpeft.diffusion import DiffuseKronAConfig

from .unets import SD21_BASE, SDXL, meta_unet, tiny_unet, unet_inputs

PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def official_forward(hidden_states: torch.Tensor, down: torch.Tensor, up: torch.Tensor, a1: int, a2: int):
    """Straight transcription of IBM/DiffuseKronA ``krona.py::KronALinearLayer.forward`` (3-D branch, no alpha);
    ``down``: the ``nn.Linear(a1, a2)`` weight (a2, a1), ``up``: the ``nn.Linear(b2, b1)`` weight (b1, b2)."""
    b1, b2 = up.shape
    B1, C, D = hidden_states.size()
    hidden_states = hidden_states.view(-1, b2, a2).contiguous().view(-1, a2, b2).transpose(1, 2)
    up_hidden_states = up @ (hidden_states @ down)
    return up_hidden_states.view(B1, C, a1 * b1)


def spec_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """METHODS.md §6: ΔW = Q·(A ⊗ B), Q: out[r·a1 + s] = v[s·b1 + r], built entry by entry."""
    (a1, a2), (b1, b2) = A.shape, B.shape
    kron = torch.zeros(a1 * b1, a2 * b2, dtype=A.dtype)
    for i in range(a1):
        for j in range(a2):
            kron[i * b1 : (i + 1) * b1, j * b2 : (j + 1) * b2] = A[i, j] * B
    delta = torch.empty_like(kron)
    for r in range(b1):
        for s in range(a1):
            delta[r * a1 + s] = kron[s * b1 + r]
    return delta


@pytest.mark.parametrize(("d_in", "d_out", "a1", "a2"), [(24, 12, 4, 3), (32, 32, 8, 4), (12, 18, 6, 2)])
def test_official_layout_is_the_official_code_and_the_spec_sequence(d_in, d_out, a1, a2):
    torch.manual_seed(0)
    layer = KroneckerDelta(d_in, d_out, a1, a2, scaling=0.6, init_weights=False, layout="official").double()
    x = torch.randn(2, 5, d_in, dtype=torch.double)
    down, up = layer.A.detach().t(), layer.B.detach()  # official down.weight = Aᵀ (a2, a1), up.weight = B
    want = 0.6 * official_forward(x, down, up, a1, a2)
    torch.testing.assert_close(layer.parallel(x), want, rtol=0, atol=1e-12)
    delta = spec_delta(layer.A.detach(), layer.B.detach()) * 0.6
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(x @ delta.t(), want, rtol=0, atol=1e-12)
    if a1 > 1 and d_out // a1 > 1:  # the shuffle is real: the plain layout differs
        assert not torch.allclose(delta, 0.6 * torch.kron(layer.A, layer.B))


def test_kron_layout_is_plain_kronecker():
    torch.manual_seed(0)
    layer = KroneckerDelta(24, 12, 4, 3, scaling=0.6, init_weights=False, layout="kron").double()
    x = torch.randn(2, 5, 24, dtype=torch.double)
    torch.testing.assert_close(layer.parallel(x), 0.6 * x @ torch.kron(layer.A, layer.B).t(), rtol=0, atol=1e-12)


def test_config_defaults_and_registry():
    cfg = DiffuseKronAConfig()
    assert (cfg.a1, cfg.a2, cfg.target_modules, cfg.layout, cfg.scale, cfg.init_weights) == (
        64,
        8,
        None,
        "official",
        1.0,
        True,
    )
    info = mp.get_method("diffusekrona")
    assert info.config_cls is DiffuseKronAConfig and info.mergeable and info.modality == "diffusion"
    for bad in ({"layout": "lokr"}, {"a1": 0}, {"a2": 2.0}, {"scale": "1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DiffuseKronAConfig(**bad)


def test_default_placement_and_official_init():
    unet = tiny_unet()
    model = mp.adapt(unet, DiffuseKronAConfig(a1=4, a2=4))
    adapted = sorted(name for name, _ in hosts(model.base_model))
    blocks = sorted({n.rsplit(".attn", 1)[0] for n in adapted})
    assert blocks and all(".transformer_blocks." in b for b in blocks)
    assert adapted == sorted(f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2") for p in PROJ)
    host = model.base_model.get_submodule(f"{blocks[0]}.attn2.to_k")  # cross-attention: d_in is the text width
    k = host.adapters["default"]
    assert host.in_features == 24 and (k.b1, k.b2) == (host.out_features // 4, 24 // 4)
    layers = [host.adapters["default"] for _, host in hosts(model.base_model)]
    a = torch.cat([layer.A.flatten() for layer in layers])
    assert all(layer.layout == "official" and not layer.B.any() for layer in layers)
    assert abs(a.std().item() - 1 / 4) < 0.05 and abs(a.mean().item()) < 0.05
    x, t, e = unet_inputs()
    ref = tiny_unet()(x, t, e).sample
    torch.testing.assert_close(model(x, t, e).sample, ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["official", "kron"])
def test_merges_exactly_and_scale_switches(layout):
    x, t, e = unet_inputs()
    model = mp.adapt(tiny_unet(), DiffuseKronAConfig(a1=4, a2=2, layout=layout, scale=0.5, init_weights=False))
    ref = tiny_unet()(x, t, e).sample
    out = model(x, t, e).sample
    assert (out - ref).abs().max() > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(model(x, t, e).sample, out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for _, host in hosts(model.base_model):
        host.adapters["default"].scaling = 0.0
    torch.testing.assert_close(model(x, t, e).sample, ref, rtol=1e-5, atol=1e-5)


def test_a_factor_that_does_not_divide_raises_before_anything_changes():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"attn1\.to_q.*d_in=32, d_out=32.*a1=5.*valid a1: \[1, 2, 4, 8, 16, 32\]"):
        mp.adapt(unet, DiffuseKronAConfig(a1=5, a2=4))
    with pytest.raises(ValueError, match=r"attn2\.to_k.*d_in=24.*a2=16 does not divide d_in=24.*valid a2"):
        mp.adapt(unet, DiffuseKronAConfig(a1=4, a2=16))
    assert not list(hosts(unet)) and all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())


def test_target_modules_on_any_model_with_linears():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    adapted = mp.adapt(model, DiffuseKronAConfig(a1=4, a2=4, target_modules=["0", "2"], init_weights=False))
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 16 + 8 * 4 + 16 + 2 * 8


@pytest.mark.parametrize("layout", ["official", "kron"])
def test_a_transformer_denoiser_with_target_modules(tmp_path, layout):
    """A diffusers transformer denoiser (PixArt-α's, tiny): the same four projections of self- and cross-attention,
    the spec's count, identity at init, exact merge and reload."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)

    def denoiser() -> nn.Module:
        torch.manual_seed(0)
        return PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, cross_attention_dim=32, caption_channels=24, use_additional_conditions=False,
        ).eval()  # fmt: skip

    inputs = {"hidden_states": torch.randn(2, 4, 8, 8), "encoder_hidden_states": torch.randn(2, 5, 24)}
    inputs |= {"timestep": torch.tensor([3, 700]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    model = denoiser()
    with torch.no_grad():
        base = model(**inputs).sample
    config = DiffuseKronAConfig(a1=4, a2=8, layout=layout, target_modules=list(PROJ))
    adapted = mp.adapt(model, config)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 2 * 8 * (4 * 8 + (32 // 4) * (32 // 8))
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).sample, base, rtol=0, atol=0)  # B = 0
        for module in adapted.modules():
            if isinstance(module, KroneckerDelta):
                module.reset_adapter(False)
        tuned = adapted(**inputs).sample
        assert (tuned - base).abs().max() > 1e-3
    adapted.save_adapter(tmp_path / "adapter")
    reloaded = mp.load_adapter(denoiser(), tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, KroneckerDelta) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).sample, tuned, rtol=1e-5, atol=1e-5)


# ---- counts on the real configs (meta device) ----------------------------------------------------------------


def attention_widths(config: dict) -> list[int]:
    """The width of every transformer block of a UNet2DConditionModel config, from its block layout alone."""
    widths, levels = config["block_out_channels"], len(config["block_out_channels"])
    per_level = config.get("transformer_layers_per_block", 1)
    per_level = per_level if isinstance(per_level, list) else [per_level] * levels
    found = []
    for i, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            found += [widths[i]] * (config["layers_per_block"] * per_level[i])
    found += [widths[-1]] * per_level[-1]  # UNetMidBlock2DCrossAttn
    for i, kind in enumerate(config["up_block_types"]):
        level = levels - 1 - i
        if kind.startswith("CrossAttn"):
            found += [widths[level]] * ((config["layers_per_block"] + 1) * per_level[level])
    return found


def linear_shapes(config: dict) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of the 8 official targets per block: 6 at (C, C), cross-attention k/v at (T, C)."""
    text = config["cross_attention_dim"]
    return [shape for c in attention_widths(config) for shape in [(c, c)] * 6 + [(text, c)] * 2]


def krona_count(config: dict, a1: int, a2: int) -> int:
    return sum(a1 * a2 + (d_out // a1) * (d_in // a2) for d_in, d_out in linear_shapes(config))


def lora_count(config: dict, r: int) -> int:
    return sum(r * (d_in + d_out) for d_in, d_out in linear_shapes(config))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("config", "krona", "lora", "blocks"),
    [(SDXL, 2_152_320, 5_806_080, {640: 10, 1280: 60}), (SD21_BASE, 260_656, 829_952, {320: 5, 640: 5, 1280: 6})],
    ids=["sdxl", "sd21-base"],
)
def test_counts_on_the_real_unet_configs(config, krona, lora, blocks):
    widths = attention_widths(config)
    assert {c: widths.count(c) for c in set(widths)} == blocks  # METHODS.md §6: SDXL 10 x 640 and 60 x 1280
    assert krona_count(config, 64, 8) == krona and lora_count(config, 4) == lora
    assert round(krona / 1e6, 2) == {2_152_320: 2.15, 260_656: 0.26}[krona]  # the 2.15M / 0.26M
    assert round(lora / 1e6, 2) == {5_806_080: 5.81, 829_952: 0.83}[lora]  # and 5.81M / 0.83M
    model = mp.adapt(meta_unet(config), DiffuseKronAConfig())
    assert trainable(model) == krona
    assert len(list(hosts(model.base_model))) == 8 * len(widths)
    lora_model = mp.adapt(
        meta_unet(config), peft.LoraConfig(r=4, lora_alpha=4, target_modules=r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")
    )
    assert trainable(lora_model) == lora
    assert 1 - krona / lora > 0.35  # the paper's "at least 35% fewer than LoRA-DreamBooth"
