"""The offline mesh data: deterministic, cached as .npz, ScanObjectNN-like corruption, the data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalpeft.pointcloud.data import MeshDataModule
from modalpeft.pointcloud.meshes import (
    CLASSIFICATION_CLASSES,
    build_classification_set,
    build_pretraining_set,
    object_points,
    pretraining_sources,
    sample_surface,
    scan_like,
    scan_parts,
)


def test_surface_sampling_is_uniform_by_area() -> None:
    # two unit squares' worth of triangles: one of area 1 (z = 0) and one of area 3 (z = 1)
    vertices = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 1], [6, 0, 1], [0, 1, 1]], dtype=float)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    points = sample_surface(vertices, faces, 20_000, np.random.default_rng(0))
    upper = np.isclose(points[:, 2], 1.0)
    assert abs(upper.mean() - 0.75) < 0.015  # 6 sigma
    on_first = points[~upper]
    assert (on_first[:, 0] / 2 + on_first[:, 1] <= 1 + 1e-9).all() and (on_first >= -1e-12).all()  # inside


def test_classification_set_is_deterministic_and_cached(tmp_path) -> None:
    a = build_classification_set("scan", train_per_class=2, test_per_class=1, num_points=128, cache_dir=tmp_path)
    files = list(tmp_path.glob("meshes_cls_*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as stored:  # plain arrays, no pickle
        assert sorted(stored.files) == ["test_labels", "test_points", "train_labels", "train_points"]
    b = build_classification_set("scan", train_per_class=3, test_per_class=1, num_points=128, cache_dir=tmp_path / "x")
    k = len(CLASSIFICATION_CLASSES)
    assert a["train_points"].shape == (2 * k, 128, 3) and a["train_points"].dtype == np.float32
    assert a["train_labels"].tolist() == [c for c in range(k) for _ in range(2)]
    # the i-th cloud of a class does not depend on how many clouds there are
    np.testing.assert_array_equal(a["train_points"][2:4], b["train_points"][3:5])
    np.testing.assert_array_equal(a["test_points"], b["test_points"])
    assert not np.allclose(a["train_points"][0], a["test_points"][0])
    other_seed = build_classification_set("scan", 2, 1, num_points=128, seed=1, cache_dir=tmp_path)
    assert not np.allclose(other_seed["train_points"], a["train_points"])
    radius = np.linalg.norm(a["train_points"], axis=-1).max(axis=1)
    np.testing.assert_allclose(radius, 1.0, atol=1e-5)  # pc_normalize'd


def test_scan_like_cuts_and_adds_background() -> None:
    rng = np.random.default_rng(0)
    obj = object_points("sphere", 2048, rng)
    scan = scan_like(obj, 1024, np.random.default_rng(1))
    assert scan.shape == (1024, 3) and np.isfinite(scan).all()
    # a floor patch: many points share the lowest height (within the noise), as a scanned object's support
    low = scan[:, 1] < scan[:, 1].min() + 0.05
    assert low.mean() > 0.05
    for seed in range(5):  # the background lies in the object's box, widened by 10-30% per horizontal side
        visible, background = scan_parts(obj, 1024, np.random.default_rng(seed))
        assert len(visible) + len(background) == 1024 and 0.10 <= len(background) / 1024 <= 0.20
        low_corner, high_corner = visible.min(0), visible.max(0)
        margin = 0.3 * (high_corner - low_corner) + 1e-6
        assert (background[:, [0, 2]] >= (low_corner - margin)[[0, 2]]).all()
        assert (background[:, [0, 2]] <= (high_corner + margin)[[0, 2]]).all()
        assert (background[:, 1] >= low_corner[1] - 0.03).all() and (background[:, 1] <= high_corner[1] + 1e-6).all()
    clean = object_points("sphere", 1024, np.random.default_rng(0))
    assert abs(np.linalg.norm(clean, axis=1).std()) < 0.05  # a clean sphere: one radius
    assert np.linalg.norm(scan - scan.mean(0), axis=1).std() > 0.1  # the scan is not


def test_pretraining_set(tmp_path) -> None:
    sources = pretraining_sources()
    assert len(sources) > 1000 and sources[-1] == "torus" and "duck.obj" in sources
    clouds = build_pretraining_set(num_clouds=6, num_points=64, cache_dir=tmp_path)
    assert clouds.shape == (6, 64, 3) and np.isfinite(clouds).all()
    np.testing.assert_array_equal(clouds, build_pretraining_set(num_clouds=6, num_points=64, cache_dir=tmp_path))


def test_mesh_data_module(tmp_path) -> None:
    dm = MeshDataModule(train_per_class=2, val_per_class=1, test_per_class=1, cloud_points=96, num_points=64,
                        cache_dir=str(tmp_path), batch_size=8)  # fmt: skip
    assert dm.num_classes == 12
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 24 and len(dm.datasets["val"]) == 12
    dm.setup("test")
    assert len(dm.datasets["test"]) == 12
    train = dm.datasets["train"].points
    val = dm.datasets["val"].points
    assert not any(torch.equal(v, t) for v in val for t in train)
    with pytest.raises(ValueError, match="variant='noisy' is not valid"):
        build_classification_set("noisy", 1, 1, cache_dir=tmp_path)
