"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022, https://arxiv.org/abs/2210.08823).

A per-channel ``y = γ ⊙ x + β`` (:class:`~modalpeft.core.layers.ScaleShift`) follows the layers of a frozen
model; only ``γ``, ``β`` and the ``modules_to_save`` (the head) train. ``init_weights=True`` is the official
``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)`` (not the identity); ``"identity"`` starts at ``γ = 1``, ``β = 0``.
Each ``γ, β`` is folded exactly into the layer before it by ``merge_and_unload()`` (rows of a Linear/Conv weight
and its bias, or a norm's affine), which gives back a model with the base's own module types and parameter
count. Trainable count: ``2 · Σ d_out`` over the adapted layers.

Placement (``target_modules=None``): after every layer that ends in a per-channel affine SSF can fold into:
``nn.Linear`` and ``nn.Conv1d/2d/3d`` with a bias, ``nn.LayerNorm`` (one normalised axis), ``nn.GroupNorm`` and
``nn.BatchNorm1d/2d/3d`` with an affine and a bias, including timm's plain variants (``timm.layers.LayerNorm``,
``LayerNorm2d``, ``GroupNorm``, ``Conv2dSame``, ...). On a CNN whose convolutions have no bias (ResNets), the
scale-shift therefore follows each convolution's BatchNorm, the affine the convolution feeds: ``γ ⊙ BN(conv(x)) +
β`` folds exactly into the BatchNorm's weight and bias (the paper places SSF after the operations of ViTs and
MLP-Mixers; this is the same rule on a CNN). Left out:

- the ``modules_to_save`` and the model's classifier (``model.get_classifier()``, timm's interface): the
  official code puts no SSF on the head, which trains whole;
- layers without a bias to absorb ``β`` (Swin's patch-merging ``reduction``), or without an affine;
- subclasses that compute something else around the affine (timm's weight-standardised ``StdConv2d``, norms
  fused with an activation such as ``LayerNormAct``), where folding would not be exact;
- Linears inside ``nn.MultiheadAttention`` (it reads their weights and never calls them).

On a timm ViT this is the official placement exactly: ``patch_embed.proj`` (on the conv output, which timm
flattens afterwards), and in every block ``norm1``, ``attn.qkv`` (3C), ``attn.proj``, ``norm2``, ``mlp.fc1``
(4C, before the GELU), ``mlp.fc2``, then the final ``norm``: ``12 · 2 · 11C + 4C = 205,824`` parameters on
ViT-B/16 without its head (variants with more norms, such as ``norm_pre``, ``fc_norm`` or qk-norm, get an SSF
after each of them too). Swin, ConvNeXt, MLP-Mixer and other models get the same rule; the official code has
its own per-architecture placements, not checked layer by layer here, but it gives Swin's patch merging its 4C
SSF after the merging norm, as this rule does (the bias-free ``reduction`` after it is skipped). Explicit
``target_modules`` must name such foldable layers; anything else is an error that says why.

Training cost: after a norm the scale-shift folds into the norm's affine during training, and after a Linear or
convolution it keeps its output instead of its input (:class:`~modalpeft.core.layers.ScaleShift`'s docstring), so
SSF keeps about as many activations as the frozen model's backward needs anyway (ViT-B/16, batch 8: 2.10x the floor
before, see ``docs/results/vision.md`` for the figure now). The outputs of the Linears that end a residual branch
(``attn.proj``, ``mlp.fc2``) are kept by nothing else; in timm ViT blocks whose residual steps are plain sums
(drop path allowed, no layer scale) their scale-shifts read them back from the residual stream in backward,
``out = (after - before - β) / γ`` with both ends kept by the norms (``from_residual=True``, the default;
:class:`~modalpeft.core.layers.ResidualScaleShift`): no activation and three elementwise operations. Elsewhere they
keep them, or, with ``recompute_modules=["attn.proj", "mlp.fc2"]``, recompute them from the Linear's input at one
more product each per step (:class:`~modalpeft.core.layers.RecomputingScaleShift`; the candidate ``ssf_recompute``
in ``benchmarks/results``). Gradients within 1e-5 relative of the output-keeping path (ViT-B/16, random weights,
batch 2: 3.4e-7 at most).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from timm.layers import (
    Conv2dSame,
    DropPath,
    GroupNorm,
    GroupNorm1,
    LayerNorm,
    LayerNorm2d,
    LayerNorm2dFp32,
    LayerNormFp32,
)
from timm.layers import Linear as TimmLinear
from timm.layers.conv2d_same import Conv2dSameExport
from timm.layers.norm import LayerNormExp2d
from timm.models.vision_transformer import Attention, Block, Mlp
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets, name_matches
from ...core.layers import ScaleShift, scale_shift_for
from ...core.layers.scale_shift import FOLDABLE_TYPES, PreNormResidualTaps, ResidualScaleShift
from ...core.registry import register_method

_TYPES = FOLDABLE_TYPES
_CHANNELS_FIRST_NORMS = (LayerNorm2d, LayerNorm2dFp32, LayerNormExp2d)
# Subclasses that override ``forward`` yet still end in their plain per-channel affine.
_PLAIN_SUBCLASSES = (TimmLinear, Conv2dSame, Conv2dSameExport, LayerNorm, LayerNormFp32, GroupNorm, GroupNorm1)


@dataclass
class SSFConfig(AdapterConfig):
    """SSF. ``target_modules=None`` follows every foldable Linear, Conv, LayerNorm, GroupNorm and BatchNorm but the
    head.

    ``init_weights``: ``True`` the official ``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)``; ``"identity"``
    ``γ = 1``, ``β = 0``; ``False`` random ``N(1, 0.1²)``, ``N(0, 0.1²)`` (for tests).
    """

    recompute_modules: list[str] | str | None = field(
        default=None,
        metadata=_help(
            "Adapted Linears whose output the scale-shift recomputes in backward instead of keeping (names or "
            "suffixes as target_modules, or a regex): the last Linears of residual branches, whose outputs nothing "
            "else keeps (ViT: ['attn.proj', 'mlp.fc2']); fewer activations for one more product of each per step. "
            "Training cost only: the adapter, its file and its merge are the same."
        ),
    )
    from_residual: bool = field(
        default=True,
        metadata=_help(
            "In timm ViT blocks (x = x + drop_path(attn(norm1(x))); x = x + drop_path(mlp(norm2(x))), no layer scale), "
            "the "
            "scale-shifts after attn.proj and mlp.fc2 keep nothing for backward and read their output back from the "
            "residual stream the norms keep (ResidualScaleShift); False keeps those outputs. Training cost only."
        ),
    )


def _plain(module: nn.Module) -> bool:
    """Whether ``module`` computes its torch base class's forward (or a known variant of it)."""
    if isinstance(module, _PLAIN_SUBCLASSES + _CHANNELS_FIRST_NORMS):
        return True
    base = next(t for t in _TYPES if isinstance(module, t))
    return type(module).forward is base.forward


def placement(module: nn.Module) -> tuple[int, int] | str:
    """``(dim, channel_dim)`` of the :class:`ScaleShift` that follows ``module``, or why SSF cannot go there.

    ``channel_dim`` is ``-1`` for Linear and LayerNorm outputs ``(*, C)``, ``1`` for Conv, GroupNorm, BatchNorm
    and channel-first LayerNorm (timm's ``LayerNorm2d``) outputs ``(B, C, *)``.
    """
    if not isinstance(module, _TYPES):
        return (
            f"{type(module).__name__} is not an nn.Linear, nn.Conv1d/2d/3d, nn.LayerNorm, nn.GroupNorm or "
            "nn.BatchNorm1d/2d/3d"
        )
    if not _plain(module):
        return (
            f"{type(module).__name__} overrides its base class's forward (weight standardisation, a fused "
            "activation, ...), so a scale-shift after it could not be folded into its weights exactly"
        )
    if not ScaleShift.can_fold(module):
        conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.bias is None
        return (
            "it has no per-channel affine with a bias to fold the scale and shift into (bias=False, no affine, or a "
            "LayerNorm over several axes)"
            + (
                "; a bias-free convolution followed by a BatchNorm takes SSF after that BatchNorm: target it"
                if conv
                else ""
            )
        )
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0], 1 if isinstance(module, _CHANNELS_FIRST_NORMS) else -1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, 1
    return module.out_channels, 1


def _residual_blocks(model: nn.Module) -> dict[str, tuple[str | None, str | None]]:
    """``{block name: (its attn.proj name, its mlp.fc2 name)}`` for every timm ViT ``Block`` whose residual steps are
    plain sums of the branch's last Linear output, with or without timm's drop path (timm's own forwards, no layer
    scale, dropouts of rate 0 or none after the Linear); ``None`` for a branch that is not. A
    :class:`ResidualScaleShift` after those Linears reads their output back from the residual stream
    (``SSFConfig.from_residual``)."""

    def plain(module: nn.Module) -> bool:
        return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and module.p == 0)

    def dropped(module: nn.Module) -> bool:  # timm's drop path: y times a per-sample 0 or 1 / keep
        return plain(module) or type(module).forward is DropPath.forward

    blocks = {}
    for name, block in model.named_modules():
        if type(block).forward is not Block.forward:
            continue
        attn, mlp = block.attn, block.mlp
        if not (plain(block.ls1) and plain(block.ls2) and dropped(block.drop_path1) and dropped(block.drop_path2)):
            continue
        prefix = f"{name}." if name else ""
        proj = f"{prefix}attn.proj" if type(attn).forward is Attention.forward and plain(attn.proj_drop) else None
        fc2 = f"{prefix}mlp.fc2" if type(mlp).forward is Mlp.forward and plain(mlp.drop2) else None
        blocks[name] = (proj, fc2)
    return blocks


def _classifier(model: nn.Module) -> nn.Module | None:
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return getattr(head, "base_layer", head) if isinstance(head, nn.Module) else None


@register_method("ssf", SSFConfig, modality="vision", mergeable=True, paper="https://arxiv.org/abs/2210.08823")
def apply_ssf(
    model: nn.Module, config: SSFConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    head = _classifier(model)

    def default(name: str, module: nn.Module) -> bool:
        return module is not head and not isinstance(placement(module), str)

    plans = []
    for name, module in find_targets(model, config, default=default, types=_TYPES):
        where = placement(module)
        if isinstance(where, str):
            raise ValueError(
                f"ssf: cannot place a scale-shift after {name!r} ({type(module).__name__}): {where}. Leave it out "
                "of target_modules (or add it to exclude_modules); target_modules=None picks only foldable layers."
            )
        plans.append((name, module, *where))
    recompute = {name for name, module, *_ in plans if name_matches(config.recompute_modules, name, module)}
    wrong = sorted(name for name, module, *_ in plans if name in recompute and not isinstance(module, nn.Linear))
    if wrong:
        raise ValueError(
            f"ssf: recompute_modules={config.recompute_modules!r} names {wrong}, which are not nn.Linear layers; only "
            "a Linear's output is recomputed in backward: name Linears only (ViT: ['attn.proj', 'mlp.fc2'])"
        )
    if config.recompute_modules is not None and not recompute:
        raise ValueError(
            f"ssf: recompute_modules={config.recompute_modules!r} matches none of the adapted layers; name adapted "
            "Linears (ViT: ['attn.proj', 'mlp.fc2']) or leave it None"
        )
    blocks = _residual_blocks(model) if config.from_residual else {}
    ends = {linear for pair in blocks.values() for linear in pair if linear is not None}
    placed: dict[str, ScaleShift] = {}
    for name, module, dim, channel_dim in plans:
        if name in ends and name not in recompute and channel_dim == -1:
            adapter: ScaleShift = ResidualScaleShift(dim, channel_dim=channel_dim, init_weights=config.init_weights)
        else:
            adapter = scale_shift_for(
                module, dim, channel_dim=channel_dim, init_weights=config.init_weights, recompute=name in recompute
            )
        attach(model, name, adapter_name, adapter)
        placed[name] = adapter
    for block_name, (proj, fc2) in blocks.items():
        first, second = placed.get(proj), placed.get(fc2)
        first = first if isinstance(first, ResidualScaleShift) else None
        second = second if isinstance(second, ResidualScaleShift) else None
        if first is not None or second is not None:
            block = model.get_submodule(block_name)
            PreNormResidualTaps.bind(block, block.norm2, first, second)
