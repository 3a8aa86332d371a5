"""A low-rank update in SVD form whose rank grows during training (IncreLoRA).

IncreLoRA: Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
2023, https://arxiv.org/abs/2308.12043.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..layer import AdapterModule, InitMode
from .dropout import MaskDropout

RESERVE_VALUE = 1e-5
"""The frozen singular value of a reserve piece (the official ``add_reserve_param``'s ``e``)."""


class GrowingLowRank(AdapterModule):
    """``y = W x + α / (ρ + 10⁻⁵) · B (A ⊙ e) drop(x)`` with ``ρ`` active rank-1 pieces out of a fixed capacity.

    Pieces ``i < ρ`` are active (``A_i``, ``B_i``, ``E_i`` train); the next ``reserve`` pieces are IncreLoRA's
    "advance learning" reserve: ``A_i``, ``B_i`` train while ``e_i`` stays frozen at ``E_i`` (``10⁻⁵`` at the
    start); the pieces after them contribute nothing (``e_i = 0``, so they get no gradient). :meth:`grow` activates
    reserve pieces (their ``E`` trains from then on). The capacity is allocated up front so that shapes, saving and
    the optimiser never change; ``rank`` and ``reserve`` are persistent buffers, saved with the tensors.

    While ``tracking`` is on (the growth phase, in training mode), the branch forms ``ΔW`` (as the official
    ``loraW`` module does) and records the module's importance ``score = Σ |ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW)`` in the
    backward pass (the official full-backward hook); otherwise it runs in factored form.

    Args:
        in_features: ``d_in``.
        out_features: ``d_out``.
        capacity: the most pieces the module can hold (its largest rank plus the reserve).
        init_rank: ``ρ`` at the start (official ``lora_r``: 1).
        reserve: reserve pieces after the active ones (official: ``incre_rank_num`` with ``advance_learn``, else 0).
        alpha: ``α`` (official ``lora_alpha``: 32 on GLUE).
        dropout: dropout on the branch input.
        init_weights: ``True``: ``A``, ``B ~ N(0, 0.02²)``, active ``E = 0``, reserve ``E = 10⁻⁵`` (official);
            ``"identity"``: the same with reserve ``E = 0`` (exactly the base output, no advance learning before the
            first growth); ``False``: active ``E`` random too.

    Shapes:
        - input: ``(*, d_in)``
        - output: ``(*, d_out)``
        - ``A``: ``(capacity, d_in)``, ``E``: ``(capacity, 1)``, ``B``: ``(d_out, capacity)``
    """

    mergeable = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        init_rank: int,
        reserve: int,
        *,
        alpha: float,
        dropout: float = 0.0,
        init_weights: InitMode = True,
    ) -> None:
        super().__init__()
        assert init_rank >= 1 and init_rank + reserve <= capacity, (init_rank, reserve, capacity)
        self.alpha = alpha
        self.A = nn.Parameter(torch.empty(capacity, in_features))
        self.E = nn.Parameter(torch.empty(capacity, 1))
        self.B = nn.Parameter(torch.empty(out_features, capacity))
        self.register_buffer("rank", torch.tensor(init_rank))
        self.register_buffer("reserve", torch.tensor(reserve))
        self.drop = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.tracking = False
        self.score: Tensor | None = None
        self._delta: Tensor | None = None
        self.reset_adapter(init_weights)

    @torch.no_grad()
    def reset_adapter(self, init_weights: InitMode = True) -> None:
        nn.init.normal_(self.A, std=0.02)
        nn.init.normal_(self.B, std=0.02)
        advance = init_weights != "identity" and int(self.reserve) > 0  # no reserve: pieces start at e = 0
        self.E.fill_(RESERVE_VALUE if advance else 0.0)
        self.E[: int(self.rank)] = 0.0
        if init_weights is False:
            nn.init.normal_(self.E[: int(self.rank)], std=0.5)

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    def values(self) -> Tensor:
        """The effective ``e`` (``(capacity, 1)``): ``E`` on active pieces, frozen ``E`` on reserve ones, else 0."""
        i = torch.arange(self.capacity, device=self.E.device)[:, None]
        rank, reserve = self.rank, self.rank + self.reserve
        return torch.where(i < rank, self.E, torch.where(i < reserve, self.E.detach(), torch.zeros_like(self.E)))

    def scaling(self) -> Tensor:
        return self.alpha / (self.rank.to(self.E.dtype) + 1e-5)

    def delta_weight(self) -> Tensor:
        return (self.B @ (self.A * self.values())) * self.scaling()

    def parallel(self, x: Tensor) -> Tensor:
        x = self.drop(x)
        if self.tracking and self.training and torch.is_grad_enabled():
            delta = self.delta_weight()
            self._delta = delta.detach()
            delta.register_hook(self._record_score)
            return x @ delta.t()
        return ((x @ (self.A * self.values()).t()) @ self.B.t()) * self.scaling()

    def _record_score(self, grad: Tensor) -> None:
        self.score = ((self._delta.abs() * grad).abs().sum() / math.sqrt(grad.numel())).detach()
        self._delta = None

    @torch.no_grad()
    def grow(self, pieces: int) -> int:
        """Activate up to ``pieces`` more pieces (the reserve first); the reserve keeps its size while capacity
        allows. Returns how many were activated."""
        added = min(pieces, self.capacity - int(self.rank))
        self.rank += added
        self.reserve.fill_(min(int(self.reserve), self.capacity - int(self.rank)))
        return added

    @torch.no_grad()
    def end_growth(self) -> None:
        """The budget is reached: the reserve pieces stop contributing (the official zeroing of their ``e``)."""
        self.reserve.zero_()
        self.tracking = False
