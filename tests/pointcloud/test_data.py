"""Point-cloud loaders on tiny files written in the official formats; transforms; bad input."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from modalpeft.pointcloud.data import (
    SCANOBJECTNN_CLASSES,
    SCANOBJECTNN_FILES,
    ModelNetDataModule,
    ScanObjectNNDataModule,
)
from modalpeft.pointcloud.transforms import (
    ResampleFPS,
    RotateY,
    ScaleAndTranslate,
    fps_pool_size,
    fps_subsample,
    pc_normalize,
    validate_cloud,
)

# -- writers of the official formats (used by the recipe tests too) ---------------------------------------------


def write_modelnet_text(
    root: Path, classes=("airplane", "night_stand", "chair"), per_split=(3, 2), num_points=300, category=40, seed=0
) -> Path:
    """``modelnet40_normal_resampled``: shape names, train/test lists, ``<class>/<class>_0001.txt`` with
    ``x,y,z,nx,ny,nz`` rows (class names with underscores included)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"modelnet{category}_shape_names.txt").write_text("\n".join(classes) + "\n")
    number = 0
    for split, count in zip(("train", "test"), per_split, strict=True):
        ids = []
        for name in classes:
            (root / name).mkdir(exist_ok=True)
            for _ in range(count):
                number += 1
                shape_id = f"{name}_{number:04d}"
                xyz = rng.normal(size=(num_points, 3)) * (2.0 + classes.index(name)) + 5.0
                normals = rng.normal(size=(num_points, 3))
                rows = np.concatenate([xyz, normals / np.linalg.norm(normals, axis=1, keepdims=True)], axis=1)
                np.savetxt(root / name / f"{shape_id}.txt", rows, delimiter=",", fmt="%.6f")
                ids.append(shape_id)
        (root / f"modelnet{category}_{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_modelnet_h5(root: Path, num_classes=40, per_file=(5, 4), num_points=256, seed=0) -> Path:
    """``modelnet40_ply_hdf5_2048``: ``ply_data_train0.h5`` / ``ply_data_test0.h5`` (``data`` (M, N, 3) float32,
    ``label`` (M, 1) uint8), ``shape_names.txt``, ``train_files.txt`` / ``test_files.txt``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shape_names.txt").write_text("\n".join(f"class{i}" for i in range(num_classes)) + "\n")
    for split, count in zip(("train", "test"), per_file, strict=True):
        name = f"ply_data_{split}0.h5"
        with h5py.File(root / name, "w") as f:
            f["data"] = rng.uniform(-1, 1, size=(count, num_points, 3)).astype(np.float32)
            f["label"] = (np.arange(count) % num_classes).astype(np.uint8)[:, None]
        (root / f"{split}_files.txt").write_text(f"data/modelnet40_ply_hdf5_2048/{name}\n")
    return root


def write_scanobjectnn(root: Path, variants=("pb_t50_rs",), per_file=(6, 4), num_points=256, seed=0) -> Path:
    """``h5_files/main_split[_nobg]/{training,test}_objectdataset*.h5`` with ``data`` (M, N, 3), ``label`` (M,),
    ``mask`` (M, N)."""
    rng = np.random.default_rng(seed)
    for variant in variants:
        folder, train_name, test_name = SCANOBJECTNN_FILES[variant]
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, count in zip((train_name, test_name), per_file, strict=True):
            with h5py.File(root / folder / name, "w") as f:
                f["data"] = rng.uniform(-1, 1, size=(count, num_points, 3)).astype(np.float32)
                f["label"] = (np.arange(count) % 15).astype(np.int64)
                f["mask"] = np.zeros((count, num_points), dtype=np.int64)
    return root


# -- transforms -------------------------------------------------------------------------------------------------


def test_pc_normalize_matches_point_mae() -> None:
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(size=(50, 3)) * 3 + 7, rng.normal(size=(50, 3))], axis=1)
    out = pc_normalize(cloud)
    xyz = cloud[:, :3] - cloud[:, :3].mean(0)
    np.testing.assert_allclose(out[:, :3], xyz / np.sqrt((xyz**2).sum(1)).max(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, 3:], cloud[:, 3:], rtol=1e-6)  # normals untouched
    assert abs(np.linalg.norm(out[:, :3], axis=1).max() - 1) < 1e-5


def test_fps_pool_sizes_are_the_official_ones() -> None:
    assert fps_pool_size(1024, 8192) == 1200 and fps_pool_size(2048, 2048) == 2048
    assert fps_pool_size(4096, 8192) == 4800 and fps_pool_size(8192, 10000) == 8192
    assert fps_pool_size(64, 1000) == 75


def test_resample_draws_a_subset_of_the_fps_pool() -> None:
    torch.manual_seed(0)
    points = torch.randn(2, 200, 3)
    gen = torch.Generator().manual_seed(0)
    out = ResampleFPS(64)(points, gen)
    assert out.shape == (2, 64, 3)
    pool = fps_subsample(points, fps_pool_size(64, 200))  # (2, 75, 3)
    for b in range(2):  # every output point is a point of the pool, no point twice
        match = (out[b, :, None] == pool[b, None]).all(-1)
        assert (match.sum(1) == 1).all() and len(set(match.float().argmax(1).tolist())) == 64
    again = ResampleFPS(64)(points, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded draws are reproducible


def test_scale_and_translate_and_rotation() -> None:
    points = torch.randn(4, 30, 6)
    out = ScaleAndTranslate()(points, torch.Generator().manual_seed(1))
    ratio = (out[:, 1:, :3] - out[:, :1, :3]) / (points[:, 1:, :3] - points[:, :1, :3])  # per-cloud, per-axis scale
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-4)
    assert ((ratio > 2 / 3 - 1e-5) & (ratio < 1.5 + 1e-5)).all()
    assert torch.equal(out[..., 3:], points[..., 3:])
    rotated = RotateY()(points, torch.Generator().manual_seed(2))
    assert torch.allclose(rotated[..., 1], points[..., 1]) and torch.allclose(rotated[..., 4], points[..., 4])
    assert torch.allclose(rotated[..., :3].norm(dim=-1), points[..., :3].norm(dim=-1), atol=1e-5)
    assert torch.allclose(rotated[..., 3:].norm(dim=-1), points[..., 3:].norm(dim=-1), atol=1e-5)
    # as PointcloudRotate: points @ [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    angle = torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 * math.pi
    c, s = angle.cos().float(), angle.sin().float()
    expected_x = points[..., 0] * c[:, None] - points[..., 2] * s[:, None]
    assert torch.allclose(rotated[..., 0], expected_x, atol=1e-5)


@pytest.mark.parametrize(
    ("cloud", "kwargs", "match"),
    [
        (np.zeros((0, 3)), {}, "empty"),
        (np.zeros((10, 4)), {}, "4 channels, expected 3"),
        (np.array([[0, 0, 0], [np.nan, 0, 0], [1, 1, 1]]), {}, r"1 point\(s\) have NaN or inf values \(first at row 1"),
        (np.array([[0, 0, np.inf]] * 3), {}, "NaN or inf"),
        (np.zeros((5, 3)), {"min_points": 8}, "5 points, fewer than the 8"),
    ],
)
def test_validate_cloud_names_the_sample(cloud, kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"my.txt: .*{match}"):
        validate_cloud(cloud, "my.txt", **kwargs)


# -- ModelNet ---------------------------------------------------------------------------------------------------


def test_modelnet_text_layout(tmp_path) -> None:
    root = write_modelnet_text(tmp_path / "modelnet40_normal_resampled")
    dm = ModelNetDataModule(str(root), num_points=64, cache_points=128, batch_size=4)
    assert dm.layout == "normal_resampled" and dm.classes == ["airplane", "night_stand", "chair"]
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert len(train) == 9 and len(val) == 6 and val is dm.datasets["test"]  # validation = test, as the official code
    assert train.points.shape == (9, 128, 3)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # night_stand_0004 -> class "night_stand"
    assert torch.allclose(train.points.norm(dim=-1).amax(1), torch.ones(9), atol=1e-5)  # pc_normalize after FPS
    assert torch.allclose(train.points.mean(1), torch.zeros(9, 3), atol=1e-5)
    cache = root / "modelnet40_train_128pts_fps.npz"
    assert cache.is_file()
    with np.load(cache, allow_pickle=False) as stored:
        assert stored["points"].shape == (9, 128, 3)
    again = ModelNetDataModule(str(root), num_points=64, cache_points=128)
    again.setup("fit")
    assert torch.equal(again.datasets["train"].points, train.points)

    normals = ModelNetDataModule(str(root), num_points=64, cache_points=128, use_normals=True, cache_dir="")
    normals.setup("test")
    assert normals.datasets["test"].points.shape == (6, 128, 6)


def test_modelnet10_and_first_rows(tmp_path) -> None:
    root = write_modelnet_text(tmp_path / "mn", classes=("bed", "chair"), category=10, num_points=100)
    dm = ModelNetDataModule(str(root), num_category=10, num_points=32, cache_points=50, uniform=False, cache_dir="")
    dm.setup("test")
    raw = np.loadtxt(root / "bed" / "bed_0007.txt", delimiter=",")[:50, :3]
    np.testing.assert_allclose(dm.datasets["test"].points[0].numpy(), pc_normalize(raw), atol=1e-5)


def test_modelnet_hdf5_layout(tmp_path) -> None:
    root = write_modelnet_h5(tmp_path / "modelnet40_ply_hdf5_2048")
    dm = ModelNetDataModule(str(root), num_points=128, batch_size=2)
    assert dm.layout == "hdf5" and dm.num_classes == 40
    dm.setup(None)
    assert dm.datasets["train"].points.shape == (5, 256, 3) and dm.datasets["test"].labels.tolist() == [0, 1, 2, 3]
    assert dm.datasets["train"].names[0] == "ply_data_train0.h5[0]"


def test_scanobjectnn_variants(tmp_path) -> None:
    root = write_scanobjectnn(tmp_path / "h5_files", variants=("pb_t50_rs", "obj_only", "obj_bg"))
    dm = ScanObjectNNDataModule(str(root), num_points=128)
    assert dm.classes == list(SCANOBJECTNN_CLASSES) and dm.num_classes == 15
    dm.setup("fit")
    assert dm.file("train").name == "training_objectdataset_augmentedrot_scale75.h5"
    assert dm.datasets["train"].points.shape == (6, 256, 3)
    with h5py.File(dm.file("train"), "r") as f:  # clouds as stored: no normalisation, as the official loader
        assert torch.equal(dm.datasets["train"].points, torch.from_numpy(f["data"][:]))
    assert ScanObjectNNDataModule(str(root), variant="obj_only").file("test").parent.name == "main_split_nobg"
    assert ScanObjectNNDataModule(str(root / "main_split"), variant="obj_bg").file("test").name == (
        "test_objectdataset.h5"
    )


def test_batches_are_resampled_on_the_device(tmp_path) -> None:
    """Training: FPS pool + random subset + augmentation; evaluation: FPS; test with voting: 1 + V views."""
    root = write_scanobjectnn(tmp_path / "h5_files")
    dm = ScanObjectNNDataModule(str(root), num_points=64, vote=3, batch_size=4)
    dm.setup(None)
    points, labels = next(iter(dm.train_dataloader()))
    assert points.shape == (4, 256, 3)

    class Trainer:  # the attributes on_after_batch_transfer reads
        training, testing, current_epoch = True, False, 0

    dm.trainer = Trainer()
    train_points, _ = dm.on_after_batch_transfer((points, labels), 0)
    assert train_points.shape == (4, 64, 3)
    again, _ = dm.on_after_batch_transfer((points, labels), 0)
    assert not torch.equal(again, train_points)  # fresh draws within an epoch
    Trainer.training = False
    eval_points, _ = dm.on_after_batch_transfer((points, labels), 0)
    assert torch.equal(eval_points, fps_subsample(points, 64))
    Trainer.testing = True
    views, _ = dm.on_after_batch_transfer((points, labels), 0)
    assert views.shape == (4, 4, 64, 3) and torch.equal(views[0], eval_points)
    memory = list(dm.memory_batches("cpu"))
    assert len(memory) == 2 and memory[0][0].shape == (4, 64, 3)


# -- bad input ----------------------------------------------------------------------------------------------------


def test_modelnet_text_errors_name_the_file(tmp_path) -> None:
    root = write_modelnet_text(tmp_path / "mn")
    bad = root / "chair" / "chair_0009.txt"
    rows = np.loadtxt(bad, delimiter=",")
    rows[17, 1] = np.nan
    np.savetxt(bad, rows, delimiter=",")
    with pytest.raises(ValueError, match=r"chair_0009\.txt: 1 point\(s\) have NaN or inf values \(first at row 17"):
        ModelNetDataModule(str(root), num_points=64, cache_points=128, cache_dir="").setup("fit")

    bad.write_text("")
    with pytest.raises(ValueError, match=r"chair_0009\.txt: the point cloud is empty"):
        ModelNetDataModule(str(root), num_points=64, cache_points=128, cache_dir="").setup("fit")

    np.savetxt(bad, rows[:, :4], delimiter=",")
    with pytest.raises(ValueError, match=r"chair_0009\.txt: points have 4 channels, expected 6"):
        ModelNetDataModule(str(root), num_points=64, cache_points=128, use_normals=True, cache_dir="").setup("fit")

    np.savetxt(bad, np.nan_to_num(rows[:100]), delimiter=",")
    with pytest.raises(ValueError, match=r"chair_0009\.txt: the cloud has 100 points, fewer than the 128"):
        ModelNetDataModule(str(root), num_points=64, cache_points=128, cache_dir="").setup("fit")

    with pytest.raises(ValueError, match="modelnet10_shape_names.txt"):
        _ = ModelNetDataModule(str(root), num_category=10).classes


def test_h5_errors_name_the_file_and_sample(tmp_path) -> None:
    root = write_scanobjectnn(tmp_path / "h5_files")
    path = root / "main_split" / "training_objectdataset_augmentedrot_scale75.h5"
    with h5py.File(path, "r+") as f:
        data = f["data"][:]
        data[4, 10, 2] = np.inf
        f["data"][...] = data
    with pytest.raises(ValueError, match=r"scale75\.h5, sample 4: 1 point\(s\) have NaN or inf"):
        ScanObjectNNDataModule(str(root), num_points=64).setup("fit")

    with pytest.raises(ValueError, match=r"have 256 points, fewer than num_points=1024|fewer than the 1024"):
        ScanObjectNNDataModule(str(root), num_points=1024).setup("test")

    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((3, 256, 6), dtype=np.float32)
        f["label"] = np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match=r"scale75\.h5, sample 0: points have 6 channels, expected 3"):
        ScanObjectNNDataModule(str(root), num_points=64).setup("fit")

    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"scale75\.h5: the file is empty"):
        ScanObjectNNDataModule(str(root), num_points=64).setup("fit")

    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((0, 256, 3), dtype=np.float32)
        f["label"] = np.zeros(0, dtype=np.int64)
    with pytest.raises(ValueError, match="holds no point clouds"):
        ScanObjectNNDataModule(str(root), num_points=64).setup("fit")

    with h5py.File(path, "w") as f:
        f["data"] = np.zeros((2, 256, 3), dtype=np.float32)
        f["label"] = np.array([3, 15])
    with pytest.raises(ValueError, match=r"sample 1: label 15 is outside \[0, 15\)"):
        ScanObjectNNDataModule(str(root), num_points=64).setup("fit")

    with pytest.raises(ValueError, match="variant 'pb_t25' needs main_split/training_objectdataset_augmented25_norot"):
        ScanObjectNNDataModule(str(root), variant="pb_t25").setup("fit")
    with pytest.raises(ValueError, match="variant='hardest' is not valid"):
        ScanObjectNNDataModule(str(root), variant="hardest")


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="augmentation='jitter' is not valid"):
        ScanObjectNNDataModule(str(tmp_path), augmentation="jitter")
    with pytest.raises(ValueError, match="cache_points=512 must be >= num_points=1024"):
        ModelNetDataModule(str(tmp_path), cache_points=512)
    with pytest.raises(ValueError, match="neither layout"):
        _ = ModelNetDataModule(str(tmp_path)).layout
    with pytest.raises(ValueError, match="is not a folder"):
        _ = ModelNetDataModule(str(tmp_path / "missing")).layout
