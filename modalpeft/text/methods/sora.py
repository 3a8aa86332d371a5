"""SoRA: sparse low-rank adaptation (Ding et al., EMNLP 2023, https://arxiv.org/abs/2311.11696).

Official code: TsinghuaC3I/SoRA (``src/lora.py``, ``src/sparse_optimizer.py``, ``src/trainer.py``, ``run_glue.py``).

A LoRA branch with a gate between its factors, on every Linear of every transformer block (the official
``q, k, v, proj, w1, w2``; found by structure here):

    y = W x + s · B (g ⊙ (A drop(x))),

``A ∈ R^{r x d_in}`` kaiming-uniform, ``B ∈ R^{d_out x r}`` zero, ``g ∈ R^{1 x r} ~ N(0, 1)``, ``s = alpha / r``.
What makes it SoRA is how ``g`` trains (:class:`GateAdamW`): an Adam step on the gates with their own learning
rate, then a proximal thresholding with ``ξ = gate_threshold`` (the official ``sparse_lambda_2``), plus an L1
term ``η · Σ|g| / #g`` in the loss (``η = gate_l1``, the official ``sparse_lambda``; :func:`gate_l1_penalty`).
Gates driven to exactly zero switch their rank off; :func:`prune_sora` then drops those ranks into a smaller
adapter (a per-module ``rank_pattern``, saved in its config) that saves, loads and merges like any LoRA-shaped
one: ``ΔW = s · B diag(g) A``.

Trainable count: per module ``r·(d_in + d_out) + r``; after pruning ``Σ r_eff·(d_in + d_out + 1)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...core.config import AdapterConfig, _help
from ...core.inject import attach, find_targets, hosts
from ...core.layers import LowRankDelta
from ...core.model import AdaptedModel
from ...core.registry import register_method
from ..structure import find_blocks


@dataclass
class SoRAConfig(AdapterConfig):
    """SoRA (registered as ``"sora"``). ``target_modules=None``: every Linear inside the transformer blocks."""

    rank: int = field(default=8, metadata=_help("r_max, the rank each module starts with (official: 8)."))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha; the branch is scaled by alpha / rank."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the branch input."))
    gate_l1: float = field(
        default=10.0, metadata=_help("eta: weight of the L1 term on the gates in the loss (official sparse_lambda).")
    )
    gate_threshold: float = field(
        default=3e-4,
        metadata=_help("xi: proximal threshold applied to the gates after each step (official sparse_lambda_2)."),
    )
    gate_lr: float | None = field(default=None, metadata=_help("Learning rate of the gates; None: the main one."))
    rank_pattern: dict[str, int] | None = field(
        default=None,
        metadata=_help("Per-module ranks after pruning (module name -> rank; 0: no adapter there); set by prune_sora."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an integer >= 1 (official: 8).")
        for name in ("gate_l1", "gate_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1).")
        bad = {k: v for k, v in (self.rank_pattern or {}).items() if not 0 <= v <= self.rank}
        if bad:
            raise ValueError(f"rank_pattern entries {bad} must lie in [0, rank={self.rank}].")

    def training_penalty(self, model: nn.Module) -> Tensor:
        """The L1 term SoRA adds to the loss (used by the Lightning tasks)."""
        return gate_l1_penalty(model, self.gate_l1)

    def build_optimizer(self, model: nn.Module, groups: list[dict], lr: float) -> torch.optim.Optimizer:
        """One :class:`GateAdamW` over the task's parameter groups: the gates leave them for a group of their own
        (``gate_lr``, no weight decay, threshold ``gate_threshold``, eps 1e-6 as the official ``SparseAdamW``);
        the rest keep AdamW's step without threshold (eps 1e-8, torch's and the official Trainer's)."""
        gate_params = [g for g in gates(model) if g.requires_grad]
        gate_ids = {id(g) for g in gate_params}
        out = []
        for group in groups:
            params = [p for p in group["params"] if id(p) not in gate_ids]
            if params:
                out.append({**group, "params": params, "threshold": 0.0, "eps": 1e-8})
        if gate_params:
            gate_lr = lr if self.gate_lr is None else self.gate_lr
            out.append({"params": gate_params, "lr": gate_lr, "weight_decay": 0.0, "threshold": self.gate_threshold})
        return GateAdamW(out, lr=lr)


def _targets(model: nn.Module, config: SoRAConfig) -> list[tuple[str, nn.Module]]:
    if config.target_modules is not None:
        return find_targets(model, config, types=(nn.Linear,))
    prefixes = tuple(b.name + "." for b in find_blocks(model, "sora"))
    return find_targets(model, config, default=lambda n, m: n.startswith(prefixes), types=(nn.Linear,))


@register_method("sora", SoRAConfig, modality="text", mergeable=True, paper="https://arxiv.org/abs/2311.11696")
def apply_sora(
    model: nn.Module, config: SoRAConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    pattern = config.rank_pattern or {}
    for name, linear in _targets(model, config):
        rank = pattern.get(name, config.rank)
        if rank == 0:
            continue
        layer = LowRankDelta(
            linear.in_features,
            linear.out_features,
            rank,
            scaling=config.alpha / config.rank,
            dropout=config.dropout,
            gated=True,
            init_weights=config.init_weights,
        )
        attach(model, name, adapter_name, layer)


def gates(model: nn.Module, adapter_name: str | None = None) -> list[Tensor]:
    """The gate vectors of the (active) SoRA adapter, one per adapted module."""
    name = adapter_name or getattr(model, "active_adapter", None)
    found = []
    for _, host in hosts(model):
        if name in host.adapters and getattr(host.adapters[name], "gate", None) is not None:
            found.append(host.adapters[name].gate)
    return found


def gate_l1_penalty(model: nn.Module, weight: float, adapter_name: str | None = None) -> Tensor:
    """``η · Σ|g| / #g`` over every gate entry (official ``SparseTrainerMixin.compute_loss``)."""
    params = gates(model, adapter_name)
    if not params:
        raise ValueError("no SoRA gates in the model: adapt it with SoRAConfig first.")
    total = sum(p.abs().sum() for p in params)
    return weight * total / sum(p.numel() for p in params)


class GateAdamW(torch.optim.Optimizer):
    """The official ``SparseAdamW`` step: AdamW (bias-corrected, decoupled decay, eps 1e-6) then the threshold.

    After the Adam update, with ``ξ = threshold``, the official code runs, in this order,
    ``g[g > ξ] -= ξ``, ``g[g < -ξ] += ξ``, ``g[|g| < ξ] = 0``. The last step also zeroes entries that the first
    two moved below ξ, so ``|g| < 2ξ`` becomes 0 and larger entries shrink by ξ: not quite the paper's
    soft-threshold ``sign(g)·max(|g| − ξ, 0)`` (which zeroes only ``|g| <= ξ``); the official rule is kept.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        threshold: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "threshold": threshold, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            xi = group["threshold"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = group["lr"] * (1 - beta2 ** state["step"]) ** 0.5 / (1 - beta1 ** state["step"])
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"]) * -step_size
                if group["weight_decay"] > 0:
                    update = update - group["lr"] * group["weight_decay"] * p
                p.add_(update)
                if xi > 0:
                    p[p > xi] -= xi
                    p[p < -xi] += xi
                    p[p.abs() < xi] = 0.0
        return loss


def prune_sora(model: AdaptedModel, adapter_name: str | None = None) -> dict[str, int]:
    """Drop every rank whose gate is exactly zero; the adapter is rebuilt with a ``rank_pattern`` and keeps its
    function exactly (a zero gate contributes nothing). Returns the pattern (module -> kept rank).
    """
    name = adapter_name or model.active_adapter
    config = model.peft_config.get(name)
    if not isinstance(config, SoRAConfig):
        raise ValueError(f"adapter {name!r} is not a SoRA adapter ({type(config).__name__}); nothing to prune.")
    if any(name in h.merged for _, h in hosts(model.base_model)):
        raise ValueError(f"adapter {name!r} is merged; unmerge_adapter() before pruning.")
    state = model.adapter_state_dict(name)
    pattern: dict[str, int] = {}
    for module, host in hosts(model.base_model):
        if name not in host.adapters or not isinstance(host.adapters[name], LowRankDelta):
            continue
        adapter = host.adapters[name]
        keep = adapter.gate.detach()[0] != 0
        pattern[module] = int(keep.sum())
        prefix = f"{module}.adapters."
        state[prefix + "A"] = state[prefix + "A"][keep]
        state[prefix + "B"] = state[prefix + "B"][:, keep]
        state[prefix + "gate"] = state[prefix + "gate"][:, keep]
        if pattern[module] == 0:
            for key in ("A", "B", "gate"):
                del state[prefix + key]
    pruned = dataclasses.replace(config, rank_pattern=pattern)
    active = model.active_adapter
    model.delete_adapter(name)
    model.add_adapter(name, pruned)
    model.load_adapter_state(state, name)
    if active is not None and active != name:
        model.set_adapter(active)
    return pattern


__all__ = ["GateAdamW", "SoRAConfig", "gate_l1_penalty", "gates", "prune_sora"]
