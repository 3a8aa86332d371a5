"""LLM-Adapters' bottleneck placements around single Linears (Hu et al., EMNLP 2023).

Paper: https://arxiv.org/abs/2304.01933; official code: AGI-Edgerunners/LLM-Adapters
(``peft/src/peft/tuners/bottleneck.py``). Each targeted Linear ``W`` gets one adapter
``a(h) = s · up(act(down(h)))`` (no biases, tanh, ``s = 1``, "bert" init ``N(0, 0.02²)``):

- ``adapter_type="series"``: on an expanding Linear (``d_out > d_in``: LLaMA's ``gate_proj``/``up_proj``) the
  input-side ``mh_adapter``, ``y = W(x + a(x))`` with ``a: d_in → r → d_in``; on any other Linear
  (``down_proj``) the output-side ``output_adapter``, ``z = Wx; y = z + a(z)`` with ``a: d_out → r → d_out``.
  The official code picks the side from a per-model name table (LLaMA: gate/up → mh, down → output; BLOOM,
  GPT-J, OPT: the expanding Linear → mh); the expansion rule gives the same sides on those models.
- ``adapter_type="parallel"``: ``y = Wx + a(x)`` with ``a: d_in → r → d_out``.

Defaults are the placements of the paper's best runs (``math_running_commands``): series on
``["up_proj", "gate_proj"]``, parallel on ``["up_proj", "down_proj"]``, bottleneck 256.
LLaMA-7B counts (no bias): parallel 247,463,936; series 134,217,728.

Known difference: the official adapter applies dropout to its input (``adapter_up(act(adapter_down(drop(x))))``),
here dropout follows the activation; identical with ``dropout=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets
from ...core.layers import Bottleneck
from ...core.layers.bottleneck import Activation, ProjectionInit
from ...core.registry import register_method
from .bottleneck import check_adapter_fields

AdapterType = Literal["series", "parallel"]
_DEFAULT_TARGETS = {"series": ["up_proj", "gate_proj"], "parallel": ["up_proj", "down_proj"]}


@dataclass
class LLMAdaptersConfig(AdapterConfig):
    """LLM-Adapters' series / parallel bottleneck adapters on Linears (registered as ``"llm_adapters"``).

    ``target_modules=None``: the paper's best placement for ``adapter_type`` (LLaMA names).
    """

    adapter_type: AdapterType = field(
        default="series",
        metadata=_help("'series': mh_adapter on expanding Linears, output_adapter on others; 'parallel': beside W."),
    )
    bottleneck_dim: int = field(default=256, metadata=_help("Hidden width r of each adapter (paper: 256)."))
    scaling: float | Literal["learnable"] = field(
        default=1.0, metadata=_help("Scale s of the adapter output, or 'learnable' (official: 'learned').")
    )
    act: Activation = field(default="tanh", metadata=_help("Non-linearity (official default: tanh)."))
    dropout: float = field(default=0.0, metadata=_help("Dropout after the activation."))
    bias: bool = field(default=False, metadata=_help("Biases on the adapter projections (official: none)."))
    proj_init: ProjectionInit = field(
        default="bert", metadata=_help("'bert': N(0, 0.02^2) (official default); 'lora': kaiming / zero up.")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in get_args(AdapterType):
            raise ValueError(
                f"adapter_type={self.adapter_type!r} is not valid; choose one of {list(get_args(AdapterType))}."
            )
        if isinstance(self.bottleneck_dim, bool) or not isinstance(self.bottleneck_dim, int) or self.bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim={self.bottleneck_dim!r} must be an integer >= 1 (paper: 256).")
        check_adapter_fields(self)


def side(linear: nn.Linear, adapter_type: AdapterType) -> tuple[str, int, int]:
    """``(mode, dim, out_dim)`` of the adapter LLM-Adapters places on ``linear``."""
    d_in, d_out = linear.in_features, linear.out_features
    if adapter_type == "parallel":
        return "parallel", d_in, d_out
    return ("input", d_in, d_in) if d_out > d_in else ("sequential", d_out, d_out)


@register_method(
    "llm_adapters", LLMAdaptersConfig, modality="text", mergeable=False, paper="https://arxiv.org/abs/2304.01933"
)
def apply_llm_adapters(
    model: nn.Module, config: LLMAdaptersConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = find_targets(model, config, default=_DEFAULT_TARGETS[config.adapter_type], types=(nn.Linear,))
    for name, linear in targets:
        mode, dim, out_dim = side(linear, config.adapter_type)
        layer = Bottleneck(
            dim,
            config.bottleneck_dim,
            mode=mode,
            scaling=config.scaling,
            act=config.act,
            dropout=config.dropout,
            out_dim=out_dim,
            bias=config.bias,
            proj_init=config.proj_init,
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)
