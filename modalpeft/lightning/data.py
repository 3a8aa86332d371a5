"""Data helpers shared by every modality, and the embedded example data (scikit-learn's digits)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset


def index_batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """``steps`` index batches over ``n`` examples, epoch after epoch in seeded random order (for plain training
    loops on in-memory tensors, such as the demos')."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


class EpochSeededSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from a checkpoint sees the same
    order as an uninterrupted one (a plain ``shuffle=True`` draws from the global RNG, which a resumed run
    does not restore).
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 real handwritten digits (8x8, offline), in a VTAB-1k-like low-data split.

    ``train_per_class`` images per class train; the rest is split, stratified and fixed by ``seed``, into
    validation and test halves. Images are scaled to [0, 1], normalised with mean = std = 0.5, resized
    (bilinear) to ``image_size`` and repeated to ``channels``.

    Args:
        classes: which digits to use; labels are their positions in this list.
        train_per_class: training images per class.
        image_size: output side length.
        channels: 1 (grey) or 3.
        batch_size: batch size of every loader.
        seed: fixes the split and the training order.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        train_per_class: int = 50,
        image_size: int = 8,
        channels: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(range(10)) if classes is None else list(classes)
        bad = [c for c in self.classes if c not in range(10)]
        if bad or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes={classes!r} must be distinct digits 0-9")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} must be 1 or 3")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        rng = np.random.default_rng(self.hparams.seed)
        splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for label in self.classes:
            idx = rng.permutation(np.flatnonzero(digits.target == label))
            n = self.hparams.train_per_class
            if n >= len(idx):
                raise ValueError(f"train_per_class={n} leaves no evaluation data for digit {label} ({len(idx)} images)")
            rest = idx[n:]
            splits["train"].extend(idx[:n])
            splits["val"].extend(rest[: len(rest) // 2])
            splits["test"].extend(rest[len(rest) // 2 :])
        lookup = {c: i for i, c in enumerate(self.classes)}
        self.datasets = {}
        for name, idx in splits.items():
            idx = np.sort(np.asarray(idx))
            images = torch.as_tensor(digits.images[idx], dtype=torch.float32)[:, None] / 16.0
            images = (images - 0.5) / 0.5
            if self.hparams.image_size != 8:
                images = F.interpolate(images, size=self.hparams.image_size, mode="bilinear", align_corners=False)
            images = images.repeat(1, self.hparams.channels, 1, 1)
            labels = torch.as_tensor([lookup[t] for t in digits.target[idx]])
            self.datasets[name] = TensorDataset(images, labels)

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[name]
        sampler = EpochSeededSampler(len(dataset), self.hparams.seed) if train else None
        return DataLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
