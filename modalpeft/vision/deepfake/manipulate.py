"""Offline partial face manipulations: a face region spliced from another face, and pseudo-videos.

No deepfake data set is available offline, so the embedded demo makes its own fakes from real faces
(scikit-image's ``data.lfw_subset()``: 100 aligned 25 x 25 grey LFW faces). A manipulation imitates what a
face-swap or reenactment pipeline leaves behind in one region (eyes, nose or mouth):

1. the face is upscaled ``work_scale`` times (bicubic) so that the edit happens at a finer scale than the output;
2. the region of a *donor* face is taken, re-rendered at a lower resolution (a generator's output is smoother than
   a camera frame: ``render_scale``), and its intensities are matched to the target region's mean and standard
   deviation (colour matching; the faces are grey);
3. it is alpha-blended into the target with a feathered mask (a box whose edges ramp smoothly over
   ``feather`` of its size), at a box jittered per video.

A pseudo-video is several frames of one (real or manipulated) face, each with its own small random affine motion,
brightness change and sensor noise, downsampled to the output size. Everything is deterministic given the seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

Region = Literal["eyes", "nose", "mouth"]

REGIONS: dict[str, tuple[float, float, float, float]] = {
    "eyes": (0.24, 0.12, 0.48, 0.88),
    "nose": (0.38, 0.34, 0.66, 0.66),
    "mouth": (0.62, 0.24, 0.88, 0.76),
}
"""Region boxes ``(top, left, bottom, right)`` as fractions of the aligned LFW face crop (read off the 25 x 25
faces of ``lfw_subset``)."""


def lfw_faces() -> np.ndarray:
    """The 100 faces of ``skimage.data.lfw_subset()`` (the first 100 of its 200 images; the rest are non-faces),
    ``(100, 25, 25)`` float32 in [0, 1]. Needs scikit-image (ships the images; nothing is downloaded)."""
    try:
        from skimage.data import lfw_subset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the offline deepfake demo reads faces from scikit-image's data.lfw_subset(); pip install scikit-image"
        ) from err
    return lfw_subset()[:100].astype(np.float32)


def resize(image: np.ndarray, size: int | tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """A float ``(H, W)`` image resized with PIL (``"bicubic"``, ``"bilinear"`` or ``"box"``)."""
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX}
    height, width = (size, size) if isinstance(size, int) else size
    out = Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), filters[resample])
    return np.asarray(out, dtype=np.float32)


def feathered_mask(shape: tuple[int, int], box: tuple[int, int, int, int], feather: float) -> np.ndarray:
    """A ``shape`` mask that is 1 inside ``box`` (``top, left, bottom, right`` in pixels) away from its edges and
    ramps to 0 at them (a raised cosine over ``feather`` of the box's height/width on each side)."""
    top, left, bottom, right = box

    def ramp(n: int, start: int, stop: int) -> np.ndarray:
        axis = np.zeros(n, dtype=np.float32)
        width = max(1, round(feather * (stop - start)))
        pos = np.arange(start, stop, dtype=np.float32)
        dist = np.minimum(pos - start + 0.5, stop - pos - 0.5)
        axis[start:stop] = np.where(dist >= width, 1.0, 0.5 - 0.5 * np.cos(np.pi * np.clip(dist / width, 0, 1)))
        return axis

    return ramp(shape[0], top, bottom)[:, None] * ramp(shape[1], left, right)[None, :]


@dataclass(frozen=True)
class Splice:
    """One region manipulation (see the module docstring).

    Args:
        region: ``"eyes"``, ``"nose"`` or ``"mouth"`` (:data:`REGIONS`).
        feather: the blending ramp, as a fraction of the box size on each side.
        render_scale: the donor region is re-rendered at this fraction of its resolution (1: not at all).
        colour_match: match the donor region's mean and std to the target region's.
        jitter: random shift and size change of the box, as a fraction of the face size.
    """

    region: Region = "eyes"
    feather: float = 0.25
    render_scale: float = 0.35
    colour_match: bool = True
    jitter: float = 0.03

    def __post_init__(self) -> None:
        if self.region not in REGIONS:
            raise ValueError(f"region={self.region!r} is not valid; choose one of {sorted(REGIONS)}.")
        if not 0 < self.render_scale <= 1:
            raise ValueError(f"render_scale={self.render_scale} must be in (0, 1].")
        if not 0 <= self.feather <= 0.5:
            raise ValueError(f"feather={self.feather} must be in [0, 0.5].")

    def box(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The region's pixel box in an image of ``shape``, jittered by ``rng``."""
        h, w = shape
        top, left, bottom, right = REGIONS[self.region]
        dy, dx, grow = rng.uniform(-self.jitter, self.jitter, size=3)
        top, bottom = top + dy - grow / 2, bottom + dy + grow / 2
        left, right = left + dx - grow / 2, right + dx + grow / 2
        box = (round(top * h), round(left * w), round(bottom * h), round(right * w))
        return (max(0, box[0]), max(0, box[1]), min(h, box[2]), min(w, box[3]))

    def __call__(self, target: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``target`` with the region of ``donor`` blended in; both ``(H, W)`` float images of one size."""
        if target.shape != donor.shape:
            raise ValueError(f"target {target.shape} and donor {donor.shape} must have the same shape")
        top, left, bottom, right = box = self.box(target.shape, rng)
        patch = donor[top:bottom, left:right]
        if self.render_scale < 1:
            small = (
                max(2, round(patch.shape[0] * self.render_scale)),
                max(2, round(patch.shape[1] * self.render_scale)),
            )
            patch = resize(resize(patch, small, "box"), patch.shape, "bilinear")
        if self.colour_match:
            region = target[top:bottom, left:right]
            patch = (patch - patch.mean()) / (patch.std() + 1e-6) * region.std() + region.mean()
        pasted = target.copy()
        pasted[top:bottom, left:right] = patch
        alpha = feathered_mask(target.shape, box, self.feather)
        return np.clip(alpha * pasted + (1 - alpha) * target, 0.0, 1.0)


def pseudo_video(
    image: np.ndarray,
    num_frames: int,
    out_size: int,
    rng: np.random.Generator,
    max_rotation: float = 4.0,
    max_shift: float = 0.03,
    max_zoom: float = 0.04,
    brightness: float = 0.08,
    noise: float = 0.015,
) -> np.ndarray:
    """``num_frames`` frames of one face (an ``(H, W)`` float image in [0, 1]): per frame, a random rotation
    (degrees), shift (fraction of the size) and zoom, a brightness factor ``1 ± brightness``, then a box
    downsample to ``out_size`` and Gaussian noise of std ``noise``. Returns ``(num_frames, out_size, out_size)``
    uint8."""
    h, w = image.shape
    frames = []
    base = Image.fromarray(image.astype(np.float32), mode="F")
    fill = float(image.mean())
    for _ in range(num_frames):
        angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
        tx, ty = rng.uniform(-max_shift, max_shift, size=2) * (w, h)
        zoom = 1 + rng.uniform(-max_zoom, max_zoom)
        # output pixel p takes input pixel centre + R(angle) (p - centre) / zoom - shift
        a, b = np.cos(angle) / zoom, np.sin(angle) / zoom
        cx, cy = w / 2, h / 2
        matrix = (a, b, cx - a * cx - b * cy - tx, -b, a, cy + b * cx - a * cy - ty)
        moved = base.transform((w, h), Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=fill)
        frame = np.asarray(moved, dtype=np.float32) * (1 + rng.uniform(-brightness, brightness))
        frame = resize(frame, out_size, "box") + rng.normal(0, noise, size=(out_size, out_size))
        frames.append(np.clip(np.round(frame * 255), 0, 255).astype(np.uint8))
    return np.stack(frames)


__all__ = ["REGIONS", "Region", "Splice", "feathered_mask", "lfw_faces", "pseudo_video", "resize"]
