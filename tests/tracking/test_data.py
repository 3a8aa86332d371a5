"""Tracking data: the GOT-10k, LaSOT and TrackingNet layouts written tiny, the official sampling and crops, and the
errors bad input gets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modalpeft.tracking.data import (
    check_box,
    read_got10k,
    read_lasot,
    read_trackingnet,
)
from modalpeft.tracking.pairs import TrackingPairs
from modalpeft.tracking.transforms import box_from_crop, box_in_crop, crop, crop_params, sample_frame_indices

W, H = 64, 48


def frames(folder: Path, n: int, name=lambda i: f"{i + 1:08d}.jpg") -> list[list[float]]:
    """``n`` frames with a bright 12x10 square moving right; returns its x, y, w, h boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    boxes = []
    for i in range(n):
        image = np.full((H, W, 3), 40, dtype=np.uint8)
        x, y = 8 + 3 * i, 14
        image[y : y + 10, x : x + 12] = 220
        Image.fromarray(image).save(folder / name(i))
        boxes.append([x, y, 12, 10])
    return boxes


def lines(boxes, offset: int = 0) -> str:
    return "".join(f"{b[0] + offset},{b[1] + offset},{b[2]},{b[3]}\n" for b in boxes)


def got10k(root: Path, n: int = 8) -> Path:
    for split, names in (("train", ["GOT-10k_Train_000001", "GOT-10k_Train_000002"]), ("val", ["GOT-10k_Val_000001"])):
        (root / split).mkdir(parents=True)
        (root / split / "list.txt").write_text("\n".join(names) + "\n")
        for name in names:
            seq = root / split / name
            boxes = frames(seq, n)
            (seq / "groundtruth.txt").write_text(lines(boxes))
            (seq / "absence.label").write_text("".join("1\n" if i == 3 else "0\n" for i in range(n)))
            (seq / "cover.label").write_text("".join("0\n" if i == 5 else "8\n" for i in range(n)))
    return root


def test_got10k_layout(tmp_path) -> None:
    sequences = read_got10k(got10k(tmp_path), "train")
    assert [s.name for s in sequences] == ["GOT-10k_Train_000001", "GOT-10k_Train_000002"]
    seq = sequences[0]
    assert len(seq) == 8 and seq.boxes.shape == (8, 4) and seq.boxes[2].tolist() == [14, 14, 12, 10]
    assert seq.visible.tolist() == [True, True, True, False, True, False, True, True]  # absent 3, fully covered 5
    assert len(read_got10k(tmp_path, "val")) == 1


def test_lasot_layout_and_official_test_split(tmp_path) -> None:
    for name in ("airplane-1", "airplane-2"):  # airplane-1 is in the official test list, airplane-2 is not
        seq = tmp_path / "airplane" / name
        boxes = frames(seq / "img", 6)
        (seq / "groundtruth.txt").write_text(lines(boxes, offset=1))  # LaSOT boxes are 1-based
        (seq / "full_occlusion.txt").write_text("0,0,1,0,0,0\n")
        (seq / "out_of_view.txt").write_text("0,0,0,0,1,0\n")
    test = read_lasot(tmp_path, "test")
    train = read_lasot(tmp_path, "train")
    assert [s.name for s in test] == ["airplane-1"] and [s.name for s in train] == ["airplane-2"]
    assert test[0].boxes[0].tolist() == [8, 14, 12, 10]
    assert test[0].visible.tolist() == [True, True, False, True, False, True]


def test_trackingnet_layout(tmp_path) -> None:
    boxes = frames(tmp_path / "TRAIN_0" / "frames" / "abc_0", 12, name=lambda i: f"{i}.jpg")
    (tmp_path / "TRAIN_0" / "anno").mkdir()
    (tmp_path / "TRAIN_0" / "anno" / "abc_0.txt").write_text(lines(boxes))
    (seq,) = read_trackingnet(tmp_path)
    assert [p.name for p in seq.frames[:3]] == ["0.jpg", "1.jpg", "2.jpg"] and seq.frames[10].name == "10.jpg"
    assert seq.boxes[10].tolist() == [38, 14, 12, 10]
    # TEST gives the first box alone; a training subset may not
    boxes = frames(tmp_path / "TEST" / "frames" / "xyz_1", 5, name=lambda i: f"{i}.jpg")
    (tmp_path / "TEST" / "anno").mkdir()
    (tmp_path / "TEST" / "anno" / "xyz_1.txt").write_text(lines(boxes[:1]))
    (test,) = read_trackingnet(tmp_path, ["TEST"])
    assert len(test.frames) == 5 and test.boxes.shape == (1, 4)
    (tmp_path / "TRAIN_0" / "anno" / "abc_0.txt").write_text(lines(boxes[:1]))
    with pytest.raises(ValueError, match=r"abc_0.txt has 1 boxes for 12 frames"):
        read_trackingnet(tmp_path)


def test_sampling_follows_the_official_interval_rule() -> None:
    visible = np.ones(1000, dtype=bool)
    visible[::7] = False
    for seed in range(200):
        z, x = sample_frame_indices(visible, np.random.default_rng(seed), 3, 2, max_gap=200, max_interval=400)
        assert len(z) == 3 and len(x) == 2 and visible[z + x].all()
        order = z + x
        assert order == sorted(order) or order == sorted(order, reverse=True)
        assert max(z) - min(z) <= 400  # every template within the gap of the base template
        lo, hi = min(z), max(z)
        assert all(i < lo for i in x) or all(i > hi for i in x)  # search frames on one side of the templates
        assert all(lo - 400 <= i <= hi + 400 for i in x)
    assert sample_frame_indices(np.zeros(5, dtype=bool), np.random.default_rng(0)) is None


def test_siamfc_crop_geometry() -> None:
    box = np.array([10.0, 10.0, 20.0, 20.0])
    scale, shift = crop_params(box, 2.0, (40, 40))  # context side 20 + (2-1)·20 = 40 -> scale 1
    np.testing.assert_allclose(scale, [1.0, 1.0])
    np.testing.assert_allclose(box_in_crop(box, scale, shift, (40, 40)), [10, 10, 30, 30])
    scale, shift = crop_params(box, 5.0, (40, 40))  # side 20 + 4·20 = 100 -> 0.4, centre 20 -> crop centre
    np.testing.assert_allclose(scale, [0.4, 0.4])
    np.testing.assert_allclose(box_in_crop(box, scale, shift, (40, 40)), [16, 16, 24, 24])
    np.testing.assert_allclose(box_from_crop(np.array([16, 16, 24, 24.0]), scale, shift), box)
    image = torch.arange(3 * 30 * 50, dtype=torch.float32).view(3, 30, 50)
    out = crop(image, np.array([1.0, 1.0]), np.array([-5.0, -3.0]), (10, 20))  # a plain window at x 5, y 3
    torch.testing.assert_close(out, image[:, 3:13, 5:25])
    outside = crop(image, np.array([1.0, 1.0]), np.array([100.0, 0.0]), (4, 4))  # fully left of the frame
    torch.testing.assert_close(outside, image.mean(dim=(1, 2), keepdim=True).expand(3, 4, 4))


def test_jittered_search_crop_keeps_the_object() -> None:
    rng = np.random.default_rng(0)
    box = np.array([100.0, 80.0, 30.0, 20.0])
    for _ in range(50):
        s, t = crop_params(box, 5.0, (378, 378), rng, 0.25, 3.0, min_object_size=10)
        inside = box_in_crop(box, s, t, (378, 378))
        assert (inside[2:] - inside[:2] >= 10).all()


def test_training_pairs(tmp_path) -> None:
    sequences = read_got10k(got10k(tmp_path, n=10), "train")
    pairs = TrackingPairs([sequences], length=4, template_size=(28, 28), search_size=(56, 56), max_gap=3, seed=1)
    item = pairs[0]
    assert item["templates"].shape == (3, 3, 28, 28) and item["searches"].shape == (2, 3, 56, 56)
    assert item["template_masks"].shape == (3, 2, 2) and item["template_masks"].sum() > 0
    assert item["boxes"].shape == (2, 4) and (item["boxes"] >= 0).all() and (item["boxes"] <= 1).all()
    torch.testing.assert_close(pairs[0]["searches"], item["searches"])  # item i is a function of (seed, epoch, i)
    later = pairs[4]["searches"]  # index length + i: item i of epoch 1 (EpochIndexSampler's indices)
    assert not torch.equal(later, item["searches"])
    pairs.set_epoch(1)
    torch.testing.assert_close(pairs[0]["searches"], later)
    plain = TrackingPairs([sequences], 2, (28, 28), (56, 56), train=False, seed=1)[0]
    centre = (plain["boxes"][:, :2] + plain["boxes"][:, 2:]) / 2
    torch.testing.assert_close(centre, torch.full((2, 2), 0.5), atol=1e-5, rtol=0)  # unjittered: box at the centre


def test_missing_groundtruth_and_short_annotations(tmp_path) -> None:
    root = got10k(tmp_path)
    seq = root / "train" / "GOT-10k_Train_000002"
    (seq / "groundtruth.txt").write_text("8,14,12,10\n11,14,12,10\n14,14,12,10\n")
    with pytest.raises(ValueError, match=r"groundtruth.txt has 3 boxes for 8 frames"):
        read_got10k(root, "train")
    # the first box alone is a hidden-label test split's annotation, not a training sequence's
    (seq / "groundtruth.txt").write_text("8,14,12,10\n")
    with pytest.raises(ValueError, match=r"has 1 boxes for 8 frames: every frame needs a box \(only the test splits"):
        read_got10k(root, "train")
    test = root / "test" / "GOT-10k_Test_000001"
    shutil.copytree(seq, test)
    for labels in ("absence.label", "cover.label"):  # the test split has none
        (test / labels).unlink()
    (root / "test" / "list.txt").write_text("GOT-10k_Test_000001\n")
    (only,) = read_got10k(root, "test")
    assert len(only.frames) == 8 and only.boxes.shape == (1, 4)
    (seq / "groundtruth.txt").unlink()
    with pytest.raises(ValueError, match=r"GOT-10k_Train_000002/groundtruth.txt is missing"):
        read_got10k(root, "train")


def test_bad_boxes(tmp_path) -> None:
    root = got10k(tmp_path)
    gt = root / "train" / "GOT-10k_Train_000001" / "groundtruth.txt"
    rows = gt.read_text().splitlines()
    rows[1] = "8,14,0,10"
    gt.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"groundtruth.txt, line 2: box \[8.0, 14.0, 0.0, 10.0\] has a non-positive"):
        read_got10k(root, "train")
    with pytest.raises(ValueError, match=r"lies outside the 64x48 frame"):
        check_box(np.array([70.0, 10.0, 5.0, 5.0]), (48, 64), "init_box")


def test_unreadable_frame_is_named(tmp_path) -> None:
    sequences = read_got10k(got10k(tmp_path), "train")
    broken = sequences[0].frames[4]
    broken.write_bytes(b"not a jpeg")
    pairs = TrackingPairs([sequences[:1]], length=50, template_size=(28, 28), search_size=(56, 56), max_gap=3)
    with pytest.raises(ValueError, match=rf"frame {broken} cannot be read"):
        for i in range(50):
            pairs[i]


def test_sizes_must_divide_by_the_patch(tmp_path) -> None:
    sequences = read_got10k(got10k(tmp_path), "train")
    with pytest.raises(ValueError, match=r"template_size=\(30, 30\) is not divisible by patch_size=14"):
        TrackingPairs([sequences], 4, template_size=(30, 30), search_size=(56, 56))
