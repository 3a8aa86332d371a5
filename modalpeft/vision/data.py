"""Image data for vision tasks: class folders, the VTAB-1k release's list files, Fashion-MNIST's idx files.

Every data module here turns images into ``(C, H, W)`` float tensors the same way (:class:`ImageTransform`):
convert the image to the channel count the model takes (grey, RGBA and palette images included), resize it to
the model's input size, scale to [0, 1] and normalise with the model's mean and std. Those settings come, in
this order of priority, from the data module's explicit arguments (``image_size``, ``channels``, ``mean``,
``std``, ``interpolation``), from the backbone (``timm.data.resolve_data_config`` plus the input size and
channels the model really takes), or from the data module's own defaults. Under a ``Trainer`` the backbone is
the task's ``model``, so a recipe never repeats the backbone's normalisation.

There is no augmentation: the VTAB-1k protocol of VPT, SSF and SPT trains without it (SSF's ``--no-aug
--direct-resize``). Training loaders shuffle with :class:`~modalpeft.lightning.EpochSeededSampler`, so a resumed
run sees the same order as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..lightning.data import EpochSeededSampler
from .idx import FASHION_MNIST_CLASSES, read_fashion_mnist
from .transforms import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    ImageConfig,
    ImageListDataset,
    ImageTransform,
    Interpolation,
    ResizeMode,
    folder_listing,
    resolve_image_config,
)

Stage = Literal["fit", "validate", "test", "predict"]

_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


# -- the shared data module ------------------------------------------------------------------------------------


class ImageDataModule(pl.LightningDataModule):
    """The base of the image data modules: image settings, the transform, loaders and the class-count check.

    Subclasses set ``default_image_config`` and implement :meth:`build_splits` (``"train"``, ``"val"``,
    ``"test"`` datasets for a stage) and :attr:`num_classes`.

    Args:
        image_size: output side length; ``None``: the model's input size.
        channels: 1 or 3; ``None``: the model's input channels.
        mean: normalisation mean (1 or ``channels`` values); ``None``: the model's.
        std: normalisation std; ``None``: the model's.
        interpolation: resampling filter; ``None``: the model's (``"bicubic"`` for timm ViTs).
        resize: ``"squash"`` or ``"shorter_crop"`` (see :class:`ImageTransform`).
        batch_size: batch size of every loader.
        seed: fixes the training order (and any split the module draws).
        num_workers: DataLoader workers.
        backbone: the model whose data config to use, for use outside a ``Trainer``; under a ``Trainer`` the
            task's ``model`` is used when this is ``None``.
    """

    default_image_config: ImageConfig | None = None
    """Used when neither explicit values nor a model are there (``None``: timm's defaults)."""

    def __init__(
        self,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        resize: ResizeMode = "squash",
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        if resize not in ("squash", "shorter_crop"):
            raise ValueError(f"resize={resize!r} is not valid; choose 'squash' or 'shorter_crop'.")
        self.backbone = backbone
        self.datasets: dict[str, Dataset | None] = {}
        self.transform: ImageTransform | None = None
        # check what does not depend on the model now; mean/std lengths are checked against its channels in setup
        resolve_image_config(None, image_size, channels, None, None, interpolation, self.default_image_config)
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) not in (1, 3):
                raise ValueError(f"{name}={values!r} must have 1 or 3 values (one per channel).")

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def config_model(self) -> nn.Module | None:
        """The model whose data config applies: ``backbone``, else the attached task's ``model``."""
        if self.backbone is not None:
            return self.backbone
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model = getattr(module, "model", None)
        return model if isinstance(model, nn.Module) else None

    def image_config(self) -> ImageConfig:
        hp = self.hparams
        return resolve_image_config(
            self.config_model(),
            hp.image_size,
            hp.channels,
            hp.mean,
            hp.std,
            hp.interpolation,
            self.default_image_config,
        )

    def build_splits(self, stage: str | None, transform: ImageTransform) -> dict[str, Dataset | None]:
        """The datasets a stage needs, by split name (``"train"``, ``"val"``, ``"test"``)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"stage={stage!r} is not valid; choose one of {[s for s in _STAGE_SPLITS if s]} or None.")
        self._check_model_classes()
        self.transform = ImageTransform(self.image_config(), self.hparams.resize)
        self.datasets.update(self.build_splits(stage, self.transform))

    def _check_model_classes(self) -> None:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_classes = getattr(module, "hparams", {}).get("num_classes") if module is not None else None
        if model_classes is not None and self.num_classes > model_classes:
            raise ValueError(
                f"{type(self).__name__} has {self.num_classes} classes but the model was built for {model_classes}; "
                f"set --model.init_args.num_classes={self.num_classes} (and the backbone's num_classes)."
            )

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split!r} data: call setup() for the stage that uses it first.")
        dataset = self.datasets[split]
        hp = self.hparams
        sampler = EpochSeededSampler(len(dataset), hp.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.datasets.get("val") is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


# -- class folders ---------------------------------------------------------------------------------------------


class ImageFolderDataModule(ImageDataModule):
    """Images in class sub-folders: ``root/<split>/<class>/<image>``, labels in sorted class-name order.

    The classes are the sub-folders of the training split; the validation and test splits may lack some of
    them but may not add new ones. Files whose ending is not in :data:`IMAGE_EXTENSIONS` and hidden entries
    are ignored; a class folder without images is an error.

    Args:
        root: the dataset folder.
        train_split: the training sub-folder.
        val_split: the validation sub-folder (``None``: no validation).
        test_split: the test sub-folder (``None``: no test data).
        image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone: as
            :class:`ImageDataModule`.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        resize: ResizeMode = "squash",
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(
            image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone
        )
        self.save_hyperparameters(ignore=["backbone"])
        self._classes: list[str] | None = None

    def _folder(self, split: str) -> Path:
        root = Path(self.hparams.root)
        if not root.is_dir():
            raise ValueError(
                f"ImageFolderDataModule: root {str(root)!r} is not a folder ({folder_listing(root.parent)}). Expected "
                "root/<split>/<class>/<image>; set --data.init_args.root."
            )
        folder = root / split
        if not folder.is_dir():
            raise ValueError(
                f"ImageFolderDataModule: split folder {str(folder)!r} does not exist; {folder_listing(root)}. Set "
                "train_split/val_split/test_split to existing sub-folders (None for no validation or test data)."
            )
        return folder

    @staticmethod
    def _class_dirs(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    @property
    def classes(self) -> list[str]:
        """The class names (sub-folders of the training split), in label order."""
        if self._classes is None:
            folder = self._folder(self.hparams.train_split)
            classes = [p.name for p in self._class_dirs(folder)]
            if not classes:
                raise ValueError(
                    f"ImageFolderDataModule: {str(folder)!r} has no class sub-folders "
                    f"({folder_listing(folder)}); expected <split>/<class>/<image>."
                )
            self._classes = classes
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def samples(self, split: str) -> list[tuple[Path, int]]:
        """``(path, label)`` for every image of a split folder, class by class, in sorted file order."""
        folder = self._folder(split)
        lookup = {name: i for i, name in enumerate(self.classes)}
        found = []
        for class_dir in self._class_dirs(folder):
            if class_dir.name not in lookup:
                raise ValueError(
                    f"ImageFolderDataModule: {str(class_dir)!r} is a class the training split "
                    f"{self.hparams.train_split!r} does not have (its classes: {self.classes})."
                )
            images = sorted(
                p
                for p in class_dir.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not images:
                raise ValueError(
                    f"ImageFolderDataModule: class folder {str(class_dir)!r} holds no images "
                    f"(endings {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
                )
            found.extend((p, lookup[class_dir.name]) for p in images)
        return found

    def build_splits(self, stage: str | None, transform: ImageTransform) -> dict[str, Dataset | None]:
        names = {"train": self.hparams.train_split, "val": self.hparams.val_split, "test": self.hparams.test_split}
        out: dict[str, Dataset | None] = {}
        for split in _STAGE_SPLITS[stage]:
            if names[split] is None:
                if stage in ("test", "predict"):
                    raise ValueError(f"ImageFolderDataModule: stage {stage!r} needs test data; set test_split.")
                out[split] = None
                continue
            out[split] = ImageListDataset(self.samples(names[split]), transform)
        return out


# -- VTAB-1k ---------------------------------------------------------------------------------------------------

VTAB1K_LISTS = ("train800", "val200", "train800val200", "test")
"""The list files of a VTAB-1k task folder, ``<name>.txt``; each line is ``<relative image path> <label>``."""


class VTAB1kDataModule(ImageDataModule):
    """One VTAB-1k task as the released folders lay it out (the format VPT, NOAH, SSF and SPT read).

    ``root`` is a task folder, e.g. ``vtab-1k/cifar``, holding the images and four list files,
    ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``; each line is
    ``<image path relative to root> <integer label>``. The papers pick hyper-parameters with
    ``split="train800"`` (train on ``train800``, validate on ``val200``), then make the final run with
    ``split="train800val200"``, which validates on ``test`` as the official code does (report the last epoch;
    there is no held-out data to select on). Testing always uses ``test``.

    Args:
        root: the task folder.
        split: ``"train800"`` (model selection) or ``"train800val200"`` (the final run).
        num_classes: the task's class count; labels must lie in ``[0, num_classes)``. ``None``: one more than
            the largest label in the list files.
        image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone: as
            :class:`ImageDataModule`; with none given, a ViT-B/16 gets VTAB's 224 x 224 and its own
            normalisation.
    """

    def __init__(
        self,
        root: str,
        split: Literal["train800", "train800val200"] = "train800",
        num_classes: int | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        resize: ResizeMode = "squash",
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(
            image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone
        )
        # num_classes is kept out of hparams: Lightning refuses a data-module hparam that differs from the task's
        self.save_hyperparameters(ignore=["backbone", "num_classes"])
        self.declared_classes = num_classes
        if split not in ("train800", "train800val200"):
            raise ValueError(
                f"split={split!r} is not valid; choose 'train800' (validate on val200) or 'train800val200' (the "
                "final run, validated on test)."
            )
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be at least 1 (or None to read it from the lists).")
        self._lists: dict[str, list[tuple[Path, int]]] = {}

    @property
    def list_names(self) -> dict[str, str]:
        """The list file behind each split: ``{"train": ..., "val": ..., "test": "test"}``."""
        if self.hparams.split == "train800":
            return {"train": "train800", "val": "val200", "test": "test"}
        return {"train": "train800val200", "val": "test", "test": "test"}

    def _root(self) -> Path:
        root = Path(self.hparams.root)
        if not root.is_dir():
            raise ValueError(
                f"VTAB1kDataModule: task folder {str(root)!r} does not exist "
                f"({folder_listing(root.parent)}). Give a VTAB-1k task folder (e.g. vtab-1k/cifar) with "
                "--data.init_args.root."
            )
        return root

    def _require(self, names: Sequence[str]) -> None:
        root = self._root()
        missing = [n for n in names if not (root / f"{n}.txt").is_file()]
        if missing:
            present = [f"{n}.txt" for n in VTAB1K_LISTS if (root / f"{n}.txt").is_file()]
            raise ValueError(
                f"VTAB1kDataModule: {str(root)!r} lacks {', '.join(f'{n}.txt' for n in missing)} "
                f"(split={self.hparams.split!r} needs them); list files present: {present or 'none'}. A VTAB-1k task "
                f"folder holds {', '.join(f'{n}.txt' for n in VTAB1K_LISTS)}, each line '<image path> <label>'."
            )

    def read_list(self, name: str) -> list[tuple[Path, int]]:
        """``(path, label)`` pairs of ``<root>/<name>.txt``, every line checked."""
        if name in self._lists:
            return self._lists[name]
        self._require([name])
        root = self._root()
        list_path = root / f"{name}.txt"
        limit = self.declared_classes
        samples = []
        with open(list_path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if not text:
                    continue
                parts = text.rsplit(maxsplit=1)
                where = f"{list_path}, line {number}"
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise ValueError(f"{where}: {text!r} is not '<relative image path> <integer label>'.")
                label = int(parts[1])
                if label < 0 or (limit is not None and label >= limit):
                    bound = f"[0, {limit})" if limit is not None else "non-negative"
                    raise ValueError(
                        f"{where}: label {label} is out of range (labels must be {bound}); fix the line"
                        + (" or num_classes." if limit is not None else ".")
                    )
                path = root / parts[0]
                if not path.is_file():
                    raise ValueError(f"{where}: image {str(path)!r} does not exist.")
                samples.append((path, label))
        if not samples:
            raise ValueError(f"VTAB1kDataModule: {list_path} lists no images.")
        self._lists[name] = samples
        return samples

    @property
    def num_classes(self) -> int:
        if self.declared_classes is not None:
            return self.declared_classes
        root = self._root()
        present = [n for n in VTAB1K_LISTS if (root / f"{n}.txt").is_file()]
        self._require(present or [self.list_names["train"]])
        return 1 + max(label for name in present for _, label in self.read_list(name))

    def build_splits(self, stage: str | None, transform: ImageTransform) -> dict[str, Dataset | None]:
        splits = _STAGE_SPLITS[stage]
        self._require(sorted({self.list_names[s] for s in splits}, key=VTAB1K_LISTS.index))
        return {s: ImageListDataset(self.read_list(self.list_names[s]), transform) for s in splits}


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (Xiao et al. 2017; 60,000 training and 10,000 test images, 28 x 28 grey, 10 classes, MIT)
    from the four standard idx files in ``root`` (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``).

    ``val_size`` training images, drawn with ``seed``, are held out for validation; ``t10k`` is the test set.
    Without a model or explicit values, images stay 28 x 28 x 1, normalised with the training set's mean and
    std (0.2860, 0.3530).

    Args:
        root: the folder of the idx files (Debian's ``dataset-fashion-mnist`` installs them in
            ``/usr/share/datasets/fashion-mnist``).
        val_size: training images held out for validation (0: no validation).
        image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone: as
            :class:`ImageDataModule`.
    """

    default_image_config = ImageConfig((28, 28), 1, (0.2860,), (0.3530,), "bilinear")

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        val_size: int = 5000,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        resize: ResizeMode = "squash",
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(
            image_size, channels, mean, std, interpolation, resize, batch_size, seed, num_workers, backbone
        )
        self.save_hyperparameters(ignore=["backbone"])
        if val_size < 0:
            raise ValueError(f"val_size={val_size} must be >= 0.")

    @property
    def num_classes(self) -> int:
        return len(FASHION_MNIST_CLASSES)

    def build_splits(self, stage: str | None, transform: ImageTransform) -> dict[str, Dataset | None]:
        root = Path(self.hparams.root)
        if not root.is_dir():
            raise ValueError(
                f"FashionMNISTDataModule: folder {str(root)!r} does not exist ({folder_listing(root.parent)}). Install "
                "Debian's dataset-fashion-mnist or give the folder of the idx files with --data.init_args.root."
            )
        out: dict[str, Dataset | None] = {}
        splits = _STAGE_SPLITS[stage]
        if "train" in splits or "val" in splits:
            images, labels = read_fashion_mnist(root, "train")
            val_size = self.hparams.val_size
            if val_size >= len(images):
                raise ValueError(f"val_size={val_size} leaves no training images (the training set has {len(images)}).")
            order = np.random.default_rng(self.hparams.seed).permutation(len(images))
            train_idx, val_idx = np.sort(order[val_size:]), np.sort(order[:val_size])
            if "train" in splits:
                out["train"] = ArrayImageDataset(images[train_idx], labels[train_idx], transform)
            if "val" in splits:
                out["val"] = ArrayImageDataset(images[val_idx], labels[val_idx], transform) if val_size else None
        if "test" in splits:
            images, labels = read_fashion_mnist(root, "t10k")
            out["test"] = ArrayImageDataset(images, labels, transform)
        return out


__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "VTAB1K_LISTS",
    "ArrayImageDataset",
    "FashionMNISTDataModule",
    "ImageConfig",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageListDataset",
    "ImageTransform",
    "VTAB1kDataModule",
    "read_fashion_mnist",
    "resolve_image_config",
]
