"""The bottleneck-adapter family on transformers models: Houlsby, Pfeiffer and the (scaled) parallel adapter.

One adapter, ``a(h) = s · up(act(down(h)))`` (:class:`~modalpeft.core.layers.Bottleneck`), at one of three
positions of every transformer block, found by structure (:func:`modalpeft.text.structure.find_blocks`):

- ``"attention"``: series after the self-attention sublayer, ``y ← y + a(y)`` on the attention output
  projection, before the block's dropout and residual add;
- ``"ffn"``: series after the feed-forward sublayer, on its last Linear, the same way;
- ``"ffn_parallel"``: parallel to the feed-forward sublayer, ``FFN(x) + a(x)`` with ``x`` the sublayer's input.
  In post-LN encoders (BERT/RoBERTa) ``x`` is the attention output, and the adapter's output joins before the
  LayerNorm: ``LN(dropout(dense(inter)) + a(x) + x)``, He et al.'s ``RobertaOutput``; there the adapter runs as
  ``x + a(x)`` on the output module's residual input, which is the same sum.

Registered methods (the papers' placements):

- ``"houlsby"`` (Houlsby et al., ICML 2019, https://arxiv.org/abs/1902.00751): attention + ffn, LayerNorms trained.
- ``"pfeiffer"`` (Pfeiffer et al., EACL 2021, https://arxiv.org/abs/2005.00247): ffn only.
- ``"parallel_adapter"`` (He et al., ICLR 2022, https://arxiv.org/abs/2110.04366): ffn_parallel, ReLU; the
  *scaled* parallel adapter is ``scaling=4`` (XSum/MT) or ``2`` (their GLUE script).

Trainable count: per adapter ``2·d·r + r + d`` (biases on), plus every LayerNorm's parameters with
``train_layer_norms``. Parallel r=16 on RoBERTa-base: ``12·(2·768·16 + 16 + 768) = 304,320``.

Known differences from the official code: a series adapter hosted on the output Linear runs before the
block's dropout (adapter-transformers and He et al. apply it after); identical in eval mode. Houlsby et al.
initialise near zero (N(0, 1e-2²)-truncated); ``init_weights=True`` here is He et al.'s "lora" init
(``up = 0``: exactly the identity), ``proj_init="bert"`` gives N(0, 0.02²) weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, base_modules, find_targets
from ...core.layers import Bottleneck, ParamDelta
from ...core.layers.bottleneck import Activation, ProjectionInit
from ...core.registry import register_method
from ..structure import BlockParts, find_blocks, find_norms

Position = Literal["attention", "ffn", "ffn_parallel"]


@dataclass
class TextBottleneckConfig(AdapterConfig):
    """Fields shared by the bottleneck family.

    ``target_modules=None`` places adapters at the method's positions in every transformer block found by
    structure; ``target_modules``/``exclude_modules`` select blocks by name (``"encoder.layer.0"``, a regex).
    """

    bottleneck_dim: int = field(default=64, metadata=_help("Hidden width r of each adapter."))
    scaling: float | Literal["learnable"] = field(
        default=1.0, metadata=_help("Scale s of the adapter output, or 'learnable' (a trained scalar, starts at 1).")
    )
    act: Activation = field(default="relu", metadata=_help("Non-linearity between the projections."))
    dropout: float = field(default=0.0, metadata=_help("Dropout after the activation."))
    proj_init: ProjectionInit = field(
        default="lora",
        metadata=_help("'lora': down kaiming-uniform, up 0 (identity at start); 'bert': both N(0, 0.02^2)."),
    )
    train_layer_norms: bool = field(
        default=False, metadata=_help("Also train every LayerNorm/RMSNorm of the model (Houlsby, Compacter).")
    )

    positions: ClassVar[tuple[Position, ...]] = ()
    """The method's positions (fixed per registered method, not a field)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_bottleneck()
        check_adapter_fields(self)

    def _check_bottleneck(self) -> None:
        if isinstance(self.bottleneck_dim, bool) or not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim={self.bottleneck_dim!r} must be an integer >= 1 (e.g. 16, 64).")

    def adapter_width(self, dim: int) -> int:
        """The bottleneck width for a host of width ``dim``."""
        return self.bottleneck_dim

    def check_width(self, dim: int, owner: str) -> None:
        """Raise a ValueError when an adapter cannot be built for a host of width ``dim``."""

    def projection_kwargs(self, shared_rule: Tensor | None) -> dict:
        """Extra :class:`Bottleneck` arguments (PHM projections for Compacter); ``shared_rule`` is the rule of
        the first adapter placed, ``None`` before it."""
        return {}


def check_adapter_fields(config: AdapterConfig) -> None:
    """Validate the ``scaling``, ``act``, ``proj_init`` and ``dropout`` fields every bottleneck config has."""
    number = isinstance(config.scaling, (int, float)) and not isinstance(config.scaling, bool)
    if config.scaling != "learnable" and not number:
        raise ValueError(f"scaling={config.scaling!r} is not valid; give a float (1.0; 4.0 scaled PA) or 'learnable'.")
    if config.act not in get_args(Activation):
        raise ValueError(f"act={config.act!r} is not valid; choose one of {list(get_args(Activation))}.")
    if config.proj_init not in get_args(ProjectionInit):
        raise ValueError(
            f"proj_init={config.proj_init!r} is not valid; choose one of {list(get_args(ProjectionInit))}."
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout={config.dropout!r} must be in [0, 1); use 0.0 for no dropout.")


def placements(model: nn.Module, config: TextBottleneckConfig, owner: str) -> list[tuple[str, int, str, int]]:
    """``(host, width, mode, input_arg)`` of every adapter ``config`` places in ``model``."""
    found: list[BlockParts] = find_blocks(model, owner)
    names = {b.name for b in found}
    chosen = {n for n, _ in find_targets(model, config, default=lambda n, m: n in names) if n in names}
    blocks = [b for b in found if b.name in chosen]
    if not blocks:
        raise ValueError(
            f"{owner}: target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) left no "
            f"transformer block; give block names such as {found[0].name!r}, or None for every block."
        )
    modules = dict(base_modules(model))
    plans = []
    for b in blocks:
        for position in config.positions:
            if position == "attention":
                plans.append((b.attention_output, modules[b.attention_output].out_features, "sequential", 0))
            elif position == "ffn":
                plans.append((b.ffn_output, modules[b.ffn_output].out_features, "sequential", 0))
            else:
                mode = "input" if b.ffn_input_arg else "parallel"
                plans.append((b.ffn, modules[b.ffn_output].out_features, mode, b.ffn_input_arg))
    return plans


def apply_bottleneck(model: nn.Module, config: TextBottleneckConfig, adapter_name: str, owner: str) -> None:
    """Place ``config``'s adapters (and LayerNorm deltas) in ``model``; every host is checked first.

    With PHM projections sharing a rule (Compacter), the first adapter's down projection owns the rule and every
    other PHM layer of this adapter refers to it, so it trains and saves once.
    """
    plans = placements(model, config, owner)
    for _, width, _, _ in plans:
        config.check_width(width, owner)
    norms = find_norms(model) if config.train_layer_norms else []
    shared = None
    for host, width, mode, arg in plans:
        layer = Bottleneck(
            width,
            config.adapter_width(width),
            mode=mode,
            scaling=config.scaling,
            act=config.act,
            dropout=config.dropout,
            proj_init=config.proj_init,
            input_arg=arg,
            init_weights=config.init_weights,
            **config.projection_kwargs(shared),
        )
        attach(model, host, adapter_name, layer)
        shared = layer.phm_rule if shared is None else shared
    modules = dict(base_modules(model))
    for name in norms:
        names = [n for n, _ in modules[name].named_parameters(recurse=False)]
        attach(model, name, adapter_name, ParamDelta(modules[name], names, init_weights=config.init_weights))


@dataclass
class HoulsbyConfig(TextBottleneckConfig):
    """Houlsby adapters: series after the attention and the feed-forward sublayer of every block (``"houlsby"``)."""

    train_layer_norms: bool = field(
        default=True, metadata=_help("Also train every LayerNorm of the model (Houlsby et al. do).")
    )
    positions: ClassVar[tuple[Position, ...]] = ("attention", "ffn")


@dataclass
class PfeifferConfig(TextBottleneckConfig):
    """Pfeiffer adapters: series after the feed-forward sublayer of every block (``"pfeiffer"``)."""

    positions: ClassVar[tuple[Position, ...]] = ("ffn",)


@dataclass
class ParallelAdapterConfig(TextBottleneckConfig):
    """He et al.'s parallel adapter beside the feed-forward sublayer (``"parallel_adapter"``); ``scaling=4``
    is their scaled parallel adapter."""

    positions: ClassVar[tuple[Position, ...]] = ("ffn_parallel",)


def _register(name: str, cls: type[TextBottleneckConfig], paper: str) -> None:
    def apply(model: nn.Module, config: TextBottleneckConfig, adapter_name: str, state: Mapping[str, Tensor] | None):
        apply_bottleneck(model, config, adapter_name, name)

    apply.__name__ = f"apply_{name}"
    register_method(name, cls, modality="text", mergeable=False, paper=paper)(apply)


_register("houlsby", HoulsbyConfig, "https://arxiv.org/abs/1902.00751")
_register("pfeiffer", PfeifferConfig, "https://arxiv.org/abs/2005.00247")
_register("parallel_adapter", ParallelAdapterConfig, "https://arxiv.org/abs/2110.04366")
