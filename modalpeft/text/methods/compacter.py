"""Compacter, Compacter++ and the PHM-Adapter (Karimi Mahabadi, Henderson, Ruder, NeurIPS 2021).

Paper: https://arxiv.org/abs/2106.04647; official code: rabeehk/compacter (``seq2seq/hypercomplex``,
``seq2seq/adapters``, ``seq2seq/configs/compacter*.json``).

A bottleneck adapter ``a(h) = up(act(down(h)))`` whose projections are PHM layers,
``y = x Σ_i A_i ⊗ W_i + b`` (:class:`~modalpeft.core.layers.phm.PHMLinear`):

- ``variant="compacter"``: series after the self-attention and the feed-forward sublayer of every block
  (cross-attention not adapted), ``W_i = L_i R_i`` of rank ``phm_rank = 1``, and one rule tensor
  ``A ∈ R^{n x n x n}`` shared by every PHM layer of the model (trained and saved once);
- ``"compacter++"``: the same after the feed-forward sublayer only;
- ``"phm"``: the PHM-Adapter, attention + ffn, full blocks ``W_i`` and a rule per PHM layer.

Settings of the official configs: ``n = 4`` (``hypercomplex_division``), bottleneck ``d/32``
(``task_reduction_factor``), ``gelu_new`` (``act="gelu_tanh"``), blocks glorot-uniform with gain √2, the rule
``N(0, 1e-4²)`` (``phm_init_range``), biases 0, and every LayerNorm trained (``unfreeze_layer_norms``). So the
adapter is not exactly the identity at step 0 (``init_weights="identity"`` zeroes the up projection's blocks).

Trainable count, t5-base (d = 768, r = 24, n = 4): per adapter ``(d + r + r) + (r + d + d) = 2,376``; 48
adapters + the 64-entry rule = 114,112, plus 62 LayerNorms x 768 = 161,728 (Compacter); Compacter++ 57,088 +
47,616 = 104,704.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torch import Tensor, nn

from ...core.config import _help
from ...core.layers.bottleneck import Activation
from ...core.registry import register_method
from .bottleneck import Position, TextBottleneckConfig, apply_bottleneck

Variant = Literal["compacter", "compacter++", "phm"]
_POSITIONS: dict[str, tuple[Position, ...]] = {
    "compacter": ("attention", "ffn"),
    "compacter++": ("ffn",),
    "phm": ("attention", "ffn"),
}


@dataclass
class CompacterConfig(TextBottleneckConfig):
    """Compacter / Compacter++ / PHM-Adapter (registered as ``"compacter"``)."""

    variant: Variant = field(
        default="compacter",
        metadata=_help(
            "'compacter': rank-1 PHM adapters after attention and FFN, one shared rule; 'compacter++': after the "
            "FFN only; 'phm': full PHM blocks, a rule per layer, after attention and FFN."
        ),
    )
    bottleneck_dim: int | None = field(
        default=None, metadata=_help("Hidden width r; None: d // reduction_factor (t5-base: 24).")
    )
    reduction_factor: int = field(default=32, metadata=_help("r = d // reduction_factor when bottleneck_dim is None."))
    phm_n: int = field(default=4, metadata=_help("n, the number of Kronecker summands; must divide d and r."))
    phm_rank: int = field(default=1, metadata=_help("Rank of each block W_i (compacter variants)."))
    act: Activation = field(default="gelu_tanh", metadata=_help("Non-linearity (Compacter: gelu_new)."))
    train_layer_norms: bool = field(default=True, metadata=_help("Also train every LayerNorm (Compacter does)."))

    positions: ClassVar[tuple[Position, ...]] = ()

    def __post_init__(self) -> None:
        if self.variant not in _POSITIONS:
            raise ValueError(f"variant={self.variant!r} is not valid; choose one of {list(_POSITIONS)}.")
        for name, value in (("phm_n", self.phm_n), ("phm_rank", self.phm_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1 (Compacter: phm_n=4, phm_rank=1).")
        super().__post_init__()
        self.positions = _POSITIONS[self.variant]

    def _check_bottleneck(self) -> None:
        if self.bottleneck_dim is not None:
            super()._check_bottleneck()
            return
        value = self.reduction_factor
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"reduction_factor={value!r} must be an integer >= 1 (e.g. 32), or give bottleneck_dim.")

    def adapter_width(self, dim: int) -> int:
        return self.bottleneck_dim if self.bottleneck_dim is not None else dim // self.reduction_factor

    def check_width(self, dim: int, owner: str) -> None:
        r = self.adapter_width(dim)
        if r < 1 or dim % self.phm_n or r % self.phm_n:
            raise ValueError(
                f"{owner}: phm_n={self.phm_n} must divide the width d={dim} and the bottleneck r={r} "
                f"(bottleneck_dim={self.bottleneck_dim}, reduction_factor={self.reduction_factor}); choose phm_n among "
                f"their common divisors, or a bottleneck_dim that phm_n divides."
            )

    def projection_kwargs(self, shared_rule: Tensor | None) -> dict:
        if self.variant == "phm":
            return {"phm_n": self.phm_n, "phm_rank": None}
        return {"phm_n": self.phm_n, "phm_rank": self.phm_rank, "phm_rule": shared_rule}


@register_method(
    "compacter", CompacterConfig, modality="text", mergeable=False, paper="https://arxiv.org/abs/2106.04647"
)
def apply_compacter(
    model: nn.Module, config: CompacterConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    apply_bottleneck(model, config, adapter_name, "compacter")
