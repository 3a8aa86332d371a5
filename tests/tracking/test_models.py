"""The one-stream tracker (METHODS.md §7b, official ``SPMTrack_DINOv2``): counts, tokens, temporal query, head, loss,
and the official checkpoint's keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

import modalpeft as mp
from modalpeft.tracking import TMoEConfig
from modalpeft.tracking.losses import box_iou_pairs, positive_mask, template_mask, tracking_loss
from modalpeft.tracking.models import (
    OneStreamTracker,
    checkpoint_filter_fn,
    load_spmtrack_checkpoint,
    official_tmoe_settings,
)

TINY = dict(embed_dim=32, depth=2, num_heads=2, init_values=1.0)  # LayerScale kept, at 1 (DINOv2: 1e-5)


def tiny_tracker(seed: int = 0, **kwargs) -> OneStreamTracker:
    torch.manual_seed(seed)
    kwargs = {"template_size": 28, "search_size": 56, "backbone_kwargs": TINY, **kwargs}
    return OneStreamTracker("vit_base_patch14_dinov2", **kwargs).eval()


def inputs(b: int = 2, t: int = 3, s: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(b, t, 3, 28, 28, generator=g)
    masks = torch.randint(0, 2, (b, t, 2, 2), generator=g)
    searches = torch.randn(b, s, 3, 56, 56, generator=g)
    return templates, masks, searches


def test_spmtrack_b_counts_on_meta() -> None:
    """§7f: 2,239,488 TMoE parameters per ViT-B/14 block, 26.87M over 12, 29.24M trainable in all, 115.3M total."""
    c, r, e, hidden = 768, 64, 4, 3072

    def per_linear(d_in: int, d_out: int) -> int:
        return r * d_in + e * r * d_out + e * d_in

    block = 4 * per_linear(c, c) + per_linear(c, hidden) + per_linear(hidden, c)
    assert block == 2_239_488
    head = 2 * (2 * (c * c + c)) + (c + 1) + (4 * c + 4)
    assert head == 2_366_213
    embeddings = 5 * c
    with torch.device("meta"):
        model = mp.adapt(OneStreamTracker(), TMoEConfig(), modules_to_save=list(OneStreamTracker.trainable_modules))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if ".blocks.0." in n) == block
    assert sum(v for n, v in trainable.items() if ".blocks." in n) == 12 * block == 26_873_856
    assert sum(trainable.values()) == 12 * block + head + embeddings == 29_243_909  # ≈ 29.24M
    # the frozen DINOv2 ViT-B/14 parts (blocks with LayerScale, patch embedding, norm) and the 27x27 position embedding
    vit_block = (c * 3 * c + 3 * c) + (c * c + c) + (c * hidden + hidden) + (hidden * c + c) + 4 * c + 2 * c
    frozen = 12 * vit_block + (3 * 14 * 14 * c + c) + 2 * c + 27 * 27 * c
    assert sum(p.numel() for p in model.parameters()) == frozen + 29_243_909 == 115_330_565  # README: 115.3M


def official_forward(model: OneStreamTracker, templates, masks, searches):
    """A transcription of the official ``_z_feat``, ``_x_feat`` and ``_multi_frame_predict`` (two search frames)."""
    hz, wz = model.z_size
    hx, wx = model.x_size
    c = model.embed_dim
    emb = model.embeddings

    def patch(x):
        return model.patch_embed.norm(model.patch_embed.proj(x).flatten(2).transpose(1, 2))

    zs = []
    for i in range(templates.shape[1]):
        z = patch(templates[:, i])
        z = z + model.pos_embed.view(1, hx, wx, c)[:, :hz, :wz, :].reshape(1, hz * wz, c)
        zs.append(z + emb.token_type_embed[masks[:, i].flatten(1)])
    z_feat = torch.cat(zs, dim=1)

    def x_feat(x):
        return patch(x) + model.pos_embed + emb.token_type_embed[2].view(1, 1, c)

    def run(query, x):
        feat = torch.cat((query, z_feat, x), dim=1)
        for block in model.blocks:
            feat = block(feat)
        feat = model.norm(feat)
        enc = feat[:, -x.size(1) :]
        att = torch.matmul(enc, feat[:, :1].transpose(1, 2))
        opt = (enc.unsqueeze(-1) * att.unsqueeze(-2)).permute((0, 3, 1, 2)).contiguous().squeeze(1)
        return model.head(opt), feat[:, :1].clone().detach()

    b = templates.shape[0]
    new_query = emb.track_query.unsqueeze(0).expand(b, 1, -1)
    out1, q1 = run(new_query + emb.query_embed.unsqueeze(0), x_feat(searches[:, 0]))
    out2, _ = run(q1 + new_query + emb.query_embed.unsqueeze(0), x_feat(searches[:, 1]))
    return [out1, out2]


def test_forward_matches_the_official_transcription() -> None:
    model = tiny_tracker()
    batch = inputs()
    ours = model(*batch)
    official = official_forward(model, *batch)
    for a, b in zip(ours, official, strict=True):
        torch.testing.assert_close(a["score_map"], b["score_map"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-6, rtol=1e-5)
    assert ours[0]["score_map"].shape == (2, 4, 4) and ours[0]["boxes"].shape == (2, 4, 4, 4)


def test_temporal_query_is_carried_with_stop_gradient() -> None:
    model = tiny_tracker().train()
    templates, masks, searches = inputs()
    searches.requires_grad_(True)
    outputs = model(templates, masks, searches)
    outputs[1]["score_map"].sum().backward()
    assert searches.grad[:, 0].abs().sum() == 0  # frame 1 reaches frame 2 only through the detached query
    assert searches.grad[:, 1].abs().sum() > 0
    with torch.no_grad():  # but frame 1 does change frame 2's output (the query is carried)
        other = searches.detach().clone()
        other[:, 0] = torch.randn_like(other[:, 0])
        assert not torch.allclose(model(templates, masks, other)[1]["score_map"], outputs[1]["score_map"])


def test_templates_take_the_top_left_corner_of_the_search_position_embedding() -> None:
    model = tiny_tracker()
    zero = torch.zeros(1, 1, 3, 28, 28)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    with torch.no_grad():
        tokens = model.template_tokens(zero, mask)
        patch = model.patch_embed.proj(zero[0]).flatten(2).transpose(1, 2)
        grid = model.pos_embed.view(4, 4, -1)
    expected = patch[0] + torch.stack([grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]])
    torch.testing.assert_close(tokens[0], expected + model.embeddings.token_type_embed[0].detach())


def test_learnable_tokens_are_initialised() -> None:
    model = tiny_tracker()
    for name, param in model.embeddings.named_parameters():
        assert torch.isfinite(param).all() and 0 < param.std() < 0.05, name  # trunc_normal(0.02), not torch.empty


def test_template_mask_rasterises_the_box_as_the_official_plugin() -> None:
    # template 28 px, 2x2 tokens (stride 14): box x 3..16 covers columns 0 and 1, y 15..20 row 1 only
    mask = template_mask(torch.tensor([[3.0, 15.0, 16.0, 20.0]]), (28, 28), (2, 2))
    assert mask.tolist() == [[[0, 0], [1, 1]]]
    # a box ending exactly on a token border does not reach into the next token (floor(x2 + 1 - 1e-4))
    assert template_mask(torch.tensor([[0.0, 0.0, 13.0, 13.0]]), (28, 28), (2, 2)).tolist() == [[[1, 0], [0, 0]]]
    pos = positive_mask(torch.tensor([[0.30, 0.55, 0.55, 0.9]]), (4, 4))  # x 1.2..2.2 -> cols 1,2; y 2.2..3.6 -> 2,3
    assert pos[0].nonzero().tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]
    assert positive_mask(torch.tensor([[0.30, 0.55, 0.5, 0.9]]), (4, 4))[0].nonzero().tolist() == [[2, 1], [3, 1]]


def test_giou_matches_torchvision() -> None:
    from torchvision.ops import box_iou, generalized_box_iou

    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=g)
    a = torch.cat([a, a + torch.rand(6, 2, generator=g)], dim=1)
    b = torch.rand(6, 2, generator=g)
    b = torch.cat([b, b + torch.rand(6, 2, generator=g)], dim=1)
    iou, giou = box_iou_pairs(a, b)
    torch.testing.assert_close(iou, box_iou(a, b).diag(), atol=1e-6, rtol=0)
    torch.testing.assert_close(giou, generalized_box_iou(a, b).diag(), atol=1e-6, rtol=0)


def test_loss_is_iou_aware_bce_plus_giou_over_positives() -> None:
    torch.manual_seed(0)
    score = torch.randn(1, 4, 4, requires_grad=True)
    boxes_map = torch.rand(1, 4, 4, 2)
    pred = torch.cat([boxes_map, boxes_map + 0.3], dim=-1)
    gt = torch.tensor([[[0.30, 0.55, 0.55, 0.9]]])
    loss, parts = tracking_loss([{"score_map": score, "boxes": pred}], gt)
    cells = [(2, 1), (2, 2), (3, 1), (3, 2)]  # from test_template_mask_...
    target = torch.zeros(4, 4)
    giou_sum = 0.0
    for y, x in cells:
        iou, giou = box_iou_pairs(pred[0, y, x][None], gt[0])
        target[y, x] = iou.item()
        giou_sum += 1 - giou.item()
    bce = F.binary_cross_entropy_with_logits(score[0].detach(), target, reduction="sum").item() / 4
    assert parts["bce_0"].item() == pytest.approx(bce, rel=1e-5)
    assert parts["giou_0"].item() == pytest.approx(giou_sum / 4, rel=1e-5)
    assert loss.item() == pytest.approx(bce + giou_sum / 4, rel=1e-5)
    loss.backward()
    assert score.grad.abs().sum() > 0


def official_state(model) -> dict[str, torch.Tensor]:
    """The adapted tracker's trainable tensors under the official names and shapes (``SPMTrack_DINOv2.state_dict()``:
    ``LinearWithTMoE_TimmQKV`` q/k/v, ``TMoELayer``'s ``compress_expert``, ``routed_experts.{j}`` of ``(d_out, r)``,
    ``expert_route``; ``MlpAnchorFreeHead``'s ``layers.{0,1,2}``; the three embeddings; ``expert_alpha``)."""
    base = model.base_model
    out = {}
    for i, block in enumerate(base.blocks):
        layers = {f"attn.qkv.{p}": getattr(block.attn.qkv.adapters["default"], p) for p in "qkv"}
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            layers[name] = block.get_submodule(name).adapters["default"]
        for name, layer in layers.items():
            prefix = f"blocks.{i}.{name}.tmoe."
            out[prefix + "compress_expert"] = layer.A.detach().clone()
            out[prefix + "expert_route.weight"] = layer.router.weight.detach().clone()
            for j in range(layer.B.shape[0]):
                out[prefix + f"routed_experts.{j}"] = layer.B[j].detach().clone()
    for mlp in ("cls_mlp", "reg_mlp"):
        for j in range(3):
            fc = getattr(getattr(base.head, mlp), f"fc{j + 1}")
            out[f"head.{mlp}.layers.{j}.weight"] = fc.weight.detach().clone()
            out[f"head.{mlp}.layers.{j}.bias"] = fc.bias.detach().clone()
    for name in ("track_query", "query_embed", "token_type_embed"):
        out[name] = getattr(base.embeddings, name).detach().clone()
    out["expert_alpha"] = torch.tensor(64.0)
    out["use_rsexpert"] = torch.tensor(False)
    return out


def test_checkpoint_filter_fn_loads_an_official_state_dict(tmp_path) -> None:
    config = TMoEConfig(rank=4, num_experts=3, alpha=64, init_weights=False)
    source = mp.adapt(tiny_tracker(seed=1), config, modules_to_save=list(OneStreamTracker.trainable_modules))
    state = official_state(source)
    assert official_tmoe_settings(state) == {"rank": 4, "num_experts": 3, "alpha": 64.0, "shared_expert": False}
    save_file(state, tmp_path / "model.bin")  # the official model.bin is a safetensors file
    loaded = load_spmtrack_checkpoint(tiny_tracker(seed=1), str(tmp_path / "model.bin"))
    batch = inputs()
    with torch.no_grad():
        for a, b in zip(loaded(*batch), source(*batch), strict=True):
            torch.testing.assert_close(a["score_map"], b["score_map"])
            torch.testing.assert_close(a["boxes"], b["boxes"])
    mapped = checkpoint_filter_fn(state)
    assert mapped["blocks.1.attn.qkv.adapters.k.B"].shape == (3, 32, 4)
    assert "head.reg_mlp.fc3.weight" in mapped and "embeddings.track_query" in mapped


def test_checkpoint_filter_fn_names_foreign_keys() -> None:
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.q.tmoe.compress_expert.0"):
        checkpoint_filter_fn({"blocks.0.attn.qkv.q.tmoe.compress_expert.0": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="does not fit"):
        model = mp.adapt(tiny_tracker(), TMoEConfig(rank=4), modules_to_save=["head", "embeddings"])
        checkpoint_filter_fn({"track_query": torch.zeros(1, 32)}, model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"template_size": 30}, "template_size=30 is not divisible by the backbone's patch size"),
        ({"search_size": 50}, "search_size=50 is not divisible"),
        ({"template_size": 70}, "larger than search_size"),
        ({"num_templates": 0}, "num_templates=0"),
    ],
)
def test_bad_sizes_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_tracker(**kwargs)


def test_wrong_crop_size_is_refused() -> None:
    model = tiny_tracker()
    templates, masks, searches = inputs()
    with pytest.raises(ValueError, match="template_size"):
        model(templates[..., :14, :14], masks, searches)


def test_position_embedding_is_resampled_as_the_official_interpolate_pos_encoding() -> None:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **TINY)  # 518 px: 37 x 37
    model = OneStreamTracker(vit, template_size=28, search_size=56)
    pos = vit.pos_embed.detach()[:, 1:]  # num_prefix_tokens=1 (the class token), interpolate_offset=0
    official = F.interpolate(pos.reshape(1, 37, 37, 32).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic")
    torch.testing.assert_close(model.pos_embed.detach(), official.permute(0, 2, 3, 1).reshape(1, 16, 32))
    assert not model.pos_embed.requires_grad


def test_a_vit_with_registers_works_too() -> None:
    torch.manual_seed(0)
    model = OneStreamTracker("vit_base_patch14_reg4_dinov2", template_size=28, search_size=56, backbone_kwargs=TINY)
    assert model.pos_embed.shape == (1, 16, 32)  # registers have no position embedding (no_embed_class)
    out = model.eval()(*inputs(b=1))
    assert out[1]["boxes"].shape == (1, 4, 4, 4)


def test_backbone_of_another_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="give a timm VisionTransformer"):
        OneStreamTracker(torch.nn.Linear(3, 3))
