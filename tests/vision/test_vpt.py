"""VPT (``"vpt"``): prompt placement in the token sequence, counts, init bound, frozen eval mode, files."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.layers import PromptTokens
from modalpeft.vision import VPTConfig

C, DEPTH, PATCHES = 32, 2, 16  # tiny ViT: width, blocks, (32 / 8)² patch tokens

VARIANTS = {
    "cls": {},
    "registers": {"reg_tokens": 4, "no_embed_class": True},
    "no_cls_avg": {"class_token": False, "global_pool": "avg"},
    "cls_avg": {"global_pool": "avg"},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit(depth: int = DEPTH, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=C,
        depth=depth,
        num_heads=2,
        num_classes=5,
        **kwargs,
    )
    return model.eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def prompts(model: nn.Module) -> dict[str, PromptTokens]:
    return {
        name.removeprefix("base_model."): host.adapters["default"]
        for name, host in hosts(model)
        if isinstance(host.adapters["default"], PromptTokens)
    }


def block_io(blocks: nn.Module, x: torch.Tensor, run: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What each block itself computes on (inputs, outputs), seen inside any host."""
    inputs, outputs = [], []

    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(out.detach())

    handles = [getattr(b, "base_layer", b).register_forward_hook(record) for b in blocks]
    with torch.no_grad():
        run(x)
    for h in handles:
        h.remove()
    return inputs, outputs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("deep", [True, False])
def test_prompts_follow_the_prefix_tokens_without_position_embedding(variant: str, deep: bool) -> None:
    base = vit(**VARIANTS[variant])
    k = base.num_prefix_tokens
    reference = copy.deepcopy(base)
    model = mp.adapt(base, VPTConfig(num_tokens=3, deep=deep, init_weights=False))
    x = images()
    (ref_in, *_), _ = block_io(reference.blocks, x, reference)
    ins, outs = block_io(model.blocks, x, model)
    assert [t.shape[1] for t in ins] == [k + 3 + PATCHES] * DEPTH
    layers = prompts(model)
    assert sorted(layers) == (["blocks.0", "blocks.1"] if deep else ["blocks.0"])
    # block 0 sees [prefix, P0, patches], the prefix and patches exactly as the frozen model computes them
    torch.testing.assert_close(ins[0][:, :k], ref_in[:, :k], atol=0, rtol=0)
    torch.testing.assert_close(ins[0][:, k + 3 :], ref_in[:, k:], atol=0, rtol=0)
    torch.testing.assert_close(ins[0][:, k : k + 3], layers["blocks.0"].prompts.expand(2, -1, -1), atol=0, rtol=0)
    if deep:  # block 1: its own prompts replace block 0's prompt outputs; prefix and patches carry over
        torch.testing.assert_close(ins[1][:, k : k + 3], layers["blocks.1"].prompts.expand(2, -1, -1), atol=0, rtol=0)
        torch.testing.assert_close(ins[1][:, :k], outs[0][:, :k], atol=0, rtol=0)
        torch.testing.assert_close(ins[1][:, k + 3 :], outs[0][:, k + 3 :], atol=0, rtol=0)
    else:  # shallow: the prompt outputs travel on
        torch.testing.assert_close(ins[1], outs[0], atol=0, rtol=0)


def test_deep_discards_the_previous_prompt_outputs() -> None:
    model = mp.adapt(vit(), VPTConfig(num_tokens=2, init_weights=False))
    x = images()
    before = block_io(model.blocks, x, model)[0][1]
    with torch.no_grad():  # block 0's prompts change only what block 0 outputs at the prefix and patches
        first = prompts(model)["blocks.0"].prompts
        first.add_(torch.randn(first.shape, generator=torch.Generator().manual_seed(2)))
    after = block_io(model.blocks, x, model)[0][1]
    torch.testing.assert_close(after[:, 1:3], before[:, 1:3], atol=0, rtol=0)
    assert not torch.allclose(after[:, 3:], before[:, 3:])


@pytest.mark.parametrize(("deep", "num_tokens"), [(True, 1), (True, 4), (False, 4)])
def test_trainable_count_is_p_times_c_per_prompted_block(deep: bool, num_tokens: int) -> None:
    model = mp.adapt(vit(), VPTConfig(num_tokens=num_tokens, deep=deep))
    blocks = DEPTH if deep else 1
    assert model.trainable_summary()["trainable"] == blocks * num_tokens * C
    head = mp.adapt(vit(), mp.create_config("vpt", num_tokens=num_tokens, deep=deep), modules_to_save=["head"])
    assert head.trainable_summary()["trainable"] == blocks * num_tokens * C + 5 * C + 5


def test_vit_b16_counts_and_uniform_init_bound() -> None:
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = mp.adapt(base, VPTConfig(num_tokens=10))
    assert model.trainable_summary()["trainable"] == 92_160  # 12 · 10 · 768
    values = torch.cat([p.prompts.flatten() for p in prompts(model).values()])
    assert math.sqrt(6 / (3 * 16 * 16 + 768)) == 0.0625
    assert values.abs().max() <= 0.0625 and values.abs().max() > 0.062
    assert abs(values.mean().item()) < 2e-3 and abs(values.std().item() - 0.0625 / math.sqrt(3)) < 1e-3
    model.delete_adapter("default")
    model.add_adapter("shallow", VPTConfig(num_tokens=50, deep=False))
    assert model.trainable_summary()["trainable"] == 38_400


def test_patch_area_option_sets_the_bound() -> None:
    model = mp.adapt(vit(), VPTConfig(num_tokens=200, patch_area=4))
    bound = math.sqrt(6 / (3 * 4 + C))
    values = torch.cat([p.prompts.flatten() for p in prompts(model).values()])
    assert bound - 0.01 < values.abs().max() <= bound
    default = mp.adapt(vit(), VPTConfig(num_tokens=200))  # 8x8 patches
    values = torch.cat([p.prompts.flatten() for p in prompts(default).values()])
    assert values.abs().max() <= math.sqrt(6 / (3 * 64 + C)) < bound - 0.05


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pooling_reads_class_token_or_averages_prompts_and_patches(variant: str) -> None:
    model = mp.adapt(vit(**VARIANTS[variant]), VPTConfig(num_tokens=3, init_weights=False))
    k = model.num_prefix_tokens
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == k + 3 + PATCHES  # prompts kept
        # avg: VPT's "original" pooling, the mean over every non-prefix token, prompts included
        pooled = features[:, 0] if model.global_pool == "token" else features[:, k:].mean(1)
        torch.testing.assert_close(model(x), model.head(model.fc_norm(pooled)))


@pytest.mark.parametrize("deep", [True, False])
def test_keep_prompts_false_restores_the_sequence_for_dense_tasks(deep: bool) -> None:
    model = mp.adapt(vit(global_pool="avg"), VPTConfig(num_tokens=3, deep=deep, keep_prompts=False))
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 1 + PATCHES, C)
        torch.testing.assert_close(model(x), model.head(model.fc_norm(features[:, 1:].mean(1))))
    assert model.trainable_summary()["trainable"] == (DEPTH if deep else 1) * 3 * C


def test_frozen_backbone_stays_in_eval_mode_while_prompts_train() -> None:
    drops = {"drop_rate": 0.5, "pos_drop_rate": 0.5, "proj_drop_rate": 0.5, "attn_drop_rate": 0.5}
    model = mp.adapt(vit(drop_path_rate=0.5, **drops), VPTConfig(num_tokens=3, dropout=0.5), modules_to_save=["head"])
    model.train()
    assert all(not b.base_layer.training for b in model.blocks) and not model.patch_embed.training
    assert all(p.training for p in prompts(model).values()) and model.head.training
    x = images()
    for layer in prompts(model).values():
        layer.drop.eval()  # only the prompt dropout is random now: the frozen part must be deterministic
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    for layer in prompts(model).values():
        layer.drop.train()
    assert not torch.equal(model(x), model(x))  # prompt dropout is on
    free = mp.adapt(vit(drop_path_rate=0.5, **drops), VPTConfig(num_tokens=3, frozen_eval=False)).train()
    assert free.blocks[0].base_layer.training and not torch.equal(free(x), free(x))


def test_save_load_round_trip(tmp_path) -> None:
    config = VPTConfig(num_tokens=3, deep=False, keep_prompts=False, dropout=0.1)
    model = mp.adapt(vit(), config, modules_to_save=["head"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = images()
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    expected = model(x)
    model.save_adapter(tmp_path / "vpt")
    loaded = mp.load_adapter(vit(), tmp_path / "vpt")
    assert loaded.peft_config["default"] == dataclasses.replace(config, modules_to_save=["head"])
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)


def test_merge_raises_and_disable_or_unload_give_the_base() -> None:
    base = vit()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, VPTConfig(num_tokens=2, init_weights=False))
    x = images()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with model.disable_adapters():
        torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)
    unloaded = model.unload()
    assert [type(m) for m in unloaded.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(unloaded(x), reference(x), atol=0, rtol=0)


def test_target_modules_restricts_prompting_to_named_blocks() -> None:
    model = mp.adapt(vit(depth=3), VPTConfig(num_tokens=2, target_modules=r"blocks\.[12]"))
    layers = prompts(model)
    assert {n: layer.mode for n, layer in layers.items()} == {"blocks.1": "insert", "blocks.2": "replace"}
    ins, _ = block_io(model.blocks, images(), model)
    assert [t.shape[1] for t in ins] == [1 + PATCHES, 3 + PATCHES, 3 + PATCHES]
    assert model.trainable_summary()["trainable"] == 2 * 2 * C
    with pytest.raises(ValueError, match="not blocks"):
        mp.adapt(vit(), VPTConfig(target_modules=["attn.qkv"]))


@pytest.mark.parametrize(
    ("model", "missing"),
    [
        (lambda: MlpMixer(num_classes=3, img_size=32, patch_size=8, num_blocks=2, embed_dim=16), "num_prefix_tokens"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "blocks"),
    ],
)
def test_models_without_the_backbone_interface_are_refused(model, missing: str) -> None:
    with pytest.raises(ValueError, match=f"`{missing}`.*backbone interface"):
        mp.adapt(model(), VPTConfig())


def test_patch_size_is_needed_unless_given() -> None:
    base = vit()
    base.patch_embed = nn.Identity()  # a backbone without a readable patch size
    with pytest.raises(ValueError, match="patch_area"):
        mp.adapt(base, VPTConfig())
    assert mp.adapt(base, VPTConfig(patch_area=64)).trainable_summary()["trainable"] == DEPTH * 10 * C


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_tokens": 0}, "num_tokens"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "xavier"}, "init"),
        ({"patch_area": 0}, "patch_area"),
        ({"deep": "yes"}, "deep"),
        ({"init_weights": "identity"}, "identity"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VPTConfig(**kwargs)


def test_config_round_trips_through_json() -> None:
    config = VPTConfig(num_tokens=5, deep=False, dropout=0.1, patch_area=256, keep_prompts=False)
    data = config.to_dict()
    assert data["method"] == "vpt" and data["frozen_eval"] is True
    assert VPTConfig.from_dict(data) == config
    assert mp.get_method("vpt").modality == "vision" and not mp.get_method("vpt").mergeable
