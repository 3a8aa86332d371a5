"""Bottleneck adapter: ``f(h) = s · up(drop(act(mid(down(h)))))``, sequential, parallel or on the input.

The same small module serves the sequential adapters of Houlsby et al. (2019) and Pfeiffer et al. (2020),
placed on a module's output as ``h + f(h)``, the parallel adapters of AdaptFormer (Chen et al., 2022) and
He et al. (2022), whose branch ``f(x)`` runs beside a module on its input, and LLM-Adapters' input-side
adapter ``W(x + f(x))`` (Hu et al., 2023). Its projections are Linears, 1x1 Convs, or PHM layers
(:class:`~modalpeft.core.layers.phm.PHMLinear`, Compacter). With the default init the up projection
starts at zero, so the adapter starts as the identity. A pluggable middle stage ``mid`` (identity by default)
runs on the bottleneck features: the music adapters' dilated convolutions and small transformer
(:mod:`~modalpeft.core.layers.sequence`) are such stages.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout
from .phm import PHMLinear

Activation = Literal["gelu", "gelu_tanh", "relu", "quick_gelu", "silu", "tanh", "identity"]
BottleneckMode = Literal["sequential", "parallel", "input"]
DropoutPlace = Literal["hidden", "output"]
LayerNormPlace = Literal["none", "in", "out"]
ProjectionInit = Literal["lora", "bert"]


class QuickGELU(nn.Module):
    """``x · σ(1.702 x)``, the GELU approximation of OpenAI's CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")  # transformers' "gelu_new" (T5, Compacter)


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": _gelu_tanh,
    "relu": nn.ReLU,
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")


class Bottleneck(AdapterModule):
    """A bottleneck adapter, ``f(h) = s · up(drop(act(mid(down(h)))))``.

    ``mode="sequential"`` transforms the host's output, ``out + f(out)`` (Houlsby / Pfeiffer placement);
    ``mode="parallel"`` adds ``f(x)`` of the host's input to its output (AdaptFormer, He et al.);
    ``mode="input"`` transforms the host's input before the host runs, ``x + f(x)`` (LLM-Adapters'
    ``mh_adapter``). Being non-linear, it cannot be merged into the base weights.

    Args:
        dim: feature dim of the adapter's input (the host's output in sequential mode, its input otherwise).
        bottleneck_dim: ``m``, the hidden width.
        mode: ``"sequential"``, ``"parallel"`` or ``"input"``.
        scaling: ``s``; a float, or ``"learnable"`` for a trained scalar starting at 1 (AdaptFormer's option).
        act: the non-linearity: ``"gelu"``, ``"gelu_tanh"`` (transformers' ``gelu_new``), ``"relu"``,
            ``"quick_gelu"``, ``"silu"``, ``"tanh"`` or ``"identity"`` (none: a middle stage brings its own).
        dropout: dropout after the activation (``dropout_at="hidden"``) or on the up projection's output
            (``"output"``: ``s · drop(up(act(mid(down(h)))))``, the music adapters' order).
        dropout_at: where the dropout acts, ``"hidden"`` or ``"output"``.
        middle: a module on the bottleneck features, ``(*, m) -> (*, m)``, between ``down`` and ``act``
            (``None``: the identity). If it has ``context(args, kwargs)`` (see
            :class:`~modalpeft.core.layers.sequence.SequenceStage`), the host's call inputs reach it; if it has
            ``reset_adapter(init_weights)``, :meth:`reset_adapter` calls it. Linear projections only.
        layer_norm: a LayerNorm on the adapter's input (``"in"``), on the up projection's output before the
            scaling (``"out"``), or none.
        conv: ``True``: 1x1 ``Conv1d`` projections over channels-first input ``(B, C, *)`` (the spatial dims
            are flattened and restored); ``False``: ``Linear`` over the last dim.
        out_dim: output feature dim (parallel mode only, for hosts whose input and output dims differ);
            ``None``: ``dim``.
        bias: biases on both projections (LLM-Adapters uses none).
        phm_n: ``n`` of PHM projections (Compacter); ``None``: dense projections.
        phm_rank: rank of each PHM block (Compacter: 1; ``None``: full blocks, the PHM-Adapter).
        phm_rule: the rule tensor shared by every PHM layer of a model (``None``: the down projection owns one
            and the up projection shares it).
        proj_init: the dense init with ``init_weights=True``: ``"lora"`` (``down`` kaiming-uniform a=√5, ``up``
            and biases zero: the identity; He et al.'s "lora" init, AdaptFormer) or ``"bert"`` (both weights
            ``N(0, 0.02²)``, biases zero; LLM-Adapters' default, not the identity).
        input_arg: which positional input of the host the ``"parallel"``/``"input"`` modes read (and, for
            ``"input"``, replace); 1 serves hosts like BERT's ``BertOutput(hidden, input_tensor)``.
        init_weights: ``True``: the init above (PHM: Compacter's glorot-uniform blocks, rule ``N(0, 1e-4²)``);
            ``"identity"``: ``up`` zero; ``False``: random non-zero ``up`` and biases.

    Shapes:
        - input: ``(*, dim)``, or ``(B, dim, *)`` with ``conv=True``
        - output: ``(*, out_dim)``, or ``(B, out_dim, *)`` with ``conv=True``
        - parameters (dense): ``dim·m + m·out_dim``, ``+ m + out_dim`` with biases, plus ``2·dim``
          (``layer_norm="in"``) or ``2·out_dim`` (``"out"``), plus 1 with a learnable scaling, plus the middle
          stage's; PHM: see
          :class:`~modalpeft.core.layers.phm.PHMLinear`
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
        dropout_at: DropoutPlace = "hidden",
        middle: nn.Module | None = None,
        layer_norm: LayerNormPlace = "none",
        conv: bool = False,
        out_dim: int | None = None,
        bias: bool = True,
        phm_n: int | None = None,
        phm_rank: int | None = 1,
        phm_rule: nn.Parameter | None = None,
        proj_init: ProjectionInit = "lora",
        input_arg: int = 0,
        init_weights: InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _choice("mode", mode, get_args(BottleneckMode))
        _choice("act", act, get_args(Activation))
        _choice("layer_norm", layer_norm, get_args(LayerNormPlace))
        _choice("proj_init", proj_init, get_args(ProjectionInit))
        _choice("dropout_at", dropout_at, get_args(DropoutPlace))
        if middle is not None and conv:
            raise ValueError("a middle stage acts on (*, m) features; it cannot be combined with conv=True")
        if bottleneck_dim < 1:
            raise ValueError(f"bottleneck_dim={bottleneck_dim} must be >= 1")
        if isinstance(scaling, str) and scaling != "learnable":
            raise ValueError(f"scaling={scaling!r} is not valid; give a float or 'learnable'.")
        if phm_n is not None and conv:
            raise ValueError("PHM projections act on the last dim; they cannot be combined with conv=True")
        out_dim = dim if out_dim is None else out_dim
        if mode != "parallel" and out_dim != dim:
            raise ValueError(
                f"out_dim={out_dim} differs from dim={dim}, which a {mode} adapter (h + f(h)) cannot do; "
                "use mode='parallel' or leave out_dim=None."
            )
        # The mode decides which hook the host runs; the class defines all three, so the instance narrows them.
        self.has_parallel = mode == "parallel"
        self.has_post = mode == "sequential"
        self.has_pre = mode == "input"
        self.has_context = callable(getattr(middle, "context", None))
        self.input_arg = input_arg
        self.mode, self.conv, self.layer_norm, self.proj_init = mode, conv, layer_norm, proj_init
        self.dim, self.bottleneck_dim, self.out_dim = dim, bottleneck_dim, out_dim
        kw = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim if layer_norm == "in" else out_dim, **kw) if layer_norm != "none" else None
        if phm_n is not None:
            self.down = PHMLinear(dim, bottleneck_dim, phm_n, rank=phm_rank, rule=phm_rule, bias=bias, **kw)
            rule = self.down.phm_rule if phm_rule is None else phm_rule
            self.up = PHMLinear(bottleneck_dim, out_dim, phm_n, rank=phm_rank, rule=rule, bias=bias, **kw)
        elif conv:
            self.down = nn.Conv1d(dim, bottleneck_dim, 1, bias=bias, **kw)
            self.up = nn.Conv1d(bottleneck_dim, out_dim, 1, bias=bias, **kw)
        else:
            self.down = nn.Linear(dim, bottleneck_dim, bias=bias, **kw)
            self.up = nn.Linear(bottleneck_dim, out_dim, bias=bias, **kw)
        self.act = _ACTIVATIONS[act]()
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_at = dropout_at
        self.middle = middle
        self.scaling = scaling
        self.scale = nn.Parameter(torch.ones(1, **kw)) if scaling == "learnable" else None
        self.reset_adapter(init_weights)

    @property
    def phm_rule(self) -> Tensor | None:
        """The PHM rule tensor the projections use (``None`` for dense projections)."""
        return self.down.rule if isinstance(self.down, PHMLinear) else None

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        if isinstance(self.down, PHMLinear):
            self.down.reset_parameters()
            self.up.reset_parameters(zero_output=init_weights == "identity")
            if init_weights is False:
                nn.init.normal_(self.up.bias, std=0.1)
        else:
            self._reset_dense(init_weights)
        if self.norm is not None:
            if init_weights is False:
                nn.init.normal_(self.norm.weight, mean=1.0, std=0.1)
                nn.init.normal_(self.norm.bias, std=0.1)
            else:
                self.norm.reset_parameters()
        if callable(getattr(self.middle, "reset_adapter", None)):
            self.middle.reset_adapter(init_weights)
        if self.scale is not None:
            if init_weights is False:
                nn.init.uniform_(self.scale, 0.5, 1.5)
            else:
                nn.init.ones_(self.scale)

    def _reset_dense(self, init_weights: InitMode) -> None:
        if self.proj_init == "bert" and init_weights is True:
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            if init_weights is False:
                nn.init.normal_(self.up.weight, std=0.1)
            else:
                nn.init.zeros_(self.up.weight)
        for proj in (self.down, self.up):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if init_weights is False and self.up.bias is not None:
            nn.init.normal_(self.up.bias, std=0.1)

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
        h = self.down(h)
        if self.middle is not None:
            h = self.middle(h)
        h = self.act(h)
        h = self.drop(self.up(h)) if self.dropout_at == "output" else self.up(self.drop(h))
        if self.layer_norm == "out":
            h = self._norm(h)
        h = h * (self.scale if self.scale is not None else self.scaling)
        if self.conv:
            h = h.reshape(shape[0], self.out_dim, *shape[2:])  # (B, C_out, L) -> (B, C_out, *S)
        return h

    def context(self, args: tuple, kwargs: dict) -> None:
        self.middle.context(args, kwargs)

    def pre(self, x: Tensor) -> Tensor:
        return x + self.branch(x)

    def parallel(self, x: Tensor) -> Tensor:
        return self.branch(x)

    def post(self, out: Tensor) -> Tensor:
        return out + self.branch(out)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scaling={self.scaling!r}, layer_norm={self.layer_norm!r}"
