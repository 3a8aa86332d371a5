"""TMoE (METHODS.md §7): the official forward on fixed weights, placement, counts from the spec, init, merge."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import modalpeft as mp
from modalpeft.core.layers import LowRankExperts
from modalpeft.tracking.methods.tmoe import SplitQKVExperts


def official_tmoe(x, compress, routed, route_w, scaling, dropout, shared=None):
    """A transcription of SPMTrack's ``TMoELayer.forward`` (WenRuiCai/SPMTrack @ c581fe2,
    ``modules/tmoe/__init__.py``): gates from the raw input, one dropout on the input of the compress expert, the
    shared expert ungated, each routed expert scaled and weighted by ``route_weight[:, :, i]``, all summed."""
    route_weight = (x @ route_w.t()).softmax(dim=-1)
    results = []
    compress_out = dropout(x) @ compress.transpose(0, 1)
    if shared is not None:
        results.append((compress_out @ shared.transpose(0, 1)) * scaling)
    for i in range(len(routed)):
        results.append(
            torch.unsqueeze(route_weight[:, :, i], -1) * (compress_out @ routed[i].transpose(0, 1)) * scaling
        )
    return sum(results)


def _official_of(layer: LowRankExperts, x: torch.Tensor, alpha: float, rank: int, p: float = 0.0) -> torch.Tensor:
    """The official forward on ``layer``'s weights, with the official scaling ``alpha / r`` and its own dropout."""
    dropout = nn.Dropout(p) if p > 0 else nn.Identity()
    return official_tmoe(x, layer.A, list(layer.B), layer.router.weight, alpha / rank, dropout, layer.B_s)


@pytest.mark.parametrize("shared", [False, True])
def test_matches_official_forward_in_train_mode_with_dropout(shared: bool) -> None:
    torch.manual_seed(0)
    layer = LowRankExperts(12, 9, 5, 3, alpha=7.0, dropout=0.3, init_weights=False, shared_expert=shared)
    layer.double().train()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    torch.manual_seed(1)
    ours = layer.parallel(x)
    torch.manual_seed(1)  # the same dropout mask: both draw it once, after the router
    official = _official_of(layer, x, alpha=7.0, rank=5, p=0.3)
    torch.testing.assert_close(ours, official, atol=1e-12, rtol=0)


def test_matches_official_at_vit_b_width_in_float32() -> None:
    torch.manual_seed(0)
    layer = LowRankExperts(768, 768, 64, 4).eval()  # the official 'bert' init
    x = torch.randn(2, 50, 768)
    diff = (layer.parallel(x) - _official_of(layer, x, alpha=64, rank=64)).abs().max().item()
    assert diff < 1e-6, diff


def official_timm_qkv(linear: nn.Linear, parts: list[LowRankExperts], x: torch.Tensor) -> torch.Tensor:
    """``LinearWithTMoE_TimmQKV``: q, k, v Linears cut from the fused weight, each plus its own TMoE, concatenated."""
    dim = linear.in_features
    outs = []
    for i, tmoe in enumerate(parts):
        w, b = linear.weight[i * dim : (i + 1) * dim], linear.bias[i * dim : (i + 1) * dim]
        outs.append(x @ w.t() + b + _official_of(tmoe, x, alpha=2.0, rank=4, p=0.25))
    return torch.cat(outs, dim=-1)


def test_split_qkv_matches_official_timm_qkv_in_a_vit_block() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=24, depth=1, num_heads=2)
    vit = vit.double().eval()
    reference = vit.blocks[0].attn.qkv
    model = mp.adapt(vit, mp.TMoEConfig(rank=4, num_experts=3, alpha=2.0, dropout=0.25, init_weights=False))
    host = model.base_model.blocks[0].attn.qkv
    adapter = host.adapters["default"]
    assert isinstance(adapter, SplitQKVExperts)
    model.train()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.manual_seed(3)
    ours = host(x)
    torch.manual_seed(3)
    official = official_timm_qkv(reference, [adapter.q, adapter.k, adapter.v], x)
    torch.testing.assert_close(ours, official, atol=1e-12, rtol=0)


def tmoe_linear_count(d_in: int, d_out: int, r: int = 64, e: int = 4) -> int:
    """METHODS.md §7a shapes: A (r, d_in), E x B_i (d_out, r), router (E, d_in)."""
    return r * d_in + e * d_out * r + e * d_in


def test_vit_b14_counts_match_the_spec() -> None:
    c, hidden = 768, 3072
    per_block = 4 * tmoe_linear_count(c, c) + tmoe_linear_count(c, hidden) + tmoe_linear_count(hidden, c)
    assert tmoe_linear_count(c, c) == 248_832 and tmoe_linear_count(c, hidden) == 838_656
    assert tmoe_linear_count(hidden, c) == 405_504
    assert per_block == 2_239_488 and 12 * per_block == 26_873_856  # 26.87M

    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, depth=2, num_classes=0)
    model = mp.adapt(vit, mp.TMoEConfig())
    assert model.trainable_summary()["trainable"] == 2 * per_block
    adapted = sorted({n.split(".adapters")[0] for n, _ in model.named_parameters() if ".adapters." in n})
    expected = [f"base_model.blocks.{i}.{m}" for i in range(2) for m in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]
    assert adapted == expected


def test_split_qkv_off_and_shared_expert_counts() -> None:
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, depth=1, num_classes=0)
    fused = mp.adapt(vit, mp.TMoEConfig(split_qkv=False, shared_expert=True))
    c, hidden = 768, 3072
    expected = tmoe_linear_count(c, 3 * c) + tmoe_linear_count(c, c) + tmoe_linear_count(c, hidden)
    expected += tmoe_linear_count(hidden, c) + 64 * (3 * c + c + hidden + c)  # B_s (d_out, r) per Linear
    assert fused.trainable_summary()["trainable"] == expected
    assert isinstance(fused.base_model.blocks[0].attn.qkv.adapters["default"], LowRankExperts)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=3
    ).eval()


def test_paper_init_changes_the_output_and_identity_does_not() -> None:
    x = torch.randn(2, 3, 32, 32)
    reference = _tiny_vit()
    expected = reference(x)
    paper = mp.adapt(_tiny_vit(), mp.TMoEConfig(rank=8), modules_to_save=["head"])
    layer = paper.base_model.blocks[0].mlp.fc1.adapters["default"]
    assert 0.015 < layer.B.std().item() < 0.025 and layer.B.abs().max().item() <= 2.0  # trunc_normal(0.02)
    assert not torch.allclose(paper(x), expected, atol=1e-6)
    identity = mp.adapt(_tiny_vit(), mp.TMoEConfig(rank=8, init_weights="identity", shared_expert=True))
    torch.testing.assert_close(identity(x), expected, atol=1e-6, rtol=0)
    assert "head" not in {n.split(".")[1] for n, p in paper.named_parameters() if ".adapters." in n}


@pytest.mark.parametrize("shared", [False, True])
def test_merge_is_refused_with_the_reason_and_the_alternative(shared: bool) -> None:
    model = mp.adapt(_tiny_vit(), mp.TMoEConfig(rank=4, shared_expert=shared))
    with pytest.raises(ValueError, match="gates softmax.*depend on the input.*peft.LoraConfig") as err:
        model.merge_and_unload()
    assert ("shared expert" in str(err.value)) is shared


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="num_experts=0"):
        mp.TMoEConfig(num_experts=0)
    with pytest.raises(ValueError, match="rank=2.5"):
        mp.TMoEConfig(rank=2.5)
    with pytest.raises(ValueError, match="dropout=1.0"):
        mp.TMoEConfig(dropout=1.0)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Module()])
            self.blocks[0].qkv = nn.Linear(8, 10)

    with pytest.raises(ValueError, match="out_features=10.*split_qkv=False"):
        mp.adapt(Odd(), mp.TMoEConfig(rank=2))
    assert mp.adapt(Odd(), mp.TMoEConfig(rank=2, split_qkv=False)).trainable_summary()["trainable"] > 0


def test_default_placement_on_a_transformers_model() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    bert = BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    expected = bert(ids).last_hidden_state
    model = mp.adapt(bert, mp.TMoEConfig(rank=4, num_experts=2, init_weights="identity"))
    adapted = {
        n.split(".adapters")[0].removeprefix("base_model.") for n, _ in model.named_parameters() if ".adapters." in n
    }
    linears = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    linears += ("intermediate.dense", "output.dense")
    assert adapted == {f"encoder.layer.{i}.{m}" for i in range(2) for m in linears}  # not the pooler
    torch.testing.assert_close(model(ids).last_hidden_state, expected, atol=1e-6, rtol=0)
