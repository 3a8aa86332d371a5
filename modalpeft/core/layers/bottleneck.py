"""Bottleneck adapter: ``f(h) = s · up(drop(act(down(h))))``, sequential or parallel (Houlsby, AdaptFormer).

The same small module serves the sequential adapters of Houlsby et al. (2019) and Pfeiffer et al. (2020),
placed on a module's output as ``h + f(h)``, and the parallel adapter of AdaptFormer (Chen et al., 2022),
whose branch ``f(x)`` runs beside a module on its input. The up projection starts at zero, so the adapter
starts as the identity.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode

Activation = Literal["gelu", "relu", "quick_gelu", "silu"]
BottleneckMode = Literal["sequential", "parallel"]
LayerNormPlace = Literal["none", "in", "out"]


class QuickGELU(nn.Module):
    """``x · σ(1.702 x)``, the GELU approximation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "quick_gelu": QuickGELU, "silu": nn.SiLU}


def _choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")


class Bottleneck(AdapterModule):
    """A bottleneck MLP adapter, ``f(h) = s · up(drop(act(down(h))))``.

    ``mode="sequential"`` transforms the host's output, ``out + f(out)`` (Houlsby / Pfeiffer placement);
    ``mode="parallel"`` adds ``f(x)`` of the host's input to its output (AdaptFormer). Being non-linear, it
    cannot be merged into the base weights.

    Args:
        dim: feature dim of the adapter's input (the host's output in sequential mode, its input in parallel
            mode).
        bottleneck_dim: ``m``, the hidden width.
        mode: ``"sequential"`` or ``"parallel"``.
        scaling: ``s``; a float, or ``"learnable"`` for a trained scalar starting at 1 (AdaptFormer's option).
        act: the non-linearity: ``"gelu"``, ``"relu"``, ``"quick_gelu"`` or ``"silu"``.
        dropout: dropout after the activation.
        layer_norm: a LayerNorm on the adapter's input (``"in"``), on the up projection's output before the
            scaling (``"out"``), or none.
        conv: ``True``: 1x1 ``Conv1d`` projections over channels-first input ``(B, C, *)`` (the spatial dims
            are flattened and restored); ``False``: ``Linear`` over the last dim.
        out_dim: output feature dim (parallel mode only, for hosts whose input and output dims differ);
            ``None``: ``dim``.
        init_weights: ``True``/``"identity"``: ``down`` kaiming-uniform (a=√5), the ``up`` weight and all
            biases zero (AdaptFormer's LoRA-style init; the identity); ``False``: random non-zero ``up`` and
            biases.

    Shapes:
        - input: ``(*, dim)``, or ``(B, dim, *)`` with ``conv=True``
        - output: ``(*, out_dim)``, or ``(B, out_dim, *)`` with ``conv=True``
        - parameters: ``dim·m + m + m·out_dim + out_dim``, plus ``2·dim`` (``layer_norm="in"``) or
          ``2·out_dim`` (``"out"``), plus 1 with a learnable scaling
    """

    mergeable = False

    def __init__(
        self,
        dim: int,
        bottleneck_dim: int,
        *,
        mode: BottleneckMode = "sequential",
        scaling: float | Literal["learnable"] = 1.0,
        act: Activation = "gelu",
        dropout: float = 0.0,
        layer_norm: LayerNormPlace = "none",
        conv: bool = False,
        out_dim: int | None = None,
        init_weights: InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _choice("mode", mode, get_args(BottleneckMode))
        _choice("act", act, get_args(Activation))
        _choice("layer_norm", layer_norm, get_args(LayerNormPlace))
        if bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim={bottleneck_dim} must be >= 1")
        if isinstance(scaling, str) and scaling != "learnable":
            raise ValueError(f"scaling={scaling!r} is not valid; give a float or 'learnable'.")
        out_dim = dim if out_dim is None else out_dim
        if mode == "sequential" and out_dim != dim:
            raise ValueError(
                f"out_dim={out_dim} differs from dim={dim}, which a sequential adapter (out + f(out)) cannot do; "
                "use mode='parallel' or leave out_dim=None."
            )
        # The mode decides which hook the host runs; the class defines both, so the instance narrows them.
        self.has_parallel = mode == "parallel"
        self.has_post = mode == "sequential"
        self.mode, self.conv, self.layer_norm = mode, conv, layer_norm
        self.dim, self.bottleneck_dim, self.out_dim = dim, bottleneck_dim, out_dim
        kw = {"device": device, "dtype": dtype}
        proj = (lambda i, o: nn.Conv1d(i, o, 1, **kw)) if conv else (lambda i, o: nn.Linear(i, o, **kw))
        self.norm = nn.LayerNorm(dim if layer_norm == "in" else out_dim, **kw) if layer_norm != "none" else None
        self.down = proj(dim, bottleneck_dim)
        self.act = _ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = proj(bottleneck_dim, out_dim)
        self.scaling = scaling
        self.scale = nn.Parameter(torch.ones(1, **kw)) if scaling == "learnable" else None
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        if init_weights is False:
            nn.init.normal_(self.up.weight, std=0.1)
            nn.init.normal_(self.up.bias, std=0.1)
            if self.norm is not None:
                nn.init.normal_(self.norm.weight, mean=1.0, std=0.1)
                nn.init.normal_(self.norm.bias, std=0.1)
            if self.scale is not None:
                nn.init.uniform_(self.scale, 0.5, 1.5)
            return
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def _norm(self, h: Tensor) -> Tensor:
        if self.conv:  # LayerNorm over the channels of (B, C, L)
            return self.norm(h.transpose(1, -1)).transpose(1, -1)
        return self.norm(h)

    def branch(self, h: Tensor) -> Tensor:
        """``f(h)``, the adapter's residual branch."""
        shape = h.shape
        if self.conv:
            h = h.flatten(2)  # (B, C, *S) -> (B, C, L)
        if self.layer_norm == "in":
            h = self._norm(h)
        h = self.up(self.drop(self.act(self.down(h))))
        if self.layer_norm == "out":
            h = self._norm(h)
        h = h * (self.scale if self.scale is not None else self.scaling)
        if self.conv:
            h = h.reshape(shape[0], self.out_dim, *shape[2:])  # (B, C_out, L) -> (B, C_out, *S)
        return h

    def parallel(self, x: Tensor) -> Tensor:
        return self.branch(x)

    def post(self, out: Tensor) -> Tensor:
        return out + self.branch(out)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scaling={self.scaling!r}, layer_norm={self.layer_norm!r}"
