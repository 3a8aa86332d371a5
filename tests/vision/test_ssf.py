"""SSF (``"ssf"``): official placement and count on ViTs, generic placement on Swin/ConvNeXt/Mixer, inits,
exact re-parameterisation by ``merge_and_unload``, and files."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
from timm.layers import GroupNormAct, LayerNorm2d, StdConv2d
from timm.models.mlp_mixer import MlpMixer
from torch import nn

import modalpeft as mp
from modalpeft.core.inject import hosts
from modalpeft.core.layers import ScaleShift
from modalpeft.vision import SSFConfig

from ..core.toy_models import perturb

VIT_BLOCK = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]  # the official order in a block


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = perturb(build()).eval()  # random biases and norm affines: a fold that drops one is seen
        with torch.no_grad():  # some heads start at zero (Mixer): give them weights so that logits differ
            for p in model.get_classifier().parameters():
                nn.init.normal_(p, std=0.5)
        return model

    return make


MODELS = {
    "vit": _seeded(
        lambda: timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
        )
    ),
    "swin": _seeded(
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            window_size=4,
            embed_dim=16,
            depths=(1, 1),
            num_heads=(1, 2),
            num_classes=5,
        )
    ),
    "convnext_conv_mlp": _seeded(
        lambda: timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    ),
    "convnext_linear_mlp": _seeded(
        lambda: timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    ),
    "mixer": _seeded(lambda: MlpMixer(num_classes=5, img_size=32, patch_size=8, num_blocks=2, embed_dim=16)),
}


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def scale_shifts(model: nn.Module) -> dict[str, ScaleShift]:
    return {name.removeprefix("base_model."): host.adapters["default"] for name, host in hosts(model)}


def module_types(model: nn.Module) -> list[str]:
    return [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Every entry within ``rel`` of the largest magnitude of ``expected`` (a merge reorders float operations)."""
    assert (actual - expected).abs().max() <= rel * expected.abs().max()


def expected_count(model: nn.Module) -> int:
    """2 · Σ d_out over every Linear/Conv with a bias and every affine LayerNorm/GroupNorm but the classifier."""
    head = model.get_classifier()
    total = 0
    for m in model.modules():
        if m is head or getattr(m, "bias", None) is None:
            continue
        if isinstance(m, nn.Linear):
            total += m.out_features
        elif isinstance(m, nn.Conv2d):
            total += m.out_channels
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            total += m.weight.numel()
    return 2 * total


def test_vit_b16_gets_205824_parameters_with_the_official_init() -> None:
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = mp.adapt(base, SSFConfig())
    assert model.trainable_summary()["trainable"] == 205_824  # 12 · 2 · 11C + 4C, C = 768
    layers = scale_shifts(model)
    assert layers["blocks.0.attn.qkv"].scale.shape == (3 * 768,) and layers["blocks.0.mlp.fc1"].shift.shape == (3072,)
    scales = torch.cat([layer.scale for layer in layers.values()])
    shifts = torch.cat([layer.shift for layer in layers.values()])
    assert abs(scales.mean().item() - 1.0) < 5e-4 and abs(scales.std().item() - 0.02) < 5e-4
    assert abs(shifts.mean().item()) < 5e-4 and abs(shifts.std().item() - 0.02) < 5e-4


def test_vit_placement_is_the_official_one() -> None:
    model = mp.adapt(MODELS["vit"](), SSFConfig())  # no modules_to_save: the classifier is still left out
    layers = scale_shifts(model)
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in VIT_BLOCK]
    assert list(layers) == ["patch_embed.proj", *blocks, "norm"]
    assert layers["patch_embed.proj"].channel_dim == 1  # on the conv output, before timm flattens it
    assert {layers[n].channel_dim for n in [*blocks, "norm"]} == {-1}
    assert model.trainable_summary()["trainable"] == 2 * (32 + 2 * 11 * 32 + 32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_identity_init_leaves_outputs_unchanged(name: str) -> None:
    base = MODELS[name]()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, SSFConfig(init_weights="identity"), modules_to_save=["head"])
    assert all(torch.equal(s.scale, torch.ones_like(s.scale)) for s in scale_shifts(model).values())
    x = images()
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=0)  # x · 1 + 0 may change memory layout


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_and_unload_is_exact_and_gives_back_timm_modules(name: str) -> None:
    base = MODELS[name]()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, SSFConfig(init_weights=False))
    assert model.trainable_summary()["trainable"] == expected_count(reference)
    x = images()
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
        assert not torch.allclose(logits, reference(x), atol=1e-3)
        merged = model.merge_and_unload()
        assert_close_relative(merged.forward_features(x), features)
        assert_close_relative(merged(x), logits)
    assert module_types(merged) == module_types(reference)
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()
    ]


def test_unmerge_restores_the_base_weights() -> None:
    base = MODELS["convnext_conv_mlp"]()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, SSFConfig(init_weights=False))
    model.merge_adapter()
    model.unmerge_adapter()
    unloaded = model.unload()
    for (n, p), q in zip(unloaded.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_channel_dims_follow_each_layer_layout() -> None:
    conv_mlp = scale_shifts(mp.adapt(MODELS["convnext_conv_mlp"](), SSFConfig()))
    linear_mlp = scale_shifts(mp.adapt(MODELS["convnext_linear_mlp"](), SSFConfig()))
    assert conv_mlp["stem.0"].channel_dim == 1  # Conv2d
    assert conv_mlp["stem.1"].channel_dim == 1  # timm LayerNorm2d: NCHW
    assert conv_mlp["stages.0.blocks.0.mlp.fc1"].channel_dim == 1  # 1x1 Conv2d MLP
    assert linear_mlp["stages.0.blocks.0.norm"].channel_dim == -1  # LayerNorm on NHWC
    assert linear_mlp["stages.0.blocks.0.mlp.fc1"].channel_dim == -1
    assert "head.norm" in conv_mlp and "head.fc" not in conv_mlp


def test_swin_places_after_the_patch_merging_norm_and_skips_its_bias_free_reduction() -> None:
    layers = scale_shifts(mp.adapt(MODELS["swin"](), SSFConfig()))
    assert layers["layers.1.downsample.norm"].scale.shape == (64,)  # 4C
    assert "patch_embed.norm" in layers and "layers.1.downsample.reduction" not in layers
    with pytest.raises(ValueError, match="'layers.1.downsample.reduction'.*bias"):
        mp.adapt(MODELS["swin"](), SSFConfig(target_modules=["reduction"]))


class Mixed(nn.Module):
    """Layers a scale-shift cannot be folded into, beside ones it can."""

    def __init__(self) -> None:
        super().__init__()
        self.std_conv = StdConv2d(3, 8, 3)  # weight standardisation undoes a row scaling
        self.norm_act = GroupNormAct(8, num_groups=2)  # the activation follows the affine
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.norm = LayerNorm2d(8)
        self.no_bias = nn.Linear(8, 8, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(self.bn(self.norm_act(self.std_conv(x))))).mean((2, 3))
        return self.fc(self.no_bias(x))


def test_generic_placement_takes_only_foldable_layers() -> None:
    torch.manual_seed(0)
    base = Mixed().eval()
    reference = copy.deepcopy(base)
    model = mp.adapt(base, SSFConfig(init_weights=False))
    assert sorted(scale_shifts(model)) == ["bn", "conv", "fc", "norm"]
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    merged = model.merge_and_unload()
    assert_close_relative(merged(x), expected)
    assert module_types(merged) == module_types(reference)
    for target, match in [("std_conv", "overrides"), ("norm_act", "overrides"), ("no_bias", "bias")]:
        with pytest.raises(ValueError, match=match):
            mp.adapt(Mixed(), SSFConfig(target_modules=[target]))


def test_target_and_exclude_modules_select_layers() -> None:
    model = mp.adapt(MODELS["vit"](), SSFConfig(target_modules=["qkv", "fc1"], exclude_modules=r"blocks\.1\..*"))
    assert list(scale_shifts(model)) == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1"]
    assert model.trainable_summary()["trainable"] == 2 * (3 * 32 + 4 * 32)


@pytest.mark.parametrize("name", ["vit", "convnext_conv_mlp"])
def test_save_load_round_trip(name: str, tmp_path) -> None:
    model = mp.adapt(MODELS[name](), mp.create_config("ssf", init_weights=False), modules_to_save=["head"])
    x = images()
    expected = model(x)
    model.save_adapter(tmp_path / "ssf")
    loaded = mp.load_adapter(MODELS[name](), tmp_path / "ssf")
    torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
    assert loaded.peft_config["default"] == model.peft_config["default"]
    assert SSFConfig.from_dict(model.peft_config["default"].to_dict()).method == "ssf"
    assert mp.get_method("ssf").modality == "vision" and mp.get_method("ssf").mergeable


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_resnet_convs_without_bias_get_ssf_after_their_batchnorms(library: str) -> None:
    """A ResNet's convolutions have no bias: SSF follows each BatchNorm (folded exactly into its affine), never
    only the classifier; naming a bias-free conv says to target its BatchNorm."""
    import torchvision

    def build() -> nn.Module:
        torch.manual_seed(0)
        if library == "timm":
            return timm.create_model("resnet18", num_classes=10).eval()
        return torchvision.models.resnet18(num_classes=10).eval()

    model = mp.adapt(build(), SSFConfig(init_weights=False), modules_to_save=["fc"])
    norms = [n for n, m in build().named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(scale_shifts(model)) == norms
    channels = sum(m.num_features for m in build().modules() if isinstance(m, nn.BatchNorm2d))
    assert model.trainable_summary()["trainable"] == 2 * channels + (512 * 10 + 10)
    x = torch.randn(2, 3, 32, 32)
    adapted = model(x)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, ScaleShift) for m in merged.modules())
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="takes SSF after that BatchNorm"):
        mp.adapt(build(), SSFConfig(target_modules=["conv1"]))


def test_recompute_modules_keeps_the_gradients_and_fewer_activations_on_a_vit(tmp_path) -> None:
    from benchmarks.harness import saved_activation_bytes

    recompute = ["attn.proj", "mlp.fc2"]
    plain = mp.adapt(MODELS["vit"](), SSFConfig(init_weights=False, from_residual=False), modules_to_save=["head"])
    lean = mp.adapt(
        MODELS["vit"](), SSFConfig(init_weights=False, recompute_modules=recompute), modules_to_save=["head"]
    )
    lean.load_state_dict(plain.state_dict())
    chosen = {n for n, m in scale_shifts(lean).items() if isinstance(m, mp.core.layers.RecomputingScaleShift)}
    assert chosen == {f"blocks.{i}.{n}" for i in range(2) for n in recompute}
    plain.train(), lean.train()
    x, target = images(), torch.tensor([1, 3])

    ce = nn.functional.cross_entropy
    kept_plain, kept_lean = (saved_activation_bytes(m, x, target, ce) for m in (plain, lean))
    per_output = 2 * 17 * 32 * 4  # one (batch, tokens, width) float tensor: the output of a proj or an fc2
    assert kept_plain - kept_lean == 4 * per_output

    ce(plain(x), target).backward()
    ce(lean(x), target).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7)
    lean.eval()
    expected = plain.eval()(x)
    torch.testing.assert_close(lean(x), expected, rtol=0, atol=0)
    lean.save_adapter(tmp_path / "ssf")
    loaded = mp.load_adapter(MODELS["vit"](), tmp_path / "ssf")
    assert loaded.peft_config["default"].recompute_modules == recompute
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert_close_relative(lean.merge_and_unload()(x), expected)


@pytest.mark.parametrize(
    ("recompute", "match"),
    [(["norm1"], r"\['blocks.0.norm1', 'blocks.1.norm1'\], which are not nn.Linear"), (["fc3"], "matches none")],
)
def test_recompute_modules_names_only_adapted_linears(recompute: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mp.adapt(MODELS["vit"](), SSFConfig(recompute_modules=recompute))


def _vit_pair(**config) -> tuple[nn.Module, nn.Module]:
    """The same SSF on the small ViT, keeping the branch ends' outputs (``from_residual=False``) and not."""
    kept = mp.adapt(MODELS["vit"](), SSFConfig(init_weights=False, from_residual=False), modules_to_save=["head"])
    lean = mp.adapt(MODELS["vit"](), SSFConfig(init_weights=False, **config), modules_to_save=["head"])
    lean.load_state_dict(kept.state_dict())
    return kept.train(), lean.train()


def test_the_residual_branch_ends_read_their_output_back_from_the_residual_stream(tmp_path) -> None:
    """By default the scale-shifts after ``attn.proj`` and ``mlp.fc2`` keep nothing: ``γ``'s gradient reads
    ``out = (after - before - β) / γ`` from the residual stream the norms keep. Same outputs bit for bit, the
    gradients within 1e-5 relative of the output-keeping path, as few activations as ``recompute_modules`` and no
    extra product; nothing of the stream is held after backward; save, load and merge unchanged."""
    from benchmarks.harness import saved_activation_bytes
    from modalpeft.core.layers import ResidualScaleShift

    kept, lean = _vit_pair()
    ends = {n for n, m in scale_shifts(lean).items() if isinstance(m, ResidualScaleShift)}
    assert ends == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc2")}
    x, target = images(), torch.tensor([1, 3])
    ce = nn.functional.cross_entropy
    kept_bytes, lean_bytes = (saved_activation_bytes(m, x, target, ce) for m in (kept, lean))
    _, recomputing = _vit_pair(from_residual=False, recompute_modules=["attn.proj", "mlp.fc2"])
    assert lean_bytes == saved_activation_bytes(recomputing, x, target, ce)
    assert kept_bytes - lean_bytes == 4 * 2 * 17 * 32 * 4  # the four (batch, tokens, width) outputs

    out_kept, out_lean = kept(x), lean(x)
    assert torch.equal(out_lean, out_kept)
    nodes = {type(m.tap.current).__name__ for m in scale_shifts(lean).values() if isinstance(m, ResidualScaleShift)}
    assert nodes == {"NoneType"}  # the block let go of its steps; only the graph holds them
    ce(out_kept, target).backward()
    ce(out_lean, target).backward()
    grads = dict(kept.named_parameters())
    for name, p in lean.named_parameters():
        if p.requires_grad:
            assert_close_relative(p.grad, grads[name].grad)
    lean.eval()
    with torch.no_grad():
        expected = kept.eval()(x)
        torch.testing.assert_close(lean(x), expected, rtol=0, atol=0)
    lean.save_adapter(tmp_path / "ssf")
    loaded = mp.load_adapter(MODELS["vit"](), tmp_path / "ssf")
    assert loaded.peft_config["default"].from_residual is True
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    copied = copy.deepcopy(lean).train()  # the block hooks follow the copy's own adapters
    ce(copied(x), target).backward()
    for name, p in copied.named_parameters():
        if p.requires_grad:
            assert_close_relative(p.grad, grads[name].grad)
    assert_close_relative(lean.merge_and_unload()(x), expected)


def test_the_residual_path_is_only_taken_where_the_sum_is_plain() -> None:
    """A block with a layer scale keeps the outputs (the residual sum is not ``before + y``); with timm's drop path
    the per-sample factor is read from the graph (the same gradients); a block whose forward changes after
    adaptation is a clear error, not a wrong gradient."""
    from modalpeft.core.layers import ResidualScaleShift

    def vit(from_residual: bool = True, **kwargs) -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2, num_classes=5, **kwargs)  # fmt: skip
        config = SSFConfig(init_weights=False, from_residual=from_residual)
        return mp.adapt(model, config, modules_to_save=["head"])

    def residual(model: nn.Module) -> set[str]:
        return {n.split(".")[1] for n, m in scale_shifts(model).items() if isinstance(m, ResidualScaleShift)}

    assert residual(vit(init_values=1e-5)) == set()  # a layer scale in every block
    kept, lean = (vit(drop_path_rate=0.5, from_residual=not keep).train() for keep in (True, False))
    lean.load_state_dict(kept.state_dict())
    assert residual(lean) == {"0", "1"}  # timm's drop path: y times a per-sample 0 or 1 / keep
    assert isinstance(lean.base_model.blocks[1].drop_path1, timm.layers.DropPath)
    for model in (kept, lean):
        torch.manual_seed(3)  # the same samples dropped
        nn.functional.cross_entropy(model(images()), torch.tensor([1, 3])).backward()
    grads = dict(kept.named_parameters())
    for name, p in lean.named_parameters():
        if p.requires_grad:
            assert_close_relative(p.grad, grads[name].grad)
    model = vit().train()
    model.base_model.blocks[0].ls1 = timm.layers.LayerScale(32, init_values=0.5)
    with pytest.raises(RuntimeError, match="is not the residual sum `before \\+ y`"):
        model(images())
    with torch.no_grad():  # nothing is kept without gradients: no check, no error
        model(images())
