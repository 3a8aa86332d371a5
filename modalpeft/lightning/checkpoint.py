"""Adapter-only checkpoints and the export of the trained adapter in the core's format."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
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


def rng_states() -> dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA) as tensors and plain values, so that a checkpoint
    holding them still loads with ``weights_only=True``. A resumed run needs them for everything that draws from the
    global RNG while training: dropout (LoRA's, VPT's prompt dropout, drop-path), a DataLoader's base seed."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "gauss": (has_gauss, gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` saved (CUDA states only where as many devices are visible)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    has_gauss, cached = numpy["gauss"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStateCheckpoint(pl.Callback):
    """Keep the global random states in every checkpoint and restore them on resume, so that a resumed run draws
    what the uninterrupted one drew (dropout masks, drop-path, DataLoader base seeds).

    The states are those of the moment the checkpoint was written. They are restored when the checkpoint is loaded
    (after a data-dependent method has been re-scored on the training data) and again after the sanity check's
    validation batches, which an uninterrupted run does not draw at that point.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict
        set_rng_states(state_dict)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None


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
