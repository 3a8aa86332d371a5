"""SVFit: fine-tune the top singular values (Sun et al., 2024, https://arxiv.org/abs/2409.05926).

No official code was found; this follows the paper's description (spec TEXT_METHODS.md §4). Each targeted
``nn.Linear`` with weight ``W = U Σ Vᵀ`` (``d_out x d_in``) is split into its best rank-``r`` part
``W_r = U_r diag(σ_1..σ_r) V_rᵀ`` and the frozen rest ``W_e = W − W_r``; only the vector ``σ' ∈ R^r`` trains:

    W' = U_r diag(σ') V_rᵀ + W_e,    σ' = σ_1..σ_r at the start (the model starts unchanged).

``U_r`` and ``V_r`` are frozen. Implemented on :class:`~modalpeft.core.layers.FactorizedVector`
(``W' = W + U_r diag(σ' − σ) V_rᵀ``), which LoLDU shares; merging writes ``W'`` into the weight.

Placement: ``target_modules=None`` adapts every ``nn.Linear`` outside ``modules_to_save`` and
``nn.MultiheadAttention``; the GLUE setting adapts the query and value projections (``["query", "value"]`` in
BERT/RoBERTa) at full rank, which is the paper's "16x fewer parameters than LoRA" on RoBERTa-base
(24 · 768 = 18,432 = 294,912 / 16).

Trainable count: ``r`` per targeted Linear (``rank=None``: ``r = min(d_in, d_out)``).

Training cost: the gradient of ``σ'`` is ``Σ_t (g U_r)[t] ⊙ (x V_r)[t]``, so every step needs ``x V_r`` and
``g U_r``, two ``tokens x d x r`` products on top of the two a Linear needs anyway (its output and ``∂L/∂x``). At
full rank on a square Linear that is twice the frozen Linear's work, whichever way it is computed (the factored
route :class:`~modalpeft.core.layers.FactorizedVector` takes is that bound). Measured on one 4096 x 4096 Linear
(LLaMA-7B's ``q_proj``), 1,024 tokens, forward and backward, one thread: 1.05 s frozen, 2.13 s with SVFit (2.02x).
So where the targeted Linears are a large share of a model's work, full-rank SVFit steps slower than LoRA: 1.06x
LoRA's step on RoBERTa-base's q and v (``benchmarks/results/roberta_base_b8_cpu.md``), 1.35x on two LLaMA-7B-sized
blocks (``llama_7b_blocks_b8_cpu.md``), where q and v are 4096 wide and the batch has 1,024 tokens. A smaller
``rank`` adds ``r·d_out·d_in`` (the update, once per step) and ``tokens·r·(d_out + 2·d_in)`` (the factored
backward) to the frozen Linear's work instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import AdapterConfig, _help
from ..inject import attach, find_targets
from ..layers import FactorizedVector
from ..layers.factorized import is_exact, svd_factors
from ..registry import register_method


def check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be a positive integer, or None for the full rank min(d_in, d_out).")


@dataclass
class SVFitConfig(AdapterConfig):
    """SVFit (registered as ``"svfit"``). ``target_modules=None`` adapts every ``nn.Linear``."""

    rank: int | None = field(
        default=None,
        metadata=_help("r, the number of top singular values trained per Linear; None: full rank min(d_in, d_out)."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.rank)


FactorFn = Callable[[Tensor, int, str], tuple[Tensor, Tensor, Tensor]]


def attach_factorized(
    model: nn.Module, config: AdapterConfig, adapter_name: str, factors: FactorFn, scaling: Callable[[int], float]
) -> None:
    """Attach a :class:`FactorizedVector` to every Linear ``config`` selects, ``factors(weight, r, name)`` giving
    ``(F₁, F₂, z₀)``; every rank and factorisation is checked before the model changes."""
    plans = []
    for name, linear in find_targets(model, config, types=(nn.Linear,)):
        full = min(linear.in_features, linear.out_features)
        rank = full if config.rank is None else config.rank
        if rank > full:
            raise ValueError(
                f"{config.method}: rank={rank} exceeds the rank of {name!r} (weight {tuple(linear.weight.shape)}, "
                f"rank at most min(d_out, d_in) = {full}); pass rank <= {full}, or rank=None for the full rank."
            )
        plans.append((name, linear.weight, *factors(linear.weight, rank, name), rank))
    for name, weight, left, right, start, rank in plans:
        exact = rank == min(weight.shape) and is_exact(weight, left, right, start, scaling(rank))
        layer = FactorizedVector(
            left, right, start, scaling=scaling(rank), init_weights=config.init_weights, exact=exact
        )
        attach(model, name, adapter_name, layer)


@register_method("svfit", SVFitConfig, mergeable=True, paper="https://arxiv.org/abs/2409.05926")
def apply_svfit(
    model: nn.Module, config: SVFitConfig, adapter_name: str, state: Mapping[str, Tensor] | None = None
) -> None:
    attach_factorized(model, config, adapter_name, lambda w, r, name: svd_factors(w, r), lambda r: 1.0)
