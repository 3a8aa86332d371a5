"""What every demo section shares: a plain training loop on in-memory tensors, evaluation, the lifecycle checks
(save, reload into a fresh model, merge) and parameter counts."""

from __future__ import annotations

import time
from pathlib import Path

from torch import Tensor, nn

from modalpeft.core.compare import CHECK_RTOL, delta, logits_of, same_outputs
from modalpeft.core.model import parameter_counts
from modalpeft.lightning.data import index_batches as batches
from modalpeft.lightning.optim import build_optimizer, param_groups, warmup_cosine

__all__ = [
    "CHECK_RTOL",
    "accuracy",
    "batches",
    "delta",
    "dir_size",
    "leftover_wrappers",
    "logits_of",
    "parameter_counts",
    "same_outputs",
    "train",
]


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    order: list[Tensor],
    lr: float,
    weight_decay: float = 0.05,
    optimizer: str = "adamw",
) -> float:
    """Train the parameters that require grad on the batches ``order`` with AdamW (or ``optimizer="sgd"``, momentum
    0.9), 10% linear warm-up and cosine decay, decaying only what the papers decay
    (:func:`modalpeft.lightning.optim.param_groups`, as the recipes do); returns the seconds taken."""
    x, y = data
    opt = build_optimizer(param_groups(model, weight_decay), optimizer, lr)
    sched = warmup_cosine(opt, len(order), max(1, len(order) // 10))
    model.train()
    start = time.perf_counter()
    for idx in order:
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def leftover_wrappers(model: nn.Module) -> list[str]:
    """Modules of a merged model that still come from modalpeft or peft (there must be none)."""
    return [n for n, m in model.named_modules() if type(m).__module__.split(".")[0] in ("modalpeft", "peft")]
