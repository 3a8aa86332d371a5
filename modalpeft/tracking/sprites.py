"""Offline tracking sequences with exact boxes: real object images moving over real photographs.

No tracking data set can be downloaded here, so the embedded demo (:mod:`modalpeft.tracking.demo`) builds its own
from real images that install with the project's packages:

- *targets and distractors*: Fashion-MNIST items (Debian's ``dataset-fashion-mnist``; the item's pixels are its
  alpha, tinted with a random colour) or LFW faces (``skimage.data.lfw_subset()``, an elliptical alpha). Every
  sequence has a target of one kind and ``1..max_distractors`` distractors of the same kind, so the tracker must
  follow *this* object, not the most salient one;
- *backgrounds*: scikit-image photographs (astronaut, coffee, a cat, coins, ...), a random window of which pans
  slowly across the frames (camera motion);
- *motion*: each object's centre follows a smooth random walk that bounces off the borders; its size breathes by
  up to ±``scale_change`` (sinusoidally, with a random period) with a random aspect ratio;
- *occlusion*: distractors drawn above the target, and, in half of the sequences, an occluding band cut from
  another photograph across the target's path.

Boxes are exact: the tight ``x, y, w, h`` box of the target's alpha (``>= 0.5``) in each frame, whether covered or
not (as LaSOT annotates the full extent). A frame is *visible* when some target pixel is not covered; the covered
fraction is kept (``cover``, in [0, 1]). Training and test sequences draw their targets from disjoint images (the
Fashion-MNIST training items, which the committed ViT saw, vs its test items; LFW faces split by identity) and their
backgrounds from disjoint photographs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .data import Sequence, make_sequence

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` installs the idx files."""

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "rocket", "stereo_motorcycle", "camera", "brick", "grass", "immunohistochemistry"),
    "test": ("chelsea", "coins", "gravel", "hubble_deep_field"),
}
"""The ``skimage.data`` photographs behind training and test sequences (disjoint)."""

Kind = Literal["fashion", "face"]


@dataclass
class SpriteSettings:
    """How sequences are drawn (frame size ``(height, width)`` in pixels; sizes in pixels of the sprite's side)."""

    frame_size: tuple[int, int] = (120, 160)
    num_frames: int = 40
    min_size: float = 18.0
    max_size: float = 34.0
    scale_change: float = 0.35
    max_speed: float = 3.0
    max_distractors: int = 2
    occluder_probability: float = 0.5


class SpriteBank:
    """The object images of one split: Fashion-MNIST items (``(N, 28, 28)`` uint8) and LFW faces (``(M, 25, 25)``
    float in [0, 1])."""

    def __init__(self, split: Literal["train", "test"], fashion_root: str | Path = FASHION_MNIST_ROOT) -> None:
        from skimage.data import lfw_subset

        from ..vision.idx import read_fashion_mnist

        images, _ = read_fashion_mnist(fashion_root, "train" if split == "train" else "t10k")
        self.fashion = images[:5000]
        faces = lfw_subset()[:100]  # the first 100 are the faces, one identity each
        self.faces = faces[:70] if split == "train" else faces[70:]

    def sprite(self, kind: Kind, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random object of ``kind``: its grey image and alpha, both float ``(h, w)`` in [0, 1]."""
        if kind == "fashion":
            image = self.fashion[int(rng.integers(len(self.fashion)))].astype(np.float32) / 255.0
            return image, np.clip(image * 4.0, 0.0, 1.0)
        face = self.faces[int(rng.integers(len(self.faces)))].astype(np.float32)
        h, w = face.shape
        ys, xs = np.mgrid[0:h, 0:w]
        r = ((xs + 0.5 - w / 2) / (0.46 * w)) ** 2 + ((ys + 0.5 - h / 2) / (0.5 * h)) ** 2
        return face, np.clip((1.0 - r) * 6.0, 0.0, 1.0)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float ``(h, w)`` or uint8 ``(h, w, 3)`` image to ``size = (height, width)``."""
    from PIL import Image

    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(size[::-1], Image.BILINEAR))


def _path(rng: np.random.Generator, n: int, size: tuple[int, int], s: SpriteSettings) -> np.ndarray:
    """``(n, 2)`` centres (x, y): a smooth random walk bouncing off a margin inside the frame."""
    h, w = size
    lo, hi = np.array([s.max_size * 0.6, s.max_size * 0.6]), np.array([w, h]) - s.max_size * 0.6
    p = rng.uniform(lo, hi)
    v = rng.normal(0, s.max_speed / 2, 2)
    out = np.empty((n, 2))
    for t in range(n):
        out[t] = p
        v = np.clip(v + rng.normal(0, s.max_speed / 6, 2), -s.max_speed, s.max_speed)
        p = p + v
        for axis in range(2):
            if p[axis] < lo[axis] or p[axis] > hi[axis]:
                v[axis] = -v[axis]
                p[axis] = np.clip(p[axis], lo[axis], hi[axis])
    return out


def _sizes(rng: np.random.Generator, n: int, s: SpriteSettings) -> np.ndarray:
    """``(n, 2)`` sprite sizes (w, h): a base size, an aspect ratio, a sinusoidal breathing."""
    base = rng.uniform(s.min_size, s.max_size)
    aspect = np.exp(rng.uniform(-0.2, 0.2))
    amplitude = rng.uniform(0, s.scale_change)
    period, phase = rng.uniform(20, 60), rng.uniform(0, 2 * np.pi)
    scale = base * (1 + amplitude * np.sin(2 * np.pi * np.arange(n) / period + phase))
    return np.stack([scale * aspect, scale / aspect], axis=1)


class _Object:
    """One sprite's image, colour, path and sizes over the sequence."""

    def __init__(self, bank: SpriteBank, kind: Kind, rng: np.random.Generator, n: int, settings: SpriteSettings):
        self.image, self.alpha = bank.sprite(kind, rng)
        self.colour = rng.uniform(0.35, 1.0, 3).astype(np.float32)
        self.centres = _path(rng, n, settings.frame_size, settings)
        self.sizes = _sizes(rng, n, settings)

    def place(self, t: int, frame_size: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """The sprite at frame ``t``: the frame region it covers, its colour ``(h, w, 3)`` and alpha ``(h, w)``
        there (clipped to the frame)."""
        h, w = frame_size
        sw, sh = (max(2, int(round(v))) for v in self.sizes[t])
        x0, y0 = (int(round(c - d / 2)) for c, d in zip(self.centres[t], (sw, sh), strict=True))
        ys, xs = slice(max(y0, 0), min(y0 + sh, h)), slice(max(x0, 0), min(x0 + sw, w))
        inside = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
        image, alpha = _resize(self.image, (sh, sw))[inside], _resize(self.alpha, (sh, sw))[inside]
        return (ys, xs), image[..., None] * self.colour, alpha


def _blend(frame: np.ndarray, placed: tuple[tuple[slice, slice], np.ndarray, np.ndarray]) -> None:
    region, colour, alpha = placed
    frame[region] = frame[region] * (1 - alpha[..., None]) + colour * alpha[..., None]


def _tight_box(alpha: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        return np.zeros(4)
    return np.array([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], dtype=np.float64)


def make_sprite_sequence(
    name: str, bank: SpriteBank, backgrounds: list[np.ndarray], rng: np.random.Generator, settings: SpriteSettings
) -> tuple[Sequence, np.ndarray]:
    """One sequence (frames as ``(H, W, 3)`` uint8 arrays in memory) and its per-frame covered fraction."""
    h, w = settings.frame_size
    n = settings.num_frames
    kind: Kind = "fashion" if rng.random() < 0.5 else "face"
    target = _Object(bank, kind, rng, n, settings)
    others = [_Object(bank, kind, rng, n, settings) for _ in range(int(rng.integers(1, settings.max_distractors + 1)))]
    above = [bool(rng.random() < 0.5) for _ in others]
    # the background: a window of a photograph, panning by up to 16 pixels over the sequence
    photo = backgrounds[int(rng.integers(len(backgrounds)))]
    zoom = rng.uniform(1.0, 1.6) * max((h + 32) / photo.shape[0], (w + 32) / photo.shape[1])
    canvas = _resize(photo, (int(np.ceil(photo.shape[0] * zoom)), int(np.ceil(photo.shape[1] * zoom))))
    start = rng.uniform(16, [canvas.shape[1] - w - 16, canvas.shape[0] - h - 16])
    pan = rng.uniform(-16, 16, 2)
    occluder = None
    if rng.random() < settings.occluder_probability:
        other = backgrounds[int(rng.integers(len(backgrounds)))]
        t_mid = n // 2
        cx, cy = target.centres[t_mid]
        thickness = int(rng.integers(6, 12))
        patch = _resize(other, (h, w)).astype(np.float32) / 255.0
        mask = np.zeros((h, w), np.float32)
        if rng.random() < 0.5:
            mask[:, max(0, int(cx) - thickness // 2) : int(cx) + thickness - thickness // 2] = 1.0
        else:
            mask[max(0, int(cy) - thickness // 2) : int(cy) + thickness - thickness // 2, :] = 1.0
        occluder = (patch, mask)
    frames, boxes, cover = [], [], []
    for t in range(n):
        ox, oy = (start + pan * t / max(n - 1, 1)).round().astype(int)
        frame = canvas[oy : oy + h, ox : ox + w].astype(np.float32) / 255.0
        placed = [o.place(t, (h, w)) for o in others]
        for p, on_top in zip(placed, above, strict=True):
            if not on_top:
                _blend(frame, p)
        mine = target.place(t, (h, w))
        _blend(frame, mine)
        alpha = np.zeros((h, w), np.float32)
        alpha[mine[0]] = mine[2]
        covering = np.zeros((h, w), np.float32)
        for p, on_top in zip(placed, above, strict=True):
            if on_top:
                _blend(frame, p)
                covering[p[0]] = np.maximum(covering[p[0]], p[2])
        if occluder is not None:
            frame = frame * (1 - occluder[1][..., None]) + occluder[0] * occluder[1][..., None]
            covering = np.maximum(covering, occluder[1])
        solid = alpha >= 0.5
        covered = float((covering[solid] >= 0.5).mean()) if solid.any() else 1.0
        frames.append((frame.clip(0, 1) * 255).round().astype(np.uint8))
        boxes.append(_tight_box(alpha))
        cover.append(covered)
    boxes_array, cover_array = np.stack(boxes), np.asarray(cover)
    visible = (cover_array < 1.0) & (boxes_array[:, 2] > 0)
    return make_sequence(name, frames, boxes_array, visible, Path(f"<sprites>/{name}")), cover_array


def sprite_sequences(
    split: Literal["train", "test"],
    count: int,
    settings: SpriteSettings,
    seed: int = 0,
    fashion_root: str | Path = FASHION_MNIST_ROOT,
    first: int = 0,
) -> tuple[list[Sequence], list[np.ndarray]]:
    """Sequences ``first .. first + count - 1`` of ``split`` (disjoint object images and photographs between
    splits), sequence ``i`` drawn from ``numpy.random.default_rng((seed, split, i))``; also each sequence's covered
    fractions."""
    bank = SpriteBank(split, fashion_root)
    backgrounds = [_photo(name) for name in BACKGROUNDS[split]]
    sequences, covers = [], []
    for i in range(first, first + count):
        rng = np.random.default_rng((seed, 0 if split == "train" else 1, i))
        sequence, cover = make_sprite_sequence(f"{split}-{i:03d}", bank, backgrounds, rng, settings)
        sequences.append(sequence)
        covers.append(cover)
    return sequences, covers


__all__ = [
    "BACKGROUNDS",
    "FASHION_MNIST_ROOT",
    "SpriteBank",
    "SpriteSettings",
    "make_sprite_sequence",
    "sprite_sequences",
]
