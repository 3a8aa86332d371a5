"""MWA: merge the adapter checkpoints of one run by a metric-weighted average.

Choi & Yu, "Parameter-Efficient Checkpoint Merging via Metrics-Weighted Averaging", 2025,
https://arxiv.org/abs/2504.18580 (no code released). The last ``K`` saves of a run are averaged with weights from
a metric of each save: training loss (lower is better), a validation metric, or the training step (later is better).

Weights. The abstract promises "a formula with a penalty factor ... requiring only one hyperparameter regardless of
the number of checkpoints"; the method section could not be read here, so the formula is a choice (check it
against the paper before quoting results as the paper's): with ``m_i > 0`` the metric of save ``i`` and ``p`` the
penalty factor,

    w_i ∝ m_i^(-p)  for a metric to minimise (loss),    w_i ∝ m_i^p  for one to maximise (accuracy, step),

normalised to sum to 1. ``p = 0`` is the uniform average (the paper's baseline), larger ``p`` moves the weight to
the best saves, ``p → ∞`` picks the best one.

Two ways to average (a choice the paper leaves open for LoRA, where averaging ``A`` and ``B`` separately is not
averaging ``ΔW = B A``):

- ``mode="factors"``: average the saved tensors key by key (what "averaging a PEFT checkpoint's parameters" says);
  the result is an adapter directory of the same method (native or peft), loadable by ``mp.load_adapter``.
- ``mode="delta"``: average the merged models, ``Σ w_i (W + ΔW_i) = W + Σ w_i ΔW_i``: the weights every save
  changes when merged (and its ``modules_to_save`` and normalisation statistics) are averaged after merging. The
  result is a directory of merged tensors (``{"baseline": "merged"}``) that ``mp.load_adapter`` copies into a fresh
  base model. Methods that cannot merge are refused.

Both write ``mwa.json`` beside the adapter: the saves' steps, metrics and weights.
"""

from __future__ import annotations

import copy
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .. import __version__
from ..core.api import load_adapter
from ..core.model import AdaptedModel, class_path
from ..core.peft_bridge import PeftAdaptedModel
from ..core.state import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_config

MergeMode = Literal["factors", "delta"]
MetricMode = Literal["min", "max"]
_VERSION_KEYS = ("modalpeft_version", "base_model_class")


def mwa_weights(
    metrics: Sequence[float], penalty: float = 1.0, metric_mode: MetricMode = "min", uniform: bool = False
) -> list[float]:
    """The normalised weights of the saves: ``m_i^(-p)`` (``"min"``) or ``m_i^p`` (``"max"``); uniform on request.

    Raises:
        ValueError: no metric, a metric that is not positive and finite (with ``p != 0``), a negative penalty or an
            unknown ``metric_mode``.
    """
    if not metrics:
        raise ValueError("MWA needs at least one saved checkpoint; none was kept (did training run?).")
    if metric_mode not in ("min", "max"):
        raise ValueError(f"metric_mode={metric_mode!r} is not valid; use 'min' (a loss) or 'max' (accuracy, step).")
    if penalty < 0:
        raise ValueError(f"penalty={penalty!r} must be >= 0 (0: uniform average; larger: favour the best saves).")
    if uniform or penalty == 0:
        return [1.0 / len(metrics)] * len(metrics)
    values = torch.tensor([float(m) for m in metrics], dtype=torch.float64)
    bad = [float(m) for m in values if not (torch.isfinite(m) and m > 0)]
    if bad:
        raise ValueError(
            f"MWA weights need positive, finite metrics, got {bad} among {values.tolist()}; monitor a loss, an "
            "accuracy or the step, or use uniform averaging (penalty=0)."
        )
    sign = -1.0 if metric_mode == "min" else 1.0
    logits = sign * penalty * values.log()
    return torch.softmax(logits, 0).tolist()  # m^(±p) / Σ m^(±p), computed in log space


def variant_weights(
    saves: Sequence[tuple[int, float, Any]], penalties: Sequence[float] = (1.0,)
) -> dict[str, list[float]]:
    """The weights a study compares, for saves ``(step, loss, state)``: ``"uniform"`` (the paper's baseline),
    ``"loss p=<p>"`` for each penalty (``w ∝ loss^-p``) and ``"step p=1"`` (``w ∝ step``: later saves count more)."""
    steps, losses = [float(s[0]) for s in saves], [float(s[1]) for s in saves]
    out = {"uniform": mwa_weights(losses, uniform=True)}
    out |= {f"loss p={p:g}": mwa_weights(losses, p, "min") for p in penalties}
    out["step p=1"] = mwa_weights(steps, 1.0, "max")
    return out


def average_states(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """``Σ w_i state_i`` key by key (float64 accumulation, cast back); integer tensors (selected indices) must agree,
    except BatchNorm's ``num_batches_tracked``, taken from the last save.

    Raises:
        ValueError: the saves differ in keys, shapes or integer contents; the message names the key.
    """
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if set(state) != set(first):
            key = sorted(set(state) ^ set(first))[0]
            raise ValueError(
                f"checkpoint {i} and checkpoint 0 hold different tensors (first difference: {key!r}); MWA merges "
                "saves of one adapter (same method and configuration) only."
            )
    out = {}
    for key, ref in first.items():
        values = [s[key] for s in states]
        for i, v in enumerate(values):
            if v.shape != ref.shape:
                raise ValueError(
                    f"{key!r} has shape {tuple(v.shape)} in checkpoint {i} but {tuple(ref.shape)} in checkpoint 0; "
                    "MWA merges saves of one adapter (same method and configuration) only."
                )
        if ref.is_floating_point():
            total = sum(w * v.to(torch.float64) for w, v in zip(weights, values, strict=True))
            out[key] = total.to(ref.dtype)
        elif key.endswith("num_batches_tracked"):
            out[key] = values[-1].clone()
        else:
            differs = next((i for i, v in enumerate(values) if not torch.equal(v, ref)), None)
            if differs is not None:
                raise ValueError(
                    f"{key!r} (integer: a selection of entries) differs between checkpoint {differs} and checkpoint 0: "
                    "its values cannot be averaged; merge saves of one adapter, or use mode='delta'."
                )
            out[key] = ref.clone()
    return out


def evaluate_merges(
    model: AdaptedModel,
    saves: Sequence[tuple[int, float, Mapping[str, Tensor]]],
    score: Callable[[AdaptedModel], float],
    penalties: Sequence[float] = (1.0,),
) -> dict[str, float]:
    """``score(model)`` as trained (``"last"``) and with each of :func:`variant_weights`' merges of ``saves``
    (``mode="factors"``) loaded in turn; ``model`` is left as trained."""
    out = {"last": float(score(model))}
    trained = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    states = [state for _, _, state in saves]
    try:
        for name, weights in variant_weights(saves, penalties).items():
            model.load_adapter_state(average_states(states, weights), model.active_adapter)
            out[name] = float(score(model))
    finally:
        model.load_adapter_state(trained, model.active_adapter)
    return out


def merged_average(model: AdaptedModel, states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict:
    """``Σ w_i merged_i`` over the base model's tensors that merging or training changed (``mode="delta"``)."""
    base = copy.deepcopy(model).unload().state_dict()
    total: dict[str, Tensor] = {}
    touched = {k for k in states[0] if k in base}  # modules_to_save and normalisation statistics (native keys)
    for state, w in zip(states, weights, strict=True):
        one = copy.deepcopy(model)
        one.load_adapter_state(state, one.active_adapter)
        merged = one.merge_and_unload().state_dict()  # a method that cannot merge raises here, naming itself
        for key, value in merged.items():
            if key in base and not torch.equal(value, base[key]):
                touched.add(key)
            # floats are averaged; integer buffers (num_batches_tracked) are the last save's
            total[key] = total.get(key, 0) + w * value.to(torch.float64) if value.is_floating_point() else value
    return {k: total[k].to(base[k].dtype) for k in sorted(touched)}


def write_merged(
    model: AdaptedModel,
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    directory: str | os.PathLike[str],
    mode: MergeMode = "factors",
    info: dict[str, Any] | None = None,
) -> None:
    """Write the weighted merge of ``states`` (adapter states of ``model``'s active adapter) to ``directory``."""
    info = {"mode": mode, "weights": list(weights), **(info or {})}
    if mode == "factors":
        merged = copy.deepcopy(model)
        merged.load_adapter_state(average_states(states, weights), merged.active_adapter)
        merged.save_adapter(directory)
        atomic_write({"mwa.json": info}, directory)
        return
    if mode != "delta":
        raise ValueError(
            f"mode={mode!r} is not valid; use 'factors' (average the tensors) or 'delta' (merged weights)."
        )
    tensors = merged_average(model, states, weights)
    base_class = class_path(model.base_model)
    config = {"baseline": "merged", "modalpeft_version": __version__, "base_model_class": base_class}
    atomic_write({WEIGHTS_NAME: tensors, CONFIG_NAME: config, "mwa.json": info}, directory)


def merge_adapter_dirs(
    base_model: nn.Module,
    directories: Sequence[str | os.PathLike[str]],
    metrics: Sequence[float],
    output: str | os.PathLike[str],
    *,
    mode: MergeMode = "factors",
    metric_mode: MetricMode = "min",
    penalty: float = 1.0,
    uniform: bool = False,
) -> list[float]:
    """Merge saved adapter directories of one adapter (native or peft) by MWA into ``output``; returns the weights.

    ``base_model`` is the unadapted model the adapters were trained on (it is copied, not changed).

    Raises:
        ValueError: the directories hold different methods or configurations (the differing field is named), or
            tensors of different keys or shapes (the key is named); see :func:`average_states`.
    """
    if len(directories) != len(metrics):
        raise ValueError(f"got {len(directories)} directories but {len(metrics)} metrics; give one metric each.")
    configs = [{k: v for k, v in read_config(d).items() if k not in _VERSION_KEYS} for d in directories]
    for d, config in zip(directories[1:], configs[1:], strict=True):
        for key in sorted(set(config) | set(configs[0]), key=lambda k: (k not in ("method", "peft_type"), k)):
            if config.get(key) != configs[0].get(key):
                raise ValueError(
                    f"{key!r} is {config.get(key)!r} in {d} but {configs[0].get(key)!r} in {directories[0]}: MWA "
                    "merges checkpoints of one adapter (same method and configuration) only."
                )
    weights = mwa_weights(metrics, penalty, metric_mode, uniform)
    models = [load_adapter(copy.deepcopy(base_model), d) for d in directories]
    if not all(isinstance(m, AdaptedModel) for m in models):
        raise ValueError("MWA merges adapters; a baseline directory (linear probe, full fine-tuning) has none.")
    states = [m.adapter_state_dict() for m in models]
    write_merged(models[0], states, weights, output, mode, {"sources": [str(d) for d in directories]})
    return weights


class MetricWeightedAveraging(pl.Callback):
    """Keep the adapter state and a metric of the last ``keep`` saves of a run; write their MWA merge at the end.

    A save happens at the end of every ``every_n_epochs``-th training epoch (after its validation, so ``val/...``
    metrics can be monitored), or every ``every_n_train_steps`` steps when given. Works with every native method
    and peft adapter (the task's model is an :class:`~modalpeft.core.model.AdaptedModel`).

    Args:
        dirpath: where the merged adapter goes; default ``<trainer.log_dir>/adapter_mwa``.
        monitor: a logged metric (``"train/loss"``, ``"val/acc"``, ...) or ``"step"`` (the global step).
        metric_mode: ``"min"`` (a loss) or ``"max"`` (accuracy, step); ``None``: ``"max"`` for ``"step"``, else
            ``"min"``.
        keep: ``K``, the number of last saves kept and merged.
        penalty: ``p`` of the weights (0: uniform).
        mode: ``"factors"`` or ``"delta"`` (see the module docstring).
        uniform: ignore the metric, average uniformly (the paper's baseline).
        every_n_epochs: save every this many epochs (when ``every_n_train_steps`` is None).
        every_n_train_steps: save every this many optimiser steps instead.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        monitor: str = "train/loss",
        metric_mode: MetricMode | None = None,
        keep: int = 5,
        penalty: float = 1.0,
        mode: MergeMode = "factors",
        uniform: bool = False,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep!r} must be >= 1 (the number of last saves merged).")
        if mode not in ("factors", "delta"):
            raise ValueError(f"mode={mode!r} is not valid; use 'factors' or 'delta'.")
        if every_n_epochs < 1 or (every_n_train_steps is not None and every_n_train_steps < 1):
            raise ValueError("every_n_epochs and every_n_train_steps must be >= 1.")
        self.dirpath = dirpath
        self.monitor = monitor
        self.metric_mode: MetricMode = metric_mode or ("max" if monitor == "step" else "min")
        mwa_weights([1.0], penalty, self.metric_mode)  # validates penalty and metric_mode now
        self.keep, self.penalty, self.mode, self.uniform = keep, penalty, mode, uniform
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.saves: deque[tuple[int, float, dict[str, Tensor]]] = deque(maxlen=keep)

    def target(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapter_mwa"

    def _metric(self, trainer: pl.Trainer) -> float:
        if self.monitor == "step":
            return float(trainer.global_step)
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(
                f"MWA monitors {self.monitor!r}, which was not logged; logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Monitor one of those, or 'step'."
            )
        return float(value)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the current adapter state and metric (the oldest save goes once ``keep`` are held)."""
        model = pl_module.model
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.adapter_state_dict().items()}
        self.saves.append((trainer.global_step, self._metric(trainer), state))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, AdaptedModel):
            raise ValueError("MetricWeightedAveraging merges adapters; this task trains no adapter (a baseline?).")
        if self.mode == "delta" and not isinstance(model, PeftAdaptedModel):  # refused now, not after training
            model._check_mergeable(model.active_adapter)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        n = self.every_n_train_steps
        if n is not None and trainer.global_step % n == 0 and trainer.global_step > 0:
            self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_train_steps is None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not self.saves:
            return
        target = self.target(trainer)
        if trainer.is_global_zero:
            steps, metrics, states = zip(*self.saves, strict=True)
            weights = mwa_weights(metrics, self.penalty, self.metric_mode, self.uniform)
            info = {"monitor": self.monitor, "steps": list(steps), "metrics": list(metrics), "penalty": self.penalty}
            write_merged(pl_module.model, states, weights, target, self.mode, info)
