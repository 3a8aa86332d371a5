"""Mini-VTAB: three small offline downstream tasks in the spirit of VTAB-1k (Zhai et al. 2019), one per group.

VTAB-1k adapts a pretrained model to each task from 1,000 labelled images (``train800`` + ``val200``) and tests
on the task's full test set; its 19 tasks fall into three groups. Mini-VTAB keeps that protocol with one task
per group, built from real images that install with pip, sized for the committed Fashion-MNIST ViT
(:func:`modalpeft.vision.backbones.fmnist_vit`: 28 x 28 grey, dark background):

- ``digits`` (*natural*): scikit-learn's 1,797 handwritten digits (8 x 8 scans, 10 classes), upsampled to
  28 x 28; 800 train, 200 validation, the remaining 797 test.
- ``faces`` (*specialised*): scikit-image's ``lfw_subset``, 100 Labelled-Faces-in-the-Wild face crops against
  100 crops of the same photographs' backgrounds (25 x 25 grey, 2 classes); 64 train, 16 validation, 120 test.
  The set is small, as VTAB's specialised tasks often are.
- ``count`` (*structured*, like CLEVR-count): how many handwritten digits (1 to 6, 6 classes) lie on a
  28 x 28 canvas, each an 8 x 8 digit scan placed at a random spot without overlap; 800 train, 200
  validation, 600 test. The digit glyphs for the test images come from scans that no training image uses.

Images are scaled to [0, 1], then normalised with the backbone's mean and std (timm's ``(x - 0.5) / 0.5`` for
the Fashion-MNIST ViT). Every split is stratified (``count``: one label per image by construction, balanced)
and drawn from ``seed``; tasks are deterministic given the seed. Everything is a tensor in memory (the whole
suite is 3 MB), so the demo trains without data loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

IMAGE_SIZE = 28
GROUPS = {"digits": "natural", "faces": "specialised", "count": "structured"}
"""Each task's VTAB group."""


@dataclass
class MiniVTabTask:
    """One task: images ``(N, 1, 28, 28)`` in [0, 1] and integer labels per split."""

    name: str
    group: str
    num_classes: int
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def train_val(self) -> tuple[Tensor, Tensor]:
        """``train800val200``: the training split and the validation split together, for the final runs."""
        return torch.cat([self.train[0], self.val[0]]), torch.cat([self.train[1], self.val[1]])

    def sizes(self) -> str:
        return f"{len(self.train[1])}/{len(self.val[1])}/{len(self.test[1])}"

    def head(self, limit: int | None) -> MiniVTabTask:
        """The same task with at most ``limit`` images per split (all with ``None``), for quick runs."""
        if limit is None:
            return self

        def cut(split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return split[0][:limit], split[1][:limit]

        return MiniVTabTask(self.name, self.group, self.num_classes, cut(self.train), cut(self.val), cut(self.test))

    def normalised(self, mean: float, std: float) -> MiniVTabTask:
        """The same task with every image mapped to ``(x - mean) / std``."""

        def norm(split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return (split[0] - mean) / std, split[1]

        return MiniVTabTask(self.name, self.group, self.num_classes, norm(self.train), norm(self.val), norm(self.test))


def _resize(images: Tensor) -> Tensor:
    """``(N, H, W)`` in [0, 1] to ``(N, 1, 28, 28)``, bilinear with antialiasing (as PIL resizes)."""
    out = F.interpolate(
        images.unsqueeze(1).float(),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return out.clamp_(0.0, 1.0)


def stratified_split(labels: Tensor, sizes: Sequence[int], generator: torch.Generator) -> list[Tensor]:
    """Index sets of ``sizes`` (the rest forms one more set) with each class in proportion to its share."""
    n = len(labels)
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} examples; there are {n}.")
    order = torch.randperm(n, generator=generator)
    # Sort a random permutation by class, then deal the examples out round-robin in proportion: a stable way to
    # stratify without per-class rounding drift.
    order = order[torch.argsort(labels[order], stable=True)]
    ranks = torch.empty(n)
    for c in labels.unique():
        members = (labels[order] == c).nonzero().flatten()
        ranks[members] = (torch.arange(len(members), dtype=torch.float) + 0.5) / len(members)
    dealt = order[torch.argsort(ranks + 1e-6 * torch.rand(n, generator=generator))]
    cuts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    parts = [dealt[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return [*parts, dealt[cuts[-1] :]]


def _digit_scans() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


def digits_task(seed: int = 0) -> MiniVTabTask:
    """scikit-learn's digits: 800 train, 200 validation, 797 test, 10 classes (*natural*)."""
    images, labels = _digit_scans()
    g = torch.Generator().manual_seed(seed)
    train, val, test = stratified_split(labels, [800, 200], g)
    x = _resize(images)
    return MiniVTabTask(
        "digits", GROUPS["digits"], 10, (x[train], labels[train]), (x[val], labels[val]), (x[test], labels[test])
    )


def faces_task(seed: int = 0) -> MiniVTabTask:
    """scikit-image's ``lfw_subset``: faces (1) vs background crops (0); 64 train, 16 validation, 120 test."""
    from skimage.data import lfw_subset

    images = torch.tensor(lfw_subset(), dtype=torch.float32)
    labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(100, dtype=torch.long)])
    g = torch.Generator().manual_seed(seed + 1)
    train, val, test = stratified_split(labels, [64, 16], g)
    x = _resize(images)
    return MiniVTabTask(
        "faces", GROUPS["faces"], 2, (x[train], labels[train]), (x[val], labels[val]), (x[test], labels[test])
    )


def _count_images(glyphs: Tensor, counts: Tensor, rng: np.random.Generator) -> Tensor:
    """One canvas per entry of ``counts`` with that many non-overlapping glyphs (drawn from ``glyphs``)."""
    size = glyphs.shape[-1]
    canvases = torch.zeros(len(counts), IMAGE_SIZE, IMAGE_SIZE)
    span = IMAGE_SIZE - size + 1
    for i, k in enumerate(counts.tolist()):
        placed: list[tuple[int, int]] = []
        tries = 0
        while len(placed) < k:  # rejection sampling; early glyphs can block the last ones: then start over
            r, c = (int(v) for v in rng.integers(span, size=2))
            if all(abs(r - pr) >= size or abs(c - pc) >= size for pr, pc in placed):
                placed.append((r, c))
            tries += 1
            if tries == 100:
                placed, tries = [], 0
        for (r, c), j in zip(placed, rng.integers(len(glyphs), size=k).tolist(), strict=True):
            canvases[i, r : r + size, c : c + size] = glyphs[j]
    return canvases.unsqueeze(1)


def count_task(seed: int = 0, max_count: int = 6) -> MiniVTabTask:
    """Count the digits on a canvas (1..``max_count``): 800 train, 200 validation, 600 test (*structured*).

    The label is ``count - 1``. Training and validation images are drawn from two thirds of the digit scans,
    test images from the other third.
    """
    scans, _ = _digit_scans()
    g = torch.Generator().manual_seed(seed + 2)
    order = torch.randperm(len(scans), generator=g)
    fit_glyphs, test_glyphs = scans[order[: 2 * len(scans) // 3]], scans[order[2 * len(scans) // 3 :]]

    def balanced(n: int) -> Tensor:
        labels = torch.arange(n) % max_count
        return labels[torch.randperm(n, generator=g)]

    y_fit, y_test = balanced(1000), balanced(600)
    rng = np.random.default_rng(seed + 2)
    x_fit = _count_images(fit_glyphs, y_fit + 1, rng)
    x_test = _count_images(test_glyphs, y_test + 1, rng)
    return MiniVTabTask(
        "count", GROUPS["count"], max_count, (x_fit[:800], y_fit[:800]), (x_fit[800:], y_fit[800:]), (x_test, y_test)
    )


TASKS: dict[str, Callable[[int], MiniVTabTask]] = {"digits": digits_task, "faces": faces_task, "count": count_task}


def load_minivtab(seed: int = 0, names: Sequence[str] | None = None) -> list[MiniVTabTask]:
    """The mini-VTAB tasks ``names`` (default: all three, in the order of :data:`TASKS`) built from ``seed``."""
    names = list(TASKS) if names is None else list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown mini-VTAB task(s) {unknown}; choose from {list(TASKS)}.")
    return [TASKS[n](seed) for n in names]


__all__ = [
    "GROUPS",
    "MiniVTabTask",
    "TASKS",
    "count_task",
    "digits_task",
    "faces_task",
    "load_minivtab",
    "stratified_split",
]
