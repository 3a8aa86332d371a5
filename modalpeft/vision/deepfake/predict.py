"""The predict path: video files decoded with PyAV, and per-video fake probabilities written as CSV.

``python recipes/deepfake.py predict --config <recipe>.yaml --ckpt_path=<fit checkpoint>
--data.init_args.predict_path=<video file | folder of frames | folder of those>`` runs
:meth:`DeepfakeDetector.predict_step` on every frame and :class:`VideoPredictionWriter` writes
``video,frames,fake_probability`` rows (the mean of the frames' fake probabilities, as the metrics aggregate).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter

from ...core.state import atomic_write


def decode_video(path: str | os.PathLike[str], num_frames: int | None = 32) -> list[Image.Image]:
    """Decode a video file with PyAV and keep ``num_frames`` evenly spaced frames (all when ``None``) as RGB PIL
    images.

    Raises:
        ImportError: without PyAV (``pip install av``).
        ValueError: when the file cannot be decoded or holds no video frames, naming it.
    """
    try:
        import av
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("decoding video files needs PyAV: pip install av") from err
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be positive or None (every frame).")
    frames: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video file {str(path)!r} has no video stream.")
            for frame in container.decode(video=0):
                frames.append(frame.to_image())
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"cannot decode video file {str(path)!r}: {err}. Re-encode or remove it.") from err
    if not frames:
        raise ValueError(f"video file {str(path)!r} holds no frames; re-encode or remove it.")
    if num_frames is None or len(frames) <= num_frames:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, num_frames).round().astype(int)]


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 10) -> None:
    """Write ``(T, H, W, 3)`` uint8 frames as an H.264/MPEG-4 file with PyAV (for tests and demos)."""
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_table(names: list[str], probs: torch.Tensor, videos: torch.Tensor) -> list[dict[str, Any]]:
    """One row per video: ``video`` (name), ``frames`` (count), ``fake_probability`` (mean over its frames)."""
    rows = []
    for v in torch.unique(videos).tolist():
        mask = videos == v
        rows.append({"video": names[v], "frames": int(mask.sum()), "fake_probability": float(probs[mask].mean())})
    return rows


class VideoPredictionWriter(BasePredictionWriter):
    """At the end of ``predict``, write per-video fake probabilities to a CSV file (atomically).

    Args:
        path: the CSV file; ``None``: ``<trainer.log_dir>/predictions.csv``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def target(self, trainer: pl.Trainer) -> Path:
        if self.path is not None:
            return Path(self.path)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions.csv"

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        if not predictions:
            return
        if isinstance(predictions[0], list):  # several predict loaders
            predictions = [p for loader in predictions for p in loader]
        probs = torch.cat([p["probs"].float().cpu() for p in predictions])
        videos = torch.cat([p["videos"].cpu() for p in predictions])
        dataset = trainer.datamodule.datasets["predict"]
        rows = video_table([v.name for v in dataset.videos], probs, videos)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["video", "frames", "fake_probability"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "fake_probability": f"{row['fake_probability']:.6f}"})
        target = self.target(trainer)
        atomic_write({target.name: buffer.getvalue().encode()}, target.parent)
        self.written = target


__all__ = ["VideoPredictionWriter", "decode_video", "video_table", "write_video"]
