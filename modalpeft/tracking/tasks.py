"""Lightning system for tracking: SPMTrack's training of a :class:`~modalpeft.tracking.models.OneStreamTracker`.

Batches are :class:`~modalpeft.tracking.pairs.TrackingPairs` dicts (``templates``, ``template_masks``, ``searches``,
``boxes``). ``fit``/``validate``/``test`` log the official loss (``loss``, and its parts ``bce`` and ``giou``) and
``iou``: the mean IoU, over the search frames of the batch, of the box the official post-processing picks (Hann
window penalty 0.45) with the ground truth. ``predict`` returns those boxes and their confidences. At the end of
``test``, when the data module has ``sequences["test"]`` (GOT-10k val), the task tracks them frame by frame
(:class:`~modalpeft.tracking.inference.Tracker`) and logs GOT-10k's ``test/ao``, ``test/sr50`` and ``test/sr75``.
"""

from __future__ import annotations

import torch
import torchmetrics
from peft import PeftConfig
from torch import Tensor, nn

from ..core.config import AdapterConfig
from ..lightning.optim import OptimizerName, SchedulerName
from ..lightning.task import AdapterTask, Baseline
from .losses import box_iou_pairs, select_box, tracking_loss


class TrackingTask(AdapterTask):
    """Train a one-stream tracker with SPMTrack's criterion and optimiser settings.

    Args as :class:`~modalpeft.lightning.AdapterTask`; the defaults are the official recipe (``run.yaml``): AdamW,
    lr 1e-4, weight decay 0.1 except on 1-D parameters and on the ``embed`` parameters (``query_embed``,
    ``token_type_embed``, the position and patch embeddings; the official regex matches those names, so the
    ``track_query`` is decayed), cosine per step to 1e-6 after 2 warm-up epochs (linear from 0 here, from 1e-7
    there). ``modules_to_save`` defaults to the tracker's ``trainable_modules`` (head and learnable tokens); the
    ``"linear"`` baseline trains exactly those (the head-only baseline).

    Args:
        window_penalty: the Hann-window weight of the box selection for the ``iou`` metric and ``predict`` (0.45).
        track_sequences: at most this many test sequences are tracked frame by frame at the end of ``test``
            (``0``: none; ``-1``: all).
    """

    no_decay = r"(token_type_embed|query_embed|pos_embed|patch_embed)"

    def __init__(
        self,
        backbone: nn.Module,
        adapter: AdapterConfig | PeftConfig | Baseline = "linear",
        modules_to_save: list[str] | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 0.1,
        momentum: float = 0.9,
        scheduler: SchedulerName = "cosine",
        warmup_epochs: float = 2.0,
        min_lr: float = 1e-6,
        window_penalty: float = 0.45,
        track_sequences: int = -1,
    ) -> None:
        if modules_to_save is None:
            modules_to_save = list(getattr(backbone, "trainable_modules", ()))
        if not 0.0 <= window_penalty <= 1.0:
            raise ValueError(f"window_penalty={window_penalty!r} must be in [0, 1] (SPMTrack: 0.45).")
        super().__init__(
            backbone, adapter, modules_to_save, optimizer, lr, weight_decay, momentum, scheduler, warmup_epochs, min_lr
        )
        self.window_penalty, self.track_sequences = window_penalty, track_sequences
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_iou", torchmetrics.MeanMetric())

    def predict_boxes(self, outputs: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """``(B, S, 4)`` normalised boxes and ``(B, S)`` confidences from the head outputs of ``S`` search frames."""
        picked = [select_box(out, self.window_penalty) for out in outputs]
        return torch.stack([b for b, _ in picked], dim=1), torch.stack([c for _, c in picked], dim=1)

    def step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        outputs = self.model(batch["templates"], batch["template_masks"], batch["searches"])
        loss, parts = tracking_loss(outputs, batch["boxes"])
        boxes, _ = self.predict_boxes(outputs)
        iou, _ = box_iou_pairs(boxes.flatten(0, 1), batch["boxes"].flatten(0, 1).float())
        metric = getattr(self, f"{stage}_iou")
        metric.update(iou)
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=sync, batch_size=len(boxes))
        for name in ("bce", "giou"):
            value = sum(v for k, v in parts.items() if k.startswith(name))
            self.log(f"{stage}/{name}", value, sync_dist=sync, batch_size=len(boxes))
        self.log(f"{stage}/iou", metric, prog_bar=stage == "val", on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_start(self) -> None:
        # new samples every epoch also where the sampler's indices do not carry the epoch (DDP wraps the sampler)
        dataset = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get("train")
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_test_epoch_end(self) -> None:
        from .inference import Tracker, evaluate_sequences

        sequences = getattr(getattr(self.trainer, "datamodule", None), "sequences", {}).get("test") or []
        if self.track_sequences >= 0:
            sequences = sequences[: self.track_sequences]
        if not sequences:
            return
        tracker = Tracker(self.model, self.window_penalty, device=self.device)
        result = evaluate_sequences(tracker, sequences, "got10k")
        for name in ("ao", "sr50", "sr75"):
            self.log(f"test/{name}", getattr(result, name))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        outputs = self.model(batch["templates"], batch["template_masks"], batch["searches"])
        boxes, confidence = self.predict_boxes(outputs)
        return {"boxes": boxes, "confidence": confidence}


__all__ = ["TrackingTask"]
