"""LoFiT: localized fine-tuning of attention-head representations (Yin, Ye & Durrett, NeurIPS 2024).

Paper: https://arxiv.org/abs/2406.01563; official code: fc2869/lo-fit (``models/modeling_llama.py``,
``lofit_trainer.py``, ``utils/trainers.py``).

Per layer ``l`` and head ``h``, a scale ``A_{l,h}`` and an offset ``v_{l,h}`` (both ``∈ R^{d_h}``) act on the head's
slice of the concatenated attention output ``z`` (the input of the attention output projection):

    z_h ← (1 + A_{l,h}) ⊙ z_h + v_{l,h},   then  o_proj(z),

the same at every token. Two stages, each a ``LoFiTConfig``:

1. ``stage="scale"``: ``A`` of every head trains (``v`` absent), with ``l1_weight · Σ|A|`` added to the loss
   (official λ = 5e-4 for 7B models); :func:`select_heads` then keeps the ``K`` heads of largest ``‖A_{l,h}‖₂``
   (default 10% of all heads).
2. ``stage="bias"`` on a fresh model: ``v`` of the selected heads only (``heads``), ``A`` absent (scale 1).

The trained component starts ``N(0, init_std²)``, ``init_std = 1e-3`` (official; ``init_weights="identity"``:
zeros). Merge into the output projection is exact: ``W ← W diag(1 + A)``, ``b ← b + W v`` (a projection without a
bias, LLaMA's ``o_proj``, merges ``A`` only: a non-zero ``v`` there is an error). Heads are numbered by the order
of the blocks :func:`~modalpeft.text.structure.find_blocks` finds (a T5: encoder blocks, then decoder blocks).

Trainable count: stage 1 ``L·H·d_h``; stage 2 ``K·d_h``. Difference from the official code: its L1 term sums
every trainable parameter (only ``A`` trains there); here it sums ``A`` only, so a trained head is not penalised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, base_modules, hosts
from ...core.layer import AdapterModule, InitMode
from ...core.registry import register_method
from ..structure import find_blocks

Stage = Literal["scale", "bias"]


class HeadScaleBias(AdapterModule):
    """``z_h ← (1 + A_h) ⊙ z_h + v_h`` on chosen heads of the host Linear's input (LoFiT).

    Args:
        num_heads: ``H``; the host's ``in_features`` is ``H · d_h``.
        head_dim: ``d_h``.
        scale_heads: heads with a trained scale ``A`` (empty: none).
        bias_heads: heads with a trained offset ``v`` (empty: none).
        init_std: std of the normal init of ``A`` and ``v`` with ``init_weights=True``.

    Shapes:
        - input ``(*, H·d_h)``, output the same; ``A``: ``(|scale_heads|, d_h)``, ``v``: ``(|bias_heads|, d_h)``
          (``None`` when empty)
    """

    mergeable = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale_heads: list[int],
        bias_heads: list[int],
        *,
        init_std: float = 1e-3,
        init_weights: InitMode = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.init_std = num_heads, head_dim, init_std
        self.register_buffer("scale_index", torch.tensor(scale_heads, dtype=torch.long), persistent=False)
        self.register_buffer("bias_index", torch.tensor(bias_heads, dtype=torch.long), persistent=False)
        # only what trains exists: A in the scale stage, v in the bias stage
        self.A = nn.Parameter(torch.zeros(len(scale_heads), head_dim)) if scale_heads else None
        self.v = nn.Parameter(torch.zeros(len(bias_heads), head_dim)) if bias_heads else None
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for p in (q for q in (self.A, self.v) if q is not None):
            if init_weights == "identity":
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=self.init_std if init_weights is True else 0.1)

    def scale_and_offset(self) -> tuple[Tensor, Tensor]:
        """``1 + A`` and ``v`` over all heads, ``(H, d_h)`` each (1 and 0 on untouched heads)."""
        ref = self.A if self.A is not None else self.v
        scale = torch.ones(self.num_heads, self.head_dim, dtype=ref.dtype, device=ref.device)
        offset = torch.zeros_like(scale)
        if self.A is not None:
            scale = scale.index_add(0, self.scale_index, self.A)
        if self.v is not None:
            offset = offset.index_add(0, self.bias_index, self.v)
        return scale, offset

    def pre(self, x: Tensor) -> Tensor:
        scale, offset = self.scale_and_offset()
        heads = x.unflatten(-1, (self.num_heads, self.head_dim))  # (*, H·d_h) -> (*, H, d_h)
        return (heads * scale + offset).flatten(-2)

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        scale, offset = (t.flatten().to(base.weight.dtype) for t in self.scale_and_offset())
        if offset.any():
            if base.bias is None:
                raise ValueError(
                    "lofit cannot be merged: the offsets v need a bias in the output projection, which has none "
                    "(LLaMA's o_proj); keep the adapter unmerged."
                )
            base.bias.add_(base.weight @ offset)
        base.weight.mul_(scale)  # W diag(1 + A): scale the input columns

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        scale, offset = (t.flatten().to(base.weight.dtype) for t in self.scale_and_offset())
        base.weight.div_(scale)
        if offset.any():
            base.bias.sub_(base.weight @ offset)


@dataclass
class LoFiTConfig(AdapterConfig):
    """LoFiT, one stage (registered as ``"lofit"``); see the module docstring."""

    stage: Stage = field(
        default="scale", metadata=_help("'scale': train A of every head (head selection); 'bias': v of `heads`.")
    )
    heads: list[list[int]] | None = field(
        default=None, metadata=_help("[layer, head] pairs whose v trains (bias stage); from select_heads().")
    )
    num_heads: int | None = field(default=None, metadata=_help("Heads per layer; None: the model config's."))
    l1_weight: float = field(default=5e-4, metadata=_help("lambda of the L1 term on A (scale stage; official 5e-4)."))
    init_std: float = field(default=1e-3, metadata=_help("Std of the normal init of the trained vectors."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in ("scale", "bias"):
            raise ValueError(f"stage={self.stage!r} is not valid; choose 'scale' (head selection) or 'bias'.")
        if self.stage == "bias" and not self.heads:
            raise ValueError(
                "stage='bias' needs heads: the [layer, head] pairs select_heads() returned after the scale stage."
            )
        if self.heads is not None:
            self.heads = [list(h) for h in self.heads]
            if any(len(h) != 2 for h in self.heads):
                raise ValueError(f"heads={self.heads!r} must be [layer, head] pairs.")
        if self.l1_weight < 0:
            raise ValueError(f"l1_weight={self.l1_weight!r} must be >= 0.")

    def training_penalty(self, model: nn.Module) -> Tensor:
        """``l1_weight · Σ|A|`` (the official L1 term) in the scale stage; 0 in the bias stage."""
        scales = [a.A for a in lofit_modules(model) if a.A is not None]
        if self.stage != "scale" or not scales:
            return torch.zeros(())
        return self.l1_weight * sum(a.abs().sum() for a in scales)


def _num_heads(model: nn.Module, config: LoFiTConfig) -> int:
    if config.num_heads is not None:
        return config.num_heads
    for module in model.modules():
        cfg = getattr(module, "config", None)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None)
        if isinstance(heads, int):
            return heads
    raise ValueError("lofit: the model has no config with num_attention_heads / num_heads; pass num_heads.")


@register_method("lofit", LoFiTConfig, modality="text", mergeable=True, paper="https://arxiv.org/abs/2406.01563")
def apply_lofit(
    model: nn.Module, config: LoFiTConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    blocks = find_blocks(model, "lofit")
    heads = _num_heads(model, config)
    modules = dict(base_modules(model))
    chosen: dict[int, list[int]] = {}
    for layer, head in config.heads or []:
        if not (0 <= layer < len(blocks) and 0 <= head < heads):
            raise ValueError(
                f"lofit: head [{layer}, {head}] is outside the model's {len(blocks)} layers x {heads} heads."
            )
        chosen.setdefault(layer, []).append(head)
    for layer, block in enumerate(blocks):
        width = modules[block.attention_output].in_features
        if width % heads:
            raise ValueError(f"lofit: {block.attention_output} takes {width} features, not divisible by {heads} heads.")
        if config.stage == "scale":
            scale_heads, bias_heads = list(range(heads)), []
        elif layer in chosen:
            scale_heads, bias_heads = [], sorted(chosen[layer])
        else:
            continue
        layer_module = HeadScaleBias(
            heads, width // heads, scale_heads, bias_heads, init_std=config.init_std, init_weights=config.init_weights
        )
        attach(model, block.attention_output, adapter_name, layer_module)


def lofit_modules(model: nn.Module, adapter_name: str | None = None) -> list[HeadScaleBias]:
    name = adapter_name or getattr(model, "active_adapter", None)
    return [
        h.adapters[name] for _, h in hosts(model) if name in h.adapters and isinstance(h.adapters[name], HeadScaleBias)
    ]


def select_heads(model: nn.Module, k: int | None = None, adapter_name: str | None = None) -> list[list[int]]:
    """The ``k`` heads with the largest ``‖A_{l,h}‖₂`` after the scale stage, as ``[layer, head]`` pairs, best
    first (official ``lofit_trainer.py``; ``k=None``: 10% of all heads)."""
    modules = lofit_modules(model, adapter_name)
    if not modules or any(m.A is None or m.A.shape[0] != m.num_heads for m in modules):
        raise ValueError("select_heads needs a model adapted with LoFiTConfig(stage='scale').")
    norms = torch.stack([m.A.detach().float().norm(dim=-1) for m in modules])  # (L, H)
    k = int(0.1 * norms.numel()) if k is None else k
    top = torch.argsort(norms.flatten(), descending=True)[:k]
    return [[int(i) // norms.shape[1], int(i) % norms.shape[1]] for i in top]
