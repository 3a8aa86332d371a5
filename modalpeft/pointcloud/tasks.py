"""Lightning systems for point clouds: shape classification with an adapted point transformer.

The task logs overall accuracy (``acc``, the "OA" of the papers: torchmetrics ``MulticlassAccuracy(average="micro")``)
and mean class accuracy (``macc``, ``average="macro"``) for ``train``/``val``/``test``. With test-time voting
(``--data.init_args.vote=10`` on a :class:`~modalpeft.pointcloud.data.PointCloudDataModule`), test batches carry
``1 + V`` views of every cloud: the first (plain FPS) gives ``test/acc`` and ``test/macc``, the mean of the other
views' logits (as the official ``validate_vote``) ``test/acc_vote`` and ``test/macc_vote``.
"""

from __future__ import annotations

from typing import Any

import torchmetrics
from peft import PeftConfig
from torch import Tensor, nn

from ..core.config import AdapterConfig
from ..lightning.optim import OptimizerName, SchedulerName
from ..lightning.task import Baseline, ClassificationTask
from .backbones import PointTransformer, create_backbone


def point_backbone(
    name: str = "point_mae",
    num_classes: int = 40,
    checkpoint_path: str = "",
    kwargs: dict[str, Any] | None = None,
) -> PointTransformer:
    """``create_backbone(name, num_classes, checkpoint_path=..., **kwargs)`` for YAML recipes (explicit arguments, as
    :func:`modalpeft.lightning.timm_backbone`).

    Args:
        name: ``point_mae`` (64 groups, ModelNet40), ``point_mae_g128`` (128 groups, ScanObjectNN), ``point_bert``,
            ``point_mae_test`` (tiny, for tests).
        num_classes: head outputs.
        checkpoint_path: an official Point-MAE/Point-BERT ``pretrain.pth`` (read with ``weights_only=True``) or a
            safetensors file; ``""``: random init.
        kwargs: configuration overrides (``num_group``, ``group_size``, ``drop_path_rate``, ...).
    """
    return create_backbone(name, num_classes=num_classes, checkpoint_path=checkpoint_path or None, **(kwargs or {}))


def _metrics(num_classes: int) -> torchmetrics.MetricCollection:
    return torchmetrics.MetricCollection(
        {
            "acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro"),
            "macc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="macro"),
        }
    )


class PointCloudClassificationTask(ClassificationTask):
    """Point-cloud classification: cross-entropy (Point-MAE's plain ``CrossEntropyLoss``), overall and mean class
    accuracy, optional test-time voting.

    Batches are ``(points (B, N, 3), labels)``, or at test time with voting ``(views (1 + V, B, N, 3), labels)``.
    Args as :class:`~modalpeft.lightning.ClassificationTask`; the defaults are the official fine-tuning recipe of
    Point-MAE / PointGST / Point-PEFT (AdamW, lr 5e-4, weight decay 0.05 on weights only, cosine with 10 warm-up
    epochs; set ``trainer.gradient_clip_val: 10`` for their gradient clipping).

    For a method that needs training data when it is applied (Point-PEFT's memory bank), the data comes from the
    data module's training clouds resampled as at evaluation (FPS to ``num_points``, no augmentation), so that the
    bank holds the features the model sees at test time.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        adapter: AdapterConfig | PeftConfig | Baseline = "linear",
        modules_to_save: list[str] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerName = "adamw",
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 10.0,
        min_lr: float = 1e-6,
    ) -> None:
        super().__init__(
            backbone,
            num_classes,
            adapter,
            modules_to_save,
            label_smoothing,
            optimizer,
            lr,
            weight_decay,
            momentum,
            scheduler,
            warmup_epochs,
            min_lr,
        )
        collection = _metrics(num_classes)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")
        self.vote_metrics = collection.clone(prefix="test/", postfix="_vote")

    def logits(self, points: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits of the plain view, and the voted (mean) logits when ``points`` holds ``1 + V`` views."""
        if points.ndim == 4:
            views = [self.model(view) for view in points]
            return views[0], (sum(views[1:]) / (len(views) - 1) if len(views) > 1 else None)
        return self.model(points), None

    def step(self, batch: Any, stage: str) -> Tensor:
        points, labels = batch
        logits, voted = self.logits(points)
        loss = self.loss(logits, labels)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=stage != "train")
        self.log_dict(metrics, prog_bar=stage == "val", on_step=False, on_epoch=True)
        if voted is not None:
            self.vote_metrics.update(voted.detach(), labels)
            self.log_dict(self.vote_metrics, on_step=False, on_epoch=True)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        points = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, voted = self.logits(points)
        return (voted if voted is not None else logits).softmax(-1)


__all__ = ["PointCloudClassificationTask", "point_backbone"]
