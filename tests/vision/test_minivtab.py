"""Mini-VTAB: sizes, stratification, determinism, the counting task's labels, and its held-out glyphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modalpeft.vision import minivtab
from modalpeft.vision.minivtab import _count_images, load_minivtab, stratified_split


@pytest.fixture(scope="module")
def tasks() -> dict[str, minivtab.MiniVTabTask]:
    return {t.name: t for t in load_minivtab(0)}


def test_sizes_groups_and_ranges(tasks) -> None:
    expected = {
        "digits": ("natural", 10, "800/200/797"),
        "faces": ("specialised", 2, "64/16/120"),
        "count": ("structured", 6, "800/200/600"),
    }
    assert list(tasks) == ["digits", "faces", "count"]
    for name, (group, classes, sizes) in expected.items():
        t = tasks[name]
        assert (t.group, t.num_classes, t.sizes()) == (group, classes, sizes)
        for x, y in (t.train, t.val, t.test):
            assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
            assert x.min() >= 0.0 and x.max() <= 1.0
            assert set(y.unique().tolist()) == set(range(classes))  # every class in every split
        assert len(t.train_val[0]) == len(t.train[0]) + len(t.val[0]) <= 1000


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    labels = torch.arange(100) % 4
    g = torch.Generator().manual_seed(0)
    a, b, rest = stratified_split(labels, [40, 20], g)
    assert sorted(torch.cat([a, b, rest]).tolist()) == list(range(100))
    assert labels[a].bincount().tolist() == [10, 10, 10, 10] and labels[b].bincount().tolist() == [5, 5, 5, 5]
    again = stratified_split(labels, [40, 20], torch.Generator().manual_seed(0))
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])
    with pytest.raises(ValueError, match="need 120 examples; there are 100"):
        stratified_split(labels, [100, 20], g)


def test_same_seed_same_task_other_seed_other_split() -> None:
    one, two, other = minivtab.faces_task(0), minivtab.faces_task(0), minivtab.faces_task(1)
    assert torch.equal(one.train[0], two.train[0]) and torch.equal(one.test[1], two.test[1])
    assert not torch.equal(one.train[0], other.train[0])


def test_count_images_hold_that_many_non_overlapping_glyphs() -> None:
    glyphs = torch.ones(3, 8, 8)  # solid squares: the ink adds up to 64 per glyph when none overlap
    counts = torch.tensor([1, 2, 3, 4, 5, 6] * 5)
    images = _count_images(glyphs, counts, np.random.default_rng(0))
    assert images.shape == (30, 1, 28, 28)
    assert torch.equal(images.sum(dim=(1, 2, 3)), 64.0 * counts)


def test_count_task_labels_and_held_out_glyphs(tasks) -> None:
    t = tasks["count"]
    assert t.train[1].bincount().tolist() == [135, 143, 137, 124, 128, 133]  # balanced by construction, then cut
    assert t.test[1].bincount().tolist() == [100] * 6
    # more digits, more ink: the mean ink rises with the label
    ink = [t.test[0][t.test[1] == c].sum(dim=(1, 2, 3)).mean().item() for c in range(6)]
    assert ink == sorted(ink)


def test_head_and_normalised(tasks) -> None:
    t = tasks["digits"].head(5).normalised(0.5, 0.5)
    assert t.sizes() == "5/5/5" and t.train[0].min() >= -1.0 and t.train[0].max() <= 1.0
    assert tasks["digits"].head(None) is tasks["digits"]
    with pytest.raises(ValueError, match="unknown mini-VTAB task"):
        load_minivtab(0, ["cifar"])
