"""Frame-by-frame tracking with a trained one-stream tracker: SPMTrack's evaluation pipeline (``one_stream`` at
c581fe27, METHODS.md §7b).

For each sequence, frame 0 gives the first template (area factor 2 around the given box). At frame ``t``:

- the search region is the SiamFC crop (area factor 5) around the last box (widened to at least 10 x 10 pixels);
  outside the frame it is filled with the first frame's mean colour;
- the templates are taken from the memory, which holds a template crop (area factor 2) around the predicted box of
  every frame so far: with ``m < T`` memory frames ``[0, 1, .., m-1, m-1, ..]``; after that frame 0 and one frame
  from the middle of each of ``T - 1`` equal segments of ``[0, t)`` (``dur = t // (T-1)``, ``i·dur + dur // 2``; for
  T = 3: ``{0, dur//2, dur + dur//2}`` with ``dur = t // 2``); ``memory="thirds"`` gives ``{0, t//3, 2t//3}`` (the
  official choice for LaSOT with the 378-pixel model). Each template's token types come from its box;
- the temporal query of the sequence's previous frame is carried (zero at the first tracked frame);
- the box is the Hann-window post-processing's (:func:`~modalpeft.tracking.losses.select_box`), mapped back to the
  frame and clipped to it; it becomes the next search centre only when it is valid and inside the frame.

:meth:`Tracker.track_batch` runs several sequences in parallel, one batched forward per frame index. The memory
keeps every frame's template crop, as the official pipeline does (0.46 MB per frame at 196 px).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .data import check_box, load_frame
from .losses import select_box, template_mask
from .models import OneStreamTracker
from .transforms import box_from_crop, box_in_crop, crop, crop_params, normalize

Frame = Tensor | np.ndarray | str | Path
"""A frame: a ``(3, H, W)`` float tensor in [0, 1], an ``(H, W, 3)`` uint8 array, or an image file."""


def as_frame(frame: Frame) -> Tensor:
    """A frame as a ``(3, H, W)`` float tensor in [0, 1]."""
    if isinstance(frame, (str, Path)):
        return load_frame(Path(frame))
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame array of shape {frame.shape}: give (H, W, 3) RGB uint8.")
        return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 255.0
    if isinstance(frame, Tensor) and frame.ndim == 3 and frame.shape[0] == 3:
        return frame.float()
    raise TypeError(f"a frame of type {type(frame).__name__}: give a (3, H, W) tensor, an (H, W, 3) array or a path.")


def _xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    return np.concatenate([box[:2], box[2:] - box[:2]])


@dataclass
class _State:
    """One sequence being tracked."""

    mean: Tensor
    box: np.ndarray  # x, y, w, h of the search centre
    memory: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    query: Tensor | None = None
    boxes: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)


class Tracker:
    """SPMTrack's inference on a :class:`OneStreamTracker` (plain, adapted with ``mp.adapt`` or a peft model).

    Args:
        model: the trained tracker (any module that contains a :class:`OneStreamTracker`).
        window_penalty: Hann-window weight of the box selection (0.45).
        search_factor, template_factor: SiamFC area factors (5 and 2).
        min_object_size: the search crop treats smaller boxes as this wide/high (10 pixels).
        memory: ``"segments"`` (the default rule) or ``"thirds"`` (LaSOT with the 378-pixel model).
        max_scale_change: ``None`` (official) or ``m > 1``: a predicted box's width and height change by at most a
            factor ``m`` from the previous frame's (its centre kept). Not in SPMTrack; SiamFC-style trackers limit
            scale steps this way. A briefly trained tracker that overestimates a size once otherwise searches a
            larger region next frame, sees a smaller target, and can spiral out to the whole frame.
        device: where the model runs (default: where its parameters are).
    """

    def __init__(
        self,
        model: nn.Module,
        window_penalty: float = 0.45,
        search_factor: float = 5.0,
        template_factor: float = 2.0,
        min_object_size: float = 10.0,
        memory: Literal["segments", "thirds"] = "segments",
        max_scale_change: float | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        core = next((m for m in model.modules() if isinstance(m, OneStreamTracker)), None)
        if core is None:
            raise TypeError(f"model {type(model).__name__} holds no OneStreamTracker; give the trained tracker.")
        if memory not in ("segments", "thirds"):
            raise ValueError(f"memory={memory!r}: choose 'segments' or 'thirds'.")
        self.model, self.core = model.eval(), core
        self.window_penalty, self.search_factor, self.template_factor = window_penalty, search_factor, template_factor
        if max_scale_change is not None and not max_scale_change > 1:
            raise ValueError(f"max_scale_change={max_scale_change!r} must be None or a factor > 1 (e.g. 1.1).")
        self.min_object_size, self.memory, self.max_scale_change = min_object_size, memory, max_scale_change
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    # -- templates -------------------------------------------------------------------------------------
    def _template(self, frame: Tensor, box: np.ndarray) -> tuple[Tensor, Tensor]:
        size = self.core.template_size
        scale, shift = crop_params(box, self.template_factor, size)
        z = normalize(crop(frame, scale, shift, size).clamp(0, 1))
        inside = torch.as_tensor(box_in_crop(box, scale, shift, size), dtype=torch.float32)
        return z, template_mask(inside, size, self.core.z_size)

    def memory_indices(self, t: int) -> list[int]:
        """Memory frames used as templates at frame ``t`` (the memory holds frames ``0 .. t-1``)."""
        count = self.core.num_templates
        if t <= count or count == 1:
            return [min(i, t - 1) for i in range(count)]
        if self.memory == "thirds" and count == 3:
            return [0, t // 3, 2 * t // 3]
        dur = t // (count - 1)
        return [0, *(i * dur + dur // 2 for i in range(count - 1))]

    # -- tracking ---------------------------------------------------------------------------------------
    def track(self, frames: Iterable[Frame], init_box: Sequence[float]) -> np.ndarray:
        """Boxes ``(N, 4)`` (``x, y, w, h`` in frame pixels) of one sequence; row 0 is ``init_box``."""
        return self.track_batch([frames], [init_box])[0]

    @torch.no_grad()
    def track_batch(
        self, sequences: Sequence[Iterable[Frame]], init_boxes: Sequence[Sequence[float]], with_scores: bool = False
    ) -> list[np.ndarray] | list[tuple[np.ndarray, np.ndarray]]:
        """Track several sequences at once (one batched forward per frame index); ``with_scores`` also returns each
        frame's confidence (1.0 for frame 0). Each frame's wall time (of the whole batched step) is kept in
        ``self.last_times`` (one array per sequence), for the GOT-10k time files."""
        if len(sequences) != len(init_boxes):
            raise ValueError(f"{len(sequences)} sequences but {len(init_boxes)} initial boxes: give one box each.")
        iterators: list[Iterator[Frame]] = [iter(s) for s in sequences]
        states: list[_State | None] = []
        for i, (frames, box) in enumerate(zip(iterators, init_boxes, strict=True)):
            first = next(frames, None)
            if first is None:
                raise ValueError(f"sequence {i} has no frames.")
            frame = as_frame(first)
            box = np.asarray(box, dtype=np.float64).reshape(-1)
            if box.shape != (4,):
                raise ValueError(f"init box {list(box)} of sequence {i}: give x, y, w, h (four numbers).")
            check_box(box, tuple(frame.shape[-2:]), f"init box of sequence {i}")
            start = time.perf_counter()
            state = _State(mean=frame.mean(dim=(-2, -1), keepdim=True), box=box, boxes=[box], scores=[1.0])
            z, mask = self._template(frame, box)
            state.memory.append(z)
            state.masks.append(mask)
            state.times.append(time.perf_counter() - start)
            states.append(state)
        active = list(range(len(states)))
        while active:
            frames = {i: next(iterators[i], None) for i in active}
            active = [i for i in active if frames[i] is not None]
            if active:
                start = time.perf_counter()
                self._step([states[i] for i in active], [as_frame(frames[i]) for i in active])
                for i in active:  # a batched step: each sequence's frame took the step's time
                    states[i].times.append(time.perf_counter() - start)
        self.last_times = [np.asarray(s.times) for s in states]
        if with_scores:
            return [(np.stack(s.boxes), np.asarray(s.scores)) for s in states]
        return [np.stack(s.boxes) for s in states]

    def _step(self, states: list[_State], frames: list[Tensor]) -> None:
        core, size = self.core, self.core.search_size
        searches, params = [], []
        for state, frame in zip(states, frames, strict=True):
            box = state.box.copy()
            grow = np.maximum(box[2:], self.min_object_size) - box[2:]
            box[:2], box[2:] = box[:2] - grow / 2, box[2:] + grow
            scale, shift = crop_params(box, self.search_factor, size)
            searches.append(normalize(crop(frame, scale, shift, size, fill=state.mean).clamp(0, 1)))
            params.append((scale, shift))
        z = torch.stack([torch.stack([s.memory[j] for j in self.memory_indices(len(s.memory))]) for s in states])
        masks = torch.stack([torch.stack([s.masks[j] for j in self.memory_indices(len(s.memory))]) for s in states])
        queries = torch.stack([s.query if s.query is not None else torch.zeros(1, core.embed_dim) for s in states])
        device = self.device
        z_tokens = core.template_tokens(z.to(device), masks.to(device))
        output, query = core.track_step(z_tokens, torch.stack(searches).to(device), queries.to(device))
        boxes, scores = select_box(output, self.window_penalty)
        pixels = boxes.cpu().double().numpy() * np.array([size[1], size[0], size[1], size[0]])
        for state, frame, (scale, shift), px, score, q in zip(
            states, frames, params, pixels, scores.tolist(), query.cpu(), strict=True
        ):
            h, w = frame.shape[-2:]
            xywh = box_from_crop(px, scale, shift)
            if self.max_scale_change is not None:
                m, centre = self.max_scale_change, xywh[:2] + xywh[2:] / 2
                xywh[2:] = np.clip(xywh[2:], state.box[2:] / m, state.box[2:] * m)
                xywh[:2] = centre - xywh[2:] / 2
            x1y1 = np.clip(xywh[:2], 0, [w, h])
            x2y2 = np.clip(xywh[:2] + xywh[2:], 0, [w, h])
            predicted = np.concatenate([x1y1, x2y2 - x1y1])
            state.boxes.append(predicted)
            state.scores.append(score)
            state.query = q
            if predicted[2] > 0 and predicted[3] > 0:
                state.box = predicted
            z_new, mask = self._template(frame, state.box)
            state.memory.append(z_new)
            state.masks.append(mask)


def evaluate_sequences(
    tracker: Tracker, sequences: Sequence[Any], protocol: Literal["got10k", "ope"] = "got10k", batch_size: int = 8
) -> Any:
    """Track annotated sequences (:class:`~modalpeft.tracking.data.Sequence`, ``batch_size`` in parallel) from their
    first box and score them: GOT-10k's AO/SR (frames visible per the sequence's flags counted) or OPE's success
    AUC / precision / normalised precision (:mod:`modalpeft.tracking.metrics`)."""
    from .metrics import got10k_metrics, ope_metrics

    if protocol not in ("got10k", "ope"):
        raise ValueError(f"protocol={protocol!r}: choose 'got10k' or 'ope'.")
    unannotated = [s.name for s in sequences if len(s.boxes) < len(s.frames)]
    if unannotated:
        raise ValueError(
            f"sequences {unannotated[:5]} have only their first box (a test split): they cannot be scored here; "
            "write their results (modalpeft.tracking.metrics.write_got10k_results) and submit them to the server."
        )
    predictions: list[np.ndarray] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        predictions += tracker.track_batch([s.frames for s in chunk], [s.boxes[0] for s in chunk])
    truths = [s.boxes for s in sequences]
    if protocol == "got10k":
        return got10k_metrics(predictions, truths, covers=[s.visible.astype(int) for s in sequences])
    return ope_metrics(predictions, truths, visible=[s.visible for s in sequences])


def read_video(path: str | Path) -> Iterator[Tensor]:
    """The frames of a video file (PyAV) or of a folder of images (sorted by name), as ``(3, H, W)`` tensors."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
        if not files:
            raise ValueError(f"{path} holds no .jpg/.png frames; give a video file or a folder of frames.")
        return (load_frame(p) for p in files)
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise ValueError(
            f"video {path} cannot be opened by PyAV ({error}); give a readable video or a frame folder."
        ) from None
    return _decode(container, path)


def _decode(container: Any, path: Path) -> Iterator[Tensor]:
    import av

    index = 0
    with container:
        frames = container.decode(video=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.error.FFmpegError as error:
                raise ValueError(
                    f"video {path}: frame {index} cannot be decoded ({error}); re-encode the video or extract its "
                    "frames to a folder."
                ) from None
            index += 1
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).float() / 255.0


__all__ = ["Frame", "Tracker", "as_frame", "evaluate_sequences", "read_video"]
