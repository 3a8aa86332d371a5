"""Point-cloud classification data: ModelNet40/10 (text and HDF5 layouts), ScanObjectNN (``main_split`` HDF5
files, PB_T50_RS included) and the offline mesh set of :mod:`modalpeft.pointcloud.meshes`.

Every data module loads whole clouds once (``setup``), as float32 ``(N, C)`` arrays with integer labels, and
resamples them *per batch on the accelerator* (``on_after_batch_transfer``), as the official Point-MAE /
Point-BERT / PointGST / Point-PEFT fine-tuning runners do (``tools/runner_finetune.py``):

* training: farthest-point sampling (FPS) to a pool (1,200 points for 1,024, 2,400 for 2,048), a random subset of
  ``num_points`` from it, then the augmentation (``"scale_translate"``: ``PointcloudScaleAndTranslate``; or
  ``"rotate"``: ``PointcloudRotate``, which ACT/ReCon use on ScanObjectNN);
* validation and test: FPS to ``num_points`` (``misc.fps``);
* test-time voting (``vote=V``, the official ``--vote`` uses 10): test batches carry ``1 + V`` views,
  ``(1 + V, B, N, C)``: the plain FPS view, then ``V`` training-style resamples with ``ScaleAndTranslate``
  (the official ``test_transforms``). :class:`~modalpeft.pointcloud.tasks.PointCloudClassificationTask` scores the
  first view as ``test/acc`` and the mean of the other views' logits as ``test/acc_vote``. (The official
  ``test_net`` repeats the 10-view vote 300 times and reports the best run; that selection on the test set is
  not reproduced.)

As in the official configs, the validation set is the test split (ModelNet40 and ScanObjectNN have no separate
validation split); report the last epoch, or pass ``val_split=False`` to skip validation.

Bad input (an empty file, NaN/inf coordinates, the wrong channel count, fewer points than the configuration
needs, labels out of range) gets a ``ValueError`` naming the file and sample.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..lightning.data import EpochSeededSampler
from .ops import farthest_point_sample, gather_points
from .transforms import (
    AUGMENTATIONS,
    Augmentation,
    ResampleFPS,
    ScaleAndTranslate,
    fps_subsample,
    make_augmentation,
    pc_normalize,
    validate_cloud,
    validate_clouds,
)

Split = Literal["train", "val", "test"]

_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}

SCANOBJECTNN_CLASSES: tuple[str, ...] = (
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
)
"""ScanObjectNN's 15 categories in label order (its ``shape_names.txt``)."""

SCANOBJECTNN_FILES: dict[str, tuple[str, str, str]] = {
    "obj_bg": ("main_split", "training_objectdataset.h5", "test_objectdataset.h5"),
    "obj_only": ("main_split_nobg", "training_objectdataset.h5", "test_objectdataset.h5"),
    "pb_t25": ("main_split", "training_objectdataset_augmented25_norot.h5", "test_objectdataset_augmented25_norot.h5"),
    "pb_t25_r": ("main_split", "training_objectdataset_augmented25rot.h5", "test_objectdataset_augmented25rot.h5"),
    "pb_t50_r": ("main_split", "training_objectdataset_augmentedrot.h5", "test_objectdataset_augmentedrot.h5"),
    "pb_t50_rs": (
        "main_split",
        "training_objectdataset_augmentedrot_scale75.h5",
        "test_objectdataset_augmentedrot_scale75.h5",
    ),
}
"""Per ScanObjectNN variant: the ``h5_files`` sub-folder, and the training and test files in it. PB_T50_RS
(``augmentedrot_scale75``) is the "hardest" variant the papers report."""

ScanObjectNNVariant = Literal["obj_bg", "obj_only", "pb_t25", "pb_t25_r", "pb_t50_r", "pb_t50_rs"]


def folder_listing(folder: Path, limit: int = 20) -> str:
    """What a folder holds, for error messages."""
    if not folder.is_dir():
        return f"{folder} does not exist either"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"{folder} holds: {shown or 'nothing'}"


class PointCloudDataset(Dataset):
    """Clouds of equal size held in memory: ``(points (N, C) float32 tensor, label)`` pairs.

    Args:
        points: ``(M, N, C)`` float32.
        labels: ``(M,)`` integers.
        names: one name per cloud (file and index), used in messages.
    """

    def __init__(self, points: np.ndarray, labels: np.ndarray, names: list[str] | None = None) -> None:
        if len(points) != len(labels):
            raise ValueError(f"{len(points)} clouds but {len(labels)} labels")
        self.points = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.names = names if names is not None else [f"sample {i}" for i in range(len(points))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.points[index], self.labels[index]


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Labels as int64 ``(M,)``; raises naming the first out-of-range label and its sample."""
    flat = np.asarray(labels).reshape(len(labels), -1)
    if flat.shape[1] != 1:
        raise ValueError(f"{where}: expected one label per cloud, got labels of shape {tuple(np.shape(labels))}.")
    flat = flat[:, 0].astype(np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= num_classes))
    if len(bad):
        raise ValueError(
            f"{where}, sample {int(bad[0])}: label {int(flat[bad[0]])} is outside [0, {num_classes}); "
            f"{len(bad)} label(s) are out of range. Use the right variant/num_category, or fix the file."
        )
    return flat


def read_h5_clouds(path: Path, channels: int, min_points: int, normal_key: str | None = None) -> tuple:
    """``(data (M, N, C), labels (M, …))`` of an HDF5 file with ``data`` and ``label`` keys, checked."""
    import h5py

    if not path.is_file():
        raise ValueError(f"{path} does not exist ({folder_listing(path.parent)}).")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); download it again.")
    try:
        handle = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 file ({e}); download it again.") from e
    with handle:
        missing = [k for k in ("data", "label") if k not in handle]
        if missing:
            raise ValueError(f"{path}: no {' or '.join(repr(k) for k in missing)} dataset (keys: {sorted(handle)}).")
        data = np.asarray(handle["data"])
        if normal_key is not None:
            if normal_key not in handle:
                raise ValueError(f"{path}: use_normals=True needs a {normal_key!r} dataset (keys: {sorted(handle)}).")
            data = np.concatenate([data, np.asarray(handle[normal_key])], axis=-1)
        labels = np.asarray(handle["label"])
    data = validate_clouds(data, str(path), channels=channels, min_points=min_points)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} clouds but {len(labels)} labels.")
    return data, labels


# -- the shared data module ------------------------------------------------------------------------------------


class PointCloudDataModule(pl.LightningDataModule):
    """The base of the point-cloud data modules: splits, loaders, and batched resampling on the device.

    Subclasses implement :meth:`load_split` (``(points (M, N, C), labels (M,), names)`` for ``"train"`` or
    ``"test"``) and :attr:`classes`.

    Args:
        num_points: points per cloud fed to the model (1,024 for ModelNet40, 2,048 for ScanObjectNN).
        augmentation: training augmentation (:data:`~modalpeft.pointcloud.transforms.Augmentation`).
        vote: test-time voting views (0: none; the official code uses 10).
        val_split: validate on the test split as the official code does (``False``: no validation).
        batch_size: batch size of every loader.
        seed: fixes the training order and the random resampling/augmentation draws.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_points: int = 1024,
        augmentation: Augmentation = "scale_translate",
        vote: int = 0,
        val_split: bool = True,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_points < 1:
            raise ValueError(f"num_points={num_points} must be at least 1.")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation={augmentation!r} is not valid; choose one of {list(AUGMENTATIONS)}.")
        if vote < 0:
            raise ValueError(f"vote={vote} must be >= 0 (0: no voting).")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        self.num_points = num_points
        self.augmentation_name = augmentation
        self.vote = vote
        self.val_split = val_split
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.resample = ResampleFPS(num_points)
        self.augment = make_augmentation(augmentation)
        self.vote_augment = ScaleAndTranslate()
        self.datasets: dict[str, PointCloudDataset | None] = {}
        self._generator_key: tuple | None = None
        self._generator = torch.Generator()

    # -- what subclasses provide -------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_split(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        raise NotImplementedError

    # -- setup and loaders -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"stage={stage!r} is not valid; choose one of {[s for s in _STAGE_SPLITS if s]} or None.")
        self._check_model_classes()
        for split in _STAGE_SPLITS[stage]:
            if split == "val" and not self.val_split:
                self.datasets["val"] = None
                continue
            source = "test" if split == "val" else split
            if source in self.datasets and self.datasets[source] is not None:
                self.datasets[split] = self.datasets[source]
                continue
            points, labels, names = self.load_split(source)
            if points.shape[1] < self.num_points:
                raise ValueError(
                    f"{type(self).__name__}: the {source} clouds have {points.shape[1]} points, fewer than "
                    f"num_points={self.num_points}; lower num_points (e.g. --data.init_args.num_points="
                    f"{points.shape[1]})."
                )
            labels = check_labels(labels, self.num_classes, f"{type(self).__name__} {source} split")
            self.datasets[split] = self.datasets[source] = PointCloudDataset(points, labels, names)
        if stage in ("test", None):
            self._generator_key = None  # every test run draws the same voting views

    def _check_model_classes(self) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_classes = getattr(module, "hparams", {}).get("num_classes") if module is not None else None
        if model_classes is not None and self.num_classes > model_classes:
            raise ValueError(
                f"{type(self).__name__} has {self.num_classes} classes but the model was built for {model_classes}; "
                f"set --model.init_args.num_classes={self.num_classes}."
            )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split!r} data: call setup() for the stage that uses it first.")
        dataset = self.datasets[split]
        sampler = EpochSeededSampler(len(dataset), self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.datasets.get("val") is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- per-batch resampling on the device --------------------------------------------------------------------
    def generator(self, key: tuple) -> torch.Generator:
        """The CPU generator of the random draws, re-seeded from ``(seed, key)`` whenever ``key`` changes (every
        training epoch, every test run), so that draws do not depend on the global RNG."""
        if key != self._generator_key:
            digest = hashlib.sha256(repr((self.seed, key)).encode()).digest()
            self._generator.manual_seed(int.from_bytes(digest[:8], "little"))
            self._generator_key = key
        return self._generator

    def train_points(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """FPS pool, random subset, augmentation: ``(B, N, C) -> (B, num_points, C)``."""
        points = self.resample(points, generator)
        return self.augment(points, generator) if self.augment is not None else points

    def eval_points(self, points: Tensor) -> Tensor:
        """FPS to ``num_points``: ``(B, N, C) -> (B, num_points, C)``."""
        return fps_subsample(points, self.num_points)

    def vote_views(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The plain FPS view, then ``vote`` resampled and scaled/translated views: ``(1 + vote, B, num_points, C)``."""
        views = [self.eval_points(points)]
        views += [self.vote_augment(self.resample(points, generator), generator) for _ in range(self.vote)]
        return torch.stack(views)

    def adapter_data(self, device: torch.device | str | None = None) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
        """What :class:`~modalpeft.lightning.AdapterTask` hands a method that needs data when it is applied
        (Point-PEFT's memory bank): :meth:`memory_batches` on ``device``."""
        return functools.partial(self.memory_batches, device)

    def memory_batches(self, device: torch.device | str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """The training clouds in order, resampled as at evaluation (FPS to ``num_points``) on ``device``: the data a
        method that reads training features when it is applied (Point-PEFT's memory bank) should see."""
        dataset = self.datasets.get("train")
        if dataset is None:
            raise RuntimeError("no training data: call setup('fit') first.")
        for points, labels in DataLoader(dataset, batch_size=self.batch_size):
            yield self.eval_points(points.to(device)), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is None or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            return batch
        points, labels = batch
        if trainer.training:
            points = self.train_points(points, self.generator(("train", trainer.current_epoch)))
        elif trainer.testing and self.vote > 0:
            points = self.vote_views(points, self.generator(("test",)))
        else:
            points = self.eval_points(points)
        return points, labels


# -- ModelNet ---------------------------------------------------------------------------------------------------

ModelNetLayout = Literal["auto", "normal_resampled", "hdf5"]


class ModelNetDataModule(PointCloudDataModule):
    """ModelNet40 (or ModelNet10) from the folder layout a user has.

    ``layout="normal_resampled"``: ``modelnet40_normal_resampled/`` with ``modelnet40_shape_names.txt``,
    ``modelnet40_train.txt``, ``modelnet40_test.txt`` (``modelnet10_*`` for ``num_category=10``) and
    ``<class>/<class>_0001.txt`` files of comma-separated ``x,y,z,nx,ny,nz`` rows (10,000 per shape). As Point-MAE's
    ``ModelNetDataset`` (``uniform=True``), each shape is reduced once by FPS to ``cache_points`` (8,192) and cached
    (as ``.npz``, not pickle) in ``cache_dir``; then ``pc_normalize`` is applied.

    ``layout="hdf5"``: ``modelnet40_ply_hdf5_2048/`` with ``ply_data_train*.h5`` / ``ply_data_test*.h5`` (``data``
    (M, 2048, 3), ``label`` (M, 1)), ``shape_names.txt`` and ``train_files.txt`` / ``test_files.txt`` (the
    PointNet/DGCNN release; 40 classes). ``"auto"`` picks the layout from the files in ``root``.

    Args:
        root: the dataset folder.
        layout: ``"auto"``, ``"normal_resampled"`` or ``"hdf5"``.
        num_category: 40 or 10 (text layout only).
        use_normals: keep the normals (6 channels) instead of xyz only.
        normalize: apply ``pc_normalize`` (the official loader always does).
        cache_points: points kept per shape by the one-time FPS of the text layout (8,192 as Point-MAE).
        uniform: ``True``: that FPS; ``False``: the first ``cache_points`` rows (the official ``uniform=False``).
        cache_dir: where the FPS cache goes (default: ``root``, as the official code); ``""`` disables caching.
        num_points, augmentation, vote, val_split, batch_size, seed, num_workers: as
            :class:`PointCloudDataModule`.
    """

    def __init__(
        self,
        root: str,
        layout: ModelNetLayout = "auto",
        num_category: Literal[10, 40] = 40,
        use_normals: bool = False,
        normalize: bool = True,
        cache_points: int = 8192,
        uniform: bool = True,
        cache_dir: str | None = None,
        num_points: int = 1024,
        augmentation: Augmentation = "scale_translate",
        vote: int = 0,
        val_split: bool = True,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_points, augmentation, vote, val_split, batch_size, seed, num_workers)
        self.save_hyperparameters()
        if layout not in ("auto", "normal_resampled", "hdf5"):
            raise ValueError(f"layout={layout!r} is not valid; choose 'auto', 'normal_resampled' or 'hdf5'.")
        if num_category not in (10, 40):
            raise ValueError(f"num_category={num_category} is not valid; choose 40 or 10.")
        if cache_points < num_points:
            raise ValueError(f"cache_points={cache_points} must be >= num_points={num_points}.")
        self.root = Path(root)
        self.layout_name = layout
        self.num_category = num_category
        self.use_normals = use_normals
        self.normalize = normalize
        self.cache_points = cache_points
        self.uniform = uniform
        self.cache_dir = cache_dir
        self._classes: list[str] | None = None

    @property
    def channels(self) -> int:
        return 6 if self.use_normals else 3

    @property
    def layout(self) -> Literal["normal_resampled", "hdf5"]:
        if not self.root.is_dir():
            raise ValueError(
                f"ModelNetDataModule: root {str(self.root)!r} is not a folder ({folder_listing(self.root.parent)}). "
                "Give modelnet40_normal_resampled/ or modelnet40_ply_hdf5_2048/ with --data.init_args.root."
            )
        if self.layout_name != "auto":
            return self.layout_name
        if (self.root / f"modelnet{self.num_category}_shape_names.txt").is_file():
            return "normal_resampled"
        if (self.root / "shape_names.txt").is_file() or any(self.root.glob("ply_data_*.h5")):
            return "hdf5"
        raise ValueError(
            f"ModelNetDataModule: {str(self.root)!r} is neither layout: no modelnet{self.num_category}_shape_names.txt "
            "(modelnet40_normal_resampled) and no ply_data_*.h5 (modelnet40_ply_hdf5_2048); "
            f"{folder_listing(self.root)}."
        )

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            layout = self.layout
            if layout == "hdf5" and self.num_category != 40:
                raise ValueError("the modelnet40_ply_hdf5_2048 layout has 40 classes; set num_category=40.")
            name = f"modelnet{self.num_category}_shape_names.txt" if layout == "normal_resampled" else "shape_names.txt"
            path = self.root / name
            if not path.is_file():
                if layout == "hdf5":
                    raise ValueError(f"ModelNetDataModule: {path} is missing; the HDF5 release ships it.")
                raise ValueError(f"ModelNetDataModule: {path} is missing ({folder_listing(self.root)}).")
            classes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not classes:
                raise ValueError(f"ModelNetDataModule: {path} lists no classes.")
            self._classes = classes
        return self._classes

    def load_split(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self.layout == "hdf5":
            points, labels, names = self._load_hdf5(split)
        else:
            points, labels, names = self._load_text(split)
        if self.normalize:
            points = np.stack([pc_normalize(p) for p in points])
        return points, labels, names

    # the HDF5 release
    def _load_hdf5(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        listing = self.root / f"{split}_files.txt"
        if listing.is_file():
            files = [self.root / Path(line.strip()).name for line in listing.read_text().splitlines() if line.strip()]
        else:
            files = sorted(self.root.glob(f"ply_data_{split}*.h5"))
        if not files:
            raise ValueError(
                f"ModelNetDataModule: no ply_data_{split}*.h5 files in {self.root} ({folder_listing(self.root)})."
            )
        points, labels, names = [], [], []
        for path in files:
            data, label = read_h5_clouds(path, self.channels, self.num_points, "normal" if self.use_normals else None)
            points.append(data)
            labels.append(check_labels(label, self.num_classes, str(path)))
            names += [f"{path.name}[{i}]" for i in range(len(data))]
        sizes = {p.shape[1] for p in points}
        if len(sizes) > 1:
            raise ValueError(f"ModelNetDataModule: the {split} files hold clouds of different sizes {sorted(sizes)}.")
        return np.concatenate(points), np.concatenate(labels), names

    # the text release
    def _shape_ids(self, split: str) -> list[str]:
        path = self.root / f"modelnet{self.num_category}_{split}.txt"
        if not path.is_file():
            raise ValueError(f"ModelNetDataModule: {path} is missing ({folder_listing(self.root)}).")
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"ModelNetDataModule: {path} lists no shapes.")
        return ids

    def _cache_path(self, split: str) -> Path | None:
        if self.cache_dir == "":
            return None
        folder = Path(self.cache_dir) if self.cache_dir else self.root
        kind = "fps" if self.uniform else "first"
        normals = "_normals" if self.use_normals else ""
        return folder / f"modelnet{self.num_category}_{split}_{self.cache_points}pts_{kind}{normals}.npz"

    def _load_text(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ids = self._shape_ids(split)
        lookup = {name: i for i, name in enumerate(self.classes)}
        cache = self._cache_path(split)
        if cache is not None and cache.is_file():
            with np.load(cache, allow_pickle=False) as stored:
                if list(stored["ids"]) == ids:
                    return stored["points"], stored["labels"], ids
            warnings.warn(f"{cache} was made for other shapes; rebuilding it.", stacklevel=2)
        labels, clouds = [], []
        for shape_id in ids:
            class_name = "_".join(shape_id.split("_")[:-1])
            if class_name not in lookup:
                raise ValueError(
                    f"ModelNetDataModule: shape {shape_id!r} of modelnet{self.num_category}_{split}.txt belongs to "
                    f"class {class_name!r}, which modelnet{self.num_category}_shape_names.txt does not list."
                )
            path = self.root / class_name / f"{shape_id}.txt"
            clouds.append(self._read_text_cloud(path))
            labels.append(lookup[class_name])
        points = self._reduce(clouds)
        labels_array = np.asarray(labels, dtype=np.int64)
        if cache is not None:
            self._write_cache(cache, points, labels_array, ids)
        return points, labels_array, ids

    def _read_text_cloud(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(f"ModelNetDataModule: {path} does not exist ({folder_listing(path.parent)}).")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data"
            try:
                data = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
            except ValueError as e:
                raise ValueError(f"{path}: not comma-separated x,y,z,nx,ny,nz rows ({e}).") from e
        channels = 6 if self.use_normals else None
        cloud = validate_cloud(data, str(path), channels=channels, min_points=self.cache_points)
        return cloud[:, : self.channels]

    def _reduce(self, clouds: list[np.ndarray]) -> np.ndarray:
        """Every cloud to ``cache_points`` points: FPS in batches of equal-size clouds, or the first rows."""
        if not self.uniform:
            return np.stack([c[: self.cache_points] for c in clouds])
        out: list[np.ndarray] = []
        start = 0
        while start < len(clouds):
            end = start + 1
            while end < len(clouds) and end - start < 64 and len(clouds[end]) == len(clouds[start]):
                end += 1
            batch = torch.from_numpy(np.stack(clouds[start:end]))  # (b, N, C)
            if batch.shape[1] == self.cache_points:
                out.append(batch.numpy())
            else:
                idx = farthest_point_sample(batch[..., :3].contiguous(), self.cache_points)
                out.append(gather_points(batch, idx).numpy())
            start = end
        return np.concatenate(out).astype(np.float32)

    @staticmethod
    def _write_cache(path: Path, points: np.ndarray, labels: np.ndarray, ids: list[str]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                np.savez(handle, points=points, labels=labels, ids=np.asarray(ids))
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(
                f"could not write the FPS cache {path} ({e}); set cache_dir to a writable folder.", stacklevel=2
            )


# -- ScanObjectNN -----------------------------------------------------------------------------------------------


class ScanObjectNNDataModule(PointCloudDataModule):
    """ScanObjectNN (Uy et al., ICCV 2019) from its ``h5_files`` release: 15 classes of real scanned objects,
    2,048 points per cloud (``data`` (M, 2048, 3), ``label`` (M,), ``mask``).

    ``root`` is ``h5_files`` (the variant picks ``main_split`` or ``main_split_nobg``) or the split folder itself.
    Variants: ``"obj_bg"`` (``main_split/training_objectdataset.h5``), ``"obj_only"`` (``main_split_nobg``),
    ``"pb_t25"``, ``"pb_t25_r"``, ``"pb_t50_r"`` and ``"pb_t50_rs"`` (the hardest,
    ``training_objectdataset_augmentedrot_scale75.h5``). As Point-MAE's ``ScanObjectNN(_hardest)`` dataset, the
    clouds are used as stored (no normalisation).

    Args:
        root: ``h5_files`` or its ``main_split`` / ``main_split_nobg`` folder.
        variant: the variant (default ``"pb_t50_rs"``).
        normalize: apply ``pc_normalize`` (the official loader does not).
        num_points, augmentation, vote, val_split, batch_size, seed, num_workers: as :class:`PointCloudDataModule`
            (default 2,048 points, the official setting).
    """

    def __init__(
        self,
        root: str,
        variant: ScanObjectNNVariant = "pb_t50_rs",
        normalize: bool = False,
        num_points: int = 2048,
        augmentation: Augmentation = "scale_translate",
        vote: int = 0,
        val_split: bool = True,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_points, augmentation, vote, val_split, batch_size, seed, num_workers)
        self.save_hyperparameters()
        if variant not in SCANOBJECTNN_FILES:
            raise ValueError(f"variant={variant!r} is not valid; choose one of {list(SCANOBJECTNN_FILES)}.")
        self.root = Path(root)
        self.variant = variant
        self.normalize = normalize

    @property
    def classes(self) -> list[str]:
        return list(SCANOBJECTNN_CLASSES)

    def file(self, split: Literal["train", "test"]) -> Path:
        folder_name, train_file, test_file = SCANOBJECTNN_FILES[self.variant]
        name = train_file if split == "train" else test_file
        if not self.root.is_dir():
            raise ValueError(
                f"ScanObjectNNDataModule: root {str(self.root)!r} is not a folder "
                f"({folder_listing(self.root.parent)}); give h5_files/ or h5_files/{folder_name}/."
            )
        for folder in (self.root / folder_name, self.root):
            if (folder / name).is_file():
                if folder == self.root and self.root.name != folder_name and (self.root / folder_name).is_dir():
                    continue
                return folder / name
        raise ValueError(
            f"ScanObjectNNDataModule: variant {self.variant!r} needs {folder_name}/{name} under {str(self.root)!r}, "
            f"not found ({folder_listing(self.root)})."
        )

    def load_split(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        path = self.file(split)
        points, labels = read_h5_clouds(path, 3, self.num_points)
        if self.normalize:
            points = np.stack([pc_normalize(p) for p in points])
        return points, labels, [f"{path.name}[{i}]" for i in range(len(points))]


# -- the offline mesh set ---------------------------------------------------------------------------------------


class MeshDataModule(PointCloudDataModule):
    """The offline labelled set of :func:`modalpeft.pointcloud.meshes.build_classification_set`: clouds sampled from
    pybullet's meshes and trimesh primitives, cached as ``.npz`` (built in seconds on first use).

    The training clouds are split once (fixed by ``seed``) into ``train`` and ``val``; ``test`` is its own set.

    Args:
        variant: ``"scan"`` (ScanObjectNN-like: sensor noise, a cut by a random plane, background points) or
            ``"clean"``.
        train_per_class: training clouds per class.
        val_per_class: validation clouds per class (taken from the same distribution as training).
        test_per_class: test clouds per class.
        cloud_points: points per stored cloud.
        cache_dir: where the ``.npz`` goes (default ``$MODALPEFT_CACHE`` or ``~/.cache/modalpeft``).
        num_points, augmentation, vote, batch_size, seed, num_workers: as :class:`PointCloudDataModule`.
    """

    def __init__(
        self,
        variant: Literal["scan", "clean"] = "scan",
        train_per_class: int = 40,
        val_per_class: int = 10,
        test_per_class: int = 30,
        cloud_points: int = 1024,
        cache_dir: str | None = None,
        num_points: int = 512,
        augmentation: Augmentation = "scale_translate",
        vote: int = 0,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(num_points, augmentation, vote, True, batch_size, seed, num_workers)
        self.save_hyperparameters()
        from .meshes import CLASSIFICATION_CLASSES

        self._classes = list(CLASSIFICATION_CLASSES)
        if min(train_per_class, test_per_class) < 1 or val_per_class < 0:
            raise ValueError("train_per_class and test_per_class must be >= 1, val_per_class >= 0.")

    @property
    def classes(self) -> list[str]:
        return self._classes

    def setup(self, stage: str | None = None) -> None:
        self.val_split = self.hparams.val_per_class > 0
        super().setup(stage)
        if self.val_split and "val" in _STAGE_SPLITS[stage]:
            self.datasets["val"] = self._split_set("val")

    def _sets(self) -> dict[str, Any]:
        from .meshes import build_classification_set

        hp = self.hparams
        return build_classification_set(
            variant=hp.variant,
            train_per_class=hp.train_per_class + hp.val_per_class,
            test_per_class=hp.test_per_class,
            num_points=hp.cloud_points,
            seed=hp.seed,
            cache_dir=hp.cache_dir,
        )

    def _split_set(self, split: str) -> PointCloudDataset:
        sets = self._sets()
        points, labels = sets["train_points"], sets["train_labels"]
        per_class = self.hparams.train_per_class
        # the first train_per_class clouds of each class train, the rest validate (the set is built class by class)
        rank = np.zeros(len(labels), dtype=np.int64)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            rank[where] = np.arange(len(where))
        keep = rank < per_class if split == "train" else rank >= per_class
        names = [f"meshes {split} {i}" for i in np.flatnonzero(keep)]
        return PointCloudDataset(points[keep], labels[keep], names)

    def load_split(self, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if split == "train":
            dataset = self._split_set("train")
            return dataset.points.numpy(), dataset.labels.numpy(), dataset.names
        sets = self._sets()
        return sets["test_points"], sets["test_labels"], [f"meshes test {i}" for i in range(len(sets["test_labels"]))]


__all__ = [
    "SCANOBJECTNN_CLASSES",
    "SCANOBJECTNN_FILES",
    "MeshDataModule",
    "ModelNetDataModule",
    "PointCloudDataModule",
    "PointCloudDataset",
    "ScanObjectNNDataModule",
    "check_labels",
    "read_h5_clouds",
]
