"""Deepfake detection metrics: frame- and video-level AUROC, average precision and equal error rate.

A video's score is the mean of its frames' fake probabilities, as the official code of Yermakov et al.
("Unlocking the Hidden Potential of CLIP in Generalizable Deepfake Detection", arXiv 2503.19683,
``compute_across_videos`` in yermandy/deepfake-detection ``src/model/dfdet.py``) aggregates them; the paper's
headline number is the video-level AUROC. AUROC, AP and the ROC curve come from torchmetrics; torchmetrics has
no EER, which is read off its ROC curve here.

Differences from the official code: AP here is the average precision of the *fake* class (the usual definition
for a detector); the official ``mAP`` averages the APs of the real and the fake class. With two classes the
official one-vs-rest macro AUROC equals the fake-class AUROC computed here.
"""

from __future__ import annotations

import math
import warnings

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc


def video_scores(probs: Tensor, labels: Tensor, videos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Average frame probabilities per video.

    Args:
        probs: fake probability of each frame.
        labels: each frame's label (0 real, 1 fake); every frame of a video must carry the same label.
        videos: each frame's video id (any integers).

    Returns:
        ``(video_probs, video_labels, video_ids)``, one entry per distinct video id, in increasing id order.

    Raises:
        ValueError: when a video's frames carry different labels.

    Shapes:
        - probs, labels, videos: ``(N,)``; outputs: ``(V,)`` for ``V`` distinct videos.
    """
    if not (probs.shape == labels.shape == videos.shape) or probs.dim() != 1:
        raise ValueError(
            f"probs, labels and videos must be 1-D of one length, got {tuple(probs.shape)}, {tuple(labels.shape)}, "
            f"{tuple(videos.shape)}"
        )
    ids, inverse = torch.unique(videos, return_inverse=True)
    counts = torch.zeros(len(ids), dtype=torch.float64, device=probs.device).index_add_(
        0, inverse, torch.ones_like(probs, dtype=torch.float64)
    )
    sums = torch.zeros(len(ids), dtype=torch.float64, device=probs.device).index_add_(0, inverse, probs.double())
    first = torch.full((len(ids),), -1, dtype=labels.dtype, device=labels.device).scatter_(0, inverse, labels)
    mixed = (labels != first[inverse]).nonzero().flatten()
    if len(mixed):
        bad = videos[mixed[0]].item()
        raise ValueError(
            f"video {bad} has frames labelled both real and fake; a video's frames must share one label (check the "
            "video ids the data module gives)."
        )
    return (sums / counts).to(probs.dtype), first, ids


def equal_error_rate(probs: Tensor, labels: Tensor) -> float:
    """The rate at which the false positive rate equals the false negative rate (1 - TPR), linearly interpolated
    between the two ROC points (torchmetrics' ``binary_roc``) where FPR + TPR crosses 1. NaN without both classes.

    This is what the official ``calculate_eer`` finds with ``brentq`` on the interpolated ROC curve."""
    if labels.min() == labels.max():
        return math.nan
    fpr, tpr, _ = binary_roc(probs.float(), labels.long())
    gap = fpr + tpr - 1  # non-decreasing along the curve; EER where it crosses 0: fpr = 1 - tpr
    after = int(torch.searchsorted(gap.contiguous(), torch.zeros(1, dtype=gap.dtype)).item())
    if after == 0:
        return float(fpr[0])
    before = after - 1
    if after >= len(gap):
        return float(fpr[-1])
    g0, g1 = gap[before].item(), gap[after].item()
    w = 0.0 if g1 == g0 else -g0 / (g1 - g0)
    return float(fpr[before] + w * (fpr[after] - fpr[before]))


def binary_scores(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """``{"auroc", "ap", "eer"}`` of fake probabilities against labels (1 = fake is the positive class); NaN when
    only one class is present (a metric of one class is undefined)."""
    if len(labels) == 0 or labels.min() == labels.max():
        return {"auroc": math.nan, "ap": math.nan, "eer": math.nan}
    labels = labels.long()
    return {
        "auroc": float(binary_auroc(probs.float(), labels)),
        "ap": float(binary_average_precision(probs.float(), labels)),
        "eer": equal_error_rate(probs, labels),
    }


class DeepfakeMetrics(torchmetrics.Metric):
    """Collects frame probabilities, labels and video ids; :meth:`compute` gives frame- and video-level AUROC,
    AP and EER (``{"auroc_frame", "ap_frame", "eer_frame", "auroc_video", "ap_video", "eer_video"}``).

    Frames of one video may arrive in different batches (and, under DDP, on different processes: the states are
    gathered before computing)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("videos", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, labels: Tensor, videos: Tensor) -> None:
        self.probs.append(probs.detach().float().flatten())
        self.labels.append(labels.detach().long().flatten())
        self.videos.append(videos.detach().long().flatten())

    def compute(self) -> dict[str, float]:
        if not self.probs:
            return {}
        cat = torchmetrics.utilities.dim_zero_cat
        probs, labels, videos = cat(self.probs), cat(self.labels), cat(self.videos)
        out = {f"{k}_frame": v for k, v in binary_scores(probs, labels).items()}
        vp, vl, _ = video_scores(probs, labels, videos)
        out.update({f"{k}_video": v for k, v in binary_scores(vp, vl).items()})
        if math.isnan(out["auroc_video"]):
            warnings.warn(
                "DeepfakeMetrics: the evaluated frames hold only one class, so AUROC, AP and EER are NaN; evaluate on "
                "real and fake videos.",
                stacklevel=2,
            )
        return out


__all__ = ["DeepfakeMetrics", "binary_scores", "equal_error_rate", "video_scores"]
