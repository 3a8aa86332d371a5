"""Bottleneck adapters: Houlsby, Pfeiffer and AdaptFormer placements of one :class:`Bottleneck` layer.

- **Houlsby** (Houlsby et al., ICML 2019, https://arxiv.org/abs/1902.00751): a sequential adapter
  ``h + f(h)`` after the attention output projection and after the MLP of every block.
- **Pfeiffer** (Pfeiffer et al., EACL 2021, https://arxiv.org/abs/2005.00247): one sequential adapter per
  block, after the MLP only.
- **AdaptFormer** (Chen et al., NeurIPS 2022, https://arxiv.org/abs/2205.13535): a parallel adapter beside
  the MLP block, ``mlp(x) + s · f(x)`` with ``s = 0.1``.

``f(h) = s · up(drop(act(down(h))))`` with ``up`` zero at the start, so every style starts as the identity.
Trainable count per adapted module: ``d·m + m + m·d_out + d_out`` (``d`` the adapter's input dim), plus
LayerNorm parameters and 1 for a learnable scaling.
Style defaults: ``scaling`` 1.0 (houlsby, pfeiffer) or 0.1 (adaptformer); ``act`` GELU (houlsby) or ReLU
(pfeiffer, and adaptformer as in its official code).

Default placements (``target_modules=None``), for timm ViTs and torch's ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer``:

- houlsby: ``attn.proj`` and ``mlp.fc2`` (timm); ``self_attn`` (and ``multihead_attn``) and ``linear2`` (torch).
- pfeiffer: ``mlp.fc2`` (timm); ``linear2`` (torch).
- adaptformer: ``mlp`` (timm); none in torch's layers (see below).

``nn.MultiheadAttention`` reads its ``out_proj`` weights directly and never calls ``out_proj``, so the
attention adapter of torch layers sits on the ``nn.MultiheadAttention`` module itself (it acts on the first
element of its output tuple). For other models, pass ``target_modules``.

Known differences from the official code:

- AdaptFormer's adapter here takes the MLP block's input (the output of ``norm2``), as a module-level hook
  can; the official code feeds it the pre-norm residual stream (the input of ``norm2``).
- torch's Transformer layers compute their feed-forward block inline (``linear1 -> activation -> linear2``),
  with no module to run an adapter beside, so AdaptFormer has no default there; target ``linear2`` for a
  parallel adapter beside the last Linear, or use a sequential style.
- Houlsby et al. also train the LayerNorms; here only the adapters (and ``modules_to_save``) train.
- ``init_weights=True`` is AdaptFormer's LoRA-style init (``up = 0``) for every style; Houlsby et al. draw
  both projections near zero instead. Both start as (nearly) the identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, base_modules, find_targets
from ..layers import Bottleneck
from ..layers.bottleneck import Activation, LayerNormPlace
from ..registry import register_method

Style = Literal["houlsby", "pfeiffer", "adaptformer"]

_DEFAULT_SCALING = {"houlsby": 1.0, "pfeiffer": 1.0, "adaptformer": 0.1}
_DEFAULT_ACT = {"houlsby": "gelu", "pfeiffer": "relu", "adaptformer": "relu"}
# Dotted name suffixes of the default targets in timm ViTs, per style.
_TIMM_DEFAULTS = {"houlsby": ("attn.proj", "mlp.fc2"), "pfeiffer": ("mlp.fc2",), "adaptformer": ("mlp",)}
_TORCH_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters in the Houlsby, Pfeiffer or AdaptFormer placement (registered as ``"adapter"``).

    ``target_modules=None`` uses the style's default placement (see the module docstring); houlsby and
    pfeiffer adapters are sequential on the targets' outputs, adaptformer adapters parallel to the targets.
    """

    style: Style = field(
        default="houlsby",
        metadata=_help(
            "'houlsby': sequential adapters after attention and MLP; 'pfeiffer': after the MLP only; "
            "'adaptformer': parallel to the MLP block."
        ),
    )
    bottleneck_dim: int = field(default=64, metadata=_help("Hidden width m of each adapter."))
    scaling: float | Literal["learnable"] | None = field(
        default=None,
        metadata=_help(
            "Scale s of the adapter branch, or 'learnable' (a trained scalar starting at 1). None: the style's "
            "default, 1.0 for houlsby/pfeiffer and 0.1 for adaptformer (AdaptFormer's paper)."
        ),
    )
    act: Activation | None = field(
        default=None,
        metadata=_help(
            "Non-linearity: 'gelu', 'relu', 'quick_gelu' or 'silu'. None: 'gelu' for houlsby, 'relu' for "
            "pfeiffer and adaptformer."
        ),
    )
    dropout: float = field(default=0.0, metadata=_help("Dropout after the activation (AdaptFormer used 0.1)."))
    layer_norm: LayerNormPlace = field(
        default="none",
        metadata=_help("A LayerNorm inside the adapter: on its input ('in'), on its output ('out'), or 'none'."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.style not in get_args(Style):
            raise ValueError(f"style={self.style!r} is not valid; choose one of {list(get_args(Style))}.")
        if isinstance(self.bottleneck_dim, bool) or not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim={self.bottleneck_dim!r} must be an integer >= 1 (e.g. 8, 64).")
        if self.scaling is None:
            self.scaling = _DEFAULT_SCALING[self.style]
        number = isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
        if self.scaling != "learnable" and not number:
            raise ValueError(f"scaling={self.scaling!r} is not valid; give a float (e.g. 1.0, 0.1) or 'learnable'.")
        if self.act is None:
            self.act = _DEFAULT_ACT[self.style]
        if self.act not in get_args(Activation):
            raise ValueError(f"act={self.act!r} is not valid; choose one of {list(get_args(Activation))}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1); use 0.0 for no dropout.")
        if self.layer_norm not in get_args(LayerNormPlace):
            raise ValueError(
                f"layer_norm={self.layer_norm!r} is not valid; choose one of {list(get_args(LayerNormPlace))}."
            )


def feature_dims(name: str, module: nn.Module) -> tuple[int, int, bool]:
    """``(d_in, d_out, channels_first)`` of a module an adapter is placed on.

    Raises:
        ValueError: the module does not expose its feature dims.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels, True
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], module.normalized_shape[0], False
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim, False
    fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):  # an MLP block (timm's Mlp)
        return fc1.in_features, fc2.out_features, False
    raise ValueError(
        f"adapter: cannot place a bottleneck adapter on {name!r} ({type(module).__name__}): its feature dim is "
        "unknown. Target an nn.Linear, nn.Conv*, nn.LayerNorm, nn.MultiheadAttention or an MLP block with fc1/fc2 "
        "Linears (e.g. 'mlp.fc2' or 'mlp' in timm ViTs)."
    )


def default_targets(model: nn.Module, style: Style) -> list[str]:
    """The full names of the modules a style adapts when ``target_modules`` is ``None``."""
    names = []
    suffixes = _TIMM_DEFAULTS[style]
    for name, module in base_modules(model):
        if isinstance(module, _TORCH_LAYERS) and style != "adaptformer":
            prefix = f"{name}." if name else ""
            attention = ["self_attn", "multihead_attn"] if style == "houlsby" else []
            names += [prefix + c for c in [*attention, "linear2"] if isinstance(getattr(module, c, None), nn.Module)]
        elif any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    return names


@register_method("adapter", BottleneckConfig, mergeable=False, paper="https://arxiv.org/abs/1902.00751")
def apply_adapter(
    model: nn.Module, config: BottleneckConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    default = None
    if config.target_modules is None:
        default = default_targets(model, config.style)
        if not default:
            torch_layers = any(isinstance(m, _TORCH_LAYERS) for _, m in base_modules(model))
            hint = (
                " torch's Transformer layers have no MLP module to run a parallel adapter beside; target "
                "'linear2' (a parallel adapter beside the last feed-forward Linear) or use style='houlsby'/'pfeiffer'."
                if torch_layers and config.style == "adaptformer"
                else ""
            )
            raise ValueError(
                f"adapter: style={config.style!r} has no default placement in {type(model).__name__} (it looks for "
                f"timm's {list(_TIMM_DEFAULTS[config.style])} and torch's Transformer layers).{hint} Pass "
                "target_modules with the names of the modules to adapt."
            )
    targets = find_targets(model, config, default=default)
    mode = "parallel" if config.style == "adaptformer" else "sequential"
    plans = []
    for name, module in targets:  # every target is checked before the model changes
        d_in, d_out, channels_first = feature_dims(name, module)
        dim, out_dim = (d_in, d_out) if mode == "parallel" else (d_out, d_out)
        plans.append((name, dim, out_dim, channels_first))
    for name, dim, out_dim, channels_first in plans:
        layer = Bottleneck(
            dim,
            config.bottleneck_dim,
            mode=mode,
            scaling=config.scaling,
            act=config.act,
            dropout=config.dropout,
            layer_norm=config.layer_norm,
            conv=channels_first,
            out_dim=out_dim,
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)
