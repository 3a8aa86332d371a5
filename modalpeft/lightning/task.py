"""LightningModule *systems* that train an adapted backbone: the base every modality task builds on."""

from __future__ import annotations

import copy
import dataclasses
import enum
import os
from typing import Any, Literal

import pytorch_lightning as pl
import torchmetrics
from peft import PeftConfig
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from ..core.api import adapt, save_baseline
from ..core.config import AdapterConfig
from ..core.inject import modules_to_save_modules, saved_keys
from ..core.model import AdaptedModel
from ..core.peft_bridge import adalora_orthogonal_penalty, adalora_tuner, kasa_penalty
from .checkpoint import AdapterExport, RandomStateCheckpoint, check_checkpoint, filter_checkpoint
from .optim import (
    OptimizerName,
    SchedulerName,
    build_optimizer,
    param_groups,
    parameters_of,
    warmup_cosine,
    with_learning_rate,
)

ADAPTER_NAME = "default"
"""The name a task gives its adapter."""

Baseline = Literal["full", "linear"]
"""The two reference points every recipe can run with the same data and loop: ``"full"`` fine-tunes every
parameter, ``"linear"`` trains only ``modules_to_save`` (a linear probe when that is the head)."""


def describe_adapter(adapter: AdapterConfig | PeftConfig | str) -> dict[str, Any] | str:
    """``adapter`` as LightningCLI writes it (``class_path`` + ``init_args``, JSON-ready), for hyper-parameters
    and checkpoints: ``<recipe>.py test --ckpt_path=...`` rebuilds the same config from it."""
    if isinstance(adapter, str):
        return adapter
    names = {f.name for f in dataclasses.fields(adapter) if f.init and f.metadata.get("save", True)}
    data = adapter.to_dict()
    init_args = {k: _plain(v) for k, v in data.items() if k in names}
    return {"class_path": f"{type(adapter).__module__}.{type(adapter).__qualname__}", "init_args": init_args}


def _plain(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def needs_training_data(adapter: Any) -> bool:
    """Whether ``adapter`` names a data field (``data_field``, e.g. SPT's sensitivity data) that is still empty."""
    field = getattr(adapter, "data_field", None)
    return field is not None and getattr(adapter, field) is None


def prepare_backbone(
    backbone: nn.Module, adapter: AdapterConfig | PeftConfig | Baseline, modules_to_save: list[str] | None
) -> nn.Module:
    """Apply ``adapter`` (or a baseline) to ``backbone`` and leave exactly the right parameters trainable."""
    if adapter == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone
    if adapter == "linear":
        if not modules_to_save:
            raise ValueError("adapter='linear' trains only modules_to_save; give the head's name, e.g. ['head'].")
        saved = modules_to_save_modules(backbone, modules_to_save)
        for p in backbone.parameters():
            p.requires_grad_(False)
        for _, module in saved:
            for p in module.parameters():
                p.requires_grad_(True)
        return backbone
    if isinstance(adapter, str):
        raise ValueError(f"adapter={adapter!r} is not valid; give a method config, 'full' or 'linear'.")
    return adapt(backbone, adapter, ADAPTER_NAME, modules_to_save=modules_to_save)


class AdapterTask(pl.LightningModule):
    """Train an adapted backbone: the adapter is applied in ``__init__``, only trainable parameters are
    optimised, checkpoints hold only what trains (plus what resuming needs), and the trained adapter is
    exported with ``save_adapter`` at the end of ``fit``.

    Subclasses implement :meth:`step` (loss and metrics of one batch).

    Args:
        backbone: the model to adapt (a timm model, a modality backbone, ...). In YAML: ``class_path`` +
            ``init_args``.
        adapter: a modalpeft method config, a ``peft.PeftConfig``, or a baseline (``"full"``, ``"linear"``).
        modules_to_save: modules trained in place and saved with the adapter (e.g. ``["head"]``).
        optimizer: ``"adamw"``, ``"adamw8bit"`` (bitsandbytes on a GPU; AdamW otherwise, with a warning) or ``"sgd"``.
        lr: base learning rate.
        weight_decay: decay for parameters with more than one dimension (never for biases, norms,
            scale/shift vectors or prompts).
        momentum: SGD momentum.
        scheduler: ``"cosine"`` (per step, with linear warm-up) or ``"constant"``.
        warmup_epochs: warm-up length in epochs (may be fractional).
        min_lr: the cosine's final learning rate.
        head_lr: learning rate of the modules trained in place (``modules_to_save``: the task head); ``None``:
            ``lr``. A fresh head next to a pretrained body usually wants a larger one (linear probing's): with the
            body's small fine-tuning LR a short run leaves the head, not the body, undertrained. The schedule
            scales it as it scales ``lr``.
    """

    no_decay: str | None = None
    """A regex of parameter names that get no weight decay besides the 1-D ones (see :func:`param_groups`)."""

    def __init__(
        self,
        backbone: nn.Module,
        adapter: AdapterConfig | PeftConfig | Baseline = "linear",
        modules_to_save: list[str] | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        head_lr: float | None = None,
    ) -> None:
        super().__init__()
        if head_lr is not None and head_lr <= 0:
            raise ValueError(f"head_lr={head_lr!r} must be > 0, or None for the base lr.")
        self.save_hyperparameters(ignore=["backbone", "adapter"])
        self.hparams["adapter"] = describe_adapter(adapter)
        self.baseline = adapter if isinstance(adapter, str) else None
        self.modules_to_save = list(modules_to_save or [])  # hparams keep a subclass's own argument (None: its default)
        self._pending: tuple | None = None
        if needs_training_data(adapter):
            # the method scores parameters on training data (SPT): adapt in configure_model, once data is attached
            self.model = backbone
            self._pending = (adapter, modules_to_save)
        else:
            self.model = prepare_backbone(backbone, adapter, modules_to_save)
        self.strict_loading = False  # checkpoints hold only trainable state; check_checkpoint validates them

    def configure_model(self) -> None:
        if self._pending is None:
            return
        adapter, modules_to_save = self._pending
        if self.trainer.state.fn != TrainerFn.FITTING:
            # validate / test / predict: what the method fitted to the training data (SPT's selection, Point-PEFT's
            # memory bank) is in the checkpoint; :meth:`on_load_checkpoint` adapts from it, without the training data
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError(
                f"method {adapter.method!r} scores parameters on training data: run the task with a datamodule, or set "
                f"{type(adapter).__name__}.{adapter.data_field} yourself."
            )
        device = self.trainer.strategy.root_device
        adapter = copy.copy(adapter)
        # a data module may serve the method other data than its training loader (``adapter_data(device)``:
        # a DataLoader or a callable giving batches), e.g. training clouds resampled as at test time
        provide = getattr(datamodule, "adapter_data", None)
        setattr(adapter, adapter.data_field, provide(device) if provide is not None else datamodule.train_dataloader())
        self.model.to(device)  # score on the accelerator, not on the CPU
        self.model = prepare_backbone(self.model, adapter, modules_to_save)
        self._pending = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def step(self, batch: Any, stage: str) -> Tensor:
        raise NotImplementedError

    def adapter_config(self) -> AdapterConfig | None:
        """The native config of the task's adapter (``None`` for baselines and peft configs)."""
        config = (
            getattr(self.model, "peft_config", {}).get(ADAPTER_NAME) if isinstance(self.model, AdaptedModel) else None
        )
        return config if isinstance(config, AdapterConfig) else None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.step(batch, "train")
        # a method with a regulariser in its objective (SoRA's L1 on its gates) defines ``training_penalty(model)``;
        # peft computes AdaLoRA's orthogonal and KaSA's regularisers but adds them only to a loss the model returns
        penalty = getattr(self.adapter_config(), "training_penalty", None)
        tuner = adalora_tuner(self.model)
        if penalty is not None:
            extra = penalty(self.model)
        elif tuner is not None:
            extra = adalora_orthogonal_penalty(tuner)
        else:
            extra = kasa_penalty(self.model)
        if extra is not None:
            self.log("train/penalty", extra.detach(), on_step=True, on_epoch=False)
            loss = loss + extra
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdaLoRA's budget schedule: ``update_and_allocate(i)`` after optimiser step i (0-based), gradients still set
        # (Lightning zeroes them at the start of the next step), as peft's training loop does
        tuner = adalora_tuner(self.model)
        if tuner is not None and self.global_step != getattr(self, "_allocated_at", 0):
            tuner.update_and_allocate(self.global_step - 1)
            self._allocated_at = self.global_step

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "test")

    # -- optimisation ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(self.model, hp.weight_decay, self.no_decay)
        if hp.get("head_lr") is not None:
            groups = with_learning_rate(groups, parameters_of(self.model, self.modules_to_save), hp.head_lr)
        # a method whose parameters follow their own update rule (SoRA's proximal gate step) defines
        # ``build_optimizer(model, groups, lr)`` -> optimizer; the schedule below applies to it as to any other
        custom = getattr(self.adapter_config(), "build_optimizer", None)
        if custom is not None:
            optimizer = custom(self.model, groups, hp.lr)
        else:
            optimizer = build_optimizer(groups, hp.optimizer, hp.lr, hp.momentum)
        if hp.scheduler == "constant":
            return optimizer
        if hp.scheduler != "cosine":
            raise ValueError(f"scheduler={hp.scheduler!r} is not supported; choose 'cosine' or 'constant'.")
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        schedule = warmup_cosine(optimizer, total, warmup, hp.min_lr / hp.lr if hp.lr else 0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints and export ------------------------------------------------------------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        callbacks: list[pl.Callback] = [AdapterExport(), RandomStateCheckpoint()]
        if getattr(self.adapter_config(), "grows_rank", False):  # IncreLoRA: ranks grow in the loop
            from .growth import RankGrowth

            callbacks.append(RankGrowth())
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.baseline != "full":
            filter_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._pending is not None:
            self._adapt_from_checkpoint(checkpoint)
        check_checkpoint(self, checkpoint)

    def _adapt_from_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Place the data-dependent adapter from a checkpoint of its fit: its tensors, under ``save_adapter``'s keys,
        are the ``state`` the method is applied with (as ``load_adapter`` does); Lightning then loads the rest."""
        adapter, modules_to_save = self._pending
        prefix = "model.base_model."
        base_state = {k[len(prefix) :]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
        state = saved_keys(base_state, ADAPTER_NAME)
        model = AdaptedModel(self.model)
        model.add_adapter(ADAPTER_NAME, adapter, modules_to_save, state=state)
        self.model = model
        self._pending = None

    def _require_adapted(self) -> None:
        if self._pending is not None:
            adapter = self._pending[0]
            raise ValueError(
                f"method {adapter.method!r} is fitted to training data ({adapter.data_field}) when it is applied: "
                "validate, test or predict it from a checkpoint of its fit (--ckpt_path=<the .ckpt fit wrote>), or "
                "after fit in the same run."
            )

    def on_validation_start(self) -> None:
        self._require_adapted()

    def on_test_start(self) -> None:
        self._require_adapted()

    def on_predict_start(self) -> None:
        self._require_adapted()

    def export_adapter(self, directory: str | os.PathLike[str]) -> None:
        """Write the trained adapter: ``save_adapter`` files, or for a baseline (``"linear"``, ``"full"``) what it
        trained (:func:`~modalpeft.core.api.save_baseline`); ``mp.load_adapter`` reads either."""
        if isinstance(self.model, AdaptedModel):
            self.model.save_adapter(directory)
            return
        save_baseline(self.model, directory, self.baseline or "full")

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            print_summary(self)


def print_summary(task: AdapterTask) -> None:
    """A table of what trains, printed when ``fit`` starts."""
    from rich.console import Console
    from rich.table import Table

    params = {id(p): p for p in task.model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    method = task.baseline
    if isinstance(task.model, AdaptedModel):
        config = task.model.peft_config[task.model.active_adapter]
        method = getattr(config, "method", None) or str(getattr(config, "peft_type", "?"))
    table = Table(title="modalpeft: what trains")
    for column in ("method", "trainable", "total", "%"):
        table.add_column(column, justify="right" if column != "method" else "left")
    table.add_row(str(method).lower(), f"{trainable:,}", f"{total:,}", f"{100 * trainable / max(total, 1):.3f}")
    Console().print(table)


class ClassificationTask(AdapterTask):
    """Classification with cross-entropy; accuracy (and top-5 when there are more than 5 classes).

    Batches are ``(inputs, labels)``. Args as :class:`AdapterTask`, plus:

    Args:
        num_classes: the number of classes; the backbone's classifier is reset to it when it differs
            (timm's ``reset_classifier``).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        adapter: AdapterConfig | PeftConfig | Baseline = "linear",
        modules_to_save: list[str] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        head_lr: float | None = None,
    ) -> None:
        if getattr(backbone, "num_classes", num_classes) != num_classes and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(num_classes)
        super().__init__(
            backbone,
            adapter,
            modules_to_save,
            optimizer,
            lr,
            weight_decay,
            momentum,
            scheduler,
            warmup_epochs,
            min_lr,
            head_lr,
        )
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)}
        if num_classes > 5:
            metrics["acc_top5"] = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=5)
        collection = torchmetrics.MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.loss(logits, y)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log_dict(metrics, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x).softmax(-1)
