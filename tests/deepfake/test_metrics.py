"""Frame- and video-level metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from modalpeft.vision.deepfake.metrics import DeepfakeMetrics, binary_scores, equal_error_rate, video_scores


def test_auroc_ap_eer_match_a_hand_computed_example() -> None:
    # fake scores 0.35, 0.8 vs real scores 0.1, 0.4: of the 4 (fake, real) pairs, 3 are ordered right -> AUROC 3/4.
    probs = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([0, 0, 1, 1])
    scores = binary_scores(probs, labels)
    assert scores["auroc"] == pytest.approx(0.75)
    # ranked 0.8 (fake), 0.4 (real), 0.35 (fake): precision 1 at recall 1/2, 2/3 at recall 1 -> AP = (1 + 2/3) / 2
    assert scores["ap"] == pytest.approx(5 / 6)
    # at threshold 0.4: FPR 1/2, FNR 1/2 -> EER 0.5
    assert scores["eer"] == pytest.approx(0.5)


def test_eer_interpolates_between_roc_points() -> None:
    # a tie between a fake and a real at 0.5: ROC points (0, 0), (0, 1/2), (1/2, 1), (1, 1); the diagonal segment
    # from (0, 1/2) to (1/2, 1) crosses FPR = 1 - TPR halfway, at FPR = FNR = 1/4
    probs = torch.tensor([0.9, 0.5, 0.5, 0.1])
    labels = torch.tensor([1, 1, 0, 0])
    assert equal_error_rate(probs, labels) == pytest.approx(0.25)
    perfect = equal_error_rate(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]))
    assert perfect == pytest.approx(0.0)
    inverted = equal_error_rate(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1]))
    assert inverted == pytest.approx(1.0)


def test_video_scores_average_frames_per_video() -> None:
    probs = torch.tensor([0.2, 0.4, 0.9, 0.7, 0.5, 0.1])
    labels = torch.tensor([0, 0, 1, 1, 1, 0])
    videos = torch.tensor([3, 3, 7, 7, 7, 1])
    vp, vl, ids = video_scores(probs, labels, videos)
    assert ids.tolist() == [1, 3, 7]
    assert vp.tolist() == pytest.approx([0.1, 0.3, 0.7])
    assert vl.tolist() == [0, 0, 1]


def test_video_level_differs_from_frame_level() -> None:
    # frames: real video A (0.6, 0.0), fake video B (0.5, 0.5): frame AUROC 0.5 (0.6 > 0.5 > 0.0), video AUROC 1
    probs = torch.tensor([0.6, 0.0, 0.5, 0.5])
    labels = torch.tensor([0, 0, 1, 1])
    videos = torch.tensor([0, 0, 1, 1])
    metric = DeepfakeMetrics()
    metric.update(probs[:3], labels[:3], videos[:3])  # a video split across batches
    metric.update(probs[3:], labels[3:], videos[3:])
    out = metric.compute()
    assert out["auroc_frame"] == pytest.approx(0.5)
    assert out["auroc_video"] == pytest.approx(1.0)
    assert out["eer_video"] == pytest.approx(0.0)


def test_mixed_labels_in_one_video_and_one_class_are_reported() -> None:
    with pytest.raises(ValueError, match="video 4 has frames labelled both real and fake"):
        video_scores(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), torch.tensor([4, 4]))
    assert all(math.isnan(v) for v in binary_scores(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])).values())
    metric = DeepfakeMetrics()
    metric.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.warns(UserWarning, match="only one class"):
        assert math.isnan(metric.compute()["auroc_video"])
