"""Turning image files and arrays into model inputs: channel conversion, resizing, normalisation.

Every vision data module uses :class:`ImageTransform`; its settings come from :func:`resolve_image_config`
(explicit arguments first, then the backbone's timm data config and the input it really takes, then defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
"""File endings (any case) that :class:`ImageFolderDataModule` reads as images; other files are ignored."""

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
ResizeMode = Literal["squash", "shorter_crop"]
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# -- the shared transform -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """How images become model inputs.

    Args:
        size: output ``(height, width)``.
        channels: 1 (grey) or 3 (RGB).
        mean: per-channel mean subtracted after scaling to [0, 1] (``channels`` values).
        std: per-channel standard deviation divided by (``channels`` values).
        interpolation: PIL resampling filter used when an image has another size.
    """

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


def _model_geometry(model: nn.Module) -> tuple[tuple[int, int] | None, int | None]:
    """The input size a model insists on (a patch embedding with a fixed ``img_size``) and its input channels
    (the first ``Conv2d``). timm's pretrained config keeps the checkpoint's 224 even for ``img_size=32``."""
    size = None
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if img_size is not None and hasattr(module, "patch_size") and getattr(module, "strict_img_size", False):
            size = (int(img_size[0]), int(img_size[1])) if isinstance(img_size, Sequence) else (img_size, img_size)
            break
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return size, channels


def _per_channel(name: str, values: Sequence[float], channels: int, inherited: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if inherited and channels == 1:
        return (sum(values) / len(values),)  # RGB statistics (a checkpoint's) for grey inputs
    raise ValueError(f"{name}={list(values)} has {len(values)} values; give 1 or {channels} (one per channel).")


def resolve_image_config(
    model: nn.Module | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    default: ImageConfig | None = None,
) -> ImageConfig:
    """An :class:`ImageConfig` from explicit values, else from ``model``, else from ``default``.

    From a model: ``timm.data.resolve_data_config({}, model=model)`` (input size, mean, std, interpolation of
    its pretrained config), corrected by the input size and channels the model really takes (a ViT built with
    ``img_size=32`` or ``in_chans=1``). Without a model or a default: timm's defaults (224, ImageNet mean/std,
    bicubic).
    """
    if model is not None:
        from timm.data import resolve_data_config

        timm_config = resolve_data_config({}, model=model)
        size, in_chans = _model_geometry(model)
        base = ImageConfig(
            size=size or tuple(timm_config["input_size"][1:]),
            channels=in_chans or timm_config["input_size"][0],
            mean=tuple(timm_config["mean"]),
            std=tuple(timm_config["std"]),
            interpolation=timm_config["interpolation"],
        )
    elif default is not None:
        base = default
    else:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        base = ImageConfig((224, 224), 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise ValueError(f"image_size={image_size!r} must be a positive integer (the side of the square input).")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels={channels!r} must be 1 (grey) or 3 (RGB); None takes the model's.")
    out_channels = channels or base.channels
    if out_channels not in (1, 3):
        raise ValueError(f"the model takes {out_channels}-channel images; set channels to 1 or 3 explicitly.")
    interp = interpolation or base.interpolation
    if interp == "random":  # timm's training-time choice; without augmentation use bicubic, as timm does at eval
        interp = "bicubic"
    if interp not in _RESAMPLE:
        raise ValueError(f"interpolation={interp!r} is not valid; choose one of {sorted(_RESAMPLE)}.")
    return ImageConfig(
        size=(image_size, image_size) if image_size is not None else tuple(base.size),
        channels=out_channels,
        mean=_per_channel("mean", mean if mean is not None else base.mean, out_channels, mean is None),
        std=_per_channel("std", std if std is not None else base.std, out_channels, std is None),
        interpolation=interp,
    )


def convert_image(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as ``"L"`` (1 channel) or ``"RGB"`` (3); alpha is dropped, palettes are expanded."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode == mode:
        return image
    if image.mode == "P":  # a palette may carry transparency: expand it first (PIL warns otherwise)
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L"):  # 16-bit grey (PNG): scale to 8 bits instead of clipping
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float32) / 257.0).astype(np.uint8))
    return image.convert(mode)


class ImageTransform:
    """A PIL image to a normalised ``(C, H, W)`` float tensor, as :class:`ImageConfig` says.

    Args:
        config: size, channels, mean, std and interpolation.
        resize: ``"squash"`` resizes straight to ``size`` (VPT's VTAB pipeline, ``tf.image.resize``);
            ``"shorter_crop"`` resizes the shorter side then centre-crops (SSF's ``--direct-resize``). Both are
            the same for square images.

    Shapes:
        - output: ``(channels, height, width)``, float32.
    """

    def __init__(self, config: ImageConfig, resize: ResizeMode = "squash") -> None:
        if resize not in ("squash", "shorter_crop"):
            raise ValueError(f"resize={resize!r} is not valid; choose 'squash' or 'shorter_crop'.")
        self.config = config
        self.resize = resize
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(-1, 1, 1)

    def _resized(self, image: Image.Image) -> Image.Image:
        height, width = self.config.size
        if image.size == (width, height):
            return image
        resample = _RESAMPLE[self.config.interpolation]
        if self.resize == "squash":
            return image.resize((width, height), resample)
        scale = max(height / image.height, width / image.width)
        scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(scaled, resample)
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        return image.crop((left, top, left + width, top + height))

    def __call__(self, image: Image.Image) -> Tensor:
        image = self._resized(convert_image(image, self.config.channels))
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
        tensor = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)
        return (tensor - self.mean) / self.std

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, resize={self.resize!r})"


def load_image(path: str | Path) -> Image.Image:
    """Decode the image at ``path`` fully (so a truncated file fails here, naming the file)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}. Replace or remove the file (or its list entry).") from err


class ImageListDataset(Dataset):
    """``(image, label)`` pairs from image files.

    Args:
        samples: ``(path, label)`` pairs.
        transform: applied to each decoded PIL image.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


class ArrayImageDataset(Dataset):
    """``(image, label)`` pairs from a ``(N, H, W)`` or ``(N, H, W, C)`` uint8 array (Fashion-MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Tensor]) -> None:
        assert len(images) == len(labels), (images.shape, labels.shape)
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def folder_listing(folder: Path, limit: int = 20) -> str:
    if not folder.is_dir():
        return f"{folder} does not exist either"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"{folder} holds: {shown or 'nothing'}"
