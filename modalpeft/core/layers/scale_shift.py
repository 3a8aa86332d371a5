"""Scale and shift of features, ``y = γ ⊙ x + β`` per channel, with exact folding (SSF).

SSF: Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022,
https://arxiv.org/abs/2210.08823.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import AdapterLayer, AdapterModule, InitMode
from .recompute import recompute_source


class ScaleShift(AdapterModule):
    """A per-channel affine map on the host's output: ``y = γ ⊙ base(x) + β``.

    SSF places one after most layers of a ViT (patch embedding, qkv, proj, fc1, fc2, the norms). The map merges
    exactly into the base layer when that layer ends in a per-channel affine (see :meth:`can_fold`):

    - ``nn.Linear`` and ``nn.Conv{1,2,3}d``: ``W' = diag(γ) W`` (output channels scaled), ``b' = γ ⊙ b + β``;
    - ``nn.LayerNorm`` (and subclasses such as timm's ``LayerNorm``/``LayerNorm2d``), ``nn.GroupNorm`` and
      ``nn.BatchNorm1d/2d/3d`` with an affine: ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β`` (a batch norm ends in
      ``w ⊙ x̂ + b`` in training and in eval mode alike, so the fold is exact in both).

    The base layer needs a bias to absorb ``β``; a bias-free layer cannot be merged.

    Training memory. A plain ``out * γ + β`` makes autograd keep ``out`` (the pre-scale features) for ``γ``'s
    gradient: one extra activation per adapted layer, which put SSF at 2.1x the frozen model's activation bytes
    on ViT-B/16 (the *floor*, ``benchmarks/harness.py``). Two lean paths keep the math and the gradients:

    - after a norm (:class:`FoldedScaleShift`, chosen by :func:`scale_shift_for`): ``γ, β`` fold into the norm's
      affine during training (``w' = γ ⊙ w``, ``b' = γ ⊙ b + β``), so the norm's own backward gives their
      gradients from what it saves anyway (its input and statistics): nothing more is kept;
    - after anything else, in training (``recompute_from_output = True``): the output ``y = γ ⊙ out + β`` is kept
      instead and ``out = (y - β) / γ`` is recomputed in backward. Where the next operation keeps ``y`` anyway (the
      attention's q, k, v after ``qkv``, the GELU's input after ``fc1``) this costs nothing. Output and gradients
      equal the plain path's up to float rounding (tested at 1e-5 relative). The plain path is used when a ``γ`` is
      exactly 0 (``out`` could not be recovered) and when ``recompute_from_output`` is ``False``: set it on the
      modules when the host's output is modified in place afterwards (``nn.ReLU(inplace=True)`` right after a
      Linear), which a kept output cannot allow (backward then raises an error that says so).

    The outputs of the Linears that end a residual branch (a ViT block's ``attn.proj`` and ``mlp.fc2``, and the
    patch embedding) are kept by no frozen operation: they only join the residual sum. Keeping them put SSF at 1.20x
    the floor's activation bytes on ViT-B/16. Their ``γ``'s gradient ``Σ_t g_t ⊙ out_t`` needs them, and nothing
    cheaper than the Linear's product rebuilds them from the Linear's input (:class:`RecomputingScaleShift`, SSF's
    ``recompute_modules``, pays that product); but the residual sum itself gives them back: ``after = before + y``,
    and both ends are kept by the norms that read them, so :class:`ResidualScaleShift` reads
    ``out = (after - before - β) / γ`` in backward at the cost of three elementwise operations (SSF's default in
    timm ViT blocks, :class:`PreNormResidualTaps`).

    Args:
        dim: number of channels ``C``.
        channel_dim: the output axis that holds the channels: ``-1`` for token features ``(*, C)``, ``1`` for
            convolution outputs ``(B, C, *)`` (``(B, C, L)``, ``(B, C, H, W)``, ...).
        init_weights: ``True``: SSF's init, ``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)`` (not the identity);
            ``"identity"``: ``γ = 1``, ``β = 0``; ``False``: ``γ ~ N(1, 0.1²)``, ``β ~ N(0, 0.1²)``.

    Shapes:
        - output of the base layer: ``(*, C)`` for ``channel_dim=-1``, ``(B, C, *)`` for ``channel_dim=1``
        - ``scale`` (``γ``): ``(C,)``, ``shift`` (``β``): ``(C,)``
    """

    mergeable = True
    no_weight_decay = True
    recompute_from_output: bool = True

    def __init__(
        self,
        dim: int,
        *,
        channel_dim: int = -1,
        init_weights: InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        if init_weights == "identity":
            nn.init.ones_(self.scale)
            nn.init.zeros_(self.shift)
        else:
            std = 0.02 if init_weights is True else 0.1
            nn.init.normal_(self.scale, mean=1.0, std=std)
            nn.init.normal_(self.shift, std=std)

    def post(self, out: Tensor) -> Tensor:
        dim = self.scale.shape[0]
        if out.shape[self.channel_dim] != dim:
            raise ValueError(
                f"ScaleShift(dim={dim}, channel_dim={self.channel_dim}) got an output of shape {tuple(out.shape)} "
                f"with {out.shape[self.channel_dim]} channels on axis {self.channel_dim}; set dim to the number of "
                "channels, and channel_dim=-1 for (*, C) features or 1 for (B, C, *) convolution outputs"
            )
        shape = [1] * out.ndim
        shape[self.channel_dim] = dim
        scale, shift = self.scale.to(out.dtype).view(shape), self.shift.to(out.dtype).view(shape)
        lean = self.recompute_from_output and torch.is_grad_enabled() and self.scale.requires_grad
        if lean and bool((self.scale != 0).all()):
            return self._lean(out, scale, shift)
        return out * scale + shift

    def _lean(self, out: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``out ⊙ γ + β`` (``γ, β`` broadcast views, ``γ`` without zeros) keeping as little as this layer can."""
        return _ScaleShiftKeepsOutput.apply(out, scale, shift)

    @staticmethod
    def can_fold(module: nn.Module) -> bool:
        """Whether a ScaleShift after ``module`` can be merged into it (a per-channel affine with a bias)."""
        return _fold_problem(module) is None

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        weight, bias = self._affine_of(base)
        scale = self.scale.to(weight.dtype)
        weight.mul_(scale.view(-1, *[1] * (weight.ndim - 1)))
        bias.mul_(scale).add_(self.shift.to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        weight, bias = self._affine_of(base)
        if (self.scale == 0).any():
            raise ValueError(
                f"cannot unmerge ScaleShift from {type(base).__name__}: some scales γ are 0, so the folded weights "
                "lost the original values; reload the base weights instead"
            )
        scale = self.scale.to(weight.dtype)
        bias.sub_(self.shift.to(bias.dtype)).div_(scale)
        weight.div_(scale.view(-1, *[1] * (weight.ndim - 1)))

    def _affine_of(self, base: nn.Module) -> tuple[Tensor, Tensor]:
        """The base's ``(weight, bias)``, output channels on axis 0; raises if this adapter cannot fold into it."""
        name = type(base).__name__
        problem = _fold_problem(base)
        if problem is not None:
            raise ValueError(f"ScaleShift cannot be merged into {name}: {problem}")
        # nn.LayerNorm subclasses may be channel-first (timm's LayerNorm2d), so their axis is not checked.
        if isinstance(base, nn.Linear):
            axis = -1
        elif isinstance(base, nn.LayerNorm):
            axis = None
        else:
            axis = 1
        if axis is not None and self.channel_dim != axis:
            raise ValueError(
                f"ScaleShift(channel_dim={self.channel_dim}) cannot be merged into {name}, whose output channels "
                f"lie on axis {axis}; set channel_dim={axis}"
            )
        weight, bias = base.weight, base.bias
        if weight.shape[0] != self.scale.shape[0]:
            raise ValueError(
                f"ScaleShift(dim={self.scale.shape[0]}) cannot be merged into {name} with {weight.shape[0]} output "
                f"channels; set dim={weight.shape[0]}"
            )
        return weight, bias


class FoldedScaleShift(ScaleShift):
    """A :class:`ScaleShift` after a norm with an affine (LayerNorm, GroupNorm, BatchNorm): the same parameters,
    saved under the same names, folded into the norm's affine in the forward pass (``w' = γ ⊙ w``,
    ``b' = γ ⊙ b + β`` through :meth:`param_deltas`), so training keeps no activation beyond the norm's own."""

    post = AdapterModule.post  # no output transform: the scale-shift acts through the norm's parameters

    def param_deltas(self, base: nn.Module) -> dict[str, Tensor]:
        weight, bias = self._affine_of(base)
        scale = self.scale.to(weight.dtype) - 1
        return {"weight": weight * scale, "bias": bias * scale + self.shift.to(bias.dtype)}


class RecomputingScaleShift(ScaleShift):
    """A :class:`ScaleShift` after a frozen ``nn.Linear`` that keeps nothing of the Linear's output for backward:
    ``γ``'s gradient ``Σ_t g_t ⊙ out_t`` recomputes ``out = x Wᵀ + b`` from the Linear's input ``x``, and ``x`` from
    what the operation that made it keeps anyway (:func:`~modalpeft.core.layers.recompute.recompute_source`: a
    GELU's input before ``mlp.fc2``, a fused attention's output before ``attn.proj``, a norm's input before ``qkv``).

    For the Linears whose output no later operation keeps, the last ones of a residual branch (a ViT block's
    ``attn.proj`` and ``mlp.fc2``), where the plain :class:`ScaleShift` must keep that output: SSF's saved
    activations on ViT-B/16 go down to the floor's plus the patch embedding's output, for one more product of each
    such Linear per step (measured in ``benchmarks/results``, the candidate ``ssf_recompute``). After a Linear whose
    output the next operation keeps anyway (``qkv``, ``fc1``) the plain one costs nothing and this one a product.
    Chosen by SSF's ``recompute_modules``; the same parameters, file and merge as :class:`ScaleShift`.

    Falls back to the plain path (which keeps the output) when the Linear trains, when its input's producer keeps
    nothing that rebuilds it (then keeping ``x`` would cost as much as keeping ``out``), outside training and without
    gradients. Output bit for bit the plain path's; gradients equal up to float rounding (the recomputed LayerNorm
    output; tested at 1e-5 relative).
    """

    post = AdapterModule.post  # the scale-shift is applied by replace_base, with the Linear

    def replace_base(self, base: nn.Module, x: Tensor) -> Tensor:
        frozen = isinstance(base, nn.Linear) and not base.weight.requires_grad
        frozen = frozen and (base.bias is None or not base.bias.requires_grad)
        if frozen and torch.is_grad_enabled() and self.scale.requires_grad and self.channel_dim in (-1, x.ndim - 1):
            source = recompute_source(x)
            if source is not None:
                tensors, rebuild = source
                scale, shift = self.scale.to(x.dtype), self.shift.to(x.dtype)
                return _LinearScaleShift.apply(x, base.weight, base.bias, scale, shift, rebuild, *tensors)
        return ScaleShift.post(self, base(x))


class _LinearScaleShift(torch.autograd.Function):
    """``(x Wᵀ + b) ⊙ γ + β`` for a frozen ``W, b``, keeping for backward only ``source`` (what rebuilds ``x``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        scale: Tensor,
        shift: Tensor,
        rebuild: Callable[..., Tensor],
        *source: Tensor,
    ) -> Tensor:
        y = F.linear(x, weight, bias) * scale + shift  # as the plain path computes it, bit for bit
        ctx.rebuild, ctx.n, ctx.has_bias = rebuild, len(source), bias is not None
        ctx.save_for_backward(weight, scale, *source, *((bias,) if bias is not None else ()))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, scale, *rest = ctx.saved_tensors
        source, bias = rest[: ctx.n], rest[ctx.n] if ctx.has_bias else None
        axes = tuple(range(grad.ndim - 1))
        grad_x = (grad * scale) @ weight if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[3]:
            out = F.linear(ctx.rebuild(*source), weight, bias)
            grad_scale = (grad * out).sum(axes)
        grad_shift = grad.sum(axes) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_scale, grad_shift, None, *([None] * ctx.n)


class ResidualStep:
    """One residual step ``after = before + y`` whose branch ends in a :class:`ResidualScaleShift`'s output ``y``:
    the two ends of the stream, filled by :class:`PreNormResidualTaps` during the forward pass (they are the inputs
    of the norms around the step, which those norms keep for their own backward), and the graph node of ``y``."""

    __slots__ = ("after", "before", "keep", "node")

    def __init__(self, before: Tensor | None = None) -> None:
        self.before, self.after, self.node = before, None, None
        self.keep: Tensor | None = None
        """A drop path's per-sample factor ``r`` between ``y`` and the sum (``after = before + r ⊙ y``; 0 for a
        dropped sample, whose gradient is 0), read from the multiplication that keeps it; ``None``: no drop path."""


class ResidualScaleShift(ScaleShift):
    """A :class:`ScaleShift` after the Linear that ends a residual branch of a pre-norm block (a ViT block's
    ``attn.proj`` and ``mlp.fc2``): ``after = before + γ ⊙ out + β``. It keeps nothing of ``out`` or of its output
    for backward: ``γ``'s gradient ``Σ_t g_t ⊙ out_t`` reads ``out = (after - before - β) / γ`` from the two ends of
    the residual step, which the norms that read them keep anyway (``before``: the block's input, kept by
    ``norm1``; ``after``: ``norm2``'s input or the block's output, kept by the next norm). After timm's drop path,
    ``after = before + r ⊙ y`` with a per-sample ``r`` (0 or ``1 / keep``) that the multiplication keeps and the
    graph gives back: ``y = (after - before) / r`` where ``r ≠ 0`` (a dropped sample's gradient is 0). The lean path
    the plain :class:`ScaleShift` cannot take there (no operation keeps that output), at three elementwise
    operations in backward instead of the Linear's product that :class:`RecomputingScaleShift` redoes.

    Bound to its block by :class:`PreNormResidualTaps` (``tap``), which checks at every forward pass that the
    block's sum is ``before + y`` and raises an error if it is not. Outside such a block, without gradients, with a
    ``γ`` exactly 0, or with ``recompute_from_output = False`` it is the plain :class:`ScaleShift`. Output bit for
    bit the plain path's; ``γ``'s gradient differs from the plain path's by the rounding of ``after - before``
    (at most half an ulp of ``after`` per entry; within 1e-5 relative on ViT-B/16, tested). Same parameters, file
    and merge as :class:`ScaleShift`.
    """

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, **kwargs)
        self.tap: ResidualTap | None = None

    def _lean(self, out: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        step = self.tap.current if self.tap is not None else None
        if step is None or step.before is None:  # not inside its block's forward: keep the output
            return super()._lean(out, scale, shift)
        y = _ScaleShiftFromResidual.apply(out, scale, shift, step)
        step.node = y.grad_fn
        return y


class ResidualTap:
    """Where a :class:`ResidualScaleShift` finds the residual step of the current forward pass (``current``)."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: ResidualStep | None = None


class _ScaleShiftFromResidual(torch.autograd.Function):
    """``y = out ⊙ γ + β``, keeping nothing per token: backward reads ``out = (after - before - β) / γ`` from the
    residual step's two ends (``step``), which the norms around it keep."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, scale: Tensor, shift: Tensor, step: ResidualStep) -> Tensor:
        y = out * scale + shift  # as the plain path computes it, bit for bit
        ctx.step = step
        ctx.save_for_backward(scale, shift)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale, shift = ctx.saved_tensors
        step, ctx.step = ctx.step, None
        grads = _scale_shift_grads(ctx.needs_input_grad, grad, scale, shift, lambda: _added(step))
        step.before = step.after = None  # this step's ends are not needed any more
        return *grads, None


def _added(step: ResidualStep) -> Tensor:
    """What the residual step added to the stream, ``y = after - before`` (``/ r`` after a drop path)."""
    if step.after is None or step.before is None:
        raise RuntimeError(
            "a ResidualScaleShift (SSF) found no residual sum after its output in this forward pass, so it cannot "
            "rebuild that output for γ's gradient; the block it was bound to did not run its residual step (set "
            "`module.recompute_from_output = False` on it to keep the output instead)"
        )
    added = step.after - step.before
    if step.keep is not None:  # y for the kept samples; a dropped sample's gradient is 0 whatever y is
        added = torch.where(step.keep != 0, added / step.keep, 0.0)
    return added


def _scale_shift_grads(
    needs: tuple[bool, ...], grad: Tensor, scale: Tensor, shift: Tensor, output: Callable[[], Tensor]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of ``y = out ⊙ γ + β`` for ``(out, γ, β)`` (``γ, β`` broadcast views), with ``out`` rebuilt as
    ``(y - β) / γ`` from ``output()`` (``y``, asked for only when ``γ`` needs its gradient)."""
    axes = [i for i in range(grad.ndim) if scale.shape[i] == 1]
    grad_out = grad * scale if needs[0] else None
    grad_scale = (grad * ((output() - shift) / scale)).sum(axes, keepdim=True) if needs[1] else None
    grad_shift = grad.sum(axes, keepdim=True) if needs[2] else None
    return grad_out, grad_scale, grad_shift


def _check_residual_sum(total: Tensor, step: ResidualStep, where: str) -> None:
    """Raise unless ``total`` is ``step.before + y`` or ``step.before + r ⊙ y`` with a per-sample ``r`` (timm's drop
    path: then ``step.keep = r``), read from the graph: an addition node fed by ``before``'s node and ``y``'s (or a
    multiplication of ``y`` by a tensor of shape ``(B, 1, ..., 1)``)."""
    node = total.grad_fn
    before = step.before.grad_fn if step.before is not None else None
    inputs = [fn for fn, _ in node.next_functions] if type(node).__name__ == "AddBackward0" else []
    alpha = getattr(node, "_saved_alpha", 1) if inputs else None
    for fn in inputs if step.node not in inputs else ():
        if type(fn).__name__ == "MulBackward0" and fn.next_functions[0][0] is step.node:
            keep = fn._saved_other
            if keep.ndim == total.ndim and keep.shape[0] == total.shape[0] and keep[0].numel() == 1:
                step.keep = keep
                inputs = [step.node if f is fn else f for f in inputs]
    if len(inputs) != 2 or alpha != 1 or step.node not in inputs or (before is not None and before not in inputs):
        raise RuntimeError(
            f"{where} is not the residual sum `before + y` that the ResidualScaleShift (SSF) bound to this block "
            "rebuilds its output from (its graph node is "
            f"{type(node).__name__ if node is not None else None}); the block's forward is not the pre-norm form "
            "`x = x + f(norm1(x)); x = x + g(norm2(x))` (a layer scale?): set "
            "`recompute_from_output = False` on its ScaleShift modules, or adapt it with SSFConfig(from_residual="
            "False)"
        )


class PreNormResidualTaps:
    """Binds the :class:`ResidualScaleShift` modules that end the two residual branches of a pre-norm block
    (``x_mid = x + f(norm1(x))``, ``x_out = x_mid + g(norm2(x_mid))``, timm's ViT ``Block``) to the block's
    residual stream, through three forward hooks: the block's input (``before`` of the first step), ``norm2``'s
    input (``after`` of the first, ``before`` of the second) and the block's output (``after`` of the second). The
    hooks hold these tensors only from the forward pass to the backward of the step (the norms keep them over that
    time anyway) and do nothing when the adapters do not run (another adapter active, merged, disabled, no
    gradients). Built by :meth:`bind`; ``first``/``second`` may be ``None`` (that branch has no such adapter). The
    hooks follow the block through ``copy.deepcopy`` (bound to the copy's own adapters); after ``merge_and_unload``
    they stay on the block, inert (they only hand tensors to adapters that no longer run)."""

    def __init__(self, first: ResidualScaleShift | None, second: ResidualScaleShift | None) -> None:
        self.first, self.second = first, second
        for adapter in (first, second):
            if adapter is not None:
                adapter.tap = ResidualTap()

    @classmethod
    def bind(
        cls, block: nn.Module, mid: nn.Module, first: ResidualScaleShift | None, second: ResidualScaleShift | None
    ) -> PreNormResidualTaps:
        """Hook ``block`` and ``mid`` (its second norm, whose input is ``x_mid``)."""
        taps = cls(first, second)
        block.register_forward_pre_hook(taps.block_input)
        mid.register_forward_pre_hook(taps.mid_input)
        block.register_forward_hook(taps.block_output)
        return taps

    def _open(self, adapter: ResidualScaleShift | None, before: Tensor) -> None:
        if adapter is not None and adapter.tap is not None:
            adapter.tap.current = ResidualStep(before) if torch.is_grad_enabled() else None

    def _close(self, adapter: ResidualScaleShift | None, after: Tensor, where: str) -> None:
        step = adapter.tap.current if adapter is not None and adapter.tap is not None else None
        if step is None or step.node is None:  # the adapter did not take the lean path in this pass
            return
        _check_residual_sum(after, step, where)
        step.after = after

    def block_input(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            self._open(self.first, args[0])

    def mid_input(self, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            self._close(self.first, args[0], "the input of the block's second norm")
            self._open(self.second, args[0])

    def block_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            self._close(self.second, output, "the block's output")
        for adapter in (self.first, self.second):  # the steps live on in their graph nodes only
            if adapter is not None and adapter.tap is not None:
                adapter.tap.current = None


def scale_shift_for(
    base: nn.Module, dim: int, *, channel_dim: int = -1, init_weights: InitMode = True, recompute: bool = False
) -> ScaleShift:
    """The :class:`ScaleShift` to place after ``base``: :class:`FoldedScaleShift` after a norm it folds into,
    :class:`RecomputingScaleShift` after a Linear with ``recompute``, the plain one otherwise (same parameters and
    file in every case)."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    base = base.base_layer if isinstance(base, AdapterLayer) else base
    if isinstance(base, norms) and ScaleShift.can_fold(base):
        cls: type[ScaleShift] = FoldedScaleShift
    elif recompute:
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"a recomputing ScaleShift goes after an nn.Linear, not a {type(base).__name__}: only a Linear's "
                "output is recomputed in backward; leave this layer out of recompute_modules"
            )
        cls = RecomputingScaleShift
    else:
        cls = ScaleShift
    return cls(dim, channel_dim=channel_dim, init_weights=init_weights)


class _ScaleShiftKeepsOutput(torch.autograd.Function):
    """``y = out ⊙ γ + β`` (``γ, β`` broadcast views), keeping ``y`` for backward instead of ``out``, which backward
    recomputes as ``(y - β) / γ``."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        y = out * scale + shift  # as the plain path computes it, bit for bit
        ctx.save_for_backward(y, scale, shift)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        try:
            y, scale, shift = ctx.saved_tensors
        except RuntimeError as err:
            raise RuntimeError(
                "a ScaleShift (SSF) keeps its output for backward, and that output was modified in place afterwards "
                "(an inplace activation such as nn.ReLU(inplace=True) after the adapted layer?); set "
                "`module.recompute_from_output = False` on the model's ScaleShift modules, or make that operation "
                "out of place"
            ) from err
        return _scale_shift_grads(ctx.needs_input_grad, grad, scale, shift, lambda: y)


FOLDABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)
"""Module types whose output ends in a per-channel affine (when built with one, and with a bias)."""


def _fold_problem(module: nn.Module) -> str | None:
    """Why a per-channel affine on ``module``'s output cannot be folded into it, or ``None`` if it can."""
    if not isinstance(module, FOLDABLE_TYPES):
        return (
            "only nn.Linear, nn.Conv1d/2d/3d, nn.LayerNorm (and its subclasses), nn.GroupNorm and nn.BatchNorm1d/2d/3d "
            "end in a per-channel affine; keep this adapter unmerged"
        )
    if module.weight is None:
        return "it has no affine weight to absorb the scale γ; build it with an affine, or keep this adapter unmerged"
    if module.bias is None:
        return (
            "it has no bias to absorb the shift β; build it with bias=True (a zero bias changes nothing), or keep "
            "this adapter unmerged"
        )
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return (
            f"it normalises over {len(module.normalized_shape)} axes {tuple(module.normalized_shape)}, not one "
            "channel axis; keep this adapter unmerged"
        )
    return None
