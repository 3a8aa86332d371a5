"""Adapter-only checkpoints and the export of the trained adapter in the core's format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn

from ..core.inject import running_statistics
from ..core.layer import AdapterLayer


def trainable_state_keys(module: nn.Module) -> set[str]:
    """State-dict keys a resumable checkpoint needs: every trainable parameter, the buffers of adapters and of
    modules that train (batch-norm statistics of a trained head, SPT's index buffers), and the running statistics
    of every normalisation layer (training mode updates them in frozen layers too)."""
    keys = {name for name, p in module.named_parameters() if p.requires_grad}
    keys |= {name for name, _ in running_statistics(module.named_modules())}
    trained_modules = [
        name for name, m in module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    adapter_prefixes = [
        f"{name}.adapters." if name else "adapters."
        for name, m in module.named_modules()
        if isinstance(m, AdapterLayer)
    ]
    for name, _ in module.named_buffers():
        owner = name.rpartition(".")[0]
        if owner in trained_modules or any(name.startswith(p) for p in adapter_prefixes):
            keys.add(name)
    return keys


def filter_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only :func:`trainable_state_keys` in ``checkpoint["state_dict"]`` (in place)."""
    keep = trainable_state_keys(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def check_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming missing/unexpected keys when a checkpoint does not fit ``module``."""
    state = checkpoint.get("state_dict", {})
    expected = trainable_state_keys(module)
    present = set(module.state_dict())
    unexpected = sorted(set(state) - present)
    missing = sorted(expected - set(state))
    if unexpected or missing:
        raise ValueError(
            "the checkpoint does not fit this task (another backbone or adapter configuration?)"
            f"\n  missing keys ({len(missing)}): {missing[:10]}\n  unexpected keys ({len(unexpected)}): "
            f"{unexpected[:10]}\nResume with the same recipe that wrote it."
        )


class AdapterExport(pl.Callback):
    """At the end of ``fit``, write the trained adapter with ``save_adapter`` (loadable by
    ``modalpeft.load_adapter`` without Lightning). Skipped under ``fast_dev_run``.

    Args:
        dirpath: where to write; default ``<trainer.log_dir>/adapter`` (or ``<default_root_dir>/adapter``).
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None) -> None:
        self.dirpath = dirpath

    def target(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapter"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:  # a debugging run writes nothing, as Lightning's own checkpointing
            return
        target = self.target(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        export = getattr(pl_module, "export_adapter", None)
        if trainer.is_global_zero and export is not None:
            export(target)
