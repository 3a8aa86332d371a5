"""Point-cloud data transforms: input checks, normalisation, resampling and the Point-MAE augmentations.

Two kinds of transform live here:

* per-cloud NumPy functions that data loaders apply once, when they read a file: :func:`validate_cloud` (a clear
  error naming the sample for NaN/inf, too few points, the wrong channel count, an empty cloud) and
  :func:`pc_normalize` (centre on the centroid, scale into the unit ball);
* batched torch transforms that run on the accelerator after a batch is transferred, as the official training
  loops of Point-MAE (Pang et al., ECCV 2022, https://arxiv.org/abs/2203.06604), Point-BERT, PointGST and
  Point-PEFT do (``tools/runner_finetune.py``): :class:`ResampleFPS` (farthest-point sampling to a pool, then a
  random subset), :class:`ScaleAndTranslate` (``PointcloudScaleAndTranslate``) and :class:`RotateY`
  (``PointcloudRotate``), plus :func:`fps_subsample` for evaluation.

Differences from the official code: the random draws come from a ``torch.Generator`` the caller seeds (not the
global NumPy RNG), and farthest-point sampling starts from the point farthest from the centroid
(:func:`modalpeft.pointcloud.ops.farthest_point_sample`), where pointnet2's CUDA kernel starts from index 0 of a
randomly shuffled cloud; the FPS pool of a training cloud is therefore the same every epoch, while the subset drawn
from it changes as in the official code.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .ops import farthest_point_sample, gather_points

Augmentation = Literal["scale_translate", "rotate", "none"]
"""Training augmentations: ``"scale_translate"`` (Point-MAE/PointGST on ModelNet40 and ScanObjectNN),
``"rotate"`` (ACT/ReCon on ScanObjectNN, about the vertical y axis), ``"none"``."""

AUGMENTATIONS: tuple[str, ...] = ("scale_translate", "rotate", "none")

OFFICIAL_FPS_POOL: dict[int, int] = {1024: 1200, 2048: 2400, 4096: 4800, 8192: 8192}
"""Training-time FPS pool size per number of input points, as the official runners hard-code it (``point_all``);
other sizes use ``round(num_points * 75 / 64)`` (the same 1.17 ratio)."""


# -- per-cloud (NumPy) ------------------------------------------------------------------------------------------


def validate_cloud(points: np.ndarray, where: str, *, channels: int | None = 3, min_points: int = 1) -> np.ndarray:
    """Check one cloud read from a file and return it as float32 ``(N, C)``.

    Args:
        points: the cloud.
        where: names the sample in the error message (file, and index inside it).
        channels: the number of values per point it must have (``None``: any, at least 3).
        min_points: the fewest points it may have.

    Raises:
        ValueError: for an empty cloud, the wrong shape or channel count, NaN/inf values, or fewer than
            ``min_points`` points; the message names ``where``, the bad value and the fix.
    """
    array = np.asarray(points)
    if array.size == 0:
        raise ValueError(f"{where}: the point cloud is empty (no points); remove the sample or regenerate its file.")
    if array.ndim != 2:
        raise ValueError(f"{where}: expected a (num_points, channels) array, got shape {tuple(array.shape)}.")
    if channels is not None and array.shape[1] != channels:
        raise ValueError(
            f"{where}: points have {array.shape[1]} channels, expected {channels} (x, y, z"
            f"{', nx, ny, nz' if channels == 6 else ''}); check the file, or the use_normals setting."
        )
    if channels is None and array.shape[1] < 3:
        raise ValueError(f"{where}: points have {array.shape[1]} channels, at least 3 (x, y, z) are needed.")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{where}: points have dtype {array.dtype}, expected numbers.")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(
            f"{where}: {len(rows)} point(s) have NaN or inf values (first at row {int(rows[0])}); clean the file "
            "(drop those points) before training."
        )
    if array.shape[0] < min_points:
        raise ValueError(
            f"{where}: the cloud has {array.shape[0]} points, fewer than the {min_points} this configuration needs; "
            "lower num_points, or give clouds with more points."
        )
    return array.astype(np.float32, copy=False)


def validate_clouds(clouds: np.ndarray, where: str, *, channels: int | None = 3, min_points: int = 1) -> np.ndarray:
    """:func:`validate_cloud` for a stack of clouds read from one file (an HDF5 ``data`` array), vectorised; the
    error names ``where`` and the index of the first bad cloud. Returns float32 ``(M, N, C)``."""
    array = np.asarray(clouds)
    if array.ndim != 3 or array.shape[0] == 0:
        if array.ndim == 3:
            raise ValueError(f"{where}: holds no point clouds (shape {tuple(array.shape)}); the file is empty.")
        raise ValueError(f"{where}: expected (num_clouds, num_points, channels), got shape {tuple(array.shape)}.")
    if array.shape[1] == 0:
        raise ValueError(f"{where}, sample 0: the point cloud is empty (no points); the file is broken.")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{where}: points have dtype {array.dtype}, expected numbers.")
    finite = np.isfinite(array).all(axis=(1, 2))
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        validate_cloud(array[first], f"{where}, sample {first}", channels=channels, min_points=min_points)
    validate_cloud(array[0], f"{where}, sample 0", channels=channels, min_points=min_points)
    return array.astype(np.float32, copy=False)


def pc_normalize(points: np.ndarray) -> np.ndarray:
    """Point-MAE's ``pc_normalize`` on the xyz columns: subtract the centroid, divide by the largest distance to it.

    Other columns (normals) are kept as they are. A cloud whose points all coincide is only centred.

    Shapes:
        - points: ``(N, C)`` with ``C >= 3``; output: the same shape, float32
    """
    out = np.array(points, dtype=np.float32, copy=True)
    xyz = out[:, :3] - out[:, :3].mean(axis=0)
    radius = float(np.sqrt((xyz**2).sum(axis=1)).max())
    out[:, :3] = xyz / radius if radius > 0 else xyz
    return out


# -- batched (torch) --------------------------------------------------------------------------------------------


def fps_pool_size(num_points: int, available: int) -> int:
    """How many points the training-time FPS keeps before the random subset (:data:`OFFICIAL_FPS_POOL`)."""
    pool = OFFICIAL_FPS_POOL.get(num_points, int(round(num_points * 75 / 64)))
    return max(num_points, min(pool, available))


def fps_subsample(points: Tensor, num_points: int) -> Tensor:
    """The ``num_points`` farthest points of each cloud (``misc.fps`` of the official evaluation); clouds that
    already have ``num_points`` points are returned as they are.

    Shapes:
        - points: ``(B, N, C)``, xyz first; output: ``(B, num_points, C)``
    """
    if points.shape[1] < num_points:
        raise ValueError(
            f"the clouds have {points.shape[1]} points, fewer than num_points={num_points}; lower num_points."
        )
    if points.shape[1] == num_points:
        return points
    return gather_points(points, farthest_point_sample(points[..., :3].contiguous(), num_points))


class ResampleFPS:
    """Training-time resampling: FPS to a pool of :func:`fps_pool_size` points, then ``num_points`` of them drawn
    at random without replacement (``point_all`` and ``np.random.choice`` in the official runners).

    Args:
        num_points: points per output cloud.

    Shapes:
        - input: ``(B, N, C)`` with ``N >= num_points``; output: ``(B, num_points, C)``
    """

    def __init__(self, num_points: int) -> None:
        if num_points < 1:
            raise ValueError(f"num_points={num_points} must be at least 1.")
        self.num_points = num_points

    def __call__(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch, n, _ = points.shape
        if n < self.num_points:
            raise ValueError(f"the clouds have {n} points, fewer than num_points={self.num_points}; lower num_points.")
        pool = fps_pool_size(self.num_points, n)
        pooled = points if pool == n else gather_points(points, farthest_point_sample(points[..., :3], pool))
        # the official code draws one subset for the whole batch; a subset per cloud is drawn here
        choice = torch.rand(batch, pool, generator=generator).argsort(dim=1)[:, : self.num_points]
        return gather_points(pooled, choice.to(points.device))

    def __repr__(self) -> str:
        return f"ResampleFPS(num_points={self.num_points})"


class ScaleAndTranslate:
    """``PointcloudScaleAndTranslate``: per cloud, xyz times a scale drawn per axis from ``U(low, high)``, plus a
    shift drawn per axis from ``U(-translate, translate)``. Normals (channels after xyz) are left as they are.

    Shapes:
        - input and output: ``(B, N, C)``
    """

    def __init__(self, scale_low: float = 2.0 / 3.0, scale_high: float = 3.0 / 2.0, translate: float = 0.2) -> None:
        if not 0 < scale_low <= scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got scale_low={scale_low}, scale_high={scale_high}")
        if translate < 0:
            raise ValueError(f"translate={translate} must be >= 0")
        self.scale_low, self.scale_high, self.translate = scale_low, scale_high, translate

    def __call__(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch = points.shape[0]
        scale = torch.empty(batch, 1, 3).uniform_(self.scale_low, self.scale_high, generator=generator)
        shift = torch.empty(batch, 1, 3).uniform_(-self.translate, self.translate, generator=generator)
        xyz = points[..., :3] * scale.to(points) + shift.to(points)
        return torch.cat([xyz, points[..., 3:]], dim=-1)

    def __repr__(self) -> str:
        return f"ScaleAndTranslate({self.scale_low:.4g}, {self.scale_high:.4g}, translate={self.translate:g})"


def rotation_y(angle: Tensor) -> Tensor:
    """``PointcloudRotate``'s matrices ``[[c, 0, s], [0, 1, 0], [-s, 0, c]]`` (applied as ``points @ R``).

    Shapes:
        - angle: ``(B,)``; output: ``(B, 3, 3)``
    """
    c, s = angle.cos(), angle.sin()
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, zero, s, zero, one, zero, -s, zero, c], dim=-1).reshape(-1, 3, 3)


class RotateY:
    """``PointcloudRotate``: each cloud rotated by an angle drawn from ``U(0, 2 pi)`` about the y axis (ScanObjectNN's
    vertical axis); normals rotate with the points.

    Shapes:
        - input and output: ``(B, N, C)`` with ``C`` = 3 or 6
    """

    def __call__(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        angle = torch.rand(points.shape[0], generator=generator, dtype=torch.float64) * (2 * math.pi)
        rot = rotation_y(angle).to(points)  # (B, 3, 3)
        parts = [points[..., i : i + 3] @ rot for i in range(0, points.shape[-1] - points.shape[-1] % 3, 3)]
        return torch.cat([*parts, points[..., len(parts) * 3 :]], dim=-1)

    def __repr__(self) -> str:
        return "RotateY()"


def make_augmentation(name: Augmentation) -> ScaleAndTranslate | RotateY | None:
    """The batched augmentation called ``name`` (``None`` for ``"none"``)."""
    if name == "scale_translate":
        return ScaleAndTranslate()
    if name == "rotate":
        return RotateY()
    if name == "none":
        return None
    raise ValueError(f"augmentation={name!r} is not valid; choose one of {list(AUGMENTATIONS)}.")


__all__ = [
    "AUGMENTATIONS",
    "OFFICIAL_FPS_POOL",
    "Augmentation",
    "ResampleFPS",
    "RotateY",
    "ScaleAndTranslate",
    "fps_pool_size",
    "fps_subsample",
    "make_augmentation",
    "pc_normalize",
    "rotation_y",
    "validate_cloud",
    "validate_clouds",
]
