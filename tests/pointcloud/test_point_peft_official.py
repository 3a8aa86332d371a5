"""Point-PEFT against a transcription of the official block (Ivan-Tang-3D/Point-PEFT @ d8bc13e1c39d,
MAE/models/Point_Mask_Rev_FT_scan_cp.py ``Block.forward``, ``Attention1``, adapter_super.py ``AdapterSuper(_f)``,
Point_MAE_cp.py's encoder for the retrieval query), with the grouping indices aligned (the fix we keep).

Training mode, with dropout and drop-path replaced by deterministic stand-ins that depend only on the shape of what
they drop (so our order of calls does not matter, but where and on what shape each acts does).
"""

from __future__ import annotations

import pytest
import timm.layers.drop
import torch
import torch.nn.functional as F

import modalpeft as mp
from modalpeft.core.layers import MaskDropout
from modalpeft.pointcloud import PointPEFTConfig, create_backbone
from modalpeft.pointcloud.methods.point_peft import retrieve

G = 16  # point_mae_test's patches
CFG = {"top_k": 3, "prompt_blocks": 1, "num_anchors": 8, "num_neighbors": 4}


def _mask(shape: tuple[int, ...], p: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(shape) % (2**31))
    return (torch.rand(shape, generator=g) >= p).float()


def fake_dropout(x, p=0.5, training=True, inplace=False):
    """nn.Dropout, deterministic: one mask per shape (a (B, p, C) input gets a mask per sample)."""
    if not training or p == 0:
        return x
    return x * _mask(tuple(x.shape), p) / (1 - p)


def fake_drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    """timm's drop_path, deterministic: keeps or drops whole samples (first dim) by a mask of x.shape[0]."""
    if not training or drop_prob == 0:
        return x
    keep = _mask((x.shape[0],), drop_prob).view(-1, *([1] * (x.ndim - 1)))
    return x * keep / (1 - drop_prob)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def adapter_super(bottleneck, x, p, residual):
    """AdapterSuper (residual) / AdapterSuper_f (not): ln2(dropout(QuickGELU(ln1(x))))."""
    out = bottleneck.up(fake_dropout(quick_gelu(bottleneck.down(x)), p))
    return x + out if residual else out


def attention1(local, z):
    """Attention1 over norm3(z): 6 heads of 3, scale 18^-0.5, no qkv bias."""
    b, k, _ = z.shape
    h = local.heads
    qkv = F.linear(local.norm(z), local.qkv.weight).reshape(b, k, 3, h, -1).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (h * local.head_dim) ** -0.5).softmax(-1)
    return local.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, k, -1))


def official_block(host, x, pos, shared, center, prompted, p_drop, drop, dp):
    """The official Block.forward (both branches of ``layer_id <= 5``), aligned indices."""
    blk, ours = host.base_layer, host.adapters["default"]
    mlp_adapter = blk.mlp_residual.drop_path.adapters["default"]
    b = x.shape[0]
    x = x + pos
    if prompted:
        prompt = fake_dropout(ours.prompts.repeat(b, 1, 1), p_drop)
        prompt = prompt + adapter_super(ours.cp_adapter, shared.cache, drop, residual=True)
        x = torch.cat([x[:, :1], prompt, x[:, 1:]], 1)
    x = blk.attn(blk.norm1(x)) + x  # no drop-path on the attention branch
    x_fn = fake_drop_path(blk.mlp_residual.mlp(blk.mlp_residual.norm2(x)), dp, True)
    x = mlp_adapter.scaling * adapter_super(mlp_adapter, x_fn, drop, residual=False) + x_fn + x
    p = ours.num_tokens if prompted else 0
    cls_x, tokens = x[:, :1], x[:, 1 + p :]
    a, k = shared.neighbor_idx.shape[1:]
    hood = torch.stack([tokens[i][shared.neighbor_idx[i]] for i in range(b)]).reshape(b * a, k, -1)
    hood = fake_drop_path(attention1(shared.local_attn, hood), dp, True) + hood
    pooled = hood.reshape(b, a, k, -1).max(dim=2)[0]
    pooled = F.gelu(ours.out_norm(pooled.permute(0, 2, 1)).permute(0, 2, 1))
    vis = pooled + 0.3 * torch.stack([tokens[i][shared.anchor_idx[i]] for i in range(b)])
    anchors = torch.stack([center[i][shared.anchor_idx[i]] for i in range(b)])
    dists = (center[:, :, None] - anchors[:, None]).square().sum(-1)  # square_distance
    dists, idx = dists.sort(dim=-1)
    weight = 1.0 / (dists + 1e-8)
    weight = weight / weight.sum(dim=2, keepdim=True)
    gathered = torch.stack([vis[i][idx[i]] for i in range(b)])  # (B, G, A, C)
    tokens = tokens + 0.3 * (gathered * weight[..., None]).sum(2)
    # the official adapter1 also runs on the prompts, which are dropped right after: it acts per token with an
    # element-wise dropout, so leaving them out first is the same (and gives the stand-in mask the same shape)
    return adapter_super(ours.adapter1, torch.cat([cls_x, tokens], 1), drop, residual=True)


def cp_feat(backbone, points):
    """Point_MAE_cp's encoder in eval mode: the patch tokens (no class token), blocks, norm, max over tokens."""
    neighborhood, center = backbone.group_divider(points)
    tokens, pos = backbone.encoder(neighborhood), backbone.pos_embed(center)
    for blk in backbone.blocks:
        tokens = blk(tokens, pos)
    return backbone.norm(tokens).max(dim=1)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_match_the_official_block_in_training(clouds, monkeypatch, seed):
    monkeypatch.setattr(F, "dropout", fake_dropout)
    # the adapter layers' dropout draws its mask itself on the CPU (MaskDropout): give it the stand-in too
    monkeypatch.setattr(MaskDropout, "forward", lambda self, x: fake_dropout(x, self.p, self.training))
    monkeypatch.setattr(timm.layers.drop, "drop_path", fake_drop_path)
    torch.manual_seed(seed)
    base = create_backbone("point_mae_test", num_classes=5, drop_path_rate=0.5)
    g = torch.Generator().manual_seed(7)
    memory = [(torch.randn(4, 128, 3, generator=g), torch.zeros(4, dtype=torch.long)) for _ in range(3)]
    config = PointPEFTConfig(**CFG, prompt_dropout=0.3, dropout=0.4, memory_data=memory, init_weights=False)
    model = mp.adapt(base, config, modules_to_save=["head"]).train()
    seen = []
    for host in model.blocks:
        host.register_forward_hook(lambda m, args, out: seen.append((m, args[0], args[1], out)))
    model(clouds)
    context = model.group_divider.adapters["default"]
    shared = context.shared
    torch.manual_seed(seed)
    fresh = create_backbone("point_mae_test", num_classes=5, drop_path_rate=0.5)  # the same frozen weights
    center = fresh.group_divider(clouds)[1]  # the patch centres (FPS is deterministic)
    # the official cp_model: a separate frozen copy grouping the cloud into half as many patches (cache_prompt.yaml)
    fresh.group_divider.num_group = G // 2
    torch.testing.assert_close(shared.cache, retrieve(cp_feat(fresh.eval(), clouds), context.bank, CFG["top_k"]))
    adapted = seen[-len(model.blocks) :]  # after the frozen pass of the retrieval query
    for i, (host, x, pos, out) in enumerate(adapted):
        dp = float(getattr(host.base_layer.mlp_residual.drop_path.base_layer, "drop_prob", 0.0))
        expected = official_block(host, x, pos, shared, center, i < CFG["prompt_blocks"], 0.3, 0.4, dp)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_local_attention_keeps_pytorch_default_init():
    """The official attn1 (qkv 3·18 x C without bias, proj C x 18) and norm3 are never re-initialised."""
    g = torch.Generator().manual_seed(7)
    memory = [(torch.randn(4, 128, 3, generator=g), torch.zeros(4, dtype=torch.long))]
    torch.manual_seed(0)
    model = mp.adapt(create_backbone("point_mae_test", num_classes=5), PointPEFTConfig(**CFG, memory_data=memory))
    local = model.group_divider.adapters["default"].local_attn
    c = local.qkv.in_features
    for weight, fan_in in ((local.qkv.weight, c), (local.proj.weight, 18)):
        bound = fan_in**-0.5  # kaiming-uniform(a=√5): U(±1/√fan_in); xavier would reach √(6/(fan_in+fan_out))
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound
    assert local.proj.bias.abs().max() <= 18**-0.5 and local.proj.bias.std() > 0.05  # not the adapters' N(0, 1e-6)
    assert torch.equal(local.norm.weight, torch.ones(c)) and torch.equal(local.norm.bias, torch.zeros(c))
