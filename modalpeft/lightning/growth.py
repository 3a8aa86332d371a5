"""Rank growth in the training loop: IncreLoRA's allocator after each optimiser step."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ..core.methods.increlora import IncreLoRAConfig, RankAllocator


class RankGrowth(pl.Callback):
    """Run :class:`~modalpeft.core.methods.increlora.RankAllocator` after every optimiser step of ``fit``.

    The Lightning tasks add it for an :class:`IncreLoRAConfig` adapter (``configure_callbacks``). The schedule is
    checked against the run's length when ``fit`` starts, before any step (not under ``fast_dev_run``, which grows
    nothing). The pieces are allocated when the model is
    adapted and already in the optimiser, so growing changes masks, not parameters (see the increlora module).
    """

    def __init__(self) -> None:
        self.allocator: RankAllocator | None = None
        self.history: list[tuple[int, list[int]]] = []
        """``(step, modules that grew)`` for every growth."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # a debugging run of a few steps: no schedule to keep
            return
        config = pl_module.adapter_config()
        if not isinstance(config, IncreLoRAConfig):
            raise ValueError(f"RankGrowth drives IncreLoRA; this task's adapter is {type(config).__name__}.")
        self.allocator = RankAllocator(pl_module.model, config, int(trainer.estimated_stepping_batches))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.allocator is None:
            return
        grown = self.allocator.step(trainer.global_step)
        if grown:
            self.history.append((trainer.global_step, grown))
            pl_module.log("train/total_rank", float(self.allocator.total), on_step=True, on_epoch=False)
