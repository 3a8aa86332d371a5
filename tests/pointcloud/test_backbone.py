"""The point transformer: timm's interface, shapes, point-order invariance, official checkpoints, bad input."""

from __future__ import annotations

import pytest
import torch

from modalpeft.pointcloud import PointTransformer, checkpoint_filter_fn, create_backbone, list_backbones

C, DEPTH, G = 32, 2, 16  # point_mae_test


def test_registry_names():
    assert {"point_mae", "point_bert", "point_mae_test"} <= set(list_backbones())
    with pytest.raises(ValueError, match="unknown point-cloud backbone 'pointnet'.*point_mae_test"):
        create_backbone("pointnet")


@pytest.mark.parametrize(
    ("name", "params"),
    [("point_mae", 22_093_327), ("point_bert", 22_126_351)],  # Point-MAE / Point-BERT READMEs: 22.1M
)
def test_paper_configurations(name, params):
    model = create_backbone(name, num_classes=15)
    assert sum(p.numel() for p in model.parameters()) == params
    assert (model.embed_dim, len(model.blocks), model.num_group, model.group_size) == (384, 12, 64, 32)
    assert create_backbone(name, num_classes=15, num_group=128).num_group == 128


def test_timm_interface(clouds):
    torch.manual_seed(0)
    model = create_backbone("point_mae_test", num_classes=5).eval()
    assert isinstance(model, PointTransformer)
    assert (model.num_features, model.head_hidden_size, model.num_prefix_tokens) == (C, 2 * C, 1)
    assert model.patch_embed is model.encoder and model.patch_embed.patch_size == (8, 1)
    feats = model.forward_features(clouds)
    assert feats.shape == (4, 1 + G, C)
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([feats[:, 0], feats[:, 1:].max(1).values], -1))
    assert model(clouds).shape == (4, 5)
    model.reset_classifier(7)
    assert model.eval()(clouds).shape == (4, 7) and model.get_classifier()[-1].out_features == 7
    model.reset_classifier(0)
    assert model(clouds).shape == (4, 2 * C)


def test_positions_are_added_before_every_block(clouds):
    torch.manual_seed(0)
    model = create_backbone("point_mae_test", num_classes=5).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    model(clouds)
    x, pos, _ = model.embed(clouds)
    assert len(seen) == DEPTH and all(torch.equal(p, pos) for p in seen)
    # tokens between the class token and the patches (prompts) get no position
    block = model.blocks[0]
    extra = torch.randn(4, 3, C)
    out = block.add_pos(torch.cat([x[:, :1], extra, x[:, 1:]], 1), pos)
    torch.testing.assert_close(out[:, 1:4], extra)
    torch.testing.assert_close(torch.cat([out[:, :1], out[:, 4:]], 1), x + pos)


def test_embed_of_the_first_patches_equals_the_full_embedding_in_eval_mode(clouds):
    torch.manual_seed(0)
    model = create_backbone("point_mae_test", num_classes=5).eval()
    x, pos, center = model.embed(clouds)
    part_x, part_pos, part_center = model.embed(clouds, 5)
    assert part_x.shape == (4, 6, C) and torch.equal(part_center, center)
    torch.testing.assert_close(part_x, x[:, :6], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part_pos, pos[:, :6], rtol=1e-6, atol=1e-6)


def test_output_does_not_depend_on_point_order(clouds):
    torch.manual_seed(0)
    model = create_backbone("point_mae_test", num_classes=5).eval()
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(clouds[:, perm]), model(clouds), rtol=1e-5, atol=1e-5)


def test_backward_reaches_every_parameter(clouds):
    model = create_backbone("point_mae_test", num_classes=5)
    model(clouds).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# -- official checkpoints ----------------------------------------------------------------------------------------


def _bn(prefix: str, n: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(n),
        f"{prefix}.bias": torch.randn(n),
        f"{prefix}.running_mean": torch.randn(n),
        f"{prefix}.running_var": torch.rand(n) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def official_encoder(c: int, depth: int, encoder_dim: int, *, bert: bool) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as the official Point-MAE / Point-BERT modules name them (written out by hand)."""
    sd = {
        "encoder.first_conv.0.weight": torch.randn(128, 3, 1),
        "encoder.first_conv.0.bias": torch.randn(128),
        **_bn("encoder.first_conv.1", 128),
        "encoder.first_conv.3.weight": torch.randn(256, 128, 1),
        "encoder.first_conv.3.bias": torch.randn(256),
        "encoder.second_conv.0.weight": torch.randn(512, 512, 1),
        "encoder.second_conv.0.bias": torch.randn(512),
        **_bn("encoder.second_conv.1", 512),
        "encoder.second_conv.3.weight": torch.randn(encoder_dim, 512, 1),
        "encoder.second_conv.3.bias": torch.randn(encoder_dim),
        "pos_embed.0.weight": torch.randn(128, 3),
        "pos_embed.0.bias": torch.randn(128),
        "pos_embed.2.weight": torch.randn(c, 128),
        "pos_embed.2.bias": torch.randn(c),
        "norm.weight": torch.randn(c),
        "norm.bias": torch.randn(c),
    }
    for i in range(depth):
        p = f"blocks.blocks.{i}"
        sd |= {
            f"{p}.norm1.weight": torch.randn(c),
            f"{p}.norm1.bias": torch.randn(c),
            f"{p}.attn.qkv.weight": torch.randn(3 * c, c),
            f"{p}.attn.proj.weight": torch.randn(c, c),
            f"{p}.attn.proj.bias": torch.randn(c),
            f"{p}.norm2.weight": torch.randn(c),
            f"{p}.norm2.bias": torch.randn(c),
            f"{p}.mlp.fc1.weight": torch.randn(4 * c, c),
            f"{p}.mlp.fc1.bias": torch.randn(4 * c),
            f"{p}.mlp.fc2.weight": torch.randn(c, 4 * c),
            f"{p}.mlp.fc2.bias": torch.randn(c),
        }
    if bert:
        sd |= {
            "cls_token": torch.randn(1, 1, c),
            "cls_pos": torch.randn(1, 1, c),
            "reduce_dim.weight": torch.randn(c, encoder_dim),
            "reduce_dim.bias": torch.randn(c),
        }
    return sd


def _check_loaded(model, official, prefix):
    blocks = model.blocks
    assert torch.equal(blocks[1].mlp_residual.mlp.fc2.weight, official[f"{prefix}blocks.blocks.1.mlp.fc2.weight"])
    assert torch.equal(blocks[0].mlp_residual.norm2.bias, official[f"{prefix}blocks.blocks.0.norm2.bias"])
    assert torch.equal(blocks[0].attn.qkv.weight, official[f"{prefix}blocks.blocks.0.attn.qkv.weight"])
    assert torch.equal(model.encoder.second_conv[1].running_var, official[f"{prefix}encoder.second_conv.1.running_var"])
    assert torch.equal(model.pos_embed[2].weight, official[f"{prefix}pos_embed.2.weight"])


def test_checkpoint_filter_point_mae_pretrain(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("point_mae_test", num_classes=5)
    official = {f"module.MAE_encoder.{k}": v for k, v in official_encoder(C, DEPTH, C, bert=False).items()}
    official |= {  # pretraining-only parts of Point-MAE's pretrain.pth
        "module.mask_token": torch.randn(1, 1, C),
        "module.decoder_pos_embed.0.weight": torch.randn(128, 3),
        "module.MAE_decoder.blocks.blocks.0.norm1.weight": torch.randn(C),
        "module.increase_dim.0.weight": torch.randn(3 * 8, C, 1),
    }
    filtered = checkpoint_filter_fn({"base_model": official, "epoch": 300}, model)
    missing = set(model.state_dict()) - set(filtered)
    assert missing == {"class_token.token", "class_token.pos"} | {
        k for k in model.state_dict() if k.startswith("head.")
    }
    model.load_state_dict(filtered, strict=False)
    _check_loaded(model, official, "module.MAE_encoder.")
    # the same through create_backbone from a file written the way the official code saves it
    torch.save({"base_model": official, "epoch": 300}, tmp_path / "pretrain.pth")
    loaded = create_backbone("point_mae_test", num_classes=5, checkpoint_path=str(tmp_path / "pretrain.pth"))
    _check_loaded(loaded, official, "module.MAE_encoder.")


def test_checkpoint_filter_point_bert_and_finetuned_head():
    model = create_backbone("point_mae_test", num_classes=5, encoder_dim=16)  # Point-BERT layout: reduce_dim
    official = {f"module.transformer_q.{k}": v for k, v in official_encoder(C, DEPTH, 16, bert=True).items()}
    official |= {
        "module.transformer_q.lm_head.weight": torch.randn(8192, C),
        "module.transformer_q.cls_head.0.weight": torch.randn(C, C),
        "module.transformer_k.norm.weight": torch.randn(C),
        "module.dvae.encoder.first_conv.0.weight": torch.randn(128, 3, 1),
        "module.queue": torch.randn(C, 16),
    }
    filtered = checkpoint_filter_fn({"base_model": official}, model)
    assert set(model.state_dict()) - set(filtered) == {k for k in model.state_dict() if k.startswith("head.")}
    model.load_state_dict(filtered, strict=False)
    _check_loaded(model, official, "module.transformer_q.")
    assert torch.equal(model.reduce_dim.weight, official["module.transformer_q.reduce_dim.weight"])
    assert torch.equal(model.cls_pos, official["module.transformer_q.cls_pos"])
    # a fine-tuned checkpoint's head (cls_head_finetune) loads when its classes match, and is skipped otherwise
    head = {"cls_head_finetune.0.weight": torch.randn(256, 2 * C), "cls_head_finetune.8.weight": torch.randn(5, 256)}
    plain = {k.removeprefix("module.transformer_q."): v for k, v in official.items() if "transformer_q." in k}
    filtered = checkpoint_filter_fn({**plain, **head}, model)
    assert torch.equal(filtered["head.8.weight"], head["cls_head_finetune.8.weight"])
    other = create_backbone("point_mae_test", num_classes=3, encoder_dim=16)
    assert "head.8.weight" not in checkpoint_filter_fn({**plain, **head}, other)


def test_checkpoint_filter_reports_unknown_keys_and_shapes():
    model = create_backbone("point_mae_test", num_classes=5)
    official = official_encoder(C, DEPTH, C, bert=False)
    official["blocks.blocks.0.attn.rel_pos"] = torch.randn(3)
    official["pos_embed.2.weight"] = torch.randn(64, 128)
    with pytest.raises(ValueError, match=r"unknown keys \(1\): \['blocks.blocks.0.attn.rel_pos'\]") as err:
        checkpoint_filter_fn(official, model)
    assert "pos_embed.2.weight -> pos_embed.2.weight: checkpoint (64, 128) vs model (32, 128)" in str(err.value)


def test_bad_input_errors(clouds):
    model = create_backbone("point_mae_test", num_classes=5).eval()
    bad = clouds.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf.*sample 1 \(1 points\)"):
        model(bad)
    with pytest.raises(ValueError, match="holds 12 points per cloud, fewer than the 16"):
        model(clouds[:, :12])
    with pytest.raises(ValueError, match=r"\(B, N, 3\).*\(4, 128, 6\)"):
        model(torch.randn(4, 128, 6))
