"""Tracking metrics with the official toolkits' conventions, and writers for their per-sequence result files.

Boxes are ``[x, y, w, h]`` in pixels (top-left corner, width, height), one row per frame.

**GOT-10k** (the official ``got10k`` toolkit 0.1.3, ``ExperimentGOT10k.report`` and ``utils.metrics.rect_iou``):
frame 0 (the given box) is skipped, only frames with ``cover > 0`` count, and the IoUs of all counted frames of all
sequences are pooled: ``AO = mean(IoU)``, ``SR_t = mean(IoU > t)`` for t = 0.5, 0.75, and the success curve is
``mean(IoU > θ)`` over ``θ ∈ linspace(0, 1, 101)``. With a resolution ``(W, H)`` both boxes are first clipped to the
image, and ``IoU = |A ∩ B| / (|A ∪ B| + eps)`` clipped to [0, 1].

**OPE** (LaSOT, TrackingNet, OTB; pytracking's ``analysis/extract_results.py``, the analysis OSTrack and SPMTrack
use): per sequence, frame 0's prediction is replaced by the ground truth, a zero-size prediction by the previous
frame's, and a frame is *valid* when its ground-truth box has positive size and the target is visible (LaSOT:
``full_occlusion == 0`` and ``out_of_view == 0``). Invalid frames fail every measure but stay in the denominator (the
sequence length). The success curve is ``mean(IoU > θ)`` over the 21 thresholds ``θ = 0, 0.05, ..., 1``
(``torch.arange(0, 1.05, 0.05)`` in float64, strict ``>``), the precision curve ``mean(e ≤ τ)`` over ``τ = 0..50``
pixels for the centre distance ``e``, the normalised precision curve the same with the centre offsets divided by
the ground-truth width and height, ``τ = 0, 0.01, ..., 0.5``. Curves are averaged over sequences;
``success_auc`` is the mean of the success curve, ``precision`` the curve at 20 px, ``norm_precision`` at 0.2.
pytracking's "+1 pixel" box convention (``x2 = x + w − 1``) cancels out of IoU and of centre differences, so plain
``x + w`` is used. Differences from pytracking, on inputs it would not score: mismatched lengths are an error here
(pytracking pads with zero boxes or truncates), and a frame with an empty ground-truth box counts as a normalised
precision *success* there when no visibility flags are given (its error is set to −1); here it fails.

Metrics are fractions in [0, 1]; papers print them x 100.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.state import atomic_write

ArrayLike = np.ndarray | torch.Tensor | Sequence[Sequence[float]]

OPE_OVERLAP_THRESHOLDS = torch.arange(0.0, 1.05, 0.05, dtype=torch.float64).numpy()
"""The 21 success thresholds of pytracking's analysis (the float64 values ``torch.arange`` gives)."""
GOT10K_THRESHOLDS = np.linspace(0, 1, 101)


def _boxes(boxes: ArrayLike, what: str) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array; NaN, infinities and negative sizes are errors naming the frame."""
    out = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    out = out.astype(np.float64)
    if out.ndim != 2 or out.shape[1] != 4:
        raise ValueError(f"{what}: expected an (N, 4) array of [x, y, w, h] boxes, got shape {tuple(out.shape)}")
    bad = ~np.isfinite(out).all(axis=1) | (out[:, 2:] < 0).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what}: frame {i} has the box {out[i].tolist()}; boxes are [x, y, w, h] with finite values and "
            "w, h >= 0 (write the target's absence as a visibility flag, not as a negative size)."
        )
    return out


def _pair(predicted: ArrayLike, truth: ArrayLike, where: str) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _boxes(predicted, f"{where} prediction"), _boxes(truth, f"{where} ground truth")
    if len(pred) != len(gt):
        raise ValueError(
            f"{where}: {len(pred)} predicted boxes for {len(gt)} ground-truth frames; give one box per frame "
            "(frame 0's prediction is the initial box)."
        )
    return pred, gt


def _flags(values: ArrayLike | None, n: int, what: str) -> np.ndarray | None:
    if values is None:
        return None
    out = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if len(out) != n:
        raise ValueError(f"{what}: {len(out)} values for {n} frames; give one per frame.")
    return out


def _check_sequences(predictions: Sequence, ground_truths: Sequence) -> None:
    if len(predictions) != len(ground_truths) or len(ground_truths) == 0:
        raise ValueError(
            f"{len(predictions)} predicted sequences for {len(ground_truths)} ground-truth sequences; give the same "
            "number, at least one."
        )


def clipped_iou(
    pred: np.ndarray, gt: np.ndarray, resolution: tuple[float, float] | None = None, eps: float = np.finfo(float).eps
) -> np.ndarray:
    """The GOT-10k toolkit's IoU of ``(N, 4)`` xywh boxes, both clipped to a ``(W, H)`` image first when given
    (the corner is clipped into the image, then the size to what is left of it); ``eps`` is added to the union
    (pytracking: 0)."""
    if resolution is not None:
        pred, gt = pred.copy(), gt.copy()
        for rect in (pred, gt):
            for i, bound in ((0, resolution[0]), (1, resolution[1])):
                rect[:, i] = np.clip(rect[:, i], 0, bound)
                rect[:, i + 2] = np.clip(rect[:, i + 2], 0, bound - rect[:, i])
    lo = np.maximum(pred[:, :2], gt[:, :2])
    hi = np.minimum(pred[:, :2] + pred[:, 2:], gt[:, :2] + gt[:, 2:])
    inter = np.prod(np.maximum(hi - lo, 0), axis=1)
    union = np.prod(pred[:, 2:], axis=1) + np.prod(gt[:, 2:], axis=1) - inter
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only for two empty boxes: invalid frames
        return np.clip(inter / (union + eps), 0.0, 1.0)


@dataclass(frozen=True)
class GOT10kResult:
    """GOT-10k's measures (fractions) and its success curve over ``GOT10K_THRESHOLDS``."""

    ao: float
    sr50: float
    sr75: float
    success_curve: np.ndarray
    num_frames: int


def got10k_metrics(
    predictions: Sequence[ArrayLike],
    ground_truths: Sequence[ArrayLike],
    covers: Sequence[ArrayLike] | None = None,
    resolutions: Sequence[tuple[float, float]] | None = None,
) -> GOT10kResult:
    """AO, SR@0.5, SR@0.75 and the success curve, as the GOT-10k toolkit computes them (see the module docstring).

    Args:
        predictions: per sequence, the ``(N, 4)`` tracked boxes (row 0, the initial box, is not scored).
        ground_truths: per sequence, the ``(N, 4)`` ground-truth boxes.
        covers: per sequence, ``cover.label`` (0 = target absent, 1..8 visible fraction); ``None``: all visible.
        resolutions: per sequence, the frame size ``(W, H)`` the boxes are clipped to (the toolkit's
            ``meta['resolution']``); ``None``: no clipping.

    Raises:
        ValueError: mismatched sequence or frame counts, bad boxes, a visible frame with an empty ground truth, or
            no frame to score.
    """
    _check_sequences(predictions, ground_truths)
    ious = []
    for s, (predicted, truth) in enumerate(zip(predictions, ground_truths, strict=True)):
        pred, gt = _pair(predicted, truth, f"sequence {s}")
        cover = _flags(covers[s] if covers is not None else None, len(gt), f"sequence {s} covers")
        counted = np.ones(len(gt) - 1, dtype=bool) if cover is None else cover[1:] > 0
        empty = counted & (gt[1:, 2:] <= 0).any(axis=1)
        if empty.any():
            i = int(np.flatnonzero(empty)[0]) + 1
            raise ValueError(
                f"sequence {s}: frame {i} is marked visible (cover > 0) but its ground-truth box {gt[i].tolist()} is "
                "empty; fix the annotation or its cover label."
            )
        resolution = resolutions[s] if resolutions is not None else None
        ious.append(clipped_iou(pred[1:], gt[1:], resolution)[counted])
    pooled = np.concatenate(ious)
    if len(pooled) == 0:
        raise ValueError("no frame to score: every sequence has only its first frame or no visible frame.")
    curve = (pooled[:, None] > GOT10K_THRESHOLDS[None, :]).mean(axis=0)
    return GOT10kResult(
        float(pooled.mean()), float((pooled > 0.5).mean()), float((pooled > 0.75).mean()), curve, len(pooled)
    )


@dataclass(frozen=True)
class OPEResult:
    """OPE measures (fractions) and their sequence-averaged curves (see the module docstring)."""

    success_auc: float
    precision: float
    norm_precision: float
    success_curve: np.ndarray  # over OPE_OVERLAP_THRESHOLDS
    precision_curve: np.ndarray  # over 0..50 px
    norm_precision_curve: np.ndarray  # over 0, 0.01, ..., 0.5


def ope_metrics(
    predictions: Sequence[ArrayLike], ground_truths: Sequence[ArrayLike], visible: Sequence[ArrayLike] | None = None
) -> OPEResult:
    """Success AUC, precision at 20 px and normalised precision at 0.2, as pytracking's analysis computes them.

    Args:
        predictions: per sequence, the ``(N, 4)`` tracked boxes (row 0 is replaced by the ground truth).
        ground_truths: per sequence, the ``(N, 4)`` ground-truth boxes.
        visible: per sequence, 1/True where the target is in view (LaSOT: ``~(full_occlusion | out_of_view)``);
            ``None``: every frame with a non-empty ground-truth box.

    Raises:
        ValueError: mismatched sequence or frame counts, or bad boxes.
    """
    _check_sequences(predictions, ground_truths)
    center_thresholds = np.arange(0, 51, dtype=np.float64)
    success, prec, norm_prec = [], [], []
    for s, (predicted, truth) in enumerate(zip(predictions, ground_truths, strict=True)):
        pred, gt = _pair(predicted, truth, f"sequence {s}")
        flags = _flags(visible[s] if visible is not None else None, len(gt), f"sequence {s} visible")
        pred[0] = gt[0]
        for i in range(1, len(pred)):
            if (pred[i, 2:] == 0).any():
                pred[i] = pred[i - 1]
        valid = (gt[:, 2:] > 0).all(axis=1)
        if flags is not None:
            valid &= flags.astype(bool)
        overlap = np.where(valid, clipped_iou(pred, gt, eps=0.0), -1.0)
        offset = (pred[:, :2] + pred[:, 2:] / 2) - (gt[:, :2] + gt[:, 2:] / 2)
        size = np.where(gt[:, 2:] > 0, gt[:, 2:], 1.0)
        center = np.where(valid, np.linalg.norm(offset, axis=1), np.inf)
        norm_center = np.where(valid, np.linalg.norm(offset / size, axis=1), np.inf)
        success.append((overlap[:, None] > OPE_OVERLAP_THRESHOLDS[None, :]).mean(axis=0))
        prec.append((center[:, None] <= center_thresholds[None, :]).mean(axis=0))
        norm_prec.append((norm_center[:, None] <= center_thresholds[None, :] / 100).mean(axis=0))
    success_curve, precision_curve, norm_curve = (np.mean(c, axis=0) for c in (success, prec, norm_prec))
    return OPEResult(
        float(success_curve.mean()),
        float(precision_curve[20]),
        float(norm_curve[20]),
        success_curve,
        precision_curve,
        norm_curve,
    )


def _rows(values: np.ndarray, fmt: str) -> bytes:
    return "".join(",".join(fmt % v for v in np.atleast_1d(row)) + "\n" for row in values).encode()


def write_got10k_results(
    directory: str | os.PathLike[str],
    sequence: str,
    boxes: ArrayLike,
    times: Sequence[float] | np.ndarray,
    repetition: int = 1,
) -> Path:
    """Write one run in the GOT-10k submission layout: ``<dir>/<seq>/<seq>_00k.txt`` and ``<seq>_time.txt``.

    Boxes are written ``%.3f`` comma-separated, times (seconds per frame) ``%.8f``, as the toolkit's ``_record``
    does; repetition ``k > 1`` adds a column to an existing time file. Returns the sequence folder.
    """
    pred = _boxes(boxes, f"{sequence} boxes")
    seconds = np.asarray(times, dtype=np.float64).reshape(-1)
    if len(seconds) != len(pred):
        raise ValueError(f"{sequence}: {len(seconds)} times for {len(pred)} boxes; give one time per frame.")
    if isinstance(repetition, bool) or not isinstance(repetition, int) or not 1 <= repetition <= 999:
        raise ValueError(f"repetition={repetition!r} must be an integer in 1..999 (the file suffix _001.._999).")
    folder = Path(directory) / sequence
    time_file = folder / f"{sequence}_time.txt"
    columns = seconds[:, None]
    if repetition > 1 and time_file.exists():
        existing = np.loadtxt(time_file, delimiter=",", ndmin=2)
        if len(existing) != len(seconds):
            raise ValueError(f"{time_file} has {len(existing)} rows for {len(seconds)} frames of this run.")
        columns = np.concatenate([existing, columns], axis=1)
    files = {f"{sequence}_{repetition:03d}.txt": _rows(pred, "%.3f"), time_file.name: _rows(columns, "%.8f")}
    atomic_write(files, folder)
    return folder


def write_ope_results(directory: str | os.PathLike[str], sequence: str, boxes: ArrayLike) -> Path:
    """Write ``<dir>/<seq>.txt`` (LaSOT / OTB / TrackingNet): one ``x,y,w,h`` row per frame, ``%.3f``."""
    atomic_write({f"{sequence}.txt": _rows(_boxes(boxes, f"{sequence} boxes"), "%.3f")}, directory)
    return Path(directory) / f"{sequence}.txt"
