"""SPMTrack's training-pair sampling, SiamFC crops and augmentations (``trackit`` at c581fe27, METHODS.md §7f).

- :func:`sample_frame_indices`: the official ``interval`` sampling (``siamese_training_pair_sampling/_algos.py``):
  a base template frame among the visible ones, ``T - 1`` more templates within ``max_gap`` (200) of it, then
  ``S`` search frames within ``max_interval`` (400) before the first template or after the last (a fair coin when
  both sides have enough frames), all indices sorted ascending or descending (a fair coin), the first ``T`` being the
  templates. When neither side has ``S`` frames the gap grows by 5, at most 20 times.
- :func:`crop_params` / :func:`crop`: the SiamFC crop (``core/utils/siamfc_cropping.py``): scale
  ``s = sqrt(W·H / ((w + (f-1)(w+h)/2) · (h + (f-1)(w+h)/2)))`` with area factor ``f`` (template 2, search region 5),
  the box centre mapped to the crop centre; training jitter: each axis's scale divided by ``exp(N(0,1) · 0.25)``,
  the translation moved by ``U(-1, 1) · 3 · (w·s_x + h·s_y) / 2``; a jitter that puts the box outside the crop or
  makes it smaller than 10 pixels is drawn again (up to 10 retries, then the plain crop). Outside the frame the crop
  is filled with the frame's mean colour; bilinear, ``align_corners=False``.
- :func:`augment`: per image (not joint) horizontal flip (p 0.5) and colour jitter (brightness, contrast, saturation
  0.4, in random order); jointly over a sample DeiT-III's three-augment: one of grey scale, solarisation or Gaussian
  blur (radius ``U(0.1, 2)``) on every crop. The official blur is PIL's; here torchvision's, with ``sigma = radius``.

Boxes are ``x, y, w, h`` in frame pixels (0-based, continuous: pixel ``i`` covers ``[i, i+1)``) in files and
sequences, ``x1, y1, x2, y2`` inside crops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_frame_indices(
    visible: np.ndarray,
    rng: np.random.Generator,
    num_templates: int = 3,
    num_search: int = 2,
    max_gap: int = 200,
    max_interval: int = 400,
) -> tuple[list[int], list[int]] | None:
    """Template and search frame indices of one training sample, or ``None`` when the sequence has too few visible
    frames (the official sampler then tries another sequence)."""
    length = len(visible)
    candidates = np.flatnonzero(visible)
    if len(candidates) == 0:
        return None
    if length == 1:
        return [0] * num_templates, [0] * num_search
    gap = max_gap
    for _ in range(20):
        base = int(rng.choice(candidates))
        near = candidates[(candidates >= base - gap) & (candidates <= base + gap) & (candidates != base)]
        if len(near) < num_templates:  # the official check (it then draws the others with replacement)
            gap += 5
            continue
        templates = sorted([*rng.choice(near, size=num_templates - 1).tolist(), base])
        left = candidates[(candidates < templates[0]) & (candidates >= templates[0] - max_interval)]
        right = candidates[(candidates > templates[-1]) & (candidates <= templates[-1] + max_interval)]
        if len(left) < num_search and len(right) < num_search:
            gap += 5
            continue
        if len(left) < num_search:
            side = right
        elif len(right) < num_search:
            side = left
        else:
            side = left if rng.random() < 0.5 else right
        indices = sorted([*templates, *rng.choice(side, size=num_search).tolist()], reverse=bool(rng.random() < 0.5))
        return indices[:num_templates], indices[num_templates:]
    return None


def crop_params(
    box: np.ndarray,
    area_factor: float,
    output_size: tuple[int, int],
    rng: np.random.Generator | None = None,
    scale_jitter: float = 0.0,
    translation_jitter: float = 0.0,
    min_object_size: float = 0.0,
    retries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """The SiamFC crop of ``box`` (``x, y, w, h``): per-axis ``scale`` and ``translation`` with
    ``crop = frame · scale + translation`` (``output_size`` is ``(height, width)``)."""
    out_wh = np.array(output_size[::-1], dtype=np.float64)
    wh = np.asarray(box[2:], dtype=np.float64)
    context = wh + (area_factor - 1) * wh.sum() * 0.5
    scale = np.repeat(np.sqrt(out_wh.prod() / context.prod()), 2)
    centre = np.asarray(box[:2], dtype=np.float64) + wh / 2
    translation = out_wh / 2 - centre * scale
    if rng is None or (scale_jitter == 0 and translation_jitter == 0):
        return scale, translation
    for _ in range(retries + 1):
        s = scale / np.exp(rng.standard_normal(2) * scale_jitter)
        t = out_wh / 2 - centre * s
        t = t + rng.uniform(-1, 1, size=2) * (wh * s).sum() * 0.5 * translation_jitter
        x1y1 = np.clip(np.asarray(box[:2]) * s + t, 0, out_wh)
        x2y2 = np.clip((np.asarray(box[:2]) + wh) * s + t, 0, out_wh)
        if np.all(x2y2 - x1y1 >= max(min_object_size, 1e-6)):
            return s, t
    return scale, translation


def crop(
    image: Tensor,
    scale: np.ndarray,
    translation: np.ndarray,
    output_size: tuple[int, int],
    fill: Tensor | None = None,
) -> Tensor:
    """Resample ``image`` ``(3, H, W)`` (float) into the crop ``frame · scale + translation`` of ``output_size``
    ``(height, width)``, bilinear; pixels outside the frame take ``fill`` (``(3, 1, 1)``; default: the frame's mean
    colour, as the official crop; the official search crop passes the first frame's mean)."""
    h, w = image.shape[-2:]
    out_h, out_w = output_size
    mean = image.mean(dim=(-2, -1), keepdim=True) if fill is None else fill.reshape(-1, 1, 1).to(image)
    xs = ((torch.arange(out_w, dtype=torch.float64) + 0.5) - translation[0]) / scale[0]
    ys = ((torch.arange(out_h, dtype=torch.float64) + 0.5) - translation[1]) / scale[1]
    grid_y, grid_x = torch.meshgrid(2 * ys / h - 1, 2 * xs / w - 1, indexing="ij")
    grid = torch.stack((grid_x, grid_y), dim=-1).to(image.dtype)[None]
    out = F.grid_sample((image - mean)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + mean


def box_in_crop(
    box: np.ndarray, scale: np.ndarray, translation: np.ndarray, output_size: tuple[int, int]
) -> np.ndarray:
    """``box`` (``x, y, w, h`` in the frame) as ``x1, y1, x2, y2`` in the crop, clipped to it."""
    x1y1 = np.asarray(box[:2], dtype=np.float64) * scale + translation
    x2y2 = (np.asarray(box[:2], dtype=np.float64) + np.asarray(box[2:])) * scale + translation
    limit = np.array(output_size[::-1], dtype=np.float64)
    return np.concatenate([np.clip(x1y1, 0, limit), np.clip(x2y2, 0, limit)])


def box_from_crop(box: np.ndarray, scale: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """``x1, y1, x2, y2`` in the crop back to ``x, y, w, h`` in the frame."""
    x1y1 = (np.asarray(box[:2]) - translation) / scale
    x2y2 = (np.asarray(box[2:]) - translation) / scale
    return np.concatenate([x1y1, x2y2 - x1y1])


def _color_jitter(image: Tensor, rng: np.random.Generator, strength: float = 0.4) -> Tensor:
    import torchvision.transforms.functional as TF

    factors = {name: float(rng.uniform(max(0.0, 1 - strength), 1 + strength)) for name in ("b", "c", "s")}
    for index in rng.permutation(4):  # the official order draw over brightness, contrast, saturation, hue (hue off)
        if index == 0:
            image = TF.adjust_brightness(image, factors["b"])
        elif index == 1:
            image = TF.adjust_contrast(image, factors["c"])
        elif index == 2:
            image = TF.adjust_saturation(image, factors["s"])
    return image


def augment(images: list[Tensor], boxes: list[np.ndarray], rng: np.random.Generator) -> tuple[list, list]:
    """The official training augmentations on crops in ``[0, 1]`` (see the module docstring); boxes follow flips."""
    import torchvision.transforms.functional as TF

    out_images, out_boxes = [], []
    for image, box in zip(images, boxes, strict=True):
        if rng.random() < 0.5:
            image = image.flip(-1)
            w = image.shape[-1]
            box = np.array([w - box[2], box[1], w - box[0], box[3]])
        out_images.append(_color_jitter(image, rng).clamp(0, 1))
        out_boxes.append(box)
    choice = int(rng.choice(3))
    if choice == 0:
        out_images = [TF.rgb_to_grayscale(img, num_output_channels=3) for img in out_images]
    elif choice == 1:
        out_images = [TF.solarize(img, 128 / 255) for img in out_images]
    else:
        sigma = float(rng.uniform(0.1, 2.0))
        size = 2 * int(np.ceil(3 * sigma)) + 1
        out_images = [TF.gaussian_blur(img, [size, size], [sigma, sigma]) for img in out_images]
    return out_images, out_boxes


def normalize(image: Tensor) -> Tensor:
    """ImageNet mean/std normalisation (SPMTrack's ``normalization: imagenet``) of a ``(3, H, W)`` crop in [0, 1]."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "augment",
    "box_from_crop",
    "box_in_crop",
    "crop",
    "crop_params",
    "normalize",
    "sample_frame_indices",
]
