"""Norm and bias selectors: train chosen parameters of a frozen module (BitFit, LN tuning, SPT vectors).

The base parameter itself stays frozen; the selector holds a zero-initialised trainable delta that the host
adds to it (``b_eff = b + Δb``). Training ``Δb`` is training ``b``: the same gradients, the same optimiser
trajectory; and it keeps ``disable_adapters``, several adapters and exact merging (``b += Δb``) working.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode


class ParamDelta(AdapterModule):
    """Trainable additive deltas for named parameters of the host's base module.

    Args:
        base: the module whose parameters are tuned (only read for names and shapes).
        names: parameter names of ``base`` to tune, e.g. ``("bias",)``, ``("weight", "bias")``, or dotted
            names of its children's parameters (``"out_proj.bias"`` of an ``nn.MultiheadAttention``).
        init_weights: ``True``/``"identity"``: zeros (the base values, as the papers start);
            ``False``: random.

    Shapes:
        each delta has the shape of its base parameter; stored as ``<name>_delta`` (dots as ``__``; not
        ``delta_<name>``, which for ``weight`` would shadow :meth:`AdapterModule.delta_weight`).
    """

    mergeable = True

    def __init__(self, base: nn.Module, names: tuple[str, ...] | list[str], *, init_weights: InitMode = True) -> None:
        super().__init__()
        self.names = tuple(names)
        own = dict(base.named_parameters())
        for name in self.names:
            if name not in own:
                raise ValueError(f"{type(base).__name__} has no parameter {name!r} to tune (parameters: {list(own)})")
            self.register_parameter(_key(name), nn.Parameter(torch.zeros_like(own[name])))
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        for name in self.names:
            delta = getattr(self, _key(name))
            if init_weights is False:
                nn.init.normal_(delta, std=0.1)
            else:
                nn.init.zeros_(delta)

    def param_deltas(self, base: nn.Module) -> dict[str, Tensor]:
        return {name: getattr(self, _key(name)) for name in self.names}


def _key(name: str) -> str:
    return name.replace(".", "__") + "_delta"
