"""Optimiser and schedule for adapter training: decay only where the papers decay."""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from ..core.inject import hosts

OptimizerName = Literal["adamw", "adamw8bit", "sgd"]
SchedulerName = Literal["cosine", "constant"]


def param_groups(model: nn.Module, weight_decay: float, no_decay: str | None = None) -> list[dict]:
    """Trainable parameters in two groups: with ``weight_decay``, and without it.

    No decay, as SSF, VPT and timm do: 1-D parameters (biases, norms, scale/shift vectors, sparse values)
    and every parameter of an adapter module whose class sets ``no_weight_decay = True`` (prompt tokens); with
    ``no_decay`` (a regex), also every parameter whose name it matches (``re.search``; SPMTrack: ``embed``).
    """
    exempt = {
        id(p)
        for _, host in hosts(model)
        for adapter in host.adapters.values()
        if getattr(adapter, "no_weight_decay", False)
        for p in adapter.parameters()
    }
    if no_decay is not None:
        exempt |= {id(p) for name, p in model.named_parameters() if re.search(no_decay, name)}
    decay, exempted = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (exempted if p.ndim <= 1 or id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempted, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def parameters_of(model: nn.Module, modules: Iterable[str]) -> set[int]:
    """The ids of the trainable parameters inside the modules named ``modules`` (dotted paths such as ``"head"`` or
    ``"classifier.dense"``, matched as whole name components, so peft's wrapped copies count too)."""
    paths = [f".{m.strip('.')}." for m in modules]
    return {
        id(p) for name, p in model.named_parameters() if p.requires_grad and any(path in f".{name}." for path in paths)
    }


def with_learning_rate(groups: list[dict], ids: set[int], lr: float) -> list[dict]:
    """``groups`` with the parameters in ``ids`` moved to groups of their own at ``lr`` (each keeps its group's other
    settings, e.g. its weight decay); empty groups are dropped."""
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in ids]
        mine = [p for p in group["params"] if id(p) in ids]
        out += [{**group, "params": rest}] if rest else []
        out += [{**group, "params": mine, "lr": lr}] if mine else []
    return out


def build_optimizer(
    params: Iterable[dict],
    name: OptimizerName,
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimiser by name. ``"adamw8bit"`` is bitsandbytes' 8-bit AdamW when bitsandbytes is installed and the
    parameters are on a GPU; otherwise torch's AdamW, with a warning saying why."""
    if name == "adamw8bit":
        params = list(params)
        on_gpu = all(p.is_cuda for group in params for p in group["params"])
        if importlib.util.find_spec("bitsandbytes") is not None and on_gpu:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, betas=betas)
        why = (
            "bitsandbytes is not installed (pip install bitsandbytes)" if on_gpu else "the parameters are not on a GPU"
        )
        warnings.warn(f"optimizer='adamw8bit': {why}; training with torch's 32-bit AdamW instead.", stacklevel=2)
        name = "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer={name!r} is not supported; choose 'adamw', 'adamw8bit' or 'sgd'.")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then a cosine from the base LR to ``min_lr_ratio`` x it."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
