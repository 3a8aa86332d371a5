"""SPMTrack's training samples: templates and search frames drawn from annotated sequences, cropped and augmented as
the official ``siamese_tracker_train`` pipeline (:mod:`modalpeft.tracking.transforms`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .data import Sequence, check_box
from .inference import as_frame
from .losses import template_mask
from .transforms import augment, box_in_crop, crop, crop_params, normalize, sample_frame_indices


class EpochIndexSampler(Sampler[int]):
    """Indices ``e·n .. e·n + n - 1`` in epoch ``e`` (Lightning calls ``set_epoch``): :class:`TrackingPairs` decodes
    the epoch from them, so every epoch draws new samples, in worker processes too, and a resumed run the same."""

    def __init__(self, length: int) -> None:
        self.length, self.epoch = length, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch * self.length, (self.epoch + 1) * self.length))

    def __len__(self) -> int:
        return self.length


class TrackingPairs(Dataset):
    """SPMTrack training samples drawn from one or more lists of sequences (equal weight per list).

    Each item: ``templates (T, 3, Hz, Wz)``, ``template_masks (T, hz, wz)``, ``searches (S, 3, Hx, Wx)`` (ImageNet
    normalised) and ``boxes (S, 4)`` (``x1, y1, x2, y2`` normalised to the search crop). Item ``i`` of epoch ``e``
    is drawn from ``numpy.random.default_rng((seed, e, i))``, so runs repeat; index ``e·length + i`` asks for it
    directly (:class:`EpochIndexSampler`), a plain index ``i < length`` uses :meth:`set_epoch`'s epoch.

    Args:
        sources: lists of sequences (one per data set).
        length: samples per epoch (official: 131,072).
        template_size, search_size: crop sizes (``(height, width)``; SPMTrack-B 196 and 378).
        patch_size: the backbone's patch size (the template masks are on its token grid).
        num_templates, num_search: 3 and 2 officially.
        max_gap: template gap (200); search frames within ``2 · max_gap`` of the templates (400).
        train: jitter and augment (the official validation set does too; ``False`` gives plain crops).
        seed: base seed.
        search_factor, template_factor: SiamFC area factors of the crops (official: 5 and 2; give a
            :class:`~modalpeft.tracking.inference.Tracker` the same).
    """

    def __init__(
        self,
        sources: list[list[Sequence]],
        length: int,
        template_size: tuple[int, int] = (196, 196),
        search_size: tuple[int, int] = (378, 378),
        patch_size: int = 14,
        num_templates: int = 3,
        num_search: int = 2,
        max_gap: int = 200,
        train: bool = True,
        seed: int = 0,
        search_factor: float = 5.0,
        template_factor: float = 2.0,
    ) -> None:
        self.sources = [s for s in sources if s]
        if not self.sources:
            raise ValueError("no sequences to sample from: give at least one data set folder with sequences.")
        for name, size in (("template_size", template_size), ("search_size", search_size)):
            if size[0] % patch_size or size[1] % patch_size:
                raise ValueError(
                    f"{name}={tuple(size)} is not divisible by patch_size={patch_size}; use a multiple of it "
                    "(SPMTrack-B: 196 and 378 with patch 14)."
                )
        self.length, self.template_size, self.search_size = length, tuple(template_size), tuple(search_size)
        self.feat_size = (template_size[0] // patch_size, template_size[1] // patch_size)
        self.num_templates, self.num_search, self.max_gap = num_templates, num_search, max_gap
        self.train, self.seed, self.epoch = train, seed, 0
        self.search_factor, self.template_factor = search_factor, template_factor

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        epoch, index = divmod(int(index), self.length) if index >= self.length else (self.epoch, int(index))
        rng = np.random.default_rng((self.seed, epoch, index))
        for _ in range(100):
            source = self.sources[int(rng.integers(len(self.sources)))]
            sequence = source[int(rng.integers(len(source)))]
            n = min(len(sequence), len(sequence.boxes))
            picked = sample_frame_indices(
                sequence.visible[:n], rng, self.num_templates, self.num_search, self.max_gap, 2 * self.max_gap
            )
            if picked is not None:
                return self._sample(sequence, *picked, rng)
        raise ValueError("no sequence has enough visible frames for a sample: check the visibility labels.")

    def _load(self, sequence: Sequence, i: int) -> Tensor:
        frame = as_frame(sequence.frames[i])  # a file, or a frame held in memory (the embedded demo's sequences)
        check_box(sequence.boxes[i], tuple(frame.shape[-2:]), f"{sequence.annotation}, line {i + 1}")
        return frame

    def _sample(self, sequence: Sequence, z_idx: list[int], x_idx: list[int], rng: np.random.Generator) -> dict:
        images, boxes = [], []
        for i in z_idx:
            scale, shift = crop_params(sequence.boxes[i], self.template_factor, self.template_size)
            images.append(crop(self._load(sequence, i), scale, shift, self.template_size))
            boxes.append(box_in_crop(sequence.boxes[i], scale, shift, self.template_size))
        for i in x_idx:
            jitter = dict(rng=rng, scale_jitter=0.25, translation_jitter=3.0, min_object_size=10) if self.train else {}
            scale, shift = crop_params(sequence.boxes[i], self.search_factor, self.search_size, **jitter)
            images.append(crop(self._load(sequence, i), scale, shift, self.search_size))
            boxes.append(box_in_crop(sequence.boxes[i], scale, shift, self.search_size))
        if self.train:
            images, boxes = augment(images, boxes, rng)
        t = self.num_templates
        z_boxes = torch.as_tensor(np.stack(boxes[:t]), dtype=torch.float32)
        x_boxes = torch.as_tensor(np.stack(boxes[t:]), dtype=torch.float32)
        hx, wx = self.search_size
        return {
            "templates": torch.stack([normalize(im) for im in images[:t]]),
            "template_masks": template_mask(z_boxes, self.template_size, self.feat_size),
            "searches": torch.stack([normalize(im) for im in images[t:]]),
            "boxes": x_boxes / torch.tensor([wx, hx, wx, hx], dtype=torch.float32),
        }


__all__ = ["EpochIndexSampler", "TrackingPairs"]
