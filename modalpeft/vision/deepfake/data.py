"""Data for deepfake detection: face frames grouped by video, in real/fake folder layouts or made offline.

Batches are ``(images, labels, video_ids)``: images ``(B, C, H, W)``, labels 0 (real) / 1 (fake), and the index of
each frame's video in its split's :attr:`FrameDataset.videos` (the metrics average frame probabilities per video).

Layouts (:func:`find_videos`), every video a folder of frames (face crops: detect and crop faces beforehand, as
the paper does with DeepfakeBench's preprocessing):

- ``"ffpp"``, FaceForensics++ as its download and frame-extraction scripts lay it out::

      root/original_sequences/youtube/<c23>/<frames|images>/<video>/<frame>
      root/manipulated_sequences/<method>/<c23>/<frames|images>/<video>/<frame>

  (the compression level and the ``frames``/``images`` level are optional); ``methods`` picks the manipulations
  (default: Deepfakes, Face2Face, FaceSwap, NeuralTextures, the paper's training set). FF++'s official split files
  (``train.json``/``val.json``/``test.json``, lists of id pairs) are read from ``split_dir``.
- ``"real_fake"``: ``root/<source>/<video>/<frame>``, where a source whose name contains ``real`` (``real/``,
  ``Celeb-real/``, ``YouTube-real/``) holds real videos and every other source fake ones (``fake/``,
  ``Celeb-synthesis/``): the plain ``real/`` ``fake/`` layout, and the layout of the official code's datasets.

Cross-dataset evaluation trains on ``root`` and tests on ``test_root`` (e.g. FF++ then Celeb-DF-v2).

Training augmentation is the official recipe's (:func:`train_augmentation`), applied to the PIL frame before the
model's preprocessing (resize of the shorter side, centre crop, normalisation: CLIP's processor for CLIP).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ...lightning.data import EpochSeededSampler
from ..transforms import IMAGE_EXTENSIONS, ImageConfig, ImageTransform, Interpolation, folder_listing, load_image

Layout = Literal["auto", "ffpp", "real_fake"]

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
"""The four FF++ manipulations the paper trains on (FaceShifter and DeepFakeDetection exist too)."""

FFPP_COMPRESSIONS = ("raw", "c23", "c40")
FFPP_FRAME_DIRS = ("frames", "images")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

CLIP_IMAGE_CONFIG = ImageConfig(
    (224, 224), 3, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
)
"""What CLIP's processor does (shorter side to 224, bicubic, centre crop, OpenAI CLIP mean/std), the default
when neither explicit values nor a model are there."""


@dataclass
class Video:
    """One video: a unique ``name`` (``<source>/<video>``), its ``label`` (0 real, 1 fake, -1 unknown), the
    ``group`` it shares a split with (the target identity: FF++'s ``000_003`` belongs with ``000``), and its
    ``frames`` (paths, or PIL images decoded from a video file)."""

    name: str
    label: int
    frames: list[Any]
    group: str = ""


# -- finding videos ---------------------------------------------------------------------------------------------


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def frame_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, in sorted order (other files and hidden ones are ignored)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _video_folder(folder: Path, source: str, label: int) -> Video:
    frames = frame_files(folder)
    if not frames:
        raise ValueError(
            f"video folder {str(folder)!r} holds no frames ({folder_listing(folder)}); frames must be image files "
            f"({', '.join(IMAGE_EXTENSIONS)}). Remove the empty folder or extract its frames."
        )
    return Video(f"{source}/{folder.name}", label, frames, group=folder.name.split("_")[0])


def _videos_in(folder: Path, source: str, label: int) -> list[Video]:
    videos = [_video_folder(v, source, label) for v in _subdirs(folder)]
    if not videos:
        raise ValueError(
            f"{str(folder)!r} holds no video folders ({folder_listing(folder)}); expected <video>/<frame> folders."
        )
    return videos


def detect_layout(root: Path) -> Literal["ffpp", "real_fake"]:
    """``"ffpp"`` when ``root`` has ``original_sequences`` and ``manipulated_sequences``, else ``"real_fake"``."""
    names = {p.name for p in _subdirs(root)}
    return "ffpp" if {"original_sequences", "manipulated_sequences"} <= names else "real_fake"


def _ffpp_leaf(folder: Path, compression: str | None) -> Path:
    """Descend from an FF++ method/subset folder through the optional compression and frames levels."""
    levels = [p.name for p in _subdirs(folder)]
    present = [c for c in FFPP_COMPRESSIONS if c in levels]
    if present:
        if compression is None:
            if len(present) > 1:
                raise ValueError(
                    f"{str(folder)!r} has several compression levels {present}; choose one with compression=..."
                )
            compression = present[0]
        if compression not in present:
            raise ValueError(f"{str(folder)!r} has no {compression!r} folder; it has {present}.")
        folder = folder / compression
        levels = [p.name for p in _subdirs(folder)]
    frames_dir = next((d for d in FFPP_FRAME_DIRS if d in levels), None)
    return folder / frames_dir if frames_dir else folder


def find_videos(
    root: str | Path,
    layout: Layout = "auto",
    methods: Sequence[str] | None = None,
    compression: str | None = None,
    real_subsets: Sequence[str] = ("youtube",),
) -> list[Video]:
    """Every video under ``root`` (see the module docstring for the layouts).

    Args:
        root: the data set folder.
        layout: ``"ffpp"``, ``"real_fake"`` or ``"auto"`` (:func:`detect_layout`).
        methods: FF++ manipulations to include (default :data:`FFPP_METHODS`); for ``"real_fake"``, the fake
            source folders to include (default: all).
        compression: FF++ compression folder (``c23``); ``None``: the only one present.
        real_subsets: FF++ ``original_sequences`` sub-folders holding real videos.

    Raises:
        ValueError: for a missing folder, a video folder without frames, a missing method, or a root holding
            only one class.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"deepfake data root {str(root)!r} is not a folder ({folder_listing(root.parent)}).")
    if layout not in ("auto", "ffpp", "real_fake"):
        raise ValueError(f"layout={layout!r} is not valid; choose 'auto', 'ffpp' or 'real_fake'.")
    layout = detect_layout(root) if layout == "auto" else layout
    videos: list[Video] = []
    if layout == "ffpp":
        for subset in real_subsets:
            folder = root / "original_sequences" / subset
            if not folder.is_dir():
                raise ValueError(f"FF++ real videos {str(folder)!r} not found ({folder_listing(folder.parent)}).")
            videos += _videos_in(_ffpp_leaf(folder, compression), subset, 0)
        present = [p.name for p in _subdirs(root / "manipulated_sequences")]
        for method in methods or FFPP_METHODS:
            if method not in present:
                raise ValueError(
                    f"FF++ method {method!r} not found under {root / 'manipulated_sequences'}; it has {present}."
                )
            videos += _videos_in(_ffpp_leaf(root / "manipulated_sequences" / method, compression), method, 1)
    else:
        sources = _subdirs(root)
        if not sources:
            raise ValueError(
                f"{str(root)!r} holds no source folders ({folder_listing(root)}); expected real/ and fake/."
            )
        fakes = [s.name for s in sources if "real" not in s.name.lower()]
        for method in methods or []:
            if method not in fakes:
                raise ValueError(f"fake source {method!r} not found under {str(root)!r}; fake sources: {fakes}.")
        for source in sources:
            label = 0 if "real" in source.name.lower() else 1
            if label == 1 and methods and source.name not in methods:
                continue
            videos += _videos_in(source, source.name, label)
    check_both_classes(videos, str(root))
    return videos


def check_both_classes(videos: Sequence[Video], where: str) -> None:
    """Raise a ``ValueError`` unless ``videos`` hold real and fake videos."""
    labels = {v.label for v in videos}
    if labels != {0, 1}:
        only = "real" if labels == {0} else "fake" if labels == {1} else "no"
        raise ValueError(
            f"{where} holds only {only} videos ({len(videos)}); training and evaluating a deepfake detector needs both "
            "real and fake videos (real sources are folders whose name contains 'real', e.g. real/ and fake/)."
        )


def read_ffpp_split(path: str | Path) -> set[str]:
    """The video names an FF++ split file (a JSON list of ``[a, b]`` id pairs) covers: ``a``, ``b``, ``a_b``,
    ``b_a``."""
    pairs = json.loads(Path(path).read_text())
    names: set[str] = set()
    for a, b in pairs:
        names |= {a, b, f"{a}_{b}", f"{b}_{a}"}
    return names


def sample_frames(frames: list[Any], count: int | None) -> list[Any]:
    """``count`` evenly spaced frames (all when ``count`` is ``None`` or there are fewer)."""
    if count is None or len(frames) <= count:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]


# -- datasets and transforms ------------------------------------------------------------------------------------


def train_augmentation() -> Callable[[Image.Image], Image.Image]:
    """The official training augmentation on PIL images (``src/dataset/base.py``): horizontal flip (p 0.5),
    affine (±10°, translate 0.1, scale 0.9-1.1), Gaussian blur (sigma 0.1-2), brightness/contrast jitter 0.1, JPEG
    quality 40-100. The blur kernel is ``(3, 7)`` as in the official code: torchvision reads that as a fixed 3-wide,
    7-high kernel, not a range of sizes."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
            v2.GaussianBlur(kernel_size=(3, 7), sigma=(0.1, 2.0)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
            v2.JPEG([40, 100]),
        ]
    )


class FrameDataset(Dataset):
    """The frames of ``videos`` as ``(image, label, video index)``.

    Args:
        videos: the videos; a frame is a path (decoded here: a corrupt file raises a ``ValueError`` naming it), a
            PIL image, or a ``(H, W)``/``(H, W, C)`` uint8 array.
        transform: PIL image -> ``(C, H, W)`` tensor.
        augment: applied to the PIL image before ``transform`` (training only).
    """

    def __init__(
        self,
        videos: Sequence[Video],
        transform: Callable[[Image.Image], Tensor],
        augment: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.videos = list(videos)
        self.transform = transform
        self.augment = augment
        self.index = [(v, f) for v, video in enumerate(self.videos) for f in range(len(video.frames))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        v, f = self.index[i]
        video = self.videos[v]
        frame = video.frames[f]
        if isinstance(frame, (str, Path)):
            image = load_image(frame)
        elif isinstance(frame, np.ndarray):
            image = Image.fromarray(frame)
        else:
            image = frame
        if self.augment is not None:
            image = self.augment(image)
        return self.transform(image), video.label, v


# -- data modules -----------------------------------------------------------------------------------------------


class VideoFramesDataModule(pl.LightningDataModule):
    """The base of the deepfake data modules: image settings, transforms and loaders.

    Subclasses implement :meth:`split_videos` (the videos of ``"train"``, ``"val"``, ``"test"``, ``"predict"``).

    Args:
        image_size: side of the square input; ``None``: the model's (224 for CLIP ViT-L/14).
        channels: 1 or 3; ``None``: the model's.
        mean, std: normalisation; ``None``: the model's (CLIP's for CLIP encoders).
        interpolation: resize filter; ``None``: the model's (bicubic).
        augment: apply :func:`train_augmentation` to training frames.
        batch_size: frames per batch.
        num_workers: DataLoader workers.
        seed: fixes the training order and any split drawn.
        backbone: the model whose input settings to use outside a ``Trainer``; under a ``Trainer`` the task's
            model is used.
    """

    def __init__(
        self,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        augment: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels={channels!r} must be 1, 3 or None (the model's).")
        self.backbone = backbone
        self.datasets: dict[str, FrameDataset] = {}

    def split_videos(self, split: str) -> list[Video] | None:
        raise NotImplementedError

    def image_config(self) -> ImageConfig:
        """Explicit arguments, else the model's ``image_config()`` (:class:`DeepfakeModel`), else
        :data:`CLIP_IMAGE_CONFIG`."""
        model = self.backbone
        if model is None and self.trainer is not None:
            model = getattr(self.trainer.lightning_module, "model", None)
        base = CLIP_IMAGE_CONFIG
        get = getattr(model, "image_config", None) if model is not None else None
        if callable(get):
            base = ImageConfig(**get())
        hp = self.hparams
        channels = hp.get("channels") or base.channels

        def per_channel(values: Sequence[float] | None, default: tuple[float, ...]) -> tuple[float, ...]:
            values = tuple(default if values is None else values)
            if len(values) == channels:
                return values
            if len(values) == 1:
                return values * channels
            if channels == 1:
                return (sum(values) / len(values),)
            raise ValueError(f"mean/std {list(values)} must have 1 or {channels} values.")

        size = hp.get("image_size")
        return ImageConfig(
            size=(size, size) if size else tuple(base.size),
            channels=channels,
            mean=per_channel(hp.get("mean"), base.mean),
            std=per_channel(hp.get("std"), base.std),
            interpolation=hp.get("interpolation") or base.interpolation,
        )

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        if stage is not None and stage not in splits:
            raise ValueError(f"stage={stage!r} is not valid; choose one of {sorted(splits)} or None.")
        transform = ImageTransform(self.image_config(), resize="shorter_crop")
        for split in splits[stage] if stage else ("train", "val", "test"):
            videos = self.split_videos(split)
            if videos is None:
                continue
            augment = train_augmentation() if split == "train" and self.hparams.augment else None
            self.datasets[split] = FrameDataset(videos, transform, augment)

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split!r} data: call setup() for the stage that uses it first.")
        dataset = self.datasets[split]
        hp = self.hparams
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=EpochSeededSampler(len(dataset), hp.seed) if shuffle else None,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class FrameFolderDataModule(VideoFramesDataModule):
    """Frame folders of real and fake videos (FF++ or ``real/`` ``fake/`` layouts; see the module docstring).

    Args:
        root: the training data set.
        val_root: a validation data set (any layout); ``None``: ``split_dir``'s ``val.json``, else ``val_fraction``
            of ``root``'s videos, drawn by identity group (a fake ``000_003`` goes with the real ``000``).
        test_root: the test data set (cross-dataset evaluation: FF++ to Celeb-DF, ...); ``None``: ``split_dir``'s
            ``test.json`` on ``root``.
        predict_path: for ``predict``: a video file (decoded with PyAV), a folder of frames (one video), or a folder
            of frame folders and/or video files (one video each).
        layout: ``"auto"``, ``"ffpp"`` or ``"real_fake"`` (for every root).
        methods: the manipulations to train on (FF++ method or fake source folder names; ``None``: FF++'s four, or
            every fake source).
        test_methods: the manipulations to test on (``None``: as ``methods``).
        compression: FF++ compression level (``c23``); ``None``: the only one there.
        split_dir: a folder with FF++'s ``train.json``, ``val.json``, ``test.json``.
        val_fraction: the share of identity groups held out for validation when neither ``val_root`` nor
            ``split_dir`` is given (0: no validation).
        frames_per_video: evenly spaced frames used per video (``None``: all; the official data has 32).
        predict_frames: frames decoded per video file in ``predict``.
        image_size, channels, mean, std, interpolation, augment, batch_size, num_workers, seed, backbone: as
            :class:`VideoFramesDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        predict_path: str | None = None,
        layout: Layout = "auto",
        methods: list[str] | None = None,
        test_methods: list[str] | None = None,
        compression: str | None = None,
        split_dir: str | None = None,
        val_fraction: float = 0.1,
        frames_per_video: int | None = 32,
        predict_frames: int = 32,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        interpolation: Interpolation | None = None,
        augment: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(
            image_size, channels, mean, std, interpolation, augment, batch_size, num_workers, seed, backbone
        )
        self.save_hyperparameters(ignore=["backbone"])
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
        if frames_per_video is not None and frames_per_video < 1:
            raise ValueError(f"frames_per_video={frames_per_video} must be positive or None (all frames).")
        if layout not in ("auto", "ffpp", "real_fake"):
            raise ValueError(f"layout={layout!r} is not valid; choose 'auto', 'ffpp' or 'real_fake'.")
        self._root_videos: list[Video] | None = None

    def _find(self, root: str, methods: list[str] | None) -> list[Video]:
        hp = self.hparams
        videos = find_videos(root, hp.layout, methods, hp.compression)
        for v in videos:
            v.frames = sample_frames(v.frames, hp.frames_per_video)
        return videos

    def _root(self) -> list[Video]:
        if self.hparams.root is None:
            raise ValueError("FrameFolderDataModule: set root (--data.init_args.root=...) to train or evaluate on it.")
        if self._root_videos is None:
            self._root_videos = self._find(self.hparams.root, self.hparams.methods)
        return self._root_videos

    def _held_out_groups(self, videos: list[Video]) -> set[str]:
        groups = sorted({v.group for v in videos})
        count = round(self.hparams.val_fraction * len(groups))
        if self.hparams.val_fraction > 0:
            count = min(max(count, 1), len(groups) - 1)
        order = np.random.default_rng(self.hparams.seed).permutation(len(groups))
        return {groups[i] for i in order[:count]}

    def _from_split_file(self, videos: list[Video], name: str) -> list[Video]:
        path = Path(self.hparams.split_dir) / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"split file {str(path)!r} not found ({folder_listing(path.parent)}).")
        keep = read_ffpp_split(path)
        chosen = [v for v in videos if v.name.rsplit("/", 1)[-1] in keep]
        check_both_classes(chosen, f"{self.hparams.root} restricted to {path.name}")
        return chosen

    def split_videos(self, split: str) -> list[Video] | None:
        hp = self.hparams
        if split == "predict":
            if hp.predict_path is None:
                raise ValueError("predict needs an input: set --data.init_args.predict_path to a video file or folder.")
            return predict_videos(hp.predict_path, hp.predict_frames, hp.frames_per_video)
        if split == "test":
            if hp.test_root is not None:
                return self._find(hp.test_root, hp.test_methods or hp.methods)
            if hp.split_dir is not None:
                videos = self._root() if hp.test_methods is None else self._find(hp.root, hp.test_methods)
                return self._from_split_file(videos, "test")
            raise ValueError("test needs test data: set test_root (cross-dataset) or split_dir (FF++'s test.json).")
        if split == "val":
            if hp.val_root is not None:
                return self._find(hp.val_root, hp.test_methods or hp.methods)
            if hp.split_dir is not None:
                return self._from_split_file(self._root(), "val")
            if hp.val_fraction == 0:
                return None
            held = self._held_out_groups(self._root())
            return [v for v in self._root() if v.group in held]
        if hp.split_dir is not None:
            return self._from_split_file(self._root(), "train")
        if hp.val_root is None and hp.val_fraction > 0:
            held = self._held_out_groups(self._root())
            train = [v for v in self._root() if v.group not in held]
            check_both_classes(train, f"{hp.root} without its validation videos")
            return train
        return self._root()


def predict_videos(path: str | Path, frames_per_file: int = 32, frames_per_folder: int | None = None) -> list[Video]:
    """The videos to score: a video file, a folder of frames, or a folder of frame folders / video files."""
    from .predict import decode_video

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(f"{str(path)!r} is not a video file ({', '.join(VIDEO_EXTENSIONS)}) nor a folder.")
        return [Video(path.stem, -1, decode_video(path, frames_per_file))]
    if not path.is_dir():
        raise ValueError(f"predict_path {str(path)!r} does not exist ({folder_listing(path.parent)}).")
    if frame_files(path):
        return [Video(path.name, -1, sample_frames(frame_files(path), frames_per_folder))]
    videos = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            videos.append(
                Video(entry.name, -1, sample_frames(_video_folder(entry, path.name, -1).frames, frames_per_folder))
            )
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(Video(entry.stem, -1, decode_video(entry, frames_per_file)))
    if not videos:
        raise ValueError(
            f"{str(path)!r} holds no frames, frame folders or video files ({folder_listing(path)}); give a video "
            "file, a folder of frames, or a folder of those."
        )
    return videos


class LFWSplicedDataModule(VideoFramesDataModule):
    """The offline embedded default: real LFW faces and partial manipulations of them, as pseudo-videos.

    The 100 faces of ``skimage.data.lfw_subset()`` are split by face into train/val/test (``split`` counts,
    seeded). For every face and each of ``videos_per_face`` repetitions the split gets one real video (the face)
    and one fake video (the face with a region spliced from another face of the same split, see
    :class:`~modalpeft.vision.deepfake.manipulate.Splice`); the regions cycle through ``train_regions`` (train and
    val) or ``test_regions`` (test; default: the same). Every video is ``frames_per_video`` frames of small random
    motion, brightness and noise (:func:`~modalpeft.vision.deepfake.manipulate.pseudo_video`), rendered at
    ``image_size`` (the manipulation is made ``work_scale`` times larger first). All of it is deterministic given
    ``seed``.

    Args:
        train_regions: regions manipulated in training and validation videos.
        test_regions: regions manipulated in test videos (different ones: a generalisation check).
        split: numbers of faces for train, val and test (at most 100 in all).
        videos_per_face: real/fake video pairs per face.
        frames_per_video: frames per pseudo-video.
        image_size: output side (28: the project's Fashion-MNIST ViT).
        work_scale: upscaling factor of the faces before manipulation.
        render_scale, feather, colour_match: passed to :class:`~modalpeft.vision.deepfake.manipulate.Splice`.
        channels, mean, std, augment, batch_size, num_workers, seed, backbone: as :class:`VideoFramesDataModule`
            (``augment`` is off by default: the pseudo-videos carry their own jitter).
    """

    def __init__(
        self,
        train_regions: list[str] | None = None,
        test_regions: list[str] | None = None,
        split: tuple[int, int, int] = (60, 10, 30),
        videos_per_face: int = 2,
        frames_per_video: int = 6,
        image_size: int = 28,
        work_scale: int = 4,
        render_scale: float = 0.35,
        feather: float = 0.25,
        colour_match: bool = True,
        channels: int | None = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        augment: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__(image_size, channels, mean, std, None, augment, batch_size, num_workers, seed, backbone)
        self.save_hyperparameters(ignore=["backbone"])
        from .manipulate import REGIONS, Splice

        for name, regions in (("train_regions", train_regions), ("test_regions", test_regions)):
            bad = [r for r in regions or [] if r not in REGIONS]
            if bad or (regions is not None and not regions):
                raise ValueError(f"{name}={regions!r}: choose a non-empty list from {sorted(REGIONS)}.")
        if len(split) != 3 or min(split) < 2 or sum(split) > 100:
            raise ValueError(f"split={split!r} must be three face counts of at least 2 each, at most 100 in all.")
        Splice(feather=feather, render_scale=render_scale)  # validates them
        self._cache: dict[str, list[Video]] = {}

    def split_videos(self, split: str) -> list[Video] | None:
        if split == "predict":
            split = "test"
        if split not in self._cache:
            self._cache[split] = self._make(split)
        return self._cache[split]

    def _make(self, split: str) -> list[Video]:
        from .manipulate import REGIONS, Splice, lfw_faces, pseudo_video, resize

        hp = self.hparams
        faces = lfw_faces()
        order = np.random.default_rng(hp.seed).permutation(len(faces))
        n_train, n_val, n_test = hp.split
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, sum(hp.split))}
        chosen = order[slice(*bounds[split])]
        regions = list((hp.test_regions if split == "test" else None) or hp.train_regions or sorted(REGIONS))
        size = faces.shape[1] * hp.work_scale
        large = {int(i): resize(faces[i], size, "bicubic") for i in chosen}
        offset = {"train": 0, "val": 1, "test": 2}[split]
        videos = []
        for k, face in enumerate(chosen):
            for r in range(hp.videos_per_face):
                rng = np.random.default_rng([hp.seed, offset, int(face), r])
                real = pseudo_video(large[int(face)], hp.frames_per_video, hp.image_size, rng)
                donor = int(chosen[(k + 1 + rng.integers(len(chosen) - 1)) % len(chosen)])
                region = regions[(k + r) % len(regions)]
                splice = Splice(
                    region=region, feather=hp.feather, render_scale=hp.render_scale, colour_match=hp.colour_match
                )
                fake_face = splice(large[int(face)], large[donor], rng)
                fake = pseudo_video(fake_face, hp.frames_per_video, hp.image_size, rng)
                group = f"face{int(face)}"
                videos.append(Video(f"real/face{int(face)}_{r}", 0, list(real), group))
                videos.append(Video(f"fake/{region}/face{int(face)}_{donor}_{r}", 1, list(fake), group))
        return videos


def stack_split(dataset: FrameDataset) -> tuple[Tensor, Tensor, Tensor]:
    """A whole (small) split as tensors ``(images, labels, video_ids)``, for loops without a DataLoader."""
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([v for _, _, v in items]),
    )


__all__ = [
    "CLIP_IMAGE_CONFIG",
    "FFPP_METHODS",
    "FrameDataset",
    "FrameFolderDataModule",
    "LFWSplicedDataModule",
    "Video",
    "VideoFramesDataModule",
    "check_both_classes",
    "detect_layout",
    "find_videos",
    "frame_files",
    "predict_videos",
    "read_ffpp_split",
    "sample_frames",
    "train_augmentation",
]
