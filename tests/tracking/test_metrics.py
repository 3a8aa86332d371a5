"""Tracking metrics against hand-computed values, the got10k toolkit's IoU and a transcription of pytracking's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from got10k.utils.metrics import rect_iou

from modalpeft.tracking.metrics import (
    GOT10K_THRESHOLDS,
    OPE_OVERLAP_THRESHOLDS,
    clipped_iou,
    got10k_metrics,
    ope_metrics,
    write_got10k_results,
    write_ope_results,
)

SQUARE = [0, 0, 10, 10]


def test_got10k_hand_computed() -> None:
    # sequence A: frame 0 is skipped; IoUs 1, 1/3 (cover 0: not counted), 1/2; sequence B: 3/4
    pred_a = [[90, 90, 1, 1], SQUARE, [5, 0, 10, 10], [0, 0, 10, 5]]
    pred_b = [[0, 0, 1, 1], [10, 10, 20, 15]]
    gt_a, gt_b = [SQUARE] * 4, [[10, 10, 20, 20]] * 2
    result = got10k_metrics([pred_a, pred_b], [gt_a, gt_b], covers=[[8, 8, 0, 8], [1, 5]])
    assert result.num_frames == 3
    assert result.ao == pytest.approx((1 + 0.5 + 0.75) / 3, abs=1e-12)  # pooled over frames, not per sequence
    assert result.sr50 == pytest.approx(2 / 3) and result.sr75 == pytest.approx(1 / 3)  # strict: 0.5, 0.75 fail
    assert len(GOT10K_THRESHOLDS) == 101
    curve = result.success_curve
    assert (curve[0], curve[50], curve[75], curve[100]) == pytest.approx((1.0, 2 / 3, 1 / 3, 0.0))
    everything = got10k_metrics([pred_a, pred_b], [gt_a, gt_b])  # no cover labels: every frame after the first
    assert everything.ao == pytest.approx((1 + 1 / 3 + 0.5 + 0.75) / 4, abs=1e-12)


def test_got10k_clips_to_the_frame_as_the_toolkit_does() -> None:
    pred, gt = [SQUARE, [-5, 0, 10, 10]], [SQUARE, SQUARE]
    assert got10k_metrics([pred], [gt]).ao == pytest.approx(1 / 3)
    # the toolkit moves the corner into the image and keeps the width: [0, 0, 10, 10]
    assert got10k_metrics([pred], [gt], resolutions=[(100, 50)]).ao == pytest.approx(1.0)


def test_clipped_iou_equals_the_got10k_toolkit() -> None:
    rng = np.random.default_rng(0)
    pred = np.concatenate([rng.uniform(-20, 90, (200, 2)), rng.uniform(0, 60, (200, 2))], axis=1)
    gt = np.concatenate([rng.uniform(0, 80, (200, 2)), rng.uniform(1, 40, (200, 2))], axis=1)
    for bound in (None, (100, 70)):
        expected = rect_iou(pred.copy(), gt.copy(), bound=bound)
        np.testing.assert_allclose(clipped_iou(pred, gt, bound), expected, rtol=0, atol=1e-15)


def test_ope_hand_computed() -> None:
    gt = [SQUARE, SQUARE, [20, 20, 10, 10]]
    # frame 0 is replaced by the ground truth; frame 2's empty box by frame 1's
    pred = [[50, 50, 5, 5], [3, 4, 10, 10], [20, 20, 0, 0]]
    # frame 1: IoU 42/158, centre error 5 px, normalised (0.3, 0.4) -> 0.5; frame 2: IoU 0, error sqrt(545) px
    result = ope_metrics([pred], [gt])
    assert len(OPE_OVERLAP_THRESHOLDS) == 21
    expected_curve = [2 / 3] * 6 + [1 / 3] * 14 + [0.0]  # 42/158 = 0.266 passes thresholds 0 .. 0.25
    np.testing.assert_allclose(result.success_curve, expected_curve)
    assert result.success_auc == pytest.approx(26 / 63)
    assert result.precision == pytest.approx(2 / 3) and result.norm_precision == pytest.approx(1 / 3)
    assert result.precision_curve[4] == pytest.approx(1 / 3) and result.precision_curve[5] == pytest.approx(2 / 3)

    # frame 1 not visible: it fails every measure but stays in the denominator; sequences are averaged
    hidden = ope_metrics([pred, [SQUARE, SQUARE]], [gt, [SQUARE, SQUARE]], visible=[[1, 0, 1], [1, 1]])
    assert hidden.success_auc == pytest.approx((20 / 63 + 20 / 21) / 2)
    assert hidden.precision == pytest.approx((1 / 3 + 1) / 2)


def pytracking_seq(pred_bb: torch.Tensor, anno_bb: torch.Tensor, target_visible: torch.Tensor):
    """A transcription of pytracking's ``calc_seq_err_robust`` (dataset 'lasot') and the curves of
    ``extract_results`` (visionml/pytracking, ``pytracking/analysis/extract_results.py``), +1-pixel boxes."""
    pred_bb = pred_bb.clone()
    if (pred_bb[:, 2:] == 0.0).any():
        for i in range(1, pred_bb.shape[0]):
            if (pred_bb[i, 2:] == 0.0).any() and not torch.isnan(anno_bb[i, :]).any():
                pred_bb[i, :] = pred_bb[i - 1, :]
    pred_bb[0, :] = anno_bb[0, :]
    valid = ((anno_bb[:, 2:] > 0.0).sum(1) == 2) & target_visible

    def center(bb, normalized):
        pc, ac = bb[:, :2] + 0.5 * (bb[:, 2:] - 1.0), anno_bb[:, :2] + 0.5 * (anno_bb[:, 2:] - 1.0)
        if normalized:
            pc, ac = pc / anno_bb[:, 2:], ac / anno_bb[:, 2:]
        return ((pc - ac) ** 2).sum(1).sqrt()

    tl = torch.max(pred_bb[:, :2], anno_bb[:, :2])
    br = torch.min(pred_bb[:, :2] + pred_bb[:, 2:] - 1.0, anno_bb[:, :2] + anno_bb[:, 2:] - 1.0)
    inter = (br - tl + 1.0).clamp(0).prod(dim=1)
    overlap = inter / (pred_bb[:, 2:].prod(dim=1) + anno_bb[:, 2:].prod(dim=1) - inter)
    err, err_norm = center(pred_bb, False), center(pred_bb, True)
    err[~valid], err_norm[~valid], overlap[~valid] = float("inf"), -1.0, -1.0
    err_norm[~target_visible], err[~target_visible] = float("inf"), float("inf")
    thr = torch.arange(0.0, 1.0 + 0.05, 0.05, dtype=torch.float64)
    thr_c = torch.arange(0, 51, dtype=torch.float64)
    n = anno_bb.shape[0]
    succ = (overlap.view(-1, 1) > thr.view(1, -1)).sum(0).double() / n
    prec = (err.view(-1, 1) <= thr_c.view(1, -1)).sum(0).double() / n
    norm = (err_norm.view(-1, 1) <= thr_c.view(1, -1) / 100.0).sum(0).double() / n
    return succ, prec, norm


def test_ope_equals_a_pytracking_transcription() -> None:
    g = torch.Generator().manual_seed(0)
    preds, gts, vis, curves = [], [], [], []
    for n in (30, 45, 12):
        gt = torch.cat([torch.rand(n, 2, generator=g) * 80, 5 + torch.rand(n, 2, generator=g) * 30], 1).double()
        pred = gt + torch.randn(n, 4, generator=g).double() * 6
        pred[:, 2:] = pred[:, 2:].clamp(min=0)
        pred[n // 2, 2] = 0.0  # an empty prediction, carried from the frame before
        pred = pred.round(decimals=1)  # ties at the thresholds come up
        visible = torch.rand(n, generator=g) > 0.2
        preds.append(pred)
        gts.append(gt)
        vis.append(visible)
        curves.append(pytracking_seq(pred, gt, visible))
    result = ope_metrics(preds, gts, visible=vis)
    succ, prec, norm = (torch.stack([c[i] for c in curves]).mean(0).numpy() for i in range(3))
    np.testing.assert_allclose(result.success_curve, succ, atol=1e-12)
    np.testing.assert_allclose(result.precision_curve, prec, atol=1e-12)
    np.testing.assert_allclose(result.norm_precision_curve, norm, atol=1e-12)
    assert result.success_auc == pytest.approx(succ.mean()) and 0.1 < result.success_auc < 0.9


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"frame 1 has the box \[0.0, 0.0, -3.0, 4.0\]"):
        ope_metrics([[SQUARE, [0, 0, -3, 4]]], [[SQUARE, SQUARE]])
    with pytest.raises(ValueError, match="3 predicted boxes for 2 ground-truth frames"):
        got10k_metrics([[SQUARE] * 3], [[SQUARE] * 2])
    with pytest.raises(ValueError, match="2 predicted sequences for 1"):
        ope_metrics([[SQUARE], [SQUARE]], [[SQUARE]])
    with pytest.raises(ValueError, match=r"expected an \(N, 4\) array"):
        got10k_metrics([[[0, 0, 1]]], [[SQUARE]])
    with pytest.raises(ValueError, match="frame 1 is marked visible"):
        got10k_metrics([[SQUARE, SQUARE]], [[SQUARE, [0, 0, 0, 5]]], covers=[[1, 3]])
    with pytest.raises(ValueError, match="finite"):
        got10k_metrics([[SQUARE, [0, float("nan"), 1, 1]]], [[SQUARE, SQUARE]])
    with pytest.raises(ValueError, match="2 values for 3 frames"):
        ope_metrics([[SQUARE] * 3], [[SQUARE] * 3], visible=[[1, 1]])


def test_writers_give_the_official_layouts(tmp_path) -> None:
    boxes = np.array([[1, 2, 3, 4], [1.5, 2.25, 3.125, 4.0]])
    folder = write_got10k_results(tmp_path, "GOT-10k_Test_000001", boxes, [0.01, 0.02])
    assert sorted(p.name for p in folder.iterdir()) == ["GOT-10k_Test_000001_001.txt", "GOT-10k_Test_000001_time.txt"]
    text = (folder / "GOT-10k_Test_000001_001.txt").read_text()
    assert text == "1.000,2.000,3.000,4.000\n1.500,2.250,3.125,4.000\n"
    np.testing.assert_allclose(np.loadtxt(folder / "GOT-10k_Test_000001_001.txt", delimiter=","), boxes)
    write_got10k_results(tmp_path, "GOT-10k_Test_000001", boxes, [0.03, 0.04], repetition=2)
    times = np.loadtxt(folder / "GOT-10k_Test_000001_time.txt", delimiter=",")
    np.testing.assert_allclose(times, [[0.01, 0.03], [0.02, 0.04]])
    path = write_ope_results(tmp_path / "lasot", "airplane-1", boxes)
    assert path.name == "airplane-1.txt" and path.read_text().splitlines()[1] == "1.500,2.250,3.125,4.000"
    with pytest.raises(ValueError, match="1 times for 2 boxes"):
        write_got10k_results(tmp_path, "s", boxes, [0.1])
    with pytest.raises(ValueError, match="w, h >= 0"):
        write_ope_results(tmp_path, "s", [[0, 0, -1, 1]])
