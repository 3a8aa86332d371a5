"""Tracking data sets read from a user folder (GOT-10k, LaSOT, TrackingNet) and SPMTrack's training pairs.

Layouts (as the data sets ship; nothing is downloaded):

- **GOT-10k**: ``<root>/{train,val,test}/list.txt`` naming the sequence folders; each holds ``00000001.jpg ...``,
  ``groundtruth.txt`` (``x,y,w,h`` per frame; the test split gives the first frame only), ``absence.label`` (1 =
  target absent) and ``cover.label`` (visible ratio 0-8; 0 = fully covered). A frame is visible when it is not absent
  (the official reader) and, when ``cover.label`` exists, its cover is not 0.
- **LaSOT**: ``<root>/<category>/<category>-<n>/img/00000001.jpg ...`` with ``groundtruth.txt`` (``x,y,w,h``,
  1-based pixels: 1 is subtracted from x and y as the official reader does), ``full_occlusion.txt`` and
  ``out_of_view.txt`` (one comma-separated line of 0/1 each). ``split="test"`` is the official 280-sequence protocol
  II test set (``lasot_test.txt`` beside this file, from SPMTrack's reader); ``"train"`` the other sequences.
- **TrackingNet**: ``<root>/TRAIN_<i>/anno/<name>.txt`` (``x,y,w,h`` per frame) and ``<root>/TRAIN_<i>/frames/<name>/
  0.jpg, 1.jpg ...``; ``TEST`` has the first box only.

:class:`TrackingPairs` draws SPMTrack's training samples from such sequences (3 templates, 2 search frames, the
official sampling, crops and augmentations of :mod:`modalpeft.tracking.transforms`); the data sets are drawn with
equal weight, as the official recipe weighs GOT-10k, LaSOT, TrackingNet (and COCO, not read here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

LASOT_TEST = Path(__file__).resolve().parent / "lasot_test.txt"


@dataclass
class Sequence:
    """One annotated video: frame paths (or frames held in memory, as :func:`~modalpeft.tracking.inference.as_frame`
    takes them), ``(N, 4)`` boxes ``x, y, w, h`` (0-based pixels; ``N`` may be 1 for a test sequence, whose later
    frames are not annotated) and ``(N,)`` visibility flags."""

    name: str
    frames: list[Path] | list[np.ndarray]
    boxes: np.ndarray
    visible: np.ndarray
    annotation: Path

    def __len__(self) -> int:
        return len(self.frames)


def read_boxes(path: Path) -> np.ndarray:
    """``x,y,w,h`` lines (comma, tab or space separated) -> ``(N, 4)`` float64."""
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: a sequence folder needs its boxes file (x,y,w,h per frame); restore it from the data "
            "set's archive or remove the sequence from the list."
        )
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.replace("\t", ",").replace(" ", ",").split(",")
        values = [p for p in parts if p]
        try:
            rows.append([float(v) for v in values])
        except ValueError:
            raise ValueError(f"{path}, line {line_no}: {line!r} is not four numbers x,y,w,h.") from None
        if len(values) != 4:
            raise ValueError(f"{path}, line {line_no}: {line!r} has {len(values)} values; boxes are x,y,w,h.")
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def _read_flags(path: Path, length: int) -> np.ndarray:
    values = [v for v in path.read_text().replace(",", "\n").split() if v.strip()]
    if len(values) != length:
        raise ValueError(f"{path} has {len(values)} entries for {length} frames; restore the file from the data set.")
    return np.asarray([int(float(v)) for v in values])


def _frames(folder: Path, suffix: str = ".jpg") -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"frame folder {folder} does not exist; check the data set root and its layout.")
    names = [p for p in folder.iterdir() if p.suffix.lower() in (suffix, ".png", ".jpeg")]
    return sorted(names, key=lambda p: (len(p.stem), p.stem))


def check_counts(
    name: str, frames: list[Path], boxes: np.ndarray, annotation: Path, first_box_only: bool = False
) -> None:
    """Frames exist and every one has a box, or, where ``first_box_only`` (the hidden-label test splits: GOT-10k
    ``test``, TrackingNet ``TEST``), only the first may have one."""
    if not frames:
        raise ValueError(f"sequence {name}: no frames found beside {annotation}; check the data set's layout.")
    if len(boxes) < len(frames) and not (first_box_only and len(boxes) == 1):
        only = (
            " (only the test splits whose labels are hidden, GOT-10k test and TrackingNet TEST, give the first box "
            "alone)"
            if len(boxes) == 1
            else " (or only the first, for a test split)"
        )
        raise ValueError(
            f"{annotation} has {len(boxes)} boxes for {len(frames)} frames: every frame needs a box{only}; restore the "
            "file or remove the extra frames."
        )


def make_sequence(
    name: str,
    frames: list[Path],
    boxes: np.ndarray,
    visible: np.ndarray,
    annotation: Path,
    first_box_only: bool = False,
) -> Sequence:
    """Check what was read and build the :class:`Sequence`: one box per frame (or only the first, where
    ``first_box_only``: see :func:`check_counts`), positive sizes on visible frames."""
    check_counts(name, frames, boxes, annotation, first_box_only)
    boxes = boxes[: len(frames)]
    visible = visible[: len(boxes)].astype(bool)
    bad = np.flatnonzero(visible & ((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)))
    if len(bad):
        raise ValueError(
            f"{annotation}, line {bad[0] + 1}: box {boxes[bad[0]].tolist()} has a non-positive width or height on a "
            "frame marked visible; fix the box or mark the frame absent/occluded."
        )
    return Sequence(name, frames, boxes, visible, annotation)


def read_got10k(root: str | os.PathLike[str], split: str = "train") -> list[Sequence]:
    """GOT-10k's ``split`` (``train``, ``val`` or ``test``) under ``root``."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r}: GOT-10k has 'train', 'val' and 'test'.")
    folder = Path(root) / split
    listing = folder / "list.txt"
    if not listing.is_file():
        raise ValueError(f"{listing} is missing: give the GOT-10k root, the folder holding train/, val/ and test/.")
    sequences = []
    for name in listing.read_text().split():
        path = folder / name
        boxes = read_boxes(path / "groundtruth.txt")
        frames = _frames(path)
        check_counts(name, frames, boxes, path / "groundtruth.txt", split == "test")
        visible = np.ones(len(boxes), dtype=bool)
        if (path / "absence.label").is_file():
            visible &= _read_flags(path / "absence.label", len(boxes)) == 0
        if (path / "cover.label").is_file():
            visible &= _read_flags(path / "cover.label", len(boxes)) > 0
        sequences.append(make_sequence(name, frames, boxes, visible, path / "groundtruth.txt", split == "test"))
    return sequences


def read_lasot(root: str | os.PathLike[str], split: str = "train") -> list[Sequence]:
    """LaSOT under ``root``: ``split="test"`` the official 280 test sequences present, ``"train"`` the rest."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: LaSOT has 'train' and 'test' (protocol II).")
    test = set(LASOT_TEST.read_text().split())
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"LaSOT root {root} does not exist; give the folder holding the category folders.")
    sequences = []
    for category in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted((p for p in category.iterdir() if p.is_dir()), key=lambda p: p.name):
            if (path.name in test) != (split == "test"):
                continue
            boxes = read_boxes(path / "groundtruth.txt")
            boxes[:, :2] -= 1
            frames = _frames(path / "img")
            check_counts(path.name, frames, boxes, path / "groundtruth.txt")
            visible = np.ones(len(boxes), dtype=bool)
            for flags in ("full_occlusion.txt", "out_of_view.txt"):
                if (path / flags).is_file():
                    visible &= _read_flags(path / flags, len(boxes)) == 0
            sequences.append(make_sequence(path.name, frames, boxes, visible, path / "groundtruth.txt"))
    return sequences


def read_trackingnet(root: str | os.PathLike[str], subsets: list[str] | None = None) -> list[Sequence]:
    """TrackingNet's ``subsets`` (default: every ``TRAIN_<i>`` folder under ``root``)."""
    root = Path(root)
    names = subsets or sorted(p.name for p in root.glob("TRAIN_*") if p.is_dir())
    if not names:
        raise ValueError(f"no TRAIN_<i> folder under {root}; give the TrackingNet root (holding TRAIN_0, ...).")
    sequences = []
    for subset in names:
        anno = root / subset / "anno"
        if not anno.is_dir():
            raise ValueError(f"{anno} does not exist; TrackingNet subsets hold anno/ and frames/.")
        for file in sorted(anno.glob("*.txt")):
            boxes = read_boxes(file)
            frames = _frames(root / subset / "frames" / file.stem)
            visible = np.ones(len(boxes), dtype=bool)
            sequences.append(make_sequence(file.stem, frames, boxes, visible, file, subset.upper() == "TEST"))
    return sequences


def load_frame(path: Path) -> Tensor:
    """A frame as a ``(3, H, W)`` float tensor in [0, 1]; an unreadable file is an error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as error:
        raise ValueError(f"frame {path} cannot be read ({error}); re-extract the sequence or remove it.") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 255.0


def check_box(box: np.ndarray, size: tuple[int, int], where: str) -> None:
    """Refuse a box (``x, y, w, h``) with a non-positive size or outside a frame of ``size = (height, width)``."""
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise ValueError(f"{where}: box {[x, y, w, h]} has a non-positive width or height; boxes are x, y, w, h.")
    if x >= size[1] or y >= size[0] or x + w <= 0 or y + h <= 0:
        raise ValueError(
            f"{where}: box {[x, y, w, h]} lies outside the {size[1]}x{size[0]} frame; boxes are x, y, w, h in pixels "
            "of that frame (is it x1, y1, x2, y2, or for another resolution?)."
        )


class TrackingDataModule(pl.LightningDataModule):
    """SPMTrack's training data: samples drawn with equal weight from each data set given (GOT-10k train, LaSOT train,
    TrackingNet); validation and test on GOT-10k val (plain crops for test). Folders left empty are not used.
    ``sequences["test"]`` holds the GOT-10k val sequences, which :class:`~modalpeft.tracking.tasks.TrackingTask`
    also tracks frame by frame at the end of ``test`` (AO, SR@0.5, SR@0.75, as the official test-got10k-val run).

    Args:
        got10k: GOT-10k root (holding ``train/``, ``val/``); ``""``: not used.
        lasot: LaSOT root (category folders); its training sequences are used.
        trackingnet: TrackingNet root (``TRAIN_<i>``); ``trackingnet_subsets`` picks some (``["TRAIN_0"]``).
        template_size, search_size: crop sizes in pixels (SPMTrack-B: 196, 378), multiples of ``patch_size``.
        patch_size: the backbone's patch size (14 for DINOv2).
        num_templates, num_search: frames per sample (3 and 2).
        max_gap: template gap in frames (200; search frames within twice that).
        samples_per_epoch: training samples per epoch (131,072 officially).
        val_samples: validation (and test) samples.
        batch_size: per device (the official global batch is 128).
        num_workers: DataLoader workers.
        seed: base seed of the draws.
    """

    def __init__(
        self,
        got10k: str = "",
        lasot: str = "",
        trackingnet: str = "",
        trackingnet_subsets: list[str] | None = None,
        template_size: int = 196,
        search_size: int = 378,
        patch_size: int = 14,
        num_templates: int = 3,
        num_search: int = 2,
        max_gap: int = 200,
        samples_per_epoch: int = 131072,
        val_samples: int = 4096,
        batch_size: int = 32,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not (got10k or lasot or trackingnet):
            raise ValueError("no data: give at least one of got10k, lasot, trackingnet (the data set root folders).")

    def _pairs(self, sources: list[list[Sequence]], length: int, train: bool, seed: int):
        from .pairs import TrackingPairs

        hp = self.hparams
        z, x = (hp.template_size, hp.template_size), (hp.search_size, hp.search_size)
        return TrackingPairs(
            sources, length, z, x, hp.patch_size, hp.num_templates, hp.num_search, hp.max_gap, train=train, seed=seed
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        val = read_got10k(hp.got10k, "val") if hp.got10k and (Path(hp.got10k) / "val" / "list.txt").is_file() else []
        self.datasets = {}
        if stage in (None, "fit"):
            sources = [
                read_got10k(hp.got10k, "train") if hp.got10k else [],
                read_lasot(hp.lasot, "train") if hp.lasot else [],
                read_trackingnet(hp.trackingnet, hp.trackingnet_subsets) if hp.trackingnet else [],
            ]
            self.datasets["train"] = self._pairs(sources, hp.samples_per_epoch, True, hp.seed)
        self.sequences = {"test": val}
        if val:
            self.datasets["val"] = self._pairs([val], hp.val_samples, True, hp.seed + 1)
            self.datasets["test"] = self._pairs([val], hp.val_samples, False, hp.seed + 2)

    def _loader(self, name: str) -> DataLoader | list:
        from .pairs import EpochIndexSampler

        if name not in self.datasets:
            return []
        dataset = self.datasets[name]
        sampler = EpochIndexSampler(len(dataset)) if name == "train" else None
        hp = self.hparams
        return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        return self._loader("test")


__all__ = [
    "TrackingDataModule",
    "LASOT_TEST",
    "Sequence",
    "check_box",
    "load_frame",
    "make_sequence",
    "read_boxes",
    "read_got10k",
    "read_lasot",
    "read_trackingnet",
]
