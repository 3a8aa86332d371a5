"""Boxes, masks and the training criterion of SPMTrack's tracker (``trackit`` at c581fe27, METHODS.md §7b).

Boxes inside a crop are ``x1, y1, x2, y2``; the head's are normalised to the search region.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def template_mask(boxes: Tensor, template_size: tuple[int, int], feat_size: tuple[int, int]) -> Tensor:
    """The official foreground mask of templates: 1 on the tokens the (cropped) box covers, else 0.

    ``boxes``: ``(..., 4)`` x1, y1, x2, y2 in template pixels. The box is divided by the stride and rasterised as the
    official ``bbox_rasterize`` (``floor(x1)``, ``floor(x2 + 1 - 1e-4)``). Returns ``(..., hz, wz)`` int64.
    """
    (hz, wz), (h, w) = feat_size, template_size
    scale = boxes.new_tensor([wz / w, hz / h, wz / w, hz / h])
    return _rasterised_mask(boxes * scale, (hz, wz))


def _rasterised_mask(boxes: Tensor, map_size: tuple[int, int]) -> Tensor:
    h, w = map_size
    x1, y1 = boxes[..., 0].floor(), boxes[..., 1].floor()
    x2, y2 = (boxes[..., 2] + 1 - 1e-4).floor(), (boxes[..., 3] + 1 - 1e-4).floor()
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    in_x = (xs >= x1[..., None]) & (xs < x2[..., None])
    in_y = (ys >= y1[..., None]) & (ys < y2[..., None])
    return (in_y[..., :, None] & in_x[..., None, :]).long()


def positive_mask(boxes: Tensor, map_size: tuple[int, int]) -> Tensor:
    """The official positive samples of the score map: the tokens a box covers (``(B, 4)`` normalised x1, y1, x2,
    y2 -> ``(B, H, W)`` bool), by the same rasterisation as :func:`template_mask`."""
    h, w = map_size
    return _rasterised_mask(boxes * boxes.new_tensor([w, h, w, h]), map_size).bool()


def hann_window(map_size: tuple[int, int]) -> Tensor:
    """The official penalty window: the outer product of two symmetric Hann windows, ``(H, W)``."""
    return torch.outer(torch.hann_window(map_size[0], periodic=False), torch.hann_window(map_size[1], periodic=False))


def select_box(output: dict[str, Tensor], window_penalty: float = 0.45) -> tuple[Tensor, Tensor]:
    """The official post-processing (``box_with_score_map``): ``sigmoid(score)`` blended with a Hann window
    (``(1 - p) · score + p · window``, p = 0.45) picks the token; returns its box ``(B, 4)`` (normalised x1, y1, x2,
    y2) and its unpenalised confidence ``(B,)``."""
    score = output["score_map"].detach().float().sigmoid().flatten(1)
    if window_penalty > 0:
        window = hann_window(tuple(output["score_map"].shape[-2:])).to(score.device).flatten()
        best = (score * (1 - window_penalty) + window * window_penalty).argmax(dim=1)
    else:
        best = score.argmax(dim=1)
    boxes = output["boxes"].detach().float().flatten(1, 2)
    index = torch.arange(len(best), device=best.device)
    return boxes[index, best], score[index, best]


def box_iou_pairs(a: Tensor, b: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """IoU and GIoU of aligned ``(N, 4)`` x1, y1, x2, y2 boxes (the official ``bbox_overlaps(..., is_aligned=True)``
    and ``GIoULoss``'s quantity, ``eps`` as theirs)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = (area_a + area_b - inter).clamp(min=eps)
    iou = inter / union
    enclose = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
    enclose_area = (enclose[:, 0] * enclose[:, 1]).clamp(min=eps)
    return iou, iou - (enclose_area - union) / enclose_area


def tracking_loss(outputs: list[dict[str, Tensor]], boxes: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The official criterion (``box_with_score_map``, METHODS.md §7b): per search frame, an IoU-aware BCE on the
    score map and a GIoU loss on the boxes at the positive tokens, each summed and divided by the number of
    positives (at least 1), weight 1 each, summed over the search frames.

    The BCE target is the IoU of the predicted box with the ground truth at positive tokens (no gradient), 0
    elsewhere. ``boxes``: ``(B, S, 4)`` normalised x1, y1, x2, y2 in the search crops. Returns the loss and its parts.
    """
    total = boxes.new_zeros(())
    parts: dict[str, Tensor] = {}
    for i, out in enumerate(outputs):
        score, pred = out["score_map"], out["boxes"]
        gt = boxes[:, i].float()
        pos = positive_mask(gt, tuple(score.shape[-2:]))
        n = pos.sum().clamp(min=1).float()
        batch_idx, ys, xs = pos.nonzero(as_tuple=True)
        pred_pos = pred[batch_idx, ys, xs]
        gt_pos = gt[batch_idx]
        iou, giou = box_iou_pairs(pred_pos, gt_pos)
        target = torch.zeros_like(score)
        target[batch_idx, ys, xs] = iou.detach()
        cls = F.binary_cross_entropy_with_logits(score, target, reduction="sum") / n
        reg = (1 - giou).sum() / n if len(batch_idx) else pred.sum() * 0
        parts[f"bce_{i}"], parts[f"giou_{i}"] = cls.detach(), reg.detach()
        total = total + cls + reg
    return total, parts


__all__ = ["box_iou_pairs", "hann_window", "positive_mask", "select_box", "template_mask", "tracking_loss"]
