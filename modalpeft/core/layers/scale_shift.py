"""Scale and shift of features, ``y = γ ⊙ x + β`` per channel, with exact folding (SSF).

SSF: Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022,
https://arxiv.org/abs/2210.08823.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode


class ScaleShift(AdapterModule):
    """A per-channel affine map on the host's output: ``y = γ ⊙ base(x) + β``.

    SSF places one after most layers of a ViT (patch embedding, qkv, proj, fc1, fc2, the norms). The map merges
    exactly into the base layer when that layer ends in a per-channel affine (see :meth:`can_fold`):

    - ``nn.Linear`` and ``nn.Conv{1,2,3}d``: ``W' = diag(γ) W`` (output channels scaled), ``b' = γ ⊙ b + β``;
    - ``nn.LayerNorm`` (and subclasses such as timm's ``LayerNorm``/``LayerNorm2d``), ``nn.GroupNorm`` and
      ``nn.BatchNorm1d/2d/3d`` with an affine: ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β`` (a batch norm ends in
      ``w ⊙ x̂ + b`` in training and in eval mode alike, so the fold is exact in both).

    The base layer needs a bias to absorb ``β``; a bias-free layer cannot be merged.

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
        return out * self.scale.to(out.dtype).view(shape) + self.shift.to(out.dtype).view(shape)

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
