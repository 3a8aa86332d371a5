"""The core's and peft's methods on the point transformer, through its backbone interface (no per-method copy)."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import modalpeft as mp
from modalpeft.core.layers import PromptTokens
from modalpeft.pointcloud import create_backbone
from modalpeft.vision import VPTConfig

from ..core.toy_models import perturb

C, DEPTH, G = 32, 2, 16  # point_mae_test


def tiny():
    torch.manual_seed(0)
    return perturb(create_backbone("point_mae_test", num_classes=5))


def _train_step(model, clouds):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(clouds), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_vpt_deep_trains_only_prompts_and_head(clouds):
    model = mp.adapt(tiny(), VPTConfig(deep=True, num_tokens=4), modules_to_save=["head"])
    prompts = [b.adapters["default"] for b in model.blocks]
    assert all(isinstance(p, PromptTokens) for p in prompts)
    assert [p.mode for p in prompts] == ["insert", "replace"]
    head = sum(p.numel() for p in model.head.parameters())
    assert model.trainable_summary()["trainable"] == DEPTH * 4 * C + head
    # VPT's init bound reads patch_embed.patch_size == (group_size, 1): a token's fan-in is 3 * group_size
    bound = (6 / (3 * 8 + C)) ** 0.5
    assert all(p.prompts.abs().max() <= bound for p in prompts)
    model.train()
    feats = model.forward_features(clouds)
    assert feats.shape == (4, 1 + 4 + G, C)  # [class, prompts, patches]
    changed = _train_step(model, clouds)
    assert changed and all(".adapters." in n or ".head." in n for n in changed)
    assert any("prompts" in n for n in changed)


def test_bottleneck_adapter_runs(clouds):
    model = mp.adapt(tiny(), mp.BottleneckConfig(style="houlsby", bottleneck_dim=8), modules_to_save=["head"])
    per = 2 * (C * 8 + 8 + 8 * C + C)  # attn.proj and mlp.fc2 of each block
    head = sum(p.numel() for p in model.head.parameters())
    assert model.trainable_summary()["trainable"] == DEPTH * per + head
    changed = _train_step(model.train(), clouds)
    assert changed and all(".adapters." in n or ".head." in n for n in changed)


def test_peft_lora_on_qkv_and_merge(clouds):
    model = mp.adapt(tiny().eval(), peft.LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    assert model.trainable_summary()["trainable"] == DEPTH * (4 * C + 3 * C * 4)
    with torch.no_grad():
        expected = model(clouds)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(clouds), expected, atol=1e-5, rtol=1e-5)


def test_bitfit_runs_and_merges(clouds):
    model = mp.adapt(tiny().eval(), mp.BitFitConfig(init_weights=False))
    trainable = model.trainable_summary()["trainable"]
    biases = sum(p.numel() for n, p in tiny().named_parameters() if n.endswith("bias"))
    assert trainable == biases
    with torch.no_grad():
        expected = model(clouds)
        torch.testing.assert_close(model.merge_and_unload()(clouds), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("baseline", ["full", "linear"])
def test_lightning_baselines(baseline, clouds):
    from modalpeft.lightning.task import prepare_backbone

    model = prepare_backbone(tiny(), baseline, ["head"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"head"} if baseline == "linear" else {n.split(".")[0] for n, _ in model.named_parameters()})
