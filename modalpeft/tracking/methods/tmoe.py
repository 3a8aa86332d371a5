"""TMoE: the mixture of low-rank experts of SPMTrack (Cai et al., CVPR 2025, https://arxiv.org/abs/2503.18338).

Each targeted frozen ``nn.Linear`` ``W`` gets a parallel branch of routed experts (METHODS.md §7a)::

    y = W x + b + s · Σ_i g_i(x) · B_i A drop(x),    g(x) = softmax(W_g x),    s = alpha / rank

with one down-projection ``A ∈ R^{r×d_in}`` shared by the experts, one up-projection ``B_i ∈ R^{d_out×r}`` per
expert and a token-wise router ``W_g ∈ R^{E×d_in}`` (no bias, PyTorch's default init): dense soft routing, no
top-k, no balance loss. ``shared_expert=True`` adds SPMTrack's ungated ``s · B_s A drop(x)`` (off in its config).
The layer is :class:`~modalpeft.core.layers.LowRankExperts`.

Placement (METHODS.md §7b): ``target_modules=None`` adapts every ``nn.Linear`` inside a block (a module reached
through an integer index: ``blocks.3.mlp.fc1``, ``encoder.layer.3.attention.self.query``), i.e. ``attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` of every timm ViT block; ``modules_to_save`` (a tracker's head) are never
adapted. A fused Linear named ``qkv`` is split into q, k, v, each with its own experts (the official
``LinearWithTMoE_TimmQKV``); the base ``qkv`` weight is kept as it is and the three branches are concatenated, which
computes the same as the official three separate Linears. ``split_qkv=False`` puts one TMoE on the fused layer.

Init ``True`` is the official ``'bert'`` init: ``trunc_normal(std 0.02)`` on ``A`` and every ``B_i`` (so the model
changes at the start, unlike LoRA); ``"identity"`` zeroes every ``B``.

Parameters per targeted Linear: ``r·d_in + E·r·d_out + E·d_in`` (+ ``r·d_out`` with the shared expert); a split
``qkv`` (``d_out = 3C``) counts three Linears ``C -> C``. ViT-B/14 at r = 64, E = 4: 2,239,488 per block,
26,873,856 over 12 blocks (METHODS.md §7f).

Not mergeable: the gates depend on the input, so there is no fixed weight update (the official merge code is stale,
METHODS.md §7e); ``merge_and_unload`` says so and points to LoRA. With ``shared_expert`` only ``s·B_s·A`` would be a
fixed update; modalpeft does not merge part of an adapter.

Against the official ``TMoELayer`` forward (``tests/tracking/test_tmoe.py``, fixed weights and inputs, float64):
the same router, softmax over experts, scaling ``alpha/rank``, one dropout mask on the input of ``A`` shared by the
experts, and the undropped input to the router. The outputs agree to float rounding (the experts are summed in one
matmul instead of a Python loop: max |difference| 4e-16 in float64; 1.0e-7 in float32 at ViT-B width, r = 64,
E = 4, on outputs up to 0.26).
Differences: the official layer indexes the gates as ``(B, N, E)`` and fails on inputs that are not 3-D; this one
takes any ``(*, d_in)``. ``use_rsexpert`` (``alpha/√r``) and ``route_compression`` (one ``A`` per expert) are not
offered (both off in the official config; ``alpha`` covers the first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets
from ...core.layer import AdapterModule, InitMode
from ...core.layers import LowRankExperts
from ...core.registry import register_method

_INDEX = re.compile(r"(^|.*\.)\d+\..+")


def in_block(name: str, module: nn.Module) -> bool:
    """Whether ``name`` lies inside a block: below a module reached through an integer index (``blocks.0.attn``)."""
    return _INDEX.fullmatch(name) is not None


class SplitQKVExperts(AdapterModule):
    """Three :class:`LowRankExperts` on the q, k and v thirds of a fused ``qkv`` Linear, concatenated.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, 3·d)`` with ``d = d_out / 3``; each of ``q``, ``k``, ``v`` maps ``d_in -> d``
    """

    def __init__(self, in_features: int, out_features: int, **kwargs) -> None:
        super().__init__()
        third = out_features // 3
        self.q = LowRankExperts(in_features, third, **kwargs)
        self.k = LowRankExperts(in_features, third, **kwargs)
        self.v = LowRankExperts(in_features, third, **kwargs)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for part in (self.q, self.k, self.v):
            part.reset_adapter(init_weights)

    def merge_hint(self) -> str:
        return self.q.merge_hint()

    def parallel(self, x: Tensor) -> Tensor:
        return torch.cat([self.q.parallel(x), self.k.parallel(x), self.v.parallel(x)], dim=-1)


@dataclass
class TMoEConfig(AdapterConfig):
    """TMoE (SPMTrack). ``target_modules=None`` adapts every ``nn.Linear`` inside a block, ``qkv`` split in three."""

    rank: int = field(default=64, metadata=_help("r: width of the shared down-projection A (SPMTrack: 64)."))
    num_experts: int = field(default=4, metadata=_help("E: routed experts (up-projections B_i) per Linear (4)."))
    alpha: float = field(default=64, metadata=_help("Scaling s = alpha / rank of the expert branch (64: s = 1)."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the input of A; the router sees the raw input."))
    split_qkv: bool = field(
        default=True, metadata=_help("Split a fused `qkv` Linear into q, k, v, each with its own TMoE (official).")
    )
    shared_expert: bool = field(default=False, metadata=_help("Add the ungated shared expert B_s (off officially)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rank", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (SPMTrack: rank=64, num_experts=4).")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha={self.alpha!r} must be a number (scaling = alpha / rank; SPMTrack: 64).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 for no dropout.")
        for name in ("split_qkv", "shared_expert"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False.")


@register_method("tmoe", TMoEConfig, modality="tracking", mergeable=False, paper="https://arxiv.org/abs/2503.18338")
def apply_tmoe(
    model: nn.Module, config: TMoEConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = find_targets(model, config, default=in_block, types=(nn.Linear,))
    kwargs = dict(
        rank=config.rank,
        num_experts=config.num_experts,
        alpha=config.alpha,
        dropout=config.dropout,
        init_weights=config.init_weights,
        shared_expert=config.shared_expert,
    )
    split = [config.split_qkv and name.rsplit(".", 1)[-1] == "qkv" for name, _ in targets]
    for (name, module), qkv in zip(targets, split, strict=True):  # every shape is checked before the model changes
        if qkv and module.out_features % 3:
            raise ValueError(
                f"tmoe: {name!r} has out_features={module.out_features}, which does not split into equal q, k, v; "
                "pass split_qkv=False to put one TMoE on the fused layer."
            )
    for (name, module), qkv in zip(targets, split, strict=True):
        layer_cls = SplitQKVExperts if qkv else LowRankExperts
        attach(model, name, adapter_name, layer_cls(module.in_features, module.out_features, **kwargs))
