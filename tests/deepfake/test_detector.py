"""DeepfakeModel / DeepfakeDetector: what trains (exact counts), the encoder interface, slerp, the losses."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import modalpeft as mp
from modalpeft.vision.deepfake.detector import (
    DeepfakeDetector,
    DeepfakeModel,
    alignment_loss,
    detection_loss,
    feature_loss,
    hf_clip_vision,
    layernorm_names,
    open_clip_visual,
    prepare_detector,
    slerp,
    slerp_augment,
    uniformity_loss,
)

TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}


def trainable(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def tiny_timm() -> nn.Module:
    kwargs = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


def test_open_clip_vit_b32_trains_exactly_its_26_layernorms_and_the_head() -> None:
    visual = open_clip_visual("ViT-B-32", pretrained=None, text_cfg=TINY_TEXT)
    lns = layernorm_names(visual)
    assert len(lns) == 26 and lns[0] == "ln_pre" and lns[-1] == "ln_post"
    ln_params = sum(p.numel() for n, m in visual.named_modules() if n in lns for p in m.parameters())
    assert ln_params == 26 * 2 * 768 == 39_936
    base = DeepfakeModel(visual)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = base(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's "unsupported layer type" for open_clip's LayerNorm is handled
        model = prepare_detector(base, "ln_tuning")
    counts = trainable(model)
    assert sum(counts.values()) == 39_936 + 768 * 2 + 2 == 41_474
    ln_tuned = [n for n in counts if "ln_tuning_layers.default" in n]
    assert len(ln_tuned) == 52 and all(n.endswith((".weight", ".bias")) for n in ln_tuned)
    assert {n for n in counts if n not in ln_tuned} == {
        "base_model.base_model.model.head.linear.weight",
        "base_model.base_model.model.head.linear.bias",
    }
    # the trained copies keep open_clip's LayerNorm class (its dtype-preserving forward); outputs start unchanged
    copies = [m for n, m in model.named_modules() if n.endswith("ln_tuning_layers.default")]
    assert len(copies) == 26 and all(type(m).__module__.startswith("open_clip") for m in copies)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)
    assert base.encoder.proj is None and base.num_features == 768


def test_hf_clip_and_timm_encoders_use_the_post_norm_class_token() -> None:
    hf = hf_clip_vision(
        config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        }
    )
    model = DeepfakeModel(hf)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
        tower = getattr(hf, "vision_model", hf)  # transformers < 5 nests the tower one level deeper
        assert torch.allclose(model.forward_features(x), tower.post_layernorm(hidden[:, 0]), atol=1e-6)
    adapted = prepare_detector(model, "ln_tuning")
    assert sum(trainable(adapted).values()) == 6 * 2 * 32 + 33 * 2  # pre, 2 x 2 per layer, post; head 32 x 2 + 2

    vit = tiny_timm()
    model = DeepfakeModel(vit)
    assert vit.num_classes == 0  # the unused classifier is removed (full fine-tuning under DDP)
    with torch.no_grad():
        tokens = vit.forward_features(torch.randn(2, 3, 16, 16))
    assert tokens.shape[1] == 5
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), vit.forward_features(x)[:, 0])
    adapted = prepare_detector(model, "ln_tuning")
    # 5 LayerNorms (2 per block + final) x 2 x 32, plus the head; timm's parameter-free attn.norm is not matched
    assert sum(trainable(adapted).values()) == 5 * 64 + 66
    assert sum(trainable(prepare_detector(DeepfakeModel(tiny_timm()), "linear")).values()) == 66
    full = prepare_detector(DeepfakeModel(tiny_timm()), "full")
    assert all(p.requires_grad for p in full.parameters())


def test_ln_tuning_saves_reloads_and_merges_through_the_core(tmp_path) -> None:
    torch.manual_seed(0)
    model = prepare_detector(DeepfakeModel(tiny_timm()), "ln_tuning")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh = DeepfakeModel(tiny_timm())  # the same frozen encoder (same seed), another head until loaded
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        reloaded = mp.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(x), expected, atol=1e-6)
        merged = model.merge_and_unload()  # LN tuning swaps the tuned copies in: zero inference overhead
        assert torch.allclose(merged(x), expected, atol=1e-6)
    assert not [n for n, m in merged.named_modules() if type(m).__module__.startswith("peft")]


def test_unsupported_encoder_and_bad_arguments_are_named() -> None:
    with pytest.raises(TypeError, match="Sequential .* is not a supported encoder"):
        DeepfakeModel(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="adapter='lora' is not valid"):
        prepare_detector(DeepfakeModel(tiny_timm()), "lora")
    with pytest.raises(ValueError, match="slerp_range"):
        DeepfakeDetector(tiny_timm(), slerp_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="all 0"):
        DeepfakeDetector(tiny_timm(), ce_weight=0.0)


def test_slerp_interpolates_on_the_sphere() -> None:
    a = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0]])
    assert torch.allclose(slerp(a, b, 0.0), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(slerp(a, b, 1.0), torch.tensor([[0.0, 1.0]]), atol=1e-6)
    half = math.sqrt(0.5)
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([[half, half]]))
    x = slerp(torch.randn(8, 5), torch.randn(8, 5), torch.rand(8, 1))
    assert torch.allclose(x.norm(dim=1), torch.ones(8), atol=1e-5)


def test_slerp_augmentation_mixes_within_a_class_only() -> None:
    # class 0 on the first axis's half-plane, class 1 orthogonal: a mix across classes would leave its plane
    features = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    out = slerp_augment(features, labels, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:2, 2], torch.zeros(2), atol=1e-6)  # class 0 stays in the x-y plane
    assert torch.allclose(out[2:4, :2], torch.zeros(2, 2), atol=1e-3)  # class 1 on the z axis
    assert torch.equal(out[4], features[4])  # a class with one sample is left as it is
    assert torch.allclose(out[:4].norm(dim=1), torch.ones(4), atol=1e-5)


def test_alignment_and_uniformity_match_hand_computed_values() -> None:
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    assert alignment_loss(e, labels).item() == pytest.approx(0.0)  # the only same-class pair coincides
    e2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert alignment_loss(e2, torch.tensor([1, 1])).item() == pytest.approx(2.0)  # ||e1 - e2||^2 = 2
    # pairwise squared distances 0, 2, 2: log((1 + 2 exp(-4)) / 3)
    expected = math.log((1 + 2 * math.exp(-4)) / 3)
    assert uniformity_loss(e).item() == pytest.approx(expected, rel=1e-5)
    logits_head = nn.Linear(2, 2)
    loss, parts, _ = feature_loss(
        logits_head, e, labels, slerp_augmentation=False, ce_weight=1.0, alignment_weight=0.1, uniformity_weight=0.5
    )
    assert loss.item() == pytest.approx((parts["ce"] + 0.1 * parts["alignment"] + 0.5 * parts["uniformity"]).item())


def test_task_trains_only_layernorms_and_head_and_logs_video_metrics() -> None:
    task = DeepfakeDetector(tiny_timm(), alignment_weight=0.1, uniformity_weight=0.5)
    assert task.hparams.lr == 8e-5 and task.hparams.min_lr == 5e-5 and task.hparams.slerp_augmentation
    assert sum(trainable(task.model).values()) == 5 * 64 + 66
    images = torch.randn(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 0, 1])
    loss = task.step((images, labels, torch.tensor([0, 1, 2, 3])), "train")
    loss.backward()
    grads = {n for n, p in task.model.named_parameters() if p.grad is not None}
    assert grads == set(trainable(task.model))
    _, parts, _ = detection_loss(task.model, images, labels)
    assert set(parts) == {"ce", "alignment", "uniformity"}
