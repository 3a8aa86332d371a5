"""BitFit: tune only the bias terms (Ben Zaken, Ravfogel, Goldberg, ACL 2022, https://arxiv.org/abs/2106.10199).

Every bias of the targeted modules trains (Linear, Conv, LayerNorm/GroupNorm/BatchNorm ``bias``, and
``nn.MultiheadAttention``'s ``in_proj_bias`` and ``out_proj.bias``), as the official code's ``"all"``
setting does; everything else is frozen. Trainable count = the number of those bias entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from ..config import AdapterConfig
from ..inject import attach, find_targets
from ..layers import ParamDelta
from ..registry import register_method


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit. ``target_modules=None`` tunes every bias in the model."""


def bias_names(module: nn.Module) -> list[str]:
    """The bias parameters of ``module`` that BitFit tunes, as names relative to it."""
    if isinstance(module, nn.MultiheadAttention):
        # MHA reads its children's parameters directly, so they are tuned from the MHA itself.
        names = [n for n, p in module.named_parameters() if n.endswith("bias") and n not in ("bias_k", "bias_v")]
        return names
    return [n for n, p in module.named_parameters(recurse=False) if n == "bias" or n.endswith("_bias")]


@register_method("bitfit", BitFitConfig, mergeable=True, paper="https://arxiv.org/abs/2106.10199")
def apply_bitfit(
    model: nn.Module, config: BitFitConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    targets = [(n, m) for n, m in find_targets(model, config) if bias_names(m)]
    if not targets:
        raise ValueError(
            f"bitfit: none of the modules selected by target_modules={config.target_modules!r} has a bias; "
            "target modules with bias terms (Linear, Conv, norms), or leave target_modules=None for all."
        )
    for name, module in targets:
        attach(model, name, adapter_name, ParamDelta(module, bias_names(module), init_weights=config.init_weights))
