"""IncreLoRA: ranks that grow where importance is high (Zhang et al., 2023, https://arxiv.org/abs/2308.12043).

Official code: FeiyuZhang98/IncreLoRA (``loralib/loralib/increlora.py``: ``SVDLinear``, ``RankAllocator``,
``compute_orth_regu``; ``NLU/scripts/rank=2/run_cola.sh``). Each targeted ``nn.Linear`` gets an SVD-form update of
``ρ`` rank-1 pieces, ``ΔW = α / (ρ + 10⁻⁵) · B (A ⊙ E)``, starting at ``ρ = init_rank`` (official ``lora_r`` 1) with
``A``, ``B ~ N(0, 0.02²)`` and ``E = 0`` (the model starts unchanged), plus ``incre_rank_num`` reserve pieces whose
``A``, ``B`` learn in advance while their ``e`` stays ``10⁻⁵`` (``advance_learn``). During training
(:class:`RankAllocator`, run after each optimiser step by ``modalpeft.lightning.RankGrowth``, which the Lightning
tasks add for this method) each module's importance ``I = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel`` is smoothed,
``Ī ← β₁ Ī + (1 − β₁) I``, ``Ū ← β₂ Ū + (1 − β₂) |I − Ī|``; every ``incre_interval`` steps after ``init_warmup`` the
``top_h`` modules of highest ``Ī·Ū`` activate ``incre_rank_num`` reserve pieces (their ``e`` trains from then on)
and get a new reserve, until the total rank reaches ``target_rank`` x the number of modules; then the reserves stop
contributing. The loss gets ``orth_reg · mean_pieces ‖P Pᵀ − I‖_F`` (:meth:`IncreLoRAConfig.training_penalty`, per
rank-1 piece as the official ``compute_orth_regu``). The grown adapter saves (``rank`` and ``reserve`` per module are
saved buffers), loads and merges like any low-rank one.

Deviation (the spec's implementation note): every module's capacity (``max_rank`` plus the reserve) is allocated at
the start and the pieces are switched on by a mask, so shapes and the optimiser never change; the official code
appends parameters and adds an optimiser group at each growth, which restarts Adam's bias correction for them.
Inactive pieces get no gradient, so Adam leaves them as they are (with ``weight_decay = 0``, the official setting).
A module already at ``max_rank`` is skipped when chosen.

Trainable count (allocated): ``Σ_modules (max_rank + reserve) · (d_in + d_out + 1)``; the effective adapter is
``Σ_modules ρ_m · (d_in + d_out + 1)`` (:func:`effective_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets, hosts
from ..layers.growing import GrowingLowRank
from ..registry import register_method

INCRE_RANK_NUM = {2: 1, 4: 2, 6: 3, 8: 4}
"""The official pieces added per growth for an average target rank (``rank_dic``)."""


@dataclass
class IncreLoRAConfig(AdapterConfig):
    """IncreLoRA (registered as ``"increlora"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    init_rank: int = field(default=1, metadata=_help("Rank of every module at the start (official lora_r: 1)."))
    target_rank: int = field(default=2, metadata=_help("Average final rank: the budget is target_rank x modules."))
    max_rank: int = field(default=8, metadata=_help("Largest rank one module may reach (capacity allocated up front)."))
    alpha: float = field(default=32.0, metadata=_help("alpha; the update is scaled by alpha / rank (official: 32)."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the branch input."))
    incre_rank_num: int | None = field(
        default=None, metadata=_help("Pieces added per growth; None: the official map {2: 1, 4: 2, 6: 3, 8: 4}.")
    )
    top_h: int = field(default=3, metadata=_help("Modules that grow at each growth step (official: 3)."))
    incre_interval: int = field(default=100, metadata=_help("Optimiser steps between growths (official CoLA: 100)."))
    init_warmup: int = field(default=100, metadata=_help("Steps before the first growth (official CoLA: 100)."))
    advance_learn: bool = field(default=True, metadata=_help("Reserve pieces learn A, B before they are activated."))
    beta1: float = field(default=0.85, metadata=_help("Smoothing of the importance (official: 0.85)."))
    beta2: float = field(default=0.85, metadata=_help("Smoothing of its uncertainty (official: 0.85)."))
    orth_reg: float = field(default=0.1, metadata=_help("Weight of the orthogonal regulariser (official: 0.1)."))

    grows_rank: ClassVar[bool] = True
    """The Lightning tasks add ``modalpeft.lightning.RankGrowth`` for a config that says so."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_rank", "target_rank", "max_rank", "top_h", "incre_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1.")
        if not self.init_rank <= self.target_rank <= self.max_rank:
            raise ValueError(
                f"init_rank={self.init_rank}, target_rank={self.target_rank}, max_rank={self.max_rank}: the budget "
                "needs init_rank <= target_rank <= max_rank; raise max_rank or lower target_rank."
            )
        if self.incre_rank_num is None and self.target_rank not in INCRE_RANK_NUM:
            raise ValueError(
                f"target_rank={self.target_rank} has no official incre_rank_num ({INCRE_RANK_NUM}); set incre_rank_num."
            )
        if self.incre_rank_num is not None and self.incre_rank_num < 1:
            raise ValueError(f"incre_rank_num={self.incre_rank_num!r} must be >= 1, or None for the official map.")
        if self.init_warmup < 0 or not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1 or self.orth_reg < 0:
            raise ValueError("init_warmup and orth_reg must be >= 0, beta1 and beta2 in (0, 1).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")

    @property
    def pieces_per_growth(self) -> int:
        return self.incre_rank_num if self.incre_rank_num is not None else INCRE_RANK_NUM[self.target_rank]

    def training_penalty(self, model: nn.Module) -> Tensor:
        """``orth_reg · mean over pieces ‖P Pᵀ − I‖_F``: the first ``init_rank`` rows of ``A`` (columns of ``B``) as
        one piece, then each later active or reserve row (column) on its own, as the official parameter lists."""
        terms = []
        for layer in growing_layers(model):
            used = int(layer.rank + layer.reserve)
            for P in (layer.A[:used], layer.B[:, :used].t()):  # rows are pieces
                first = P[: self.init_rank]
                eye = torch.eye(first.shape[0], device=P.device, dtype=P.dtype)
                terms.append(torch.linalg.matrix_norm(first @ first.t() - eye))
                terms.extend((P[self.init_rank :].square().sum(1) - 1).abs())  # ‖p pᵀ − 1‖ of a rank-1 piece
        if not terms:
            return torch.zeros(())
        return self.orth_reg * torch.stack([t.reshape(()) for t in terms]).mean()


def growing_layers(model: nn.Module) -> list[GrowingLowRank]:
    """The active adapter's IncreLoRA layers, in model order."""
    out = []
    for _, host in hosts(model):
        name = host.active_adapter
        if name in host.adapters and isinstance(host.adapters[name], GrowingLowRank):
            out.append(host.adapters[name])
    return out


def effective_parameters(model: nn.Module) -> int:
    """``Σ ρ_m (d_in + d_out + 1)``: the parameters of the active pieces (the adapter as the paper counts it)."""
    return sum(int(layer.rank) * (layer.A.shape[1] + layer.B.shape[0] + 1) for layer in growing_layers(model))


@register_method("increlora", IncreLoRAConfig, mergeable=True, paper="https://arxiv.org/abs/2308.12043")
def apply_increlora(
    model: nn.Module, config: IncreLoRAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    reserve = config.pieces_per_growth if config.advance_learn else 0
    for name, linear in find_targets(model, config, types=(nn.Linear,)):
        layer = GrowingLowRank(
            linear.in_features,
            linear.out_features,
            config.max_rank + config.pieces_per_growth,
            config.init_rank,
            reserve,
            alpha=config.alpha,
            dropout=config.dropout,
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)


class RankAllocator:
    """IncreLoRA's schedule: importance smoothing and growth, after each optimiser step (official ``RankAllocator``).

    Args:
        model: the adapted model.
        config: its :class:`IncreLoRAConfig`.
        total_steps: the optimiser steps of the run, to check that the schedule reaches the budget in time.

    Raises:
        ValueError: the growth schedule needs more steps than the run has (names the numbers and the fix).
    """

    def __init__(self, model: nn.Module, config: IncreLoRAConfig, total_steps: int) -> None:
        self.layers = growing_layers(model)
        if not self.layers:
            raise ValueError("RankAllocator: the model holds no IncreLoRA layer; adapt it with IncreLoRAConfig first.")
        self.config = config
        self.target_total = config.target_rank * len(self.layers)
        self.total = sum(int(layer.rank) for layer in self.layers)
        per_round = config.top_h * config.pieces_per_growth
        rounds = math.ceil(max(self.target_total - self.total, 0) / per_round)
        needed = config.init_warmup + rounds * config.incre_interval
        if needed > total_steps:
            raise ValueError(
                f"the IncreLoRA growth schedule needs {needed} steps (init_warmup={config.init_warmup} + {rounds} "
                f"growths x incre_interval={config.incre_interval} to grow from rank {self.total} to the budget "
                f"{self.target_total}) but the run has {total_steps}: lower incre_interval or init_warmup, raise "
                "top_h or incre_rank_num, or train longer."
            )
        self.ipt = torch.zeros(len(self.layers), dtype=torch.float64)
        self.unc = torch.zeros(len(self.layers), dtype=torch.float64)
        self.done = self.total >= self.target_total
        for layer in self.layers:
            layer.tracking = not self.done

    def step(self, global_step: int) -> list[int]:
        """Smooth the scores recorded in the last backward pass and grow when the schedule says so; returns the
        indices of the modules that grew."""
        if self.done:
            return []
        scores = torch.tensor([float(layer.score) if layer.score is not None else 0.0 for layer in self.layers])
        b1, b2 = self.config.beta1, self.config.beta2
        self.ipt = b1 * self.ipt + (1 - b1) * scores.double()
        self.unc = b2 * self.unc + (1 - b2) * (scores.double() - self.ipt).abs()
        if global_step <= self.config.init_warmup or global_step % self.config.incre_interval:
            return []
        importance = self.ipt * self.unc
        k = min(self.config.top_h, self.target_total - self.total, len(self.layers))
        threshold = torch.topk(importance, k).values[-1]
        grown = []
        for i, layer in enumerate(self.layers):
            if importance[i] >= threshold and layer.rank < layer.capacity:
                self.total += layer.grow(self.config.pieces_per_growth)
                grown.append(i)
        if self.total >= self.target_total:
            self.done = True
            for layer in self.layers:
                layer.end_growth()
        return grown
