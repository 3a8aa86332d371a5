"""Music adapters: linear, convolutional and transformer bottlenecks after the decoder blocks of a music LM.

Mehta, Chauhan and Choudhury, "Exploring Adapter Design Tradeoffs for Low Resource Music Generation", ACM MM
2025, https://arxiv.org/abs/2506.21298. The paper compares three adapter designs on MusicGen (and Mustango) for
low-resource genres (Hindustani classical, Turkish makam), against LoRA and full fine-tuning; it reports that
convolutional adapters capture local ornaments, transformer adapters long-range structure, and that mid-size
adapters (~40M parameters) trade off best.

What the released code (atharva20038/ACMMM_Adapters @ fd31113) holds is not this: its MusicGen script applies a
post-hoc ``Linear(32000→32) → GELU → Linear(32→32000)`` residual adapter to the generated *waveform* of a frozen
MusicGen (METHODS.md §9), and no conv or transformer decoder adapter is released. So this file implements the
paper's designs as the paper describes them, each a residual bottleneck ``h ← h + s · f(h)`` on the output of a
decoder block (:class:`~modalpeft.core.layers.Bottleneck` with a middle stage; ``W_d: d→m``, ``W_u: m→d``):

- ``kind="linear"``: ``f(h) = drop(W_u · GELU(W_d h + b_d) + b_u)``;
- ``kind="conv"``: ``f(h) = drop(W_u · SE(ResConv(W_d h + b_d)) + b_u)``, with ``ResConv`` a stack of dilated
  residual 1-D convolutions over time and ``SE`` squeeze-and-excitation over channels
  (:class:`~modalpeft.core.layers.DilatedConvStage`); causal in an autoregressive decoder;
- ``kind="transformer"``: ``f(h) = drop(W_u · TL(W_d h + b_d) + b_u)``, with ``TL`` a pre-LN transformer layer
  ``z ← z + MHSA(LN₁ z)``, ``z ← z + FFN_GELU(LN₂ z)`` (:class:`~modalpeft.core.layers.AttentionStage`); causal
  self-attention in a decoder.

Choices the paper leaves open, each a config field: kernel 3 with dilations 1, 2, 4, 8 (a receptive field of 31
frames, 0.62 s of MusicGen's 50 Hz codes); SE reduction 4; 4 heads and a 4x feed-forward; inner residuals
around the convolutions, the attention and the FFN; dropout 0.1 on the branch output (the released adapter's
rate; the released ``Adapter.forward`` applies it to the sum ``dropout(x + f(x))``, so in training it also zeroes
10% of the frozen residual stream: in evaluation the two are equal (``tests/audio/test_music_adapter.py`` runs a
transcription of it on our weights), in a training step on the test decoder its output moves 35% (relative norm)
from the evaluation output, ours 4.8%: we keep the usual adapter dropout on the branch);
the adapter after every decoder block. ``init_weights=True``: ``W_d`` kaiming-uniform, ``W_u`` and ``b_u`` zero
(the identity at the start), the stages' PyTorch defaults.

Placement: ``target_modules=None`` puts one adapter after every block of the model's causal decoder: the block
list (an ``nn.ModuleList`` of same-class blocks) whose blocks hold a causal self-attention (``is_causal=True``:
transformers' ``MusicgenForCausalLM`` / ``MusicgenForConditionalGeneration`` decoder layers); block names or a
regex select some. The conv and transformer stages read the block's attention mask (padded positions are ignored)
and its key/value cache: they keep their past inputs across cached decoding steps, so ``generate`` with the cache
gives the tokens of a run without it.

Trainable count per adapted block of width ``d`` (bottleneck ``m``): linear ``2·d·m + m + d``; conv adds
``B·(k·m² + m² + 2m) + 2·m·h + h + m`` (``B`` blocks, ``h = max(1, m // r)``); transformer adds
``12·m² + 13·m`` with ``ffn_mult=4`` (in general ``4m + 4m² + 4m + 2·m·f + f + m``, ``f = ffn_mult·m``).
On MusicGen-medium (48 blocks of width 1536) the ~40M mid-size configurations are: linear ``m=256``
(37,834,752), conv ``m=144`` (37,801,152), transformer ``m=160`` (38,519,808)
(``recipes/audio/musicgen_medium_*_adapter.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, base_modules, find_targets
from ...core.layers import AttentionStage, Bottleneck, DilatedConvStage
from ...core.registry import register_method

Kind = Literal["linear", "conv", "transformer"]
Placement = Literal["after_block"]


@dataclass
class MusicAdapterConfig(AdapterConfig):
    """The music adapter family (``"music_adapter"``); see the module docstring for the designs and counts."""

    kind: Kind = field(default="linear", metadata=_help("'linear', 'conv' or 'transformer' (the paper's designs)."))
    bottleneck: int = field(default=64, metadata=_help("Bottleneck width m (at most the host's width)."))
    dropout: float = field(default=0.1, metadata=_help("Dropout on the adapter branch's output."))
    scaling: float = field(default=1.0, metadata=_help("Scale s of the branch: h + s * f(h)."))
    kernel_size: int = field(default=3, metadata=_help("conv: kernel size k of each dilated convolution."))
    dilations: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8], metadata=_help("conv: one dilated residual block per dilation.")
    )
    se_reduction: int = field(default=4, metadata=_help("conv: squeeze-and-excitation reduction r (hidden m // r)."))
    num_heads: int = field(default=4, metadata=_help("transformer: attention heads (must divide the bottleneck)."))
    ffn_mult: int = field(default=4, metadata=_help("transformer: feed-forward width as a multiple of m."))
    attention_dropout: float = field(default=0.0, metadata=_help("transformer: attention-probability dropout."))
    causal: bool | None = field(
        default=None,
        metadata=_help(
            "conv/transformer: mix positions causally. None: causal exactly when the host block's self-attention "
            "is (an autoregressive decoder); False on a causal decoder is refused."
        ),
    )
    placement: Placement = field(default="after_block", metadata=_help("'after_block': on each block's output."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in get_args(Kind):
            raise ValueError(f"kind={self.kind!r} is not valid; choose one of {list(get_args(Kind))}.")
        if self.placement not in get_args(Placement):
            raise ValueError(f"placement={self.placement!r} is not valid; choose one of {list(get_args(Placement))}.")
        for name in ("bottleneck", "kernel_size", "se_reduction", "num_heads", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        self.dilations = list(self.dilations)
        if not self.dilations or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.dilations):
            raise ValueError(
                f"dilations={self.dilations!r} must be a non-empty list of integers >= 1, e.g. [1, 2, 4, 8]."
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1); use 0.0 for no dropout.")
        if self.kind == "transformer" and self.bottleneck % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide bottleneck={self.bottleneck}; pick a divisor of the "
                "bottleneck (e.g. 4 for 64), or a bottleneck that is a multiple of num_heads."
            )
        if self.kind == "conv" and self.causal is False and self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size={self.kernel_size} with causal=False: a non-causal convolution is centred and needs an "
                "odd kernel (3, 5, ...)."
            )


def _is_causal(block: nn.Module) -> bool:
    return any(getattr(m, "is_causal", None) is True for m in block.modules())


def _width(block: nn.Module) -> int | None:
    if isinstance(block, nn.Linear):
        return block.out_features
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    return next((m.in_features for m in block.modules() if isinstance(m, nn.Linear)), None)


def _layer_index(block: nn.Module, fallback: int) -> int:
    """The block's index in a transformers cache (its attention's ``layer_idx``), else its place in the list."""
    return next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), fallback)


def _has_attention(block: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in block.modules())


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, block, index)`` of the blocks of the model's decoder: the blocks of every ``nn.ModuleList`` of
    same-class attention blocks whose self-attention is causal, or, when none is, of every such list."""
    lists = []
    for name, module in base_modules(model):
        same = isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1
        if same and _has_attention(module[0]):
            lists.append((name, module))
    causal = [(n, m) for n, m in lists if _is_causal(m[0])]
    return [(f"{n}.{i}", b, i) for n, m in (causal or lists) for i, b in enumerate(m)]


def plan(model: nn.Module, config: MusicAdapterConfig) -> list[tuple[str, int, int, bool]]:
    """``(block, width, index, causal)`` of every adapter ``config`` places in ``model``; every check runs first."""
    found = decoder_blocks(model)
    if not found and config.target_modules is None:
        raise ValueError(
            f"music_adapter: found no decoder block list in {type(model).__name__} (an nn.ModuleList of same-class "
            "blocks holding an attention). Pass target_modules with the names of the blocks to adapt."
        )
    known = {n: (b, i) for n, b, i in found}
    targets = find_targets(model, config, default=lambda n, m: n in known)
    plans = []
    for index, (name, block) in enumerate(targets):
        width = _width(block)
        if width is None:
            raise ValueError(f"music_adapter: {name!r} holds no LayerNorm or Linear to read its width from")
        if config.bottleneck > width:
            raise ValueError(
                f"bottleneck={config.bottleneck} is larger than the width {width} of {name!r}: an adapter's bottleneck "
                f"must be at most the host's width; use bottleneck <= {width} (the paper's mid-size adapters use a "
                "fraction of it)."
            )
        host_causal = _is_causal(block)
        if config.causal is False and host_causal and config.kind != "linear":
            raise ValueError(
                f"causal=False on {name!r}, a block whose self-attention is causal: a non-causal {config.kind} adapter "
                "would let position t see positions after t, which generation cannot provide. Use causal=None or True."
            )
        causal = host_causal if config.causal is None else config.causal
        plans.append((name, width, _layer_index(block, known.get(name, (block, index))[1]), causal))
    return plans


def _middle(config: MusicAdapterConfig, causal: bool, index: int) -> nn.Module | None:
    if config.kind == "linear":
        return None
    if config.kind == "conv":
        stage = DilatedConvStage(config.bottleneck, config.kernel_size, config.dilations, config.se_reduction, causal)
    else:
        stage = AttentionStage(config.bottleneck, config.num_heads, config.ffn_mult, causal, config.attention_dropout)
    stage.layer_idx = index
    return stage


@register_method(
    "music_adapter", MusicAdapterConfig, modality="audio", mergeable=False, paper="https://arxiv.org/abs/2506.21298"
)
def apply_music_adapter(
    model: nn.Module, config: MusicAdapterConfig, adapter_name: str, state: Mapping[str, Tensor] | None
) -> None:
    for name, width, index, causal in plan(model, config):
        layer = Bottleneck(
            width,
            config.bottleneck,
            mode="sequential",
            scaling=config.scaling,
            act="gelu" if config.kind == "linear" else "identity",
            dropout=config.dropout,
            dropout_at="output",
            middle=_middle(config, causal, index),
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)
