"""Frame-folder layouts, splits, errors, and the offline spliced LFW data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modalpeft.vision.deepfake.data import (
    FrameFolderDataModule,
    LFWSplicedDataModule,
    detect_layout,
    find_videos,
    train_augmentation,
)
from modalpeft.vision.deepfake.manipulate import REGIONS, Splice

SMALL = {"image_size": 16, "channels": 3, "mean": [0.5], "std": [0.5], "batch_size": 4}


def write_frames(folder: Path, count: int = 3, size: int = 20, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def write_real_fake(root: Path, real: int = 3, fake: int = 3, frames: int = 3) -> Path:
    for i in range(real):
        write_frames(root / "real" / f"{i:03d}", frames, seed=i)
    for i in range(fake):
        write_frames(root / "fake" / f"{i:03d}_{(i + 1) % max(real, 1):03d}", frames, seed=100 + i)
    return root


def write_ffpp(root: Path, ids: tuple[str, ...] = ("000", "001", "002", "003")) -> Path:
    for i in ids:
        write_frames(root / "original_sequences" / "youtube" / "c23" / "frames" / i, 2)
    for method in ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures"):
        for a, b in (("000", "001"), ("001", "000"), ("002", "003"), ("003", "002")):
            write_frames(root / "manipulated_sequences" / method / "c23" / "frames" / f"{a}_{b}", 2)
    return root


def test_real_fake_layout_groups_frames_by_video(tmp_path) -> None:
    root = write_real_fake(tmp_path / "rf", real=2, fake=3, frames=4)
    assert detect_layout(root) == "real_fake"
    videos = find_videos(root)
    assert [(v.name, v.label, len(v.frames)) for v in videos][:2] == [("fake/000_001", 1, 4), ("fake/001_000", 1, 4)]
    assert sorted(v.label for v in videos) == [0, 0, 1, 1, 1]
    dm = FrameFolderDataModule(str(root), val_fraction=0.0, frames_per_video=2, augment=False, **SMALL)
    dm.setup("fit")
    images, labels, video_ids = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and labels.dtype == torch.long
    dataset = dm.datasets["train"]
    assert len(dataset) == 5 * 2 and len(dataset.videos) == 5
    for i in range(len(dataset)):  # every frame carries its video's label and index
        _, label, v = dataset[i]
        assert label == dataset.videos[v].label


def test_validation_split_keeps_identity_groups_together(tmp_path) -> None:
    root = write_real_fake(tmp_path / "rf", real=6, fake=6, frames=1)
    dm = FrameFolderDataModule(str(root), val_fraction=0.34, augment=False, **SMALL)
    dm.setup("fit")
    train = {v.group for v in dm.datasets["train"].videos}
    val = {v.group for v in dm.datasets["val"].videos}
    assert train and val and not train & val  # a fake 000_001 goes where the real 000 goes


def test_ffpp_layout_methods_compression_and_split_files(tmp_path) -> None:
    root = write_ffpp(tmp_path / "ff")
    assert detect_layout(root) == "ffpp"
    videos = find_videos(root, methods=["Deepfakes", "FaceSwap"])
    assert {v.name.split("/")[0] for v in videos} == {"youtube", "Deepfakes", "FaceSwap"}
    assert len(videos) == 4 + 2 * 4
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, pairs in (("train", [["000", "001"]]), ("val", [["000", "001"]]), ("test", [["002", "003"]])):
        (splits / f"{name}.json").write_text(json.dumps(pairs))
    dm = FrameFolderDataModule(
        str(root), split_dir=str(splits), test_methods=["NeuralTextures"], augment=False, **SMALL
    )
    dm.setup("fit")
    dm.setup("test")
    assert {v.name for v in dm.datasets["train"].videos if v.label == 0} == {"youtube/000", "youtube/001"}
    test = dm.datasets["test"].videos
    assert {v.name for v in test} == {"youtube/002", "youtube/003", "NeuralTextures/002_003", "NeuralTextures/003_002"}
    with pytest.raises(ValueError, match="FF\\+\\+ method 'FaceShifter' not found"):
        find_videos(root, methods=["FaceShifter"])
    write_frames(root / "manipulated_sequences" / "Deepfakes" / "c40" / "frames" / "000_001", 1)
    with pytest.raises(ValueError, match="several compression levels"):
        find_videos(root)
    assert len(find_videos(root, compression="c23")) == 4 + 4 * 4


def test_cross_dataset_evaluation_reads_another_root(tmp_path) -> None:
    train = write_ffpp(tmp_path / "ff")
    test = tmp_path / "cdf"
    write_frames(test / "Celeb-real" / "id0_0000", 2)
    write_frames(test / "YouTube-real" / "00000", 2)
    write_frames(test / "Celeb-synthesis" / "id0_id1_0000", 2)
    dm = FrameFolderDataModule(str(train), test_root=str(test), augment=False, **SMALL)
    dm.setup("test")
    assert sorted((v.name, v.label) for v in dm.datasets["test"].videos) == [
        ("Celeb-real/id0_0000", 0),
        ("Celeb-synthesis/id0_id1_0000", 1),
        ("YouTube-real/00000", 0),
    ]


def test_clear_errors_for_corrupt_frames_empty_videos_and_one_class(tmp_path) -> None:
    root = write_real_fake(tmp_path / "rf", real=2, fake=2, frames=2)
    (root / "fake" / "000_001" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dm = FrameFolderDataModule(str(root), val_fraction=0.0, augment=False, **SMALL)
    dm.setup("fit")
    with pytest.raises(ValueError, match="cannot read image .*001.png"):
        [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
    (root / "real" / "empty").mkdir()
    with pytest.raises(ValueError, match="video folder .*empty.* holds no frames"):
        find_videos(root)
    only_real = write_real_fake(tmp_path / "real_only", real=2, fake=0)
    with pytest.raises(ValueError, match="holds only real videos"):
        find_videos(only_real)
    with pytest.raises(ValueError, match="test needs test data"):
        FrameFolderDataModule(str(only_real)).split_videos("test")


def test_training_augmentation_is_the_official_pipeline() -> None:
    names = [type(t).__name__ for t in train_augmentation().transforms]
    assert names == ["RandomHorizontalFlip", "RandomAffine", "GaussianBlur", "ColorJitter", "JPEG"]
    image = Image.fromarray(np.full((24, 24, 3), 128, dtype=np.uint8))
    assert train_augmentation()(image).size == (24, 24)


def test_splice_changes_only_the_region_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    target, donor = rng.random((100, 100)).astype(np.float32), rng.random((100, 100)).astype(np.float32)
    splice = Splice(region="mouth", jitter=0.0)
    out = splice(target, donor, np.random.default_rng(1))
    top, left, bottom, right = (round(f * 100) for f in REGIONS["mouth"])
    outside = np.ones_like(target, dtype=bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(out[outside], target[outside])
    assert np.abs(out - target)[top:bottom, left:right].mean() > 0.05
    assert np.array_equal(out, splice(target, donor, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="region='ears' is not valid"):
        Splice(region="ears")


def test_lfw_spliced_module_builds_balanced_disjoint_pseudo_videos() -> None:
    pytest.importorskip("skimage")
    kwargs = {"split": (4, 2, 3), "videos_per_face": 1, "frames_per_video": 2, "test_regions": ["mouth"]}
    dm = LFWSplicedDataModule(train_regions=["eyes", "nose"], mean=[0.5], std=[0.5], **kwargs)
    dm.setup("fit")
    dm.setup("test")
    train, test = dm.datasets["train"], dm.datasets["test"]
    assert len(train) == 4 * 2 * 2 and len(test) == 3 * 2 * 2
    assert train[0][0].shape == (1, 28, 28)
    assert {v.name.split("/")[1] for v in train.videos if v.label == 1} <= {"eyes", "nose"}
    assert {v.name.split("/")[1] for v in test.videos if v.label == 1} == {"mouth"}
    assert not {v.group for v in train.videos} & {v.group for v in test.videos}
    again = LFWSplicedDataModule(train_regions=["eyes", "nose"], mean=[0.5], std=[0.5], **kwargs)
    again.setup("fit")
    assert torch.equal(train[3][0], again.datasets["train"][3][0])
