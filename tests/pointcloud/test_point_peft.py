"""Point-PEFT (``"point_peft"``): counts, the memory bank, retrieval, prompts, geometry adapter, gradients, files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.lightning.task import needs_training_data
from modalpeft.pointcloud import PointPEFTConfig, create_backbone
from modalpeft.pointcloud.methods.point_peft import (
    BANK_KEY,
    build_memory_bank,
    load_memory_bank,
    point_peft_parameters,
    pooled_features,
    retrieve,
    save_memory_bank,
)

from ..core.toy_models import perturb

C, DEPTH, G = 32, 2, 16  # point_mae_test
CFG = {"top_k": 3, "prompt_blocks": 1, "num_anchors": 8, "num_neighbors": 4}


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return perturb(create_backbone("point_mae_test", num_classes=5), seed).eval()


def train_batches(n: int = 3, batch: int = 4):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 128, 3, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n)]


def adapted(init_weights=True, **kwargs):
    config = PointPEFTConfig(**{**CFG, **kwargs}, memory_data=train_batches(), init_weights=init_weights)
    return mp.adapt(tiny(), config, modules_to_save=["head"])


def test_registered_and_needs_data():
    assert "point_peft" in mp.list_methods("pointcloud")
    config = PointPEFTConfig()
    assert (config.top_k, config.prompt_blocks, config.bottleneck_dim, config.num_anchors) == (8, 6, 16, 64)
    assert needs_training_data(config)
    assert "memory_data" not in config.to_dict() and "memory_bank" not in config.to_dict()


def test_point_mae_count(tmp_path):
    save_memory_bank(tmp_path / "bank.safetensors", F.normalize(torch.randn(20, 384), dim=-1))
    model = create_backbone("point_mae_g128", num_classes=15)
    model = mp.adapt(model, PointPEFTConfig(memory_bank=str(tmp_path / "bank.safetensors")), modules_to_save=["head"])
    head = 267_535
    per_block = 2 * 12_688 + 768 + 3_072  # MLP adapter + adapter1, BatchNorm, 5 bias vectors
    prompted = 10 * 384 + 6_536  # prompts + cp_adapter
    shared = 28_800  # local attention + its LayerNorm
    expected = 12 * per_block + 6 * prompted + shared + 768 + 768 + head  # + final LN, class token/position
    assert model.trainable_summary()["trainable"] == expected == 710_719
    assert point_peft_parameters(384, 12, PointPEFTConfig(), head=head) == expected
    # the official code also allocates unused prompts/cp_adapters in blocks 6-11, 12 gates and 30 prompt_cor
    assert expected + 6 * prompted + 12 + 30 == 773_017


def test_tiny_count_and_placement():
    model = adapted()
    head = sum(p.numel() for p in model.head.parameters())
    assert model.trainable_summary()["trainable"] == point_peft_parameters(C, DEPTH, PointPEFTConfig(**CFG), head=head)
    kinds = {name: type(h.adapters["default"]).__name__ for name, h in hosts(model.base_model)}
    assert kinds["group_divider"] == "PointPEFTContext" and kinds["blocks.1"] == "PointPEFTBlock"
    assert kinds["blocks.0.mlp_residual.drop_path"] == "Bottleneck" and kinds["blocks.0.attn.proj"] == "ParamDelta"
    assert kinds["blocks.0.drop_path"] == "Bypass"  # no drop-path on the attention branch
    assert kinds["norm"] == "ParamDelta" and kinds["class_token"] == "ParamDelta"
    assert [b.adapters["default"].prompted for b in model.blocks] == [True, False]


def test_memory_bank_build_save_load(tmp_path):
    base = tiny()
    batches = train_batches()
    bank = build_memory_bank(base, batches)
    assert bank.shape == (12, C)
    torch.testing.assert_close(bank.norm(dim=-1), torch.ones(12))
    # the official frozen copy's grouping: half the backbone's patches
    torch.testing.assert_close(bank[4:8], F.normalize(pooled_features(base, batches[1][0], G // 2)[0], dim=-1))
    assert build_memory_bank(base, batches, max_batches=1).shape == (4, C)
    save_memory_bank(tmp_path / "bank.safetensors", bank)
    torch.testing.assert_close(load_memory_bank(tmp_path / "bank.safetensors"), bank)
    with pytest.raises(FileNotFoundError, match="build it with build_memory_bank"):
        load_memory_bank(tmp_path / "missing.safetensors")
    # a bank file adapts a model as well as the data does
    from_file = mp.adapt(tiny(), PointPEFTConfig(**CFG, memory_bank=str(tmp_path / "bank.safetensors")))
    torch.testing.assert_close(from_file.group_divider.adapters["default"].bank, bank)


def test_retrieval_groups_are_the_official_copy_with_fewer_groups():
    """The first g patches of the backbone's grouping are the backbone configured with g groups (the official frozen
    copy: cache_prompt.yaml's 64 groups for the fine-tuned 128): FPS keeps its order, a patch depends on its centre."""
    x = torch.randn(3, 128, 3, generator=torch.Generator().manual_seed(3))
    model, official = tiny(), tiny()
    official.group_divider.num_group = official.num_group = G // 2
    feature, center = pooled_features(model, x, G // 2)
    torch.testing.assert_close(feature, pooled_features(official, x)[0], rtol=0, atol=0)
    assert center.shape == (3, G, 3)  # the backbone's own centres, for the geometry adapter
    assert not torch.allclose(feature, pooled_features(model, x)[0])  # all 16 patches: another query
    # None is the official half; every patch is the earlier behaviour; the bank and the queries agree
    assert (
        mp.adapt(tiny(), PointPEFTConfig(**CFG, memory_data=train_batches()))
        .group_divider.adapters["default"]
        .retrieval_groups
        == G // 2
    )
    model = mp.adapt(tiny(), PointPEFTConfig(**CFG, retrieval_groups=G, memory_data=train_batches()))
    bank = build_memory_bank(tiny(), train_batches(), groups=G)
    torch.testing.assert_close(model.group_divider.adapters["default"].bank, bank)
    with pytest.raises(ValueError, match="retrieval_groups=0 must be an integer >= 1"):
        PointPEFTConfig(retrieval_groups=0)
    with pytest.raises(ValueError, match=r"retrieval_groups=17 must be between 1 and the backbone's num_group=16"):
        mp.adapt(tiny(), PointPEFTConfig(**CFG, retrieval_groups=17, memory_data=train_batches()))


def test_retrieval():
    bank = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    feature = 3 * bank[2] + 0.01  # most similar to entry 2
    cache = retrieve(feature[None], bank, 2)
    assert cache.shape == (1, 4, 4)
    sims = F.normalize(feature, dim=0) @ bank.t()
    top = sims.topk(2)
    torch.testing.assert_close(cache[0, 0], feature)
    torch.testing.assert_close(cache[0, 2:], bank[top.indices])
    torch.testing.assert_close(cache[0, 1], top.values.softmax(0) @ bank[top.indices])
    assert top.indices[0] == 2


def test_cache_prompts_come_from_the_frozen_backbone(clouds):
    model = adapted(init_weights=False).train()
    context = model.group_divider.adapters["default"]
    running = model.encoder.first_conv[1].running_mean.clone()
    model(clouds)
    feature = pooled_features(tiny(), clouds, G // 2)[0]  # the backbone without the adapter, in eval mode
    torch.testing.assert_close(context.shared.cache, retrieve(feature, context.bank, 3))
    assert model.training and all(m.training for m in model.modules())  # modes restored after the frozen pass
    # one BatchNorm update of the encoder (the main pass), none from the frozen pass: compare with a single pass
    plain = tiny().train()
    plain.encoder(plain.group_divider(clouds)[0])
    torch.testing.assert_close(model.encoder.first_conv[1].running_mean, plain.encoder.first_conv[1].running_mean)
    assert not torch.equal(running, model.encoder.first_conv[1].running_mean)
    assert context.shared.calls == 1


def test_prompts_live_for_one_block(clouds):
    model = adapted().eval()
    seen = []
    for block in model.blocks:
        block.base_layer.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], out.shape[1])))
        block.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    model(clouds)
    p = CFG["top_k"] + 2
    # the retrieval query's pass: half the patch tokens (the official frozen copy), without the adapter
    frozen = [(G // 2, G // 2), G // 2] * DEPTH
    assert seen == [*frozen, (1 + p + G, 1 + p + G), 1 + G, (1 + G, 1 + G), 1 + G]


def test_behaviour_at_init(clouds):
    base = tiny()
    with torch.no_grad():
        expected = base(clouds)
    model = mp.adapt(base, PointPEFTConfig(**CFG, memory_data=train_batches()), modules_to_save=["head"]).eval()
    with torch.no_grad():
        assert not torch.allclose(model(clouds), expected, atol=1e-4)  # documented: prompts change the attention
        with model.disable_adapters():
            torch.testing.assert_close(model(clouds), expected)
    # the geometry adapter is invariant to the order of the points, as the backbone is
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(clouds[:, perm]), model(clouds), atol=1e-4, rtol=1e-4)


def test_geometry_adapter_math(clouds):
    """An unprompted block's geometry adapter against METHODS.md §5 step 3, one cloud at a time, at geo_scaling 0.6
    and random BatchNorm statistics (eval mode)."""
    model = adapted(init_weights=False, geo_scaling=0.6).eval()
    layer = model.blocks[1].adapters["default"]
    perturb(layer.out_norm, seed=3)
    with torch.no_grad():
        model(clouds)  # the context computes this batch's anchors, neighbours and interpolation weights
    shared, norm = layer.shared, layer.out_norm
    assert torch.all(shared.interp >= 0)
    torch.testing.assert_close(shared.interp.sum(-1), torch.ones(4, G))  # a weighted mean of all anchors
    out = torch.randn(4, 1 + G, C, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        actual = layer.post(out)
        for i in range(4):
            tokens = out[i, 1:]  # (G, C)
            hood = tokens[shared.neighbor_idx[i]]  # (A, K, C)
            pooled = (hood + shared.local_attn(hood)).max(dim=1).values  # (A, C); drop-path is off in eval
            pooled = (pooled - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
            pooled = F.gelu(pooled) + 0.6 * tokens[shared.anchor_idx[i]]
            tokens = tokens + 0.6 * shared.interp[i] @ pooled
            expected = layer.adapter1.post(torch.cat([out[i, :1], tokens])[None])[0]
            torch.testing.assert_close(actual[i], expected, atol=1e-5, rtol=1e-5)


def test_local_attention_on_tokens_equals_the_official_order_with_gradients():
    """The lean path (LN and qkv on the G tokens, then the gather) against the official order (gather the groups,
    then LN and qkv on them): outputs and every gradient within 1e-5."""
    from modalpeft.pointcloud.methods.point_peft import LocalAttention
    from modalpeft.pointcloud.ops import gather_points

    torch.manual_seed(0)
    attn = LocalAttention(C, heads=6, head_dim=3)
    perturb(attn.norm, seed=1)
    tokens = torch.randn(3, G, C, requires_grad=True)
    index = torch.randint(0, G, (3, 8, 4))  # (B, A, K) with repeats, as kNN groups overlap
    grad_out = torch.randn(3 * 8, 4, C)

    def run(lean: bool) -> list[torch.Tensor]:
        attn.zero_grad()
        tokens.grad = None
        out = attn.grouped(tokens, index) if lean else attn(gather_points(tokens, index).reshape(3 * 8, 4, C))
        out.backward(grad_out)
        return [out.detach(), tokens.grad.clone(), *(p.grad.clone() for p in attn.parameters())]

    for lean, official in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(lean, official, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_trainable_parameters(clouds):
    model = adapted(init_weights=False).train()
    F.cross_entropy(model(clouds), torch.tensor([0, 1, 2, 3])).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".adapters." in n or n.startswith("base_model.head.") for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_save_load_without_data(clouds, tmp_path):
    model = adapted(init_weights=False).eval()
    with torch.no_grad():
        expected = model(clouds)
    model.save_adapter(tmp_path / "pp")
    loaded = mp.load_adapter(tiny(), tmp_path / "pp").eval()  # the bank comes from the file
    assert loaded.group_divider.adapters["default"].bank.shape == (12, C)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clouds), expected)
    assert BANK_KEY in model.adapter_state_dict()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()


def test_errors():
    with pytest.raises(ValueError, match="memory_data=train_loader"):
        mp.adapt(tiny(), PointPEFTConfig(**CFG))
    with pytest.raises(ValueError, match="num_anchors=64 .* num_group=16"):
        mp.adapt(tiny(), PointPEFTConfig(memory_data=train_batches()))
    with pytest.raises(ValueError, match="holds 4 entries, fewer than top_k=8"):
        mp.adapt(tiny(), PointPEFTConfig(**{**CFG, "top_k": 8}, memory_data=train_batches(1)))
    with pytest.raises(ValueError, match="top_k=0"):
        PointPEFTConfig(top_k=0)
