"""Lightning systems for vision: image classification with an adapted backbone."""

from __future__ import annotations

import math
from typing import Literal

from peft import PeftConfig
from torch import nn

from ..core.config import AdapterConfig
from ..lightning.optim import OptimizerName, SchedulerName
from ..lightning.task import Baseline, ClassificationTask

HeadInit = Literal["default", "vpt"]


def classifier_of(backbone: nn.Module) -> nn.Module | None:
    """The backbone's classifier: timm's ``get_classifier()``, else its ``head`` attribute."""
    get_classifier = getattr(backbone, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else getattr(backbone, "head", None)
    return head if isinstance(head, nn.Module) else None


def init_vpt_head(backbone: nn.Module, prior: float = 0.01) -> None:
    """VPT's head init: weight ``kaiming_normal_(mode="fan_out")``, bias ``-log((1 - prior) / prior)``
    (-4.595 for ``prior=0.01``), so every class starts with a small probability.

    Raises:
        ValueError: when the backbone has no ``nn.Linear`` classifier.
    """
    head = classifier_of(backbone)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"head_init='vpt' initialises an nn.Linear classifier, but {type(backbone).__name__}'s classifier is "
            f"{type(head).__name__ if head is not None else 'missing'}; use head_init='default' or a backbone with a "
            "Linear head (timm ViTs have one, `head`)."
        )
    nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
    if head.bias is not None:
        nn.init.constant_(head.bias, -math.log((1 - prior) / prior))


class ImageClassificationTask(ClassificationTask):
    """Image classification: cross-entropy, top-1 accuracy and, with more than 5 classes, top-5 accuracy
    (torchmetrics), logged as ``{train,val,test}/acc`` and ``/acc_top5``.

    Batches are ``(images, labels)`` with images ``(B, C, H, W)``, as the data modules in
    :mod:`modalpeft.vision.data` give them. Args as :class:`~modalpeft.lightning.ClassificationTask`, plus:

    Args:
        head_init: ``"default"`` keeps the backbone's (timm's) head init; ``"vpt"`` re-initialises the Linear
            classifier as VPT does (kaiming-normal ``fan_out`` weight, bias ``-log(99)``), after resetting it to
            ``num_classes``.
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
        head_init: HeadInit = "default",
    ) -> None:
        if head_init not in ("default", "vpt"):
            raise ValueError(f"head_init={head_init!r} is not valid; choose 'default' or 'vpt'.")
        if head_init == "vpt":
            # reset first (as ClassificationTask would), so that the new head is the one initialised
            if getattr(backbone, "num_classes", num_classes) != num_classes and hasattr(backbone, "reset_classifier"):
                backbone.reset_classifier(num_classes)
            init_vpt_head(backbone)
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
